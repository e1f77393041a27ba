"""The IoU of multi-label segmentation on a grid (each class its own binary map, e.g. BEV occupancy),
task-independent.

Shapes: probabilities and targets (B, C, X, Y); targets in {0, 1}."""

import numpy as np
import torch

from utils.errors import UserError


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
