"""Smoke tests of the benchmarks at tiny sizes, so that they keep running (their numbers are not checked here)."""

import argparse

from bench import ddp


def test_ddp_bench_measures_two_processes_and_their_allreduce():
    options = argparse.Namespace(batch_size=1, steps=2, warmup=1, width=64, height=64)
    result = ddp.launch(options, procs=2, threads=1)
    assert result["procs"] == 2 and result["images_per_s"] > 0 and result["buckets"] >= 1
    assert 0 < result["allreduce_s"] < result["step_s"]


def test_union_of_allreduce_intervals():
    assert ddp.union_length([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == 3.0
    assert ddp.union_length([]) == 0.0
