"""``train.batch_size: auto``: the largest batch whose whole training step fits under the memory cap.

The probe runs on a deep copy of the model, with its own Adam, GradScaler and EMA copy, inside
``torch.random.fork_rng``: the model's weights and BatchNorm statistics (pretrained, or a
checkpoint's on resume) and every RNG the run draws from are exactly as before the probe.

What the cap (``set_per_process_memory_fraction``) limits is torch's allocator only; the CUDA
context, DALI's memory pool and nvJPEG's buffers live outside it. A batch is accepted when the
probe's peak reserved memory stays below ``max_memory_gb - memory_headroom_gb``; both figures and
the peak of each candidate are recorded in the run directory
(:class:`spinestream.engine.rundir.BatchSizeRecord`). On resume the recorded batch size is
reused (no probe) when the probe's settings are unchanged.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from .config import RunConfig
from .device import DeviceUnusable, autocast
from .ema import ModelEma
from .metrics import weighted_bce
from .rundir import BatchSizeRecord, RunLayout, read_batch_size, write_batch_size


def _probe_step(model, opt, scaler, ema, b: int, size: int, device, precision: str, channels_last: bool) -> None:
    """One full training step of batch ``b`` on random data: forward, loss, backward, clip, Adam, EMA."""
    x = torch.randn(b, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(b, 8, device=device) < 0.1).float()
    with autocast(precision, device):
        logits = model(x)
    scaler.scale(weighted_bce(logits.float(), y)).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(0)


def _candidates(cfg: RunConfig, device) -> list[int]:
    cands = [2 ** k for k in range(1, 11)]
    if device.type != "cuda":
        # no memory cap to probe on the CPU: the configured loader batch, checked by a real step
        cands = [b for b in cands if b <= cfg.loader.batch_size] or [cfg.loader.batch_size]
    return cands


def auto_batch_size(model, cfg: RunConfig, device: torch.device, precision: str,
                    channels_last: bool = False) -> BatchSizeRecord:
    """Probe powers of two on a copy of ``model``; what it found, with the settings it probed under."""
    cuda = device.type == "cuda"
    budget = cfg.train.max_memory_gb - cfg.train.memory_headroom_gb
    best, tried = None, []
    with torch.random.fork_rng(devices=[device] if cuda else []):
        probe = copy.deepcopy(model).train()  # the caller's model (and its BN buffers) is never run
        opt = torch.optim.Adam(probe.parameters(), lr=1e-6, fused=True)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        ema = ModelEma(probe, 0.9) if cfg.optim.ema_decay > 0 else None
        for b in _candidates(cfg, device):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            try:
                _probe_step(probe, opt, scaler, ema, b, cfg.loader.image_size, device, precision, channels_last)
                if cuda:
                    torch.cuda.synchronize(device)  # note: CPU-GPU sync point (setup only)
            except (torch.OutOfMemoryError, MemoryError) as e:
                tried.append({"batch": b, "ok": False, "why": type(e).__name__})
                break
            finally:
                opt.zero_grad(set_to_none=True)
            peak = torch.cuda.max_memory_reserved(device) / 1e9 if cuda else None
            if peak is not None and peak > budget:
                tried.append({"batch": b, "ok": False, "peak_gb": peak, "why": "over max_memory_gb - headroom"})
                break
            tried.append({"batch": b, "ok": True, "peak_gb": peak})
            best = b
        del probe, opt, scaler, ema
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if best is None:
        raise DeviceUnusable(f"not even a batch of {tried[0]['batch']} fits at {cfg.loader.image_size}px under "
                             f"train.max_memory_gb={cfg.train.max_memory_gb} minus "
                             f"train.memory_headroom_gb={cfg.train.memory_headroom_gb}")
    return BatchSizeRecord(
        batch_size=best, tried=tried, image_size=cfg.loader.image_size, device=str(device), precision=precision,
        max_memory_gb=cfg.train.max_memory_gb, memory_headroom_gb=cfg.train.memory_headroom_gb,
        channels_last=channels_last, peak_gb=next((t["peak_gb"] for t in reversed(tried) if t["ok"]), None),
        peak_note="torch allocator's peak reserved memory of the whole step (model copy, grads, Adam, EMA)"
        if cuda else "no memory figures on the CPU: the configured loader.batch_size, checked by a real step")


def resolve_batch_size(cfg: RunConfig, model, run_dir: Path, device, precision: str, *, channels_last: bool,
                       resuming: bool) -> int:
    """``train.batch_size``, or the auto probe's answer (recorded in the run directory; reused on resume)."""
    if cfg.train.batch_size != "auto":
        return int(cfg.train.batch_size)
    settings = {"image_size": cfg.loader.image_size, "device": str(device), "precision": precision,
                "max_memory_gb": cfg.train.max_memory_gb, "memory_headroom_gb": cfg.train.memory_headroom_gb,
                "channels_last": channels_last}
    rec = read_batch_size(run_dir) if resuming else None
    if rec is not None:
        if rec.probed_with(settings):
            return rec.batch_size
        print(f"spinestream: {RunLayout(run_dir).batch_size} was probed with other settings; probing the batch "
              f"size again", file=sys.stderr)
    found = auto_batch_size(model, cfg, device, precision, channels_last)
    write_batch_size(run_dir, found)
    return found.batch_size
