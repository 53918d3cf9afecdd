"""The application layer: the console script's manners (--version, --help that lists config fields,
--print-config) and the import graph DESIGN.md fixes (spinestream -> {preprocess, engine, benchmarks}
-> shards)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spinestream.shards.config import field_docs
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


SUBPACKAGES = ("shards", "preprocess", "engine", "benchmarks")  # installed as spinestream.<name>
#: what the package root holds for every layer
ROOT_SHARED = ("__version__", "SpinestreamError", "InputError", "MissingInput")


def _layer(dotted: str, alias: str | None = None) -> str | None:
    """The layer an absolute import ``dotted`` (``from dotted import alias``) reaches: one of PACKAGES,
    ``"generic <name>"`` for a project folder imported under its bare top-level name (it is not
    installed that way), or None (not the project, or what the package root shares with every layer: ROOT_SHARED)."""
    parts = dotted.split(".")
    if parts[0] in SUBPACKAGES:
        return f"generic {parts[0]}"
    if parts[0] != "spinestream":
        return None
    if len(parts) == 1:  # from spinestream import X
        if alias in SUBPACKAGES:
            return alias
        return None if alias in (None, *ROOT_SHARED) else "spinestream"
    return parts[1] if parts[1] in SUBPACKAGES else "spinestream"


def _project_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Project layers a module imports (relative imports resolved against its package, which is
    installed under ``spinestream.``)."""
    rel = path.relative_to(root).with_suffix("").parts
    parts = rel if rel[0] == "spinestream" else ("spinestream", *rel)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {_layer(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # from .x / from ..x: climb from the module's package
                base = ".".join(parts[: len(parts) - node.level])
                module = ".".join(filter(None, (base, node.module)))
            else:
                module = node.module or ""
            found |= {_layer(module, a.name) for a in node.names}
    return found - {None}


def test_import_graph_follows_the_layering():
    bad = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            imports = _project_imports(path)
            hits = (imports & FORBIDDEN[pkg]) | {i for i in imports if i.startswith("generic ")}
            bad += [f"{path.relative_to(ROOT)} imports {h}" for h in sorted(hits)]
    assert not bad, "layering broken (DESIGN.md, Layout):\n" + "\n".join(bad)


def test_the_checker_sees_relative_and_nested_imports(tmp_path):
    # the rule above must not pass vacuously: a lazy import inside a function counts, and so does a
    # relative import that climbs out of its package
    (tmp_path / "shards" / "sub").mkdir(parents=True)
    probe = tmp_path / "shards" / "sub" / "probe.py"
    probe.write_text("import numpy\ndef f():\n    from spinestream.preprocess import synth\n    from .. import wds\n"
                     "    from spinestream import __version__, engine\n    import shards.x\n")
    assert _project_imports(probe, tmp_path) == {"preprocess", "shards", "engine", "generic shards"}


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
    from spinestream.preprocess.synth import SynthConfig

    docs = field_docs(SynthConfig)
    assert set(docs) == {"studies", "seed", "size", "test_studies", "slices", "syntax", "boxed_share", "crack_width"}
    for flag in ("--studies", "--test-studies", "--boxed-share", "--crack-width"):
        assert flag in out
    assert "Training studies" in out and "(default: 48:96)" in out
    assert "(default: None)" not in out and "``" not in out and ":func:" not in out


def test_synth_print_config_is_the_resolved_config_as_yaml(capsys, tmp_path):
    assert main(["synth", "--print-config", "--studies", "5", "--crack-width", "3:4", "--boxed-share", "0.5"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    from spinestream.preprocess.synth import SynthConfig

    assert SynthConfig(**cfg) == SynthConfig(studies=5, crack_width=(3.0, 4.0), boxed_share=0.5)
    assert not any(tmp_path.iterdir())  # nothing written, no --out needed
    assert main(["synth", "--print-config", "--studies", "0"]) == 2  # validated like a real run


def test_every_synth_config_field_is_a_flag():
    from spinestream.preprocess.synth import SynthConfig
    from spinestream.preprocess.synth.cli import build_parser, config_from_args

    args = build_parser().parse_args(["--studies", "7", "--seed", "2", "--size", "64", "--test-studies", "0",
                                      "--slices", "12:20", "--syntax", "rle", "--boxed-share", "0.3",
                                      "--crack-width", "2:3"])
    assert config_from_args(args) == SynthConfig(studies=7, seed=2, size=64, test_studies=0, slices=(12, 20),
                                                 syntax="rle", boxed_share=0.3, crack_width=(2.0, 3.0))
    assert config_from_args(build_parser().parse_args([])) == SynthConfig()  # flag defaults = field defaults


def test_demo_stale_check_compares_every_synth_config_field(tmp_path):
    import argparse
    import json

    from spinestream import demo

    args = argparse.Namespace(studies=256, seed=0, size=128, slices="24:40", boxed_share=0.5, crack_width="3:4")
    marker = tmp_path / "SYNTH_COMPLETE"
    params = demo._synth_config(args).params()
    marker.write_text(json.dumps({"params": params}))
    assert demo._stale(marker, args) == ""
    marker.write_text(json.dumps({"params": {**params, "syntax": "rle", "test_studies": 0}}))
    assert demo._stale(marker, args) == "test_studies 0 != 2, syntax rle != mixed"


def test_help_names_the_options_every_verb_takes(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--no-progress" in out and "exit status 2" in out
