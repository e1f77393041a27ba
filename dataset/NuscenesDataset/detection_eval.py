"""nuScenes 3D detection results in the official submission format, scored by the devkit's own
`nuscenes.eval.detection.evaluate.DetectionEval` (config "detection_cvpr_2019": mAP by centre distance at 0.5, 1, 2
and 4 m, the five true-positive errors and the nuScenes Detection Score, NDS).

Detections travel as (D, len(DETECTION_COLUMNS)) float64 arrays: the sample's index in the dataset, the box's
global centre x, y, z (m), size width, length, height (m), yaw about the global z axis (rad), velocity x, y
(m/s), score, class index (DETECTION_NAMES) and attribute index (ATTRIBUTE_NAMES, -1 none).
"""

import json
import math
import os
import tempfile

import numpy as np
from pyquaternion import Quaternion

from dataset.NuscenesDataset.labels import DETECTION_NAMES, load_nuscenes
from dataset.NuscenesDataset.loader_3d_obj_det import ATTRIBUTE_NAMES

DETECTION_COLUMNS = ("sample", "x", "y", "z", "w", "l", "h", "yaw", "vx", "vy", "score", "class", "attribute")
EVAL_CONFIG = "detection_cvpr_2019"
MAX_BOXES_PER_SAMPLE = 500  # the devkit refuses more
CURVE_DISTANCE_M = 2.0  # the precision-recall curves test.py draws: at this matching distance
META = {"use_camera": True, "use_lidar": False, "use_radar": False, "use_map": False, "use_external": False}


def split_sample_tokens(nusc, split: str) -> list:
    """The sample tokens of the devkit split `split` that the database holds."""
    from nuscenes.utils.splits import create_splits_scenes

    scenes = set(create_splits_scenes()[split])
    return [sample["token"] for sample in nusc.sample if nusc.get("scene", sample["scene_token"])["name"] in scenes]


def ground_truth_submission(nusc, split: str, shift_m: float = 0.0) -> dict:
    """The submission that reports every annotation of `split` with a detection class as a detection of score 1
    (the devkit's velocity, 0 where it has none; the first attribute), moved `shift_m` along the global x axis: the
    reference of a perfect detector, and of one 1 m off."""
    from nuscenes.eval.detection.utils import category_to_detection_name

    results = {token: [] for token in split_sample_tokens(nusc, split)}
    for token in results:
        for annotation_token in nusc.get("sample", token)["anns"]:
            annotation = nusc.get("sample_annotation", annotation_token)
            name = category_to_detection_name(annotation["category_name"])
            if name is None:
                continue
            velocity = nusc.box_velocity(annotation_token)[:2]
            attributes = [nusc.get("attribute", t)["name"] for t in annotation["attribute_tokens"]]
            results[token].append({
                "sample_token": token, "translation": list(np.add(annotation["translation"], [shift_m, 0, 0])),
                "size": annotation["size"], "rotation": annotation["rotation"],
                "velocity": [0.0, 0.0] if np.isnan(velocity).any() else velocity.tolist(), "detection_name": name,
                "detection_score": 1.0, "attribute_name": attributes[0] if attributes else ""})
    return {"meta": META, "results": results}


def submission(detections: np.ndarray, sample_tokens: list, all_tokens: list) -> dict:
    """The submission dict {"meta", "results": {sample token: [box dicts]}} of `detections` (module docstring;
    "sample" indexes `sample_tokens`), every token of `all_tokens` present (those without a box: [])."""
    results = {token: [] for token in all_tokens}
    for row in detections:
        results[sample_tokens[int(row[0])]].append(submission_box(row, sample_tokens))
    return {"meta": META, "results": results}


def submission_box(row: np.ndarray, sample_tokens: list) -> dict:
    """The submission's dict of one detection row (module docstring)."""
    sample, x, y, z, w, length, h, yaw, vx, vy, score, label, attribute = row.tolist()
    return {"sample_token": sample_tokens[int(sample)], "translation": [x, y, z], "size": [w, length, h],
            "rotation": Quaternion(axis=[0.0, 0.0, 1.0], angle=yaw).elements.tolist(), "velocity": [vx, vy],
            "detection_name": DETECTION_NAMES[int(label)], "detection_score": score,
            "attribute_name": ATTRIBUTE_NAMES[int(attribute)] if attribute >= 0 else ""}


class NuscenesDetectionScore:
    """Scores submissions of one (dataroot, version, split) with DetectionEval; the devkit's database is loaded
    once, at the first score."""

    def __init__(self, dataroot: str, version: str, split: str):
        self.dataroot, self.version, self.split = dataroot, version, split
        self.nusc, self.all_tokens = None, None

    def split_tokens(self) -> list:
        if self.nusc is None:
            self.nusc = load_nuscenes(self.dataroot, self.version)
            self.all_tokens = split_sample_tokens(self.nusc, self.split)
        return self.all_tokens

    def __call__(self, results: dict, scored_tokens: list) -> tuple:
        """(metrics, curves) of a submission (every sample token of the split present) scored on the samples
        `scored_tokens` only (all of the split in test.py; validation scores its own scenes of the training split):
        metrics {"NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE", "per_class_AP" {class: AP}} (None where the
        devkit gives NaN), curves {class: (recall (101,), precision (101,))} at CURVE_DISTANCE_M. Without any box,
        what the devkit's definitions give (AP 0, errors 1, NDS 0), as it cannot run then."""
        from nuscenes.eval.common.data_classes import EvalBoxes
        from nuscenes.eval.detection.config import config_factory
        from nuscenes.eval.detection.evaluate import DetectionEval

        self.split_tokens()
        if not any(results["results"][token] for token in scored_tokens):  # the devkit raises on no box at all
            values = {"NDS": 0.0, "mAP": 0.0, **dict.fromkeys(("mATE", "mASE", "mAOE", "mAVE", "mAAE"), 1.0),
                      "per_class_AP": dict.fromkeys(DETECTION_NAMES, 0.0)}
            return values, {name: (np.linspace(0, 1, 101), np.zeros(101)) for name in DETECTION_NAMES}
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "results_nusc.json")
            with open(path, "w") as f:
                json.dump(results, f)
            evaluation = DetectionEval(self.nusc, config_factory(EVAL_CONFIG), path, self.split, folder, verbose=False)
            scored = set(scored_tokens)
            if scored != set(evaluation.sample_tokens):
                for name in ("gt_boxes", "pred_boxes"):
                    boxes = EvalBoxes()
                    for token in evaluation.sample_tokens:
                        if token in scored:
                            boxes.add_boxes(token, getattr(evaluation, name)[token])
                    setattr(evaluation, name, boxes)
                evaluation.sample_tokens = [token for token in evaluation.sample_tokens if token in scored]
            metrics, metric_data = evaluation.evaluate()
        summary = metrics.serialize()
        errors = summary["tp_errors"]
        values = {"NDS": summary["nd_score"], "mAP": summary["mean_ap"], "mATE": errors["trans_err"],
                  "mASE": errors["scale_err"], "mAOE": errors["orient_err"], "mAVE": errors["vel_err"],
                  "mAAE": errors["attr_err"]}
        result = {key: finite(value) for key, value in values.items()}
        result["per_class_AP"] = {name: finite(value) for name, value in summary["mean_dist_aps"].items()}
        curves = {name: (np.asarray(metric_data[(name, CURVE_DISTANCE_M)].recall),
                         np.asarray(metric_data[(name, CURVE_DISTANCE_M)].precision)) for name in DETECTION_NAMES}
        return result, curves


def finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)
