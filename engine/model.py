"""The classifier: a timm backbone with an 8-way head (C1..C7 + any) and dropout before it, as in the reference.

    from spinestream.engine.model import build_model, data_config, check_state_dict, model_fingerprint
    model = build_model(cfg.model, image_size=384)       # weights: pretrained_path, else timm's hub, else random
    norm = data_config(model)                             # {'mean', 'std', 'input_size'} for the loader
    check_state_dict(model, ckpt["model"], source=path)   # ValueError naming the keys that do not fit

Where the pretrained weights come from (``ModelConfig``):

- ``pretrained_path`` set: that file (.pth/.pt or .safetensors; a raw state dict or one under ``state_dict`` /
  ``model``). Only a classifier of another shape (the 1000-class ImageNet head) is dropped; any other missing,
  unexpected or mis-shaped key is an error, so a file for another architecture fails instead of half-loading.
- ``pretrained`` and no path: timm's weights from the Hugging Face hub. A copy already in the local HF cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``, read when called) is used
  without touching the network. Otherwise the hub host is probed first (one TCP connect, bounded at
  ``HUB_PROBE_TIMEOUT_S`` including DNS); ``HF_HUB_OFFLINE=1`` or a failed probe raises
  :class:`PretrainedUnavailable` with what to do, so a machine without network never hangs here.
- neither: random init.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch

from spinestream import InputError, MissingInput, SpinestreamError

from .config import ModelConfig


def _import_timm():
    """``import timm`` without the ``import wandb`` it tries on the way (timm.utils.summary, for timm's own
    training scripts, which this project does not use): wandb stays out of a process that only predicts
    (seconds of import, and nothing a Kaggle bundle ships). A wandb imported before (training) is left alone."""
    if "wandb" in sys.modules:
        import timm
        return timm
    sys.modules["wandb"] = None  # `import wandb` raises ImportError, which timm catches
    try:
        import timm
    finally:
        del sys.modules["wandb"]
    return timm


timm = _import_timm()

__all__ = ["HUB_PROBE_TIMEOUT_S", "PretrainedUnavailable", "build_model", "check_state_dict", "data_config",
           "load_weights_file", "model_fingerprint"]

HUB_PROBE_TIMEOUT_S = 3.0
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's hub files, in the order timm prefers them
_SHOW_KEYS = 5  # keys named in an error message


class PretrainedUnavailable(SpinestreamError, RuntimeError):
    """Pretrained weights were asked for but cannot be had here (no network, nothing cached, download failed)."""


def build_model(cfg: ModelConfig, *, image_size: int | None = None) -> torch.nn.Module:
    """The timm model ``cfg.name`` with ``cfg.num_classes`` outputs and dropout ``cfg.drop_rate`` before the
    head, weights as the module docstring says.

    ``image_size``, when given, is recorded as the model's ``input_size`` (so :func:`data_config` reports the
    size trained at) and passed as ``img_size`` to models whose input size is fixed (ViTs); convolutional
    models take any size.
    """
    if not timm.is_model(cfg.name):
        raise InputError(f"model.name: unknown timm model {cfg.name!r}: a name from timm.list_models() ('hf-hub:' "
                         f"names are not supported; download once and use model.pretrained_path)")
    kwargs: dict = dict(num_classes=cfg.num_classes, drop_rate=cfg.drop_rate)
    default_cfg = _registered_cfg(cfg.name)
    if image_size is not None and default_cfg.get("fixed_input_size", False):
        kwargs["img_size"] = image_size

    if cfg.pretrained_path:
        state = load_weights_file(cfg.pretrained_path)  # fails before the model is built
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)
        _load_backbone(model, state, source=str(cfg.pretrained_path))
    elif cfg.pretrained:
        weights = _hub_weights_file(cfg.name, default_cfg)
        # timm's own loader: its per-model checkpoint filters, and the ImageNet head dropped for num_classes=8
        model = timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                                  **kwargs)
    else:
        model = timm.create_model(cfg.name, pretrained=False, **kwargs)

    if image_size is not None:
        chans = model.pretrained_cfg.get("input_size", (3,))[0]
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg,  # timm keeps the two as aliases
                                                    "input_size": (chans, image_size, image_size)}
    return model


def data_config(model: torch.nn.Module) -> dict:
    """``{'mean', 'std', 'input_size'}`` of ``model`` (timm's resolve_data_config): the loader normalises with
    mean/std (fractions of 1, per channel)."""
    dc = timm.data.resolve_data_config(model=_unwrap(model))
    return {"mean": tuple(dc["mean"]), "std": tuple(dc["std"]), "input_size": tuple(dc["input_size"])}


def model_fingerprint(model: torch.nn.Module) -> dict:
    """``{'name', 'n_params', 'keys_sha1'}``: ``keys_sha1`` hashes the sorted state-dict key names and shapes, so
    two models share it exactly when each one's weights load into the other. Stored in checkpoints to refuse
    one from a different model with a clear message."""
    model = _unwrap(model)
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    lines = sorted(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return {
        "name": pcfg.get("architecture") or type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "keys_sha1": hashlib.sha1("\n".join(lines).encode()).hexdigest(),
    }


def check_state_dict(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Raise ValueError naming ``source`` and the first few missing / unexpected / mis-shaped keys unless
    ``state`` fits ``model`` exactly (same keys, same shapes)."""
    _check_keys(_unwrap(model), state, source=source, may_miss=())


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: .safetensors, or a torch file (weights only) holding a state dict or a dict
    with one under ``state_dict`` / ``model``. A ``module.`` / ``_orig_mod.`` prefix on every key (DDP,
    torch.compile) is removed."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MissingInput(f"model.pretrained_path: no file {str(p)!r} (set it to a .pth/.pt/.safetensors "
                           f"state dict, or leave it empty)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(p), device="cpu")
    else:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # pickles holding more than tensors, or not a torch file at all
            raise InputError(f"{p}: not a loadable weights file ({type(e).__name__}: {str(e)[:200]}); save "
                             f"just the state dict (torch.save(model.state_dict(), ...))") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise InputError(f"{p}: expected a state dict (name -> tensor), or a dict with one under 'state_dict' "
                         f"or 'model'")
    state = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------------- helpers


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper prefixes every key with _orig_mod.


def _registered_cfg(name: str) -> dict:
    try:
        pcfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown tag: "resnet18.nope"
        raise InputError(f"model.name: {e}") from e
    return pcfg.to_dict() if pcfg is not None else {}


def _classifier_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys of the classifier head (timm's pretrained_cfg['classifier'], else get_classifier())."""
    names = model.pretrained_cfg.get("classifier") if hasattr(model, "pretrained_cfg") else None
    if isinstance(names, str):
        names = (names,)
    if not names and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        names = tuple(n for n, m in model.named_modules() if m is head)
    own = model.state_dict()
    return {k for n in names or () for k in own if k.startswith(n + ".")}


def _load_backbone(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` into ``model``, dropping a classifier of another shape (the ImageNet head); anything else
    that does not fit is an error."""
    own = model.state_dict()
    head = _classifier_keys(model)
    state = {k: v for k, v in state.items() if not (k in head and tuple(v.shape) != tuple(own[k].shape))}
    _check_keys(model, state, source=source, may_miss=head)
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= head, result


def _check_keys(model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str,
                may_miss: set[str] | tuple) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and k not in may_miss]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    parts = [f"{what} ({len(keys)}): {', '.join(keys[:_SHOW_KEYS])}{', ...' if len(keys) > _SHOW_KEYS else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
             if keys]
    raise InputError(f"{source}: weights do not fit model {name!r} (a checkpoint of another architecture or "
                     f"config?) -- " + "; ".join(parts))


def _hub_cache_dir() -> Path:
    """huggingface_hub's cache directory, from the environment now (the library reads it once, at import)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return flag.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_probe_target() -> tuple[str, int]:
    """(host, port) a hub download would connect to first: the HTTPS proxy if one is set, else the endpoint."""
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("HF_ENDPOINT") \
        or "https://huggingface.co"
    u = urlparse(url if "://" in url else f"http://{url}")
    return u.hostname or "huggingface.co", u.port or (443 if u.scheme == "https" else 80)


def _reachable(host: str, port: int, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` s. Run in a thread because name
    resolution ignores socket timeouts and can block far longer without a network."""
    ok = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.set()
        except Exception:  # noqa: BLE001 -- whatever fails, the hub is not reachable; a probe never prints a traceback
            pass

    t = threading.Thread(target=probe, name="hub-probe", daemon=True)
    t.start()
    t.join(timeout)
    return ok.is_set()


def _advice(name: str) -> str:
    return (f"download the weights on a machine with network (e.g. `python -c 'import timm; "
            f"timm.create_model(\"{name}\", pretrained=True)'`; the file lands in "
            f"~/.cache/huggingface/hub/models--timm--.../snapshots/*/model.safetensors) and either copy that "
            f"cache here (HF_HOME) or set model.pretrained_path=<the file>; or set model.pretrained=false")


def _hub_weights_file(name: str, pcfg: dict) -> Path:
    """A local path to ``name``'s hub weights: the HF cache's copy, else a fresh download once the hub answers."""
    hub_id = pcfg.get("hf_hub_id")
    if not hub_id:
        raise PretrainedUnavailable(f"timm has no hub weights for {name!r}: set model.pretrained_path to a "
                                    f"weights file, or model.pretrained=false")
    repo, _, revision = hub_id.partition("@")
    revision = revision or None
    files = (pcfg["hf_hub_filename"],) if pcfg.get("hf_hub_filename") else _HUB_FILES
    cache_dir = _hub_cache_dir()

    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for fname in files:
        hit = try_to_load_from_cache(repo, fname, cache_dir=cache_dir, revision=revision)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)

    if _hub_offline():
        raise PretrainedUnavailable(f"pretrained weights for {name!r} ({repo}) are not in the HF cache "
                                    f"{cache_dir} and HF_HUB_OFFLINE is set (no network): " + _advice(name))
    host, port = _hub_probe_target()
    if not _reachable(host, port):
        raise PretrainedUnavailable(f"pretrained weights for {name!r} ({repo}) are not in the HF cache "
                                    f"{cache_dir} and {host}:{port} does not answer (no network): " + _advice(name))
    last: Exception | None = None
    for fname in files:
        try:
            return Path(hf_hub_download(repo, fname, revision=revision, cache_dir=cache_dir,
                                        library_name="timm", library_version=timm.__version__))
        except RemoteEntryNotFoundError as e:  # this repo has the other format
            last = e
        except Exception as e:  # network, auth, disk: all mean "no weights here", with the cause chained
            raise PretrainedUnavailable(f"downloading {repo}/{fname} failed ({type(e).__name__}: "
                                        f"{str(e)[:300]}): " + _advice(name)) from e
    raise PretrainedUnavailable(f"{repo} has none of {', '.join(files)}: " + _advice(name)) from last
