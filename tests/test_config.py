"""Typed configs: unknown keys and wrong types fail with the full key path; every verb's --help lists a
config's fields with their docstrings, and --print-config prints what load_config resolved."""
import argparse
from dataclasses import dataclass, field

import pytest
import yaml

from spinestream.shards.config import (ConfigError, HelpFormatter, config_fields_help, field_docs, load_config, parse_overrides,
                           plain, print_config, to_dict)
from spinestream.shards.shard_config import ShardConfig


@dataclass(kw_only=True)
class Inner:
    lr: float = 1e-3
    names: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    size: int = 3


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("inner:\n  lr: 0.5\nsize: 4\n")
    cfg = load_config(Outer, p, ["inner.names=[a, b]", "size=8"])
    assert cfg.inner.lr == 0.5 and cfg.inner.names == ["a", "b"] and cfg.size == 8


def test_unknown_key_names_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"inner\.lrr: unknown key"):
        load_config(Outer, None, ["inner.lrr=1"])


def test_wrong_type_names_its_path():
    with pytest.raises(ConfigError, match=r"inner\.lr: expected a number"):
        load_config(Outer, None, ["inner.lr=fast"])
    with pytest.raises(ConfigError, match=r"size: expected an integer"):
        load_config(Outer, None, ["size=1.5"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["size"])


def test_shard_config_validation():
    cfg = load_config(ShardConfig, "configs/shard.yaml")
    assert cfg == ShardConfig()  # the YAML states the defaults
    with pytest.raises(ConfigError, match="needs 3 window"):
        load_config(ShardConfig, None, ["channels=windows"])
    with pytest.raises(ConfigError, match=r"windows\[0\]\[1\]: expected a number"):
        load_config(ShardConfig, None, ["windows=[[400, wide]]"])
    with pytest.raises(ConfigError, match="channels"):
        load_config(ShardConfig, None, ["channels=rgb"])
    assert to_dict(ShardConfig())["windows"] == [[400.0, 1800.0]]


# --------------------------------------------------------------------------- help and --print-config


@dataclass(kw_only=True)
class _Inner:
    lr: float = 1e-3
    """Step size of ``Adam`` (see :func:`torch.optim.Adam`)."""
    names: list[str] = field(default_factory=lambda: ["a", "b"])


@dataclass(kw_only=True)
class _Outer:
    inner: _Inner = field(default_factory=_Inner)
    root: str | None = None
    """Where the `shards` are."""


def test_config_fields_help_walks_nested_configs_and_strips_markup():
    text = config_fields_help(_Outer)
    assert "inner.lr: float = 0.001" in text and "Step size of Adam (see torch.optim.Adam)." in text
    assert "inner.names: list[str] = [a, b]" in text
    assert "root: str | None = null" in text and "Where the shards are." in text
    assert "`" not in text
    assert plain("``a`` :class:`~x.Y` `b`") == "a x.Y b"


def test_help_formatter_shows_defaults_only_where_they_say_something():
    p = argparse.ArgumentParser(formatter_class=HelpFormatter, epilog=config_fields_help(_Outer))
    p.add_argument("--limit", type=int, default=None, help="only N")
    p.add_argument("--workers", type=int, default=4, help="processes")
    p.add_argument("--seed", type=int, default=0, help="seed")
    p.add_argument("--keep", action="store_true", help="keep it")
    p.add_argument("--set", action="append", default=[], help="override")
    text = p.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
    assert "processes (default: 4)" in text and "seed (default: 0)" in text
    assert "  inner.lr: float = 0.001\n      Step size" in text  # the epilog keeps its layout


def test_print_config_round_trips(capsys):
    print_config(_Outer())
    assert yaml.safe_load(capsys.readouterr().out) == {"inner": {"lr": 0.001, "names": ["a", "b"]}, "root": None}


def test_shard_config_help_lists_every_field_with_its_docstring():
    text = config_fields_help(ShardConfig)
    assert "  image_size: int = 512\n      Output side in pixels" in text
    assert "windows: list[tuple[float, float]] = [[400.0, 1800.0]]" in text
    assert "channels: neighbours | windows = neighbours" in text
    docs = field_docs(ShardConfig)
    assert docs["offset_mm"].startswith("Neighbour distance in mm") and "zarr_clevel" not in docs  # none there


def test_print_config_loads_back_as_the_same_config(tmp_path, capsys):
    cfg = load_config(ShardConfig, None, ["image_size=256", "windows=[[500, 1800]]"])
    print_config(cfg)
    p = tmp_path / "resolved.yaml"
    p.write_text(capsys.readouterr().out)
    assert load_config(ShardConfig, p) == cfg
