"""``spinestream bench infer``: does study inference keep the model busy?

Over the same studies it measures:

* **read** — slices/s of reading the Zarr volumes alone (the background thread's work);
* **module** — slices/s through ``spinestream.engine.infer.predict_studies`` from Zarr: read-ahead thread,
  uint8 volume to the device, 2.5D gather, resize, normalise, model, sigmoid, back to the host;
* **model** — slices/s of the model alone on one batch already on the device, for the same
  number of (padded) batches;
* their ratio, the module's *saturation* (1.0 = the model never waits; target >= 0.9 on a
  GPU), and peak memory (GPU allocator peak, or the process's peak RSS on the CPU).

On a CPU it runs a tiny model (test_efficientnet at 128 px) on a small synthetic set to show
it works (the model and the input building then share the same cores, so the ratio says
little); on a GPU the figure that matters is tf_efficientnetv2_s at 384 px from 512 px
volumes. Results go to ``benchmarks/results/infer.json``.

    spinestream bench infer                         # defaults for this machine
    spinestream bench infer --shards shards-512 --studies 32 --tta
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from spinestream.shards.layout import Layout
from spinestream.shards.tables import read_study_table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: CPU-GPU sync point, so the timing covers queued work


def prepare(cache: Path, size: int, studies: int, slices: int) -> Path:
    """A synthetic shard set (uncompressed DICOM in, one worker per core) cached under ``cache``."""
    from spinestream.benchmarks.shard import dataset
    from spinestream.preprocess.convert import shard_dataset
    from spinestream.shards.shard_config import ShardConfig

    raw = dataset(cache, "explicit", studies, (slices, slices), size)
    out = cache / f"shards-explicit-n{studies}-s{slices}-{size}"
    if not Layout(out).manifest.is_file():
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):
            shard_dataset(raw, out, ShardConfig(image_size=size, folds=4), workers=os.cpu_count() or 1)
    return out


def time_read(root: Path, uids: list[str]) -> dict:
    from spinestream.engine.infer import _read_ahead

    t0, n = time.perf_counter(), 0
    for sv in _read_ahead(root, uids, prefetch=2):
        n += sv.n_slices
    dt = time.perf_counter() - t0
    return {"slices": n, "seconds": dt, "slices_per_s": n / dt}


def time_module(model, root: Path, uids: list[str], kw: dict, device) -> dict:
    from spinestream.engine.infer import predict_studies

    predict_studies(model, root, uids[:1], **kw)  # warm-up: cudnn autotuning, allocator, thread start
    _sync(device)
    t0 = time.perf_counter()
    probs = predict_studies(model, root, uids, **kw)  # its per-study copy to the host is a sync point
    dt = time.perf_counter() - t0
    n = sum(len(p) for p in probs.values())
    return {"slices": n, "seconds": dt, "slices_per_s": n / dt}


@torch.no_grad()
def time_model(model, batches: int, slices: int, kw: dict, device, channels_last: bool) -> dict:
    from spinestream.engine.device import autocast

    s, bs = kw["image_size"], kw["batch_size"]
    x = torch.randn(bs, 3, s, s, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    reps = 2 if kw["tta"] else 1

    def one():
        with autocast(kw["precision"], device):
            for _ in range(reps):
                torch.sigmoid(model(x).float())

    for _ in range(3):
        one()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        one()
    _sync(device)
    dt = time.perf_counter() - t0
    return {"slices": slices, "batches": batches, "seconds": dt, "slices_per_s": slices / dt}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spinestream bench infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, default=None, help="shard directory (default: a cached synthetic set)")
    p.add_argument("--model", default=None, help="timm name (default: tf_efficientnetv2_s on a GPU, "
                   "test_efficientnet on the CPU); random weights")
    p.add_argument("--image-size", type=int, default=None, help="default 384 on a GPU, 128 on the CPU")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on a GPU, 32 on the CPU")
    p.add_argument("--studies", type=int, default=None, help="studies timed (default 16 on a GPU, 4 on the CPU)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", action="store_true")
    p.add_argument("--repeat", type=int, default=2, help="tries of each measurement (best kept)")
    p.add_argument("--cache", type=Path, default=Path("/tmp/spinestream-bench"))
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from spinestream.engine.config import ModelConfig
    from spinestream.engine.device import channels_last_default, pick_device, resolve_precision
    from spinestream.engine.model import build_model, data_config

    device = pick_device(args.device)
    gpu = device.type == "cuda"
    name = args.model or ("tf_efficientnetv2_s" if gpu else "test_efficientnet")
    size = args.image_size or (384 if gpu else 128)
    bs = args.batch_size or (64 if gpu else 32)
    precision = resolve_precision(args.precision, device)
    root = args.shards or (prepare(args.cache, 512, 16, 96) if gpu else prepare(args.cache, 256, 5, 48))
    studies = read_study_table(Layout(root).studies, columns=["StudyInstanceUID"])
    uids = studies.StudyInstanceUID.tolist()[: args.studies or (16 if gpu else 4)]
    if gpu:
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: tuned once
        torch.cuda.reset_peak_memory_stats(device)
    cl = channels_last_default(device, True)
    model = build_model(ModelConfig(name=name, pretrained=False), image_size=size).to(device).eval()
    if cl:
        model = model.to(memory_format=torch.channels_last)
    dc = data_config(model)
    kw = dict(image_size=size, mean=dc["mean"], std=dc["std"], batch_size=bs, device=device, precision=precision,
              tta=args.tta, channels_last=cl)

    n_slices = studies.set_index("StudyInstanceUID").loc[uids, "n_slices"]
    batches = int(sum(-(-int(n) // bs) for n in n_slices))
    runs = {"read": [], "module": [], "model": []}
    for _ in range(args.repeat):  # interleaved, best of each: a load spike hits one try, not one line
        runs["read"].append(time_read(root, uids))
        runs["module"].append(time_module(model, root, uids, kw, device))
        runs["model"].append(time_model(model, batches, int(n_slices.sum()), kw, device, cl))
    read, module, alone = (max(runs[k], key=lambda r: r["slices_per_s"]) for k in ("read", "module", "model"))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} cores, " + (
        torch.cuda.get_device_name(device) if gpu else "no GPU")
    res = {"suite": "infer", "machine": machine, "model": name, "image_size": size, "batch_size": bs,
           "precision": precision, "tta": args.tta, "channels_last": cl, "studies": len(uids),
           "volume_shape": list(_shape(root, uids[0])), "read": read, "module": module, "model_only": alone,
           "saturation": module["slices_per_s"] / alone["slices_per_s"], "peak_gpu_memory_gib": peak,
           "peak_rss_gib": rss, "repeat": args.repeat}
    print(f"bench infer: {name} @ {size}px, batch {bs}, {precision}{' + flip TTA' if args.tta else ''}, "
          f"{len(uids)} studies ({module['slices']} slices, volumes {res['volume_shape']}) on {machine}")
    print(f"  read Zarr only   {read['slices_per_s']:9.1f} slices/s")
    print(f"  through module   {module['slices_per_s']:9.1f} slices/s")
    print(f"  model alone      {alone['slices_per_s']:9.1f} slices/s")
    print(f"  saturation       {res['saturation']:9.2f}" + (f"   peak GPU memory {peak:.2f} GiB" if peak else "")
          + f"   peak RSS {rss:.2f} GiB")
    args.results.mkdir(parents=True, exist_ok=True)
    from spinestream.shards.fsutil import atomic_write_bytes

    atomic_write_bytes(args.results / "infer.json", (json.dumps(res, indent=1) + "\n").encode())
    print(f"saved {args.results / 'infer.json'}")
    return 0


def _shape(root: Path, uid: str) -> tuple:
    from spinestream.shards.volumes import open_volume

    return tuple(open_volume(Layout(root).volumes, uid).shape)

