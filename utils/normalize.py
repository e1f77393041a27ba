"""Image normalization as the first layer of a network, on the network's device."""

import torch
from torch import nn


class NormalizeImages(nn.Module):
    """uint8 RGB images (..., 3, H, W) with values 0-255 -> float32 (pixel / 255 - mean) / std per channel, with
    mean and std in 0-1 units (config/data.json "normalize").

    Done in the model, so that DataLoader workers send 1-byte pixels (a quarter of float32's bytes through shared
    and pinned memory and the host-to-device copy) and an exported model takes the images as decoded. The same
    float operations in the same order as transforms.v2's to_dtype(scale=True) and normalize, which the loader
    applied before, so that a checkpoint detects exactly what it detected then (bit for bit, measured on the test
    split). The factors are buffers, moved with the model once, not built from lists on every call (a
    host-to-device copy each); not saved in checkpoints (they come from the configuration)."""

    def __init__(self, mean: list, std: list):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # a copy first: the in-place steps must never write into a float32 input
        return images.to(torch.float32, copy=True).mul_(1.0 / 255).sub_(self.mean).div_(self.std)
