"""Detection quality at an equal CPU training budget, by a protocol that each contender's own experts would accept:
DSTorch's Yolo (dstorch: the resnet_fpn architecture; dstorch_csp_pan: csp_pan), torchvision's FCOS and RetinaNet
(resnet18-FPN, no weights) and Ultralytics YOLOv8n (from its yaml, no weights), each trained for the same wall-clock
time with the same torch threads on the same data, then scored by the same COCO code on the test split, which none
of them trained or was tuned on.

    python -m bench.quality --setup_ultralytics   # once: .cache/venv-ultralytics (for its OpenCV)
    python -m bench.quality --sweep               # each contender's learning rate and warm-up, picked on val
    python -m bench.quality                       # the protocol: budgets x seeds x contenders, interleaved
    python -m bench.quality --table               # the table of the runs done so far, without running any
    python -m bench.quality --budgets 10 --seeds 0 --contenders dstorch_csp_pan,ablation_no_dfl  # an ablation

Each invocation writes what it prints (the setup's output aside; with --table, the table alone) to
<results_dir>/quality.md (--results_dir, default bench/results), replacing the previous invocation's: after running
the protocol in parts, `--table` writes the table of all of them.

Every run writes its result (<work_dir>/runs/<budget>min/<contender>_seed<k>.json, sweep points under runs/sweep/)
the moment it ends, and every invocation skips the runs whose results exist: stop at any time and run the same
command again to go on. --contenders, --seeds and --budgets choose a part of the protocol. The ablations of csp_pan
(ABLATIONS: one part changed each, by config) run only when --contenders names them.

Protocol:
- Data: an embedded nuScenes set of --samples_per_scene keyframes per scene (generated once into --work_dir);
  train on the train split of mini_train as train.py splits it, sweep on its val split, score on mini_val;
  input 320x192 (INPUT_SIZE; YOLOv8n: imgsz 320, letterboxed), all 6 cameras.
- Compute: the same torch threads (--threads, all cores by default) for everyone. DSTorch, FCOS and RetinaNet
  read through DSTorch's loader with --num_cores worker(s); Ultralytics with cache='ram' (it forces workers=0 on the
  CPU). Each run logs its optimizer steps and training images/s.
- Recipes: each contender starts from its own recipe for a short run (RECIPES) with an EMA of the weights for all;
  --sweep tries the same grid around it for every contender (learning rate x --sweep_lr_scales, warm-up x
  --sweep_warmup_scales, seed 0, --sweep_minutes each) and keeps the best mAP on val; the protocol uses the swept
  recipe where the sweep is complete, the starting one otherwise (its table says which).
- Scoring: detections scoring >= 0.001, at most 100 per image, for all; YOLOv8n through Ultralytics' own validator
  (its multi-label NMS, boxes mapped back to original pixels), then everyone through utils.coco_eval on the same
  ground truth.
- Runs: --seeds (2 by default) per contender and --budgets (10 and 40 minutes), interleaved: budget by budget, seed
  by seed, the contenders in an order rotated by the seed. The table reports mean ± half the range over seeds.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader

from bench.model import platform_args, torchvision_detector
from bench.results import add_results_dir, recorded
from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.loader_2d_obj_det import DatasetLoader
from helper import load_solver
from models.Yolo.boxes import coco_detection_array
from optimization.base import BaseSolver
from utils.coco_eval import coco_metrics, coco_results_array, load_coco
from utils.config import CONFIG_SECTIONS, apply_override
from utils.io import atomic_write_json
from utils.optim import build_scheduler

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV = PROJECT_ROOT / ".cache" / "venv-ultralytics"
CONTENDERS = ("dstorch", "dstorch_csp_pan", "fcos", "retinanet", "yolov8n")
# DSTorch's Yolo runs as --cfg overrides: the resnet_fpn architecture (dstorch), csp_pan, and csp_pan's ablations,
# each with one part changed (not in the protocol's default contenders; choose them with --contenders)
CSP_PAN = ("model.Yolo.architecture=csp_pan", "model.Yolo.backbone=csp")
DSTORCH_VARIANTS = {"dstorch": ("model.Yolo.architecture=resnet_fpn", "model.Yolo.backbone=resnet18"),
                    "dstorch_csp_pan": CSP_PAN,
                    "ablation_nearest_assignment": (*CSP_PAN, "loss.Yolo.aligned.assignment=nearest"),
                    "ablation_no_dfl": (*CSP_PAN, "loss.Yolo.aligned.weights.dfl=0.0"),
                    "ablation_binary_class_targets": (*CSP_PAN, "loss.Yolo.aligned.iou_aware=false"),
                    "ablation_resnet18_backbone": (*CSP_PAN[:1], "model.Yolo.backbone=resnet18")}
ABLATIONS = tuple(name for name in DSTORCH_VARIANTS if name.startswith("ablation_"))
# Each contender's recipe for minutes of training on a CPU, before the sweep: peak learning rate (AdamW) and warm-up
# (PyTorch contenders: OneCycle's share of the steps; YOLOv8n: epochs, Ultralytics' unit). DSTorch (both
# architectures): its config defaults; FCOS and RetinaNet: AdamW at a from-scratch detector's usual rate with
# DSTorch's schedule; YOLOv8n: AdamW lr0 0.002 and a 0.5-epoch warm-up, nbs = batch, mosaic off, scale 0.25
# (quality_ultralytics.py).
RECIPES = {**{name: {"lr": 3e-3, "warmup": 0.15} for name in DSTORCH_VARIANTS},
           "fcos": {"lr": 1e-3, "warmup": 0.15}, "retinanet": {"lr": 1e-3, "warmup": 0.15},
           "yolov8n": {"lr": 2e-3, "warmup": 0.5}}
# The schedule's length is planned after step CALIBRATION_STEPS from the time of steps 3-10 (not the slow first
# ones), so that it exists early, then planned again at each share of the budget in REPLAN_AT from the steps timed
# since the previous point (REPLAN_FROM for the first, after the first epoch read the images from a cold page
# cache): step times drift during a run (on this project's 2-core machine, a 40-minute run planned from its first
# steps only trained 25 minutes; planned once more at 10 %, 36). A run that trains less than FULL_BUDGET of its
# budget is flagged in its result and in the table.
WARMUP_STEPS, CALIBRATION_STEPS = 2, 10
REPLAN_FROM, REPLAN_AT, FULL_BUDGET = 0.05, (0.1, 0.3, 0.5, 0.7, 0.9), 0.95
SCORE_THRESHOLD, MAX_DETECTIONS = 0.001, 100
INPUT_SIZE = (320, 192)  # W, H px: the protocol's, whatever config/data.json's default (the quick start's) is
METRICS = ("mAP", "AP50", "AP_small", "AP_medium", "AP_large")


def bench_args(dataroot: Path, work_dir: Path, extra: list) -> dict:
    flags = ["--dataset_dir", str(dataroot), "--cfg", f"data.2DObjDet.label_cache_dir={work_dir / 'labels'}",
             "--cfg", f"data.2DObjDet.image.w={INPUT_SIZE[0]}", "--cfg", f"data.2DObjDet.image.h={INPUT_SIZE[1]}",
             "--cfg", f"model.Yolo.postprocess.score_threshold={SCORE_THRESHOLD}",
             "--cfg", f"model.Yolo.postprocess.max_detections={MAX_DETECTIONS}", *extra]
    return platform_args(flags)


def schedule_length(steps_done: int, elapsed_s: float, step_s: float, budget_s: float) -> int:
    """Steps done plus those that fit in the rest of the budget at `step_s` seconds per step (2% kept for slack)."""
    return steps_done + max(1, int((budget_s - elapsed_s) * 0.98 / step_s))


def train_within(budget_s: float, loader: DataLoader, step, on_length_known) -> tuple:
    """Call step(batch) over epochs of `loader` until the budget is spent or the schedule ends;
    on_length_known(total_steps, steps_done) plans the schedule after CALIBRATION_STEPS and again at each share of
    the budget in REPLAN_AT. Returns (steps done, seconds)."""
    start, steps, total_steps, window, replans = time.monotonic(), 0, None, None, list(REPLAN_AT)

    def plan(now: float) -> int:
        """The schedule's length from the step time since the window's start, which moves to now."""
        nonlocal window
        step_s = (now - start - window[0]) / max(steps - window[1], 1)
        planned = schedule_length(steps, now - start, step_s, budget_s)
        on_length_known(planned, steps)
        window = (now - start, steps)
        return planned

    while True:
        for batch in loader:
            step(batch)
            steps += 1
            now = time.monotonic()
            if steps == WARMUP_STEPS:
                window = (now - start, steps)
            elif steps == CALIBRATION_STEPS:
                total_steps = plan(now)
                window = None  # the next window opens at REPLAN_FROM of the budget
            elif steps > CALIBRATION_STEPS and window is None and now - start >= REPLAN_FROM * budget_s:
                window = (now - start, steps)
            elif window is not None and replans and steps > CALIBRATION_STEPS and now - start >= replans[0] * budget_s:
                replans = [share for share in replans if share * budget_s > now - start]
                total_steps = plan(now)
            if now - start >= budget_s or (total_steps is not None and steps >= total_steps):
                return steps, now - start


def images_and_targets(batch: dict) -> tuple:
    """A collated batch as torchvision's detectors take it: a list of I images (3, H, W), 0-1 floats, and a list of
    targets {boxes (n, 4) in input px, labels (n,) with 0 kept for the background}."""
    images = list(batch["images"].flatten(0, 1).float() / 255)
    targets = [{"boxes": batch["boxes"][batch["box_image_index"] == i],
                "labels": batch["labels"][batch["box_image_index"] == i] + 1} for i in range(len(images))]
    return images, targets


def recipe_args(args: dict, recipe: dict, seed: int) -> dict:
    """The configuration of a PyTorch contender's run: its learning rate and OneCycle warm-up, the seed."""
    return {**args, "learning_rate": recipe["lr"], "pct_start": recipe["warmup"], "seed": seed}


