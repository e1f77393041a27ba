"""ImageNet weights from torch's hub cache (models/Yolo/yolo.py build_backbone): a file that is not the published one,
or holds more than tensors, is one line saying what to do and runs no code; a good file loads as torch.load gives it."""

import hashlib
import io
import os

import pytest
import torch
import torchvision

from models.Yolo import yolo
from utils.errors import UserError

REFETCH = "delete it and run python -m models.fetch_weights --backbone resnet18"


class Payload:
    """Unpickling it creates the file `marker`: what a planted pickle could do instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def saved(obj) -> bytes:
    """What torch.save writes for `obj`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def hub_checkpoints(tmp_path, monkeypatch):
    """A temp TORCH_HOME (which torch.hub.get_dir and so weights_path read); its hub cache's checkpoints folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def plant(tmp_path, monkeypatch, content: bytes) -> str:
    """Put `content` in the hub cache as resnet18's weights under a name carrying its own SHA-256 prefix, so that it
    passes the hash check as the published file does (BACKBONES gets a torchvision weights entry of that name); the
    file's path."""
    constructor, weights, channels = yolo.BACKBONES["resnet18"]
    url = weights.url.replace("f37072fd", hashlib.sha256(content).hexdigest()[:8])
    planted = torchvision.models.WeightsEnum("Planted", {"IMAGENET1K_V1": torchvision.models.Weights(
        url=url, transforms=None, meta={})})
    monkeypatch.setitem(yolo.BACKBONES, "resnet18", (constructor, planted.IMAGENET1K_V1, channels))
    path = hub_checkpoints(tmp_path, monkeypatch) / os.path.basename(url)
    path.write_bytes(content)
    assert yolo.weights_path("resnet18") == str(path)
    return str(path)


def test_planted_pickle_under_the_published_name_is_one_line_and_runs_no_code(tmp_path, monkeypatch):
    """The published name, another file (its hash is not the name's): refused before it is opened as a pickle."""
    marker = tmp_path / "payload_ran"
    path = hub_checkpoints(tmp_path, monkeypatch) / "resnet18-f37072fd.pth"
    path.write_bytes(saved(Payload(str(marker))))
    with pytest.raises(UserError) as error:
        yolo.build_backbone("resnet18", pretrained=True, freeze_batchnorm=False)
    message = str(error.value)
    assert not marker.exists() and "\n" not in message
    assert message.startswith(f"{path} is not the file of https://download.pytorch.org/models/resnet18-f37072fd.pth "
                              f"(its SHA-256 starts ") and message.endswith(f", not f37072fd): {REFETCH}")


@pytest.mark.parametrize("damage", ["pickle with code", "truncated", "not a zip", "wrong shapes"])
def test_damaged_file_with_the_hash_its_name_says_is_one_line_and_runs_no_code(tmp_path, monkeypatch, damage):
    """What the hash check cannot catch (a name carries 32 bits of the hash, which a forger can match)."""
    marker = tmp_path / "payload_ran"
    content = {"pickle with code": saved(Payload(str(marker))),
               "truncated": saved({"conv1.weight": torch.zeros(64, 3, 7, 7)})[:1000],
               "not a zip": b"the first megabytes of a download",
               "wrong shapes": saved({"conv1.weight": torch.zeros(1)})}[damage]
    path = plant(tmp_path, monkeypatch, content)
    with pytest.raises(UserError) as error:
        yolo.build_backbone("resnet18", pretrained=True, freeze_batchnorm=False)
    message = str(error.value)
    assert not marker.exists() and "\n" not in message
    assert path in message and message.endswith(f": {REFETCH}")


def test_good_file_loads_as_torch_load_gives_it(tmp_path, monkeypatch):
    """resnet18's tensors (others than a fresh model's) in the hub cache: the backbone holds them, read by torch.load
    with weights_only=True (torchvision's get_state_dict reads with weights_only=False)."""
    torch.manual_seed(0)
    path = plant(tmp_path, monkeypatch, saved(torchvision.models.resnet18().state_dict()))
    expected = torch.load(path, map_location="cpu", weights_only=True)
    load, loads = torch.load, []

    def recording_load(*args, **kwargs):
        loads.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    extractor, channels = yolo.build_backbone("resnet18", pretrained=True, freeze_batchnorm=False)
    assert loads and all(kwargs.get("weights_only") is True for kwargs in loads)
    state = extractor.state_dict()
    assert channels == (128, 256, 512) and state.keys() == expected.keys() - {"fc.weight", "fc.bias"}
    assert all(torch.equal(state[key], expected[key]) for key in state)
