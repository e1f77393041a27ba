"""Smoke tests of the benchmarks at tiny sizes, so that they keep running (their numbers are not checked here),
marked `bench`: they run with `pytest --bench` (CI's command), not in a plain `pytest`; and checks of the pieces
whose mistakes would bias a comparison, which always run."""

import argparse
import json
import os
import re
import shlex
import subprocess
import types

import numpy as np
import pytest
import torch

import test as test_script
import train
from bench import ddp, mono3d, overhead, quality, recipes, results, suite, throughput
from bench import eval as eval_bench
from bench import loader as loader_bench
from dataset.NuscenesDataset import synthetic
from tests.conftest import PROJECT_ROOT, tiny_flags


def recorded_text(results_dir, name: str, argv: list) -> str:
    """The results file that bench.<name> wrote in `results_dir`, checked for its title and stamp: date, commit,
    machine, versions and the command with `argv`; returns its text."""
    text = (results_dir / f"{name}.md").read_text()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert text.startswith(f"# bench.{name}\n\n- date: ")
    assert re.search(r"^- date: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", text, re.MULTILINE)
    assert f"- commit: {head.stdout.strip() or 'unknown'}" in text
    assert f"cores ({len(os.sched_getaffinity(0))} usable by this process)" in text
    assert f"torch {torch.__version__}, torchvision " in text
    assert f"- command: `{shlex.join(['python', '-m', f'bench.{name}', *argv])}`" in text
    assert "```text\n" in text and text.endswith("```\n")
    return text


@pytest.mark.bench
def test_ddp_bench_measures_two_processes_and_their_allreduce():
    options = argparse.Namespace(batch_size=1, steps=2, warmup=1, width=64, height=64)
    result = ddp.launch(options, procs=2, threads=1)
    assert result["procs"] == 2 and result["images_per_s"] > 0 and result["buckets"] >= 1
    assert 0 < result["allreduce_s"] < result["step_s"]


def test_ddp_bench_records_its_table(tmp_path, capsys, monkeypatch):
    """The parent prints and records a row per configuration (the launches are faked: the test above runs one)."""
    def launch(options, procs, threads):
        return {"procs": procs, "threads": threads, "step_s": 2.0 / procs, "images_per_s": 6.0 * procs,
                "allreduce_s": 0.1 if procs > 1 else 0.0, "buckets": procs - 1}

    monkeypatch.setattr(ddp, "launch", launch)
    argv = ["--steps", "2", "--results_dir", str(tmp_path)]
    ddp.main(argv)
    row = f"{2:>9} {1:>7} {1.0:>7.2f} {12.0:>9.2f} {2.0:>6.2f}x {0.1:>18.3f} {'10%':>13} {1:>7}"
    assert capsys.readouterr().out.splitlines()[-1] == row
    assert row in recorded_text(tmp_path, "ddp", argv)


