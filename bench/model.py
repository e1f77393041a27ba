"""Model cost: parameters, GFLOPs per image and forward+backward images/s on this CPU at the configured input size,
for DSTorch's Yolo (both architectures) and, in the same run, torchvision's FCOS and RetinaNet on a resnet18-FPN
backbone without weights, with YOLOv8n's published figures, so that readers can place our cost.

    python -m bench.model [--batch_images 6] [--iterations 5] [--results_dir bench/results]

All three train from scratch here, so all three use trainable BatchNorm in the backbone. torchvision's models
resize inside (GeneralizedRCNNTransform); min_size/max_size are set so that they keep the input size.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import FCOS, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from argumentparser import build_parser
from bench.results import add_results_dir, recorded
from dataset.NuscenesDataset.collate_2d import padded_targets
from models.Yolo.aligned_loss import AlignedDetectionLoss
from models.Yolo.csp_pan import CspPanYolo
from models.Yolo.loss import DetectionLoss
from models.Yolo.yolo import STRIDES, Yolo
from utils.config import merge_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
NUM_CLASSES = 10
NUM_CAMERAS = 6


def platform_args(flags: list) -> dict:
    """The merged configuration train.py would run with these flags (the config files under them)."""
    return merge_config(vars(build_parser().parse_args(flags)), str(CONFIG_DIR))


def load(name: str) -> dict:
    with open(CONFIG_DIR / f"{name}.json") as f:
        return json.load(f)


def random_targets(num_images: int, width: int, height: int, boxes_per_image: int = 10) -> list:
    """Boxes (x1, y1, x2, y2) in px and labels 0..9 for each image, fixed by a seed."""
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(num_images):
        xy = torch.rand(boxes_per_image, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
        size = 8 + torch.rand(boxes_per_image, 2, generator=generator) * torch.tensor([width * 0.2, height * 0.3])
        targets.append({"boxes": torch.cat([xy, xy + size], dim=1),
                        "labels": torch.randint(0, NUM_CLASSES, (boxes_per_image,), generator=generator)})
    return targets


def synthetic_batch(batch_size: int, num_cameras: int, width: int, height: int) -> dict:
    """A collated batch as the loader makes it, fixed by a seed: images (B, N_cam, 3, H, W) uint8, boxes (T, 4),
    labels (T,), box_image_index (T,) (index of the image among the B x N_cam) and the padded targets."""
    targets = random_targets(batch_size * num_cameras, width, height)
    images = torch.randint(0, 256, (batch_size, num_cameras, 3, height, width), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    boxes, labels = torch.cat([t["boxes"] for t in targets]), torch.cat([t["labels"] for t in targets])
    box_image_index = torch.cat([torch.full((len(t["labels"]),), i) for i, t in enumerate(targets)])
    return {"images": images, "boxes": boxes, "labels": labels, "box_image_index": box_image_index,
            **padded_targets(boxes, labels, box_image_index, len(targets))}


def torchvision_detector(kind: str, width: int, height: int, sized_for_input: bool = False, **options) -> nn.Module:
    """FCOS or RetinaNet on a resnet18-FPN backbone (trainable BatchNorm, no weights) whose transform keeps the input
    size; `options` go to the detector (e.g. image_mean, score_thresh).

    sized_for_input False: torchvision's design for ~800 px images, P3-P7 and RetinaNet's anchors of 32-512 px.
    True: levels and anchors for a ~200 px input such as 320x192, where objects span ~4-190 px: P3-P6 (P6 by max
    pooling). FCOS gives a level the objects of 4-8 times its anchor size (the first level from 0 px, the last to
    any size) and normalizes the regression by it, so its anchors stay the strides: P3-P5 take 0-64, 64-128 and
    128-256 px. RetinaNet's anchors are 2 x stride x 2^(0, 1/3, 2/3): 16-203 px."""
    extra = LastLevelMaxPool() if sized_for_input else LastLevelP6P7(256, 256)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5, returned_layers=[2, 3, 4], extra_blocks=extra)
    strides = (8, 16, 32, 64)
    if sized_for_input and kind == "fcos":
        options["anchor_generator"] = AnchorGenerator(tuple((stride,) for stride in strides), ((1.0,),) * 4)
    elif sized_for_input:
        sizes = tuple(tuple(2 * stride * 2 ** (k / 3) for k in range(3)) for stride in strides)
        options["anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 4)
    detector = FCOS if kind == "fcos" else RetinaNet
    # num_classes + 1: torchvision's detectors keep class 0 for the background
    return detector(backbone, num_classes=NUM_CLASSES + 1, min_size=min(width, height), max_size=max(width, height),
                    **options)


def measure(name: str, model: nn.Module, train_step, flops_forward, iterations: int, batch_images: int) -> dict:
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        flops_forward()
    model.train()
    train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(iterations):
        model.zero_grad()
        train_step()
    elapsed = time.perf_counter() - start
    return {"model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": counter.get_total_flops() / 1e9, "images_per_s": iterations * batch_images / elapsed}


def compare(args) -> None:
    """Measure every model and print the table."""
    data = load("data")["2DObjDet"]
    width, height, normalize = data["image"]["w"], data["image"]["h"], data["normalize"]
    torch.manual_seed(0)
    images = torch.randint(0, 256, (args.batch_images, 3, height, width), dtype=torch.uint8)  # as the loader's
    floats = images.float() / 255  # torchvision's detectors take 0-1 images and normalize them
    targets = random_targets(args.batch_images, width, height)
    results = []

    collated = padded_targets(torch.cat([t["boxes"] for t in targets]), torch.cat([t["labels"] for t in targets]),
                              torch.arange(len(targets)).repeat_interleave(10), len(targets))
    model_cfg, loss_cfg = load("model")["Yolo"], load("loss")["Yolo"]
    csp_cfg = {**model_cfg, "architecture": "csp_pan", "backbone": "csp"}  # the default
    csp = CspPanYolo(csp_cfg, (width, height), NUM_CLASSES, normalize)
    aligned_loss = AlignedDetectionLoss(loss_cfg["aligned"])
    results.append(measure(
        f"DSTorch Yolo csp_pan (CSP {csp_cfg['widths'][-1]}, PAN, DFL)", csp,
        lambda: aligned_loss(csp(images[None]), collated)["total_loss"].backward(),
        lambda: csp(images[None, :1]), args.iterations, args.batch_images))

    fpn_cfg = {**model_cfg, "architecture": "resnet_fpn", "backbone": "resnet18"}
    fpn, fpn_loss = Yolo(fpn_cfg, (width, height), NUM_CLASSES, normalize), DetectionLoss(loss_cfg, STRIDES)
    results.append(measure(
        f"DSTorch Yolo resnet_fpn (resnet18, FPN {fpn_cfg['fpn_channels']})", fpn,
        lambda: fpn_loss(fpn(images[None]), collated)["total_loss"].backward(),
        lambda: fpn(images[None, :1]), args.iterations, args.batch_images))

    for kind, label in (("fcos", "torchvision FCOS (resnet18-FPN 256)"),
                        ("retinanet", "torchvision RetinaNet (resnet18-FPN 256)")):
        model = torchvision_detector(kind, width, height, image_mean=normalize["mean"], image_std=normalize["std"])
        shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        results.append(measure(
            label, model, lambda model=model, shifted=shifted: sum(model(list(floats), shifted).values()).backward(),
            lambda model=model: model([floats[0]]), args.iterations, args.batch_images))

    print(f"input {width}x{height}, {torch.get_num_threads()} threads, forward+backward on batches of "
          f"{args.batch_images} images, {args.iterations} timed steps")
    print(f"{'model':<48}{'params (M)':>11}{'GFLOPs/img':>12}{'train img/s':>13}{'vs ours':>9}")
    for row in results:
        print(f"{row['model']:<48}{row['params_m']:>11.2f}{row['gflops']:>12.2f}{row['images_per_s']:>13.2f}"
              f"{row['images_per_s'] / results[0]['images_per_s']:>8.2f}x")
    # Ultralytics' published figures for YOLOv8n at 640x640; its FLOPs scale with the input's area
    print(f"{'Ultralytics YOLOv8n (published, 640x640)':<48}{3.2:>11.2f}{8.7 * width * height / 640**2:>12.2f}"
          f"{'':>13}  (8.7 GFLOPs at 640x640, scaled to {width}x{height})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_images", type=int, default=6, help="images per step (one sample's 6 cameras)")
    parser.add_argument("--iterations", type=int, default=5, help="timed forward+backward steps per model")
    add_results_dir(parser)
    args = parser.parse_args(argv)
    with recorded("model", argv, args.results_dir):
        compare(args)


if __name__ == "__main__":
    main()
