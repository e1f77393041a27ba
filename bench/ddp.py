"""Data-parallel training on this machine's CPU: images/s of the Solver's training step with 1 process and with
2 processes (torchrun, gloo), and the time the gradient all-reduce is in flight per step, side by side in one run.

    python -m bench.ddp [--batch_size 2] [--steps 10] [--warmup 3] [--width 320 --height 192]
                        [--results_dir bench/results]

Each configuration is a torchrun launch of this module in worker mode: it builds the Yolo Solver from the config
files (default model, 6 cameras, --batch_size samples per process), trains on one fixed synthetic batch (the loader
is measured by bench/loader.py) and times each step. Under DDP a communication hook around torch's all-reduce
records when each gradient bucket's all-reduce starts and ends; the union of these intervals per step is the
all-reduce time (part of it overlaps the backward pass, which is the point of DDP's buckets). The parent process
writes the table to the results file; the workers write nothing there.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.model import NUM_CAMERAS, platform_args, synthetic_batch
from bench.results import add_results_dir, recorded
from helper import load_solver
from utils.distributed import close_distributed, init_distributed

PROJECT_ROOT = Path(__file__).resolve().parents[1]

CONFIGURATIONS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)


def timed_allreduce_hook(intervals: list):
    """DDP's default gradient averaging (all-reduce, then divide by the world size), recording (start, end) in
    seconds of each bucket's all-reduce."""

    def hook(process_group, bucket):
        start = time.perf_counter()
        work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)

        def finished(future):
            intervals.append((start, time.perf_counter()))
            return future.value()[0].div_(dist.get_world_size(process_group))

        return work.get_future().then(finished)

    return hook


def union_length(intervals: list) -> float:
    total, covered_until = 0.0, float("-inf")
    for start, end in sorted(intervals):
        total += max(0.0, end - max(start, covered_until))
        covered_until = max(covered_until, end)
    return total


def worker(options) -> None:
    torch.set_num_threads(options.threads)
    world_size, rank, _ = init_distributed(options.procs > 1, timeout_s=600)
    try:
        args = platform_args(["--batch_size", str(options.batch_size),
                              "--cfg", f"data.2DObjDet.image.w={options.width}",
                              "--cfg", f"data.2DObjDet.image.h={options.height}"])
        solver = load_solver(args, device=torch.device("cpu"), class_names=[str(i) for i in range(10)],
                             steps_per_epoch=options.warmup + options.steps, world_size=world_size, rank=rank)
        intervals = []
        if world_size > 1:
            solver.trained_model.register_comm_hook(None, timed_allreduce_hook(intervals))
        batch = synthetic_batch(options.batch_size, NUM_CAMERAS, options.width, options.height)
        solver.mode_selection(True)
        step_times, allreduce_times = [], []
        for step in range(options.warmup + options.steps):
            intervals.clear()
            start = time.perf_counter()
            solver.train(batch)
            if step >= options.warmup:
                step_times.append(time.perf_counter() - start)
                allreduce_times.append(union_length(intervals))
        if rank == 0:
            step_time = statistics.median(step_times)
            result = {"procs": world_size, "threads": options.threads, "step_s": step_time,
                      "images_per_s": world_size * options.batch_size * NUM_CAMERAS / step_time,
                      "allreduce_s": statistics.median(allreduce_times), "buckets": len(intervals)}
            Path(options.result).write_text(json.dumps(result))
    finally:
        close_distributed()


def launch(options, procs: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result_path = os.path.join(folder, "result.json")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   "-m", "bench.ddp", "--worker", "--procs", str(procs), "--threads", str(threads),
                   "--result", result_path, "--batch_size", str(options.batch_size), "--steps", str(options.steps),
                   "--warmup", str(options.warmup), "--width", str(options.width), "--height", str(options.height)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(PROJECT_ROOT)}
        finished = subprocess.run(command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
        if finished.returncode != 0:
            sys.exit(f"bench.ddp: the {procs}-process run failed:\n{finished.stderr[-3000:]}")
        return json.loads(Path(result_path).read_text())


def compare(options) -> None:
    """A torchrun launch per configuration, then their table."""
    print(f"Yolo Solver training step on the CPU ({os.cpu_count()} cores), {options.width}x{options.height} input, "
          f"{options.batch_size} samples x {NUM_CAMERAS} cameras per process, median of {options.steps} steps")
    results = [launch(options, procs, threads) for procs, threads in CONFIGURATIONS]
    baseline = results[0]["images_per_s"]
    print(f"{'processes':>9} {'threads':>7} {'step s':>7} {'images/s':>9} {'vs 1x1':>7} {'all-reduce s/step':>18} "
          f"{'share of step':>13} {'buckets':>7}")
    for result in results:
        allreduce = f"{result['allreduce_s']:.3f}" if result["procs"] > 1 else "-"
        share = f"{result['allreduce_s'] / result['step_s']:.0%}" if result["procs"] > 1 else "-"
        print(f"{result['procs']:>9} {result['threads']:>7} {result['step_s']:>7.2f} {result['images_per_s']:>9.2f} "
              f"{result['images_per_s'] / baseline:>6.2f}x {allreduce:>18} {share:>13} {result['buckets'] or '-':>7}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, default=2, help="samples (of 6 cameras) per process and step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=192)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    add_results_dir(parser)
    options = parser.parse_args(argv)
    if options.worker:
        worker(options)
        return
    with recorded("ddp", argv, options.results_dir):
        compare(options)


if __name__ == "__main__":
    main()
