"""A YOLO-style multi-camera 2D detector, architecture "resnet_fpn" (config/model.json; "csp_pan" is
models/Yolo/csp_pan.py): torchvision ResNet backbone, FPN at strides 8, 16 and 32, and one anchor-free head shared
by the three levels.

Why anchor-free (YOLOX/FCOS style) and not YOLOv3 anchors: nuScenes objects range from traffic cones (0.4 m) to
bendy buses (17 m), seen from 1 m to 80 m away by cameras of two focal lengths, so anchor shapes would have to be
re-clustered for every dataset, camera set and input size, and IoU matching against them leaves tiny and elongated
boxes without a positive. Here each feature-map point predicts the distances to the four sides of its box, and
models/Yolo/loss.py assigns every ground-truth box to points of the level that suits its size, at least one per box.

Input images (B, N_cam, 3, H, W), normalized, H and W multiples of 32; the cameras are folded into the batch, so
the model sees I = B * N_cam images. P = sum over the levels of (H / s) * (W / s) points.
"""

import hashlib
import logging
import math
import os

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d

from models.Yolo.boxes import decode_ltrb, postprocess_detections
from utils.errors import UserError
from utils.modules import conv_norm_act, log_model_summary
from utils.normalize import NormalizeImages

# name: (constructor, ImageNet weights, channels of layer2, layer3, layer4)
BACKBONES = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, (128, 256, 512)),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, (128, 256, 512)),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2, (512, 1024, 2048)),
}
STRIDES = (8, 16, 32)  # of ResNet's layer2, layer3 and layer4 outputs
PRIOR_PROBABILITY = 0.01  # initial objectness and class probability, so that the many background points start low

logger = logging.getLogger(__name__)


def weights_path(name: str) -> str:
    """Where torchvision keeps the ImageNet weights of backbone `name`: torch's hub cache."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(BACKBONES[name][1].url))


def refetch(name: str) -> str:
    """What to do about a damaged weights file of backbone `name`."""
    return f"delete it and run python -m models.fetch_weights --backbone {name}"


def check_weights_hash(path: str, name: str) -> None:
    """The weights file at `path` of backbone `name` must be the published one: its SHA-256 starts with the hex digits
    in its name, as torch.hub checks after a download (a partial copy or another file under that name is a one-line
    error); a name without digits is not checked. Eight hex digits (32 bits) catch damage, not a forgery: what keeps
    a planted file from running code is torch.load's weights_only."""
    match = torch.hub.HASH_REGEX.search(os.path.basename(path))
    if match is None:
        return
    expected = match.group(1)
    # Paid at every start because it is cheap: SHA-256 reads about 1.5 GB/s on a CPU with SHA-NI (AMD EPYC, file in
    # the page cache), 30 ms for resnet18's 45 MB, 55 ms for resnet34's 83 MB, 65 ms for resnet50's 98 MB, less than
    # constructing the ResNet (160-210 ms); from a cold cache the disk read moves here from torch.load.
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as error:
        raise UserError(f"cannot read {path} ({error}): {refetch(name)}") from None
    if not digest.startswith(expected):
        raise UserError(f"{path} is not the file of {BACKBONES[name][1].url} (its SHA-256 starts "
                        f"{digest[:len(expected)]}, not {expected}): {refetch(name)}")


