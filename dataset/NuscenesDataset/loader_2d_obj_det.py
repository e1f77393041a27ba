"""nuScenes 2D object detection on all cameras: one item is one sample (keyframe) with its N_cam camera images.

Labels come from the COCO label cache (labels.py), so nothing is re-projected while training. Images are decoded
at a reduced scale where the input size allows (libjpeg's DCT scaling, through OpenCV) and resized to the input
size of config/data.json.

An item is a dict:
    images      (N_cam, 3, H, W) `dtype`, normalized with data.json "normalize"; (H, W) = data.json "image"
    boxes       (M, 4) float32 x1, y1, x2, y2 in the model's input pixels, the cameras' boxes one after another
    labels      (M,) int64 class index 0..9 in the devkit's DETECTION_NAMES order (= COCO category_id - 1)
    counts      (N_cam,) int64 boxes of each camera (they sum to M)
    image_ids   (N_cam,) int64 COCO image ids in the label cache
    orig_sizes  (N_cam, 2) int64 original (width, height) in px; without augmentation, original pixels are
                input pixels * orig_size / input_size
`utils.collate.collate_detection` batches items.
"""

import logging
import os
import random
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.labels import CATEGORY_IDS, label_cache
from utils.collate import collate_detection
from utils.config import NUMBER_RANGE, TEXT, Rule, list_of, number
from utils.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODES = ("train", "val", "test")
VAL_SPLIT_SEED = 0  # fixed, so that the train/val scene split never depends on the run's --seed
REDUCED_DECODING = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                    (2, cv2.IMREAD_REDUCED_COLOR_2), (1, cv2.IMREAD_COLOR))  # (scale divisor, cv2 flag)

# config/data.json values that every nuScenes loader reads (keys within data.<app_mode>), checked before work starts
COMMON_RULES = {
    "data.dataset_dir": TEXT,
    "data.version": TEXT,
    "data.cameras": Rule(lambda value: list_of(TEXT).check(value) and len(set(value)) == len(value),
                         "a list of one or more different camera channels"),
    "data.embedded.samples_per_scene": number(1, integer=True),
    "data.embedded.width": number(32, integer=True),
    "data.embedded.height": number(32, integer=True),
    "data.embedded.seed": number(0, integer=True),
    "data.image.w": number(1, integer=True),
    "data.image.h": number(1, integer=True),
    "data.normalize.mean": list_of(number(), length=3),
    "data.normalize.std": list_of(number(0, low_open=True), length=3),
    "data.augmentation.brightness": number(0),
    "data.augmentation.contrast": number(0),
    "data.augmentation.saturation": number(0),
    "data.augmentation.hue": number(0, 0.5),
}

logger = logging.getLogger(__name__)


def project_path(path: str) -> str:
    """Paths in config/*.json are relative to the project folder."""
    return str((PROJECT_ROOT / path).resolve())


def resolve_dataroot(args: dict, cfg: dict) -> str:
    """The dataset folder: --dataset_dir if given, else data.json's. The embedded dataset's folder is created
    when missing; any other missing folder is an error (raised when the labels are loaded)."""
    dataroot = os.path.abspath(args["dataset_dir"]) if args.get("dataset_dir") else project_path(cfg["dataset_dir"])
    embedded = cfg["embedded"]
    if dataroot == project_path(embedded["dataset_dir"]) and not os.path.exists(dataroot):
        logger.info("dataset_dir %s is missing: generating the embedded nuScenes dataset there", dataroot)
        synthetic.generate(dataroot, embedded["samples_per_scene"], embedded["width"], embedded["height"],
                           embedded["seed"])
    return dataroot


