"""manifest.json as typed code: round trip, version check, errors that name the key, and the
compatibility dict that engine/ still reads by string key."""
from __future__ import annotations

import json

import pytest

from spinestream.shards.layout import VERSION
from spinestream.shards.manifest import (BadFile, CohortCount, Counts, DataWarningEntry, FailedStudy, ImageSpec, Manifest,
                             ManifestError, ShardEntry, Source, StudySelection, read_manifest, write_manifest)


def _manifest() -> Manifest:
    shard = ShardEntry(name="boxed-f0-0000", path="wds/boxed-f0-0000.tar", index="wds/boxed-f0-0000.idx",
                       cohort="boxed", fold=0, samples=3, bytes=10240, sha256="a" * 64, index_sha256="b" * 64)
    return Manifest(
        created_by="spinestream test",
        source=Source(train_csv_rows=2, selection=StudySelection(limit=None, studies=2, sha256="c" * 64)),
        config={"image_size": 48, "windows": [[400.0, 1800.0]]},
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
    with pytest.raises(ManifestError, match=rf"version {VERSION + 1} is not supported.*reads version {VERSION}"):
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
    with pytest.raises(ManifestError, match=r"shards\[0\]\.samples: expected int"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a finished shard directory"):
        read_manifest(tmp_path / "nothing")


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
