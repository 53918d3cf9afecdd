"""engine/device.py: the indexed device, the loud failure on an unusable GPU, and the per-card guards.

No GPU here: ``fake_cuda`` patches torch.cuda to describe one card (its capability, torch's arch
list, whether CUDA initialises); nvidia-smi is an injected runner answering like the real one.
"""
from types import SimpleNamespace

import pytest
import torch

from spinestream.engine import device as dv
from spinestream.engine import gpu_probe

CU130_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]   # torch 2.14.1+cu130 (this venv)
CU126_ARCHS = ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]

CARDS = {  # name, capability, nvidia-smi driver
    "P100": ("Tesla P100-PCIE-16GB", (6, 0), "535.104.05"),
    "T4": ("Tesla T4", (7, 5), "550.54.15"),
    "V100": ("Tesla V100-SXM2-16GB", (7, 0), "580.65.06"),
    "A100": ("NVIDIA A100-SXM4-40GB", (8, 0), "580.65.06"),
    "A10": ("NVIDIA A10G", (8, 6), "580.65.06"),
    "L4": ("NVIDIA L4", (8, 9), "580.65.06"),
    "H100": ("NVIDIA H100 80GB HBM3", (9, 0), "580.65.06"),
}


def smi(card: str | None):
    """An nvidia-smi runner for ``card`` (None: no GPU), recording its calls."""
    calls = []

    def run(args):
        calls.append(list(args))
        if card is None:
            return None
        name, (a, b), drv = CARDS[card]
        return f"{name}, {a}.{b}, {drv}\n" if "compute_cap" in args[0] else f"{name}, {drv}\n"

    run.calls = calls
    return run


@pytest.fixture
def fake_cuda(monkeypatch):
    """Returns ``use(card, archs=..., available=True, cuda="13.0")`` that makes torch.cuda describe it."""
    calls = {"fraction": [], "set_device": []}

    def use(card, archs=CU130_ARCHS, available=True, cuda="13.0"):
        name, cap, _ = CARDS[card]
        m = monkeypatch
        m.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        m.setattr(torch.version, "cuda", cuda)
        m.setattr(torch.cuda, "is_available", lambda: available)
        m.setattr(torch.cuda, "device_count", lambda: 1 if available else 0)
        m.setattr(torch.cuda, "get_arch_list", lambda: list(archs))
        m.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
        m.setattr(torch.cuda, "get_device_name", lambda d=None: name)
        m.setattr(torch.cuda, "get_device_properties",
                  lambda d=None: SimpleNamespace(total_memory=80e9 if card == "H100" else 16e9, major=cap[0],
                                                 minor=cap[1], name=name))
        m.setattr(torch.cuda, "current_device", lambda: 0)
        m.setattr(torch.cuda, "set_device", lambda d: calls["set_device"].append(d))
        # a P100 *can* hold bf16 tensors: the emulation probe says yes there
        m.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)

        def fraction(f, device=None):
            # what torch's own set_per_process_memory_fraction does with the device first
            idx = torch.cuda._utils._get_device_index(device)
            calls["fraction"].append((f, idx))

        m.setattr(torch.cuda, "set_per_process_memory_fraction", fraction)
        return calls

    return use


# ---------------------------------------------------------------- the indexed device


def test_unindexed_device_is_what_torch_rejects():
    # the bug: pick_device used to return this, and the memory cap raised in setup
    with pytest.raises(ValueError, match="specified index"):
        torch.cuda._utils._get_device_index(torch.device("cuda"))


def test_pick_device_is_indexed_and_the_memory_cap_accepts_it(fake_cuda):
    calls = fake_cuda("H100", archs=CU130_ARCHS)
    dev = dv.pick_device("cuda", local_rank=0)
    assert dev == torch.device("cuda", 0) and dev.index == 0
    dv.set_memory_cap(dev, 16)
    assert calls["fraction"] == [(pytest.approx(16 / 80), 0)]
    assert calls["set_device"] == [dev]


