"""The torch fallback backend: DataLoader workers read JPEG bytes through the ``.idx`` offsets
and decode them (or the GPU decodes the batch with nvJPEG via torchvision); augmentation
runs on the batch on the loader's device (``spinestream.engine.loader.augment``).

For machines without DALI (macOS, Windows, no wheel). Samples are read by offset from the
tar files with ``os.pread`` (:class:`spinestream.shards.wds.RecordReader`, as the DALI backend
does) in the epoch's global order (:func:`spinestream.engine.loader.base.rank_order`): a true global
shuffle every epoch, an exact split between ranks, and a mid-epoch resume that is a seek.
The augmentation parameters are drawn on the host by the same sampler as DALI's
(:mod:`spinestream.engine.loader.params`, seeded by seed, epoch, rank and position), so a batch needs no
host sync: coins are CPU arrays, the parameters reach the device in one pinned copy, and the
normalisation constants are cached per device.

Decoding: ``torch_decode: auto`` decodes on the GPU (torchvision's batched nvJPEG) only on a
card with a hardware JPEG decoder (A100/H100/H200); elsewhere — P100, T4 — torchvision's CUDA
path runs the Huffman stage on the host, one image at a time, in the training thread, so the
DataLoader workers decode on the CPU instead.

Corrupt samples (``loader.bad_samples``): a worker that reads bytes failing their CRC-32
(:class:`spinestream.shards.wds.SampleError`) or a JPEG that does not decode to the shard's image
size hands back a blank image and the reason instead of raising (a worker's traceback would
arrive as a multi-line wrapper); the training process then stops with the one-line
:class:`~spinestream.shards.wds.SampleError` naming the shard and the sample, or, with ``skip``,
marks the row invalid (like padding), keeps it out of mixup and counts it in ``skipped``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from spinestream.shards.sample import decode_jpeg
from spinestream.shards.wds import RecordReader, SampleError

from .augment import augment, mixup, normalize
from .base import Batch, Loader, exclude_from_mixup, per_rank, rank_order, rank_part, report_bad_samples
from .config import LoaderConfig, torch_dtype
from .labels import DeviceLabels
from .params import batch_rng, draw_mixup, draw_params, sample_key, sample_uniforms
from .selection import Selection



class _Records(Dataset):
    """Sample i -> (JPEG bytes or decoded uint8 (3, H, W), slice_id, None), or for a corrupt sample
    (a blank image or no bytes, slice_id, the :class:`SampleError`)."""

    def __init__(self, reader: RecordReader, decode: bool, size: int):
        self.reader, self.decode, self.size = reader, decode, size

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int):
        sid = int(self.reader.rec["slice_id"][i])
        try:
            data = self.reader.read(i)
            if not self.decode:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), sid, None
            try:  # Pillow (libjpeg-turbo): the same decoder the shard writer's tests use
                arr = decode_jpeg(data)
            except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
                raise SampleError(self.reader.tars[int(self.reader.rec["shard"][i])], sid,
                                  f"does not decode as JPEG ({type(e).__name__}: "
                                  f"{(str(e).splitlines() or [''])[0]})") from None
            if arr.shape != (self.size, self.size, 3):
                raise SampleError(self.reader.tars[int(self.reader.rec["shard"][i])], sid,
                                  f"decodes to {arr.shape}, not the shard's ({self.size}, {self.size}, 3)")
            return torch.from_numpy(arr).permute(2, 0, 1), sid, None  # (3, H, W) uint8
        except SampleError as e:
            blank = torch.zeros((3, self.size, self.size) if self.decode else (0,), dtype=torch.uint8)
            return blank, sid, e


def gpu_decode_default(cfg: LoaderConfig, device: torch.device) -> bool:
    """Whether the torch backend decodes on the GPU: ``torch_decode`` resolved for this device."""
    if cfg.torch_decode != "auto":
        return cfg.torch_decode == "gpu"
    from spinestream.engine.device import has_hw_jpeg_decoder

    return device.type == "cuda" and has_hw_jpeg_decoder(device)


def _gpu_decode(raw: list[torch.Tensor], dev: torch.device, size: int, errors: list, where) -> torch.Tensor:
    """Batch-decode JPEG bytes with nvJPEG through torchvision -> (B, 3, H, W) uint8 on ``dev``.

    Rows whose ``errors`` entry is set (read failures) stay blank; when the batch decode fails, each image
    is decoded alone and those that fail get an error (``where(k)``: the row's shard and slice_id)."""
    import warnings

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        good = [k for k, e in enumerate(errors) if e is None]
        out = torch.zeros((len(raw), 3, size, size), dtype=torch.uint8, device=dev)
        try:
            imgs = decode_jpeg([raw[k] for k in good], mode=ImageReadMode.RGB, device=dev) if good else []
        except RuntimeError:
            imgs = []
            for k in list(good):
                try:
                    imgs.append(decode_jpeg(raw[k], mode=ImageReadMode.RGB, device=dev))
                except RuntimeError as e:
                    errors[k] = SampleError(*where(k), f"does not decode as JPEG ({(str(e).splitlines() or [''])[0]})")
                    good.remove(k)
        for k, img in zip(good, imgs):
            if tuple(img.shape) != (3, size, size):
                errors[k] = SampleError(*where(k), f"decodes to {tuple(img.shape)}, not the shard's (3, {size}, {size})")
            else:
                out[k] = img
        return out


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
    imgs, ids, errors = zip(*items)
    ids = torch.tensor(ids, dtype=torch.int64)
    if imgs[0].ndim == 1:  # raw bytes, decoded on the GPU in the main process
        return list(imgs), ids, list(errors)
    return torch.stack(imgs), ids, list(errors)


class TorchLoader(Loader):
    backend = "torch"

    def __init__(self, sel: Selection, labels: DeviceLabels, cfg: LoaderConfig, *, device="cpu", rank: int = 0,
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
        self.gpu_decode = gpu_decode_default(cfg, self.device)
        self.dataset = _Records(RecordReader(sel.tars, self.rec, verify=cfg.verify_samples),
                                decode=not self.gpu_decode, size=sel.image_size)
        self.aug = cfg.augment if train else cfg.augment.off()
        self.epoch, self.position = 0, 0
        self.skipped, self.skipped_samples = 0, []

    def __len__(self) -> int:
        return -(-self.positions // self.cfg.batch_size)

    def __iter__(self):
        cfg, dev = self.cfg, self.device
        order = rank_order(self.n, cfg.seed, self.epoch, self.rank, self.world, shuffle=self.train)
        workers = cfg.num_threads
        # its own generator: a DataLoader iterator otherwise draws its workers' base seed from torch's global RNG,
        # so a mid-epoch resume (a second iterator in the epoch) would shift the dropout masks that follow
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, self.epoch, self.rank])
                                                .generate_state(1, np.uint64)[0] >> 1))
        dl = DataLoader(self.dataset, batch_sampler=_EpochBatches(order, self.position, cfg.batch_size),
                        num_workers=workers, collate_fn=_collate, pin_memory=dev.type == "cuda",
                        prefetch_factor=cfg.prefetch if workers > 0 else None, persistent_workers=False,
                        generator=gen)
        dtype = torch_dtype(cfg.dtype)
        key = sample_key(cfg.seed, self.epoch, self.rank)
        for imgs, ids, errors in dl:
            n = len(ids)
            if isinstance(imgs, list):
                rec = self.dataset.reader.rec
                rows = order[self.position:self.position + n]
                imgs = _gpu_decode(imgs, dev, self.sel.image_size, errors,
                                   lambda k: (self.sel.tars[int(rec["shard"][rows[k]])], int(ids[k])))
            else:
                imgs = imgs.to(dev, non_blocking=True)
            n_pos = max(0, min(n, self.samples - self.position))  # real samples by position (then padding)
            bad = report_bad_samples(self, errors, n_pos)  # raises under bad_samples=error
            x = augment(imgs, self.aug, cfg.image_size, draw_params(self.aug, sample_uniforms(key, self.position, n)))
            x = normalize(x, cfg.mean, cfg.std, dtype, cfg.channels_last)
            ids = ids.to(dev, non_blocking=True)
            y = self.labels[ids]
            if self.train:
                mix = draw_mixup(self.aug, n, n_pos, batch_rng(cfg.seed, self.epoch, self.rank, self.position))
                x, y = mixup(x, y, exclude_from_mixup(mix, bad))
            valid = (self.position + torch.arange(n, device=dev)) < self.samples
            if bad:
                valid[torch.as_tensor(bad, device=dev)] = False
            self.position += n
            yield Batch(images=x, targets=y, slice_ids=ids, valid=valid, n_valid=n_pos - sum(k < n_pos for k in bad))
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict:
        return self._state()

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state)
        self._seek(state)
