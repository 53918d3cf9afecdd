"""``spinestream bench shard``: how fast DICOM becomes shards, next to two references
measured in the same run on the same cores.

* **naive** — what most public notebooks did: one process reads each DICOM with pydicom,
  windows it and writes one PNG per slice.
* **floor** — the least any converter must do: decode each DICOM (spinestream's decoder,
  the fastest plugin available), window it to uint8 and JPEG-encode its 2.5D image, in
  memory, with the same number of worker processes. Nothing is written.
* **spinestream** — the full ``spinestream shard`` job, end to end: volumes, shards, index
  files, tables, manifest (phase 2 included).

Per transfer syntax (a synthetic dataset each, 512×512 by default) it prints slices/s,
the ratios, bytes per slice (shards, Zarr, DICOM input, naive PNG) and the peak memory of
the whole process tree, then projects time and disk for 700k slices. A second run of the
job on half the studies shows whether memory grows with the number of studies.
Floor and job runs alternate ``--repeat`` times and the best of each is compared (the
machines are shared; single runs vary by up to 2x). Figures go to
``benchmarks/results/shard.json`` and ``shard.png``.

With ``--num-workers 1,2,...`` it measures the job as a job array instead (README, "Sharding as a job
array"): per count n, n worker processes of the console script started together on one machine
(standing in for n machines; each ``--workers`` ``--worker-procs``, default 1), then ``--merge``, next
to a plain single run with as many processes as one worker, alternating ``--repeat`` times, best of
each. It prints studies/s and slices/s per worker (its own wall time, interpreter start included) and
in total (from starting the workers to the end of the merge), the scaling efficiency (total rate with
n / (n x the single run's rate)), and checks that the array wrote the single run's bytes. Where other
jobs share the cores the wall times say little, so it also measures each process tree's CPU time and
gives the efficiency idle cores would show (``from CPU s``: the single run's CPU time over n x the
slowest worker's plus the merge's). Figures go to ``benchmarks/results/shard-array.json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SYNTAXES = ("explicit", "jpeg-lossless", "j2k", "rle")
REAL_SLICES = 700_000


# --------------------------------------------------------------------------- measuring


_SAMPLER = r"""
import os, sys, time
root, peak = int(sys.argv[1]), 0
page = os.sysconf("SC_PAGE_SIZE")
def tree_rss():
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parents[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = {root}, [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree and c != os.getpid()]
        tree.update(kids)
        todo.extend(kids)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total
sys.stdout.write("ready\n"); sys.stdout.flush()
import select
while True:
    peak = max(peak, tree_rss())
    r, _, _ = select.select([sys.stdin], [], [], 0.05)
    if r:
        break
sys.stdout.write(f"{peak}\n"); sys.stdout.flush()
"""


class PeakRSS:
    """Peak resident memory of this process and all its descendants, sampled from /proc by a
    separate process (a sampler thread here would make the job's pool avoid ``fork``)."""

    def __init__(self):
        self.peak = 0

    def __enter__(self) -> PeakRSS:
        import subprocess
        import sys

        self._p = None
        if os.path.isdir("/proc"):
            self._p = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid())],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self._p.stdout.readline()
        return self

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            out, _ = self._p.communicate("stop\n", timeout=30)
            self.peak = int(out.split()[-1])


def _du(path: Path, pattern: str = "**/*") -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def _studies(data: Path) -> list[Path]:
    return sorted(p for p in (data / "train_images").iterdir() if p.is_dir())


# --------------------------------------------------------------------------- the three ways


def _floor_study(args: tuple[str, int, float]) -> int:
    """Ingest the study (the shard job's ``ingest_study``: every slice decoded once, windowed to uint8,
    the neighbour index), build each 2.5D image, JPEG-encode it. Nothing else."""
    from spinestream.preprocess.ingest import ingest_study
    from spinestream.shards.sample import encode_jpeg, sample_image
    from spinestream.shards.shard_config import ShardConfig

    study, size, offset_mm = args
    cfg = ShardConfig(image_size=size, windows=[(400.0, 1800.0)], offset_mm=offset_mm)
    ing = ingest_study(study, cfg)
    for i in range(ing.n_slices):
        encode_jpeg(sample_image(ing.volume, i, ing.nbr, cfg.channels), cfg.jpeg_quality)
    return ing.n_slices


