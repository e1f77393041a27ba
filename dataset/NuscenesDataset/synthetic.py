"""The embedded dataset: a synthetic dataset of any size written in the exact nuScenes v1.0 layout.

    python -m dataset.NuscenesDataset.synthetic --out DIR [--version v1.0-mini|v1.0-trainval] [--scenes N]
        [--samples_per_scene N] [--width W --height H] [--seed S] [--image_mode rendered|linked] [--sweeps]

The devkit's own `NuScenes(version=VERSION, dataroot=DIR)` loads the result unchanged: the 13 tables in DIR/VERSION/,
map masks in DIR/maps/, the camera keyframes in DIR/samples/CAM_*/ and a LIDAR_TOP keyframe per sample in
DIR/samples/LIDAR_TOP/ (its ego pose at the sample's timestamp, as the devkit's detection evaluation reads it; the
point-cloud files are empty). The scenes carry the names of the official
scenes of the version, so `create_splits_scenes()` selects them: v1.0-mini (the default) has 10 scenes, 8 in
'mini_train' and 2 in 'mini_val'; v1.0-trainval has 850, 700 in 'train' and 150 in 'val'. --scenes N keeps the first
N scene names in sorted order (a prefix of trainval holds train and val scenes); each scene is the same whichever
--scenes selects it, so a smaller dataset is a subset of a larger one.

In each scene the ego car drives a gently curved four-lane road; around it are traffic, parked vehicles, cyclists,
pedestrians and roadside objects of all 23 nuScenes categories with realistic sizes. Every camera image is rendered
from that 3D scene (pinhole camera, near-plane clipping, back-face culling, painter's order, shaded cuboids with
class-specific stripes, a little noise), so what a 2D label says is visibly there. The visibility token of each
annotation is the rendered fraction of the object that is not occluded, over all six cameras; as in nuScenes, an
object is annotated only over the keyframes between the first and the last in which some camera sees it.

For scale tests, --image_mode linked renders one image per camera (the first keyframe of the first scene) and
hard-links every other camera file to it; visibility tokens and annotation spans then come from the objects'
silhouettes drawn in painter's order at 1/8 of the size (at least 64x36), without writing that drawing. A
trainval-shaped dataset with the full 40 keyframes per scene (34,000 samples, 1.17 M annotations as in nuScenes)
takes about 500 s of CPU time, 4 to 7 minutes on two cores. --sweeps adds the cameras' non-keyframes as in nuScenes
(12 Hz cameras, 2 Hz keyframes: 5 sweeps between consecutive keyframes of each camera) in DIR/sweeps/CAM_*/, chained
by prev/next with the keyframes of their camera, each with its ego pose; their images are hard links to the keyframe
image before them. The keyframe records stay as without sweeps, but for their prev/next.

Frames, as in nuScenes: global (z up, ground at z = 0); ego (x forward, y left, z up); camera (z forward, x right,
y down). Distances in metres, times in microseconds, image coordinates in pixels with pixel i covering [i, i + 1).
"""

import argparse
import errno
import glob
import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import socket
import time
from concurrent.futures import ProcessPoolExecutor

import cv2
import numpy as np
from pyquaternion import Quaternion
from shapely.geometry import MultiPoint
from shapely.geometry import box as shapely_box

from utils.errors import UserError, exit_on_user_error
from utils.io import end_with_parent

logger = logging.getLogger(__name__)
VERSION = "v1.0-mini"  # the default version
VERSIONS = {"v1.0-mini": ("mini_train", "mini_val"), "v1.0-trainval": ("train", "val")}  # its two splits
IMAGE_MODES = ("rendered", "linked")
KEYFRAME_PERIOD_US = 500_000  # nuScenes keyframes come at 2 Hz
CAMERA_SWEEPS_PER_KEYFRAME = 5  # nuScenes cameras run at 12 Hz: 6 frames per keyframe period, one of them the keyframe
COUNT_SCALE, COUNT_MIN_SIZE = 8, (64, 36)  # linked mode counts visible pixels at 1/8 of the size, at least 64x36
NEAR_PLANE_M = 0.1  # polygons are clipped to camera z >= this before projection
# The top lidar, as placed in nuScenes (x to the right of the car): its keyframes carry each sample's ego pose,
# which the devkit's detection evaluation reads for every box's distance to the ego car. No points are simulated.
LIDAR_CHANNEL, LIDAR_TRANSLATION, LIDAR_YAW = "LIDAR_TOP", (0.94, 0.0, 1.84), -math.pi / 2

# channel: (yaw of the optical axis in the ego frame in degrees, position in the ego frame in m,
#           focal length in px at 1600x900, capture delay after the keyframe timestamp in us)
CAMERAS = {
    "CAM_FRONT": (0.0, (1.70, 0.00, 1.51), 1266.0, 10_000),
    "CAM_FRONT_RIGHT": (-55.0, (1.55, -0.49, 1.51), 1260.0, 18_000),
    "CAM_BACK_RIGHT": (-110.0, (1.03, -0.48, 1.57), 1259.0, 27_000),
    "CAM_BACK": (180.0, (0.03, 0.00, 1.57), 809.0, 35_000),
    "CAM_BACK_LEFT": (110.0, (1.04, 0.48, 1.56), 1256.0, 44_000),
    "CAM_FRONT_LEFT": (55.0, (1.52, 0.49, 1.51), 1272.0, 2_000),
}

