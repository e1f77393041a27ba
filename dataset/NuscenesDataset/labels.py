"""2D detection labels of nuScenes camera keyframes, exactly as the devkit computes them, cached as arrays.

The boxes are the devkit's re-projection of the 3D annotations
(`nuscenes/scripts/export_2d_annotations_as_json.py::get_2d_boxes`): global -> ego -> camera with the devkit's
`Box`, keep the corners with z > 0, `view_points`, convex hull intersected with the image canvas, min/max. Two
differences, both deliberate: the canvas is each sample_data's own width x height (the script hard-codes
1600x900), and where the intersection degenerates to a point or a line (the script crashes on its `.exterior`)
its bounds are used and boxes of zero area are dropped. Classes come from the devkit's
`category_to_detection_name`; categories without a detection class are dropped.

The label cache (cache.py: one .npz of plain arrays) is built once per (dataroot, version, split, label settings,
table files), one job per scene over all cores, and reused while the key stored in it matches. Its file name hashes
all of these but the tables, so that two label settings never share a file. It holds, for I
camera keyframe images and A boxes:
    image_file (I,) bytes: path relative to the dataroot; image_size (I, 2) int32: (width, height) px;
    image_sample, image_token (I,) bytes: sample and sample_data tokens; image_channel (I,) bytes;
    image_scene (I,) int32: index into scene_names (N_scenes,) str;
    box_image (A,) int32: image index (the COCO image id is index + 1); box_category (A,) int8: COCO category id
    1..10; box_xywh (A, 4) float64: x, y, width, height in px of the original image; box_token, box_visibility
    (A,) bytes: the sample_annotation token and its visibility token.
`coco_from_labels` turns them into the COCO ground truth of the evaluation and of `export_coco`.

The devkit is imported where labels are built: its package import pulls in scikit-learn, SciPy and pyplot (more
than a second per process), which a detection run whose label cache exists (each DDP process, test.py, predict.py)
never needs. (The BEV loader uses the devkit's Box in every item.)
"""

from __future__ import annotations

import glob
import json
import logging
import multiprocessing
import os
import shutil
from contextlib import nullcontext
from typing import TYPE_CHECKING

import numpy as np
import shapely
from pyquaternion import Quaternion
from shapely.geometry import box as shapely_box
from tqdm import tqdm

from dataset.NuscenesDataset.cache import cache_key, cached_arrays, read_arrays, tables_key, write_arrays
from dataset.NuscenesDataset.common import scene_samples
from utils.errors import UserError
from utils.io import end_with_parent

if TYPE_CHECKING:
    from nuscenes.nuscenes import NuScenes

LABEL_FORMAT = 2  # bump when the label computation changes, so that old caches are rebuilt
# the devkit's nuscenes.eval.detection.constants.DETECTION_NAMES, in its order (tested equal)
DETECTION_NAMES = ("car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle", "bicycle",
                   "traffic_cone", "barrier")
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
    from nuscenes.nuscenes import NuScenes

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
    from nuscenes.utils.splits import create_splits_scenes

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
    from nuscenes.utils.geometry_utils import view_points

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


