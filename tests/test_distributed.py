"""torchrun on the CPU (gloo), 2 processes: training to the end through run_train_ddp.sh; the same weights as one
process with the global batch; an evaluation equal to the 1-process one; a SIGKILLed worker restarted and resumed
exactly; a stop signal that reaches one process; two torchrun "nodes" on localhost; bounded rendezvous errors."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch
from torch import nn

import test as test_script
import train
from dataset.NuscenesDataset.loader_2d_obj_det import DatasetLoader
from tests.conftest import PROJECT_ROOT, data_flags, launch, state_tensors, tiny_flags, torchrun
from tests.signal_at_step import load_solver_that_signals
from utils.checkpoint import load_checkpoint
from utils.distributed import ResumableDistributedSampler, SeededItems, init_distributed, sync_batchnorm
from utils.errors import UserError


def ddp_flags(embedded_dir, folder, exp_dir, *extra):
    """The tiny run of 2 epochs with 2 samples per process (3 steps per epoch with 2 processes), where
    2 x batch b must equal 1 x batch 2b: BatchNorm frozen, no augmentation, and SGD, whose update is linear in the
    gradient (Adam's divides by its root mean square, which turns float32 rounding of gradients near zero into
    differences of up to the learning rate); the assignment by nearness to the box centre, not by the predictions
    (the untrained model predicts many equal boxes, and float32 rounding decides which of those equals the
    task-aligned assignment takes); last.pt also every 2 steps."""
    return tiny_flags(embedded_dir, folder, exp_dir, "--batch_size", "2", "--bool_apply_img_aug", "0",
                      "--optimizer_type", "sgd", "--cfg", "model.Yolo.freeze_batchnorm=true",
                      "--cfg", "loss.Yolo.aligned.assignment=nearest",
                      "--cfg", "config.train.checkpoint_every_steps=2", *extra)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_same_tensors(path, reference_path):
    _, tensors = state_tensors(str(path))
    _, reference = state_tensors(str(reference_path))
    for name, tensor in reference.items():
        assert torch.equal(tensor, tensors[name]), name


def detection_key(detection):
    return detection["image_id"], detection["category_id"], detection["score"]


@pytest.fixture(scope="module")
def ddp_trained(embedded_dir, tmp_path_factory):
    """The tiny experiment trained by 2 processes with `bash run_train_ddp.sh 2`, epoch_1.pt and epoch_2.pt kept;
    returns its folder."""
    folder = tmp_path_factory.mktemp("ddp")
    launch(["bash", "run_train_ddp.sh", "2", *ddp_flags(embedded_dir, folder, "exp", "--save_every", "1")])
    return folder / "exp"


def test_two_processes_train_to_the_end(ddp_trained):
    log = (ddp_trained / "training.log").read_text()
    assert "epoch 2/2:" in log and "done: best validation mAP" in log
    assert {"best.pt", "last.pt", "metrics.json", "curves.png"} <= set(os.listdir(ddp_trained))
    last = load_checkpoint(str(ddp_trained / "last.pt"))
    assert (last["epoch"], last["global_step"], len(last["rng"])) == (2, 6, 2)  # one generator state per process


def test_two_processes_of_batch_b_equal_one_process_of_batch_2b(ddp_trained, embedded_dir):
    """After 6 AdamW steps, 2 processes x 2 samples give the weights of 1 process x 4 samples, to float32 rounding
    (the sums run in another order): the loss is normalized by the positives of the global batch."""
    folder = ddp_trained.parent
    train.main(ddp_flags(embedded_dir, folder, "one_process", "--batch_size", "4"))
    two, two_tensors = state_tensors(str(ddp_trained / "last.pt"))
    one, one_tensors = state_tensors(str(folder / "one_process" / "last.pt"))
    assert two["global_step"] == one["global_step"] == 6
    largest_difference = 0.0
    for name, tensor in one_tensors.items():
        if tensor.is_floating_point():
            assert torch.allclose(two_tensors[name], tensor, rtol=1e-4, atol=1e-5), name
            largest_difference = max(largest_difference, (two_tensors[name] - tensor).abs().max().item())
    assert 0 < largest_difference < 1e-5  # not the same code path by accident: rounding differs, a little
    for two_row, one_row in zip(two["history"], one["history"], strict=True):
        assert two_row["lr"] == one_row["lr"]


def test_two_process_evaluation_equals_one_process(ddp_trained, embedded_dir):
    test_flags = ["--save_dir", str(ddp_trained), *data_flags(embedded_dir), "--num_cores", "0",
                  "--batch_size", "3"]  # 4 test samples: 2 + 2
    torchrun("test.py", "--ddp", "1", *test_flags)
    two = json.loads((ddp_trained / "test" / "metrics.json").read_text())
    two_detections = json.loads((ddp_trained / "test" / "detections.json").read_text())
    test_script.main(test_flags)
    one = json.loads((ddp_trained / "test" / "metrics.json").read_text())
    one_detections = json.loads((ddp_trained / "test" / "detections.json").read_text())
    assert two == one
    assert sorted(two_detections, key=detection_key) == sorted(one_detections, key=detection_key)
    assert len({d["image_id"] for d in one_detections}) <= 4 * 2  # 4 test samples x 2 cameras


def test_killed_workers_are_restarted_afresh_then_resume_exactly(ddp_trained, embedded_dir, tmp_path):
    """No label cache yet, and building it takes longer (2 s a scene, 8 scenes on 2 workers) than the process
    group's 6 s timeout: the processes wait for it on a file lock, not in a collective. Rank 1 is SIGKILLed as its
    2nd step of epoch 1 starts, before anything was saved: torchrun (--max_restarts 2) restarts both workers, which
    start afresh (one log line). Rank 1 is SIGKILLed again as its 5th step starts (epoch 2, step 2): the restarted
    workers resume from last.pt of step 4 (epoch 2, step 1). The run ends with the weights of the run that was
    never interrupted."""
    flags = ddp_flags(embedded_dir, tmp_path, "exp", "--cfg", "config.distributed.timeout_s=6",
                      "--cfg", f"data.2DObjDet.label_cache_dir={tmp_path / 'cache'}")  # a cache of its own to build
    result = torchrun("--max_restarts", "2", "tests/train_with_signal.py", "--ddp", "1", *flags, SIGNAL_RANK="1",
                      SIGNAL_NAME="KILL", SIGNAL_STEPS="2,5", SIGNAL_BEFORE_STEP="1", SLOW_LABELS_S="2",
                      TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert "exitcode: -9" in result.stderr
    assert len(os.listdir(tmp_path / "cache")) > 0  # built by this launch
    log = (tmp_path / "exp" / "training.log").read_text()
    afresh = log.index("restarted the workers before this run saved a checkpoint: training starts afresh")
    resumed = log.index("resumed from", afresh)
    assert "resumed from" not in log[:afresh] and "at epoch 2, step 1" in log[resumed:] and "epoch 2/2:" in log
    last = load_checkpoint(str(tmp_path / "exp" / "last.pt"))
    assert [row["epoch"] for row in last["history"]] == [1, 2]
    assert load_checkpoint(str(tmp_path / "exp" / "best.pt"))["best_score"] >= 0
    assert_same_tensors(tmp_path / "exp" / "last.pt", ddp_trained / "last.pt")


def test_a_restart_after_start_epoch_continues_from_the_newest_state(ddp_trained, embedded_dir, tmp_path):
    """Resumed with --start_epoch 1 (epoch_1.pt) in a folder whose last.pt is of epoch 2; last.pt is saved again at
    epoch 2 step 1, then rank 1 is SIGKILLed at its next step: the restarted workers continue from that last.pt,
    not from epoch_1.pt nor the old last.pt, and end with the uninterrupted run's weights."""
    shutil.copytree(ddp_trained, tmp_path / "exp")
    flags = ddp_flags(embedded_dir, tmp_path, "exp", "--load_pretrained", "1", "--start_epoch", "1")
    result = torchrun("--max_restarts", "1", "tests/train_with_signal.py", "--ddp", "1", *flags, SIGNAL_RANK="1",
                      SIGNAL_NAME="KILL", SIGNAL_STEPS="2", SIGNAL_BEFORE_STEP="1",
                      TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    assert "exitcode: -9" in result.stderr
    log = (tmp_path / "exp" / "training.log").read_text()
    assert "epoch_1.pt at epoch 2, step 0" in log and "last.pt at epoch 2, step 1" in log
    assert_same_tensors(tmp_path / "exp" / "last.pt", ddp_trained / "last.pt")


def test_a_one_process_run_resumed_by_two_sees_each_sample_once(embedded_dir, tmp_path):
    """Stopped after 2 of the 6 steps of epoch 1 with 1 process of 2 samples, resumed by 2 processes of 2: the 8
    samples left take 2 steps of 4, epoch 2 takes 3."""
    flags = ddp_flags(embedded_dir, tmp_path, "exp", "--cfg", "config.train.checkpoint_every_steps=0")
    real_load_solver = train.helper.load_solver
    train.helper.load_solver = load_solver_that_signals(real_load_solver, 2, signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stopped:
            train.main(flags)
        assert stopped.value.code == 128 + signal.SIGINT  # stopped by the signal, last.pt saved
    finally:
        train.helper.load_solver = real_load_solver
    launch(["bash", "run_train_ddp.sh", "2", *flags, "--load_pretrained", "1"])
    last = load_checkpoint(str(tmp_path / "exp" / "last.pt"))
    assert [row["samples"] for row in last["history"]] == [12, 12]
    assert last["global_step"] == 2 + 2 + 3 and len(last["rng"]) == 2
    assert "resuming a run of 1 process(es) with 2" in (tmp_path / "exp" / "training.log").read_text()


@pytest.mark.parametrize("before, after", [((1, 2), (2, 2)), ((2, 2), (1, 3)), ((2, 1), (3, 1))])
def test_the_sampler_resumes_by_samples_for_any_batch_and_process_count(before, after):
    """(processes, batch size) before and after a stop after 2 steps: the samples of the epoch are each taken at
    most once, and all of them but the tail that the last processes x batch does not divide."""
    dataset, epoch = list(range(23)), 4

    def taken(processes, batch, samples_done, steps=None):
        shards = []
        for rank in range(processes):
            sampler = ResumableDistributedSampler(dataset, processes, rank, shuffle=True, seed=7, drop_last=True,
                                                  pad=True)
            sampler.start_epoch(epoch, samples_done)
            indices = [index for index, _ in sampler]
            usable = len(indices) // batch * batch if steps is None else steps * batch
            shards.append(indices[:usable])
        return [index for shard in shards for index in shard]

    first = taken(*before, 0, steps=2)
    rest = taken(*after, len(first))
    assert len(first) == 2 * before[0] * before[1]
    assert len(set(first + rest)) == len(first) + len(rest)  # nothing twice
    assert len(dataset) - len(first + rest) < after[0] * after[1]  # nothing left out but the last partial batch


@pytest.mark.parametrize("samples, processes", [(5, 2), (7, 3), (1, 2)])
def test_evaluation_shards_are_disjoint_and_cover_every_sample_when_uneven(samples, processes):
    """Evaluation without padding (a 2-process evaluation equals a 1-process one, tested with even shards above):
    shards of uneven length, their lengths what the DataLoader is told, each sample in exactly one."""
    shards = []
    for rank in range(processes):
        sampler = ResumableDistributedSampler(list(range(samples)), processes, rank, shuffle=False, seed=0,
                                              drop_last=False, pad=False)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    assert sorted(index for shard in shards for index in shard) == list(range(samples))
    assert max(map(len, shards)) - min(map(len, shards)) == (1 if samples % processes else 0)


def test_a_stop_signal_to_one_process_stops_all_at_the_same_step(ddp_trained, embedded_dir, tmp_path):
    """SIGTERM reaches rank 1 only, after its 2nd step: both processes stop after that step, rank 0 saves last.pt
    with both generator states, and resuming with --load_pretrained 1 ends with the uninterrupted run's weights."""
    flags = ddp_flags(embedded_dir, tmp_path, "exp")
    result = torchrun("tests/train_with_signal.py", "--ddp", "1", *flags, check=False, SIGNAL_RANK="1",
                      SIGNAL_NAME="TERM", SIGNAL_STEPS="2")
    assert result.returncode != 0 and f"exitcode  : {128 + signal.SIGTERM}" in result.stderr
    stopped = load_checkpoint(str(tmp_path / "exp" / "last.pt"))
    assert (stopped["epoch"], stopped["step_in_epoch"], len(stopped["rng"])) == (0, 2, 2)
    assert "stopped by a signal to another process at epoch 1 step 2" in (tmp_path / "exp" / "training.log").read_text()
    launch(["bash", "run_train_ddp.sh", "2", *flags, "--load_pretrained", "1"])
    assert_same_tensors(tmp_path / "exp" / "last.pt", ddp_trained / "last.pt")


def test_two_nodes_on_localhost_train_an_epoch(embedded_dir, tmp_path):
    """Two torchrun agents (one process each) meet at a c10d rendezvous, as two machines would."""
    command = ["bash", "run_train_multinode.sh", "2", "1", f"127.0.0.1:{free_port()}",
               *ddp_flags(embedded_dir, tmp_path, "exp", "--num_epochs", "1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RDZV_ID": f"test{os.getpid()}", "RDZV_TIMEOUT_S": "120"}
    nodes = [subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    log = (tmp_path / "exp" / "training.log").read_text()
    assert "epoch 1/1:" in log and "done: best validation mAP" in log
    assert load_checkpoint(str(tmp_path / "exp" / "last.pt"))["global_step"] == 3


@pytest.mark.parametrize("endpoint", ["192.0.2.1:29400", "127.0.0.1:{port}"], ids=["unreachable", "nobody_joins"])
def test_a_rendezvous_that_cannot_complete_ends_with_torchruns_error(endpoint, tmp_path):
    """An address nobody answers (192.0.2.1 is reserved for documentation), or a second node that never comes:
    torchrun gives up after RDZV_TIMEOUT_S with its rendezvous error, instead of waiting forever."""
    start = time.monotonic()
    result = launch(["bash", "run_train_multinode.sh", "2", "1", endpoint.format(port=free_port()),
                     "--save_dir", str(tmp_path / "exp")], timeout=120, check=False, RDZV_TIMEOUT_S="1")
    assert result.returncode != 0 and time.monotonic() - start < 60
    assert "RendezvousConnectionError" in result.stderr or "RendezvousTimeoutError" in result.stderr
    assert not (tmp_path / "exp").exists()  # no worker started


def test_ddp_without_torchrun_is_one_line(embedded_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        train.main(tiny_flags(embedded_dir, tmp_path, "exp", "--ddp", "1"))
    stderr = capsys.readouterr().err.strip()
    assert failed.value.code == 2 and "\n" not in stderr
    assert "--ddp 1 needs torchrun's environment" in stderr and "torchrun --nproc_per_node" in stderr


def set_torchrun_environment(monkeypatch, **extra):
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29400", **extra}.items():
        monkeypatch.setenv(name, value)


def test_restarts_with_torchruns_shared_store_are_refused(monkeypatch):
    """torchrun --max_restarts K without TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: refused before the process group
    starts, naming the variable (restarted workers could otherwise connect to the dead workers' addresses)."""
    set_torchrun_environment(monkeypatch, TORCHELASTIC_MAX_RESTARTS="3", TORCHELASTIC_USE_AGENT_STORE="True")
    with pytest.raises(UserError, match="--max_restarts 3: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"):
        init_distributed(True, timeout_s=5)


def test_more_processes_per_node_than_gpus(monkeypatch):
    set_torchrun_environment(monkeypatch, RANK="1", LOCAL_RANK="1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="2 processes on this node but 1 GPU.s.: use --nproc_per_node 1"):
        init_distributed(True, timeout_s=5)


def test_sync_batchnorm_switch(caplog):
    def model():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())

    converted = sync_batchnorm(model(), torch.device("cuda", 0))  # converting needs no GPU, running it would
    assert isinstance(converted[1], nn.SyncBatchNorm)
    on_the_cpu = sync_batchnorm(model(), torch.device("cpu"))
    assert type(on_the_cpu[1]) is nn.BatchNorm2d
    assert "sync_batchnorm ignored: SyncBatchNorm needs CUDA" in caplog.text


def test_item_seeds_depend_only_on_seed_epoch_and_index(embedded_dir, make_args):
    """The training sampler's (index, item seed) keys: an index has the same seed in a resumed epoch as in a
    full one and on any process, another one in the next epoch; through SeededItems the same key gives the same
    augmented item whatever torch's generator held, and leaves that generator as it was."""
    def keys(epoch, samples_done=0, processes=1, rank=0, seed=7):
        sampler = ResumableDistributedSampler(list(range(20)), processes, rank, shuffle=True, seed=seed,
                                              drop_last=True, pad=True)
        sampler.start_epoch(epoch, samples_done)
        return dict(sampler)

    full = keys(3)
    assert keys(3, samples_done=5).items() <= full.items()
    assert keys(3, processes=2, rank=1).items() <= full.items()
    assert len(set(full.values())) == 20 and not set(full.values()) & set(keys(4).values())
    assert keys(3, seed=8).keys() == full.keys() and keys(3, seed=8) != full

    dataset = DatasetLoader(make_args(embedded_dir, bool_apply_img_aug=1), mode="train")
    seeded = SeededItems(dataset)
    index, item_seed = next(iter(full.items()))
    index %= len(dataset)
    first = seeded[index, item_seed]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    second = seeded[index, item_seed]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[key], second[key]) for key in first)
    other = seeded[index, item_seed + 1]
    assert not torch.equal(first["images"], other["images"])  # another seed, another augmentation
