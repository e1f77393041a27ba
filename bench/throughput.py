"""Throughput of the 2D detection data path and training step, stage by stage, from nuScenes' 1600x900 JPEGs at
two input sizes (320x192, the default, and 640x352), in one run:

    python -m bench.throughput [--samples_per_scene 2] [--workers 2] [--steps 8] [--device cpu|cuda]
                               [--sizes 320x192,640x352] [--jpeg_size 1600x900]

Per input size, images/s of:
  1. read       the JPEG files' bytes (page cache warm: after one pass);
  2. decode     read_image: reduced-scale libjpeg decode (1/2, 1/4, 1/8) and resize, one thread;
  3. augment    the training augmentation (flip, colour jitter, affine, boxes) of the decoded uint8 images;
  4. item       DatasetLoader.__getitem__ with augmentation (1-3, labels, boxes), one thread;
  5. loader     the training DataLoader as train.py builds it (helper.load_datasetloader: --workers persistent
                workers, seeded items, collate), with its bytes per batch (uint8 images);
  6. copy       the batch's images to --device (pinned memory on CUDA);
  7. step       Solver.train + learning_rate_step on one fixed batch on --device (no loading), and the host reads
                per step (utils.host_reads: each one a stall of the CUDA stream);
  8. fed        training fed by the loader, as train.py runs it.
Then the ratio the loader delivers over what the step consumes, and with data.json "decode": "device" (dev:) the
loader's images/s (the workers read the files and draw the augmentation) and images_on_device's on --device.
On a GPU server, run it with --device cuda and --workers set to the cores per GPU less one: stage 4 is per core,
stage 5 with those workers. The database is an embedded one at --jpeg_size (--samples_per_scene keyframes of 10
scenes), generated in a temporary folder.
"""

import argparse
import os
import tempfile
import time

import cv2
import torch
from torchvision import tv_tensors

from bench.model import platform_args
from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.loader_2d_obj_det import augment_image, images_on_device, read_image
from helper import load_datasetloader, load_solver
from utils.host_reads import HostReadCounter


def rate(count: int, work) -> float:
    """count / seconds of work()."""
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


def stage_rates(dataset) -> dict:
    """Images/s of stages 1-4 over every image of `dataset` (its augmentation on), one thread."""
    paths = [os.path.join(dataset.dataroot, name.decode()) for name in dataset.image_files.reshape(-1)]
    sizes = [tuple(size) for size in dataset.image_sizes.reshape(-1, 2).tolist()]
    width, height = dataset.input_size

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

    def augment(image):
        params = dataset.augmentation.draw(boxes)
        dataset.augmentation.boxes(boxes, labels, params)
        return augment_image(image, params)

    rates["augment"] = rate(len(decoded), lambda: [augment(image) for image in decoded])
    rates["item"] = rate(len(paths), lambda: [dataset[index] for index in range(len(dataset))])
    return rates


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_rates(args: dict, device: torch.device, steps: int) -> dict:
    """Images/s of stages 5-8 and the host reads per step, with train.py's loader and Solver."""
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
    try:
        return [tuple(int(value) for value in size.split("x", 1)) for size in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes are WxH in px, separated by commas") from None


def cycle(loader):
    while True:
        yield from loader


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples_per_scene", type=int, default=2, help="keyframes per scene of the database")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of stages 5 and 8")
    parser.add_argument("--steps", type=int, default=8, help="timed batches or steps in stages 5-8")
    parser.add_argument("--batch_size", type=int, default=2, help="samples (of 6 cameras) per batch")
    parser.add_argument("--device", default="cpu", help="where stages 6-8 run: cpu or cuda")
    parser.add_argument("--sizes", type=sizes, default=sizes("320x192,640x352"), help="input sizes WxH, by commas")
    parser.add_argument("--jpeg_size", type=sizes, default=sizes("1600x900"), help="the JPEG files' WxH")
    options = parser.parse_args(argv)
    device, threads = torch.device(options.device), torch.get_num_threads()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dataroot = os.path.join(tmp, "nuscenes")
        (jpeg_width, jpeg_height), = options.jpeg_size
        synthetic.generate(dataroot, samples_per_scene=options.samples_per_scene, width=jpeg_width,
                           height=jpeg_height)
        print(f"{jpeg_width}x{jpeg_height} JPEGs, batch {options.batch_size} x 6 cameras, {options.workers} workers, "
              f"training on {device} with {torch.get_num_threads()} threads; images/s per stage")
        print(f"{'input':>8}{'read':>8}{'decode':>8}{'augment':>8}{'item':>8}{'loader':>8}{'MB/batch':>9}"
              f"{'copy':>8}{'step':>8}{'fed':>8}{'reads/step':>11}{'loader/step':>12}"
              f"{'dev:loader':>11}{'dev:decode':>11}")
        for width, height in options.sizes:
            args = platform_args(["--dataset_dir", dataroot, "--num_cores", str(options.workers), "--batch_size",
                                  str(options.batch_size), "--val_ratio", "0.2",
                                  "--cfg", f"data.2DObjDet.label_cache_dir={os.path.join(tmp, 'cache')}",
                                  "--cfg", f"data.2DObjDet.image.w={width}",
                                  "--cfg", f"data.2DObjDet.image.h={height}"])
            dataset, _ = load_datasetloader(args, 1, 0, "train")
            torch.set_num_threads(1)  # stages 1-4: what one worker does
            stages = stage_rates(dataset)
            torch.set_num_threads(threads)
            trained = training_rates(args, device, options.steps)
            on_device = device_decode_rates(args, device, options.steps)
            copy = "-" if trained["copy"] is None else f"{trained['copy']:.0f}"
            print(f"{width}x{height:<4}{stages['read']:>7.0f}{stages['decode']:>8.1f}{stages['augment']:>8.1f}"
                  f"{stages['item']:>8.1f}{trained['loader']:>8.1f}{trained['batch_mb']:>9.2f}{copy:>8}"
                  f"{trained['step']:>8.1f}{trained['fed']:>8.1f}{trained['host_reads']:>11}"
                  f"{trained['loader'] / trained['step']:>11.2f}x{on_device['loader']:>11.1f}"
                  f"{on_device['decode']:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
