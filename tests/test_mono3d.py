"""Camera 3D detection (--app_mode 3DObjDet --model_name Mono3D): the embedded dataset's LIDAR_TOP keyframes, the
devkit's scores of known answers, the loader's geometry, the model's fit, exact resume, DDP evaluation, predict.py
and the ONNX export."""

import glob
import hashlib
import json
import os
import shutil
import signal
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from nuscenes.eval.common.loaders import add_center_dist, filter_eval_boxes, load_gt
from nuscenes.eval.detection.config import config_factory
from nuscenes.eval.detection.constants import ATTRIBUTE_NAMES as DEVKIT_ATTRIBUTE_NAMES
from nuscenes.eval.detection.data_classes import DetectionBox
from nuscenes.eval.detection.evaluate import DetectionEval
from pyquaternion import Quaternion

import export
import predict
import test as test_script
import train
from dataset.NuscenesDataset import synthetic
from dataset.NuscenesDataset.detection_eval import NuscenesDetectionScore, ground_truth_submission, split_sample_tokens
from dataset.NuscenesDataset.labels import DETECTION_NAMES, label_arrays, load_nuscenes
from dataset.NuscenesDataset.loader_3d_obj_det import ATTRIBUTE_NAMES, TARGET_COLUMNS, DatasetLoader, labels_3d
from dataset.NuscenesDataset.loader_bev_seg import bev_samples
from models.Mono3D.boxes3d import decode_boxes, lift_boxes
from models.Mono3D.mono3d import scores
from optimization.Mono3D_solver import Solver
from tests.conftest import data_flags, launch, state_tensors, task_args, task_flags, torchrun
from tests.signal_at_step import load_solver_that_signals
from utils.checkpoint import load_checkpoint

COLUMN = {name: index for index, name in enumerate(TARGET_COLUMNS)}
# sha256 of the small embedded dataset's camera images, and of its 2D label and BEV arrays of both splits, as the
# generator wrote them before it wrote LIDAR_TOP keyframes (tests/conftest.py SMALL; /tmp digest of commit 0ed807a)
IMAGES_BEFORE_LIDAR = "7d59146eb97cab7d50973366bf461d6c7c2a91a88b1ee81992e930b84175e014"
LABELS_BEFORE_LIDAR = "f89d36df7f287f296d551eca2dcfae1dfe47ef85a9c04c202221345daf34f66a"


def flags_3d(embedded_dir, folder, *extra) -> list:
    """A tiny train.py run of the 3D task (task_flags: 2 cameras at 96x64, 1 epoch), slim head."""
    return [*task_flags("3DObjDet", "Mono3D", embedded_dir, folder), "--cfg", "model.Mono3D.head_channels=16",
            *extra]


def eval_flags(embedded_dir, exp, *extra) -> list:
    return ["--app_mode", "3DObjDet", "--model_name", "Mono3D", "--save_dir", str(exp), "--num_cores", "0",
            *data_flags(embedded_dir, "3DObjDet"), *extra]


@pytest.fixture(scope="module")
def trained_3d(embedded_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mono3d")
    train.main(flags_3d(embedded_dir, folder))
    return folder / "exp"


def test_lidar_keyframes_leave_the_images_2d_labels_and_bev_unchanged(embedded_dir, tmp_path):
    """The LIDAR_TOP records come after the cameras' (whose image noise is seeded by their count), so the camera
    images, the 2D labels and the BEV task are byte for byte what they were before them."""
    images = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(embedded_dir, "samples", "CAM_*", "*.jpg"))):
        with open(path, "rb") as f:
            images.update(f.read())
    with open(synthetic.__file__.replace("synthetic.py", "../../config/data.json")) as f:
        cfg = json.load(f)
    labels = hashlib.sha256()
    for split in ("mini_train", "mini_val"):
        arrays = label_arrays(embedded_dir, "v1.0-mini", split, cfg["2DObjDet"]["labels"], str(tmp_path))[1]
        arrays.update({f"bev_{key}": value for key, value in
                       bev_samples(embedded_dir, "v1.0-mini", split, cfg["BEVSeg"], str(tmp_path)).items()})
        for key in sorted(arrays):
            if not key.endswith("dstorch_cache_key"):
                labels.update(key.encode())
                labels.update(np.ascontiguousarray(arrays[key]).tobytes())
    assert (images.hexdigest(), labels.hexdigest()) == (IMAGES_BEFORE_LIDAR, LABELS_BEFORE_LIDAR)

    nusc = load_nuscenes(embedded_dir, "v1.0-mini")
    for sample in nusc.sample:
        lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
        assert lidar["sensor_modality"] == "lidar" and lidar["timestamp"] == sample["timestamp"]
        assert nusc.get("ego_pose", lidar["ego_pose_token"])["timestamp"] == sample["timestamp"]
        assert os.path.isfile(os.path.join(embedded_dir, lidar["filename"]))


