"""Loader speed: samples/s of this loader (label cache, reduced-scale JPEG decoding) against the original approach
(re-projecting every annotation with shapely inside __getitem__, decoding each image at full size, then
resizing), both through a DataLoader with one worker, on the same embedded dataset at nuScenes' 1600x900.

    python -m bench.loader [--samples_per_scene 3] [--repeats 2]

The baseline re-projects with the devkit script's own `get_2d_boxes` (its canvas, 1600x900, is right here) and
decodes with OpenCV's libjpeg-turbo, the fastest full-size decoder installed; both loaders use one thread.
"""

import argparse
import json
import os
import tempfile
import time

import cv2
import numpy as np
import torch
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.scripts import export_2d_annotations_as_json as devkit_export
from torch.utils.data import DataLoader, Dataset

from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.labels import CATEGORY_IDS, load_nuscenes
from dataset.NuscenesDataset.loader_2d_obj_det import PROJECT_ROOT, DatasetLoader
from utils.collate import collate_detection

DEVKIT_POST_PROCESS_COORDS = devkit_export.post_process_coords


def devkit_post_process_coords(corner_coords, imsize=(1600, 900)):
    """The export script's post_process_coords, made not to crash where the intersection is a point or a line."""
    try:
        return DEVKIT_POST_PROCESS_COORDS(corner_coords, imsize)
    except AttributeError:
        return None


class OriginalApproachDataset(Dataset):
    """The original loader's per-item work: the devkit database in memory, each camera's 2D boxes re-projected by
    the devkit script's own `get_2d_boxes` (shapely), a full-size decode (cv2.imread), then a resize. Same
    samples, cameras and output contract as DatasetLoader."""

    def __init__(self, reference: DatasetLoader, version: str):
        self.nusc = load_nuscenes(reference.dataroot, version)
        devkit_export.nusc = self.nusc  # the script reads its database from a module global
        self.samples = reference.samples
        self.input_size = reference.input_size
        self.mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1) * 255
        self.std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) * 255

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        width, height = self.input_size
        images, boxes, labels, counts = [], [], [], []
        for image in self.samples[index]:
            pixels = cv2.cvtColor(cv2.imread(os.path.join(self.nusc.dataroot, image["file_name"])), cv2.COLOR_BGR2RGB)
            pixels = torch.from_numpy(cv2.resize(pixels, (width, height))).permute(2, 0, 1)
            scale = np.array([width / image["width"], height / image["height"]] * 2)
            image_boxes, image_labels = [], []
            for record in devkit_export.get_2d_boxes(image["sample_data_token"], ["", "1", "2", "3", "4"]):
                name = category_to_detection_name(record["category_name"])
                if name is not None:
                    image_boxes.append(np.array(record["bbox_corners"]) * scale)
                    image_labels.append(CATEGORY_IDS[name] - 1)
            images.append((pixels.float() - self.mean) / self.std)
            boxes.append(torch.tensor(np.array(image_boxes), dtype=torch.float32).reshape(-1, 4))
            labels.append(torch.tensor(image_labels, dtype=torch.int64))
            counts.append(len(image_labels))
        return {"images": torch.stack(images), "boxes": torch.cat(boxes), "labels": torch.cat(labels),
                "counts": torch.tensor(counts),
                "image_ids": torch.tensor([image["id"] for image in self.samples[index]]),
                "orig_sizes": torch.tensor([(image["width"], image["height"]) for image in self.samples[index]])}


def samples_per_second(dataset: Dataset, repeats: int) -> float:
    """Samples/s over `repeats` passes through a one-worker DataLoader, after one warm-up batch."""
    loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=collate_detection, persistent_workers=True)
    iterator = iter(loader)
    next(iterator)
    start, count = time.perf_counter(), 0
    for _ in iterator:
        count += 1
    for _ in range(repeats - 1):
        for _ in loader:
            count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples_per_scene", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the samples for each loader")
    args = parser.parse_args()
    with open(PROJECT_ROOT / "config" / "data.json") as f:
        data = json.load(f)
    cfg = data["2DObjDet"]
    with tempfile.TemporaryDirectory() as tmp:
        dataroot = os.path.join(tmp, "nuscenes")
        synthetic.generate(dataroot, samples_per_scene=args.samples_per_scene, width=1600, height=900)
        cfg["label_cache_dir"] = os.path.join(tmp, "cache")
        loader_args = {"app_mode": "2DObjDet", "dataset_dir": dataroot, "val_ratio": 0.2, "bool_apply_img_aug": 0,
                       "data": data}
        ours = DatasetLoader(loader_args, mode="train")
        original = OriginalApproachDataset(ours, cfg["version"])
        devkit_export.post_process_coords = devkit_post_process_coords
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        ours_rate = samples_per_second(ours, args.repeats)
        original_rate = samples_per_second(original, args.repeats)
    width, height = ours.input_size
    print(f"{len(ours)} samples x {len(cfg['cameras'])} cameras, 1600x900 JPEGs -> {width}x{height} input, "
          f"1 worker, batch 1")
    print(f"{'loader':<50}{'samples/s':>10}")
    print(f"{'this loader (label cache, reduced-scale decode)':<50}{ours_rate:>10.2f}")
    print(f"{'original (re-project per item, full decode)':<50}{original_rate:>10.2f}")
    print(f"speed-up: {ours_rate / original_rate:.1f}x")


if __name__ == "__main__":
    main()
