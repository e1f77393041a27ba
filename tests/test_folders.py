"""What a run leaves in its folders when something goes wrong: one run per experiment folder, writes that survive a
kill or a full disk, stale temporary files, a best.pt that never gets worse, numbered checkpoints pruned by age,
locks that die with their process, and checkpoints that choose neither code nor paths."""

import errno
import fcntl
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import helper
import test as test_script
import train
from argumentparser import build_parser
from dataset.NuscenesDataset.cache import file_lock, write_arrays
from tests.conftest import PROJECT_ROOT, data_flags, tiny_flags
from utils import io
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.config import merge_config
from utils.errors import UserError
from utils.plots import save_figure


@pytest.fixture
def tiny_run(embedded_dir, tmp_path):
    return lambda exp_dir="exp", *extra: tiny_flags(embedded_dir, tmp_path, exp_dir, *extra)


def test_an_experiment_folder_in_use_is_one_line_naming_its_run(tiny_run, tmp_path, capsys):
    """A run holds its folder (rank 0, a lock that dies with the process): a second train.py there stops before it
    writes anything, naming the holder; once the holder is gone, the folder is free."""
    exp = tmp_path / "exp"
    exp.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(exp / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, f'the run of process {os.getpid()} on a host'.encode())\n"
         "print('held', flush=True)\n"
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit) as failed:
            train.main(tiny_run())
        stderr = capsys.readouterr().err.strip()
        assert failed.value.code == 2 and "\n" not in stderr
        assert f"experiment folder {exp} is in use by the run of process {holder.pid} on a host" in stderr
        assert os.listdir(exp) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    train.main(tiny_run("exp", "--num_epochs", "1"))
    assert load_checkpoint(str(exp / "last.pt"))["epoch"] == 1


def test_temporary_files_of_an_interrupted_save_are_ignored_then_removed(tiny_run, tmp_path):
    """A first save killed before its rename leaves .tmp-XXXXlast.pt: not a checkpoint; the next run removes it."""
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / ".tmp-k2j4last.pt").write_bytes(b"half a checkpoint")
    train.main(tiny_run("exp", "--num_epochs", "1"))
    assert not [name for name in os.listdir(exp) if name.startswith(".tmp-")]
    assert load_checkpoint(str(exp / "last.pt"))["epoch"] == 1


def test_a_run_killed_between_best_pt_and_last_pt_resumes_and_restarts(trained_copy, capsys, monkeypatch):
    """A save writes best.pt, epoch_<k>.pt, then last.pt: a run killed in between has no last.pt (its first save:
    no checkpoint but best.pt). A fresh run still refuses the folder; --load_pretrained 1 and a torchrun restart of
    the same launch continue from the newest checkpoint."""
    exp, flags = trained_copy
    os.remove(exp / "last.pt")
    with pytest.raises(SystemExit) as failed:
        train.main(flags())
    assert failed.value.code == 2 and "already holds checkpoints" in capsys.readouterr().err
    best = load_checkpoint(str(exp / "best.pt"))
    train.main(flags("--load_pretrained", "1", "--num_epochs", "3"))
    resumed = load_checkpoint(str(exp / "last.pt"))
    assert resumed["epoch"] == 3 and resumed["history"][:best["epoch"]] == best["history"]
    assert f"resumed from {exp / 'best.pt'} at epoch {best['epoch'] + 1}" in (exp / "training.log").read_text()

    os.remove(exp / "last.pt")  # again, and this time torchrun restarts the workers of the launch that wrote best.pt
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    train.main(flags("--num_epochs", "4"))
    assert load_checkpoint(str(exp / "last.pt"))["epoch"] == 4


