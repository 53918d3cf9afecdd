"""``spinestream run``: the stage runner's skip / resume / redo guarantees, with fake verbs.

The fakes stand in for the CLI table (``spinestream.run.main(argv, verb=...)``): each writes the files its
verb would (a best.pt, a manifest, ...) and logs its argv, so the tests see exactly which verbs ran with which
arguments, and can compare upstream files byte for byte and by mtime. The last test runs the real demo
pipeline on a tiny synthetic set (slow).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from spinestream.cli import run_verb
from spinestream.engine.rundir import EvalLayout, RunLayout, append_metrics, mark_run, write_pseudo_summary
from spinestream.run import main
from spinestream.stages import Stage, fingerprint, remove_outputs, run_stages

ROOT = Path(__file__).resolve().parents[1]
ALL = ["synth", "shard", "verify", "bench", "round1", "evaluate1", "pseudo", "round2", "evaluate2", "predict",
       "compare", "report"]


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def _config(argv: list[str], cls=None):
    """The ``-c`` file a verb was given, loaded as that verb loads it (``cls``), else as plain YAML."""
    from spinestream.shards.config import load_config

    path = _arg(argv, "-c")
    return yaml.safe_load(Path(path).read_text()) if cls is None else load_config(cls, path)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


class FakeVerbs:
    """The verbs, reduced to the files the pipeline reads; ``calls`` logs every argv."""

    def __init__(self):
        self.calls: list[list[str]] = []
        self.kill_in: str | None = None  # run name whose train raises after its first checkpoint
        self.kill_with: BaseException = KeyboardInterrupt()

    def __call__(self, argv: list[str]) -> int:
        self.calls.append(list(argv))
        return getattr(self, argv[0].replace("-", "_"))(argv[1:])

    def verbs(self) -> list[str]:
        return [a[0] for a in self.calls]

    def synth(self, a):
        out = Path(_arg(a, "--out"))
        _write(out / "SYNTH_COMPLETE", json.dumps({"params": a}))
        _write(out / "train.csv", "StudyInstanceUID\n")
        _write(out / "test_images" / "1.2.3" / "1.dcm", "dicom")
        _write(out / "sample_submission.csv", "row_id,fractured\n")
        _write(out / "segmentations" / "1.2.3.nii", "segmentation v1")
        return 0

    def shard(self, a):
        out = Path(_arg(a, "--out"))
        cfg = Path(_arg(a, "-c")).read_text()
        _write(out / "manifest.json", json.dumps({"config": cfg}))
        _write(out / "labels" / "truth.parquet", "truth")
        _write(out / "labels" / "extra.parquet", "a hand-made table, v1")  # listed by round 2 in some tests
        return 0

    def verify(self, a):
        assert (Path(a[0]) / "manifest.json").is_file()
        return 0

    def bench(self, a):
        _write(Path(_arg(a, "--results")) / "loader.json", json.dumps(
            {"machine": "fake", "image_size": 128, "batch_size": 32, "lines": {"torch": {"images_per_s": 100.0}}}))
        return 0

    def train(self, a):
        from spinestream.engine.config import RunConfig
        from spinestream.shards.config import load_config, to_dict

        cfg = yaml.safe_load(Path(_arg(a, "-c")).read_text())
        run = Path(cfg["out_dir"]) / cfg["name"]
        assert run.is_absolute() and Path(cfg["data"]["root"]).is_absolute()  # the file's directory is DIR/stages
        lay = RunLayout(run)
        if "--resume" in a:
            assert Path(_arg(a, "--resume")).absolute() == run and lay.checkpoints()
        else:
            assert not lay.checkpoints(), "a fresh run over an old checkpoint"
        mark_run(run)
        # what engine/train.py writes: the -c config with the --set overrides (model.init_from), its paths absolute
        d = to_dict(load_config(RunConfig, _arg(a, "-c"), [v for i, v in enumerate(a) if i and a[i - 1] == "--set"]))
        d["out_dir"], d["data"]["root"] = str(Path(d["out_dir"]).resolve()), str(Path(d["data"]["root"]).resolve())
        if d["model"]["init_from"]:
            d["model"]["init_from"] = str(Path(d["model"]["init_from"]).resolve())
        _write(lay.config, yaml.safe_dump(d, sort_keys=False))
        _write(lay.checkpoint(1), "step 1")
        if self.kill_in == cfg["name"]:
            self.kill_in = None
            raise self.kill_with
        _write(lay.checkpoint(2), "step 2")
        _write(lay.best, f"weights of {cfg['name']} lr={cfg['optim']['lr']} {a}")
        append_metrics(run, {"step": 5, "images_per_s": 50.0, "data_wait": 0.1})
        return 0

    def evaluate(self, a):
        from spinestream.engine.evaluate import EvaluateConfig

        c = _config(a, EvaluateConfig)
        out = EvalLayout(Path(c.out)) if c.out else RunLayout(Path(c.run)).evaluation(0)
        _write(out.report, "target,accuracy\nC1,0.9\n")
        return 0

    def synth_truth(self, a):
        _write(Path(_arg(a, "--out")), "crack truth")
        return 0

    def pseudo_label(self, a):
        from spinestream.engine.pseudo import PseudoLabelConfig

        out = Path(_config(a, PseudoLabelConfig).out)
        _write(out, "pseudo table")
        write_pseudo_summary(out, _pseudo_summary(studies=3, slices=90))
        return 0

    def predict(self, a):
        from spinestream.predict import PredictConfig

        _write(Path(_config(a, PredictConfig).out), "row_id,fractured\n" + "".join(f"1.2.3_C{i},0.1\n" for i in range(1, 8))
               + "1.2.3_patient_overall,0.2\n")
        return 0


@pytest.fixture
def pipeline(tmp_path):
    """(run(*extra args) -> exit status, the fakes, the output dir) for the demo pipeline config."""
    fakes = FakeVerbs()
    out = tmp_path / "out"
    sets = ["--set", f"round1.config={ROOT / 'configs/demo-round1.yaml'}",
            "--set", f"round2.config={ROOT / 'configs/demo-round2.yaml'}"]

    def run(*extra: str) -> int:  # as the console script runs it: a SpinestreamError is one line and exit 2
        argv = ["-c", str(ROOT / "configs/demo.yaml"), "--out", str(out), *sets, *extra]
        return run_verb("run", lambda a: main(a, verb=fakes), argv)

    return run, fakes, out


def _statuses(capsys) -> dict[str, str]:
    """Stage -> its final status line's word, from spinestream run's output."""
    return _statuses_of(capsys.readouterr().out)


def _statuses_of(out: str) -> dict[str, str]:
    found = {}
    for line in out.splitlines():
        if line.startswith("spinestream run: ["):
            name, rest = line.split("[", 1)[1].split("]", 1)
            found[name.strip()] = rest.split()[0].rstrip(":")
    return found


def _files(d: Path) -> dict[str, tuple[str, int]]:
    """Every file under d: (sha256, mtime_ns)."""
    return {str(p.relative_to(d)): (fingerprint(p)["sha256"], p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def _round1_files(out: Path) -> dict[str, tuple[str, int | None]]:
    """:func:`_files` of round 1's run, but eval-f0-last/ by content only: the compare stage, after round 2,
    rewrites round 1's last-checkpoint evaluation whenever round 2 changed (the same figures)."""
    return {k: (h, None if k.startswith("eval-f0-last/") else t) for k, (h, t) in _files(out / "runs/round1").items()}


