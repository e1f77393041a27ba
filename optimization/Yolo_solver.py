"""The Solver of the Yolo detector: its model and loss, the train step (forward and loss here, then BaseSolver.step:
backward, clipping, optimizer step, EMA), the evaluation pass (COCO metrics), predict.py's and export.py's hooks and
the drawings of test.py --visualization 1. The optimizer, LR schedule, mixed precision, EMA, DDP wrapper and their
checkpointed states are BaseSolver's (optimization/base.py). docs/NEW_TASK.md shows the smallest solver of a new
task and lists what train.py and test.py call."""

import os

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes
from tqdm import tqdm

from dataset.NuscenesDataset.loader_2d_obj_det import images_on_device
from models.Yolo.aligned_loss import AlignedDetectionLoss
from models.Yolo.boxes import coco_detection_array
from models.Yolo.csp_pan import CspPanYolo
from models.Yolo.loss import DetectionLoss
from models.Yolo.yolo import BACKBONES, STRIDES, DenseOutputs, Yolo
from optimization.base import BaseSolver
from utils.coco_eval import SUMMARY_NAMES, coco_metrics, coco_results_list, load_coco
from utils.config import (
    FLAG,
    GROUP_NORM_CHANNELS,
    NUMBER_RANGE,
    Rule,
    check_values,
    list_of,
    multiple_of,
    number,
    one_of,
)
from utils.distributed import gather_array_to_main
from utils.plots import save_detection_mosaic


