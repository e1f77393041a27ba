"""COCO box metrics for any detector whose ground truth is a COCO file. Detections travel as one (N, 7) float64
array per evaluation, a row [image_id, x, y, w, h, score, category_id] per detection in original image pixels (the
results-array form of pycocotools' and faster-coco-eval's COCO.loadRes). The metrics are pycocotools' bbox
evaluation (COCOeval: evaluate, accumulate, summarize) computed on these arrays with numpy, the same numbers
(tests/test_coco_eval.py checks them against pycocotools). For nuScenes val's 36,000 images x 100 detections on one
CPU core: ~25 s and ~0.4 GB, where faster-coco-eval's COCOeval, which builds Python objects for every detection, takes
~4 min and ~6 GB. faster-coco-eval loads and indexes the label files."""

import logging

import numpy as np
from faster_coco_eval import COCO

SUMMARY_NAMES = ("mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large")  # the first six of COCOeval.stats
AREA_RANGES = {"AP_small": (0, 32**2), "AP_medium": (32**2, 96**2), "AP_large": (96**2, 1e10)}  # px², as COCOeval's
# COCOeval's parameters for boxes: IoU thresholds (T,), recall points (R,), area ranges (A,), detections per image (M,)
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
EVALUATED_AREAS = ((0, 1e10), *AREA_RANGES.values())  # all, small, medium, large
MAX_DETECTIONS = (1, 10, 100)  # per image and category, the last also the most that are evaluated
PAIRS_PER_CHUNK = 1 << 18  # (detection, ground-truth box) pairs whose IoU is computed at once (~50 MB)

logger = logging.getLogger(__name__)


def load_coco(path: str) -> COCO:
    """A COCO annotation file, indexed; its progress messages go to this module's logger at DEBUG."""
    return COCO(path, print_function=logger.debug)


def coco_results_list(detections: np.ndarray) -> list:
    """COCO results JSON (a detections.json): [{image_id, category_id, bbox [x, y, w, h], score}] from the (N, 7)
    array [image_id, x, y, w, h, score, category_id]."""
    image_ids, category_ids = detections[:, 0].astype(np.int64).tolist(), detections[:, 6].astype(np.int64).tolist()
    return [{"image_id": image_id, "category_id": category_id, "bbox": bbox, "score": score}
            for image_id, category_id, bbox, score in zip(image_ids, category_ids, detections[:, 1:5].tolist(),
                                                          detections[:, 5].tolist(), strict=True)]


def coco_results_array(results: list) -> np.ndarray:
    """The (N, 7) array [image_id, x, y, w, h, score, category_id] of COCO results [{image_id, category_id, bbox,
    score}] (e.g. a detections.json)."""
    rows = [(r["image_id"], *r["bbox"], r["score"], r["category_id"]) for r in results]
    return np.array(rows, dtype=np.float64).reshape(len(rows), 7)


def coco_metrics(ground_truth: COCO, detections: np.ndarray, image_ids) -> tuple:
    """Evaluate COCO results, an (N, 7) array [image_id, x, y, w, h, score, category_id] (N may be 0), on the images
    `image_ids` of `ground_truth`, image by image as COCOeval does (detections of other images do not count).

    Returns (metrics, pr_curves): metrics has mAP (@[.5:.95]), AP50, AP75, AP_small/medium/large and
    per_class_AP {category name: AP@[.5:.95], or None for a category without ground truth in these images}, all
    in [0, 1], or None where undefined: COCOeval's -1, where these images have no ground truth of that size or
    category; pr_curves maps each category name to (recall (101,), precision (101,)) at IoU 0.5, precision -1
    where undefined."""
    names = {c["id"]: c["name"] for c in ground_truth.loadCats(ground_truth.getCatIds())}
    image_ids = np.unique(np.asarray(list(image_ids), dtype=np.int64))
    annotations = ground_truth.loadAnns(ground_truth.getAnnIds(imgIds=image_ids.tolist()))
    present = {annotation["category_id"] for annotation in annotations}
    areas = np.array([annotation["area"] for annotation in annotations], dtype=np.float64)
    metrics = {name: (0.0 if len(areas) else None) for name in SUMMARY_NAMES}
    metrics.update({name: (0.0 if ((areas >= low) & (areas <= high)).any() else None)
                    for name, (low, high) in AREA_RANGES.items()})
    metrics["per_class_AP"] = {name: (0.0 if cid in present else None) for cid, name in names.items()}
    pr_curves = {name: (np.linspace(0, 1, 101), -np.ones(101)) for name in names.values()}
    if not len(detections):
        return metrics, pr_curves
    category_ids = np.unique(np.asarray(list(names), dtype=np.int64))
    precision = coco_precision(annotations, detections, image_ids, category_ids, max_detections=(100,))
    metrics.update({name: (float(value) if value > -1 else None)
                    for name, value in zip(SUMMARY_NAMES, coco_summary(precision), strict=True)})
    for k, category_id in enumerate(category_ids.tolist()):
        if category_id in present:
            per_class = precision[:, :, k, 0, -1]  # all areas, 100 detections per image
            metrics["per_class_AP"][names[category_id]] = float(per_class[per_class > -1].mean())
            pr_curves[names[category_id]] = (RECALL_POINTS, precision[0, :, k, 0, -1])
    return metrics, pr_curves


