"""Task glue: the dataset loaders and the solver named by the configuration, found by convention, so that a new
model, dataset or task needs new files and config entries but no edit here or in train.py."""

import copy
import importlib
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from argumentparser import training_flags
from utils.checkpoint import load_checkpoint
from utils.config import CONFIG_SECTIONS, FLAG, apply_override, check_values, merge_config, number
from utils.distributed import ResumableDistributedSampler, SeededItems
from utils.errors import UserError
from utils.experiment import experiment_path

PROJECT_ROOT = Path(__file__).resolve().parent
# config/config.json: the platform's settings (train.py, test.py, optimization/base.py, utils/optim.py)
PLATFORM_RULES = {
    "config.solver.ema": FLAG,
    "config.solver.ema_decay": number(0, 1, high_open=True),
    "config.train.checkpoint_every_steps": number(0, integer=True),
    "config.solver.compile": FLAG,
    "config.train.log_every_steps": number(1, integer=True),
    "config.dataloader.persistent_workers": FLAG,
    "config.dataloader.prefetch_factor": number(1, integer=True),
    "config.distributed.timeout_s": number(0, low_open=True),
    "config.distributed.sync_batchnorm": FLAG,
    "config.schedulers.StepLR.step_epochs": number(1, integer=True),
    "config.schedulers.StepLR.gamma": number(0, 1, low_open=True),
    "config.schedulers.ExponentialLR.gamma_per_epoch": number(0, 1, low_open=True),
    "config.schedulers.CosineLR.warmup_epochs": number(0),
    "config.schedulers.CosineLR.min_lr_ratio": number(0, 1, low_open=True),
    "config.test.visualizations": number(0, integer=True),
    "config.test.visualization_score_threshold": number(0, 1),
}


def available_solvers() -> list:
    """Model names that have an optimization/<model_name>_solver.py."""
    return sorted(name[: -len("_solver.py")] for name in os.listdir(PROJECT_ROOT / "optimization")
                  if name.endswith("_solver.py"))


def solver_class(model_name: str):
    """The Solver class of optimization/<model_name>_solver.py."""
    return importlib.import_module(f"optimization.{model_name}_solver").Solver


def check_names(args: dict) -> None:
    """Reject an unknown model, dataset or task, or a model whose solver does not take the task's batches (its
    Solver.app_modes, where it names them), before any heavy work, listing the valid names."""
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
    app_modes = solver_class(args["model_name"]).app_modes  # empty: any
    if app_modes and args["app_mode"] not in app_modes:
        fitting = [name for name in available_solvers()
                   if args["app_mode"] in solver_class(name).app_modes or not solver_class(name).app_modes]
        raise UserError(f"--model_name {args['model_name']} is for --app_mode {', '.join(app_modes)}, not "
                        f"{args['app_mode']}: use --model_name "
                        f"{' or '.join(fitting) or '(none yet: add a solver whose app_modes has it)'}")


def loader_module(args: dict):
    """The loader module that config/config.json names for (dataset_type, app_mode)."""
    name = args["config"]["loaders"][args["dataset_type"]][args["app_mode"]]
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        raise UserError(f"loader module {name} ('loaders' in config/config.json) cannot be imported ({error}): name "
                        f"a module of dataset/ such as dataset.NuscenesDataset.loader_2d_obj_det") from None
    if not hasattr(module, "DatasetLoader"):
        raise UserError(f"loader module {name} ('loaders' in config/config.json) has no DatasetLoader class")
    return module


def check_config(args: dict) -> None:
    """Reject, before any heavy work, unknown names (check_names) and any configuration value out of its range:
    the platform's (PLATFORM_RULES), then the solver's and the loader's, each in its check_config(args), which
    raises UserError (the solver's first: where both check a value, its range is the narrower one)."""
    check_names(args)
    check_values(args, PLATFORM_RULES)
    solver_class(args["model_name"]).check_config(args)
    loader_check = getattr(loader_module(args).DatasetLoader, "check_config", None)
    if loader_check is not None:
        loader_check(args)


