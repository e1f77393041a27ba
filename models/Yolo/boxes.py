"""Box coding, box-overlap losses and detection post-processing for dense (per-point) detectors. Boxes are (x1, y1,
x2, y2) in pixels."""

import numpy as np
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


def generalized_iou_loss(boxes: torch.Tensor, targets: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """GIoU loss (Rezatofighi et al., 2019) per box pair, boxes and targets (..., 4): 1 - IoU + (enclosing area -
    union) / enclosing area. torchvision.ops.generalized_box_iou_loss computes the same, but its boolean-mask
    intersection reads the mask on the host 5 times per training step (a CUDA stall each); clamps do not."""
    iou, union, (enclosing_w, enclosing_h) = _overlap(boxes, targets, eps)
    enclosing_area = enclosing_w * enclosing_h
    return 1 - iou + (enclosing_area - union) / (enclosing_area + eps)


def complete_iou_loss(boxes: torch.Tensor, targets: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """CIoU loss (Zheng et al., 2020) per box pair, boxes and targets (..., 4): 1 - IoU + (centre distance /
    enclosing diagonal)^2 + alpha * v, with v the aspect-ratio term and alpha = v / (1 - IoU + v) held constant.
    The same as torchvision.ops.complete_box_iou_loss, without its host reads (see generalized_iou_loss)."""
    iou, _, (enclosing_w, enclosing_h) = _overlap(boxes, targets, eps)
    x1, y1, x2, y2 = boxes.unbind(-1)
    tx1, ty1, tx2, ty2 = targets.unbind(-1)
    centre_distance_squared = ((x1 + x2 - tx1 - tx2) ** 2 + (y1 + y2 - ty1 - ty2) ** 2) / 4
    v = (4 / torch.pi ** 2) * (torch.atan((tx2 - tx1) / (ty2 - ty1)) - torch.atan((x2 - x1) / (y2 - y1))) ** 2
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return 1 - iou + centre_distance_squared / (enclosing_w ** 2 + enclosing_h ** 2 + eps) + alpha * v


def _overlap(boxes: torch.Tensor, targets: torch.Tensor, eps: float) -> tuple:
    """IoU (...), union area (...) and the (width, height) of the smallest enclosing box of each box pair."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    tx1, ty1, tx2, ty2 = targets.unbind(-1)
    intersection = ((torch.minimum(x2, tx2) - torch.maximum(x1, tx1)).clamp(min=0)
                    * (torch.minimum(y2, ty2) - torch.maximum(y1, ty1)).clamp(min=0))
    union = (x2 - x1) * (y2 - y1) + (tx2 - tx1) * (ty2 - ty1) - intersection
    enclosing = (torch.maximum(x2, tx2) - torch.minimum(x1, tx1), torch.maximum(y2, ty2) - torch.minimum(y1, ty1))
    return intersection / (union + eps), union, enclosing


def postprocess_detections(boxes: torch.Tensor, scores: torch.Tensor, score_threshold: float, nms_iou: float,
                           pre_nms_topk: int, max_detections: int, image_size: tuple) -> dict:
    """Detections of a batch of images from dense predictions, per image: the (point, class) pairs scoring above
    score_threshold, at most the pre_nms_topk best of them, class-aware NMS at nms_iou, then the max_detections
    best. One top-k for the whole batch, and torchvision's batched_nms over the best candidates of each image only.

    boxes (I, P, 4) in input px, clipped here to image_size = (W, H); scores (I, P, C) in [0, 1].
    Returns flat tensors over the D detections of all I images, sorted by image, best score first within an
    image: boxes (D, 4) in input px, scores (D,), labels (D,) class index, image_index (D,) in [0, I)."""
    num_images, num_classes = scores.shape[0], scores.shape[-1]
    flat_scores = scores.flatten(1)  # (I, P * C), point-major
    top_scores, top_index = flat_scores.topk(min(pre_nms_topk, flat_scores.shape[1]), dim=1)  # (I, k), best first
    candidates = (top_scores > score_threshold).sum(1)  # (I,): the above-threshold ones are a prefix of each row
    # Greedy NMS decides each candidate from the better ones alone, so NMS over an image's `length` best candidates
    # decides those exactly, and once it keeps max_detections the worse candidates cannot change the result. NMS
    # costs ~length² on the CPU: start at twice max_detections and double for the images that kept fewer.
    length = min(top_scores.shape[1], 2 * max_detections)
    images = torch.arange(num_images, device=scores.device)  # (I',) still undecided
    parts = []
    while True:
        kept = _nms_of_prefixes(boxes, top_scores, top_index, candidates, images, length, num_classes, nms_iou,
                                image_size)
        kept_per_image = torch.bincount(kept["image_index"], minlength=num_images)[images]
        decided = (kept_per_image >= max_detections) | (candidates[images] <= length)
        parts.append({key: value[decided[torch.searchsorted(images, kept["image_index"])]]
                      for key, value in kept.items()})
        images, length = images[~decided], min(top_scores.shape[1], 2 * length)
        if not len(images):
            break
    detections = {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    # by image, best score first within an image, the max_detections best
    order = detections["scores"].argsort(descending=True, stable=True)
    order = order[detections["image_index"][order].argsort(stable=True)]
    image_index = detections["image_index"][order]
    counts = torch.bincount(image_index, minlength=num_images)  # (I,)
    rank = torch.arange(len(order), device=order.device) - (counts.cumsum(0) - counts)[image_index]  # within its image
    return {key: value[order[rank < max_detections]] for key, value in detections.items()}


def _nms_of_prefixes(boxes: torch.Tensor, top_scores: torch.Tensor, top_index: torch.Tensor, candidates: torch.Tensor,
                     images: torch.Tensor, length: int, num_classes: int, nms_iou: float, image_size: tuple) -> dict:
    """Class-aware NMS over the first `length` above-threshold candidates of each of `images` (I',), from
    postprocess_detections' top-k: top_scores and top_index (I, k) into the flattened (P * C) scores, candidates
    (I,) the above-threshold count of each row. Returns the kept ones as flat tensors in the output's form."""
    width, height = image_size
    position = torch.arange(length, device=top_scores.device)
    above = position < candidates[images, None]  # (I', length)
    image_index = images[:, None].expand(-1, length)[above]  # (N,)
    candidate_scores = top_scores[images, :length][above]
    candidate_index = top_index[images, :length][above]
    candidate_labels = candidate_index % num_classes
    candidate_boxes = boxes[image_index, candidate_index // num_classes]  # (N, 4), a copy
    candidate_boxes[:, 0::2] = candidate_boxes[:, 0::2].clamp(0, width)
    candidate_boxes[:, 1::2] = candidate_boxes[:, 1::2].clamp(0, height)
    # Class-aware within an image: each class's boxes are shifted apart by (largest coordinate + 1) px, so that
    # batched_nms groups by image only: one NMS kernel for the batch on CUDA, one per image on the CPU (where
    # torchvision loops over the groups of large inputs, and image x class groups would be 10 times as many).
    # float64: the shifts, and batched_nms's own per-image ones, cost float32 boxes ~0.01 px of precision.
    shifted = candidate_boxes.double() + (candidate_labels.double() * (max(width, height) + 1))[:, None]
    kept = batched_nms(shifted, candidate_scores.double(), image_index, nms_iou)  # (K,) best first
    return {"boxes": candidate_boxes[kept], "scores": candidate_scores[kept], "labels": candidate_labels[kept],
            "image_index": image_index[kept]}


def to_original_pixels(boxes: torch.Tensor, input_size: tuple, original_size: tuple) -> torch.Tensor:
    """Map boxes (N, 4) from the model's input pixels, input_size = (W, H), to an image of original_size = (W, H)
    that was resized (not cropped) to the input size."""
    scale = boxes.new_tensor([original_size[0] / input_size[0], original_size[1] / input_size[1]] * 2)
    return boxes * scale


def coco_detection_array(predictions: dict, batch: dict, input_size: tuple) -> np.ndarray:
    """The detections of a collated batch as COCO results, (D, 7) float64 rows [image_id, x, y, w, h, score,
    category_id = label + 1] with boxes in original px, built on the predictions' device and copied to the host once.

    predictions: flat tensors over the batch's I = B x N_cam images (postprocess_detections): boxes (D, 4) x1 y1 x2
    y2 in input px (input_size = (W, H)), scores (D,), labels (D,) 0-based, image_index (D,) into the
    images in the batch's order; batch: image_ids (B, N_cam), orig_sizes (B, N_cam, 2) original (W, H)."""
    device, index = predictions["boxes"].device, predictions["image_index"]
    # the scale in float32 and the box in float32 times it: the detections' precision (a box is float32)
    scale = (batch["orig_sizes"].flatten(0, 1).double() / torch.tensor(input_size, dtype=torch.float64)).float()
    boxes = (predictions["boxes"].float() * scale.to(device)[index].repeat(1, 2)).double()  # (D, 4) original px
    columns = (batch["image_ids"].flatten().to(device)[index].double()[:, None], boxes[:, :2],
               boxes[:, 2:] - boxes[:, :2], predictions["scores"].double()[:, None],
               predictions["labels"].double()[:, None] + 1)
    return torch.cat(columns, dim=1).cpu().numpy()
