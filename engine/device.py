"""Which device a run uses and what that device can do: one place for the per-card rules.

``pick_device`` resolves ``train.device`` to an *indexed* device once (``cuda:<local rank>``);
everything after it (memory cap, autocast, DALI's ``device_id``) uses that object.
``resolve_precision`` picks bf16 / fp16 / fp32 for the card.
"""
from __future__ import annotations

import contextlib

import torch


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on sm80+ (A100, H100), fp16 with a GradScaler below (P100, T4, V100), fp32 on CPU."""
    if device.type != "cuda":
        return "fp32" if name == "auto" else name
    if name == "auto":
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise RuntimeError("train.precision=bf16 but this GPU has no bf16 (use fp16 or auto)")
    return name


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
