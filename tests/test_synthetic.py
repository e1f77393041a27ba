"""The embedded dataset: loaded unchanged by the devkit, nuScenes-like geometry, every class, deterministic."""

import errno
import fcntl
import filecmp
import glob
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter

import cv2
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
from tests.conftest import PROJECT_ROOT
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
    assert len(nusc.sample) == 20 and len(nusc.sample_data) == 140  # 6 cameras and LIDAR_TOP
    for sd in nusc.sample_data:
        assert sd["filename"].startswith(f"samples/{sd['channel']}/") and sd["is_key_frame"]
        if sd["sensor_modality"] == "camera":
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
        if sd["sensor_modality"] != "camera":
            continue
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


@pytest.fixture(scope="module")
def trainval_dir(tmp_path_factory) -> str:
    """The first 4 trainval scenes, 3 keyframes each, linked images, with camera sweeps."""
    root = tmp_path_factory.mktemp("trainval") / "nuscenes"
    synthetic.generate(str(root), 3, 96, 64, 0, 2, version="v1.0-trainval", scenes=4, image_mode="linked",
                       sweeps=True)
    return str(root)


@pytest.fixture(scope="module")
def trainval(trainval_dir):
    return NuScenes(version="v1.0-trainval", dataroot=trainval_dir, verbose=False)


def test_trainval_prefix_has_train_and_val_scenes(trainval_dir, trainval):
    assert sorted(os.listdir(trainval_dir)) == ["maps", "samples", "sweeps", "v1.0-trainval"]
    names = sorted(scene["name"] for scene in trainval.scene)
    splits = create_splits_scenes()
    assert names == sorted(splits["train"] + splits["val"])[:4] == ["scene-0001", "scene-0002", "scene-0003",
                                                                    "scene-0004"]
    assert set(names) & set(splits["val"]) == {"scene-0003"} and len(set(names) & set(splits["train"])) == 3
    assert len(trainval.sample) == 12 and all(len(sample["data"]) == 7 for sample in trainval.sample)  # cameras, lidar
    assert {ann["visibility_token"] for ann in trainval.sample_annotation} >= {"1", "4"}


def test_linked_images_are_hard_links_to_one_rendered_image_per_camera(trainval_dir, trainval):
    inodes = {}
    for sd in trainval.sample_data:
        if sd["channel"].startswith("CAM_"):
            inodes.setdefault(sd["channel"], set()).add(os.stat(os.path.join(trainval_dir, sd["filename"])).st_ino)
    assert len(inodes) == 6 and all(len(channel_inodes) == 1 for channel_inodes in inodes.values())
    assert len(set.union(*inodes.values())) == 6
    image = cv2.imread(os.path.join(trainval_dir, trainval.sample_data[0]["filename"]))
    assert image.shape == (64, 96, 3) and image.std() > 10


def test_sweeps_chain_with_the_keyframes_of_their_camera(trainval_dir, trainval):
    sweeps = [sd for sd in trainval.sample_data if not sd["is_key_frame"]]
    assert len(sweeps) == 4 * 6 * 5 * 2  # scenes x cameras x sweeps between consecutive keyframes x gaps
    for scene in trainval.scene:
        first = trainval.get("sample", scene["first_sample_token"])
        for channel, token in first["data"].items():
            sweeps_between = 5 if channel.startswith("CAM_") else 0  # the lidar has keyframes only
            chain, previous = [], ""
            while token:
                sd = trainval.get("sample_data", token)
                assert sd["prev"] == previous and sd["channel"] == channel
                assert sd["filename"].startswith(("samples/" if sd["is_key_frame"] else "sweeps/") + channel + "/")
                assert os.path.exists(os.path.join(trainval_dir, sd["filename"]))
                pose = trainval.get("ego_pose", sd["ego_pose_token"])
                assert pose["timestamp"] == sd["timestamp"]
                sample = trainval.get("sample", sd["sample_token"])
                assert abs(sample["timestamp"] - sd["timestamp"]) <= 250_000  # the sample nearer in time
                chain.append(sd)
                previous, token = token, sd["next"]
            assert [sd["is_key_frame"] for sd in chain] == ([True] + [False] * sweeps_between) * 2 + [True]
            times = np.diff([sd["timestamp"] for sd in chain])
            if sweeps_between:
                assert times.min() >= 83_333 and times.max() <= 83_334  # 12 Hz


def test_sweeps_leave_keyframes_and_images_as_they_are(tmp_path):
    for sweeps in (False, True):
        synthetic.generate(str(tmp_path / str(sweeps)), 2, 64, 64, 0, 1, scenes=1, sweeps=sweeps)
    tables = {sweeps: {name: json.loads((tmp_path / str(sweeps) / "v1.0-mini" / f"{name}.json").read_text())
                       for name in TABLES} for sweeps in (False, True)}
    for name in set(TABLES) - {"sample_data", "ego_pose"}:
        assert tables[True][name] == tables[False][name]
    keyframes = {sd["token"]: sd for sd in tables[True]["sample_data"] if sd["is_key_frame"]}
    poses = {pose["token"]: pose for pose in tables[True]["ego_pose"]}
    assert len(keyframes) == 14 and len(tables[True]["sample_data"]) == len(poses) == 14 + 6 * 5  # 2 x (6 cams, lidar)
    for sd in tables[False]["sample_data"]:
        chained = keyframes[sd["token"]]
        assert {**chained, "prev": sd["prev"], "next": sd["next"]} == sd
        assert poses[sd["token"]] == next(pose for pose in tables[False]["ego_pose"] if pose["token"] == sd["token"])
        assert filecmp.cmp(tmp_path / "True" / sd["filename"], tmp_path / "False" / sd["filename"], shallow=False)
    for sd in tables[True]["sample_data"]:
        if not sd["is_key_frame"]:  # a rendered dataset's sweep is a link to its camera's keyframe before it
            channel = sd["filename"].split("/")[1]
            before = max((k for k in keyframes.values() if k["filename"].split("/")[1] == channel
                          and k["timestamp"] < sd["timestamp"]), key=lambda k: k["timestamp"])
            assert os.path.samefile(tmp_path / "True" / sd["filename"], tmp_path / "True" / before["filename"])


