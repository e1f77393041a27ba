"""The second task, BEV vehicle segmentation (--app_mode BEVSeg --model_name LiftBEV): its geometry against the
devkit, the lifting, the IoU metric, a short train.py + test.py run on the embedded dataset, and its bad inputs."""

import json
import os

import numpy as np
import pytest
import shapely
import torch
from nuscenes.utils.geometry_utils import BoxVisibility, view_points
from pyquaternion import Quaternion
from shapely.geometry import Polygon

import helper
import test as test_script
import train
from argumentparser import build_parser
from dataset.NuscenesDataset.labels import load_nuscenes
from dataset.NuscenesDataset.loader_bev_seg import DatasetLoader, grid_shape
from models.LiftBEV.lift_bev import LiftBEV
from models.LiftBEV.loss import SegmentationLoss
from tests.conftest import NORMALIZE, PROJECT_ROOT, data_flags, task_args, task_flags, torchrun
from utils.checkpoint import load_checkpoint
from utils.config import merge_config
from utils.errors import UserError
from utils.segmentation import OccupancyHistogram

BEV_20M = {"x_range_m": [-20.0, 20.0], "y_range_m": [-20.0, 20.0], "cell_m": 1.0}  # 40 x 40 cells
SMALL_MODEL = {"backbone": "resnet18", "pretrained_backbone": False, "freeze_batchnorm": False, "image_channels": 16,
               "heights_m": [0.5, 1.5, 2.5], "bev_channels": 32, "bev_blocks": 1, "threshold": 0.5}


def bev_args(dataset_dir, mode_overrides=None) -> dict:
    """The merged configuration dict the BEV loader reads, at 160x96 input."""
    return task_args("BEVSeg", dataset_dir, os.path.join(os.path.dirname(dataset_dir), "bev_cache"),
                     {"image": {"w": 160, "h": 96}, **(mode_overrides or {})})


# a 40 m x 40 m grid of 1 m cells and a slim model, on top of task_flags' 2 cameras at 96x64
SMALL_BEV_FLAGS = ("--cfg", "data.BEVSeg.bev.x_range_m=[-20.0, 20.0]",
                   "--cfg", "data.BEVSeg.bev.y_range_m=[-20.0, 20.0]", "--cfg", "data.BEVSeg.bev.cell_m=1.0",
                   "--cfg", "model.LiftBEV.image_channels=16", "--cfg", "model.LiftBEV.bev_channels=32",
                   "--cfg", "model.LiftBEV.bev_blocks=1")


def bev_flags(embedded_dir, folder, *extra) -> list:
    """train.py flags of a tiny BEV run."""
    return task_flags("BEVSeg", "LiftBEV", embedded_dir, folder, *SMALL_BEV_FLAGS, *extra)


@pytest.fixture(scope="module")
def test_split(embedded_dir):
    return DatasetLoader(bev_args(embedded_dir), mode="test")


def test_projections_match_the_devkit(test_split, embedded_dir):
    """Each annotation's centre, taken into the BEV frame and through the item's projection, lands where the devkit
    puts it in that camera (get_sample_data: boxes moved through the ego poses at both timestamps)."""
    nusc = load_nuscenes(embedded_dir, "v1.0-mini")
    checked = 0
    for index in range(len(test_split)):
        sample = nusc.get("sample", test_split.sample_tokens[index])
        reference = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["CAM_FRONT"])["ego_pose_token"])
        for camera, projection in zip(test_split.cameras, test_split.projections[index], strict=True):
            record = nusc.get("sample_data", sample["data"][camera])
            _, boxes, intrinsic = nusc.get_sample_data(record["token"], box_vis_level=BoxVisibility.ANY)
            for box in boxes:
                expected = view_points(box.center[:, None], intrinsic, normalize=True)[:2, 0]
                expected *= np.array([160 / record["width"], 96 / record["height"]])
                bev_box = nusc.get_box(box.token)
                bev_box.translate(-np.array(reference["translation"]))
                bev_box.rotate(Quaternion(reference["rotation"]).inverse)
                u, v, depth = projection.double().numpy() @ np.append(bev_box.center, 1.0)
                assert np.allclose([u / depth, v / depth], expected, atol=1e-3)
                checked += 1
    assert checked > 20


