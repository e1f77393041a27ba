"""Every bad input the data code promises to reject: one line naming the path or value, what to do, exit != 0,
and no half-written cache left behind."""

import ctypes
import importlib
import json
import os
import re
import select
import shutil
import signal

import pytest
import torch
from torch.utils.data import DataLoader

import helper
from dataset.NuscenesDataset import cache, labels
from dataset.NuscenesDataset.collate_2d import collate_detection
from dataset.NuscenesDataset.loader_2d_obj_det import DatasetLoader, images_on_device
from utils.errors import UserError, one_line

LABELS = {"visibilities": ["", "1", "2", "3", "4"], "min_box_size": 0.0}


@pytest.fixture
def dataset_copy(embedded_dir, tmp_path) -> str:
    """A copy of the small embedded dataset that a test may damage."""
    copy = tmp_path / "nuscenes"
    shutil.copytree(embedded_dir, copy)
    return str(copy)


@pytest.fixture
def run_cli(capsys):
    """run_cli(module, *args): the module's main(args) in this process (the entry points' own subprocess tests are
    in test_platform and test_labels), as (exit status, stderr)."""

    def run(module: str, *args) -> tuple:
        capsys.readouterr()
        try:
            importlib.import_module(module).main(list(args))
            code = 0
        except SystemExit as exit_request:
            code = exit_request.code
        return code, capsys.readouterr().err.strip()

    return run


def assert_one_line(stderr, *fragments):
    assert "\n" not in stderr and "Traceback" not in stderr and stderr.startswith("error: ")
    for fragment in fragments:
        assert fragment in stderr


def test_missing_dataset_dir_cli(tmp_path, run_cli):
    missing = str(tmp_path / "no_such_dir")
    code, stderr = run_cli("dataset.NuscenesDataset.export_coco", "--dataroot", missing, "--version", "v1.0-mini",
                           "--split", "mini_val", "--out", str(tmp_path / "out.json"))
    assert code == 2
    assert_one_line(stderr, missing, "python -m dataset.NuscenesDataset.synthetic --out", "nuscenes.org")
    assert not (tmp_path / "out.json").exists()


def test_missing_version_folder_cli(embedded_dir, tmp_path, run_cli):
    code, stderr = run_cli("dataset.NuscenesDataset.export_coco", "--dataroot", embedded_dir, "--version",
                           "v1.0-trainval", "--split", "val", "--out", str(tmp_path / "out.json"))
    assert code == 2
    assert_one_line(stderr, os.path.join(embedded_dir, "v1.0-trainval"), "v1.0-mini")


def test_split_matching_no_scene(embedded_dir, tmp_path):
    with pytest.raises(UserError, match="split 'test' matches no scene of .*v1.0-mini.*mini_train"):
        labels.label_cache(embedded_dir, "v1.0-mini", "test", LABELS, str(tmp_path))
    with pytest.raises(UserError, match="'minival' is not a nuScenes split; choose one of: .*mini_val"):
        labels.label_cache(embedded_dir, "v1.0-mini", "minival", LABELS, str(tmp_path))
    assert not [name for name in os.listdir(tmp_path) if not name.endswith(".lock")]  # no cache, no parts


def test_unknown_version_in_config(embedded_dir, make_args):
    args = make_args(embedded_dir, data={"version": "v2.0"})
    with pytest.raises(UserError, match="version 'v2.0' has no entry in 'splits' of config/data.json"):
        DatasetLoader(args, mode="train")


def test_missing_image_file(dataset_copy, make_args):
    victim = sorted(os.listdir(os.path.join(dataset_copy, "samples", "CAM_BACK")))[0]
    os.remove(os.path.join(dataset_copy, "samples", "CAM_BACK", victim))
    with pytest.raises(UserError, match=f"image .*{re.escape(victim)} is missing"):
        DatasetLoader(make_args(dataset_copy), mode="train")


def error_of_unprivileged_read(dataset) -> str:
    """The UserError line of dataset[0], read without the right to override file permissions: in this process where
    it is not root, else in a child process that has dropped root's effective capabilities (capset), so that a file
    of mode 0 is unreadable to it too."""
    if os.geteuid() != 0:
        with pytest.raises(UserError) as raised:
            dataset[0]
        return str(raised.value)

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the child: drop the capabilities, read, report, leave without the parent's cleanup
        os.close(reader)
        message = "read without an error"
        try:
            libc, header, capabilities = ctypes.CDLL(None, use_errno=True), Header(0x20080522, 0), (Data * 2)()
            libc.capget(ctypes.byref(header), capabilities)  # 0x20080522: _LINUX_CAPABILITY_VERSION_3
            for data in capabilities:
                data.effective = 0
            if libc.capset(ctypes.byref(header), capabilities) != 0:
                message = f"capset failed (errno {ctypes.get_errno()})"
            else:
                dataset[0]
        except UserError as error:
            message = str(error)
        except BaseException as error:  # reported to the parent, whatever it is
            message = f"{type(error).__name__}: {error}"
        finally:
            os.write(writer, message.encode())
            os._exit(0)
    os.close(writer)
    try:
        if not select.select([reader], [], [], 60)[0]:
            os.kill(child, signal.SIGKILL)
            return "the child process did not answer in 60 s"
        with os.fdopen(reader) as pipe:
            return pipe.read()
    finally:
        os.waitpid(child, 0)


