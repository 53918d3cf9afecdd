"""``spinestream run -c configs/pipeline.yaml [--out DIR] [--from STAGE]``: the whole pipeline, resumable.

    synth (demo) -> shard -> verify -> bench (demo) -> round1 -> evaluate1 -> pseudo -> round2 -> evaluate2
    -> predict -> report

    spinestream run -c configs/pipeline.yaml --out /data/spine     # run, or finish an interrupted run
    spinestream run -c configs/pipeline.yaml --from round2         # redo round 2 and everything after it
    spinestream run -c configs/pipeline.yaml --set round2.set='[optim.lr=3e-4]'
    spinestream run -c configs/pipeline.yaml --print-config

Every stage is a spinestream verb. Its completion record DIR/stages/<stage>.json holds its inputs (resolved
config and arguments, sha256 fingerprints of the upstream outputs it read). A complete stage with the same
inputs is skipped; an interrupted one resumes (shard skips committed studies; training continues with
`spinestream train --resume DIR/runs/<round>` from its last checkpoint); one whose inputs changed is redone
with every stage after it. --from STAGE redoes that stage and the rest on purpose: their outputs are moved
aside and deleted first (only paths inside DIR). One status line per stage: skipped / run / resumed / redone.
Writes DIR/report.md, DIR/report.json and the submission DIR/submission.csv.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shards.config import ConfigError, HelpFormatter, add_print_config, load_config, plain, print_config

from .config import STAGES, PipelineConfig
from .stages import StageError, check_stage, run_stages


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinestream run", description=plain(__doc__), formatter_class=HelpFormatter)
    p.add_argument("-c", "--config", type=Path, default=None, help="pipeline YAML (configs/pipeline.yaml)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: the config's out)")
    p.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                   help=f"redo from this stage on: {' '.join(STAGES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set round1.config=configs/round1.yaml")
    add_print_config(p)
    return p


def main(argv: list[str] | None = None, verb=None) -> int:
    """The verb; ``verb`` replaces the CLI table (tests)."""
    from .plan import build_stages, cli_verb

    import yaml

    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(PipelineConfig, args.config, args.set)
        if args.print_config:
            print_config(cfg)
            return 0
        root = Path(args.out or cfg.out)
        check_stage(cfg.stages, args.from_stage)
        stages = build_stages(cfg, root, verb or cli_verb)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"spinestream run: error: {e}", file=sys.stderr)
        return 2
    except yaml.YAMLError as e:  # a config file or a --set value (the pipeline's or a stage's) that does not parse
        text = " ".join(str(e).split())
        print(f"spinestream run: error: a config file or --set value is not valid YAML ({text}); quote values "
              f"that hold brackets, e.g. --set \"round2.set=['data.label_tables=[a, b]']\"", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    log = lambda line: print(f"spinestream run: {line}", flush=True)  # noqa: E731
    try:
        results = run_stages(stages, root / "stages", root, from_stage=args.from_stage, log=log)
    except (StageError, ValueError, FileNotFoundError) as e:
        print(f"spinestream run: error: {e}; fix it and rerun the same command: finished stages are skipped",
              file=sys.stderr)
        return 1
    done = sum(r.status != "skipped" for r in results)
    print(f"spinestream run: {len(results)} stages ({done} ran, {len(results) - done} skipped) in "
          f"{time.perf_counter() - t0:.1f}s -> {root / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
