"""The Solver of the Mono3D camera 3D detector (--app_mode 3DObjDet): its model and loss, the train step (forward and
loss here, then BaseSolver.step), the evaluation pass (the devkit's DetectionEval: NDS, mAP and the true-positive
errors), predict.py's and export.py's hooks and the drawings of test.py --visualization 1. The optimizer, LR
schedule, mixed precision, EMA, DDP wrapper and their checkpointed states are BaseSolver's (optimization/base.py)."""

import os

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision.utils import draw_keypoints
from tqdm import tqdm

from dataset.NuscenesDataset.detection_eval import (
    MAX_BOXES_PER_SAMPLE,
    NuscenesDetectionScore,
    submission,
    submission_box,
)
from dataset.NuscenesDataset.loader_3d_obj_det import ATTRIBUTE_NAMES, TARGET_COLUMNS
from models.Mono3D.boxes3d import bev_nms, decode_boxes, lift_boxes
from models.Mono3D.loss import Mono3DLoss
from models.Mono3D.mono3d import DenseOutputs3D, Mono3D, scores
from models.Yolo.yolo import STRIDES
from optimization.base import BaseSolver
from utils.config import NUMBER_RANGE, Rule, check_values, list_of, multiple_of, number
from utils.distributed import gather_array_to_main
from utils.plots import save_figure

# the attributes a class may have, by the devkit's rules (nuscenes/eval/detection/data_classes.py): by name prefix
CLASS_ATTRIBUTES = {"car": "vehicle.", "truck": "vehicle.", "bus": "vehicle.", "trailer": "vehicle.",
                    "construction_vehicle": "vehicle.", "pedestrian": "pedestrian.", "motorcycle": "cycle.",
                    "bicycle": "cycle."}
# the 12 edges of a devkit Box's corners (front face 0-3, back face 4-7)
BOX_EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]


