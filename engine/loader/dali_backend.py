"""The DALI backend: JPEG bytes read by ``.idx`` offset in one global permutation per epoch
→ ``fn.decoders.image`` (nvJPEG with ``device="mixed"`` on a GPU) → the reference
augmentations as DALI operators, each applied per sample as the host-drawn parameters say
(DALI conditionals for the expensive ones) → normalised batches in PyTorch through
``DALIGenericIterator``.

Reading: a batch-mode ``fn.external_source`` whose callable maps the batch number to this
rank's positions (:func:`spinestream.engine.loader.base.rank_order`: its part of the epoch's global
permutation), ``os.pread``s the JPEG bytes (:class:`spinestream.shards.wds.RecordReader`) and
draws the batch's augmentation parameters (:mod:`spinestream.engine.loader.params`, seeded by seed, epoch,
rank and position). The callable is deterministic given the batch number; the pipeline holds no
random state of its own. So an epoch is a global shuffle on every rank (the guarantee in
engine/loader/base.py), a mid-epoch resume is a seek (the pipeline starts at the saved
position: no DALI checkpoint, no replay, CLAHE included), and the valid count and the
padding come from positions on the host. The callable runs in the training process when
DALI schedules a batch (``prefetch`` batches ahead): a few dozen ``pread``s and one vectorised
draw per batch, ~0.4 ms per batch of 32 on this project's 2-core VM (~6% of a core at
5,000 images/s); the decoding and augmenting run in DALI's threads / on the GPU.

GPU outputs and syncs: with a GPU the slice ids are a GPU output of the pipeline, so the label
lookup (``labels[ids]``) runs on the device with no host-to-device copy in torch; the batch
needs no host sync. channels_last comes for free: the pipeline writes HWC and the NCHW
tensor is a permuted view (channels_last strides), not a second copy.

CLAHE: on the CPU, DALI's ``fn.clahe`` is OpenCV's (engine/loader/clahe.py matches it bit for
bit). DALI's GPU ``fn.clahe`` is a different implementation (float Lab, no reflect padding);
its difference from the CPU operator is unmeasured until a GPU run.

Corrupt samples: the source checks each JPEG's CRC-32 as it reads it (``loader.verify_samples``); a
sample that fails is replaced by a blank JPEG of the shard's size (DALI never decodes the garbage)
and remembered by position, so the batch it lands in raises the one-line SampleError naming the
shard and the sample (``bad_samples: error``) or carries it as an invalid row (``skip``; see
engine/loader/base.py). A JPEG that passes its CRC but does not decode (a shard set without
``.sums``) still fails inside DALI, with DALI's message.

The same pipeline runs on the CPU with ``device_id=None`` (DALI's CPU-only mode), which is
how CI tests it. The legacy ``fn.readers.webdataset`` reader, which does not mix across shards,
lives in benchmarks/dali_webdataset.py (``bench loader``'s before line), outside engine/.
"""
from __future__ import annotations

import numpy as np
import torch

from spinestream.shards.sample import encode_jpeg
from spinestream.shards.wds import RecordReader, SampleError

from .augment import mixup
from .base import Batch, Loader, exclude_from_mixup, per_rank, rank_order, rank_part, report_bad_samples
from .config import AugmentConfig, LoaderConfig, torch_dtype
from .labels import DeviceLabels
from .params import batch_rng, draw_mixup, draw_params, sample_key, sample_uniforms
from .selection import Selection

# the columns of the packed parameter output (float32 (B, 14)): name -> column slice
_COLS = {"roi_start": slice(0, 2), "roi_end": slice(2, 4), "vflip": slice(4, 5), "rotate": slice(5, 6),
         "angle": slice(6, 7), "clahe": slice(7, 8), "contrast": slice(8, 9), "brightness": slice(9, 10),
         "mean": slice(10, 13), "mirror": slice(13, 14)}


def pack_params(p, mean: np.ndarray) -> np.ndarray:
    """A batch's :class:`AugParams` as the (B, 14) float32 array the pipeline slices (one external-source
    output instead of ten: feeding costs per output per batch, in the training thread)."""
    x0, y0, w, h = p.roi.T
    return np.concatenate([
        np.stack([y0, x0, y0 + h, x0 + w], 1),  # roi start, end: HW order, relative
        np.stack([p.vflip, p.rotate, p.angle, p.clahe, p.contrast, p.brightness], 1),
        mean[None] - p.shift * 255,  # the per-channel shift folded into the normalisation's mean
        p.hflip[:, None]], axis=1).astype(np.float32)


