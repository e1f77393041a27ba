"""Train a model: python train.py --exp_id 0 --gpu_num 0

Reads top to bottom: parse and merge the configuration, check it, set up the experiment folder, seed, build the
loaders and the solver, resume, then the epoch loop (train, evaluate, checkpoint). The step lives in the Solver."""

import logging
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import helper
from argumentparser import build_parser
from utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from utils.config import merge_config
from utils.distributed import any_process, close_distributed, gather_to_main, init_distributed
from utils.errors import NonFiniteLossError, UserError, exit_on_user_error
from utils.experiment import (
    StopRequest,
    experiment_folder,
    prune_checkpoints,
    select_device,
    setup_logging,
    write_evaluation,
)
from utils.io import atomic_write_json
from utils.plots import plot_curves

PROJECT_ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("train")


def checkpoint_state(solver, args: dict, epoch: int, step_in_epoch: int, global_step: int, best_score: float,
                     history: list, epoch_sums: dict, rng_states: list) -> dict:
    """Everything a resumed run needs to continue exactly: epoch in progress and batches done in it, the best
    validation value of the solver's first metric so far, and the random generator states of every process (rank
    order)."""
    return {**solver.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "best_score": best_score, "history": history, "epoch_sums": epoch_sums, "rng": rng_states, "config": args}


