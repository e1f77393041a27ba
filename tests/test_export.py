"""export.py: the ONNX file against the PyTorch model with ONNX Runtime, and the weights fetcher (offline, a file
already there)."""

import hashlib
import json
import os
import urllib.error

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

import export
import helper
from models import fetch_weights
from models.Yolo.boxes import postprocess_detections
from utils.checkpoint import load_checkpoint


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(trained_copy, embedded_dir, capsys):
    """ONNX Runtime on the CPU against the EMA model on test images, 3 of them where the export traced 2: boxes
    within 1e-3 px, scores within 1e-5, and the same detections after the documented post-processing."""
    exp, _ = trained_copy
    export.main(["--save_dir", str(exp), "--dynamic_batch", "1"])
    log = capsys.readouterr().out
    assert "parity on 3 images: boxes differs by at most" in log and "ONNX Runtime" in log and "latency" in log
    path = str(exp / "export" / "best.onnx")
    metadata = {entry.key: json.loads(entry.value) for entry in onnx.load(path).metadata_props}
    assert metadata["input_size"] == [96, 64] and len(metadata["class_names"]) == 10

    state = load_checkpoint(str(exp / "best.pt"))
    solver = helper.load_solver(state["config"], device=torch.device("cpu"), class_names=metadata["class_names"],
                                steps_per_epoch=0)
    solver.load_weights(state)
    test_set, _ = helper.load_datasetloader(state["config"], 1, 0, "test")
    images = torch.cat([test_set[0]["images"], test_set[1]["images"][:1]])  # (3, 3, 64, 96) uint8
    with torch.no_grad():
        model = solver.evaluated_model()
        outputs = model(images[:, None])
        boxes, scores = outputs["boxes"], model.scores(outputs)
    onnx_boxes, onnx_scores = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
        ["boxes", "scores"], {"images": images.numpy()})
    np.testing.assert_allclose(onnx_boxes, boxes.numpy(), atol=1e-3)
    np.testing.assert_allclose(onnx_scores, scores.numpy(), atol=1e-5)
    ours = postprocess_detections(boxes, scores, image_size=(96, 64), **metadata["postprocess"])
    theirs = postprocess_detections(torch.from_numpy(onnx_boxes), torch.from_numpy(onnx_scores), image_size=(96, 64),
                                    **metadata["postprocess"])
    assert torch.equal(ours["labels"], theirs["labels"]) and torch.equal(ours["image_index"], theirs["image_index"])
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-3, rtol=0)


def test_export_of_a_solver_without_export_module_is_one_line(trained_copy, capsys, monkeypatch):
    exp, _ = trained_copy
    monkeypatch.delattr(helper.solver_class("Yolo"), "export_module")
    with pytest.raises(SystemExit) as failed:
        export.main(["--save_dir", str(exp)])
    assert failed.value.code == 2 and "cannot be exported" in capsys.readouterr().err


def test_fetch_weights_offline_says_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(SystemExit) as failed:
        fetch_weights.main(["--backbone", "resnet18"])
    error = capsys.readouterr().err.strip()
    assert failed.value.code == 2 and "\n" not in error
    assert os.path.join(str(tmp_path), "checkpoints", "resnet18-f37072fd.pth") in error and "copy it to" in error


def test_fetch_weights_checks_a_file_already_there(tmp_path, monkeypatch, capsys):
    """A partial copy under the weights' name is named with what to do, not taken as the weights; a file with the
    hash its name says is taken."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir()
    path.write_bytes(b"the first megabytes of a download")
    with pytest.raises(SystemExit) as failed:
        fetch_weights.main(["--backbone", "resnet18"])
    error = capsys.readouterr().err.strip()
    assert failed.value.code == 2 and "\n" not in error
    assert f"{path} is not the file of https://" in error and "not f37072fd): delete it" in error
    content = b"weights whose hash the file name carries"
    named = tmp_path / f"resnet18-{hashlib.sha256(content).hexdigest()[:8]}.pth"
    named.write_bytes(content)
    monkeypatch.setattr(fetch_weights, "weights_path", lambda backbone: str(named))
    fetch_weights.main(["--backbone", "resnet18"])
    assert f"already at {named}" in capsys.readouterr().out
