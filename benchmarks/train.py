"""``spinestream bench train``: is the model or the loader the limit?

For the configured model and input size it builds a real :class:`spinestream.engine.trainer.Trainer` (the
same ``build_*`` setup a training run uses) and measures, in the same run:

* **model** -- training images/s of the trainer's own step (``Trainer._step``: forward, weighted
  BCE, backward, unscale/clip, fused Adam, EMA, GradScaler in fp16) on one batch already on the
  device: the model's own limit;
* **loader** -- the same step fed by the real training loader from the shards;
* their ratio, the loader's *saturation* (1.0 = the GPU never waits for data), peak memory
  (torch's allocator and, on a GPU, the device's used memory from NVML / nvidia-smi, which
  includes DALI's pool, nvJPEG and the CUDA context), and the batch ``batch_size: auto`` picks
  under ``train.max_memory_gb``.

The timed windows exclude warm-up steps, each epoch's first batch (the pipeline's rebuild) and
partial batches (the epoch's padded last one, a new shape), and are bracketed by device
synchronisations so queued work is counted.

On a CPU it runs a tiny model to show it works; on a GPU the figure that matters is
tf_efficientnetv2_s at 384x384 under the 16 GB cap (target saturation >= 0.95).
Results go to ``benchmarks/results/train.json``.

**Scaling** (``--nproc 1 2 4``): the same two measurements data-parallel, one ``torchrun`` group per N
(``spinestream.engine.dist``: DDP, gradients averaged every step), each rank on its own device -- a GPU each,
or on a machine without GPUs one CPU core each (``--threads-per-rank``, default 1: a core stands in for a
card). It prints images/s per rank and in total for every N, and the scaling efficiency
``total(N) / (N x total(1))``, all measured in the same run; results in
``benchmarks/results/train_scaling.json`` and ``train_scaling.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: CPU-GPU sync point, only at the edges of a timed window


def device_memory_used_gib(device) -> float | None:
    """Memory in use on the whole device (every allocator, DALI and the CUDA context), or None off CUDA."""
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.device_memory_used(device) / 2**30  # NVML through pynvml
    except Exception:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                              f"--id={device.index or 0}"], capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0]) / 1024
    except Exception:
        return None


class _Window:
    """Timed steps: only full batches within an epoch, after the warm-up."""

    def __init__(self, device):
        self.device, self.seconds, self.images, self.steps, self._t0 = device, 0.0, 0, 0, None
        self.device_peak_gib = None

    def open(self) -> None:
        if self._t0 is None:
            _sync(self.device)
            self._t0 = time.perf_counter()

    def close(self) -> None:
        if self._t0 is not None:
            _sync(self.device)
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None
            used = device_memory_used_gib(self.device)
            if used is not None:
                self.device_peak_gib = max(self.device_peak_gib or 0.0, used)

    def result(self) -> dict:
        return {"images": self.images, "steps": self.steps, "seconds": self.seconds,
                "images_per_s": self.images / self.seconds if self.seconds else float("nan"),
                "device_peak_gib": self.device_peak_gib}


def model_only(t, steps: int, warmup: int) -> dict:
    """The trainer's step on one fixed batch on the device."""
    from spinestream.engine.loader import Batch
    from spinestream.engine.loader.config import torch_dtype

    bs, size = t.loader_cfg.batch_size, t.loader_cfg.image_size
    x = torch.randn(bs, 3, size, size, device=t.device).to(dtype=torch_dtype(t.loader_cfg.dtype))
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(bs, 8, device=t.device) < 0.1).float()
    batch = Batch(images=x, targets=y, slice_ids=torch.arange(bs, device=t.device),
                  valid=torch.ones(bs, dtype=torch.bool, device=t.device), n_valid=bs)
    w = _Window(t.device)
    for k in range(warmup + steps):
        if k == warmup:
            w.open()
        t._step(batch)
        if k >= warmup:
            w.images, w.steps = w.images + bs, w.steps + 1
    w.close()
    return w.result()