def train_dstorch(args: dict, train_set, loader: DataLoader, budget_s: float) -> tuple:
    """The Solver as train.py drives it (train step, then LR step, EMA); its schedule spans the steps that fit in
    the budget. Returns (predict, steps, seconds)."""
    solver = load_solver(args, device=torch.device("cpu"), class_names=train_set.class_names, steps_per_epoch=1)
    solver.mode_selection(True)
    return predictor_after(solver, lambda batch: solver.train(batch), loader, budget_s,
                           lambda model: lambda images: model.predict(images[:, None]))


def train_torchvision(kind: str, args: dict, train_set, loader: DataLoader, budget_s: float) -> tuple:
    """FCOS or RetinaNet trained by DSTorch's BaseSolver (AdamW, OneCycle, gradient clipping, EMA), through
    torchvision's own losses. Returns (predict, steps, seconds)."""
    width, height = train_set.input_size
    normalize = args["data"][args["app_mode"]]["normalize"]  # the detector's transform normalizes, as DSTorch's
    model = torchvision_detector(kind, width, height, sized_for_input=True, image_mean=normalize["mean"],
                                 image_std=normalize["std"], score_thresh=SCORE_THRESHOLD,
                                 detections_per_img=MAX_DETECTIONS)
    trainer = BaseSolver(model, args, torch.device("cpu"), steps_per_epoch=1)
    model.train()

    def step(batch):
        trainer.step({"total_loss": sum(model(*images_and_targets(batch)).values())})

    def predict_with(trained):
        def predict(images):
            found = trained(list(images.float() / 255))
            counts = torch.tensor([len(f["scores"]) for f in found])
            return {"boxes": torch.cat([f["boxes"] for f in found]), "scores": torch.cat([f["scores"] for f in found]),
                    "labels": torch.cat([f["labels"] for f in found]) - 1,
                    "image_index": torch.repeat_interleave(torch.arange(len(found)), counts)}
        return predict

    return predictor_after(trainer, step, loader, budget_s, predict_with)


