"""The loss of the LiftBEV segmenter: each class its own binary map on the BEV grid.

Shapes: logits and targets (B, C, X, Y); targets in {0, 1}."""

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationLoss(nn.Module):
    """Binary cross-entropy with `pos_weight` on the occupied cells (they are a few percent of the grid), plus
    `dice_weight` x the soft Dice loss per class over the whole batch (1 - 2 |p t| / (|p| + |t|)), which scores
    the overlap that the IoU metric measures. cfg: a section of config/loss.json."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.pos_weight, self.dice_weight = cfg["pos_weight"], cfg["dice_weight"]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict:
        logits = logits.float()  # in float32 whatever the autocast dtype
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=logits.new_tensor(self.pos_weight))
        probabilities = torch.sigmoid(logits)
        overlap = (probabilities * target).sum(dim=(0, 2, 3))  # (C,)
        sizes = probabilities.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
        dice = (1.0 - 2.0 * overlap / sizes.clamp(min=1.0)).mean()
        return {"bce_loss": bce, "dice_loss": dice, "total_loss": bce + self.dice_weight * dice}
