"""On a GPU: the training step issues no host sync (bf16 and fp16), proved with torch's sync debug
mode; and a skipped fp16 step is learned by the host without waiting. Deselected without CUDA."""
from __future__ import annotations

import pytest
import torch
from test_train import _cfg, _trainer
from tqdm import tqdm

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _fixed_batch(t):
    from spinestream.engine.loader import Batch
    from spinestream.engine.loader.config import torch_dtype

    bs, size = t.loader_cfg.batch_size, t.loader_cfg.image_size
    x = torch.randn(bs, 3, size, size, device=t.device).to(torch_dtype(t.loader_cfg.dtype))
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return Batch(images=x, targets=(torch.rand(bs, 8, device=t.device) < 0.2).float(),
                 slice_ids=torch.arange(bs, device=t.device), valid=torch.ones(bs, dtype=torch.bool, device=t.device),
                 n_valid=bs)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_training_step_never_waits_on_the_host(shards, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("no bf16 on this card")
    t = _trainer(_cfg(shards, tmp_path, **{"train.device": "cuda", "train.precision": precision,
                                           "optim.grad_accum": 2}))
    t._bar = tqdm(disable=True)
    batch = _fixed_batch(t)
    for _ in range(2):  # lazy state (Adam moments, GradScaler's scale) outside the check
        t._step(batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(6):
            t._step(batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    t._settle(block=True)
    assert t.step == 4 - t.nan_total
