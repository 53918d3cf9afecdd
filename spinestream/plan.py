"""The concrete stages of ``spinestream run``: each one a ``spinestream`` verb with its arguments, the inputs
that decide its outputs, and the paths it writes, in one layout::

    DIR/raw/                     the synthetic dataset (the demo's synth stage)
    DIR/shards/                  spinestream shard (+ labels/pseudo-round1.parquet from the pseudo stage)
    DIR/bench/loader.json        spinestream bench loader
    DIR/runs/round1, round2      spinestream train (eval-f<k>/ inside, from spinestream evaluate;
                                 eval-f<k>-last/ from the compare stage)
    DIR/submission.csv           spinestream predict
    DIR/report.md, report.json, report/*.png
    DIR/stages/<stage>.json      completion records; <stage>.yaml the resolved config a verb was given

Verbs are called through a ``verb(argv) -> exit status`` function (the CLI table in production, fakes in
tests), so the application imports no job module. What each stage's inputs fingerprint:

* the dataset: ``SYNTH_COMPLETE``, ``train.csv``, ``train_bounding_boxes.csv`` and every file of
  ``segmentations/`` (sha256: a changed segmentation changes slice labels; 87 NIfTIs on the real data, about
  a second per GB to hash, where size + mtime would flag a copied dataset and reshard 100 GB for nothing) and
  the number of study directories: the DICOMs themselves (343 GB) are not hashed;
* a shard set: ``manifest.json`` (it holds every shard's sha256) and the study, slice and truth tables;
* a run: ``best.pt``'s sha256 (written once per improvement, by an atomic rename);
* a training round: its resolved config, the shard set, round 1's ``best.pt`` (init_from) and every table
  its ``data.label_tables`` lists (relative to the shard set, or absolute), whoever made it;
* an evaluate, pseudo-label or predict stage: its verb's options (the config it writes to
  ``DIR/stages/<stage>.yaml``, less the paths the pipeline sets there) and the checkpoint it reads;
* a label table, sample submission or report input: its sha256; test images: the sorted file names.

A training stage keeps what it cost: when it is redone its run directory is moved aside to
``DIR/runs/superseded/<round>-<UTC time>-<hash>/`` (see :mod:`spinestream.stages`), and an unrecorded run
directory is resumed only when its ``config.yaml`` is the config this round would train with. Both rounds
must validate on the same fold (``data.val_fold``): round 2 starts from round 1's weights and pseudo-labels,
which were fitted on every other fold.

The compare stage evaluates each round's last checkpoint (``spinestream evaluate -c
DIR/stages/compare-<round>.yaml``: its evaluate stage's options with ``checkpoint: last`` and ``out:
RUN/eval-f<k>-last``) for the report's round 2 vs
round 1 verdict (:mod:`spinestream.report` says why not best.pt). Only the report reads it, so it runs
after predict: adding it to a finished pipeline, or redoing it, redoes the report alone (an evaluate stage
that changed would redo everything after it, round 2's training included).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from spinestream.shards.config import ConfigError, config_from_args, format_value, load_config, to_dict
from spinestream.shards.fsutil import atomic_write_bytes
from spinestream.engine.rundir import PseudoLayout, RunLayout
from spinestream.shards.layout import Layout

from .config import EvaluateStage, PipelineConfig, TrainStage
from .stages import Stage, StageError, canonical, changed_key_list, changed_keys, fingerprint

Verb = Callable[[list[str]], int]

def cli_verb(argv: list[str]) -> int:
    """Run ``spinestream <argv>`` in this process, through the CLI table."""
    from .cli import main

    return main(argv)


@dataclass(frozen=True)
class Paths:
    """The pipeline's layout under ``root`` (``--out``)."""

    root: Path

    raw = property(lambda self: self.root / "raw")
    shards = property(lambda self: self.root / "shards")
    runs = property(lambda self: self.root / "runs")
    stages = property(lambda self: self.root / "stages")
    bench = property(lambda self: self.root / "bench")
    submission = property(lambda self: self.root / "submission.csv")
    crack_truth = property(lambda self: self.root / "crack-truth.parquet")
    report_md = property(lambda self: self.root / "report.md")
    report_json = property(lambda self: self.root / "report.json")
    report_dir = property(lambda self: self.root / "report")
    pseudo = property(lambda self: PseudoLayout.default(self.shards, self.run("round1")).table)

    def run(self, name: str) -> Path:
        return self.root / "runs" / name


def expand(path: str | None, root: Path) -> Path | None:
    return None if path is None else Path(path.replace("{out}", str(root)))


# --------------------------------------------------------------------------- fingerprints of upstream outputs


