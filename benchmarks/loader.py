"""``spinestream bench loader``: images/s delivered to the training loop, and CPU used.

Lines, all at the same output size (384 by default), batch size and augmentations, on
the same cores, warm-up excluded:

* ``dicom-<syntax>`` — the baseline the reference notebook used: a torch Dataset that
  reads each slice's DICOM with pydicom, windows it (the slice repeated to 3 channels)
  and augments on the CPU in 2 DataLoader workers. Once on uncompressed studies, once on
  JPEG 2000 ones: decoding once is what the shards buy.
* ``torch`` — the fallback backend (DataLoader workers decode, augmentation on the batch).
* ``dali-cpu`` — the DALI backend in DALI's CPU-only mode (the index reader: JPEG bytes by
  ``.idx`` offset in one global permutation per epoch); ``dali-gpu`` where CUDA exists.
* ``dali-cpu-webdataset`` / ``dali-gpu-webdataset`` — the legacy ``fn.readers.webdataset``
  pipeline on the same shards in the same run (``loader.dali_reader: webdataset``, which only
  this benchmark builds: benchmarks/dali_webdataset.py): the before line of the epoch-mix fix,
  so the fix does not cost throughput silently.
* ``decode-only`` — bare JPEG decoding of the same shards in as many processes as there
  are workers: the CPU's physical limit for this format.

Threads/workers default to the trainer's (``loader.num_threads`` of ``--config``, else
LoaderConfig's default), so the figures are the ones a training run gets. Nothing forks
after DALI threads exist: the DICOM and torch lines (DataLoader workers, forked) run before
any DALI line, and decode-only uses a spawned pool, warmed up before it is timed.

``composition`` — the share of the first cohort (boxed) in each quarter of one DALI epoch
of the round-1 selection (boxed then negative shards), for both readers, world 1 and 2:
the legacy reader's quarters are cohort-blocked, the index reader's are not.

``cores`` is CPU time of the whole process tree over wall time. Results go to
``benchmarks/results/loader.json`` and a bar chart ``loader.png``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def cpu_seconds_tree(root: int | None = None) -> float:
    """User+system CPU seconds of a process and all its living descendants (from /proc)."""
    root = root or os.getpid()
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                stats[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = {root}, [root]
    while todo:
        p = todo.pop()
        kids = [c for c, (pp, _) in stats.items() if pp == p and c not in tree]
        tree.update(kids)
        todo.extend(kids)
    return sum(stats[p][1] for p in tree if p in stats)


def timed(batches, warmup: int, n: int, count=len) -> dict:
    """Consume ``warmup`` then ``n`` batches; images/s and cores used over the timed part."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    c0, t0, images = cpu_seconds_tree(), time.perf_counter(), 0
    for _ in range(n):
        try:
            b = next(it)
        except StopIteration:
            break
        images += count(b)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the GPU work of the last batches is part of the time
    dt = time.perf_counter() - t0
    cores = (cpu_seconds_tree() - c0) / dt
    return {"images": images, "seconds": dt, "images_per_s": images / dt, "cores": cores}


def _forever(make):
    while True:
        yield from make()


# --------------------------------------------------------------------------- the dicom baseline


class DicomSlices(torch.utils.data.Dataset):
    """One DICOM file per sample: pydicom → HU → bone window → 3 channels → CPU augmentation."""

    def __init__(self, files: list[str], cfg):
        self.files, self.cfg = files, cfg

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from spinestream.engine.loader.augment import augment, normalize
        from spinestream.engine.loader.params import draw_params, sample_key, sample_uniforms
        from spinestream.preprocess.dicom import read_hu
        from spinestream.preprocess.window import window_u8

        img = torch.from_numpy(window_u8(read_hu(self.files[i]), 400, 1800))[None].expand(3, -1, -1)[None]
        u = sample_uniforms(sample_key(0, 0, 0), i, 1)  # the loaders' host-side parameter sampler
        x = augment(img.contiguous(), self.cfg.augment, self.cfg.image_size, draw_params(self.cfg.augment, u))
        return normalize(x, self.cfg.mean, self.cfg.std, torch.float32, False)[0]


