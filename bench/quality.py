"""Detection quality by a protocol that each contender's own experts would accept: DSTorch's Yolo (dstorch: the
resnet_fpn architecture; dstorch_csp_pan: csp_pan), torchvision's FCOS and RetinaNet (resnet18-FPN, no weights) and
Ultralytics YOLOv8n (from its yaml, no weights), each trained on the same data with the same torch threads, then
scored by the same COCO code on the test split, which none of them trained or was tuned on.

    python -m bench.quality --setup_ultralytics   # once: .cache/venv-ultralytics (for its OpenCV)
    python -m bench.quality --sweep               # each contender's recipe picked on val, then the protocol
    python -m bench.quality                       # the protocol: budgets x seeds x contenders, interleaved
    python -m bench.quality --table               # the table of the runs done so far, without running any
    python -m bench.quality --epochs 14 --seeds 0 --contenders dstorch_csp_pan,ablation_no_dfl  # an ablation

Each invocation writes what it prints (the setup's output aside; with --table, the table alone) to
<results_dir>/quality.md (--results_dir, default bench/results), replacing the previous invocation's: after running
the protocol in parts, `--table` writes the table of all of them.

Every run writes its result (<work_dir>/runs/<budget>/<contender>_seed<k>.json, sweep points under runs/sweep/) the
moment it ends, with its provenance (PROVENANCE), and every invocation skips the runs whose results exist and come
from this code version (the last commit that changed the code, not counting results and Markdown files, and a hash
of uncommitted changes to it), settings (run_settings) and, for the protocol's runs, the recipe chosen now: stop at
any time and run the same command again to go on. Another result is stale: it is run again, and the table leaves
it out and names it. --contenders, --seeds, --epochs and --budgets choose a part of the protocol. The ablations of
csp_pan (ABLATIONS: one part changed each, by config) run only when --contenders names them.

Protocol:
- Data: an embedded nuScenes set of --samples_per_scene keyframes per scene (generated once into --work_dir);
  train on the train split of mini_train as train.py splits it, sweep on its val split, score on mini_val;
  input 320x192 (INPUT_SIZE; YOLOv8n: imgsz 320, letterboxed squares in training), all 6 cameras.
- Equal optimizer steps, the primary comparison (--epochs, default 14 and 42, the quick start's and 3x): the same
  number of optimizer steps on batches of the same images (a DSTorch batch of --batch_size samples is that many x 6
  images; YOLOv8n's batch is those images, nbs = batch), each schedule annealed over exactly those steps (PyTorch
  contenders: OneCycle, stepped every step; YOLOv8n: epochs to match, cos_lr to lr0 x lrf, stepped every epoch as
  Ultralytics does), an EMA of the weights for all with one update per step. Equal wall-clock time (--budgets,
  minutes, none by default) is a third view: the schedule is planned from the step time and YOLOv8n trains with
  time=.
- Speed: each run's training images/s; the runs of a seed are interleaved (the contenders in an order rotated by
  the seed), so the images/s ratio of two contenders within a seed is measured in one run of the protocol.
- Compute: the same torch threads (--threads, all cores by default) for everyone. DSTorch, FCOS and RetinaNet
  read through DSTorch's loader with --num_cores worker(s); Ultralytics with cache='ram' (it forces workers=0 on the
  CPU).
- Recipes: each contender starts from its own recipe (RECIPES); --sweep runs the same grid around it for every
  contender at the first --epochs budget on val (learning rate x --sweep_lr_scales, warm-up x
  --sweep_warmup_scales, seed 0), then for YOLOv8n mosaic (closed for the last 10 % of epochs) and rect training at
  the best of that grid, and keeps the best val mAP; the protocol uses the swept recipe where the sweep is complete
  and of this code version, the starting one otherwise (its table says which; a run of another recipe is stale).
- Scoring: detections scoring >= 0.001, at most 100 per image, for all; YOLOv8n through Ultralytics' own validator
  (its multi-label NMS, boxes mapped back to original pixels) rect (its default) and letterboxed into squares, its
  "NMS time limit" warnings counted; then everyone through utils.coco_eval on the same ground truth, with the
  detections per image reported.
- The table: per budget, each seed's run of each contender, then mean ± half the range over the seeds, and the
  images/s of each contender over the first contender's within each seed.
"""

