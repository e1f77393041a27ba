"""predict.py: the detections of test.py for a dataset image, a folder with a broken file and a PNG of another size,
a file name that is not UTF-8, a folder per run that no later run reads, sample tokens through the configured
dataset, and its bad inputs; the device decode's deprecated torchvision call, without its warning."""

import json
import os
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.io import decode_jpeg

import predict
import test as test_script
from dataset.NuscenesDataset.common import is_complete_jpeg
from dataset.NuscenesDataset.loader_2d_obj_det import DatasetLoader, images_on_device
from tests.conftest import data_flags
from utils.checkpoint import load_checkpoint
from utils.errors import UserError


def run_folder(exp, number: int | None = None) -> Path:
    """The folder of predict.py's run `number` in the experiment `exp` (default: its latest run)."""
    return exp / "predict" / str(number or max(int(name) for name in os.listdir(exp / "predict")))


def predictions(exp, number: int | None = None) -> list:
    return json.loads((run_folder(exp, number) / "predictions.json").read_text())


def test_a_test_image_gets_the_detections_of_test_py(trained_copy, embedded_dir):
    """Through predict.py, a test-split image gets test.py's detections: same boxes in original pixels (to float32
    rounding: predict.py runs it alone, test.py in a batch), scores and classes."""
    exp, _ = trained_copy
    test_script.main(["--save_dir", str(exp), *data_flags(embedded_dir), "--num_cores", "0"])
    config = load_checkpoint(str(exp / "best.pt"))["config"]
    test_set = DatasetLoader(config, mode="test")
    image_id, path = int(test_set.image_ids[1]), os.path.join(test_set.dataroot, test_set.image_files[0, 1].decode())
    detections = json.loads((exp / "test" / "detections.json").read_text())
    expected = sorted((d for d in detections if d["image_id"] == image_id), key=lambda d: -d["score"])
    predict.main(["--save_dir", str(exp), "--source", path, "--score_threshold", "0.001"])
    [entry] = predictions(exp)
    assert entry["file"] == path and len(entry["scores"]) == len(expected) > 0
    np.testing.assert_allclose(entry["scores"], [d["score"] for d in expected], rtol=1e-5)
    x, y, w, h = np.array([d["bbox"] for d in expected]).T
    np.testing.assert_allclose(entry["boxes"], np.stack([x, y, x + w, y + h], 1), atol=1e-3)
    assert entry["classes"] == [test_set.class_names[d["category_id"] - 1] for d in expected]


