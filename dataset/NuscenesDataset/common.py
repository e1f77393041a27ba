"""What every nuScenes loader here shares: the dataset folder (and the embedded dataset's generation), the split of
a mode, the train/val scene split, the walk through a scene's samples, JPEG reading at reduced scale and the
DataLoader workers' OpenCV setting, and the config/data.json keys that all of them read."""

import logging
import os
import random
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from pyquaternion import Quaternion

from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.cache import file_lock
from utils.config import TEXT, Rule, list_of, number
from utils.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODES = ("train", "val", "test")
VAL_SPLIT_SEED = 0  # fixed, so that the train/val scene split never depends on the run's --seed
REDUCED_DECODING = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                    (2, cv2.IMREAD_REDUCED_COLOR_2), (1, cv2.IMREAD_COLOR))  # (scale divisor, cv2 flag)
MAX_IMAGE_BYTES = 512 << 20  # a photo's file is far smaller; cv2.imdecode refuses 2 GiB and more
EXIF_ORIENTATION = 0x0112  # the EXIF tag of an image's orientation (1: as stored; 5-8: turned by 90 degrees)

# config/data.json values that every nuScenes loader reads (keys within data.<app_mode>): its check_config checks them
COMMON_RULES = {
    "dataset_dir": TEXT,
    "version": TEXT,
    "cameras": Rule(lambda value: list_of(TEXT).check(value) and len(set(value)) == len(value),
                    "a list of one or more different camera channels"),
    "embedded.samples_per_scene": number(1, integer=True),
    "embedded.width": number(32, integer=True),
    "embedded.height": number(32, integer=True),
    "embedded.seed": number(0, integer=True),
    "image.w": number(1, integer=True),
    "image.h": number(1, integer=True),
    "normalize.mean": list_of(number(), length=3),
    "normalize.std": list_of(number(0, low_open=True), length=3),
    "augmentation.brightness": number(0),
    "augmentation.contrast": number(0),
    "augmentation.saturation": number(0),
    "augmentation.hue": number(0, 0.5),
}
# data.json's lists of the visibility tokens of the annotations a loader keeps
VISIBILITIES = Rule(lambda value: isinstance(value, list) and len(value) > 0 and set(value) <= {"", "1", "2", "3", "4"},
                    'a list of one or more of the visibility tokens "", "1", "2", "3", "4"')

logger = logging.getLogger(__name__)

# OpenCV on one thread in every process that reads images: the DataLoader workers are the parallelism (OpenCV's pool,
# as many threads as cores in every worker, would oversubscribe the cores), and a process whose OpenCV pool has
# started cannot fork workers safely: the worker hangs in the pool's teardown (pthread_cond_destroy on a condition
# variable whose waiters were not forked; seen in the test suite once the main process had decoded images itself).
cv2.setNumThreads(1)


def project_path(path: str) -> str:
    """Paths in config/*.json are relative to the project folder."""
    return str((PROJECT_ROOT / path).resolve())


def resolve_dataroot(args: dict, cfg: dict) -> str:
    """The dataset folder: --dataset_dir if given, else data.json's. The embedded dataset's folder is created
    when missing; any other missing folder is an error (raised when the labels are loaded)."""
    dataroot = os.path.abspath(args["dataset_dir"]) if args.get("dataset_dir") else project_path(cfg["dataset_dir"])
    embedded = cfg["embedded"]
    if dataroot == project_path(embedded["dataset_dir"]) and not os.path.exists(dataroot):
        os.makedirs(os.path.dirname(dataroot), exist_ok=True)
        with file_lock(f"{dataroot}.lock", "the embedded dataset"):  # one process generates, the others wait
            if not os.path.exists(dataroot):
                logger.info("dataset_dir %s is missing: generating the embedded nuScenes dataset there", dataroot)
                synthetic.generate(dataroot, embedded["samples_per_scene"], embedded["width"], embedded["height"],
                                   embedded["seed"])
    return dataroot


def rigid_transform(record: dict) -> np.ndarray:
    """4x4 matrix of a devkit ego_pose or calibrated_sensor record: its frame -> the parent frame."""
    matrix = np.eye(4)
    matrix[:3, :3] = Quaternion(record["rotation"]).rotation_matrix
    matrix[:3, 3] = record["translation"]
    return matrix


def version_split(cfg: dict, mode: str) -> tuple:
    """(version, devkit split name) that `mode` reads: train and val the version's training split, test its
    test split (data.json "splits")."""
    if mode not in MODES:
        raise UserError(f"mode '{mode}': choose one of {', '.join(MODES)}")
    version = cfg["version"]
    if version not in cfg["splits"]:
        raise UserError(f"version '{version}' has no entry in 'splits' of config/data.json "
                        f"(entries: {', '.join(cfg['splits'])})")
    return version, cfg["splits"][version]["test" if mode == "test" else "train"]


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


def mode_scenes(scene_names: list, mode: str, val_ratio: float) -> list:
    """The scenes of `mode` among those of its split: test takes them all, train and val split them."""
    if mode == "test":
        return scene_names
    train_scenes, val_scenes = train_val_scenes(scene_names, val_ratio)
    return train_scenes if mode == "train" else val_scenes


def scene_samples(nusc, scene: dict):
    """The sample records of a devkit scene record, in time order."""
    sample_token = scene["first_sample_token"]
    while sample_token:
        sample = nusc.get("sample", sample_token)
        yield sample
        sample_token = sample["next"]


