"""The COCO metrics backend (faster-coco-eval) gives pycocotools' numbers: pycocotools is the reference."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.eval import reference_evaluation, synthetic_coco
from utils.coco_eval import COCO as BackendCOCO
from utils.coco_eval import SUMMARY_NAMES, coco_metrics


@pytest.mark.parametrize("image_subset", [False, True], ids=["all_images", "some_images"])
def test_metrics_equal_pycocotools(image_subset):
    ground_truth, detections = synthetic_coco(300, seed=1)
    image_ids = [image["id"] for image in ground_truth["images"]]
    if image_subset:  # as an evaluation of one split of a larger label file
        image_ids = image_ids[::3]
    with contextlib.redirect_stdout(io.StringIO()):
        backend_ground_truth = BackendCOCO()
        backend_ground_truth.dataset = ground_truth
        backend_ground_truth.createIndex()
    metrics, pr_curves = coco_metrics(backend_ground_truth, detections, image_ids)

    stats, precision = reference_evaluation(COCO, COCOeval, ground_truth, detections, image_ids)
    for name, value in zip(SUMMARY_NAMES, stats, strict=False):
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    assert 0.05 < metrics["mAP"] < 0.95 and metrics["AP_small"] > 0 and metrics["AP_large"] > 0  # not degenerate
    for k, category_id in enumerate(range(1, 11)):  # synthetic_coco's categories, in COCOeval's sorted order
        per_class = precision[:, :, k, 0, -1]
        name = f"class{category_id}"
        assert metrics["per_class_AP"][name] == pytest.approx(per_class[per_class > -1].mean(), abs=1e-12)
        np.testing.assert_allclose(pr_curves[name][1], precision[0, :, k, 0, -1], atol=1e-12)


@pytest.mark.parametrize("with_detections", [True, False])
def test_undefined_aps_are_none_not_zero(with_detections):
    """Images with large boxes only: COCOeval's AP_small and AP_medium are -1 (undefined); they come out as None
    (null in metrics.json, n/a in the logs), with or without detections, while a class without boxes stays None."""
    ground_truth = {"images": [{"id": 1, "width": 640, "height": 480}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 200, 150],
                                     "area": 30000.0, "iscrowd": 0}],
                    "categories": [{"id": 1, "name": "car"}, {"id": 2, "name": "bus"}]}
    backend_ground_truth = BackendCOCO()
    backend_ground_truth.dataset = ground_truth
    backend_ground_truth.createIndex()
    detection = {"image_id": 1, "category_id": 1, "bbox": [12, 10, 200, 150], "score": 0.9}
    detections = [detection] if with_detections else []
    metrics, _ = coco_metrics(backend_ground_truth, detections, [1])
    assert metrics["AP_small"] is None and metrics["AP_medium"] is None
    assert metrics["AP_large"] == (pytest.approx(metrics["mAP"]) if with_detections else 0.0)
    assert metrics["per_class_AP"]["bus"] is None and metrics["per_class_AP"]["car"] is not None
