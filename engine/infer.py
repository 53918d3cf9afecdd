"""Study inference: a model over whole studies, inputs built on the device.

Validation, ``evaluate``, ``pseudo-label`` and ``predict`` all run a model over every slice of
a study. Each study's uint8 volume is read once from the Zarr store and moved to the device
as uint8 (~90 MB for 350 slices at 512 px); there the 2.5D neighbours are gathered by index,
the batch is resized and normalised exactly as the training loader does with augmentation
off, and the model runs in the run's precision::

    from spinestream.engine.infer import predict_studies, score_studies
    probs = predict_studies(model, "shards-512", uids, image_size=384, mean=dc["mean"], std=dc["std"],
                            batch_size=64, device=dev, precision="bf16")   # {uid: (n_slices, 8) float32}
    result = score_studies(probs, studies_df, rule="max")

Equal to training (tests/test_infer.py): a sample's channels are those of
``spinestream.shards.sample.sample_image`` (``neighbours``: the slices ``[above, self, below]`` of
``spinestream.shards.sample.neighbour_index``; ``windows``: the slice's three windows), resized with
bilinear interpolation, ``align_corners=False`` and no antialiasing (``spinestream.engine.loader.augment.geometry``
with augmentation off) and normalised with ``spinestream.engine.loader.augment.normalize``. The shards hold
JPEG and the volumes are lossless, so inference inputs equal the loader's up to JPEG error.

Fixed batch shapes: every batch has ``batch_size`` rows; the last one of a study is padded by
repeating its last slice index and the padded rows are dropped. With the image size fixed too,
``cudnn.benchmark`` tunes once and never again (a ragged last batch per study would re-tune on
every new length).

Overlap: a background thread reads (and decompresses) the next study while the current one
runs; the queue holds at most ``prefetch`` studies, so memory stays bounded on long runs.

Non-finite probabilities (one policy, :func:`describe_nonfinite`): a study whose slice probabilities are
not all finite means a broken model (a diverged or damaged checkpoint), never data to score or learn
from. :func:`predict_run` -- the path of validation, ``evaluate`` and ``pseudo-label`` -- raises
:class:`NonFiniteProbabilities` (a ValueError) naming the studies (:func:`check_finite`), so nothing is
scored and no pseudo-label is written from NaN. ``predict`` alone goes on, because a competition
submission must be written: such a study gets the training prevalence, with a warning naming it.
"""
from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from spinestream import InputError, SpinestreamError
from spinestream.shards.layout import ROW_TYPES, TARGETS, Layout
from spinestream.shards.manifest import ImageSpec, read_manifest
from spinestream.shards.sample import CHANNEL_MODES, neighbour_index
from spinestream.shards.volumes import VolumeAttrs, open_volume

from . import dist
from .device import autocast
from .loader.augment import normalize
from .metrics import classification_report, score_submission, solution_from_train, study_probabilities, \
    submission_frame

__all__ = ["NonFiniteProbabilities", "StudyVolume", "build_inputs", "check_finite", "describe_nonfinite", "inputs",
           "predict_run", "predict_studies", "predict_volumes", "read_study", "score_studies"]


class NonFiniteProbabilities(SpinestreamError, ValueError):
    """The model gave NaN/inf probabilities on some studies (named in the message)."""


def describe_nonfinite(probs: np.ndarray) -> str | None:
    """None when one study's ``(n_slices, 8)`` probabilities are all finite, else what is wrong with them
    (``"3 of 36 slices have non-finite probabilities (first: slice 4, C2)"``): the one test of the policy
    in the module doc, shared by :func:`check_finite` and ``predict``'s prevalence fallback."""
    p = np.asarray(probs)
    bad = ~np.isfinite(p)
    if not bad.any():
        return None
    rows = bad.reshape(len(p), -1).any(axis=1)
    i, j = np.argwhere(bad.reshape(len(p), -1))[0]
    col = TARGETS[j] if p.ndim == 2 and p.shape[1] == len(TARGETS) else f"column {j}"
    return (f"{int(rows.sum())} of {len(p)} slices have non-finite probabilities (first: slice {i}, {col} = "
            f"{p.reshape(len(p), -1)[i, j]})")


