"""Optimizers and learning-rate schedules by name, from torch.optim. Every
schedule is stepped once per optimizer step, so epoch-based settings are converted to steps here."""

import re
import warnings

import torch

from utils.errors import UserError

OPTIMIZERS = {"adamw": (torch.optim.AdamW, {}), "adam": (torch.optim.Adam, {}),
              "sgd": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True})}


def build_optimizer(name: str, parameters, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """adamw (decoupled weight decay), adam or sgd (momentum 0.9, Nesterov), in torch's fused implementation (one
    kernel for all parameters, on the CPU and on CUDA; it takes GradScaler's decision to skip a step on the device). A
    value that torch rejects is one line naming the flags (the parser checks their ranges first)."""
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer_type {name}: choose one of {', '.join(OPTIMIZERS)}")
    optimizer_class, settings = OPTIMIZERS[name]
    try:
        return optimizer_class(parameters, lr=learning_rate, weight_decay=weight_decay, fused=True,
                               **settings)
    except ValueError as error:
        raise UserError(f"--optimizer_type {name} --learning_rate {learning_rate} --weight_decay {weight_decay}: "
                        f"torch.optim rejects them ({error})") from None


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
                    flags: dict, cfg: dict):
    """See scheduler_by_name; a setting that torch rejects is one line naming the schedule (the parser and
    helper.check_config check the ranges first)."""
    try:
        return scheduler_by_name(name, optimizer, total_steps, steps_per_epoch, flags, cfg)
    except (ValueError, ZeroDivisionError) as error:
        raise UserError(f"--lr_schd_type {name}: torch.optim.lr_scheduler rejects its settings ({error}); check the "
                        f"OnecycleLR flags or config.json's \"schedulers\"") from None


def scheduler_by_name(name: str, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int,
                      flags: dict, cfg: dict):
    """A torch.optim.lr_scheduler stepped per optimizer step (a constant learning rate is --apply_lr_scheduling 0:
    no scheduler).

    name: OnecycleLR (flags: learning_rate, div_factor, pct_start, final_div_factor), StepLR (cfg StepLR:
    step_epochs, gamma), ExponentialLR (cfg: gamma_per_epoch), CosineLR (cfg: warmup_epochs, min_lr_ratio: a
    linear warmup from min_lr_ratio, then cosine decay to min_lr_ratio * learning_rate)."""
    if name == "OnecycleLR":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=flags["learning_rate"], total_steps=total_steps, pct_start=flags["pct_start"],
            div_factor=flags["div_factor"], final_div_factor=flags["final_div_factor"])
    if name == "StepLR":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg["StepLR"]["step_epochs"] * steps_per_epoch,
                                               gamma=cfg["StepLR"]["gamma"])
    if name == "ExponentialLR":
        return torch.optim.lr_scheduler.ExponentialLR(
            optimizer, gamma=cfg["ExponentialLR"]["gamma_per_epoch"] ** (1.0 / steps_per_epoch))
    if name == "CosineLR":
        warmup_steps = min(max(1, round(cfg["CosineLR"]["warmup_epochs"] * steps_per_epoch)), total_steps - 1)
        min_ratio = cfg["CosineLR"]["min_lr_ratio"]
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=min_ratio, total_iters=warmup_steps)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=min_ratio * flags["learning_rate"])
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
    raise UserError(f"--lr_schd_type {name}: choose one of OnecycleLR, StepLR, ExponentialLR, CosineLR")


def fast_forward(scheduler, steps: int) -> None:
    """Advance a freshly built scheduler by `steps` optimizer steps (resuming with a longer schedule)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
        for _ in range(steps):
            scheduler.step()
