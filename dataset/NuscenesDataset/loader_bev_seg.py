"""nuScenes bird's-eye-view (BEV) segmentation from the cameras: one item is one sample (keyframe) with its N_cam
camera images, each camera's projection from the BEV frame to its input pixels, and the occupancy grid of each class
around the ego car.

The BEV frame is the ego frame (x forward, y left, z up, metres) at the timestamp of data.json's
"ego_pose_channel" sensor of the sample. Each camera's projection chains, with the devkit's records, BEV frame ->
global -> the ego frame at that camera's own timestamp -> camera -> its intrinsics, scaled to the input size, so that
the ego motion between the cameras' capture times is accounted for.

Ground truth: the sample's 3D annotations of each class (category name prefixes in data.json "classes", visibility
tokens in "visibilities"), moved into the BEV frame with the devkit's `Box`; a cell is occupied when its centre,
raised to the box's centre height, is inside the box (the devkit's `points_in_box`): the box's footprint filled on
the grid. The grid (data.json "bev") covers x in x_range_m and y in y_range_m with square cells of cell_m: row 0 is
the far front (x max), column 0 the far left (y max), so that drawn as an image the ego car faces up.

An item is a dict:
    images       (N_cam, 3, H, W) uint8 RGB; (H, W) = data.json "image" (the model normalizes them on its
                 device with data.json "normalize": workers send a quarter of float32's bytes)
    projections  (N_cam, 3, 4) float32: [u*d, v*d, d] = P @ [x, y, z, 1] maps a point of the BEV frame (m) to input
                 pixel (u, v) at depth d (m) in front of the camera; pixel i covers [i, i + 1)
    target       (C, X, Y) float32 in {0, 1}: occupancy of class c in the cell at row i, column j
    index        () int64: the sample's position in the dataset (sample_tokens[index] names it)
Items have fixed shapes, so the DataLoader's default collate batches them.
"""

import hashlib
import logging
import os

import numpy as np
import torch
from nuscenes.utils.data_classes import Box
from nuscenes.utils.geometry_utils import points_in_box
from pyquaternion import Quaternion
from torch.utils.data import Dataset
from torchvision.transforms import v2

from dataset.NuscenesDataset.cache import cache_key, cached_arrays, tables_key
from dataset.NuscenesDataset.common import (
    COMMON_RULES,
    VISIBILITIES,
    check_images_exist,
    mode_scenes,
    project_path,
    read_sample_images,
    resolve_dataroot,
    rigid_transform,
    scene_samples,
    version_split,
)
from dataset.NuscenesDataset.labels import check_dataroot, load_nuscenes, split_scene_names
from utils.config import NUMBER_RANGE, TEXT, Rule, check_values, list_of, number
from utils.errors import UserError

BEV_FORMAT = 1  # bump when the cached geometry changes, so that old caches are rebuilt
logger = logging.getLogger(__name__)


def grid_shape(bev: dict) -> tuple:
    """(X rows, Y columns) of the grid over bev["x_range_m"] x bev["y_range_m"] with square cells of bev["cell_m"]
    (config/data.json "bev"); one line if the ranges are not whole numbers of cells."""
    cell = bev["cell_m"]
    if not cell > 0:
        raise UserError(f"'bev' in config/data.json: cell_m {cell} must be > 0 (the cell side in m)")
    shape = []
    for key in ("x_range_m", "y_range_m"):
        low, high = bev[key]
        cells = (high - low) / cell
        if not (high > low and abs(cells - round(cells)) < 1e-6):
            raise UserError(f"'bev' in config/data.json: {key} {bev[key]} must be [low, high] with high > low, a "
                            f"whole number of cells of cell_m {cell} m")
        shape.append(round(cells))
    return tuple(shape)


