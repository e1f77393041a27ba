"""The COCO metrics backend (faster-coco-eval) gives pycocotools' numbers: pycocotools is the reference."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.eval import synthetic_coco
from utils.coco_eval import COCO as BackendCOCO
from utils.coco_eval import SUMMARY_NAMES, coco_metrics


def index(coco_class, dataset: dict):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = coco_class()
        coco.dataset = dataset
        coco.createIndex()
    return coco


@pytest.mark.parametrize("image_subset", [False, True], ids=["all_images", "some_images"])
def test_metrics_equal_pycocotools(image_subset):
    ground_truth, detections = synthetic_coco(300, seed=1)
    image_ids = [image["id"] for image in ground_truth["images"]]
    if image_subset:  # as an evaluation of one split of a larger label file
        image_ids = image_ids[::3]
    metrics, pr_curves = coco_metrics(index(BackendCOCO, ground_truth), detections, image_ids)

    reference_ground_truth = index(COCO, ground_truth)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(reference_ground_truth, reference_ground_truth.loadRes(detections), "bbox")
        reference.params.imgIds = image_ids
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    for name, value in zip(SUMMARY_NAMES, reference.stats, strict=False):
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    assert 0.05 < metrics["mAP"] < 0.95 and metrics["AP_small"] > 0 and metrics["AP_large"] > 0  # not degenerate
    precision = reference.eval["precision"]
    for k, category_id in enumerate(reference.params.catIds):
        per_class = precision[:, :, k, 0, -1]
        name = f"class{category_id}"
        assert metrics["per_class_AP"][name] == pytest.approx(per_class[per_class > -1].mean(), abs=1e-12)
        np.testing.assert_allclose(pr_curves[name][1], precision[0, :, k, 0, -1], atol=1e-12)
