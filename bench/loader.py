"""Loader speed, on an embedded dataset at nuScenes' 1600x900 (--jpeg_size), in one run: (1) samples/s of this
loader (label cache, reduced-scale JPEG decoding) against the per-item devkit approach (re-projecting every
annotation with shapely inside __getitem__, decoding each image at full size, then resizing), both through a
DataLoader with one worker;
(2) whether this loader with 2 workers (--num_cores 2) and augmentation keeps up with the Solver's training step
on this CPU: images/s of the loader alone, of the training step alone on one batch, and of training fed by the
loader (the workers then share the cores with training).

    python -m bench.loader [--samples_per_scene 3] [--repeats 2] [--train_steps 12] [--jpeg_size 1600x900]
                           [--results_dir bench/results]

The baseline re-projects with the devkit script's own `get_2d_boxes` (on a canvas of --jpeg_size: the script's is
nuScenes' 1600x900) and decodes with OpenCV's libjpeg-turbo, the fastest full-size decoder installed; both loaders
use one thread.
"""

import argparse
import functools
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

from bench.model import platform_args
from bench.results import add_results_dir, recorded
from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.collate_2d import collate_detection
from dataset.NuscenesDataset.common import PROJECT_ROOT
from dataset.NuscenesDataset.labels import CATEGORY_IDS, load_nuscenes
from dataset.NuscenesDataset.loader_2d_obj_det import DatasetLoader
from helper import load_solver

DEVKIT_POST_PROCESS_COORDS = devkit_export.post_process_coords


def devkit_post_process_coords(corner_coords, imsize):
    """The export script's post_process_coords on a canvas of `imsize` (W, H px), made not to crash where the
    intersection is a point or a line."""
    try:
        return DEVKIT_POST_PROCESS_COORDS(corner_coords, imsize)
    except AttributeError:
        return None


class DevkitPerItemDataset(Dataset):
    """The per-item devkit approach: the devkit database in memory, each camera's 2D boxes re-projected by
    the devkit script's own `get_2d_boxes` (shapely), a full-size decode (cv2.imread), then a resize. Same
    samples, cameras and output contract as DatasetLoader."""

    def __init__(self, reference: DatasetLoader, version: str):
        self.nusc = load_nuscenes(reference.dataroot, version)
        devkit_export.nusc = self.nusc  # the script reads its database from a module global
        images = {image["id"]: image for image in reference.coco_ground_truth()["images"]}
        self.samples = [[images[image_id] for image_id in sample_ids]
                        for sample_ids in reference.image_ids.reshape(len(reference), -1).tolist()]
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


