"""The application layer: the console script's manners (--version, --help that lists config fields,
--print-config) and the import graph DESIGN.md fixes (spinestream -> {preprocess, engine, benchmarks}
-> shards)."""
from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from shards.config import HelpFormatter, config_fields_help, field_docs, plain, print_config
from spinestream import __version__
from spinestream.cli import VERBS, main

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "preprocess", "engine", "benchmarks", "spinestream")
#: package -> the project packages it must never import
FORBIDDEN = {
    "shards": {"preprocess", "engine", "benchmarks", "spinestream"},
    "preprocess": {"engine", "benchmarks", "spinestream"},
    "engine": {"preprocess", "benchmarks", "spinestream"},
    "benchmarks": {"spinestream"},
    "spinestream": set(),
}


def _project_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Top-level project packages a module imports (relative imports resolved against its package)."""
    parts = path.relative_to(root).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x / from ..x: climb from the module's package
                base = parts[: len(parts) - node.level]
                names = [".".join((*base, node.module or ""))]
            else:
                names = [node.module or ""]
        else:
            continue
        found |= {n.split(".")[0] for n in names if n.split(".")[0] in PACKAGES}
    return found


def test_import_graph_follows_the_layering():
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            hits = _project_imports(path) & FORBIDDEN[pkg]
            bad += [f"{path.relative_to(ROOT)} imports {h}" for h in sorted(hits)]
    assert not bad, "layering broken (DESIGN.md, Layout):\n" + "\n".join(bad)


def test_the_checker_sees_relative_and_nested_imports(tmp_path):
    # the rule above must not pass vacuously: a lazy import inside a function counts, and so does a
    # relative import that climbs out of its package
    (tmp_path / "shards" / "sub").mkdir(parents=True)
    probe = tmp_path / "shards" / "sub" / "probe.py"
    probe.write_text("import numpy\ndef f():\n    from preprocess import synth\n    from .. import wds\n")
    assert _project_imports(probe, tmp_path) == {"preprocess", "shards"}


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"spinestream {__version__}" and __version__.count(".") == 2


def test_python_m_spinestream_cli_lists_the_verbs():
    r = subprocess.run([sys.executable, "-m", "spinestream.cli", "--help"], capture_output=True, text=True,
                       cwd=ROOT, check=True)
    assert all(v in r.stdout for v in VERBS) and "demo" in VERBS
    assert VERBS["demo"][0] == "spinestream.demo"


def test_synth_help_lists_its_config_fields_without_noise(capsys):
    with pytest.raises(SystemExit) as e:
        main(["synth", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    from preprocess.synth import SynthConfig

    docs = field_docs(SynthConfig)
    assert set(docs) == {"studies", "seed", "size", "test_studies", "slices", "syntax", "boxed_share", "crack_width"}
    for flag in ("--studies", "--test-studies", "--boxed-share", "--crack-width"):
        assert flag in out
    assert "Training studies" in out and "(default: 48:96)" in out
    assert "(default: None)" not in out and "``" not in out and ":func:" not in out


def test_synth_print_config_is_the_resolved_config_as_yaml(capsys, tmp_path):
    assert main(["synth", "--print-config", "--studies", "5", "--crack-width", "3:4", "--boxed-share", "0.5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    from preprocess.synth import SynthConfig

    assert SynthConfig(**cfg) == SynthConfig(studies=5, crack_width=(3.0, 4.0), boxed_share=0.5)
    assert not any(tmp_path.iterdir())  # nothing written, no --out needed
    assert main(["synth", "--print-config", "--studies", "0"]) == 2  # validated like a real run


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
    import argparse

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