def train_val_scenes(scene_names: list, val_ratio: float) -> tuple:
    """Split the training scenes into (train, val) scene lists, deterministically: a fixed-seed shuffle of the
    sorted names, the first round(val_ratio * n) (at least one) going to val."""
    if not 0.0 < val_ratio < 1.0:
        raise UserError(f"--val_ratio {val_ratio}: must be between 0 and 1 (the share of training scenes for val)")
    if len(scene_names) < 2:
        raise UserError(f"--val_ratio needs at least 2 training scenes to split; found {len(scene_names)}")
    shuffled = sorted(scene_names)
    random.Random(VAL_SPLIT_SEED).shuffle(shuffled)
    n_val = min(max(1, round(val_ratio * len(shuffled))), len(shuffled) - 1)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def build_augmentation(cfg: dict) -> v2.Compose:
    """Training augmentation of one camera image with its boxes: horizontal flip, photometric jitter, scale and
    translate jitter; boxes follow the image, are clipped to it and dropped below `min_box_size` input px."""
    return v2.Compose([
        v2.RandomHorizontalFlip(cfg["hflip_prob"]),
        v2.ColorJitter(cfg["brightness"], cfg["contrast"], cfg["saturation"], cfg["hue"]),
        v2.RandomAffine(degrees=0.0, translate=(cfg["translate"], cfg["translate"]), scale=tuple(cfg["scale"])),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=cfg["min_box_size"]),
    ])


