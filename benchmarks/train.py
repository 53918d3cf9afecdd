"""``spinestream bench train``: is the model or the loader the limit?

For the configured model and input size it measures, in the same run:

* **model** — training images/s (forward, weighted BCE, backward, Adam step) with one batch
  already on the device: the model's own limit;
* **loader** — the same steps fed by the real loader from the shards;
* their ratio, the loader's *saturation* (1.0 = the GPU never waits for data), peak memory,
  and the batch size ``batch_size: auto`` picks under ``train.max_memory_gb``.

On a CPU it runs a tiny model to show it works; on a GPU the figure that matters is
tf_efficientnetv2_s at 384×384 under the 16 GB cap (target saturation ≥ 0.95).
Results go to ``benchmarks/results/train.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch


def _steps(model, opt, batches, n: int, warmup: int, precision: str, device) -> dict:
    from engine.metrics import weighted_bce
    from engine.device import autocast

    it = iter(batches)
    model.train()

    def one():
        x, y = next(it)
        with autocast(precision, device):
            logits = model(x)
        loss = weighted_bce(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return x.shape[0]

    for _ in range(warmup):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, images = time.perf_counter(), 0
    for _ in range(n):
        images += one()
    if device.type == "cuda":
        torch.cuda.synchronize()  # note: the one sync point, so the timing covers queued GPU work
    dt = time.perf_counter() - t0
    return {"images": images, "seconds": dt, "images_per_s": images / dt}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinestream bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", type=Path, default=None, help="run config (default: configs/round1.yaml "
                   "on a GPU, a tiny CPU setting otherwise)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--shards", type=Path, default=None, help="shard directory (default: data.root of the config, "
                   "or a synthetic set)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)

    from engine.config import RunConfig
    from engine.loader import LabelTable, build_loader, select
    from engine.model import build_model, data_config
    from engine.device import pick_device, resolve_precision, set_memory_cap
    from engine.trainer import auto_batch_size
    from shards.config import load_config

    gpu = torch.cuda.is_available()
    cpu_defaults = ["model.name=test_efficientnet", "loader.image_size=128", "train.batch_size=16"]
    config = args.config or (Path("configs/round1.yaml") if gpu else None)
    cfg = load_config(RunConfig, config, ([] if gpu or args.config else cpu_defaults) + args.set)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, pretrained_path=None))
    device = pick_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    set_memory_cap(device, cfg.train.max_memory_gb)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    shards = args.shards or Path(cfg.data.root)
    if not (shards / "manifest.json").exists():
        from benchmarks.loader import prepare

        _, shards = prepare(Path("/tmp/spinestream-bench"), 512, 16)

    model = build_model(cfg.model, image_size=cfg.loader.image_size).to(device)
    cl = cfg.train.channels_last and device.type == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    auto = None
    if cfg.train.batch_size == "auto":
        auto = auto_batch_size(model, cfg, device, precision)
        bs = auto["batch_size"]
    else:
        bs = cfg.train.batch_size
    if cfg.train.compile:
        model = torch.compile(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    size = cfg.loader.image_size
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    x = torch.randn(bs, 3, size, size, device=device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(bs, 8, device=device) < 0.1).float()
    fixed = _steps(model, opt, iter(lambda: (x, y), None), args.steps, args.warmup, precision, device)

    sel = select(shards)
    dc = data_config(model)
    lcfg = dataclasses.replace(cfg.loader, batch_size=bs, mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                               channels_last=cl)
    loader = build_loader(sel, LabelTable(torch.zeros(sel.n_total, 8), ["zeros"]), lcfg, device=device)

    def batches():
        while True:
            for b in loader:
                yield b.images, b.targets

    fed = _steps(model, opt, batches(), args.steps, args.warmup, precision, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    machine = f"{platform.node() or 'host'}: {os.cpu_count()} cores, " + (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU")
    res = {"suite": "train", "machine": machine, "model": cfg.model.name, "image_size": size, "batch_size": bs,
           "auto_batch": auto, "precision": precision, "loader": loader.backend, "model_only": fixed,
           "through_loader": fed, "saturation": fed["images_per_s"] / fixed["images_per_s"], "peak_memory_gib": peak}
    print(f"bench train: {cfg.model.name} @ {size}px, batch {bs}{' (auto)' if auto else ''}, {precision}, "
          f"{loader.backend} loader on {machine}")
    print(f"  model only      {fixed['images_per_s']:8.1f} images/s")
    print(f"  through loader  {fed['images_per_s']:8.1f} images/s")
    print(f"  saturation      {res['saturation']:8.2f}" + (f"   peak memory {peak:.2f} GiB" if peak else ""))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "train.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"saved {args.results / 'train.json'}")
    return 0