# name: (width, length, height in m, RGB colour, placement, relative frequency within the placement,
#        stripe on the vertical faces as (bottom, top) fractions of the height and its RGB colour, or None).
# Placements: traffic (moves in a lane), parked (parking lane), cycle (bike lane edge), walker (sidewalk),
# roadside (static, road edge or sidewalk). Categories without a detection class are here on purpose.
CATEGORIES = {
    "animal": (0.35, 0.8, 0.6, (140, 95, 50), "walker", 0.3, None),
    "human.pedestrian.adult": (0.65, 0.7, 1.75, (200, 80, 160), "walker", 4.0, ((0.0, 0.45), (40, 40, 60))),
    "human.pedestrian.child": (0.5, 0.5, 1.25, (220, 110, 180), "walker", 0.6, ((0.0, 0.45), (40, 40, 60))),
    "human.pedestrian.construction_worker": (0.7, 0.75, 1.8, (235, 150, 40), "walker", 0.6,
                                             ((0.0, 0.45), (40, 40, 60))),
    "human.pedestrian.personal_mobility": (0.6, 1.1, 1.7, (120, 200, 200), "walker", 0.3, None),
    "human.pedestrian.police_officer": (0.7, 0.7, 1.8, (30, 50, 140), "walker", 0.4, ((0.0, 0.45), (20, 20, 30))),
    "human.pedestrian.stroller": (0.6, 0.95, 1.1, (90, 160, 90), "walker", 0.3, None),
    "human.pedestrian.wheelchair": (0.7, 1.1, 1.3, (100, 100, 100), "walker", 0.2, None),
    "movable_object.barrier": (2.4, 0.5, 1.0, (235, 235, 235), "roadside", 3.0, ((0.45, 0.75), (220, 30, 30))),
    "movable_object.debris": (0.6, 0.9, 0.3, (110, 90, 70), "roadside", 0.4, None),
    "movable_object.pushable_pullable": (0.6, 0.7, 1.1, (60, 120, 60), "roadside", 0.4, None),
    "movable_object.trafficcone": (0.4, 0.4, 0.9, (255, 110, 0), "roadside", 3.0, ((0.45, 0.65), (250, 250, 250))),
    "static_object.bicycle_rack": (1.0, 3.0, 1.0, (150, 150, 170), "roadside", 0.4, None),
    "vehicle.bicycle": (0.6, 1.7, 1.3, (40, 170, 60), "cycle", 1.0, None),
    "vehicle.bus.bendy": (2.9, 17.0, 3.4, (230, 200, 30), "traffic", 0.3, ((0.45, 0.8), (50, 70, 90))),
    "vehicle.bus.rigid": (2.9, 11.0, 3.4, (240, 210, 40), "traffic", 0.8, ((0.45, 0.8), (50, 70, 90))),
    "vehicle.car": (1.9, 4.6, 1.6, (40, 90, 220), "traffic", 6.0, ((0.55, 0.9), (40, 50, 70))),
    "vehicle.construction": (2.8, 6.5, 3.0, (250, 180, 0), "parked", 0.8, ((0.55, 0.85), (60, 60, 60))),
    "vehicle.emergency.ambulance": (2.2, 6.0, 2.6, (250, 250, 250), "traffic", 0.2, ((0.3, 0.45), (230, 30, 30))),
    "vehicle.emergency.police": (2.0, 5.0, 1.7, (20, 20, 20), "parked", 0.4, ((0.3, 0.5), (240, 240, 240))),
    "vehicle.motorcycle": (0.8, 2.1, 1.4, (170, 30, 30), "cycle", 1.0, None),
    "vehicle.trailer": (2.9, 12.0, 3.8, (150, 150, 160), "parked", 0.8, None),
    "vehicle.truck": (2.5, 7.0, 2.9, (200, 40, 40), "traffic", 2.0, ((0.6, 0.85), (40, 40, 50))),
}
# Objects of each placement per scene; they spread over about 150 m of road around the ego path.
PLACEMENT_COUNTS = {"traffic": 12, "parked": 8, "cycle": 4, "walker": 14, "roadside": 10}
# Also parked: some cars and trucks (vehicles of the traffic placement that may stand in the parking lane).
PARKABLE = ("vehicle.car", "vehicle.truck")

# Road cross-section: lateral offsets d in m, positive to the left of the ego lane centre (d = 0).
SAME_DIRECTION_LANES = (-3.5, 0.0)
OPPOSITE_LANES = (3.5, 7.0)
PARKING_LANES = (-6.6, 10.1)
CYCLE_LINES = (-4.6, 8.1)
SIDEWALKS = ((-12.0, -8.0), (11.5, 15.5))
GROUND_STRIPS = (  # (d from, d to, RGB colour)
    (-8.0, 11.5, (85, 85, 90)),  # asphalt, parking lanes included
    (-12.0, -8.0, (165, 160, 150)),  # sidewalks
    (11.5, 15.5, (165, 160, 150)),
)
LANE_MARKINGS = (  # (d, dashed, RGB colour)
    (-5.25, False, (230, 230, 230)),
    (-1.75, True, (230, 230, 230)),
    (1.75, False, (230, 200, 40)),
    (5.25, True, (230, 230, 230)),
    (8.75, False, (230, 230, 230)),
)
SKY_RGB = ((120, 170, 230), (200, 220, 240))  # zenith, horizon
GROUND_RGB = (95, 120, 70)
LIGHT_DIRECTION = np.array([0.4, 0.3, 0.87]) / np.linalg.norm([0.4, 0.3, 0.87])  # global frame, towards the sun

ATTRIBUTES = ("vehicle.moving", "vehicle.parked", "vehicle.stopped", "pedestrian.moving", "pedestrian.standing",
              "pedestrian.sitting_lying_down", "cycle.with_rider", "cycle.without_rider")
VISIBILITY_LEVELS = (("1", "v0-40", 0.0), ("2", "v40-60", 0.4), ("3", "v60-80", 0.6), ("4", "v80-100", 0.8))
LOCATIONS = ("singapore-onenorth", "boston-seaport", "singapore-queenstown", "singapore-hollandvillage")


def make_token(seed: int, *parts) -> str:
    """A 32-hex-digit token like nuScenes', deterministic given the seed and the parts."""
    return hashlib.md5("|".join(str(p) for p in (seed, *parts)).encode()).hexdigest()


def yaw_rotation(yaw: float) -> list:
    """Quaternion [w, x, y, z] of a rotation by `yaw` radians about z."""
    return Quaternion(axis=[0.0, 0.0, 1.0], angle=yaw).elements.tolist()


def camera_to_ego_rotation(yaw_deg: float) -> np.ndarray:
    """(3, 3) rotation whose columns are the camera's x (right), y (down), z (optical axis) in the ego frame."""
    yaw = math.radians(yaw_deg)
    return np.array([[math.sin(yaw), 0.0, math.cos(yaw)],
                     [-math.cos(yaw), 0.0, math.sin(yaw)],
                     [0.0, -1.0, 0.0]])


def intrinsics(focal_px: float, width: int, height: int) -> np.ndarray:
    """(3, 3) pinhole intrinsics of a 1600x900 nuScenes camera scaled to width x height."""
    sx, sy = width / 1600.0, height / 900.0
    return np.array([[focal_px * sx, 0.0, 816.0 * sx], [0.0, focal_px * sy, 491.0 * sy], [0.0, 0.0, 1.0]])


class Road:
    """Constant-curvature road: the ego lane centre at arc length s (m) has heading heading0 + curvature * s."""

    def __init__(self, origin_xy: np.ndarray, heading0: float, curvature: float):
        self.origin_xy, self.heading0, self.curvature = origin_xy, heading0, curvature

    def heading(self, s):
        return self.heading0 + self.curvature * np.asarray(s, dtype=float)

    def point(self, s, d):
        """Global xy (..., 2) of the point at arc length s and lateral offset d (left positive)."""
        s, d = np.broadcast_arrays(np.asarray(s, dtype=float), np.asarray(d, dtype=float))
        heading = self.heading(s)
        k = self.curvature
        x = self.origin_xy[0] + (np.sin(heading) - math.sin(self.heading0)) / k - d * np.sin(heading)
        y = self.origin_xy[1] - (np.cos(heading) - math.cos(self.heading0)) / k + d * np.cos(heading)
        return np.stack([x, y], axis=-1)