def predictor_after(trainer: BaseSolver, train_step, loader: DataLoader, budget_s: float, predict_with) -> tuple:
    """Train with train_step(batch) for the budget, the OneCycle schedule built over the steps that fit once they
    are known (before: the schedule built with the solver, not stepped, sets the starting learning rate). Returns
    (predict_with(the EMA model in eval mode), steps, seconds)."""
    args = trainer.args

    def step(batch):
        train_step(batch)
        if "first_plan_at" in schedule:
            trainer.learning_rate_step()

    def on_length_known(total_steps, steps_done):
        # a schedule built over the new length, then stepped to where the one it replaces stood (one scheduler
        # step per training step after the first plan)
        trainer.scheduler = build_scheduler(args["lr_schd_type"], trainer.optimizer, total_steps, 1, args,
                                          args["config"]["schedulers"])
        for _ in range(steps_done - schedule.setdefault("first_plan_at", steps_done)):
            trainer.scheduler.step()

    schedule = {}
    steps, seconds = train_within(budget_s, loader, step, on_length_known)
    return predict_with(trainer.evaluated_model()), steps, seconds


@torch.no_grad()
def detections_of(predict, dataset) -> np.ndarray:
    """The (N, 7) COCO detections of predict(images (I, 3, H, W)) -> {boxes (D, 4) input px, scores (D,), labels
    (D,), image_index (D,)} (flat over the I images, as Yolo.predict) on every image of `dataset`, original px."""
    loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=dataset.collate_fn)
    arrays = [np.zeros((0, 7))]
    for batch in loader:
        arrays.append(coco_detection_array(predict(batch["images"].flatten(0, 1)), batch, dataset.input_size))
    return np.concatenate(arrays)