def run_floor(data: Path, size: int, workers: int) -> dict:
    tasks = [(str(s), size, 1.0) for s in _studies(data)]
    from spinestream.preprocess.convert import start_method

    t0 = time.perf_counter()
    with PeakRSS() as mem:
        if workers > 1:  # started the same way as the shard job's workers
            with mp.get_context(start_method()).Pool(workers) as pool:
                n = sum(pool.imap_unordered(_floor_study, tasks))
        else:
            n = sum(map(_floor_study, tasks))
    dt = time.perf_counter() - t0
    return {"slices": n, "seconds": dt, "slices_per_s": n / dt, "peak_rss_mb": mem.peak / 2**20}


def run_naive(data: Path, max_slices: int, tmp: Path) -> dict:
    """One process: pydicom per file, window, one PNG per slice (the public-notebook way)."""
    import pydicom
    from PIL import Image

    files = [f for s in _studies(data) for f in sorted(s.glob("*.dcm"))][:max_slices]
    out = tmp / "naive-png"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        for k, f in enumerate(files):
            ds = pydicom.dcmread(f)
            hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
            img = (np.clip((hu - (400 - 900)) / 1800, 0, 1) * 255).astype(np.uint8)
            Image.fromarray(img).save(out / f"{k}.png")
    dt = time.perf_counter() - t0
    size = _du(out)
    shutil.rmtree(out)
    return {"slices": len(files), "seconds": dt, "slices_per_s": len(files) / dt,
            "png_bytes_per_slice": size / max(1, len(files)), "peak_rss_mb": mem.peak / 2**20}


def run_spinestream(data: Path, out: Path, size: int, workers: int, limit: int | None = None) -> dict:
    import contextlib
    import io

    from spinestream.preprocess.convert import shard_dataset
    from spinestream.shards.layout import Layout
    from spinestream.shards.shard_config import ShardConfig

    shutil.rmtree(out, ignore_errors=True)
    cfg = ShardConfig(image_size=size, folds=4)
    t0 = time.perf_counter()
    with PeakRSS() as mem, contextlib.redirect_stderr(io.StringIO()):
        m = shard_dataset(data, out, cfg, workers=workers, limit=limit)
    dt = time.perf_counter() - t0
    n = m.counts.slices
    return {"slices": n, "studies": m.counts.studies, "seconds": dt, "slices_per_s": n / dt,
            "shard_bytes_per_slice": _du(Layout(out).wds, "*.tar") / n,
            "zarr_bytes_per_slice": _du(Layout(out).volumes) / n,
            "peak_rss_mb": mem.peak / 2**20}


# --------------------------------------------------------------------------- the job array