import argparse
import copy
import datetime
import hashlib
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
from bench.results import add_results_dir, git, recorded
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
# Each contender's recipe before the sweep: peak learning rate (AdamW) and warm-up (PyTorch contenders: OneCycle's
# share of the steps; YOLOv8n: epochs, Ultralytics' unit, round(epochs x steps per epoch) steps). DSTorch (both
# architectures): its config defaults; FCOS and RetinaNet: AdamW at a from-scratch detector's usual rate with
# DSTorch's schedule; YOLOv8n: AdamW lr0 0.002 (momentum 0.9 and no bias warm-up, as its optimizer="auto" sets for
# AdamW) and a 0.5-epoch warm-up, nbs = batch, mosaic and rect off, scale 0.25 (quality_ultralytics.py), lrf its
# default.
RECIPES = {**{name: {"lr": 3e-3, "warmup": 0.15} for name in DSTORCH_VARIANTS},
           "fcos": {"lr": 1e-3, "warmup": 0.15}, "retinanet": {"lr": 1e-3, "warmup": 0.15},
           "yolov8n": {"lr": 2e-3, "warmup": 0.5, "mosaic": False, "rect": False}}
YOLO_LRF = 0.01  # Ultralytics' default final learning rate, x lr0
CLOSE_MOSAIC_SHARE = 0.1  # mosaic off for the last 10 % of epochs: Ultralytics' close_mosaic 10 of its 100 epochs
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
# what every run records beside its numbers, so that a table never mixes commits or days unseen
PROVENANCE = ("code_version", "clean", "date", "load_average", "threads", "steps", "images_per_s")
# what a run's numbers depend on: the tracked files but the results files and the Markdown docs (git pathspecs), so
# that committing results, or a README's quote of them, keeps the stored runs current
CODE_PATHS = (".", ":(exclude)bench/results", ":(exclude)*.md")


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


def train_dstorch(args: dict, train_set, loader: DataLoader, budget: dict) -> dict:
    """The Solver as train.py drives it (train step, then LR step, EMA); its schedule spans the budget's steps.
    Returns predictor_after's dict."""
    solver = load_solver(args, device=torch.device("cpu"), class_names=train_set.class_names, steps_per_epoch=1)
    solver.mode_selection(True)
    return predictor_after(solver, lambda batch: solver.train(batch), loader, budget,
                           lambda model: lambda images: model.predict(images[:, None]))


def train_torchvision(kind: str, args: dict, train_set, loader: DataLoader, budget: dict) -> dict:
    """FCOS or RetinaNet trained by DSTorch's BaseSolver (AdamW, OneCycle, gradient clipping, EMA), through
    torchvision's own losses. Returns predictor_after's dict."""
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

    return predictor_after(trainer, step, loader, budget, predict_with)


def predictor_after(trainer: BaseSolver, train_step, loader: DataLoader, budget: dict, predict_with) -> dict:
    """Train with train_step(batch) for the budget: {"epochs": E} (E x len(loader) steps, the OneCycle schedule
    built over exactly those) or {"minutes": M} (the schedule built over the steps that fit once they are known;
    before, the schedule built with the solver, not stepped, sets the starting learning rate). Returns {predict:
    predict_with(the EMA model in eval mode), steps, train_s, ema_updates}."""
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
    if "epochs" in budget:
        total_steps = round(budget["epochs"] * len(loader))
        on_length_known(total_steps, 0)
        steps, seconds = train_steps(total_steps, loader, step)
    else:
        steps, seconds = train_within(budget["minutes"] * 60, loader, step, on_length_known)
    return {"predict": predict_with(trainer.evaluated_model()), "steps": steps, "train_s": seconds,
            "ema_updates": trainer.ema_updates}


