"""predict.py: the detections of test.py for a dataset image, a folder with a broken file and a PNG of another size,
sample tokens through the configured dataset, and its bad inputs."""

import json
import os

import cv2
import numpy as np
import pytest

import predict
import test as test_script
from dataset.NuscenesDataset.loader_2d_obj_det import DatasetLoader
from utils.checkpoint import load_checkpoint


def predictions(exp) -> list:
    return json.loads((exp / "predict" / "predictions.json").read_text())


def test_a_test_image_gets_the_detections_of_test_py(trained_copy):
    """Through predict.py, a test-split image gets test.py's detections: same boxes in original pixels (to float32
    rounding: predict.py runs it alone, test.py in a batch), scores and classes."""
    exp, _ = trained_copy
    test_script.main(["--save_dir", str(exp), "--num_cores", "0"])
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
    drawn = cv2.imread(str(exp / "predict" / "images" / "nested" / "large.png.jpg"))
    assert drawn.shape == (400, 640, 3) and (exp / "predict" / "images" / "a.jpg.jpg").is_file()
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


def test_sample_tokens_read_every_camera_of_the_sample(trained_copy, embedded_dir):
    exp, _ = trained_copy
    with open(os.path.join(embedded_dir, "v1.0-mini", "sample.json")) as f:
        token = json.load(f)[0]["token"]
    tokens = exp.parent / "tokens.txt"
    tokens.write_text(f"{token}\nno_such_token\n\n")
    predict.main(["--save_dir", str(exp), "--source", str(tokens), "--save_images", "1"])
    entries = predictions(exp)
    assert [(entry["sample_token"], entry["camera"]) for entry in entries] == [(token, "CAM_FRONT"),
                                                                               (token, "CAM_BACK")]
    mosaic = cv2.imread(str(exp / "predict" / "images" / f"{token}.jpg"))
    assert mosaic.shape[1] == 2 * 320  # the two cameras side by side, at their original size


@pytest.mark.parametrize("source, message", [
    ("missing", "no such file or folder"), ("empty", "the folder holds no files"),
    ("broken.jpg", "no readable image in it"), (None, "--source is required"),
    ("unknown.txt", "none of its 2 tokens is a sample of v1.0-mini"), ("binary.txt", "cannot read it as a text file")])
def test_bad_sources_are_one_line(trained_copy, capsys, source, message):
    exp, _ = trained_copy
    os.makedirs(exp.parent / "empty")
    (exp.parent / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    (exp.parent / "unknown.txt").write_text("no_such_token\nanother\nno_such_token\n")
    (exp.parent / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(SystemExit) as failed:
        predict.main(["--save_dir", str(exp), *(["--source", str(exp.parent / source)] if source else [])])
    assert failed.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar, if any
    assert error.startswith("error: ") and message in error
