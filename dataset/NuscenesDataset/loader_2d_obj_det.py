"""nuScenes 2D object detection on all cameras: one item is one sample (keyframe) with its N_cam camera images.

Labels come from the COCO label cache (labels.py), so nothing is re-projected while training. Images are decoded
at a reduced scale where the input size allows (libjpeg's DCT scaling, through OpenCV) and resized to the input
size of config/data.json.

An item is a dict:
    images      (N_cam, 3, H, W) uint8 RGB; (H, W) = data.json "image" (the model normalizes them on its
                 device with data.json "normalize": workers send a quarter of float32's bytes). With data.json
                 "decode": "device", instead: jpegs, a list of N_cam (bytes,) uint8 JPEG files, jpeg_paths
                 (their paths, for errors) and augmentation, a list of N_cam Augmentation.draw parameters (None
                 without augmentation), from which images_on_device makes the images on the training device
    boxes       (M, 4) float32 x1, y1, x2, y2 in the model's input pixels, the cameras' boxes one after another
    labels      (M,) int64 class index 0..9 in the devkit's DETECTION_NAMES order (= COCO category_id - 1)
    counts      (N_cam,) int64 boxes of each camera (they sum to M)
    image_ids   (N_cam,) int64 COCO image ids in the label cache
    orig_sizes  (N_cam, 2) int64 original (width, height) in px; without augmentation, original pixels are
                input pixels * orig_size / input_size
`dataset.NuscenesDataset.collate_2d.collate_detection` batches items.
"""

import os

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dataset.NuscenesDataset.collate_2d import collate_detection
from dataset.NuscenesDataset.common import (
    COMMON_RULES,
    VISIBILITIES,
    check_images_exist,
    decode_image,
    decode_jpeg,
    mode_scenes,
    project_path,
    read_image_file,
    read_jpeg,
    resolve_dataroot,
    version_split,
)
from dataset.NuscenesDataset.labels import CATEGORY_IDS, coco_from_labels, label_arrays, load_nuscenes
from utils.config import NUMBER_RANGE, TEXT, Rule, check_values, number, one_of
from utils.errors import UserError

# the colour jitter's kernels by v2.ColorJitter's fn_idx numbering, with the name of their drawn factor
COLOUR_KERNELS = ((F.adjust_brightness, "brightness_factor"), (F.adjust_contrast, "contrast_factor"),
                  (F.adjust_saturation, "saturation_factor"), (F.adjust_hue, "hue_factor"))
LEVELS = np.arange(256, dtype=np.float32)  # the uint8 grey levels, for look-up tables
GREY_WEIGHTS = np.array([[0.2989, 0.587, 0.114, -0.5]], dtype=np.float32)  # R, G, B of F.rgb_to_grayscale; offset


class Augmentation:
    """Training augmentation of one camera image and its boxes: horizontal flip, colour jitter (brightness,
    contrast, saturation, hue in a random order), scale and translate jitter, as torchvision's transforms.v2
    define them; boxes follow the image, are clipped to it and dropped below `min_box_size` input px.

    The parameters are drawn first (`draw`, from torch's generator), then applied to the boxes (`boxes`, with
    transforms.v2) and to the image: by the workers with OpenCV (`augment_array`), or with data.json "decode":
    "device" by the main process on the training device with transforms.v2's kernels (`augment_image`), the
    worker having transformed the boxes with the same parameters."""

    def __init__(self, cfg: dict):
        self.flip_prob = cfg["hflip_prob"]
        self.jitter = v2.ColorJitter(cfg["brightness"], cfg["contrast"], cfg["saturation"], cfg["hue"])
        self.affine = v2.RandomAffine(degrees=0.0, translate=(cfg["translate"], cfg["translate"]),
                                      scale=tuple(cfg["scale"]))
        self.sanitize = v2.Compose([v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=cfg["min_box_size"])])

    def draw(self, boxes: tv_tensors.BoundingBoxes) -> dict:
        """The parameters of one image's augmentation (its canvas size is the boxes'): flip (bool), jitter (the
        order fn_idx, a list of 4, and the factors, None where the range is 0) and affine (F.affine's
        arguments). Plain values: the main process reads nothing from a tensor to apply them."""
        jitter = self.jitter.make_params([])
        return {"flip": bool(torch.rand(1) < self.flip_prob), "jitter": {**jitter, "fn_idx": jitter["fn_idx"].tolist()},
                "affine": self.affine.make_params([boxes])}

    def boxes(self, boxes: tv_tensors.BoundingBoxes, labels: torch.Tensor, params: dict) -> tuple:
        """(boxes (n, 4) float32 input px, labels (n,)) after the augmentation of `params`."""
        if params["flip"]:
            boxes = F.horizontal_flip(boxes)
        boxes = F.affine(boxes, **params["affine"])
        out = self.sanitize({"boxes": boxes, "labels": labels})
        return out["boxes"].as_subclass(torch.Tensor), out["labels"]