def test_a_run_resumed_from_an_older_epoch_keeps_the_better_best_pt_and_its_own_checkpoints(tiny_run, tmp_path,
                                                                                             caplog):
    """Resumed with --start_epoch from an earlier epoch (a branch), best.pt is replaced only by a score better than
    its own, and the numbered checkpoints are pruned by age: the branch's new epoch_<k>.pt stays, the older run's
    higher-numbered ones go."""
    exp = tmp_path / "exp"
    train.main(tiny_run("exp", "--num_epochs", "4", "--save_every", "1", "--max_num_chkpts", "3"))
    assert sorted(os.listdir(exp)).count("epoch_4.pt") == 1 and (exp / "epoch_2.pt").is_file()
    best = load_checkpoint(str(exp / "best.pt"))
    best["best_score"] = 0.99  # a score no branch of this tiny run reaches
    torch.save(best, exp / "best.pt")
    before = (exp / "best.pt").read_bytes()
    for name in os.listdir(exp):  # written a minute ago: the branch's files are newer on any file system's clock
        os.utime(exp / name, (time.time() - 60, time.time() - 60))
    train.main(tiny_run("exp", "--num_epochs", "3", "--save_every", "1", "--max_num_chkpts", "1",
                        "--load_pretrained", "1", "--start_epoch", "2"))
    assert (exp / "best.pt").read_bytes() == before
    assert "best.pt holds mAP 0.99, better than this checkpoint's best: it is replaced only by a better" in caplog.text
    assert sorted(name for name in os.listdir(exp) if name.startswith("epoch_")) == ["epoch_3.pt"]
    assert load_checkpoint(str(exp / "epoch_3.pt"))["global_step"] == load_checkpoint(str(exp / "last.pt"))[
        "global_step"]  # the branch's, not the older run's


def test_a_checkpoint_chooses_neither_the_code_imported_nor_the_paths(trained_copy, embedded_dir, tmp_path, capsys):
    """test.py takes the loaders table and data.json's paths from this checkout and its flags: a checkpoint whose
    configuration names another module (here Python's `this`, which prints the Zen of Python when imported) or
    other folders has neither imported nor written to."""
    exp, _ = trained_copy
    state = load_checkpoint(str(exp / "best.pt"))
    state["config"]["config"]["loaders"]["nuscenes"]["2DObjDet"] = "this"
    elsewhere = tmp_path / "elsewhere"
    state["config"]["data"]["2DObjDet"].update(label_cache_dir=str(elsewhere / "cache"), version="../../v1.0-mini",
                                               dataset_dir=str(elsewhere / "data"))
    state["config"]["dataset_dir"] = str(elsewhere / "data")
    torch.save(state, exp / "best.pt")
    test_script.main(["--save_dir", str(exp), *data_flags(embedded_dir), "--num_cores", "0"])
    captured = capsys.readouterr()
    assert "The Zen of Python" not in captured.out + captured.err
    assert json.loads((exp / "test" / "metrics.json").read_text())["checkpoint"] == "best.pt"
    assert not elsewhere.exists()
    assert f"warning: checkpoint {exp / 'best.pt'} was trained on {elsewhere / 'data'} (../../v1.0-mini)" in (
        captured.err)


def test_test_py_refuses_other_data_than_the_checkpoints_unless_the_command_names_it(trained_copy, capsys):
    """Trained on the session's dataset; test.py with neither --dataset_dir nor a version of its own would read
    config/data.json's (the project's embedded dataset): one line naming both, before any data is read."""
    exp, _ = trained_copy
    with pytest.raises(SystemExit) as failed:
        test_script.main(["--save_dir", str(exp), "--num_cores", "0"])
    stderr = capsys.readouterr().err.strip()
    assert failed.value.code == 2 and "\n" not in stderr and "give --dataset_dir " in stderr
    assert f"checkpoint {exp / 'best.pt'} was trained on " in stderr and not (exp / "test").exists()


def test_a_checkpoint_and_a_resume_read_no_imagenet_weights(trained_copy, monkeypatch, tmp_path):
    """Its weights replace them: the configuration to evaluate a checkpoint with, and a resumed run's solver, have
    pretrained_backbone off, so that no weights file is read (nor needs to exist)."""
    exp, flags = trained_copy
    state = load_checkpoint(str(exp / "best.pt"))
    state["config"]["model"]["Yolo"].update(pretrained_backbone=True)
    checkout = merge_config({**vars(build_parser().parse_args([])), "cfg": []}, str(PROJECT_ROOT / "config"))
    run = helper.checkpoint_configuration(str(exp / "best.pt"), state, {"cfg": []}, checkout)
    assert run["model"]["Yolo"]["pretrained_backbone"] is False
    assert state["config"]["model"]["Yolo"]["pretrained_backbone"] is True  # the checkpoint's is left as it was
    built = []
    real_load_solver = helper.load_solver
    monkeypatch.setattr(helper, "load_solver", lambda args, **kwargs: built.append(args) or real_load_solver(
        args, **kwargs))
    train.main(flags("--load_pretrained", "1", "--num_epochs", "3", "--cfg", "model.Yolo.pretrained_backbone=true"))
    assert built[-1]["model"]["Yolo"]["pretrained_backbone"] is False