def score(detections: np.ndarray, dataset) -> dict:
    """The metrics of COCO results, an (N, 7) array (utils.coco_eval.coco_metrics), on the images of `dataset`."""
    metrics, _ = coco_metrics(load_coco(dataset.coco_ground_truth()), detections, dataset.image_ids.tolist())
    return {name: metrics[name] for name in METRICS}


def write_yolo_split(dataset, folder: Path) -> list:
    """Ultralytics' layout for a split: images/<image id>.jpg (links to the dataset's files) and labels/<image
    id>.txt (class cx cy w h, normalized); returns the image paths."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    paths = []
    files, sizes = dataset.image_files.reshape(-1), dataset.image_sizes.reshape(-1, 2).tolist()
    for k, image_id in enumerate(dataset.image_ids.tolist()):
        name = f"{image_id:06d}"  # Ultralytics' validator reads a numeric file name back as the COCO image id
        link = folder / "images" / f"{name}.jpg"
        if not link.exists():
            link.symlink_to(os.path.join(dataset.dataroot, files[k].decode()))
        width, height = sizes[k]
        boxes = dataset.boxes[dataset.box_start[k]:dataset.box_start[k + 1]].tolist()
        labels = dataset.labels[dataset.box_start[k]:dataset.box_start[k + 1]].tolist()
        lines = [f"{label} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} {(x2 - x1) / width:.6f} "
                 f"{(y2 - y1) / height:.6f}" for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True)]
        (folder / "labels" / f"{name}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        paths.append(str(link))
    return paths


def run_yolov8n(data: dict, recipe: dict, seed: int, budget_s: float, split: str, threads: int, run_dir: Path
                ) -> dict:
    """Train and validate in the Ultralytics environment (bench/quality_ultralytics.py); returns its report
    {detections (COCO results of `split`), epochs, steps, train_s, images, ultralytics}."""
    python = VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"bench.quality: {VENV} is missing: run with --setup_ultralytics once (or leave yolov8n out "
                         f"of --contenders)")
    folder = data["work_dir"] / "yolo"
    if not (folder / "data.yaml").exists():
        for name in ("train", "val", "test"):
            write_yolo_split(data[name], folder / name)
        names = "".join(f"  {index}: {name}\n" for index, name in enumerate(data["train"].class_names))
        (folder / "data.yaml").write_text(f"path: {folder}\ntrain: train/images\nval: val/images\ntest: test/images\n"
                                          f"names:\n{names}")
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"data": str(folder / "data.yaml"), "budget_s": budget_s, "imgsz": max(data["train"].input_size),
            "batch": data["batch_images"], "lr0": recipe["lr"], "warmup_epochs": recipe["warmup"], "seed": seed,
            "threads": threads, "split": split, "conf": SCORE_THRESHOLD, "max_det": MAX_DETECTIONS,
            "project": str(run_dir), "out": str(run_dir / "report.json")}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(folder / "config")}
    subprocess.run([str(python), str(PROJECT_ROOT / "bench" / "quality_ultralytics.py"), str(run_dir / "spec.json")],
                   check=True, env=env, cwd=run_dir)
    return json.loads((run_dir / "report.json").read_text())


def run_one(name: str, recipe: dict, seed: int, budget_s: float, split: str, data: dict, threads: int,
            run_dir: Path) -> dict:
    """One training run of a contender and its metrics on `split` (val or test), with the budget and whether the
    training used at least FULL_BUDGET of it."""
    result = contender_run(name, recipe, seed, budget_s, split, data, threads, run_dir)
    return {**result, "budget_s": budget_s, "full_budget": result["train_s"] >= FULL_BUDGET * budget_s}


def contender_run(name: str, recipe: dict, seed: int, budget_s: float, split: str, data: dict, threads: int,
                  run_dir: Path) -> dict:
    if name == "yolov8n":
        report = run_yolov8n(data, recipe, seed, budget_s, split, threads, run_dir)
        metrics = score(coco_results_array(report["detections"]), data[split])
        return {"steps": report["steps"], "epochs": report["epochs"], "train_s": report["train_s"],
                "images_per_s": report["images"] / max(report["train_s"], 1e-9), "threads": report["threads"],
                "versions": {"ultralytics": report["ultralytics"], "torch": report["torch"]}, **metrics}
    args = recipe_args(data["args"], recipe, seed)
    torch.manual_seed(seed)
    loader = DataLoader(data["train"], batch_size=args["batch_size"], shuffle=True, drop_last=True,
                        num_workers=args["num_cores"], collate_fn=data["train"].collate_fn,
                        persistent_workers=args["num_cores"] > 0, generator=torch.Generator().manual_seed(seed))
    if name in DSTORCH_VARIANTS:
        args = copy.deepcopy(args)
        for override in DSTORCH_VARIANTS[name]:
            apply_override(args, override, CONFIG_SECTIONS)
        predict, steps, seconds = train_dstorch(args, data["train"], loader, budget_s)
    else:
        predict, steps, seconds = train_torchvision(name, args, data["train"], loader, budget_s)
    metrics = score(detections_of(predict, data[split]), data[split])
    return {"steps": steps, "epochs": steps / len(loader), "train_s": seconds,
            "images_per_s": steps * data["batch_images"] / seconds, "threads": torch.get_num_threads(),
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__}, **metrics}


def sweep(contenders: list, data: dict, options) -> None:
    """Every contender at every grid point around its recipe (seed 0, --sweep_minutes), scored on val; the best
    mAP becomes <work_dir>/runs/sweep/<contender>.json once the contender's grid is complete."""
    folder = data["work_dir"] / "runs" / "sweep"
    grid = [(lr, warmup) for lr in options.sweep_lr_scales for warmup in options.sweep_warmup_scales]
    for lr_scale, warmup_scale in grid:  # grid point by grid point, every contender in turn
        for name in contenders:
            recipe = {"lr": RECIPES[name]["lr"] * lr_scale, "warmup": RECIPES[name]["warmup"] * warmup_scale}
            tag = f"{name}_lr{lr_scale:g}_warmup{warmup_scale:g}"
            if not (folder / f"{tag}.json").exists():  # written at the end of the run: a killed one is run again
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_json(str(folder / f"{tag}.json"), {"recipe": recipe, **run_one(
                    name, recipe, 0, options.sweep_minutes * 60, "val", data, options.threads, folder / tag)})
            result = json.loads((folder / f"{tag}.json").read_text())
            print(f"sweep {tag}: val mAP {cell(result['mAP'])}", flush=True)
    for name in contenders:
        points = [json.loads((folder / f"{name}_lr{lr:g}_warmup{warmup:g}.json").read_text()) for lr, warmup in grid]
        best = max(points, key=lambda point: point["mAP"] or 0.0)
        atomic_write_json(str(folder / f"{name}.json"), {"recipe": best["recipe"], "val_mAP": best["mAP"],
                                                         "minutes": options.sweep_minutes})
        print(f"sweep {name}: lr {best['recipe']['lr']:g}, warm-up {best['recipe']['warmup']:g} (val mAP "
              f"{cell(best['mAP'])})", flush=True)


