"""What every solver trains with, whatever its model, loss and task: the optimizer, the LR schedule, mixed precision,
gradient clipping, an EMA of the weights, the DDP wrapper, and their checkpointed states. A solver builds one
`TrainingParts` around its model and calls it (composition, not a base class): the solver keeps its model, loss,
train step and evaluation pass in its own file."""

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from utils.distributed import any_process, sync_batchnorm
from utils.errors import NonFiniteLossError, UserError
from utils.optim import build_optimizer, build_scheduler, ema_multi_avg_fn, fast_forward


class TrainingParts:
    """model: the solver's nn.Module, already on `device`; args: the merged configuration dict (flags
    optimizer_type, learning_rate, weight_decay, grad_clip, apply_lr_scheduling, lr_schd_type and its settings,
    num_epochs, bool_mixed_precision, bool_find_unused_params, model_name; config.json "solver", "schedulers" and
    "distributed"); steps_per_epoch: optimizer steps per epoch (for the LR schedule); world_size: processes.

    Attributes: model (converted to SyncBatchNorm when configured under DDP), trained_model (what the forward and
    backward passes run: the DDP wrapper under --ddp 1), optimizer, scheduler (None: constant LR), scaler, ema
    (None when config.json "solver.ema" is false), amp, amp_dtype."""

    def __init__(self, model: torch.nn.Module, args: dict, device: torch.device, steps_per_epoch: int,
                 world_size: int = 1):
        self.args, self.steps_per_epoch = args, steps_per_epoch
        if world_size > 1 and args["config"]["distributed"]["sync_batchnorm"]:
            model = sync_batchnorm(model, device)
        self.model = model
        self.optimizer = build_optimizer(args["optimizer_type"], model.parameters(), args["learning_rate"],
                                         args["weight_decay"])
        # steps_per_epoch 0: evaluation only (test.py), no schedule
        self.scheduler = (build_scheduler(args["lr_schd_type"], self.optimizer, args["num_epochs"] * steps_per_epoch,
                                          steps_per_epoch, args, args["config"]["schedulers"])
                          if args["apply_lr_scheduling"] and steps_per_epoch > 0 else None)
        # one code path for every precision: autocast and a GradScaler that is enabled on CUDA (fp16) only
        self.amp = bool(args["bool_mixed_precision"])
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp and device.type == "cuda")
        solver_cfg = args["config"]["solver"]
        self.ema = (AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(solver_cfg["ema_decay"]), use_buffers=True)
                    if solver_cfg["ema"] else None)
        self.trained_model = model
        if world_size > 1:
            self.trained_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=bool(args["bool_find_unused_params"]))

    def autocast(self):
        """The context for forward passes: autocast to amp_dtype with --bool_mixed_precision 1, a no-op otherwise."""
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp)

    def evaluated_model(self) -> torch.nn.Module:
        """The weights evaluation uses: the EMA's, or the trained ones without EMA."""
        return self.ema.module if self.ema is not None else self.model

    def step(self, losses: dict) -> dict:
        """One optimizer step on losses["total_loss"]: backward (scaled), gradient clipping (--grad_clip), optimizer
        and EMA updates. Returns the loss terms as floats; raises NonFiniteLossError, before the backward pass, when
        the loss of any process is not finite, so that no process is left waiting for a peer's gradients."""
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

    def state_dict(self) -> dict:
        """Model, EMA, optimizer, scheduler and scaler states: tensors and plain values only."""
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(), "steps_per_epoch": self.steps_per_epoch}

    def check_model_name(self, state: dict) -> None:
        if state["config"]["model_name"] != self.args["model_name"]:
            raise UserError(f"the checkpoint is from model {state['config']['model_name']}, not "
                            f"{self.args['model_name']}: use --model_name {state['config']['model_name']}")

    def load_weights(self, state: dict) -> None:
        """Only the model and EMA weights of a checkpoint, for evaluation."""
        self.check_model_name(state)
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"the checkpoint's weights do not fit this model ({str(error).splitlines()[0]}): "
                            f"evaluate it with the model settings it was trained with") from None

    def load_state_dict(self, state: dict, schedule_step: int) -> str:
        """Restore a checkpoint's state. schedule_step: the optimizer steps of the current --num_epochs x steps per
        epoch schedule that the resumed run has done. When the checkpoint's schedule has another length (another
        --num_epochs, --batch_size or number of processes), other settings (type, learning rate, shape) or stands
        at another step, the schedule is rebuilt from this run's settings and advanced to schedule_step; returns why
        then (the learning rate may jump), else ""."""
        self.check_model_name(state)
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
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
