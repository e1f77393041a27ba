"""Camera 3D detection on the embedded dataset, scored by the devkit (NDS, mAP, true-positive errors) against two
references on the same test split (mini_val): the ground truth itself, and a naive lift of the true 2D boxes.

    python -m bench.mono3d [--num_epochs N] [--samples_per_scene N] [--jpeg_size WxH] [--work_dir DIR]
                           [--results_dir bench/results] [--flags train.py flags ...]

Steps, each timed on the wall clock: the embedded dataset (data.json "3DObjDet" "embedded" settings, or
--samples_per_scene and --jpeg_size) in
DIR/nuscenes; `python train.py --app_mode 3DObjDet --model_name Mono3D --num_epochs N` (default 30) in DIR/exp;
`python test.py` with the same flags. Then, in this process, the references through the same scoring
(dataset/NuscenesDataset/detection_eval.py):
- ground truth: every annotation of the split as a detection (the devkit's velocity and attribute). Its mAP is the
  share of the 10 classes that the split holds within the devkit's class ranges;
- naive lifts: every box of the test split's 3D label cache (each box in the camera that holds its projected
  centre) at the centre of its true 2D box, with its true class and the training split's class means of size and
  observation angle, the class's most frequent attribute and no velocity; its depth the class's mean depth, or,
  second, the pinhole depth of its 2D box's height for the class-mean height. They know the 2D boxes exactly, so
  they are stronger baselines than a 2D detector's boxes lifted the same way.
Prints the table of the three, Mono3D's AP per class, and its training curve (per epoch: total loss, validation
NDS and mAP, seconds), and writes them to bench/results/mono3d.md.
"""

import argparse
import contextlib
import csv
import json
import os
import shlex
import tempfile

import numpy as np
import torch

from bench.loader import jpeg_size
from bench.recipes import timed
from bench.results import PROJECT_ROOT, add_results_dir, recorded
from dataset.NuscenesDataset.detection_eval import (
    MAX_BOXES_PER_SAMPLE,
    NuscenesDetectionScore,
    ground_truth_submission,
    submission,
)
from dataset.NuscenesDataset.loader_3d_obj_det import labels_3d, wrap_angle
from models.Mono3D.boxes3d import lift_boxes

METRICS = ("NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE")


def naive_lift(train: dict, test: dict, pinhole: bool) -> tuple:
    """(detections (D, 13) rows of detection_eval.DETECTION_COLUMNS, sample tokens they index): the test labels'
    boxes lifted from their 2D boxes' centres with the training labels' class means (module docstring); with
    `pinhole`, the depth from the 2D box's height instead: focal length (px) x class-mean height (m) / height (px)."""
    classes = train["box_class"]
    alpha = wrap_angle(train["box_yaw"] - np.arctan2(train["box_center"][:, 0], train["box_center"][:, 2]))
    means = {}
    for label in np.unique(classes):
        own = classes == label
        attributes = train["box_attribute"][own]
        attributes = attributes[attributes >= 0]
        means[label] = (train["box_center"][own, 2].mean(), train["box_size"][own].mean(0),
                        np.angle(np.exp(1j * alpha[own]).mean()),
                        np.bincount(attributes).argmax() if len(attributes) else -1)
    labels = test["box_class"]
    known = np.isin(labels, list(means))
    image, labels = test["box_image"][known], labels[known]
    depth, size, angle, attribute = (np.array([means[label][k] for label in labels]) for k in range(4))
    xyxy = test["box_xyxy"][known]
    centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2
    if pinhole:
        depth = test["image_intrinsic"][image, 1, 1] * size[:, 2] / np.maximum(xyxy[:, 3] - xyxy[:, 1], 1.0)
    center, yaw = lift_boxes(torch.from_numpy(centre), torch.from_numpy(depth), torch.from_numpy(angle),
                             torch.from_numpy(test["image_intrinsic"][image]),
                             torch.from_numpy(test["image_to_global"][image]))
    tokens, sample = np.unique(test["image_sample"][image], return_inverse=True)
    rows = np.column_stack([sample, center.numpy(), size.reshape(-1, 3), yaw.numpy(), np.zeros((len(labels), 2)),
                            np.ones(len(labels)), labels, attribute])
    rows = np.concatenate([rows[rows[:, 0] == s][:MAX_BOXES_PER_SAMPLE] for s in range(len(tokens))])
    return rows, [token.decode() for token in tokens]


def cells(values: dict) -> str:
    return " | ".join(f"{values[name]:.4f}" if values.get(name) is not None else "n/a" for name in METRICS)


