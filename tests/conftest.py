"""Shared fixtures and helpers: one small embedded dataset per test session, configuration dicts and flags
pointing at it, launchers, config sections and checkpoint tensors."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dataset.NuscenesDataset import synthetic
from models.Yolo.yolo import STRIDES
from utils.checkpoint import load_checkpoint

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
    """Build the merged configuration dict the loader takes, with the label cache in the test's tmp folder."""

    def make(dataset_dir, **overrides) -> dict:
        with open(PROJECT_ROOT / "config" / "data.json") as f:
            data = json.load(f)
        cfg = data["2DObjDet"]
        cfg["label_cache_dir"] = str(tmp_path / "label_cache")
        cfg["image"] = {"w": 160, "h": 96}
        for key, value in overrides.pop("data", {}).items():
            cfg[key] = copy.deepcopy(value)
        args = {"app_mode": "2DObjDet", "dataset_dir": dataset_dir, "val_ratio": 0.25, "bool_apply_img_aug": 0,
                "data": data}
        args.update(overrides)
        return args

    return make


def tiny_flags(embedded_dir, folder, exp_dir="exp", *extra):
    """Command-line flags of a tiny CPU run on the small embedded dataset: 2 cameras at 96x64, a slim head."""
    return ["--dataset_dir", embedded_dir, "--save_dir", str(folder / exp_dir), "--num_epochs", "2",
            "--batch_size", "4", "--num_cores", "0", "--seed", "3",
            "--cfg", "data.2DObjDet.image.w=96", "--cfg", "data.2DObjDet.image.h=64",
            "--cfg", 'data.2DObjDet.cameras=["CAM_FRONT", "CAM_BACK"]',
            "--cfg", f"data.2DObjDet.label_cache_dir={folder / 'cache'}",
            "--cfg", "model.Yolo.fpn_channels=32", "--cfg", "model.Yolo.head_convs=1", *extra]


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
