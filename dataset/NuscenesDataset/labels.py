"""2D detection labels of nuScenes camera keyframes, exactly as the devkit computes them, cached as a COCO file.

The boxes are the devkit's re-projection of the 3D annotations
(`nuscenes/scripts/export_2d_annotations_as_json.py::get_2d_boxes`): global -> ego -> camera with the devkit's
`Box`, keep the corners with z > 0, `view_points`, convex hull intersected with the image canvas, min/max. Two
differences, both deliberate: the canvas is each sample_data's own width x height (the script hard-codes
1600x900), and where the intersection degenerates to a point or a line (the script crashes on its `.exterior`)
its bounds are used and boxes of zero area are dropped. Classes come from the devkit's
`category_to_detection_name`; categories without a detection class are dropped.

The COCO file (`images`, `annotations`, `categories`) is built once per (dataroot, version, split, label
settings, table contents) and reused while the key stored in it matches; it is also the ground truth of the
COCO evaluation.
"""

import hashlib
import json
import logging
import os

import numpy as np
import shapely
from nuscenes.eval.detection.constants import DETECTION_NAMES
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.nuscenes import NuScenes
from nuscenes.utils.geometry_utils import view_points
from nuscenes.utils.splits import create_splits_scenes
from pyquaternion import Quaternion
from shapely.geometry import box as shapely_box
from tqdm import tqdm

from utils.errors import UserError
from utils.io import atomic_write_json

LABEL_FORMAT = 1  # bump when the label computation changes, so that old caches are rebuilt
CATEGORY_IDS = {name: index + 1 for index, name in enumerate(DETECTION_NAMES)}  # COCO ids start at 1
NUSCENES_DOWNLOAD = "https://www.nuscenes.org/nuscenes#download"
EMBEDDED_COMMAND = "python -m dataset.NuscenesDataset.synthetic --out DIR"

logger = logging.getLogger(__name__)


def check_dataroot(dataroot: str, version: str) -> None:
    """Raise a UserError naming what is missing unless `dataroot`/`version` holds the nuScenes tables."""
    if not os.path.isdir(dataroot):
        raise UserError(f"dataset folder {dataroot} does not exist: create the embedded dataset there with "
                        f"'{EMBEDDED_COMMAND.replace('DIR', dataroot)}' or download nuScenes from {NUSCENES_DOWNLOAD}")
    table_root = os.path.join(dataroot, version)
    if not os.path.isdir(table_root):
        found = sorted(name for name in os.listdir(dataroot) if name.startswith("v1.0"))
        raise UserError(f"version folder {table_root} not found (folders there: {', '.join(found) or 'none'}): "
                        f"choose a version that this dataset folder holds ('version' in config/data.json)")


def load_nuscenes(dataroot: str, version: str) -> NuScenes:
    """The devkit's database, with a missing or broken table reported as one line naming the table."""
    check_dataroot(dataroot, version)
    try:
        return NuScenes(version=version, dataroot=dataroot, verbose=False)
    except (OSError, ValueError, AssertionError, KeyError, TypeError, IndexError, AttributeError) as error:
        table_root = os.path.join(dataroot, version)
        culprit = broken_table(table_root) or f"{table_root} ({type(error).__name__}: {str(error)[:200]})"
        raise UserError(f"cannot load the nuScenes tables: {culprit}: re-extract that version folder or "
                        f"regenerate the embedded dataset") from None


