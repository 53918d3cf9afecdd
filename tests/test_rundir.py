"""engine/rundir.py: each record reads back what its writer wrote, existing files (the formats written before the
records) still read, and a bad file is an error naming the file and the key."""
from __future__ import annotations

import json

import pytest

from spinestream.engine import rundir as rd


def test_layout_names_the_files_the_trainer_and_evaluate_write(tmp_path):
    lay = rd.RunLayout(tmp_path)
    assert (lay.best.name, lay.config.name, lay.metrics.name, lay.checkpoint(7).name) == (
        "best.pt", "config.yaml", "metrics.jsonl", "ckpt-000000007.pt")
    assert lay.evaluation(2).root.name == "eval-f2"
    assert lay.evaluation(2, last=True).summary.parent.name == "eval-f2-last"
    for step in (3, 1):
        lay.checkpoint(step).write_bytes(b"")
    (tmp_path / "ckpt-1.pt").write_bytes(b"")  # not a step checkpoint's name
    assert [p.name for p in lay.checkpoints()] == ["ckpt-000000001.pt", "ckpt-000000003.pt"]
    assert rd.RunLayout(tmp_path / "absent").checkpoints() == []
    table = tmp_path / "labels/pseudo-round1.parquet"
    assert rd.PseudoLayout.default(tmp_path, tmp_path / "round1").table == table
    assert rd.PseudoLayout(table).summary.name == "pseudo-round1.summary.json"


def test_run_record_marks_and_checks_a_run(tmp_path):
    with pytest.raises(rd.RunError, match="no run.json"):
        rd.check_run_dir(tmp_path)
    rd.mark_run(tmp_path)
    assert rd.check_run_dir(tmp_path).root == tmp_path
    (tmp_path / "run.json").write_text(json.dumps({"format": "spinestream-run", "version": 9}))
    with pytest.raises(rd.RunError, match="unsupported run format"):
        rd.check_run_dir(tmp_path)


def test_eval_summary_round_trips_and_a_missing_key_names_file_and_key(tmp_path):
    s = rd.EvalSummary(run="r", checkpoint="best.pt", shards="s", fold=1, rule="max", studies=3,
                       competition_loss=0.3, constant_baseline=0.6, accuracy=0.7, validation_fold=True)
    path = rd.write_eval_summary(tmp_path, s)
    assert rd.read_eval_summary(tmp_path) == s and rd.read_eval_summary(tmp_path / "none") is None
    d = json.loads(path.read_text())
    del d["constant_baseline"]
    path.write_text(json.dumps(d))
    with pytest.raises(rd.RecordError, match=r"summary.json: missing key 'constant_baseline'; delete it"):
        rd.read_eval_summary(tmp_path)
    path.write_text("{")
    with pytest.raises(rd.RecordError, match="not readable JSON"):
        rd.read_eval_summary(tmp_path)


def test_a_pseudo_summary_from_before_the_threshold_fields_still_reads(tmp_path):
    table = tmp_path / "pseudo-round1.parquet"
    old = {"table": str(table), "run": "r", "checkpoint": "c", "shards": "s", "mode": "soft", "thresholds": None,
           "studies": 2, "slices": 10, "positive_slices": {"any": 3}, "per_study": {"u": {"any": 3, "slices": 5}},
           "positive_slices_per_study": {"mean": 1.5, "min": 0, "max": 3}}
    rd.PseudoLayout(table).summary.write_text(json.dumps(old))
    s = rd.read_pseudo_summary(table)
    assert s.threshold_method is None and s.quality is None and s.positive_slices_per_study.max == 3
    rd.write_pseudo_summary(table, s)
    written = json.loads(rd.PseudoLayout(table).summary.read_text())
    assert "quality" not in written and {k: written[k] for k in old} == old


def test_batch_size_record_is_reused_only_under_the_same_settings(tmp_path):
    rec = rd.BatchSizeRecord(batch_size=64, tried=[{"batch": 64, "ok": True, "peak_gb": 10.0}], image_size=384,
                             device="cuda:0", precision="bf16", max_memory_gb=40, memory_headroom_gb=4.0,
                             channels_last=True, peak_gb=10.0, peak_note="n")
    rd.write_batch_size(tmp_path, rec)
    back = rd.read_batch_size(tmp_path)
    assert back == rec and back.probed_with({"image_size": 384, "max_memory_gb": 40.0})
    assert not back.probed_with({"image_size": 512})
    assert rd.read_batch_size(tmp_path / "none") is None


def test_metrics_reader_skips_a_line_cut_by_a_kill(tmp_path):
    rd.append_metrics(tmp_path, {"step": 1, "loss": 0.5})
    rd.append_metrics(tmp_path, {"step": 2, "val": {"competition_loss": 0.4}})
    with open(rd.RunLayout(tmp_path).metrics, "a") as f:
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in rd.read_metrics(tmp_path)] == [1, 2]
    assert rd.truncate_metrics(tmp_path, 1) == 2 and [r["step"] for r in rd.read_metrics(tmp_path)] == [1]
