"""Mono3D: a single-stage camera 3D detector in the manner of FCOS3D (Wang et al. 2021), written here from the paper:
every feature-map point of every camera image predicts, for the object whose projected 3D centre is near it, the
class and a centre-ness score, the offset from the point to the projected centre, the depth, the size, the
observation angle, the velocity and the attribute. The 3D box follows from the camera's intrinsics and pose
(`decode_boxes`); a bird's-eye-view NMS across the cameras merges the duplicates of objects seen twice.

Network: the CSP backbone and PAN neck of models/Yolo/csp_pan.py (imported, not copied: config/model.json "Mono3D"
has the same widths, depths and neck_depth keys), then per level (strides 8, 16, 32) two branches of two 3x3
convolutions: a class branch (C class logits + 1 centre-ness logit) and a regression branch (REGRESSION's channels).
At 384x224 with the "n" widths: P = 48*28 + 24*14 + 12*7 = 1764 points per image.

Regression channels per point (REGRESSION): offset (2) to the projected centre in strides; log depth (m); log
width, length, height (m); sin and cos of twice the observation angle alpha (the frames are the loader's:
dataset/NuscenesDataset/loader_3d_obj_det.py), and a direction logit: whether sin(alpha) < 0, that is whether
alpha is the angle in (0, pi] that the other two give, or that less pi (FCOS3D's direction classifier: an object's
front and back often look alike, and a regression of alpha itself would average the two). The two directions meet
at alpha = 0 and pi, where few boxes are: 6.5 % of the embedded training boxes lie within 15 degrees of them, 48 %
within 15 degrees of +-pi/2 (the heading of the traffic ahead and behind); velocity vx, vz (camera frame, m/s);
attribute logits (8, the devkit's ATTRIBUTE_NAMES).
"""

import logging
import math

import torch
from torch import nn

from models.Yolo.csp_pan import ConvBnAct, CSPBackbone, PANNeck
from models.Yolo.yolo import STRIDES, point_grid
from utils.errors import UserError
from utils.modules import log_model_summary
from utils.normalize import NormalizeImages

REGRESSION = {"offset": slice(0, 2), "log_depth": slice(2, 3), "log_size": slice(3, 6), "angle": slice(6, 8),
              "direction": slice(8, 9), "velocity": slice(9, 11), "attribute": slice(11, 19)}
NUM_REGRESSION = 19
NUM_ATTRIBUTES = 8
INITIAL_DEPTH_M = 20.0  # the depth every point predicts at initialization: a typical object's
INITIAL_SIZE_M = (1.0, 2.0, 1.5)  # width, length, height likewise
EXPECTED_OBJECTS = 5  # per image and level, for the initial class probability (few points hold objects)

logger = logging.getLogger(__name__)


class Head3D(nn.Module):
    """One level's head: (I, ch, h, w) -> class logits (I, h*w, C), centre-ness logits (I, h*w), regression
    (I, h*w, NUM_REGRESSION)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, prior_probability: float):
        super().__init__()
        self.cls = nn.Sequential(ConvBnAct(in_channels, channels), ConvBnAct(channels, channels),
                                 nn.Conv2d(channels, num_classes + 1, 1))
        self.reg = nn.Sequential(ConvBnAct(in_channels, channels), ConvBnAct(channels, channels),
                                 nn.Conv2d(channels, NUM_REGRESSION, 1))
        bias = torch.zeros(NUM_REGRESSION)
        bias[REGRESSION["log_depth"]] = math.log(INITIAL_DEPTH_M)
        bias[REGRESSION["log_size"]] = torch.tensor(INITIAL_SIZE_M).log()
        nn.init.normal_(self.reg[-1].weight, std=0.01)
        with torch.no_grad():
            self.reg[-1].bias.copy_(bias)
        nn.init.constant_(self.cls[-1].bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, feature: torch.Tensor) -> tuple:
        scores = self.cls(feature).flatten(2).transpose(1, 2)
        return scores[..., :-1], scores[..., -1], self.reg(feature).flatten(2).transpose(1, 2)


class Mono3D(nn.Module):
    """cfg: the "Mono3D" section of config/model.json; image_size: input (W, H), multiples of 32; num_classes: C;
    normalize: config/data.json's "normalize"."""

    def __init__(self, cfg: dict, image_size: tuple, num_classes: int, normalize: dict):
        super().__init__()
        width, height = image_size
        if width % STRIDES[-1] or height % STRIDES[-1]:
            raise UserError(f"input size {width}x{height} ('image' in config/data.json): width and height must be "
                            f"multiples of {STRIDES[-1]}, the coarsest stride")
        self.cfg, self.image_size, self.num_classes = cfg, (width, height), num_classes
        self.normalize = NormalizeImages(normalize["mean"], normalize["std"])
        self.backbone = CSPBackbone(cfg["widths"], cfg["depths"])
        channels = tuple(cfg["widths"][2:])
        self.neck = PANNeck(channels, cfg["neck_depth"])
        self.heads = nn.ModuleList(
            Head3D(level_channels, cfg["head_channels"], num_classes,
                   EXPECTED_OBJECTS / (num_classes * (width // stride) * (height // stride)))
            for level_channels, stride in zip(channels, STRIDES, strict=True))

    def forward(self, images: torch.Tensor) -> dict:
        """images (B, N_cam, 3, H, W) uint8 RGB -> over the I = B * N_cam images and P points: class_logits (I, P,
        C), centerness_logits (I, P), regression (I, P, NUM_REGRESSION), points (P, 2) input px, strides (P,)."""
        features = self.neck(self.backbone(self.normalize(images.flatten(0, 1))))
        class_logits, centerness, regression = zip(*(head(feature) for head, feature in zip(self.heads, features,
                                                                                           strict=True)), strict=True)
        points, strides = point_grid(features, STRIDES)
        return {"class_logits": torch.cat(class_logits, dim=1), "centerness_logits": torch.cat(centerness, dim=1),
                "regression": torch.cat(regression, dim=1), "points": points, "strides": strides}

    def print_model_summary(self) -> None:
        """Log the parameters of each part and the GFLOPs of one forward pass on one image at the input size."""
        width, height = self.image_size
        image = torch.zeros(1, 1, 3, height, width, dtype=torch.uint8, device=next(self.parameters()).device)
        log_model_summary(self, (image,), f"Mono3D at {width}x{height} input", "image", logger)


class DenseOutputs3D(nn.Module):
    """Mono3D as export.py writes it: images (I, 3, H, W) uint8 RGB -> scores (I, P, C) (class probability x
    centre-ness), regression (I, P, NUM_REGRESSION) raw, points (P, 2) and strides (P,): `decode_boxes` makes the
    3D boxes from them with each image's intrinsics and pose."""

    def __init__(self, model: Mono3D):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple:
        outputs = self.model(images[:, None])
        return scores(outputs), outputs["regression"], outputs["points"], outputs["strides"]


def scores(outputs: dict) -> torch.Tensor:
    """(I, P, C) detection scores: the class probability times the centre-ness probability (FCOS3D's ranking)."""
    centerness = torch.sigmoid(outputs["centerness_logits"].float())
    return torch.sigmoid(outputs["class_logits"].float()) * centerness[..., None]