def samples_per_second(dataset: Dataset, repeats: int, num_workers: int = 1, batch_size: int = 1) -> float:
    """Samples/s over `repeats` passes through a DataLoader, after one warm-up batch."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_detection,
                        persistent_workers=True)
    iterator = iter(loader)
    next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += len(batch["images"])
    for _ in range(repeats - 1):
        for batch in loader:
            count += len(batch["images"])
    return count / (time.perf_counter() - start)


def training_images_per_second(solver, batches, steps: int) -> float:
    """Images/s of `steps` Solver.train steps on the batches `batches` yields (after one warm-up step)."""
    iterator = iter(batches)
    solver.train(next(iterator))
    start, images = time.perf_counter(), 0
    for _ in range(steps):
        batch = next(iterator)
        solver.train(batch)
        images += batch["images"].shape[0] * batch["images"].shape[1]
    return images / (time.perf_counter() - start)


def cycle(loader):
    while True:
        yield from loader


def keeps_up(dataroot: str, cache_dir: str, repeats: int, train_steps: int) -> None:
    """Part (2): the platform's defaults (batch 2, augmentation on, 2 threads) with --num_cores 2."""
    args = platform_args(["--dataset_dir", dataroot, "--num_cores", "2", "--val_ratio", "0.2",
                          "--cfg", f"data.2DObjDet.label_cache_dir={cache_dir}"])
    torch.set_num_threads(2)
    cv2.setNumThreads(1)
    dataset = DatasetLoader(args, mode="train")
    cameras = dataset.image_files.shape[1]
    loader_rate = samples_per_second(dataset, repeats, args["num_cores"], args["batch_size"]) * cameras
    loader = DataLoader(dataset, batch_size=args["batch_size"], shuffle=True, num_workers=args["num_cores"],
                        collate_fn=collate_detection, persistent_workers=True, drop_last=True)
    fixed_batch = next(iter(loader))
    solver = load_solver(args, device=torch.device("cpu"), class_names=dataset.class_names, steps_per_epoch=1)
    solver.mode_selection(True)
    step_rate = training_images_per_second(solver, iter(lambda: fixed_batch, None), train_steps)
    fed_rate = training_images_per_second(solver, cycle(loader), train_steps)
    print(f"\n(2) --num_cores 2 (2 workers), batch {args['batch_size']} x {cameras} cameras, augmentation on, "
          f"{dataset.input_size[0]}x{dataset.input_size[1]} input, training with 2 threads")
    print(f"{'':<52}{'images/s':>10}")
    print(f"{'loader alone':<52}{loader_rate:>10.1f}")
    print(f"{'training step alone (one batch, no loading)':<52}{step_rate:>10.1f}")
    print(f"{'training fed by the loader':<52}{fed_rate:>10.1f}")
    verdict = "keeps up" if loader_rate >= step_rate else "does not keep up"
    print(f"the loader {verdict}: it delivers {loader_rate / step_rate:.1f}x what the step consumes; fed training "
          f"runs at {fed_rate / step_rate:.0%} of the step alone")


def jpeg_size(text: str) -> tuple:
    """"1600x900" -> (1600, 900): an image size argument of the benchmarks."""
    try:
        width, height = (int(value) for value in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a size is WxH in px") from None
    return width, height


def compare(options) -> None:
    """Parts (1) and (2) on an embedded dataset generated in a temporary folder."""
    with open(PROJECT_ROOT / "config" / "data.json") as f:
        data = json.load(f)
    cfg = data["2DObjDet"]
    jpeg_width, jpeg_height = options.jpeg_size
    with tempfile.TemporaryDirectory() as tmp:
        dataroot = os.path.join(tmp, "nuscenes")
        synthetic.generate(dataroot, samples_per_scene=options.samples_per_scene, width=jpeg_width,
                           height=jpeg_height)
        cfg["label_cache_dir"] = os.path.join(tmp, "cache")
        loader_args = {"app_mode": "2DObjDet", "dataset_dir": dataroot, "val_ratio": 0.2, "bool_apply_img_aug": 0,
                       "data": data}
        ours = DatasetLoader(loader_args, mode="train")
        per_item = DevkitPerItemDataset(ours, cfg["version"])
        devkit_export.post_process_coords = functools.partial(devkit_post_process_coords,
                                                              imsize=options.jpeg_size)
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        ours_rate = samples_per_second(ours, options.repeats)
        per_item_rate = samples_per_second(per_item, options.repeats)
        width, height = ours.input_size
        print(f"(1) {len(ours)} samples x {len(cfg['cameras'])} cameras, {jpeg_width}x{jpeg_height} JPEGs -> "
              f"{width}x{height} input, 1 worker, batch 1")
        print(f"{'loader':<50}{'samples/s':>10}")
        print(f"{'this loader (label cache, reduced-scale decode)':<50}{ours_rate:>10.2f}")
        print(f"{'devkit per item (re-project per item, full decode)':<50}{per_item_rate:>10.2f}")
        print(f"speed-up: {ours_rate / per_item_rate:.1f}x (target >= 5x)")
        keeps_up(dataroot, cfg["label_cache_dir"], options.repeats, options.train_steps)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples_per_scene", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the samples for each loader")
    parser.add_argument("--train_steps", type=int, default=12, help="timed training steps in (2)")
    parser.add_argument("--jpeg_size", type=jpeg_size, default=(1600, 900), help="the JPEG files' WxH in px")
    add_results_dir(parser)
    options = parser.parse_args(argv)
    with recorded("loader", argv, options.results_dir):
        compare(options)


if __name__ == "__main__":
    main()