def build_backbone(name: str, pretrained: bool, freeze_batchnorm: bool) -> tuple:
    """ResNet feature extractor returning {"0": stride 8, "1": stride 16, "2": stride 32} and its channels.
    ImageNet weights are read from torch's hub cache only, hash-checked and loaded as tensors only: nothing is
    downloaded and no code in the file runs."""
    if name not in BACKBONES:
        raise UserError(f"backbone '{name}' in config/model.json: choose one of {', '.join(BACKBONES)}")
    constructor, weights, channels = BACKBONES[name]
    resnet = constructor(weights=None, norm_layer=FrozenBatchNorm2d if freeze_batchnorm else nn.BatchNorm2d)
    if pretrained:
        path = weights_path(name)
        if not os.path.isfile(path):
            raise UserError(f"pretrained_backbone: ImageNet weights for {name} not found at {path}; run python -m "
                            f"models.fetch_weights --backbone {name} (or download {weights.url} there by hand), or "
                            f"set \"pretrained_backbone\": false in config/model.json")
        check_weights_hash(path, name)
        try:
            # not weights.get_state_dict(): torch.hub unpickles with weights_only=False, which runs code in the file
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file fails in many ways: EOFError, IndexError, UnpicklingError, ...
            raise UserError(f"cannot load {path} with torch.load(weights_only=True), which reads tensors only "
                            f"({type(error).__name__}): {refetch(name)}") from None
        try:
            resnet.load_state_dict(state_dict)
        except (RuntimeError, TypeError):  # names or shapes that are not the ResNet's; TypeError: not a dict at all
            raise UserError(f"{path} does not hold {name}'s weights (tensor names or shapes differ): "
                            f"{refetch(name)}") from None
    extractor = create_feature_extractor(resnet, {"layer2": "0", "layer3": "1", "layer4": "2"})
    return extractor, channels


class DetectionHead(nn.Module):
    """Shared by all levels (weights are shared, a learnable scale per level adapts the box regression):
    a class tower -> class logits (C per point), and a box tower -> 4 side distances and 1 objectness logit."""

    def __init__(self, channels: int, num_classes: int, num_convs: int, num_levels: int):
        super().__init__()
        self.class_tower = nn.Sequential(*[conv_norm_act(channels, channels) for _ in range(num_convs)])
        self.box_tower = nn.Sequential(*[conv_norm_act(channels, channels) for _ in range(num_convs)])
        self.class_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box_deltas = nn.Conv2d(channels, 4, 3, padding=1)
        self.objectness = nn.Conv2d(channels, 1, 3, padding=1)
        self.level_scales = nn.Parameter(torch.ones(num_levels))
        prior_bias = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
        for layer in (self.class_logits, self.box_deltas, self.objectness):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, prior_bias if layer is not self.box_deltas else 0.0)

    def forward(self, feature: torch.Tensor, level: int) -> tuple:
        """feature (I, ch, h, w) -> class logits (I, h*w, C), box deltas (I, h*w, 4), objectness (I, h*w)."""
        class_features, box_features = self.class_tower(feature), self.box_tower(feature)
        class_logits = self.class_logits(class_features).flatten(2).transpose(1, 2)
        box_deltas = (self.box_deltas(box_features) * self.level_scales[level]).flatten(2).transpose(1, 2)
        return class_logits, box_deltas, self.objectness(box_features).flatten(1)


def point_grid(features: list, strides: tuple) -> tuple:
    """The centres (P, 2) x y in input px of every point of the feature maps [(I, ch, h, w) per level], level after
    level, row-major, and each point's stride (P,); float32 whatever the features' dtype (bf16 would round the
    centres of a 1600 px wide input to 8 px)."""
    points, point_strides = [], []
    for feature, stride in zip(features, strides, strict=True):
        rows, cols = feature.shape[-2:]
        y, x = torch.meshgrid(torch.arange(rows, device=feature.device), torch.arange(cols, device=feature.device),
                              indexing="ij")
        points.append(torch.stack([x.flatten(), y.flatten()], dim=1).float().add(0.5).mul(stride))
        point_strides.append(torch.full((rows * cols,), float(stride), device=feature.device))
    return torch.cat(points), torch.cat(point_strides)


