"""Shared fixtures and helpers: one small embedded dataset per test session, configuration dicts and flags
pointing at it, launchers, config sections and checkpoint tensors."""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import test as test_script
import train
from dataset.NuscenesDataset import synthetic
from models.Yolo.yolo import STRIDES
from utils.checkpoint import load_checkpoint
from utils.config import merge_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"samples_per_scene": 2, "width": 320, "height": 180, "seed": 0}  # 120 images, generated in a few seconds
with open(PROJECT_ROOT / "config" / "data.json") as data_file:
    NORMALIZE = json.load(data_file)["2DObjDet"]["normalize"]  # what the models take as their "normalize"


def pytest_addoption(parser):
    parser.addoption("--bench", action="store_true", help="also run the benchmarks' smoke tests (marked bench)")


def pytest_collection_modifyitems(config, items):
    """Without --bench, the benchmarks' smoke tests are skipped: a developer's run stays short, CI runs them all."""
    if config.getoption("--bench"):
        return
    skip = pytest.mark.skip(reason="a benchmark's smoke test: run with --bench")
    for item in items:
        if "bench" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory) -> str:
    """A small embedded nuScenes dataset (10 scenes x 2 keyframes x 6 cameras at 320x180). Read-only for tests."""
    root = tmp_path_factory.mktemp("embedded") / "nuscenes"
    synthetic.generate(str(root), **SMALL)
    return str(root)


@pytest.fixture
def make_args(tmp_path):
    """Build the merged configuration dict the detection loader takes, with the shared label cache."""

    def make(dataset_dir, **overrides) -> dict:
        data = {"image": {"w": 160, "h": 96}, **overrides.pop("data", {})}
        cache = shared_cache(dataset_dir) if dataset_dir else tmp_path / "label_cache"
        return task_args("2DObjDet", dataset_dir, cache, data, **overrides)

    return make


def task_args(app_mode, dataset_dir, cache_dir, data=None, **flags) -> dict:
    """The configuration dict a loader of `app_mode` takes: config/*.json merged ("inherit" resolved), its data
    section updated with `data` and its label cache in `cache_dir`, no augmentation unless flags say so."""
    args = merge_config({"app_mode": app_mode, "dataset_dir": dataset_dir, "val_ratio": 0.25,
                         "bool_apply_img_aug": 0, "cfg": []}, str(PROJECT_ROOT / "config"))
    args["data"][app_mode].update(copy.deepcopy({"label_cache_dir": str(cache_dir), **(data or {})}))
    return {**args, **flags}


def shared_cache(dataset_dir) -> str:
    """The label cache folder that the tests reading `dataset_dir` share: a cache is keyed by the dataset folder,
    split and label settings, so each is built once per session instead of once per test."""
    return os.path.join(os.path.dirname(dataset_dir), "label_cache")


def data_flags(dataset_dir, app_mode="2DObjDet") -> list:
    """The flags that point a run at `dataset_dir` and the session's label cache of it: train.py's, and test.py's
    and predict.py's, which take no paths from a checkpoint."""
    return ["--dataset_dir", dataset_dir, "--cfg", f"data.{app_mode}.label_cache_dir={shared_cache(dataset_dir)}"]


def task_flags(app_mode, model_name, dataset_dir, folder, *extra) -> list:
    """train.py flags of a tiny CPU run of a task on the small embedded dataset: 1 epoch, 2 cameras at 96x64, the
    experiment in `folder`, the shared label cache."""
    return ["--app_mode", app_mode, "--model_name", model_name, *data_flags(dataset_dir, app_mode),
            "--save_dir", str(folder / "exp"), "--num_epochs", "1", "--batch_size", "4", "--num_cores", "0",
            "--seed", "3", "--cfg", f"data.{app_mode}.image.w=96", "--cfg", f"data.{app_mode}.image.h=64",
            "--cfg", f'data.{app_mode}.cameras=["CAM_FRONT", "CAM_BACK"]', *extra]