def test_a_folder_with_a_broken_file_and_a_png_of_another_size(trained_copy, embedded_dir, capsys):
    """Read and predicted 4 to a forward pass (the checkpoint's --batch_size) or 1 by a worker process: the same
    detections; the unreadable files named in a warning each, in the folder's order; a motion photo read as the
    JPEG it starts with."""
    exp, _ = trained_copy
    source = exp.parent / "images"
    os.makedirs(source / "nested")
    image = cv2.imread(os.path.join(embedded_dir, "samples", "CAM_FRONT", sorted(os.listdir(
        os.path.join(embedded_dir, "samples", "CAM_FRONT")))[0]))
    cv2.imwrite(str(source / "nested" / "large.png"), cv2.resize(image, (640, 400)))
    cv2.imwrite(str(source / "a.jpg"), image)
    # a phone's motion photo: the JPEG, then its video (an MP4 box header here)
    (source / "motion.jpg").write_bytes((source / "a.jpg").read_bytes() + b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    (source / "broken.jpg").write_bytes(b"not an image")
    (source / "notes.txt").write_text("a file that is not an image")
    predict.main(["--save_dir", str(exp), "--source", str(source), "--save_images", "1", "--score_threshold", "0"])
    warnings = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(warnings) == 2 and "broken.jpg" in warnings[0] and "notes.txt" in warnings[1]
    entries = {os.path.relpath(entry["file"], source): entry for entry in predictions(exp)}
    assert sorted(entries) == ["a.jpg", "motion.jpg", "nested/large.png"]
    assert entries["motion.jpg"]["boxes"] == entries["a.jpg"]["boxes"]
    boxes = np.array(entries["nested/large.png"]["boxes"])
    assert len(boxes) > 0 and boxes[:, 2].max() <= 640 and boxes[:, 3].max() <= 400 and boxes[:, 2].max() > 320
    drawn = cv2.imread(str(run_folder(exp) / "images" / "nested" / "large.png.jpg"))
    assert drawn.shape == (400, 640, 3) and (run_folder(exp) / "images" / "a.jpg.jpg").is_file()
    # one image per forward pass, read by a worker process (the checkpoint's: 4 per pass, read in this process)
    predict.main(["--save_dir", str(exp), "--source", str(source), "--score_threshold", "0", "--batch_size", "1",
                  "--num_cores", "1"])
    assert len([line for line in capsys.readouterr().out.splitlines() if "skipped" in line]) == 2
    assert sorted(os.path.relpath(entry["file"], source) for entry in predictions(exp)) == sorted(entries)
    for entry in predictions(exp):
        batched = entries[os.path.relpath(entry["file"], source)]
        assert entry["classes"] == batched["classes"]
        np.testing.assert_allclose(entry["boxes"], batched["boxes"], atol=1e-3)
        np.testing.assert_allclose(entry["scores"], batched["scores"], rtol=1e-5)


def test_a_file_name_that_is_not_utf8_is_read_drawn_and_recorded(trained_copy, embedded_dir):
    """A PNG named with Latin-1 bytes (cv2.imread crashed the process on it: SIGSEGV) gets the detections of the
    same PNG under an ASCII name, is drawn under its own name, and is recorded as the text that os.fsencode turns
    back into its name; a broken file of such a name is one warning line, its byte escaped, in predict.log."""
    exp, _ = trained_copy
    source = os.path.join(os.fsencode(exp.parent), b"photos")
    os.makedirs(source)
    folder = os.path.join(embedded_dir, "samples", "CAM_FRONT")
    png = cv2.imencode(".png", cv2.resize(cv2.imread(os.path.join(folder, sorted(os.listdir(folder))[0])),
                                          (400, 240)))[1].tobytes()
    for name, data in ((b"caf\xe9.png", png), (b"cafe.png", png), (b"broken\xe9.jpg", b"not an image")):
        with open(os.path.join(source, name), "wb") as file:
            file.write(data)
    predict.main(["--save_dir", str(exp), "--source", os.fsdecode(source), "--save_images", "1",
                  "--score_threshold", "0"])
    entries = {os.fsencode(os.path.basename(entry["file"])): entry for entry in predictions(exp)}
    assert sorted(entries) == sorted([b"caf\xe9.png", b"cafe.png"])
    latin = entries[b"caf\xe9.png"]
    assert os.fsencode(latin["file"]) == os.path.join(source, b"caf\xe9.png")
    assert len(latin["boxes"]) > 0 and latin["boxes"] == entries[b"cafe.png"]["boxes"]
    assert "caf\\udce9.png" in (run_folder(exp) / "predictions.json").read_text()  # JSON's escape: ASCII text
    assert sorted(os.listdir(os.fsencode(run_folder(exp) / "images"))) == sorted([b"caf\xe9.png.jpg", b"cafe.png.jpg"])
    [warning] = [line for line in (run_folder(exp) / "predict.log").read_text().splitlines() if "skipped" in line]
    assert "broken\\xe9.jpg" in warning


def test_each_run_writes_its_own_folder_and_never_reads_predict_outputs(trained_copy, embedded_dir, capsys):
    """A second run leaves the first's predictions and drawings as they were; a --source that holds the experiment
    reads neither (one line says so); a --source inside predict/ is a one-line error, and leaves no run folder."""
    exp, _ = trained_copy
    photos = exp.parent / "photos"
    os.makedirs(photos)
    folder = os.path.join(embedded_dir, "samples", "CAM_FRONT")
    for name, image in zip(("a.jpg", "b.jpg"), sorted(os.listdir(folder))[:2], strict=True):
        (photos / name).write_bytes(Path(folder, image).read_bytes())
    predict.main(["--save_dir", str(exp), "--source", str(photos), "--save_images", "1"])
    first = predictions(exp, 1)
    predict.main(["--save_dir", str(exp), "--source", str(photos / "a.jpg"), "--save_images", "1"])
    assert [entry["file"] for entry in predictions(exp, 2)] == [str(photos / "a.jpg")]
    assert os.listdir(run_folder(exp, 2) / "images") == ["a.jpg.jpg"]
    assert predictions(exp, 1) == first and [entry["file"] for entry in first] == [str(photos / "a.jpg"),
                                                                                   str(photos / "b.jpg")]
    assert sorted(os.listdir(run_folder(exp, 1) / "images")) == ["a.jpg.jpg", "b.jpg.jpg"]
    capsys.readouterr()
    predict.main(["--save_dir", str(exp), "--source", str(exp.parent), "--save_images", "1"])
    out = capsys.readouterr().out
    files = [entry["file"] for entry in predictions(exp, 3)]
    assert {str(photos / "a.jpg"), str(photos / "b.jpg")} <= set(files)
    skipped = [line for line in out.splitlines() if "skipped" in line]  # its .pt, .json, .log files, ...
    assert skipped and not [line for line in [*files, *skipped] if os.path.join(exp, "predict", "") in line]
    assert f"not reading {exp / 'predict'}: predict.py's own outputs" in out
    with pytest.raises(SystemExit) as failed:
        predict.main(["--save_dir", str(exp), "--source", str(run_folder(exp, 1) / "images")])
    assert failed.value.code == 2
    assert "where predict.py writes its outputs" in capsys.readouterr().err.strip().splitlines()[-1]
    assert sorted(os.listdir(exp / "predict")) == ["1", "2", "3"]


def test_the_device_decode_calls_decode_jpeg_without_its_deprecation_warning(embedded_dir):
    """images_on_device and the check of a JPEG's end keep torchvision's decode_jpeg (deprecated since torchvision
    0.29; common.decode_jpeg says why) without its DeprecationWarning, also on a broken file's path; the warning is
    silenced for those calls only."""
    folder = os.path.join(embedded_dir, "samples", "CAM_FRONT")
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:2]]
    jpegs = [torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8) for path in paths]
    batch = {"jpegs": jpegs, "jpeg_paths": paths, "augmentation": [None, None], "counts": torch.zeros(1, 2)}
    broken = {**batch, "jpegs": [jpegs[0], torch.tensor([0xFF, 0xD8, 0xFF], dtype=torch.uint8)]}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert images_on_device(batch, (64, 48), torch.device("cpu")).shape == (1, 2, 3, 48, 64)
        with pytest.raises(UserError, match=re.escape(f"cannot read image {paths[1]}")):
            images_on_device(broken, (64, 48), torch.device("cpu"))
        assert not is_complete_jpeg(Path(paths[0]).read_bytes()[:1000])  # cut: decode_jpeg raises
    with pytest.warns(DeprecationWarning, match="TorchVision are deprecated"):
        decode_jpeg(jpegs[0])


