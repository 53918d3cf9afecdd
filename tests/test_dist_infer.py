"""``evaluate``, ``pseudo-label`` and ``predict`` under torchrun: each rank infers its contiguous part of the
studies, the parts are gathered, every rank returns what one process returns, and only rank 0 writes.

Two ranks on the CPU (gloo, :func:`ranks.run_ranks`) against one process in this interpreter, on one
untrained run directory (as tests/test_pseudo.py writes them: what is compared does not depend on what a
model learnt):

* ``evaluate`` and ``pseudo-label`` run through :data:`WRAPPER`: ``spinestream.cli.main`` (what ``python -m
  spinestream`` runs) with an audit hook that logs every file a rank opens for writing, renames or creates
  under the output folder, and the verb's ``run`` wrapped to keep what it returned. Rank 0 must write the
  same files as one process (byte for byte where the writer is deterministic; the same competition loss and
  slice probabilities), rank 1 none, and both must return one process's values.
* ``predict`` runs as ``python -m spinestream predict``: the submission.csv is byte-identical, each rank says
  which part of the studies it decoded, and the warning about an unreadable study comes from the one rank
  whose part holds it (so the work was split, not repeated).
* a write that fails on rank 0 (:meth:`~spinestream.engine.dist.Dist.main_only`) fails rank 1 too, naming it,
  instead of leaving it waiting.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
from ranks import run_ranks
from test_pseudo import _write_run

from spinestream.engine.dist import Dist
from spinestream.engine.metrics import ROW_TYPES

WRAPPER = r"""
import importlib, os, pickle, sys

rank, watch = os.environ["RANK"], os.path.realpath(os.environ["TEST_WATCH"])
log = open(os.path.join(os.environ["TEST_LOGS"], f"writes-{rank}.txt"), "w", buffering=1)


def _under(path):
    try:
        return os.path.realpath(os.fsdecode(path)).startswith(watch + os.sep)
    except (TypeError, ValueError):
        return False


def hook(event, args):
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode, flags = args[1], args[2] or 0
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR):
            if _under(args[0]):
                log.write(f"open {os.fsdecode(args[0])}\n")
    elif event in ("os.rename", "os.mkdir") and _under(args[1] if event == "os.rename" else args[0]):
        log.write(f"{event} {os.fsdecode(args[1] if event == 'os.rename' else args[0])}\n")


sys.addaudithook(hook)
from spinestream.cli import VERBS, main

verb = sys.argv[1]
module = importlib.import_module(VERBS[verb][0])
real_run = module.run


def run(cfg):
    got = real_run(cfg)
    with open(os.path.join(os.environ["TEST_LOGS"], f"returned-{rank}.pkl"), "wb") as f:
        pickle.dump(got, f)
    return got


