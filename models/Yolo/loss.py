"""Loss of a dense anchor-free detector (one box, one objectness and C class logits per feature-map point).

Target assignment (`assign`), per image:
1. Each ground-truth box goes to the pyramid level whose size range (config "size_ranges", in input px, one
   [low, high) range per stride) holds its longer side.
2. Its candidate points are the points of that level that lie strictly inside the box and within
   center_radius * stride of the box centre in x and in y (FCOS centre sampling).
3. A point that is a candidate of several boxes (of the same level, so of similar sizes) goes to the box whose
   centre is nearest; FCOS's smallest-box rule would leave the larger of two overlapping pedestrians with none.
4. A box left without a point (tiny, or out-competed by smaller boxes) gets, of the 9 points of its level
   nearest to its centre, the nearest that is background or whose box keeps another point (all such boxes
   choose at once; when two choose one point, the one whose centre is nearer gets it). So every box gets a
   positive point unless boxes crowd around it: a point predicts one box.

Terms (weights in config/loss.json), each normalized by the number of positive points N_pos (at least 1; under
DDP that of the global batch, see utils.distributed.loss_normalizer):
    box_loss: GIoU loss (boxes.py) of the decoded box of each positive point, averaged over the positives;
    obj_loss: sigmoid focal loss (torchvision) of the objectness of all points (positives are 1), summed and
              divided by N_pos, as RetinaNet and FCOS normalize it;
    cls_loss: binary cross-entropy of the C class logits of each positive point against its one-hot class,
              summed over classes and averaged over the positives.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from models.Yolo.boxes import generalized_iou_loss
from utils.distributed import loss_normalizer

NO_BOX = -1  # in `assign`'s output: a background point
NEAREST_POINTS = 9  # where a box without a positive point looks for one (step 4 of the assignment)


class DetectionLoss(nn.Module):
    """cfg: a section of config/loss.json: weights {box, obj, cls}, center_radius, size_ranges (one per stride,
    smallest stride first), focal_alpha, focal_gamma."""

    def __init__(self, cfg: dict, strides: tuple):
        super().__init__()
        if len(cfg["size_ranges"]) != len(strides):
            raise ValueError(f"loss config: {len(cfg['size_ranges'])} size_ranges for {len(strides)} strides")
        self.cfg, self.strides = cfg, strides

    @torch.no_grad()
    def assign(self, points: torch.Tensor, strides: torch.Tensor, gt_boxes: torch.Tensor,
               gt_valid: torch.Tensor) -> torch.Tensor:
        """points (P, 2), strides (P,), gt_boxes (I, M, 4) in input px, gt_valid (I, M) ->
        (I, P) index of each point's box among the M of its image, or NO_BOX (see the module docstring)."""
        num_images, max_boxes = gt_valid.shape
        assigned = torch.full((num_images, len(points)), NO_BOX, dtype=torch.long, device=points.device)
        if max_boxes == 0:
            return assigned
        x1, y1, x2, y2 = gt_boxes.unbind(-1)  # each (I, M)
        sides = torch.maximum(x2 - x1, y2 - y1)
        level_stride = torch.zeros_like(sides)
        for stride, (low, high) in zip(self.strides, self.cfg["size_ranges"], strict=True):
            level_stride = torch.where((sides >= low) & (sides < high), float(stride), level_stride)
        px, py = points[:, 0].view(1, 1, -1), points[:, 1].view(1, 1, -1)  # (1, 1, P)
        cx, cy = ((x1 + x2) / 2)[..., None], ((y1 + y2) / 2)[..., None]  # (I, M, 1)
        radius = self.cfg["center_radius"] * strides.view(1, 1, -1)
        on_level = (strides.view(1, 1, -1) == level_stride[..., None]) & gt_valid[..., None]  # (I, M, P)
        candidate = (on_level & (px > x1[..., None]) & (px < x2[..., None]) & (py > y1[..., None])
                     & (py < y2[..., None]) & ((px - cx).abs() < radius) & ((py - cy).abs() < radius))
        distance = torch.where(on_level, (px - cx) ** 2 + (py - cy) ** 2, torch.inf)  # (I, M, P) px^2
        best_distance, best_box = torch.where(candidate, distance, torch.inf).min(dim=1)  # (I, P)
        assigned = torch.where(torch.isfinite(best_distance), best_box, assigned)

        # step 4, for all boxes at once: each box without a point takes, of its NEAREST_POINTS nearest points, the
        # nearest that is background or whose box keeps another point (the nearest of all when none is); when
        # several such boxes take one point, the box whose centre is nearest gets it (then the lowest index)
        box_ids = torch.arange(max_boxes, device=points.device)
        points_per_box = (assigned[:, None, :] == box_ids[None, :, None]).sum(2)  # (I, M)
        missing = gt_valid & (points_per_box == 0)  # (I, M)
        nearest = distance.topk(min(NEAREST_POINTS, len(points)), dim=2, largest=False)  # (I, M, K)
        owners = assigned.gather(1, nearest.indices.flatten(1)).view_as(nearest.indices)  # (I, M, K)
        owner_keeps_another = points_per_box.gather(1, owners.clamp(min=0).flatten(1)).view_as(owners) > 1
        free = (owners == NO_BOX) | owner_keeps_another
        choice = torch.where(free.any(2), free.float().argmax(2), 0)[..., None]  # (I, M, 1): first free, by distance
        chosen_point = nearest.indices.gather(2, choice)[..., 0]  # (I, M)
        chosen_distance = nearest.values.gather(2, choice)[..., 0]
        claim = torch.where(missing, chosen_distance, torch.inf)  # (I, M) px^2
        closest_claim = torch.full_like(best_distance, torch.inf).scatter_reduce(1, chosen_point, claim, "amin")
        wins = missing & (claim == closest_claim.gather(1, chosen_point))
        winner = torch.full_like(assigned, max_boxes).scatter_reduce(
            1, chosen_point, torch.where(wins, box_ids, max_boxes).expand_as(chosen_point), "amin")  # (I, P)
        return torch.where(winner < max_boxes, winner, assigned)

    def forward(self, outputs: dict, targets: dict) -> dict:
        """outputs: the model's dict (class_logits (I, P, C), objectness (I, P), boxes (I, P, 4), points (P, 2),
        strides (P,)); targets: target_boxes (I, M, 4) in input px, target_labels (I, M), target_valid (I, M), as
        collated (dataset.NuscenesDataset.collate_2d.padded_targets). Returns box_loss, obj_loss, cls_loss,
        total_loss (scalars) and num_positives."""
        class_logits, objectness = outputs["class_logits"].float(), outputs["objectness"].float()
        num_classes = class_logits.shape[2]
        # one padding slot more (never valid), so that the gathers below have a box to read when M is 0
        gt_boxes = F.pad(targets["target_boxes"].float(), (0, 0, 0, 1))
        gt_labels, gt_valid = F.pad(targets["target_labels"], (0, 1)), F.pad(targets["target_valid"], (0, 1))

        assigned = self.assign(outputs["points"].float(), outputs["strides"].float(), gt_boxes, gt_valid)
        positive = assigned != NO_BOX  # (I, P)
        matched = assigned.clamp(min=0)
        num_positives = positive.sum()
        # under DDP, normalized so that the processes' averaged gradient is that of one process with the global batch
        normalizer = loss_normalizer(num_positives.float())

        # every point at once (fixed shapes, no host read), background points weighted 0 against a unit box
        unit_box = (torch.arange(4, device=gt_boxes.device) >= 2).float()  # 0 0 1 1, made on the device
        matched_boxes = torch.where(positive[..., None], gt_boxes.gather(1, matched[..., None].expand(-1, -1, 4)),
                                    unit_box)  # (I, P, 4)
        box_loss = (generalized_iou_loss(outputs["boxes"].float(), matched_boxes) * positive).sum() / normalizer
        obj_loss = sigmoid_focal_loss(objectness, positive.float(), self.cfg["focal_alpha"], self.cfg["focal_gamma"],
                                      reduction="sum") / normalizer
        # (I, P, C) one-hot by comparison (F.one_hot reads its input's range on the host)
        classes = torch.arange(num_classes, device=class_logits.device)
        class_targets = (gt_labels.gather(1, matched)[..., None] == classes).float()
        cls_loss = F.binary_cross_entropy_with_logits(class_logits, class_targets, weight=positive[..., None].float(),
                                                      reduction="sum") / normalizer
        weights = self.cfg["weights"]
        total = weights["box"] * box_loss + weights["obj"] * obj_loss + weights["cls"] * cls_loss
        return {"box_loss": box_loss, "obj_loss": obj_loss, "cls_loss": cls_loss, "total_loss": total,
                "num_positives": num_positives}
