"""One study ingest (preprocess/ingest.py): predict's inputs equal the shards' by construction.

A synthetic study whose middle slice is rewritten at 56x56 among 64x64 ones (a ragged series): the
shard job resizes that slice, so predict must too. ``spinestream.predict.decode_study`` gives the
same number of slices, the same uint8 volume and neighbour index as the shard job's Zarr volume, and
its 2.5D images JPEG-encode to the very bytes in the shards. And the ingest is written once: outside
tests, ``read_series`` and ``make_slice_fn`` are called only in ``preprocess/ingest.py``, and the
four ingesting modules (the shard job, predict, both benchmarks) call ``ingest_study``.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinestream.preprocess.convert import shard_dataset
from spinestream.shards.manifest import read_manifest
from spinestream.shards.sample import encode_jpeg, neighbour_index, sample_image
from spinestream.shards.shard_config import ShardConfig
from spinestream.shards.volumes import open_volume
from spinestream.shards.wds import iter_samples
from spinestream.predict import decode_study

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(image_size=48, folds=2)
ODD = 56  # the ragged slice's rows = cols (the others are 64)


def _shrink_slice(path: Path, size: int) -> None:
    """Rewrite an uncompressed DICOM slice at ``size`` x ``size`` (its top-left corner)."""
    import pydicom

    ds = pydicom.dcmread(path)
    arr = np.ascontiguousarray(ds.pixel_array[:size, :size])
    ds.Rows, ds.Columns = size, size
    ds.PixelData = arr.tobytes()
    ds.save_as(path)


@pytest.fixture(scope="module")
def ragged(tmp_path_factory) -> dict:
    """A two-study dataset (explicit VR, 64 px) whose first train study has one 56x56 slice, and its shards."""
    from spinestream.preprocess.synth import make_dataset

    d = tmp_path_factory.mktemp("ragged-raw")
    make_dataset(d, studies=2, seed=7, size=64, slices=(12, 14), test_studies=0, syntax="explicit")
    uid = sorted(p.name for p in (d / "train_images").iterdir())[0]
    files = sorted((d / "train_images" / uid).glob("*.dcm"), key=lambda p: int(p.stem))
    _shrink_slice(files[len(files) // 2], ODD)
    out = tmp_path_factory.mktemp("ragged-shards") / "out"
    shard_dataset(d, out, ShardConfig(**CFG), workers=1)
    return {"raw": d, "shards": out, "uid": uid, "n_files": len(files)}


def _shard_samples(shards: Path, uid: str) -> list[bytes]:
    """The JPEG bytes of every slice of ``uid`` in the shards, in volume order."""
    slices = pd.read_parquet(shards / "slices.parquet")
    ids = slices[slices.StudyInstanceUID == uid].sort_values("index").slice_id.tolist()
    found = {}
    for s in read_manifest(shards).shards:
        found.update((sid, data) for sid, data in iter_samples(shards / s.path) if sid in set(ids))
    return [found[i] for i in ids]


def test_predict_ingests_a_ragged_study_as_the_shard_job(ragged):
    uid, shards, cfg = ragged["uid"], ragged["shards"], ShardConfig(**CFG)
    want = _shard_samples(shards, uid)
    assert len(want) == ragged["n_files"]  # the shard job keeps the 56x56 slice (resized)
    d = decode_study(uid, ragged["raw"] / "train_images" / uid, cfg)
    assert d.error is None and d.bad_files == []
    assert d.volume.shape[0] == len(want)  # was one fewer: predict dropped the ragged slice
    vol = open_volume(shards / "volumes.zarr", uid)
    np.testing.assert_array_equal(d.volume, np.asarray(vol[...]))
    np.testing.assert_array_equal(d.nbr, neighbour_index(np.asarray(vol.attrs["z"]), cfg.offset_mm))
    assert any("resized 1 slice" in n for n in d.notes), d.notes
    got = [encode_jpeg(sample_image(d.volume, i, d.nbr, cfg.channels), cfg.jpeg_quality)
           for i in range(d.volume.shape[0])]
    assert got == want  # the same 2.5D images, byte for byte


# --------------------------------------------------------------------------- written once


INGESTING = ("preprocess/convert.py", "spinestream/predict.py", "benchmarks/predict.py", "benchmarks/shard.py")
ONLY_IN = {"read_series": {"preprocess/ingest.py"}, "make_slice_fn": {"preprocess/ingest.py"}}


def _sources() -> list[Path]:
    """The project's Python files outside tests (the venv and hidden folders left out)."""
    return [p for p in sorted(ROOT.rglob("*.py"))
            if not {"tests", "demo-data"} & set(p.relative_to(ROOT).parts)
            and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


def _called(path: Path) -> set[str]:
    """Names of the functions ``path`` calls (``f(...)`` and ``mod.f(...)``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


def test_the_study_ingest_is_written_once():
    calls = {str(p.relative_to(ROOT)): _called(p) for p in _sources()}
    assert set(INGESTING) <= set(calls)
    for name, allowed in ONLY_IN.items():
        where = {f for f, names in calls.items() if name in names}
        assert where <= allowed, f"{name} called outside {sorted(allowed)}: {sorted(where - allowed)}"
    for f in INGESTING:
        assert "ingest_study" in calls[f], f"{f} does not call preprocess.ingest.ingest_study"
