"""Evaluation cost, in one run: (1) a full evaluation pass (forward, decoding, NMS, COCO metrics: Solver.eval)
against the forward pass alone over the same split; (2) the COCO metrics alone for 10,000 synthetic images with
pycocotools, faster-coco-eval and the platform's (utils.coco_eval: pycocotools' rules on a detection array), and
whether their numbers are identical.

    python -m bench.eval [--repeats 3] [--coco_images 10000] [--results_dir bench/results] [--flags train.py flags ...]

(1) runs on the test split of the embedded dataset (generated on first use) at the configured input size, with
the batches decoded beforehand (bench/loader.py measures loading) and a model that keeps its 100 best detections
of every image (score threshold 0, NMS IoU threshold 1: the untrained model's boxes overlap, and NMS at 0.6
would keep few): the most work decoding, NMS and the metrics can have.
"""

import argparse
import contextlib
import io
import statistics
import time

import numpy as np
import torch
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.model import platform_args
from bench.results import add_results_dir, recorded
from helper import load_datasetloader, load_solver
from utils.coco_eval import SUMMARY_NAMES, coco_metrics, coco_results_array
from utils.coco_reference import reference_evaluation, synthetic_coco


class Preloaded:
    """Batches decoded once, iterated like the DataLoader they came from (Solver.eval reads .dataset)."""

    def __init__(self, loader):
        self.dataset, self.batches = loader.dataset, list(loader)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def evaluation_pass_vs_forward(repeats: int, flags: list) -> None:
    args = platform_args(["--num_cores", "1", "--cfg", "model.Yolo.postprocess.score_threshold=0.0",
                          "--cfg", "model.Yolo.postprocess.nms_iou=1.0", *flags])
    test_set, test_loader = load_datasetloader(args, 1, 0, "test")
    batches = Preloaded(test_loader)
    solver = load_solver(args, device=torch.device("cpu"), class_names=test_set.class_names, steps_per_epoch=1)
    model = solver.evaluated_model()  # the weights Solver.eval uses

    @torch.no_grad()
    def forward_alone():
        for batch in batches:
            model(batch["images"])

    def full_pass():
        return solver.eval(batches, show_progress=False)

    full_pass()  # warm-up (and the number of detections)
    detections = full_pass()[1]["detections.json"]()
    times = {"forward": [], "full": []}
    for _ in range(repeats):
        for name, run in (("forward", forward_alone), ("full", full_pass)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    forward_s, full_s = statistics.median(times["forward"]), statistics.median(times["full"])
    images = len(test_set.image_ids)
    print(f"(1) test split: {images} images at {test_set.input_size[0]}x{test_set.input_size[1]}, "
          f"{len(detections)} detections ({len(detections) / images:.0f} per image), {torch.get_num_threads()} "
          f"threads, median of {repeats}")
    print(f"{'pass':<56}{'s':>8}{'images/s':>10}")
    print(f"{'forward alone':<56}{forward_s:>8.2f}{images / forward_s:>10.1f}")
    print(f"{'full evaluation (forward, decode, NMS, COCO metrics)':<56}{full_s:>8.2f}{images / full_s:>10.1f}")
    print(f"ratio full / forward: {full_s / forward_s:.3f} (target <= 1.3)")


def coco_backends(num_images: int) -> None:
    ground_truth, detections = synthetic_coco(num_images)
    start = time.perf_counter()
    faster_stats, faster_precision = reference_evaluation(FasterCOCO, COCOeval_faster, ground_truth, detections)
    faster_s = time.perf_counter() - start
    start = time.perf_counter()
    stats, precision = reference_evaluation(COCO, COCOeval, ground_truth, detections)
    pycocotools_s = time.perf_counter() - start
    array = coco_results_array(detections)  # what Solver.eval gathers
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ground = FasterCOCO()
        ground.dataset = ground_truth
        ground.createIndex()
    metrics, _ = coco_metrics(ground, array, [image["id"] for image in ground_truth["images"]])
    platform_s = time.perf_counter() - start
    platform_stats = np.array([-1 if metrics[name] is None else metrics[name] for name in SUMMARY_NAMES])
    print(f"\n(2) COCO bbox metrics alone: {num_images} images, {len(ground_truth['annotations'])} boxes, "
          f"{len(detections)} detections (load results, evaluate, accumulate, summarize)")
    print(f"{'backend':<24}{'s':>8}{'mAP':>10}{'AP50':>10}")
    print(f"{'pycocotools':<24}{pycocotools_s:>8.2f}{stats[0]:>10.6f}{stats[1]:>10.6f}")
    print(f"{'faster-coco-eval':<24}{faster_s:>8.2f}{faster_stats[0]:>10.6f}{faster_stats[1]:>10.6f}")
    print(f"{'platform (arrays)':<24}{platform_s:>8.2f}{platform_stats[0]:>10.6f}{platform_stats[1]:>10.6f}")
    stats_difference = np.abs(stats - faster_stats).max()
    precision_difference = np.abs(precision - faster_precision).max()
    print(f"faster-coco-eval: speed-up {pycocotools_s / faster_s:.1f}x; largest difference: of the 12 summary numbers "
          f"{stats_difference:.1e}, of the precision array {precision_difference:.1e}")
    print(f"platform: speed-up {pycocotools_s / platform_s:.1f}x; largest difference of the 6 it reports "
          f"{np.abs(stats[:6] - platform_stats).max():.1e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each kind in (1)")
    parser.add_argument("--coco_images", type=int, default=10000, help="synthetic images in (2)")
    parser.add_argument("--flags", nargs=argparse.REMAINDER, default=[],
                        help="train.py flags for (1), e.g. --dataset_dir DIR --cfg data.2DObjDet.image.w=...")
    add_results_dir(parser)
    options = parser.parse_args(argv)
    with recorded("eval", argv, options.results_dir):
        evaluation_pass_vs_forward(options.repeats, options.flags)
        coco_backends(options.coco_images)


if __name__ == "__main__":
    main()
