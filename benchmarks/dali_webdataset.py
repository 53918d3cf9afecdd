"""The legacy DALI pipeline (``loader.dali_reader: webdataset``), kept only so ``bench loader``
can show it next to the index reader on the same shards: it lives here, not in engine/, and
training refuses it (:func:`spinestream.engine.loader.build_loader`). **It does not mix across shards**:
``fn.readers.webdataset`` walks the shard list in order and shuffles only inside its
``initial_fill`` buffer, so a selection listed cohort by cohort streams cohort by cohort
(measured: boxed share per quarter [1.00, 1.00, 0.46, 0.00]), and with ``world > 1`` each rank
keeps a contiguous run of shards every epoch. It does not give the guarantee of
engine/loader/base.py; the default reader (engine/loader/dali_backend.py) does.

What it is: ``fn.readers.webdataset`` over the selected shards and their ``.idx``
files → ``fn.decoders.image`` (nvJPEG with ``device="mixed"`` on a GPU) → the reference
augmentations as DALI operators, each applied per sample with its own probability (DALI
conditionals) → normalised NCHW tensors in PyTorch via ``DALIGenericIterator``.

The same pipeline runs on the CPU with ``device_id=None`` (DALI's CPU-only mode), which
is how CI tests it. Targets are looked up on the device from the label table by the
``slice_id`` each sample carries; mixup runs on the batch in torch.

Epochs: the reader is split between ranks with ``shard_id``/``num_shards`` (each rank keeps
its part, ``stick_to_shard``), shuffles within ``initial_fill`` samples, pads with ``pad_last_batch`` and the iterator
knows the epoch size through ``reader_name``; padding positions come out with
``valid == False``. Each epoch is its own pipeline seeded by (seed, epoch, rank), so an
epoch's order is reproducible on its own. Mid-epoch resume uses DALI checkpointing
(reader positions and every random generator, stored in :meth:`state_dict`); DALI 2.4
cannot checkpoint ``fn.clahe``, so with CLAHE on the resumed epoch's pipeline is rebuilt
and replayed up to the saved position instead (same samples, same augmentations).
"""
from __future__ import annotations

import math

import torch

from spinestream.engine.loader.config import AugmentConfig, LoaderConfig
from spinestream.engine.loader.dali_backend import DaliLoader, hw_decoder_load
from spinestream.engine.loader.selection import Selection


def checkpointable(aug: AugmentConfig) -> bool:
    """DALI 2.4 cannot checkpoint ``fn.clahe``; without it the whole pipeline can be checkpointed."""
    return aug.p_clahe == 0


