"""`spinestream demo`'s guard: it resumes, so a demo directory made with other settings is refused
(with what differs and what to do), never silently mixed with a new run."""
from __future__ import annotations

import json

from spinestream import demo
from spinestream.cli import main


def _marker(d, **params):
    raw = d / "raw"
    raw.mkdir(parents=True)
    base = {"studies": 256, "seed": 0, "size": 128, "slices": [24, 40], "boxed_share": 0.5,
            "crack_width": [3.0, 4.0], "syntax": "mixed", "test_studies": 2}
    (raw / "SYNTH_COMPLETE").write_text(json.dumps({"params": {**base, **params}}))


def test_demo_refuses_a_directory_made_with_other_settings(tmp_path, capsys):
    _marker(tmp_path, studies=24, size=256)
    assert main(["demo", "--dir", str(tmp_path)]) == 2  # the console script's one line
    err = capsys.readouterr().err
    assert err.startswith("spinestream demo: ") and err.count("\n") == 1
    assert "studies 24 != 256" in err and "size 256 != 128" in err and "rm -rf" in err
    assert not (tmp_path / "shards").exists()  # nothing was run


def test_demo_settings_match_their_own_marker(tmp_path):
    _marker(tmp_path)
    args = demo.argparse.Namespace(studies=256, seed=0, size=128, slices="24:40", boxed_share=0.5,
                                   crack_width="3:4")
    assert demo._stale(tmp_path / "raw" / "SYNTH_COMPLETE", args) == ""
    assert demo._stale(tmp_path / "nothing" / "SYNTH_COMPLETE", args) == ""
    (tmp_path / "raw" / "SYNTH_COMPLETE").write_text("{not json")
    assert "unreadable" in demo._stale(tmp_path / "raw" / "SYNTH_COMPLETE", args)