def place_objects(rng: np.random.Generator, path_length: float, ego_speed: float, sample_times: np.ndarray) -> list:
    """Objects of the scene in road coordinates: dicts with category, size, s0 (m), speed (m/s along s), d (m),
    yaw offset from the road heading (rad) and attributes. No two objects, nor an object and the ego car, overlap
    at any keyframe (checked on (s, d) footprints with a 0.5 m margin)."""
    names = list(CATEGORIES)
    objects = []

    def footprints(s, d, length, width) -> np.ndarray:
        """(keyframes, 4): (s, d, length, width) at each keyframe."""
        return np.stack(np.broadcast_arrays(s, d, length, width), axis=1).astype(float)

    def obj_footprints(obj) -> np.ndarray:
        width, length = obj["size"][:2]
        if abs(math.sin(obj["yaw_offset"])) > 1e-6:  # not aligned with the road: bound it by a square
            width = length = max(width, length)
        return footprints(obj["s0"] + obj["speed"] * sample_times, obj["d"], length, width)

    def overlaps_any(prints, occupied) -> bool:
        """Whether footprints (keyframes, 4) overlap any of the occupied (m, keyframes, 4) at some keyframe."""
        gap, limit = np.abs(prints - occupied), (prints + occupied) / 2 + 0.5
        return bool(((gap[..., 0] < limit[..., 2]) & (gap[..., 1] < limit[..., 3])).any())

    occupied = footprints(ego_speed * sample_times + 1.3, 0.0, 5.2, 2.2)[None]  # the ego car
    for placement, count in PLACEMENT_COUNTS.items():
        candidates = [n for n in names if CATEGORIES[n][4] == placement]
        if placement == "parked":
            candidates += list(PARKABLE)
        weights = np.array([CATEGORIES[n][5] for n in candidates])
        for _ in range(count):
            for _attempt in range(30):
                name = candidates[rng.choice(len(candidates), p=weights / weights.sum())]
                obj = new_object(rng, name, placement, path_length, ego_speed)
                prints = obj_footprints(obj)
                if not overlaps_any(prints, occupied):
                    objects.append(obj)
                    occupied = np.concatenate([occupied, prints[None]])
                    break
    return objects


def new_object(rng: np.random.Generator, name: str, placement: str, path_length: float, ego_speed: float) -> dict:
    """One object of category `name` at a random place of its placement (see CATEGORIES)."""
    width, length, height = CATEGORIES[name][:3]
    scale = rng.uniform(0.9, 1.1)
    size = [width * scale, length * rng.uniform(0.9, 1.1), height * rng.uniform(0.92, 1.08)]
    s0 = rng.uniform(-50.0, path_length + 70.0)
    speed, yaw_offset, attributes = 0.0, 0.0, []
    if placement == "traffic":
        lane = rng.choice(SAME_DIRECTION_LANES + OPPOSITE_LANES)
        moving = rng.random() < 0.85
        speed = ego_speed * rng.uniform(0.7, 1.3) if moving else 0.0
        if lane in OPPOSITE_LANES:
            speed, yaw_offset = -speed, math.pi
        d = lane + rng.uniform(-0.3, 0.3)
        attributes = ["vehicle.moving" if moving else "vehicle.stopped"]
    elif placement == "parked":
        d = rng.choice(PARKING_LANES) + rng.uniform(-0.2, 0.2)
        yaw_offset = rng.choice([0.0, math.pi])
        attributes = ["vehicle.parked"]
    elif placement == "cycle":
        d = rng.choice(CYCLE_LINES) + rng.uniform(-0.2, 0.2)
        with_rider = rng.random() < 0.6
        speed = rng.uniform(2.0, 6.0) if with_rider else 0.0
        if d > 0:
            speed, yaw_offset = -speed, math.pi
        attributes = ["cycle.with_rider" if with_rider else "cycle.without_rider"]
    elif placement == "walker":
        low, high = SIDEWALKS[rng.integers(2)]
        d = rng.uniform(low + 0.6, high - 0.6)
        moving = rng.random() < 0.6
        speed = rng.choice([-1.0, 1.0]) * rng.uniform(0.8, 1.6) if moving else 0.0
        yaw_offset = (0.0 if speed > 0 else math.pi) if moving else rng.choice([0.5, 1.0, 1.5, 2.0]) * math.pi
        if name.startswith("human.pedestrian."):
            attributes = ["pedestrian.moving" if moving else "pedestrian.standing"]
    else:  # roadside
        side = rng.integers(2)
        d = rng.uniform(-7.6, -5.6) if side == 0 else rng.uniform(9.2, 11.0)
        yaw_offset = rng.choice([0.0, 0.5 * math.pi])
    return {"category": name, "size": size, "s0": s0, "speed": speed, "d": float(d), "yaw_offset": yaw_offset,
            "attributes": attributes, "color": jitter_color(rng, CATEGORIES[name][3])}


def jitter_color(rng: np.random.Generator, rgb) -> tuple:
    return tuple(int(np.clip(c * rng.uniform(0.85, 1.15) + rng.uniform(-12, 12), 0, 255)) for c in rgb)


def object_states(road: Road, objects: list, t_s: float):
    """Centres (n, 3) in global metres and yaws (n,) in rad of the n `objects` at `t_s` seconds after the scene
    start."""
    s = np.array([obj["s0"] for obj in objects]) + np.array([obj["speed"] for obj in objects]) * t_s
    xy = road.point(s, [obj["d"] for obj in objects]).reshape(-1, 2)
    heights = np.array([obj["size"][2] for obj in objects])
    yaws = road.heading(s) + np.array([obj["yaw_offset"] for obj in objects])
    return np.column_stack([xy, heights / 2.0]), yaws


def box_faces(size, center: np.ndarray, yaw: float, stripe) -> list:
    """Quads of a cuboid in global coordinates: [(corners (4, 3), outward normal (3,), is_stripe)], the top face
    and the four vertical faces, each vertical face followed by its stripe (drawn over it) if the class has one."""
    width, length, height = size
    hl, hw, hh = length / 2, width / 2, height / 2
    rotation = np.array([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1.0]])

    def to_global(points):
        return np.asarray(points) @ rotation.T + center

    faces = [(to_global([(hl, hw, hh), (-hl, hw, hh), (-hl, -hw, hh), (hl, -hw, hh)]), np.array([0, 0, 1.0]), False)]
    # (outward normal in the object frame, the face's horizontal half-extent axis and size)
    for normal, axis, half, offset in (((1, 0, 0), 1, hw, hl), ((-1, 0, 0), 1, hw, hl),
                                       ((0, 1, 0), 0, hl, hw), ((0, -1, 0), 0, hl, hw)):
        def quad(z_low, z_high, inset, normal=normal, axis=axis, half=half, offset=offset):
            points = []
            for along, z in ((half - inset, z_high), (-half + inset, z_high), (-half + inset, z_low),
                             (half - inset, z_low)):
                point = np.array(normal, dtype=float) * offset
                point[axis] = along
                point[2] = z
                points.append(point)
            return to_global(points)

        world_normal = rotation @ np.array(normal, dtype=float)
        faces.append((quad(-hh, hh, 0.0), world_normal, False))
        if stripe is not None:
            (low, high), _ = stripe
            faces.append((quad(-hh + low * height, -hh + high * height, 0.08 * half), world_normal, True))
    return faces


