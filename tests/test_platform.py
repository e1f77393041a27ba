"""The platform end to end: train.py and test.py, exact resume, Ctrl-C, non-finite losses, checkpoints,
configuration merging and every bad input promised to be rejected before heavy work."""

import csv
import json
import logging
import multiprocessing
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import helper
import test as test_script
import train
from argumentparser import build_parser
from dataset.NuscenesDataset.collate_2d import padded_targets
from models.Yolo.aligned_loss import AlignedDetectionLoss
from optimization.base import BaseSolver
from tests.conftest import PROJECT_ROOT, data_flags, state_tensors, tiny_flags
from tests.signal_at_step import load_solver_that_signals
from utils.checkpoint import load_checkpoint
from utils.config import load_json, merge_config
from utils.errors import UserError
from utils.experiment import setup_logging
from utils.optim import build_optimizer, build_scheduler
from utils.run_record import TrainingRecord


@pytest.fixture
def tiny_run(embedded_dir, tmp_path):
    return lambda exp_dir="exp", *extra: tiny_flags(embedded_dir, tmp_path, exp_dir, *extra)


def test_train_then_test_end_to_end(trained_copy, embedded_dir):
    exp, _ = trained_copy
    for name in ("best.pt", "last.pt", "config.json", "training.log", "curves.png", "metrics.json", "results.csv"):
        assert (exp / name).is_file(), name
    assert not (exp / "detections.json").exists()  # validation writes metrics; per-detection files are test.py's
    events = EventAccumulator(str(exp / "tensorboard")).Reload()
    logged_steps = [event.step for event in events.Scalars("train_step/total_loss")]
    assert logged_steps == [2, 3, 4, 6]  # every 2 steps, and at the end of each epoch of 3 steps
    assert [event.step for event in events.Scalars("val/mAP")] == [1, 2] and "config" in events.Tags()["tensors"][0]
    with open(exp / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert {"lr", "total_loss", "mAP", "AP50", "time_s", "img_per_s"} <= set(rows[0])
    assert float(rows[1]["img_per_s"]) > 0
    assert float(rows[1]["mAP"]) == json.loads((exp / "metrics.json").read_text())["mAP"]
    metrics = json.loads((exp / "metrics.json").read_text())
    assert {"mAP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "per_class_AP"} <= set(metrics)
    config = json.loads((exp / "config.json").read_text())
    assert config["model"]["Yolo"]["fpn_channels"] == 32 and config["num_epochs"] == 2
    log = (exp / "training.log").read_text()
    assert "epoch 2/2:" in log and "GFLOPs per image" in log
    assert "Average Precision" not in log  # the COCO evaluator's table stays out

    state = torch.load(exp / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["history"]) == 2 and state["config"]["exp_id"] == 0
    assert {"model", "ema", "optimizer", "scheduler", "scaler", "rng", "global_step", "best_score"} <= set(state)

    test_script.main(["--save_dir", str(exp), *data_flags(embedded_dir), "--num_cores", "0", "--visualization", "1"])
    test_dir = exp / "test"
    test_metrics = json.loads((test_dir / "metrics.json").read_text())
    assert test_metrics["checkpoint"] == "best.pt" and "per_class_AP" in test_metrics
    detections = json.loads((test_dir / "detections.json").read_text())
    assert detections and all({"image_id", "category_id", "bbox", "score"} == set(d) for d in detections)
    assert len(os.listdir(test_dir / "pr_curves")) == 10
    assert sorted(os.listdir(test_dir / "visualization"))[0] == "sample_0.png"

    test_script.main(["--save_dir", str(exp), *data_flags(embedded_dir), "--num_cores", "0", "--is_test_all", "1"])
    assert (test_dir / "best" / "metrics.json").is_file() and (test_dir / "last" / "metrics.json").is_file()
    with open(test_dir / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [row["checkpoint"] for row in summary] == ["best.pt", "last.pt"] and summary[1]["epoch"] == "2"
    assert float(summary[1]["mAP"]) == json.loads((test_dir / "last" / "metrics.json").read_text())["mAP"]


def test_a_run_that_decodes_on_the_device_trains_tests_and_draws(tiny_run, tmp_path, embedded_dir):
    """data.json "decode": "device" end to end on the CPU: a persistent worker sends JPEG files and augmentation
    parameters, the solver decodes and augments them (train, validation, test, the drawings of test.py)."""
    flags = tiny_run("exp", "--num_epochs", "1", "--num_cores", "1", "--cfg", "data.2DObjDet.decode=device")
    train.main(flags)
    exp = tmp_path / "exp"
    assert "epoch 1/1:" in (exp / "training.log").read_text()
    assert "mAP" in json.loads((exp / "metrics.json").read_text())
    test_script.main(["--save_dir", str(exp), *data_flags(embedded_dir), "--num_cores", "0", "--visualization", "1"])
    assert (exp / "test" / "visualization" / "sample_0.png").is_file()


@pytest.mark.parametrize("num_cores, stop_after_step, stopped_at", [("0", 4, (1, 1)), ("1", 5, (1, 2))],
                         ids=["mid_epoch_no_workers", "mid_epoch_one_persistent_worker"])
def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tiny_run, tmp_path, monkeypatch, num_cores,
                                                                 stop_after_step, stopped_at):
    """Ctrl-C saves last.pt and exits; resuming gives the same per-epoch losses and the same final weights as a
    run that was never stopped (CPU, fixed seed, augmentation on), with or without (persistent) worker processes:
    each item's augmentation is seeded from (seed, epoch, index). Each epoch has 3 steps of 4 samples."""
    train.main(tiny_run("straight", "--num_cores", num_cores))
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the shell started the tests in the background

    real_load_solver = train.helper.load_solver
    monkeypatch.setattr(train.helper, "load_solver",
                        load_solver_that_signals(real_load_solver, stop_after_step, signal.SIGINT))
    threads_before = set(threading.enumerate())
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_run("stopped", "--num_cores", num_cores))
    assert stopped.value.code == 128 + signal.SIGINT
    interrupted = load_checkpoint(str(tmp_path / "stopped" / "last.pt"))
    assert (interrupted["epoch"], interrupted["step_in_epoch"]) == stopped_at
    assert "resume with: python train.py" in (tmp_path / "stopped" / "training.log").read_text()
    assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
    assert not multiprocessing.active_children()  # the worker stopped with the run, though `stopped` holds its frames
    assert not [thread for thread in set(threading.enumerate()) - threads_before
                if "tensorboard" in type(thread).__module__]  # the TensorBoard writer closed
    monkeypatch.setattr(train.helper, "load_solver", real_load_solver)

    train.main(tiny_run("stopped", "--num_cores", num_cores, "--load_pretrained", "1"))
    straight, straight_tensors = state_tensors(str(tmp_path / "straight" / "last.pt"))
    resumed, resumed_tensors = state_tensors(str(tmp_path / "stopped" / "last.pt"))
    assert [row["total_loss"] for row in resumed["history"]] == [row["total_loss"] for row in straight["history"]]
    with open(tmp_path / "stopped" / "results.csv") as f:  # rewritten from the history: no row lost or doubled
        rows = list(csv.DictReader(f))
    assert [(int(row["epoch"]), float(row["total_loss"])) for row in rows] == [
        (row["epoch"], row["total_loss"]) for row in straight["history"]]
    assert [row["mAP"] for row in resumed["history"]] == [row["mAP"] for row in straight["history"]]
    for name, tensor in straight_tensors.items():
        assert torch.equal(tensor, resumed_tensors[name]), name


def test_resume_may_train_longer(trained_copy):
    exp, flags = trained_copy
    train.main(flags("--load_pretrained", "1", "--num_epochs", "3"))
    state = load_checkpoint(str(exp / "last.pt"))
    assert state["epoch"] == 3 and [row["epoch"] for row in state["history"]] == [1, 2, 3]
    assert state["best_score"] == max(row["mAP"] for row in state["history"])
    assert "rebuilt for 3 epochs" in (exp / "training.log").read_text()


def test_resume_with_a_doubled_batch_sees_each_sample_once(tiny_run, tmp_path, monkeypatch):
    """Stopped after 2 of the 6 steps of 2 samples of epoch 1, resumed with 4 samples per step: the 8 samples left
    take 2 steps, epoch 2 takes 3, and the rebuilt OneCycle schedule ends on its last step (it raises past it)."""
    real_load_solver = train.helper.load_solver
    monkeypatch.setattr(train.helper, "load_solver", load_solver_that_signals(real_load_solver, 2, signal.SIGINT))
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_run("exp", "--batch_size", "2"))
    assert stopped.value.code == 128 + signal.SIGINT
    monkeypatch.setattr(train.helper, "load_solver", real_load_solver)
    stopped = load_checkpoint(str(tmp_path / "exp" / "last.pt"))
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["samples_in_epoch"]) == (0, 2, 4)

    train.main(tiny_run("exp", "--batch_size", "4", "--load_pretrained", "1"))
    last = load_checkpoint(str(tmp_path / "exp" / "last.pt"))
    assert [row["samples"] for row in last["history"]] == [12, 12]  # the 12 training samples, once per epoch
    assert last["global_step"] == 2 + 2 + 3 and last["steps_per_epoch"] == 3
    assert last["scheduler"]["last_epoch"] == last["scheduler"]["total_steps"] == 6
    assert last["history"][-1]["lr"] == pytest.approx(3e-3 / 25 / 100, rel=1e-6)  # OneCycle's final lr
    assert "rebuilt for 2 epochs of 3 steps (it had 2 of 6, or other schedule settings) and continues at step 1" in (
        tmp_path / "exp" / "training.log").read_text()