def test_local_rank_picks_its_own_card(fake_cuda, monkeypatch):
    fake_cuda("A100")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert dv.pick_device("auto", local_rank=3) == torch.device("cuda", 3)
    with pytest.raises(RuntimeError, match="local rank 4"):
        dv.pick_device("auto", local_rank=4)


def test_set_memory_cap_refuses_an_unindexed_device(fake_cuda):
    fake_cuda("H100")
    with pytest.raises(ValueError, match="indexed"):
        dv.set_memory_cap(torch.device("cuda"), 16)


def test_auto_with_a_usable_gpu_picks_it_without_asking_nvidia_smi(fake_cuda):
    fake_cuda("T4", archs=CU130_ARCHS)
    run = smi("T4")
    assert dv.pick_device("auto", nvidia_smi=run) == torch.device("cuda", 0)
    assert run.calls == []


def test_sm89_runs_sm86_cubins(fake_cuda):
    fake_cuda("L4", archs=CU130_ARCHS)  # no sm_89 in the list: binary compatible within the major
    assert dv.pick_device("auto", nvidia_smi=smi("L4")).type == "cuda"


# ---------------------------------------------------------------- the loud failure


def test_p100_with_the_cu130_torch_fails_loudly_naming_the_cu126_build(fake_cuda):
    fake_cuda("P100", archs=CU130_ARCHS, available=True)  # the driver may init; the kernels are missing
    with pytest.raises(RuntimeError) as e:
        dv.pick_device("auto", nvidia_smi=smi("P100"))
    msg = str(e.value)
    assert "Tesla P100" in msg and "sm_60" in msg and "sm_75" in msg
    assert f"TORCH_INDEX={gpu_probe.CU126_INDEX}" in msg and "DALI_EXTRA=dali-cu12" in msg
    assert "device: cpu" in msg


def test_driver_too_old_for_torchs_cuda_is_named(fake_cuda):
    fake_cuda("T4", archs=CU130_ARCHS, available=False, cuda="13.0")  # R550 cannot run CUDA 13
    with pytest.raises(RuntimeError) as e:
        dv.pick_device("cuda", nvidia_smi=smi("T4"))
    assert "R580" in str(e.value) and "550" in str(e.value) and "TORCH_INDEX" in str(e.value)


def test_cpu_only_torch_on_a_gpu_machine_fails_loudly(fake_cuda):
    fake_cuda("A100", available=False, cuda=None)
    with pytest.raises(RuntimeError, match="built without CUDA") as e:
        dv.pick_device("auto", nvidia_smi=smi("A100"))
    assert "PyPI" in str(e.value) or "make venv" in str(e.value)


def test_no_gpu_anywhere_auto_is_the_cpu_and_cuda_is_refused(fake_cuda):
    fake_cuda("A100", available=False, cuda=None)
    assert dv.pick_device("auto", nvidia_smi=smi(None)) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        dv.pick_device("cuda", nvidia_smi=smi(None))