def _build_pipeline(sel: Selection, cfg: LoaderConfig, aug: AugmentConfig, *, device_id: int | None, rank: int,
                    world: int, train: bool, epoch: int, checkpoint: str | None):
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    gpu = device_id is not None
    size = cfg.image_size
    out_dtype = {"float32": types.FLOAT, "float16": types.FLOAT16, "bfloat16": types.FLOAT}[cfg.dtype]

    def coin(p: float):
        return fn.random.coin_flip(probability=p, dtype=types.BOOL)

    # one pipeline per epoch, seeded by (seed, epoch, rank): each epoch's order is reproducible on its own
    seed = (cfg.seed * 1_000_003 + epoch * 7919 + rank) % (2**31 - 1)

    @pipeline_def(enable_conditionals=True, enable_checkpointing=checkpointable(aug))
    def pipe():
        jpg, sid = fn.readers.webdataset(
            paths=sel.tars, index_paths=sel.indexes, ext=["jpg", "id"], dtypes=[types.UINT8, types.INT64],
            missing_component_behavior="error", random_shuffle=train, initial_fill=cfg.initial_fill,
            seed=seed, shard_id=rank, num_shards=world, stick_to_shard=True, pad_last_batch=True,
            name="Reader")
        # the index reader's decoder settings, so the benchmark compares readers, not decoders
        img = (fn.decoders.image(jpg, device="mixed", output_type=types.RGB,
                                 hw_decoder_load=hw_decoder_load(cfg, torch.device("cuda", device_id)))
               if gpu else fn.decoders.image(jpg, device="cpu", output_type=types.RGB))

        # geometry: random resized crop (a relative ROI of the one resize), flips, rotation
        if aug.p_crop > 0:
            area = fn.random.uniform(range=list(aug.crop_scale))
            ratio = dmath.exp(fn.random.uniform(range=[math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])]))
            do = fn.cast(fn.random.coin_flip(probability=aug.p_crop), dtype=types.FLOAT)
            w = do * dmath.min(dmath.sqrt(area * ratio), 1.0) + (1.0 - do)  # full image when not cropping
            h = do * dmath.min(dmath.sqrt(area / ratio), 1.0) + (1.0 - do)
            x0 = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - w)
            y0 = fn.random.uniform(range=[0.0, 1.0]) * (1.0 - h)
            img = fn.resize(img, size=[size, size], roi_start=fn.stack(y0, x0), roi_end=fn.stack(y0 + h, x0 + w),
                            roi_relative=True, antialias=False)
        elif sel.image_size != size:
            img = fn.resize(img, size=[size, size], antialias=False)
        if aug.p_vflip > 0:
            img = fn.flip(img, horizontal=0, vertical=fn.random.coin_flip(probability=aug.p_vflip))
        # the expensive operators run only on the samples drawn for them (DALI conditionals)
        if aug.p_rotate > 0 and coin(aug.p_rotate):
            img = fn.rotate(img, angle=fn.random.uniform(range=[-aug.max_angle, aug.max_angle]), keep_size=True,
                            fill_value=0, interp_type=types.INTERP_LINEAR)
        # CLAHE on luminance (what albumentations did; the only 3-channel mode of DALI's GPU CLAHE)
        if aug.p_clahe > 0 and coin(aug.p_clahe):
            img = fn.clahe(img, tiles_x=aug.clahe_tiles, tiles_y=aug.clahe_tiles, clip_limit=aug.clahe_clip,
                           luma_only=True)
        # brightness/contrast on every sample, neutral where not drawn: out = in * contrast + shift * 255,
        # saturated to uint8 (cheaper than a conditional for a per-pixel affine map)
        if aug.p_brightness_contrast > 0:
            do = fn.cast(fn.random.coin_flip(probability=aug.p_brightness_contrast), dtype=types.FLOAT)
            img = fn.brightness_contrast(
                img, contrast_center=0.0,
                contrast=1.0 + do * fn.random.uniform(range=[-aug.contrast_limit, aug.contrast_limit]),
                brightness_shift=do * fn.random.uniform(range=[-aug.brightness_limit, aug.brightness_limit]))
        # per-channel shift, horizontal flip and normalisation in one pass: the shift moves the mean
        mean = types.Constant([m * 255 for m in cfg.mean], dtype=types.FLOAT)
        if aug.p_shift > 0:
            do = fn.cast(fn.random.coin_flip(probability=aug.p_shift), dtype=types.FLOAT)
            mean = mean - do * fn.random.uniform(range=[-aug.shift_limit * 255, aug.shift_limit * 255], shape=[3])
        x = fn.crop_mirror_normalize(img, dtype=out_dtype, output_layout="HWC" if cfg.channels_last else "CHW",
                                     mean=mean,
                                     std=[s * 255 for s in cfg.std],
                                     mirror=fn.random.coin_flip(probability=aug.p_hflip) if aug.p_hflip > 0 else 0)
        return x, sid

    kw = {"checkpoint": checkpoint} if checkpoint else {}
    p = pipe(batch_size=cfg.batch_size, num_threads=max(1, cfg.num_threads), device_id=device_id,
             prefetch_queue_depth=cfg.prefetch, seed=seed, exec_dynamic=True, **kw)
    p.build()
    return p


class DaliWebdatasetLoader(DaliLoader):
    """The legacy reader behind the DALI loader's interface (see the module docstring: no cross-shard mix)."""

    reader = "webdataset"

    def _setup(self) -> None:
        self._checkpoint = None

    def _iterator(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        p = _build_pipeline(self.sel, self.cfg, self.aug, device_id=device_id, rank=self.rank, world=self.world,
                            train=self.train, epoch=self.epoch, checkpoint=self._checkpoint)
        it = DALIGenericIterator([p], ["images", "slice_ids"], reader_name="Reader",
                                 last_batch_policy=LastBatchPolicy.FILL, auto_reset=False)
        if self.position and not self._checkpoint:
            # no DALI checkpoint (CLAHE on): replay this epoch's pipeline up to the saved position
            done = 0
            while done < self.position:
                done += len(next(it)[0]["slice_ids"])
            if done != self.position:
                raise RuntimeError(f"cannot resume at position {self.position}: it is not a batch boundary "
                                   f"(batch_size {self.cfg.batch_size})")
        self._checkpoint = None
        return it

    def state_dict(self) -> dict:
        cp = None
        if checkpointable(self.aug):
            cp = self._it.checkpoints()[0] if self._it is not None else self._checkpoint
        return {**super().state_dict(), "dali_checkpoint": cp}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._checkpoint = state.get("dali_checkpoint")
