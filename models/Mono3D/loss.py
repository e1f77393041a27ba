"""Loss of Mono3D (models/Mono3D/mono3d.py), written from FCOS3D (Wang et al. 2021) and PGD (Wang et al. 2022).

Assignment, all images, points and boxes at once (tensors (I, P, M): images, points, boxes padded to the most of any
image): a point is a candidate of a box when it lies within center_radius strides of the box's projected 3D
centre in x and in y (FCOS3D's centre sampling about the 3D centre, not the 2D box's) and the box's 2D size (its
longer side, input px) is in the size range of the point's level (config "size_ranges", one per stride). A point
that several boxes claim takes the nearest in depth: the one in front is the one it sees.

Terms (weights in config/loss.json "Mono3D"; normalizers over the global batch under DDP, see
utils.distributed.loss_normalizer):
    cls_loss:        sigmoid focal loss (torchvision) of all class logits, the box's class at positives, summed
                     over the points and divided by the number of positives;
    centerness_loss: binary cross-entropy of the centre-ness logit at positives against
                     c = exp(-centerness_alpha * (dx^2 + dy^2)), dx, dy the point's offset to the projected centre
                     in strides;
    offset, depth, size, angle, velocity losses: L1 of the offset to the projected centre (strides), the log depth,
                     the log width, length and height, the sin and cos of twice the observation angle alpha, and
                     the velocity (camera x, z, m/s; boxes without one left out), each averaged over the positives
                     weighted by c (the points near the centre, which rank first at test time, count most);
    direction_loss:  binary cross-entropy of the direction logit against sin(alpha) < 0, weighted by c;
    attribute_loss:  cross-entropy of the attribute logits at positives whose box has an attribute, weighted by c.
No step reads the host: no nonzero, item or data-dependent shape after the padding.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from dataset.NuscenesDataset.loader_3d_obj_det import TARGET_COLUMNS
from models.Mono3D.mono3d import REGRESSION
from utils.distributed import loss_normalizer

COLUMN = {name: index for index, name in enumerate(TARGET_COLUMNS)}


class Mono3DLoss(nn.Module):
    """cfg: the "Mono3D" section of config/loss.json: weights {cls, centerness, offset, depth, size, angle,
    direction, velocity, attribute}, center_radius (strides), size_ranges ([low, high] px per stride), centerness_alpha,
    focal_alpha, focal_gamma."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg

    @torch.no_grad()
    def assign(self, points: torch.Tensor, strides: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> tuple:
        """points (P, 2), strides (P,), targets (I, M, F), valid (I, M) -> (positive (I, P) bool, matched (I, P)
        index of each point's box among its image's M, centerness (I, P) target c)."""
        if targets.shape[1] == 0:
            shape, device = (targets.shape[0], len(points)), points.device
            return (torch.zeros(shape, dtype=torch.bool, device=device),
                    torch.zeros(shape, dtype=torch.long, device=device), torch.zeros(shape, device=device))
        centre = targets[..., [COLUMN["u"], COLUMN["v"]]]  # (I, M, 2)
        offset = (centre[:, None] - points[None, :, None]) / strides[None, :, None, None]  # (I, P, M, 2) strides
        near = (offset.abs() < self.cfg["center_radius"]).all(-1)
        box_size = torch.maximum(targets[..., COLUMN["x2"]] - targets[..., COLUMN["x1"]],
                                 targets[..., COLUMN["y2"]] - targets[..., COLUMN["y1"]])  # (I, M) px
        ranges = torch.tensor(self.cfg["size_ranges"], dtype=box_size.dtype, device=box_size.device)
        level = torch.log2(strides / strides.min()).round().long()  # (P,) 0, 1, 2 (no unique: a host read)
        low, high = ranges[level, 0][None, :, None], ranges[level, 1][None, :, None]
        candidate = near & valid[:, None] & (box_size[:, None] >= low) & (box_size[:, None] < high)
        depth = targets[..., COLUMN["depth"]][:, None].expand_as(candidate)
        matched = torch.where(candidate, depth, torch.inf).argmin(-1)  # (I, P)
        positive = candidate.any(-1)
        point_offset = offset.gather(2, matched[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]
        centerness = torch.exp(-self.cfg["centerness_alpha"] * point_offset.square().sum(-1)) * positive
        return positive, matched, centerness

    def forward(self, outputs: dict, targets: torch.Tensor, valid: torch.Tensor) -> dict:
        """outputs of Mono3D.forward, targets (I, M, F) and valid (I, M) of the loader's collate_3d -> the loss terms
        and total_loss, 0-d float32 tensors."""
        points, strides = outputs["points"].float(), outputs["strides"].float()
        class_logits = outputs["class_logits"].float()
        regression = outputs["regression"].float()
        positive, matched, centerness = self.assign(points, strides, targets, valid)
        box = targets.gather(1, matched[..., None].expand(-1, -1, targets.shape[-1]))  # (I, P, F) each point's box
        weights = self.cfg["weights"]
        num_positive = loss_normalizer(positive.sum().float())
        weight_sum = loss_normalizer(centerness.sum())

        class_target = torch.zeros_like(class_logits).scatter_(-1, box[..., COLUMN["class"], None].long(), 1.0)
        class_target = class_target * positive[..., None]
        losses = {"cls_loss": sigmoid_focal_loss(class_logits, class_target, self.cfg["focal_alpha"],
                                                 self.cfg["focal_gamma"], reduction="sum") / num_positive,
                  "centerness_loss": (F.binary_cross_entropy_with_logits(
                      outputs["centerness_logits"].float(), centerness, reduction="none") * positive).sum()
                  / num_positive}

        def weighted(error: torch.Tensor, mask: torch.Tensor = positive) -> torch.Tensor:
            return (error * centerness * mask).sum() / weight_sum

        alpha = box[..., COLUMN["alpha"]]
        offset_target = (box[..., [COLUMN["u"], COLUMN["v"]]] - points) / strides[:, None]
        losses["offset_loss"] = weighted((regression[..., REGRESSION["offset"]] - offset_target).abs().sum(-1))
        losses["depth_loss"] = weighted((regression[..., REGRESSION["log_depth"]][..., 0]
                                         - box[..., COLUMN["depth"]].clamp(min=1e-3).log()).abs())
        losses["size_loss"] = weighted((regression[..., REGRESSION["log_size"]]
                                        - box[..., COLUMN["w"]:COLUMN["h"] + 1].clamp(min=1e-3).log()).abs().sum(-1))
        losses["angle_loss"] = weighted((regression[..., REGRESSION["angle"]]
                                         - torch.stack([(2 * alpha).sin(), (2 * alpha).cos()], -1)).abs().sum(-1))
        losses["direction_loss"] = weighted(F.binary_cross_entropy_with_logits(
            regression[..., REGRESSION["direction"]][..., 0], (alpha.sin() < 0).float(), reduction="none"))
        velocity = box[..., [COLUMN["vx"], COLUMN["vz"]]]
        known = velocity.isfinite().all(-1)
        losses["velocity_loss"] = weighted((regression[..., REGRESSION["velocity"]]
                                            - velocity.nan_to_num()).abs().sum(-1), positive & known)
        attribute = box[..., COLUMN["attribute"]].long()
        losses["attribute_loss"] = weighted(F.cross_entropy(regression[..., REGRESSION["attribute"]].flatten(0, 1),
                                                            attribute.clamp(min=0).flatten(), reduction="none"
                                                            ).view_as(attribute), positive & (attribute >= 0))
        losses["total_loss"] = sum(weights[name.removesuffix("_loss")] * value for name, value in losses.items())
        return losses