def test_gpus_hidden_on_purpose_mean_the_cpu(fake_cuda, monkeypatch):
    fake_cuda("A100", available=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert dv.pick_device("auto", nvidia_smi=smi("A100")) == torch.device("cpu")


def test_unknown_device_name_is_a_value_error():
    with pytest.raises(ValueError, match="auto, cpu or cuda"):
        dv.pick_device("gpu")


def test_arch_rules():
    assert dv.arch_supported((6, 0), CU126_ARCHS) and not dv.arch_supported((6, 0), CU130_ARCHS)
    assert dv.arch_supported((8, 9), CU130_ARCHS)              # sm_86 cubins
    assert dv.arch_supported((12, 1), ["sm_90", "compute_120"])  # PTX for newer cards
    assert not dv.arch_supported((9, 0), ["sm_80", "compute_100"])


# ---------------------------------------------------------------- per-card guards


@pytest.mark.parametrize("card, auto", [("P100", "fp16"), ("T4", "fp16"), ("V100", "fp16"),
                                        ("A100", "bf16"), ("H100", "bf16")])
def test_auto_precision_by_card(fake_cuda, card, auto):
    fake_cuda(card, archs=CU126_ARCHS + CU130_ARCHS)
    assert dv.resolve_precision("auto", torch.device("cuda", 0)) == auto


def test_bf16_on_a_p100_is_refused_not_emulated(fake_cuda):
    fake_cuda("P100", archs=CU126_ARCHS)
    assert torch.cuda.is_bf16_supported()  # torch's default counts emulation: the trap
    with pytest.raises(RuntimeError, match="no native bf16"):
        dv.resolve_precision("bf16", torch.device("cuda", 0))
    assert dv.resolve_precision("fp16", torch.device("cuda", 0)) == "fp16"


def test_bf16_on_an_a100_is_accepted(fake_cuda):
    fake_cuda("A100")
    assert dv.resolve_precision("bf16", torch.device("cuda", 0)) == "bf16"


def test_precision_on_the_cpu():
    assert dv.resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision"):
        dv.resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("card, ok", [("P100", False), ("V100", True), ("T4", True), ("H100", True)])
def test_compile_refused_below_sm70(fake_cuda, card, ok):
    fake_cuda(card, archs=CU126_ARCHS + CU130_ARCHS)
    why = dv.compile_unsupported(torch.device("cuda", 0))
    assert (why is None) == ok
    if not ok:
        assert "7.0" in why and "6.0" in why


def test_compile_fine_on_the_cpu():
    assert dv.compile_unsupported(torch.device("cpu")) is None


@pytest.mark.parametrize("card, on", [("P100", False), ("V100", True), ("T4", True), ("A100", True)])
def test_channels_last_by_tensor_cores(fake_cuda, card, on):
    fake_cuda(card, archs=CU126_ARCHS + CU130_ARCHS)
    assert dv.channels_last_default(torch.device("cuda", 0), True) is on
    assert dv.channels_last_default(torch.device("cuda", 0), False) is False


def test_channels_last_off_on_the_cpu():
    assert dv.channels_last_default(torch.device("cpu"), True) is False


@pytest.mark.parametrize("card, hw", [("A100", True), ("H100", True), ("A10", False), ("L4", False),
                                      ("P100", False), ("T4", False), ("V100", False)])
def test_hardware_jpeg_decoder(fake_cuda, card, hw):
    fake_cuda(card, archs=CU126_ARCHS + CU130_ARCHS)
    assert dv.has_hw_jpeg_decoder(torch.device("cuda", 0)) is hw


def test_no_hardware_jpeg_decoder_on_the_cpu():
    assert dv.has_hw_jpeg_decoder(torch.device("cpu")) is False


# ---------------------------------------------------------------- the loader's dtype on the CPU


@pytest.fixture(scope="module")
def tiny_model():
    import timm

    return timm.create_model("test_efficientnet", pretrained=False, num_classes=8).eval()


def test_float16_loader_on_the_cpu_resolves_to_float32_and_the_forward_runs(tiny_model, capsys):
    cpu = torch.device("cpu")
    precision = dv.resolve_precision("auto", cpu)
    dtype = dv.resolve_loader_dtype("float16", cpu, precision)  # configs/round1.yaml's loader.dtype
    assert dtype == "float32" and "float32" in capsys.readouterr().err
    x = torch.rand(2, 3, 64, 64).to(getattr(torch, dtype))
    with torch.no_grad(), dv.autocast(precision, cpu):
        out = tiny_model(x)
    assert out.shape == (2, 8) and torch.isfinite(out).all()


def test_the_old_path_float16_input_into_float32_weights_raises(tiny_model):
    x = torch.rand(2, 3, 64, 64).half()
    with pytest.raises(RuntimeError, match="should be the same|Half"), torch.no_grad():
        tiny_model(x)


def test_half_loader_kept_under_autocast():
    assert dv.resolve_loader_dtype("float16", torch.device("cuda", 0), "fp16") == "float16"
    assert dv.resolve_loader_dtype("bfloat16", torch.device("cuda", 0), "bf16") == "bfloat16"
    with pytest.raises(ValueError, match="loader.dtype"):
        dv.resolve_loader_dtype("int8", torch.device("cpu"), "fp32")
