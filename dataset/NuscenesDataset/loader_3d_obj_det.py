"""nuScenes camera 3D object detection: one item is one sample (keyframe) with its N_cam camera images, each camera's
intrinsics and pose, and the 3D boxes that each camera shows.

Labels: for every camera keyframe, the boxes of the devkit's 2D re-projection (labels.camera_boxes_2d, with data.json
"labels.visibilities") whose centre is in front of the camera (depth >= MIN_DEPTH_M) and projects into the image,
moved into the camera frame with the devkit's `Box` (global -> ego at the camera's timestamp -> camera). A box whose
centre falls outside the image is left to the neighbouring camera that holds it (the six cameras overlap). The
label cache (cache.py) is built once per (dataroot, version, split, visibilities, tables), one job per scene over
all cores (labels.build_labels), and holds for I camera keyframes and A boxes:
    image_file (I,) bytes; image_size (I, 2) int32 (width, height) px; image_sample, image_channel (I,) bytes;
    image_intrinsic (I, 3, 3) float64 original px; image_to_global (I, 4, 4) float64: camera -> global at the
    camera's timestamp; image_scene (I,) int32 into scene_names;
    box_image (A,) int32; box_class (A,) int8: index into DETECTION_NAMES; box_center (A, 3) camera frame m;
    box_size (A, 3) width, length, height m; box_yaw (A,) heading in the camera frame, rad; box_velocity (A, 2)
    camera x, z m/s (NaN where the devkit has none); box_attribute (A,) int8: index into ATTRIBUTE_NAMES, -1 none;
    box_xyxy (A, 4) the 2D box in original px; box_token (A,) bytes.

Frames: camera x right, y down, z forward (m). The heading yaw is a rotation about the camera's y axis: the box's
length axis points along (cos yaw, 0, -sin yaw). The regressed angle is the observation angle alpha = yaw - the
angle of the ray to the centre, atan2(x, z): boxes that look alike in the image have the same alpha wherever they
are. Velocity: the devkit's global velocity (x, y) turned into the camera frame, its x and z kept.

An item is a dict:
    images        (N_cam, 3, H, W) uint8 RGB at data.json "image"
    intrinsics    (N_cam, 3, 3) float32: intrinsics scaled to the input size (input px)
    cam_to_global (N_cam, 4, 4) float64: camera -> global
    targets       (M, len(TARGET_COLUMNS)) float32, the cameras' boxes one after another, columns TARGET_COLUMNS:
                  u, v the projected centre (input px; pixel i covers [i, i + 1)), depth (camera z, m), w, l, h
                  (m), alpha (rad), vx, vz (camera frame, m/s, NaN unknown), attribute (-1 none), class,
                  x1, y1, x2, y2 (the 2D box, input px)
    counts        (N_cam,) int64 boxes of each camera
    index         () int64 the sample's position (sample_tokens[index])
`collate_3d` batches items.

Training augmentation, per camera image: colour jitter, and with probability data.json "augmentation.hflip_prob" a
horizontal flip, which mirrors the camera frame (x -> -x) with it: u -> W - u, the 2D box's x1, x2 -> W - x2, W - x1,
alpha -> pi - alpha, vx -> -vx, the intrinsics' cx -> W - cx and cam_to_global -> cam_to_global @ diag(-1, 1, 1, 1),
so that the item stays one camera's consistent view (tested: its boxes lift to the unflipped ones, mirrored).
"""

import os
from functools import partial

import numpy as np
import torch
from pyquaternion import Quaternion
from torch.utils.data import Dataset
from torchvision.transforms import v2

from dataset.NuscenesDataset.common import (
    COMMON_RULES,
    VISIBILITIES,
    check_images_exist,
    mode_scenes,
    project_path,
    read_image_file,
    read_sample_images,
    resolve_dataroot,
    rigid_transform,
    scene_samples,
    version_split,
)
from dataset.NuscenesDataset.labels import (
    DETECTION_NAMES,
    camera_boxes_2d,
    check_dataroot,
    load_nuscenes,
    split_label_cache,
)
from utils.config import TEXT, check_values, number
from utils.errors import UserError