def train_steps(total_steps: int, loader: DataLoader, step) -> tuple:
    """Call step(batch) over epochs of `loader` for exactly total_steps steps. Returns (steps, seconds)."""
    start, steps = time.monotonic(), 0
    while steps < total_steps:
        for batch in loader:
            step(batch)
            steps += 1
            if steps == total_steps:
                break
    return steps, time.monotonic() - start


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


def run_yolov8n(data: dict, recipe: dict, seed: int, budget: dict, split: str, threads: int, run_dir: Path
                ) -> dict:
    """Train and validate in the Ultralytics environment (bench/quality_ultralytics.py), its output kept in
    run_dir/ultralytics.log; returns its report (bench/quality_ultralytics.py)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"bench.quality: {VENV} is missing: run with --setup_ultralytics once (or leave yolov8n out "
                         f"of --contenders)")
    folder = data["work_dir"] / f"yolo_{settings_key(data['settings'])}"  # the data these settings make
    if not (folder / "data.yaml").exists():
        for name in ("train", "val", "test"):
            write_yolo_split(data[name], folder / name)
        names = "".join(f"  {index}: {name}\n" for index, name in enumerate(data["train"].class_names))
        (folder / "data.yaml").write_text(f"path: {folder}\ntrain: train/images\nval: val/images\ntest: test/images\n"
                                          f"names:\n{names}")
    run_dir.mkdir(parents=True, exist_ok=True)
    epochs = budget.get("epochs")
    spec = {"data": str(folder / "data.yaml"), "epochs": epochs, "budget_s": budget.get("minutes", 0) * 60,
            "imgsz": max(data["train"].input_size), "batch": data["batch_images"], "lr0": recipe["lr"],
            "lrf": YOLO_LRF, "warmup_epochs": recipe["warmup"], "mosaic": recipe["mosaic"],
            "close_mosaic": max(1, round(CLOSE_MOSAIC_SHARE * (epochs or 30))), "rect": recipe["rect"], "seed": seed,
            "threads": threads, "split": split, "conf": SCORE_THRESHOLD, "max_det": MAX_DETECTIONS,
            "project": str(run_dir), "out": str(run_dir / "report.json")}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(folder / "config")}
    log = run_dir / "ultralytics.log"
    with open(log, "w") as output:
        finished = subprocess.run([str(python), str(PROJECT_ROOT / "bench" / "quality_ultralytics.py"),
                                   str(run_dir / "spec.json")], env=env, cwd=run_dir, stdout=output, stderr=output)
    if finished.returncode:
        raise SystemExit(f"bench.quality: YOLOv8n's run failed (exit status {finished.returncode}): see {log}")
    return json.loads((run_dir / "report.json").read_text())


def run_one(name: str, recipe: dict, seed: int, budget: dict, split: str, data: dict, threads: int,
            run_dir: Path) -> dict:
    """One training run of a contender and its metrics on `split` (val or test), with the budget, whether an
    equal-time run used at least FULL_BUDGET of it, and its provenance."""
    load_before = os.getloadavg()[0]
    result = contender_run(name, recipe, seed, budget, split, data, threads, run_dir)
    full = "minutes" not in budget or result["train_s"] >= FULL_BUDGET * budget["minutes"] * 60
    now = code_version()
    if now != data["version"]:
        raise SystemExit(f"bench.quality: the checkout changed during the run ({data['version']} when it started, "
                         f"{now} now): its result is not stored; run the command again")
    return {**result, "budget": budget, "full_budget": full, "code_version": data["version"],
            "clean": "dirty" not in data["version"], "settings": data["settings"], "invocation": data["invocation"],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def code_version(root: Path = PROJECT_ROOT) -> str:
    """The last commit that changed the code (CODE_PATHS), 10 hex digits; with uncommitted changes to it,
    " (dirty <hash of the diff>)", so that two dirty trees match only when their changes do; "unknown" outside a
    git checkout."""
    try:
        last = git("log", "-1", "--format=%H", "--", *CODE_PATHS, root=root)[:10]
        diff = git("diff", "HEAD", "--", *CODE_PATHS, root=root)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return last + (f" (dirty {hashlib.sha256(diff.encode()).hexdigest()[:8]})" if diff else "")


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def contender_run(name: str, recipe: dict, seed: int, budget: dict, split: str, data: dict, threads: int,
                  run_dir: Path) -> dict:
    images = len(data[split].image_ids)
    if name == "yolov8n":
        report = run_yolov8n(data, recipe, seed, budget, split, threads, run_dir)
        letterboxed = score(coco_results_array(report["detections_letterboxed"]), data[split])
        return {"steps": report["steps"], "ema_updates": report["ema_updates"], "epochs": report["epochs"],
                "train_s": report["train_s"], "images_per_s": report["images"] / max(report["train_s"], 1e-9),
                "threads": report["threads"], "detections_per_image": len(report["detections"]) / images,
                "nms_time_limit": report["nms_time_limit"],
                "letterboxed": {**letterboxed, "detections_per_image": len(report["detections_letterboxed"]) / images},
                "versions": {"ultralytics": report["ultralytics"], "torch": report["torch"]},
                **score(coco_results_array(report["detections"]), data[split])}
    args = recipe_args(data["args"], recipe, seed)
    torch.manual_seed(seed)
    loader = DataLoader(data["train"], batch_size=args["batch_size"], shuffle=True, drop_last=True,
                        num_workers=args["num_cores"], collate_fn=data["train"].collate_fn,
                        persistent_workers=args["num_cores"] > 0, generator=torch.Generator().manual_seed(seed))
    if name in DSTORCH_VARIANTS:
        args = copy.deepcopy(args)
        for override in DSTORCH_VARIANTS[name]:
            apply_override(args, override, CONFIG_SECTIONS)
        trained = train_dstorch(args, data["train"], loader, budget)
    else:
        trained = train_torchvision(name, args, data["train"], loader, budget)
    detections = detections_of(trained["predict"], data[split])
    return {"steps": trained["steps"], "ema_updates": trained["ema_updates"], "epochs": trained["steps"] / len(loader),
            "train_s": trained["train_s"], "images_per_s": trained["steps"] * data["batch_images"] / trained["train_s"],
            "threads": torch.get_num_threads(), "detections_per_image": len(detections) / images,
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
            **score(detections, data[split])}


def budget_label(budget: dict) -> str:
    """A budget's folder name: "14ep" (equal steps: 14 epochs) or "10min" (equal time)."""
    return f"{budget['epochs']:g}ep" if "epochs" in budget else f"{budget['minutes']:g}min"


