"""Configuration values of the wrong JSON shape: each --cfg value is checked against the shape of the value it
replaces, a non-string "inherit" is one line, and a value that torchvision would reject fails its rule; all before
any work starts."""

import json
import shutil

import pytest

from tests.conftest import PROJECT_ROOT
from utils.config import load_json, merge_config, shape_difference
from utils.errors import UserError

CONFIG_DIR = str(PROJECT_ROOT / "config")
SPLITS = {"v1.0-mini": {"train": "mini_train", "test": "mini_val"}, "v1.0-trainval": {"train": "train", "test": "val"}}


def merged(*overrides: str) -> dict:
    return merge_config({"cfg": list(overrides)}, CONFIG_DIR)


@pytest.mark.parametrize("override, path, value", [
    # a dict keyed by user data: another version with the same inner shape, or fewer versions
    ('data.2DObjDet.splits={"v1.0-mini": {"train": "a", "test": "b"}, "v2": {"train": "c", "test": "d"}}',
     ("data", "2DObjDet", "splits", "v2"), {"train": "c", "test": "d"}),
    ('data.2DObjDet.splits={"v1.0-trainval": {"train": "train", "test": "val"}}', ("data", "2DObjDet", "splits"),
     {"v1.0-trainval": {"train": "train", "test": "val"}}),
    ('data.BEVSeg.classes={"vehicle": ["vehicle."], "person": ["human.pedestrian.", "human."]}',
     ("data", "BEVSeg", "classes", "person"), ["human.pedestrian.", "human."]),
    ('config.loaders={"nuscenes": {"2DObjDet": "a", "BEVSeg": "b"}, "kitti": {"2DObjDet": "c"}}',
     ("config", "loaders", "kitti", "2DObjDet"), "c"),
    ('config.loaders.nuscenes={"2DObjDet": "a", "Counting": "b"}', ("config", "loaders", "nuscenes", "Counting"),
     "b"),
    # lists of any length, of the default's element type; an integer where a number is
    ('data.2DObjDet.cameras=["CAM_FRONT"]', ("data", "2DObjDet", "cameras"), ["CAM_FRONT"]),
    ("data.2DObjDet.normalize.std=[1, 0.5, 2]", ("data", "2DObjDet", "normalize", "std"), [1, 0.5, 2]),
    ("loss.Yolo.size_ranges=[[0, 64], [64, 100000]]", ("loss", "Yolo", "size_ranges"), [[0, 64], [64, 100000]]),
    ("loss.Yolo.size_ranges=[[0, 32.5], [32.5, 1e9]]", ("loss", "Yolo", "size_ranges"), [[0, 32.5], [32.5, 1e9]]),
    ('model.Yolo.postprocess={"score_threshold": 1, "nms_iou": 0.5, "pre_nms_topk": 10, "max_detections": 5}',
     ("model", "Yolo", "postprocess", "score_threshold"), 1),
])
def test_values_of_the_defaults_shape_are_taken(override, path, value):
    node = merged(override)
    for part in path:
        node = node[part]
    assert node == value


@pytest.mark.parametrize("override, message", [
    ('data.2DObjDet.splits={"v1.0-mini":"mini_train"}',
     f'--cfg data.2DObjDet.splits={{"v1.0-mini":"mini_train"}}: expected a value of type dict like '
     f'{json.dumps(SPLITS)}: ["v1.0-mini"] = "mini_train" is not a dict like {{"train": "mini_train", "test": '
     f'"mini_val"}}'),
    ('data.2DObjDet.splits={"v2": {"train": "a"}}', '["v2"] lacks "test"'),
    ('data.2DObjDet.splits={"v2": {"train": "a", "test": 1}}', '["v2"]["test"] = 1 is not a string like "mini_val"'),
    ('data.BEVSeg.classes={"vehicle": "vehicle."}', '["vehicle"] = "vehicle." is not a list like ["vehicle."]'),
    ('data.BEVSeg.classes={"vehicle": [1]}', '["vehicle"][0] = 1 is not a string like "vehicle."'),
    ('data.2DObjDet.cameras=["CAM_FRONT", 3]', '[1] = 3 is not a string like "CAM_FRONT_LEFT"'),
    ("model.Yolo.widths=[true, 32, 64, 128, 256]", "[0] = true is not a number like 16"),
    ('data.2DObjDet.normalize={"mean": [0.5, 0.5, 0.5], "std": [1, 1, 1], "scale": [2]}',
     'the dict has the unknown key "scale"'),
    ('data.2DObjDet.image={"w": 96}', 'the dict lacks "h" (keys there: "w", "h")'),
    ('data.2DObjDet.labels={"visibilities": ["4"], "min_box_size": 0, "min_size": 1}',
     'the dict has the unknown key "min_size"'),
    ('model.Yolo.postprocess={"score_threshold": "0.1", "nms_iou": 0.5, "pre_nms_topk": 10, "max_detections": 5}',
     '["score_threshold"] = "0.1" is not a number like 0.05'),
    ('data.2DObjDet.cameras={"a": 1}', "expected a value of type list like"),
    ("data.2DObjDet.splits=[1]", "expected a value of type dict like"),
])
def test_a_value_of_another_shape_is_one_line_naming_the_key(override, message):
    with pytest.raises(UserError) as failed:
        merged(override)
    text = str(failed.value)
    assert "\n" not in text and text.startswith(f"--cfg {override.split('=', 1)[0]}=") and message in text


def test_the_shape_rule_on_plain_values():
    """Numbers match numbers (whether an integer is needed is the range checks' to say), a bool is no number."""
    assert shape_difference(2, 2.0, "x") is None and shape_difference(2.5, 2, "x") is None
    assert shape_difference(True, 1, "x") and shape_difference(1, True, "x")
    assert shape_difference(None, None, "x") is None
    assert shape_difference(["a", 1], ["b", 2], "x") is None  # an element of the shape of any of the default's
    assert shape_difference([[1]], [], "x") is None  # an empty default list says nothing about its elements


def test_a_non_string_inherit_is_one_line_naming_the_file_and_section(tmp_path):
    config_dir = tmp_path / "config"
    shutil.copytree(PROJECT_ROOT / "config", config_dir)
    data = load_json(str(config_dir / "data.json"))
    data["Counting"] = {"inherit": ["2DObjDet"], "cameras": ["CAM_FRONT"]}
    (config_dir / "data.json").write_text(json.dumps(data))
    with pytest.raises(UserError) as failed:
        merge_config({}, str(config_dir))
    assert str(failed.value) == (f'config file {config_dir / "data.json"}: Counting.inherit = ["2DObjDet"] is not a '
                                 f'section name: write one name as a string, one of "2DObjDet", "BEVSeg", "3DObjDet"')
