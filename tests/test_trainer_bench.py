"""`spinestream bench train` runs the trainer's own step through the loader and says what it measured."""
from __future__ import annotations

import json

import pytest


def test_bench_train_on_the_cpu(shards, tmp_path):
    from spinestream.benchmarks.train import main

    assert main(["--shards", str(shards), "--steps", "3", "--warmup", "1", "--results", str(tmp_path),
                 "--set", "loader.image_size=48", "--set", "loader.batch_size=8", "--set", "train.batch_size=8",
                 "--set", "loader.augment.p_clahe=0", "--set", "loader.num_threads=1",
                 "--set", "data.val_fold=1"]) == 0
    res = json.loads((tmp_path / "train.json").read_text())
    for line in ("model_only", "through_loader"):
        assert res[line]["steps"] == 3 and res[line]["images"] == 3 * res["batch_size"]
        assert res[line]["images_per_s"] > 0
    assert res["device_memory_used_gib"] is None and "CPU run" in res["memory_note"]
    assert "EMA" in res["timed"]


def test_scaling_table_reports_per_rank_total_and_efficiency(tmp_path):
    import argparse

    from spinestream.benchmarks.train import group_rates, scaling_report

    def rank(r, world, images, seconds):
        m = {"images": images, "seconds": seconds, "images_per_s": images / seconds}
        return {"rank": r, "world": world, "model_only": m, "through_loader": m, "batch_size": 8, "model": "m",
                "image_size": 48, "precision": "fp32", "loader": "torch", "device": "cpu", "device_name": "cpu"}

    one = [rank(0, 1, 100, 1.0)]
    two = [rank(0, 2, 100, 1.25), rank(1, 2, 100, 1.6)]  # the slower rank sets the group's time
    g = group_rates(two, "model_only")
    assert g["per_rank"] == [80.0, 62.5] and g["total"] == 200 / 1.6
    groups = {n: {"ranks": rs, "model_only": group_rates(rs, "model_only"),
                  "through_loader": group_rates(rs, "through_loader")} for n, rs in ((1, one), (2, two))}
    args = argparse.Namespace(results=tmp_path, threads_per_rank=1, steps=3)
    assert scaling_report(groups, args) == 0
    res = json.loads((tmp_path / "train_scaling.json").read_text())
    assert res["groups"]["1"]["model_only"]["efficiency"] == 1.0
    assert res["groups"]["2"]["model_only"]["efficiency"] == (200 / 1.6) / (2 * 100)
    assert (tmp_path / "train_scaling.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_train_scaling_runs_torchrun_groups(shards, tmp_path):
    from spinestream.benchmarks.train import main

    assert main(["--nproc", "1", "2", "--shards", str(shards), "--steps", "3", "--warmup", "1", "--results",
                 str(tmp_path), "--set", "loader.image_size=48", "--set", "loader.batch_size=8", "--set",
                 "train.batch_size=8", "--set", "loader.augment.p_clahe=0", "--set", "loader.num_threads=1",
                 "--set", "data.val_fold=1"]) == 0
    res = json.loads((tmp_path / "train_scaling.json").read_text())
    assert set(res["groups"]) == {"1", "2"}
    assert len(res["groups"]["2"]["through_loader"]["per_rank"]) == 2
    assert res["groups"]["2"]["model_only"]["total"] > 0