class Solver(BaseSolver):
    """args: the merged configuration dict; device: where to train; class_names: label index -> name;
    steps_per_epoch: optimizer steps per epoch (for the LR schedule); world_size, rank: of torch.distributed."""

    app_modes = ("2DObjDet",)
    metric_names = SUMMARY_NAMES  # COCO's, higher is better

    @staticmethod
    def check_config(args: dict) -> None:
        """The ranges of what this solver, its models and its losses read (BaseSolver.check_config)."""
        check_values(args, {"image.w": multiple_of(STRIDES[-1], "the coarsest stride"),
                            "image.h": multiple_of(STRIDES[-1], "the coarsest stride")}, f"data.{args['app_mode']}")
        check_values(args, {
            "architecture": one_of("resnet_fpn", "csp_pan"),
            "": Rule(  # the section itself: two keys that must agree
                lambda section: section["backbone"] != "csp" or section["architecture"] == "csp_pan",
                'a section whose backbone "csp" has the architecture "csp_pan" (resnet_fpn takes a ResNet)'),
            "backbone": one_of(*BACKBONES, "csp"),
            "widths": Rule(lambda value: list_of(number(8, integer=True), length=5).check(value)
                           and all(width % 2 == 0 for width in value), "5 even channel counts >= 8"),
            "depths": list_of(number(1, integer=True), length=4),
            "neck_depth": number(1, integer=True),
            "pretrained_backbone": FLAG,
            "freeze_batchnorm": FLAG,
            "fpn_channels": GROUP_NORM_CHANNELS,
            "head_convs": number(0, integer=True),
            "postprocess.score_threshold": number(0, 1),
            "postprocess.nms_iou": number(0, 1, low_open=True),
            "postprocess.pre_nms_topk": number(1, integer=True),
            "postprocess.max_detections": number(1, integer=True),
        }, "model.Yolo")
        check_values(args, {
            "weights.box": number(0),
            "weights.obj": number(0),
            "weights.cls": number(0),
            "center_radius": number(0, low_open=True),
            "size_ranges": Rule(lambda value: list_of(NUMBER_RANGE, length=len(STRIDES)).check(value)
                                and all(low >= 0 for low, _ in value),
                                f"{len(STRIDES)} [low, high] box-size ranges in px (one per stride {STRIDES}), "
                                f"0 <= low < high"),
            "focal_alpha": number(0, 1),
            "focal_gamma": number(0),
            "aligned.weights.box": number(0),
            "aligned.weights.dfl": number(0),
            "aligned.weights.cls": number(0),
            "aligned.topk": number(1, integer=True),
            "aligned.alpha": number(0),
            "aligned.beta": number(0),
            "aligned.center_radius": number(0, low_open=True),
            "aligned.assignment": one_of("task_aligned", "nearest"),
            "aligned.iou_aware": FLAG,
        }, "loss.Yolo")

    def __init__(self, args: dict, device: torch.device, class_names: list, steps_per_epoch: int,
                 world_size: int = 1, rank: int = 0):
        image = args["data"][args["app_mode"]]["image"]
        self.image_size = (image["w"], image["h"])
        model_cfg, loss_cfg = args["model"]["Yolo"], args["loss"]["Yolo"]
        architecture = Yolo if model_cfg["architecture"] == "resnet_fpn" else CspPanYolo
        model = architecture(model_cfg, self.image_size, len(class_names), args["data"][args["app_mode"]]["normalize"])
        super().__init__(model, args, device, steps_per_epoch, world_size, rank)
        self.class_names = class_names
        self.loss_fn = (DetectionLoss(loss_cfg, STRIDES) if model_cfg["architecture"] == "resnet_fpn"
                        else AlignedDetectionLoss(loss_cfg["aligned"]))
        self.ground_truth = {}  # label cache path -> its indexed COCO ground truth, made at the first evaluation

    def train(self, batch: dict) -> dict:
        """One optimizer step on a collated batch; returns the loss terms as 0-d tensors on the device
        (read_nonfinite and train.py read them at logging points, not every step)."""
        images = self.images(batch)
        targets = {key: batch[key].to(self.device, non_blocking=True)
                   for key in ("target_boxes", "target_labels", "target_valid")}
        with self.autocast():
            outputs = self.trained_model(images)
        return self.step(self.loss_fn(outputs, targets))  # the loss in float32 whatever the autocast dtype

    def images(self, batch: dict) -> torch.Tensor:
        """The batch's (B, N_cam, 3, H, W) uint8 images on the device: copied there, or with data.json "decode":
        "device" decoded and augmented there from the workers' JPEG files and parameters."""
        if "jpegs" in batch:
            return images_on_device(batch, self.image_size, self.device)
        return batch["images"].to(self.device, non_blocking=True)

    @torch.no_grad()
    def eval(self, loader, show_progress: bool = True) -> tuple:
        """Detect on every image of `loader` with the EMA weights (the trained ones without EMA) and score the
        detections against the dataset's COCO label file (COCO metrics, utils.coco_eval), in original image pixels.

        Returns (metrics, outputs, pr_curves): metrics and pr_curves (at IoU 0.5) as utils.coco_eval.coco_metrics
        returns them; outputs {"detections.json": a function returning the detections in COCO results format
        (image_id, category_id, bbox [x, y, w, h] in original px, score), called only when test.py writes them}.
        Under DDP every process detects on its shard and the main process (rank 0) scores them all; the others get
        empty results. Detections travel as (D, 7) arrays (one per batch, models.Yolo.boxes.coco_detection_array)."""
        model = self.evaluated_model()
        arrays = [np.zeros((0, 7))]
        for batch in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not show_progress):
            with self.autocast():
                predictions = model.predict(self.images(batch))
            arrays.append(coco_detection_array(predictions, batch, self.image_size))
        detections = gather_array_to_main(np.concatenate(arrays))
        del arrays  # the per-batch copies (~200 MB at val size) are not held while scoring
        if self.rank != 0:
            return {}, {}, {}
        label_path = loader.dataset.coco_path  # the split's label cache
        if label_path not in self.ground_truth:
            self.ground_truth[label_path] = load_coco(loader.dataset.coco_ground_truth())
        metrics, pr_curves = coco_metrics(self.ground_truth[label_path], detections, loader.dataset.image_ids.tolist())
        return metrics, {"detections.json": lambda: coco_results_list(detections)}, pr_curves

    @torch.no_grad()
    def predict(self, images: torch.Tensor, original_sizes: list, score_threshold: float) -> list:
        """predict.py: detect on one item's images (N, 3, H, W) uint8 at the input size, resized from their
        original_sizes [(W, H)] (N), with the EMA weights and detections scoring above score_threshold. Per image
        {"boxes": [[x1, y1, x2, y2]] in original px, "classes": [class name], "scores": [score]}, best first; the
        boxes map back as in eval (coco_detection_array), so that predict.py and test.py give the same numbers."""
        model = self.evaluated_model()
        with self.autocast():
            detections = model.predict(images[None].to(self.device), score_threshold=score_threshold)
        batch = {"image_ids": torch.arange(len(images))[None], "orig_sizes": torch.tensor(original_sizes)[None]}
        rows = coco_detection_array(detections, batch, self.image_size)  # (D, 7): image, x, y, w, h, score, class + 1
        predictions = []
        for image in range(len(images)):
            own = rows[rows[:, 0] == image]
            predictions.append({"boxes": np.concatenate([own[:, 1:3], own[:, 1:3] + own[:, 3:5]], axis=1).tolist(),
                                "classes": [self.class_names[category - 1] for category in own[:, 6].astype(int)],
                                "scores": own[:, 5].tolist()})
        return predictions

    def export_module(self) -> tuple:
        """export.py: (module, example images, output names, metadata, tolerances of the ONNX Runtime parity check).
        The module (yolo.DenseOutputs, EMA weights) takes images (I, 3, H, W) uint8 RGB at the input size (W, H)
        and returns boxes (I, P, 4) x1 y1 x2 y2 in input px and scores (I, P, C). The detections, exactly as eval
        makes them: models.Yolo.boxes.postprocess_detections(boxes, scores, image_size=(W, H), **postprocess) with
        the metadata's "postprocess" settings, then the boxes times (original width / W, original height / H).
        Example: the cameras of one sample, random pixels (seeded)."""
        model = self.evaluated_model()
        width, height = self.image_size
        cameras = len(self.args["data"][self.args["app_mode"]]["cameras"])
        example = torch.randint(0, 256, (cameras, 3, height, width), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0))
        metadata = {"class_names": self.class_names, "input_size": [width, height],
                    "postprocess": model.cfg["postprocess"],
                    "outputs": "boxes (I, P, 4) x1 y1 x2 y2 in input px, scores (I, P, C); detections: "
                               "models.Yolo.boxes.postprocess_detections with postprocess"}
        return DenseOutputs(model).eval(), example, ["boxes", "scores"], metadata, {"boxes": 1e-2, "scores": 1e-4}

    def draw_prediction(self, image: torch.Tensor, prediction: dict) -> torch.Tensor:
        """predict.py --save_images 1: the image (3, H, W) uint8 at its original size with predict's boxes drawn."""
        if not prediction["scores"]:
            return image
        names = [f"{name} {score:.2f}" for name, score in zip(prediction["classes"], prediction["scores"], strict=True)]
        return draw_bounding_boxes(image, torch.tensor(prediction["boxes"]), names, colors="red", width=2)

    @torch.no_grad()
    def visualize(self, dataset, out_dir: str, count: int) -> None:
        """out_dir/visualization/sample_<i>.png for the first `count` samples of `dataset`: camera mosaics in the
        order of config/data.json's "cameras", 3 per row, ground truth green, detections above config.json's
        "visualization_score_threshold" red."""
        model = self.evaluated_model()
        threshold = self.args["config"]["test"]["visualization_score_threshold"]
        for index in range(min(count, len(dataset))):
            item = dataset[index]
            boxes = item["boxes"].split(item["counts"].tolist())
            labels = item["labels"].split(item["counts"].tolist())
            images = self.images(dataset.collate_fn([item]))  # (1, N_cam, 3, H, W) on the device
            detections = model.predict(images)
            confident = detections["scores"] >= threshold
            predictions = [tuple(detections[key][confident & (detections["image_index"] == camera)].cpu()
                                 for key in ("boxes", "labels", "scores")) for camera in range(images.shape[1])]
            save_detection_mosaic(images[0].cpu(), list(zip(boxes, labels, strict=True)),
                                  predictions, dataset.class_names, columns=3,
                                  path=os.path.join(out_dir, "visualization", f"sample_{index}.png"))