def clip_to_near_plane(polygon: np.ndarray) -> np.ndarray:
    """Sutherland-Hodgman clip of a camera-frame polygon (n, 3) to z >= NEAR_PLANE_M; returns (m, 3)."""
    clipped = []
    for a, b in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        a_in, b_in = a[2] >= NEAR_PLANE_M, b[2] >= NEAR_PLANE_M
        if a_in:
            clipped.append(a)
        if a_in != b_in:
            clipped.append(a + (NEAR_PLANE_M - a[2]) / (b[2] - a[2]) * (b - a))
    return np.array(clipped).reshape(-1, 3)


def project(points_cam: np.ndarray, camera_matrix: np.ndarray) -> np.ndarray:
    """Pixel coordinates (n, 2) of camera-frame points (n, 3) with z > 0."""
    uvw = points_cam @ camera_matrix.T
    return uvw[:, :2] / uvw[:, 2:3]


def fill_polygon(image: np.ndarray, pixels: np.ndarray, value) -> None:
    """Fill a convex polygon given in continuous pixel coordinates (pixel i covers [i, i + 1)), 1/16 px precise."""
    fixed_point = np.round((pixels - 0.5) * 16.0).astype(np.int64)
    fixed_point = np.clip(fixed_point, -(2**27), 2**27).astype(np.int32)
    cv2.fillConvexPoly(image, fixed_point, value, lineType=cv2.LINE_8, shift=4)


def background(width: int, height: int, horizon_row: float) -> np.ndarray:
    """(H, W, 3) uint8 RGB: a sky gradient above the horizon row and plain ground below."""
    rows = np.arange(height, dtype=float)[:, None]
    blend = np.clip(rows / max(horizon_row, 1.0), 0.0, 1.0)
    sky = (1 - blend) * np.array(SKY_RGB[0]) + blend * np.array(SKY_RGB[1])
    column = np.where(rows < horizon_row, sky, np.array(GROUND_RGB, dtype=float))
    return np.repeat(column[:, None, :], width, axis=1).astype(np.uint8)


def ground_quads(road: Road, s_from: float, s_to: float):
    """Road surface, sidewalks and lane markings as global quads (Q, 4, 3) with RGB colours (Q, 3)."""
    quads, colors = [], []
    step = 4.0
    for s in np.arange(s_from, s_to, step):
        for d_from, d_to, color in GROUND_STRIPS:
            quads.append(road.point([s, s + step, s + step, s], [d_from, d_from, d_to, d_to]))
            colors.append(color)
    for d, dashed, color in LANE_MARKINGS:
        dash, period = (3.0, 9.0) if dashed else (step, step)
        for s in np.arange(s_from, s_to, period):
            quads.append(road.point([s, s + dash, s + dash, s], [d - 0.08, d - 0.08, d + 0.08, d + 0.08]))
            colors.append(color)
    quads = np.concatenate([np.array(quads), np.zeros((len(quads), 4, 1))], axis=2)
    return quads, np.array(colors)


class CameraRig:
    """The six cameras of one scene: intrinsics (3, 3), camera-to-ego rotation (3, 3) and translation (3,)."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.cameras = {}
        for channel, (yaw_deg, translation, focal_px, _) in CAMERAS.items():
            camera_matrix = intrinsics(focal_px, width, height)
            self.cameras[channel] = (camera_matrix, camera_to_ego_rotation(yaw_deg), np.array(translation))
        self.background = background(width, height, intrinsics(1.0, width, height)[1, 2])


def render_camera(rig: CameraRig, channel: str, ego_xy: np.ndarray, ego_yaw: float, ground, objects_now: list,
                  rng: np.random.Generator):
    """Render one camera image. objects_now: [(size, centre (3,), yaw, colour, stripe)] in global coordinates.

    Returns the RGB image (H, W, 3) uint8, the visible pixel count of each object (n,), and the area in px of each
    object's unoccluded silhouette inside the image (n,)."""
    camera_matrix, cam_to_ego, cam_in_ego = rig.cameras[channel]
    ego_rotation = np.array([[math.cos(ego_yaw), -math.sin(ego_yaw), 0.0],
                             [math.sin(ego_yaw), math.cos(ego_yaw), 0.0], [0.0, 0.0, 1.0]])
    cam_to_global = ego_rotation @ cam_to_ego
    cam_position = np.array([ego_xy[0], ego_xy[1], 0.0]) + ego_rotation @ cam_in_ego

    def to_camera(points):
        return (points - cam_position) @ cam_to_global

    image = rig.background.copy()
    object_ids = np.zeros((rig.height, rig.width), dtype=np.uint16)
    canvas = shapely_box(0, 0, rig.width, rig.height)

    ground_points, ground_colors = ground
    ground_cam = to_camera(ground_points.reshape(-1, 3)).reshape(ground_points.shape)
    in_range = (ground_cam[:, :, 2].max(axis=1) > NEAR_PLANE_M) & (ground_cam[:, :, 2].min(axis=1) < 150.0)
    for quad, color in zip(ground_cam[in_range], ground_colors[in_range], strict=True):
        clipped = clip_to_near_plane(quad)
        fill_polygon(image, project(clipped, camera_matrix), tuple(int(c) for c in color))

    silhouette_px = np.zeros(len(objects_now))
    distances = [np.linalg.norm(center - cam_position) for _, center, _, _, _ in objects_now]
    for index in np.argsort(distances)[::-1]:  # painter's order: far to near
        size, center, yaw, color, stripe = objects_now[index]
        silhouette = []
        for corners, normal, is_stripe in box_faces(size, center, yaw, stripe):
            corners_cam = to_camera(corners)
            if np.dot(cam_to_global.T @ normal, corners_cam.mean(axis=0)) >= 0:
                continue  # back face
            clipped = clip_to_near_plane(corners_cam)
            if len(clipped) < 3:
                continue
            pixels = project(clipped, camera_matrix)
            shade = 0.55 + 0.45 * max(0.0, float(np.dot(normal, LIGHT_DIRECTION)))
            base = stripe[1] if is_stripe else color
            fill_polygon(image, pixels, tuple(int(min(255, c * shade)) for c in base))
            if not is_stripe:
                fill_polygon(object_ids, pixels, int(index) + 1)
                silhouette.append(pixels)
        if silhouette:
            hull = MultiPoint(np.concatenate(silhouette)).convex_hull
            silhouette_px[index] = hull.intersection(canvas).area
    noise = rng.integers(-5, 6, size=image.shape, dtype=np.int16)
    image = np.clip(cv2.GaussianBlur(image, (3, 3), 0).astype(np.int16) + noise, 0, 255).astype(np.uint8)
    visible_pixels = np.bincount(object_ids.ravel(), minlength=len(objects_now) + 1)[1:]
    return image, visible_pixels, silhouette_px