def budget_name(budget: dict) -> str:
    return f"{budget['epochs']:g} epochs" if "epochs" in budget else f"{budget['minutes']:g} min"


def stored(path: Path, data: dict, budget: dict | None = None, recipe: dict | None = None) -> dict | None:
    """The result stored at `path` if it exists and can stand beside this invocation's (staleness), else None (to
    be run again)."""
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if staleness(result, data, budget, recipe) is None else None


def staleness(result: dict, data: dict, budget: dict | None = None, recipe: dict | None = None) -> str | None:
    """Why a stored result cannot stand beside this invocation's (None if it can): another code version or other
    settings than data's, or, where given, another budget or recipe (a sweep has chosen another since)."""
    if result.get("code_version") != data["version"]:
        return f"code version {result.get('code_version', 'not recorded')}"
    if result.get("settings") != data["settings"]:
        return f"settings {result.get('settings')}"
    if budget is not None and result.get("budget") != budget:
        return f"budget {result.get('budget')}"
    if recipe is not None and result.get("recipe") != recipe:
        return f"recipe {result.get('recipe')}, not the chosen {recipe}"
    return None


def sweep(contenders: list, data: dict, options) -> None:
    """Every contender at every grid point around its recipe (seed 0, the first --epochs budget, or --sweep_minutes
    of equal time without one), scored on val, then YOLOv8n with mosaic and with rect training at its best grid
    point; the best val mAP becomes <work_dir>/runs/sweep/<contender>.json once the contender's points are done."""
    budget = {"epochs": options.epochs[0]} if options.epochs else {"minutes": options.sweep_minutes}
    grid = [(lr, warmup) for lr in options.sweep_lr_scales for warmup in options.sweep_warmup_scales]
    points = {name: [] for name in contenders}
    for lr_scale, warmup_scale in grid:  # grid point by grid point, every contender in turn
        for name in contenders:
            recipe = {**RECIPES[name], "lr": RECIPES[name]["lr"] * lr_scale,
                      "warmup": RECIPES[name]["warmup"] * warmup_scale}
            points[name].append(sweep_point(name, f"{name}_lr{lr_scale:g}_warmup{warmup_scale:g}", recipe, budget,
                                            data, options))
    if "yolov8n" in contenders:  # its augmentation choices, at its best learning rate and warm-up
        best = max(points["yolov8n"], key=lambda point: point["mAP"] or 0.0)
        for option in ("mosaic", "rect"):
            points["yolov8n"].append(sweep_point("yolov8n", f"{best['tag']}_{option}", {**best["recipe"], option: True},
                                                 budget, data, options))
    for name in contenders:
        best = max(points[name], key=lambda point: point["mAP"] or 0.0)
        atomic_write_json(str(data["work_dir"] / "runs" / "sweep" / f"{name}.json"), {
            "recipe": best["recipe"], "tag": best["tag"], "val_mAP": best["mAP"], "budget": budget,
            "code_version": data["version"], "settings": data["settings"]})
        print(f"sweep {name}: {best['tag']} (val mAP {cell(best['mAP'])})", flush=True)


