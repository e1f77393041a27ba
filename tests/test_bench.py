"""Smoke tests of the benchmarks at tiny sizes, so that they keep running (their numbers are not checked here),
marked `bench`: they run with `pytest --bench` (CI's command), not in a plain `pytest`; and checks of the pieces
whose mistakes would bias a comparison, which always run."""

import argparse
import json
import types

import numpy as np
import pytest
import torch

from bench import ddp, overhead, quality, throughput
from bench import eval as eval_bench
from bench import loader as loader_bench
from tests.conftest import tiny_flags


@pytest.mark.bench
def test_ddp_bench_measures_two_processes_and_their_allreduce():
    options = argparse.Namespace(batch_size=1, steps=2, warmup=1, width=64, height=64)
    result = ddp.launch(options, procs=2, threads=1)
    assert result["procs"] == 2 and result["images_per_s"] > 0 and result["buckets"] >= 1
    assert 0 < result["allreduce_s"] < result["step_s"]


def test_union_of_allreduce_intervals():
    assert ddp.union_length([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == 3.0
    assert ddp.union_length([]) == 0.0


@pytest.mark.bench
def test_overhead_bench(capsys):
    overhead.main(["--steps", "1", "--warmup", "0", "--batch_size", "1"])
    assert "ratio Solver / bare:" in capsys.readouterr().out


@pytest.mark.bench
def test_eval_bench(embedded_dir, tmp_path, capsys):
    eval_bench.main(["--repeats", "1", "--coco_images", "20", "--flags", *tiny_flags(embedded_dir, tmp_path)])
    out = capsys.readouterr().out
    assert "ratio full / forward:" in out and "100 per image" in out and "speed-up" in out


@pytest.mark.bench
def test_throughput_bench(capsys):
    throughput.main(["--samples_per_scene", "2", "--steps", "1", "--workers", "1", "--sizes", "96x64",
                     "--jpeg_size", "192x108"])
    row = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert row[0] == "96x64" and row[-4] == "0" and row[-3].endswith("x")  # 0 host reads per step
    assert row[8] == row[10] == "-"  # no copy to a device and no GPU busy share on the CPU
    before, now = (float(rate) for rate in row[3].split("->"))  # augment: transforms.v2, OpenCV
    assert before > 0 and now > 0
    assert float(row[-2]) > 0 and float(row[-1]) > 0  # decode "device": the loader and the decode


def test_device_busy_seconds_of_cpu_work():
    """The union of the profiler's intervals on the device: on the CPU, the ops' own (nested ops count once)."""
    seconds = throughput.device_busy_seconds(lambda: torch.ones(512, 512) @ torch.ones(512, 512), torch.device("cpu"))
    assert 0 < seconds < 5


@pytest.mark.bench
def test_loader_bench(capsys):
    loader_bench.main(["--samples_per_scene", "2", "--repeats", "1", "--train_steps", "1"])
    out = capsys.readouterr().out
    assert "speed-up:" in out and "the loader" in out


QUALITY_TINY = ["--samples_per_scene", "2", "--flags", "--cfg", "data.2DObjDet.image.w=96", "--cfg",
                "data.2DObjDet.image.h=64", "--num_cores", "0"]


@pytest.mark.bench
def test_quality_protocol_runs_interleaved_and_resumes(tmp_path, capsys):
    """Each run stores its result as it ends; the seeds rotate the contenders' order; a second invocation runs
    nothing again and prints the same table (mean and spread over the seeds)."""
    argv = ["--budgets", "0.02", "--seeds", "0,1", "--contenders", "dstorch,fcos", "--work_dir", str(tmp_path),
            *QUALITY_TINY]
    quality.main(argv)
    out = capsys.readouterr().out
    runs = [line.split(":")[0] for line in out.splitlines() if line.startswith("0.02 min, ")]
    assert runs == ["0.02 min, dstorch, seed 0", "0.02 min, fcos, seed 0", "0.02 min, fcos, seed 1",
                    "0.02 min, dstorch, seed 1"]
    paths = sorted((tmp_path / "runs" / "0.02min").glob("*.json"))
    assert [path.name for path in paths] == ["dstorch_seed0.json", "dstorch_seed1.json", "fcos_seed0.json",
                                             "fcos_seed1.json"]
    for path in paths:
        result = json.loads(path.read_text())
        assert result["steps"] >= 1 and result["images_per_s"] > 0 and result["threads"] == torch.get_num_threads()
        assert result["recipe"] == quality.RECIPES[path.name.split("_")[0]] and result["recipe_source"] == "not swept"
        assert set(quality.METRICS) <= set(result) and "torch" in result["versions"]
    table = out[out.index("0.02 min of training each"):]
    for name in ("dstorch", "fcos"):
        assert f"\n{name:<30}{2:>6}{'not swept':>10}" in table  # contender, seeds, recipe
    written = [path.stat().st_mtime_ns for path in paths]
    quality.main(argv)
    assert capsys.readouterr().out.endswith(table)
    assert [path.stat().st_mtime_ns for path in paths] == written


@pytest.mark.bench
def test_quality_sweep_picks_the_best_val_recipe(tmp_path, capsys, monkeypatch):
    """The sweep scores every grid point on val, keeps the best, and the protocol then trains with it."""
    calls = []

    def fake_run(name, recipe, seed, budget_s, split, data, threads, run_dir):
        calls.append((name, recipe["lr"], split))
        value = 1.0 - abs(recipe["lr"] - 2 * quality.RECIPES[name]["lr"]) - abs(recipe["warmup"] - 0.075)
        return {"steps": 1, "epochs": 1.0, "train_s": 1.0, "images_per_s": 1.0, "threads": threads,
                "versions": {"torch": "x"}, **{key: value for key in quality.METRICS}}

    monkeypatch.setattr(quality, "run_one", fake_run)
    quality.main(["--sweep", "--sweep_lr_scales", "1,2", "--sweep_warmup_scales", "0.5,1", "--budgets", "1",
                  "--seeds", "0", "--contenders", "dstorch", "--work_dir", str(tmp_path), *QUALITY_TINY])
    assert [split for _, _, split in calls] == ["val"] * 4 + ["test"]
    chosen = json.loads((tmp_path / "runs" / "sweep" / "dstorch.json").read_text())["recipe"]
    assert chosen == pytest.approx({"lr": 6e-3, "warmup": 0.075})
    result = json.loads((tmp_path / "runs" / "1min" / "dstorch_seed0.json").read_text())
    assert result["recipe"] == chosen and result["recipe_source"] == "swept"


@pytest.mark.parametrize("flags", [["--contenders", "dstorch,yolov5"], ["--budgets", "10,ten"], ["--budgets", "0"],
                                   ["--seeds", "-1"], ["--sweep_lr_scales", ""], ["--threads", "0"]])
def test_quality_bench_rejects_bad_flags(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        quality.main([*flags, "--work_dir", str(tmp_path)])
    assert exit_info.value.code == 2 and flags[0] in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fcos", "retinanet"])
def test_torchvision_contenders_are_sized_for_the_input(kind):
    """P3-P6 at 320x192; FCOS's anchors are the strides (its regression unit), RetinaNet's 16-203 px."""
    model = quality.torchvision_detector(kind, 320, 192, sized_for_input=True)
    sizes = model.anchor_generator.sizes
    assert len(sizes) == 4
    if kind == "fcos":
        assert sizes == ((8,), (16,), (32,), (64,))
    else:
        assert sizes[0][0] == 16 and round(sizes[-1][-1]) == 203
    model.train()
    target = {"boxes": torch.tensor([[10.0, 10, 30, 40], [100, 50, 290, 180]]), "labels": torch.tensor([1, 2])}
    losses = model([torch.randn(3, 192, 320)], [target])
    assert all(torch.isfinite(value) for value in losses.values())


def test_yolo_labels_are_the_dataset_boxes(tmp_path):
    """The YOLOv8n contender trains on the same boxes: class, centre and size normalized by the image size."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jpg").write_bytes(b"")
    dataset = types.SimpleNamespace(image_ids=np.array([7]), image_files=np.array([[b"a.jpg"]]),
                                    image_sizes=np.array([[[800, 450]]]), dataroot=str(tmp_path / "data"),
                                    boxes=np.array([[100.0, 50.0, 300.0, 250.0]], dtype=np.float32),
                                    labels=np.array([3]), box_start=np.array([0, 1]))
    paths = quality.write_yolo_split(dataset, tmp_path / "split")
    assert paths == [str(tmp_path / "split" / "images" / "000007.jpg")]
    label, cx, cy, w, h = (tmp_path / "split" / "labels" / "000007.txt").read_text().split()
    assert label == "3"
    assert np.allclose([float(cx), float(cy), float(w), float(h)], [200 / 800, 150 / 450, 200 / 800, 200 / 450])


@pytest.mark.parametrize("step_s, first_plans", [
    (lambda step, now: 5.0 if step <= 10 else 1.0, [(10 + int(950 * 0.98 / 5.0), 10), (60 + 882, 60)]),
    (lambda step, now: 1.25 if now < 600 else 0.8,
     [(10 + int(987.5 * 0.98 / 1.25), 10), (80 + int(900 * 0.98 / 1.25), 80)]),
], ids=["slow_first_epoch", "faster_later"])
def test_quality_schedule_is_planned_again_as_step_times_change(monkeypatch, step_s, first_plans):
    """A 1000 s budget. Slow first epoch: the first 10 steps take 5 s (a cold page cache), the rest 1 s; planned
    from the first steps only, the run would end after about 230 s. Faster later: 1.25 s per step, 0.8 s after
    600 s. Planned again at 10, 30, 50, 70 and 90 % of the budget, both train at least 95 % of it."""
    clock = {"now": 0.0, "steps": 0}

    def step(batch):
        clock["steps"] += 1
        clock["now"] += step_s(clock["steps"], clock["now"])

    monkeypatch.setattr(quality.time, "monotonic", lambda: clock["now"])
    plans = []
    steps, seconds = quality.train_within(1000.0, [None] * 7, step, lambda total, done: plans.append((total, done)))
    assert plans[:2] == first_plans and len(plans) == 1 + len(quality.REPLAN_AT)
    assert plans[-1][0] == steps and quality.FULL_BUDGET * 1000 <= seconds <= 1000
    short = {"train_s": 600.0, "budget_s": 1000.0, "full_budget": False}
    assert "trained 600 s of 1000" in quality.budget_flag(short) and quality.budget_flag({"full_budget": True}) == ""


def test_quality_replanned_schedule_continues_where_the_first_stood(monkeypatch):
    """After a re-plan, the learning rate is that of the new OneCycle at the steps already done in schedule."""
    model = torch.nn.Linear(2, 1)
    args = {"lr_schd_type": "OnecycleLR", "learning_rate": 1e-2, "pct_start": 0.3, "div_factor": 25.0,
            "final_div_factor": 1e4, "config": {"schedulers": {}}}
    parts = types.SimpleNamespace(args=args, optimizer=torch.optim.SGD(model.parameters(), lr=1e-2),
                                  scheduler=None, learning_rate_step=lambda: parts.scheduler.step(),
                                  evaluated_model=lambda: model)

    def train_within(budget_s, loader, step, on_length_known):
        for _ in range(10):
            step(None)
        on_length_known(100, 10)
        for _ in range(20):
            parts.optimizer.step()
            step(None)
        on_length_known(400, 30)
        return 30, budget_s

    reference = torch.optim.lr_scheduler.OneCycleLR(torch.optim.SGD(model.parameters(), lr=1e-2), max_lr=1e-2,
                                                    total_steps=400, pct_start=0.3)
    for _ in range(20):
        reference.optimizer.step()
        reference.step()
    monkeypatch.setattr(quality, "train_within", train_within)
    quality.predictor_after(parts, lambda batch: None, [], 60.0, lambda trained: trained)
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0])
