"""Evaluation at scale: the batched post-processing gives the per-image detections of the reference loop, the (N, 7)
detection arrays give the COCO results and metrics of the per-detection dicts, and the array gather without
torch.distributed; empty detections everywhere."""

import numpy as np
import pytest
import torch
from faster_coco_eval import COCOeval_faster
from torchvision.ops import batched_nms

from models.Yolo.boxes import coco_detection_array, postprocess_detections, to_original_pixels
from utils.coco_eval import (
    COCO,
    SUMMARY_NAMES,
    coco_metrics,
    coco_results_array,
    coco_results_list,
)
from utils.coco_reference import synthetic_coco
from utils.distributed import gather_array_to_main

IMAGE_SIZE = (96, 64)


def reference_postprocess(boxes, scores, score_threshold, nms_iou, pre_nms_topk, max_detections, image_size):
    """The per-image loop that postprocess_detections replaced: a list of dicts, one per image."""
    width, height = image_size
    num_classes = scores.shape[-1]
    detections = []
    for image_boxes, image_scores in zip(boxes, scores, strict=True):
        flat_scores = image_scores.flatten()
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


def reference_coco_detections(predictions: list, batch: dict, input_size: tuple) -> list:
    """The per-detection dicts that coco_detection_array replaced (predictions: one dict per image)."""
    detections = []
    for found, image_id, size in zip(predictions, batch["image_ids"].flatten().tolist(),
                                     batch["orig_sizes"].flatten(0, 1).tolist(), strict=True):
        boxes = to_original_pixels(found["boxes"].float().cpu(), input_size, size)
        for (x1, y1, x2, y2), score, label in zip(boxes.tolist(), found["scores"].float().tolist(),
                                                  found["labels"].tolist(), strict=True):
            detections.append({"image_id": image_id, "category_id": int(label) + 1,
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return detections


def dense_predictions(num_images=5, num_points=400, num_classes=4, seed=0):
    """Boxes (I, P, 4) of 4-40 px around points of the image (some beyond its sides, so clipped) and distinct scores
    (I, P, C) in (0, 1): no ties for top-k and NMS to break."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(num_images, num_points, 2, generator=generator) * torch.tensor(IMAGE_SIZE)
    sizes = 4 + 36 * torch.rand(num_images, num_points, 2, generator=generator)
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=-1)
    count = num_images * num_points * num_classes
    scores = (torch.randperm(count, generator=generator).double() + 1) / (count + 1)
    return boxes, scores.float().reshape(num_images, num_points, num_classes)


def per_image(detections: dict, num_images: int) -> list:
    """The flat detections of a batch as one dict per image, as the per-image loop returned them."""
    return [{key: value[detections["image_index"] == image] for key, value in detections.items()
             if key != "image_index"} for image in range(num_images)]


@pytest.mark.parametrize("score_threshold, nms_iou, pre_nms_topk, max_detections",
                         [(0.05, 0.6, 1000, 100), (0.5, 0.5, 50, 10), (0.0, 0.3, 10, 100), (0.9, 0.7, 2000, 3),
                          (0.999, 0.6, 1000, 100), (0.0, 0.05, 1600, 40), (0.0, 0.2, 1600, 1)])
def test_batched_postprocessing_equals_the_per_image_loop(score_threshold, nms_iou, pre_nms_topk, max_detections):
    boxes, scores = dense_predictions()
    settings = {"score_threshold": score_threshold, "nms_iou": nms_iou, "pre_nms_topk": pre_nms_topk,
                "max_detections": max_detections, "image_size": IMAGE_SIZE}
    detections = postprocess_detections(boxes, scores, **settings)
    reference = reference_postprocess(boxes, scores, **settings)
    assert torch.equal(detections["image_index"], detections["image_index"].sort().values)  # sorted by image
    assert len(detections["scores"]) == sum(len(found["scores"]) for found in reference)
    for found, expected in zip(per_image(detections, len(boxes)), reference, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(found[key], expected[key]), key
    assert len(detections["scores"]) > 0 or score_threshold > 0.99


def test_nms_keeps_images_apart():
    """The same box and class in two images: NMS groups by image and class, so both stay."""
    boxes = torch.tensor([[[10.0, 10, 50, 50], [11, 11, 51, 51]]]).repeat(2, 1, 1)  # (2 images, 2 points, 4)
    scores = torch.tensor([[[0.9], [0.8]], [[0.7], [0.6]]])  # (2, 2, 1 class)
    detections = postprocess_detections(boxes, scores, 0.05, 0.5, 100, 100, IMAGE_SIZE)
    assert detections["image_index"].tolist() == [0, 1]
    assert detections["scores"].tolist() == pytest.approx([0.9, 0.7])


def batch_of(num_samples, num_cameras):
    """The keys of a collated batch that coco_detection_array reads: image ids and original sizes (W, H)."""
    image_ids = torch.arange(num_samples * num_cameras).reshape(num_samples, num_cameras) * 7 + 3
    sizes = torch.tensor([[1600, 900], [1600, 900], [1280, 720], [800, 600], [1600, 1200], [96, 64]])
    return {"image_ids": image_ids,
            "orig_sizes": sizes[:num_samples * num_cameras].reshape(num_samples, num_cameras, 2)}


def test_detection_array_equals_the_per_detection_dicts():
    boxes, scores = dense_predictions(num_images=6)
    detections = postprocess_detections(boxes, scores, 0.3, 0.6, 1000, 100, IMAGE_SIZE)
    batch = batch_of(2, 3)
    array = coco_detection_array(detections, batch, IMAGE_SIZE)
    assert array.shape == (len(detections["scores"]), 7) and array.dtype == np.float64
    expected = reference_coco_detections(per_image(detections, 6), batch, IMAGE_SIZE)
    assert coco_results_list(array) == expected  # the same numbers exactly, in the same order
    assert np.array_equal(coco_results_array(expected), array)


def reference_metrics(ground_truth: COCO, detections: list, image_ids: list) -> tuple:
    """(stats[:6], per-class AP, IoU-0.5 precision per category) of faster-coco-eval on the dicts, as
    coco_metrics computed them before."""
    evaluator = COCOeval_faster(ground_truth, ground_truth.loadRes([dict(d) for d in detections]), "bbox",
                                print_function=lambda *args: None)
    evaluator.params.imgIds = list(image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    precision = evaluator.eval["precision"]
    per_class = [precision[:, :, k, 0, -1] for k in range(precision.shape[2])]
    return (list(evaluator.stats[:6]), [float(p[p > -1].mean()) for p in per_class],
            [precision[0, :, k, 0, -1] for k in range(precision.shape[2])])


def indexed(ground_truth: dict) -> COCO:
    coco = COCO(print_function=lambda *args: None)
    coco.dataset = ground_truth
    coco.createIndex()
    return coco


@pytest.mark.parametrize("every", [1, 4])
def test_array_metrics_equal_the_dict_path(every):
    ground_truth, detections = synthetic_coco(200, seed=3)
    image_ids = [image["id"] for image in ground_truth["images"]][::every]
    coco = indexed(ground_truth)
    metrics, pr_curves = coco_metrics(coco, coco_results_array(detections), image_ids)
    stats, per_class, curves = reference_metrics(coco, detections, image_ids)
    assert [metrics[name] for name in SUMMARY_NAMES] == pytest.approx(stats, abs=1e-12)
    assert list(metrics["per_class_AP"].values()) == pytest.approx(per_class, abs=1e-12)
    for name, curve in zip(metrics["per_class_AP"], curves, strict=True):
        np.testing.assert_allclose(pr_curves[name][1], curve, atol=1e-12)
        np.testing.assert_array_equal(pr_curves[name][0], np.linspace(0, 1, 101))


def test_results_list_and_array_round_trip():
    _, detections = synthetic_coco(5, seed=4)
    array = coco_results_array(detections)
    assert array.shape == (len(detections), 7)
    assert coco_results_list(array) == detections


def test_gather_array_without_distributed_is_the_array():
    array = np.arange(14.0).reshape(2, 7)
    assert gather_array_to_main(array) is array


def test_empty_detections():
    boxes, scores = dense_predictions(num_images=2)
    detections = postprocess_detections(boxes, scores * 0.01, 0.05, 0.6, 1000, 100, IMAGE_SIZE)  # none above
    assert [tuple(value.shape) for value in detections.values()] == [(0, 4), (0,), (0,), (0,)]
    array = coco_detection_array(detections, batch_of(1, 2), IMAGE_SIZE)
    assert array.shape == (0, 7) and coco_results_list(array) == [] and coco_results_array([]).shape == (0, 7)
    assert gather_array_to_main(array) is array
    ground_truth, _ = synthetic_coco(3, seed=5)
    metrics, pr_curves = coco_metrics(indexed(ground_truth), array, [1, 2, 3])
    assert [metrics[name] for name in SUMMARY_NAMES] == [0.0] * 6  # boxes of every size, nothing found
    assert set(metrics["per_class_AP"].values()) <= {0.0, None}
    assert all((curve[1] == -1).all() for curve in pr_curves.values())
