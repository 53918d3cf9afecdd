"""manifest.json as typed code: round trip, version check, errors that name the key, and the
compatibility dict that engine/ still reads by string key."""
from __future__ import annotations

import json

import pytest

from spinestream.shards.layout import VERSION
from spinestream.shards.manifest import (BadFile, CohortCount, Counts, DataWarningEntry, FailedStudy, ImageSpec, Manifest,
                             ManifestError, ShardEntry, Source, StudySelection, read_manifest, write_manifest)
from spinestream.shards.shard_config import ShardConfig


def _manifest() -> Manifest:
    shard = ShardEntry(name="boxed-f0-0000", path="wds/boxed-f0-0000.tar", index="wds/boxed-f0-0000.idx",
                       cohort="boxed", fold=0, samples=3, bytes=10240, sha256="a" * 64, index_sha256="b" * 64)
    return Manifest(
        created_by="spinestream test",
        source=Source(train_csv_rows=2, selection=StudySelection(limit=None, studies=2, sha256="c" * 64)),
        config=ShardConfig(image_size=48, windows=[[400, 1800]], exclude_studies=[]),
        image=ImageSpec(size=48, channels="neighbours", windows=[[400.0, 1800.0]], offset_mm=1.0, jpeg_quality=95,
                        channel_order=["above", "slice", "below"]),
        counts=Counts(studies=1, slices=3, shards=1, failed_studies=1, bad_files=1, warnings=1,
                      by_cohort={"boxed": CohortCount(studies=1, slices=3)}),
        shards=[shard],
        failed_studies=[FailedStudy(study="1.2.2", reason="no .dcm files")],
        bad_files=[BadFile(study="1.2.3", file="7.dcm", reason="not a DICOM file")],
        warnings=[DataWarningEntry(study="1.2.3", message="dropping 1 box(es) on slice number(s) [999]")],
    )


def test_round_trip_is_equal_and_byte_stable(tmp_path):
    m = _manifest()
    path = write_manifest(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back == m
    first = path.read_bytes()
    write_manifest(tmp_path, back)
    assert path.read_bytes() == first
    assert back.select(cohorts=["boxed"], folds=[0]) == m.shards
    with pytest.raises(ValueError, match="no shards"):
        back.select(folds=[3])
    with pytest.raises(ValueError, match="unknown cohort"):
        back.select(cohorts=["negatve"])


def test_unknown_version_is_a_clear_error(tmp_path):
    d = _manifest().to_dict()
    d["version"] = VERSION + 1
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=rf"newer spinestream \(manifest version {VERSION + 1}; this one reads "
                                            rf"version {VERSION}\): upgrade spinestream"):
        read_manifest(tmp_path)
    d["version"] = VERSION - 1  # an older one: re-shard
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=rf"version {VERSION - 1} is not supported.*reads version {VERSION}"):
        read_manifest(tmp_path)
    d["version"], d["format"] = VERSION, "something-else"
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="not a spinestream manifest"):
        read_manifest(tmp_path)


def test_missing_or_mistyped_fields_name_the_key(tmp_path):
    d = _manifest().to_dict()
    del d["counts"]["slices"]
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"counts: missing key 'slices'"):
        read_manifest(tmp_path)
    d = _manifest().to_dict()
    d["shards"][0]["samples"] = "3"
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"shards\[0\]\.samples: expected an integer"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a finished shard directory"):
        read_manifest(tmp_path / "nothing")

    d = _manifest().to_dict()
    d["counts"]["slice"] = d["counts"].pop("slices")  # a typo is not read as a missing field's default
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"counts\.slice: unknown key"):
        read_manifest(tmp_path)
    d = _manifest().to_dict()
    d["config"]["channels"] = "rgb"
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=r"config\.channels: 'rgb' is not one of"):
        read_manifest(tmp_path)