def check_finite(probs: Mapping[str, np.ndarray], what: str, *, show: int = 5) -> None:
    """Raise :class:`NonFiniteProbabilities` naming the studies (``show`` of them) whose probabilities are not
    all finite: the model is broken, so ``what`` (validation, evaluate, pseudo-label) must not go on."""
    bad = [(u, d) for u, p in probs.items() if (d := describe_nonfinite(p)) is not None]
    if bad:
        more = f"; and {len(bad) - show} more" if len(bad) > show else ""
        raise NonFiniteProbabilities(
            f"{what}: the model gave non-finite probabilities on {len(bad)} of {len(probs)} studies: "
            + "; ".join(f"study {u}: {d}" for u, d in bad[:show]) + more
            + " -- the checkpoint is broken (diverged or damaged weights); use another one (--checkpoint)")


@dataclass
class StudyVolume:
    """One study as read from the store: the uint8 volume and how to build its samples."""

    uid: str
    volume: np.ndarray  # (Z, H, W) neighbours | (Z, H, W, 3) windows, uint8, head to feet
    nbr: np.ndarray | None  # (Z, 3) int64 [above, self, below] (neighbours mode), else None
    channels: str
    slice_id_offset: int
    pinned: torch.Tensor | None = None  # the volume in page-locked memory (CUDA), made by the reader thread

    @property
    def n_slices(self) -> int:
        return int(self.volume.shape[0])


def image_spec(root: str | Path) -> ImageSpec:
    """The manifest's image spec (``channels``, ``offset_mm``, ``size``), checked."""
    img = read_manifest(root).image
    if img.channels not in CHANNEL_MODES:
        raise InputError(f"{root}/manifest.json: image.channels={img.channels!r} is not one of {CHANNEL_MODES}")
    return img


def read_study(root: str | Path, uid: str, spec: ImageSpec | None = None) -> StudyVolume:
    """Read one study's whole volume (one decompression pass) and its neighbour index."""
    spec = spec or image_spec(root)
    vol = open_volume(Layout(Path(root)).volumes, uid)
    arr = np.ascontiguousarray(vol[...])
    attrs = VolumeAttrs.from_json(vol.attrs, f"{root}: volume {uid}")
    if attrs.slice_id_offset is None:
        raise InputError(f"{root}: volume {uid} has no slice_id_offset (the shard job did not finish it; rerun it)")
    nbr = neighbour_index(np.asarray(attrs.z), spec.offset_mm) if spec.channels == "neighbours" else None
    return StudyVolume(uid, arr, nbr, spec.channels, int(attrs.slice_id_offset))


def _gather(vol: torch.Tensor, nbr: torch.Tensor | None, idx: torch.Tensor, channels: str) -> torch.Tensor:
    """uint8 ``(b, 3, H, W)`` samples ``idx`` of a device volume: ``sample_image`` on a batch."""
    if channels == "neighbours":
        return vol[nbr[idx]]  # (b, 3) indices -> (b, 3, H, W): channel k is the slice nbr[i, k]
    if channels == "windows":
        return vol[idx].permute(0, 3, 1, 2)  # (b, H, W, 3) -> (b, 3, H, W)
    raise ValueError(f"unknown channel mode {channels!r} (expected one of {CHANNEL_MODES})")


