"""Which device a run uses and what that device can do: one place for the per-card rules.

``pick_device`` resolves ``train.device`` to an *indexed* device once (``cuda:<local rank>``);
everything after it (memory cap, autocast, DALI's ``device_id``) uses that object. Where
``nvidia-smi`` sees a GPU that this torch cannot use (a CPU-only torch, no kernels for the card's
sm, a driver older than torch's CUDA), ``auto`` and ``cuda`` stop with the build to install
instead of training on the CPU in silence; the build rules are engine/gpu_probe.py's, the same
the Makefile installs from.

The per-card guards (bf16, ``torch.compile``, channels_last, the hardware JPEG decoder, the
loader's dtype) live here so the trainer, the benchmarks and the loaders ask one place.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch

from spinestream import InputError, SpinestreamError

from . import gpu_probe


class DeviceUnusable(SpinestreamError, RuntimeError):
    """The device or precision the config asks for cannot be had here (no CUDA device, an unsupported GPU, no
    batch that fits the memory cap); the message says what to set instead."""


def pick_device(name: str, local_rank: int = 0, *, nvidia_smi: gpu_probe.Runner | None = None) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` -> a device; CUDA always with an index (the local rank's), made current.

    ``auto`` is the CPU only where no GPU is visible (or ``CUDA_VISIBLE_DEVICES`` hides them on
    purpose); a GPU that nvidia-smi lists but torch cannot use is an error naming the fix.
    ``nvidia_smi`` replaces the nvidia-smi runner (tests).
    """
    if name not in ("auto", "cpu", "cuda"):
        raise InputError(f"device={name!r}: use auto, cpu or cuda")
    if name == "cpu" or (name == "auto" and _gpus_hidden()):
        return torch.device("cpu")
    problem = _torch_cuda_problem()
    if problem is not None:
        gpus = gpu_probe.query_gpus(nvidia_smi or gpu_probe.run_nvidia_smi)
        if gpus:
            raise DeviceUnusable(unusable_gpu_message(name, gpus, problem))
        if name == "auto":
            return torch.device("cpu")
        raise DeviceUnusable(f"device=cuda but no CUDA device is visible ({problem}; nvidia-smi lists none): "
                             f"use device: auto or cpu")
    count = torch.cuda.device_count()
    if not 0 <= local_rank < count:
        raise DeviceUnusable(f"local rank {local_rank} needs cuda:{local_rank}, but {count} CUDA device(s) are visible")
    device = torch.device("cuda", local_rank)
    # the current device is what nvJPEG, DALI's default and is_bf16_supported() refer to
    torch.cuda.set_device(device)
    return device


def _gpus_hidden() -> bool:
    return os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1")


def _torch_cuda_problem() -> str | None:
    """Why this torch cannot compute on the visible GPUs, or None when it can."""
    version = torch.__version__
    if torch.version.cuda is None:
        return f"torch {version} is built without CUDA"
    if not torch.cuda.is_available():
        return f"torch {version} (CUDA {torch.version.cuda}) finds no usable CUDA device"
    archs = torch.cuda.get_arch_list()
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        if not arch_supported(cap, archs):
            return (f"{torch.cuda.get_device_name(i)} is sm_{cap[0]}{cap[1]}, and torch {version} has kernels "
                    f"for {' '.join(archs)} only")
    return None


