"""The torch fallback backend: DataLoader workers read JPEG bytes through the ``.idx`` offsets
and decode them (or the GPU decodes the batch with nvJPEG via torchvision); augmentation
runs on the batch on the loader's device (``engine.loader.augment``).

For machines without DALI (macOS, Windows, no wheel). Samples are read by offset from the
tar files with ``os.pread`` rather than streamed with webdataset's tar iterator: random
access gives a true global shuffle every epoch, an exact split between ranks, and a
mid-epoch resume that is a seek instead of re-reading and discarding samples.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from shards.sample import decode_jpeg

from .augment import augment, mixup, normalize
from .base import Batch, Loader, epoch_order, per_rank, rank_part
from .config import LoaderConfig, torch_dtype
from .data import LabelTable, Selection



class _Records(Dataset):
    """Sample i -> (JPEG bytes or decoded uint8 (3, H, W), slice_id)."""

    def __init__(self, tars: list[str], rec: dict[str, np.ndarray], decode: bool):
        self.tars, self.rec, self.decode = tars, rec, decode
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.rec["slice_id"])

    def _read(self, i: int) -> bytes:
        k = int(self.rec["shard"][i])
        fd = self._fds.get(k)
        if fd is None:  # one descriptor per shard per worker process
            fd = self._fds[k] = os.open(self.tars[k], os.O_RDONLY)
        size = int(self.rec["size"][i])
        data = os.pread(fd, size, int(self.rec["offset"][i]))
        if len(data) != size:
            raise OSError(f"{self.tars[k]}: short read at offset {self.rec['offset'][i]} (truncated shard?)")
        return data

    def __getitem__(self, i: int):
        data = self._read(i)
        if self.decode:  # Pillow (libjpeg-turbo): the same decoder the shard writer's tests use
            img = torch.from_numpy(decode_jpeg(data)).permute(2, 0, 1)  # (3, H, W) uint8
        else:
            img = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return img, int(self.rec["slice_id"][i])

    def __del__(self):
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass


def _gpu_decode(raw: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    """Batch-decode JPEG bytes with nvJPEG through torchvision -> (B, 3, H, W) uint8 on ``dev``."""
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return torch.stack(decode_jpeg(raw, mode=ImageReadMode.RGB, device=dev))


class _EpochBatches(Sampler):
    """This rank's batches of record indices for one epoch, from a given position on."""

    def __init__(self, order: np.ndarray, start: int, batch_size: int):
        self.order, self.start, self.bs = order, start, batch_size

    def __iter__(self):
        for s in range(self.start, len(self.order), self.bs):
            yield self.order[s:s + self.bs].tolist()

    def __len__(self) -> int:
        return max(0, -(-(len(self.order) - self.start) // self.bs))


def _collate(items):
    imgs, ids = zip(*items)
    ids = torch.tensor(ids, dtype=torch.int64)
    if imgs[0].ndim == 1:  # raw bytes, decoded on the GPU in the main process
        return list(imgs), ids
    return torch.stack(imgs), ids


class TorchLoader(Loader):
    backend = "torch"

    def __init__(self, sel: Selection, labels: LabelTable, cfg: LoaderConfig, *, device="cpu", rank: int = 0,
                 world: int = 1, train: bool = True):
        self.sel, self.cfg, self.device = sel, cfg, torch.device(device)
        self.rank, self.world, self.train = rank, world, train
        self.rec = sel.records()
        labels.check_covers(sel)
        self.labels = labels.to(self.device)
        self.n = len(self.rec["slice_id"])
        start, end = rank_part(self.n, rank, world)
        self.samples = end - start
        self.positions = per_rank(self.n, world)
        self.padded = self.positions - self.samples
        self.gpu_decode = cfg.torch_decode == "gpu" or (cfg.torch_decode == "auto" and self.device.type == "cuda")
        self.dataset = _Records(sel.tars, self.rec, decode=not self.gpu_decode)
        self.aug = cfg.augment if train else cfg.augment.off()
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return -(-self.positions // self.cfg.batch_size)

    def _order(self, epoch: int) -> np.ndarray:
        order = epoch_order(self.n, self.cfg.seed, epoch) if self.train else np.arange(self.n)
        start, end = rank_part(self.n, self.rank, self.world)
        mine = order[start:end]
        if self.padded:  # repeat the last sample; marked invalid in the batch
            mine = np.concatenate([mine, np.repeat(mine[-1:], self.padded)])
        return mine

    def __iter__(self):
        cfg, dev = self.cfg, self.device
        order = self._order(self.epoch)
        workers = cfg.num_threads
        dl = DataLoader(self.dataset, batch_sampler=_EpochBatches(order, self.position, cfg.batch_size),
                        num_workers=workers, collate_fn=_collate, pin_memory=dev.type == "cuda",
                        prefetch_factor=cfg.prefetch if workers > 0 else None, persistent_workers=False)
        dtype = torch_dtype(cfg.dtype)
        for imgs, ids in dl:
            step = self.position // cfg.batch_size
            g = torch.Generator(device=dev)
            g.manual_seed(int(np.random.default_rng([cfg.seed, self.epoch, step, 0xA06]).integers(2**62)))
            if isinstance(imgs, list):
                imgs = _gpu_decode(imgs, dev)
            else:
                imgs = imgs.to(dev, non_blocking=True)
            x = augment(imgs, self.aug, cfg.image_size, g)
            x = normalize(x, cfg.mean, cfg.std, dtype, cfg.channels_last)
            ids = ids.to(dev, non_blocking=True)
            y = self.labels[ids]
            if self.train:
                x, y = mixup(x, y, self.aug, g)
            pos = self.position + torch.arange(len(ids), device=dev)
            valid = pos < self.samples
            n_valid = max(0, min(len(ids), self.samples - self.position))
            self.position += len(ids)
            yield Batch(images=x, targets=y, slice_ids=ids, valid=valid, n_valid=n_valid)
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return {"backend": self.backend, "epoch": self.epoch, "position": self.position, "seed": self.cfg.seed,
                "n": self.n, "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