def augment_image(image: torch.Tensor, params: dict) -> torch.Tensor:
    """(3, H, W) uint8 image, on any device, after the augmentation of `params` (Augmentation.draw): flip, the
    colour jitter in its drawn order, then the affine (nearest-pixel sampling, black outside)."""
    if params["flip"]:
        image = F.horizontal_flip(image)
    jitter = params["jitter"]
    for fn_id in jitter["fn_idx"]:
        kernel, factor = COLOUR_KERNELS[fn_id]
        if jitter[factor] is not None:
            image = kernel(image, jitter[factor])
    return F.affine(image, **params["affine"], interpolation=v2.InterpolationMode.NEAREST, fill=0)


def brightness_opencv(image: np.ndarray, factor: float) -> np.ndarray:
    """F.adjust_brightness of an (H, W, 3) uint8 image, as a look-up table."""
    return cv2.LUT(image, np.clip(LEVELS * factor, 0, 255).astype(np.uint8))


def grey_levels(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 grey levels of an (H, W, 3) uint8 RGB image, rounded down with torchvision's weights (OpenCV's
    own RGB2GRAY rounds to nearest, with other weights): OpenCV rounds, so half a level less rounds down."""
    return cv2.transform(image, GREY_WEIGHTS)


def contrast_opencv(image: np.ndarray, factor: float) -> np.ndarray:
    """F.adjust_contrast: a blend with the image's mean grey level, as a look-up table."""
    mean_grey = cv2.mean(grey_levels(image))[0]
    return cv2.LUT(image, np.clip(LEVELS * factor + (1.0 - factor) * mean_grey, 0, 255).astype(np.uint8))


def saturation_opencv(image: np.ndarray, factor: float) -> np.ndarray:
    """F.adjust_saturation: a blend with each pixel's grey level, rounded down as torchvision's uint8 blend."""
    grey = cv2.cvtColor(grey_levels(image), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, factor, grey, 1.0 - factor, -0.5)


def hue_opencv(image: np.ndarray, factor: float) -> np.ndarray:
    """F.adjust_hue: the hue turned by `factor` of a full turn, in float32 HSV (uint8 HSV would lose levels)."""
    hsv = cv2.cvtColor(image.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2HSV)  # H in degrees
    hue = hsv[..., 0]
    np.remainder(hue + np.float32(360 * factor), 360, out=hue)
    return (cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * np.float32(255.999)).astype(np.uint8)  # as F.to_dtype


OPENCV_COLOUR_KERNELS = (brightness_opencv, contrast_opencv, saturation_opencv, hue_opencv)  # by fn_idx