def bev_samples(dataroot: str, version: str, split: str, cfg: dict, cache_dir: str) -> dict:
    """The cameras and boxes of every sample of `split`, in scene-name and time order, as arrays (cache.py: built
    once, by one process, and reloaded while the tables and the settings that they depend on are unchanged):
        sample_token (S,) str; sample_scene (S,) int32 index into scene_names (N_scenes,) str;
        image_file (S, N_cam) bytes, relative to the dataroot; image_size (S, N_cam, 2) int32 (width, height) px;
        projection (S, N_cam, 3, 4) float64: BEV frame (m) -> original image pixels times depth;
        box_start (S + 1,) int64: sample s's boxes are box_start[s]:box_start[s + 1] of box_class (B,) int8,
        box_center (B, 3), box_size (B, 3) (w, l, h) m and box_rotation (B, 4) quaternion (w, x, y, z) in the BEV
        frame."""
    dataroot = os.path.abspath(dataroot)
    check_dataroot(dataroot, version)
    settings = {key: cfg[key] for key in ("cameras", "ego_pose_channel", "classes", "visibilities")}
    key = cache_key({"format": BEV_FORMAT, "dataroot": dataroot, "version": version, "split": split, **settings,
                     "tables": tables_key(os.path.join(dataroot, version))})
    path = os.path.join(os.path.abspath(cache_dir),
                        f"bev_{version}_{split}_{hashlib.sha1(dataroot.encode()).hexdigest()[:10]}.npz")

    def build() -> dict:
        nusc = load_nuscenes(dataroot, version)
        scene_names = sorted(split_scene_names(nusc, split))
        scenes = {scene["name"]: scene for scene in nusc.scene}
        samples, boxes = [], []
        for scene_index, name in enumerate(scene_names):
            for sample in scene_samples(nusc, scenes[name]):
                samples.append((scene_index, *sample_geometry(nusc, sample, cfg)))
                boxes.append(samples[-1][-1])
        all_boxes = [box for sample_boxes in boxes for box in sample_boxes]
        return {"sample_token": np.array([sample[1] for sample in samples], dtype=np.str_),
                "sample_scene": np.array([sample[0] for sample in samples], dtype=np.int32),
                "scene_names": np.array(scene_names, dtype=np.str_),
                "image_file": np.array([sample[2] for sample in samples], dtype=np.bytes_),
                "image_size": np.array([sample[3] for sample in samples], dtype=np.int32),
                "projection": np.array([sample[4] for sample in samples], dtype=np.float64),
                "box_start": np.concatenate([[0], np.cumsum([len(b) for b in boxes])]).astype(np.int64),
                "box_class": np.array([box[0] for box in all_boxes], dtype=np.int8),
                "box_center": np.array([box[1] for box in all_boxes], dtype=np.float64).reshape(-1, 3),
                "box_size": np.array([box[2] for box in all_boxes], dtype=np.float64).reshape(-1, 3),
                "box_rotation": np.array([box[3] for box in all_boxes], dtype=np.float64).reshape(-1, 4)}

    return cached_arrays(path, key, build, f"the BEV samples of {version} {split}")


def sample_geometry(nusc, sample: dict, cfg: dict) -> tuple:
    """(token, image files, image sizes, projections (N_cam, 3, 4) to original pixels, boxes [(class index,
    centre, size, rotation)] in the BEV frame) of one sample; see the module docstring for the frames."""
    reference = cfg["ego_pose_channel"]
    if reference not in sample["data"]:
        raise UserError(f"sample {sample['token']} has no {reference} data: set 'ego_pose_channel' in "
                        f"config/data.json to one of {', '.join(sorted(sample['data']))}")
    bev_to_global = rigid_transform(nusc.get("ego_pose", nusc.get("sample_data", sample["data"][reference])
                                             ["ego_pose_token"]))
    files, sizes, projections = [], [], []
    for channel in cfg["cameras"]:
        if channel not in sample["data"]:
            raise UserError(f"sample {sample['token']} has no {channel} image: set 'cameras' in "
                            f"config/data.json to channels of the dataset ({', '.join(sorted(sample['data']))})")
        record = nusc.get("sample_data", sample["data"][channel])
        sensor = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
        ego_to_global = rigid_transform(nusc.get("ego_pose", record["ego_pose_token"]))
        bev_to_camera = np.linalg.inv(rigid_transform(sensor)) @ np.linalg.inv(ego_to_global) @ bev_to_global
        projections.append(np.asarray(sensor["camera_intrinsic"]) @ bev_to_camera[:3])
        files.append(record["filename"])
        sizes.append((record["width"], record["height"]))
    rotation = Quaternion(matrix=bev_to_global[:3, :3])
    boxes = []
    for annotation_token in sample["anns"]:
        annotation = nusc.get("sample_annotation", annotation_token)
        if annotation["visibility_token"] not in cfg["visibilities"]:
            continue
        for class_index, prefixes in enumerate(cfg["classes"].values()):
            if annotation["category_name"].startswith(tuple(prefixes)):
                box = nusc.get_box(annotation_token)  # global frame
                box.translate(-bev_to_global[:3, 3])
                box.rotate(rotation.inverse)
                boxes.append((class_index, box.center, box.wlh, box.orientation.elements))
    return sample["token"], files, sizes, projections, boxes