class Solver(BaseSolver):
    """args: the merged configuration dict; device: where to train; class_names: class index -> nuScenes detection
    name; steps_per_epoch: optimizer steps per epoch (for the LR schedule); world_size, rank: of torch.distributed."""

    app_modes = ("3DObjDet",)
    metric_names = ("NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE")  # NDS selects best.pt
    lower_is_better = ("mATE", "mASE", "mAOE", "mAVE", "mAAE")

    @staticmethod
    def check_config(args: dict) -> None:
        """The ranges of what this solver, its model and its loss read (BaseSolver.check_config)."""
        check_values(args, {"image.w": multiple_of(STRIDES[-1], "the coarsest stride"),
                            "image.h": multiple_of(STRIDES[-1], "the coarsest stride")}, f"data.{args['app_mode']}")
        check_values(args, {
            "widths": Rule(lambda value: list_of(number(8, integer=True), length=5).check(value)
                           and all(width % 2 == 0 for width in value), "5 even channel counts >= 8"),
            "depths": list_of(number(1, integer=True), length=4),
            "neck_depth": number(1, integer=True),
            "head_channels": number(1, integer=True),
            "postprocess.score_threshold": number(0, 1),
            "postprocess.nms_iou": number(0, 1, low_open=True),
            "postprocess.pre_nms_topk": number(1, integer=True),
            "postprocess.max_detections": number(1, MAX_BOXES_PER_SAMPLE, integer=True),
        }, "model.Mono3D")
        check_values(args, {
            **{f"weights.{term}": number(0) for term in ("cls", "centerness", "offset", "depth", "size", "angle",
                                                        "direction", "velocity", "attribute")},
            "center_radius": number(0, low_open=True),
            "size_ranges": Rule(lambda value: list_of(NUMBER_RANGE, length=len(STRIDES)).check(value)
                                and all(low >= 0 for low, _ in value),
                                f"{len(STRIDES)} [low, high] box-size ranges in px (one per stride {STRIDES}), "
                                f"0 <= low < high"),
            "centerness_alpha": number(0),
            "focal_alpha": number(0, 1),
            "focal_gamma": number(0),
        }, "loss.Mono3D")

    def __init__(self, args: dict, device: torch.device, class_names: list, steps_per_epoch: int,
                 world_size: int = 1, rank: int = 0):
        data = args["data"][args["app_mode"]]
        self.image_size = (data["image"]["w"], data["image"]["h"])
        self.num_cameras = len(data["cameras"])
        model = Mono3D(args["model"]["Mono3D"], self.image_size, len(class_names), data["normalize"])
        super().__init__(model, args, device, steps_per_epoch, world_size, rank)
        self.class_names = class_names
        self.postprocess = args["model"]["Mono3D"]["postprocess"]
        self.loss_fn = Mono3DLoss(args["loss"]["Mono3D"])
        self.allowed_attributes = torch.tensor([[name.startswith(CLASS_ATTRIBUTES.get(class_name, "-"))
                                                 for name in ATTRIBUTE_NAMES] for class_name in class_names],
                                               device=device)
        self.scorers = {}  # (dataroot, version, split) -> its NuscenesDetectionScore, made at the first evaluation

    def train(self, batch: dict) -> dict:
        """One optimizer step on a collated batch; returns the loss terms as 0-d tensors on the device."""
        images, targets, valid = (batch[key].to(self.device, non_blocking=True)
                                  for key in ("images", "targets", "target_valid"))
        with self.autocast():
            outputs = self.trained_model(images)
        return self.step(self.loss_fn(outputs, targets, valid))  # the loss in float32 whatever the autocast dtype

    @torch.no_grad()
    def detect(self, model, images: torch.Tensor, intrinsics: torch.Tensor, cam_to_global: torch.Tensor,
               group: torch.Tensor, score_threshold: float | None = None) -> dict:
        """3D boxes of I images (I, 3, H, W) uint8 with their intrinsics (I, 3, 3) input px and poses (I, 4, 4):
        decode_boxes' dict, after the bird's-eye-view NMS within each group (I,) of images (a sample's cameras),
        at most postprocess.max_detections per group, groups in order, best first; "group" added."""
        with self.autocast():
            outputs = model(images[:, None].to(self.device, non_blocking=True))
        threshold = self.postprocess["score_threshold"] if score_threshold is None else score_threshold
        boxes = decode_boxes(scores(outputs), outputs["regression"].float(), outputs["points"].float(),
                             outputs["strides"].float(), intrinsics.to(self.device), cam_to_global.to(self.device),
                             self.allowed_attributes, threshold, self.postprocess["pre_nms_topk"])
        boxes["group"] = group.to(self.device)[boxes["image"]]
        keep = bev_nms(boxes, boxes["group"], self.postprocess["nms_iou"], self.postprocess["max_detections"])
        return {key: value[keep] for key, value in boxes.items()}

    def batch_boxes(self, model, batch: dict) -> dict:
        """detect on a collated batch (B samples of N_cam cameras); "group" is the sample's position in the batch."""
        images = batch["images"]
        group = torch.arange(images.shape[0]).repeat_interleave(images.shape[1])
        return self.detect(model, images.flatten(0, 1), batch["intrinsics"].flatten(0, 1),
                           batch["cam_to_global"].flatten(0, 1), group)

    @torch.no_grad()
    def eval(self, loader, show_progress: bool = True) -> tuple:
        """Detect on every sample of `loader` with the EMA weights (the trained ones without EMA), merge each
        sample's cameras (bird's-eye-view NMS) and score the split with the devkit's DetectionEval.

        Returns (metrics, outputs, pr_curves): metrics {NDS, mAP, mATE, mASE, mAOE, mAVE, mAAE, per_class_AP}
        (dataset/NuscenesDataset/detection_eval.py); outputs {"results_nusc.json": the submission (every sample
        token of the split), made when test.py writes it}; pr_curves {class: (recall, precision)} at 2 m. Under DDP
        every process detects on its shard and the main process (rank 0) scores them all; the others get empty
        results. Detections travel as (D, 13) arrays (detection_eval.DETECTION_COLUMNS)."""
        model = self.evaluated_model()
        arrays = [np.zeros((0, 13))]
        for batch in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not show_progress):
            boxes = self.batch_boxes(model, batch)
            arrays.append(detection_rows(boxes, batch["index"].to(self.device)[boxes["group"]]))
        detections = gather_array_to_main(np.concatenate(arrays))
        if self.rank != 0:
            return {}, {}, {}
        # one order whatever the sharding: by sample, best first (a stable sort of each process's own order)
        detections = detections[np.lexsort((-detections[:, 10], detections[:, 0]))]
        dataset = loader.dataset
        key = (dataset.dataroot, dataset.version, dataset.split)
        if key not in self.scorers:
            self.scorers[key] = NuscenesDetectionScore(*key)
        scorer = self.scorers[key]
        results = submission(detections, dataset.sample_tokens.tolist(), scorer.split_tokens())
        metrics, curves = scorer(results, dataset.sample_tokens.tolist())
        return metrics, {"results_nusc.json": lambda: results}, curves

    @torch.no_grad()
    def predict(self, images: torch.Tensor, original_sizes: list, score_threshold: float, extras: list) -> list:
        """predict.py: 3D boxes of images (N, 3, H, W) uint8 at the input size, resized from their original_sizes
        [(W, H)], with extras [{"intrinsics" (3, 3) original px, "cam_to_global" (4, 4), "sample_token"}] (the
        loader's sample_files); each sample's cameras merged as in eval. Per image {"boxes_3d": [submission box
        dicts (global frame)], "corners": [8 [u, v] of each box's corners in original px]}, best first."""
        width, height = self.image_size
        scale = torch.tensor([[width / w, height / h, 1.0] for w, h in original_sizes], dtype=torch.float64)
        originals = torch.tensor(np.array([extra["intrinsics"] for extra in extras]), dtype=torch.float64)
        to_global = torch.tensor(np.array([extra["cam_to_global"] for extra in extras]), dtype=torch.float64)
        tokens = [extra["sample_token"] for extra in extras]
        group = torch.tensor([tokens.index(token) for token in tokens])
        boxes = self.detect(self.evaluated_model(), images, originals * scale[:, :, None], to_global, group,
                            score_threshold)
        predictions = [{"boxes_3d": [], "corners": []} for _ in images]
        for camera, row in zip(boxes["image"].tolist(), detection_rows(boxes, boxes["group"]), strict=True):
            box = submission_box(row, tokens)
            predictions[camera]["boxes_3d"].append(box)
            predictions[camera]["corners"].append(image_corners(box, originals[camera].numpy(),
                                                                to_global[camera].numpy()).tolist())
        return predictions

    def draw_prediction(self, image: torch.Tensor, prediction: dict) -> torch.Tensor:
        """predict.py --save_images 1: the image (3, H, W) uint8 at its original size with its 3D boxes' edges."""
        if not prediction["corners"]:
            return image
        return draw_keypoints(image, torch.tensor(prediction["corners"], dtype=torch.float32), BOX_EDGES,
                              colors="red", radius=1, width=2)

    def export_module(self) -> tuple:
        """export.py: (module, example images, output names, metadata, tolerances of the ONNX Runtime parity check).
        The module (mono3d.DenseOutputs3D, EMA weights) takes images (I, 3, H, W) uint8 RGB at the input size and
        returns scores (I, P, C), regression (I, P, R), points (P, 2) and strides (P,); the boxes, exactly as eval
        makes them: models.Mono3D.boxes3d.decode_boxes with each image's intrinsics (input px) and pose, then
        bev_nms per sample with the metadata's "postprocess" settings."""
        model = self.evaluated_model()
        width, height = self.image_size
        example = torch.randint(0, 256, (self.num_cameras, 3, height, width), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(0))
        metadata = {"class_names": self.class_names, "input_size": [width, height], "postprocess": self.postprocess,
                    "attribute_names": list(ATTRIBUTE_NAMES),
                    "outputs": "scores (I, P, C), regression (I, P, R), points (P, 2), strides (P,); boxes: "
                               "models.Mono3D.boxes3d.decode_boxes, then bev_nms per sample"}
        return (DenseOutputs3D(model).eval(), example, ["scores", "regression", "points", "strides"], metadata,
                {"scores": 1e-4, "regression": 1e-3, "points": 0.0, "strides": 0.0})

    @torch.no_grad()
    def visualize(self, dataset, out_dir: str, count: int) -> None:
        """out_dir/visualization/sample_<i>.png for the first `count` samples of `dataset`: the cameras (config
        order) with the ground truth's 3D boxes in green and the detections above config.json's
        "visualization_score_threshold" in red, and both in a bird's-eye view (global x, y in m from the sample's
        first camera)."""
        from nuscenes.utils.data_classes import Box
        from pyquaternion import Quaternion

        model = self.evaluated_model()
        threshold = self.args["config"]["test"]["visualization_score_threshold"]
        column = {name: index for index, name in enumerate(TARGET_COLUMNS)}
        for index in range(min(count, len(dataset))):
            item = dataset[index]
            batch = dataset.collate_fn([item])
            found = self.batch_boxes(model, batch)
            found = {key: value[found["score"] >= threshold].cpu() for key, value in found.items()}
            targets, counts = item["targets"], item["counts"]
            image = torch.repeat_interleave(torch.arange(len(counts)), counts)
            center, yaw = lift_boxes(targets[:, [column["u"], column["v"]]], targets[:, column["depth"]],
                                     targets[:, column["alpha"]], item["intrinsics"][image],
                                     item["cam_to_global"][image])
            truth = [Box(c, s, Quaternion(axis=[0, 0, 1], angle=y))
                     for c, s, y in zip(center.numpy(), targets[:, 3:6].numpy(), yaw.numpy(), strict=True)]
            detected = [Box(c, s, Quaternion(axis=[0, 0, 1], angle=y)) for c, s, y in
                        zip(found["center"].numpy(), found["size"].numpy(), found["yaw"].numpy(), strict=True)]
            figure = Figure(figsize=(16, 7))
            axes = figure.subplots(2, 4)
            for camera, axis in enumerate(axes[:, :3].flatten()[:len(counts)]):
                axis.imshow(item["images"][camera].permute(1, 2, 0).numpy())
                to_camera = np.linalg.inv(item["cam_to_global"][camera].numpy())
                for boxes, colour in ((truth, "g"), (detected, "r")):
                    for box in boxes:
                        box = box.copy()
                        box.rotate(Quaternion(matrix=to_camera[:3, :3], atol=1e-6))
                        box.translate(to_camera[:3, 3])
                        if (box.corners()[2] > 0.1).all():
                            box.render(axis, view=item["intrinsics"][camera].numpy(), normalize=True,
                                       colors=(colour,) * 3, linewidth=1)
                width, height = self.image_size
                axis.set(xlim=(0, width), ylim=(height, 0), xticks=[], yticks=[])
            origin = item["cam_to_global"][0, :3, 3].numpy()
            bev = axes[0, 3]
            for boxes, colour in ((truth, "g"), (detected, "r")):
                for box in boxes:
                    box = box.copy()
                    box.translate(-origin)
                    box.render(bev, view=np.eye(3), colors=(colour,) * 3, linewidth=1)
            bev.plot([0], [0], marker="^", color="black")
            bev.set(xlim=(-50, 50), ylim=(-50, 50), aspect="equal", title="green truth, red detections",
                    xlabel="global x (m)", ylabel="global y (m)")
            axes[1, 3].axis("off")
            figure.suptitle(str(dataset.sample_tokens[index]))
            save_figure(figure, os.path.join(out_dir, "visualization", f"sample_{index}.png"))


def detection_rows(boxes: dict, sample: torch.Tensor) -> np.ndarray:
    """(D, 13) float64 rows of detection_eval.DETECTION_COLUMNS from decode_boxes' dict and each box's sample."""
    return torch.cat([sample[:, None].double(), boxes["center"].double(), boxes["size"].double(),
                      boxes["yaw"][:, None].double(), boxes["velocity"].double(), boxes["score"][:, None].double(),
                      boxes["label"][:, None].double(), boxes["attribute"][:, None].double()], 1).cpu().numpy()


def image_corners(box: dict, intrinsics: np.ndarray, cam_to_global: np.ndarray) -> np.ndarray:
    """(8, 2) pixels of a submission box's corners in the camera of `intrinsics` (original px) and pose."""
    from nuscenes.utils.data_classes import Box
    from nuscenes.utils.geometry_utils import view_points
    from pyquaternion import Quaternion

    to_camera = np.linalg.inv(cam_to_global)
    camera_box = Box(box["translation"], box["size"], Quaternion(box["rotation"]))
    camera_box.rotate(Quaternion(matrix=to_camera[:3, :3], atol=1e-6))
    camera_box.translate(to_camera[:3, 3])
    return view_points(camera_box.corners(), intrinsics, normalize=True)[:2].T
