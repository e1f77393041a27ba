"""The embedded dataset: loaded unchanged by the devkit, nuScenes-like geometry, every class, deterministic."""

import filecmp
import math
import os
from collections import Counter

import numpy as np
import pytest
from nuscenes.eval.detection.constants import DETECTION_NAMES
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import view_points
from nuscenes.utils.splits import create_splits_scenes
from pyquaternion import Quaternion

from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.labels import camera_boxes_2d
from utils.errors import UserError

TABLES = ("attribute", "calibrated_sensor", "category", "ego_pose", "instance", "log", "map", "sample",
          "sample_annotation", "sample_data", "scene", "sensor", "visibility")


@pytest.fixture(scope="module")
def nusc(embedded_dir):
    return NuScenes(version="v1.0-mini", dataroot=embedded_dir, verbose=False)


def test_layout_and_splits(embedded_dir, nusc):
    assert sorted(f[:-5] for f in os.listdir(os.path.join(embedded_dir, "v1.0-mini"))) == sorted(TABLES)
    assert all(os.path.exists(os.path.join(embedded_dir, m["filename"])) for m in nusc.map)
    names = {scene["name"] for scene in nusc.scene}
    splits = create_splits_scenes()
    assert len(names & set(splits["mini_train"])) == 8 and len(names & set(splits["mini_val"])) == 2
    assert len(nusc.sample) == 20 and len(nusc.sample_data) == 120
    for sd in nusc.sample_data:
        assert sd["filename"].startswith(f"samples/{sd['channel']}/") and sd["is_key_frame"]
        assert os.path.getsize(os.path.join(embedded_dir, sd["filename"])) > 1000


def test_cameras_look_where_nuscenes_cameras_look(nusc):
    expected_yaw = {"CAM_FRONT": 0, "CAM_FRONT_LEFT": 55, "CAM_FRONT_RIGHT": -55, "CAM_BACK_LEFT": 110,
                    "CAM_BACK_RIGHT": -110, "CAM_BACK": 180}
    sample = nusc.sample[0]
    for channel, yaw in expected_yaw.items():
        sd = nusc.get("sample_data", sample["data"][channel])
        cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
        rotation = Quaternion(cs["rotation"]).rotation_matrix
        optical_axis, down = rotation @ [0, 0, 1], rotation @ [0, 1, 0]
        assert optical_axis == pytest.approx([math.cos(math.radians(yaw)), math.sin(math.radians(yaw)), 0], abs=1e-9)
        assert down == pytest.approx([0, 0, -1])
        intrinsic = np.array(cs["camera_intrinsic"])
        assert intrinsic[0, 2] == pytest.approx(816 * sd["width"] / 1600)
        assert intrinsic[1, 1] == pytest.approx(intrinsic[0, 0] * (sd["height"] / 900) / (sd["width"] / 1600))


def test_ego_moves_through_the_scene(nusc):
    for scene in nusc.scene:
        first = nusc.get("sample", scene["first_sample_token"])
        last = nusc.get("sample", scene["last_sample_token"])
        poses = [nusc.get("ego_pose", nusc.get("sample_data", s["data"]["CAM_FRONT"])["ego_pose_token"])
                 for s in (first, last)]
        assert np.linalg.norm(np.subtract(poses[0]["translation"], poses[1]["translation"])) > 1.0


def test_all_classes_unmapped_categories_and_visibilities(nusc):
    categories = Counter(ann["category_name"] for ann in nusc.sample_annotation)
    detection = {category_to_detection_name(name) for name in categories} - {None}
    assert detection == set(DETECTION_NAMES)
    unmapped = {name for name in categories if category_to_detection_name(name) is None}
    assert {"animal", "movable_object.debris", "static_object.bicycle_rack", "vehicle.emergency.police"} <= unmapped
    assert {ann["visibility_token"] for ann in nusc.sample_annotation} == {"1", "2", "3", "4"}


def test_border_straddling_and_behind_camera_objects(nusc):
    straddling = behind = 0
    for sd in nusc.sample_data:
        for ann, (x1, _, x2, _) in camera_boxes_2d(nusc, sd["token"], ["1", "2", "3", "4"]):
            straddling += x1 == 0 or x2 == sd["width"]
            box = nusc.get_box(ann["token"])
            pose = nusc.get("ego_pose", sd["ego_pose_token"])
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            box.translate(-np.array(pose["translation"]))
            box.rotate(Quaternion(pose["rotation"]).inverse)
            box.translate(-np.array(cs["translation"]))
            box.rotate(Quaternion(cs["rotation"]).inverse)
            behind += bool((box.corners()[2] <= 0).any())
    assert straddling >= 10 and behind >= 3


def test_rendered_object_is_where_the_devkit_projects_it():
    """An object alone in front of a camera covers exactly the devkit's projection of its corners."""
    rig = synthetic.CameraRig(320, 180)
    camera_matrix, cam_to_ego, cam_in_ego = rig.cameras["CAM_FRONT_LEFT"]
    center, yaw, size = np.array([6.0, 9.0, 0.8]), 0.7, [1.9, 4.6, 1.6]
    no_ground = (np.zeros((0, 4, 3)), np.zeros((0, 3)))
    objects = [(size, center, yaw, (250, 250, 250), None)]
    rng_seed = 3
    empty, _, _ = synthetic.render_camera(rig, "CAM_FRONT_LEFT", np.zeros(2), 0.0, no_ground, [],
                                          np.random.default_rng(rng_seed))
    image, pixels, area = synthetic.render_camera(rig, "CAM_FRONT_LEFT", np.zeros(2), 0.0, no_ground, objects,
                                                  np.random.default_rng(rng_seed))
    changed = np.abs(image.astype(int) - empty.astype(int)).max(axis=2) > 40
    rows, cols = np.nonzero(changed)

    box = Box(center, size, Quaternion(axis=[0, 0, 1], angle=yaw))
    box.translate(-cam_in_ego)
    box.rotate(Quaternion(matrix=cam_to_ego).inverse)
    assert (box.corners()[2] > 0).all()
    projected = view_points(box.corners(), camera_matrix, True)[:2]
    assert cols.min() == pytest.approx(projected[0].min(), abs=1.5)
    assert cols.max() + 1 == pytest.approx(projected[0].max(), abs=1.5)
    assert rows.min() == pytest.approx(projected[1].min(), abs=1.5)
    assert rows.max() + 1 == pytest.approx(projected[1].max(), abs=1.5)
    assert pixels[0] == pytest.approx(area[0], rel=0.05)


def test_occlusion_lowers_visibility(nusc):
    occluded_in_view = [ann for ann in nusc.sample_annotation if ann["visibility_token"] in ("2", "3")]
    assert len(occluded_in_view) >= 5


def test_generation_is_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        synthetic.generate(str(out), samples_per_scene=2, width=96, height=64, seed=5, num_workers=2)
    comparison = filecmp.dircmp(first, second)
    pending = [comparison]
    while pending:
        current = pending.pop()
        assert not current.left_only and not current.right_only and not current.diff_files
        _, mismatch, errors = filecmp.cmpfiles(current.left, current.right, current.common_files, shallow=False)
        assert not mismatch and not errors
        pending.extend(current.subdirs.values())


def test_refuses_to_overwrite_and_bad_sizes(tmp_path):
    with pytest.raises(UserError, match="already exists"):
        synthetic.generate(str(tmp_path))
    with pytest.raises(UserError, match="--width 10"):
        synthetic.generate(str(tmp_path / "new"), width=10, height=64)
    assert not (tmp_path / "new").exists()
