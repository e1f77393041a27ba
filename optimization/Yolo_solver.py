"""The Solver of the Yolo detector: model, optimizer, LR schedule, loss, mixed precision, EMA of the weights; the
train step, the evaluation pass and the state that goes into checkpoints. To start a solver for a new model, copy
this file to optimization/<ModelName>_solver.py and change the model, the loss and the evaluation."""

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from models.Yolo.yolo import STRIDES, Yolo
from utils.coco_eval import COCO, coco_detections, coco_metrics
from utils.distributed import any_process, gather_to_main, sync_batchnorm
from utils.errors import NonFiniteLossError, UserError
from utils.loss import DetectionLoss
from utils.optim import build_optimizer, build_scheduler, fast_forward


def ema_multi_avg_fn(decay: float):
    """EMA update for AveragedModel whose decay ramps up as min(decay, (1 + n) / (10 + n)) after n updates (as in
    tf.train.ExponentialMovingAverage), so that short runs are not dominated by the random initial weights."""

    @torch.no_grad()
    def update(averaged_params, current_params, num_averaged):  # one device and dtype per call
        if not torch.is_floating_point(averaged_params[0]):  # counters such as BatchNorm's num_batches_tracked
            torch._foreach_copy_(averaged_params, current_params)
            return
        n = float(num_averaged)
        torch._foreach_lerp_(averaged_params, current_params, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


class Solver:
    """args: the merged configuration dict; device: where to train; class_names: label index -> name;
    steps_per_epoch: optimizer steps per epoch (for the LR schedule); world_size, rank: of torch.distributed."""

    def __init__(self, args: dict, device: torch.device, class_names: list, steps_per_epoch: int,
                 world_size: int = 1, rank: int = 0):
        self.args, self.device, self.class_names = args, device, class_names
        self.steps_per_epoch, self.rank = steps_per_epoch, rank
        image = args["data"][args["app_mode"]]["image"]
        self.image_size = (image["w"], image["h"])
        self.model = Yolo(args["model"]["Yolo"], self.image_size, len(class_names)).to(device)
        if world_size > 1 and args["config"]["distributed"]["sync_batchnorm"]:
            self.model = sync_batchnorm(self.model, device)
        self.loss_fn = DetectionLoss(args["loss"]["Yolo"], STRIDES)
        self.optimizer = build_optimizer(args["optimizer_type"], self.model.parameters(), args["learning_rate"],
                                         args["weight_decay"])
        self.scheduler = self.new_scheduler(args["num_epochs"])
        self.amp = bool(args["bool_mixed_precision"])
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp and device.type == "cuda")
        solver_cfg = args["config"]["solver"]
        self.ema = (AveragedModel(self.model, multi_avg_fn=ema_multi_avg_fn(solver_cfg["ema_decay"]), use_buffers=True)
                    if solver_cfg["ema"] else None)
        self.trained_model = self.model  # what forward/backward runs: the DDP wrapper under --ddp 1
        if world_size > 1:
            self.trained_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=bool(args["bool_find_unused_params"]))

    def new_scheduler(self, num_epochs: int):
        if not self.args["apply_lr_scheduling"]:
            return None
        return build_scheduler(self.args["lr_schd_type"], self.optimizer, num_epochs * self.steps_per_epoch,
                               self.steps_per_epoch, self.args, self.args["config"]["schedulers"])

    def mode_selection(self, is_train: bool) -> None:
        self.model.train(is_train)

    def train(self, batch: dict) -> dict:
        """One optimizer step on a collated batch; returns the loss terms as floats."""
        images = batch["images"].to(self.device, non_blocking=True)
        targets = {key: batch[key].to(self.device, non_blocking=True) for key in ("boxes", "labels", "box_image_index")}
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            outputs = self.trained_model(images)
        losses = self.loss_fn(outputs, targets)  # in float32 whatever the autocast dtype
        # All processes stop together, before the backward pass: one that stopped alone would leave the others
        # waiting for its gradients.
        if any_process(not torch.isfinite(losses["total_loss"])):
            raise NonFiniteLossError({key: float(value.detach()) for key, value in losses.items()})
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total_loss"]).backward()
        if self.args["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args["grad_clip"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return {key: float(value.detach()) for key, value in losses.items()}

    def learning_rate_step(self) -> None:
        if self.scheduler is not None:
            self.scheduler.step()

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def eval(self, loader, ground_truth: COCO, show_progress: bool = True) -> tuple:
        """Detect on every image of `loader` with the EMA weights (the trained ones without EMA) and score the
        detections against `ground_truth` (COCO metrics, utils.coco_eval), in original image pixels.

        Returns (metrics, detections, pr_curves): see utils.coco_eval.coco_metrics; detections in COCO results
        format (image_id, category_id, bbox [x, y, w, h] in original px, score). Under DDP every process detects
        on its shard and the main process (rank 0) scores them all; the others get empty results."""
        model = self.ema.module if self.ema is not None else self.model
        model.eval()
        detections = []
        for batch in tqdm(loader, desc="eval", unit="batch", leave=False, disable=not show_progress):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                predictions = model.predict(batch["images"].to(self.device, non_blocking=True))
            detections += coco_detections(predictions, batch, self.image_size)
        detections = gather_to_main(detections)
        if self.rank != 0:
            return {}, [], {}
        image_ids = loader.dataset.image_ids
        metrics, pr_curves = coco_metrics(ground_truth, detections, image_ids)
        return metrics, detections, pr_curves

    def state_dict(self) -> dict:
        """Model, EMA, optimizer, scheduler and scaler states: tensors and plain values only."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict()}

    def load_weights(self, state: dict) -> None:
        """Only the model and EMA weights of a checkpoint, for evaluation."""
        self.check_model_name(state)
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])

    def check_model_name(self, state: dict) -> None:
        if state["config"]["model_name"] != self.args["model_name"]:
            raise UserError(f"the checkpoint is from model {state['config']['model_name']}, not "
                            f"{self.args['model_name']}: use --model_name {state['config']['model_name']}")

    def load_state_dict(self, state: dict, global_step: int) -> bool:
        """Restore a checkpoint's state. If it was written for another --num_epochs, the schedule is rebuilt for the
        current one and advanced to global_step; returns True then (the learning rate may jump)."""
        self.check_model_name(state)
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise UserError(f"the checkpoint does not fit this model and optimizer ({str(error).splitlines()[0]}): "
                            f"resume with the configuration it was trained with") from None
        self.scaler.load_state_dict(state["scaler"])
        rescheduled = state["config"]["num_epochs"] != self.args["num_epochs"]
        if self.scheduler is not None and state["scheduler"] is not None and not rescheduled:
            self.scheduler.load_state_dict(state["scheduler"])
        elif self.scheduler is not None:
            fast_forward(self.scheduler, global_step)
        return rescheduled and self.scheduler is not None
