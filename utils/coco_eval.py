"""COCO box metrics for any detector whose ground truth is a COCO file, computed by faster-coco-eval: pycocotools'
algorithm in C++, the same numbers (tests/test_coco_eval.py checks it against pycocotools) about 9 times faster
(bench/eval.py: 6.1 s vs 54 s for 10,000 images)."""

import logging

import numpy as np
from faster_coco_eval import COCO
from faster_coco_eval import COCOeval_faster as COCOeval

from utils.boxes import to_original_pixels

SUMMARY_NAMES = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")  # the first six of COCOeval.stats
AREA_RANGES = {"AP_small": (0, 32**2), "AP_medium": (32**2, 96**2), "AP_large": (96**2, 1e10)}  # px², as COCOeval's

logger = logging.getLogger(__name__)


def load_coco(path: str) -> COCO:
    """A COCO annotation file, indexed; its progress messages go to this module's logger at DEBUG."""
    return COCO(path, print_function=logger.debug)


def coco_detections(predictions: list, batch: dict, input_size: tuple) -> list:
    """COCO results (image_id, category_id = label + 1, bbox [x, y, w, h] in original px, score) of a collated
    batch's images: predictions[i] = {boxes (D, 4) in input px, scores (D,), labels (D,) 0-based} for image i of
    the B x N_cam, in the batch's order."""
    detections = []
    for found, image_id, size in zip(predictions, batch["image_ids"].flatten().tolist(),
                                     batch["orig_sizes"].flatten(0, 1).tolist(), strict=True):
        boxes = to_original_pixels(found["boxes"].float().cpu(), input_size, size)
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), found["scores"].float().tolist(),
                                                  found["labels"].tolist(), strict=True):
            detections.append({"image_id": image_id, "category_id": int(label) + 1,
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return detections


def coco_metrics(ground_truth: COCO, detections: list, image_ids: list) -> tuple:
    """Evaluate COCO-format detections (image_id, category_id, bbox [x, y, w, h], score) on the images
    `image_ids` of `ground_truth`, image by image as COCOeval does.

    Returns (metrics, pr_curves): metrics has mAP (@[.5:.95]), AP50, AP75, AP_small/medium/large and
    per_class_AP {category name: AP@[.5:.95], or None for a category without ground truth in these images}, all
    in [0, 1], or None where undefined: COCOeval's -1, where these images have no ground truth of that size or
    category; pr_curves maps each category name to (recall (101,), precision (101,)) at IoU 0.5, precision -1
    where undefined."""
    names = {c["id"]: c["name"] for c in ground_truth.loadCats(ground_truth.getCatIds())}
    annotations = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=list(image_ids)))
    present = {annotation["category_id"] for annotation in annotations}
    areas = np.array([annotation["area"] for annotation in annotations], dtype=np.float64)
    metrics = {name: (0.0 if len(areas) else None) for name in SUMMARY_NAMES}
    metrics.update({name: (0.0 if ((areas >= low) & (areas <= high)).any() else None)
                    for name, (low, high) in AREA_RANGES.items()})
    metrics["per_class_AP"] = {name: (0.0 if cid in present else None) for cid, name in names.items()}
    pr_curves = {name: (np.linspace(0, 1, 101), -np.ones(101)) for name in names.values()}
    if not detections:
        return metrics, pr_curves
    # the evaluator logs its progress and table through print_function: to this module's logger at DEBUG
    results = ground_truth.loadRes([dict(detection) for detection in detections])  # it adds keys to the dicts
    evaluator = COCOeval(ground_truth, results, "bbox", print_function=logger.debug)
    evaluator.params.imgIds = list(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    metrics.update({name: (float(value) if value > -1 else None)
                    for name, value in zip(SUMMARY_NAMES, evaluator.stats, strict=False)})
    precision = evaluator.eval["precision"]  # (IoU thresholds, recall points, categories, areas, max dets)
    for k, category_id in enumerate(evaluator.params.catIds):
        if category_id in present:
            per_class = precision[:, :, k, 0, -1]  # all areas, 100 detections per image
            metrics["per_class_AP"][names[category_id]] = float(per_class[per_class > -1].mean())
            pr_curves[names[category_id]] = (evaluator.params.recThrs, precision[0, :, k, 0, -1])
    return metrics, pr_curves