def through_loader(t, steps: int, warmup: int) -> dict:
    """The trainer's step fed by its loader; epoch rebuilds and partial batches are outside the window."""
    bs, w, done = t.loader_cfg.batch_size, _Window(t.device), 0
    while w.steps < steps:
        it = iter(t.loader)
        first = next(it, None)  # the epoch's first batch waits for the pipeline's (re)build: untimed
        if first is None:
            break
        t._step(first)
        for batch in it:
            full = batch.n_valid == bs and batch.images.shape[0] == bs
            if done >= warmup and full:
                w.open()
            else:
                w.close()
            t._step(batch)
            done += 1
            if w._t0 is not None:
                w.images, w.steps = w.images + bs, w.steps + 1
            if w.steps >= steps:
                break
        w.close()
    return w.result()


def build_trainer(args, run_dir: Path | None = None):
    from spinestream.engine import checkpoint as ck
    from spinestream.engine.config import RunConfig
    from spinestream.engine.trainer import Trainer
    from spinestream.shards.config import load_config
    from spinestream.shards.layout import Layout

    gpu = torch.cuda.is_available()
    cpu_defaults = ["model.name=test_efficientnet", "loader.image_size=128", "train.batch_size=16"]
    config = args.config or ("round1" if gpu else None)  # the shipped round 1, from any directory
    shards = args.shards
    sets = ([] if gpu or args.config else cpu_defaults) + args.set
    if shards is None:
        cfg = load_config(RunConfig, config, sets)
        shards = Path(cfg.data.root)
    if not Layout(shards).manifest.is_file():
        from spinestream.benchmarks.loader import prepare

        _, shards = prepare(Path("/tmp/spinestream-bench"), 512, 16)
    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="spinestream-bench-train-"))
    cfg = load_config(RunConfig, config, sets + [f"data.root={shards}", f"out_dir={run_dir}", "name=bench",
                                                 "log.wandb=disabled", "train.checkpoint_every_steps=1000000000"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, pretrained_path=None))
    ck.mark_run(run_dir / "bench")
    return Trainer(cfg, run_dir / "bench")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinestream bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", type=Path, default=None, help="run config, a shipped one's name or a file (default: round1 "
                   "on a GPU, a tiny CPU setting otherwise)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--shards", type=Path, default=None, help="shard directory (default: data.root of the config, "
                   "or a synthetic set)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--nproc", type=int, nargs="+", default=None, metavar="N",
                   help="scaling: run data-parallel with each of these numbers of ranks under torchrun (e.g. 1 2)")
    p.add_argument("--threads-per-rank", type=int, default=1,
                   help="scaling on a machine without GPUs: CPU threads per rank (a core stands in for a card)")
    p.add_argument("--rank-out", type=Path, default=None, help=argparse.SUPPRESS)  # one rank of a --nproc group
    p.add_argument("--run-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_out is not None:
        return rank_worker(args)
    if args.nproc:
        return scaling(args)

    from spinestream.engine.rundir import read_batch_size

    t = build_trainer(args)  # its progress bar stays the disabled one until fit(), which this never calls
    try:
        t.model.train()
        if t.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(t.device)
        fixed = model_only(t, args.steps, args.warmup)
        fed = through_loader(t, args.steps, args.warmup)
        rec = read_batch_size(t.run_dir)
        auto = None if rec is None else dataclasses.asdict(rec)
    finally:
        t.loader.close()
        shutil.rmtree(t.run_dir.parent, ignore_errors=True)
    return report(t, fixed, fed, auto, args.results)


def report(t, fixed: dict, fed: dict, auto: dict | None, results: Path) -> int:
    dev = t.device
    torch_peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    device_peak = max(filter(None, [fixed.pop("device_peak_gib", None), fed.pop("device_peak_gib", None),
                                    device_memory_used_gib(dev)]), default=None)
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} cores, " + (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else "no GPU")
    res = {"suite": "train", "machine": machine, "model": t.cfg.model.name, "image_size": t.loader_cfg.image_size,
           "batch_size": t.loader_cfg.batch_size, "auto_batch": auto, "precision": t.precision,
           "channels_last": t.channels_last, "loader": t.loader.backend, "model_only": fixed, "through_loader": fed,
           "saturation": fed["images_per_s"] / fixed["images_per_s"], "peak_memory_gib": torch_peak,
           "device_memory_used_gib": device_peak,
           "memory_note": "torch allocator peak and the device's used memory (NVML/nvidia-smi, includes DALI and "
                          "the CUDA context) sampled at the end of each timed window" if dev.type == "cuda" else
                          "CPU run: no device memory figures (no NVML, torch's allocator statistics are CUDA-only)",
           "timed": "trainer step (EMA, clipping, fused Adam, GradScaler in fp16); warm-up, each epoch's first "
                    "batch and partial batches excluded"}
    print(f"bench train: {t.cfg.model.name} @ {t.loader_cfg.image_size}px, batch {t.loader_cfg.batch_size}"
          f"{' (auto)' if auto else ''}, {t.precision}, {t.loader.backend} loader on {machine}")
    print(f"  model only      {fixed['images_per_s']:8.1f} images/s")
    print(f"  through loader  {fed['images_per_s']:8.1f} images/s")
    print(f"  saturation      {res['saturation']:8.2f}" + (
        f"   peak memory torch {torch_peak:.2f} GiB, device {device_peak or float('nan'):.2f} GiB"
        if torch_peak else ""))
    results.mkdir(parents=True, exist_ok=True)
    (results / "train.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"saved {results / 'train.json'}")
    return 0


# --------------------------------------------------------------------------- scaling under torchrun


def rank_worker(args) -> int:
    """One rank of a ``--nproc`` group: the two measurements with DDP, written to ``--rank-out``."""
    from spinestream.engine import dist

    torch.set_num_threads(max(1, args.threads_per_rank))
    t = build_trainer(args, args.run_dir)
    try:
        t.model.train()
        fixed = model_only(t, args.steps, args.warmup)
        fed = through_loader(t, args.steps, args.warmup)
    finally:
        t.loader.close()
    d = t.dist
    rec = {"rank": d.rank, "world": d.world, "model_only": fixed, "through_loader": fed,
           "batch_size": t.loader_cfg.batch_size, "model": t.cfg.model.name, "image_size": t.loader_cfg.image_size,
           "precision": t.precision, "loader": t.loader.backend, "device": str(t.device),
           "device_name": torch.cuda.get_device_name(t.device) if t.device.type == "cuda" else "cpu"}
    args.rank_out.mkdir(parents=True, exist_ok=True)
    (args.rank_out / f"rank{d.rank}.json").write_text(json.dumps(rec) + "\n")
    dist.shutdown()
    return 0


def group_rates(ranks: list[dict], mode: str) -> dict:
    """Per rank and in total (the group's images over its slowest rank's time) for one measurement."""
    per = [r[mode]["images_per_s"] for r in ranks]
    total = sum(r[mode]["images"] for r in ranks) / max(r[mode]["seconds"] for r in ranks)
    return {"per_rank": per, "per_rank_mean": sum(per) / len(per), "total": total}


def scaling(args) -> int:
    """Run one torchrun group per ``--nproc`` N on the same shards, then print and save the scaling table."""
    import subprocess
    import sys

    from spinestream.shards.layout import Layout

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and max(args.nproc) > gpus:
        raise SystemExit(f"spinestream bench train: --nproc {max(args.nproc)} needs {max(args.nproc)} GPUs; "
                         f"{gpus} visible")
    if not gpus and max(args.nproc) * args.threads_per_rank > (os.cpu_count() or 1):
        print(f"warning: {max(args.nproc)} ranks x {args.threads_per_rank} thread(s) exceed this machine's "
              f"{os.cpu_count()} cores: the largest group's figures measure contention", file=sys.stderr)
    shards = args.shards
    if shards is None or not Layout(shards).manifest.is_file():  # prepared once, before the ranks start
        from spinestream.benchmarks.loader import prepare

        _, shards = prepare(Path("/tmp/spinestream-bench"), 512, 16)
    work = Path(tempfile.mkdtemp(prefix="spinestream-bench-scaling-"))
    groups = {}
    try:
        for n in args.nproc:
            out, run_dir = work / f"n{n}", work / f"run{n}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                   "-m", "spinestream.benchmarks.train", "--rank-out", str(out), "--run-dir", str(run_dir),
                   "--shards", str(shards), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--threads-per-rank", str(args.threads_per_rank)]
            cmd += [a for kv in args.set for a in ("--set", kv)]
            if args.config is not None:
                cmd += ["-c", str(args.config)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank), "WANDB_MODE": "disabled"}
            print(f"bench train: {n} rank(s) ...", flush=True)
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"spinestream bench train: the {n}-rank group failed:\n{p.stderr[-3000:]}")
            missing = [r for r in range(n) if not (out / f"rank{r}.json").is_file()]
            if missing:
                raise SystemExit(f"spinestream bench train: ranks {missing} of the {n}-rank group wrote no result:\n"
                                 f"{p.stderr[-3000:]}")
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
            groups[n] = {"ranks": ranks, "model_only": group_rates(ranks, "model_only"),
                         "through_loader": group_rates(ranks, "through_loader")}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return scaling_report(groups, args)