def arch_supported(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether kernels built for ``arch_list`` run on ``capability``.

    A cubin ``sm_XY`` runs on the same major X at minor >= Y (sm_86 code on an sm_89 card);
    PTX ``compute_XY`` is compiled by the driver for any capability >= XY.
    """
    if not arch_list:
        return True  # nothing to check against (a custom build)
    major, minor = capability
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        num = num.rstrip("af")  # sm_90a / sm_100f: family- and arch-specific cubins
        if not num.isdigit():
            continue
        n = int(num)
        if kind == "sm" and n // 10 == major and n % 10 <= minor:
            return True
        if kind == "compute" and n <= 10 * major + minor:
            return True
    return False


def unusable_gpu_message(name: str, gpus: list[gpu_probe.Gpu], problem: str) -> str:
    """The loud failure: what nvidia-smi sees, why torch cannot use it, the build to install."""
    build = gpu_probe.choose_build(gpus)
    driver_hint = ""
    major = (torch.version.cuda or "").split(".")[0]
    drivers = [g.driver_major for g in gpus if g.driver_major is not None]
    need = {"13": gpu_probe.CUDA13_MIN_DRIVER, "12": gpu_probe.CUDA12_MIN_DRIVER}.get(major)
    if need and drivers and min(drivers) < need:
        driver_hint = f" (CUDA {torch.version.cuda} needs an R{need}+ driver; this one is {min(drivers)})"
    seen = "; ".join(g.describe() for g in gpus)
    fix = f"this card needs torch for CUDA {build.cuda} and {build.dali_extra}: {gpu_probe.install_hint(build)}"
    if build.warning:
        fix += f". Note: {build.warning}"
    return (f"device={name}: nvidia-smi sees {seen}, but {problem}{driver_hint}. Refusing to fall back to the "
            f"CPU in silence: {fix}. To run on the CPU on purpose, use device: cpu.")


def set_memory_cap(device: torch.device, max_memory_gb: float) -> None:
    """Cap torch's allocator so a bigger card behaves like a ``max_memory_gb`` one (no-op off CUDA).

    Needs an indexed device (``torch.device("cuda")`` raises in torch's ``_get_device_index``).
    The cap is torch's only: DALI's pool, nvJPEG and the CUDA context come on top.
    """
    if device.type != "cuda":
        return
    if device.index is None:
        raise ValueError(f"set_memory_cap needs an indexed CUDA device (from pick_device), got {device}")
    if max_memory_gb <= 0:
        raise InputError(f"train.max_memory_gb must be > 0, got {max_memory_gb}")
    total = torch.cuda.get_device_properties(device).total_memory / 1e9
    torch.cuda.set_per_process_memory_fraction(min(1.0, max_memory_gb / total), device)


def resolve_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on sm80+ (A100, H100), fp16 with a GradScaler below (P100, T4, V100), fp32 on CPU.

    An explicit bf16 on a card without native bf16 is refused: torch's is_bf16_supported() counts
    emulation by default and says yes on a P100, where every bf16 op is emulated, slowly.
    """
    if name not in ("auto", "fp32", "fp16", "bf16"):
        raise InputError(f"train.precision={name!r}: use auto, fp32, fp16 or bf16")
    if device.type != "cuda":
        return "fp32" if name == "auto" else name
    cap = torch.cuda.get_device_capability(device)
    if name == "auto":
        return "bf16" if cap[0] >= 8 else "fp16"
    # is_bf16_supported asks about the current device: pick_device made `device` current
    if name == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise DeviceUnusable(f"train.precision=bf16 but {torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]}) "
                             f"has no native bf16 (sm80+; torch would emulate it, slowly): use fp16 or auto")
    return name


def autocast(precision: str, device: torch.device):
    """The autocast context for ``precision`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def compile_unsupported(device: torch.device) -> str | None:
    """Why ``torch.compile`` (Inductor) cannot run on this device, or None when it can.

    Inductor's Triton kernels need compute capability 7.0+; on a P100 it fails mid-setup.
    """
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (7, 0):
        name = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        return f"torch.compile (Inductor) needs compute capability 7.0+, {name} has {cap[0]}.{cap[1]}"
    return None


def channels_last_default(device: torch.device, requested: bool) -> bool:
    """Whether to run channels_last: when requested, and only on tensor-core cards (sm70+).

    channels_last (NHWC) is the layout cuDNN's tensor-core convolutions want, so on Volta and newer
    it saves the transposes around every convolution. Without tensor cores (Pascal/P100) it only
    moves the depthwise convolutions to other, often slower, kernels; on the CPU oneDNN's depthwise
    convolutions get slower too. The P100 figure is unmeasured: this rule is the documented
    expectation until benchmarks/device_check.sh runs on one (it times both layouts).
    """
    return requested and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 0)


def has_hw_jpeg_decoder(device: torch.device) -> bool:
    """Whether nvJPEG's hardware decoder (NVJPG) exists: A100/A30 (sm80) and H100/H200 (sm90).

    Not on sm86/sm89 cards (A10, L4, RTX), nor the P100 or T4: DALI's mixed decoder does the
    Huffman stage on the CPU there, so ``hw_decoder_load`` should be 0 and CPU threads matter.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device) in ((8, 0), (9, 0))


def resolve_loader_dtype(dtype: str, device: torch.device, precision: str) -> str:
    """The loader's output dtype for this device: half-precision batches need autocast to match the weights.

    In fp32 (the CPU's default, or an explicit fp32 on a GPU) a float16/bfloat16 loader would feed
    half inputs to float32 weights (``Input type (c10::Half) and bias type (float) should be the
    same``): the loader returns float32 there, with a notice.
    """
    if dtype not in ("float32", "float16", "bfloat16"):
        raise InputError(f"loader.dtype={dtype!r}: use float32, float16 or bfloat16")
    if dtype != "float32" and precision == "fp32":
        print(f"spinestream: loader.dtype={dtype} with fp32 on {device.type}: the loader returns float32",
              file=sys.stderr)
        return "float32"
    return dtype