def chosen_recipe(name: str, work_dir: Path) -> tuple:
    """(recipe, where it comes from): the sweep's choice when the contender's sweep is complete, else RECIPES."""
    path = work_dir / "runs" / "sweep" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())["recipe"], "swept"
    return RECIPES[name], "not swept"


def protocol(contenders: list, data: dict, options) -> None:
    """Budgets x seeds x contenders, interleaved, each run's result stored as it ends (done ones skipped)."""
    for minutes in options.budgets:
        for seed in options.seeds:
            shift = seed % len(contenders)
            for name in contenders[shift:] + contenders[:shift]:  # no contender always runs first
                recipe, source = chosen_recipe(name, data["work_dir"])
                path = data["work_dir"] / "runs" / f"{minutes:g}min" / f"{name}_seed{seed}.json"
                if not path.exists():  # written at the end of the run: a killed one is run again
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(str(path), {"recipe": recipe, "recipe_source": source, **run_one(
                        name, recipe, seed, minutes * 60, "test", data, options.threads, path.with_suffix(""))})
                result = json.loads(path.read_text())
                print(f"{minutes:g} min, {name}, seed {seed}: {result['steps']} steps, "
                      f"{result['images_per_s']:.1f} img/s, mAP {cell(result['mAP'])}{budget_flag(result)}",
                      flush=True)


