"""Evaluate saved checkpoints on the test split:

    python test.py --exp_id N [--model_num K | --is_test_all 1] [--visualization 1]

Default: best.pt of the experiment. Writes, under <experiment>/test/ (one subfolder per checkpoint with
--is_test_all 1, and test/summary.csv: a row per checkpoint with its epoch and metrics): metrics.json, the solver's
other evaluation files (Yolo: detections.json, COCO results in original pixels), pr_curves/<name>.png (precision-
recall curves) and, with --visualization 1, the solver's drawings of a few samples under visualization/ (Yolo:
camera mosaics with the ground truth in green and the detections in red).

Configuration: each checkpoint's own configuration, then the flags given on this command line and its `--cfg`
overrides on top (e.g. `--batch_size 8`, `--cfg config.test.visualizations=8`). A checkpoint chooses neither the
code imported nor the folders read and written (helper.checkpoint_configuration): the loaders table and the data's
folders come from the checkout's config/*.json and this command (`--dataset_dir DIR`); where they are not the data
the checkpoint was trained on, one line says so and stops, unless --dataset_dir or a --cfg of the data's folder or
version was given (then a warning line)."""

import logging
import os
import sys
from pathlib import Path

import helper
from argumentparser import build_checkpoint_parser, flag, non_negative_int
from utils.checkpoint import load_checkpoint
from utils.config import merge_config
from utils.distributed import close_distributed, init_distributed
from utils.errors import UserError, exit_on_user_error
from utils.experiment import experiment_path, numbered_checkpoints, select_device, setup_logging, write_evaluation
from utils.io import write_csv
from utils.plots import plot_precision_recall

PROJECT_ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("test")


def build_test_parser():
    parser = build_checkpoint_parser("Evaluate saved checkpoints on the test split (DSTorch).")
    parser.add_argument("--model_num", type=non_negative_int, default=None,
                        help="evaluate epoch_<model_num>.pt (default: best.pt)")
    parser.add_argument("--is_test_all", type=flag, default=0, help="1: evaluate every checkpoint of the experiment")
    parser.add_argument("--visualization", type=flag, default=0, help="1: also draw a few camera mosaics")
    return parser


def format_metric(value) -> str:
    return "n/a (no ground truth)" if value is None else f"{value:.4f}"


def chosen_checkpoints(exp_dir: str, model_num, test_all: bool) -> list:
    if not test_all:
        return [helper.checkpoint_name(exp_dir, model_num)]
    if not os.path.isdir(exp_dir):
        raise UserError(f"experiment folder {exp_dir} not found: check --exp_id (or --save_dir) and train first")
    names = [name for _, name in numbered_checkpoints(exp_dir)]
    names += [name for name in ("best.pt", "last.pt") if os.path.isfile(os.path.join(exp_dir, name))]
    if not names:
        raise UserError(f"no checkpoints in {exp_dir}: train first")
    return names


@exit_on_user_error
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    flags = vars(build_test_parser().parse_args(argv))
    args = merge_config({**flags, "cfg": []}, str(PROJECT_ROOT / "config"))  # --cfg applies to the checkpoints
    given = helper.given_flags(build_test_parser(), argv)
    exp_dir = experiment_path(args, PROJECT_ROOT)
    names = chosen_checkpoints(exp_dir, args["model_num"], bool(args["is_test_all"]))
    runs = {}
    for name in names:  # every checkpoint checked before any work
        path = os.path.join(exp_dir, name)
        state = load_checkpoint(path)
        runs[name] = helper.checkpoint_configuration(path, state, given, args)
        helper.check_data_of(path, state, runs[name], flags)
    undrawn = sorted({run["model_name"] for run in runs.values()
                      if not hasattr(helper.solver_class(run["model_name"]), "visualize")})
    if args["visualization"] and undrawn:
        raise UserError(f"--visualization 1: the {', '.join(undrawn)} solver draws nothing (it has no visualize "
                        f"method); leave --visualization out")
    world_size, rank, local_rank = init_distributed(args["ddp"], args["config"]["distributed"]["timeout_s"])
    try:
        evaluate(args, exp_dir, runs, world_size, rank, local_rank)
    finally:
        close_distributed()


def evaluate(args: dict, exp_dir: str, runs: dict, world_size: int, rank: int, local_rank: int) -> None:
    """Evaluate each checkpoint of the experiment folder {name: its configuration}; under --ddp 1 every process
    takes a shard, rank 0 scores and writes. With --is_test_all 1, test/summary.csv gets a row per checkpoint
    (its name, epoch and scalar metrics), rewritten after each."""
    setup_logging(os.path.join(exp_dir, "test.log") if rank == 0 else None, rank == 0)
    device = select_device(local_rank if args["ddp"] else args["gpu_num"])
    summary = []
    for name, run in runs.items():
        state = load_checkpoint(os.path.join(exp_dir, name))
        test_set, test_loader = helper.load_datasetloader(run, world_size, rank, "test")
        class_names = state.get("class_names", test_set.class_names)  # the trained ones (older checkpoints: none)
        solver = helper.load_solver(run, device=device, class_names=class_names, steps_per_epoch=0,
                                    world_size=world_size, rank=rank)
        solver.load_weights(state)
        metrics, outputs, curves = solver.eval(test_loader, show_progress=rank == 0)
        if rank != 0:
            continue
        metrics.update({"checkpoint": name, "epoch": state["epoch"]})
        out_dir = os.path.join(exp_dir, "test", *([Path(name).stem] if args["is_test_all"] else []))
        write_evaluation(out_dir, metrics, outputs)
        for curve_name, (recall, precision) in curves.items():
            path = os.path.join(out_dir, "pr_curves", f"{curve_name}.png")
            plot_precision_recall(recall, precision, curve_name, path)
        if args["visualization"]:
            solver.visualize(test_set, out_dir, run["config"]["test"]["visualizations"])
        logger.info("%s (epoch %d) on %d test samples: %s", name, state["epoch"], len(test_set),
                    ", ".join(f"{metric} {format_metric(metrics[metric])}" for metric in solver.metric_names))
        for table, values in metrics.items():
            if isinstance(values, dict):  # per-item values, e.g. per_class_AP
                logger.info("%-22s %s", "item", table)
                for item, value in values.items():
                    logger.info("%-22s %s", item, format_metric(value))
        logger.info("results in %s", out_dir)
        if args["is_test_all"]:
            summary.append({"checkpoint": name, "epoch": state["epoch"],
                            **{metric: metrics[metric] for metric in solver.metric_names}})
            write_csv(os.path.join(exp_dir, "test", "summary.csv"), summary)


if __name__ == "__main__":
    main()
