"""The Solver of the LiftBEV bird's-eye-view segmenter (--app_mode BEVSeg): its model and loss, the train step
(forward and loss here, then BaseSolver.step), the evaluation pass (IoU per class over the split) and the drawings of
test.py --visualization 1. The optimizer, LR schedule, mixed precision, EMA, DDP wrapper and their checkpointed
states are BaseSolver's (optimization/base.py)."""

import os

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid
from tqdm import tqdm

from dataset.NuscenesDataset.loader_bev_seg import grid_shape
from models.LiftBEV.lift_bev import LiftBEV
from models.LiftBEV.loss import SegmentationLoss
from models.Yolo.yolo import BACKBONES
from optimization.base import BaseSolver
from utils.config import FLAG, GROUP_NORM_CHANNELS, Rule, check_values, is_number, list_of, multiple_of, number, one_of
from utils.distributed import gather_to_main
from utils.plots import save_figure
from utils.segmentation import OccupancyHistogram


class Solver(BaseSolver):
    """args: the merged configuration dict; device: where to train; class_names: BEV class index -> name;
    steps_per_epoch: optimizer steps per epoch (for the LR schedule); world_size, rank: of torch.distributed."""

    app_modes = ("BEVSeg",)
    metric_names = ("mIoU",)  # higher is better
    @staticmethod
    def check_config(args: dict) -> None:
        """The ranges of what this solver, its model and its loss read (BaseSolver.check_config)."""
        check_values(args, {"image.w": multiple_of(32, "the backbone's coarsest stride"),
                            "image.h": multiple_of(32, "the backbone's coarsest stride")}, f"data.{args['app_mode']}")
        check_values(args, {
            "backbone": one_of(*BACKBONES),
            "pretrained_backbone": FLAG,
            "freeze_batchnorm": FLAG,
            "image_channels": number(1, integer=True),
            "heights_m": list_of(number()),
            # the BEV encoder's GroupNorm takes bev_channels, the decoder's half of them
            "bev_channels": Rule(lambda value: GROUP_NORM_CHANNELS.check(value) and value % 2 == 0
                                 and GROUP_NORM_CHANNELS.check(value // 2), "an even integer from 2 to 64, or a "
                                 "multiple of 64"),
            "bev_blocks": number(0, integer=True),
            "threshold": Rule(lambda value: is_number(value) and 0 < value < 1 and abs(
                value * OccupancyHistogram.bins - round(value * OccupancyHistogram.bins)) < 1e-9,
                f"a multiple of {1 / OccupancyHistogram.bins:g} between 0 and 1 (the IoU is counted in "
                f"{OccupancyHistogram.bins} probability bins)"),
        }, "model.LiftBEV")
        check_values(args, {"pos_weight": number(0, low_open=True), "dice_weight": number(0)}, "loss.LiftBEV")

    def __init__(self, args: dict, device: torch.device, class_names: list, steps_per_epoch: int,
                 world_size: int = 1, rank: int = 0):
        data, cfg = args["data"][args["app_mode"]], args["model"]["LiftBEV"]
        self.bev = data["bev"]
        self.threshold = cfg["threshold"]  # a cell is predicted occupied where its probability is at least this
        OccupancyHistogram.check_threshold(self.threshold, "model.LiftBEV.threshold in config/model.json")
        model = LiftBEV(cfg, (data["image"]["w"], data["image"]["h"]), self.bev, grid_shape(self.bev),
                        len(class_names), len(data["cameras"]), data["normalize"])
        super().__init__(model, args, device, steps_per_epoch, world_size, rank)
        self.class_names = class_names
        self.loss_fn = SegmentationLoss(args["loss"]["LiftBEV"])

    def train(self, batch: dict) -> dict:
        """One optimizer step on a batch (images, projections, target); returns the loss terms as 0-d tensors on
        the device (read_nonfinite and train.py read them at logging points, not every step)."""
        images, projections, target = (batch[key].to(self.device, non_blocking=True)
                                       for key in ("images", "projections", "target"))
        with self.autocast():
            logits = self.trained_model(images, projections)
        return self.step(self.loss_fn(logits, target))  # the loss in float32 whatever the autocast dtype

    @torch.no_grad()
    def eval(self, loader, show_progress: bool = True) -> tuple:
        """Segment every sample of `loader` with the EMA weights (the trained ones without EMA) and score the grid
        cells of the whole split against the ground truth.

        Returns (metrics, outputs, pr_curves): metrics {"mIoU": mean over the classes with ground truth or
        predictions, "per_class_IoU": {class: IoU at the threshold}, "per_class_IoU_all_occupied": {class: IoU of
        predicting every cell occupied, a baseline}, "threshold"}; outputs {"per_sample_iou.json": [{"sample_token",
        "iou": {class: IoU or None}}]}; pr_curves {class: (recall (100,), precision (100,))} over the thresholds
        k / 100. Under DDP every process takes its shard and the main process (rank 0) adds up the histograms; the
        others get empty results."""
        model = self.evaluated_model()
        histogram, per_sample = OccupancyHistogram(len(self.class_names)), []
        for batch in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not show_progress):
            with self.autocast():
                logits = model(batch["images"].to(self.device, non_blocking=True),
                               batch["projections"].to(self.device, non_blocking=True))
            probabilities, target = torch.sigmoid(logits.float()).cpu(), batch["target"]
            histogram.update(probabilities, target)
            predicted = histogram.occupied(probabilities, self.threshold)
            overlap = (predicted & (target > 0)).sum(dim=(2, 3))  # (B, C)
            union = (predicted | (target > 0)).sum(dim=(2, 3))
            for index, sample_overlap, sample_union in zip(batch["index"].tolist(), overlap.tolist(), union.tolist(),
                                                           strict=True):
                per_sample.append({"sample_token": loader.dataset.sample_tokens[index], "iou": {
                    name: (o / u if u else None) for name, o, u in zip(self.class_names, sample_overlap,
                                                                       sample_union, strict=True)}})
        histograms, per_sample = gather_to_main([histogram]), gather_to_main(per_sample)
        if self.rank != 0:
            return {}, {}, {}
        histogram.merge(histograms[1:])  # histograms[0] is this process's own
        iou = histogram.iou(self.threshold)
        scored = [value for value in iou if value is not None]
        recall, precision = histogram.precision_recall()
        metrics = {"mIoU": float(np.mean(scored)) if scored else 0.0,
                   "per_class_IoU": dict(zip(self.class_names, iou, strict=True)),
                   "per_class_IoU_all_occupied": dict(zip(self.class_names, histogram.iou_all_occupied(),
                                                          strict=True)),
                   "threshold": self.threshold}
        curves = {name: (recall[c], precision[c]) for c, name in enumerate(self.class_names)}
        return metrics, {"per_sample_iou.json": per_sample}, curves

    @torch.no_grad()
    def visualize(self, dataset, out_dir: str, count: int) -> None:
        """out_dir/visualization/sample_<i>.png for the first `count` samples of `dataset`: the cameras (3 per
        row, config/data.json order) and, per class, the BEV grid with the ego car at the centre facing up: cells
        both predicted and true in green, missed in blue, false in red."""
        model = self.evaluated_model()
        x_range, y_range = self.bev["x_range_m"], self.bev["y_range_m"]
        for index in range(min(count, len(dataset))):
            item = dataset[index]
            logits = model(item["images"][None].to(self.device), item["projections"][None].to(self.device))
            predicted = OccupancyHistogram.occupied(torch.sigmoid(logits[0].float()), self.threshold).cpu().numpy()
            true = item["target"].numpy() > 0
            figure = Figure(figsize=(6 + 4 * len(self.class_names), 4))
            axes = figure.subplots(1, 1 + len(self.class_names), width_ratios=[1.5] + [1] * len(self.class_names))
            cameras = make_grid(item["images"], nrow=3, padding=4, pad_value=255)
            axes[0].imshow(cameras.permute(1, 2, 0).numpy())
            axes[0].set(title=dataset.sample_tokens[index][:12], xticks=[], yticks=[])
            for axis, name, pred, gt in zip(axes[1:], self.class_names, predicted, true, strict=True):
                colours = np.full((*gt.shape, 3), 255, dtype=np.uint8)
                colours[gt & ~pred] = (40, 80, 230)
                colours[pred & ~gt] = (230, 50, 40)
                colours[pred & gt] = (40, 180, 60)
                # column 0 is y max (left), row 0 is x max (front): extent (left, right, bottom, top) in m
                axis.imshow(colours, extent=(y_range[1], y_range[0], x_range[0], x_range[1]))
                axis.plot([0], [0], marker="^", color="black")  # the ego car
                axis.set(title=f"{name}: green hit, blue missed, red false", xlabel="y (m, left +)",
                         ylabel="x (m, forward +)")
            save_figure(figure, os.path.join(out_dir, "visualization", f"sample_{index}.png"))
