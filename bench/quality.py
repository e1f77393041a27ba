"""Detection quality at an equal training budget: DSTorch's Yolo Solver, torchvision's FCOS and RetinaNet
(resnet18-FPN, no weights) and Ultralytics YOLOv8n (from its yaml, no weights), each trained for the same
wall-clock time on this CPU on the same embedded dataset, then scored by the same COCO code on the same test
split, which none of them trained on.

    python -m bench.quality [--minutes 20] [--contenders dstorch,fcos,retinanet,yolov8n] [--setup_ultralytics]

Data: an embedded nuScenes set of --samples_per_scene keyframes per scene (default 20: twice the quick start's),
generated once into --work_dir (.cache/bench_quality); training on the train split of mini_train as train.py splits it,
testing on mini_val; input 320x192 (config/data.json), all 6 cameras.

The three PyTorch contenders train on the same batches (DSTorch's loader and augmentation, 2 samples x 6 cameras,
one loader worker) with the same optimizer and schedule (AdamW, OneCycle, gradient clipping, config defaults):
DSTorch through its Solver (EMA included), FCOS and RetinaNet through torchvision's own losses. The schedule
spans the steps that fit in the budget, estimated from the speed of steps 3-10. YOLOv8n trains with Ultralytics'
own recipe and augmentation (imgsz 320, 12 images per batch, `time=` the budget); Ultralytics needs numpy 2,
which nuscenes-devkit's numpy<2 excludes, so it runs in its own virtual environment (.cache/venv-ultralytics,
created by --setup_ultralytics on top of this machine's torch) through bench/quality_ultralytics.py.
Every contender keeps detections scoring >= 0.05, at most 100 per image (COCO's limit).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.model import platform_args, torchvision_detector
from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.loader_2d_obj_det import DatasetLoader
from helper import load_solver
from utils.coco_eval import coco_detection_array, coco_metrics, coco_results_array, load_coco
from utils.optim import build_optimizer, build_scheduler

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV = PROJECT_ROOT / ".cache" / "venv-ultralytics"
CONTENDERS = ("dstorch", "fcos", "retinanet", "yolov8n")
WARMUP_STEPS, CALIBRATION_STEPS = 2, 10  # steps 3-10 are timed to fix the schedule's length (not the slow first ones)
SCORE_THRESHOLD, MAX_DETECTIONS = 0.05, 100


def bench_args(dataroot: Path, work_dir: Path, extra: list) -> dict:
    flags = ["--dataset_dir", str(dataroot), "--cfg", f"data.2DObjDet.label_cache_dir={work_dir / 'labels'}", *extra]
    return platform_args(flags)


def schedule_length(steps_done: int, elapsed_s: float, step_s: float, budget_s: float) -> int:
    """Steps done plus those that fit in the rest of the budget at `step_s` seconds per step (2% kept for slack)."""
    return steps_done + max(1, int((budget_s - elapsed_s) * 0.98 / step_s))


def train_within(budget_s: float, loader: DataLoader, step, on_length_known) -> int:
    """Call step(batch) over epochs of `loader` until the budget is spent or the schedule ends; after
    CALIBRATION_STEPS, on_length_known(total_steps) fixes the schedule. Returns the steps done."""
    start, steps, total_steps, calibration_start = time.monotonic(), 0, None, None
    while True:
        for batch in loader:
            step(batch)
            steps += 1
            now = time.monotonic()
            if steps == WARMUP_STEPS:
                calibration_start = now
            if steps == CALIBRATION_STEPS:
                step_s = (now - calibration_start) / (CALIBRATION_STEPS - WARMUP_STEPS)
                total_steps = schedule_length(steps, now - start, step_s, budget_s)
                on_length_known(total_steps)
            if now - start >= budget_s or (total_steps is not None and steps >= total_steps):
                return steps


def images_and_targets(batch: dict) -> tuple:
    """A collated batch as torchvision's detectors take it: a list of I images (3, H, W) and a list of targets
    {boxes (n, 4) in input px, labels (n,) with 0 kept for the background}."""
    images = list(batch["images"].flatten(0, 1))
    targets = [{"boxes": batch["boxes"][batch["box_image_index"] == i],
                "labels": batch["labels"][batch["box_image_index"] == i] + 1} for i in range(len(images))]
    return images, targets


def train_dstorch(args: dict, train_set, loader: DataLoader, budget_s: float) -> tuple:
    """The Solver as train.py drives it (train step, then LR step); its schedule is built per step, over the steps
    that fit in the budget. Returns (predict, steps)."""
    solver = load_solver(args, device=torch.device("cpu"), class_names=train_set.class_names, steps_per_epoch=1)
    solver.mode_selection(True)
    scheduled = {"on": False}

    def step(batch):
        solver.train(batch)
        if scheduled["on"]:
            solver.learning_rate_step()

    def on_length_known(total_steps):
        solver.parts.scheduler = solver.parts.new_scheduler(total_steps)  # steps_per_epoch=1: one "epoch" per step
        scheduled["on"] = True

    steps = train_within(budget_s, loader, step, on_length_known)
    model = solver.parts.evaluated_model()
    model.eval()
    return (lambda images: model.predict(images[:, None])), steps


def train_torchvision(kind: str, args: dict, train_set, loader: DataLoader, budget_s: float) -> tuple:
    width, height = train_set.input_size
    # the loader normalized the images already: the detector's transform must not normalize again
    model = torchvision_detector(kind, width, height, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                                 score_thresh=SCORE_THRESHOLD, detections_per_img=MAX_DETECTIONS)
    optimizer = build_optimizer(args["optimizer_type"], model.parameters(), args["learning_rate"], args["weight_decay"])
    # as in the Solver, a schedule built now (and not stepped) sets the starting learning rate of the calibration steps
    build_scheduler(args["lr_schd_type"], optimizer, args["num_epochs"], 1, args, args["config"]["schedulers"])
    schedule = {"scheduler": None}
    model.train()

    def step(batch):
        images, targets = images_and_targets(batch)
        losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args["grad_clip"])
        optimizer.step()
        if schedule["scheduler"] is not None:
            schedule["scheduler"].step()

    def on_length_known(total_steps):
        schedule["scheduler"] = build_scheduler(args["lr_schd_type"], optimizer, total_steps, 1, args,
                                                args["config"]["schedulers"])

    steps = train_within(budget_s, loader, step, on_length_known)
    model.eval()

    def predict(images):
        found = model(list(images))
        counts = torch.tensor([len(f["scores"]) for f in found])
        return {"boxes": torch.cat([f["boxes"] for f in found]), "scores": torch.cat([f["scores"] for f in found]),
                "labels": torch.cat([f["labels"] for f in found]) - 1,
                "image_index": torch.repeat_interleave(torch.arange(len(found)), counts)}

    return predict, steps


@torch.no_grad()
def evaluate(predict, test_set) -> dict:
    """COCO metrics of predict(images (I, 3, H, W)) -> {boxes (D, 4) input px, scores (D,), labels (D,),
    image_index (D,)} (flat over the I images, as Yolo.predict) on every image of the test split, in original
    pixels."""
    loader = DataLoader(test_set, batch_size=1, num_workers=1, collate_fn=test_set.collate_fn)
    arrays = [np.zeros((0, 7))]
    for batch in loader:
        arrays.append(coco_detection_array(predict(batch["images"].flatten(0, 1)), batch, test_set.input_size))
    return score(np.concatenate(arrays), test_set)


def score(detections: np.ndarray, test_set) -> dict:
    """The metrics of COCO results, an (N, 7) array (utils.coco_eval.coco_metrics), on the test split."""
    metrics, _ = coco_metrics(load_coco(test_set.coco_ground_truth()), detections, test_set.image_ids.tolist())
    return {name: metrics[name] for name in ("mAP", "AP50", "AP_small", "AP_medium", "AP_large")}


def write_yolo_split(dataset, folder: Path) -> list:
    """Ultralytics' layout for a split: images/<name>.jpg (links to the dataset's files) and labels/<name>.txt
    (class cx cy w h, normalized); returns the image paths."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    paths = []
    files, sizes = dataset.image_files.reshape(-1), dataset.image_sizes.reshape(-1, 2).tolist()
    for k, image_id in enumerate(dataset.image_ids.tolist()):
        name = f"{image_id:06d}"
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