def dicom_batches(data: Path, cfg, workers: int):
    files = sorted(str(p) for p in (data / "train_images").glob("*/*.dcm"))
    ds = DicomSlices(files, cfg)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0,
                                       prefetch_factor=2 if workers else None)


# --------------------------------------------------------------------------- decode-only


def _decode_worker(args) -> tuple[int, float]:
    from spinestream.shards.sample import decode_jpeg

    tars, recs, seconds = args
    fds, n, t0 = {}, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for k, off, size in recs:
            fd = fds.get(k) or fds.setdefault(k, os.open(tars[k], os.O_RDONLY))
            decode_jpeg(os.pread(fd, size, off))
            n += 1
            if n % 64 == 0 and time.perf_counter() - t0 >= seconds:
                break
    return n, time.perf_counter() - t0


def _warm(_) -> int:
    import spinestream.shards.sample  # noqa: F401  (the import a spawned worker pays once)

    return os.getpid()


def decode_only(sel, workers: int, seconds: float) -> dict:
    """Bare decoding in ``workers`` spawned processes (spawn: safe after CUDA/DALI threads exist);
    the pool is started and warmed before the clock starts."""
    rec = sel.records()
    recs = list(zip(rec["shard"].tolist(), rec["offset"].tolist(), rec["size"].tolist()))
    parts = [(sel.tars, recs[i::workers], seconds) for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_warm, range(workers), chunksize=1)
        c0, t0 = cpu_seconds_tree(), time.perf_counter()
        out = pool.map(_decode_worker, parts, chunksize=1)
        dt = time.perf_counter() - t0
        cores = (cpu_seconds_tree() - c0) / dt
    n = sum(k for k, _ in out)
    return {"images": n, "seconds": dt, "images_per_s": n / dt, "cores": cores}


# --------------------------------------------------------------------------- epoch composition


ROUND1_SLICES = 170_000  # about the boxed + negative slices of the real data, minus a validation fold


def composition(shards: Path, cfg, reader: str, world: int, device: str = "cpu") -> list[list[float]]:
    """Share of the first cohort per quarter of one DALI epoch of the round-1 selection, per rank."""
    import dataclasses

    from spinestream.engine.loader import DeviceLabels, select

    sel = select(shards, cohorts=["boxed", "negative"])
    rec = sel.records()
    first = np.array([s.cohort == sel.shards[0].cohort for s in sel.shards])[rec["shard"]]
    is_first = dict(zip(rec["slice_id"].tolist(), first.tolist()))
    labels = DeviceLabels(torch.zeros(sel.n_total, 8), ["zeros (benchmark)"])
    # the legacy reader's buffer as a share of the epoch that the default 4096 is of a ~170k-slice round-1 epoch
    fill = max(1, round(sel.samples * cfg.initial_fill / ROUND1_SLICES))
    c = dataclasses.replace(cfg, backend="dali", dali_reader=reader, augment=cfg.augment.off(), image_size=64,
                            initial_fill=fill)
    out = []
    for rank in range(world):
        loader = dali_loader(sel, labels, c, device=device, rank=rank, world=world)
        ids = np.concatenate([b.slice_ids.cpu().numpy()[: b.n_valid] for b in loader])
        out.append([round(float(np.mean([is_first[i] for i in q])), 3) for q in np.array_split(ids, 4)])
    return out


# --------------------------------------------------------------------------- the suite


def dali_loader(sel, labels, cfg, *, device: str, rank: int = 0, world: int = 1):
    """The DALI loader of ``cfg.dali_reader``: the engine's index reader, or the legacy webdataset one,
    which lives here (training refuses it)."""
    if cfg.dali_reader == "webdataset":
        from spinestream.benchmarks.dali_webdataset import DaliWebdatasetLoader

        return DaliWebdatasetLoader(sel, labels, cfg, device=device, rank=rank, world=world)
    from spinestream.engine.loader import build_loader

    return build_loader(sel, labels, cfg, device=device, rank=rank, world=world)