def _tree_sha(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _shard_cmd(data: Path, out: Path, size: int, procs: int) -> list[str]:
    """``spinestream shard`` as a user runs it (a fresh interpreter: its start is part of the cost), with
    the config :func:`run_spinestream` uses."""
    return [sys.executable, "-m", "spinestream", "shard", "--no-progress", "--data", str(data), "--out", str(out),
            "--set", f"image_size={size}", "--set", "folds=4", "--workers", str(procs)]


def _run(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd`` to the end -> (wall seconds, CPU seconds of its process tree: user + system, its pool's
    processes included); its stderr in the error if it fails. The CPU time does not grow when other
    processes share the cores, the wall time does: the machines are shared."""
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{err.read()[-3000:]}")
    return dt, usage.ru_utime + usage.ru_stime


def run_single(data: Path, out: Path, size: int, procs: int) -> dict:
    """The plain job in one ``spinestream shard`` process (``procs`` of them in its pool)."""
    from spinestream.shards.manifest import read_manifest

    shutil.rmtree(out, ignore_errors=True)
    dt, cpu = _run(_shard_cmd(data, out, size, procs))
    c = read_manifest(out).counts
    return {"studies": c.studies, "slices": c.slices, "seconds": dt, "cpu_seconds": cpu,
            "studies_per_s": c.studies / dt, "slices_per_s": c.slices / dt}


def run_array(data: Path, out: Path, size: int, n: int, procs: int, single: Path | None = None) -> dict:
    """The job as ``n`` workers started together, then ``--merge``; ``single``: a plain run's OUT to compare bytes.

    ``cpu_bound_seconds``: the wall time on idle cores, one per worker process, predicted from CPU times (the
    slowest worker's, then the merge's); it stands for the measured wall time where other jobs share the cores.
    """
    from spinestream.preprocess.convert import worker_record
    from spinestream.shards.layout import Layout
    from spinestream.shards.manifest import read_manifest

    shutil.rmtree(out, ignore_errors=True)
    base = _shard_cmd(data, out, size, procs)
    runs: dict[int, tuple[float, float]] = {}
    errors: list[str] = []

    def worker(i: int) -> None:
        try:
            runs[i] = _run([*base, "--worker-index", str(i), "--num-workers", str(n)])
        except RuntimeError as e:
            errors.append(str(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t1 = time.perf_counter()
    if errors:
        raise RuntimeError(errors[0])
    workers = []
    for i in range(n):  # each worker's own record of what it converted (read before --merge removes _work)
        rec = json.loads(worker_record(Layout(out), i, n).read_text())
        dt, cpu = runs[i]
        studies = rec["converted"] + rec["failed"]
        workers.append({"index": i, "studies": studies, "slices": rec["slices"], "seconds": dt, "cpu_seconds": cpu,
                        "studies_per_s": studies / dt, "slices_per_s": rec["slices"] / dt})
    merge, merge_cpu = _run([*base, "--merge"])
    total = time.perf_counter() - t0
    c = read_manifest(out).counts
    r = {"num_workers": n, "workers": workers, "workers_seconds": t1 - t0, "merge_seconds": merge,
         "merge_cpu_seconds": merge_cpu, "seconds": total,
         "cpu_seconds": sum(w["cpu_seconds"] for w in workers) + merge_cpu,
         "cpu_bound_seconds": max(w["cpu_seconds"] for w in workers) / procs + merge_cpu,
         "studies": c.studies, "slices": c.slices,
         "studies_per_s": c.studies / total, "slices_per_s": c.slices / total}
    if single is not None:
        r["identical_to_single"] = _tree_sha(out) == _tree_sha(single)
    return r


def array_suite(args, syntaxes: list[str], lo: int, hi: int, machine: str) -> int:
    counts = sorted({int(v) for v in args.num_workers.split(",") if v.strip()})
    if not counts or counts[0] < 1:
        raise SystemExit(f"spinestream bench shard: --num-workers takes counts >= 1, e.g. 1,2; "
                         f"got {args.num_workers!r}")
    procs = max(1, args.worker_procs)
    results = {"suite": "shard-array", "machine": machine, "size": args.size, "procs_per_worker": procs,
               "studies": args.studies, "slices_per_study": [lo, hi], "num_workers": counts, "repeat": args.repeat,
               "load_average_at_start": list(os.getloadavg()), "syntaxes": {}}
    work = Path(tempfile.mkdtemp(prefix="spinestream-bench-"))
    try:
        for syn in syntaxes:
            data = dataset(args.cache, syn, args.studies, (lo, hi), args.size)
            singles, arrays = [], {n: [] for n in counts}
            for _ in range(args.repeat):  # alternating, best of each: the machine is shared
                singles.append(run_single(data, work / "single", args.size, procs))
                for n in counts:
                    arrays[n].append(run_array(data, work / f"array-{n}", args.size, n, procs, work / "single"))
            best = max(singles, key=lambda x: x["slices_per_s"])
            # on idle cores the single run would take its CPU time over its processes (the least of the repeats)
            single_idle = min(x["cpu_seconds"] for x in singles) / procs
            r = {"single": best, "runs": {"single": [x["slices_per_s"] for x in singles]}, "arrays": {}}
            for n in counts:
                a = max(arrays[n], key=lambda x: x["slices_per_s"])
                a["efficiency"] = a["slices_per_s"] / (n * best["slices_per_s"])
                # the same ratio from CPU times (each worker on its own cores, then the merge): what idle
                # machines would show where the measured one is shared
                a["cpu_efficiency"] = single_idle / (n * min(x["cpu_bound_seconds"] for x in arrays[n]))
                a["identical_to_single"] = all(x["identical_to_single"] for x in arrays[n])
                r["arrays"][str(n)] = a
                r["runs"][f"array-{n}"] = [x["slices_per_s"] for x in arrays[n]]
            results["syntaxes"][syn] = r
            print(f"[{syn}] {best['studies']} studies, {best['slices']} slices, {procs} process(es) per worker, "
                  f"best of {args.repeat}")
            print(f"  {'run':24s} {'wall s':>7s} {'CPU s':>7s} {'studies/s':>10s} {'slices/s':>9s} "
                  f"{'efficiency':>11s} {'from CPU s':>11s}")

            def row(name: str, x: dict, eff: str = "", cpu_eff: str = "") -> None:
                print(f"  {name:24s} {x['seconds']:7.2f} {x['cpu_seconds']:7.2f} {x['studies_per_s']:10.2f} "
                      f"{x['slices_per_s']:9.1f} {eff:>11s} {cpu_eff:>11s}")

            row("single (plain shard)", best)
            for n in counts:
                a = r["arrays"][str(n)]
                for w in a["workers"]:
                    row(f"n={n} worker {w['index']}", w)
                print(f"  {f'n={n} merge':24s} {a['merge_seconds']:7.2f} {a['merge_cpu_seconds']:7.2f}")
                row(f"n={n} total", a, f"{a['efficiency']:.0%}", f"{a['cpu_efficiency']:.0%}")
                if not a["identical_to_single"]:
                    print(f"  WARNING: n={n} did not write the single run's bytes")
            print(f"  (runs, slices/s: " + "; ".join(f"{k} {', '.join(f'{v:.0f}' for v in vs)}"
                                                      for k, vs in r["runs"].items()) + ")", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_at_end"] = list(os.getloadavg())  # the machines are shared: what else ran
    print(f"load average (1, 5, 15 min): {', '.join(f'{v:.1f}' for v in results['load_average_at_start'])} at "
          f"the start, {', '.join(f'{v:.1f}' for v in results['load_average_at_end'])} at the end")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "shard-array.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"saved {path}")
    return 0


# --------------------------------------------------------------------------- the suite


def dataset(cache: Path, syntax: str, studies: int, slices: tuple[int, int], size: int) -> Path:
    from spinestream.preprocess.synth import make_dataset

    d = cache / f"{syntax}-n{studies}-s{slices[0]}_{slices[1]}-{size}"
    if not (d / "SYNTH_COMPLETE").exists():
        shutil.rmtree(d, ignore_errors=True)
        print(f"  synthesizing {studies} {syntax} studies at {size}px -> {d}", flush=True)
        make_dataset(d, studies=studies, seed=1, size=size, slices=slices, syntax=syntax, test_studies=0)
    return d


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    syn = list(results["syntaxes"])
    ways = [("naive", "naive (pydicom → PNG, 1 proc)"), ("floor", "floor (decode + JPEG only)"),
            ("spinestream", "spinestream shard")]
    x = np.arange(len(syn))
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for k, (key, label) in enumerate(ways):
        vals = [results["syntaxes"][s][key]["slices_per_s"] for s in syn]
        bars = ax.bar(x + (k - 1) * 0.27, vals, 0.27, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, syn)
    ax.set_ylabel("slices / s")
    ax.set_title(f"DICOM → shards, {results['size']}px, {results['workers']} workers — {results['machine']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinestream bench shard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=16, help="synthetic studies per transfer syntax")
    p.add_argument("--slices", default="96:96", help="slices per study, MIN:MAX")
    p.add_argument("--size", type=int, default=512, help="slice size (input and output)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--syntax", default=",".join(SYNTAXES), help=f"comma-separated subset of {SYNTAXES}")
    p.add_argument("--naive-slices", type=int, default=160, help="slices timed for the naive way (it is slow)")
    p.add_argument("--repeat", type=int, default=3, help="alternating floor/job runs per syntax; the best of each counts")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "spinestream-bench",
                   help="where the synthetic datasets are kept between runs")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--decode-rounds", type=int, default=64,
                   help="alternating calls per decoder in the per-syntax decode table (0: no table)")
    p.add_argument("--num-workers", default=None, metavar="N[,N...]",
                   help="measure the job as a job array of N workers (e.g. 1,2) and --merge, next to a plain run, "
                        "instead of the naive/floor/job comparison")
    p.add_argument("--worker-procs", type=int, default=1,
                   help="with --num-workers: processes per worker (its --workers) and in the plain run")
    args = p.parse_args(argv)
    lo, hi = (int(v) for v in args.slices.split(":"))
    syntaxes = [s.strip() for s in args.syntax.split(",") if s.strip()]
    for s in syntaxes:
        if s not in SYNTAXES:
            p.error(f"unknown syntax {s!r} (known: {', '.join(SYNTAXES)})")

    machine = f"{platform.node() or 'host'}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    if args.num_workers is not None:
        return array_suite(args, syntaxes, lo, hi, machine)
    results = {"suite": "shard", "machine": machine, "size": args.size, "workers": args.workers,
               "studies": args.studies, "slices_per_study": [lo, hi], "syntaxes": {}}
    work = Path(tempfile.mkdtemp(prefix="spinestream-bench-"))
    try:
        for syn in syntaxes:
            data = dataset(args.cache, syn, args.studies, (lo, hi), args.size)
            dicom_bytes = _du(data / "train_images", "**/*.dcm")
            n_files = sum(1 for _ in (data / "train_images").glob("*/*.dcm"))
            print(f"[{syn}] {n_files} slices, {dicom_bytes / n_files / 1024:.0f} KiB/slice DICOM", flush=True)
            r = {"dicom_bytes_per_slice": dicom_bytes / n_files}
            r["naive"] = run_naive(data, args.naive_slices, work)
            # floor and job alternate, best of --repeat each: the machine is shared and one
            # run can be twice as slow as the next for reasons outside this process
            floors, jobs = [], []
            for _ in range(args.repeat):
                floors.append(run_floor(data, args.size, args.workers))
                jobs.append(run_spinestream(data, work / f"out-{syn}", args.size, args.workers))
            r["floor"] = max(floors, key=lambda x: x["slices_per_s"])
            r["spinestream"] = max(jobs, key=lambda x: x["slices_per_s"])
            r["runs"] = {"floor": [x["slices_per_s"] for x in floors], "spinestream": [x["slices_per_s"] for x in jobs]}
            if syn == syntaxes[0] and args.studies >= 4:
                half = run_spinestream(data, work / f"half-{syn}", args.size, args.workers, limit=args.studies // 2)
                r["memory_scaling"] = {"studies": [half["studies"], r["spinestream"]["studies"]],
                                       "peak_rss_mb": [half["peak_rss_mb"], r["spinestream"]["peak_rss_mb"]]}
            shutil.rmtree(work / f"out-{syn}", ignore_errors=True)
            s, f, nv = r["spinestream"], r["floor"], r["naive"]
            r["vs_floor"] = s["slices_per_s"] / f["slices_per_s"]
            r["vs_naive"] = s["slices_per_s"] / nv["slices_per_s"]
            results["syntaxes"][syn] = r
            print(f"  naive        {nv['slices_per_s']:8.1f} slices/s  ({nv['png_bytes_per_slice'] / 1024:.0f} KiB/slice PNG)")
            print(f"  floor        {f['slices_per_s']:8.1f} slices/s  peak {f['peak_rss_mb']:.0f} MiB  "
                  f"(runs: {', '.join(f'{v:.0f}' for v in r['runs']['floor'])})")
            print(f"  spinestream  {s['slices_per_s']:8.1f} slices/s  peak {s['peak_rss_mb']:.0f} MiB  "
                  f"= {r['vs_floor']:.0%} of floor, {r['vs_naive']:.1f}x naive "
                  f"(runs: {', '.join(f'{v:.0f}' for v in r['runs']['spinestream'])})", flush=True)
            print(f"  bytes/slice: shards {s['shard_bytes_per_slice'] / 1024:.0f} KiB, zarr "
                  f"{s['zarr_bytes_per_slice'] / 1024:.0f} KiB, DICOM {r['dicom_bytes_per_slice'] / 1024:.0f} KiB")
            if "memory_scaling" in r:
                ms = r["memory_scaling"]
                print(f"  memory: {ms['studies'][0]} studies -> {ms['peak_rss_mb'][0]:.0f} MiB, "
                      f"{ms['studies'][1]} studies -> {ms['peak_rss_mb'][1]:.0f} MiB (process tree peak)")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rates = [r["spinestream"]["slices_per_s"] for r in results["syntaxes"].values()]
    per_slice = np.mean([r["spinestream"]["shard_bytes_per_slice"] + r["spinestream"]["zarr_bytes_per_slice"]
                         for r in results["syntaxes"].values()])
    results["projection_700k"] = {
        "hours_at_slowest_syntax": REAL_SLICES / min(rates) / 3600,
        "hours_at_fastest_syntax": REAL_SLICES / max(rates) / 3600,
        "disk_gb": REAL_SLICES * per_slice / 1e9,
    }
    pj = results["projection_700k"]
    print(f"\nprojected for {REAL_SLICES:,} slices with {args.workers} workers: "
          f"{pj['hours_at_fastest_syntax']:.1f}-{pj['hours_at_slowest_syntax']:.1f} h, "
          f"{pj['disk_gb']:.0f} GB (shards + zarr) — synthetic phantoms compress better than real CT, "
          f"see BENCHMARKS.md")
    if args.decode_rounds > 0:  # the decode limit per syntax on real CT: spinestream's reader vs each library alone
        from spinestream.benchmarks.decode import decode_table, print_decode_table, project_decode

        print("\nDICOM decode per transfer syntax (real CT re-encoded; the floor is the fastest correct library "
              "measured in the same run):")
        rows = decode_table(rounds=args.decode_rounds)
        print_decode_table(rows, candidates=False)
        results["decode_table"] = {"rows": rows, "projection_decode_only": project_decode(rows)}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "shard.json").write_text(json.dumps(results, indent=1) + "\n")
    chart(results, args.results / "shard.png")
    print(f"saved {args.results / 'shard.json'} and {args.results / 'shard.png'}")
    return 0