def test_an_atomic_write_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    """The file is flushed to the disk, then renamed, then the folder flushed: after a crash, the old file or the
    whole new one (a rename can otherwise reach the disk before the data)."""
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(source, target):
        calls.append(("rename", os.path.basename(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    io.atomic_write_json(str(tmp_path / "out" / "metrics.json"), {"mAP": 0.5})
    assert [kind for kind, _ in calls] == ["fsync", "rename", "fsync"]
    assert calls[0][1].startswith(io.TEMPORARY_PREFIX) and calls[1:] == [("rename", "metrics.json"), ("fsync", "out")]


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def full_disk_in_torch_save(*args, **kwargs):  # how torch.save's zip writer reports it
    raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: "
                       "file write failed, No space left on device")


@pytest.mark.parametrize("writer, patch", [
    (lambda path: io.write_csv(path, [{"epoch": 2}]), "csv.DictWriter.writerows"),
    (lambda path: io.atomic_write_json(path, {"epoch": 2}), "json.dump"),
    (lambda path: write_arrays(path, {"epoch": np.array(2)}), "numpy.savez"),
    (lambda path: save_figure(Figure(), path), "matplotlib.figure.Figure.savefig"),
    (lambda path: save_checkpoint(path, {"epoch": 2}), "torch.save"),
    (lambda path: save_checkpoint(path, {"epoch": 2}), "torch.save (RuntimeError)"),
], ids=["results_csv", "json", "label_cache", "plot", "checkpoint", "checkpoint_stream_writer"])
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_earlier_one(tmp_path, monkeypatch, writer, patch):
    path = str(tmp_path / "result")
    with open(path, "w") as f:
        f.write("the earlier file")
    # torch.save's zip writer reports a full disk as a RuntimeError, the others as an OSError
    monkeypatch.setattr(patch.split()[0], full_disk_in_torch_save if patch.endswith("(RuntimeError)") else full_disk)
    with pytest.raises(UserError, match=f"cannot write .*{path} .*No space left on device.* the previous file is "
                                        f"unchanged") as raised:
        writer(path)
    assert "\n" not in str(raised.value)
    with open(path) as f:
        assert f.read() == "the earlier file" and os.listdir(tmp_path) == ["result"]


def test_a_checkpoint_killed_while_it_is_written_leaves_the_earlier_one_whole(tmp_path):
    """A process that writes a checkpoint over and over is SIGKILLed mid-write: the file is always one whole
    checkpoint, the earlier or the new one."""
    path = tmp_path / "last.pt"
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, torch\n"
         f"sys.path.insert(0, {str(PROJECT_ROOT)!r})\n"
         "from utils.checkpoint import save_checkpoint\n"
         "state = {'model': {'w': torch.zeros(8_000_000)}, 'epoch': 0, 'config': {'model_name': 'Yolo'}}\n"
         "while True:\n"
         f"    save_checkpoint({str(path)!r}, state)\n"
         "    print('saved', flush=True)\n"
         "    state['epoch'] += 1\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "saved"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]:
            time.sleep(0.001)  # until a later write is under way
        assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    finally:
        writer.kill()
        writer.wait()
    assert load_checkpoint(str(path))["model"]["w"].shape == (8_000_000,)


def test_a_file_system_without_locks_is_one_line(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    path = str(tmp_path / "labels.npz.lock")
    message = f"cannot lock {path}: its file system does not support locks .*local disk"
    with pytest.raises(UserError, match=message), file_lock(path, "the 2D labels"):
        pass