def test_cheap_visibility_counts_match_the_render():
    """Linked mode's counts equal what the renderer counts at the same size."""
    rig = synthetic.CameraRig(320, 180)
    rng = np.random.default_rng(1)
    objects = [([1.9, 4.6, 1.6], np.array([x, y, 0.8]), rng.uniform(-3, 3), (200, 100, 50), ((0.5, 0.8), (0, 0, 0)))
               for x, y in rng.uniform(-15, 15, size=(20, 2)) if math.hypot(x, y) > 4]  # some cut by near planes
    corners = synthetic.box_corners(np.array([o[0] for o in objects]), np.array([o[1] for o in objects]),
                                    np.array([o[2] for o in objects]))
    no_ground = (np.zeros((0, 4, 3)), np.zeros((0, 3)))
    seen = 0
    for channel in synthetic.CAMERAS:
        _, pixels, area = synthetic.render_camera(rig, channel, np.array([1.0, 2.0]), 0.3, no_ground, objects,
                                                  np.random.default_rng(0))
        cheap_pixels, cheap_area = synthetic.count_visible_pixels(rig, channel, np.array([1.0, 2.0]), 0.3, corners)
        assert cheap_pixels == pytest.approx(pixels, rel=0.02, abs=3)
        assert cheap_area == pytest.approx(area, rel=0.02, abs=3)
        seen += int((pixels > 0).sum())
    assert seen >= 10


def test_link_or_copy_copies_where_linking_fails(tmp_path, monkeypatch):
    source, first, second = tmp_path / "source.jpg", tmp_path / "first.jpg", tmp_path / "second.jpg"
    source.write_bytes(b"jpeg")
    assert synthetic.link_or_copy(str(source), str(first)) == str(source) and os.path.samefile(source, first)

    def at_link_limit(src, dst):
        raise OSError(errno.EMLINK, "Too many links", src)

    monkeypatch.setattr(synthetic.os, "link", at_link_limit)
    assert synthetic.link_or_copy(str(source), str(second)) == str(second)  # the copy is the next links' source
    assert second.read_bytes() == b"jpeg" and not os.path.samefile(source, second)
    monkeypatch.undo()
    with pytest.raises(FileExistsError):  # a bad target is an error, not a reason to copy
        synthetic.link_or_copy(str(source), str(second))


@pytest.mark.parametrize("argv, message", [
    (["--scenes", "0"], "--scenes 0: v1.0-mini has 10 scenes; choose 1 to 10"),
    (["--version", "v1.0-trainval", "--scenes", "851"], "--scenes 851: v1.0-trainval has 850 scenes"),
])
def test_bad_scenes_is_one_line(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(out), *argv])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.count("\n") == 1 and message in stderr
    assert not out.exists() and os.listdir(tmp_path) == []


def children_of(pid: int) -> list:
    """The PIDs of the processes whose parent is `pid`, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "pid (name)": state, then ppid
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def test_a_killed_generation_leaves_no_process_nor_lock_and_the_next_one_says_so(tmp_path, caplog):
    """A generation SIGKILLed while it holds the dataset's lock (as train.py's first run does): its pool workers end
    with it, the lock is free at once, and the next generation removes the half-written folder, in one line."""
    out = tmp_path / "nuscenes"
    script = ("import sys\n"
              f"sys.path.insert(0, {str(PROJECT_ROOT)!r})\n"
              "from dataset.NuscenesDataset.cache import file_lock\n"
              "from dataset.NuscenesDataset import synthetic\n"
              f"with file_lock({str(out)!r} + '.lock', 'the embedded dataset'):\n"
              f"    synthetic.generate({str(out)!r}, samples_per_scene=30, width=320, height=180, num_workers=2)\n")
    generator = subprocess.Popen([sys.executable, "-c", script])
    deadline, workers = time.monotonic() + 60, []
    while time.monotonic() < deadline and len(workers) < 2:
        time.sleep(0.05)
        workers = children_of(generator.pid)
    generator.kill()
    generator.wait()
    assert len(workers) == 2, "the generation's pool did not start"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not [pid for pid in workers if alive(pid)]
    assert glob.glob(f"{out}.partial-*")
    fd = os.open(f"{out}.lock", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while anything holds it
    finally:
        os.close(fd)
    synthetic.generate(str(out), samples_per_scene=2, width=64, height=64)
    assert "left by a generation that was killed, and generating again" in caplog.text
    assert not glob.glob(f"{out}.partial-*") and (out / "v1.0-mini" / "scene.json").is_file()