def prepare(cache: Path, size: int, studies: int) -> tuple[dict[str, Path], Path]:
    """Synthetic DICOM (uncompressed and JPEG 2000) and the shards of the uncompressed set."""
    from spinestream.benchmarks.shard import dataset
    from spinestream.preprocess.convert import shard_dataset
    from spinestream.shards.shard_config import ShardConfig

    from spinestream.shards.layout import Layout

    raw = {s: dataset(cache, s, studies, (96, 96), size) for s in ("explicit", "j2k")}
    out = cache / f"shards-explicit-n{studies}-{size}"
    if not Layout(out).manifest.is_file():
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            shard_dataset(raw["explicit"], out, ShardConfig(image_size=size, folds=4), workers=os.cpu_count() or 1)
    return raw, out


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["lines"])
    vals = [results["lines"][k]["images_per_s"] for k in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, vals, color=["#999" if k.startswith("dicom") else "#4c72b0" if k != "decode-only"
                                      else "#dd8452" for k in names])
    ax.bar_label(bars, labels=[f"{v:.0f}\n{results['lines'][k]['cores']:.1f} cores" for k, v in zip(names, vals)],
                 fontsize=7)
    ax.set_ylabel("images / s")
    ax.set_ylim(top=max(vals) * 1.18)
    ax.set_title(f"loader, {results['image_size']}px batches of {results['batch_size']}, "
                 f"reference augmentations — {results['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinestream bench loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=None, help="a shard directory (default: synthesize one)")
    p.add_argument("--dicom", type=Path, action="append", default=None,
                   help="dataset dir(s) for the dicom baseline (default: synthetic uncompressed + JPEG 2000)")
    p.add_argument("--lines", default="dicom,torch,dali-cpu,dali-cpu-webdataset,dali-gpu,dali-gpu-webdataset,"
                                      "decode-only,composition")
    p.add_argument("-c", "--config", type=Path, default=None,
                   help="a run config whose loader section to use (default: LoaderConfig's defaults)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers / DALI threads (default: the trainer's loader.num_threads)")
    p.add_argument("--batches", type=int, default=24, help="timed batches per line")
    p.add_argument("--warmup", type=int, default=4, help="batches excluded from timing")
    p.add_argument("--studies", type=int, default=16, help="synthetic studies when nothing is given")
    p.add_argument("--size", type=int, default=512, help="synthetic slice size when nothing is given")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "spinestream-bench")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    return p


def _loader_config(args):
    """The trainer's loader config (``--config``'s, else the defaults) with the benchmark's sizes."""
    import dataclasses

    from spinestream.engine.loader import LoaderConfig

    base = LoaderConfig()
    if args.config is not None:
        from spinestream.engine.config import RunConfig
        from spinestream.shards.config import load_config

        base = load_config(RunConfig, args.config).loader
    workers = base.num_threads if args.workers is None else args.workers
    return dataclasses.replace(base, batch_size=args.batch_size, image_size=args.image_size, num_threads=workers)