def sweep_point(name: str, tag: str, recipe: dict, budget: dict, data: dict, options) -> dict:
    """One point of the sweep, run unless stored from this code version."""
    path = data["work_dir"] / "runs" / "sweep" / f"{tag}.json"
    result = stored(path, data, budget)
    if result is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        result = {"recipe": recipe, "tag": tag, **run_one(name, recipe, 0, budget, "val", data, options.threads,
                                                          path.with_suffix(""))}
        atomic_write_json(str(path), result)
    print(f"sweep {tag}: val mAP {cell(result['mAP'])}, {result['steps']} steps", flush=True)
    return result


def chosen_recipe(name: str, data: dict) -> tuple:
    """(recipe, where it comes from): the sweep's choice when the contender's sweep is complete and of this code
    version and settings (at whichever budget it ran), else RECIPES."""
    choice = stored(data["work_dir"] / "runs" / "sweep" / f"{name}.json", data)
    return (choice["recipe"], "swept") if choice else (RECIPES[name], "not swept")


def budgets_of(options) -> list:
    return [{"epochs": epochs} for epochs in options.epochs] + [{"minutes": minutes} for minutes in options.budgets]


def protocol(contenders: list, data: dict, options) -> None:
    """Budgets x seeds x contenders, interleaved, each run's result stored as it ends (those of this code version
    skipped)."""
    for budget in budgets_of(options):
        for seed in options.seeds:
            shift = seed % len(contenders)
            for name in contenders[shift:] + contenders[:shift]:  # no contender always runs first
                recipe, source = chosen_recipe(name, data)
                path = data["work_dir"] / "runs" / budget_label(budget) / f"{name}_seed{seed}.json"
                result = stored(path, data, budget, recipe)
                if result is None:  # written at the end of the run: a killed one is run again
                    path.parent.mkdir(parents=True, exist_ok=True)
                    result = {"recipe": recipe, "recipe_source": source, **run_one(
                        name, recipe, seed, budget, "test", data, options.threads, path.with_suffix(""))}
                    atomic_write_json(str(path), result)
                print(f"{budget_name(budget)}, {name}, seed {seed}: {result['steps']} steps, "
                      f"{result['images_per_s']:.1f} img/s, mAP {cell(result['mAP'])}{budget_flag(result)}",
                      flush=True)


