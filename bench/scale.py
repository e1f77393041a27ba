"""Trainval scale, in one run: the label cache (build on 1 process vs all cores, reload in a fresh process), the
training loader's memory (the dataset object, the main process and each worker after some batches), and the
evaluation at the val split's size (post-processing and COCO metrics of 36k images x 100 detections).

    python -m bench.scale [--dataroot DIR] [--samples_per_scene 5] [--scenes 850] [--batches 300] [--eval_images 36114]
                          [--results_dir bench/results]

The database is a trainval-shaped embedded one (the 850 official scene names, `--samples_per_scene` keyframes
each, one rendered frame per camera hard-linked everywhere: `synthetic --image_mode linked`), made under
.cache/bench_scale (or --dataroot) on first use and reused after. Real trainval has 40 keyframes per scene: the
default 5 is one eighth of it.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.results import add_results_dir, recorded
from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.labels import label_arrays
from dataset.NuscenesDataset.loader_2d_obj_det import DatasetLoader
from helper import PROJECT_ROOT
from models.Yolo.boxes import coco_detection_array, postprocess_detections
from utils.coco_eval import coco_metrics, load_coco
from utils.config import merge_config

LABELS = {"visibilities": ["", "1", "2", "3", "4"], "min_box_size": 0.0}
VERSION = "v1.0-trainval"


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of a process in MB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def cache_build(dataroot: str, work: str) -> None:
    """Build the train split's label cache with 1 process and with all cores (each into an empty folder)."""
    times = {}
    for workers in (1, os.cpu_count()):
        start = time.perf_counter()
        path, labels = label_arrays(dataroot, VERSION, "train", LABELS, os.path.join(work, f"cache{workers}"),
                                    workers=workers)
        times[workers] = time.perf_counter() - start
    print(f"label cache of the train split ({len(labels['image_file'])} images, {len(labels['box_image'])} boxes): "
          f"build {times[1]:.1f} s on 1 process, {times[os.cpu_count()]:.1f} s on {os.cpu_count()}: "
          f"{times[1] / times[os.cpu_count()]:.2f}x; file {os.path.getsize(path) / 1e6:.1f} MB", flush=True)
    reload = (f"import time; start = time.perf_counter(); from dataset.NuscenesDataset.labels import label_arrays; "
              f"imported = time.perf_counter(); label_arrays({dataroot!r}, {VERSION!r}, 'train', {LABELS!r}, "
              f"{os.path.join(work, 'cache1')!r}); print(time.perf_counter() - imported, imported - start)")
    seconds, import_s = map(float, subprocess.run([sys.executable, "-c", reload], cwd=PROJECT_ROOT, check=True,
                                                  capture_output=True, text=True).stdout.split())
    print(f"reload in a fresh process: {seconds:.3f} s (after {import_s:.1f} s of imports)", flush=True)


def loader_memory(dataroot: str, work: str, batches: int) -> None:
    """The train dataset object's arrays, and the RSS of the main process and of each of 2 workers after
    `batches` batches of 2 samples at 320x192."""
    args = merge_config({"app_mode": "2DObjDet", "dataset_dir": dataroot, "val_ratio": 0.25,
                         "bool_apply_img_aug": 1, "cfg": [f"data.2DObjDet.version={VERSION}",
                                                          f"data.2DObjDet.label_cache_dir={work}/cache1"]},
                        str(PROJECT_ROOT / "config"))
    dataset = DatasetLoader(args, mode="train")
    held = sum(value.nbytes for value in vars(dataset).values() if isinstance(value, np.ndarray))
    before = rss_mb()
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=2, collate_fn=dataset.collate_fn,
                        persistent_workers=True)
    iterator = iter(loader)
    for _ in range(batches):
        next(iterator)
    workers = [rss_mb(worker.pid) for worker in iterator._workers]
    print(f"train dataset: {len(dataset)} samples, {held / 1e6:.2f} MB of arrays; RSS after {batches} batches: main "
          f"{rss_mb():.0f} MB ({before:.0f} MB before the loader), workers "
          f"{', '.join(f'{w:.0f}' for w in workers)} MB", flush=True)


