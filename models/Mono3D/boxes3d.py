"""Mono3D's dense outputs to 3D boxes in the global frame, and the bird's-eye-view NMS across a sample's cameras."""

import torch
from torchvision.ops import batched_nms

from models.Mono3D.mono3d import REGRESSION


def decode_boxes(scores: torch.Tensor, regression: torch.Tensor, points: torch.Tensor, strides: torch.Tensor,
                 intrinsics: torch.Tensor, cam_to_global: torch.Tensor, allowed_attributes: torch.Tensor,
                 score_threshold: float, topk: int) -> dict:
    """The `topk` best (point, class) pairs of each of I images scoring above `score_threshold`, as 3D boxes.

    scores (I, P, C), regression (I, P, R) (mono3d.REGRESSION), points (P, 2) and strides (P,) in input px;
    intrinsics (I, 3, 3) input px; cam_to_global (I, 4, 4); allowed_attributes (C, A) bool: the attributes each
    class may have. Returns flat tensors over D boxes: image (D,) in [0, I), label (D,), score (D,), center (D, 3)
    global m (float64), size (D, 3) width, length, height m, yaw (D,) rad about the global z axis (float64),
    velocity (D, 2) global x, y m/s, attribute (D,) index into the A attributes (-1: the class has none)."""
    num_images, num_points, num_classes = scores.shape
    top_scores, top_index = scores.flatten(1).topk(min(topk, num_points * num_classes), dim=1)
    image = torch.arange(num_images, device=scores.device)[:, None].expand_as(top_index)
    keep = top_scores > score_threshold
    image, index, score = image[keep], top_index[keep], top_scores[keep]
    point, label = index // num_classes, index % num_classes
    values = regression[image, point].double()
    centre = points[point].double() + values[:, REGRESSION["offset"]] * strides[point, None].double()  # (D, 2) px
    to_global = cam_to_global[image].double()
    alpha = observation_angle(values[:, REGRESSION["angle"]], values[:, REGRESSION["direction"]][:, 0])
    center, yaw = lift_boxes(centre, values[:, REGRESSION["log_depth"]][:, 0].exp(), alpha, intrinsics[image],
                             to_global)
    velocity = values[:, REGRESSION["velocity"]]
    velocity = torch.stack([velocity[:, 0], torch.zeros_like(velocity[:, 0]), velocity[:, 1]], 1)
    velocity = (to_global[:, :3, :3] @ velocity[:, :, None])[:, :2, 0]
    attribute_logits = values[:, REGRESSION["attribute"]].masked_fill(~allowed_attributes[label], float("-inf"))
    attribute = torch.where(allowed_attributes[label].any(1), attribute_logits.argmax(1), -1)
    return {"image": image, "label": label, "score": score, "center": center,
            "size": values[:, REGRESSION["log_size"]].exp().float(), "yaw": yaw,
            "velocity": velocity.float(), "attribute": attribute}


def observation_angle(double_angle: torch.Tensor, direction_logit: torch.Tensor) -> torch.Tensor:
    """alpha (D,) rad from the predicted sin and cos of 2 alpha (D, 2) and the direction logit (D,): the angle in
    (0, pi] of the first, less pi where the logit says sin(alpha) < 0 (mono3d.py: the directions meet at 0 and pi)."""
    half = torch.atan2(double_angle[:, 0], double_angle[:, 1]) / 2  # (-pi/2, pi/2]
    return torch.where(half <= 0, half + torch.pi, half) - torch.pi * (direction_logit > 0)


def lift_boxes(centre: torch.Tensor, depth: torch.Tensor, alpha: torch.Tensor, intrinsics: torch.Tensor,
               to_global: torch.Tensor) -> tuple:
    """Boxes seen by cameras, in the global frame: centre (D, 2) the projected centre in px of the intrinsics
    (D, 3, 3), depth (D,) m, alpha (D,) the observation angle (dataset/NuscenesDataset/loader_3d_obj_det.py),
    to_global (D, 4, 4) camera -> global -> (center (D, 3) m, yaw (D,) rad about the global z axis), float64."""
    centre, depth, to_global = centre.double(), depth.double(), to_global.double()
    ray = torch.linalg.solve(intrinsics.double(), torch.cat([centre, torch.ones_like(centre[:, :1])], 1))
    camera = ray * depth[:, None]  # (D, 3) camera frame
    center = (to_global[:, :3, :3] @ camera[:, :, None])[..., 0] + to_global[:, :3, 3]
    yaw = alpha.double() + torch.atan2(camera[:, 0], camera[:, 2])  # heading in the camera frame
    heading = torch.stack([yaw.cos(), torch.zeros_like(yaw), -yaw.sin()], 1)  # the length axis, camera frame
    heading = (to_global[:, :3, :3] @ heading[:, :, None])[..., 0]
    return center, torch.atan2(heading[:, 1], heading[:, 0])


def bev_nms(boxes: dict, group: torch.Tensor, iou_threshold: float, max_boxes: int) -> torch.Tensor:
    """Indices of the boxes (decode_boxes' dict) that survive a per-group, per-class NMS on their bird's-eye-view
    footprints' axis-aligned bounds (global x, y), best first within each group, at most `max_boxes` per group
    (group (D,): the sample of each box)."""
    cos, sin = boxes["yaw"].cos().abs(), boxes["yaw"].sin().abs()
    width, length = boxes["size"][:, 0].double(), boxes["size"][:, 1].double()
    half = torch.stack([cos * length + sin * width, sin * length + cos * width], 1) / 2  # (D, 2) m
    xy = boxes["center"][:, :2]
    footprint = torch.cat([xy - half, xy + half], 1)
    if not len(xy):
        return group.new_zeros(0)
    keep = batched_nms(footprint, boxes["score"].double(), group * (int(boxes["label"].max()) + 1) + boxes["label"],
                       iou_threshold)
    keep = keep[torch.argsort(group[keep], stable=True)]  # groups in order, best first within each
    kept_groups = group[keep]
    first = torch.searchsorted(kept_groups, kept_groups, side="left")
    return keep[torch.arange(len(keep), device=keep.device) - first < max_boxes]
