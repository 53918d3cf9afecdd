"""Typed configs: unknown keys and wrong types fail with the full key path."""
from dataclasses import dataclass, field

import pytest

from preprocess.config import ShardConfig
from shards.config import ConfigError, load_config, parse_overrides, to_dict


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
