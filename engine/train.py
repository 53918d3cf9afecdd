"""``spinestream train``: round 1 or round 2 of the slice classifier.

    spinestream train -c round1 --set data.root=shards-512            # a shipped config, by name
    spinestream train --resume runs/round1 --set optim.lr=3e-4      # continue, with a new learning rate
    spinestream train -c demo-round1                                 # the CPU demo
    spinestream train -c my-round1.yaml       # a file: its paths are relative to it (spinestream configs)
    torchrun --nproc-per-node 4 $(which spinestream) train -c round2   # data-parallel on 4 GPUs (engine/dist.py)

Writes runs/<name>/: config.yaml, batch_size.json, metrics.jsonl, curves.png,
ckpt-<step>.pt (last keep_last), best.pt; wandb's files under runs/<name>/wandb/ (log.wandb; WANDB_MODE,
when set, wins over it unless log.wandb is disabled, which never imports wandb).
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from spinestream.shards.config import HelpFormatter, add_print_config, config_fields_help, load_config, plain, \
    print_config

from . import checkpoint as ck
from .config import RunConfig
from .rundir import RunLayout


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinestream train", description=plain(__doc__),
                                epilog=config_fields_help(RunConfig), formatter_class=HelpFormatter)
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="run config: a shipped one's name (round1, round2, demo-round1) or a YAML file; with --resume, "
                        "defaults to the run's config.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 --set data.root=shards-512")
    p.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                   help="continue a run from its latest checkpoint (changed hyper-parameters are applied)")
    add_print_config(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .trainer import Trainer, write_config

    try:
        if args.resume:
            ck.check_run_dir(args.resume)
            cfg = load_config(RunConfig, args.config or RunLayout(args.resume).config, args.set)
            run_dir, resume_from = args.resume, ck.latest(args.resume)
        else:
            cfg = load_config(RunConfig, args.config, args.set)
        if args.print_config:
            print_config(cfg)
            return 0
        if not args.resume:
            run_dir, resume_from = Path(cfg.out_dir) / cfg.name, None
            if run_dir.exists() and any(ck.checkpoints(run_dir)):
                raise ck.RunError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                                  f"or choose another name (--set name=...)")
        cfg = cfg.with_absolute_paths()  # the run directory works from any directory later (evaluate, predict)
        trainer = Trainer(cfg, run_dir, resume_from=resume_from)  # checks everything before it writes
        main = trainer.dist.main  # under torchrun rank 0 writes the run directory and speaks for the group
        if main:
            ck.mark_run(run_dir)
            write_config(run_dir, cfg)  # only once the config is known to fit: a failed resume changes nothing
        sel = trainer.train_sel
        extra = sel.oversampled
        n_shards = sum(s.oversample_of is None for s in sel.shards)
        d = trainer.dist
        ranks = f" x {d.world} ranks (global batch {trainer.loader_cfg.batch_size * d.world * cfg.optim.grad_accum})" \
            if d.enabled else ""
        print_main = print if main else (lambda *a, **k: None)
        print_main(f"spinestream train: {cfg.model.name} on {trainer.device} ({trainer.precision}), "
              f"{trainer.loader.backend} loader, batch {trainer.loader_cfg.batch_size}{ranks}, "
              f"{sel.samples - extra} training slices in {n_shards} shards"
              + (f" (+{extra} oversampled reads of positives)" if extra else "") + ", "
              f"{len(trainer.val_studies)} validation studies (fold {cfg.data.val_fold}), "
              f"{trainer.total_steps} steps -> {run_dir}" + (f" (resuming at step {trainer.step})" if resume_from else ""),
              file=sys.stderr)
        try:
            best = trainer.fit()
        finally:
            trainer.loader.close()
    except KeyboardInterrupt as e:  # TrainingInterrupted (Ctrl-C: the step in flight finished and was saved)
        print(interrupted_message(e, run_dir), file=sys.stderr)
        return 130
    if main:
        print(f"done: best validation competition loss {best['metric']:.4f} at step {best['step']} -> "
              f"{RunLayout(run_dir).best}")
    return 0


def interrupted_message(e: KeyboardInterrupt, run_dir: Path) -> str:
    """One line for Ctrl-C: where the run stands and the exact command that continues it."""
    step = getattr(e, "step", None)  # TrainingInterrupted; a second Ctrl-C is a plain KeyboardInterrupt
    found = ck.checkpoints(run_dir)
    path = found[-1] if found else None
    where = f" at step {step}" if step is not None else ""
    if path is None:
        return (f"spinestream train: interrupted{where} before the first checkpoint; start it again with the same "
                f"command")
    saved = "saved" if getattr(e, "saved_now", False) else "the last checkpoint is"
    return (f"spinestream train: interrupted{where}; {saved} {path}. Continue with: "
            f"spinestream train --resume {shlex.quote(str(run_dir))}")


if __name__ == "__main__":
    sys.exit(main())