def test_unreadable_image_file(dataset_copy, make_args):
    dataset = DatasetLoader(make_args(dataset_copy), mode="test")
    path = os.path.join(dataset_copy, dataset.image_files[0, 2].decode())
    with open(path, "rb") as f:
        jpeg = f.read()
    for damaged in (jpeg[: len(jpeg) // 2], b"not a jpeg", b"\xff\xd8 not a jpeg either \xff\xd9"):
        with open(path, "wb") as f:
            f.write(damaged)
        with pytest.raises(UserError, match=f"cannot read image {re.escape(path)} .*JPEG"):
            dataset[0]
    os.chmod(path, 0)
    try:
        message = error_of_unprivileged_read(dataset)
        assert re.search(f"cannot read image {re.escape(path)} .*Permission denied", message), message
    finally:
        os.chmod(path, 0o644)
    # persistent, so that helper.workers_stopped can stop its worker: the raised error's traceback holds the
    # iterator, and a garbage-collected one would stop it only after a 5 s timeout
    loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=collate_detection, persistent_workers=True)
    with helper.workers_stopped(loader), pytest.raises(UserError) as raised:  # re-raised with the worker's traceback
        next(iter(loader))
    assert one_line(raised.value).startswith(f"cannot read image {path}")
    # data.json "decode": "device": a complete file that the device's decoder cannot read is named the same way
    device_decoded = DatasetLoader(make_args(dataset_copy, data={"decode": "device"}), mode="test")
    batch = collate_detection([device_decoded[0]])
    with pytest.raises(UserError, match=f"cannot read image {re.escape(path)} .*JPEG"):
        images_on_device(batch, device_decoded.input_size, torch.device("cpu"))


def test_corrupt_cache_file(embedded_dir, tmp_path):
    path, _ = labels.label_cache(embedded_dir, "v1.0-mini", "mini_val", LABELS, str(tmp_path))
    with open(path, "r+") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match=f"cache {re.escape(path)} is corrupt .*delete it"):
        labels.label_cache(embedded_dir, "v1.0-mini", "mini_val", LABELS, str(tmp_path))
    with open(path, "w") as f:
        json.dump([1, 2], f)
    with pytest.raises(UserError, match="is corrupt"):
        labels.label_cache(embedded_dir, "v1.0-mini", "mini_val", LABELS, str(tmp_path))


def test_corrupt_cache_file_cli(embedded_dir, tmp_path, run_cli):
    cache_dir = tmp_path / "labels"
    path, _ = labels.label_cache(embedded_dir, "v1.0-mini", "mini_val", LABELS, str(cache_dir))
    with open(path, "w") as f:
        f.write("{ half a file")
    code, stderr = run_cli("dataset.NuscenesDataset.export_coco", "--dataroot", embedded_dir, "--version",
                           "v1.0-mini", "--split", "mini_val", "--out", str(tmp_path / "out.json"),
                           "--label_cache_dir", str(cache_dir))
    assert code == 2
    assert_one_line(stderr, path, "delete it")


def test_interrupted_cache_write_leaves_nothing(embedded_dir, tmp_path, monkeypatch):
    def savez_then_fail(f, **arrays):
        f.write(b"PK half a zip file")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.np, "savez", savez_then_fail)
    with pytest.raises(KeyboardInterrupt):
        labels.label_cache(embedded_dir, "v1.0-mini", "mini_val", LABELS, str(tmp_path))
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".npz") or name.startswith(".tmp-")]


def test_unwritable_cache_dir_is_one_line(embedded_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match=f"cannot create the cache folder {re.escape(str(tmp_path / 'a_file'))}"):
        labels.label_cache(embedded_dir, "v1.0-mini", "mini_val", LABELS, str(tmp_path / "a_file" / "cache"))


@pytest.mark.parametrize("table, damage, reason", [
    ("sample_data.json", lambda text: text[:500], "JSONDecodeError"),
    ("sample.json", lambda text: "[1, 2]", "not a list of records with a token"),
    ("calibrated_sensor.json", lambda text: "", "JSONDecodeError"),
])
def test_damaged_table_is_named(dataset_copy, tmp_path, table, damage, reason):
    path = os.path.join(dataset_copy, "v1.0-mini", table)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(damage(text))
    with pytest.raises(UserError, match=f"cannot load the nuScenes tables: {re.escape(path)} .{reason}"):
        labels.label_cache(dataset_copy, "v1.0-mini", "mini_val", LABELS, str(tmp_path / "cache"))


def test_missing_table_is_named(dataset_copy, tmp_path):
    path = os.path.join(dataset_copy, "v1.0-mini", "ego_pose.json")
    os.remove(path)
    with pytest.raises(UserError, match=f"cannot load the nuScenes tables: .*{re.escape(path)}"):
        labels.label_cache(dataset_copy, "v1.0-mini", "mini_val", LABELS, str(tmp_path / "cache"))


@pytest.mark.parametrize("val_ratio", [0.0, 1.0, -0.2])
def test_bad_val_ratio(embedded_dir, make_args, val_ratio):
    with pytest.raises(UserError, match=f"--val_ratio {val_ratio}"):
        DatasetLoader(make_args(embedded_dir, val_ratio=val_ratio), mode="train")


def test_generator_refuses_existing_out_cli(tmp_path, run_cli):
    code, stderr = run_cli("dataset.NuscenesDataset.synthetic", "--out", str(tmp_path))
    assert code == 2
    assert_one_line(stderr, str(tmp_path), "already exists")
