"""Train a model: python train.py --exp_id 0 --gpu_num 0

Reads top to bottom: parse and merge the configuration, check it, set up the experiment folder, seed, build the
loaders and the solver, resume, then the epoch loop (train_epoch, end_epoch: evaluate, checkpoint). The step lives
in the Solver."""

import json
import logging
import os
import random
import re
import shlex
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import helper
from argumentparser import build_parser
from utils.checkpoint import check_model_name, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from utils.config import merge_config
from utils.distributed import any_process, close_distributed, gather_to_main, init_distributed
from utils.errors import NonFiniteLossError, UserError, exit_on_user_error
from utils.experiment import (
    PROJECT_LOGGERS,
    StopRequest,
    checkpoint_names,
    experiment_folder,
    experiment_path,
    holder_of,
    in_use,
    prune_checkpoints,
    select_device,
    setup_logging,
    write_evaluation,
)
from utils.io import atomic_write_json
from utils.run_record import TrainingRecord

PROJECT_ROOT = Path(__file__).resolve().parent
logger = logging.getLogger("train")


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint (as top-level keys) so that a resumed run continues
    exactly."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the epoch in progress
    samples_in_epoch: int = 0  # training samples that all processes together consumed in the epoch in progress
    global_step: int = 0  # optimizer steps since the start
    best_score: float = float("-inf")  # best validation value of the solver's first metric (its worst_score()
    # until one is evaluated: -inf where higher is better, +inf where lower is)
    history: list = field(default_factory=list)  # per epoch: epoch, lr, samples, mean loss terms, metrics, time_s,
    # img_per_s (results.csv)
    epoch_sums: dict = field(default_factory=dict)  # sums of the loss terms over the epoch's steps so far
    epoch_train_s: float = 0.0  # seconds spent training in the epoch in progress, over all its (resumed) runs
    epoch_images: int = 0  # images that all processes together trained on in the epoch in progress


# Progress fields that checkpoints of older DSTorch versions lack: a resume starts them at their defaults
ADDED_PROGRESS_FIELDS = ("epoch_train_s", "epoch_images")


def launch_id():
    """torchrun's id of this launch (its --rdzv_id: a new one per launch with --standalone, RDZV_ID of
    run_train_multinode.sh); None without torchrun. A restarted worker continues from last.pt only if its launch
    wrote it, so the id must differ between launches that share an experiment folder."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def newest_checkpoint(exp_dir: str) -> str | None:
    """The path of the checkpoint train.py wrote last in `exp_dir` (None: none). That is last.pt, but where a run was
    killed between the files of one save (best.pt, epoch_<k>.pt, then last.pt, all of the same state): then one of
    those, or the only checkpoint of a first save. By modification time (a run resumed from an older epoch writes
    newer files of fewer steps), ties (the files of one save) to last.pt, then the highest epoch."""
    names = [name for name in (checkpoint_names(exp_dir) if os.path.isdir(exp_dir) else [])
             if re.fullmatch(r"best\.pt|last\.pt|epoch_\d+\.pt", name)]  # not a file the user put there

    def written(name: str) -> tuple:
        return (os.path.getmtime(os.path.join(exp_dir, name)), name == "last.pt",
                int(name[6:-3]) if name.startswith("epoch_") else -1)

    return os.path.join(exp_dir, max(names, key=written)) if names else None


def resume_state(args: dict, exp_dir: str, restarted: bool):
    """(path, state) of the checkpoint to continue from, or (None, None) to start afresh: after a torchrun
    restart, the newest checkpoint if this launch wrote it; otherwise, with --load_pretrained 1,
    epoch_<start_epoch>.pt, or last.pt (the newest checkpoint where there is no last.pt); otherwise nothing. Every
    check of the first attempt applies again."""
    newest = newest_checkpoint(exp_dir)
    if restarted and newest is not None:
        state = checked_state(newest, args)
        if state.get("launch_id") == launch_id():
            return newest, state
    if not args["load_pretrained"]:
        return None, None
    name = f"epoch_{args['start_epoch']}.pt" if args["start_epoch"] else "last.pt"
    path = os.path.join(exp_dir, name)
    if not args["start_epoch"] and not os.path.isfile(path) and newest is not None:
        path = newest
    if not os.path.isfile(path):
        raise UserError(f"--load_pretrained 1: no checkpoint {path} to resume from; train without "
                        f"--load_pretrained, or check --exp_id/--save_dir/--start_epoch")
    state = checked_state(path, args)
    if state["epoch"] >= args["num_epochs"]:
        raise UserError(f"checkpoint {path} has trained {state['epoch']} epochs already: raise --num_epochs "
                        f"(now {args['num_epochs']}) to train more")
    return path, state


def best_in_folder(exp_dir: str, resume_path: str):
    """The best score of the folder's best.pt, where a run resumes from another checkpoint (None otherwise)."""
    best = os.path.join(exp_dir, "best.pt")
    if resume_path == best or not os.path.isfile(best):
        return None
    return load_checkpoint(best).get("best_score")


