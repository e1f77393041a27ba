"""Image normalization as the first layer of a network, on the network's device."""

import torch
from torch import nn


class NormalizeImages(nn.Module):
    """uint8 RGB images (..., 3, H, W) with values 0-255 -> float32 (pixel / 255 - mean) / std per channel, with
    mean and std in 0-1 units (config/data.json "normalize").

    Done in the model, so that DataLoader workers send 1-byte pixels (a quarter of float32's bytes through shared
    and pinned memory and the host-to-device copy) and an exported model takes the images as decoded. The factors
    are buffers, moved with the model once, not built from lists on every call (a host-to-device copy each);
    not saved in checkpoints (they come from the configuration)."""

    def __init__(self, mean: list, std: list):
        super().__init__()
        std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)  # (3, 1, 1)
        self.register_buffer("bias", -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, images.float(), self.scale)  # one fused op: pixel * scale + bias