# The 12 edges of a cuboid as pairs of corner indices, corners as box_corners orders them (top four first).
BOX_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]])


def box_corners(sizes: np.ndarray, centers: np.ndarray, yaws: np.ndarray) -> np.ndarray:
    """Corners (n, 8, 3) in global metres of n cuboids with sizes (n, 3) as (width, length, height), centres (n, 3)
    and yaws (n,) in rad; the top four first."""
    signs = np.array([[1, 1, 1], [-1, 1, 1], [-1, -1, 1], [1, -1, 1],
                      [1, 1, -1], [-1, 1, -1], [-1, -1, -1], [1, -1, -1]], dtype=float)
    half = np.stack([sizes[:, 1], sizes[:, 0], sizes[:, 2]], axis=1) / 2.0  # (n, 3): along x, y, z of the object
    cos, sin = np.cos(yaws)[:, None], np.sin(yaws)[:, None]
    offsets = signs[None] * half[:, None]  # (n, 8, 3) in the object frame
    rotated = np.stack([cos * offsets[..., 0] - sin * offsets[..., 1], sin * offsets[..., 0] + cos * offsets[..., 1],
                        offsets[..., 2]], axis=-1)
    return rotated + centers[:, None]


def count_visible_pixels(rig: CameraRig, channel: str, ego_xy: np.ndarray, ego_yaw: float, corners: np.ndarray):
    """What render_camera counts, without drawing an image: the visible pixel count (n,) and the unoccluded
    silhouette area in px (n,) of each of n cuboids with corners (n, 8, 3) from box_corners, in an image of the
    rig's size. Each cuboid in view is drawn as its silhouette, the convex hull of its projected part in front of
    the near plane, in painter's order; only object pixels are drawn, as only they hide objects."""
    camera_matrix, cam_to_ego, cam_in_ego = rig.cameras[channel]
    ego_rotation = np.array([[math.cos(ego_yaw), -math.sin(ego_yaw), 0.0],
                             [math.sin(ego_yaw), math.cos(ego_yaw), 0.0], [0.0, 0.0, 1.0]])
    cam_to_global = ego_rotation @ cam_to_ego
    cam_position = np.array([ego_xy[0], ego_xy[1], 0.0]) + ego_rotation @ cam_in_ego
    corners_cam = (corners - cam_position) @ cam_to_global  # (n, 8, 3)
    in_front = corners_cam[:, :, 2] >= NEAR_PLANE_M
    all_in_front = in_front.all(axis=1)
    uvw = corners_cam @ camera_matrix.T
    uv = uvw[:, :, :2] / np.maximum(uvw[:, :, 2:], NEAR_PLANE_M)  # (n, 8, 2), meaningful where in front
    outside = ((uv[:, :, 0] < 0).all(1) | (uv[:, :, 0] > rig.width).all(1) | (uv[:, :, 1] < 0).all(1)
               | (uv[:, :, 1] > rig.height).all(1))
    in_view = np.flatnonzero(in_front.any(axis=1) & ~(all_in_front & outside))

    object_ids = np.zeros((rig.height, rig.width), dtype=np.uint16)
    canvas = np.array([[0, 0], [rig.width, 0], [rig.width, rig.height], [0, rig.height]], dtype=np.float32)
    silhouette_px = np.zeros(len(corners))
    distances = np.linalg.norm(corners_cam.mean(axis=1), axis=1)
    for index in in_view[np.argsort(-distances[in_view], kind="stable")]:  # painter's order: far to near
        if all_in_front[index]:
            points = uv[index]
        else:  # the vertices of its part in front: corners in front and where edges cross the near plane
            start, end = corners_cam[index][BOX_EDGES[:, 0]], corners_cam[index][BOX_EDGES[:, 1]]
            crossing = (start[:, 2] >= NEAR_PLANE_M) != (end[:, 2] >= NEAR_PLANE_M)
            start, end = start[crossing], end[crossing]
            cut = start + (NEAR_PLANE_M - start[:, 2:]) / (end[:, 2:] - start[:, 2:]) * (end - start)
            points = project(np.concatenate([corners_cam[index][in_front[index]], cut]), camera_matrix)
        hull = cv2.convexHull(points.astype(np.float32))
        if len(hull) < 3:
            continue
        fill_polygon(object_ids, hull.reshape(-1, 2), int(index) + 1)
        silhouette_px[index] = cv2.intersectConvexConvex(hull, canvas)[0]
    visible_pixels = np.bincount(object_ids.ravel(), minlength=len(corners) + 1)[1:]
    return visible_pixels, silhouette_px