def table(contenders: list, budgets: list, data: dict) -> None:
    """Per budget: each seed's run of each contender (those that can stand beside data's code version, settings and
    chosen recipes only; the others are named as stale), their images/s over the first contender's run of the same
    seed (marked * when the two come from different invocations), then mean ± half the range over the seeds, per
    contender in CONTENDERS' order (no ranking), each contender's recipe, and what differs where it should not
    (steps, threads)."""
    recipes = {name: chosen_recipe(name, data)[0] for name in contenders}
    for budget in budgets:
        run_dir = data["work_dir"] / "runs" / budget_label(budget)
        kind = "equal optimizer steps" if "epochs" in budget else "equal wall-clock time"
        print(f"\n{budget_name(budget)} of training each ({kind}); test split; code {data['version']}\n"
              f"{'contender':<30}{'seed':>5}{'recipe':>10}{'steps':>7}{'EMA n':>7}{'img/s':>7}{'ratio':>7}"
              f"{'load':>11}{'det/img':>8}" + "".join(f"{name:>10}" for name in METRICS))
        runs, stale = {}, []
        for path in sorted(run_dir.glob("*_seed*.json")):
            name, seed = path.stem.rsplit("_seed", 1)
            result = json.loads(path.read_text())
            if name not in contenders:
                continue
            why = staleness(result, data, budget, recipes[name])
            if why:
                stale.append(f"{path.name} ({why})")
            else:
                runs.setdefault(name, {})[int(seed)] = result
        reference = next((name for name in contenders if name in runs), None)
        for name in (name for name in contenders if name in runs):
            for seed, result in sorted(runs[name].items()):
                base = runs[reference].get(seed)
                ratio = "n/a" if base is None else f"{result['images_per_s'] / base['images_per_s']:.2f}" + (
                    "*" if result["invocation"] != base["invocation"] else "")
                load = "/".join(f"{value:.1f}" for value in result["load_average"])
                print(f"{name:<30}{seed:>5}{result['recipe_source']:>10}{result['steps']:>7}{result['ema_updates']:>7}"
                      f"{result['images_per_s']:>7.1f}{ratio:>7}{load:>11}{result['detections_per_image']:>8.1f}"
                      + "".join(f"{cell(result[key]):>10}" for key in METRICS) + budget_flag(result)
                      + ("" if result["clean"] else "  [tree not clean]"))
            results = list(runs[name].values())
            print(f"{name + ' (mean ± half range)':<45}" + "".join(f"  {key} {spread([r[key] for r in results])}"
                                                              for key in METRICS[:3]))
            if "letterboxed" in results[0]:
                print(f"{name + ' scored letterboxed (squares)':<45}" + "".join(
                    f"  {key} {spread([r['letterboxed'][key] for r in results])}" for key in METRICS[:3]))
                limits = {key: sum(r["nms_time_limit"][key] for r in results) for key in results[0]["nms_time_limit"]}
                print(f"{name}: 'NMS time limit' warnings: " + ", ".join(f"{key} {n}" for key, n in limits.items()))
            print(f"{name}: recipe {results[0]['recipe']}")
        for key in ("steps", "threads"):
            values = {result[key] for seeds in runs.values() for result in seeds.values()}
            if len(values) > 1 and (key == "threads" or "epochs" in budget):
                print(f"{key} differ between the runs: {sorted(values)}")
        if reference:
            print(f"ratio: images/s over {reference}'s in the same seed's run of the protocol (* another invocation)")
        if stale:
            print("stale (left out; the protocol runs them again): " + ", ".join(stale))
        versions = {key: value for seeds in runs.values() for result in seeds.values()
                    for key, value in result["versions"].items()}
        print("versions: " + ", ".join(f"{key} {value}" for key, value in sorted(versions.items())))


def budget_flag(result: dict) -> str:
    """A warning after an equal-time run that trained less than FULL_BUDGET of its budget (empty otherwise)."""
    if result.get("full_budget", True):
        return ""
    return f"  [trained {result['train_s']:.0f} s of {result['budget']['minutes'] * 60:.0f}: not comparable]"


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


