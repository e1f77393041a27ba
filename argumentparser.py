"""Command-line flags: what changes between runs. What rarely changes lives in config/*.json; `--cfg` overrides any
JSON value for one run. The parser comes from a function so that test.py and the tests reuse it."""

import argparse
import math
import os
import sys

OPTIMIZERS = ("adamw", "adam", "sgd")
LR_SCHEDULERS = ("OnecycleLR", "StepLR", "ExponentialLR", "CosineLR")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) and exit status 2."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def machine_workers() -> int:
    """The cores this process may use, divided among torchrun's processes on this node, less one for the process
    itself (which runs the training step): 1 on a 2-core machine, 15 per process on a 16-core one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1)


def seed_value(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**31:  # NumPy takes seeds below 2**32, and each process adds its rank
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**31 - 1, got {text}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def open_fraction(text: str) -> float:
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (both excluded), got {text}")
    return value


def unit_interval(text: str) -> float:
    value = finite_float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def flag(text: str) -> int:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"must be 0 or 1, got {text}")
    return int(text)


def build_parser(description: str = "Train a model (DSTorch).") -> argparse.ArgumentParser:
    """train.py's flags: those that also matter to a trained checkpoint's use (test.py, predict.py and export.py
    add theirs to these), then the training flags."""
    # allow_abbrev=False: "--batch 4" is an error, not --batch_size, so that test.py can tell which flags were given
    parser = OneLineErrorParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    add = parser.add_argument
    # what to run
    add("--app_mode", default="2DObjDet", help="task; with --dataset_type it names the loader in config/config.json")
    add("--model_name", default="Yolo", help="model; its solver is optimization/<model_name>_solver.py")
    add("--dataset_type", default="nuscenes", help="dataset; see 'loaders' in config/config.json")
    add("--exp_id", type=non_negative_int, default=0, help="experiment number: names the experiment folder")
    add("--gpu_num", type=non_negative_int, default=0, help="CUDA device index; the CPU is used when CUDA is absent")
    # data
    add("--dataset_dir", default=None, help="dataset folder (default: 'dataset_dir' in config/data.json)")
    add("--save_dir", default=None,
        help="experiment folder (default: saved_models/<dataset_type>_<model_name>_model<exp_id>)")
    add("--batch_size", type=positive_int, default=2, help="samples (each with all its cameras) per step per process")
    add("--num_cores", type=non_negative_int, default=machine_workers(),
        help="DataLoader worker processes per process (0: load in the main one); default: this process's share of "
             "the CPU cores it may use, less one for itself (the cores / torchrun's processes per node - 1)")
    # precision and processes
    add("--bool_mixed_precision", type=flag, default=0,
        help="1: autocast (bf16 on the CPU and on GPUs that have it, fp16 with loss scaling on older GPUs)")
    add("--ddp", type=flag, default=0, help="1: DistributedDataParallel under torchrun")
    add("--cfg", action="append", default=[], metavar="KEY=VALUE",
        help="override a config/*.json value, e.g. --cfg model.Yolo.backbone=resnet34 (repeatable)")
    add_training_flags(add)
    return parser


def build_checkpoint_parser(description: str) -> argparse.ArgumentParser:
    """The parser of a command that uses a trained checkpoint (test.py, predict.py, export.py): train.py's flags,
    whose values not given come from the checkpoint's configuration, not from the defaults --help shows."""
    parser = build_parser(description)
    parser.epilog = ("Besides the flags that find the experiment folder (--exp_id or --save_dir, --dataset_type, "
                     "--model_name), train.py's flags not given take the checkpoint's values, not the defaults above; "
                     "training flags are ignored with a warning. The data's folders are not the checkpoint's: "
                     "--dataset_dir, else config/data.json (--cfg data.<app_mode>.version=... for the version).")
    return parser


def training_flags() -> set:
    """The names of the flags that only train.py reads: given to test.py, predict.py or export.py, they are ignored
    with a warning (the checkpoint's training settings stand)."""
    parser = argparse.ArgumentParser()
    add_training_flags(parser.add_argument)
    return set(vars(parser.parse_args([])))


def add_training_flags(add) -> None:
    # randomness and data
    add("--seed", type=seed_value, default=0, help="seed of every random number generator")
    add("--val_ratio", type=open_fraction, default=0.25, help="share of the training scenes held out for validation")
    add("--bool_apply_img_aug", type=flag, default=1, help="training augmentation: flip, colour, scale, translate")
    # schedule and checkpoints
    add("--num_epochs", type=positive_int, default=14, help="epochs to train (may be raised when resuming)")
    add("--valid_step", type=positive_int, default=1, help="evaluate on the val split every this many epochs")
    add("--save_every", type=positive_int, default=5, help="keep a numbered checkpoint every this many epochs")
    add("--max_num_chkpts", type=positive_int, default=3, help="numbered checkpoints kept (oldest deleted first)")
    add("--load_pretrained", type=flag, default=0, help="1: resume from last.pt in the experiment folder")
    add("--start_epoch", type=non_negative_int, default=0,
        help="with --load_pretrained 1: resume from the numbered checkpoint of this epoch instead of last.pt")
    # optimization
    add("--optimizer_type", choices=OPTIMIZERS, default="adamw", help="optimizer")
    add("--learning_rate", type=positive_float, default=3e-3, help="(peak) learning rate")
    add("--weight_decay", type=non_negative_float, default=0.05, help="weight decay (decoupled for adamw)")
    add("--grad_clip", type=non_negative_float, default=10.0, help="clip the gradient norm to this (0: no clipping)")
    add("--apply_lr_scheduling", type=flag, default=1, help="0: constant learning rate")
    add("--lr_schd_type", choices=LR_SCHEDULERS, default="OnecycleLR", help="learning-rate schedule, stepped per step")
    add("--div_factor", type=positive_float, default=25.0, help="OnecycleLR: initial lr = learning_rate / div_factor")
    add("--pct_start", type=open_fraction, default=0.15, help="OnecycleLR: share of the steps spent warming up")
    add("--final_div_factor", type=positive_float, default=100.0,
        help="OnecycleLR: final lr = initial lr / final_div_factor")
    add("--bool_find_unused_params", type=flag, default=0, help="DDP's find_unused_parameters")
