"""Loss of the "csp_pan" Yolo (models/Yolo/csp_pan.py), written from TOOD (task-aligned assignment), GFL
(distribution focal loss) and the CIoU paper, with YOLOX's centre prior for the candidates.

Assignment, per image, on the detached predictions, all boxes and points at once (tensors (I, M, P): images, boxes
padded to the most of any image, points):
1. Candidates of a box: the points strictly inside it; for a box with none (smaller than the finest stride, or
   between the points), the points within center_radius strides of its centre in x and in y (the centre prior).
2. Alignment of a candidate with its box: s^alpha x u^beta, s the predicted probability of the box's class at the
   point, u the IoU of the point's predicted box with the box (0 for the other points).
3. Each box takes its `topk` best-aligned candidates (all of them when it has fewer); the candidates of alignment
   0 (early in training, when no predicted box overlaps) after all others, nearest its centre first. (With
   "assignment": "nearest", the ablation of this step, it takes the `topk` candidates nearest its centre.)
4. A point that several boxes took keeps the box its predicted box overlaps most (at equal IoU, the nearest box
   centre).
A positive point's target t is its alignment scaled so that its box's best-aligned point gets the best IoU among
the box's points (IoU-aware: the class score learns to rank detections by localization quality); with
"iou_aware": false, the ablation, t is 1.

Terms (weights in config/loss.json "aligned"; under DDP each normalizer is that of the global batch, see
utils.distributed.loss_normalizer):
    cls_loss: binary cross-entropy of all class logits against t at the box's class, 0 elsewhere, summed and
              divided by the sum of the targets t (at least 1);
    box_loss: 1 - CIoU (torchvision) of each positive point's box with its box, averaged over the positive points;
    dfl_loss: distribution focal loss: each side's distance d in strides lies between bins l and l + 1, and the
              cross-entropy of the side's bin logits to both, weighted (l + 1 - d) and (d - l), is averaged over
              the 4 sides and over the positive points.
The box terms weigh every positive point alike, where TOOD weighs them by t: with t, a box whose first predicted
boxes miss it (a 12 x 14 px box with one candidate, IoU 0.03) got almost no gradient and was never learned in the
overfit test (tests/test_csp_pan.py); weighted alike, it reaches IoU 0.997 in the same 250 steps.
No step takes the host's time: no nonzero, item or data-dependent shape after the padding.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou

from models.Yolo.boxes import complete_iou_loss
from models.Yolo.csp_pan import REG_MAX
from models.Yolo.loss import NO_BOX
from utils.distributed import loss_normalizer


class AlignedDetectionLoss(nn.Module):
    """cfg: the "aligned" part of a section of config/loss.json: weights {box, dfl, cls}, topk, alpha, beta,
    center_radius, assignment ("task_aligned" or "nearest"), iou_aware."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg

    @torch.no_grad()
    def assign(self, class_probabilities: torch.Tensor, predicted_boxes: torch.Tensor, points: torch.Tensor,
               strides: torch.Tensor, gt_boxes: torch.Tensor, gt_labels: torch.Tensor, gt_valid: torch.Tensor) -> tuple:
        """class_probabilities (I, P, C), predicted_boxes (I, P, 4) in input px, points (P, 2), strides (P,),
        gt_boxes (I, M, 4), gt_labels (I, M), gt_valid (I, M) -> (assigned (I, P): each point's box among the M of
        its image or NO_BOX, targets (I, P): t, 0 for background points). See the module docstring."""
        max_boxes = gt_valid.shape[1]
        if max_boxes == 0:
            return (torch.full(predicted_boxes.shape[:2], NO_BOX, dtype=torch.long, device=points.device),
                    predicted_boxes.new_zeros(predicted_boxes.shape[:2]))
        x1, y1, x2, y2 = (side[..., None] for side in gt_boxes.unbind(-1))  # each (I, M, 1)
        px, py = points[:, 0], points[:, 1]  # (P,)
        inside = (px > x1) & (px < x2) & (py > y1) & (py < y2)  # (I, M, P)
        centre_distance = torch.maximum((px - (x1 + x2) / 2).abs(), (py - (y1 + y2) / 2).abs())  # (I, M, P) px
        near_centre = centre_distance < self.cfg["center_radius"] * strides
        candidate = (inside | (near_centre & ~inside.any(dim=2, keepdim=True))) & gt_valid[..., None]
        iou = torch.vmap(box_iou)(gt_boxes, predicted_boxes)  # (I, M, P)
        probability = class_probabilities.gather(2, gt_labels[:, None, :].expand(-1, len(points), -1))  # (I, P, M)
        alignment = torch.where(candidate, probability.transpose(1, 2) ** self.cfg["alpha"] * iou ** self.cfg["beta"],
                                0.0)
        if self.cfg["assignment"] == "task_aligned":
            # alignments > 0 first; the candidates of alignment 0 after them, nearest the box's centre first
            ranking = torch.where(candidate, torch.where(alignment > 0, alignment, -centre_distance), -torch.inf)
        else:  # "nearest": the candidates nearest the box's centre, whatever the predictions (a static prior)
            ranking = torch.where(candidate, -centre_distance, -torch.inf)
        top = ranking.topk(min(self.cfg["topk"], len(points)), dim=2).indices  # (I, M, k)
        positive = torch.zeros_like(candidate).scatter_(2, top, True) & candidate  # (I, M, P)
        # a point taken by several boxes keeps the one its predicted box overlaps most (at equal IoU the nearest;
        # 1e-9 per px of distance is below any IoU difference that matters)
        best_box = torch.where(positive, iou - 1e-9 * centre_distance, -torch.inf).argmax(dim=1)  # (I, P)
        positive &= best_box[:, None, :] == torch.arange(max_boxes, device=points.device)[None, :, None]
        alignment = torch.where(positive, alignment, 0.0)
        best_iou = torch.where(positive, iou, 0.0).amax(dim=2, keepdim=True)  # (I, M, 1)
        scale = best_iou / alignment.amax(dim=2, keepdim=True).clamp(min=1e-30)
        assigned = torch.where(positive.any(dim=1), best_box, NO_BOX)  # (I, P)
        if not self.cfg["iou_aware"]:  # binary class targets: 1 at the positive points
            return assigned, positive.any(dim=1).float()
        return assigned, (alignment * scale).amax(dim=1)

    def forward(self, outputs: dict, targets: dict) -> dict:
        """outputs: the model's dict (class_logits (I, P, C), distance_logits (I, P, 4, REG_MAX), boxes (I, P, 4),
        points (P, 2), strides (P,)); targets: target_boxes (I, M, 4) in input px, target_labels (I, M), target_valid
        (I, M), as collated (dataset.NuscenesDataset.collate_2d.padded_targets). Returns box_loss, dfl_loss,
        cls_loss, total_loss (scalars) and num_positives."""
        class_logits, boxes = outputs["class_logits"].float(), outputs["boxes"].float()
        points, strides = outputs["points"].float(), outputs["strides"].float()
        num_classes = class_logits.shape[2]
        # one more, invalid slot: a batch without boxes keeps the same code path (and the gathers an index 0)
        gt_boxes = F.pad(targets["target_boxes"].float(), (0, 0, 0, 1))  # (I, M + 1, 4)
        gt_labels, gt_valid = F.pad(targets["target_labels"], (0, 1)), F.pad(targets["target_valid"], (0, 1))

        assigned, target = self.assign(torch.sigmoid(class_logits.detach()), boxes.detach(), points, strides,
                                       gt_boxes, gt_labels, gt_valid)
        positive = assigned != NO_BOX  # (I, P)
        matched = assigned.clamp(min=0)
        # (I, P, C); a comparison, not F.one_hot, which reads its input's range on the host to check it
        classes = torch.arange(num_classes, device=class_logits.device)
        class_targets = (gt_labels.gather(1, matched)[..., None] == classes) * target[..., None]
        # under DDP, normalized so that the processes' averaged gradient is that of one process with the global batch
        normalizer = loss_normalizer(target.sum())
        cls_loss = F.binary_cross_entropy_with_logits(class_logits, class_targets, reduction="sum") / normalizer

        # every point at once, background points weighted 0 against a unit box (finite losses and gradients)
        unit_box = (torch.arange(4, device=boxes.device) >= 2).float()  # 0 0 1 1, made on the device
        matched_boxes = torch.where(positive[..., None], gt_boxes.gather(1, matched[..., None].expand(-1, -1, 4)),
                                    unit_box)  # (I, P, 4)
        weight = positive.float()
        box_normalizer = loss_normalizer(weight.sum())
        box_loss = (complete_iou_loss(boxes, matched_boxes) * weight).sum() / box_normalizer
        sides = torch.cat([points - matched_boxes[..., :2], matched_boxes[..., 2:] - points], dim=-1) / strides[:, None]
        sides = sides.clamp(0, REG_MAX - 1.01)  # (I, P, 4) in strides, within the bins
        left = sides.floor().long()
        log_probabilities = F.log_softmax(outputs["distance_logits"].float(), dim=-1)  # (I, P, 4, REG_MAX)
        left_log, right_log = log_probabilities.gather(-1, torch.stack([left, left + 1], dim=-1)).unbind(-1)
        dfl = -(left_log * (left + 1 - sides) + right_log * (sides - left)).mean(dim=-1)  # (I, P)
        dfl_loss = (dfl * weight).sum() / box_normalizer

        weights = self.cfg["weights"]
        total = weights["box"] * box_loss + weights["dfl"] * dfl_loss + weights["cls"] * cls_loss
        return {"box_loss": box_loss, "dfl_loss": dfl_loss, "cls_loss": cls_loss, "total_loss": total,
                "num_positives": positive.sum()}