def dataset_fp(data: Path) -> dict:
    imgs, segs = data / "train_images", data / "segmentations"
    n = sum(1 for e in os.scandir(imgs) if e.is_dir()) if imgs.is_dir() else 0
    seg = {p.name: fingerprint(p) for p in sorted(segs.iterdir()) if p.is_file()} if segs.is_dir() else {}
    return {"path": str(data), "studies": n, "segmentations": seg,
            **{f: fingerprint(data / f) for f in ("SYNTH_COMPLETE", "train.csv", "train_bounding_boxes.csv")}}


def shards_fp(shards: Path) -> dict:
    lay = Layout(shards)
    return {p.relative_to(shards).as_posix(): fingerprint(p) for p in (lay.manifest, lay.studies, lay.slices,
                                                                       lay.truth)}


def files_fp(d: Path) -> dict:
    """The sorted relative file names under ``d`` (hashed) and their count: cheap for 1,500 test studies."""
    names = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) if d.is_dir() else []
    return {"path": str(d), "files": len(names), "names_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}


# --------------------------------------------------------------------------- resolved configs


def shard_config(cfg: PipelineConfig):
    """The ShardConfig the shard stage runs with: file, then ``fields``, then ``set``."""
    from spinestream.shards.shard_config import ShardConfig

    inline = [f"{k}={format_value(v)}" for k, v in cfg.shard.fields.items()]
    return load_config(ShardConfig, cfg.shard.config, inline + cfg.shard.set)


def run_config(name: str, stage: TrainStage, paths: Paths, *, needs_pseudo: bool):
    """The RunConfig of a round: the stage's file and ``set``, then the layout (data.root, out_dir, name)."""
    from spinestream.engine.config import RunConfig

    layout = [f"data.root={paths.shards}", f"out_dir={paths.runs}", f"name={name}"]
    rc = load_config(RunConfig, stage.config, stage.set + layout)
    pseudo = str(paths.pseudo.relative_to(paths.shards))
    if needs_pseudo and pseudo not in rc.data.label_tables:
        raise ConfigError(f"{name}: its config ({stage.config}) must list the pseudo-label table in "
                         f"data.label_tables (after labels/truth.parquet): add {pseudo!r}")
    return rc


def write_yaml(path: Path, cfg) -> Path:
    atomic_write_bytes(path, yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())
    return path


def call(verb: Verb, argv: list[str]) -> None:
    """Run one verb; StageError when it fails (argparse's SystemExit included)."""
    print(f"== spinestream {' '.join(argv)}", flush=True)
    try:
        rc = verb(argv)
    except SystemExit as e:  # argparse: bad arguments
        rc = e.code if isinstance(e.code, int) else 2
    if rc:
        raise StageError(f"`spinestream {' '.join(argv)}` failed (exit {rc}, its error above); fix it and rerun "
                         f"the same command: finished stages are skipped")


# --------------------------------------------------------------------------- the stages


def build_stages(cfg: PipelineConfig, root: Path, verb: Verb = cli_verb) -> list[Stage]:
    """The stages ``cfg.stages`` names, in order. Configs are resolved here, so a typo in round 2's config is
    an error before shard starts."""
    paths = Paths(Path(root))
    workers = str(cfg.workers or os.cpu_count() or 1)
    configs = {"shard": shard_config(cfg)} if "shard" in cfg.stages else {}
    for r in ("round1", "round2"):
        if r in cfg.stages or f"evaluate{r[-1]}" in cfg.stages or "compare" in cfg.stages:
            configs[r] = run_config(r, getattr(cfg, r), paths, needs_pseudo=r == "round2" and "pseudo" in cfg.stages)
    if "round1" in configs and "round2" in configs:
        f1, f2 = configs["round1"].data.val_fold, configs["round2"].data.val_fold
        if f1 != f2:
            raise ConfigError(
                f"round1 holds out fold {f1} (data.val_fold) but round2 would validate on fold {f2}: round 2 "
                f"starts from round 1's weights and pseudo-labels, fitted on every fold but {f1}, so it must be "
                f"validated on fold {f1} too. Set data.val_fold: {f1} in {cfg.round2.config} (or --set "
                f"\"round2.set=[data.val_fold={f1}]\"), or change both rounds' folds")
    makers = {"synth": _synth, "shard": _shard, "verify": _verify, "bench": _bench, "round1": _train,
              "round2": _train, "evaluate1": _evaluate, "evaluate2": _evaluate, "pseudo": _pseudo,
              "predict": _predict, "compare": _compare, "report": _report}
    return [makers[name](name, cfg, paths, configs, verb, workers) for name in cfg.stages]


def _synth(name, cfg, paths, configs, verb, workers) -> Stage:
    def flag(k, v):
        return [f"--{k.replace('_', '-')}", ":".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]

    params = cfg.synth.params()
    argv = ["synth", "--out", str(paths.raw), "--workers", workers, "--force", "--quiet"]
    argv += [a for k, v in params.items() if v is not None for a in flag(k, v)]
    return Stage(name, lambda: call(verb, argv), lambda: {"synth": params}, outputs=[paths.raw],
                 required=[paths.raw / "SYNTH_COMPLETE"])


def _shard(name, cfg, paths, configs, verb, workers) -> Stage:
    data, sc = expand(cfg.shard.data, paths.root), configs["shard"]
    argv = ["shard", "--data", str(data), "--out", str(paths.shards), "-c", str(paths.stages / "shard.yaml"),
            "--workers", workers] + (["--limit", str(cfg.shard.limit)] if cfg.shard.limit is not None else [])

    def run():
        write_yaml(paths.stages / "shard.yaml", sc)
        call(verb, argv)  # resumable: a rerun skips committed studies

    def upgrade(old: dict) -> dict:
        """A dataset path recorded as written (relative to the directory run started in): today's paths in a YAML
        are made absolute against the YAML's folder. The same directory is the same dataset (its files are
        fingerprinted beside the path); a relative path is read against the current directory."""
        rec = old.get("dataset")
        if isinstance(rec, dict) and isinstance(rec.get("path"), str) and \
                Path(rec["path"]).absolute().resolve() == Path(data).absolute().resolve():
            return old | {"dataset": rec | {"path": str(data)}}
        return old

    return Stage(name, run, lambda: {"config": to_dict(sc), "dataset": dataset_fp(data), "limit": cfg.shard.limit},
                 outputs=[paths.shards], required=[Layout(paths.shards).manifest], upgrade=upgrade)


def _verify(name, cfg, paths, configs, verb, workers) -> Stage:
    v = cfg.verify
    argv = ["verify", str(paths.shards)] + ["--quick"] * v.quick + ["--decode"] * v.decode
    return Stage(name, lambda: call(verb, argv), lambda: {"shards": shards_fp(paths.shards), "args": argv[2:]},
                 feeds_later=False)


def _bench(name, cfg, paths, configs, verb, workers) -> Stage:
    b = cfg.bench
    args = ["--batches", str(b.batches), "--warmup", str(b.warmup)]
    args += (["--lines", b.lines] if b.lines else []) + (["--image-size", str(b.image_size)] if b.image_size else [])
    args += ["--dicom", str(expand(cfg.shard.data, paths.root))] if b.dicom else []
    argv = ["bench", "loader", "--shards", str(paths.shards), *args, "--workers", workers,
            "--results", str(paths.bench)]
    return Stage(name, lambda: call(verb, argv), lambda: {"shards": shards_fp(paths.shards), "args": args},
                 outputs=[paths.bench], required=[paths.bench / "loader.json"], feeds_later=False)


def trained_config(rc, init_from: Path | None) -> dict:
    """The config ``spinestream train -c <rc> --set model.init_from=...`` runs with, as it writes it to
    ``RUN_DIR/config.yaml`` (engine/train.py: paths made absolute, then ``write_config``)."""
    rc = dataclasses.replace(rc, model=dataclasses.replace(rc.model, init_from=None if init_from is None else
                                                           str(init_from)))
    return canonical(to_dict(rc.with_absolute_paths()))


def _train(name, cfg, paths, configs, verb, workers) -> Stage:
    stage: TrainStage = getattr(cfg, name)
    rc, run_dir, resolved = configs[name], paths.run(name), paths.stages / f"{name}.yaml"
    # init_from: null overrides a config's own model.init_from (the stage says: no round-1 weights)
    init_path = None if stage.init_from is None else RunLayout(paths.run(stage.init_from)).best
    lay = RunLayout(run_dir)
    init = ["--set", "model.init_from=null" if init_path is None else f"model.init_from={init_path}"]

    def run():
        # absolute: paths in a YAML file are relative to its directory (DIR/stages), --out may be relative
        write_yaml(resolved, rc.with_absolute_paths())
        resume = bool(lay.checkpoints())
        call(verb, ["train", *(["--resume", str(run_dir)] if resume else []), "-c", str(resolved), *init])

    def inputs():
        out = {"config": to_dict(rc), "shards": shards_fp(paths.shards)}
        if stage.init_from:
            out["init_from"] = fingerprint(init_path)
        if "pseudo" in cfg.stages and name == "round2":
            out["pseudo"] = fingerprint(paths.pseudo)
        out["label_tables"] = {t: fingerprint(Path(t) if Path(t).is_absolute() else paths.shards / t)
                               for t in rc.data.label_tables}
        return out

    def check_resume() -> tuple[str, list[str]]:
        """('', []) when the run directory was made by this round's config (or holds nothing to resume), else
        (why not, the differing config keys)."""
        ckpts = lay.checkpoints()
        if not ckpts and not lay.best.exists():
            return "", []  # nothing trained: the trainer starts afresh
        if not ckpts:
            return f"{run_dir} holds a {lay.best.name} but no checkpoint to resume from", []
        from spinestream.engine.rundir import read_config

        path = lay.config
        try:  # read as the trainer would read it: the same defaults, paths absolute as it stores them
            made_by = canonical(to_dict(read_config(run_dir).with_absolute_paths()))
        except (OSError, ConfigError, yaml.YAMLError) as e:
            return f"its config {path} cannot be read ({e}): which config made it is unknown", []
        want = trained_config(rc, init_path)
        if made_by != want:
            keys = changed_key_list(made_by, want, "config.")
            return f"{path} differs from this round's config ({changed_keys(made_by, want, 'config.')})", keys
        return "", []

    return Stage(name, run, inputs, outputs=[run_dir], required=[lay.best], keep=True,
                 check_resume=check_resume)


def latest_checkpoints(run_dir: Path) -> list[str]:
    return [p.name for p in RunLayout(run_dir).checkpoints()]


def verb_config(cls: type, stage, **owned):
    """The config of verb ``cls`` that a stage runs: the stage's options (the stage extends ``cls``), then the paths
    the pipeline owns (``owned``), absolute, so the file works from any directory."""
    fixed = {k: [str(Path(p).absolute()) for p in v] if isinstance(v, list) else None if v is None else
             str(Path(v).absolute()) for k, v in owned.items()}
    return cls(**{f.name: getattr(stage, f.name) for f in dataclasses.fields(cls) if f.name not in fixed}, **fixed)


def options(cfg, owned: tuple[str, ...]) -> dict:
    """What a verb's config fingerprints: its options, less the paths the pipeline owns (the layout decides
    those, and the upstream fingerprints cover what they hold)."""
    return {k: v for k, v in to_dict(cfg).items() if k not in owned}


def checkpoint_fp(run_dir: Path, checkpoint: str) -> dict | None:
    """The fingerprint of the checkpoint a verb reads: best.pt, the latest step checkpoint's name, or a file."""
    if checkpoint == "last":
        return {"latest": latest_checkpoints(run_dir)}
    return fingerprint(RunLayout(run_dir).best if checkpoint == "best" else Path(checkpoint))


def call_with_config(verb: Verb, name: str, path: Path, cfg) -> None:
    """Write ``cfg`` to ``path`` (DIR/stages/<stage>.yaml) and run ``spinestream <name> -c <path>``."""
    write_yaml(path, cfg)
    call(verb, [name, "-c", str(path)])


EVALUATE_OWNS = ("run", "shards", "out")
PREDICT_OWNS = ("run", "images", "sample_submission", "out")
PSEUDO_OWNS = ("run", "shards", "out", "truth")


def args_as_options(cls: type, owned: tuple[str, ...]) -> Callable[[dict], dict]:
    """The ``upgrade`` of a stage whose record predates the typed verb configs: its ``"args"`` (the verb's argv
    less the paths the pipeline owns) become the ``"options"`` they meant, by the verb's own parser; a record
    without them (predict recorded none) gets the verb's defaults. Unreadable args stay as they were (a redo)."""
    from spinestream.shards.config import verb_parser

    def upgrade(old: dict) -> dict:
        if "options" in old:
            return old
        new = {k: v for k, v in old.items() if k != "args"}
        try:
            cfg = config_from_args(cls, verb_parser(cls, "upgrade", None).parse_args(list(old.get("args", []))))
        except (SystemExit, ConfigError):
            return old
        return new | {"options": options(cfg, owned)}

    return upgrade


def _evaluate(name, cfg, paths, configs, verb, workers) -> Stage:
    from spinestream.engine.evaluate import EvaluateConfig

    e: EvaluateStage = getattr(cfg, name)
    run = f"round{name[-1]}"
    run_dir = paths.run(run)
    out = RunLayout(run_dir).evaluation(e.fold_of(configs[run]))
    ec = verb_config(EvaluateConfig, e, run=run_dir, shards=paths.shards, out=out.root)

    def inputs():
        return {"run": checkpoint_fp(run_dir, ec.checkpoint), "options": options(ec, EVALUATE_OWNS),
                "shards": shards_fp(paths.shards)}

    return Stage(name, lambda: call_with_config(verb, "evaluate", paths.stages / f"{name}.yaml", ec), inputs,
                 outputs=[out.root], required=[out.report], feeds_later=False,
                 upgrade=args_as_options(EvaluateConfig, EVALUATE_OWNS))


def _compare(name, cfg, paths, configs, verb, workers) -> Stage:
    """Both rounds' last checkpoints evaluated as their evaluate stages evaluate best.pt, into eval-f<k>-last."""
    from spinestream.engine.evaluate import EvaluateConfig

    jobs = {}
    for run in ("round1", "round2"):
        e: EvaluateStage = getattr(cfg, f"evaluate{run[-1]}")
        run_dir = paths.run(run)
        out = RunLayout(run_dir).evaluation(e.fold_of(configs[run]), last=True)
        ec = verb_config(EvaluateConfig, e, run=run_dir, shards=paths.shards, out=out.root)
        jobs[run] = (dataclasses.replace(ec, checkpoint="last"), out)

    def run():
        for r, (ec, _) in jobs.items():
            call_with_config(verb, "evaluate", paths.stages / f"{name}-{r}.yaml", ec)

    def inputs():
        return {r: {"latest": latest_checkpoints(Path(ec.run)), "options": options(ec, EVALUATE_OWNS)}
                for r, (ec, _) in jobs.items()} | {"shards": shards_fp(paths.shards)}

    def upgrade(old: dict) -> dict:
        each = args_as_options(EvaluateConfig, EVALUATE_OWNS)
        return {k: each(v) if k in jobs and isinstance(v, dict) else v for k, v in old.items()}

    outs = [out for _, out in jobs.values()]
    return Stage(name, run, inputs, outputs=[o.root for o in outs], required=[o.report for o in outs],
                 feeds_later=False, upgrade=upgrade)


def _pseudo(name, cfg, paths, configs, verb, workers) -> Stage:
    from spinestream.engine.pseudo import PseudoLabelConfig

    p, table, run_dir = cfg.pseudo, paths.pseudo, paths.run("round1")
    pc = verb_config(PseudoLabelConfig, p, run=run_dir, shards=paths.shards, out=table,
                     truth=paths.crack_truth if p.synth_truth else None)
    side = [PseudoLayout(table).summary, PseudoLayout(table).heatmap]

    def run():
        if p.synth_truth:
            call(verb, ["synth-truth", "--raw", str(expand(cfg.shard.data, paths.root)), "--shards",
                        str(paths.shards), "--out", str(paths.crack_truth)])
        call_with_config(verb, "pseudo-label", paths.stages / f"{name}.yaml", pc)

    def inputs():
        return {"run": checkpoint_fp(run_dir, pc.checkpoint), "options": options(pc, PSEUDO_OWNS),
                "synth_truth": p.synth_truth, "shards": shards_fp(paths.shards)}

    return Stage(name, run, inputs, outputs=[table, *side] + ([paths.crack_truth] if p.synth_truth else []),
                 required=[table, side[0]], upgrade=args_as_options(PseudoLabelConfig, PSEUDO_OWNS))


def _predict(name, cfg, paths, configs, verb, workers) -> Stage:
    from .predict import PredictConfig

    p = cfg.predict
    images, sample = expand(p.images, paths.root), expand(p.sample_submission, paths.root)
    pc = verb_config(PredictConfig, p, run=[paths.run(r) for r in p.runs], images=images, sample_submission=sample,
                     out=paths.submission)

    def inputs():
        return {"runs": {r: checkpoint_fp(paths.run(r), pc.checkpoint) for r in p.runs},
                "images": files_fp(images), "sample_submission": fingerprint(sample) if sample else None,
                "options": options(pc, PREDICT_OWNS)}

    return Stage(name, lambda: call_with_config(verb, "predict", paths.stages / f"{name}.yaml", pc), inputs,
                 outputs=[paths.submission], upgrade=args_as_options(PredictConfig, PREDICT_OWNS))


def _report(name, cfg, paths, configs, verb, workers) -> Stage:
    from .stages import record_path

    others = [s for s in cfg.stages if s != "report"]

    def run():
        from .report import write_report

        write_report(paths, cfg, configs)

    def inputs():
        # every stage before it rewrites its record when it runs, so the records' hashes say "something changed"
        return {"records": {s: fingerprint(record_path(paths.stages, s)) for s in others}}

    return Stage(name, run, inputs, outputs=[paths.report_md, paths.report_json, paths.report_dir],
                 required=[paths.report_md, paths.report_json])