def read_image(path: str, size: tuple, full_size: tuple) -> torch.Tensor:
    """Decode the JPEG at `path`, of full_size = (W, H) px, resized to size = (W, H): (3, H, W) uint8 RGB.

    libjpeg's DCT scaling decodes at 1/8, 1/4 or 1/2 of full size, whichever is the smallest still at least
    `size`, so that little is decoded only to be thrown away by the resize."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise UserError(f"cannot read image {path} ({error}): restore the file or regenerate the dataset") from None
    if not data.rstrip(b"\0").endswith(b"\xff\xd9"):  # libjpeg would return a silently grey-padded image
        raise UserError(f"cannot read image {path} (not a complete JPEG file): restore the file or regenerate "
                        f"the dataset")
    factor, flag = next((f, flag) for f, flag in REDUCED_DECODING
                        if full_size[0] // f >= size[0] and full_size[1] // f >= size[1])
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if image is None:
        raise UserError(f"cannot read image {path} (not a JPEG file): restore the file or regenerate the dataset")
    if (image.shape[1], image.shape[0]) != tuple(size):
        # the reduced decode leaves less than a 2x downscale, where bilinear interpolation does not alias much
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)


class DatasetLoader(Dataset):
    """Samples of one mode: train and val split the training scenes by --val_ratio, test is the official
    validation split (mini_val on v1.0-mini).

    args: the merged configuration dict; this reads args["app_mode"], args["dataset_dir"] (None: data.json's),
    args["val_ratio"], args["bool_apply_img_aug"] and args["data"][app_mode] (config/data.json).
    dtype: the images' dtype. world_size and rank are the original's signature; under DDP the sampler shards.
    """

    class_names = list(CATEGORY_IDS)  # label index -> detection class name
    collate_fn = staticmethod(collate_detection)
    config_rules = {  # see helper.check_config
        **COMMON_RULES,
        "data.label_cache_dir": TEXT,
        "data.labels.visibilities": Rule(lambda value: isinstance(value, list) and len(value) > 0
                                         and set(value) <= {"", "1", "2", "3", "4"},
                                         'a list of one or more of the visibility tokens "", "1", "2", "3", "4"'),
        "data.labels.min_box_size": number(0),
        "data.augmentation.hflip_prob": number(0, 1),
        "data.augmentation.scale": Rule(lambda value: NUMBER_RANGE.check(value) and value[0] > 0,
                                        "[low, high] with 0 < low < high"),
        "data.augmentation.translate": number(0, 1),
        "data.augmentation.min_box_size": number(0),
    }

    def __init__(self, args: dict, dtype=torch.float32, world_size: int = 1, rank: int = 0, mode: str = "train"):
        if mode not in MODES:
            raise UserError(f"mode '{mode}': choose one of {', '.join(MODES)}")
        cfg = args["data"][args["app_mode"]]
        self.dtype, self.mode = dtype, mode
        self.dataroot = resolve_dataroot(args, cfg)
        version = cfg["version"]
        if version not in cfg["splits"]:
            raise UserError(f"version '{version}' has no entry in 'splits' of config/data.json "
                            f"(entries: {', '.join(cfg['splits'])})")
        split = cfg["splits"][version]["test" if mode == "test" else "train"]
        cache_dir = project_path(cfg["label_cache_dir"])
        self.coco_path, coco = label_cache(self.dataroot, version, split, cfg["labels"], cache_dir)

        scene_names = sorted({image["scene_name"] for image in coco["images"]})
        if mode != "test":
            train_scenes, val_scenes = train_val_scenes(scene_names, args["val_ratio"])
            scene_names = train_scenes if mode == "train" else val_scenes
        self.samples = self.group_by_sample(coco["images"], set(scene_names), cfg["cameras"])
        self.image_ids = [image["id"] for sample in self.samples for image in sample]
        self.check_files_exist()

        boxes, labels = defaultdict(list), defaultdict(list)
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            boxes[ann["image_id"]].append((x, y, x + w, y + h))
            labels[ann["image_id"]].append(ann["category_id"] - 1)
        self.boxes = {i: np.array(boxes[i], dtype=np.float32).reshape(-1, 4) for i in self.image_ids}
        self.labels = {i: np.array(labels[i], dtype=np.int64) for i in self.image_ids}

        self.input_size = (cfg["image"]["w"], cfg["image"]["h"])
        # normalized = pixel * scale + bias = (pixel / 255 - mean) / std, one fused op per image
        std = torch.tensor(cfg["normalize"]["std"]).view(3, 1, 1)
        self.scale = 1.0 / (255.0 * std)
        self.bias = -torch.tensor(cfg["normalize"]["mean"]).view(3, 1, 1) / std
        augment = mode == "train" and bool(args["bool_apply_img_aug"])
        self.augmentation = build_augmentation(cfg["augmentation"]) if augment else None

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Items' images (..., 3, H, W) back to uint8 RGB, for drawing."""
        return ((images.float() - self.bias) / self.scale).round().clamp(0, 255).to(torch.uint8)

    @staticmethod
    def group_by_sample(images: list, scene_names: set, cameras: list) -> list:
        """[[image record of each camera in `cameras` order] for each sample of `scene_names`], in cache order."""
        by_sample = defaultdict(dict)
        for image in images:
            if image["scene_name"] in scene_names:
                by_sample[image["sample_token"]][image["channel"]] = image
        samples = []
        for sample_token, by_channel in by_sample.items():
            missing = [channel for channel in cameras if channel not in by_channel]
            if missing:
                raise UserError(f"sample {sample_token} has no {missing[0]} image: set 'cameras' in config/data.json "
                                f"to channels of the dataset ({', '.join(sorted(by_channel))})")
            samples.append([by_channel[channel] for channel in cameras])
        return samples

    def check_files_exist(self) -> None:
        """Fail before training starts, not hours into it, when images are missing."""
        paths = [os.path.join(self.dataroot, image["file_name"]) for sample in self.samples for image in sample]
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise UserError(f"image {missing[0]} is missing ({len(missing)} of {len(paths)} images are): "
                            f"restore the dataset folder or regenerate it")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        width, height = self.input_size
        images, boxes, labels, counts = [], [], [], []
        for image in self.samples[index]:
            pixels = read_image(os.path.join(self.dataroot, image["file_name"]), self.input_size,
                                (image["width"], image["height"]))
            scale = np.array([width / image["width"], height / image["height"]] * 2, dtype=np.float32)
            image_boxes = torch.from_numpy(self.boxes[image["id"]] * scale)
            image_labels = torch.from_numpy(self.labels[image["id"]])
            if self.augmentation is not None:
                out = self.augmentation({
                    "image": tv_tensors.Image(pixels),
                    "boxes": tv_tensors.BoundingBoxes(image_boxes, format="XYXY", canvas_size=(height, width)),
                    "labels": image_labels})
                pixels, image_boxes, image_labels = out["image"], out["boxes"].as_subclass(torch.Tensor), out["labels"]
            images.append(torch.addcmul(self.bias, pixels.float(), self.scale).to(self.dtype))
            boxes.append(image_boxes)
            labels.append(image_labels)
            counts.append(len(image_labels))
        return {"images": torch.stack(images), "boxes": torch.cat(boxes).float(), "labels": torch.cat(labels),
                "counts": torch.tensor(counts, dtype=torch.int64),
                "image_ids": torch.tensor([image["id"] for image in self.samples[index]], dtype=torch.int64),
                "orig_sizes": torch.tensor([(image["width"], image["height"]) for image in self.samples[index]],
                                           dtype=torch.int64)}