def count_size(width: int, height: int) -> tuple:
    """The image size (width, height) at which linked mode counts visible pixels."""
    return (min(width, max(COUNT_MIN_SIZE[0], width // COUNT_SCALE)),
            min(height, max(COUNT_MIN_SIZE[1], height // COUNT_SCALE)))


def write_jpeg(path: str, image: np.ndarray) -> None:
    """Write an RGB image (H, W, 3) uint8 as a JPEG of quality 90."""
    _, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    with open(path, "wb") as f:
        f.write(encoded.tobytes())


# os.link's errors that say "no hard link here" (at the link limit, another device, not supported), not "bad path"
LINK_UNSUPPORTED = {errno.EMLINK, errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP}


def link_or_copy(source: str, target: str) -> str:
    """Hard-link `target` to the file `source` and return `source`. Where the file system cannot (no hard links,
    or `source` at its link limit: 65,000 on ext4) copy `source` instead and return `target`, which the next links
    can use. Other errors (an existing `target`, a full disk) are raised."""
    try:
        os.link(source, target)
        return source
    except OSError as error:
        if error.errno not in LINK_UNSUPPORTED:
            raise
        shutil.copyfile(source, target)
        return target


def visibility_token(visible_fraction: float) -> str:
    return [token for token, _, low in VISIBILITY_LEVELS if visible_fraction >= low][-1]


def generate_scene(job: dict) -> dict:
    """Write one scene's camera images into job['root'] and return its table records ({table name: [records]}).

    job: seed, scene_index (the scene's place in its version), scene_name, width, height, samples_per_scene, root,
    image_mode, sweeps (bool) and templates ({channel: path of the image that linked mode links that camera's files
    to}; a channel missing from it gets its first keyframe rendered, and that image becomes its template)."""
    seed, scene_index, scene_name = job["seed"], job["scene_index"], job["scene_name"]
    width, height, n_samples, root = job["width"], job["height"], job["samples_per_scene"], job["root"]
    linked = job["image_mode"] == "linked"
    n_sweeps = CAMERA_SWEEPS_PER_KEYFRAME if job["sweeps"] else 0
    rng = np.random.default_rng([seed, scene_index])
    tables = {name: [] for name in ("log", "scene", "sample", "sample_data", "ego_pose", "calibrated_sensor",
                                    "instance", "sample_annotation")}

    def token(*parts) -> str:
        return make_token(seed, scene_name, *parts)

    location = LOCATIONS[scene_index % len(LOCATIONS)]
    start_us = 1_531_883_530_000_000 + scene_index * 86_400_000_000
    logfile = "n015-" + time.strftime("%Y-%m-%d-%H-%M-%S", time.gmtime(start_us / 1e6)) + "+0800"
    log_token = token("log")
    tables["log"].append({"token": log_token, "logfile": logfile, "vehicle": "n015",
                          "date_captured": logfile[5:15], "location": location})

    ego_speed = rng.uniform(3.0, 8.0)
    sample_times = np.arange(n_samples) * KEYFRAME_PERIOD_US / 1e6
    road = Road(rng.uniform(-500, 500, size=2), rng.uniform(-math.pi, math.pi),
                rng.choice([-1.0, 1.0]) * rng.uniform(0.0005, 0.004))
    path_length = ego_speed * sample_times[-1]
    objects = place_objects(rng, path_length, ego_speed, sample_times)
    rig = CameraRig(width, height)
    count_rig = CameraRig(*count_size(width, height)) if linked else None
    ground = None  # the road surface, built when a first image is rendered (linked mode renders few or none)

    calibrated = {}
    for channel in CAMERAS:
        camera_matrix, cam_to_ego, translation = rig.cameras[channel]
        calibrated[channel] = token("calibrated_sensor", channel)
        tables["calibrated_sensor"].append({
            "token": calibrated[channel], "sensor_token": make_token(seed, "sensor", channel),
            "translation": translation.tolist(), "rotation": Quaternion(matrix=cam_to_ego).elements.tolist(),
            "camera_intrinsic": camera_matrix.tolist()})

    def ego_at(timestamp: int):
        """Ego xy (2,) in global metres and yaw in rad at a timestamp in us."""
        ego_s = ego_speed * (timestamp - start_us) / 1e6
        return road.point(ego_s, 0.0), float(road.heading(ego_s))

    def pose_record(pose_token: str, timestamp: int, ego_xy: np.ndarray, ego_yaw: float) -> dict:
        return {"token": pose_token, "timestamp": timestamp, "rotation": yaw_rotation(ego_yaw),
                "translation": [float(ego_xy[0]), float(ego_xy[1]), 0.0]}

    def frame_token(channel: str, k: int, j: int) -> str:
        """Token of a camera's frame j after keyframe k: j = 0 is the keyframe, 1..n_sweeps its sweeps."""
        return token("sample_data", channel, k) if j == 0 else token("sample_data", channel, k, "sweep", j)

    def chain(channel: str, k: int, j: int) -> dict:
        """prev and next of frame (k, j) in its camera's chain of keyframes and sweeps ("" at the ends)."""
        prev = frame_token(channel, k, j - 1) if j > 0 else frame_token(channel, k - 1, n_sweeps) if k > 0 else ""
        if k + 1 == n_samples:  # the last keyframe: no sweeps after it
            return {"prev": prev, "next": ""}
        following = frame_token(channel, k, j + 1) if j < n_sweeps else frame_token(channel, k + 1, 0)
        return {"prev": prev, "next": following}

    sample_tokens = [token("sample", k) for k in range(n_samples)]
    instance_tokens = [token("instance", i) for i in range(len(objects))]
    annotation_tokens = [[token("annotation", i, k) for k in range(n_samples)] for i in range(len(objects))]
    image_source = dict(job["templates"])  # channel: the image file the camera's next linked file links to
    sweep_tables = {"sample_data": [], "ego_pose": []}  # after the keyframes' records, which stay as without sweeps
    # after the cameras' records (the images' noise is seeded by the ego_pose count), which stay as without them
    lidar_tables = {"sample_data": [], "ego_pose": [], "calibrated_sensor": [{
        "token": token("calibrated_sensor", LIDAR_CHANNEL), "sensor_token": make_token(seed, "sensor", LIDAR_CHANNEL),
        "translation": list(LIDAR_TRANSLATION), "rotation": yaw_rotation(LIDAR_YAW), "camera_intrinsic": []}]}
    per_sample = []  # (ego xy (2,), object states, visible px (n,), silhouette px (n,)) of each keyframe
    for k, t_s in enumerate(sample_times):
        timestamp = start_us + k * KEYFRAME_PERIOD_US
        tables["sample"].append({"token": sample_tokens[k], "timestamp": timestamp,
                                 "prev": sample_tokens[k - 1] if k > 0 else "",
                                 "next": sample_tokens[k + 1] if k + 1 < n_samples else "",
                                 "scene_token": token("scene")})
        # the LIDAR_TOP keyframe: at the sample's timestamp, as in nuScenes; its file holds no points
        lidar_token = token("sample_data", LIDAR_CHANNEL, k)
        lidar_filename = f"samples/{LIDAR_CHANNEL}/{logfile}__{LIDAR_CHANNEL}__{timestamp}.pcd.bin"
        open(os.path.join(root, lidar_filename), "wb").close()
        lidar_tables["ego_pose"].append(pose_record(lidar_token, timestamp, *ego_at(timestamp)))
        lidar_tables["sample_data"].append({
            "token": lidar_token, "sample_token": sample_tokens[k], "ego_pose_token": lidar_token,
            "calibrated_sensor_token": lidar_tables["calibrated_sensor"][0]["token"], "timestamp": timestamp,
            "fileformat": "pcd", "is_key_frame": True, "height": 0, "width": 0, "filename": lidar_filename,
            "prev": token("sample_data", LIDAR_CHANNEL, k - 1) if k > 0 else "",
            "next": token("sample_data", LIDAR_CHANNEL, k + 1) if k + 1 < n_samples else ""})
        centers, yaws = object_states(road, objects, t_s)
        states = list(zip(centers, yaws, strict=True))
        objects_now = [(obj["size"], center, yaw, obj["color"], CATEGORIES[obj["category"]][6])
                       for obj, (center, yaw) in zip(objects, states, strict=True)]
        if linked:
            corners = box_corners(np.array([obj["size"] for obj in objects]).reshape(-1, 3), centers, yaws)
        visible_pixels, silhouette_area = np.zeros(len(objects)), np.zeros(len(objects))
        for channel, (_, _, _, delay_us) in CAMERAS.items():
            sd_timestamp = timestamp + delay_us
            ego_xy, ego_yaw = ego_at(sd_timestamp)
            filename = f"samples/{channel}/{logfile}__{channel}__{sd_timestamp}.jpg"
            path = os.path.join(root, filename)
            if linked and channel in image_source:
                image_source[channel] = link_or_copy(image_source[channel], path)
            else:
                if ground is None:
                    ground = ground_quads(road, -80.0, path_length + 120.0)
                image, pixels, area = render_camera(rig, channel, ego_xy, ego_yaw, ground, objects_now,
                                                    np.random.default_rng([seed, scene_index, k,
                                                                           len(tables["ego_pose"])]))
                write_jpeg(path, image)
                image_source[channel] = path
            if linked:
                pixels, area = count_visible_pixels(count_rig, channel, ego_xy, ego_yaw, corners)
            visible_pixels += pixels
            silhouette_area += area
            sd_token = frame_token(channel, k, 0)
            tables["ego_pose"].append(pose_record(sd_token, sd_timestamp, ego_xy, ego_yaw))
            tables["sample_data"].append({
                "token": sd_token, "sample_token": sample_tokens[k], "ego_pose_token": sd_token,
                "calibrated_sensor_token": calibrated[channel], "timestamp": sd_timestamp, "fileformat": "jpg",
                "is_key_frame": True, "height": height, "width": width, "filename": filename,
                **chain(channel, k, 0)})
            for j in range(1, n_sweeps + 1 if k + 1 < n_samples else 1):
                # Sweeps are evenly spaced between the keyframes; each belongs to the sample nearer in time.
                sweep_timestamp = sd_timestamp + round(j * KEYFRAME_PERIOD_US / (n_sweeps + 1))
                nearer = k if sweep_timestamp - timestamp <= KEYFRAME_PERIOD_US / 2 else k + 1
                sweep_filename = f"sweeps/{channel}/{logfile}__{channel}__{sweep_timestamp}.jpg"
                image_source[channel] = link_or_copy(image_source[channel], os.path.join(root, sweep_filename))
                sweep_token = frame_token(channel, k, j)
                sweep_tables["ego_pose"].append(pose_record(sweep_token, sweep_timestamp, *ego_at(sweep_timestamp)))
                sweep_tables["sample_data"].append({
                    "token": sweep_token, "sample_token": sample_tokens[nearer],
                    "ego_pose_token": sweep_token, "calibrated_sensor_token": calibrated[channel],
                    "timestamp": sweep_timestamp, "fileformat": "jpg", "is_key_frame": False, "height": height,
                    "width": width, "filename": sweep_filename, **chain(channel, k, j)})
        per_sample.append((road.point(ego_speed * t_s, 0.0), states, visible_pixels, silhouette_area))
    for name, records in (*sweep_tables.items(), *lidar_tables.items()):
        tables[name] += records

    # As in nuScenes, an object is annotated only while some sensor sees it: from the first to the last keyframe
    # in which a camera shows at least one pixel of it (an object never seen is not annotated at all).
    for i, obj in enumerate(objects):
        seen = [k for k, (_, _, pixels, _) in enumerate(per_sample) if pixels[i] > 0]
        if not seen:
            continue
        annotated = range(seen[0], seen[-1] + 1)
        for k in annotated:
            ego_xy, states, pixels, area = per_sample[k]
            center, yaw = states[i]
            fraction = pixels[i] / area[i] if area[i] >= 1.0 else 0.0
            distance = float(np.linalg.norm(center[:2] - ego_xy))
            tables["sample_annotation"].append({
                "token": annotation_tokens[i][k], "sample_token": sample_tokens[k],
                "instance_token": instance_tokens[i], "visibility_token": visibility_token(fraction),
                "attribute_tokens": [make_token(seed, "attribute", a) for a in obj["attributes"]],
                "translation": center.tolist(), "size": list(obj["size"]), "rotation": yaw_rotation(yaw),
                "prev": annotation_tokens[i][k - 1] if k > annotated.start else "",
                "next": annotation_tokens[i][k + 1] if k + 1 < annotated.stop else "",
                "num_lidar_pts": int(max(1, 4000 * obj["size"][1] * obj["size"][2] / max(distance, 1.0) ** 2)),
                "num_radar_pts": int(rng.integers(0, 5)) if obj["category"].startswith("vehicle.") else 0})
        tables["instance"].append({"token": instance_tokens[i], "category_token": make_token(seed, obj["category"]),
                                   "nbr_annotations": len(annotated),
                                   "first_annotation_token": annotation_tokens[i][annotated.start],
                                   "last_annotation_token": annotation_tokens[i][annotated.stop - 1]})
    n_objects = len(objects)
    tables["scene"].append({"token": token("scene"), "log_token": log_token, "nbr_samples": n_samples,
                            "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
                            "name": scene_name,
                            "description": f"Synthetic, {location}, ego at {ego_speed:.1f} m/s, {n_objects} objects"})
    return tables


def records_json(records: list) -> str:
    """The records as json.dump(records, f, indent=0) writes them, less the enclosing '[\n' and '\n]' ("" for no
    records): write_table joins such texts into the table's file."""
    return json.dumps(records, indent=0)[2:-2] if records else ""


def write_table(path: str, texts: list) -> None:
    """Write a JSON table from parts made by records_json: the bytes json.dump(all records, f, indent=0) writes."""
    texts = [text for text in texts if text]
    with open(path, "w") as f:
        if not texts:
            f.write("[]")
            return
        f.write("[\n")
        for index, text in enumerate(texts):
            f.write(",\n" + text if index else text)
        f.write("\n]")


def scene_json(job: dict) -> dict:
    """generate_scene's records as texts of records_json ({table name: text}): scene workers encode in parallel."""
    return {name: records_json(records) for name, records in generate_scene(job).items()}


def shared_tables(seed: int, logs: list) -> dict:
    """The tables every scene shares: category, attribute, visibility, sensor and map."""
    maps = {}
    for log in logs:
        maps.setdefault(log["location"], []).append(log["token"])
    return {
        "category": [{"token": make_token(seed, name), "name": name, "description": f"Synthetic {name}",
                      "index": index} for index, name in enumerate(CATEGORIES)],
        "attribute": [{"token": make_token(seed, "attribute", name), "name": name, "description": name}
                      for name in ATTRIBUTES],
        "visibility": [{"token": token, "level": level,
                        "description": f"visibility of whole object is between {level[1:].replace('-', ' and ')}%"}
                       for token, level, _ in VISIBILITY_LEVELS],
        "sensor": [*({"token": make_token(seed, "sensor", channel), "channel": channel, "modality": "camera"}
                     for channel in CAMERAS),
                   {"token": make_token(seed, "sensor", LIDAR_CHANNEL), "channel": LIDAR_CHANNEL, "modality": "lidar"}],
        "map": [{"token": make_token(seed, "map", location), "log_tokens": log_tokens, "category": "semantic_prior",
                 "filename": f"maps/{make_token(seed, 'map', location)}.png"} for location, log_tokens in maps.items()],
    }


def generate(out: str, samples_per_scene: int = 10, width: int = 800, height: int = 450, seed: int = 0,
             num_workers: int | None = None, *, version: str = VERSION, scenes: int | None = None,
             image_mode: str = "rendered", sweeps: bool = False) -> None:
    """Write the embedded dataset to `out` (which must not exist): the scenes of `version` (all, or the first
    `scenes` in sorted name order), `samples_per_scene` keyframes each, images of width x height px rendered or
    linked (`image_mode`, see the module docstring), with camera sweeps if `sweeps`. The dataset is built in a
    temporary folder beside `out` and renamed onto it at the end, so an interrupted run leaves no half-written
    dataset. Raises UserError on bad input before any work."""
    if os.path.exists(out):
        raise UserError(f"--out {out} already exists: remove it or choose another folder")
    if samples_per_scene < 2:
        raise UserError(f"--samples_per_scene {samples_per_scene}: need at least 2 keyframes per scene")
    if not (64 <= width <= 4000 and 64 <= height <= 4000):
        raise UserError(f"--width {width} --height {height}: each must be between 64 and 4000 pixels")
    if version not in VERSIONS:
        raise UserError(f"--version {version}: choose one of {', '.join(VERSIONS)}")
    if image_mode not in IMAGE_MODES:
        raise UserError(f"--image_mode {image_mode}: choose one of {', '.join(IMAGE_MODES)}")
    from nuscenes.utils.splits import create_splits_scenes  # here: see labels.py on the devkit's import time

    splits = create_splits_scenes()
    scene_names = [name for split in VERSIONS[version] for name in splits[split]]
    if scenes is not None and not 1 <= scenes <= len(scene_names):
        raise UserError(f"--scenes {scenes}: {version} has {len(scene_names)} scenes; choose 1 to {len(scene_names)}")
    # A scene keeps its place in the version's list (its seed, date and table position) whichever --scenes selects it.
    selected = set(sorted(scene_names)[:scenes])
    out = os.path.abspath(out)
    remove_killed_generations(out)
    tmp_root = f"{out}.partial-{socket.gethostname()}-{os.getpid()}"
    try:
        for folder in ("samples", "sweeps") if sweeps else ("samples",):
            for channel in CAMERAS:
                os.makedirs(os.path.join(tmp_root, folder, channel))
        os.makedirs(os.path.join(tmp_root, "samples", LIDAR_CHANNEL))
        os.makedirs(os.path.join(tmp_root, "maps"))
        os.makedirs(os.path.join(tmp_root, version))
        jobs = [{"seed": seed, "scene_index": i, "scene_name": name, "width": width, "height": height,
                 "samples_per_scene": samples_per_scene, "root": tmp_root, "image_mode": image_mode,
                 "sweeps": sweeps, "templates": {}} for i, name in enumerate(scene_names) if name in selected]
        # forked (end_with_parent checks the parent's PID; a forkserver's workers have another parent)
        with ProcessPoolExecutor(max_workers=num_workers or os.cpu_count(), initializer=end_with_parent,
                                 initargs=(os.getpid(),), mp_context=multiprocessing.get_context("fork")) as pool:
            per_scene = []  # {table name: JSON text of the scene's records} of each scene
            if image_mode == "linked":  # the first scene renders the templates that all other scenes link to
                per_scene.append(pool.submit(scene_json, jobs[0]).result())
                first_images = json.loads(f"[{per_scene[0]['sample_data']}]")[:len(CAMERAS)]
                templates = {channel: os.path.join(tmp_root, record["filename"])
                             for channel, record in zip(CAMERAS, first_images, strict=True)}
                for job in jobs[1:]:
                    job["templates"] = templates
            per_scene += pool.map(scene_json, jobs[len(per_scene):])
        texts = {name: [scene[name] for scene in per_scene] for name in per_scene[0]}
        shared = shared_tables(seed, json.loads(f"[{','.join(texts['log'])}]"))
        texts.update({name: [records_json(records)] for name, records in shared.items()})
        for name, table_texts in texts.items():
            write_table(os.path.join(tmp_root, version, f"{name}.json"), table_texts)
        for map_record in shared["map"]:
            mask = np.zeros((200, 200), dtype=np.uint8)
            mask[80:120, :] = 255  # a drivable strip: the devkit needs the files; map queries on them mean nothing
            cv2.imwrite(os.path.join(tmp_root, map_record["filename"]), mask)
        os.rename(tmp_root, out)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def remove_killed_generations(out: str) -> None:
    """Remove the temporary folders `<out>.partial-<host>-<pid>` (or `<out>.partial-<pid>`, as older versions named
    them) of generations on this host whose process is gone (killed before its rename; its workers end with it:
    utils.io.end_with_parent), saying so in one line."""
    host = socket.gethostname()
    for folder in glob.glob(f"{glob.escape(out)}.partial-*"):
        owner_host, _, pid = folder.rsplit(".partial-", 1)[1].rpartition("-")
        if owner_host in (host, "") and pid.isdigit() and not process_alive(int(pid)):
            logger.warning("removing %s, left by a generation that was killed, and generating again", folder)
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process of this host has the PID `pid`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to create (must not exist); use it as --dataset_dir")
    parser.add_argument("--version", default=VERSION, choices=list(VERSIONS),
                        help="nuScenes version whose scene names and folder to use: 10 scenes or 850")
    parser.add_argument("--scenes", type=int, default=None,
                        help="only the first N scenes of the version in sorted name order; default: all")
    parser.add_argument("--samples_per_scene", type=int, default=10, help="keyframes per scene (nuScenes: about 40)")
    parser.add_argument("--width", type=int, default=800, help="image width in px (nuScenes: 1600)")
    parser.add_argument("--height", type=int, default=450, help="image height in px (nuScenes: 900)")
    parser.add_argument("--seed", type=int, default=0, help="the dataset is a function of the seed and the sizes")
    parser.add_argument("--image_mode", default="rendered", choices=IMAGE_MODES,
                        help="rendered: every image drawn; linked: one image per camera, every other file a hard "
                             "link to it (scale tests)")
    parser.add_argument("--sweeps", action="store_true",
                        help="also write the cameras' non-keyframes (5 between keyframes, as at 12 Hz) in sweeps/")
    parser.add_argument("--num_workers", type=int, default=None, help="processes rendering scenes; default: all cores")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    start = time.time()
    generate(args.out, args.samples_per_scene, args.width, args.height, args.seed, args.num_workers,
             version=args.version, scenes=args.scenes, image_mode=args.image_mode, sweeps=args.sweeps)
    print(f"wrote the embedded nuScenes {args.version} dataset to {args.out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
