"""``spinestream demo``: the main job on the embedded synthetic default.

    synth (a small dataset in the Kaggle layout) -> shard -> verify -> bench loader
    -> train round 1 (a tiny timm model on the CPU) -> evaluate

Each step is a ``spinestream`` verb run through the CLI table (only the stale check reads
preprocess.synth's SynthConfig); every step is resumable, so rerunning the demo finishes or
skips work.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from shards.config import HelpFormatter, plain

    from .cli import main as cli

    p = argparse.ArgumentParser(prog="spinestream demo", description=plain(__doc__), formatter_class=HelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("demo-data"), help="where the demo writes everything")
    p.add_argument("--studies", type=int, default=256, help="synthetic studies")
    p.add_argument("--size", type=int, default=128, help="synthetic DICOM size (pixels)")
    p.add_argument("--slices", default="24:40", help="slices per study, LO:HI")
    p.add_argument("--boxed-share", type=float, default=0.5,
                   help="fraction of boxed studies: enriched from the real 12%% so the CPU run sees enough "
                        "fractured slices")
    p.add_argument("--crack-width", default="3:4",
                   help="crack widths in mm: wider than the synth default (1.2:2.0) so a tiny network at 128 px "
                        "sees them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("-c", "--config", default="configs/demo.yaml", help="shard config")
    p.add_argument("--train-config", default="configs/demo-round1.yaml", help="round-1 run config")
    args = p.parse_args(argv)

    raw, out = args.dir / "raw", args.dir / "shards"
    steps = []
    stale = _stale(raw / "SYNTH_COMPLETE", args)
    if stale:
        print(f"spinestream demo: error: {args.dir} holds a demo made with other settings ({stale}); "
              f"remove it (rm -rf {args.dir}) or pass --dir NEW_DIR", file=sys.stderr)
        return 2
    if not (raw / "SYNTH_COMPLETE").exists():
        steps.append(("synth", ["synth", "--out", str(raw), "--studies", str(args.studies), "--seed", str(args.seed),
                                "--size", str(args.size), "--slices", args.slices,
                                "--boxed-share", str(args.boxed_share), "--crack-width", args.crack_width,
                                "--force"]))
    config = ["-c", args.config] if Path(args.config).is_file() else []
    steps.append(("shard", ["shard", "--data", str(raw), "--out", str(out), "--workers", str(args.workers), *config]))
    steps.append(("verify", ["verify", str(out)]))
    steps.append(("bench loader", ["bench", "loader", "--shards", str(out), "--dicom", str(raw), "--batches", "10",
                                   "--warmup", "2", "--results", str(args.dir / "bench")]))
    run_dir = args.dir / "runs" / "demo-round1"
    if not (run_dir / "best.pt").exists():
        steps.append(("train round 1", ["train", "-c", args.train_config, "--set", f"data.root={out}",
                                        "--set", f"out_dir={args.dir / 'runs'}", "--set", "name=demo-round1"]))
    steps.append(("evaluate", ["evaluate", "--run", str(run_dir)]))
    for name, cmd in steps:
        t0 = time.perf_counter()
        print(f"\n== demo: spinestream {' '.join(cmd)}", flush=True)
        rc = cli(cmd)
        if rc:
            print(f"demo: step '{name}' failed (exit {rc})", file=sys.stderr)
            return rc
        print(f"== demo: {name} took {time.perf_counter() - t0:.1f}s", flush=True)
    print(f"\ndemo complete: shards in {out} (manifest.json, wds/, volumes.zarr/, *.parquet), "
          f"loader figures in {args.dir / 'bench'}, round 1 in {run_dir} (curves.png, eval-f0/heatmaps.png)")
    return 0


def _synth_config(args: argparse.Namespace):
    """The SynthConfig the demo's flags ask for (the synth step passes the same values)."""
    from preprocess.synth import SynthConfig
    from preprocess.synth.cli import mm_range_arg, slices_arg

    return SynthConfig(studies=args.studies, seed=args.seed, size=args.size, slices=slices_arg(args.slices),
                       boxed_share=args.boxed_share, crack_width=mm_range_arg(args.crack_width))


def _stale(marker: Path, args: argparse.Namespace) -> str:
    """What differs between the finished synthetic dataset in ``marker``'s directory and the one asked for
    ('' when it matches or there is none): the later steps resume, so they must not mix two datasets.
    Every SynthConfig field is compared."""
    if not marker.exists():
        return ""
    import json

    try:
        have = json.loads(marker.read_text())["params"]
    except (ValueError, KeyError):
        return "an unreadable SYNTH_COMPLETE"
    want = _synth_config(args).params()
    diff = [f"{k} {have.get(k)} != {v}" for k, v in want.items() if have.get(k) != v]
    return ", ".join(diff)

if __name__ == "__main__":
    sys.exit(main())
