"""Checkpoints survive a kill and a bad disk: fsync before the rename and of the directory after it,
latest() skips unreadable files (naming them), pruning never deletes the last good ones."""
from __future__ import annotations

import os

import pytest
import torch

from spinestream.engine import checkpoint as ck


def _state(step: int) -> dict:
    return {"step": step, "w": torch.full((4,), float(step))}


def test_save_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ck.save(tmp_path / "ckpt-000000001.pt", _state(1))
    names = [e for e in events]
    i = names.index(("replace", "ckpt-000000001.pt"))
    assert any(kind == "fsync" and name.startswith("ckpt-000000001.pt.tmp-") for kind, name in names[:i])
    assert ("fsync", tmp_path.name) in names[i + 1:]
    assert ck.load(tmp_path / "ckpt-000000001.pt")["step"] == 1


def test_latest_skips_an_unreadable_newest_checkpoint_and_names_it(tmp_path, capsys):
    for s in (1, 2):
        ck.save(tmp_path / f"ckpt-{s:09d}.pt", _state(s))
    (tmp_path / "ckpt-000000003.pt").write_bytes(b"PK\x03\x04 truncated")
    assert ck.latest(tmp_path).name == "ckpt-000000002.pt"
    assert "ckpt-000000003.pt" in capsys.readouterr().err
    for p in ck.checkpoints(tmp_path):
        p.write_bytes(b"junk")
    with pytest.raises(ck.RunError, match="none of its 3 checkpoints can be read"):
        ck.latest(tmp_path)


def test_pruning_keeps_the_last_k_readable_checkpoints(tmp_path, monkeypatch):
    for s in (1, 2, 3):
        ck.save_step(tmp_path, s, _state(s), keep_last=2)
    assert [p.name for p in ck.checkpoints(tmp_path)] == ["ckpt-000000002.pt", "ckpt-000000003.pt"]
    # the newest write turns out unreadable (a bad disk): the two good ones before it stay
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: f.write(b"garbage"))
    ck.save_step(tmp_path, 4, _state(4), keep_last=2)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ck.checkpoints(tmp_path)] == ["ckpt-000000002.pt", "ckpt-000000003.pt",
                                                           "ckpt-000000004.pt"]
    assert ck.latest(tmp_path).name == "ckpt-000000003.pt"
    ck.save_step(tmp_path, 5, _state(5), keep_last=2)
    # two readable ones kept (3 and 5); the unreadable 4 between them is left for latest() to name
    assert [p.name for p in ck.checkpoints(tmp_path)] == ["ckpt-000000003.pt", "ckpt-000000004.pt",
                                                           "ckpt-000000005.pt"]
    assert ck.latest(tmp_path).name == "ckpt-000000005.pt"


def test_truncate_metrics_drops_records_past_the_step(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 2}\n{"step": 4}\n{"step": 6}\n{"step": 6, "val": {}}\n{"st')
    assert ck.truncate_metrics(tmp_path, 4) == 3
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 2}\n{"step": 4}\n'


def test_clean_stale_removes_only_tmp_files(tmp_path):
    ck.save(tmp_path / "ckpt-000000001.pt", _state(1))
    (tmp_path / "ckpt-000000002.pt.tmp-999").write_bytes(b"half")
    (tmp_path / "batch_size.json.tmp-12").write_text("{")
    gone = ck.clean_stale(tmp_path)
    assert sorted(p.name for p in gone) == ["batch_size.json.tmp-12", "ckpt-000000002.pt.tmp-999"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000001.pt"]