def coco_summary(precision: np.ndarray) -> list:
    """COCOeval.stats[:6] (mAP, AP50, AP75, AP small, medium, large at 100 detections) from its precision array
    (T, R, K, A, M), 100 detections last; -1 where no category has ground truth of that size."""
    def mean(values: np.ndarray) -> float:
        return float(np.mean(values[values > -1])) if (values > -1).any() else -1.0

    at_100 = precision[..., -1]  # (T, R, K, A)
    summary = [mean(at_100[:, :, :, 0])]
    summary += [mean(at_100[np.where(threshold == IOU_THRESHOLDS)[0], :, :, 0]) for threshold in (0.5, 0.75)]
    return summary + [mean(at_100[:, :, :, area]) for area in range(1, len(EVALUATED_AREAS))]


def coco_precision(annotations: list, detections: np.ndarray, image_ids: np.ndarray, category_ids: np.ndarray,
                   max_detections: tuple = MAX_DETECTIONS) -> np.ndarray:
    """COCOeval's eval["precision"] (T, R, K, A, M) for bounding boxes (M: the max_detections, a part of COCOeval's
    (1, 10, 100) that ends with 100: the metrics need 100 only), -1 where a category has no ground truth of
    that area, from the ground-truth annotations of `image_ids` and the (N, 7) detections, by pycocotools' rules:
    per image and category the 100 best detections; at each IoU threshold and area range, each detection in turn
    (best score first) takes the unmatched (or crowd) box of highest IoU >= the threshold, a box of the area range
    before any other; detections matched to ignored (crowd, out-of-range) boxes and unmatched detections out of the
    range are left out; precision at each recall point is the best precision at that recall or above.

    image_ids, category_ids: sorted, unique. Ties (scores, IoUs) are broken as pycocotools breaks them."""
    num_categories = len(category_ids)
    gt_image = np.array([a["image_id"] for a in annotations], dtype=np.int64)
    gt_category = np.array([a["category_id"] for a in annotations], dtype=np.int64)
    known = np.isin(gt_image, image_ids) & np.isin(gt_category, category_ids)
    gt_group = np.searchsorted(image_ids, gt_image) * num_categories + np.searchsorted(category_ids, gt_category)
    gt_order = np.argsort(np.where(known, gt_group, -1), kind="stable")[np.count_nonzero(~known):]  # by group, stably
    gt_group = gt_group[gt_order]
    gt_boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)[gt_order]
    gt_areas = np.array([a["area"] for a in annotations], dtype=np.float64)[gt_order]
    gt_crowd = np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool)[gt_order]

    order, dt_group, dt_rank = _best_detections(detections, image_ids, category_ids)
    dt_scores = detections[order, 5]
    dt_areas = detections[order, 3] * detections[order, 4]  # as COCO.loadRes sets them
    # the boxes (D, 4) only while the pairs are found: at val size they weigh 115 MB
    pairs = _overlapping_pairs(detections[order, 1:5], dt_group, gt_boxes, gt_group, gt_crowd,
                               num_groups=len(image_ids) * num_categories)
    dt_category_index, gt_category_index = dt_group % num_categories, gt_group % num_categories
    # per category, its detections best score first; ties in image order, then rank (as COCOeval concatenates them)
    by_score = np.lexsort((-dt_scores, dt_category_index))
    category_starts = np.searchsorted(dt_category_index[by_score], np.arange(num_categories + 1))
    rank_by_score = dt_rank[by_score]
    precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_POINTS), num_categories, len(EVALUATED_AREAS),
                          len(max_detections)))
    for a, (low, high) in enumerate(EVALUATED_AREAS):
        gt_ignored = gt_crowd | (gt_areas < low) | (gt_areas > high)
        matched, matched_ignored = _greedy_matches(pairs, dt_rank, len(dt_group), gt_ignored, gt_crowd)
        ignored = np.where(matched, matched_ignored, ((dt_areas < low) | (dt_areas > high))[None])  # (T, D)
        # (T, D) flags in the order by_score, so that a category's detections are a slice
        true_positive, false_positive = (matched & ~ignored)[:, by_score], (~matched & ~ignored)[:, by_score]
        num_positives = np.bincount(gt_category_index[~gt_ignored], minlength=num_categories)  # (K,)
        for k in np.flatnonzero(num_positives):
            part = slice(category_starts[k], category_starts[k + 1])
            for m, most in enumerate(max_detections):
                within = rank_by_score[part] < most if most < MAX_DETECTIONS[-1] else slice(None)
                precision[:, :, k, a, m] = _precision_at_recall_points(
                    true_positive[:, part][:, within], false_positive[:, part][:, within], num_positives[k])
    return precision


