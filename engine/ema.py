"""EMA of the weights, updated with fused multi-tensor kernels over cached tensor lists.

Why not timm's ``ModelEmaV3``: it rebuilds both state dicts on every update and its warm-up is the
``1 - (1 + step / gamma) ** -power`` law; this run relies on ``min(decay, (1 + step) / (10 + step))``
(early on the average follows the model closely: averaging trained weights with the random
initialisation gives a network that predicts ~0.5 everywhere, and the demo's short runs validate
with the EMA). And a step the device decided to skip (non-finite loss or gradients, see
:mod:`spinestream.engine.trainer`) must leave the average alone without the host knowing yet, so the update
takes the skip flag as a device tensor.
"""
from __future__ import annotations

import copy

import torch


class ModelEma:
    """``module`` holds the averaged model (eval mode, no grads); build it after any ``.to(...)``
    of the model, since the tensor lists are cached (``load_state_dict`` copies in place, fine)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._ema_f, self._model_f, self._ema_i, self._model_i = [], [], [], []
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                self._ema_f.append(e)
                self._model_f.append(m)
            else:  # BatchNorm's num_batches_tracked
                self._ema_i.append(e)
                self._model_i.append(m)

    def decay_at(self, step: int) -> float:
        """The warm-up: the average follows the model closely for the first steps."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int, applied: torch.Tensor | None = None) -> None:
        """ema += w * (model - ema), w = 1 - decay_at(step), times ``applied`` (a 0-d float device tensor,
        0.0 for a skipped step) when given. Three fused launches in all, no host sync."""
        w = 1.0 - self.decay_at(step)
        if applied is None:
            torch._foreach_lerp_(self._ema_f, self._model_f, w)
        else:
            # _foreach_lerp_ has no overload with one tensor weight for all tensors (the list overload
            # falls back to one kernel per tensor on CUDA): the same formula as sub, mul, add
            diff = torch._foreach_sub(self._model_f, self._ema_f)
            torch._foreach_mul_(diff, applied * w)
            torch._foreach_add_(self._ema_f, diff)
        if self._ema_i:
            torch._foreach_copy_(self._ema_i, self._model_i)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
