"""LiftBEV: the cameras of a sample to a bird's-eye-view (BEV) occupancy grid, by reading image features where the
grid's 3D points project (parameter-free lifting, as in Simple-BEV, Harley et al. 2023), then BEV convolutions.

1. Images: a torchvision ResNet and FPN per camera (the backbone of models/Yolo, called, not copied); the FPN's
   three levels (image_channels each) upsampled to stride 8 and summed, as Panoptic FPN's semantic branch does,
   are the camera's feature map. Every FPN parameter gets a gradient, which DDP requires. (Bilinear upsampling
   places the coarser levels' features up to half their stride off their receptive fields' centres; they are
   coarse anyway. The stride-8 level is read at its exact centres, see `lift`.)
2. Lift: every BEV cell centre is raised to the heights of config/model.json "heights_m" (m above the ego frame's
   origin, which nuScenes puts on the ground); each point is projected into every camera with the item's (3, 4)
   projection, and the feature there is read with bilinear interpolation (`grid_sample`). A camera that has the
   point behind it or outside its image contributes nothing; the cameras that see it are averaged. One camera's
   feature is the same all along a pixel's ray; the stack of heights is what tells the distance: only at the right
   distance do the low points fall on the object's lower part and the high points above its roof.
3. BEV: the heights stacked as channels, (B, image_channels * Z, X, Y), a stride-2 convolution, residual blocks at
   half resolution (where a 3x3 kernel spans 2 cells per side), bilinear upsampling and a 3x3 convolution back at
   full resolution, then C class logits per cell.

Input images (B, N_cam, 3, H, W) normalized, H and W multiples of 32; projections (B, N_cam, 3, 4) from the BEV
frame (m) to input pixels; output logits (B, C, X, Y) on the grid of the loader (row 0 front, column 0 left).
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork

from models.Yolo.yolo import build_backbone
from utils.errors import UserError
from utils.modules import conv_norm_act, log_model_summary
from utils.normalize import NormalizeImages

MIN_DEPTH_M = 0.1  # points closer to a camera's image plane than this are treated as behind it
PRIOR_PROBABILITY = 0.02  # initial occupancy probability: vehicles cover a few percent of the grid

logger = logging.getLogger(__name__)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_norm_act(channels, channels),
                                  nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.GroupNorm(min(32, channels), channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x + self.body(x))


class LiftBEV(nn.Module):
    """cfg: the "LiftBEV" section of config/model.json; image_size: input (W, H) px; bev: data.json's "bev"
    (x_range_m, y_range_m, cell_m); grid: (X, Y) cells; num_classes: C; num_cameras: N_cam (for the summary);
    normalize: data.json's "normalize" (mean and std of the images, 0-1 units)."""

    def __init__(self, cfg: dict, image_size: tuple, bev: dict, grid: tuple, num_classes: int, num_cameras: int,
                 normalize: dict):
        super().__init__()
        width, height = image_size
        if width % 32 or height % 32:
            raise UserError(f"input size {width}x{height} ('image' in config/data.json): width and height must be "
                            f"multiples of 32, the backbone's coarsest stride")
        if grid[0] % 2 or grid[1] % 2:
            raise UserError(f"BEV grid {grid[0]}x{grid[1]} cells ('bev' in config/data.json): both must be even, "
                            f"the BEV network works at half resolution")
        self.cfg, self.image_size, self.grid, self.num_cameras = cfg, (width, height), tuple(grid), num_cameras
        self.normalize = NormalizeImages(normalize["mean"], normalize["std"])
        self.backbone, channels = build_backbone(cfg["backbone"], cfg["pretrained_backbone"], cfg["freeze_batchnorm"])
        self.fpn = FeaturePyramidNetwork(list(channels), cfg["image_channels"])
        heights = cfg["heights_m"]
        bev_channels = cfg["bev_channels"]
        self.bev_encoder = nn.Sequential(conv_norm_act(cfg["image_channels"] * len(heights), bev_channels, stride=2),
                                         *[ResidualBlock(bev_channels) for _ in range(cfg["bev_blocks"])])
        self.bev_decoder = conv_norm_act(bev_channels, bev_channels // 2)
        self.classifier = nn.Conv2d(bev_channels // 2, num_classes, 1)
        nn.init.constant_(self.classifier.bias, -torch.log(torch.tensor(1 / PRIOR_PROBABILITY - 1)).item())

        # homogeneous BEV-frame points (Z, X, Y, 4) in m: cell centres, row i at x_max - (i + 0.5) cell, column j
        # at y_max - (j + 0.5) cell, at each height; not saved in checkpoints (derived from the config)
        cell = bev["cell_m"]
        x = bev["x_range_m"][1] - (torch.arange(grid[0]) + 0.5) * cell
        y = bev["y_range_m"][1] - (torch.arange(grid[1]) + 0.5) * cell
        z = torch.tensor(heights, dtype=torch.float32)
        zz, xx, yy = torch.meshgrid(z, x, y, indexing="ij")
        self.register_buffer("points", torch.stack([xx, yy, zz, torch.ones_like(xx)], dim=-1), persistent=False)

    def lift(self, features: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
        """features (B * N_cam, F, h, w), projections (B, N_cam, 3, 4) -> BEV features (B, F * Z, X, Y): each
        point's feature averaged over the cameras that see it (0 where none does)."""
        batch, cameras = projections.shape[:2]
        num_heights = self.points.shape[0]
        image_size = features.new_tensor(self.image_size, dtype=torch.float32)  # (W, H) input px
        stride = image_size[0] / features.shape[-1]  # input px per feature column
        with torch.autocast(features.device.type, enabled=False):  # pixel coordinates need float32
            projected = torch.einsum("bnij,pj->bnpi", projections.float(), self.points.view(-1, 4))  # (B, N, P, 3)
            depth = projected[..., 2]
            pixels = projected[..., :2] / depth.clamp(min=MIN_DEPTH_M)[..., None]  # (B, N, P, 2) input px
            seen = (depth > MIN_DEPTH_M) & ((pixels >= 0) & (pixels <= image_size)).all(dim=-1)  # (B, N, P)
            # Feature k of a stride-s ResNet map is centred on input pixel s * k (the strided convolutions keep
            # the first pixel's centre), i.e. at s * k + 0.5 in these coordinates; grid_sample(align_corners=
            # False) puts it at s * (k + 0.5). Shifting the points by (s - 1) / 2 px reads the feature centred on
            # them (3.5 px at stride 8: about a cell at 40 m).
            normalized = (pixels + (stride - 1) / 2) / image_size * 2.0 - 1.0  # grid_sample's [-1, 1]
            # "border": a point in the outer half feature reads that feature, not a blend with zeros
            sampled = F.grid_sample(features.float(), normalized.flatten(0, 1)[:, None], padding_mode="border",
                                    align_corners=False)  # (B * N, F, 1, P)
        sampled = sampled.view(batch, cameras, -1, sampled.shape[-1]) * seen[:, :, None]
        mean = sampled.sum(dim=1) / seen.sum(dim=1).clamp(min=1)[:, None]  # (B, F, P)
        return mean.view(batch, -1, num_heights, *self.grid).flatten(1, 2)  # channels: feature-major, then height

    def forward(self, images: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
        """images (B, N_cam, 3, H, W) uint8 RGB, projections (B, N_cam, 3, 4) -> logits (B, C, X, Y)."""
        levels = list(self.fpn(self.backbone(self.normalize(images.flatten(0, 1)))).values())  # strides 8, 16, 32
        features = levels[0]  # (B * N_cam, F, H / 8, W / 8)
        for level in levels[1:]:
            features = features + F.interpolate(level, size=features.shape[-2:], mode="bilinear", align_corners=False)
        bev = self.bev_encoder(self.lift(features, projections))  # (B, bev_channels, X / 2, Y / 2)
        bev = F.interpolate(bev, size=self.grid, mode="bilinear", align_corners=False)
        return self.classifier(self.bev_decoder(bev))

    def print_model_summary(self) -> None:
        """Log the parameters of each part and the GFLOPs of one forward pass on one sample."""
        num_cameras, (width, height), device = self.num_cameras, self.image_size, next(self.parameters()).device
        example = (torch.zeros(1, num_cameras, 3, height, width, dtype=torch.uint8, device=device),
                   torch.zeros(1, num_cameras, 3, 4, device=device))  # images, projections
        log_model_summary(self, example, f"LiftBEV ({self.cfg['backbone']} backbone) at {width}x{height} input, "
                          f"{self.grid[0]}x{self.grid[1]} BEV cells, {len(self.cfg['heights_m'])} heights",
                          f"sample of {num_cameras} cameras", logger)
