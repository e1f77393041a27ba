"""2D labels: box for box what the devkit's export script computes; the COCO label cache and its key."""

import json
import os
import shutil

import numpy as np
import pytest
from nuscenes.eval.detection.constants import DETECTION_NAMES
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.nuscenes import NuScenes
from nuscenes.scripts import export_2d_annotations_as_json as devkit_export
from pycocotools.coco import COCO
from shapely.geometry import box as shapely_box

from dataset.NuscenesDataset import export_coco, labels
from dataset.NuscenesDataset.loader_2d_obj_det import DatasetLoader

ALL_VISIBILITIES = {"visibilities": ["", "1", "2", "3", "4"], "min_box_size": 0.0}


def devkit_boxes(nusc, sample_data_token, width, height):
    """The export script's get_2d_boxes on a width x height canvas, where it hard-codes 1600x900. Where its
    intersection degenerates to a point or a line it crashes (AttributeError on .exterior); there the expected
    box is the geometry's bounds, dropped if of zero area."""
    original = devkit_export.post_process_coords

    def post_process_coords(corner_coords):
        try:
            return original(corner_coords, imsize=(width, height))
        except AttributeError:
            hull = devkit_export.MultiPoint(corner_coords).convex_hull
            x1, y1, x2, y2 = hull.intersection(devkit_export.box(0, 0, width, height)).bounds
            return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None

    devkit_export.nusc = nusc
    devkit_export.post_process_coords = post_process_coords
    try:
        records = devkit_export.get_2d_boxes(sample_data_token, ["", "1", "2", "3", "4"])
    finally:
        devkit_export.post_process_coords = original
        del devkit_export.nusc
    return {r["sample_annotation_token"]: r["bbox_corners"] for r in records
            if category_to_detection_name(r["category_name"]) is not None}


def test_boxes_equal_the_devkit_for_every_camera_keyframe(embedded_dir, tmp_path):
    nusc = NuScenes(version="v1.0-mini", dataroot=embedded_dir, verbose=False)
    compared = clipped = 0
    for split in ("mini_train", "mini_val"):
        _, coco = labels.label_cache(embedded_dir, "v1.0-mini", split, ALL_VISIBILITIES, str(tmp_path))
        ours = {image["id"]: {} for image in coco["images"]}
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            ours[ann["image_id"]][ann["sample_annotation_token"]] = (x, y, x + w, y + h)
        for image in coco["images"]:
            expected = devkit_boxes(nusc, image["sample_data_token"], image["width"], image["height"])
            assert set(ours[image["id"]]) == set(expected), image["file_name"]
            for token, corners in expected.items():
                assert ours[image["id"]][token] == pytest.approx(corners, abs=1e-3)
                compared += 1
                clipped += corners[0] == 0 or corners[2] == image["width"]
    assert len([i for i in nusc.sample_data if i["sensor_modality"] == "camera"]) == 120
    assert compared > 300 and clipped > 10


def test_the_classes_are_the_devkits_detection_names_in_order():
    """labels.py names them itself, so that the devkit is imported only where labels are built."""
    assert list(labels.DETECTION_NAMES) == DETECTION_NAMES


def test_degenerate_intersections_are_dropped_not_crashed():
    canvas = shapely_box(0, 0, 320, 180)
    touching_edge = [[320, 10], [400, 10], [400, 50], [320, 50]]  # meets the canvas in a line
    touching_corner = [[320, 180], [400, 250], [330, 260]]  # meets it in a point
    vertical_line = [[10, 10], [10, 60]]  # two corners in front of the camera, one above the other
    for corners in (touching_edge, touching_corner, vertical_line):
        assert labels.clip_to_canvas(corners, canvas) is None
    assert labels.clip_to_canvas([[10, 10], [50, 60]], canvas) == (10, 10, 50, 60)  # a diagonal line: its bounds
    assert labels.clip_to_canvas([[300, 100], [400, 120], [350, 200]], canvas) == pytest.approx(
        devkit_export.post_process_coords([[300, 100], [400, 120], [350, 200]], imsize=(320, 180)))