def _run_lines(lines, sel, shards, dicoms, cfg, report, results, n: int, w: int) -> None:
    """Every asked-for line, forking ones (DataLoader workers) before any DALI thread exists."""
    import dataclasses

    from spinestream.engine.loader import DeviceLabels, build_loader, dali_available

    labels = DeviceLabels(torch.zeros(sel.n_total, 8), ["zeros (benchmark)"])

    def valid(b) -> int:
        return b.n_valid  # known on the host: counting does not sync

    for name, data in dicoms.items():
        if "dicom" in lines:
            report(name, timed(dicom_batches(data, cfg, cfg.num_threads), w, n))
    if "torch" in lines:
        dev = "cuda:0" if torch.cuda.is_available() else "cpu"
        loader = build_loader(sel, labels, dataclasses.replace(cfg, backend="torch"), device=dev)
        report("torch" + ("-gpu" if dev != "cpu" else ""), timed(_forever(lambda: loader), w, n, count=valid))
    if dali_available():
        for name, dev, reader in (("dali-cpu", "cpu", "index"), ("dali-cpu-webdataset", "cpu", "webdataset"),
                                  ("dali-gpu", "cuda:0", "index"), ("dali-gpu-webdataset", "cuda:0", "webdataset")):
            if name not in lines or (dev != "cpu" and not torch.cuda.is_available()):
                continue
            loader = dali_loader(sel, labels, dataclasses.replace(cfg, backend="dali", dali_reader=reader), device=dev)
            report(name, timed(_forever(lambda: loader), w, n, count=valid))
        if "composition" in lines:
            results["composition"] = {}
            for reader in ("webdataset", "index"):
                for world in (1, 2):
                    parts = composition(shards, cfg, reader, world)
                    results["composition"][f"{reader}-world{world}"] = parts
                    print(f"  boxed share per quarter, DALI {reader:10s} world={world}: "
                          + "  ".join(f"rank {r} {q}" for r, q in enumerate(parts)), flush=True)
    else:
        print("  (nvidia-dali not installed: no dali lines)")
    if "decode-only" in lines:
        ref = max(r["seconds"] for r in results["lines"].values()) if results["lines"] else 5.0
        report("decode-only", decode_only(sel, cfg.num_threads, min(ref, 10.0)))


def _summary(results: dict) -> None:
    L = results["lines"]
    base = {k: v["images_per_s"] for k, v in L.items() if k.startswith("dicom")}
    print()
    for k, v in L.items():
        if k.startswith("dicom") or not base:
            continue
        ratios = ", ".join(f"{v['images_per_s'] / b:.1f}x {bk}" for bk, b in base.items())
        print(f"  {k:20s} {ratios}")
    for dev in ("cpu", "gpu"):
        new, old = L.get(f"dali-{dev}"), L.get(f"dali-{dev}-webdataset")
        if new and old:
            results[f"dali_{dev}_index_vs_webdataset"] = new["images_per_s"] / old["images_per_s"]
            print(f"  dali-{dev}: the index reader delivers {results[f'dali_{dev}_index_vs_webdataset']:.0%} "
                  f"of the webdataset reader's rate")
    if "dali-cpu" in L and "decode-only" in L:
        results["dali_cpu_vs_decode_only"] = L["dali-cpu"]["images_per_s"] / L["decode-only"]["images_per_s"]
        print(f"  dali-cpu delivers {results['dali_cpu_vs_decode_only']:.0%} of the decode-only rate")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from spinestream.engine.loader import select

    lines = [s.strip() for s in args.lines.split(",") if s.strip()]
    if args.shards is None:
        raw, shards = prepare(args.cache, args.size, args.studies)
        dicoms = {f"dicom-{k}": v for k, v in raw.items()}
    else:
        shards = args.shards
        dicoms = {f"dicom-{Path(d).name}": Path(d) for d in (args.dicom or [])}
    sel = select(shards)  # every cohort: the loader speed does not depend on labels
    cfg = _loader_config(args)
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} cores" + (
        f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU")
    results = {"suite": "loader", "machine": machine, "batch_size": cfg.batch_size, "image_size": cfg.image_size,
               "workers": cfg.num_threads, "shard_image_size": sel.image_size, "samples": sel.samples, "lines": {}}

    def report(name: str, r: dict) -> None:
        results["lines"][name] = r
        print(f"  {name:20s} {r['images_per_s']:8.1f} images/s  {r['cores']:4.2f} cores", flush=True)

    print(f"bench loader: {sel.samples} samples of {sel.image_size}px -> {cfg.image_size}px, batch {cfg.batch_size}, "
          f"{cfg.num_threads} workers/threads, {args.batches} timed batches after {args.warmup} warm-up ({machine})",
          flush=True)
    _run_lines(lines, sel, shards, dicoms, cfg, report, results, args.batches, args.warmup)
    _summary(results)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "loader.json").write_text(json.dumps(results, indent=1) + "\n")
    chart(results, args.results / "loader.png")
    print(f"saved {args.results / 'loader.json'} and {args.results / 'loader.png'}")
    return 0
