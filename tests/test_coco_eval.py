"""The COCO metrics (utils.coco_eval, on (N, 7) detection arrays) are pycocotools' numbers: pycocotools is the
reference, on plain data and on the cases where its rules decide (crowd boxes, areas, ties, the 100 per image)."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import helper
from argumentparser import build_parser
from tests.conftest import PROJECT_ROOT, data_flags
from utils.coco_eval import COCO as BackendCOCO
from utils.coco_eval import SUMMARY_NAMES, coco_metrics, coco_precision, coco_results_array
from utils.coco_reference import reference_evaluation, synthetic_coco
from utils.config import merge_config


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
    metrics, pr_curves = coco_metrics(backend_ground_truth, coco_results_array(detections), image_ids)

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
    metrics, _ = coco_metrics(backend_ground_truth, coco_results_array(detections), [1])
    assert metrics["AP_small"] is None and metrics["AP_medium"] is None
    assert metrics["AP_large"] == (pytest.approx(metrics["mAP"]) if with_detections else 0.0)
    assert metrics["per_class_AP"]["bus"] is None and metrics["per_class_AP"]["car"] is not None


def hard_cases(seed: int) -> tuple:
    """(ground truth, detections) in COCO format where pycocotools' rules decide: crowd boxes, "area" fields that
    are not the box's, boxes given twice (equal IoUs), scores rounded to 0.1 (ties within and across images), one
    image with 130 detections of one category (beyond the 100 kept), images with detections and no boxes."""
    rng = np.random.default_rng(seed)
    images = [{"id": index + 1, "width": 640, "height": 480} for index in range(30)]
    annotations, detections = [], []
    for image in images:
        boxes = []
        for _ in range(rng.integers(0, 10) if image["id"] % 7 else 0):
            x, y = rng.uniform(0, [560, 400])
            w, h = rng.uniform(3, 140, size=2)
            category = int(rng.integers(1, 4))
            copies = 2 if rng.random() < 0.15 else 1
            for _ in range(copies):
                annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "category_id": category,
                                    "bbox": [float(x), float(y), float(w), float(h)],
                                    "area": float(w * h * rng.uniform(0.6, 1.0)), "iscrowd": int(rng.random() < 0.1)})
            boxes.append((x, y, w, h, category))
        count = 130 if image["id"] == 5 else int(rng.integers(0, 25))
        for _ in range(count):
            if boxes and rng.random() < 0.6:
                x, y, w, h, category = boxes[rng.integers(len(boxes))]
                if rng.random() < 0.8:
                    x, y, w, h = np.array([x, y, w, h]) + rng.normal(0, 0.08, 4) * [w, h, w, h]
            else:
                x, y, w, h, category = *rng.uniform(0, [560, 400]), *rng.uniform(3, 140, size=2), 1
            category = 2 if image["id"] == 5 else category if rng.random() < 0.85 else int(rng.integers(1, 4))
            detections.append({"image_id": image["id"], "category_id": int(category),
                               "bbox": [float(x), float(y), max(float(w), 1.0), max(float(h), 1.0)],
                               "score": float(np.round(rng.random(), 1))})
    ground_truth = {"images": images, "annotations": annotations,
                    "categories": [{"id": index, "name": f"class{index}"} for index in range(1, 4)]}
    return ground_truth, detections


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_equals_pycocotools_where_its_rules_decide(seed):
    ground_truth, detections = hard_cases(seed)
    assert any(a["iscrowd"] for a in ground_truth["annotations"])
    image_ids = [image["id"] for image in ground_truth["images"]][::2] + [5]  # some images, and the one with 130
    backend_ground_truth = BackendCOCO()
    backend_ground_truth.dataset = ground_truth
    backend_ground_truth.createIndex()
    annotations = backend_ground_truth.loadAnns(backend_ground_truth.getAnnIds(imgIds=sorted(set(image_ids))))
    precision = coco_precision(annotations, coco_results_array(detections), np.unique(image_ids), np.arange(1, 4))
    stats, reference = reference_evaluation(COCO, COCOeval, ground_truth, detections, image_ids)
    assert np.array_equal(precision, reference)
    metrics, _ = coco_metrics(backend_ground_truth, coco_results_array(detections), image_ids)
    for name, value in zip(SUMMARY_NAMES, stats, strict=False):
        assert metrics[name] == (None if value == -1 else pytest.approx(value, abs=1e-12)), name


def test_a_detection_between_two_boxes_takes_the_later_as_pycocotools():
    """The first detection has IoU 9/11 with both boxes; pycocotools gives it the later box, leaving the earlier
    (IoU 1) to the second detection: both true up to IoU 0.8 (the other choice: the second false above 2/3), the
    second alone true above."""
    ground_truth = {"images": [{"id": 1, "width": 64, "height": 64}],
                    "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "area": 100.0,
                                     "iscrowd": 0},
                                    {"id": 2, "image_id": 1, "category_id": 1, "bbox": [2, 0, 10, 10], "area": 100.0,
                                     "iscrowd": 0}],
                    "categories": [{"id": 1, "name": "car"}]}
    detections = [{"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.9},
                  {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.8}]
    backend_ground_truth = BackendCOCO()
    backend_ground_truth.dataset = ground_truth
    backend_ground_truth.createIndex()
    metrics, _ = coco_metrics(backend_ground_truth, coco_results_array(detections), [1])
    stats, _ = reference_evaluation(COCO, COCOeval, ground_truth, detections)
    assert metrics["mAP"] == pytest.approx(stats[0], abs=1e-12)
    assert stats[0] == pytest.approx((7 * 1.0 + 3 * 51 / 101 / 2) / 10)  # 10 thresholds; above 0.8, precision 1/2


def test_the_ground_truth_as_detections_scores_1_through_the_solver(embedded_dir):
    """The scoring wiring end to end: the loader's boxes of each batch (input pixels) given back as the model's
    detections go through Solver.eval (post-processing's mapping to original pixels, the gathering, the ground
    truth of the label cache, the COCO metrics) and score mAP 1."""
    args = merge_config(vars(build_parser().parse_args([*data_flags(embedded_dir), "--num_cores", "0",
                                                        "--cfg", "data.2DObjDet.image.w=160",
                                                        "--cfg", "data.2DObjDet.image.h=96"])),
                        str(PROJECT_ROOT / "config"))
    dataset, loader = helper.load_datasetloader(args, 1, 0, "test")
    solver = helper.load_solver(args, device=torch.device("cpu"), class_names=dataset.class_names, steps_per_epoch=0)
    current = {}

    class GroundTruthModel:
        def predict(self, images):
            batch = current["batch"]
            return {"boxes": batch["boxes"], "scores": torch.ones(len(batch["boxes"])), "labels": batch["labels"],
                    "image_index": batch["box_image_index"]}

    class RecordingLoader:  # the loader, remembering the batch the solver is at
        dataset = loader.dataset

        def __iter__(self):
            for batch in loader:
                current["batch"] = batch
                yield batch

    solver.evaluated_model = GroundTruthModel
    metrics, _, _ = solver.eval(RecordingLoader(), show_progress=False)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["AP75"] == pytest.approx(1.0)
    assert sum(value is not None for value in metrics["per_class_AP"].values()) >= 3  # not a vacuous 1
