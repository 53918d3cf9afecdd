"""A run's weights alone, for inference: ``weights.safetensors`` beside its ``config.yaml`` and ``shard_spec.json``.

    export_weights(run_dir, bundle / "runs" / name)      # what ``spinestream kaggle-bundle`` writes per run
    model, cfg, path = load_weights_model(bundle / "runs" / name, device)   # what predict reads

A checkpoint (``best.pt``) carries the optimizer's state, the raw and the EMA weights, the loader position
and every RNG: three times the model, and a pickle (read with ``weights_only=True``, but still a pickle).
Predict uses only the EMA weights (the raw ones when the run had no EMA: what
:func:`spinestream.engine.evaluate.load_run_model` picks), so the export keeps exactly those, as safetensors
(no code can run on load), with the model's fingerprint in the file's metadata: a ``config.yaml`` that
describes another model is refused as a checkpoint's is. Writer and reader live here together.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from spinestream.shards.config import load_config
from spinestream.shards.fsutil import atomic_write_bytes

from . import checkpoint as ck
from .config import RunConfig
from .rundir import RunLayout

WEIGHTS_FILE = RunLayout(Path(".")).weights.name
FORMAT = "spinestream-weights"
VERSION = "1"


def is_weights_dir(path: str | Path) -> bool:
    """Whether ``path`` holds exported weights (a bundle's run) rather than a training run directory."""
    return RunLayout(Path(path)).weights.is_file()


def export_weights(run_dir: str | Path, out_dir: str | Path, which: str = "best") -> Path:
    """Write ``out_dir/weights.safetensors``: the EMA weights of ``run_dir``'s ``which`` checkpoint (best, last
    or a path; the model's own weights when the run had no EMA), atomically. Returns the file."""
    from safetensors.torch import save

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    ck.check_run_dir(run_dir)
    if which == "best":
        ck.sync_best(run_dir)  # a kill between the step checkpoint and best.pt: the best the record names
    path = Path(which) if which not in ("best", "last") else (
        RunLayout(run_dir).best if which == "best" else ck.latest(run_dir))
    state = ck.load(path)
    ema = state.get("ema") is not None
    # clones: safetensors refuses tensors that share storage, and a state dict may hold views of one buffer
    tensors = {k: v.detach().clone().contiguous() for k, v in (state["ema"] if ema else state["model"]).items()}
    meta = {"format": FORMAT, "version": VERSION, "model_fingerprint": json.dumps(state.get("model_fingerprint")),
            "ema": str(ema).lower(), "step": str(state.get("step", -1)), "source": str(path)}
    out = RunLayout(out_dir).weights
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, save(tensors, metadata=meta))
    return out


def load_weights_model(weights_dir: str | Path, device="cpu"):
    """(model with the exported weights, its config, the weights file), built as
    :func:`spinestream.engine.evaluate.load_run_model` builds a run's model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .model import build_model, check_state_dict, model_fingerprint

    lay = RunLayout(Path(weights_dir))
    path = lay.weights
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ck.RunError(f"{path}: not spinestream weights of format {FORMAT} v{VERSION} (metadata {meta}); "
                          f"export them again with `spinestream kaggle-bundle`")
    cfg = load_config(RunConfig, lay.config)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=False, pretrained_path=None))
    model = build_model(cfg.model, image_size=cfg.loader.image_size)
    if json.loads(meta.get("model_fingerprint", "null")) != model_fingerprint(model):
        raise ck.RunError(f"{path} was written by a different model than {lay.config} describes")
    weights = load_file(str(path))
    check_state_dict(model, weights, source=str(path))
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg, path