def check_images_exist(dataroot: str, image_files: np.ndarray) -> None:
    """Fail before training starts, not hours into it, when images (file names relative to the dataroot, bytes)
    are missing."""
    paths = [os.path.join(dataroot, name.decode()) for name in image_files.reshape(-1)]
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise UserError(f"image {missing[0]} is missing ({len(missing)} of {len(paths)} images are): "
                        f"restore the dataset folder or regenerate it")


def read_jpeg(path: str) -> bytes:
    """The bytes of the JPEG file at `path`; a missing, unreadable or truncated file is a one-line error."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise UserError(f"cannot read image {path} ({error}): restore the file or regenerate the dataset") from None
    # A truncated file would decode silently grey-padded by OpenCV's libjpeg. A file that does not end with the end
    # marker may still be whole: a phone's motion photo appends its video. torchvision's decoder tells the two
    # apart (it raises on a truncated stream), at the cost of a decode for those files only.
    if not data.rstrip(b"\0").endswith(b"\xff\xd9") and not is_complete_jpeg(data):
        raise UserError(f"cannot read image {path} (not a complete JPEG file): restore the file or regenerate "
                        f"the dataset")
    return data


def is_complete_jpeg(data: bytes) -> bool:
    try:
        decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    except (RuntimeError, ValueError):  # ValueError: no bytes at all
        return False
    return True


def decode_jpeg(data, **options):
    """torchvision.io.decode_jpeg(data, **options), without the DeprecationWarning of torchvision 0.29, which retires
    its image codecs for TorchCodec's. Kept (requirements.txt keeps torchvision below 0.30, which has it): TorchCodec
    0.17's decoders.decode_jpeg takes the same batch and gave the same CPU pixels, but its nvJPEG path was not
    checked on a GPU, it needs torch >= 2.11 (requirements: >= 2.4), and its PyPI wheel is built for torch's CUDA 13.0
    build only (it links libtorch_cuda.so and libcudart.so.13)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("The image decoding and encoding capabilities of "
                                                            "TorchVision are deprecated"),
                                category=DeprecationWarning, module=re.escape("torchvision.io.image"))
        return torchvision.io.decode_jpeg(data, **options)


def decode_image(path: str, size: tuple, full_size: tuple) -> np.ndarray:
    """Decode the JPEG at `path`, of full_size = (W, H) px, resized to size = (W, H): (H, W, 3) uint8 RGB.

    libjpeg's DCT scaling decodes at 1/8, 1/4 or 1/2 of full size, whichever is the smallest still at least
    `size`, so that little is decoded only to be thrown away by the resize."""
    data = read_jpeg(path)
    # full size when the input is larger than the image (upscaled): a bare next() would raise StopIteration, which
    # a DataLoader takes for the end of the epoch
    factor, flag = next(((f, flag) for f, flag in REDUCED_DECODING
                         if full_size[0] // f >= size[0] and full_size[1] // f >= size[1]), REDUCED_DECODING[-1])
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if image is None:
        raise UserError(f"cannot read image {path} (not a JPEG file): restore the file or regenerate the dataset")
    if (image.shape[1], image.shape[0]) != tuple(size):
        # the reduced decode leaves less than a 2x downscale, where bilinear interpolation does not alias much
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: str, size: tuple, full_size: tuple) -> torch.Tensor:
    """decode_image as a (3, H, W) uint8 tensor."""
    return torch.from_numpy(decode_image(path, size, full_size)).permute(2, 0, 1)


def read_sample_images(dataroot: str, files: np.ndarray, sizes: np.ndarray, size: tuple, augmentation=None
                       ) -> torch.Tensor:
    """(N_cam, 3, H, W) uint8: a sample's camera images (files (N_cam,) bytes relative to the dataroot, original
    sizes (N_cam, 2)) read at size = (W, H), each through `augmentation` (a photometric transform) if given."""
    images = []
    for name, full_size in zip(files, sizes.tolist(), strict=True):
        pixels = read_image(os.path.join(dataroot, name.decode()), size, tuple(full_size))
        images.append(pixels if augmentation is None else augmentation(pixels))
    return torch.stack(images)


def read_image_file(path: str, size: tuple) -> tuple:
    """Any image file OpenCV reads (JPEG, PNG, ...; grey or with alpha: as RGB), resized to size = (W, H) as the
    loaders resize their images (a JPEG exactly as decode_image does): ((3, H, W) uint8 RGB tensor, the image's
    original (W, H) as decoded, after its EXIF orientation). A file that is not a readable image is a one-line
    UserError naming it."""
    try:
        with Image.open(path) as header:  # a JPEG's header only: its size, for the reduced-scale decode
            if header.format in ("JPEG", "MPO"):  # MPO: a phone's JPEG with a second picture appended
                full_size = header.size
                if header.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # OpenCV turns these by 90 degrees
                    full_size = full_size[::-1]
                return read_image(path, size, full_size), full_size
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        pass  # not a JPEG that Pillow reads the header of: OpenCV decodes it, or names it unreadable
    # OpenCV decodes the file's bytes, not its name: cv2.imread crashes the process (SIGSEGV) on a name that is not
    # UTF-8, which Python holds as surrogates. Read, not mapped: a mapped file that shrinks while it is decoded kills
    # the process (SIGBUS). A file over MAX_IMAGE_BYTES (a video in the folder) is not read.
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > MAX_IMAGE_BYTES:
                raise UserError(f"cannot read image {path} (larger than {MAX_IMAGE_BYTES >> 20} MB: not an image "
                                f"file this reads)")
            data = f.read()
    except OSError as error:
        raise UserError(f"cannot read image {path} ({error.strerror or error})") from None
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise UserError(f"cannot read image {path} (not an image file that OpenCV decodes)")
    full_size = (image.shape[1], image.shape[0])
    if full_size != tuple(size):
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1), full_size
