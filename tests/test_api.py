"""The notebook API (spinestream/api.py) and the inference path's weights and imports: strings for devices
and paths, a DataFrame out, exported EMA-only weights that predict as the run directory does, and neither
wandb nor DALI imported by predict."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from spinestream import api
from spinestream.engine import checkpoint as ck
from spinestream.engine.weights import WEIGHTS_FILE, export_weights
from tests.test_predict import write_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ema_run(shards, tmp_path_factory) -> Path:
    """A run whose best.pt has EMA weights unlike its raw ones (predict must use the EMA ones)."""
    rd = write_run(tmp_path_factory.mktemp("api") / "r0", shards, seed=0)
    state = ck.load(rd / ck.BEST)
    torch.manual_seed(1)
    state["ema"] = {k: (v + 0.05 * torch.randn_like(v)) if v.is_floating_point() else v.clone()
                    for k, v in state["model"].items()}
    ck.save(rd / ck.BEST, state)
    return rd


def test_load_runs_takes_strings_for_device_and_paths(ema_run):
    runs = api.load_runs(str(ema_run), device="cpu")  # was: 'str' object has no attribute 'type'
    assert len(runs) == 1 and runs[0].kwargs["device"] == torch.device("cpu")
    assert runs[0].kwargs["precision"] == "fp32"


def test_predict_returns_the_submission_frame(ema_run, raw):
    frame = api.predict(str(raw / "test_images"), api.load_runs([ema_run], "cpu"), progress=False)
    assert list(frame.columns) == ["row_id", "fractured"] and len(frame) % 8 == 0 and len(frame) > 0
    assert frame["fractured"].between(0, 1).all() and frame.attrs["summary"]["studies"] == len(frame) // 8


def test_a_bundled_run_holds_only_the_ema_weights_and_predicts_as_its_run(ema_run, raw, tmp_path):
    out = tmp_path / "runs" / "r0"
    export_weights(ema_run, out)
    for f in ("config.yaml", "shard_spec.json"):
        if (ema_run / f).is_file():
            shutil.copy2(ema_run / f, out / f)
    if not (out / "shard_spec.json").is_file():
        from spinestream.engine.config import RunConfig
        from spinestream.shards.config import load_config
        from spinestream.shards.spec import ShardSpec

        ShardSpec.from_shards(load_config(RunConfig, ema_run / "config.yaml").data.root).save(out)
    from safetensors.torch import load_file

    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "shard_spec.json", WEIGHTS_FILE]
    weights = load_file(str(out / WEIGHTS_FILE))
    ema = ck.load(ema_run / ck.BEST)["ema"]
    assert weights.keys() == ema.keys() and all(torch.equal(weights[k], ema[k]) for k in ema)
    images = raw / "test_images"
    a = api.predict(images, api.load_runs(ema_run, "cpu"), progress=False)
    b = api.predict(images, api.load_runs(out, "cpu"), progress=False)
    np.testing.assert_array_equal(a["fractured"].to_numpy(), b["fractured"].to_numpy())
    with pytest.raises(ValueError, match="exported weights only"):
        api.load_runs(out, "cpu", checkpoint="last")


def test_open_shards_reads_the_manifest_and_tables(shards):
    s = api.open_shards(str(shards))
    assert s.manifest.counts.studies == len(s.studies) and len(s.slices) == s.manifest.counts.slices
    assert set(s.labels.frame.slice_id) <= set(s.slices.slice_id) and len(s.labels.frame) > 0  # labelled cohorts
    with pytest.raises(FileNotFoundError, match="spinestream shard"):
        api.open_shards(shards / "nope")


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_importing_the_api_is_cheap():
    assert _python("""
        import sys
        import spinestream.api
        print(sorted(m for m in ("torch", "pandas", "timm", "numpy") if m in sys.modules))
    """) == "[]"


def test_predict_imports_neither_wandb_nor_dali(ema_run, raw):
    assert _python(f"""
        import sys
        import spinestream.predict as P
        runs = P.load_runs([{str(ema_run)!r}], "cpu")
        P.predict(runs, P.Path({str(raw / 'test_images')!r}), workers=0)
        print(sorted(m for m in sys.modules if m.split(".")[0] == "wandb" or m.startswith("nvidia.dali")))
    """) == "[]"