def augment_array(image: np.ndarray, params: dict) -> np.ndarray:
    """augment_image of an (H, W, 3) uint8 RGB array on the CPU, with OpenCV kernels: the workers' path.

    torchvision's tensor kernels take about 36 ms per 640x352 image on one core (adjust_hue 23 of them: float HSV
    in several passes over the image), these about 6.5 ms (bench.throughput's augment stage times both). Each
    kernel is within one grey level of torchvision's, the whole within two (tested), but where the affine's
    source pixel is within rounding of a half pixel: OpenCV's fixed-point nearest pixel may then be the
    neighbour of grid_sample's."""
    if params["flip"]:
        image = cv2.flip(image, 1)
    jitter = params["jitter"]
    for fn_id in jitter["fn_idx"]:
        factor = jitter[COLOUR_KERNELS[fn_id][1]]
        if factor is not None:
            image = OPENCV_COLOUR_KERNELS[fn_id](image, factor)
    affine = params["affine"]
    if affine["angle"] != 0.0 or any(affine["shear"]):
        raise ValueError("augment_array applies scale and translation only")
    # F.affine's inverse map about the image centre c = ((W - 1) / 2, (H - 1) / 2), in pixel indices:
    # source = (target - c - translate) / scale + c
    height, width = image.shape[:2]
    scale, centre = affine["scale"], np.array([(width - 1) / 2, (height - 1) / 2])
    offset = centre - (centre + np.asarray(affine["translate"], dtype=np.float64)) / scale
    inverse = np.array([[1 / scale, 0.0, offset[0]], [0.0, 1 / scale, offset[1]]])
    return cv2.warpAffine(image, inverse, (width, height), flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def images_on_device(batch: dict, size: tuple, device: torch.device) -> torch.Tensor:
    """The (B, N_cam, 3, H, W) uint8 images of a batch of decode "device" items, made on `device`: the JPEGs
    decoded there (torchvision's decode_jpeg, through common.decode_jpeg: nvJPEG on CUDA, libjpeg-turbo on the
    CPU), resized to size = (W, H) (antialiased bilinear from full size) and augmented with the parameters the
    workers drew."""
    width, height = size
    try:
        decoded = decode_jpeg(batch["jpegs"], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # find the file, and say what the workers' decode would say
        for data, path in zip(batch["jpegs"], batch["jpeg_paths"], strict=True):
            try:
                decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                raise UserError(f"cannot read image {path} (not a JPEG file): restore the file or regenerate "
                                f"the dataset") from None
        raise
    if len({image.shape for image in decoded}) == 1:  # one resize call for the batch (nuScenes: all 1600x900)
        images = list(F.resize(torch.stack(decoded), [height, width], antialias=True))
    else:
        images = [F.resize(image, [height, width], antialias=True) for image in decoded]
    images = [image if params is None else augment_image(image, params)
              for image, params in zip(images, batch["augmentation"], strict=True)]
    return torch.stack(images).view(*batch["counts"].shape, 3, height, width)


class DatasetLoader(Dataset):
    """Samples of one mode: train and val split the training scenes by --val_ratio, test is the official
    validation split (mini_val on v1.0-mini).

    args: the merged configuration dict; this reads args["app_mode"], args["dataset_dir"] (None: data.json's),
    args["val_ratio"], args["bool_apply_img_aug"] and args["data"][app_mode] (config/data.json).
    world_size and rank are the original's signature; under DDP the sampler shards.
    """

    class_names = list(CATEGORY_IDS)  # label index -> detection class name
    collate_fn = staticmethod(collate_detection)
    @staticmethod
    def check_config(args: dict) -> None:
        """The ranges of the data.json values this loader reads, checked before any work starts."""
        check_values(args, {
            **COMMON_RULES,
            "label_cache_dir": TEXT,
            "labels.visibilities": VISIBILITIES,
            "labels.min_box_size": number(0),
            "augmentation.hflip_prob": number(0, 1),
            "augmentation.scale": Rule(lambda value: NUMBER_RANGE.check(value) and value[0] > 0,
                                       "[low, high] with 0 < low < high"),
            "augmentation.translate": number(0, 1),
            # transforms.v2.SanitizeBoundingBoxes(min_size) rejects a size below 1 px
            "augmentation.min_box_size": number(1),
            "decode": one_of("cpu", "device"),
        }, f"data.{args['app_mode']}")

    def __init__(self, args: dict, world_size: int = 1, rank: int = 0, mode: str = "train"):
        cfg = args["data"][args["app_mode"]]
        self.mode = mode
        self.version, self.split = version_split(cfg, mode)
        self.dataroot = resolve_dataroot(args, cfg)
        self.coco_path, labels = label_arrays(self.dataroot, self.version, self.split, cfg["labels"],
                                              project_path(cfg["label_cache_dir"]))
        # the split's label arrays, kept for coco_ground_truth: the evaluation scores against the labels this dataset
        # was built with, even if another run rewrites the cache file meanwhile. Flat arrays, as large as the cache
        # file (12 MB for trainval's train split, bench/results/scale.md), which forked workers share untouched
        self.split_labels = labels
        scene_names = mode_scenes(labels["scene_names"].tolist(), mode, args["val_ratio"])
        # Flat arrays only (DataLoader workers would copy Python objects on read): for S samples of N_cam cameras,
        # image_index (S, N_cam) int64 cache index of each camera's image; for those images, files, sizes and the
        # boxes of image k at boxes[box_start[k]:box_start[k + 1]]
        image_index = self.sample_images(labels, np.isin(labels["scene_names"][labels["image_scene"]],
                                                         scene_names), cfg["cameras"])
        used = image_index.reshape(-1)
        self.image_ids = used + 1  # (S * N_cam,) COCO image ids, in sample order
        self.image_files = labels["image_file"][used].reshape(image_index.shape)
        self.image_sizes = labels["image_size"][used].reshape(*image_index.shape, 2)
        check_images_exist(self.dataroot, self.image_files)
        # the cache lists boxes by image: image k's are box_image's run of k, found by binary search
        first = np.searchsorted(labels["box_image"], used, side="left")
        counts = np.searchsorted(labels["box_image"], used, side="right") - first
        self.box_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (S * N_cam + 1,)
        selected = np.repeat(first - self.box_start[:-1], counts) + np.arange(self.box_start[-1])
        x, y, w, h = labels["box_xywh"][selected].T
        self.boxes = np.stack([x, y, x + w, y + h], axis=1).astype(np.float32).reshape(-1, 4)  # (M, 4) original px
        self.labels = (labels["box_category"][selected] - 1).astype(np.int64)  # (M,) class index 0..9

        self.input_size = (cfg["image"]["w"], cfg["image"]["h"])
        augment = mode == "train" and bool(args["bool_apply_img_aug"])
        self.augmentation = Augmentation(cfg["augmentation"]) if augment else None
        self.decode = cfg["decode"]  # "cpu": workers decode and augment the images; "device": images_on_device

    @staticmethod
    def sample_images(labels: dict, selected: np.ndarray, cameras: list) -> np.ndarray:
        """(S, N_cam) int64 label-cache indices of the images of `cameras` (in that order) of each sample with a
        `selected` (I,) image, samples in cache order."""
        tokens, first_index, sample_of_image = np.unique(labels["image_sample"], return_index=True,
                                                         return_inverse=True)
        order = np.argsort(first_index, kind="stable")  # samples in cache order
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        sample_of_image = rank[sample_of_image]
        samples = np.unique(sample_of_image[selected])
        index = np.full((len(order), len(cameras)), -1, dtype=np.int64)
        for position, channel in enumerate(cameras):
            of_channel = np.flatnonzero(labels["image_channel"] == channel.encode())
            index[sample_of_image[of_channel], position] = of_channel
        index = index[samples]
        if (index < 0).any():
            sample, position = np.argwhere(index < 0)[0]
            present = sorted({c.decode() for c in labels["image_channel"][sample_of_image == samples[sample]]})
            raise UserError(f"sample {tokens[order[samples[sample]]].decode()} has no {cameras[position]} image: set "
                            f"'cameras' in config/data.json to channels of the dataset ({', '.join(present)})")
        return index

    @staticmethod
    def image_file(args: dict, path: str) -> tuple:
        """predict.py: the image file at `path` as a one-camera item's images, resized as __getitem__ resizes
        (without augmentation): ((1, 3, H, W) uint8, its original (W, H)); UserError if it is not a readable image."""
        image = args["data"][args["app_mode"]]["image"]
        pixels, original_size = read_image_file(path, (image["w"], image["h"]))
        return pixels[None], original_size

    @staticmethod
    def sample_files(args: dict, tokens: list) -> dict:
        """predict.py: {sample token: [(camera, image path)] in data.json "cameras" order} for those of `tokens`
        that are samples of the configured dataset version (any split); the others are left out."""
        cfg = args["data"][args["app_mode"]]
        nusc = load_nuscenes(resolve_dataroot(args, cfg), cfg["version"])
        files = {}
        for token in dict.fromkeys(tokens):
            try:
                cameras = nusc.get("sample", token)["data"]
            except KeyError:
                continue
            files[token] = [(camera, os.path.join(nusc.dataroot, nusc.get("sample_data", cameras[camera])["filename"]))
                            for camera in cfg["cameras"] if camera in cameras]
        return files

    def coco_ground_truth(self) -> dict:
        """The COCO ground-truth dict of the split's labels as this dataset loaded them (for the evaluation; built on
        demand)."""
        return coco_from_labels(self.split_labels, self.version, self.split)

    def __len__(self) -> int:
        return len(self.image_files)

    def __getitem__(self, index: int) -> dict:
        width, height = self.input_size
        images, boxes, labels, counts, augmentation, paths = [], [], [], [], [], []
        num_cameras = self.image_files.shape[1]
        for camera in range(num_cameras):
            k = index * num_cameras + camera  # the image's position among the dataset's images
            full_width, full_height = self.image_sizes[index, camera].tolist()
            path = os.path.join(self.dataroot, self.image_files[index, camera].decode())
            scale = np.array([width / full_width, height / full_height] * 2, dtype=np.float32)
            image_boxes = torch.from_numpy(self.boxes[self.box_start[k]:self.box_start[k + 1]] * scale)
            image_labels = torch.from_numpy(self.labels[self.box_start[k]:self.box_start[k + 1]])
            params = None
            if self.augmentation is not None:
                image_boxes = tv_tensors.BoundingBoxes(image_boxes, format="XYXY", canvas_size=(height, width))
                params = self.augmentation.draw(image_boxes)
                image_boxes, image_labels = self.augmentation.boxes(image_boxes, image_labels, params)
            if self.decode == "device":
                images.append(torch.frombuffer(bytearray(read_jpeg(path)), dtype=torch.uint8))
                augmentation.append(params)
                paths.append(path)
            else:
                pixels = decode_image(path, self.input_size, (full_width, full_height))
                pixels = pixels if params is None else augment_array(pixels, params)
                images.append(torch.from_numpy(pixels).permute(2, 0, 1))
            boxes.append(image_boxes)
            labels.append(image_labels)
            counts.append(len(image_labels))
        pixels = ({"jpegs": images, "augmentation": augmentation, "jpeg_paths": paths} if self.decode == "device"
                  else {"images": torch.stack(images)})
        return {**pixels, "boxes": torch.cat(boxes).float(), "labels": torch.cat(labels),
                "counts": torch.tensor(counts, dtype=torch.int64),
                "image_ids": torch.from_numpy(self.image_ids[index * num_cameras:(index + 1) * num_cameras]),
                "orig_sizes": torch.from_numpy(self.image_sizes[index].astype(np.int64))}