def build_inputs(vol: torch.Tensor, nbr: torch.Tensor | None, idx: torch.Tensor, channels: str, *, image_size: int,
                 mean, std, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """Normalised ``(b, 3, S, S)`` inputs of slices ``idx``, built where ``vol`` is (the loader's recipe)."""
    x = _gather(vol, nbr, idx, channels).float()
    if x.shape[-2:] != (image_size, image_size):
        # no antialiasing: exactly what both training loaders do with augmentation off
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return normalize(x, mean, std, dtype, channels_last)


def inputs(root: str | Path, uid: str, *, image_size: int, mean, std, device="cpu",
           dtype: torch.dtype = torch.float32, channels_last: bool = False,
           indices: Sequence[int] | None = None) -> torch.Tensor:
    """The model inputs of one study (all slices, or ``indices``), as :func:`predict_studies` builds them."""
    sv = read_study(root, uid)
    dev = torch.device(device)
    vol, nbr = _to_device(sv, dev)
    idx = torch.arange(sv.n_slices, device=dev) if indices is None else torch.as_tensor(indices, device=dev)
    return build_inputs(vol, nbr, idx, sv.channels, image_size=image_size, mean=mean, std=std, dtype=dtype,
                        channels_last=channels_last)


def _to_device(sv: StudyVolume, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    vol = sv.pinned if sv.pinned is not None else torch.from_numpy(sv.volume)
    vol = vol.to(dev, non_blocking=True)  # asynchronous from pinned memory
    nbr = torch.from_numpy(sv.nbr).to(dev) if sv.nbr is not None else None
    return vol, nbr


def _read_ahead(root: Path, uids: Sequence[str], prefetch: int, pin: bool = False) -> Iterator[StudyVolume]:
    """Yield studies in order, read by a background thread at most ``prefetch`` studies ahead.

    Zarr's Blosc decompression releases the GIL, so reading overlaps the model on the main
    thread; with ``pin`` the thread also copies each volume to page-locked memory, so the
    main thread's host-to-device copy is asynchronous. A read error is re-raised here, in the
    consumer; stopping early stops the thread.
    """
    spec = image_spec(root)
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():  # a consumer that stopped early never takes the item: give up then
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for uid in uids:
                item = read_study(root, uid, spec)
                if pin:
                    item.pinned = torch.from_numpy(item.volume).pin_memory()
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    t = threading.Thread(target=work, name="spinestream-study-reader", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


@torch.no_grad()
def _study_probs(model, sv: StudyVolume, dev: torch.device, *, image_size: int, mean, std, batch_size: int,
                 precision: str, tta: bool, channels_last: bool) -> np.ndarray:
    vol, nbr = _to_device(sv, dev)
    n, out = sv.n_slices, []
    for s in range(0, n, batch_size):
        idx = torch.arange(s, s + batch_size, device=dev).clamp_(max=n - 1)  # padded: the last slice repeats
        x = build_inputs(vol, nbr, idx, sv.channels, image_size=image_size, mean=mean, std=std,
                         channels_last=channels_last)
        with autocast(precision, dev):
            p = torch.sigmoid(model(x).float())
            if tta:  # horizontal flip: the mean of both views' probabilities
                p = 0.5 * (p + torch.sigmoid(model(x.flip(-1)).float()))
        out.append(p[:min(batch_size, n - s)])
    return torch.cat(out).cpu().numpy().astype(np.float32)  # note: CPU-GPU sync point, once per study


def predict_studies(model: torch.nn.Module, root: str | Path, studies: Sequence[str], *, image_size: int, mean, std,
                    batch_size: int = 64, device="cpu", precision: str = "fp32", tta: bool = False,
                    channels_last: bool = False, prefetch: int = 2, progress: bool = False
                    ) -> dict[str, np.ndarray]:
    """``{uid: (n_slices, 8) float32}`` sigmoid probabilities (C1..C7, any), head to feet.

    ``model`` must be on ``device`` already; it is put in eval mode. ``mean``/``std`` are the
    model's data config (fractions of 1, as the loader takes them). ``tta``: the mean of the
    probabilities of the image and its horizontal flip. Batches have exactly ``batch_size``
    rows (see the module doc).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    model.eval()
    out: dict[str, np.ndarray] = {}
    bar = None
    if progress:
        from spinestream.shards.progress import bar as progress_bar

        bar = progress_bar(total=len(studies), unit="study", desc="infer", dynamic_ncols=True)
    try:
        for sv in _read_ahead(Path(root), list(studies), prefetch, pin=dev.type == "cuda"):
            out[sv.uid] = _study_probs(model, sv, dev, image_size=image_size, mean=mean, std=std,
                                       batch_size=batch_size, precision=precision, tta=tta,
                                       channels_last=channels_last)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    return out


def predict_run(model: torch.nn.Module, cfg, studies: Sequence[str], device, precision: str, *,
                batch_size: int | None = None, tta: bool = False, progress: bool = False) -> dict[str, np.ndarray]:
    """:func:`predict_studies` with a run's settings: ``cfg.data.root``, ``cfg.loader.image_size``, the
    model's mean/std, channels_last when the model's weights are in that format. Non-finite probabilities
    on any study raise :class:`NonFiniteProbabilities` naming it (:func:`check_finite`): this is the path of
    validation, ``evaluate`` and ``pseudo-label``. Under torchrun (:mod:`spinestream.engine.dist`) each rank
    infers its contiguous part of ``studies`` and every rank returns all of them, in ``studies``' order: a
    study's probabilities do not depend on the batch it shares (batches never mix studies), so the result
    equals one process's."""
    from .model import data_config

    dc = data_config(model)
    first = next(model.parameters(), None)
    cl = first is not None and first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last) \
        and not first.is_contiguous()
    d = dist.current()  # under torchrun each rank infers its part of the studies; every rank gets them all
    mine = predict_studies(model, cfg.data.root, d.part(list(studies)), image_size=cfg.loader.image_size,
                           mean=tuple(dc["mean"]), std=tuple(dc["std"]), batch_size=batch_size or cfg.loader.batch_size,
                           device=device, precision=precision, tta=tta, channels_last=cl, progress=progress and d.main)
    merged = d.merge(mine)
    probs = {u: merged[u] for u in studies}
    check_finite(probs, f"{cfg.name} ({len(probs)} studies of {cfg.data.root})")  # on every rank: all raise alike
    return probs


def score_studies(probs: dict[str, np.ndarray], studies: pd.DataFrame, rule: str) -> dict:
    """Study-level competition loss, accuracy and the per-vertebra report for these predictions (non-finite
    ones are refused, naming the study: :func:`check_finite`)."""
    check_finite(probs, "scoring")
    uids = sorted(probs)
    study_p = {u: study_probabilities(probs[u], rule) for u in uids}
    truth = studies.set_index("StudyInstanceUID").loc[uids, list(ROW_TYPES)]
    loss = score_submission(solution_from_train(truth.reset_index()), submission_frame(study_p))
    report = classification_report(truth.to_numpy(), np.stack([study_p[u] for u in uids]))
    return {"competition_loss": float(loss), "studies": len(uids),
            "accuracy": float(report.loc["overall", "accuracy"]),
            "report": json.loads(report.reset_index().to_json(orient="records"))}


def predict_volumes(model: torch.nn.Module, volumes: Iterable[StudyVolume], *, image_size: int, mean, std,
                    batch_size: int = 64, device="cpu", precision: str = "fp32", tta: bool = False,
                    channels_last: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """:func:`predict_studies` for studies that do not come from a Zarr store (``predict``'s DICOM
    studies, built in memory): yields ``(uid, (n_slices, 8) float32)`` per volume, in order.

    Lazy: a volume is taken from ``volumes`` only when the previous one is done, so a producer that
    decodes ahead (a process pool) bounds memory itself. The same inputs, fixed-size padded batches,
    precision and flip TTA as :func:`predict_studies`; ``model`` must be on ``device`` already.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    model.eval()

    def run() -> Iterator[tuple[str, np.ndarray]]:
        for sv in volumes:
            yield sv.uid, _study_probs(model, sv, dev, image_size=image_size, mean=mean, std=std,
                                       batch_size=batch_size, precision=precision, tta=tta,
                                       channels_last=channels_last)

    return run()
