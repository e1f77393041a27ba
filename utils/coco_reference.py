"""The references that utils.coco_eval is checked and timed against (tests/, bench/eval.py): synthetic COCO ground
truth and detections, and one bbox evaluation with a pycocotools-style API (pycocotools or faster-coco-eval, which
the caller imports)."""

import contextlib
import io

import numpy as np


def synthetic_coco(num_images: int, boxes_per_image: int = 8, detections_per_image: int = 30, seed: int = 0) -> tuple:
    """(ground truth dict, detections list) in COCO format at 1600x900, 10 categories: each ground-truth box has a
    detection jittered by ~10% of its size (wrong class 1 time in 5), and the rest are random boxes with lower
    scores. Box sides of 4-200 px, so that the small, medium and large ranges all have boxes."""
    rng = np.random.default_rng(seed)
    images = [{"id": index + 1, "width": 1600, "height": 900} for index in range(num_images)]
    annotations, detections = [], []
    for image in images:
        corners = rng.uniform(0, [1400, 750], size=(detections_per_image, 2))
        sizes = rng.uniform(4, 200, size=(detections_per_image, 2))
        categories = rng.integers(1, 11, size=detections_per_image)
        for k in range(detections_per_image):
            (x, y), (w, h), category = corners[k], sizes[k], int(categories[k])
            if k < boxes_per_image:
                annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
                dx, dy, dw, dh = rng.normal(0, 0.1, 4) * [w, h, w, h]
                x, y, w, h = x + dx, y + dy, max(1.0, w + dw), max(1.0, h + dh)
                category = category if rng.random() < 0.8 else int(rng.integers(1, 11))
                score = rng.random()
            else:
                score = rng.random() * 0.5
            detections.append({"image_id": image["id"], "category_id": category,
                               "bbox": [float(x), float(y), float(w), float(h)], "score": float(score)})
    ground_truth = {"images": images, "annotations": [{**a, "bbox": [float(v) for v in a["bbox"]],
                                                       "area": float(a["area"])} for a in annotations],
                    "categories": [{"id": index, "name": f"class{index}"} for index in range(1, 11)]}
    return ground_truth, detections


def reference_evaluation(coco_class, eval_class, ground_truth: dict, detections: list, image_ids=None) -> tuple:
    """(stats (12,), precision array) of one COCO bbox evaluation with the given API, on `image_ids` (all images
    by default)."""
    with contextlib.redirect_stdout(io.StringIO()):
        ground = coco_class()
        ground.dataset = ground_truth
        ground.createIndex()
        evaluator = eval_class(ground, ground.loadRes(detections), "bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.array(evaluator.stats[:12]), evaluator.eval["precision"]
