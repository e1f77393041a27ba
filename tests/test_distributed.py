"""torchrun on the CPU (gloo): training to the end with 2 processes, and a 2-process evaluation that equals the
1-process one exactly (the shards are disjoint, no sample counts twice)."""

import json
import os
import subprocess
import sys

import pytest

import test as test_script
import train
from tests.conftest import PROJECT_ROOT
from tests.test_platform import tiny_flags


def torchrun(*args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def detection_key(detection):
    return detection["image_id"], detection["category_id"], detection["score"]


def test_ddp_without_torchrun_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--ddp", "1", "--save_dir", str(tmp_path / "exp")],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    stderr = result.stderr.strip()
    assert result.returncode == 2 and "\n" not in stderr
    assert "--ddp 1 needs torchrun's environment" in stderr and "torchrun --nproc_per_node" in stderr


@pytest.fixture(scope="module")
def ddp_trained(embedded_dir, tmp_path_factory):
    """A tiny experiment trained by 2 torchrun processes; returns (folder, its flags)."""
    folder = tmp_path_factory.mktemp("ddp")
    flags = tiny_flags(embedded_dir, folder, "exp", "--num_epochs", "1", "--batch_size", "2")
    torchrun("train.py", "--ddp", "1", *flags)
    return folder / "exp", flags


def test_two_processes_train_to_the_end(ddp_trained):
    exp, _ = ddp_trained
    log = (exp / "training.log").read_text()
    assert "epoch 1/1:" in log and "done: best validation mAP" in log
    assert {"best.pt", "last.pt", "metrics.json", "detections.json", "curves.png"} <= set(os.listdir(exp))


def test_two_process_evaluation_equals_one_process(ddp_trained):
    exp, _ = ddp_trained
    test_flags = ["--save_dir", str(exp), "--num_cores", "0", "--batch_size", "3"]  # 4 test samples: shards 2 + 2
    torchrun("test.py", "--ddp", "1", *test_flags)
    two = json.loads((exp / "test" / "metrics.json").read_text())
    two_detections = json.loads((exp / "test" / "detections.json").read_text())
    test_script.main(test_flags)
    one = json.loads((exp / "test" / "metrics.json").read_text())
    one_detections = json.loads((exp / "test" / "detections.json").read_text())
    assert two == one
    assert sorted(two_detections, key=detection_key) == sorted(one_detections, key=detection_key)
    assert len({d["image_id"] for d in one_detections}) <= 4 * 2  # 4 test samples x 2 cameras


def test_train_main_rejects_ddp_in_process(embedded_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(tiny_flags(embedded_dir, tmp_path, "exp", "--ddp", "1"))
    assert "needs torchrun's environment" in capsys.readouterr().err