LABEL_FORMAT = 1  # bump when the label computation changes, so that old caches are rebuilt
MIN_DEPTH_M = 0.5  # boxes whose centre is nearer the camera plane are not labelled
# the devkit's nuscenes.eval.detection.constants.ATTRIBUTE_NAMES, in its order (tested equal)
ATTRIBUTE_NAMES = ("pedestrian.moving", "pedestrian.sitting_lying_down", "pedestrian.standing", "cycle.with_rider",
                   "cycle.without_rider", "vehicle.moving", "vehicle.parked", "vehicle.stopped")
TARGET_COLUMNS = ("u", "v", "depth", "w", "l", "h", "alpha", "vx", "vz", "attribute", "class", "x1", "y1", "x2", "y2")


def scene_boxes_3d(nusc, scene_name: str, cameras: list, visibilities: list) -> dict:
    """The label arrays of one scene's keyframes of `cameras` (see the module docstring; image indices local to
    the scene), in time and camera order."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    scene = next(scene for scene in nusc.scene if scene["name"] == scene_name)
    images, boxes = [], []
    for sample in scene_samples(nusc, scene):
        for channel in cameras:
            record = nusc.get("sample_data", sample["data"][channel]) if channel in sample["data"] else None
            if record is None or record["sensor_modality"] != "camera":
                continue  # the loader names the missing camera
            sensor = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
            pose = nusc.get("ego_pose", record["ego_pose_token"])
            intrinsic = np.asarray(sensor["camera_intrinsic"], dtype=np.float64)
            to_global = rigid_transform(pose) @ rigid_transform(sensor)
            to_camera = Quaternion(matrix=np.linalg.inv(to_global)[:3, :3], atol=1e-6)
            for annotation, box_2d in camera_boxes_2d(nusc, record["token"], visibilities):
                name = category_to_detection_name(annotation["category_name"])
                if name is None:
                    continue
                box = nusc.get_box(annotation["token"])  # global frame
                box.translate(-np.array(pose["translation"]))
                box.rotate(Quaternion(pose["rotation"]).inverse)
                box.translate(-np.array(sensor["translation"]))
                box.rotate(Quaternion(sensor["rotation"]).inverse)
                if box.center[2] < MIN_DEPTH_M:
                    continue
                u, v = (intrinsic @ box.center)[:2] / box.center[2]
                if not (0 <= u < record["width"] and 0 <= v < record["height"]):
                    continue
                heading = box.orientation.rotation_matrix[:, 0]  # the length axis, camera frame
                velocity = to_camera.rotate(np.append(nusc.box_velocity(annotation["token"])[:2], 0.0))
                attribute = (ATTRIBUTE_NAMES.index(nusc.get("attribute", annotation["attribute_tokens"][0])["name"])
                             if annotation["attribute_tokens"] else -1)
                boxes.append((len(images), DETECTION_NAMES.index(name), box.center, box.wlh,
                              np.arctan2(-heading[2], heading[0]), velocity[[0, 2]], attribute, box_2d,
                              annotation["token"]))
            images.append((record["filename"], record["width"], record["height"], sample["token"], channel,
                           intrinsic, to_global))
    columns = list(zip(*boxes, strict=True)) or [()] * 9
    return {
        "image_file": np.array([image[0] for image in images], dtype=np.bytes_).reshape(-1),
        "image_size": np.array([image[1:3] for image in images], dtype=np.int32).reshape(-1, 2),
        "image_sample": np.array([image[3] for image in images], dtype=np.bytes_).reshape(-1),
        "image_channel": np.array([image[4] for image in images], dtype=np.bytes_).reshape(-1),
        "image_intrinsic": np.array([image[5] for image in images], dtype=np.float64).reshape(-1, 3, 3),
        "image_to_global": np.array([image[6] for image in images], dtype=np.float64).reshape(-1, 4, 4),
        "box_image": np.array(columns[0], dtype=np.int32),
        "box_class": np.array(columns[1], dtype=np.int8),
        "box_center": np.array(columns[2], dtype=np.float64).reshape(-1, 3),
        "box_size": np.array(columns[3], dtype=np.float64).reshape(-1, 3),
        "box_yaw": np.array(columns[4], dtype=np.float64),
        "box_velocity": np.array(columns[5], dtype=np.float64).reshape(-1, 2),
        "box_attribute": np.array(columns[6], dtype=np.int8),
        "box_xyxy": np.array(columns[7], dtype=np.float64).reshape(-1, 4),
        "box_token": np.array(columns[8], dtype=np.bytes_).reshape(-1),
    }


def labels_3d(dataroot: str, version: str, split: str, cfg: dict, cache_dir: str, workers: int | None = None) -> dict:
    """The 3D label arrays of `split` (module docstring), from the cache in `cache_dir`, built there over `workers`
    processes (default: all cores) when missing or when any input or setting changed; a killed build resumes from
    the scenes it had finished (labels.build_labels)."""
    dataroot = os.path.abspath(dataroot)
    check_dataroot(dataroot, version)
    settings = {"format": LABEL_FORMAT, "dataroot": dataroot, "version": version, "split": split,
                "cameras": list(cfg["cameras"]), "visibilities": sorted(set(cfg["labels"]["visibilities"]))}
    _, labels = split_label_cache(settings, cache_dir, "3d_",
                                  partial(scene_boxes_3d, cameras=cfg["cameras"],
                                          visibilities=cfg["labels"]["visibilities"]),
                                  workers, "3D labels")
    return labels


def collate_3d(items: list) -> dict:
    """Batch items (module docstring): images (B, N_cam, 3, H, W), intrinsics (B, N_cam, 3, 3), cam_to_global
    (B, N_cam, 4, 4), index (B,), and the boxes per image of the I = B * N_cam images, zero-padded to M, the most of
    any image: targets (I, M, len(TARGET_COLUMNS)), target_valid (I, M). Padded here, on the host, so that the
    training step reads no box count from the device."""
    counts = torch.cat([item["counts"] for item in items])  # (I,)
    boxes = torch.cat([item["targets"] for item in items])  # (T, F)
    image = torch.repeat_interleave(torch.arange(len(counts)), counts)
    slot = torch.arange(len(boxes)) - (torch.cumsum(counts, 0) - counts)[image]
    targets = boxes.new_zeros(len(counts), int(counts.max()) if len(boxes) else 0, len(TARGET_COLUMNS))
    valid = torch.zeros(targets.shape[:2], dtype=torch.bool)
    targets[image, slot], valid[image, slot] = boxes, True
    return {**{key: torch.stack([item[key] for item in items])
               for key in ("images", "intrinsics", "cam_to_global", "index")},
            "targets": targets, "target_valid": valid}


class DatasetLoader(Dataset):
    """Samples of one mode: train and val split the training scenes by --val_ratio, test is the official
    validation split (mini_val on v1.0-mini), as in the 2D detection loader.

    args: the merged configuration dict; this reads args["app_mode"], args["dataset_dir"] (None: data.json's),
    args["val_ratio"], args["bool_apply_img_aug"] and args["data"][app_mode] (config/data.json).
    world_size and rank: the platform's signature; under DDP the sampler shards."""

    class_names = list(DETECTION_NAMES)
    collate_fn = staticmethod(collate_3d)
    samples_only = True  # predict.py: a plain image has no intrinsics and pose, so it takes sample tokens only

    @staticmethod
    def check_config(args: dict) -> None:
        """The ranges of the data.json values this loader reads, checked before any work starts."""
        check_values(args, {
            **COMMON_RULES,
            "label_cache_dir": TEXT,
            "labels.visibilities": VISIBILITIES,
            "augmentation.hflip_prob": number(0, 1),
        }, f"data.{args['app_mode']}")

    def __init__(self, args: dict, world_size: int = 1, rank: int = 0, mode: str = "train"):
        cfg = args["data"][args["app_mode"]]
        self.version, self.split = version_split(cfg, mode)
        self.dataroot = resolve_dataroot(args, cfg)
        labels = labels_3d(self.dataroot, self.version, self.split, cfg, project_path(cfg["label_cache_dir"]))
        scene_names = mode_scenes(labels["scene_names"].tolist(), mode, args["val_ratio"])
        cameras = [camera.encode() for camera in cfg["cameras"]]
        # (S, N_cam) cache indices of the samples' images, in cache order (scene, time, camera): every sample has
        # one image per camera, else the cache's image count is not a multiple of N_cam or the channels disagree
        selected = np.flatnonzero(np.isin(labels["scene_names"][labels["image_scene"]], scene_names))
        channels = labels["image_channel"][selected]
        if len(selected) % len(cameras) or (channels.reshape(-1, len(cameras)) != np.array(cameras)).any():
            missing = sorted(set(cameras) - set(channels.tolist())) or cameras
            raise UserError(f"some samples of {self.version} {self.split} have no {missing[0].decode()} image: set "
                            f"'cameras' in config/data.json to channels that every sample has")
        image_index = selected.reshape(-1, len(cameras))
        first = image_index[:, 0]
        self.sample_tokens = labels["image_sample"][first].astype(np.str_)  # (S,)
        self.image_files = labels["image_file"][image_index]  # (S, N_cam)
        self.image_sizes = labels["image_size"][image_index]  # (S, N_cam, 2) original (W, H)
        check_images_exist(self.dataroot, self.image_files)
        self.input_size = (cfg["image"]["w"], cfg["image"]["h"])
        width, height = self.input_size
        scale = np.stack([width / self.image_sizes[..., 0], height / self.image_sizes[..., 1]], axis=-1)  # (S, N, 2)
        intrinsics = labels["image_intrinsic"][image_index].copy()
        intrinsics[..., :2, :] *= scale[..., None]
        self.intrinsics = torch.tensor(intrinsics, dtype=torch.float32)
        self.cam_to_global = torch.tensor(labels["image_to_global"][image_index], dtype=torch.float64)

        # the boxes of image k (k = s * N_cam + camera) at box_start[k]:box_start[k + 1] of targets (A, F)
        used = image_index.reshape(-1)
        start = np.searchsorted(labels["box_image"], used, side="left")
        counts = np.searchsorted(labels["box_image"], used, side="right") - start
        self.box_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        picked = np.repeat(start - self.box_start[:-1], counts) + np.arange(self.box_start[-1])
        box_scale = scale.reshape(-1, 2)[np.repeat(np.arange(len(used)), counts)]  # (A, 2) per box's image
        center = labels["box_center"][picked]
        uv = np.einsum("aij,aj->ai", intrinsics.reshape(-1, 3, 3)[np.repeat(np.arange(len(used)), counts)],
                       center)
        self.targets = torch.tensor(np.column_stack([
            uv[:, :2] / uv[:, 2:], center[:, 2], labels["box_size"][picked],
            wrap_angle(labels["box_yaw"][picked] - np.arctan2(center[:, 0], center[:, 2])),
            labels["box_velocity"][picked], labels["box_attribute"][picked], labels["box_class"][picked],
            labels["box_xyxy"][picked] * np.tile(box_scale, 2)]), dtype=torch.float32)
        jitter = cfg["augmentation"]
        self.augmentation = (v2.ColorJitter(jitter["brightness"], jitter["contrast"], jitter["saturation"],
                                            jitter["hue"])
                             if mode == "train" and args["bool_apply_img_aug"] else None)
        self.flip_prob = jitter["hflip_prob"] if self.augmentation is not None else 0.0

    @staticmethod
    def sample_files(args: dict, tokens: list) -> dict:
        """predict.py: {sample token: [(camera, image path, {"intrinsics": (3, 3) original px, "cam_to_global":
        (4, 4), "sample_token"})] in data.json "cameras" order} for those of `tokens` that are samples of the
        configured dataset version (any split); the others are left out."""
        cfg = args["data"][args["app_mode"]]
        nusc = load_nuscenes(resolve_dataroot(args, cfg), cfg["version"])
        files = {}
        for token in dict.fromkeys(tokens):
            try:
                data = nusc.get("sample", token)["data"]
            except KeyError:
                continue
            files[token] = []
            for camera in cfg["cameras"]:
                if camera in data:
                    record = nusc.get("sample_data", data[camera])
                    sensor = nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
                    pose = nusc.get("ego_pose", record["ego_pose_token"])
                    to_global = rigid_transform(pose) @ rigid_transform(sensor)
                    files[token].append((camera, os.path.join(nusc.dataroot, record["filename"]),
                                         {"intrinsics": np.asarray(sensor["camera_intrinsic"]),
                                          "cam_to_global": to_global, "sample_token": token}))
        return files

    @staticmethod
    def image_file(args: dict, path: str) -> tuple:
        """predict.py: the camera image at `path` resized as __getitem__ resizes it: ((1, 3, H, W) uint8, its
        original (W, H)); its intrinsics and pose come from sample_files."""
        image = args["data"][args["app_mode"]]["image"]
        pixels, original_size = read_image_file(path, (image["w"], image["h"]))
        return pixels[None], original_size

    def __len__(self) -> int:
        return len(self.sample_tokens)

    def __getitem__(self, index: int) -> dict:
        images = read_sample_images(self.dataroot, self.image_files[index], self.image_sizes[index], self.input_size,
                                    self.augmentation)
        first, last = index * len(images), (index + 1) * len(images)
        item = {"images": images, "intrinsics": self.intrinsics[index], "cam_to_global": self.cam_to_global[index],
                "targets": self.targets[self.box_start[first]:self.box_start[last]],
                "counts": torch.from_numpy(np.diff(self.box_start[first:last + 1])), "index": torch.tensor(index)}
        if self.flip_prob:
            item = flip_cameras(item, torch.rand(len(images)) < self.flip_prob)
        return item


def flip_cameras(item: dict, flipped: torch.Tensor) -> dict:
    """The item with the cameras of `flipped` (N_cam,) bool mirrored left to right, camera frame and labels with
    them (see the module's docstring)."""
    width = item["images"].shape[-1]
    images = torch.where(flipped[:, None, None, None], item["images"].flip(-1), item["images"])
    intrinsics, cam_to_global = item["intrinsics"].clone(), item["cam_to_global"].clone()
    intrinsics[flipped, 0, 2] = width - intrinsics[flipped, 0, 2]
    cam_to_global[flipped, :, 0] *= -1
    targets = item["targets"].clone()
    column = {name: k for k, name in enumerate(TARGET_COLUMNS)}
    box_flipped = flipped.repeat_interleave(item["counts"])
    mirrored = targets[box_flipped]
    mirrored[:, column["u"]] = width - mirrored[:, column["u"]]
    mirrored[:, [column["x1"], column["x2"]]] = width - mirrored[:, [column["x2"], column["x1"]]]
    mirrored[:, column["alpha"]] = wrap_angle(np.pi - mirrored[:, column["alpha"]])
    mirrored[:, column["vx"]] = -mirrored[:, column["vx"]]
    targets[box_flipped] = mirrored
    return {**item, "images": images, "intrinsics": intrinsics, "cam_to_global": cam_to_global, "targets": targets}


def wrap_angle(angle):
    """Angles (rad; a numpy array or a tensor) wrapped into [-pi, pi)."""
    return (angle + np.pi) % (2 * np.pi) - np.pi
