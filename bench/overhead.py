"""The platform's cost per training step: the Solver's step, as train.py calls it (Solver.train, then the LR
step), against a bare PyTorch loop on the same model, loss, optimizer, LR schedule, batch and AMP setting, with no
logging, in one run.

    python -m bench.overhead [--steps 20] [--warmup 3] [--batch_size 2] [--results_dir bench/results]

Both start from the same weights and take turns step by step, so that a drift of the machine's speed hits both;
the ratio is of the median step times. What the Solver does beyond the bare loop (config defaults): the
non-finite loss check, gradient clipping and the EMA update of the weights.
"""

import argparse
import copy
import statistics
import time

import torch

from bench.model import NUM_CAMERAS, platform_args, synthetic_batch
from bench.results import add_results_dir, recorded
from helper import load_solver
from utils.optim import build_optimizer, build_scheduler


def compare(options) -> None:
    """Time the Solver's step and the bare loop's in turns; print their medians and ratio."""
    args = platform_args(["--batch_size", str(options.batch_size)])
    image = args["data"]["2DObjDet"]["image"]
    batch = synthetic_batch(options.batch_size, NUM_CAMERAS, image["w"], image["h"])
    total_steps = options.warmup + options.steps
    solver = load_solver(args, device=torch.device("cpu"), class_names=[str(i) for i in range(10)],
                         steps_per_epoch=total_steps)
    solver.mode_selection(True)

    model = copy.deepcopy(solver.model)  # the same initial weights
    loss_fn = solver.loss_fn  # the configured architecture's loss (it holds no state)
    optimizer = build_optimizer(args["optimizer_type"], model.parameters(), args["learning_rate"],
                                args["weight_decay"])
    scheduler = build_scheduler(args["lr_schd_type"], optimizer, args["num_epochs"] * total_steps, total_steps, args,
                                args["config"]["schedulers"])  # the Solver's schedule
    amp = bool(args["bool_mixed_precision"])
    targets = {key: batch[key] for key in ("target_boxes", "target_labels", "target_valid")}

    def bare_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            outputs = model(batch["images"])
        loss = loss_fn(outputs, targets)["total_loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

    def solver_step():
        solver.train(batch)
        solver.learning_rate_step()

    times = {"solver": [], "bare": []}
    for step in range(total_steps):
        for name, run in (("solver", solver_step), ("bare", bare_step)):
            start = time.perf_counter()
            run()
            if step >= options.warmup:
                times[name].append(time.perf_counter() - start)

    solver_s, bare_s = statistics.median(times["solver"]), statistics.median(times["bare"])
    print(f"training step on the CPU ({torch.get_num_threads()} threads), {image['w']}x{image['h']} input, "
          f"{options.batch_size} samples x {NUM_CAMERAS} cameras, AMP {'on' if amp else 'off'}, median of "
          f"{options.steps} steps after {options.warmup} warm-up steps")
    print(f"{'loop':<58}{'step s':>8}")
    print(f"{'bare PyTorch (forward, loss, backward, AdamW, LR step)':<58}{bare_s:>8.3f}")
    print(f"{'DSTorch Solver.train + learning_rate_step':<58}{solver_s:>8.3f}")
    print(f"ratio Solver / bare: {solver_s / bare_s:.3f} (target <= 1.03)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each loop (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=2, help="samples of 6 cameras per step")
    add_results_dir(parser)
    options = parser.parse_args(argv)
    with recorded("overhead", argv, options.results_dir):
        compare(options)


if __name__ == "__main__":
    main()