class IndexSource:
    """Batch ``i`` of this rank's epoch, from position ``start`` on, as three DALI external-source outputs:
    the JPEG bytes, the slice ids and every augmentation parameter (:func:`pack_params`).

    Stateless given the batch number (DALI may call it ahead, and past the end, where it raises
    StopIteration every time). The last batch may be short (DALI allows a smaller batch)."""

    def __init__(self, reader: RecordReader, order: np.ndarray, start: int, batch_size: int, aug: AugmentConfig,
                 cfg: LoaderConfig, *, epoch: int, rank: int, image_size: int = 0):
        self.reader, self.order, self.start, self.bs, self.aug = reader, order, start, batch_size, aug
        self.slice_id = reader.rec["slice_id"]
        self.key = sample_key(cfg.seed, epoch, rank)
        self.mean = np.asarray(cfg.mean, np.float32) * 255
        self.image_size = image_size
        self._blank: np.ndarray | None = None
        self.bad: dict[int, SampleError] = {}  # epoch position -> why its sample was replaced by a blank

    def _read(self, i: int, position: int) -> np.ndarray:
        try:
            return np.frombuffer(self.reader.read(i), np.uint8)
        except SampleError as e:
            self.bad[position] = e
            if self._blank is None:  # a JPEG DALI decodes to the shard's size: the row is invalid anyway
                size = self.image_size or 16
                self._blank = np.frombuffer(encode_jpeg(np.zeros((size, size, 3), np.uint8)), np.uint8)
            return self._blank

    def __call__(self, info) -> tuple:
        s = self.start + info.iteration * self.bs
        if s >= len(self.order):
            raise StopIteration
        idx = self.order[s:s + self.bs]
        p = draw_params(self.aug, sample_uniforms(self.key, s, len(idx)))
        return ([self._read(i, s + j) for j, i in enumerate(idx)], self.slice_id[idx].astype(np.int64),
                pack_params(p, self.mean))


def hw_decoder_load(cfg: LoaderConfig, device: torch.device) -> float:
    """The share of images for nvJPEG's hardware decoder: 0.65 where the card has one, else 0."""
    if cfg.hw_decoder_load != "auto":
        return float(cfg.hw_decoder_load)
    from spinestream.engine.device import has_hw_jpeg_decoder

    return 0.65 if has_hw_jpeg_decoder(device) else 0.0


def _build_pipeline(source: IndexSource, sel: Selection, cfg: LoaderConfig, aug: AugmentConfig, *,
                    device: torch.device):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device.type == "cuda"
    size = cfg.image_size
    out_dtype = types.FLOAT16 if cfg.dtype == "float16" else types.FLOAT  # DALI has no bfloat16: cast in torch

    @pipeline_def(enable_conditionals=True)
    def pipe():
        jpg, sid, params = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                              dtype=[types.UINT8, types.INT64, types.FLOAT], ndim=[1, 0, 1])

        def col(name, dtype=None):  # a per-sample argument input from its column(s) (CPU ops, tiny)
            c = _COLS[name]
            v = params[c.start:c.stop] if c.stop - c.start > 1 else params[c.start]
            return fn.cast(v, dtype=dtype) if dtype is not None else v

        if gpu:
            img = fn.decoders.image(jpg, device="mixed", output_type=types.RGB,
                                    hw_decoder_load=hw_decoder_load(cfg, device))
            sid = sid.gpu()  # the label lookup runs on the device: no host-to-device copy in torch
        else:
            img = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
        # geometry: random resized crop (a relative ROI of the one resize), flips, rotation
        if aug.p_crop > 0:
            img = fn.resize(img, size=[size, size], roi_start=col("roi_start"), roi_end=col("roi_end"),
                            roi_relative=True, antialias=False)
        elif sel.image_size != size:
            img = fn.resize(img, size=[size, size], antialias=False)
        if aug.p_vflip > 0:
            img = fn.flip(img, horizontal=0, vertical=col("vflip", types.INT32))
        # the expensive operators run only on the samples drawn for them (DALI conditionals)
        if aug.p_rotate > 0 and col("rotate", types.BOOL):
            img = fn.rotate(img, angle=col("angle"), keep_size=True, fill_value=0, interp_type=types.INTERP_LINEAR)
        # CLAHE on luminance (what albumentations did; the only 3-channel mode of DALI's GPU CLAHE)
        if aug.p_clahe > 0 and col("clahe", types.BOOL):
            img = fn.clahe(img, tiles_x=aug.clahe_tiles, tiles_y=aug.clahe_tiles, clip_limit=aug.clahe_clip,
                           luma_only=True)
        # brightness/contrast on every sample, neutral where not drawn: out = in * contrast + shift * 255,
        # saturated to uint8 (cheaper than a conditional for a per-pixel affine map)
        if aug.p_brightness_contrast > 0:
            img = fn.brightness_contrast(img, contrast_center=0.0, contrast=col("contrast"),
                                         brightness_shift=col("brightness"))
        # per-channel shift (in the mean), horizontal flip and normalisation in one pass; HWC for channels_last
        x = fn.crop_mirror_normalize(img, dtype=out_dtype, output_layout="HWC" if cfg.channels_last else "CHW",
                                     mean=col("mean"), std=[s * 255 for s in cfg.std],
                                     mirror=col("mirror", types.INT32) if aug.p_hflip > 0 else 0)
        return x, sid

    p = pipe(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_threads),
             device_id=(device.index or 0) if gpu else None, prefetch_queue_depth=cfg.prefetch, seed=cfg.seed,
             exec_dynamic=True)
    p.build()
    return p