def load_datasetloader(args: dict, world_size: int, rank: int, mode: str) -> tuple:
    """(dataset, DataLoader) of `mode` ('train', 'val' or 'test') from the loader module that config/config.json
    names for (dataset_type, app_mode). Every mode goes through a ResumableDistributedSampler (one replica
    without DDP): its order depends only on the seed and the epoch, and in training each item's augmentation
    only on (seed, epoch, index) (utils.distributed.SeededItems), so runs and resumes are reproducible with any
    number of workers; the training workers stay alive across epochs (config.json "dataloader"; evaluation's
    start for each pass, so that they hold no memory between passes). In evaluation each process gets a disjoint
    shard with no padding."""
    # No collective here: a label cache or the embedded dataset is built by one process while the others wait on a
    # file lock, so that no process group timeout can run out during a build of any length.
    dataset = loader_module(args).DatasetLoader(args, world_size, rank, mode)
    training = mode == "train"
    sampler = ResumableDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=training,
                                          seed=args["seed"], drop_last=training, pad=training)
    workers, settings = args["num_cores"], args["config"]["dataloader"]
    # Its own generator: creating an iterator draws a base seed from it, not from the global generator, whose
    # state a checkpoint restores (the items' randomness comes from SeededItems, not from that base seed).
    loader = DataLoader(SeededItems(dataset) if training else dataset, batch_size=args["batch_size"],
                        sampler=sampler, num_workers=workers, collate_fn=getattr(dataset, "collate_fn", None),
                        drop_last=training, pin_memory=torch.cuda.is_available(),
                        generator=torch.Generator().manual_seed(args["seed"]),
                        worker_init_fn=getattr(dataset, "worker_init_fn", None),
                        persistent_workers=training and workers > 0 and settings["persistent_workers"],
                        prefetch_factor=settings["prefetch_factor"] if workers > 0 else None)
    return dataset, loader


@contextmanager
def workers_stopped(loader: DataLoader):
    """Run the block, then stop the loader's persistent worker processes, however the block ends. PyTorch stops
    them only when the loader's iterator is garbage-collected. Where a reference cycle holds it (a cached exception
    whose frames reach the training loop does: matplotlib's font parser keeps some), the collector closes the
    workers' queues before it calls the iterator's __del__, and each worker's join then times out: 5 s per worker,
    at some later moment of the process."""
    try:
        yield
    finally:
        iterator, loader._iterator = loader._iterator, None  # torch keeps the persistent workers' iterator private
        if iterator is not None:
            iterator._shutdown_workers()


def load_solver(args: dict, **kwargs):
    """The Solver of optimization/<model_name>_solver.py, built with `args` and `kwargs`."""
    return solver_class(args["model_name"])(args, **kwargs)


def given_flags(parser, argv: list) -> dict:
    """The flags that `argv` gives explicitly to `parser` (test.py's, predict.py's or export.py's), without the
    parser's defaults ("cfg": the --cfg overrides). Training flags among them are named in a warning line: they
    change nothing here."""
    not_given, parser = object(), copy.deepcopy(parser)  # the caller's parser keeps its defaults
    parser.set_defaults(**{name: not_given for name in vars(parser.parse_args([])) if name != "cfg"})
    given = {name: value for name, value in vars(parser.parse_args(argv)).items() if value is not not_given}
    ignored = sorted(set(given) & training_flags())
    if ignored and os.environ.get("RANK", "0") == "0":  # one line under torchrun too
        print(f"warning: {', '.join('--' + name for name in ignored)}: training flag(s), ignored here (the "
              f"checkpoint's own training settings stand)", file=sys.stderr)
    return {name: value for name, value in given.items() if name not in ignored}


# data.json keys that locate files: for a checkpoint they come from this checkout and the command's flags, never from
# the checkpoint's configuration, which could point them anywhere ("../", another machine's folders)
PATH_KEYS = ("dataset_dir", "version", "label_cache_dir", "embedded")


def without_pretrained_weights(args: dict) -> dict:
    """`args` with the model's "pretrained_backbone" off: for a model whose weights a checkpoint replaces, no
    ImageNet weights file is read (nor need it exist)."""
    run = copy.deepcopy(args)
    model_cfg = run["model"].get(run["model_name"])
    if isinstance(model_cfg, dict) and "pretrained_backbone" in model_cfg:
        model_cfg["pretrained_backbone"] = False
    return run


def data_location(cfg: dict) -> tuple:
    """(dataset folder, version) that a configuration reads: --dataset_dir (relative to the working folder), else
    data.json's (relative to the project), as the loaders resolve them."""
    section = cfg["data"][cfg["app_mode"]]
    if cfg.get("dataset_dir"):
        return os.path.abspath(cfg["dataset_dir"]), section.get("version")
    folder = section.get("dataset_dir")
    return os.path.normpath(os.path.join(PROJECT_ROOT, folder)) if folder else None, section.get("version")


