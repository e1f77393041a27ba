"""What every Solver trains with, whatever its model, loss and task: the optimizer, the LR schedule, mixed precision,
the training step (`step`: backward, gradient clipping, optimizer step, EMA update), the EMA of the weights, the DDP
wrapper and their checkpointed states. A task's Solver (optimization/<model_name>_solver.py, class Solver)
subclasses BaseSolver: it builds its model and loss, passes the model to BaseSolver.__init__, and writes train
(forward and loss, then self.step), eval and, optionally, visualize."""

import importlib.util
import logging
import os
import shutil

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from utils.checkpoint import check_model_name
from utils.distributed import any_process, sync_batchnorm
from utils.errors import NonFiniteLossError, UserError
from utils.optim import build_optimizer, build_scheduler, fast_forward

logger = logging.getLogger(__name__)


class BaseSolver:
    """model: the task's network (moved to `device` here); args: the merged configuration dict (flags
    optimizer_type, learning_rate, weight_decay, grad_clip, apply_lr_scheduling, lr_schd_type and its settings,
    num_epochs, bool_mixed_precision, bool_find_unused_params, model_name; config.json "solver", "schedulers" and
    "distributed"); steps_per_epoch: optimizer steps per epoch (for the LR schedule; 0 in test.py: no schedule);
    world_size, rank: of torch.distributed.

    Attributes: model (the bare module; SyncBatchNorm where configured under DDP), trained_model (what the training
    forward pass runs: the DDP wrapper under --ddp 1, compiled with config.json "solver.compile"), optimizer
    (torch's fused implementation), scheduler (None: constant LR), scaler, ema (None when config.json "solver.ema"
    is false), amp, amp_dtype."""

    app_modes = ()  # the --app_mode values whose batches the solver takes (empty: any)
    metric_names = ()  # scalar validation metrics, logged per epoch; the first selects best.pt
    lower_is_better = ()  # those of metric_names that are better when lower (an error, a loss); the rest: higher

    def __init__(self, model: nn.Module, args: dict, device: torch.device, steps_per_epoch: int,
                 world_size: int = 1, rank: int = 0):
        self.args, self.device, self.rank, self.steps_per_epoch = args, device, rank, steps_per_epoch
        model = model.to(device)
        if world_size > 1 and args["config"]["distributed"]["sync_batchnorm"]:
            model = sync_batchnorm(model, device)
        if device.type == "cuda":  # NHWC convolutions run on the tensor cores without layout transposes
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = build_optimizer(args["optimizer_type"], model.parameters(), args["learning_rate"],
                                         args["weight_decay"])
        self.scheduler = (build_scheduler(args["lr_schd_type"], self.optimizer, args["num_epochs"] * steps_per_epoch,
                                          steps_per_epoch, args, args["config"]["schedulers"])
                          if args["apply_lr_scheduling"] and steps_per_epoch > 0 else None)
        self.amp, self.device_type = bool(args["bool_mixed_precision"]), device.type
        self.amp_dtype = mixed_precision_dtype(device)
        self.float16 = self.amp and self.amp_dtype == torch.float16
        # float16's range needs the loss scaled (GradScaler's dynamic scale, from its default 2**16); otherwise the
        # scale is 1 throughout: see step
        self.fixed_scale = None if self.float16 else 1.0
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16 if self.float16 else 1.0)
        if self.amp:
            logger.info("mixed precision: autocast to %s on %s%s", str(self.amp_dtype).removeprefix("torch."),
                        device.type, ", with loss scaling (no bfloat16 here)" if self.float16 else "")
        solver_cfg = args["config"]["solver"]
        self.ema = AveragedModel(model, use_buffers=True) if solver_cfg["ema"] else None
        if self.ema is not None:  # the tensors update_ema pairs, listed once (load_state_dict copies in place)
            pairs = list(zip([*self.ema.module.parameters(), *self.ema.module.buffers()],
                             [*model.parameters(), *model.buffers()], strict=True))
            self.ema_floating = [pair for pair in pairs if torch.is_floating_point(pair[0])]
            self.ema_counters = [pair for pair in pairs if not torch.is_floating_point(pair[0])]
        self.ema_decay, self.ema_updates = solver_cfg["ema_decay"], 0  # updates counted on the host, read never
        self.trained_parameters = list(model.parameters())
        self.steps_taken = 0  # step() calls of this process
        # per process, on the device: the first non-finite step's number (-1: none yet) and loss terms
        self.first_nonfinite_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_nonfinite_terms, self.loss_names = None, []
        self.trained_model = model
        if world_size > 1:
            self.trained_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=bool(args["bool_find_unused_params"]))
        if solver_cfg["compile"]:
            self.trained_model = compiled(self.trained_model, device)

    @staticmethod
    def check_config(args: dict) -> None:
        """Raise UserError, before any work starts, for a value out of its range in the sections this solver, its
        model and its loss read (model.<model_name>, loss.<model_name>, data.<app_mode>). Here: nothing to check."""

    def step(self, losses: dict) -> dict:
        """One optimizer step on losses["total_loss"]: backward (scaled with float16), gradient clipping
        (--grad_clip), the optimizer step and the EMA update. Returns the loss terms detached, as 0-d tensors on the
        device: nothing here reads a value on the host, which would wait for the GPU. A non-finite loss is reported
        by read_nonfinite.

        A step whose gradients are not finite leaves the weights and the optimizer state as they were:
        GradScaler.step skips it, as documented, also where nothing is scaled (the scale is then fixed at 1). With
        torch's fused optimizers that decision is taken on the device (GradScaler hands them its found_inf tensor),
        so the step waits for nothing; tests/test_step.py's host-read count fails the day torch decides it on the
        host instead."""
        self.record_nonfinite(losses)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses["total_loss"]).backward()
        self.scaler.unscale_(self.optimizer)  # clipping sees the true gradients; notes whether they are finite
        if self.args["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.trained_parameters, self.args["grad_clip"])
        self.scaler.step(self.optimizer)  # skipped, on the device, where a gradient was not finite
        self.scaler.update(self.fixed_scale)  # float16: backs off or grows; otherwise 1 again (a fill on the device)
        if self.ema is not None:
            self.update_ema()
        self.steps_taken += 1
        return {key: value.detach() for key, value in losses.items()}

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema = d * ema + (1 - d) * weights, over parameters and floating-point buffers (BatchNorm statistics;
        integer buffers are copied), with d = min(ema_decay, (1 + n) / (10 + n)) after n updates (as in
        tf.train.ExponentialMovingAverage), so that short runs are not dominated by the random initial weights. The
        first update copies the weights. n is counted on the host, so no value is read from the device
        (AveragedModel.update_parameters reads its counter from the device)."""
        if self.ema_counters:
            torch._foreach_copy_(*map(list, zip(*self.ema_counters, strict=True)))
        averaged, current = map(list, zip(*self.ema_floating, strict=True))
        n = self.ema_updates
        if n == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1.0 - min(self.ema_decay, (1.0 + n) / (10.0 + n)))
        self.ema.n_averaged += 1  # on the device: AveragedModel's own counter, kept for its state_dict
        self.ema_updates += 1

    def record_nonfinite(self, losses: dict) -> None:
        """Keep, on the device, the number and loss terms of the first step whose total loss is not finite."""
        bad = ~torch.isfinite(losses["total_loss"].detach())
        first = bad & (self.first_nonfinite_step < 0)
        terms = torch.stack([value.detach().float() for value in losses.values()])
        if self.first_nonfinite_terms is None:
            self.first_nonfinite_terms = torch.zeros_like(terms)
        self.first_nonfinite_terms = torch.where(first, terms, self.first_nonfinite_terms)
        self.first_nonfinite_step = torch.where(first, self.steps_taken, self.first_nonfinite_step)
        self.loss_names = list(losses)

    def read_nonfinite(self) -> None:
        """Raise NonFiniteLossError when the loss of any process was not finite in any step so far (one read on
        the host, and a collective under DDP: every process calls it at the same step)."""
        first_step = int(self.first_nonfinite_step)
        if not any_process(first_step >= 0):
            return
        if first_step < 0:  # another process's loss
            raise NonFiniteLossError({}, steps_ago=None)
        terms = dict(zip(self.loss_names, self.first_nonfinite_terms.tolist(), strict=True))
        raise NonFiniteLossError(terms, steps_ago=self.steps_taken - 1 - first_step)

    def autocast(self):
        """The context for forward passes: autocast to amp_dtype with --bool_mixed_precision 1, a no-op otherwise.
        The loss is computed outside it, in float32."""
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp)

    def evaluated_model(self) -> nn.Module:
        """The weights evaluation uses, in eval mode: the EMA's, or the trained ones without EMA."""
        return (self.ema.module if self.ema is not None else self.model).eval()

    def mode_selection(self, is_train: bool) -> None:
        self.model.train(is_train)

    def learning_rate_step(self) -> None:
        """One scheduler step; train.py calls it after every optimizer step."""
        if self.scheduler is not None:
            self.scheduler.step()

    def learning_rate(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def improves(self, score: float, best: float) -> bool:
        """Whether `score` of metric_names[0] is better than `best` (train.py's best.pt)."""
        return score < best if self.metric_names[0] in self.lower_is_better else score > best

    def worst_score(self) -> float:
        """The best score before any evaluation: every score improves on it."""
        return float("inf") if self.metric_names[0] in self.lower_is_better else float("-inf")

    def state_dict(self) -> dict:
        """Model, EMA, optimizer, scheduler and scaler states: tensors and plain values only. The scaler's only with
        float16: elsewhere its scale is a fixed 1, which a float16 run resumed from it must not take."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.float16 else {}, "steps_per_epoch": self.steps_per_epoch}

    def load_weights(self, state: dict) -> None:
        """Only the model and EMA weights of a checkpoint, for evaluation."""
        check_model_name(state, self.args["model_name"])
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
                self.ema_updates = int(self.ema.n_averaged)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"the checkpoint's weights do not fit this model ({str(error).splitlines()[0]}): "
                            f"evaluate it with the model settings it was trained with") from None

    def load_state_dict(self, state: dict, schedule_step: int) -> str:
        """Restore a checkpoint's state. schedule_step: the optimizer steps of the current --num_epochs x steps per
        epoch schedule that the resumed run has done. When the checkpoint's schedule has another length (another
        --num_epochs, --batch_size or number of processes), other settings (type, learning rate, shape) or stands
        at another step, the schedule is rebuilt from this run's settings and advanced to schedule_step; returns why
        then (the learning rate may jump), else ""."""
        check_model_name(state, self.args["model_name"])
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
                self.ema_updates = int(self.ema.n_averaged)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.float16 and state["scaler"]:  # a float16 run's loss scale; other runs save none (see state_dict)
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"the checkpoint does not fit this model and optimizer ({str(error).splitlines()[0]}): "
                            f"resume with the configuration it was trained with") from None
        old, new = state["config"], self.args
        if self.scheduler is None:  # a constant learning rate: this run's
            for group in self.optimizer.param_groups:
                group["lr"] = new["learning_rate"]
            return ""
        settings = ("lr_schd_type", "learning_rate", "div_factor", "pct_start", "final_div_factor")
        same_schedule = (all(old[key] == new[key] for key in settings)
                         and old["config"]["schedulers"] == new["config"]["schedulers"]
                         and (old["num_epochs"], state["steps_per_epoch"]) == (new["num_epochs"], self.steps_per_epoch)
                         and state["scheduler"] is not None and state["scheduler"]["last_epoch"] == schedule_step)
        if same_schedule:
            self.scheduler.load_state_dict(state["scheduler"])
            return ""
        # The optimizer state brought back the old run's learning rates (lr, and initial_lr/max_lr/min_lr that the
        # schedulers keep in the parameter groups): start a new schedule from this run's flags, then advance it.
        for group in self.optimizer.param_groups:
            group["lr"] = new["learning_rate"]
            for key in ("initial_lr", "max_lr", "min_lr"):
                group.pop(key, None)
        self.scheduler = build_scheduler(new["lr_schd_type"], self.optimizer, new["num_epochs"] * self.steps_per_epoch,
                                         self.steps_per_epoch, new, new["config"]["schedulers"])
        fast_forward(self.scheduler, schedule_step)
        return (f"the learning-rate schedule is rebuilt for {new['num_epochs']} epochs of {self.steps_per_epoch} "
                f"steps (it had {old['num_epochs']} of {state['steps_per_epoch']}, or other schedule settings) and "
                f"continues at step {schedule_step}")


def mixed_precision_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 for autocast where the device has it (CPUs, NVIDIA Ampere and newer), float16 (with a GradScaler)
    on older GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.float16
    return torch.bfloat16


def compiled(model: nn.Module, device: torch.device) -> nn.Module:
    """torch.compile(model), or the model as it is, with a warning, where the compiler that Inductor needs for
    `device` is missing (a C++ compiler on the CPU, Triton on CUDA)."""
    if device.type == "cuda":
        missing = None if importlib.util.find_spec("triton") else "Triton is not installed"
    else:
        compiler = os.environ.get("CXX", "g++")
        missing = None if shutil.which(compiler) else f"no C++ compiler ({compiler}) is on the PATH"
    if missing:
        logger.warning("config.json solver.compile: %s, so the model runs uncompiled; install it, or set "
                       "\"compile\": false", missing)
        return model
    return torch.compile(model)