def _best_detections(detections: np.ndarray, image_ids: np.ndarray, category_ids: np.ndarray) -> tuple:
    """The rows of the (N, 7) detections that COCOeval evaluates, by group (image, category), best score first (ties:
    in the given order), the 100 best of each group: (rows (D,), group (D,) = image index x K + category index,
    rank (D,) within the group, 0 the best)."""
    dt_image, dt_category = detections[:, 0].astype(np.int64), detections[:, 6].astype(np.int64)
    rows = np.flatnonzero(np.isin(dt_image, image_ids) & np.isin(dt_category, category_ids))  # the others not copied
    group = np.searchsorted(image_ids, dt_image[rows]) * len(category_ids)
    group += np.searchsorted(category_ids, dt_category[rows])
    order = np.lexsort((-detections[rows, 5], group))
    group, rows = group[order], rows[order]
    rank = np.arange(len(rows)) - np.searchsorted(group, group)
    kept = rank < MAX_DETECTIONS[-1]
    return rows[kept], group[kept], rank[kept]


def _overlapping_pairs(dt_boxes: np.ndarray, dt_group: np.ndarray, gt_boxes: np.ndarray, gt_group: np.ndarray,
                       gt_crowd: np.ndarray, num_groups: int) -> tuple:
    """(detection index, ground-truth index, IoU) of the pairs of the same group (image, category) whose IoU reaches
    the lowest threshold (0.5), the others can match at no threshold; IoU as pycocotools computes it (boxes x y w h,
    float64, a crowd box's union is the detection). Boxes sorted by group."""
    gt_counts = np.bincount(gt_group, minlength=num_groups)
    gt_starts = np.cumsum(gt_counts) - gt_counts
    per_detection = gt_counts[dt_group]
    ends = np.cumsum(per_detection)
    total = int(ends[-1]) if len(ends) else 0
    bounds = np.searchsorted(ends, np.arange(PAIRS_PER_CHUNK, total, PAIRS_PER_CHUNK), side="right")
    bounds = np.unique(np.concatenate([[0], bounds, [len(dt_group)]]))
    parts = []
    for first, last in zip(bounds[:-1], bounds[1:], strict=True):
        counts = per_detection[first:last]
        dt_index = np.repeat(np.arange(first, last), counts)
        within = np.arange(len(dt_index)) - np.repeat(np.cumsum(counts) - counts, counts)
        gt_index = gt_starts[dt_group[dt_index]] + within
        dt, gt = dt_boxes[dt_index], gt_boxes[gt_index]
        width = np.minimum(dt[:, 2] + dt[:, 0], gt[:, 2] + gt[:, 0]) - np.maximum(dt[:, 0], gt[:, 0])
        height = np.minimum(dt[:, 3] + dt[:, 1], gt[:, 3] + gt[:, 1]) - np.maximum(dt[:, 1], gt[:, 1])
        intersection = width * height
        dt_area = dt[:, 2] * dt[:, 3]
        union = np.where(gt_crowd[gt_index], dt_area, dt_area + gt[:, 2] * gt[:, 3] - intersection)
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where((width > 0) & (height > 0), intersection / union, 0.0)
        close = iou >= IOU_THRESHOLDS[0]
        parts.append((dt_index[close], gt_index[close], iou[close]))
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True)) if parts else (
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))


