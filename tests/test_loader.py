"""The multi-camera loader: splits, item contract, image decoding, collate, the embedded dataset on demand."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from dataset.NuscenesDataset import common as loader_module
from dataset.NuscenesDataset.collate_2d import collate_detection
from dataset.NuscenesDataset.common import read_image, train_val_scenes
from dataset.NuscenesDataset.loader_2d_obj_det import DatasetLoader, images_on_device
from utils.distributed import SeededItems
from utils.errors import UserError
from utils.normalize import NormalizeImages


def test_modes_split_scenes_deterministically(embedded_dir, make_args):
    args = make_args(embedded_dir)

    def scene_names(dataset):
        images = {image["id"]: image for image in dataset.coco_ground_truth()["images"]}
        return {images[image_id]["scene_name"] for image_id in dataset.image_ids.tolist()}

    scenes = {mode: scene_names(DatasetLoader(args, mode=mode)) for mode in ("train", "val", "test")}
    assert not scenes["train"] & scenes["val"]
    assert len(scenes["train"] | scenes["val"]) == 8 and len(scenes["val"]) == 2  # round(0.25 * 8)
    assert scenes["test"] == {"scene-0103", "scene-0916"}
    assert train_val_scenes(sorted(scenes["train"] | scenes["val"]), 0.25)[1] == sorted(scenes["val"])
    assert len(train_val_scenes([f"s{i}" for i in range(8)], 0.01)[1]) == 1  # val is never empty


def test_item_contract_and_boxes_in_input_pixels(embedded_dir, make_args):
    args = make_args(embedded_dir)
    dataset = DatasetLoader(args, mode="test")
    coco = dataset.coco_ground_truth()
    cameras = args["data"]["2DObjDet"]["cameras"]
    item = dataset[1]
    assert item["images"].shape == (6, 3, 96, 160) and item["images"].dtype == torch.uint8
    assert item["boxes"].shape == (int(item["counts"].sum()), 4) and item["labels"].dtype == torch.int64
    assert item["orig_sizes"].tolist() == [[320, 180]] * 6
    images = {image["id"]: image for image in coco["images"]}
    assert [images[i]["channel"] for i in item["image_ids"].tolist()] == cameras
    expected = []
    for image_id in item["image_ids"].tolist():
        for ann in coco["annotations"]:
            if ann["image_id"] == image_id:
                x, y, w, h = ann["bbox"]
                expected.append([x * 0.5, y * 96 / 180, (x + w) * 0.5, (y + h) * 96 / 180, ann["category_id"] - 1])
    got = torch.cat([item["boxes"], item["labels"][:, None].float()], dim=1)
    assert got.numpy() == pytest.approx(np.array(expected, dtype=np.float32).reshape(-1, 5), abs=1e-4)
    # workers send uint8; the model's first layer normalizes exactly as the loader's transforms.v2 did before
    normalize = args["data"]["2DObjDet"]["normalize"]
    expected = v2.Normalize(normalize["mean"], normalize["std"])(v2.ToDtype(torch.float32, scale=True)(item["images"]))
    assert torch.equal(NormalizeImages(normalize["mean"], normalize["std"])(item["images"]), expected)


@pytest.mark.parametrize("size", [(400, 224), (200, 112), (1600, 900), (640, 480), (1920, 1088)])
def test_reduced_scale_decoding_matches_full_decoding(tmp_path, size):
    """At a reduced scale where the input is smaller than the image, at full scale (then upscaled) where larger."""
    rng = np.random.default_rng(0)
    big = np.kron(rng.integers(0, 255, size=(9, 16, 3)), np.ones((100, 100, 1))).astype(np.uint8)  # 900x1600 RGB
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=95)
    fast = read_image(str(path), size, (1600, 900)).float()
    full = torch.from_numpy(np.array(Image.open(path).convert("RGB").resize(size, Image.BILINEAR)))
    assert fast.shape == (3, size[1], size[0])
    assert (fast - full.permute(2, 0, 1).float()).abs().mean() < 6  # of 255: other resampling, same picture


def test_collate_folds_cameras_and_indexes_boxes(embedded_dir, make_args):
    dataset = DatasetLoader(make_args(embedded_dir), mode="train")
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_detection, num_workers=1)
    batch = next(iter(loader))
    assert batch["images"].shape == (3, 6, 3, 96, 160) and batch["counts"].shape == (3, 6)
    assert batch["boxes"].shape == (batch["counts"].sum(), 4)
    assert torch.bincount(batch["box_image_index"], minlength=18).tolist() == batch["counts"].flatten().tolist()
    items = [dataset[i] for i in range(3)]
    assert torch.equal(batch["boxes"], torch.cat([item["boxes"] for item in items]))


def test_augmented_items_keep_boxes_inside_the_image(embedded_dir, make_args):
    torch.manual_seed(0)
    dataset = DatasetLoader(make_args(embedded_dir, bool_apply_img_aug=1), mode="train")
    assert dataset.augmentation is not None
    assert DatasetLoader(make_args(embedded_dir, bool_apply_img_aug=1), mode="val").augmentation is None
    for index in range(len(dataset)):
        item = dataset[index]
        boxes = item["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 96).all()
        assert (boxes[:, 2] - boxes[:, 0] >= 2).all() and (boxes[:, 3] - boxes[:, 1] >= 2).all()
        assert len(item["labels"]) == len(boxes) == int(item["counts"].sum())


def test_missing_embedded_dataset_is_generated_in_one_line(tmp_path, make_args, caplog):
    target = tmp_path / "embedded"
    embedded = {"dataset_dir": str(target), "samples_per_scene": 2, "width": 96, "height": 64, "seed": 1}
    args = make_args(None, data={"dataset_dir": str(target), "embedded": embedded})
    with caplog.at_level(logging.INFO, logger=loader_module.__name__):
        dataset = DatasetLoader(args, mode="test")
    assert len(dataset) == 4 and os.path.isdir(target / "samples" / "CAM_BACK")
    messages = [r.getMessage() for r in caplog.records if r.name == loader_module.__name__]
    assert len(messages) == 1 and str(target) in messages[0] and "\n" not in messages[0]


def test_other_missing_dataset_dir_is_an_error_not_a_generation(tmp_path, make_args):
    missing = tmp_path / "elsewhere"
    with pytest.raises(UserError, match=f"{missing} does not exist.*synthetic --out"):
        DatasetLoader(make_args(str(missing)), mode="train")
    assert not missing.exists()


@pytest.mark.parametrize("augment", [0, 1], ids=["no_augmentation", "augmentation"])
def test_device_decode_gives_the_cpu_path_boxes_and_its_images_within_tolerance(embedded_dir, make_args, augment):
    """data.json "decode": "device" run with device="cpu" (the same code as on CUDA, where decode_jpeg is nvJPEG):
    the same boxes and labels exactly as the workers' decode, for the same item seeds, and images within a
    stated tolerance: full-size decode and an antialiased resize against libjpeg's reduced-scale decode and a
    bilinear one differ by under 1.5 grey levels on average, more than 16 on under 1 % of the values (measured at
    1600x900 -> 320x192: 0.4-0.6 levels and 0.04-0.12 %)."""
    cpu = SeededItems(DatasetLoader(make_args(embedded_dir, bool_apply_img_aug=augment), mode="train"))
    device = SeededItems(DatasetLoader(make_args(embedded_dir, bool_apply_img_aug=augment,
                                                 data={"decode": "device"}), mode="train"))
    keys = [(index, 1000 + index) for index in range(3)]
    expected = collate_detection([cpu[key] for key in keys])
    batch = collate_detection([device[key] for key in keys])
    assert "images" not in batch and len(batch["jpegs"]) == len(batch["augmentation"]) == 3 * 6
    for key in ("boxes", "labels", "box_image_index", "target_boxes", "counts", "image_ids"):
        assert torch.equal(batch[key], expected[key]), key
    images = images_on_device(batch, device.dataset.input_size, torch.device("cpu"))
    assert images.shape == expected["images"].shape and images.dtype == torch.uint8
    difference = (images.float() - expected["images"].float()).abs()
    assert difference.mean() < 1.5 and (difference > 16).float().mean() < 0.01
