"""``spinestream run -c pipeline [--out DIR] [--from STAGE] [--no-retrain]``: the whole pipeline.

    synth (demo) -> shard -> verify -> bench (demo) -> round1 -> evaluate1 -> pseudo -> round2 -> evaluate2
    -> predict -> report

    spinestream run -c pipeline --out /data/spine     # run, or finish an interrupted run (from any directory)
    spinestream run -c pipeline --from round2         # redo round 2 and everything after it
    spinestream run -c pipeline --set round2.set='[optim.lr=3e-4]'
    spinestream run -c pipeline --no-retrain          # refuse if a finished run would be redone
    spinestream run -c my-pipeline.yaml --print-config   # an edited copy (spinestream configs copy pipeline --to .)

Every stage is a spinestream verb. Its completion record DIR/stages/<stage>.json holds its inputs (resolved
config and arguments, sha256 fingerprints of the upstream outputs it read: the dataset's CSVs and
segmentations, the shard set's manifest and tables, every label table a round lists, round 1's best.pt). A
complete stage with the same inputs is skipped; an interrupted one resumes (shard skips committed studies;
training continues with `spinestream train --resume DIR/runs/<round>` from its last checkpoint, and only when
the run's config.yaml is the config the round would train with); one whose inputs changed is redone with
every stage after it. --from STAGE redoes that stage and the rest on purpose.

A redo never deletes a training run. By default a round that must be redone (its inputs changed, something
before it ran, --from, or an unrecorded run made by another config) has its run directory moved aside, whole,
to DIR/runs/superseded/<round>-<UTC time>-<hash of its old inputs>/, with superseded.json naming the reason
and the changed input keys; the status line says where it was kept. Rounds take days of GPU time: keeping
them costs only disk, and a run that goes ahead unattended does not stop at a question. Delete superseded
runs yourself once they are no longer wanted. With --no-retrain the pipeline refuses instead (exit 2, before
any stage runs or anything is moved) when a round with a run directory would be redone. Other stages'
outputs are deleted on a redo (shard: DIR/shards, which can be ~100 GB), each named with its file count and
size in the status line. Nothing outside DIR is moved or deleted. Rounds 1 and 2 must validate on the same
data.val_fold. One status line per stage: skipped / run / resumed / redone. Writes DIR/report.md,
DIR/report.json and the submission DIR/submission.csv.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from spinestream import InputError
from spinestream.shards.config import HelpFormatter, add_print_config, load_config, plain, print_config

from .config import STAGES, PipelineConfig
from .stages import check_stage, run_stages


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinestream run", description=plain(__doc__), formatter_class=HelpFormatter)
    p.add_argument("-c", "--config", type=Path, default=None, help="pipeline config: a shipped one's name (pipeline, demo) or a YAML file")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the config's out)")
    p.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                   help=f"redo from this stage on: {' '.join(STAGES)} (a round's run is moved aside, not deleted)")
    p.add_argument("--no-retrain", action="store_true",
                   help="refuse (exit 2, nothing run or moved) when round1/round2 would be redone over an existing "
                        "run; default: move that run aside to DIR/runs/superseded/ and retrain")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set round1.config=my-round1.yaml")
    add_print_config(p)
    return p


def main(argv: list[str] | None = None, verb=None) -> int:
    """The verb; ``verb`` replaces the CLI table (tests)."""
    from .plan import build_stages, cli_verb

    args = build_parser().parse_args(argv)
    # every error here is a SpinestreamError (the console script's one line, exit 2) or a bug; a failed stage's
    # StageError says how to go on
    cfg = load_config(PipelineConfig, args.config, args.set)
    if args.print_config:
        print_config(cfg)
        return 0
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise InputError("spinestream run is one process: its stages write the shards, tables and records one after "
                         "another. Under torchrun start the stages' verbs (spinestream train / evaluate / "
                         "pseudo-label / predict -c ...; README, 'More than one GPU'), or run the pipeline without "
                         "torchrun")
    root = Path(args.out or cfg.out)
    check_stage(cfg.stages, args.from_stage)
    stages = build_stages(cfg, root, verb or cli_verb)
    t0 = time.perf_counter()
    log = lambda line: print(f"spinestream run: {line}", flush=True)  # noqa: E731
    results = run_stages(stages, root / "stages", root, from_stage=args.from_stage, log=log,
                         refuse_retrain=args.no_retrain)
    done = sum(r.status != "skipped" for r in results)
    print(f"spinestream run: {len(results)} stages ({done} ran, {len(results) - done} skipped) in "
          f"{time.perf_counter() - t0:.1f}s -> {root / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
