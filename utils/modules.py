"""Network pieces that any model here may use: a conv-norm-activation block and the summary train.py logs."""

import logging

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from utils.normalize import NormalizeImages


def conv_norm_act(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, GroupNorm (32 groups, fewer for narrow layers: batch-size independent, so DDP and small
    CPU batches train alike) and SiLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(min(32, out_channels), out_channels), nn.SiLU(inplace=True))


def log_model_summary(model: nn.Module, example_inputs: tuple, title: str, per: str, logger: logging.Logger) -> None:
    """Log `title`, the parameters of each part of `model` (its children, but the normalization layer) and the
    GFLOPs of one forward pass on `example_inputs` (FLOPs = 2 x multiply-adds, torch.utils.flop_counter), which
    are one `per` (an image, a sample of N cameras)."""
    parameters = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()
                  if not isinstance(module, NormalizeImages)}
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*example_inputs)
    model.train(was_training)
    width = max(len(name) for name in [*parameters, "total"])
    logger.info("%s:", title)
    for name, count in parameters.items():
        logger.info("  %-*s %8.2f M parameters", width, name, count / 1e6)
    logger.info("  %-*s %8.2f M parameters, %.2f GFLOPs per %s (FLOPs = 2 x multiply-adds)", width, "total",
                sum(parameters.values()) / 1e6, counter.get_total_flops() / 1e9, per)
