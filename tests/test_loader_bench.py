"""``spinestream bench loader`` runs end to end on tiny shards: the new and the legacy DALI reader
side by side, the trainer's thread count by default, and the per-quarter composition of both."""
from __future__ import annotations

import json

import pytest


@pytest.mark.dali
def test_bench_loader_shows_both_dali_readers_and_their_composition(shards, tmp_path):
    pytest.importorskip("nvidia.dali")
    from spinestream.benchmarks.loader import main
    from spinestream.engine.loader import LoaderConfig

    assert main(["--shards", str(shards), "--lines", "dali-cpu,dali-cpu-webdataset,composition",
                 "--image-size", "32", "--batch-size", "8", "--batches", "2", "--warmup", "1",
                 "--results", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "loader.json").read_text())
    assert {"dali-cpu", "dali-cpu-webdataset"} <= set(res["lines"])
    assert res["workers"] == LoaderConfig().num_threads  # the trainer's default, not os.cpu_count()
    comp = res["composition"]
    assert set(comp) == {"webdataset-world1", "webdataset-world2", "index-world1", "index-world2"}
    assert [len(r) for r in comp["index-world2"]] == [4, 4]
    # the legacy reader streams the boxed shard first; the index reader spreads it over the epoch
    assert comp["webdataset-world1"][0][-1] == 0.0 and min(comp["index-world1"][0]) > 0.0