class DatasetLoader(Dataset):
    """Samples of one mode: train and val split the training scenes by --val_ratio, test is the official
    validation split (mini_val on v1.0-mini), as in the 2D detection loader.

    args: the merged configuration dict; this reads args["app_mode"], args["dataset_dir"] (None: data.json's),
    args["val_ratio"], args["bool_apply_img_aug"] and args["data"][app_mode] (config/data.json).
    world_size and rank: the platform's signature; under DDP the sampler shards."""

    @staticmethod
    def check_config(args: dict) -> None:
        """The ranges of the data.json values this loader reads, checked before any work starts."""
        check_values(args, {
            **COMMON_RULES,
            "ego_pose_channel": TEXT,
            "label_cache_dir": TEXT,
            "bev.x_range_m": NUMBER_RANGE,
            "bev.y_range_m": NUMBER_RANGE,
            "bev.cell_m": number(0, low_open=True),
            "classes": Rule(lambda value: isinstance(value, dict) and len(value) > 0
                            and all(list_of(TEXT).check(prefixes) for prefixes in value.values()),
                            'a dict of one or more {class name: [category prefixes]}, e.g. {"vehicle": ["vehicle."]}'),
            "visibilities": VISIBILITIES,
        }, f"data.{args['app_mode']}")

    def __init__(self, args: dict, world_size: int = 1, rank: int = 0, mode: str = "train"):
        cfg = args["data"][args["app_mode"]]
        self.cameras = cfg["cameras"]
        version, split = version_split(cfg, mode)
        self.dataroot = resolve_dataroot(args, cfg)
        samples = bev_samples(self.dataroot, version, split, cfg, project_path(cfg["label_cache_dir"]))
        scene_names = mode_scenes(samples["scene_names"].tolist(), mode, args["val_ratio"])

        self.class_names = list(cfg["classes"])
        self.grid = grid_shape(cfg["bev"])
        self.bev = cfg["bev"]
        self.input_size = (cfg["image"]["w"], cfg["image"]["h"])
        # Flat arrays only (DataLoader workers would copy Python objects on read), for S samples and B boxes:
        # sample_tokens (S,) str; image_files (S, N_cam) bytes; image_sizes (S, N_cam, 2); projections (S, N_cam,
        # 3, 4); each sample's boxes at box_start[s]:box_start[s + 1] of box_class, box_center, box_size (w, l, h)
        # and box_rotation (w, x, y, z quaternion), in the BEV frame
        keep = np.flatnonzero(np.isin(samples["scene_names"][samples["sample_scene"]], scene_names))
        self.sample_tokens = samples["sample_token"][keep]
        self.image_files = samples["image_file"][keep]
        self.image_sizes = samples["image_size"][keep]
        width, height = self.input_size
        to_input = np.stack([width / self.image_sizes[..., 0], height / self.image_sizes[..., 1],
                             np.ones(self.image_sizes.shape[:2])], axis=-1)  # (S, N_cam, 3): row scales of P
        self.projections = torch.tensor(samples["projection"][keep] * to_input[..., None], dtype=torch.float32)
        first, last = samples["box_start"][keep], samples["box_start"][keep + 1]
        self.box_start = np.concatenate([[0], np.cumsum(last - first)]).astype(np.int64)
        selected = np.repeat(first - self.box_start[:-1], last - first) + np.arange(self.box_start[-1])
        self.box_class, self.box_center, self.box_size, self.box_rotation = (
            samples[key][selected] for key in ("box_class", "box_center", "box_size", "box_rotation"))
        check_images_exist(self.dataroot, self.image_files)

        jitter = cfg["augmentation"]
        # photometric only: a geometric change of an image would have to move its projection matrix with it
        self.augmentation = (v2.ColorJitter(jitter["brightness"], jitter["contrast"], jitter["saturation"],
                                            jitter["hue"])
                             if mode == "train" and args["bool_apply_img_aug"] else None)

    def rasterize(self, index: int) -> torch.Tensor:
        """(C, X, Y) float32 occupancy of each class's boxes of sample `index` (BEV frame): the cells whose
        centres, at the box's centre height, are inside it. Only the window of cells under the box's footprint is
        tested."""
        target = np.zeros((len(self.class_names), *self.grid), dtype=np.float32)
        x_max, y_max, cell = self.bev["x_range_m"][1], self.bev["y_range_m"][1], self.bev["cell_m"]
        for b in range(self.box_start[index], self.box_start[index + 1]):
            class_index = self.box_class[b]
            box = Box(self.box_center[b], self.box_size[b], Quaternion(self.box_rotation[b]))
            corners = box.bottom_corners()[:2]  # (2, 4) x, y in m
            # rows i cover x in (x_max - (i + 1) cell, x_max - i cell]; columns j likewise from y_max
            row_start, row_stop = np.clip([np.floor((x_max - corners[0].max()) / cell),
                                           np.ceil((x_max - corners[0].min()) / cell)], 0, self.grid[0]).astype(int)
            col_start, col_stop = np.clip([np.floor((y_max - corners[1].max()) / cell),
                                           np.ceil((y_max - corners[1].min()) / cell)], 0, self.grid[1]).astype(int)
            if row_start >= row_stop or col_start >= col_stop:
                continue  # outside the grid
            rows, columns = np.meshgrid(np.arange(row_start, row_stop), np.arange(col_start, col_stop),
                                        indexing="ij")
            centres = np.stack([x_max - (rows.ravel() + 0.5) * cell, y_max - (columns.ravel() + 0.5) * cell,
                                np.full(rows.size, box.center[2])])  # (3, n) m
            inside = points_in_box(box, centres).reshape(rows.shape)
            target[class_index, row_start:row_stop, col_start:col_stop] += inside
        return torch.from_numpy(np.minimum(target, 1.0))

    def __len__(self) -> int:
        return len(self.sample_tokens)

    def __getitem__(self, index: int) -> dict:
        images = read_sample_images(self.dataroot, self.image_files[index], self.image_sizes[index], self.input_size,
                                    self.augmentation)
        return {"images": images, "projections": self.projections[index],
                "target": self.rasterize(index), "index": torch.tensor(index)}