def test_targets_are_the_footprints_filled(test_split, embedded_dir):
    """The grid is occupied exactly at the cells whose centres lie inside the footprint (shapely) of a vehicle of a
    kept visibility, taken into the BEV frame (the ego frame at the CAM_FRONT keyframe)."""
    nusc = load_nuscenes(embedded_dir, "v1.0-mini")
    grid = grid_shape(test_split.bev)
    rows, columns = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    x = test_split.bev["x_range_m"][1] - (rows + 0.5) * test_split.bev["cell_m"]
    y = test_split.bev["y_range_m"][1] - (columns + 0.5) * test_split.bev["cell_m"]
    centres = shapely.points(x.ravel(), y.ravel())
    occupied_cells = 0
    for index in range(len(test_split)):
        sample = nusc.get("sample", test_split.sample_tokens[index])
        reference = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["CAM_FRONT"])["ego_pose_token"])
        expected = np.zeros(grid, dtype=bool)
        for token in sample["anns"]:
            annotation = nusc.get("sample_annotation", token)
            if not annotation["category_name"].startswith("vehicle.") or annotation["visibility_token"] == "1":
                continue
            box = nusc.get_box(token)
            box.translate(-np.array(reference["translation"]))
            box.rotate(Quaternion(reference["rotation"]).inverse)
            expected |= shapely.contains(Polygon(box.bottom_corners()[:2].T), centres).reshape(grid)
        target = test_split[index]["target"]
        assert target.shape == (1, *grid) and set(target.unique().tolist()) <= {0.0, 1.0}
        assert np.array_equal(target[0].numpy() > 0, expected)
        occupied_cells += expected.sum()
    assert occupied_cells > 500


def test_lift_reads_the_feature_centred_on_each_point():
    """A camera looking along +x with a stride-8 feature map whose feature k holds k: every BEV cell it sees reads
    the (interpolated) feature centred on the pixel its centre projects to, k = (u - 0.5) / 8 (ResNet's stride-8
    feature k is centred on input pixel 8k, i.e. at 8k + 0.5 with pixel i covering [i, i + 1)); cells behind the
    camera or outside its image read 0."""
    bev = {"x_range_m": [-8.0, 8.0], "y_range_m": [-8.0, 8.0], "cell_m": 1.0}
    model = LiftBEV({**SMALL_MODEL, "heights_m": [1.0]}, (64, 32), bev, grid_shape(bev), 1, 1, NORMALIZE)
    ego_to_camera = np.array([[0.0, -1, 0, 0], [0, 0, -1, 1.0], [1, 0, 0, 0]])  # x forward -> camera z
    intrinsic = np.array([[16.0, 0, 32], [0, 16, 16], [0, 0, 1]])
    projection = torch.tensor(intrinsic @ ego_to_camera, dtype=torch.float32)[None, None]
    feature_index = torch.arange(8, dtype=torch.float32).expand(4, 8)  # (h, w) = (32 / 8, 64 / 8)
    lifted = model.lift(feature_index[None, None].clone(), projection)[0, 0]  # (16, 16)
    x = 8.0 - (torch.arange(16) + 0.5)  # rows: x of the cell centres
    y = 8.0 - (torch.arange(16) + 0.5)
    seen = 0
    for i in range(16):
        for j in range(16):
            u = 32 + 16 * (-y[j]) / x[i]  # v = 16 for every point at the camera's height
            inside = x[i] > 0 and 0 <= u <= 64
            expected = float(min(max((u - 0.5) / 8, 0.0), 7.0)) if inside else 0.0  # border features bound it
            assert lifted[i, j].item() == pytest.approx(expected, abs=1e-4)
            seen += inside
    assert seen > 40


