"""Shared fixtures: one small embedded dataset per test session, and configuration dicts pointing at it."""

import copy
import json
from pathlib import Path

import pytest

from dataset.NuscenesDataset import synthetic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SMALL = {"samples_per_scene": 2, "width": 320, "height": 180, "seed": 0}  # 120 images, generated in a few seconds
with open(PROJECT_ROOT / "config" / "data.json") as data_file:
    NORMALIZE = json.load(data_file)["2DObjDet"]["normalize"]  # what the models take as their "normalize"


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