module.run = run
sys.exit(main(sys.argv[1:]))
"""


def _two_ranks(verb: str, args: list[str], watch: Path, factory):
    """``spinestream VERB ARGS`` on two ranks through :data:`WRAPPER`: (rank results, files each rank wrote
    under ``watch``, what each rank's ``run`` returned)."""
    logs = factory.mktemp("logs")  # outside watch
    out = run_ranks(["-c", WRAPPER, verb, *args], world=2, env={"TEST_WATCH": str(watch), "TEST_LOGS": str(logs)})
    writes = [(logs / f"writes-{r}.txt").read_text().splitlines() for r in range(2)]
    returned = [pickle.loads((logs / f"returned-{r}.pkl").read_bytes()) for r in range(2)]
    return out, writes, returned


@pytest.fixture(scope="module")
def run_dir(shards, tmp_path_factory) -> Path:
    return _write_run(tmp_path_factory.mktemp("dist-runs") / "round1",
                      [f"data.root={shards}", "loader.image_size=48", "log.wandb=disabled"])


@pytest.mark.slow  # the default suite's budget: the evaluate and predict cases keep the path covered
def test_a_failed_write_on_rank_0_fails_every_rank_without_waiting():
    code = ("from spinestream.engine import dist\n"
            "d = dist.init_from_env(device_type='cpu')\n"
            "assert d.main_only(lambda: 'written', 'the test write') == ('written' if d.main else None)\n"
            "d.main_only(lambda: 1 / 0, 'the second write')\n")
    ranks = run_ranks(["-c", code], world=2, timeout=120, check=False)
    assert ranks[0].returncode != 0 and "ZeroDivisionError" in ranks[0].stderr, ranks[0].stderr  # its own error
    assert ranks[1].returncode != 0 and "MainFailed" in ranks[1].stderr, ranks[1].stderr
    assert "rank 0 failed at the second write (ZeroDivisionError: division by zero)" in ranks[1].stderr


def test_parts_cover_the_list_once_in_order():
    items = list(range(7))
    for world in (1, 2, 3, 8):
        parts = [Dist(rank=r, world=world).part(items) for r in range(world)]
        assert [x for p in parts for x in p] == items
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_evaluate_on_two_ranks_equals_one_process_and_only_rank_0_writes(run_dir, tmp_path, tmp_path_factory):
    from spinestream.engine.evaluate import EvaluateConfig, run

    one = tmp_path / "one"
    one_dir, one_summary, one_report = run(EvaluateConfig(run=str(run_dir), device="cpu", batch_size=16,
                                                          out=str(one)))
    two = tmp_path / "two"
    ranks, writes, returned = _two_ranks("evaluate", ["--run", str(run_dir), "--device", "cpu", "--batch-size",
                                                      "16", "--out", str(two)], tmp_path, tmp_path_factory)
    assert writes[1] == [], writes[1]  # rank 1 wrote nothing
    assert any("summary.json" in w for w in writes[0]) and any("report.csv" in w for w in writes[0]), writes[0]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for name in ("report.csv", "submission.csv"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    pd.testing.assert_frame_equal(pd.read_parquet(two / "slice_probs.parquet"),
                                  pd.read_parquet(one / "slice_probs.parquet"), check_exact=True)
    s1, s2 = json.loads((one / "summary.json").read_text()), json.loads((two / "summary.json").read_text())
    assert s2["competition_loss"] == s1["competition_loss"] and s2 == s1
    for r, (out_dir, summary, report) in enumerate(returned):  # every rank returns one process's values
        assert out_dir == one_dir.parent / "two" and summary == one_summary, r
        pd.testing.assert_frame_equal(report, one_report, check_exact=True)
    assert "competition loss" in ranks[0].stdout and "competition loss" not in ranks[1].stdout
    assert "infer" not in ranks[1].stderr  # no progress bar but rank 0's


@pytest.mark.slow  # the default suite's budget: the evaluate and predict cases keep the path covered
def test_pseudo_label_on_two_ranks_writes_one_process_table(run_dir, tmp_path, tmp_path_factory):
    from spinestream.engine.pseudo import PseudoLabelConfig, run

    one_summary = run(PseudoLabelConfig(run=str(run_dir), device="cpu", batch_size=16, out=str(tmp_path / "one"
                                                                                                / "p.parquet")))
    ranks, writes, returned = _two_ranks("pseudo-label", ["--run", str(run_dir), "--device", "cpu", "--batch-size",
                                                          "16", "--out", str(tmp_path / "two" / "p.parquet")],
                                         tmp_path, tmp_path_factory)
    assert writes[1] == [], writes[1]
    assert any("p.parquet" in w for w in writes[0]) and any("p.summary.json" in w for w in writes[0]), writes[0]
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert (two / "p.parquet").read_bytes() == (one / "p.parquet").read_bytes()  # table and metadata
    s1, s2 = (json.loads((d / "p.summary.json").read_text()) for d in (one, two))
    assert s1.pop("table").endswith("one/p.parquet") and s2.pop("table").endswith("two/p.parquet")
    assert s2 == s1
    for r, summary in enumerate(returned):
        assert summary == {**one_summary, "table": str(two / "p.parquet")}, r
    assert "pseudo-labels" in ranks[0].stdout and "pseudo-labels" not in ranks[1].stdout


# --------------------------------------------------------------------------- predict

MISSING = "1.2.826.0.1.3680043.999998"


@pytest.fixture(scope="module")
def test_images(tmp_path_factory) -> dict:
    """test_images/ with 5 studies, one of them unreadable (every slice truncated), and a sample submission
    that also lists a study not in the images, rows in an order of their own."""
    from spinestream.preprocess.synth import make_dataset
    from spinestream.preprocess.synth.spec import study_specs

    d = tmp_path_factory.mktemp("dist-test-set")
    params = dict(studies=1, seed=12, size=48, slices=(12, 16), test_studies=5, syntax="explicit")
    make_dataset(d, **params)
    uids = [s.uid for s in study_specs(**params) if s.split == "test"]
    for f in (d / "test_images" / uids[1]).glob("*.dcm"):
        f.write_bytes(f.read_bytes()[:300])
    sample = pd.read_csv(d / "sample_submission.csv")
    extra = pd.DataFrame({"row_id": [f"{MISSING}_{t}" for t in ROW_TYPES], "fractured": 0.5})
    sample = pd.concat([sample.iloc[:16], extra, sample.iloc[16:]]).iloc[::-1]
    sample.to_csv(d / "sample.csv", index=False)
    return {"images": d / "test_images", "sample": d / "sample.csv", "unreadable": uids[1]}


def test_predict_on_two_ranks_writes_one_process_submission_and_splits_the_studies(run_dir, test_images, tmp_path):
    from spinestream.cli import main as cli
    from spinestream.predict import read_sample

    args = ["predict", "--run", str(run_dir), "--images", str(test_images["images"]), "--sample-submission",
            str(test_images["sample"]), "--device", "cpu", "--no-progress"]
    assert cli([*args, "--workers", "0", "--out", str(tmp_path / "one.csv")]) == 0
    two = tmp_path / "two" / "submission.csv"
    ranks = run_ranks(["-m", "spinestream", *args, "--workers", "1", "--out", str(two)], world=2)
    assert two.read_bytes() == (tmp_path / "one.csv").read_bytes()
    assert [p.name for p in two.parent.iterdir()] == ["submission.csv"]

    todo = [u for u in dict.fromkeys(read_sample(test_images["sample"]).uid) if u != MISSING]  # predict's order
    assert len(todo) == 5
    for r, res in enumerate(ranks):
        mine = Dist(rank=r, world=2).part(todo)
        assert f"rank {r} of 2 on cpu: {len(mine)} of 5 studies" in res.stderr, res.stderr
        unreadable_here = sum(f"study {test_images['unreadable']}: no readable slice" in line
                              for line in res.stderr.splitlines())
        assert unreadable_here == (test_images["unreadable"] in mine), (r, res.stderr)  # decoded on one rank
        assert ("done:" in res.stderr) == (r == 0), res.stderr  # rank 0 reports (and writes)
    # the counts are the ranks' sums: 5 studies, one unreadable, one missing
    assert "5 studies decoded" in ranks[0].stderr and "1 unreadable, 1 missing" in ranks[0].stderr, ranks[0].stderr
    shutil.rmtree(tmp_path / "two")