class DenseDetector(nn.Module):
    """What every Yolo architecture shares: the input size check, detection (predict) from the architecture's
    boxes and scores, the images' normalization and the model summary. An architecture sets cfg, image_size,
    num_classes and defines forward (uint8 images in; returning at least boxes (I, P, 4) in input px) and
    scores(outputs) -> (I, P, C) in [0, 1]. normalize: config/data.json's "normalize" (mean and std, 0-1 units)."""

    def __init__(self, cfg: dict, image_size: tuple, num_classes: int, normalize: dict):
        super().__init__()
        width, height = image_size
        if width % 32 or height % 32:
            raise UserError(f"input size {width}x{height} ('image' in config/data.json): width and height must be "
                            f"multiples of 32, the coarsest stride")
        self.cfg, self.image_size, self.num_classes = cfg, (width, height), num_classes
        self.normalize = NormalizeImages(normalize["mean"], normalize["std"])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, **postprocess) -> dict:
        """Detections of the I = B * N_cam images (camera-major within a sample), flat over the batch (see
        models.Yolo.boxes.postprocess_detections): boxes (D, 4) in input px, scores (D,), labels (D,), image_index (D,)
        in [0, I); config/model.json "postprocess" has the thresholds, `postprocess` overrides some of them."""
        outputs = self(images)
        return postprocess_detections(outputs["boxes"], self.scores(outputs), image_size=self.image_size,
                                      **{**self.cfg["postprocess"], **postprocess})

    def print_model_summary(self) -> None:
        """Log the parameters of each part and the GFLOPs of one forward pass on one image at the input size."""
        width, height = self.image_size
        image = torch.zeros(1, 1, 3, height, width, dtype=torch.uint8, device=next(self.parameters()).device)
        log_model_summary(self, (image,), f"Yolo ({self.cfg['architecture']} architecture, {self.cfg['backbone']} "
                          f"backbone) at {width}x{height} input", "image", logger)


class DenseOutputs(nn.Module):
    """A DenseDetector as export.py writes it: images (I, 3, H, W) uint8 RGB -> (boxes (I, P, 4) x1 y1 x2 y2 in
    input px, scores (I, P, C) in [0, 1]), the detector's dense outputs before the threshold and NMS."""

    def __init__(self, detector: DenseDetector):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple:
        outputs = self.detector(images[:, None])  # one camera per sample: the cameras are folded anyway
        return outputs["boxes"], self.detector.scores(outputs)


class Yolo(DenseDetector):
    """The "resnet_fpn" architecture (config/model.json "architecture"): cfg: the "Yolo" section of
    config/model.json; image_size: input (W, H) in px; num_classes: C; normalize: data.json's "normalize"."""

    def __init__(self, cfg: dict, image_size: tuple, num_classes: int, normalize: dict):
        super().__init__(cfg, image_size, num_classes, normalize)
        self.backbone, channels = build_backbone(cfg["backbone"], cfg["pretrained_backbone"], cfg["freeze_batchnorm"])
        self.fpn = FeaturePyramidNetwork(list(channels), cfg["fpn_channels"])
        self.head = DetectionHead(cfg["fpn_channels"], num_classes, cfg["head_convs"], len(STRIDES))

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, N_cam, 3, H, W) uint8 RGB -> dict over the I = B * N_cam images and P points of all levels:
            class_logits (I, P, C); objectness (I, P) logits; box_deltas (I, P, 4) raw;
            boxes (I, P, 4) x1 y1 x2 y2 in input px; points (P, 2) point centres in input px; strides (P,)."""
        features = list(self.fpn(self.backbone(self.normalize(images.flatten(0, 1)))).values())  # strides 8, 16, 32
        class_logits, box_deltas, objectness = zip(*(self.head(feature, level)
                                                     for level, feature in enumerate(features)), strict=True)
        points, strides = point_grid(features, STRIDES)
        box_deltas = torch.cat(box_deltas, dim=1)
        return {"class_logits": torch.cat(class_logits, dim=1), "objectness": torch.cat(objectness, dim=1),
                "box_deltas": box_deltas, "boxes": decode_ltrb(box_deltas.float(), points.float(), strides.float()),
                "points": points, "strides": strides}

    def scores(self, outputs: dict) -> torch.Tensor:
        """Detection scores (I, P, C): objectness x class probability."""
        return torch.sigmoid(outputs["objectness"].float())[..., None] * torch.sigmoid(outputs["class_logits"].float())
