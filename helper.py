"""Task glue: the dataset loaders and the solver named by the configuration, found by convention, so that a new
model, dataset or task needs new files and config entries but no edit here or in train.py."""

import importlib
import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from utils.distributed import ResumableDistributedSampler, main_process_first
from utils.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parent


def available_solvers() -> list:
    """Model names that have an optimization/<model_name>_solver.py."""
    return sorted(name[: -len("_solver.py")] for name in os.listdir(PROJECT_ROOT / "optimization")
                  if name.endswith("_solver.py"))


def solver_class(model_name: str):
    """The Solver class of optimization/<model_name>_solver.py."""
    return importlib.import_module(f"optimization.{model_name}_solver").Solver


def check_names(args: dict) -> None:
    """Reject an unknown model, dataset or task, or a model whose solver does not take the task's batches (its
    Solver.app_modes), before any heavy work, listing the valid names."""
    if args["model_name"] not in available_solvers():
        raise UserError(f"--model_name {args['model_name']}: no optimization/{args['model_name']}_solver.py; "
                        f"available: {', '.join(available_solvers())}")
    loaders = args["config"]["loaders"]
    if args["dataset_type"] not in loaders:
        raise UserError(f"--dataset_type {args['dataset_type']}: not in 'loaders' of config/config.json; "
                        f"available: {', '.join(loaders)}")
    if args["app_mode"] not in loaders[args["dataset_type"]]:
        raise UserError(f"--app_mode {args['app_mode']}: no loader for it with --dataset_type "
                        f"{args['dataset_type']} in config/config.json; available: "
                        f"{', '.join(loaders[args['dataset_type']])}")
    if args["app_mode"] not in solver_class(args["model_name"]).app_modes:
        fitting = [name for name in available_solvers() if args["app_mode"] in solver_class(name).app_modes]
        raise UserError(f"--model_name {args['model_name']} is for --app_mode "
                        f"{', '.join(solver_class(args['model_name']).app_modes)}, not {args['app_mode']}: use "
                        f"--model_name {' or '.join(fitting) or '(none yet: add a solver whose app_modes has it)'}")


def load_datasetloader(args: dict, dtype, world_size: int, rank: int, mode: str) -> tuple:
    """(dataset, DataLoader) of `mode` ('train', 'val' or 'test') from the loader module that config/config.json
    names for (dataset_type, app_mode). Every mode goes through a ResumableDistributedSampler (one replica
    without DDP): its order depends only on the seed and the epoch, so runs and resumes are reproducible. In
    evaluation each process gets a disjoint shard with no padding."""
    module = importlib.import_module(args["config"]["loaders"][args["dataset_type"]][args["app_mode"]])
    with main_process_first(world_size, rank):  # rank 0 generates the embedded dataset or builds the label cache
        dataset = module.DatasetLoader(args, dtype, world_size, rank, mode)
    training = mode == "train"
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=training,
                                          seed=args["seed"], drop_last=training, pad=training)
    # Its own generator: creating an epoch's iterator draws the workers' base seed from it, not from the global
    # generator that augmentation uses in the main process; train.py reseeds it per epoch.
    loader = DataLoader(dataset, batch_size=args["batch_size"], sampler=sampler, num_workers=args["num_cores"],
                        collate_fn=getattr(dataset, "collate_fn", None), drop_last=training,
                        pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(args["seed"]))
    return dataset, loader


def load_solver(args: dict, **kwargs):
    """The Solver of optimization/<model_name>_solver.py, built with `args` and `kwargs`."""
    return solver_class(args["model_name"])(args, **kwargs)
