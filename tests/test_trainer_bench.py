"""`spinestream bench train` runs the trainer's own step through the loader and says what it measured."""
from __future__ import annotations

import json


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
