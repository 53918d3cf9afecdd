"""One rank of ``spinestream train`` under torchrun-like env vars, instrumented for tests/test_ddp.py: it runs
the real CLI (``spinestream.engine.train.main``) and writes ``$DDP_OUT/rank<r>.json`` with what this rank
trained on (slice ids per epoch), a digest of its weights, its skipped-step count, and its validation done both
ways: split across the ranks (the trainer's) and by this rank alone over every study.

``NAN_AT=<rank>:<call>`` makes that rank's ``call``-th loss (counting from 1) NaN, once, with finite gradients
(so DDP's averaging cannot spread it: the ranks must agree on the skip themselves).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from spinestream.engine import train, trainer as T
from spinestream.engine.infer import predict_studies, score_studies
from spinestream.engine.model import data_config

OUT = Path(os.environ["DDP_OUT"])
RANK = int(os.environ.get("RANK", "0"))
seen: dict[int, list[int]] = {}
calls = [0]
nan_rank, nan_call = (int(x) for x in os.environ.get("NAN_AT", "-1:-1").split(":"))

_step, _fit, _bce = T.Trainer._step, T.Trainer.fit, T.weighted_bce


def step(self, batch, last=False):
    seen.setdefault(self.loader.epoch, []).extend(batch.slice_ids[batch.valid].tolist())
    return _step(self, batch, last=last)


def bce(logits, *a, **k):
    loss = _bce(logits, *a, **k)
    calls[0] += 1
    if RANK == nan_rank and calls[0] == nan_call:
        # a NaN loss whose gradients are finite (fp16's logit overflow): only the loss says skip, on this rank
        return loss + loss.detach() * float("nan")
    return loss


def digest(sd: dict) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fit(self):
    best = _fit(self)
    model = self.ema.module if self.ema else self.model
    split = self.validate()  # the ranks' parts, gathered (rank 0's buffers broadcast first)
    dc = data_config(model)
    uids = self.val_studies.StudyInstanceUID.tolist()
    alone = score_studies(predict_studies(model, self.cfg.data.root, uids, image_size=self.cfg.loader.image_size,
                                          mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                                          batch_size=self.loader_cfg.batch_size), self.val_studies,
                          self.cfg.train.study_rule)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"rank{RANK}.json").write_text(json.dumps({
        "seen": {str(e): ids for e, ids in seen.items()}, "params": digest(dict(self.model.named_parameters())),
        "state": digest(self.model.state_dict()), "nan_total": self.nan_total, "step": self.step,
        "val_split": split["competition_loss"], "val_alone": alone["competition_loss"],
        "world": self.dist.world, "samples": self.train_sel.samples}))
    return best


T.Trainer._step, T.Trainer.fit, T.weighted_bce = step, fit, bce
torch.set_num_threads(1)
sys.exit(train.main(sys.argv[1:]))