def test_full_run_runs_every_stage_once_and_a_rerun_skips_all(pipeline, capsys):
    run, fakes, out = pipeline
    assert run() == 0
    assert fakes.verbs() == ["synth", "shard", "verify", "bench", "train", "evaluate", "synth-truth",
                             "pseudo-label", "train", "evaluate", "predict", "evaluate", "evaluate"]
    for call, r in zip(fakes.calls[-2:], ("round1", "round2")):  # compare: each round's last checkpoint
        assert _arg(call, "-c") == str(out / "stages" / f"compare-{r}.yaml")
        c = _config(call)
        assert c["run"] == str(out / "runs" / r) and c["checkpoint"] == "last"
        assert c["out"] == str(out / "runs" / r / "eval-f0-last")
    assert _statuses(capsys) == dict.fromkeys(ALL, "run")
    for s in ALL:
        assert json.loads((out / "stages" / f"{s}.json").read_text())["state"] == "complete"
    round2 = fakes.calls[8]
    assert _arg(round2, "--set") == f"model.init_from={out / 'runs/round1/best.pt'}"
    assert (out / "submission.csv").is_file() and (out / "report.md").is_file() and (out / "report.json").is_file()
    before = _files(out)
    fakes.calls.clear()
    assert run() == 0
    assert fakes.calls == []
    assert _statuses(capsys) == dict.fromkeys(ALL, "skipped")
    assert _files(out) == before