def train_yolov8n(train_set, test_set, budget_s: float, work_dir: Path) -> tuple:
    """Train and predict in the Ultralytics environment; returns (detections in COCO format, epochs)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"bench.quality: {VENV} is missing: run with --setup_ultralytics once (or leave yolov8n out "
                         f"of --contenders)")
    folder = work_dir / "yolo"
    write_yolo_split(train_set, folder / "train")
    test_paths = write_yolo_split(test_set, folder / "test")
    names = "".join(f"  {index}: {name}\n" for index, name in enumerate(train_set.class_names))
    (folder / "data.yaml").write_text(f"path: {folder}\ntrain: train/images\nval: test/images\nnames:\n{names}")
    spec = {"data": str(folder / "data.yaml"), "budget_s": budget_s, "imgsz": max(train_set.input_size),
            "batch": 2 * train_set.image_files.shape[1], "project": str(folder / "runs"),
            "test_images": {path: image_id for path, image_id in zip(test_paths, test_set.image_ids, strict=True)},
            "conf": SCORE_THRESHOLD, "max_det": MAX_DETECTIONS, "out": str(folder / "detections.json")}
    (folder / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(folder / "config")}
    subprocess.run([str(python), str(PROJECT_ROOT / "bench" / "quality_ultralytics.py"), str(folder / "spec.json")],
                   check=True, env=env, cwd=folder)
    result = json.loads((folder / "detections.json").read_text())
    return result["detections"], result["epochs"]


def setup_ultralytics() -> None:
    """A virtual environment that sees this machine's torch (so nothing large is downloaded) and has ultralytics
    with its numpy 2 in front of the system's numpy 1."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", "ultralytics>=8.4,<8.5"], check=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget of each contender")
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--samples_per_scene", type=int, default=20)
    parser.add_argument("--setup_ultralytics", action="store_true", help="create .cache/venv-ultralytics first")
    parser.add_argument("--work_dir", default=str(PROJECT_ROOT / ".cache" / "bench_quality"),
                        help="where the dataset, label caches, Ultralytics' files and results.json go")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="train.py flags for every contender's data and schedule (e.g. --cfg ...)")
    options = parser.parse_args(argv)
    contenders = options.contenders.split(",")
    unknown = sorted(set(contenders) - set(CONTENDERS))
    if unknown:
        parser.error(f"--contenders {','.join(unknown)}: choose from {','.join(CONTENDERS)}")
    if options.setup_ultralytics:
        setup_ultralytics()

    work_dir = Path(options.work_dir)
    dataroot = work_dir / f"nuscenes_{options.samples_per_scene}"
    if not dataroot.exists():
        synthetic.generate(str(dataroot), samples_per_scene=options.samples_per_scene)
    args = bench_args(dataroot, work_dir, options.flags)
    train_set = DatasetLoader(args, mode="train")
    test_set = DatasetLoader({**args, "bool_apply_img_aug": 0}, mode="test")
    budget_s = options.minutes * 60
    width, height = train_set.input_size
    print(f"train: {len(train_set)} samples x {train_set.image_files.shape[1]} cameras; test: {len(test_set)} samples; "
          f"input {width}x{height}; budget {options.minutes:g} min each on {os.cpu_count()} CPU cores", flush=True)

    results = {}
    for name in contenders:
        torch.manual_seed(args["seed"])
        loader = DataLoader(train_set, batch_size=args["batch_size"], shuffle=True, drop_last=True,
                            num_workers=args["num_cores"], collate_fn=train_set.collate_fn,
                            persistent_workers=args["num_cores"] > 0)
        start = time.monotonic()
        if name == "yolov8n":
            detections, epochs = train_yolov8n(train_set, test_set, budget_s, work_dir)
            trained = f"{epochs} epochs"
            metrics = score(coco_results_array(detections), test_set)
        else:
            if name == "dstorch":
                predict, steps = train_dstorch(args, train_set, loader, budget_s)
            else:
                predict, steps = train_torchvision(name, args, train_set, loader, budget_s)
            trained = f"{steps} steps ({steps / len(loader):.1f} epochs)"
            metrics = evaluate(predict, test_set)
        results[name] = {"trained": trained, "wall_s": time.monotonic() - start, **metrics}
        print(f"{name}: {trained}, {results[name]['wall_s']:.0f} s with evaluation, mAP {cell(metrics['mAP'])}, "
              f"AP50 {cell(metrics['AP50'])}", flush=True)
    (work_dir / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\n{'contender':<11}{'trained':>26}{'mAP':>8}{'AP50':>8}{'AP_S':>8}{'AP_M':>8}{'AP_L':>8}")
    for name, result in results.items():  # in the order they ran: the conditions differ, so no ranking
        print(f"{name:<11}{result['trained']:>26}" + "".join(f"{cell(result[key]):>8}" for key in (
            "mAP", "AP50", "AP_small", "AP_medium", "AP_large")))


def cell(value) -> str:
    """A metric as printed: 4 decimals, or n/a where undefined (no ground truth of that size)."""
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