def benchmark_data(options, work_dir: Path) -> dict:
    """The protocol's data (generated once into work_dir): {args, work_dir, train, val, test (the loaders),
    batch_images}."""
    dataroot = work_dir / f"nuscenes_{options.samples_per_scene}"
    if not dataroot.exists():
        synthetic.generate(str(dataroot), samples_per_scene=options.samples_per_scene)
    args = bench_args(dataroot, work_dir, options.flags)
    data = {"args": args, "work_dir": work_dir, "train": DatasetLoader(args, mode="train")}
    for split in ("val", "test"):
        data[split] = DatasetLoader({**args, "bool_apply_img_aug": 0}, mode=split)
    data["batch_images"] = args["batch_size"] * data["train"].image_files.shape[1]
    width, height = data["train"].input_size
    print(f"train: {len(data['train'])} samples x {data['train'].image_files.shape[1]} cameras, batches of "
          f"{data['batch_images']} images; val: {len(data['val'])}; test: {len(data['test'])}; input {width}x{height}; "
          f"{options.threads} torch threads", flush=True)
    return data


def benchmark(contenders: list, work_dir: Path, options) -> None:
    """The data, the sweep if asked, the protocol and the table."""
    torch.set_num_threads(options.threads)
    data = {**benchmark_data(options, work_dir), "version": code_version(), "settings": run_settings(options),
            "invocation": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if options.epochs and "yolov8n" in contenders and len(data["train"]) % data["args"]["batch_size"]:
        raise SystemExit(f"bench.quality: equal steps need the {len(data['train'])} training samples to be a multiple "
                         f"of --batch_size {data['args']['batch_size']} (YOLOv8n keeps a last partial batch, DSTorch's "
                         f"loader drops it): change --samples_per_scene or --batch_size")
    if options.sweep:
        sweep(contenders, data, options)
    protocol(contenders, data, options)
    table(contenders, budgets_of(options), data)


def run_settings(options) -> dict:
    """What, beside the code, makes a stored result comparable: the data, the flags and the threads."""
    return {"samples_per_scene": options.samples_per_scene, "flags": options.flags, "threads": options.threads}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--epochs", default="14,42",
                        help="equal steps: training epochs of each run (x the steps of an epoch), comma-separated")
    parser.add_argument("--budgets", default="", help="equal time: training minutes of each run, comma-separated")
    parser.add_argument("--seeds", default="0,1", help="seeds, comma-separated")
    parser.add_argument("--sweep", action="store_true", help="run the learning-rate/warm-up sweep on val first")
    parser.add_argument("--sweep_minutes", type=float, default=5.0,
                        help="training minutes of each sweep point when --epochs is empty")
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
    for key, kind in (("epochs", int), ("budgets", float), ("seeds", int), ("sweep_lr_scales", float),
                      ("sweep_warmup_scales", float)):
        try:
            setattr(options, key, numbers(kind, getattr(options, key)))
        except ValueError:
            parser.error(f"--{key} {getattr(options, key)}: comma-separated numbers, e.g. --epochs 14,42 --seeds 0,1")
        values = getattr(options, key)
        optional = key in ("epochs", "budgets")  # one of the two may be empty
        if min(values, default=1) < (0 if key == "seeds" else 1e-9) or (not values and not optional):
            parser.error(f"--{key}: give at least one, {'none negative' if key == 'seeds' else 'all positive'}")
    if not options.epochs and not options.budgets:
        parser.error("--epochs and --budgets are both empty: give at least one budget, e.g. --epochs 14")
    if options.threads < 1 or options.sweep_minutes <= 0:
        parser.error("--threads and --sweep_minutes must be positive")
    work_dir = Path(options.work_dir)
    if options.setup_ultralytics and not options.table:
        setup_ultralytics()
    with recorded("quality", argv, options.results_dir):
        if options.table:
            table(contenders, budgets_of(options),
                  {"work_dir": work_dir, "version": code_version(), "settings": run_settings(options)})
        else:
            benchmark(contenders, work_dir, options)


if __name__ == "__main__":
    main()