def test_coco_file_format(embedded_dir, tmp_path):
    _, coco = labels.label_cache(embedded_dir, "v1.0-mini", "mini_val", ALL_VISIBILITIES, str(tmp_path))
    path = tmp_path / "mini_val.json"
    path.write_text(json.dumps(coco))
    gt = COCO(str(path))
    assert [c["name"] for c in gt.loadCats(gt.getCatIds())] == ["car", "truck", "bus", "trailer",
                                                               "construction_vehicle", "pedestrian", "motorcycle",
                                                               "bicycle", "traffic_cone", "barrier"]
    assert len(gt.getImgIds()) == 2 * 2 * 6
    image = coco["images"][0]
    assert {"id", "file_name", "width", "height", "sample_token", "channel"} <= set(image)
    assert os.path.exists(os.path.join(embedded_dir, image["file_name"]))
    for ann in coco["annotations"]:
        assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(ann["bbox"][2] * ann["bbox"][3])
        assert 1 <= ann["category_id"] <= 10


def test_cache_is_reused_and_rebuilt_on_any_change(embedded_dir, tmp_path, monkeypatch):
    dataroot = tmp_path / "copy"
    for folder in ("v1.0-mini", "maps"):  # what the label computation reads; no images
        shutil.copytree(os.path.join(embedded_dir, folder), dataroot / folder)
    cache_dir = str(tmp_path / "cache")
    path, first = labels.label_cache(str(dataroot), "v1.0-mini", "mini_val", ALL_VISIBILITIES, cache_dir)
    assert path.endswith(".npz") and first["annotations"]

    builds = []
    real_build = labels.build_labels
    monkeypatch.setattr(labels, "build_labels", lambda *a: builds.append(a) or real_build(*a))
    assert labels.label_cache(str(dataroot), "v1.0-mini", "mini_val", ALL_VISIBILITIES, cache_dir)[1] == first
    assert not builds

    os.utime(path, (0, 0))  # an old file is not a stale file
    labels.label_cache(str(dataroot), "v1.0-mini", "mini_val", ALL_VISIBILITIES, cache_dir)
    assert not builds

    fewer = labels.label_cache(str(dataroot), "v1.0-mini", "mini_val", {**ALL_VISIBILITIES, "min_box_size": 20.0},
                               cache_dir)[1]
    assert len(builds) == 1 and len(fewer["annotations"]) < len(first["annotations"])
    assert all(min(a["bbox"][2:]) >= 20.0 for a in fewer["annotations"])

    only_visible = labels.label_cache(str(dataroot), "v1.0-mini", "mini_val",
                                      {"visibilities": ["4"], "min_box_size": 0.0}, cache_dir)[1]
    assert len(builds) == 2 and all(a["visibility_token"] == "4" for a in only_visible["annotations"])

    table = dataroot / "v1.0-mini" / "sample_annotation.json"
    records = json.loads(table.read_text())
    records = [r for r in records if r["visibility_token"] != "4"]
    table.write_text(json.dumps(records))
    edited_path, edited = labels.label_cache(str(dataroot), "v1.0-mini", "mini_val", ALL_VISIBILITIES, cache_dir)
    assert len(builds) == 3 and len(edited["annotations"]) < len(first["annotations"])
    assert edited_path == path  # a changed table: the same settings' file, rewritten in place
    assert len([name for name in os.listdir(cache_dir) if name.endswith(".npz")]) == 3  # one file per settings

    other_root = tmp_path / "other"  # the same tables elsewhere: never the first dataroot's cache
    shutil.copytree(dataroot, other_root)
    other_path, _ = labels.label_cache(str(other_root), "v1.0-mini", "mini_val", ALL_VISIBILITIES, cache_dir)
    train_path, _ = labels.label_cache(str(dataroot), "v1.0-mini", "mini_train", ALL_VISIBILITIES, cache_dir)
    assert len({path, other_path, train_path}) == 3 and len(builds) == 5


def test_two_label_settings_of_one_split_and_folder_use_two_files(embedded_dir, tmp_path, monkeypatch):
    """Every setting that changes the labels names the file: runs of other settings never rewrite each other's."""
    cache_dir = str(tmp_path)
    path, first = labels.label_arrays(embedded_dir, "v1.0-mini", "mini_val", ALL_VISIBILITIES, cache_dir)
    other_settings = ({**ALL_VISIBILITIES, "min_box_size": 20.0}, {"visibilities": ["4"], "min_box_size": 0.0})
    others = [labels.label_arrays(embedded_dir, "v1.0-mini", "mini_val", settings, cache_dir)[0]
              for settings in other_settings]
    assert len({path, *others}) == 3 and all(os.path.isfile(other) for other in (path, *others))
    monkeypatch.setattr(labels, "build_labels", lambda *a: pytest.fail("rebuilt a cache of the same settings"))
    same = {"visibilities": list(reversed(ALL_VISIBILITIES["visibilities"])), "min_box_size": 0}  # written otherwise
    again_path, again = labels.label_arrays(embedded_dir, "v1.0-mini", "mini_val", same, cache_dir)
    assert again_path == path and all(np.array_equal(again[key], first[key]) for key in first)


