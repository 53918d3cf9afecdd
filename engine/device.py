"""Which device a run uses and what that device can do: one place for the per-card rules.

``pick_device`` resolves ``train.device`` to an *indexed* device once (``cuda:<local rank>``);
everything after it (memory cap, autocast, DALI's ``device_id``) uses that object.
The per-card guards (bf16, ``torch.compile``, channels_last, the hardware JPEG decoder,
the loader's dtype) live here so the trainer, the benchmarks and the loaders ask one place.
"""
from __future__ import annotations

import contextlib
import sys

import torch


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` -> a device; CUDA always with an index (the local rank's)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def set_memory_cap(device: torch.device, max_memory_gb: float) -> None:
    """Cap torch's allocator so a bigger card behaves like a ``max_memory_gb`` one (no-op off CUDA)."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory / 1e9
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory_gb / total), device)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on sm80+ (A100, H100), fp16 with a GradScaler below (P100, T4, V100), fp32 on CPU."""
    if device.type != "cuda":
        return "fp32" if name == "auto" else name
    if name == "auto":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if name == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise RuntimeError("train.precision=bf16 but this GPU has no bf16 (use fp16 or auto)")
    return name


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def compile_unsupported(device: torch.device) -> str | None:
    """Why ``torch.compile`` (Inductor) cannot run on this device, or None when it can."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
        name = torch.cuda.get_device_name(device)
        return f"torch.compile (Inductor) needs compute capability 7.0+, {name} has " \
               f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
    return None


def channels_last_default(device: torch.device, requested: bool) -> bool:
    """channels_last pays off on tensor cores (sm70+); on the CPU and on Pascal it slows depthwise convs."""
    return requested and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)


def has_hw_jpeg_decoder(device: torch.device) -> bool:
    """nvJPEG's hardware decoder exists on A100/A30 (sm80) and H100/H200 (sm90) only."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) in ((8, 0), (9, 0))


def resolve_loader_dtype(dtype: str, device: torch.device, precision: str) -> str:
    """The loader's output dtype for this device: half-precision batches need autocast to match the weights.

    On the CPU in fp32 a float16/bfloat16 loader would feed half inputs to float32 weights
    (``Input type (c10::Half) and bias type (float)``): use float32 there, with a notice.
    """
    if dtype != "float32" and precision == "fp32":
        print(f"spinestream: loader.dtype={dtype} with fp32 on {device.type}: the loader returns float32",
              file=sys.stderr)
        return "float32"
    return dtype