def _greedy_matches(pairs: tuple, dt_rank: np.ndarray, num_detections: int, gt_ignored: np.ndarray,
                    gt_crowd: np.ndarray) -> tuple:
    """COCOeval.evaluateImg's matching at every IoU threshold: (matched (T, D), matched to an ignored box (T, D)).
    Per (image, category), detections in score order each take, among the boxes not yet taken (crowd boxes stay
    free) with IoU >= the threshold, the last in the box order of highest (not ignored, IoU). Detections of one rank
    (r-th best of their image and category) never share a box, so they are matched together, rank by rank."""
    dt_index, gt_index, iou = pairs
    thresholds = np.minimum(IOU_THRESHOLDS, 1 - 1e-10)[:, None]
    # by rank, then detection; within a detection the best box last
    order = np.lexsort((gt_index, iou, ~gt_ignored[gt_index], dt_index, dt_rank[dt_index]))
    dt_index, gt_index, iou = dt_index[order], gt_index[order], iou[order]
    rank_bounds = np.flatnonzero(np.diff(dt_rank[dt_index], prepend=-1, append=-1))
    matched = np.zeros((len(thresholds), num_detections), dtype=bool)
    matched_ignored = np.zeros_like(matched)
    taken = np.zeros((len(thresholds), len(gt_ignored)), dtype=bool)
    for first, last in zip(rank_bounds[:-1], rank_bounds[1:], strict=True):
        dts, gts = dt_index[first:last], gt_index[first:last]
        free = (iou[first:last] >= thresholds) & (~taken[:, gts] | gt_crowd[gts])  # (T, pairs of this rank)
        starts = np.flatnonzero(np.diff(dts, prepend=-1))  # each detection's first pair
        best = np.maximum.reduceat(np.where(free, np.arange(1, len(dts) + 1), 0), starts, axis=1)  # 1 + last free
        threshold, detection = np.nonzero(best)
        pair = best[threshold, detection] - 1
        taken[threshold, gts[pair]] = True
        matched[threshold, dts[pair]] = True
        matched_ignored[threshold, dts[pair]] = gt_ignored[gts[pair]]
    return matched, matched_ignored


def _precision_at_recall_points(true_positive: np.ndarray, false_positive: np.ndarray, num_positives: int
                                ) -> np.ndarray:
    """COCOeval.accumulate's precision (T, R) at the recall points from the (T, D) flags of detections sorted by
    score: interpolated (the best precision at that recall or above), 0 beyond the highest recall."""
    true_sum = np.cumsum(true_positive, axis=1, dtype=np.float64)  # counts, exact in float64
    false_sum = np.cumsum(false_positive, axis=1, dtype=np.float64)
    recall = true_sum / num_positives
    precision = true_sum / (false_sum + true_sum + np.spacing(1))
    result = np.zeros((len(true_positive), len(RECALL_POINTS)))
    for t in range(len(true_positive)):
        points = np.searchsorted(recall[t], RECALL_POINTS, side="left")  # (R,) ascending
        points = points[points < recall.shape[1]]
        if len(points):  # the best precision from each point to the end: maxima between points, then from the end
            between = np.maximum.reduceat(precision[t], points)  # a repeated point: its value, <= the next's range
            result[t, :len(points)] = np.maximum.accumulate(between[::-1])[::-1]
    return result