def scene_labels(nusc: NuScenes, scene_name: str, visibilities: list, min_box_size: float) -> dict:
    """The label arrays of one scene's camera keyframes (see the module docstring; without image_scene and
    scene_names), in time and channel order, image indices local to the scene; boxes no smaller than
    `min_box_size` px in width and height."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    scene = next(scene for scene in nusc.scene if scene["name"] == scene_name)
    images, boxes = [], []
    for sample in scene_samples(nusc, scene):
        for channel in sorted(sample["data"]):
            sd_rec = nusc.get("sample_data", sample["data"][channel])
            if sd_rec["sensor_modality"] != "camera":
                continue
            for ann_rec, (x1, y1, x2, y2) in camera_boxes_2d(nusc, sd_rec["token"], visibilities):
                detection_name = category_to_detection_name(ann_rec["category_name"])
                if detection_name is None or x2 - x1 < min_box_size or y2 - y1 < min_box_size:
                    continue
                boxes.append((len(images), CATEGORY_IDS[detection_name], (x1, y1, x2 - x1, y2 - y1),
                              ann_rec["token"], ann_rec["visibility_token"]))
            images.append((sd_rec["filename"], sd_rec["width"], sd_rec["height"], sd_rec["sample_token"],
                           sd_rec["channel"], sd_rec["token"]))
    return {
        "image_file": np.array([image[0] for image in images], dtype=np.bytes_).reshape(-1),
        "image_size": np.array([image[1:3] for image in images], dtype=np.int32).reshape(-1, 2),
        "image_sample": np.array([image[3] for image in images], dtype=np.bytes_).reshape(-1),
        "image_channel": np.array([image[4] for image in images], dtype=np.bytes_).reshape(-1),
        "image_token": np.array([image[5] for image in images], dtype=np.bytes_).reshape(-1),
        "box_image": np.array([box[0] for box in boxes], dtype=np.int32),
        "box_category": np.array([box[1] for box in boxes], dtype=np.int8),
        "box_xywh": np.array([box[2] for box in boxes], dtype=np.float64).reshape(-1, 4),
        "box_token": np.array([box[3] for box in boxes], dtype=np.bytes_).reshape(-1),
        "box_visibility": np.array([box[4] for box in boxes], dtype=np.bytes_).reshape(-1),
    }


_WORKER = {}  # the devkit database and the function of one scene, inherited by the forked label workers


def _worker_scene(scene_name: str) -> dict:
    return _WORKER["scene_fn"](_WORKER["nusc"], scene_name)


def build_labels(nusc: NuScenes, scene_names: list, scene_fn, workers: int, parts_dir: str,
                 what: str = "2D labels") -> dict:
    """The label arrays of `scene_names` (in that order): scene_fn(nusc, scene name) gives one scene's, with
    image_file (one per image) and box_image (indices local to the scene), run as one job per scene over `workers`
    processes (forked, so that they share the loaded database; scene_fn need not pickle). Each finished scene is
    kept in `parts_dir` until the whole build is written, so a build that was killed resumes from the scenes it had
    finished. Adds image_scene and scene_names (see the module docstring)."""
    os.makedirs(parts_dir, exist_ok=True)
    parts = {name: os.path.join(parts_dir, f"{name}.npz") for name in scene_names}
    todo = [name for name in scene_names if not os.path.exists(parts[name])]
    _WORKER.update(nusc=nusc, scene_fn=scene_fn)
    try:
        with (multiprocessing.get_context("fork").Pool(workers, end_with_parent, (os.getpid(),))
              if workers > 1 and len(todo) > 1 else
              nullcontext()) as pool:
            results = pool.imap(_worker_scene, todo) if pool is not None else map(_worker_scene, todo)
            for name, arrays in tqdm(zip(todo, results, strict=True), desc=what, unit="scene",
                                     total=len(todo), initial=len(scene_names) - len(todo)):
                write_arrays(parts[name], arrays)
    finally:
        _WORKER.clear()
    scenes = [read_arrays(parts[name]) for name in scene_names]
    image_counts = [len(scene["image_file"]) for scene in scenes]
    offsets = np.cumsum([0, *image_counts[:-1]])
    labels = {key: np.concatenate([scene[key] for scene in scenes]) for key in scenes[0]}
    labels["box_image"] = np.concatenate([scene["box_image"] + offset for scene, offset in zip(scenes, offsets,
                                                                                                strict=True)])
    labels["image_scene"] = np.repeat(np.arange(len(scene_names), dtype=np.int32), image_counts)
    labels["scene_names"] = np.array(scene_names, dtype=np.str_)
    return labels


def label_arrays(dataroot: str, version: str, split: str, label_cfg: dict, cache_dir: str,
                 workers: int | None = None) -> tuple:
    """(path, label arrays) of the camera keyframes of `split` (see the module docstring), from the cache in
    `cache_dir`, built there (in parallel over `workers` processes, default: all cores) when missing or when any
    input or setting changed.

    label_cfg: {"visibilities": list of visibility tokens to keep ("" for none), "min_box_size": px}."""
    dataroot = os.path.abspath(dataroot)
    check_dataroot(dataroot, version)
    # Every setting that changes the labels names the file (hashed), so that two settings never share one: runs of
    # other settings would rebuild it in turn, and a reader could get another run's boxes. Normalized, so that equal
    # settings written differently (0 and 0.0, visibilities in another order) share it. The tables are in the stored
    # key only: a changed table makes the file stale, and it is rebuilt in place.
    settings = {"format": LABEL_FORMAT, "dataroot": dataroot, "version": version, "split": split,
                "visibilities": sorted(set(label_cfg["visibilities"])),
                "min_box_size": float(label_cfg["min_box_size"])}

    def one_scene(nusc: NuScenes, scene_name: str) -> dict:
        return scene_labels(nusc, scene_name, label_cfg["visibilities"], label_cfg["min_box_size"])

    return split_label_cache(settings, cache_dir, "", one_scene, workers, "2D labels")


def split_label_cache(settings: dict, cache_dir: str, prefix: str, scene_fn, workers: int | None, what: str) -> tuple:
    """(path, arrays) of the label cache of settings["split"] (settings: at least dataroot, version, split, and every
    other setting that changes the labels): <cache_dir>/<prefix><version>_<split>_<settings hash>.npz, built when
    missing or stale by build_labels(scene_fn) over `workers` processes (default: all cores). A killed build resumes
    from its finished scenes; those of a killed build of other inputs are removed. `what` ("2D labels") names the
    build's progress bar and the cache in messages."""
    dataroot, version, split = settings["dataroot"], settings["version"], settings["split"]
    key = cache_key({**settings, "tables": tables_key(os.path.join(dataroot, version))})
    path = os.path.join(os.path.abspath(cache_dir), f"{prefix}{version}_{split}_{cache_key(settings)[:16]}.npz")
    parts_dir = f"{path}.parts-{key[:16]}"

    def build() -> dict:
        for stale in glob.glob(f"{glob.escape(path)}.parts-*"):  # a killed build of other inputs: useless now
            if stale != parts_dir:
                shutil.rmtree(stale, ignore_errors=True)
        nusc = load_nuscenes(dataroot, version)
        return build_labels(nusc, split_scene_names(nusc, split), scene_fn, workers or os.cpu_count() or 1, parts_dir,
                            what)

    labels = cached_arrays(path, key, build, f"the {what} cache of {version} {split}")
    shutil.rmtree(parts_dir, ignore_errors=True)  # the scenes of a finished build, once the cache is written
    return path, labels


