"""Taking back what a skipped step's forward pass did to the model's buffers, without a host sync.

A training-mode forward pass updates BatchNorm's running statistics (and ``num_batches_tracked``)
before the step is known to be non-finite; skipping the optimizer update does not undo that, and
one overflowing batch (the likely fp16 failure on a P100) would leave NaN statistics that poison
validation and, through the EMA's ``model - ema``, the averaged weights. So every accumulation
window starts with a copy of the buffers, and after the optimizer step the buffers take back that
copy where the device decided the step was skipped: ``torch.where`` over the buffers of each dtype
flattened into one tensor (a NaN statistic is replaced, not multiplied by zero). A few kernel
launches a window per dtype (float statistics, int64 counters), whatever the number of BatchNorm
layers; nothing for a model without buffers.
"""
from __future__ import annotations

import torch


class BufferSnapshot:
    """The model's buffers at the start of the current accumulation window (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in model.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        # per dtype: the buffers, their sizes, and one flat tensor holding their copy
        self._groups = [(tensors, [t.numel() for t in tensors],
                         torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device))
                        for dtype, tensors in by_dtype.items()]

    @torch.no_grad()
    def take(self) -> None:
        """Copy the buffers (at the start of a window, before its first forward pass)."""
        for tensors, _, saved in self._groups:
            torch.cat([t.reshape(-1) for t in tensors], out=saved)

    @torch.no_grad()
    def restore_if(self, skipped: torch.Tensor) -> None:
        """Put the copy back where ``skipped`` (a 0-d bool device tensor) is true; no host sync."""
        for tensors, sizes, saved in self._groups:
            now = torch.cat([t.reshape(-1) for t in tensors])
            torch.where(skipped, saved, now, out=now)
            torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(now.split(sizes), tensors)])