def test_occupancy_histogram_iou_and_curves():
    generator = torch.Generator().manual_seed(0)
    probabilities = torch.rand(3, 2, 20, 20, generator=generator)
    target = (torch.rand(3, 2, 20, 20, generator=generator) < 0.2).float()
    first, second = OccupancyHistogram(2), OccupancyHistogram(2)
    first.update(probabilities[:2], target[:2])
    second.update(probabilities[2:], target[2:])
    first.merge([second])
    predicted, occupied = probabilities >= 0.5, target > 0
    for c in range(2):
        iou = (predicted[:, c] & occupied[:, c]).sum() / (predicted[:, c] | occupied[:, c]).sum()
        assert first.iou(0.5)[c] == pytest.approx(iou.item())
        assert first.iou_all_occupied()[c] == pytest.approx(occupied[:, c].float().mean().item())
    recall, precision = first.precision_recall()
    assert recall[:, 0] == pytest.approx([1.0, 1.0]) and np.all(np.diff(recall, axis=1) <= 0)
    tp = (predicted[:, 0] & occupied[:, 0]).sum().item()
    assert precision[0, 50] == pytest.approx(tp / predicted[:, 0].sum().item())
    assert OccupancyHistogram(1).iou(0.5) == [None]  # nothing true, nothing predicted
    at_boundary = torch.full((1, 1, 1, 1), 0.53)  # float32(0.53) * 100 < 53: bin 52, so not occupied at 0.53
    one_cell = OccupancyHistogram(1)
    one_cell.update(at_boundary, torch.ones(1, 1, 1, 1))
    assert one_cell.iou(0.53) == [float(OccupancyHistogram.occupied(at_boundary, 0.53).item())]