def coco_from_labels(labels: dict, version: str, split: str) -> dict:
    """The COCO ground-truth dict of label arrays: images (id = index + 1, file_name, width, height,
    sample_token, channel, sample_data_token, scene_name), annotations (id, image_id, category_id, bbox [x, y, w,
    h], area, iscrowd 0, sample_annotation_token, visibility_token) and the 10 categories."""
    scene_names = labels["scene_names"].tolist()
    images = [{"id": index + 1, "file_name": file_name.decode(), "width": int(width), "height": int(height),
               "sample_token": sample.decode(), "channel": channel.decode(), "sample_data_token": token.decode(),
               "scene_name": scene_names[scene]}
              for index, (file_name, (width, height), sample, channel, token, scene) in enumerate(zip(
                  labels["image_file"], labels["image_size"].tolist(), labels["image_sample"],
                  labels["image_channel"], labels["image_token"], labels["image_scene"].tolist(), strict=True))]
    annotations = [{"id": index + 1, "image_id": image + 1, "category_id": category, "bbox": bbox,
                    "area": bbox[2] * bbox[3], "iscrowd": 0, "sample_annotation_token": token.decode(),
                    "visibility_token": visibility.decode()}
                   for index, (image, category, bbox, token, visibility) in enumerate(zip(
                       labels["box_image"].tolist(), labels["box_category"].tolist(), labels["box_xywh"].tolist(),
                       labels["box_token"], labels["box_visibility"], strict=True))]
    categories = [{"id": category_id, "name": name} for name, category_id in CATEGORY_IDS.items()]
    return {"info": {"description": f"nuScenes {version} {split} 2D boxes re-projected by the devkit"},
            "images": images, "annotations": annotations, "categories": categories}


def label_cache(dataroot: str, version: str, split: str, label_cfg: dict, cache_dir: str,
                workers: int | None = None) -> tuple:
    """(path of the cache, COCO dict) of `split`: label_arrays as a COCO ground truth (export and tests)."""
    path, labels = label_arrays(dataroot, version, split, label_cfg, cache_dir, workers)
    return path, coco_from_labels(labels, version, split)