class DaliLoader(Loader):
    backend = "dali"
    reader = "index"

    def __init__(self, sel: Selection, labels: DeviceLabels, cfg: LoaderConfig, *, device="cpu", rank: int = 0,
                 world: int = 1, train: bool = True, state: dict | None = None):
        self.sel, self.cfg, self.device = sel, cfg, torch.device(device)
        self.rank, self.world, self.train = rank, world, train
        labels.check_covers(sel)
        self.labels = labels.to(self.device)
        self.n = sel.samples
        start, end = rank_part(self.n, rank, world)
        self.samples = end - start
        self.positions = per_rank(self.n, world)
        self.padded = self.positions - self.samples
        self.aug = cfg.augment if train else cfg.augment.off()
        self.epoch, self.position = 0, 0
        self.skipped, self.skipped_samples = 0, []
        self._it = None
        self._source: IndexSource | None = None
        self._setup()
        if state:
            self.load_state_dict(state)

    def _setup(self) -> None:
        self.records = RecordReader(self.sel.tars, self.sel.records(), verify=self.cfg.verify_samples)
        assert len(self.records) == self.n, "the manifest's sample counts and the .idx files agree (records())"

    def _iterator(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        order = rank_order(self.n, self.cfg.seed, self.epoch, self.rank, self.world, shuffle=self.train)
        source = self._source = IndexSource(self.records, order, self.position, self.cfg.batch_size, self.aug,
                                            self.cfg, epoch=self.epoch, rank=self.rank,
                                            image_size=self.sel.image_size)
        p = _build_pipeline(source, self.sel, self.cfg, self.aug, device=self.device)
        # no reader: the epoch ends when the source raises StopIteration
        return DALIGenericIterator([p], ["images", "slice_ids"], auto_reset=False)

    def __len__(self) -> int:
        return -(-self.positions // self.cfg.batch_size)

    def __iter__(self):
        if self._it is None:
            self._it = self._iterator()
        while self.position < self.positions:
            try:
                out = next(self._it)[0]
            except StopIteration:
                break
            yield self._batch(out["images"], out["slice_ids"].reshape(-1))
        if self.position < self.positions:
            raise RuntimeError(f"DALI ended the epoch after {self.position} of {self.positions} positions")
        self._it = None
        self.epoch += 1
        self.position = 0

    def _batch(self, x: torch.Tensor, ids: torch.Tensor) -> Batch:
        """DALI's output -> a Batch: labels looked up on the device, mixup, the valid mask from positions."""
        cfg, dev = self.cfg, self.device
        x, ids = x.to(dev, non_blocking=True), ids.to(dev, non_blocking=True)  # no-ops where DALI wrote them
        n = min(len(ids), self.positions - self.position)  # the legacy reader pads the last batch
        x, ids = x[:n], ids[:n]
        if cfg.channels_last:  # both pipelines write HWC then
            x = x.permute(0, 3, 1, 2)  # (B, H, W, 3) -> an NCHW view with channels_last strides, no copy
        dtype = torch_dtype(cfg.dtype)
        if x.dtype != dtype:
            x = x.to(dtype)  # bfloat16 (DALI has none); keeps the strides
        y = self.labels[ids]
        n_valid = max(0, min(n, self.samples - self.position))
        pending = self._source.bad if self._source is not None else {}
        bad = report_bad_samples(self, [pending.pop(self.position + k, None) for k in range(n)], n_valid)
        if self.train and self.aug.p_mixup > 0:
            mix = draw_mixup(self.aug, n, n_valid, batch_rng(cfg.seed, self.epoch, self.rank, self.position))
            x, y = mixup(x, y, exclude_from_mixup(mix, bad))
        valid = (self.position + torch.arange(n, device=dev)) < self.samples
        if bad:
            valid[torch.as_tensor(bad, device=dev)] = False
        self.position += n
        return Batch(images=x, targets=y, slice_ids=ids, valid=valid, n_valid=n_valid - sum(k < n_valid for k in bad))

    def state_dict(self) -> dict:
        return self._state(reader=self.reader)

    def load_state_dict(self, state: dict) -> None:
        self._check_state(state)
        if state.get("reader", "webdataset") != self.reader:
            raise ValueError(f"loader state was written by DALI's {state.get('reader', 'webdataset')!r} reader; "
                             f"its position means nothing to the {self.reader!r} one "
                             f"(resume with loader.dali_reader={state.get('reader', 'webdataset')})")
        self._seek(state)
        self._it = None