def test_the_ground_truth_scores_1_and_a_1_m_shift_a_translation_error_of_1_m(tmp_path):
    """Through the devkit's DetectionEval (as the solver calls it), on a trainval-shaped dataset whose val scenes
    hold every class: the ground truth scores NDS 1, mAP 1 and zero errors; moved 1 m it matches at the 2 and 4 m
    thresholds only (mAP about 0.5) with a translation error of 1 m; scored on some samples only, the ground truth still
    scores 1."""
    root = str(tmp_path / "trainval")
    synthetic.generate(root, samples_per_scene=3, width=320, height=180, version="v1.0-trainval", scenes=40,
                       image_mode="linked")
    score = NuscenesDetectionScore(root, "v1.0-trainval", "val")
    tokens = score.split_tokens()
    truth, _ = score(ground_truth_submission(score.nusc, "val"), tokens)
    assert truth["NDS"] == pytest.approx(1.0) and truth["mAP"] == pytest.approx(1.0)
    assert all(truth[name] == pytest.approx(0.0, abs=1e-9) for name in ("mATE", "mASE", "mAOE", "mAVE", "mAAE"))
    assert set(truth["per_class_AP"]) == set(DETECTION_NAMES)
    shifted, curves = score(ground_truth_submission(score.nusc, "val", shift_m=1.0), tokens)
    # mAP about 0.5: a box moved across its class's range edge is filtered out, or in, alone
    assert shifted["mATE"] == pytest.approx(1.0, abs=1e-6) and shifted["mAP"] == pytest.approx(0.5, abs=0.02)
    assert len(curves["car"][0]) == 101
    some, _ = score(ground_truth_submission(score.nusc, "val"), tokens[:len(tokens) // 2])
    assert some["mAP"] == pytest.approx(1.0)


def test_mini_val_ground_truth_scores_ap_1_for_each_class_it_holds(embedded_dir):
    """The embedded mini_val's ground truth: AP 1 for every class it holds within the devkit's class ranges, 0 for
    the others (it has no bus within 50 m of the ego car), so mAP = the share of classes held."""
    nusc = load_nuscenes(embedded_dir, "v1.0-mini")
    config = config_factory("detection_cvpr_2019")
    held = add_center_dist(nusc, load_gt(nusc, "mini_val", DetectionBox))
    held = {box.detection_name for box in filter_eval_boxes(nusc, held, config.class_range).all}
    score = NuscenesDetectionScore(embedded_dir, "v1.0-mini", "mini_val")
    metrics, _ = score(ground_truth_submission(load_nuscenes(embedded_dir, "v1.0-mini"), "mini_val"),
                       score.split_tokens())
    assert {name for name, ap in metrics["per_class_AP"].items() if ap == pytest.approx(1.0)} == held
    assert metrics["mAP"] == pytest.approx(len(held) / 10) and len(held) >= 8


def test_attribute_names_are_the_devkits():
    assert tuple(DEVKIT_ATTRIBUTE_NAMES) == ATTRIBUTE_NAMES


def test_3d_to_image_to_3d_round_trip(embedded_dir, tmp_path):
    """The loader's targets (projected centre, depth, observation angle, in input px of the scaled intrinsics)
    lifted back by the decoder's lift_boxes land on the annotations' global centres within 1e-4 m, with their yaw,
    and the velocity turns back into the devkit's."""
    args = task_args("3DObjDet", embedded_dir, tmp_path, {"image": {"w": 192, "h": 96}})
    dataset = DatasetLoader(args, mode="test")
    labels = labels_3d(dataset.dataroot, "v1.0-mini", "mini_val", args["data"]["3DObjDet"], str(tmp_path))
    nusc = load_nuscenes(embedded_dir, "v1.0-mini")
    image = torch.repeat_interleave(torch.arange(len(dataset.box_start) - 1),
                                    torch.from_numpy(np.diff(dataset.box_start)))
    targets = dataset.targets
    assert len(targets) == len(labels["box_token"]) > 50
    center, yaw = lift_boxes(targets[:, [COLUMN["u"], COLUMN["v"]]], targets[:, COLUMN["depth"]],
                             targets[:, COLUMN["alpha"]], dataset.intrinsics.flatten(0, 1)[image],
                             dataset.cam_to_global.flatten(0, 1)[image])
    annotations = [nusc.get("sample_annotation", token.decode()) for token in labels["box_token"]]
    truth = np.array([annotation["translation"] for annotation in annotations])
    np.testing.assert_allclose(center.numpy(), truth, atol=1e-4, rtol=0)  # float32 pixels at 192x96
    truth_yaw = np.array([Quaternion(annotation["rotation"]).yaw_pitch_roll[0] for annotation in annotations])
    np.testing.assert_allclose(np.angle(np.exp(1j * (yaw.numpy() - truth_yaw))), 0, atol=1e-5)
    velocity = targets[:, [COLUMN["vx"], COLUMN["vz"]]].double()
    rotation = dataset.cam_to_global.flatten(0, 1)[image][:, :3, :3]
    turned = (rotation[:, :, [0, 2]] @ velocity[:, :, None])[:, :2, 0].numpy()
    devkit = np.array([nusc.box_velocity(annotation["token"])[:2] for annotation in annotations])
    known = ~np.isnan(devkit).any(1)
    assert known.sum() > 10 and np.isnan(velocity.numpy()[~known]).all()
    np.testing.assert_allclose(turned[known], devkit[known], atol=1e-4)


def test_a_flipped_camera_is_the_same_scene_mirrored(embedded_dir, tmp_path):
    """With hflip_prob 1 every camera image is mirrored and its labels, intrinsics and pose with it: its boxes lift
    to the same global centres and yaws as the unflipped item's, the velocity turns into the same global one, and the
    2D boxes are mirrored; with 0.5 some cameras are flipped and some not."""
    no_jitter = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}
    args = task_args("3DObjDet", embedded_dir, tmp_path, {"image": {"w": 192, "h": 96},
                                                          "augmentation": {**no_jitter, "hflip_prob": 1.0}})
    plain = DatasetLoader(args, mode="train")[3]
    flipped = DatasetLoader({**args, "bool_apply_img_aug": 1}, mode="train")[3]
    assert torch.equal(flipped["images"], plain["images"].flip(-1)) and len(plain["targets"]) > 5

    def lifted(item):
        image = torch.repeat_interleave(torch.arange(len(item["counts"])), item["counts"])
        targets = item["targets"]
        center, yaw = lift_boxes(targets[:, [COLUMN["u"], COLUMN["v"]]], targets[:, COLUMN["depth"]],
                                 targets[:, COLUMN["alpha"]], item["intrinsics"][image], item["cam_to_global"][image])
        velocity = targets[:, [COLUMN["vx"], COLUMN["vz"]]].double()
        turned = (item["cam_to_global"][image][:, :3][:, :, [0, 2]] @ velocity[:, :, None])[..., 0]
        return center, yaw, turned

    (center, yaw, velocity), (flipped_center, flipped_yaw, flipped_velocity) = lifted(plain), lifted(flipped)
    np.testing.assert_allclose(flipped_center.numpy(), center.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.angle(np.exp(1j * (flipped_yaw - yaw).numpy())), 0, atol=1e-5)
    assert not velocity.isnan().all()
    np.testing.assert_allclose(flipped_velocity.numpy(), velocity.numpy(), atol=1e-5)  # NaN where unknown in both
    mirrored = 192 - plain["targets"][:, [COLUMN["x2"], COLUMN["x1"]]]
    assert torch.allclose(flipped["targets"][:, [COLUMN["x1"], COLUMN["x2"]]], mirrored)
    unchanged = [COLUMN[name] for name in ("v", "depth", "w", "l", "h", "attribute", "class", "y1", "y2")]
    assert torch.equal(flipped["targets"][:, unchanged], plain["targets"][:, unchanged])

    args["data"]["3DObjDet"]["augmentation"]["hflip_prob"] = 0.5
    torch.manual_seed(0)
    half = DatasetLoader({**args, "bool_apply_img_aug": 1}, mode="train")[3]["images"]
    same = [torch.equal(half[k], plain["images"][k]) for k in range(len(half))]
    assert any(same) and not all(same)


def test_the_model_fits_a_sample(embedded_dir, tmp_path):
    """200 steps on one sample's front and back cameras at 256x128: the loss falls 10-fold, and every box at least
    16 px long in the image is found again with its class, within 1 m or 5 % of its depth of its centre (global
    frame) and within 0.1 rad of its yaw."""
    args = task_args("3DObjDet", embedded_dir, tmp_path, {"image": {"w": 256, "h": 128},
                                                           "cameras": ["CAM_FRONT", "CAM_BACK"]})
    args.update({"optimizer_type": "adamw", "learning_rate": 2e-3, "weight_decay": 0.0, "grad_clip": 10.0,
                 "apply_lr_scheduling": 0, "num_epochs": 1, "bool_mixed_precision": 0, "bool_find_unused_params": 0,
                 "model_name": "Mono3D", "lr_schd_type": "OnecycleLR"})
    args["config"]["solver"]["ema"] = False
    args["model"]["Mono3D"]["head_channels"] = 32
    torch.manual_seed(0)
    dataset = DatasetLoader(args, mode="test")
    batch = dataset.collate_fn([dataset[0]])
    solver = Solver(args, torch.device("cpu"), dataset.class_names, steps_per_epoch=1)
    solver.mode_selection(True)
    first = solver.train(batch)
    for _ in range(200):
        last = solver.train(batch)
    assert last["total_loss"] < 0.1 * first["total_loss"]

    found = solver.batch_boxes(solver.evaluated_model(), batch)
    confident = found["score"] > 0.3
    targets, image = batch["targets"][batch["target_valid"]], batch["target_valid"].nonzero()[:, 0]
    center, yaw = lift_boxes(targets[:, :2], targets[:, COLUMN["depth"]], targets[:, COLUMN["alpha"]],
                             batch["intrinsics"].flatten(0, 1)[image], batch["cam_to_global"].flatten(0, 1)[image])
    large = torch.maximum(targets[:, COLUMN["x2"]] - targets[:, COLUMN["x1"]],
                          targets[:, COLUMN["y2"]] - targets[:, COLUMN["y1"]]) >= 16
    same_class = targets[:, COLUMN["class"], None].long() == found["label"][confident][None]
    distance = torch.where(same_class, torch.cdist(center[:, :2], found["center"][confident, :2]), torch.inf)
    nearest = distance.min(1)
    assert large.sum() >= 4
    assert (nearest.values[large] < torch.maximum(torch.tensor(1.0), 0.05 * targets[large, COLUMN["depth"]])).all()
    yaw_error = torch.angle(torch.exp(1j * (found["yaw"][confident][nearest.indices] - yaw)))
    assert (yaw_error[large].abs() < 0.1).all()


def test_train_one_epoch_then_test(trained_3d, embedded_dir):
    """train.py then test.py --visualization 1: metrics.json has NDS first and the devkit's metrics; results_nusc.json
    holds every mini_val sample; the devkit, run on that file by itself, gives the same NDS and mAP."""
    exp = trained_3d
    test_script.main(eval_flags(embedded_dir, exp, "--visualization", "1", "--cfg",
                                "model.Mono3D.postprocess.score_threshold=0.0"))
    metrics = json.loads((exp / "test" / "metrics.json").read_text())
    assert list(Solver.metric_names) == ["NDS", "mAP", "mATE", "mASE", "mAOE", "mAVE", "mAAE"]
    assert all(name in metrics for name in Solver.metric_names) and set(metrics["per_class_AP"]) == set(DETECTION_NAMES)
    results = json.loads((exp / "test" / "results_nusc.json").read_text())
    nusc = load_nuscenes(embedded_dir, "v1.0-mini")
    assert set(results["results"]) == set(split_sample_tokens(nusc, "mini_val"))
    assert 0 < max(map(len, results["results"].values())) <= 500
    evaluation = DetectionEval(nusc, config_factory("detection_cvpr_2019"), str(exp / "test" / "results_nusc.json"),
                               "mini_val", str(exp / "devkit"), verbose=False)
    devkit = evaluation.evaluate()[0].serialize()
    assert (devkit["nd_score"], devkit["mean_ap"]) == (metrics["NDS"], metrics["mAP"])
    assert (exp / "test" / "visualization" / "sample_0.png").is_file()
    assert (exp / "test" / "pr_curves" / "car.png").is_file()


def test_ddp_evaluation_equals_one_process(trained_3d, embedded_dir):
    """test.py --ddp 1 with two processes (gloo) writes the metrics and the results of one process (both with one
    thread per process, so that the convolutions add up in the same order)."""
    exp = trained_3d
    flags = eval_flags(embedded_dir, exp, "--batch_size", "1", "--cfg", "model.Mono3D.postprocess.score_threshold=0.0")
    torchrun("test.py", "--ddp", "1", *flags)
    two = [json.loads((exp / "test" / name).read_text()) for name in ("metrics.json", "results_nusc.json")]
    launch([sys.executable, "test.py", *flags])
    one = [json.loads((exp / "test" / name).read_text()) for name in ("metrics.json", "results_nusc.json")]
    assert sum(map(len, one[1]["results"].values())) > 100 and one == two


def test_a_run_stopped_mid_epoch_resumes_exactly(embedded_dir, tmp_path, monkeypatch):
    """Two epochs of 3 steps straight, and the same run stopped (Ctrl-C) after step 4 then resumed: the same losses
    and weights."""
    train.main(flags_3d(embedded_dir, tmp_path / "a", "--num_epochs", "2"))
    real_load_solver = train.helper.load_solver
    monkeypatch.setattr(train.helper, "load_solver", load_solver_that_signals(real_load_solver, 4, signal.SIGINT))
    with pytest.raises(SystemExit):
        train.main(flags_3d(embedded_dir, tmp_path / "b", "--num_epochs", "2"))
    monkeypatch.setattr(train.helper, "load_solver", real_load_solver)
    train.main(flags_3d(embedded_dir, tmp_path / "b", "--num_epochs", "2", "--load_pretrained", "1"))
    straight, straight_tensors = state_tensors(str(tmp_path / "a" / "exp" / "last.pt"))
    resumed, resumed_tensors = state_tensors(str(tmp_path / "b" / "exp" / "last.pt"))
    assert [row["total_loss"] for row in resumed["history"]] == [row["total_loss"] for row in straight["history"]]
    for name, tensor in straight_tensors.items():
        assert torch.equal(tensor, resumed_tensors[name]), name


def test_predict_on_sample_tokens_and_plain_images_are_one_line(trained_3d, embedded_dir, tmp_path, capsys):
    """Sample tokens: each camera's 3D boxes in the global frame, those of test.py's results for the sample, with
    their corners in the image; a plain image (no intrinsics, no pose) is one line before any work."""
    exp = tmp_path / "exp"
    shutil.copytree(trained_3d, exp)
    nusc = load_nuscenes(embedded_dir, "v1.0-mini")
    token = split_sample_tokens(nusc, "mini_val")[0]
    (tmp_path / "tokens.txt").write_text(f"{token}\n")
    predict.main(["--save_dir", str(exp), *data_flags(embedded_dir, "3DObjDet"), "--source",
                  str(tmp_path / "tokens.txt"), "--score_threshold", "0.0", "--save_images", "1"])
    entries = json.loads((exp / "predict" / "1" / "predictions.json").read_text())
    assert [(entry["sample_token"], entry["camera"]) for entry in entries] == [(token, "CAM_FRONT"),
                                                                               (token, "CAM_BACK")]
    boxes = [box for entry in entries for box in entry["boxes_3d"]]
    assert boxes and all(len(corners) == 8 for entry in entries for corners in entry["corners"])
    test_script.main(eval_flags(embedded_dir, exp, "--cfg", "model.Mono3D.postprocess.score_threshold=0.0"))
    results = json.loads((exp / "test" / "results_nusc.json").read_text())["results"][token]
    key = lambda box: (box["detection_name"], round(box["detection_score"], 5))  # noqa: E731
    assert sorted(map(key, boxes)) == sorted(map(key, results))
    assert (exp / "predict" / "1" / "images" / f"{token}.jpg").is_file()

    image = glob.glob(os.path.join(embedded_dir, "samples", "CAM_FRONT", "*.jpg"))[0]
    with pytest.raises(SystemExit) as failed:
        predict.main(["--save_dir", str(exp), *data_flags(embedded_dir, "3DObjDet"), "--source", image])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert failed.value.code == 2 and "predicts on dataset samples only" in error and "sample tokens" in error
    assert sorted(os.listdir(exp / "predict")) == ["1"]  # no run folder for the refused one


def test_onnx_export_of_the_dense_outputs(trained_3d, embedded_dir, tmp_path):
    """ONNX Runtime on the CPU against the EMA model: scores within 1e-5, regression within 1e-4, the same boxes
    after decode_boxes."""
    exp = tmp_path / "exp"
    shutil.copytree(trained_3d, exp)
    export.main(["--save_dir", str(exp)])
    state = load_checkpoint(str(exp / "best.pt"))
    dataset = DatasetLoader({**state["config"], "dataset_dir": embedded_dir}, mode="test")
    solver = Solver(state["config"], torch.device("cpu"), dataset.class_names, steps_per_epoch=0)
    solver.load_weights(state)
    item = dataset[0]
    with torch.no_grad():
        outputs = solver.evaluated_model()(item["images"][None])
    onnx_scores, onnx_regression, points, strides = onnxruntime.InferenceSession(
        str(exp / "export" / "best.onnx"), providers=["CPUExecutionProvider"]).run(
        ["scores", "regression", "points", "strides"], {"images": item["images"].numpy()})
    np.testing.assert_allclose(onnx_scores, scores(outputs).numpy(), atol=1e-5)
    np.testing.assert_allclose(onnx_regression, outputs["regression"].numpy(), atol=1e-4)
    decoded = [decode_boxes(torch.from_numpy(s), torch.from_numpy(r), torch.from_numpy(points),
                            torch.from_numpy(strides), item["intrinsics"], item["cam_to_global"],
                            solver.allowed_attributes, 0.0, 50) for s, r in
               ((onnx_scores, onnx_regression), (scores(outputs).numpy(), outputs["regression"].numpy()))]
    assert torch.equal(decoded[0]["label"], decoded[1]["label"])
    torch.testing.assert_close(decoded[0]["center"], decoded[1]["center"], atol=1e-3, rtol=0)


@pytest.mark.parametrize("extra, message", [
    (["--model_name", "Yolo"], "--model_name Yolo is for --app_mode 2DObjDet, not 3DObjDet: use --model_name Mono3D"),
    (["--cfg", "model.Mono3D.postprocess.max_detections=600"], "max_detections = 600 in config/model.json"),
    (["--cfg", "loss.Mono3D.size_ranges=[[0, 64]]"], "3 [low, high] box-size ranges in px"),
    (["--cfg", 'data.3DObjDet.cameras=["CAM_FRONT", "LIDAR_TOP"]'], "have no LIDAR_TOP image"),
])
def test_bad_3d_settings_are_one_line(embedded_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as failed:
        train.main([*flags_3d(embedded_dir, tmp_path), *extra])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert failed.value.code == 2 and error.startswith("error: ") and message in error, error
