"""Multi-label segmentation on a grid (each class its own binary map, e.g. BEV occupancy): the loss and the IoU
metric, task-independent.

Shapes: logits and targets (B, C, X, Y); targets in {0, 1}."""

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError


def grid_shape(bev: dict) -> tuple:
    """(X rows, Y columns) of the grid over bev["x_range_m"] x bev["y_range_m"] with square cells of bev["cell_m"]
    (config/data.json "bev"); one line if the ranges are not whole numbers of cells."""
    cell = bev["cell_m"]
    if not cell > 0:
        raise UserError(f"'bev' in config/data.json: cell_m {cell} must be > 0 (the cell side in m)")
    shape = []
    for key in ("x_range_m", "y_range_m"):
        low, high = bev[key]
        cells = (high - low) / cell
        if not (high > low and abs(cells - round(cells)) < 1e-6):
            raise UserError(f"'bev' in config/data.json: {key} {bev[key]} must be [low, high] with high > low, a "
                            f"whole number of cells of cell_m {cell} m")
        shape.append(round(cells))
    return tuple(shape)


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


class OccupancyHistogram:
    """Counts of the cells' predicted probabilities in `bins` equal bins, per class, separately for occupied and
    free cells: enough for the IoU, precision and recall at every threshold k / bins over a whole split, in
    O(C x bins) memory. Histograms of several processes add up (`merge`). A cell counts as predicted occupied at a
    threshold by one rule everywhere (`occupied`), so per-sample and whole-split numbers agree."""

    bins = 100

    def __init__(self, num_classes: int):
        self.counts = torch.zeros(num_classes, 2, self.bins, dtype=torch.int64)  # [class, occupied?, bin]

    @classmethod
    def check_threshold(cls, threshold: float, where: str) -> None:
        """One line unless `threshold` is one of the thresholds k / bins, 0 < k < bins; `where` names its setting."""
        if not (0 < threshold < 1 and abs(threshold * cls.bins - round(threshold * cls.bins)) < 1e-9):
            raise UserError(f"{where} {threshold}: must be a multiple of {1 / cls.bins:g} between 0 and 1 (the "
                            f"IoU is counted in {cls.bins} probability bins)")

    @classmethod
    def bin_index(cls, probabilities: torch.Tensor) -> torch.Tensor:
        return (probabilities.float() * cls.bins).long().clamp(0, cls.bins - 1)

    @classmethod
    def occupied(cls, probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
        """Cells predicted occupied at `threshold`, by the same rule as the counts (bin >= threshold * bins)."""
        return cls.bin_index(probabilities) >= round(threshold * cls.bins)

    def update(self, probabilities: torch.Tensor, target: torch.Tensor) -> None:
        """probabilities, target (B, C, X, Y)."""
        num_classes = self.counts.shape[0]
        bin_index = self.bin_index(probabilities)
        class_index = torch.arange(num_classes, device=bin_index.device).view(1, -1, 1, 1)
        flat = (class_index * 2 + target.long()) * self.bins + bin_index
        self.counts += torch.bincount(flat.flatten(), minlength=self.counts.numel()).view_as(self.counts).cpu()

    def merge(self, others: list) -> None:
        for other in others:
            self.counts += other.counts

    def confusion(self, threshold: float) -> tuple:
        """(true positives, false positives, false negatives), each (C,) int64, of the cells with probability >=
        `threshold` (a multiple of 1 / bins)."""
        first = round(threshold * self.bins)
        predicted = self.counts[:, :, first:].sum(dim=2)
        return predicted[:, 1], predicted[:, 0], self.counts[:, 1].sum(dim=1) - predicted[:, 1]

    def iou(self, threshold: float) -> list:
        """IoU per class at `threshold`; None for a class with neither ground truth nor prediction."""
        tp, fp, fn = self.confusion(threshold)
        union = tp + fp + fn
        return [float(t / u) if u else None for t, u in zip(tp.tolist(), union.tolist(), strict=True)]

    def iou_all_occupied(self) -> list:
        """IoU per class of the prediction 'every cell occupied' (a baseline; 'none occupied' scores 0)."""
        occupied, total = self.counts[:, 1].sum(dim=1), self.counts.sum(dim=(1, 2))
        return [float(o / t) if t else None for o, t in zip(occupied.tolist(), total.tolist(), strict=True)]

    def precision_recall(self) -> tuple:
        """(recall (C, bins), precision (C, bins)) at the thresholds k / bins, k = 0 .. bins - 1; precision -1
        where nothing is predicted."""
        predicted = self.counts.flip(2).cumsum(dim=2).flip(2)  # cells with probability >= k / bins
        tp, fp = predicted[:, 1].double(), predicted[:, 0].double()
        occupied = self.counts[:, 1].sum(dim=1, keepdim=True).double()
        recall = (tp / occupied.clamp(min=1)).numpy()
        precision = np.where((tp + fp).numpy() > 0, (tp / (tp + fp).clamp(min=1)).numpy(), -1.0)
        return recall, precision