@pytest.mark.parametrize("num_epochs", ["1", "2"], ids=["fewer_epochs", "as_many_epochs"])
def test_resume_with_nothing_left_to_train_is_one_line(trained_copy, capsys, num_epochs):
    exp, flags = trained_copy
    before = {name: (exp / name).read_bytes() for name in ("best.pt", "last.pt")}
    with pytest.raises(SystemExit) as failed:
        train.main(flags("--load_pretrained", "1", "--num_epochs", num_epochs))
    assert failed.value.code == 2
    assert "has trained 2 epochs already: raise --num_epochs" in capsys.readouterr().err
    assert before == {name: (exp / name).read_bytes() for name in before}


def test_test_py_takes_the_checkpoint_configuration_then_this_commands_flags(trained_copy, capsys, embedded_dir):
    """--cfg and flags given to test.py override the checkpoint's configuration, config/test settings included;
    training flags given to it are named in one warning line and change nothing."""
    exp, _ = trained_copy
    test_script.main(["--save_dir", str(exp), *data_flags(embedded_dir), "--num_cores", "0", "--visualization", "1",
                      "--learning_rate", "0.1", "--num_epochs", "9", "--cfg", "config.test.visualizations=1",
                      "--cfg", "model.Yolo.postprocess.max_detections=3"])
    assert os.listdir(exp / "test" / "visualization") == ["sample_0.png"]
    [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert warning.startswith("warning: --learning_rate, --num_epochs: training flag(s), ignored here")
    assert helper.given_flags(test_script.build_test_parser(), ["--num_epochs", "9", "--batch_size", "3"]) == {
        "batch_size": 3, "cfg": []}  # not in the configuration test.py evaluates with
    detections = json.loads((exp / "test" / "detections.json").read_text())
    per_image = {}
    for detection in detections:
        per_image[detection["image_id"]] = per_image.get(detection["image_id"], 0) + 1
    assert max(per_image.values()) == 3
    with pytest.raises(SystemExit) as failed:
        test_script.main(["--save_dir", str(exp), *data_flags(embedded_dir),
                          "--cfg", "model.Yolo.postprocess.max_detections=0"])
    assert failed.value.code == 2
    assert "postprocess.max_detections = 0 in config/model.json" in capsys.readouterr().err


def test_visualization_of_a_solver_that_draws_nothing_is_one_line_before_any_work(trained_copy, capsys, monkeypatch,
                                                                                 embedded_dir):
    """visualize is optional for a solver: without it, test.py --visualization 1 is refused before evaluating."""
    exp, _ = trained_copy
    monkeypatch.delattr(helper.solver_class("Yolo"), "visualize")
    with pytest.raises(SystemExit) as failed:
        test_script.main(["--save_dir", str(exp), *data_flags(embedded_dir), "--num_cores", "0",
                          "--visualization", "1"])
    assert failed.value.code == 2 and not (exp / "test").exists()
    assert "--visualization 1: the Yolo solver draws nothing" in capsys.readouterr().err


@pytest.mark.parametrize("script", [train, test_script])
def test_abbreviated_flags_are_refused(script, capsys):
    with pytest.raises(SystemExit) as failed:
        script.main(["--batch", "4"])
    assert failed.value.code == 2 and "unrecognized arguments: --batch 4" in capsys.readouterr().err


def test_logging_leaves_the_root_logger_alone(tmp_path):
    """setup_logging configures the project's loggers only: the root logger (a program's that imports DSTorch) and
    the libraries' loggers keep their settings; a second setup replaces the first's handlers and closes its file."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    setup_logging(str(tmp_path / "first.log"))
    setup_logging(str(tmp_path / "second.log"))
    assert (list(root.handlers), root.level) == (handlers, level)
    logging.getLogger("train").info("to the second file")
    logging.getLogger("faster_coco_eval.core.cocoeval").info("Average Precision (AP) @[ IoU=0.50:0.95 ...")
    assert (tmp_path / "first.log").read_text() == ""
    assert (tmp_path / "second.log").read_text().endswith("to the second file\n")


def test_the_resume_command_survives_the_shell(monkeypatch):
    argv = ["--exp_id", "3", "--cfg", 'data.BEVSeg.cameras=["CAM_FRONT", "CAM_BACK"]', "--start_epoch", "2",
            "--load_pretrained=1"]
    command = train.resume_command_line(argv)
    assert shlex.split(command) == ["python", "train.py", "--exp_id", "3", "--cfg",
                                    'data.BEVSeg.cameras=["CAM_FRONT", "CAM_BACK"]', "--load_pretrained", "1"]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert shlex.split(train.resume_command_line(["--ddp", "1"])) == [
        "torchrun", "--standalone", "--nproc_per_node", "4", "train.py", "--ddp", "1", "--load_pretrained", "1"]
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert train.resume_command_line(["--ddp", "1"]).startswith(
        "torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:PORT train.py")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_run, tmp_path, monkeypatch):
    real_forward = AlignedDetectionLoss.forward
    calls = {"n": 0}

    def forward(self, outputs, targets):
        losses = real_forward(self, outputs, targets)
        calls["n"] += 1
        if calls["n"] == 5:  # the second step of epoch 2
            losses["total_loss"] = losses["total_loss"] * float("nan")
        return losses

    monkeypatch.setattr(AlignedDetectionLoss, "forward", forward)
    with pytest.raises(SystemExit) as stopped:
        train.main(tiny_run())
    assert stopped.value.code == 1
    assert load_checkpoint(str(tmp_path / "exp" / "last.pt"))["epoch"] == 1
    log = (tmp_path / "exp" / "training.log").read_text()
    assert "non-finite loss at epoch 2 step 2" in log and "total_loss=nan" in log and "box_loss=" in log


def test_checkpoint_round_trip(trained):
    path = str(trained / "last.pt")
    state = torch.load(path, weights_only=True)
    args = state["config"]
    solver = helper.load_solver(args, device=torch.device("cpu"), class_names=[str(i) for i in range(10)],
                                steps_per_epoch=3)
    solver.load_state_dict(state, state["global_step"])
    again = solver.state_dict()
    for key in ("model", "ema"):
        assert all(torch.equal(again[key][name], tensor) for name, tensor in state[key].items())
    assert again["optimizer"]["state"][0]["exp_avg"].equal(state["optimizer"]["state"][0]["exp_avg"])
    assert again["scheduler"] == state["scheduler"]


def test_bad_checkpoints(trained_copy, capsys):
    exp, flags = trained_copy
    config_before = (exp / "config.json").read_bytes()
    with open(exp / "last.pt", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SystemExit) as failed:
        train.main(flags("--load_pretrained", "1"))
    assert failed.value.code == 2 and "last.pt is corrupt or not a DSTorch checkpoint" in capsys.readouterr().err

    state = torch.load(exp / "best.pt", weights_only=True)
    state["config"]["model_name"] = "Detr"
    torch.save(state, exp / "last.pt")
    with pytest.raises(SystemExit) as failed:
        train.main(flags("--load_pretrained", "1"))
    assert failed.value.code == 2
    assert "is from model Detr, not Yolo: resume it with --model_name Detr" in capsys.readouterr().err
    with pytest.raises(UserError, match="from model Detr, not Yolo"):
        solver = helper.load_solver(json.loads(config_before), device=torch.device("cpu"),
                                    class_names=list("abcdefghij"), steps_per_epoch=3)
        solver.load_weights(load_checkpoint(str(exp / "last.pt")))
    assert (exp / "config.json").read_bytes() == config_before  # nothing overwritten by the failed runs


def test_mixed_precision_step_on_the_cpu(trained):
    """--bool_mixed_precision 1 on the CPU: bf16 autocast, the same code path as CUDA's fp16 with a scaler."""
    args = json.loads((trained / "config.json").read_text())
    args["bool_mixed_precision"] = 1
    solver = helper.load_solver(args, device=torch.device("cpu"), class_names=list("abcdefghij"), steps_per_epoch=3)
    assert solver.amp_dtype == torch.bfloat16 and solver.scaler.get_scale() == 1.0  # no loss scaling
    batch = {"images": torch.randn(1, 2, 3, 64, 96),
             **padded_targets(torch.tensor([[10.0, 10.0, 40.0, 50.0]]), torch.tensor([2]), torch.tensor([1]), 2)}
    losses = solver.train(batch)
    assert all(torch.isfinite(value) for value in losses.values())


@pytest.mark.parametrize("flags, message", [
    (["--optimizer_type", "lion"], "argument --optimizer_type: invalid choice: 'lion'"),
    (["--lr_schd_type", "Cyclic"], "argument --lr_schd_type: invalid choice: 'Cyclic'"),
    (["--batch_size", "0"], "argument --batch_size: must be a positive integer, got 0"),
    (["--bool_mixed_precision", "2"], "argument --bool_mixed_precision: must be 0 or 1, got 2"),
])
def test_bad_flags_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as failed:
        build_parser().parse_args(flags)
    assert failed.value.code == 2
    stderr = capsys.readouterr().err.strip()
    assert "\n" not in stderr and message in stderr


@pytest.mark.parametrize("flags, message", [
    (["--model_name", "Detr"], "--model_name Detr: no optimization/Detr_solver.py; available: "),
    (["--dataset_type", "kitti"], "--dataset_type kitti: not in 'loaders' of config/config.json; available: nuscenes"),
    (["--app_mode", "Tracking"], "--app_mode Tracking: no loader for it with --dataset_type nuscenes"),
    (["--cfg", "model.Yolo.backbone_name=resnet34"], "unknown key 'model.Yolo.backbone_name'"),
    (["--cfg", "data.2DObjDet.image.h=tall"], "--cfg data.2DObjDet.image.h=tall: expected a value of type int"),
])
def test_bad_names_fail_before_heavy_work(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        train.main(["--save_dir", str(tmp_path / "exp"), *flags])
    stderr = capsys.readouterr().err.strip()
    assert failed.value.code == 2 and "\n" not in stderr and "Traceback" not in stderr
    assert message in stderr
    assert not (tmp_path / "exp").exists()


def test_train_py_as_a_program_ends_a_bad_name_with_one_line_and_status_2(tmp_path):
    """The entry point itself (the other tests call train.main in-process): `python train.py`."""
    result = subprocess.run([sys.executable, "train.py", "--save_dir", str(tmp_path / "exp"), "--model_name", "Detr"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    stderr = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in stderr and "Traceback" not in stderr
    assert "--model_name Detr: no optimization/Detr_solver.py" in stderr and not (tmp_path / "exp").exists()


@pytest.mark.parametrize("flags, message", [
    (["--weight_decay", "-1"], "argument --weight_decay: must be 0 or more, got -1"),
    (["--pct_start", "1.5"], "argument --pct_start: must be between 0 and 1"),
    (["--learning_rate", "inf"], "argument --learning_rate: must be a finite number, got inf"),
    (["--seed", "-1"], "argument --seed: must be between 0 and 2**31 - 1, got -1"),
    (["--grad_clip", "-2"], "argument --grad_clip: must be 0 or more, got -2"),
    (["--val_ratio", "1"], "argument --val_ratio: must be between 0 and 1"),
    (["--start_epoch", "2"], "--start_epoch 2 resumes from epoch_2.pt: add --load_pretrained 1"),
    (["--lr_schd_type", "StepLR", "--cfg", "config.schedulers.StepLR.step_epochs=0"],
     "schedulers.StepLR.step_epochs = 0 in config/config.json (or --cfg config.schedulers.StepLR.step_epochs=...): "
     "must be an integer >= 1"),
    (["--cfg", "config.solver.ema_decay=1.5"], "solver.ema_decay = 1.5 in config/config.json"),
    (["--cfg", "data.2DObjDet.normalize.std=[0.2, 0, 0.2]"], "2DObjDet.normalize.std = [0.2, 0, 0.2] in "
                                                              "config/data.json"),
    (["--cfg", "data.2DObjDet.image.w=100"], "2DObjDet.image.w = 100 in config/data.json (or --cfg "
                                             "data.2DObjDet.image.w=...): must be a positive multiple of 32"),
    (["--cfg", "data.2DObjDet.augmentation.hue=0.9"], "must be a number >= 0 and <= 0.5"),
    (["--cfg", "data.2DObjDet.cameras=[]"], "2DObjDet.cameras = [] in config/data.json"),
    (["--cfg", "model.Yolo.fpn_channels=48"], "Yolo.fpn_channels = 48 in config/model.json"),
    (["--cfg", "loss.Yolo.size_ranges=[[0, 48]]"], "Yolo.size_ranges = [[0, 48]] in config/loss.json"),
    (["--cfg", "model.Yolo.architecture=yolov8"], 'Yolo.architecture = "yolov8" in config/model.json'),
    (["--cfg", "model.Yolo.architecture=resnet_fpn"], 'whose backbone "csp" has the architecture "csp_pan"'),
    (["--cfg", "model.Yolo.widths=[16, 32, 64]"], "Yolo.widths = [16, 32, 64] in config/model.json"),
    (["--cfg", "loss.Yolo.aligned.topk=0"], "Yolo.aligned.topk = 0 in config/loss.json"),
    (["--cfg", "model.LiftBEV.threshold=0.505", "--app_mode", "BEVSeg", "--model_name", "LiftBEV"],
     "LiftBEV.threshold = 0.505 in config/model.json"),
    (["--cfg", 'data.2DObjDet.splits={"v1.0-mini":"mini_train"}'],
     '--cfg data.2DObjDet.splits={"v1.0-mini":"mini_train"}: expected a value of type dict like'),
    (["--cfg", "data.2DObjDet.augmentation.min_box_size=0"],
     "2DObjDet.augmentation.min_box_size = 0.0 in config/data.json (or --cfg data.2DObjDet.augmentation.min_box_size="
     "...): must be a number >= 1"),
])
def test_bad_values_fail_before_any_work(flags, message, tmp_path, capsys):
    """Every flag and config value out of its range is one line before the experiment folder is touched."""
    with pytest.raises(SystemExit) as failed:
        train.main(["--save_dir", str(tmp_path / "exp"), *flags])
    stderr = capsys.readouterr().err.strip()
    assert failed.value.code == 2 and "\n" not in stderr and stderr.startswith("error: ") and message in stderr
    assert not (tmp_path / "exp").exists()


def test_the_optimizer_and_schedule_turn_torchs_rejections_into_one_line():
    """What the range checks might miss still ends as one line, naming the flags (safety nets)."""
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(UserError, match="--optimizer_type adamw --learning_rate 0.1 --weight_decay -1: torch.optim"):
        build_optimizer("adamw", parameters, 0.1, -1)
    optimizer = build_optimizer("sgd", parameters, 0.1, 0.0)
    flags = {"learning_rate": 0.1, "pct_start": 1.5, "div_factor": 25.0, "final_div_factor": 100.0}
    with pytest.raises(UserError, match="--lr_schd_type OnecycleLR: torch.optim.lr_scheduler rejects its settings"):
        build_scheduler("OnecycleLR", optimizer, 10, 5, flags, {})


def test_an_experiment_folder_that_cannot_be_created(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as failed:
        train.main(["--save_dir", str(tmp_path / "a_file" / "exp")])
    stderr = capsys.readouterr().err.strip()
    assert failed.value.code == 2 and "\n" not in stderr
    assert f"cannot create the experiment folder {tmp_path / 'a_file' / 'exp'}" in stderr


def test_a_checkpoint_without_the_training_progress_is_one_line(trained_copy, capsys):
    exp, flags = trained_copy
    state = load_checkpoint(str(exp / "last.pt"))
    del state["samples_in_epoch"]
    torch.save(state, exp / "last.pt")
    before = (exp / "last.pt").read_bytes()
    with pytest.raises(SystemExit) as failed:
        train.main(flags("--load_pretrained", "1", "--num_epochs", "3"))
    assert failed.value.code == 2 and "lacks samples_in_epoch" in capsys.readouterr().err
    assert (exp / "last.pt").read_bytes() == before


def test_load_pretrained_without_checkpoint(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        train.main(tiny_run("exp", "--load_pretrained", "1"))
    assert failed.value.code == 2 and "--load_pretrained 1: no checkpoint" in capsys.readouterr().err


def test_a_fresh_run_never_overwrites_an_experiment(tiny_run, tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "last.pt").write_bytes(b"precious")
    with pytest.raises(SystemExit) as failed:
        train.main(tiny_run())
    assert failed.value.code == 2 and "already holds checkpoints" in capsys.readouterr().err
    assert (exp / "last.pt").read_bytes() == b"precious" and sorted(os.listdir(exp)) == ["last.pt"]


def test_batch_size_larger_than_the_dataset(tiny_run, capsys):
    with pytest.raises(SystemExit) as failed:
        train.main(tiny_run("exp", "--batch_size", "64"))
    assert failed.value.code == 2
    assert "--batch_size 64 is larger than the 12 training samples" in capsys.readouterr().err


def test_gpu_num_beyond_the_gpus(monkeypatch):
    from utils import experiment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="--gpu_num 5: this machine has 2 GPU"):
        experiment.select_device(5)


def test_the_cpu_fallback_says_why_cuda_is_unusable(monkeypatch, caplog):
    from utils import experiment

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")

    def old_driver():
        raise RuntimeError("The NVIDIA driver on your system is too old (found version 11040).")

    monkeypatch.setattr(torch.cuda, "init", old_driver)
    assert experiment.select_device(0) == torch.device("cpu")
    assert ("running on the CPU (--gpu_num 0 ignored): torch" in caplog.text and "built for CUDA 13.0 but cannot "
            "use it (The NVIDIA driver on your system is too old (found version 11040).); update the NVIDIA driver"
            in caplog.text)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "is a CPU build; for a GPU, install a CUDA build of torch" in experiment.why_no_cuda()


def test_config_merge_and_typed_overrides(tmp_path):
    flags = {"exp_id": 1, "cfg": ["model.Yolo.fpn_channels=64", "model.Yolo.pretrained_backbone=true",
                                  "loss.Yolo.center_radius=1.5", 'data.2DObjDet.cameras=["CAM_FRONT"]',
                                  "data.2DObjDet.version=v1.0-trainval"]}
    merged = merge_config(flags, str(PROJECT_ROOT / "config"))
    assert merged["exp_id"] == 1 and set(merged) >= {"config", "data", "model", "loss"}
    assert merged["model"]["Yolo"]["fpn_channels"] == 64 and merged["model"]["Yolo"]["pretrained_backbone"] is True
    assert merged["loss"]["Yolo"]["center_radius"] == 1.5
    assert merged["data"]["2DObjDet"]["cameras"] == ["CAM_FRONT"]
    assert merged["data"]["2DObjDet"]["version"] == "v1.0-trainval"
    for override, message in [("model.Yolo.fpn_channels=1.5", "type int"), ("model.Yolo.head_convs", "KEY=VALUE"),
                              ("optim.lr=1", "must start with one of"), ("model.Yolo.fpn_channels.x=1", "unknown key"),
                              ("model.Yolo.pretrained_backbone=maybe", "type bool"),
                              ('data.2DObjDet.cameras={"a": 1}', "type list")]:
        with pytest.raises(UserError, match=message):
            merge_config({"cfg": [override]}, str(PROJECT_ROOT / "config"))


def test_broken_json_config_names_file_line_and_column(tmp_path):
    for name in ("config", "data", "model", "loss"):
        (tmp_path / f"{name}.json").write_text((PROJECT_ROOT / "config" / f"{name}.json").read_text())
    (tmp_path / "model.json").write_text('{\n  "Yolo": {\n    "backbone": "resnet18",\n  }\n}\n')
    with pytest.raises(UserError, match=r"model.json is not valid JSON: .* at line 4 column 3"):
        merge_config({}, str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        load_json(str(tmp_path / "absent.json"))


class RecordingSave:
    """train.end_epoch's `save`: records the checkpoint names of each call instead of writing them."""

    def __init__(self, exp_dir: str):
        self.exp_dir, self.calls = exp_dir, []

    def __call__(self, names: list) -> None:
        self.calls.append(names)


@pytest.mark.parametrize("error_metric", [True, False], ids=["error_metric", "score_metric"])
def test_best_pt_follows_the_first_metric_in_its_direction(tmp_path, error_metric):
    """A solver states which metrics are better when lower (an error such as MAE): best.pt is then written when the
    metric falls, from the first evaluation on (best_score starts at +inf, not at -1 where no error is better)."""

    class CountingSolver(BaseSolver):
        metric_names = ("MAE", "bias")
        lower_is_better = ("MAE",) if error_metric else ()

        def __init__(self, values):
            self.values = iter(values)

        def eval(self, loader, show_progress):
            return {"MAE": next(self.values), "bias": -4.0}, {}, {}

    solver = CountingSolver([3.0, 2.0, 2.5, 1.0])
    progress, save = train.Progress(best_score=solver.worst_score()), RecordingSave(str(tmp_path))
    args = {"valid_step": 1, "num_epochs": 4, "save_every": 100, "max_num_chkpts": 3}
    record = TrainingRecord(str(tmp_path), solver.metric_names, args)
    for _ in range(4):
        train.end_epoch(solver, None, args, progress, 0.1, save, record)
    best = ["best.pt" in names for names in save.calls]
    assert best == ([True, True, False, True] if error_metric else [True, False, False, False])
    assert progress.best_score == (1.0 if error_metric else 3.0)
    assert (tmp_path / "curves.png").is_file()  # metrics far outside [0, 1] are drawn
    assert (tmp_path / "results.csv").read_text().count("\n") == 1 + 4


def test_a_config_section_inherits_another_and_writes_only_what_differs(tmp_path):
    """data.json (any config file): a section with "inherit" takes the named section's keys, its own on top,
    nested dicts merged key by key; --cfg then overrides the result; a missing parent or a cycle is one line."""
    config_dir = tmp_path / "config"
    shutil.copytree(PROJECT_ROOT / "config", config_dir)
    data = load_json(str(config_dir / "data.json"))
    data["Counting"] = {"inherit": "2DObjDet", "image": {"w": 96}, "cameras": ["CAM_FRONT"]}
    (config_dir / "data.json").write_text(json.dumps(data))
    flags = vars(build_parser().parse_args(["--cfg", "data.Counting.image.h=64"]))
    merged = merge_config(flags, str(config_dir))
    counting, detection = merged["data"]["Counting"], merged["data"]["2DObjDet"]
    assert counting["image"] == {"w": 96, "h": 64} and counting["cameras"] == ["CAM_FRONT"]
    assert "inherit" not in counting and counting["labels"] == detection["labels"]
    assert detection["image"] == {"w": 384, "h": 224}  # the parent is not changed by its child
    for inherit, message in (("Nothing", r"Counting.inherit = \"Nothing\" is not a section of the file: name one of "
                                         r"2DObjDet, BEVSeg"),
                             ("Counting", r"makes a cycle \(Counting -> Counting\)")):
        data["Counting"]["inherit"] = inherit
        (config_dir / "data.json").write_text(json.dumps(data))
        with pytest.raises(UserError, match=message):
            merge_config(flags, str(config_dir))
    data["Other"] = {"inherit": "Counting"}  # a longer cycle is named link by link
    data["Counting"]["inherit"] = "Other"
    (config_dir / "data.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"makes a cycle \(Counting -> Other -> Counting\)"):
        merge_config(flags, str(config_dir))