def test_union_of_allreduce_intervals():
    assert ddp.union_length([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == 3.0
    assert ddp.union_length([]) == 0.0


@pytest.mark.bench
def test_overhead_bench(tmp_path, capsys):
    argv = ["--steps", "1", "--warmup", "0", "--batch_size", "1", "--results_dir", str(tmp_path)]
    overhead.main(argv)
    assert "ratio Solver / bare:" in capsys.readouterr().out
    assert "\nratio Solver / bare: " in recorded_text(tmp_path, "overhead", argv)


@pytest.mark.bench
def test_eval_bench(embedded_dir, tmp_path, capsys):
    argv = ["--repeats", "1", "--coco_images", "20", "--results_dir", str(tmp_path / "results"),
            "--flags", *tiny_flags(embedded_dir, tmp_path)]
    eval_bench.main(argv)
    out = capsys.readouterr().out
    assert "ratio full / forward:" in out and "100 per image" in out and "speed-up" in out
    assert "\nratio full / forward: " in recorded_text(tmp_path / "results", "eval", argv)


@pytest.mark.bench
def test_throughput_bench(tmp_path, capsys):
    argv = ["--samples_per_scene", "2", "--steps", "1", "--workers", "1", "--sizes", "96x64", "--jpeg_size", "192x108",
            "--results_dir", str(tmp_path)]
    throughput.main(argv)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] in recorded_text(tmp_path, "throughput", argv)
    row = out.strip().splitlines()[-1].split()
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
def test_loader_bench(tmp_path, capsys):
    argv = ["--samples_per_scene", "2", "--repeats", "1", "--train_steps", "1", "--jpeg_size", "320x180",
            "--results_dir", str(tmp_path)]
    loader_bench.main(argv)
    out = capsys.readouterr().out
    assert "speed-up:" in out and "the loader" in out
    assert "320x180 JPEGs -> " in out and "\nspeed-up: " in recorded_text(tmp_path, "loader", argv)


QUALITY_TINY = ["--samples_per_scene", "2", "--flags", "--cfg", "data.2DObjDet.image.w=96", "--cfg",
                "data.2DObjDet.image.h=64", "--num_cores", "0"]


@pytest.mark.bench
def test_quality_protocol_runs_equal_steps_interleaved_and_resumes(tmp_path, capsys, embedded_dir, monkeypatch):
    """Each run stores its result and provenance as it ends; every contender makes exactly the budget's steps, with
    as many EMA updates; the seeds rotate the contenders' order; a second invocation runs nothing again and prints
    the same table; a result of another code version is stale: left out of the table, named, and run again."""
    (tmp_path / "nuscenes_2").symlink_to(embedded_dir)  # the session's dataset of 2 keyframes per scene, read only
    monkeypatch.setattr(quality, "code_version", lambda: "abc1234")
    argv = ["--epochs", "1", "--seeds", "0,1", "--contenders", "dstorch,fcos", "--work_dir", str(tmp_path),
            "--results_dir", str(tmp_path / "results"), *QUALITY_TINY]
    quality.main(argv)
    out = capsys.readouterr().out
    runs = [line.split(":")[0] for line in out.splitlines() if line.startswith("1 epochs, ")]
    assert runs == ["1 epochs, dstorch, seed 0", "1 epochs, fcos, seed 0", "1 epochs, fcos, seed 1",
                    "1 epochs, dstorch, seed 1"]
    paths = sorted((tmp_path / "runs" / "1ep").glob("*.json"))
    assert [path.name for path in paths] == ["dstorch_seed0.json", "dstorch_seed1.json", "fcos_seed0.json",
                                             "fcos_seed1.json"]
    steps_per_epoch = 12 // 2  # 12 training samples (2 per scene, 3 of 4 in train), batches of 2
    for path in paths:
        result = json.loads(path.read_text())
        assert result["steps"] == result["ema_updates"] == steps_per_epoch and result["epochs"] == 1
        assert result["images_per_s"] > 0 and result["threads"] == torch.get_num_threads()
        assert set(quality.PROVENANCE) <= set(result) and result["code_version"] == "abc1234" and result["clean"]
        assert len(result["load_average"]) == 2 and result["detections_per_image"] > 0
        assert result["recipe"] == quality.RECIPES[path.name.split("_")[0]] and result["recipe_source"] == "not swept"
        assert set(quality.METRICS) <= set(result) and "torch" in result["versions"]
    table = out[out.index("1 epochs of training each (equal optimizer steps)"):]
    for name in ("dstorch", "fcos"):
        for seed in (0, 1):
            assert f"\n{name:<30}{seed:>5}{'not swept':>10}{steps_per_epoch:>7}{steps_per_epoch:>7}" in table
    assert "fcos (mean ± half range)" in table and "steps differ" not in table and "stale" not in table
    assert table.strip() in recorded_text(tmp_path / "results", "quality", argv)
    written = [path.stat().st_mtime_ns for path in paths]
    quality.main(argv)
    assert capsys.readouterr().out.endswith(table)
    assert [path.stat().st_mtime_ns for path in paths] == written

    monkeypatch.setattr(quality, "code_version", lambda: "def5678")
    quality.main([*argv[:argv.index("--work_dir")], "--table", *argv[argv.index("--work_dir"):]])
    stale = capsys.readouterr().out
    assert "\ndstorch " not in stale and "fcos_seed1.json" in stale
    assert "dstorch_seed0.json (code version abc1234)" in stale
    quality.main([*argv[:2], "--seeds", "0", "--contenders", "dstorch", *argv[argv.index("--work_dir"):]])
    assert json.loads(paths[0].read_text())["code_version"] == "def5678"  # run again on this version
    assert json.loads(paths[1].read_text())["code_version"] == "abc1234"  # not asked for: kept, still stale


def test_quality_code_version_follows_the_code_not_results_or_docs(tmp_path):
    """Committing results files or Markdown keeps the code version, so stored runs stay current; a change to the
    code, uncommitted (a hash of the diff) or committed, is a new version."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "train.py").write_text("steps = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "code")
    first = quality.code_version(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{10}", first)
    (tmp_path / "bench" / "results" / "quality.md").write_text("table\n")
    (tmp_path / "README.md").write_text("quote\n")
    git("add", ".")
    git("commit", "-qm", "results")
    assert quality.code_version(tmp_path) == first
    (tmp_path / "README.md").write_text("quote 2\n")
    assert quality.code_version(tmp_path) == first
    (tmp_path / "train.py").write_text("steps = 2\n")
    dirty = quality.code_version(tmp_path)
    assert re.fullmatch(first + r" \(dirty [0-9a-f]{8}\)", dirty)
    (tmp_path / "train.py").write_text("steps = 3\n")
    assert quality.code_version(tmp_path) not in (first, dirty)
    git("commit", "-qam", "code 2")
    assert quality.code_version(tmp_path) not in (first, dirty) and "dirty" not in quality.code_version(tmp_path)
    assert quality.code_version(tmp_path / "bench" / "results" / "missing") == "unknown"


@pytest.mark.bench
def test_quality_equal_time_plans_its_schedule(tmp_path, capsys, embedded_dir):
    """The third view: a wall-clock budget, the schedule planned from the step time."""
    (tmp_path / "nuscenes_2").symlink_to(embedded_dir)
    quality.main(["--epochs", "", "--budgets", "0.02", "--seeds", "0", "--contenders", "dstorch", "--work_dir",
                  str(tmp_path), "--results_dir", str(tmp_path / "results"), *QUALITY_TINY])
    result = json.loads((tmp_path / "runs" / "0.02min" / "dstorch_seed0.json").read_text())
    assert result["budget"] == {"minutes": 0.02} and result["steps"] >= 1
    assert "0.02 min of training each (equal wall-clock time)" in capsys.readouterr().out


@pytest.mark.bench
def test_quality_sweep_picks_the_best_val_recipe(tmp_path, capsys, monkeypatch):
    """The sweep scores every grid point on val at the first equal-steps budget, then YOLOv8n's mosaic and rect
    options at its best point, keeps the best, and the protocol then trains with it."""
    calls = []

    def fake_run(name, recipe, seed, budget, split, data, threads, run_dir):
        calls.append((name, recipe, split, budget))
        value = 1.0 - abs(recipe["lr"] - 2 * quality.RECIPES[name]["lr"]) - abs(recipe["warmup"] - 0.075)
        value += 0.1 * recipe.get("mosaic", False)
        return {"steps": 1, "ema_updates": 1, "epochs": 1.0, "train_s": 1.0, "images_per_s": 1.0, "threads": threads,
                "detections_per_image": 1.0, "versions": {"torch": "x"}, "code_version": data["version"], "clean": True,
                "settings": data["settings"], "budget": budget, "invocation": data["invocation"], "date": "d",
                "load_average": [0.0, 0.0], **{key: value for key in quality.METRICS}}

    monkeypatch.setattr(quality, "run_one", fake_run)
    monkeypatch.setattr(quality, "benchmark_data", lambda options, work_dir: {
        "work_dir": work_dir, "train": [None] * 12, "args": {"batch_size": 2}})
    argv = ["--sweep_lr_scales", "1,2", "--sweep_warmup_scales", "0.5,1", "--epochs", "3", "--seeds", "0",
            "--contenders", "dstorch,yolov8n", "--work_dir", str(tmp_path), "--results_dir", str(tmp_path / "results"),
            *QUALITY_TINY]
    quality.main(argv)  # the protocol before a sweep: the starting recipes
    assert [split for _, _, split, _ in calls] == ["test"] * 2
    calls.clear()
    quality.main(["--sweep", *argv])  # the sweep, then the protocol's runs again with its recipes
    assert [split for _, _, split, _ in calls] == ["val"] * 10 + ["test"] * 2
    assert all(budget == {"epochs": 3} for *_, budget in calls)
    assert [recipe for name, recipe, split, _ in calls if name == "yolov8n" and split == "val"][-2:] == [
        {"lr": 4e-3, "warmup": 0.25, "mosaic": True, "rect": False},
        {"lr": 4e-3, "warmup": 0.25, "mosaic": False, "rect": True}]
    chosen = json.loads((tmp_path / "runs" / "sweep" / "dstorch.json").read_text())["recipe"]
    assert chosen == pytest.approx({"lr": 6e-3, "warmup": 0.075})
    assert json.loads((tmp_path / "runs" / "sweep" / "yolov8n.json").read_text())["recipe"]["mosaic"] is True
    result = json.loads((tmp_path / "runs" / "3ep" / "dstorch_seed0.json").read_text())
    assert result["recipe"] == chosen and result["recipe_source"] == "swept"
    choice_path = tmp_path / "runs" / "sweep" / "dstorch.json"  # a later sweep chooses another recipe
    choice_path.write_text(json.dumps({**json.loads(choice_path.read_text()), "recipe": {"lr": 1e-3, "warmup": 0.1}}))
    capsys.readouterr()
    quality.main(["--table", *argv])
    out = capsys.readouterr().out
    assert "\ndstorch " not in out and "\nyolov8n " in out and "dstorch_seed0.json (recipe " in out


@pytest.mark.parametrize("flags", [["--contenders", "dstorch,yolov5"], ["--budgets", "10,ten"], ["--budgets", "0"],
                                   ["--epochs", "-14"], ["--epochs", ""], ["--seeds", "-1"],
                                   ["--sweep_lr_scales", ""], ["--threads", "0"]])
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
    short = {"train_s": 600.0, "budget": {"minutes": 1000 / 60}, "full_budget": False}
    assert "trained 600 s of 1000" in quality.budget_flag(short) and quality.budget_flag({"full_budget": True}) == ""


def test_quality_replanned_schedule_continues_where_the_first_stood(monkeypatch):
    """After a re-plan, the learning rate is that of the new OneCycle at the steps already done in schedule."""
    model = torch.nn.Linear(2, 1)
    args = {"lr_schd_type": "OnecycleLR", "learning_rate": 1e-2, "pct_start": 0.3, "div_factor": 25.0,
            "final_div_factor": 1e4, "config": {"schedulers": {}}}
    parts = types.SimpleNamespace(args=args, optimizer=torch.optim.SGD(model.parameters(), lr=1e-2),
                                  scheduler=None, learning_rate_step=lambda: parts.scheduler.step(),
                                  evaluated_model=lambda: model, ema_updates=0)

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
    quality.predictor_after(parts, lambda batch: None, [], {"minutes": 1.0}, lambda trained: trained)
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(reference.get_last_lr()[0])


def test_quality_equal_steps_anneal_over_exactly_the_budget():
    """3 epochs of a 7-batch loader: 21 steps, the OneCycle schedule built over 21 before the first, the last step
    taken at its final learning rate (peak / div_factor / final_div_factor)."""
    model = torch.nn.Linear(2, 1)
    args = {"lr_schd_type": "OnecycleLR", "learning_rate": 1e-2, "pct_start": 0.3, "div_factor": 25.0,
            "final_div_factor": 1e4, "config": {"schedulers": {}}}
    rates = []
    parts = types.SimpleNamespace(args=args, optimizer=torch.optim.SGD(model.parameters(), lr=1e-2), scheduler=None,
                                  evaluated_model=lambda: model, ema_updates=0)
    parts.learning_rate_step = lambda: parts.scheduler.step()

    def step(batch):  # a solver's train step: the optimizer's, then an EMA update
        rates.append(parts.optimizer.param_groups[0]["lr"])
        parts.optimizer.step()
        parts.ema_updates += 1

    trained = quality.predictor_after(parts, step, [None] * 7, {"epochs": 3}, lambda model: model)
    assert trained["steps"] == len(rates) == 21 and trained["ema_updates"] == 21
    assert rates[0] == pytest.approx(1e-2 / 25) and max(rates) == pytest.approx(1e-2, rel=0.05)
    assert rates[-1] == pytest.approx(1e-2 / 25 / 1e4)


RECIPE_TINY = ["--num_epochs", "1", "--samples_per_scene", "2", "--jpeg_size", "320x180"]
RECIPE_TINY_FLAGS = ["--flags", "--batch_size", "4", "--num_cores", "0", "--cfg", "data.2DObjDet.image.w=96", "--cfg",
                     "data.2DObjDet.image.h=64", "--cfg", 'data.2DObjDet.cameras=["CAM_FRONT"]']


def in_process(step: str, command: list) -> float:
    """bench.recipes.timed with the three programs run in this process (their main functions), not as new Python
    processes: the bench's orchestration and table are what this test checks, in a third of the time."""
    programs = {"-m": lambda args: synthetic.main(args[1:]), "train.py": train.main, "test.py": test_script.main}
    programs[command[0]](command[1:])
    return 1.0


@pytest.mark.bench
def test_recipes_bench_runs_the_quick_start_from_nothing(tmp_path, capsys, monkeypatch):
    """Dataset, train.py and test.py in the work folder, then their times and metrics."""
    monkeypatch.setattr(recipes, "timed", in_process)
    argv = [*RECIPE_TINY, "--work_dir", str(tmp_path / "work"), "--results_dir", str(tmp_path / "results"),
            *RECIPE_TINY_FLAGS]
    recipes.main(argv)
    out = capsys.readouterr().out
    train = re.search(r"^train +[\d.]+  python train.py --exp_id 0 --gpu_num 0 --dataset_dir DIR/nuscenes --save_dir "
                      r"DIR/exp --cfg data.2DObjDet.label_cache_dir=DIR/cache --num_epochs 1 --batch_size 4 ", out,
                      re.MULTILINE)
    assert train and re.search(r"^test +[\d.]+  python test.py --save_dir DIR/exp --dataset_dir DIR/nuscenes --cfg "
                               r"data.2DObjDet.label_cache_dir=DIR/cache$", out, re.MULTILINE)
    assert "\nepochs: 1\nlast validation (epoch 1): mAP " in out and "\ntest (best.pt, epoch 1): mAP " in out
    assert (tmp_path / "work" / "nuscenes" / "v1.0-mini").is_dir() and (tmp_path / "work" / "exp" / "best.pt").exists()
    assert train.group(0) in recorded_text(tmp_path / "results", "recipes", argv)
    with pytest.raises(SystemExit) as exit_info:  # the work folder now holds a recipe's files
        recipes.main(argv)
    assert exit_info.value.code == 2 and "--work_dir" in capsys.readouterr().err


@pytest.mark.bench
def test_suite_bench_times_the_readme_command_on_a_clone(tmp_path, capsys):
    argv = ["--results_dir", str(tmp_path), "--pytest_args", "tests/test_coco_eval.py", "-k",
            "test_undefined_aps_are_none_not_zero"]
    suite.main(argv)
    out = capsys.readouterr().out
    command = re.search(r"; command: (.*)$", out, re.MULTILINE).group(1)
    assert command.startswith("pip install -r requirements-dev.txt && python -m pytest")  # the README's
    assert command.endswith(f" --durations=25 {shlex.join(argv[3:])}")
    assert re.search(r"^HEAD +[0-9a-f]{7} +1 +\d+:\d\d\.\d  \d+ passed, \d+ deselected in ", out, re.MULTILINE)
    assert "\nslowest durations of HEAD " in recorded_text(tmp_path, "suite", argv)


def test_suite_bench_runs_the_revisions_in_turn(tmp_path, capsys, monkeypatch):
    """Each repeat runs every revision once, so that a drift of the machine's speed hits them alike (the runs are
    faked: the smoke test above runs one)."""
    def run_suite(revision, pytest_args, folder):
        return {"commit": revision * 7, "command": "pip ... pytest", "seconds": 61.0, "summary": "1 passed",
                "durations": [f"1.00s call     tests/test_{revision}.py::test"]}

    monkeypatch.setattr(suite, "run_suite", run_suite)
    suite.main(["--revisions", "a,b", "--repeats", "2", "--results_dir", str(tmp_path)])
    rows = re.findall(r"^([ab]) +[ab]{7} +(\d) +1:01\.0  1 passed$", capsys.readouterr().out, re.MULTILINE)
    assert rows == [("a", "1"), ("b", "1"), ("a", "2"), ("b", "2")]


def test_results_file_holds_the_output_of_a_finished_benchmark_only(tmp_path, capsys):
    """The output is still printed; the file is written when the block ends, not after an error."""
    with results.recorded("demo", ["--size", "a b"], str(tmp_path / "new")):
        print("row 1")
    assert capsys.readouterr().out == "row 1\n"
    text = (tmp_path / "new" / "demo.md").read_text()
    assert "- command: `python -m bench.demo --size 'a b'`\n" in text and text.endswith("\n```text\nrow 1\n```\n")
    with results.recorded("demo", [], str(tmp_path), "demo_other"):  # another file name, as bench.recipes' per recipe
        print("row 2")
    assert (tmp_path / "demo_other.md").read_text().startswith("# bench.demo\n")
    capsys.readouterr()
    with pytest.raises(RuntimeError), results.recorded("failed", [], str(tmp_path)):
        print("half a table")
        raise RuntimeError
    assert not (tmp_path / "failed.md").exists()


def test_commit_says_dirty_for_changed_tracked_files_only(tmp_path, monkeypatch):
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    monkeypatch.setattr(results, "PROJECT_ROOT", tmp_path)
    assert results.commit() == "unknown"
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "tracked.txt").write_text("1")
    subprocess.run([*git, "add", "tracked.txt"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True)
    (tmp_path / "untracked.txt").write_text("new")
    assert results.commit() == head.stdout.strip()
    (tmp_path / "tracked.txt").write_text("2")
    assert results.commit() == f"{head.stdout.strip()} (dirty)"


@pytest.mark.bench
def test_mono3d_bench_scores_mono3d_and_its_references(tmp_path, capsys, monkeypatch):
    """Dataset, train.py and test.py of the 3D task, then the devkit's scores of the ground truth, the two naive
    lifts and Mono3D, its AP per class and its training curve."""
    monkeypatch.setattr(mono3d, "timed", in_process)
    argv = [*RECIPE_TINY, "--work_dir", str(tmp_path / "work"), "--results_dir", str(tmp_path / "results"),
            *[flag.replace("2DObjDet", "3DObjDet") for flag in RECIPE_TINY_FLAGS]]
    mono3d.main(argv)
    out = capsys.readouterr().out
    truth = re.search(r"^\| ground truth \| ([\d.]+) \| ([\d.]+) \|", out, re.MULTILINE)
    assert truth and 0 < float(truth.group(2)) <= 1.0
    for row in ("true 2D boxes, class-mean depth and size", "true 2D boxes, depth from their height",
                "Mono3D (best.pt, epoch 1)"):
        assert re.search(rf"^\| {re.escape(row)}.* \| [\d.]+ \| [\d.]+ \|", out, re.MULTILINE), row
    assert re.search(r"^\| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, re.MULTILINE)
    assert "car" in out and "train.py --app_mode 3DObjDet" in recorded_text(tmp_path / "results", "mono3d", argv)
