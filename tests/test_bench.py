"""Smoke tests of the benchmarks at tiny sizes, so that they keep running (their numbers are not checked here),
and checks of the pieces whose mistakes would bias a comparison."""

import argparse
import types

import numpy as np
import pytest

from bench import ddp, overhead, quality
from bench import eval as eval_bench
from bench import loader as loader_bench
from tests.test_platform import tiny_flags


def test_ddp_bench_measures_two_processes_and_their_allreduce():
    options = argparse.Namespace(batch_size=1, steps=2, warmup=1, width=64, height=64)
    result = ddp.launch(options, procs=2, threads=1)
    assert result["procs"] == 2 and result["images_per_s"] > 0 and result["buckets"] >= 1
    assert 0 < result["allreduce_s"] < result["step_s"]


def test_union_of_allreduce_intervals():
    assert ddp.union_length([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == 3.0
    assert ddp.union_length([]) == 0.0


def test_overhead_bench(capsys):
    overhead.main(["--steps", "1", "--warmup", "0", "--batch_size", "1"])
    assert "ratio Solver / bare:" in capsys.readouterr().out


def test_eval_bench(embedded_dir, tmp_path, capsys):
    eval_bench.main(["--repeats", "1", "--coco_images", "20", "--flags", *tiny_flags(embedded_dir, tmp_path)])
    out = capsys.readouterr().out
    assert "ratio full / forward:" in out and "100 per image" in out and "speed-up" in out


def test_loader_bench(capsys):
    loader_bench.main(["--samples_per_scene", "2", "--repeats", "1", "--train_steps", "1"])
    out = capsys.readouterr().out
    assert "speed-up:" in out and "the loader" in out


def test_quality_bench_without_ultralytics(tmp_path, capsys):
    quality.main(["--minutes", "0.05", "--contenders", "dstorch,fcos,retinanet", "--samples_per_scene", "2",
                  "--work_dir", str(tmp_path), "--flags", "--cfg", "data.2DObjDet.image.w=96",
                  "--cfg", "data.2DObjDet.image.h=64", "--num_cores", "0"])
    out = capsys.readouterr().out
    for name in ("dstorch", "fcos", "retinanet"):
        assert f"\n{name} " in out
    assert (tmp_path / "results.json").is_file()


def test_quality_bench_rejects_unknown_contenders(tmp_path):
    with pytest.raises(SystemExit):
        quality.main(["--contenders", "dstorch,yolov5", "--work_dir", str(tmp_path)])


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