def table(contenders: list, work_dir: Path, budgets: list) -> None:
    """Mean ± half the range over the seeds done, per budget and contender (in CONTENDERS' order: no ranking)."""
    for minutes in budgets:
        run_dir = work_dir / "runs" / f"{minutes:g}min"
        print(f"\n{minutes:g} min of training each\n{'contender':<30}{'seeds':>6}{'recipe':>10}{'steps':>7}"
              f"{'img/s':>7}{'threads':>8}" + "".join(f"{name:>16}" for name in METRICS))
        for name in contenders:
            results = [json.loads(path.read_text()) for path in sorted(run_dir.glob(f"{name}_seed*.json"))]
            if not results:
                continue
            columns = [f"{spread([r[key] for r in results]):>16}" for key in METRICS]
            print(f"{name:<30}{len(results):>6}{results[0]['recipe_source']:>10}"
                  f"{np.mean([r['steps'] for r in results]):>7.0f}{np.mean([r['images_per_s'] for r in results]):>7.1f}"
                  f"{results[0]['threads']:>8}" + "".join(columns) + "".join(map(budget_flag, results)))
        versions = {key: value for path in run_dir.glob("*.json") for key, value in
                    json.loads(path.read_text())["versions"].items()} if run_dir.exists() else {}
        print("versions: " + ", ".join(f"{key} {value}" for key, value in sorted(versions.items())))


def budget_flag(result: dict) -> str:
    """A warning after a run that trained less than FULL_BUDGET of its budget (empty otherwise; a result without
    "full_budget" counts as full)."""
    if result.get("full_budget", True):
        return ""
    return f"  [trained {result['train_s']:.0f} s of {result['budget_s']:.0f}: not comparable]"


def spread(values: list) -> str:
    """mean ± half the range, or n/a where a metric is undefined (no ground truth of that size)."""
    if any(value is None for value in values):
        return "n/a"
    return f"{np.mean(values):.4f}±{(max(values) - min(values)) / 2:.4f}"


def cell(value) -> str:
    """A metric as printed: 4 decimals, or n/a where undefined."""
    return "n/a" if value is None else f"{value:.4f}"