def resume_state(args: dict, exp_dir: str):
    """The checkpoint to resume from with --load_pretrained 1 (last.pt, or epoch_<start_epoch>.pt)."""
    name = f"epoch_{args['start_epoch']}.pt" if args["start_epoch"] else "last.pt"
    path = os.path.join(exp_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"--load_pretrained 1: no checkpoint {path} to resume from; train without "
                        f"--load_pretrained, or check --exp_id/--save_dir/--start_epoch")
    state = load_checkpoint(path)
    if state["config"]["model_name"] != args["model_name"]:
        raise UserError(f"checkpoint {path} is from model {state['config']['model_name']}, not "
                        f"{args['model_name']}: resume it with --model_name {state['config']['model_name']}")
    return path, state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_command_line(argv: list) -> str:
    """This run's command line with --load_pretrained 1 (and without --start_epoch)."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg.split("=")[0] in ("--load_pretrained", "--start_epoch"):
            skip_value = "=" not in arg
        else:
            kept.append(arg)
    return " ".join(["python train.py", *kept, "--load_pretrained 1"])


@exit_on_user_error
def main(argv=None) -> None:
    args = merge_config(vars(build_parser().parse_args(argv)), str(PROJECT_ROOT / "config"))
    helper.check_names(args)
    world_size, rank, local_rank = init_distributed(args["ddp"], args["config"]["distributed"]["timeout_s"])
    try:
        run(args, sys.argv[1:] if argv is None else argv, world_size, rank, local_rank)
    finally:
        close_distributed()


def run(args: dict, argv: list, world_size: int, rank: int, local_rank: int) -> None:
    main_process = rank == 0  # the only one that logs, draws progress bars and writes files
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        args["load_pretrained"] = 1  # torchrun restarted the workers after a failure: continue from last.pt
    exp_dir = experiment_folder(args, PROJECT_ROOT)
    resume_path, resumed = resume_state(args, exp_dir) if args["load_pretrained"] else (None, None)
    setup_logging(os.path.join(exp_dir, "training.log") if main_process else None, main_process)
    device = select_device(local_rank if args["ddp"] else args["gpu_num"])
    logger.info("configuration: %s", args)
    seed_everything(args["seed"] + rank)

    train_set, train_loader = helper.load_datasetloader(args, torch.float32, world_size, rank, "train")
    val_set, val_loader = helper.load_datasetloader(args, torch.float32, world_size, rank, "val")
    if len(train_loader) == 0:
        raise UserError(f"--batch_size {args['batch_size']} is larger than the {len(train_set)} training samples "
                        f"({world_size} process(es))")
    steps_per_epoch = len(train_loader)
    solver = helper.load_solver(args, device=device, class_names=train_set.class_names,
                                steps_per_epoch=steps_per_epoch, world_size=world_size, rank=rank)
    solver.model.print_model_summary()
    if main_process:
        atomic_write_json(os.path.join(exp_dir, "config.json"), args)
    best_metric = solver.metric_names[0]  # selects best.pt; higher is better

    start_epoch, skip_steps, global_step, best_score, history, epoch_sums = 0, 0, 0, -1.0, [], {}
    if resumed is not None:
        start_epoch, skip_steps, global_step = resumed["epoch"], resumed["step_in_epoch"], resumed["global_step"]
        history, epoch_sums = resumed["history"], resumed["epoch_sums"]
        # checkpoints written before solvers named their metrics (metric_names) kept the best mAP as "best_map"
        best_score = resumed["best_score"] if "best_score" in resumed else resumed["best_map"]
        if solver.load_state_dict(resumed, global_step):
            logger.info("--num_epochs changed from %d to %d: the learning-rate schedule is rebuilt for %d epochs",
                        resumed["config"]["num_epochs"], args["num_epochs"], args["num_epochs"])
        if len(resumed["rng"]) != world_size:
            logger.warning("resuming a run of %d process(es) with %d: random streams and, mid-epoch, the split of "
                           "the samples differ from those of an uninterrupted run", len(resumed["rng"]), world_size)
        set_rng_state(resumed["rng"][rank % len(resumed["rng"])])
        logger.info("resumed from %s at epoch %d, step %d", resume_path, start_epoch + 1, skip_steps)

    writer = SummaryWriter(os.path.join(exp_dir, "tensorboard")) if main_process else None
    resume_command = resume_command_line(argv)
    with logging_redirect_tqdm(), StopRequest() as stop:
        for epoch in range(start_epoch, args["num_epochs"]):
            train_loader.sampler.set_epoch(epoch)  # the sample order and the workers' seeds depend on the epoch only
            train_loader.generator.manual_seed(args["seed"] * 1000 + epoch)
            train_loader.sampler.skip = skip_steps * args["batch_size"]
            solver.mode_selection(True)
            epoch_start, images_seen, learning_rate = time.time(), 0, solver.learning_rate()
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args['num_epochs']}", initial=skip_steps,
                       total=skip_steps + len(train_loader), unit="batch", dynamic_ncols=True,
                       disable=not main_process)
            for step_in_epoch, batch in enumerate(bar, start=skip_steps + 1):
                try:
                    losses = solver.train(batch)
                except NonFiniteLossError as error:
                    logger.error("non-finite loss at epoch %d step %d (loss terms of process %d: %s); stopping, the "
                                 "checkpoints are left as they were", epoch + 1, step_in_epoch, rank, error)
                    sys.exit(1)
                learning_rate = solver.learning_rate()  # the one this step used
                solver.learning_rate_step()
                global_step += 1
                images_seen += batch["images"].shape[0] * batch["images"].shape[1]
                for key, value in losses.items():
                    epoch_sums[key] = epoch_sums.get(key, 0.0) + value
                bar.set_postfix({key: f"{epoch_sums[key] / step_in_epoch:.3f}" for key in losses if "loss" in key}
                                | {"lr": f"{learning_rate:.2e}",
                                   "img/s": f"{images_seen / (time.time() - epoch_start):.1f}"})
                every = args["config"]["solver"]["checkpoint_every_steps"]
                stop_now = any_process(stop.requested)  # all processes stop after the same step, and save together
                if stop_now or (every and global_step % every == 0):
                    rng_states = gather_to_main([rng_state()])
                    if main_process:
                        save_checkpoint(os.path.join(exp_dir, "last.pt"), checkpoint_state(
                            solver, args, epoch, step_in_epoch, global_step, best_score, history, epoch_sums,
                            rng_states))
                if stop_now:
                    logger.info("stopped by %s at epoch %d step %d; last.pt saved; resume with: %s",
                                stop.signal_name or "a signal to another process", epoch + 1, step_in_epoch,
                                resume_command)
                    sys.exit(128 + (stop.signal_number or signal.SIGTERM))
            skip_steps = 0

            row = {"epoch": epoch + 1, "lr": learning_rate,
                   **{key: value / steps_per_epoch for key, value in epoch_sums.items()}}
            epoch_sums = {}
            if (epoch + 1) % args["valid_step"] == 0 or epoch + 1 == args["num_epochs"]:
                metrics, outputs, _ = solver.eval(val_loader, show_progress=main_process)
                if main_process:  # the other processes sent their predictions to it
                    write_evaluation(exp_dir, metrics, outputs)
                    row.update({name: metrics[name] for name in solver.metric_names})
            history.append(row)
            rng_states = gather_to_main([rng_state()])
            if not main_process:
                continue
            logger.info("epoch %d/%d: %s (%.0f s)", epoch + 1, args["num_epochs"],
                        ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch"), time.time() - epoch_start)
            for key, value in row.items():
                if key != "epoch":  # per epoch: train/* losses and lr, val/* metrics
                    writer.add_scalar(f"{'val' if key in solver.metric_names else 'train'}/{key}", value, epoch + 1)
            plot_curves(history, solver.metric_names, os.path.join(exp_dir, "curves.png"))

            state = checkpoint_state(solver, args, epoch + 1, 0, global_step, best_score, history, {}, rng_states)
            if row.get(best_metric, -1.0) > best_score:
                best_score = state["best_score"] = row[best_metric]
                save_checkpoint(os.path.join(exp_dir, "best.pt"), state)
            save_checkpoint(os.path.join(exp_dir, "last.pt"), state)
            if (epoch + 1) % args["save_every"] == 0:
                save_checkpoint(os.path.join(exp_dir, f"epoch_{epoch + 1}.pt"), state)
                prune_checkpoints(exp_dir, args["max_num_chkpts"])
    if main_process:
        writer.close()
    logger.info("done: best validation %s %.4f; checkpoints in %s", best_metric, best_score, exp_dir)


if __name__ == "__main__":
    main()