def test_the_model_fits_two_samples(embedded_dir):
    """Model, lifting and loss can learn: 60 steps on two samples (2 cameras, 40 m x 40 m) take their vehicle IoU
    far above the 'all occupied' baseline."""
    torch.manual_seed(0)
    small = {"cameras": ["CAM_FRONT", "CAM_BACK"], "bev": BEV_20M, "image": {"w": 96, "h": 64}}
    dataset = DatasetLoader(bev_args(embedded_dir, small), mode="test")
    model = LiftBEV(SMALL_MODEL, (96, 64), BEV_20M, grid_shape(BEV_20M), 1, 2, NORMALIZE)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1]])
    loss_fn = SegmentationLoss({"pos_weight": 2.0, "dice_weight": 1.0})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = loss_fn(model(batch["images"], batch["projections"]), batch["target"])["total_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    histogram = OccupancyHistogram(1)
    with torch.no_grad():  # batch statistics in BatchNorm: the running ones lag 60 steps behind
        histogram.update(torch.sigmoid(model(batch["images"], batch["projections"])), batch["target"])
    assert histogram.iou(0.5)[0] > 0.5 > 5 * histogram.iou_all_occupied()[0]


def test_train_one_epoch_then_test(train_and_test):
    """train.py and test.py run the task unchanged: checkpoints, metrics, per-sample IoU, curves, drawings."""
    exp = train_and_test("BEVSeg", "LiftBEV", *SMALL_BEV_FLAGS,
                         test_flags=("--visualization", "1", "--cfg", "config.test.visualizations=2"))
    for name in ("best.pt", "last.pt", "metrics.json", "curves.png", "training.log"):
        assert (exp / name).is_file(), name
    metrics = json.loads((exp / "metrics.json").read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and set(metrics["per_class_IoU"]) == {"vehicle"}
    assert 0.0 < metrics["per_class_IoU_all_occupied"]["vehicle"] < 0.2
    state = load_checkpoint(str(exp / "best.pt"))  # weights_only=True
    assert state["best_score"] == pytest.approx(metrics["mIoU"]) and state["history"][0]["mIoU"] == state["best_score"]
    assert "points" not in state["model"]  # derived from the config, not stored

    test_dir = exp / "test"
    test_metrics = json.loads((test_dir / "metrics.json").read_text())
    assert test_metrics["checkpoint"] == "best.pt" and 0.0 <= test_metrics["mIoU"] <= 1.0
    per_sample = json.loads((test_dir / "per_sample_iou.json").read_text())
    assert len(per_sample) == 4 and all(set(row) == {"sample_token", "iou"} for row in per_sample)
    assert (test_dir / "pr_curves" / "vehicle.png").is_file()
    assert sorted(p.name for p in (test_dir / "visualization").iterdir()) == ["sample_0.png", "sample_1.png"]


def test_mixed_precision_step(embedded_dir, tmp_path, monkeypatch):
    """--bool_mixed_precision 1 on the CPU: bf16 autocast for the networks, float32 for the projections and the
    feature sampling (a bf16 pixel coordinate would be off by up to a pixel at 320 px), finite float32 losses."""
    flags = build_parser().parse_args(bev_flags(embedded_dir, tmp_path, "--bool_mixed_precision", "1"))
    args = merge_config(vars(flags), str(PROJECT_ROOT / "config"))
    dataset, loader = helper.load_datasetloader(args, 1, 0, "train")
    solver = helper.load_solver(args, device=torch.device("cpu"), class_names=dataset.class_names, steps_per_epoch=1)
    assert solver.amp_dtype == torch.bfloat16
    sampled_dtypes, grid_sample = [], torch.nn.functional.grid_sample

    def recording_grid_sample(features, grid, **kwargs):
        sampled_dtypes.append((features.dtype, grid.dtype))
        return grid_sample(features, grid, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", recording_grid_sample)
    losses = solver.train(next(iter(loader)))
    assert sampled_dtypes == [(torch.float32, torch.float32)]
    assert set(losses) == {"bce_loss", "dice_loss", "total_loss"} and all(torch.isfinite(v) for v in losses.values())


def test_ddp_training_and_evaluation(embedded_dir, tmp_path):
    """Two processes under torchrun (gloo) train an epoch; their test.py --ddp 1 gives exactly the metrics and
    per-sample IoUs of one process (the histograms are integer counts)."""
    torchrun("train.py", "--ddp", "1", *bev_flags(embedded_dir, tmp_path, "--batch_size", "2"))
    exp = tmp_path / "exp"
    assert {"best.pt", "last.pt", "metrics.json"} <= set(os.listdir(exp))
    test_flags = ["--app_mode", "BEVSeg", "--model_name", "LiftBEV", "--save_dir", str(exp), "--num_cores", "0",
                  "--batch_size", "1", *data_flags(embedded_dir, "BEVSeg")]
    torchrun("test.py", "--ddp", "1", *test_flags)
    two = json.loads((exp / "test" / "metrics.json").read_text())
    two_samples = json.loads((exp / "test" / "per_sample_iou.json").read_text())
    test_script.main(test_flags)
    assert json.loads((exp / "test" / "metrics.json").read_text()) == two
    one_samples = json.loads((exp / "test" / "per_sample_iou.json").read_text())
    assert len(one_samples) == 4
    assert sorted(two_samples, key=lambda row: row["sample_token"]) == sorted(one_samples,
                                                                              key=lambda row: row["sample_token"])


@pytest.mark.parametrize("extra, message", [
    (["--model_name", "Yolo"], "--model_name Yolo is for --app_mode 2DObjDet, not BEVSeg: use --model_name LiftBEV"),
    (["--cfg", "data.BEVSeg.bev.cell_m=0.7"], "x_range_m [-20.0, 20.0] must be [low, high] with high > low, a whole"),
    (["--cfg", "data.BEVSeg.bev.x_range_m=[-20.0, 21.0]"], "BEV grid 41x40 cells"),
    (["--cfg", "data.BEVSeg.ego_pose_channel=RADAR_FRONT"], "has no RADAR_FRONT data: set 'ego_pose_channel'"),
    (["--cfg", "model.LiftBEV.threshold=0.555"], "LiftBEV.threshold = 0.555 in config/model.json (or --cfg "
                                                 "model.LiftBEV.threshold=...): must be a multiple of 0.01"),
])
def test_bad_bev_settings_are_one_line(embedded_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as stop:
        train.main(bev_flags(embedded_dir, tmp_path, *extra))
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_loader_rejects_a_grid_that_is_not_whole_cells(embedded_dir):
    with pytest.raises(UserError, match="cell_m 0.0 must be > 0"):
        DatasetLoader(bev_args(embedded_dir, {"bev": {**BEV_20M, "cell_m": 0.0}}), mode="test")