def broken_table(table_root: str) -> str | None:
    """'<path> (why)' of the first table file in `table_root` that is unreadable, not JSON, or not a list of
    records with a token (the devkit's `map.json` included); None if every one parses."""
    for name in sorted(os.listdir(table_root)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(table_root, name)
        try:
            with open(path) as f:
                table = json.load(f)
        except (OSError, ValueError) as error:
            return f"{path} ({type(error).__name__}: {error})"
        if not isinstance(table, list) or not all(isinstance(record, dict) and "token" in record for record in table):
            return f"{path} (not a list of records with a token)"
    return None


def split_scene_names(nusc: NuScenes, split: str) -> list:
    """Names of the scenes of the devkit split `split` that this dataset holds, in the table's order."""
    splits = create_splits_scenes()
    if split not in splits:
        raise UserError(f"split '{split}' is not a nuScenes split; choose one of: {', '.join(splits)}")
    wanted = set(splits[split])
    names = [scene["name"] for scene in nusc.scene if scene["name"] in wanted]
    if not names:
        raise UserError(f"split '{split}' matches no scene of {os.path.join(nusc.dataroot, nusc.version)} "
                        f"({len(nusc.scene)} scenes there): use the split names of that version in config/data.json "
                        f"(v1.0-mini: mini_train/mini_val, v1.0-trainval: train/val)")
    return names


def camera_boxes_2d(nusc: NuScenes, sample_data_token: str, visibilities: list) -> list:
    """The devkit's 2D boxes of one camera keyframe: [(sample_annotation record, (x1, y1, x2, y2))] in pixels of
    the original image, for the annotations whose visibility token is in `visibilities` (see the module docstring)."""
    sd_rec = nusc.get("sample_data", sample_data_token)
    s_rec = nusc.get("sample", sd_rec["sample_token"])
    cs_rec = nusc.get("calibrated_sensor", sd_rec["calibrated_sensor_token"])
    pose_rec = nusc.get("ego_pose", sd_rec["ego_pose_token"])
    camera_intrinsic = np.array(cs_rec["camera_intrinsic"])
    canvas = shapely_box(0, 0, sd_rec["width"], sd_rec["height"])
    pose_rotation_inv = Quaternion(pose_rec["rotation"]).inverse
    sensor_rotation_inv = Quaternion(cs_rec["rotation"]).inverse
    global_to_camera = sensor_rotation_inv.rotation_matrix @ pose_rotation_inv.rotation_matrix
    camera_in_global = np.array(pose_rec["translation"]) + Quaternion(pose_rec["rotation"]).rotate(
        cs_rec["translation"])

    boxes = []
    for ann_token in s_rec["anns"]:
        ann_rec = nusc.get("sample_annotation", ann_token)
        if ann_rec["visibility_token"] not in visibilities:
            continue
        # Shortcut, same result: a box whose bounding sphere lies behind the camera has no corner with z > 0.
        center_depth = (global_to_camera @ (np.array(ann_rec["translation"]) - camera_in_global))[2]
        if center_depth + 0.5 * np.linalg.norm(ann_rec["size"]) < -1e-6:
            continue
        box = nusc.get_box(ann_token)
        box.translate(-np.array(pose_rec["translation"]))
        box.rotate(pose_rotation_inv)
        box.translate(-np.array(cs_rec["translation"]))
        box.rotate(sensor_rotation_inv)
        corners_3d = box.corners()
        corners_3d = corners_3d[:, corners_3d[2, :] > 0]
        if corners_3d.shape[1] == 0:
            continue  # behind the camera
        corner_coords = view_points(corners_3d, camera_intrinsic, True).T[:, :2]
        box_2d = clip_to_canvas(corner_coords, canvas)
        if box_2d is not None:
            boxes.append((ann_rec, box_2d))
    return boxes


def clip_to_canvas(corner_coords: np.ndarray, canvas) -> tuple | None:
    """(x1, y1, x2, y2) bounds of the convex hull of the projected corners (n, 2) intersected with the canvas,
    or None where they don't intersect or the intersection has zero area (a point or a line)."""
    hull = shapely.multipoints(corner_coords).convex_hull  # as MultiPoint(...), without a Point object per corner
    if not hull.intersects(canvas):
        return None
    x1, y1, x2, y2 = hull.intersection(canvas).bounds
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def build_coco(nusc: NuScenes, scene_names: list, visibilities: list, min_box_size: float) -> dict:
    """COCO dict of the camera keyframes of `scene_names`: images in scene, time and channel order; boxes no
    smaller than `min_box_size` px in width and height; category ids 1..10 in the devkit's DETECTION_NAMES order."""
    images, annotations = [], []
    scenes = {scene["name"]: scene for scene in nusc.scene}
    camera_keyframes = []
    for name in scene_names:
        sample_token = scenes[name]["first_sample_token"]
        while sample_token:
            sample = nusc.get("sample", sample_token)
            for channel in sorted(sample["data"]):
                sd_rec = nusc.get("sample_data", sample["data"][channel])
                if sd_rec["sensor_modality"] == "camera":
                    camera_keyframes.append((name, sd_rec))
            sample_token = sample["next"]

    for image_id, (scene_name, sd_rec) in enumerate(tqdm(camera_keyframes, desc="2D labels", unit="image"), 1):
        images.append({"id": image_id, "file_name": sd_rec["filename"], "width": sd_rec["width"],
                       "height": sd_rec["height"], "sample_token": sd_rec["sample_token"],
                       "channel": sd_rec["channel"], "sample_data_token": sd_rec["token"], "scene_name": scene_name})
        for ann_rec, (x1, y1, x2, y2) in camera_boxes_2d(nusc, sd_rec["token"], visibilities):
            detection_name = category_to_detection_name(ann_rec["category_name"])
            width, height = x2 - x1, y2 - y1
            if detection_name is None or width < min_box_size or height < min_box_size:
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": CATEGORY_IDS[detection_name], "bbox": [x1, y1, width, height],
                                "area": width * height, "iscrowd": 0,
                                "sample_annotation_token": ann_rec["token"],
                                "visibility_token": ann_rec["visibility_token"]})
    categories = [{"id": category_id, "name": name} for name, category_id in CATEGORY_IDS.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def tables_digest(table_root: str) -> dict:
    """SHA-1 of each table file: any edit of the database changes the cache key."""
    digests = {}
    for name in sorted(os.listdir(table_root)):
        if name.endswith(".json"):
            sha1 = hashlib.sha1()
            with open(os.path.join(table_root, name), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    sha1.update(chunk)
            digests[name] = sha1.hexdigest()
    return digests


def label_cache(dataroot: str, version: str, split: str, label_cfg: dict, cache_dir: str):
    """Path and COCO dict of the labels of `split`, rebuilt when any input or setting changed.

    label_cfg: {"visibilities": list of visibility tokens to keep ("" for none), "min_box_size": px}."""
    dataroot = os.path.abspath(dataroot)
    check_dataroot(dataroot, version)
    key_fields = {"format": LABEL_FORMAT, "dataroot": dataroot, "version": version, "split": split,
                  "visibilities": sorted(label_cfg["visibilities"]), "min_box_size": label_cfg["min_box_size"],
                  "tables": tables_digest(os.path.join(dataroot, version))}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    path = os.path.join(cache_dir, f"{version}_{split}_{hashlib.sha1(dataroot.encode()).hexdigest()[:10]}.json")
    if os.path.exists(path):
        coco = read_cache(path)
        if coco.get("dstorch_cache_key") == key:
            return path, coco
        logger.info("label cache %s is out of date: rebuilding it", path)

    nusc = load_nuscenes(dataroot, version)
    coco = build_coco(nusc, split_scene_names(nusc, split), label_cfg["visibilities"], label_cfg["min_box_size"])
    coco["info"] = {"description": f"nuScenes {version} {split} 2D boxes re-projected by the devkit",
                    "key_fields": {k: v for k, v in key_fields.items() if k != "tables"}}
    coco["dstorch_cache_key"] = key
    atomic_write_json(path, coco)
    return path, coco


def read_cache(path: str) -> dict:
    """Read a label cache; a file that is not one is reported as corrupt."""
    try:
        with open(path) as f:
            coco = json.load(f)
        if not all(isinstance(coco.get(k), list) for k in ("images", "annotations", "categories")):
            raise ValueError("not a COCO dict")
    except (OSError, ValueError, AttributeError) as error:
        raise UserError(f"label cache {path} is corrupt ({type(error).__name__}: {error}): "
                        f"delete it and run again to rebuild it") from None
    return coco