def test_the_config_is_a_shard_config_written_as_before(tmp_path):
    """The config is read back as the ShardConfig the job ran with, whatever form its windows were given in,
    from JSON of the form manifests have always had (a plain object, windows as lists)."""
    m = _manifest()
    write_manifest(tmp_path, m)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())["config"]
    assert on_disk["windows"] == [[400.0, 1800.0]] and on_disk["image_size"] == 48
    back = read_manifest(tmp_path)
    assert isinstance(back.config, ShardConfig)
    assert back.config == m.config == ShardConfig(image_size=48, windows=[(400.0, 1800.0)], exclude_studies=[])
    assert back.config.windows == [(400.0, 1800.0)]


# a manifest.json as the code before issue 18 wrote it (config as a dict, keys sorted), trimmed to one shard
OLD_MANIFEST = {
    "bad_files": [], "config": {
        "channels": "neighbours", "exclude_studies": ["1.2.826.0.1.3680043.20574", "1.2.826.0.1.3680043.29952"],
        "folds": 2, "image_size": 48, "jpeg_quality": 90, "label_max_gap": 1, "offset_mm": 1.0, "seed": 0,
        "shard_max_bytes": 1048576, "shard_max_samples": 64, "windows": [[400.0, 1800.0]], "zarr_chunk_depth": 8,
        "zarr_clevel": 1, "zarr_codec": "lz4", "zarr_shuffle": "bitshuffle"},
    "counts": {"bad_files": 0, "by_cohort": {"boxed": {"slices": 12, "studies": 1}, "negative": {"slices": 0, "studies": 0},
                                             "positive_unboxed": {"slices": 0, "studies": 0}},
               "failed_studies": 0, "shards": 1, "slices": 12, "studies": 1, "warnings": 0},
    "created_by": "spinestream 0.2.0", "failed_studies": [], "format": "spinestream-shards",
    "image": {"channel_order": ["above", "slice", "below"], "channels": "neighbours", "jpeg_quality": 90,
              "offset_mm": 1.0, "size": 48, "subsampling": "4:4:4", "windows": [[400.0, 1800.0]]},
    "shards": [{"bytes": 30720, "cohort": "boxed", "fold": 0, "index": "wds/boxed-f0-0000.idx",
                "index_sha256": "b" * 64, "name": "boxed-f0-0000", "path": "wds/boxed-f0-0000.tar", "samples": 12,
                "sha256": "a" * 64}],
    "source": {"selection": {"limit": None, "sha256": "c" * 64, "studies": 1}, "train_csv_rows": 1},
    "tables": {"slices": "slices.parquet", "studies": "studies.parquet", "truth": "labels/truth.parquet"},
    "version": VERSION, "volumes": "volumes.zarr", "warnings": [],
}


def test_a_manifest_written_with_the_dict_config_still_reads_and_writes_the_same_bytes(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(OLD_MANIFEST, indent=1, sort_keys=True) + "\n")
    before = (tmp_path / "manifest.json").read_bytes()
    m = read_manifest(tmp_path)
    assert m.config == ShardConfig(image_size=48, folds=2, jpeg_quality=90, shard_max_bytes=1048576,
                                   shard_max_samples=64)
    assert m.to_dict() == OLD_MANIFEST
    write_manifest(tmp_path, m)
    assert (tmp_path / "manifest.json").read_bytes() == before


def test_an_oversampled_copy_is_a_view_never_written(tmp_path):
    """oversample_of marks the in-memory copies a loader selection adds; a written manifest has no such
    key (its bytes are as before) and refuses entries that carry one."""
    import dataclasses

    m = _manifest()
    path = write_manifest(tmp_path, m)
    assert "oversample_of" not in path.read_text()
    assert read_manifest(tmp_path).shards[0].oversample_of is None
    view = dataclasses.replace(m.shards[0], name="boxed-f0-0000+pos1", oversample_of="boxed-f0-0000")
    assert view.oversample_of == "boxed-f0-0000" and view != m.shards[0]
    with pytest.raises(ValueError, match="oversampled copies"):
        write_manifest(tmp_path / "bad", dataclasses.replace(m, shards=[m.shards[0], view]))