def checked_state(path: str, args: dict) -> dict:
    """The checkpoint at `path`, with what a resume reads checked first."""
    state = load_checkpoint(path)
    types = {field.name: field.type for field in fields(Progress)} | {"rng": list, "steps_per_epoch": int}
    wrong = [key for key, kind in types.items() if not isinstance(state.get(key), kind)
             and not (key in ADDED_PROGRESS_FIELDS and key not in state)]
    if wrong or not state["rng"]:
        raise UserError(f"checkpoint {path} lacks {', '.join(wrong) or 'rng'} or has them of another type (written "
                        f"by an older DSTorch, or not by train.py): evaluate it with test.py, or train anew")
    check_model_name(state, args["model_name"], f"checkpoint {path}")
    return state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resume_command_line(argv: list) -> str:
    """This run's command line with --load_pretrained 1 (and without --start_epoch), quoted for the shell; under
    torchrun, as a torchrun command (HOST:PORT: the rendezvous address of a multi-node run)."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
        elif arg.split("=")[0] in ("--load_pretrained", "--start_epoch"):
            skip_value = "=" not in arg
        else:
            kept.append(arg)
    launcher = ["python"]
    if "LOCAL_WORLD_SIZE" in os.environ:
        per_node, nodes = os.environ["LOCAL_WORLD_SIZE"], int(os.environ["WORLD_SIZE"]) // int(
            os.environ["LOCAL_WORLD_SIZE"])
        launcher = (["torchrun", "--standalone", "--nproc_per_node", per_node] if nodes == 1 else
                    ["torchrun", "--nnodes", str(nodes), "--nproc_per_node", per_node, "--rdzv_backend", "c10d",
                     "--rdzv_endpoint", "HOST:PORT"])
        restarts = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")
        if restarts != "0":  # with the store fix that restarts need (see utils/distributed.py)
            launcher = ["env", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", *launcher, "--max_restarts", restarts]
    return shlex.join([*launcher, "train.py", *kept, "--load_pretrained", "1"])


@exit_on_user_error
def main(argv=None) -> None:
    args = merge_config(vars(build_parser().parse_args(argv)), str(PROJECT_ROOT / "config"))
    if args["start_epoch"] and not args["load_pretrained"]:
        raise UserError(f"--start_epoch {args['start_epoch']} resumes from epoch_{args['start_epoch']}.pt: add "
                        f"--load_pretrained 1, or leave --start_epoch out to train anew")
    helper.check_config(args)
    world_size, rank, local_rank = init_distributed(args["ddp"], args["config"]["distributed"]["timeout_s"])
    try:
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun restarted the workers
        folder = experiment_path(args, PROJECT_ROOT)
        if rank == 0 and (holder := holder_of(folder)):  # before anything there is read
            raise in_use(folder, holder)
        resume = resume_state(args, folder, restarted)
        # the folder is this run's until it ends: rank 0 holds it, the process that writes there
        with experiment_folder(args, PROJECT_ROOT, fresh=resume[1] is None, hold=rank == 0) as exp_dir:
            run(args, sys.argv[1:] if argv is None else argv, exp_dir, resume, restarted, world_size, rank,
                local_rank)
    finally:
        close_distributed()


def run(args: dict, argv: list, exp_dir: str, resume: tuple, restarted: bool, world_size: int, rank: int,
        local_rank: int) -> None:
    """Train in `exp_dir`, continuing from resume = (path, state) of a checkpoint, or afresh from (None, None)."""
    main_process = rank == 0  # the only one that logs, draws progress bars and writes files
    resume_path, resumed = resume
    setup_logging(os.path.join(exp_dir, "training.log") if main_process else None, main_process)
    if restarted and resumed is None:
        logger.info("torchrun restarted the workers before this run saved a checkpoint: training starts afresh")
    device = select_device(local_rank if args["ddp"] else args["gpu_num"])
    logger.info("configuration:\n%s", json.dumps(args, indent=2))
    seed_everything(args["seed"] + rank)

    train_set, train_loader = helper.load_datasetloader(args, world_size, rank, "train")
    val_set, val_loader = helper.load_datasetloader(args, world_size, rank, "val")
    if len(train_loader) == 0:
        raise UserError(f"--batch_size {args['batch_size']} is larger than the {len(train_set)} training samples "
                        f"({world_size} process(es))")
    steps_per_epoch = len(train_loader)
    # a resumed run's weights come from its checkpoint: no ImageNet weights are read for it
    solver = helper.load_solver(args if resumed is None else helper.without_pretrained_weights(args), device=device,
                                class_names=train_set.class_names, steps_per_epoch=steps_per_epoch,
                                world_size=world_size, rank=rank)
    if hasattr(solver.model, "print_model_summary"):  # parameters per part and GFLOPs, where the model can count them
        solver.model.print_model_summary()

    progress = Progress(best_score=solver.worst_score())
    if resumed is not None:
        progress = Progress(**{f.name: resumed[f.name] for f in fields(Progress) if f.name in resumed})
        # the schedule stands where this run's remaining steps of the epoch end it on time
        train_loader.sampler.start_epoch(progress.epoch, progress.samples_in_epoch)
        rescheduled = solver.load_state_dict(resumed, (progress.epoch + 1) * steps_per_epoch - len(train_loader))
        if rescheduled:
            logger.info("%s", rescheduled)
        if len(resumed["rng"]) != world_size:
            logger.warning("resuming a run of %d process(es) with %d: random streams differ from those of an "
                           "uninterrupted run", len(resumed["rng"]), world_size)
        set_rng_state(resumed["rng"][rank % len(resumed["rng"])])
        logger.info("resumed from %s at epoch %d, step %d", resume_path, progress.epoch + 1, progress.step_in_epoch)
        kept = best_in_folder(exp_dir, resume_path)
        if kept is not None and solver.improves(kept, progress.best_score):
            # a run resumed from an older epoch branches in the folder: best.pt stays the folder's best
            logger.info("best.pt holds %s %.4g, better than this checkpoint's best: it is replaced only by a better "
                        "validation score; last.pt, results.csv, TensorBoard and the epoch_<k>.pt from here on are "
                        "this run's", solver.metric_names[0], kept)
            progress.best_score = kept
    if main_process:
        atomic_write_json(os.path.join(exp_dir, "config.json"), args)

    record = (TrainingRecord(exp_dir, solver.metric_names, args, None if resumed is None else progress.global_step)
              if main_process else None)
    save = CheckpointWriter(exp_dir, solver, args, progress, train_set.class_names, main_process)
    with (helper.workers_stopped(train_loader), record or nullcontext(), StopRequest() as stop,
          logging_redirect_tqdm([logging.getLogger(name) for name in PROJECT_LOGGERS])):
        while progress.epoch < args["num_epochs"]:
            learning_rate = train_epoch(solver, train_loader, args, world_size, progress, stop, save, record,
                                        resume_command_line(argv))
            end_epoch(solver, val_loader, args, progress, learning_rate, save, record)
        if main_process:
            record.close({key: value for key, value in args.items() if key not in ("data", "model", "loss", "config")},
                         progress.best_score)
    logger.info("done: best validation %s %.4f; checkpoints in %s", solver.metric_names[0], progress.best_score,
                exp_dir)


class CheckpointWriter:
    """save(names): gather every process's random generator state (a collective: all processes call it), then
    rank 0 writes the checkpoint of the current progress under each of `names` in the experiment folder (with the
    class names, which predict.py and export.py read)."""

    def __init__(self, exp_dir: str, solver, args: dict, progress: Progress, class_names: list,
                 main_process: bool):
        self.exp_dir, self.solver, self.args, self.progress = exp_dir, solver, args, progress
        self.class_names, self.main_process = list(class_names), main_process

    def __call__(self, names: list) -> None:
        rng_states = gather_to_main([rng_state()])  # rank order
        if not self.main_process:
            return
        state = {**self.solver.state_dict(), **asdict(self.progress), "rng": rng_states, "config": self.args,
                 "class_names": self.class_names, "launch_id": launch_id()}
        for name in names:
            save_checkpoint(os.path.join(self.exp_dir, name), state)


def images_in(batch: dict) -> int:
    """The images of a batch: the first two dimensions (B, N_cam) of its images, or its JPEG files where the images
    are decoded on the device (data.json "decode": "device")."""
    return len(batch["jpegs"]) if "jpegs" in batch else batch["images"].shape[0] * batch["images"].shape[1]


def train_epoch(solver, loader, args: dict, world_size: int, progress: Progress, stop: StopRequest, save,
                record: TrainingRecord | None, resume_command: str) -> float:
    """Train the rest of epoch progress.epoch, one solver step per batch; returns the last learning rate used.
    The loss values stay on the device until a read point: every config.json "train.log_every_steps" steps (logged
    to the progress bar and TensorBoard), before a checkpoint and at the end of the epoch. Saves last.pt every
    "train.checkpoint_every_steps" steps, and on a stop signal (then exits). record: None but in the main process."""
    epoch = progress.epoch
    loader.sampler.start_epoch(epoch, progress.samples_in_epoch)  # the order depends on the seed and epoch only
    solver.mode_selection(True)
    every, log_every = (args["config"]["train"][key] for key in ("checkpoint_every_steps", "log_every_steps"))
    start, trained_before, learning_rate, unread = time.time(), progress.epoch_train_s, solver.learning_rate(), []
    images_before = progress.epoch_images
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args['num_epochs']}", initial=progress.step_in_epoch,
               total=progress.step_in_epoch + len(loader), unit="batch", dynamic_ncols=True, disable=record is None)
    for batch in bar:
        unread.append(solver.train(batch))  # loss terms as device tensors
        learning_rate = solver.learning_rate()  # the one this step used
        solver.learning_rate_step()
        progress.step_in_epoch += 1
        progress.global_step += 1
        progress.samples_in_epoch += args["batch_size"] * world_size
        progress.epoch_images += images_in(batch) * world_size  # the sampler gives every process full batches
        progress.epoch_train_s = trained_before + time.time() - start
        stop_now = any_process(stop.requested)  # all processes stop after the same step, and save together
        save_now = stop_now or (every and progress.global_step % every == 0)
        if save_now or progress.global_step % log_every == 0:
            loss_means = read_losses(solver, unread, progress)
            images_per_s = (progress.epoch_images - images_before) / (time.time() - start)
            bar.set_postfix({key: f"{value / progress.step_in_epoch:.3f}" for key, value in progress.epoch_sums.items()
                             if "loss" in key} | {"lr": f"{learning_rate:.2e}", "img/s": f"{images_per_s:.1f}"})
            if record is not None:
                record.steps(progress.global_step, loss_means, learning_rate)
        if save_now:
            save(["last.pt"])
            if record is not None:
                record.flush()
        if stop_now:
            logger.info("stopped by %s at epoch %d step %d; last.pt saved; resume with: %s",
                        stop.signal_name or "a signal to another process", epoch + 1, progress.step_in_epoch,
                        resume_command)
            sys.exit(128 + (stop.signal_number or signal.SIGTERM))
    loss_means = read_losses(solver, unread, progress)
    if record is not None and loss_means:  # the epoch's last logging window, shorter than log_every
        record.steps(progress.global_step, loss_means, learning_rate)
    return learning_rate


def read_losses(solver, unread: list, progress: Progress) -> dict:
    """Bring the loss terms of the unread steps (dicts of 0-d device tensors) to the host, in one read, into
    progress.epoch_sums (added step by step, so that the sums do not depend on where the reads fell); returns
    their means over those steps. Stops the run (exit status 1, checkpoints untouched) when a loss was not
    finite."""
    try:
        solver.read_nonfinite()
    except NonFiniteLossError as error:
        where = (f"step {progress.step_in_epoch - error.steps_ago}" if error.steps_ago is not None
                 else f"a step up to {progress.step_in_epoch}")
        logger.error("non-finite loss at epoch %d %s (loss terms of this process: %s); stopping, the checkpoints "
                     "are left as they were", progress.epoch + 1, where, error)
        sys.exit(1)
    if not unread:
        return {}
    values = torch.stack([torch.stack(list(losses.values())).double() for losses in unread]).tolist()
    for step_values in values:
        for key, value in zip(unread[0], step_values, strict=True):
            progress.epoch_sums[key] = progress.epoch_sums.get(key, 0.0) + value
    means = {key: sum(column) / len(values) for key, column in zip(unread[0], zip(*values, strict=True), strict=True)}
    unread.clear()
    return means


def end_epoch(solver, val_loader, args: dict, progress: Progress, learning_rate: float, save,
              record: TrainingRecord | None) -> None:
    """Evaluate (every --valid_step epochs and after the last), record the epoch's row (TensorBoard, results.csv,
    curves.png), then save last.pt, best.pt when the solver's first metric improved, and epoch_<k>.pt every
    --save_every epochs. record: None but in the main process."""
    epoch, eval_start = progress.epoch + 1, time.time()
    row = {"epoch": epoch, "lr": learning_rate, "samples": progress.samples_in_epoch,
           **{key: value / max(1, progress.step_in_epoch) for key, value in progress.epoch_sums.items()}}
    if epoch % args["valid_step"] == 0 or epoch == args["num_epochs"]:
        metrics, _, _ = solver.eval(val_loader, show_progress=record is not None)
        if record is not None:  # the other processes sent their predictions to it; per-item files are test.py's
            write_evaluation(save.exp_dir, metrics, {})
            row.update({name: metrics[name] for name in solver.metric_names})
    row.update(time_s=progress.epoch_train_s + time.time() - eval_start,
               img_per_s=progress.epoch_images / max(progress.epoch_train_s, 1e-9))
    progress.history.append(row)
    progress.epoch, progress.step_in_epoch, progress.samples_in_epoch, progress.epoch_sums = epoch, 0, 0, {}
    progress.epoch_train_s, progress.epoch_images = 0.0, 0
    names = []  # last.pt last: a process killed between the writes finds the older last.pt and redoes the epoch
    if solver.metric_names[0] in row:  # evaluated this epoch
        score = row[solver.metric_names[0]]
        if score is None:  # undefined (no ground truth in the split): best.pt keeps the latest weights until a score
            improved = progress.best_score == solver.worst_score()
        else:
            improved = solver.improves(score, progress.best_score)
            if improved:
                progress.best_score = score
        if improved:
            names.append("best.pt")
    if epoch % args["save_every"] == 0:
        names.append(f"epoch_{epoch}.pt")
    save([*names, "last.pt"])
    if record is None:
        return
    prune_checkpoints(save.exp_dir, args["max_num_chkpts"])
    logger.info("epoch %d/%d: %s", epoch, args["num_epochs"],
                ", ".join(f"{key}={'n/a' if value is None else f'{value:.4g}'}" for key, value in row.items()
                          if key != "epoch"))
    record.epoch(progress.history)


if __name__ == "__main__":
    main()