def run(options, work_dir: str) -> None:
    with open(PROJECT_ROOT / "config" / "data.json") as f:
        cfg = json.load(f)["3DObjDet"]
    embedded = cfg["embedded"]
    width, height = options.jpeg_size or (embedded["width"], embedded["height"])
    dataset, cache, exp = (os.path.join(work_dir, name) for name in ("nuscenes", "cache", "exp"))
    task = ["--app_mode", "3DObjDet", "--model_name", "Mono3D"]
    data = ["--dataset_dir", dataset, "--cfg", f"data.3DObjDet.label_cache_dir={cache}"]
    commands = {
        "dataset": ["-m", "dataset.NuscenesDataset.synthetic", "--out", dataset, "--samples_per_scene",
                    str(options.samples_per_scene or embedded["samples_per_scene"]), "--width", str(width), "--height",
                    str(height), "--seed", str(embedded["seed"])],
        "train": ["train.py", *task, "--exp_id", "0", "--gpu_num", "0", *data, "--save_dir", exp, "--num_epochs",
                  str(options.num_epochs), *options.flags],
        "test": ["test.py", *task, "--save_dir", exp, *data]}
    seconds = {step: timed(step, command) for step, command in commands.items()}

    score = NuscenesDetectionScore(dataset, cfg["version"], cfg["splits"][cfg["version"]]["test"])
    all_tokens = score.split_tokens()
    with open(os.path.join(exp, "test", "metrics.json")) as f:
        mono3d = json.load(f)
    truth, _ = score(ground_truth_submission(score.nusc, score.split), all_tokens)
    train_labels, test_labels = (labels_3d(dataset, cfg["version"], cfg["splits"][cfg["version"]][mode], cfg, cache)
                                 for mode in ("train", "test"))
    naive = {}
    for pinhole in (False, True):
        rows, tokens = naive_lift(train_labels, test_labels, pinhole)
        naive[pinhole], _ = score(submission(rows, tokens, all_tokens), all_tokens)

    print(f"DIR: {options.work_dir or 'a new temporary folder, removed after'}")
    print(f"{'step':<9}{'s':>8}  command")
    for step, command in commands.items():
        print(f"{step:<9}{seconds[step]:>8.1f}  {shlex.join(['python', *command]).replace(work_dir, 'DIR')}")
    print(f"\ntest split {score.split} ({len(all_tokens)} samples), devkit detection_cvpr_2019:\n")
    print(f"| contender | {' | '.join(METRICS)} |\n|---|{'---|' * len(METRICS)}")
    print(f"| ground truth | {cells(truth)} |")
    print(f"| true 2D boxes, class-mean depth and size | {cells(naive[False])} |")
    print(f"| true 2D boxes, depth from their height (pinhole, class-mean height) | {cells(naive[True])} |")
    print(f"| Mono3D ({mono3d['checkpoint']}, epoch {mono3d['epoch']}) | {cells(mono3d)} |")
    print("\nAP per class (ground truth / class-mean depth / pinhole depth / Mono3D):")
    for name in truth["per_class_AP"]:
        print(f"  {name:<22}" + " / ".join(f"{values['per_class_AP'][name]:.3f}"
                                           for values in (truth, naive[False], naive[True], mono3d)))
    with open(os.path.join(exp, "results.csv"), newline="") as f:
        epochs = list(csv.DictReader(f))
    print("\ntraining curve (validation: the val scenes of mini_train):\n")
    print("| epoch | total loss | val NDS | val mAP | s |\n|---|---|---|---|---|")
    for row in epochs:
        print(f"| {row['epoch']} | {float(row['total_loss']):.3f} | {float(row['NDS']):.4f} | "
              f"{float(row['mAP']):.4f} | {float(row['time_s']):.1f} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_epochs", type=int, default=30, help="train.py's --num_epochs")
    parser.add_argument("--samples_per_scene", type=int, default=None,
                        help="keyframes per scene of the dataset (default: data.json's embedded setting)")
    parser.add_argument("--jpeg_size", type=jpeg_size, default=None,
                        help="the dataset's image WxH in px (default: data.json's embedded setting)")
    parser.add_argument("--work_dir", default=None, help="a new or empty folder, kept (default: a temporary one)")
    add_results_dir(parser)
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="more train.py flags, added last")
    options = parser.parse_args(argv)
    if options.work_dir and os.path.isdir(options.work_dir) and os.listdir(options.work_dir):
        parser.error(f"--work_dir {options.work_dir} is not empty: the benchmark starts from nothing")
    work_dir = contextlib.nullcontext(options.work_dir) if options.work_dir else tempfile.TemporaryDirectory()
    with recorded("mono3d", argv, options.results_dir), work_dir as folder:
        os.makedirs(folder, exist_ok=True)
        run(options, os.path.abspath(folder))


if __name__ == "__main__":
    main()