@pytest.fixture
def train_and_test(embedded_dir, tmp_path):
    """run(app_mode, model_name, *flags, test_flags=()): a task trained for one epoch by train.py on the small
    embedded dataset (task_flags: 2 cameras at 96x64, batch 4, no worker processes; `flags` on top, e.g. --cfg
    overrides that shrink the model), then evaluated by test.py (`test_flags` on top). Returns the experiment folder:
    best.pt, last.pt, metrics.json (the validation's), training.log, curves.png, and under test/ test.py's
    metrics.json, the solver's files and pr_curves/."""

    def run(app_mode: str, model_name: str, *flags, test_flags=()):
        train.main(task_flags(app_mode, model_name, embedded_dir, tmp_path, *flags))
        test_script.main(["--app_mode", app_mode, "--model_name", model_name, "--save_dir", str(tmp_path / "exp"),
                          "--num_cores", "0", *data_flags(embedded_dir, app_mode), *test_flags])
        return tmp_path / "exp"

    return run


def tiny_flags(embedded_dir, folder, exp_dir="exp", *extra):
    """Command-line flags of a tiny 2-epoch detection run (task_flags) with a slim head, in folder/exp_dir."""
    return [*task_flags("2DObjDet", "Yolo", embedded_dir, folder, "--save_dir", str(folder / exp_dir),
                        "--num_epochs", "2"), "--cfg", "model.Yolo.fpn_channels=32", "--cfg", "model.Yolo.head_convs=1",
            *extra]


@pytest.fixture(scope="session")
def trained(embedded_dir, tmp_path_factory):
    """One tiny 2-epoch experiment, trained once for the tests that only read it; returns its folder. Scored at
    COCO's score threshold, 0.001, so that its evaluations have detections; losses logged every 2 steps."""
    folder = tmp_path_factory.mktemp("trained")
    train.main(tiny_flags(embedded_dir, folder, "exp", "--cfg", "model.Yolo.postprocess.score_threshold=0.001",
                          "--cfg", "config.train.log_every_steps=2"))
    return folder / "exp"


@pytest.fixture
def trained_copy(trained, tmp_path, embedded_dir):
    """A copy of the trained experiment that a test may change, and the flags that name it."""
    shutil.copytree(trained, tmp_path / "exp")
    return tmp_path / "exp", lambda *extra: tiny_flags(embedded_dir, tmp_path, "exp", *extra)


def state_tensors(path):
    state = load_checkpoint(path)
    return state, {**{f"model.{k}": v for k, v in state["model"].items()},
                   **{f"ema.{k}": v for k, v in state["ema"].items()}}


def launch(command: list, timeout: float = 300, check: bool = True, **env) -> subprocess.CompletedProcess:
    """Run a launcher (torchrun or one of the run_train_*.sh scripts) with 1 thread per process."""
    result = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT), **env})
    if check:
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def torchrun(*args, check: bool = True, **env) -> subprocess.CompletedProcess:
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args],
                  check=check, **env)


def config(name):
    """The Yolo section of config/<name>.json; for "model", with the resnet_fpn architecture these tests cover."""
    with open(PROJECT_ROOT / "config" / f"{name}.json") as f:
        section = json.load(f)["Yolo"]
    return {**section, "architecture": "resnet_fpn", "backbone": "resnet18"} if name == "model" else section


def grid_points(width, height):
    """Point centres (P, 2) and strides (P,) of the model's three levels, in the model's order."""
    points, strides = [], []
    for stride in STRIDES:
        y, x = torch.meshgrid(torch.arange(height // stride), torch.arange(width // stride), indexing="ij")
        points.append(torch.stack([x.flatten(), y.flatten()], 1).float().add(0.5).mul(stride))
        strides.append(torch.full((len(points[-1]),), float(stride)))
    return torch.cat(points), torch.cat(strides)
