"""Box coding and detection post-processing for dense (per-point) detectors. Boxes are (x1, y1, x2, y2) in pixels."""

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms


def decode_ltrb(deltas: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Boxes (..., P, 4) from raw regression outputs (..., P, 4): the distances from each point (P, 2) to the
    box's left, top, right and bottom sides are softplus(delta) * stride (P,), so they are positive and grow
    linearly (no exp overflow) with the raw output."""
    distances = F.softplus(deltas) * strides[:, None]
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def encode_ltrb(boxes: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Inverse of decode_ltrb for boxes (..., P, 4) that contain their points (P, 2) strictly."""
    distances = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1) / strides[:, None]
    return distances + torch.log(-torch.expm1(-distances))  # softplus^-1(d) = log(exp(d) - 1), stable form


def postprocess_detections(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float, nms_iou: float,
                           pre_nms_topk: int, max_detections: int, image_size: tuple) -> list:
    """Detections per image from dense predictions: score threshold, the pre_nms_topk best (point, class)
    pairs, class-aware NMS (torchvision's batched_nms), then the max_detections best.

    boxes (I, P, 4) in input pixels, clipped here to image_size = (W, H); scores (I, P, C) in [0, 1].
    Returns I dicts: boxes (D, 4), scores (D,), labels (D,) class index, best score first."""
    width, height = image_size
    num_classes = scores.shape[-1]
    detections = []
    for image_boxes, image_scores in zip(boxes, scores, strict=True):
        flat_scores = image_scores.flatten()  # (P * C,), point-major
        keep = torch.nonzero(flat_scores > score_threshold).squeeze(1)
        if keep.numel() > pre_nms_topk:
            keep = keep[flat_scores[keep].topk(pre_nms_topk).indices]
        candidate_scores = flat_scores[keep]
        candidate_labels = keep % num_classes
        candidate_boxes = image_boxes[keep // num_classes].clone()
        candidate_boxes[:, 0::2] = candidate_boxes[:, 0::2].clamp(0, width)
        candidate_boxes[:, 1::2] = candidate_boxes[:, 1::2].clamp(0, height)
        kept = batched_nms(candidate_boxes, candidate_scores, candidate_labels, nms_iou)[:max_detections]
        detections.append({"boxes": candidate_boxes[kept], "scores": candidate_scores[kept],
                           "labels": candidate_labels[kept]})
    return detections


def to_original_pixels(boxes: torch.Tensor, input_size: tuple, original_size: tuple) -> torch.Tensor:
    """Map boxes (N, 4) from the model's input pixels, input_size = (W, H), to an image of original_size = (W, H)
    that was resized (not cropped) to the input size."""
    scale = boxes.new_tensor([original_size[0] / input_size[0], original_size[1] / input_size[1]] * 2)
    return boxes * scale
