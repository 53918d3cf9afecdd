"""``spinestream bench decode`` (benchmarks/decode.py): the rows its tables and projections are made of.

Quick (3 rounds, two syntaxes): what is checked is the bookkeeping -- every candidate's output checked
against the source, a wrong one never the floor, spinestream's rows never the floor, per-core figures
from CPU time -- not the speed (that is the benchmark's to measure, BENCHMARKS.md).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("imagecodecs")

from spinestream.benchmarks import decode as bench  # noqa: E402


def test_rows_check_every_candidate_and_keep_the_floor_to_correct_libraries(monkeypatch):
    real = bench.candidates

    def with_fakes(syntax):
        out = real(syntax)

        def wrong(path):  # the fastest of all, and wrong: never the floor
            return np.zeros((512, 512), np.int16)

        def sleepy(path):  # correct, slow on the wall clock, no CPU: its per-core figure is its CPU time
            arr = out[0].read(path)
            time.sleep(0.02)
            return arr

        return out + [bench.Candidate("fake-wrong", wrong), bench.Candidate("fake-sleepy", sleepy)]

    monkeypatch.setattr(bench, "candidates", with_fakes)
    rows = bench.decode_table(syntaxes=("explicit", "rle"), rounds=3)
    assert [r["syntax"] for r in rows] == ["explicit", "rle"]
    for r in rows:
        assert r["correct"]["spinestream"] == "ok" and r["correct"]["spinestream (before)"] == "ok"
        assert r["correct"]["fake-wrong"] == "wrong pixels"
        assert r["floor"] not in ("fake-wrong", "spinestream", "spinestream (before)")
        assert r["correct"][r["floor"]] == "ok"
        assert r["ratio_vs_floor"] == pytest.approx(r["floor_ms"] / r["spinestream_ms"])
        assert r["slices_s_per_core"] == pytest.approx(1e3 / r["spinestream_ms"])
        assert r["candidates_wall_ms"]["fake-sleepy"] >= 20
        assert r["candidates_ms"]["fake-sleepy"] < r["candidates_wall_ms"]["fake-sleepy"] - 15
    proj = bench.project_decode(rows)
    assert set(proj) == {"mean_mix", "all_explicit", "all_rle"}
    assert proj["all_explicit"]["2_cores_h"] == pytest.approx(2 * proj["all_explicit"]["4_cores_h"])