def checkpoint_configuration(path: str, state: dict, given: dict, checkout: dict) -> dict:
    """The configuration to use a checkpoint with (test.py, predict.py, export.py): its own, but what decides which
    code is imported and where files are read and written comes from this checkout (`checkout`: the command's flags
    over config/*.json): the loaders table, data.json's paths (PATH_KEYS) and --dataset_dir; the ImageNet weights
    are off (the checkpoint's replace them); then the given flags and --cfg overrides; checked."""
    run = copy.deepcopy(state["config"])
    missing = [key for key in (*CONFIG_SECTIONS, "app_mode", "dataset_type") if key not in run]
    if missing:
        raise UserError(f"checkpoint {path}: its configuration lacks {', '.join(missing)}: use a checkpoint that "
                        f"train.py wrote")
    run["config"]["loaders"] = copy.deepcopy(checkout["config"]["loaders"])
    section = checkout["data"].get(run["app_mode"])
    if not isinstance(section, dict) or not isinstance(run["data"].get(run["app_mode"]), dict):
        raise UserError(f"checkpoint {path} is of --app_mode {run['app_mode']}, which config/data.json of this "
                        f"checkout has no section for: add it, or use this checkpoint where it was trained")
    for key in PATH_KEYS:  # the checkout's, or none at all
        run["data"][run["app_mode"]].pop(key, None)
        if key in section:
            run["data"][run["app_mode"]][key] = copy.deepcopy(section[key])
    run["dataset_dir"] = checkout["dataset_dir"]
    run.update({name: value for name, value in given.items() if name != "cfg"})
    for override in given["cfg"]:
        apply_override(run, override, CONFIG_SECTIONS)
    run = without_pretrained_weights(run)
    check_config(run)
    return run


def check_data_of(path: str, state: dict, run: dict, command: dict) -> None:
    """test.py, and predict.py with sample tokens, read the data that the command and config/data.json name
    (checkpoint_configuration), which may not be the data the checkpoint at `path` was trained on. Then: one line
    that stops, unless the command (`command`: its parsed flags) chose the data itself with --dataset_dir or a
    --cfg of the section's dataset_dir or version; then a warning line naming both."""
    trained_on, reading = data_location(state["config"]), data_location(run)
    if trained_on == reading:
        return
    app_mode = run["app_mode"]
    chosen = command.get("dataset_dir") is not None or any(
        override.split("=", 1)[0] in (f"data.{app_mode}.dataset_dir", f"data.{app_mode}.version")
        for override in command.get("cfg") or [])
    what = (f"checkpoint {path} was trained on {trained_on[0]} ({trained_on[1]}); this reads {reading[0]} "
            f"({reading[1]}), from the command and config/data.json (a checkpoint chooses no paths)")
    if not chosen:
        raise UserError(f"{what}: give --dataset_dir {trained_on[0]} --cfg data.{app_mode}.version={trained_on[1]} "
                        f"to read its data, or --dataset_dir {reading[0]} to read that")
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {what}", file=sys.stderr)


def checkpoint_class_names(path: str, state: dict, run: dict) -> list:
    """The class names a checkpoint was trained with: its own (train.py saves them), else its loader's."""
    names = state.get("class_names", getattr(loader_module(run).DatasetLoader, "class_names", None))
    if not isinstance(names, list):
        raise UserError(f"checkpoint {path} names no classes and its loader has no class_names: use a checkpoint "
                        f"that train.py wrote")
    return names


def checkpoint_name(exp_dir: str, model_num) -> str:
    """The checkpoint file that --model_num names in the experiment folder (epoch_<model_num>.pt; None: best.pt),
    checked to exist."""
    if not os.path.isdir(exp_dir):
        raise UserError(f"experiment folder {exp_dir} not found: check --exp_id (or --save_dir) and train first")
    name = f"epoch_{model_num}.pt" if model_num is not None else "best.pt"
    if not os.path.isfile(os.path.join(exp_dir, name)):
        available = sorted(n for n in os.listdir(exp_dir) if n.endswith(".pt"))
        raise UserError(f"no checkpoint {name} in {exp_dir} (there: {', '.join(available) or 'none'}): choose "
                        f"one with --model_num")
    return name


def chosen_checkpoint(parser, argv: list) -> tuple:
    """predict.py and export.py: (flags over config/*.json, experiment folder, checkpoint file name, its state, the
    configuration to use it with) of the checkpoint that --exp_id (or --save_dir) and --model_num name (default
    best.pt)."""
    args = merge_config({**vars(parser.parse_args(argv)), "cfg": []}, str(PROJECT_ROOT / "config"))
    exp_dir = experiment_path(args, PROJECT_ROOT)
    name = checkpoint_name(exp_dir, args["model_num"])
    path = os.path.join(exp_dir, name)
    state = load_checkpoint(path)
    return args, exp_dir, name, state, checkpoint_configuration(path, state, given_flags(parser, argv), args)