def test_the_ground_truth_is_the_labels_the_dataset_loaded(embedded_dir, make_args, tmp_path):
    """The evaluation's COCO ground truth comes from the arrays the dataset loaded, not from the cache file, which
    another run may rewrite meanwhile (other label settings, or a changed table)."""
    cache_dir = str(tmp_path / "cache")
    dataset = DatasetLoader(make_args(embedded_dir, data={"label_cache_dir": cache_dir}), mode="val")
    before = dataset.coco_ground_truth()
    own_images = set(dataset.image_ids.tolist())
    assert len([a for a in before["annotations"] if a["image_id"] in own_images]) == len(dataset.boxes) > 0

    bigger = {**ALL_VISIBILITIES, "min_box_size": 20.0}  # another run's settings, same split and folder
    other_path, other = labels.label_arrays(embedded_dir, "v1.0-mini", dataset.split, bigger, cache_dir)
    assert 0 < len(other["box_image"]) < len(before["annotations"])
    assert dataset.coco_ground_truth() == before
    shutil.copy(other_path, f"{dataset.coco_path}.new")  # even the dataset's own file replaced, as a writer does
    os.replace(f"{dataset.coco_path}.new", dataset.coco_path)
    assert dataset.coco_ground_truth() == before
    assert all(isinstance(array, np.ndarray) for array in dataset.split_labels.values())  # flat arrays, no box objects


def test_parallel_build_equals_serial_build(embedded_dir, tmp_path):
    _, serial = labels.label_arrays(embedded_dir, "v1.0-mini", "mini_train", ALL_VISIBILITIES,
                                    str(tmp_path / "serial"), workers=1)
    _, parallel = labels.label_arrays(embedded_dir, "v1.0-mini", "mini_train", ALL_VISIBILITIES,
                                      str(tmp_path / "parallel"), workers=2)
    assert serial.keys() == parallel.keys() and len(serial["box_image"]) > 300
    for key, array in serial.items():
        assert array.dtype == parallel[key].dtype and np.array_equal(array, parallel[key]), key


def test_a_killed_build_resumes_from_its_finished_scenes(embedded_dir, tmp_path, monkeypatch):
    cache_dir = str(tmp_path / "cache")
    real_scene_labels, done = labels.scene_labels, []

    def die_at_the_fourth_scene(nusc, scene_name, *rest):
        if len(done) == 3:
            raise KeyboardInterrupt
        done.append(scene_name)
        return real_scene_labels(nusc, scene_name, *rest)

    monkeypatch.setattr(labels, "scene_labels", die_at_the_fourth_scene)
    with pytest.raises(KeyboardInterrupt):
        labels.label_arrays(embedded_dir, "v1.0-mini", "mini_train", ALL_VISIBILITIES, cache_dir, workers=1)
    assert not [name for name in os.listdir(cache_dir) if name.endswith(".npz")]  # no cache that looks complete
    monkeypatch.setattr(labels, "scene_labels", lambda nusc, scene_name, *rest: done.append(scene_name) or
                        real_scene_labels(nusc, scene_name, *rest))
    _, resumed = labels.label_arrays(embedded_dir, "v1.0-mini", "mini_train", ALL_VISIBILITIES, cache_dir, workers=1)
    assert len(done) == 8 and len(set(done)) == 8  # 3 scenes before the kill, the other 5 after it
    _, straight = labels.label_arrays(embedded_dir, "v1.0-mini", "mini_train", ALL_VISIBILITIES,
                                      str(tmp_path / "straight"), workers=1)
    assert all(np.array_equal(resumed[key], straight[key]) for key in straight if key != "dstorch_cache_key")
    assert not [name for name in os.listdir(cache_dir) if ".parts-" in name]  # gone once the cache is written


def test_export_coco_command(embedded_dir, tmp_path):
    out = tmp_path / "gt" / "mini_val.json"
    export_coco.main(["--dataroot", embedded_dir, "--version", "v1.0-mini", "--split", "mini_val", "--out", str(out)])
    exported = json.loads(out.read_text())
    assert len(exported["images"]) == 24 and exported["annotations"] and "dstorch_cache_key" not in exported
    assert COCO(str(out)).getImgIds()
