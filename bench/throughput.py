"""Throughput of the 2D detection data path and training step, stage by stage, from nuScenes' 1600x900 JPEGs at
two input sizes (320x192 and 640x352), with two data paths side by side in one run: the transforms.v2 float32 path
(transforms.v2's tensor kernels and float32 normalization in the worker) and the OpenCV uint8 path that
DatasetLoader takes (OpenCV's kernels in the worker, uint8 images, normalization in the model):

    python -m bench.throughput [--samples_per_scene 2] [--workers 2] [--steps 8] [--device cpu|cuda]
                               [--sizes 320x192,640x352] [--jpeg_size 1600x900] [--results_dir bench/results]

Per input size, images/s of, on one core (what one DataLoader worker does):
  1. read       the JPEG files' bytes (page cache warm: after one pass);
  2. decode     read_image: reduced-scale libjpeg decode (1/2, 1/4, 1/8) and resize;
  3. augment    the training augmentation (flip, colour jitter, affine, boxes) of the decoded uint8 images: with
                transforms.v2's tensor kernels (augment_image, also the "decode": "device" path's) -> with OpenCV's
                (augment_array, the workers');
  4. item       a training item: the transforms.v2 float32 path (decode, transforms.v2 augmentation and float32
                normalization of each image, built here from the loader's functions) -> the OpenCV uint8 path
                (DatasetLoader.__getitem__);
  5. collate    the loader's collate_fn on batches of --batch_size items;
and with --workers workers and the --device:
  6. loader     the training DataLoader as train.py builds it (helper.load_datasetloader: persistent workers,
                seeded items, collate), with its MB per batch (float32 images -> uint8 images, a quarter);
  7. copy       the batch's images to --device (pinned memory on CUDA);
  8. step       Solver.train + learning_rate_step on one fixed batch on --device (no loading), the host reads per
                step (utils.host_reads: each one a stall of the CUDA stream), and on CUDA the share of the step's
                time the GPU is busy (torch.profiler's kernel and copy intervals, their union over wall time);
  9. fed        training fed by the loader, as train.py runs it.
Then the ratio the loader delivers over what the step consumes, and with data.json "decode": "device" (dev:) the
loader's images/s (the workers read the files and draw the augmentation) and images_on_device's on --device.
On a GPU server, run it with --device cuda and --workers set to the cores per GPU less one: stages 1-5 are per
core, stage 6 with those workers. The database is an embedded one at --jpeg_size (--samples_per_scene keyframes of
10 scenes), generated in a temporary folder.
"""

import argparse
import os
import tempfile
import time

import cv2
import torch
from torch.autograd import DeviceType
from torchvision import tv_tensors

from bench.ddp import union_length
from bench.loader import cycle, jpeg_size
from bench.model import platform_args
from bench.results import add_results_dir, recorded
from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.common import read_image
from dataset.NuscenesDataset.loader_2d_obj_det import augment_array, augment_image, images_on_device
from helper import load_datasetloader, load_solver
from utils.host_reads import HostReadCounter

# (header, width in characters) of the table's columns
COLUMNS = [("input", 9), ("read", 7), ("decode", 7), ("augment", 14), ("item", 12), ("collate", 8), ("loader", 7),
           ("MB/batch", 11), ("copy", 6), ("step", 6), ("busy", 5), ("fed", 6), ("reads/step", 10),
           ("loader/step", 11), ("dev:loader", 10), ("dev:decode", 10)]


def table_row(cells: list) -> str:
    """The cells right-aligned in their columns, two spaces apart even where a number outgrows its column, so that
    the row splits on whitespace into exactly one field per column."""
    return "  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True))


def rate(count: int, work) -> float:
    """count / seconds of work()."""
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