def setup_ultralytics() -> None:
    """A virtual environment that sees this machine's torch (so nothing large is downloaded) and has ultralytics,
    with the opencv-python it requires (and the numpy >= 2 that needs) in front of the system's
    opencv-python-headless and numpy < 2 (nuscenes-devkit's): two OpenCV distributions in one environment
    overwrite each other's cv2."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", "ultralytics>=8.4,<8.5"], check=True)


def numbers(kind, text: str) -> list:
    return [kind(part) for part in text.split(",") if part]


def benchmark(contenders: list, work_dir: Path, options) -> None:
    """The data, the sweep if asked, the protocol and the table."""
    torch.set_num_threads(options.threads)
    dataroot = work_dir / f"nuscenes_{options.samples_per_scene}"
    if not dataroot.exists():
        synthetic.generate(str(dataroot), samples_per_scene=options.samples_per_scene)
    args = bench_args(dataroot, work_dir, options.flags)
    data = {"args": args, "work_dir": work_dir, "train": DatasetLoader(args, mode="train")}
    for split in ("val", "test"):
        data[split] = DatasetLoader({**args, "bool_apply_img_aug": 0}, mode=split)
    data["batch_images"] = args["batch_size"] * data["train"].image_files.shape[1]
    width, height = data["train"].input_size
    print(f"train: {len(data['train'])} samples x {data['train'].image_files.shape[1]} cameras; val: "
          f"{len(data['val'])}; test: {len(data['test'])}; input {width}x{height}; {options.threads} torch threads",
          flush=True)
    if options.sweep:
        sweep(contenders, data, options)
    protocol(contenders, data, options)
    table(contenders, work_dir, options.budgets)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--budgets", default="10,40", help="training minutes of each run, comma-separated")
    parser.add_argument("--seeds", default="0,1", help="seeds, comma-separated")
    parser.add_argument("--sweep", action="store_true", help="run the learning-rate/warm-up sweep on val first")
    parser.add_argument("--sweep_minutes", type=float, default=5.0, help="training minutes of each sweep point")
    parser.add_argument("--sweep_lr_scales", default="0.5,1,2", help="sweep: learning rates x these")
    parser.add_argument("--sweep_warmup_scales", default="0.5,1", help="sweep: warm-ups x these")
    parser.add_argument("--table", action="store_true", help="print the table of the stored runs and stop")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every contender")
    parser.add_argument("--samples_per_scene", type=int, default=20)
    parser.add_argument("--setup_ultralytics", action="store_true", help="create .cache/venv-ultralytics first")
    parser.add_argument("--work_dir", default=str(PROJECT_ROOT / ".cache" / "bench_quality"),
                        help="where the dataset, label caches, Ultralytics' files and the runs' results go")
    add_results_dir(parser)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="train.py flags for every PyTorch contender's data and loader (e.g. --num_cores 1)")
    options = parser.parse_args(argv)
    contenders = options.contenders.split(",")
    unknown = sorted(set(contenders) - set(CONTENDERS + ABLATIONS))
    if unknown:
        parser.error(f"--contenders {','.join(unknown)}: choose from {','.join(CONTENDERS + ABLATIONS)}")
    for key, kind in (("budgets", float), ("seeds", int), ("sweep_lr_scales", float), ("sweep_warmup_scales", float)):
        try:
            setattr(options, key, numbers(kind, getattr(options, key)))
        except ValueError:
            parser.error(f"--{key} {getattr(options, key)}: comma-separated numbers, e.g. --budgets 10,40 --seeds 0,1")
        if not getattr(options, key) or min(getattr(options, key)) < (0 if key == "seeds" else 1e-9):
            parser.error(f"--{key}: give at least one, {'none negative' if key == 'seeds' else 'all positive'}")
    if options.threads < 1 or options.sweep_minutes <= 0:
        parser.error("--threads and --sweep_minutes must be positive")
    work_dir = Path(options.work_dir)
    if options.setup_ultralytics and not options.table:
        setup_ultralytics()
    with recorded("quality", argv, options.results_dir):
        if options.table:
            table(contenders, work_dir, options.budgets)
        else:
            benchmark(contenders, work_dir, options)


if __name__ == "__main__":
    main()
