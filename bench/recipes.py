"""The README's recipes end to end, as a user runs them: a fresh embedded dataset, train.py, then test.py, each a
subprocess timed on the wall clock, then the times and the metrics in one table.

    python -m bench.recipes [--recipe detection|bev] [--num_epochs N] [--samples_per_scene N] [--jpeg_size WxH]
                            [--work_dir DIR] [--results_dir bench/results] [--flags train.py flags ...]

detection is the quick start (`python train.py --exp_id 0 --gpu_num 0`, then `python test.py`); bev the second
task (train.py and test.py with `--app_mode BEVSeg --model_name LiftBEV`). Both run with the README's defaults; only
the folders move into DIR (--work_dir, default a temporary folder, removed after): the dataset, DIR/nuscenes, made
first by `python -m dataset.NuscenesDataset.synthetic` with data.json's "embedded" settings (what train.py generates
on first use, so that its time is measured apart), the label cache, DIR/cache, and the experiment, DIR/exp.
--num_epochs, --samples_per_scene, --jpeg_size and --flags (train.py's, added last) change the recipe. The programs'
own output goes to the terminal; the table is printed when all three are done, and written to
bench/results/recipes.md (detection) or recipes_bev.md.
"""

import argparse
import contextlib
import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

from bench.loader import jpeg_size
from bench.results import PROJECT_ROOT, add_results_dir, recorded
from helper import solver_class

# name: (the README's train.py and test.py flags of the task, its app_mode, its model_name, the test's per-class
# entry of metrics.json to print, if any)
RECIPES = {"detection": ([], "2DObjDet", "Yolo", None),
           "bev": (["--app_mode", "BEVSeg", "--model_name", "LiftBEV"], "BEVSeg", "LiftBEV", "per_class_IoU")}


def timed(step: str, command: list) -> float:
    """Seconds that `python <command>` takes in the project folder; a failure stops the benchmark."""
    start = time.perf_counter()
    finished = subprocess.run([sys.executable, *command], cwd=PROJECT_ROOT)
    if finished.returncode != 0:
        raise SystemExit(f"bench.recipes: the {step} step failed (exit code {finished.returncode}): "
                         f"{shlex.join(['python', *command])}")
    return time.perf_counter() - start


def metric_cells(values: dict, names) -> str:
    """"mAP 0.2450, AP50 0.3820": each named metric with 4 decimals, n/a where undefined (None or empty)."""
    return ", ".join(f"{name} {float(values[name]):.4f}" if values.get(name) not in (None, "") else f"{name} n/a"
                     for name in names)


def run_recipe(options, work_dir: str) -> None:
    """Generate, train and test in `work_dir`, then print the commands, times and metrics."""
    task_flags, app_mode, model_name, per_class = RECIPES[options.recipe]
    with open(PROJECT_ROOT / "config" / "data.json") as f:
        embedded = json.load(f)[app_mode]["embedded"]
    width, height = options.jpeg_size or (embedded["width"], embedded["height"])
    dataset, cache, exp = (os.path.join(work_dir, name) for name in ("nuscenes", "cache", "exp"))
    commands = {
        "dataset": ["-m", "dataset.NuscenesDataset.synthetic", "--out", dataset, "--samples_per_scene",
                    str(options.samples_per_scene or embedded["samples_per_scene"]), "--width", str(width),
                    "--height", str(height), "--seed", str(embedded["seed"])],
        "train": ["train.py", "--exp_id", "0", "--gpu_num", "0", *task_flags, "--dataset_dir", dataset, "--save_dir",
                  exp, "--cfg", f"data.{app_mode}.label_cache_dir={cache}",
                  *(["--num_epochs", str(options.num_epochs)] if options.num_epochs else []), *options.flags],
        "test": ["test.py", *task_flags, "--save_dir", exp, "--dataset_dir", dataset,
                 "--cfg", f"data.{app_mode}.label_cache_dir={cache}"]}
    seconds = {step: timed(step, command) for step, command in commands.items()}

    with open(os.path.join(exp, "results.csv"), newline="") as f:
        epochs = list(csv.DictReader(f))
    with open(os.path.join(exp, "test", "metrics.json")) as f:
        test = json.load(f)
    metric_names = solver_class(model_name).metric_names
    validated = [row for row in epochs if row.get(metric_names[0]) not in (None, "")]
    total = sum(seconds.values())
    print(f"recipe {options.recipe}; DIR: {options.work_dir or 'a new temporary folder, removed after'}")
    print(f"{'step':<9}{'s':>8}  command")
    for step, command in commands.items():
        print(f"{step:<9}{seconds[step]:>8.1f}  {shlex.join(['python', *command]).replace(work_dir, 'DIR')}")
    print(f"{'total':<9}{total:>8.1f}  ({total / 60:.1f} min)")
    print(f"epochs: {len(epochs)}")
    if validated:
        print(f"last validation (epoch {validated[-1]['epoch']}): {metric_cells(validated[-1], metric_names)}")
    print(f"test ({test['checkpoint']}, epoch {test['epoch']}): {metric_cells(test, metric_names)}"
          + (f"; {per_class}: {metric_cells(test[per_class], test[per_class])}" if per_class else ""))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", choices=list(RECIPES), default="detection")
    parser.add_argument("--num_epochs", type=int, default=None, help="train.py's --num_epochs (default: its own)")
    parser.add_argument("--samples_per_scene", type=int, default=None,
                        help="keyframes per scene of the dataset (default: data.json's embedded setting)")
    parser.add_argument("--jpeg_size", type=jpeg_size, default=None,
                        help="the dataset's image WxH in px (default: data.json's embedded setting)")
    parser.add_argument("--work_dir", default=None, help="a new or empty folder, kept (default: a temporary one)")
    add_results_dir(parser)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="more train.py flags, added last")
    options = parser.parse_args(argv)
    if options.work_dir and os.path.isdir(options.work_dir) and os.listdir(options.work_dir):
        parser.error(f"--work_dir {options.work_dir} is not empty: the recipe starts from nothing")
    work_dir = contextlib.nullcontext(options.work_dir) if options.work_dir else tempfile.TemporaryDirectory()
    # one results file per recipe: recipes.md for the quick start, recipes_bev.md
    results_name = "recipes" if options.recipe == "detection" else f"recipes_{options.recipe}"
    with recorded("recipes", argv, options.results_dir, results_name), work_dir as folder:
        os.makedirs(folder, exist_ok=True)
        run_recipe(options, os.path.abspath(folder))


if __name__ == "__main__":
    main()
