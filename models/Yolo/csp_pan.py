"""The "csp_pan" architecture of the Yolo detector (config/model.json "architecture"), a YOLOv8-style one-stage
detector written here from the papers' descriptions: a CSP backbone (cross-stage partial blocks that keep every
intermediate output, as ELAN and YOLOv8's C2f describe, and SPPF's chained max pools), a PAN neck (top-down then
bottom-up fusion, PANet), and a decoupled anchor-free head per level whose box branch predicts a distribution over
REG_MAX distances per side (Generalized Focal Loss's DFL). Its loss is models/Yolo/aligned_loss.py.

One image from pixels to boxes, at 320x192 with the "n" widths (16, 32, 64, 128, 256):
    (3, 192, 320) -> stem stride 2 (16, 96, 160) -> stages at strides 4, 8, 16, 32 -> C3 (64, 24, 40),
    C4 (128, 12, 20), C5 (256, 6, 10) -> PAN -> P3, P4, P5 with the same shapes -> per level and point: C class
    logits and 4 x REG_MAX distance logits -> distances = the expectation of each side's softmax, in strides ->
    boxes around the point centres; P = 24*40 + 12*20 + 6*10 = 1260 points.
The backbone can instead be a torchvision ResNet (config "backbone": "resnet18" ...), so that ImageNet weights plug
in; its layer2-4 outputs take C3-C5's place. "freeze_batchnorm": true freezes every BatchNorm of the model.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from models.Yolo.yolo import STRIDES, DenseDetector, build_backbone, point_grid

REG_MAX = 16  # distance bins per side: 0 .. REG_MAX - 1 strides (120 px at stride 8, 480 px at stride 32)
EXPECTED_OBJECTS = 5  # per image and level, for the initial class probability (few points hold objects)


class ConvBnAct(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.SiLU(inplace=True))


class Bottleneck(nn.Module):
    """Two 3x3 convolutions, with a residual connection in the backbone (not in the neck, where it fuses)."""

    def __init__(self, channels: int, residual: bool):
        super().__init__()
        self.convs = nn.Sequential(ConvBnAct(channels, channels), ConvBnAct(channels, channels))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.convs(x) if self.residual else self.convs(x)


class CSPBlock(nn.Module):
    """Cross-stage partial block: a 1x1 convolution's output is split in two halves; one half passes through
    `depth` bottlenecks in turn, and the other half, that half and every bottleneck's output are concatenated and
    fused by a 1x1 convolution, so gradients reach each depth by a short path."""

    def __init__(self, in_channels: int, out_channels: int, depth: int, residual: bool):
        super().__init__()
        self.hidden = out_channels // 2
        self.split = ConvBnAct(in_channels, 2 * self.hidden, 1)
        self.bottlenecks = nn.ModuleList(Bottleneck(self.hidden, residual) for _ in range(depth))
        self.fuse = ConvBnAct((2 + depth) * self.hidden, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.split(x).chunk(2, dim=1))
        for bottleneck in self.bottlenecks:
            parts.append(bottleneck(parts[-1]))
        return self.fuse(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max pools (receptive fields 5, 9, 13) concatenated."""

    def __init__(self, channels: int):
        super().__init__()
        self.reduce, self.fuse = ConvBnAct(channels, channels // 2, 1), ConvBnAct(channels * 2, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [self.reduce(x)]
        for _ in range(3):
            pooled.append(F.max_pool2d(pooled[-1], 5, stride=1, padding=2))
        return self.fuse(torch.cat(pooled, dim=1))


class CSPBackbone(nn.Module):
    """widths (5,): the stem's and the 4 stages' channels; depths (4,): bottlenecks per stage. Each stage halves
    the resolution with a stride-2 convolution, then a CSP block; SPPF ends the last. Returns C3, C4, C5 (strides
    8, 16, 32)."""

    def __init__(self, widths: list, depths: list):
        super().__init__()
        self.stem = ConvBnAct(3, widths[0], 3, 2)
        self.stages = nn.ModuleList(
            nn.Sequential(ConvBnAct(widths[k], widths[k + 1], 3, 2), CSPBlock(widths[k + 1], widths[k + 1],
                                                                              depths[k], residual=True))
            for k in range(4))
        self.stages[-1].append(SPPF(widths[-1]))

    def forward(self, images: torch.Tensor) -> list:
        x, outputs = self.stem(images), []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs[1:]  # strides 8, 16, 32


class PANNeck(nn.Module):
    """channels (3,) of C3-C5, which are also the output channels of P3-P5; depth: bottlenecks per CSP block.
    Top-down: C5 upsampled joins C4, the result upsampled joins C3 -> P3. Bottom-up: P3 downsampled joins the
    top-down C4 -> P4, P4 downsampled joins C5 -> P5."""

    def __init__(self, channels: tuple, depth: int):
        super().__init__()
        c3, c4, c5 = channels
        self.top_down_4 = CSPBlock(c5 + c4, c4, depth, residual=False)
        self.top_down_3 = CSPBlock(c4 + c3, c3, depth, residual=False)
        self.down_3, self.bottom_up_4 = ConvBnAct(c3, c3, 3, 2), CSPBlock(c3 + c4, c4, depth, residual=False)
        self.down_4, self.bottom_up_5 = ConvBnAct(c4, c4, 3, 2), CSPBlock(c4 + c5, c5, depth, residual=False)

    def forward(self, features: list) -> list:
        c3, c4, c5 = features
        t4 = self.top_down_4(torch.cat([F.interpolate(c5, size=c4.shape[-2:], mode="nearest"), c4], dim=1))
        p3 = self.top_down_3(torch.cat([F.interpolate(t4, size=c3.shape[-2:], mode="nearest"), c3], dim=1))
        p4 = self.bottom_up_4(torch.cat([self.down_3(p3), t4], dim=1))
        p5 = self.bottom_up_5(torch.cat([self.down_4(p4), c5], dim=1))
        return [p3, p4, p5]


class DecoupledHead(nn.Module):
    """One level's head: a box branch (two 3x3 convolutions, then 4 x REG_MAX distance logits) and a class branch
    (two 3x3 convolutions, then C logits), not shared between levels."""

    def __init__(self, in_channels: int, box_channels: int, class_channels: int, num_classes: int,
                 prior_probability: float):
        super().__init__()
        self.box = nn.Sequential(ConvBnAct(in_channels, box_channels), ConvBnAct(box_channels, box_channels),
                                 nn.Conv2d(box_channels, 4 * REG_MAX, 1))
        self.cls = nn.Sequential(ConvBnAct(in_channels, class_channels), ConvBnAct(class_channels, class_channels),
                                 nn.Conv2d(class_channels, num_classes, 1))
        nn.init.constant_(self.box[-1].bias, 1.0)  # equal bins: each side starts at the middle distance
        nn.init.constant_(self.cls[-1].bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, feature: torch.Tensor) -> tuple:
        """(I, ch, h, w) -> distance logits (I, h*w, 4, REG_MAX), class logits (I, h*w, C)."""
        distance_logits = self.box(feature).flatten(2).transpose(1, 2).unflatten(2, (4, REG_MAX))
        return distance_logits, self.cls(feature).flatten(2).transpose(1, 2)


def decode_distribution(distance_logits: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
    """Boxes (..., P, 4) x1 y1 x2 y2 from distance logits (..., P, 4, REG_MAX): each side's distance is the
    expectation of its softmax over the bins 0 .. REG_MAX - 1, in strides (P,), from the point centres (P, 2)."""
    bins = torch.arange(REG_MAX, device=distance_logits.device, dtype=distance_logits.dtype)
    distances = (distance_logits.softmax(dim=-1) @ bins) * strides[:, None]  # (..., P, 4) px
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


class CspPanYolo(DenseDetector):
    """cfg: the "Yolo" section of config/model.json (architecture "csp_pan": backbone "csp" with widths and
    depths, or a ResNet name; neck_depth); image_size: input (W, H), multiples of 32; num_classes: C; normalize:
    config/data.json's "normalize"."""

    def __init__(self, cfg: dict, image_size: tuple, num_classes: int, normalize: dict):
        super().__init__(cfg, image_size, num_classes, normalize)
        width, height = self.image_size
        if cfg["backbone"] == "csp":
            self.backbone = CSPBackbone(cfg["widths"], cfg["depths"])
            channels = tuple(cfg["widths"][2:])
        else:
            extractor, channels = build_backbone(cfg["backbone"], cfg["pretrained_backbone"], cfg["freeze_batchnorm"])
            self.backbone = ResNetLevels(extractor)
        self.neck = PANNeck(channels, cfg["neck_depth"])
        box_channels = max(16, channels[0] // 4, 4 * REG_MAX)
        class_channels = max(channels[0], min(num_classes, 100))
        self.heads = nn.ModuleList(
            DecoupledHead(level_channels, box_channels, class_channels, num_classes,
                          EXPECTED_OBJECTS / (num_classes * (width // stride) * (height // stride)))
            for level_channels, stride in zip(channels, STRIDES, strict=True))
        if cfg["freeze_batchnorm"]:
            freeze_batchnorm(self)

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, N_cam, 3, H, W) uint8 RGB -> over the I = B * N_cam images and P points: class_logits (I, P,
        C); distance_logits (I, P, 4, REG_MAX); boxes (I, P, 4) x1 y1 x2 y2 in input px; points (P, 2); strides
        (P,)."""
        features = self.neck(self.backbone(self.normalize(images.flatten(0, 1))))
        distance_logits, class_logits = zip(*(head(feature) for head, feature in zip(self.heads, features,
                                                                                     strict=True)), strict=True)
        points, strides = point_grid(features, STRIDES)
        distance_logits = torch.cat(distance_logits, dim=1)
        return {"class_logits": torch.cat(class_logits, dim=1), "distance_logits": distance_logits,
                "boxes": decode_distribution(distance_logits.float(), points.float(), strides.float()),
                "points": points, "strides": strides}

    def scores(self, outputs: dict) -> torch.Tensor:
        """Detection scores (I, P, C): the class probabilities, trained against the IoU of the predicted box."""
        return torch.sigmoid(outputs["class_logits"].float())


def freeze_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d below `module` by torchvision's FrozenBatchNorm2d with the same statistics and
    affine parameters: normalization by fixed statistics, in training as in evaluation, and nothing of it trained
    (config "freeze_batchnorm"; batch statistics would make a step depend on how the batch is split)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


class ResNetLevels(nn.Module):
    """A torchvision ResNet feature extractor's {"0", "1", "2"} outputs as the list [C3, C4, C5]."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> list:
        return list(self.extractor(images).values())