def evaluation(num_images: int, detections_per_image: int = 100, batch_images: int = 12) -> None:
    """Post-processing of dense predictions at 320x192 (1260 points x 10 classes per image) into detections, then
    COCO metrics of num_images x detections_per_image detections against 8 boxes per image."""
    rng = np.random.default_rng(0)
    images = [{"id": i + 1, "width": 1600, "height": 900} for i in range(num_images)]
    corners = rng.uniform(0, [1400, 750], size=(num_images * 8, 2))
    sizes = rng.uniform(4, 200, size=(num_images * 8, 2))
    annotations = [{"id": k + 1, "image_id": k // 8 + 1, "category_id": int(k % 10) + 1,
                    "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0}
                   for k, ((x, y), (w, h)) in enumerate(zip(corners, sizes, strict=True))]
    ground_truth = load_coco({"images": images, "annotations": annotations,
                              "categories": [{"id": c, "name": f"class{c}"} for c in range(1, 11)]})
    points, classes = 1260, 10
    generator = torch.Generator().manual_seed(0)
    start_rss, start = rss_mb(), time.perf_counter()
    arrays = []
    for first in range(0, num_images, batch_images):
        count = min(batch_images, num_images - first)
        centres = torch.rand(count, points, 2, generator=generator) * torch.tensor([320.0, 192.0])
        half = torch.rand(count, points, 2, generator=generator) * 40 + 2
        boxes = torch.cat([centres - half, centres + half], dim=-1)
        scores = torch.rand(count, points, classes, generator=generator)
        predictions = postprocess_detections(boxes, scores, score_threshold=0.001, nms_iou=0.6, pre_nms_topk=1000,
                                             max_detections=detections_per_image, image_size=(320, 192))
        ids = torch.arange(first + 1, first + count + 1).view(count, 1)
        batch = {"image_ids": ids, "orig_sizes": torch.tensor([[1600, 900]]).expand(count, 1, 2)}
        arrays.append(coco_detection_array(predictions, batch, (320, 192)))
    detections = np.concatenate(arrays)
    del arrays  # as Yolo_solver.eval: the per-batch copies are not held while scoring
    post_s = time.perf_counter() - start
    metrics, _ = coco_metrics(ground_truth, detections, list(range(1, num_images + 1)))
    total_s = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"evaluation of {num_images} images x {len(detections) / num_images:.0f} detections: post-processing "
          f"{post_s:.1f} s + COCO metrics {total_s - post_s:.1f} s = {total_s:.1f} s; peak RSS {peak_mb:.0f} MB "
          f"({start_rss:.0f} MB before; mAP {metrics['mAP']:.4f})", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", default=str(PROJECT_ROOT / ".cache" / "bench_scale" / "nuscenes"))
    parser.add_argument("--samples_per_scene", type=int, default=5, help="keyframes per scene (real trainval: ~40)")
    parser.add_argument("--scenes", type=int, default=850, help="the first N trainval scenes")
    parser.add_argument("--batches", type=int, default=300, help="loader batches before measuring RSS")
    parser.add_argument("--eval_images", type=int, default=36114, help="images of the evaluation (val: 36,114)")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    with recorded("scale", argv, args.results_dir):
        if not os.path.isdir(args.dataroot):
            start = time.perf_counter()
            synthetic.generate(args.dataroot, args.samples_per_scene, 1600, 900, version=VERSION, scenes=args.scenes,
                               image_mode="linked")
            print(f"made the trainval-shaped database in {time.perf_counter() - start:.0f} s", flush=True)
        with tempfile.TemporaryDirectory() as work:
            cache_build(args.dataroot, work)
            loader_memory(args.dataroot, work, args.batches)
        evaluation(args.eval_images)


if __name__ == "__main__":
    main()