def test_sample_tokens_read_every_camera_of_the_sample(trained_copy, embedded_dir):
    exp, _ = trained_copy
    with open(os.path.join(embedded_dir, "v1.0-mini", "sample.json")) as f:
        token = json.load(f)[0]["token"]
    tokens = exp.parent / "tokens.txt"
    tokens.write_text(f"{token}\nno_such_token\n\n")
    predict.main(["--save_dir", str(exp), *data_flags(embedded_dir), "--source", str(tokens), "--save_images", "1"])
    entries = predictions(exp)
    assert [(entry["sample_token"], entry["camera"]) for entry in entries] == [(token, "CAM_FRONT"),
                                                                               (token, "CAM_BACK")]
    mosaic = cv2.imread(str(run_folder(exp) / "images" / f"{token}.jpg"))
    assert mosaic.shape[1] == 2 * 320  # the two cameras side by side, at their original size


@pytest.mark.parametrize("source, message", [
    ("missing", "no such file or folder"), ("empty", "the folder holds no files"),
    ("broken.jpg", "no readable image in it"), (None, "--source is required"),
    ("unknown.txt", "none of its 2 tokens is a sample of v1.0-mini"), ("binary.txt", "cannot read it as a text file")])
def test_bad_sources_are_one_line(trained_copy, capsys, source, message, embedded_dir):
    exp, _ = trained_copy
    os.makedirs(exp.parent / "empty")
    (exp.parent / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (exp.parent / "unknown.txt").write_text("no_such_token\nanother\nno_such_token\n")
    (exp.parent / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(SystemExit) as failed:
        predict.main(["--save_dir", str(exp), *data_flags(embedded_dir),
                      *(["--source", str(exp.parent / source)] if source else [])])
    assert failed.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar, if any
    assert error.startswith("error: ") and message in error