def scaling_report(groups: dict[int, dict], args) -> int:
    first = next(iter(groups.values()))["ranks"][0]
    base_n = min(groups)
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} cores, " + (
        first["device_name"] if first["device_name"] != "cpu" else f"no GPU ({args.threads_per_rank} thread(s) "
                                                                    f"per rank)")
    res = {"suite": "train_scaling", "machine": machine, "model": first["model"], "image_size": first["image_size"],
           "batch_size_per_rank": first["batch_size"], "precision": first["precision"], "loader": first["loader"],
           "steps": args.steps, "groups": {}}
    print(f"bench train --nproc: {first['model']} @ {first['image_size']}px, batch {first['batch_size']} per rank, "
          f"{first['precision']}, {first['loader']} loader, DDP (torchrun) on {machine}")
    print(f"  {'ranks':>5}  {'mode':<15} {'per rank':>10} {'total':>10} {'efficiency':>10}   images/s")
    for n, g in groups.items():
        row = {}
        for mode in ("model_only", "through_loader"):
            base = groups[base_n][mode]["total"] / base_n  # one rank's share at the smallest N
            eff = g[mode]["total"] / (n * base)
            row[mode] = {**g[mode], "efficiency": eff}
            print(f"  {n:>5}  {mode.replace('_', ' '):<15} {g[mode]['per_rank_mean']:10.1f} {g[mode]['total']:10.1f} "
                  f"{eff:10.2f}")
        res["groups"][str(n)] = row
    res["efficiency_note"] = (f"total(N) / (N x total({base_n}) / {base_n}), all groups measured in this run; "
                              "total = the group's images over its slowest rank's timed seconds")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "train_scaling.json"
    path.write_text(json.dumps(res, indent=1) + "\n")
    _scaling_chart(res, args.results / "train_scaling.png")
    print(f"saved {path} and {args.results / 'train_scaling.png'}")
    return 0


def _scaling_chart(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spinestream.shards.fsutil import atomic_save_figure

    ns = [int(n) for n in res["groups"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for mode, colour in (("model_only", "tab:blue"), ("through_loader", "tab:orange")):
        totals = [res["groups"][str(n)][mode]["total"] for n in ns]
        ax.plot(ns, totals, "o-", color=colour, label=mode.replace("_", " "))
        ideal = totals[0] / ns[0]
        ax.plot(ns, [ideal * n for n in ns], ":", color=colour, alpha=0.6)
    ax.set(xlabel="ranks", ylabel="images/s (total)", xticks=ns,
           title=f"{res['model']} @ {res['image_size']}px, DDP: measured (dotted: linear)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, res["machine"], fontsize=7, color="grey")
    fig.tight_layout()
    atomic_save_figure(fig, path)


if __name__ == "__main__":
    import sys

    sys.exit(main())