def stage_rates(dataset, normalize: dict, batch_size: int) -> dict:
    """Images/s of stages 1-5 over every image of `dataset` (its augmentation on), one thread; `normalize`:
    data.json's mean and std, which the transforms.v2 float32 path applies in the worker (the OpenCV uint8 path
    leaves them to the model)."""
    paths = [os.path.join(dataset.dataroot, name.decode()) for name in dataset.image_files.reshape(-1)]
    sizes = [tuple(size) for size in dataset.image_sizes.reshape(-1, 2).tolist()]
    width, height = dataset.input_size
    mean, std = (torch.tensor(normalize[key]).view(3, 1, 1) for key in ("mean", "std"))

    def read_all():
        for path in paths:
            with open(path, "rb") as f:
                f.read()

    read_all()  # the page cache holds the files from here on
    decoded = []
    rates = {"read": rate(len(paths), read_all),
             "decode": rate(len(paths), lambda: decoded.extend(read_image(path, dataset.input_size, size)
                                                                for path, size in zip(paths, sizes, strict=True)))}
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[10.0, 10.0, 60.0, 50.0]] * 8), format="XYXY",
                                     canvas_size=(height, width))
    labels = torch.zeros(8, dtype=torch.int64)
    arrays = [image.permute(1, 2, 0).contiguous().numpy() for image in decoded]

    def augmentation():
        params = dataset.augmentation.draw(boxes)
        dataset.augmentation.boxes(boxes, labels, params)
        return params

    def item_v2_float32(path, size):
        image = augment_image(read_image(path, dataset.input_size, size), augmentation())
        return (image.float() / 255 - mean) / std

    rates["augment_v2"] = rate(len(decoded), lambda: [augment_image(image, augmentation()) for image in decoded])
    rates["augment"] = rate(len(arrays), lambda: [augment_array(array, augmentation()) for array in arrays])
    rates["item_v2_float32"] = rate(len(paths), lambda: [item_v2_float32(path, size)
                                                         for path, size in zip(paths, sizes, strict=True)])
    items = []
    rates["item"] = rate(len(paths), lambda: items.extend(dataset[index] for index in range(len(dataset))))
    batches = [items[start:start + batch_size] for start in range(0, len(items) - batch_size + 1, batch_size)]
    cameras = dataset.image_files.shape[1]
    rates["collate"] = rate(len(batches) * batch_size * cameras,
                            lambda: [dataset.collate_fn(batch) for batch in batches])
    return rates


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_busy_seconds(work, device: torch.device) -> float:
    """Seconds within work() in which `device` runs a kernel or a copy: the union of the intervals torch.profiler
    records on it (the profiler slows the host, not the kernels: divide by an unprofiled run's time)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        work()
    device_type = DeviceType.CUDA if device.type == "cuda" else DeviceType.CPU
    return union_length([(event.time_range.start, event.time_range.end) for event in profile.events()
                         if event.device_type == device_type]) / 1e6  # profiler times are in us


def training_rates(args: dict, device: torch.device, steps: int) -> dict:
    """Images/s of stages 6-9, the host reads per step and on CUDA the GPU's busy share of a step, with train.py's
    loader and Solver."""
    dataset, loader = load_datasetloader(args, 1, 0, "train")
    solver = load_solver(args, device=device, class_names=dataset.class_names, steps_per_epoch=steps + 2)
    solver.mode_selection(True)
    batches = iter(cycle(loader))
    batch = next(batches)  # starts the (persistent) workers
    images_per_batch = batch["images"].shape[0] * batch["images"].shape[1]
    rates = {"loader": rate(steps * images_per_batch, lambda: [next(batches) for _ in range(steps)]),
             "batch_mb": batch["images"].numel() * batch["images"].element_size() / 1e6}
    pinned = batch["images"].pin_memory() if device.type == "cuda" else batch["images"]

    def copy():
        for _ in range(steps):
            pinned.to(device, non_blocking=True)
        synchronize(device)

    rates["copy"] = rate(steps * images_per_batch, copy) if device.type == "cuda" else None

    def train(next_batch):
        for _ in range(steps):
            solver.train(next_batch())
            solver.learning_rate_step()
        solver.read_nonfinite()  # the read train.py makes at its logging points
        synchronize(device)

    train(lambda: batch)  # warm-up (cuDNN autotuner, allocator)
    with HostReadCounter() as reads:
        solver.train(batch)
        solver.learning_rate_step()
    rates["host_reads"] = reads.total
    rates["step"] = rate(steps * images_per_batch, lambda: train(lambda: batch))
    rates["gpu_busy"] = None
    if device.type == "cuda":
        busy_s = device_busy_seconds(lambda: train(lambda: batch), device)
        rates["gpu_busy"] = min(1.0, busy_s / (steps * images_per_batch / rates["step"]))
    rates["fed"] = rate(steps * images_per_batch, lambda: train(lambda: next(batches)))
    return rates


def device_decode_rates(args: dict, device: torch.device, steps: int) -> dict:
    """With data.json "decode": "device": images/s of the loader (workers read the files, draw the augmentation
    and move the boxes) and of images_on_device (decode, resize, augment) on `device` in the main process."""
    args = {**args, "data": {**args["data"], "2DObjDet": {**args["data"]["2DObjDet"], "decode": "device"}}}
    dataset, loader = load_datasetloader(args, 1, 0, "train")
    batches = iter(cycle(loader))
    batch = next(batches)
    images_per_batch = len(batch["jpegs"])
    rates = {"loader": rate(steps * images_per_batch, lambda: [next(batches) for _ in range(steps)])}
    images_on_device(batch, dataset.input_size, device)  # warm-up (nvJPEG handles, allocator)
    synchronize(device)

    def decode():
        for _ in range(steps):
            images_on_device(batch, dataset.input_size, device)
        synchronize(device)

    rates["decode"] = rate(steps * images_per_batch, decode)
    return rates


def sizes(text: str) -> list:
    """"320x192,640x352" -> [(320, 192), (640, 352)]."""
    return [jpeg_size(size) for size in text.split(",")]


def measure(options) -> None:
    """The table: a row per input size, on an embedded dataset generated in a temporary folder."""
    device, threads = torch.device(options.device), torch.get_num_threads()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dataroot = os.path.join(tmp, "nuscenes")
        jpeg_width, jpeg_height = options.jpeg_size
        synthetic.generate(dataroot, samples_per_scene=options.samples_per_scene, width=jpeg_width,
                           height=jpeg_height)
        print(f"{jpeg_width}x{jpeg_height} JPEGs, batch {options.batch_size} x 6 cameras, {options.workers} workers, "
              f"training on {device} with {torch.get_num_threads()} threads; images/s per stage; augment, item and "
              f"MB/batch: transforms.v2 float32 path -> OpenCV uint8 path")
        print(table_row([header for header, _ in COLUMNS]))
        for width, height in options.sizes:
            args = platform_args(["--dataset_dir", dataroot, "--num_cores", str(options.workers), "--batch_size",
                                  str(options.batch_size), "--val_ratio", "0.2",
                                  "--cfg", f"data.2DObjDet.label_cache_dir={os.path.join(tmp, 'cache')}",
                                  "--cfg", f"data.2DObjDet.image.w={width}",
                                  "--cfg", f"data.2DObjDet.image.h={height}"])
            dataset, _ = load_datasetloader(args, 1, 0, "train")
            torch.set_num_threads(1)  # stages 1-5: what one worker does
            stages = stage_rates(dataset, args["data"]["2DObjDet"]["normalize"], options.batch_size)
            torch.set_num_threads(threads)
            trained = training_rates(args, device, options.steps)
            on_device = device_decode_rates(args, device, options.steps)
            copy = "-" if trained["copy"] is None else f"{trained['copy']:.0f}"
            busy = "-" if trained["gpu_busy"] is None else f"{trained['gpu_busy']:.0%}"
            augment = f"{stages['augment_v2']:.1f}->{stages['augment']:.1f}"
            item = f"{stages['item_v2_float32']:.1f}->{stages['item']:.1f}"
            megabytes = f"{4 * trained['batch_mb']:.1f}->{trained['batch_mb']:.1f}"
            print(table_row([f"{width}x{height}", f"{stages['read']:.0f}", f"{stages['decode']:.1f}", augment, item,
                             f"{stages['collate']:.0f}", f"{trained['loader']:.1f}", megabytes, copy,
                             f"{trained['step']:.1f}", busy, f"{trained['fed']:.1f}", str(trained["host_reads"]),
                             f"{trained['loader'] / trained['step']:.2f}x", f"{on_device['loader']:.1f}",
                             f"{on_device['decode']:.1f}"]), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples_per_scene", type=int, default=2, help="keyframes per scene of the database")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of stages 5 and 8")
    parser.add_argument("--steps", type=int, default=8, help="timed batches or steps in stages 5-8")
    parser.add_argument("--batch_size", type=int, default=2, help="samples (of 6 cameras) per batch")
    parser.add_argument("--device", default="cpu", help="where stages 6-8 run: cpu or cuda")
    parser.add_argument("--sizes", type=sizes, default=sizes("320x192,640x352"), help="input sizes WxH, by commas")
    parser.add_argument("--jpeg_size", type=jpeg_size, default=(1600, 900), help="the JPEG files' WxH")
    add_results_dir(parser)
    options = parser.parse_args(argv)
    with recorded("throughput", argv, options.results_dir):
        measure(options)


if __name__ == "__main__":
    main()