@pytest.mark.parametrize("kill", [KeyboardInterrupt(), SystemExit(137)], ids=["KeyboardInterrupt", "SystemExit"])
def test_killed_in_round2_resumes_round2_with_round1_untouched(pipeline, capsys, kill):
    run, fakes, out = pipeline
    fakes.kill_in, fakes.kill_with = "round2", kill
    if isinstance(kill, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            run()
    else:
        assert run() == 2  # the verb's exit is a failed stage: one line, how to go on
        assert "failed (exit 137" in capsys.readouterr().err
    assert json.loads((out / "stages/round2.json").read_text())["state"] == "running"
    assert not (out / "stages/evaluate2.json").exists()
    upstream = {d: _files(out / d) for d in ("raw", "shards", "runs/round1")}
    capsys.readouterr()
    fakes.calls.clear()
    assert run() == 0
    st = _statuses(capsys)
    assert [st[s] for s in ALL[:7]] == ["skipped"] * 7
    assert st["round2"] == "resumed" and all(st[s] == "redone" or st[s] == "run" for s in ALL[8:])
    assert fakes.verbs() == ["train", "evaluate", "predict", "evaluate", "evaluate"]
    assert _arg(fakes.calls[0], "--resume") == str(out / "runs/round2")
    now = {d: _files(out / d) for d in upstream}
    # the compare stage (after predict) ran for the first time: it adds round 1's last-checkpoint evaluation
    assert sorted(k for k in now["runs/round1"] if k not in upstream["runs/round1"]) == ["eval-f0-last/report.csv"]
    now["runs/round1"] = {k: v for k, v in now["runs/round1"].items() if not k.startswith("eval-f0-last/")}
    assert now == upstream
    assert (out / "runs/round2/best.pt").is_file()


def test_changed_round2_setting_redoes_round2_and_after_not_round1(pipeline, capsys):
    run, fakes, out = pipeline
    assert run() == 0
    r1 = _round1_files(out)
    old_best = fingerprint(out / "runs/round2/best.pt")
    capsys.readouterr()
    fakes.calls.clear()
    assert run("--set", "round2.set=[optim.lr=0.0005]") == 0
    st = _statuses(capsys)
    assert [st[s] for s in ALL[:7]] == ["skipped"] * 7
    assert [st[s] for s in ALL[7:]] == ["redone"] * 5
    assert fakes.verbs() == ["train", "evaluate", "predict", "evaluate", "evaluate"]
    assert "--resume" not in fakes.calls[0]  # redone from scratch: the old checkpoints were removed
    assert _round1_files(out) == r1
    assert fingerprint(out / "runs/round2/best.pt") != old_best
    rec = json.loads((out / "stages/round2.json").read_text())
    assert rec["inputs"]["config"]["optim"]["lr"] == 0.0005


def test_verb_stages_write_their_configs_and_the_verbs_load_them(pipeline):
    """Issue 18: evaluate, pseudo-label and predict get ``-c DIR/stages/<stage>.yaml``, their config with the
    stage's options and the paths the pipeline owns (absolute); no option is turned into argv by hand."""
    from spinestream.engine.evaluate import EvaluateConfig
    from spinestream.engine.pseudo import PseudoLabelConfig
    from spinestream.predict import PredictConfig
    from spinestream.shards.config import load_config

    run, fakes, out = pipeline
    assert run("--set", "evaluate1.batch_size=7", "--set", "pseudo.tta=true", "--set", "predict.workers=1") == 0
    calls = {c[0] if c[0] != "evaluate" else Path(_arg(c, "-c")).stem: c for c in fakes.calls}
    for stage, verb in (("evaluate1", "evaluate"), ("evaluate2", "evaluate"), ("pseudo", "pseudo-label"),
                        ("predict", "predict"), ("compare-round1", "evaluate"), ("compare-round2", "evaluate")):
        assert calls[stage if verb == "evaluate" else verb] == [verb, "-c", str(out / "stages" / f"{stage}.yaml")]
    e1 = load_config(EvaluateConfig, out / "stages/evaluate1.yaml")
    assert e1 == EvaluateConfig(run=str(out / "runs/round1"), shards=str(out / "shards"), batch_size=7,
                                out=str(out / "runs/round1/eval-f0"))
    assert load_config(EvaluateConfig, out / "stages/compare-round1.yaml").batch_size == 7  # its stage's options
    p = load_config(PseudoLabelConfig, out / "stages/pseudo.yaml")
    assert p.tta and (p.run, p.out, p.truth) == (str(out / "runs/round1"), str(out / "shards/labels/pseudo-round1.parquet"),
                                                 str(out / "crack-truth.parquet"))  # demo.yaml: synth_truth
    pr = load_config(PredictConfig, out / "stages/predict.yaml")
    assert (pr.run, pr.out, pr.workers) == ([str(out / "runs/round2")], str(out / "submission.csv"), 1)
    assert pr.images == str(out / "raw/test_images")


def test_a_path_the_pipeline_owns_is_not_a_stage_option(pipeline, capsys):
    run, fakes, out = pipeline
    assert run("--set", "evaluate1.out=elsewhere") == 2
    assert "evaluate1.out: unknown key" in capsys.readouterr().err and fakes.calls == []


def test_changed_evaluate_option_redoes_that_evaluation_only(pipeline, capsys):
    run, fakes, out = pipeline
    assert run() == 0
    capsys.readouterr()
    fakes.calls.clear()
    assert run("--set", "evaluate2.rule=noisy_or") == 0
    st = _statuses(capsys)
    redone = {"evaluate2", "compare", "report"}  # compare evaluates round 2's last checkpoint with the same rule
    assert {s: st[s] for s in ALL} == {s: "redone" if s in redone else "skipped" for s in ALL}
    assert fakes.verbs() == ["evaluate"] * 3
    assert _evaluate_config(out / "stages/evaluate2.yaml").rule == "noisy_or"
    assert _evaluate_config(out / "stages/compare-round2.yaml").rule == "noisy_or"
    capsys.readouterr()
    assert run("--set", "evaluate2.rule=noisy_or") == 0  # unchanged: nothing reruns
    assert _statuses(capsys) == dict.fromkeys(ALL, "skipped")


def test_changed_pseudo_option_redoes_pseudo_labels_and_what_trained_on_them(pipeline, capsys):
    run, fakes, out = pipeline
    assert run() == 0
    r1 = _round1_files(out)
    capsys.readouterr()
    fakes.calls.clear()
    assert run("--set", "pseudo.threshold='0.4'") == 0
    st = _statuses(capsys)
    assert [st[s] for s in ALL[:6]] == ["skipped"] * 6 and [st[s] for s in ALL[6:]] == ["redone"] * 6
    assert fakes.verbs() == ["synth-truth", "pseudo-label", "train", "evaluate", "predict", "evaluate", "evaluate"]
    assert _round1_files(out) == r1
    rec = json.loads((out / "stages/pseudo.json").read_text())
    assert rec["inputs"]["options"]["threshold"] == "0.4" and "run" not in rec["inputs"]["options"]


def _evaluate_config(path: Path):
    from spinestream.engine.evaluate import EvaluateConfig
    from spinestream.shards.config import load_config

    return load_config(EvaluateConfig, path)


def test_from_round2_redoes_from_round2(pipeline, capsys):
    run, fakes, out = pipeline
    assert run() == 0
    r1 = _round1_files(out)
    (out / "runs/round2/stray.txt").write_text("an output of the old round 2")
    capsys.readouterr()
    fakes.calls.clear()
    assert run("--from", "round2") == 0
    st = _statuses(capsys)
    assert [st[s] for s in ALL[:7]] == ["skipped"] * 7 and [st[s] for s in ALL[7:]] == ["redone"] * 5
    assert fakes.verbs() == ["train", "evaluate", "predict", "evaluate", "evaluate"]
    assert not (out / "runs/round2/stray.txt").exists()
    assert (_kept(out, "round2") / "stray.txt").is_file()  # --from moves a round's run aside too
    assert _round1_files(out) == r1


def test_changed_shard_setting_redoes_everything_after_shard(pipeline, capsys):
    run, fakes, out = pipeline
    assert run() == 0
    capsys.readouterr()
    fakes.calls.clear()
    assert run("--set", "shard.fields.jpeg_quality=90") == 0
    st = _statuses(capsys)
    assert st["synth"] == "skipped" and all(st[s] == "redone" for s in ALL[1:])
    assert fakes.verbs()[:2] == ["shard", "verify"]


def _kept(out: Path, run: str) -> Path:
    """The one superseded copy of ``run`` (DIR/runs/superseded/<run>-<UTC time>-<hash>)."""
    (kept,) = sorted((out / "runs/superseded").glob(f"{run}-*"))
    return kept


def test_changed_shard_setting_keeps_the_finished_runs_aside(pipeline, capsys):
    """Issue 16 item 3: a redo never deletes a finished training run; it moves it aside and says where."""
    run, fakes, out = pipeline
    assert run() == 0
    best = {r: (out / f"runs/{r}/best.pt").read_bytes() for r in ("round1", "round2")}
    old = {r: _files(out / f"runs/{r}") for r in ("round1", "round2")}
    capsys.readouterr()
    fakes.calls.clear()
    assert run("--set", "shard.fields.image_size=48") == 0
    log = capsys.readouterr().out
    for r in ("round1", "round2"):
        kept = _kept(out, r)
        assert (kept / "best.pt").read_bytes() == best[r]
        assert {k: v for k, v in _files(kept).items() if k != "superseded.json"} == old[r]  # moved, not copied
        note = json.loads((kept / "superseded.json").read_text())
        assert note["stage"] == r and note["moved_from"] == str(out / "runs" / r)
        assert any(k.startswith("shards.") for k in note["changed"]), note["changed"]
        line = next(x for x in log.splitlines() if x.startswith(f"spinestream run: [{r}") and "kept at" in x)
        assert f"the finished run was kept at {kept}" in line and "inputs changed (shards." in line
        assert (out / f"runs/{r}/best.pt").is_file()  # and trained again
    assert "removed " + str(out / "shards") in log  # the shard set is deleted, and the log says so
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["round1", "round2", "superseded"]


def test_no_retrain_refuses_before_touching_anything(pipeline, capsys):
    run, fakes, out = pipeline
    assert run() == 0
    before = _files(out)
    capsys.readouterr()
    fakes.calls.clear()
    assert run("--set", "shard.fields.image_size=48", "--no-retrain") == 2
    err = capsys.readouterr().err
    assert "round1" in err and "--no-retrain" in err
    assert fakes.calls == [] and _files(out) == before


def test_changed_segmentation_file_reruns_shard(pipeline, capsys):
    """Issue 16 item 11a: segmentations/ decide slice labels, so they are part of the dataset's fingerprint."""
    run, fakes, out = pipeline
    assert run() == 0
    capsys.readouterr()
    fakes.calls.clear()
    (out / "raw/segmentations/1.2.3.nii").write_text("segmentation v2")  # same size, new content
    assert run() == 0
    st = _statuses(capsys)
    assert st["synth"] == "skipped" and st["shard"] == "redone"
    assert fakes.verbs()[:2] == ["shard", "verify"]


EXTRA = ["--set", "round2.set=['data.label_tables=[labels/truth.parquet, labels/pseudo-round1.parquet, "
                  "labels/extra.parquet]']"]


def test_rewritten_label_table_of_round2_reruns_round2(pipeline, capsys):
    """Issue 16 item 11b: every table a round lists is fingerprinted, not only the pseudo stage's."""
    run, fakes, out = pipeline
    assert run(*EXTRA) == 0
    capsys.readouterr()
    fakes.calls.clear()
    (out / "shards/labels/extra.parquet").write_text("a hand-made table, v2")
    assert run(*EXTRA) == 0
    st = _statuses(capsys)
    assert [st[s] for s in ALL[:7]] == ["skipped"] * 7 and st["round2"] == "redone"
    assert fakes.verbs() == ["train", "evaluate", "predict", "evaluate", "evaluate"]


def test_checkpoints_without_a_record_resume_only_under_the_same_config(pipeline, capsys, monkeypatch):
    """Issue 16 item 11c: no record, checkpoints made by another config: moved aside and trained afresh.
    A relative --out: the trainer's config.yaml holds absolute paths, and that is the same config."""
    run0, fakes, out = pipeline
    monkeypatch.chdir(out.parent)
    run = lambda *a: run0("--out", out.name, *a)  # noqa: E731
    assert run() == 0
    (out / "stages/round2.json").unlink()
    capsys.readouterr()
    fakes.calls.clear()
    assert run() == 0  # same config: resumed
    assert _statuses(capsys)["round2"] == "resumed" and "--resume" in fakes.calls[0]
    assert not (out / "runs/superseded").exists()
    best = (out / "runs/round2/best.pt").read_bytes()
    (out / "stages/round2.json").unlink()
    fakes.calls.clear()
    assert run("--set", "round2.set=[optim.lr=0.0005]") == 0
    log = capsys.readouterr().out
    assert _statuses_of(log)["round2"] == "redone"
    assert fakes.verbs()[0] == "train" and "--resume" not in fakes.calls[0]
    kept = _kept(out, "round2")
    assert (kept / "best.pt").read_bytes() == best
    assert "config.optim.lr" in json.loads((kept / "superseded.json").read_text())["changed"]
    assert f"kept at {kept.relative_to(out.parent)}" in log and "config.yaml" in log


def test_round2_on_another_fold_than_round1_is_refused(pipeline, capsys):
    """Issue 16 item 8: round 2 is validated on the fold round 1 held out."""
    run, fakes, out = pipeline
    assert run("--set", "round2.set=[data.val_fold=1]") == 2
    err = capsys.readouterr().err
    assert "fold 0" in err and "fold 1" in err and "data.val_fold" in err
    assert fakes.calls == [] and not (out / "stages").exists()


def test_record_from_before_segmentations_were_fingerprinted_is_adopted(pipeline, capsys):
    """Upgrading spinestream does not redo a finished shard stage (or retrain) for a key it newly fingerprints."""
    run, fakes, out = pipeline
    assert run() == 0
    rec_path = out / "stages/shard.json"
    rec = json.loads(rec_path.read_text())
    del rec["inputs"]["dataset"]["segmentations"]
    rec_path.write_text(json.dumps(rec))
    capsys.readouterr()
    fakes.calls.clear()
    assert run() == 0
    log = capsys.readouterr().out
    assert _statuses_of(log)["shard"] == "skipped" and "--from shard" in log
    assert fakes.calls == []
    assert "segmentations" in json.loads(rec_path.read_text())["inputs"]["dataset"]


def test_deleted_output_of_a_complete_stage_is_redone(pipeline, capsys):
    run, fakes, out = pipeline
    assert run() == 0
    (out / "runs/round1/best.pt").unlink()
    capsys.readouterr()
    assert run() == 0
    st = _statuses(capsys)
    assert st["verify"] == "skipped" and st["round1"] == "redone" and st["report"] == "redone"


@pytest.mark.parametrize("args, message", [
    (["--from", "round3"], "--from 'round3': not a stage of this pipeline"),
    (["--set", "stages=[shard,round3]"], "unknown stage(s) ['round3']"),
    (["--set", "stages=[round1,shard]"], "in the order"),
    (["--set", "round2.epochs=3"], "round2.epochs: unknown key"),
    (["--set", "synth.studies=many"], "synth.studies: expected an integer"),
    (["--set", "round2.set=[model.nmae=x]"], "model.nmae: unknown key"),
    (["--set", "round2.set=[a=[b]]"], "not valid YAML"),
])
def test_bad_stage_or_config_is_a_clear_error(pipeline, capsys, args, message):
    run, fakes, out = pipeline
    assert run(*args) == 2
    assert message in capsys.readouterr().err
    assert fakes.calls == [] and not (out / "stages").exists()


def test_round2_without_the_pseudo_table_is_an_error(pipeline, capsys):
    run, fakes, out = pipeline
    assert run("--set", "round2.set=['data.label_tables=[labels/truth.parquet]']") == 2
    assert "labels/pseudo-round1.parquet" in capsys.readouterr().err


def test_print_config_round_trips(pipeline, capsys, tmp_path):
    run, fakes, out = pipeline
    assert run("--print-config") == 0
    text = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(text)
    assert main(["-c", str(tmp_path / "resolved.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == text and fakes.calls == []


def test_runner_with_fake_stages_and_safe_removal(tmp_path):
    """The runner alone: a table of stage callables; a redo never deletes (or moves) outside the pipeline dir."""
    from spinestream.stages import supersede

    ran = []
    knob = {"b": 1}
    out = tmp_path / "o"

    def stage(name, inputs):
        def work():
            ran.append(name)
            _write(out / name / "done", name)
        return Stage(name, work, inputs, outputs=[out / name])

    stages = [stage("a", lambda: {}), stage("b", lambda: dict(knob)), stage("c", lambda: {})]
    run_stages(stages, out / "stages", out, log=lambda s: None)
    knob["b"] = 2
    results = run_stages(stages, out / "stages", out, log=lambda s: None)
    assert ran == ["a", "b", "c", "b", "c"] and [r.status for r in results] == ["skipped", "redone", "redone"]
    outside = tmp_path / "precious"
    outside.mkdir()
    with pytest.raises(ValueError, match="not inside the pipeline directory"):
        remove_outputs([outside], out, out / "stages/.trash")
    with pytest.raises(ValueError, match="not inside the pipeline directory"):
        remove_outputs([out], out, out / "stages/.trash")
    with pytest.raises(ValueError, match="not inside the pipeline directory"):
        supersede(outside, out, {})
    assert outside.is_dir() and out.is_dir() and not (tmp_path / "superseded").exists()


def _fake_study_table(root: Path, n: int, rng):
    """``root/shards/studies.parquet`` with ``n`` boxed studies in folds 0 and 1 and study labels drawn from
    ``rng``."""
    import pandas as pd

    from spinestream.shards.layout import ROW_TYPES

    y = rng.integers(0, 2, size=(n, len(ROW_TYPES)))
    studies = pd.DataFrame({"StudyInstanceUID": [f"1.2.{i}" for i in range(n)], "fold": [0, 1] * (n // 2),
                            "cohort": "boxed", **{c: y[:, k] for k, c in enumerate(ROW_TYPES)}})
    (root / "shards").mkdir(parents=True)
    studies.to_parquet(root / "shards/studies.parquet")
    return studies


def _pseudo_summary(**fields):
    """A pseudo-label summary of 4 studies, 120 slices; ``fields`` replace the defaults."""
    from spinestream.engine.rundir import PositivesPerStudy, PseudoSummary

    d = dict(table="t", run="round1", checkpoint="best.pt", shards="s", mode="hard", thresholds=None, studies=4,
             slices=120, positive_slices={"any": 9}, per_study={},
             positive_slices_per_study=PositivesPerStudy(mean=2.25, min=1, max=4))
    return PseudoSummary(**{**d, **fields})


def _report_fixture(root: Path):
    """A pipeline directory as the stages leave it: round 1's evaluation without summary.json, round 2's with
    one, a pseudo-label summary with crack-truth quality, bench and training logs; no submission."""
    import numpy as np
    import pandas as pd

    from spinestream.engine.metrics import submission_frame
    from spinestream.engine.rundir import EvalSummary, write_eval_summary, write_pseudo_summary
    from spinestream.shards.fsutil import atomic_write_json

    rows = ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "patient_overall"]
    rng = np.random.default_rng(0)
    studies = _fake_study_table(root, 12, rng)
    table = pd.DataFrame({"target": rows + ["overall"], "accuracy": 0.8, "sensitivity": 0.5, "specificity": 0.9,
                          "auc": 0.7, "n_pos": 3, "n_neg": 3, "logloss": 0.4, "weighted_logloss": 0.05})
    val = studies[studies.fold == 0]
    sub = submission_frame({u: rng.uniform(0.05, 0.95, 8) for u in val.StudyInstanceUID})
    for run in ("round1", "round2"):
        d = root / "runs" / run / "eval-f0"
        d.mkdir(parents=True)
        table.to_csv(d / "report.csv", index=False)
        _write(root / "runs" / run / "metrics.jsonl", "".join(
            json.dumps({"step": s, "loss": 0.5, "images_per_s": ips, "data_wait": 0.2}) + "\n"
            for s, ips in ((5, 40.0), (10, 60.0), (15, 50.0))))
    sub.to_csv(root / "runs/round1/eval-f0/submission.csv", index=False)
    write_eval_summary(root / "runs/round2/eval-f0", EvalSummary(
        run="round2", checkpoint="best.pt", shards="s", fold=0, rule="max", studies=6, competition_loss=0.321,
        constant_baseline=0.654, accuracy=0.8, validation_fold=True))
    write_pseudo_summary(root / "shards/labels/pseudo-round1.parquet", _pseudo_summary(
        positive_slices={"C1": 3, "any": 9},
        quality={"overall": {"precision": 0.5, "recall": 0.6, "f1": 0.55}, "any": {"f1": 0.7}}))
    atomic_write_json(root / "bench/loader.json", {"machine": "m", "image_size": 128, "batch_size": 32,
                                                   "lines": {"torch": {"images_per_s": 93.0}}})
    for s, secs in (("shard", 12.5), ("round1", 100.0)):
        atomic_write_json(root / f"stages/{s}.json", {"format": "spinestream-stage", "stage": s, "state": "complete",
                                                      "status": "run", "seconds": secs, "inputs": {}})
    return studies, val, sub


def test_report_from_fixture_jsons_has_the_required_keys(tmp_path):
    from spinestream.engine.config import RunConfig
    from spinestream.engine.metrics import score_submission, solution_from_train, submission_frame
    from spinestream.shards.config import load_config
    from spinestream.config import PipelineConfig
    from spinestream.plan import Paths
    from spinestream.report import write_report

    root = tmp_path / "out"
    studies, val, sub = _report_fixture(root)
    cfg = load_config(PipelineConfig, None, ["stages=[shard,bench,round1,evaluate1,pseudo,round2,evaluate2,"
                                             "predict,report]"])
    rep = write_report(Paths(root), cfg, {"round1": RunConfig(), "round2": RunConfig()})
    assert json.loads((root / "report.json").read_text()) == json.loads(json.dumps(rep))
    e1, e2 = rep["evaluations"]
    for e in (e1, e2):
        assert {"name", "run", "fold", "rule", "competition_loss", "constant_baseline", "per_vertebra"} <= set(e)
        assert e["fold"] == 0 and e["rule"] == "max" and len(e["per_vertebra"]) == 9
    cols = ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "patient_overall"]
    solution = solution_from_train(val[["StudyInstanceUID", *cols]])
    assert e1["competition_loss"] == pytest.approx(score_submission(solution, sub))
    prev = studies[studies.fold != 0][cols].mean().to_numpy()  # the trainer's baseline: prevalence outside fold 0
    assert e1["constant_baseline"] == pytest.approx(
        score_submission(solution, submission_frame({u: prev for u in val.StudyInstanceUID})))
    assert (e2["competition_loss"], e2["constant_baseline"]) == (0.321, 0.654) and "summary.json" in e2["source"]
    assert rep["pseudo_labels"]["studies"] == 4 and rep["pseudo_labels"]["f1"] == {"overall": 0.55, "any": 0.7}
    assert rep["throughput"]["loader"]["images_per_s"] == {"torch": 93.0}
    assert rep["throughput"]["training"]["round1"]["images_per_s_median"] == 50.0
    times = {s["name"]: s["seconds"] for s in rep["stages"]}
    assert times["shard"] == 12.5 and times["round1"] == 100.0
    assert "missing" in next(s for s in rep["stages"] if s["name"] == "round2")  # no record: missing, not 0
    assert rep["submission"] == {"missing": str(root / "submission.csv")}
    md = (root / "report.md").read_text()
    assert "0.3210" in md and f"{e1['competition_loss']:.4f}" in md and "missing" in md
    assert (root / "report/losses.png").is_file() and "report/losses.png" in md


def test_report_says_missing_for_an_evaluation_that_did_not_run(tmp_path):
    from spinestream.engine.config import RunConfig
    from spinestream.shards.config import load_config
    from spinestream.config import PipelineConfig
    from spinestream.plan import Paths
    from spinestream.report import write_report

    cfg = load_config(PipelineConfig, None, ["stages=[round1,evaluate1,report]"])
    rep = write_report(Paths(tmp_path), cfg, {"round1": RunConfig()})
    (e,) = rep["evaluations"]
    assert e["competition_loss"] is None and e["missing"].endswith("eval-f0/report.csv")
    assert rep["throughput"]["training"]["round1"]["missing"].endswith("metrics.jsonl")
    assert not (tmp_path / "report/losses.png").exists()


def test_adding_the_compare_stage_to_a_finished_pipeline_redoes_the_report_only(pipeline, capsys):
    """Issue 16: the last-checkpoint evaluations come from a stage of their own, after predict: a finished
    pipeline gets them without its evaluate stages (and so round 2's training and predict) being redone."""
    run, fakes, out = pipeline
    assert run("--set", f"stages=[{', '.join(s for s in ALL if s != 'compare')}]") == 0
    assert not (out / "runs/round1/eval-f0-last").exists()
    capsys.readouterr()
    fakes.calls.clear()
    assert run() == 0
    st = _statuses(capsys)
    assert [st[s] for s in ALL[:10]] == ["skipped"] * 10 and (st["compare"], st["report"]) == ("run", "redone")
    assert [(c[0], _config(c)["checkpoint"]) for c in fakes.calls] == [("evaluate", "last")] * 2
    assert all((out / f"runs/{r}/eval-f0-last/report.csv").is_file() for r in ("round1", "round2"))


def _metrics(run_dir: Path, val_losses: list[float], every: int) -> None:
    """A metrics.jsonl with a training log window and one "val" record per loss, ``every`` steps apart."""
    rows = [{"step": 1, "loss": 0.5, "images_per_s": 50.0, "data_wait": 0.1}]
    rows += [{"step": every * (i + 1), "epoch": 0, "val": {"competition_loss": v}} for i, v in enumerate(val_losses)]
    _write(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def test_report_shows_best_and_last_and_its_verdict_is_the_last_checkpoints(tmp_path):
    """Issue 16: best.pt is picked on the reported fold, from more validations in round 2 (val_every_steps):
    the report shows best and last side by side, how many validations each best was picked from, and its
    verdict compares the last checkpoints. Here round 2's best.pt beats round 1's, its last checkpoint
    loses: the verdict says round 2 is higher."""
    import numpy as np
    import pandas as pd

    from spinestream.engine.config import RunConfig
    from spinestream.engine.metrics import submission_frame
    from spinestream.shards.config import load_config
    from spinestream.shards.layout import ROW_TYPES
    from spinestream.config import PipelineConfig
    from spinestream.plan import Paths
    from spinestream.report import write_report

    root = tmp_path / "out"
    rng = np.random.default_rng(0)
    studies = _fake_study_table(root, 80, rng)
    val = studies[studies.fold == 0]
    truth = val[list(ROW_TYPES)].to_numpy(dtype=float)
    table = pd.DataFrame({"target": ["overall"], "accuracy": [0.8], "auc": [0.7], "n_pos": [3], "n_neg": [3]})
    skill = {("round1", "eval-f0"): 0.2, ("round2", "eval-f0"): 0.8,  # best.pt: round 2 far better
             ("round1", "eval-f0-last"): 0.8, ("round2", "eval-f0-last"): 0.2}  # last: round 2 far worse
    for (run, d), k in skill.items():
        p = np.clip(0.5 + k * (truth - 0.5) + rng.normal(0, 0.05, truth.shape), 0.01, 0.99)
        _write(root / "runs" / run / d / "report.csv", table.to_csv(index=False))
        submission_frame(dict(zip(val.StudyInstanceUID, p))).to_csv(root / "runs" / run / d / "submission.csv",
                                                                     index=False)
    _metrics(root / "runs/round1", [0.5, 0.4, 0.45, 0.46], every=100)  # once an epoch: best @ 200 of 4
    _metrics(root / "runs/round2", [0.4, 0.35, 0.3] + [0.31] * 10, every=25)  # val_every_steps: best @ 75 of 13
    stages = "stages=[round1,evaluate1,round2,evaluate2,compare,report]"
    cfg = load_config(PipelineConfig, None, [stages])
    rep = write_report(Paths(root), cfg, {"round1": RunConfig(), "round2": RunConfig()})
    assert [(e["name"], e["run"], e["checkpoint"]) for e in rep["evaluations"]] == [
        ("evaluate1", "round1", "best"), ("evaluate2", "round2", "best"),
        ("compare", "round1", "last"), ("compare", "round2", "last")]
    assert rep["evaluations"][2]["dir"] == str(root / "runs/round1/eval-f0-last")
    c = rep["comparison"]
    assert c["best"]["ci95"][1] < 0 and c["last"]["ci95"][0] > 0  # best says round 2 wins, last says it loses
    assert (c["verdict_on"], c["verdict"]) == ("last", "round2 is higher")
    assert c["selection"]["round1"]["validations"] == 4 and c["selection"]["round2"]["validations"] == 13
    assert (c["selection"]["round1"]["best_step"], c["selection"]["round2"]["best_step"]) == (200, 75)
    md = (root / "report.md").read_text()
    for k in ("best", "last"):
        assert f"| {c[k]['a']:.4f} | {c[k]['b']:.4f} | {c[k]['diff']:+.4f} |" in md
    assert "lowest of round1's 4 / round2's 13 validations" in md
    assert "**Verdict, on the last checkpoints: round2 is higher.**" in md and "round2 is lower" not in md
    # without the compare stage there is no verdict, and best against best is not passed off as one
    cfg = load_config(PipelineConfig, None, [stages.replace("compare,", "")])
    rep = write_report(Paths(root), cfg, {"round1": RunConfig(), "round2": RunConfig()})
    c = rep["comparison"]
    assert c["verdict"] is None and "compare stage" in c["no_verdict"] and c["best"]["diff"] < 0
    md = (root / "report.md").read_text()
    assert "**No verdict**" in md and "round2 is lower" not in md


def _val_steps(epoch_steps: int, every: int, epochs: int) -> list[int]:
    """The trainer's validation steps: every ``every`` steps and at each epoch's end, a step at most once."""
    return sorted(set(range(every, epochs * epoch_steps + 1, every)) | {epoch_steps * e for e in range(1, epochs + 1)})


def test_early_stopping_patience_counts_validations_and_round2_cannot_stop_in_its_first_epoch():
    """Issue 16: the patience unit is validations, val_every_steps ones included (documented), and
    configs/round2.yaml's patience cannot end round 2 inside its first epoch (~630k slices) at any batch size
    from 8 to 64, nor before about round 1's 3 epochs of no improvement at batch 32."""
    from spinestream.engine.config import RunConfig, TrainConfig
    from spinestream.shards.config import field_docs, load_config

    doc = field_docs(TrainConfig)["early_stopping_patience"]
    assert "validations" in doc and "val_every_steps" in doc and "epoch-end" in doc
    t = load_config(RunConfig, ROOT / "configs/round2.yaml").train
    assert t.val_every_steps and t.early_stopping_patience
    for batch in (8, 16, 24, 32, 48, 64):
        epoch = 630_000 // batch
        # the first validation always improves: the earliest stop is the (patience + 1)-th validation
        earliest = _val_steps(epoch, t.val_every_steps, t.epochs)[t.early_stopping_patience]
        assert earliest >= epoch, (batch, earliest, epoch)
    epoch = 630_000 // 32
    vals = _val_steps(epoch, t.val_every_steps, t.epochs)
    assert vals[t.early_stopping_patience] - vals[0] >= 2.5 * epoch  # round 1: patience 3, once an epoch


TINY = ["synth.studies=24", "synth.size=64", "synth.slices=[16, 20]", "synth.test_studies=1",
        "shard.fields.image_size=64", "shard.fields.folds=2", "shard.fields.shard_max_samples=64",
        "bench.batches=2", "bench.warmup=1", "bench.lines=torch",
        "round1.set=[train.max_steps=6, train.epochs=1, loader.image_size=64, train.batch_size=16, "
        "loader.batch_size=16, log.wandb=disabled, train.checkpoint_every_steps=3]",
        "round2.set=[train.max_steps=4, train.epochs=1, loader.image_size=64, train.batch_size=16, "
        "loader.batch_size=16, log.wandb=disabled, train.checkpoint_every_steps=2]"]


@pytest.mark.slow
def test_demo_pipeline_end_to_end_on_a_tiny_synthetic_set(tmp_path, capsys):
    """The real demo config, every verb real, on 24 studies at 64 px. Needs the predict verb and
    model.init_from (other branches): until they are merged this fails at round2."""
    out = tmp_path / "demo"
    args = ["-c", str(ROOT / "configs/demo.yaml"), "--out", str(out), "--set", "workers=2",
            "--set", f"round1.config={ROOT / 'configs/demo-round1.yaml'}",
            "--set", f"round2.config={ROOT / 'configs/demo-round2.yaml'}"]
    for s in TINY:
        args += ["--set", s]
    assert main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    assert [(e["name"], e["checkpoint"]) for e in rep["evaluations"]] == [
        ("evaluate1", "best"), ("evaluate2", "best"), ("compare", "last"), ("compare", "last")]
    assert all(e["competition_loss"] is not None and e["constant_baseline"] is not None for e in rep["evaluations"])
    c = rep["comparison"]  # the real evaluate --checkpoint last --out ...-last, and the verdict on it
    assert c["verdict"] in ("round2 is lower", "within the noise", "round2 is higher") and "diff" in c["best"]
    assert all(c["selection"][r]["validations"] >= 1 for r in ("round1", "round2"))
    assert rep["submission"]["rows"] == 8 * rep["submission"]["studies"] > 0
    assert (out / "report.md").is_file()
    capsys.readouterr()
    assert main(args) == 0
    assert _statuses(capsys) == dict.fromkeys(ALL, "skipped")
    # without its record, round 2's run is resumed: the real trainer's config.yaml is what the pipeline expects
    (out / "stages/round2.json").unlink()
    assert main(args) == 0
    st = _statuses(capsys)
    assert st["round1"] == "skipped" and st["round2"] == "resumed" and not (out / "runs/superseded").exists()


def test_editing_a_check_stage_retrains_nothing(pipeline, capsys):
    """verify, bench, evaluate and compare write nothing a later stage reads: when one of them is redone (here
    verify.quick and bench.batches edited), training and pseudo-labels are skipped, only the report reruns."""
    run, fakes, out = pipeline
    assert run() == 0
    capsys.readouterr()
    assert run("--set", "verify.quick=true", "--set", "bench.batches=3") == 0
    st = _statuses(capsys)
    assert st["verify"] == "redone" and st["bench"] == "redone"
    assert {st[s] for s in ("round1", "evaluate1", "pseudo", "round2", "evaluate2", "predict", "compare")} == \
        {"skipped"}
    assert st["report"] in ("redone", "run")
    assert not (out / "runs" / "superseded").exists()


def test_records_from_before_the_typed_verb_configs_are_adopted_not_redone(pipeline, capsys):
    """A pipeline made when evaluate, pseudo-label, predict and compare recorded their argv (67a8963 and before):
    with the same options it is adopted (nothing reruns, round 2 is not redone through pseudo); an option that
    changed since still redoes its stage."""
    run, fakes, out = pipeline
    assert run() == 0
    old_args = {  # what the old plan recorded for the demo config's options
        "evaluate1": ["--checkpoint", "best", "--batch-size", "32"],
        "evaluate2": ["--checkpoint", "best", "--batch-size", "32"],
        "pseudo": ["--mode", "hard", "--threshold", "train-share", "--batch-size", "64"],
    }
    for stage in ("evaluate1", "evaluate2", "pseudo", "predict", "compare"):
        path = out / "stages" / f"{stage}.json"
        rec = json.loads(path.read_text())
        inputs = rec["inputs"]
        if stage == "compare":
            for r in ("round1", "round2"):
                inputs[r] = {"latest": inputs[r]["latest"], "args": ["--checkpoint", "last", "--batch-size", "32"]}
        else:
            del inputs["options"]
            if stage in old_args:
                inputs["args"] = old_args[stage]
        path.write_text(json.dumps(rec))
    capsys.readouterr()
    fakes.calls.clear()
    assert run() == 0
    text = capsys.readouterr().out
    assert set(_statuses_of(text).values()) == {"skipped"} and fakes.verbs() == []
    assert text.count("holds the same options in an older form") == 5
    assert "options" in json.loads((out / "stages/pseudo.json").read_text())["inputs"]  # recorded in today's form
    # an old record whose options differ from today's config: redone
    rec = json.loads((out / "stages/evaluate2.json").read_text())
    del rec["inputs"]["options"]
    rec["inputs"]["args"] = ["--checkpoint", "best", "--batch-size", "32", "--rule", "noisy_or"]
    (out / "stages/evaluate2.json").write_text(json.dumps(rec))
    capsys.readouterr()
    assert run() == 0
    st = _statuses(capsys)
    assert st["evaluate2"] == "redone" and st["round2"] == "skipped" and st["pseudo"] == "skipped"


def test_a_dataset_path_recorded_relative_is_the_same_dataset(pipeline, capsys, monkeypatch):
    """Paths in a YAML are now made absolute against the YAML's folder; a pipeline recorded with the same
    dataset written relative to the directory it ran in is adopted, not re-sharded (which would redo every stage
    after it, both training rounds included)."""
    run, fakes, out = pipeline
    assert run() == 0
    path = out / "stages/shard.json"
    rec = json.loads(path.read_text())
    rec["inputs"]["dataset"]["path"] = "out/raw"
    path.write_text(json.dumps(rec))
    monkeypatch.chdir(out.parent)
    capsys.readouterr()
    fakes.calls.clear()
    assert run() == 0
    text = capsys.readouterr().out
    assert set(_statuses_of(text).values()) == {"skipped"} and fakes.verbs() == []
    rec["inputs"]["dataset"]["path"] = "elsewhere/raw"  # another directory: the shard stage is redone
    path.write_text(json.dumps(rec))
    assert run() == 0
    assert _statuses(capsys)["shard"] == "redone"
