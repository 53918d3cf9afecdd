"""One error policy (issue 18): the console script prints a SpinestreamError as one line and exits 2;
anything else (a torch bug, an out-of-memory) keeps its traceback, because no verb catches
ValueError or RuntimeError. And a YAML error is one line naming the file, line and column (issue 17)."""
from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import spinestream
from spinestream import SpinestreamError
from spinestream.cli import VERBS, main

ROOT = Path(__file__).resolve().parents[1]


def _console(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """``spinestream ARGV`` as the console script runs it (a fresh process, from ``cwd``)."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "spinestream.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_torch_error_inside_train_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import torch

    from spinestream.engine import trainer

    def broken_init(self, cfg, run_dir, resume_from=None):
        torch.zeros(2, 3) @ torch.zeros(2, 3)  # a real torch RuntimeError: shapes cannot be multiplied

    monkeypatch.setattr(trainer.Trainer, "__init__", broken_init)
    with pytest.raises(RuntimeError, match="cannot be multiplied") as e:
        main(["train", "--set", f"out_dir={tmp_path}", "--set", "data.root=nowhere"])
    assert not isinstance(e.value, SpinestreamError)
    assert any(entry.name == "broken_init" for entry in e.traceback)  # where it happened, not one line
    assert capsys.readouterr().err == ""


def test_a_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "run.yaml").write_text("name: r\noptim:\n  lr: fast\n")
    assert main(["train", "-c", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == "spinestream train: optim.lr: expected a number, got str 'fast'\n"


def test_project_errors_are_spinestream_errors():
    from spinestream.engine.checkpoint import RunError
    from spinestream.engine.loader import BackendUnavailable
    from spinestream.engine.trainer import TrainingDiverged
    from spinestream.preprocess.dicom import DicomError
    from spinestream.preprocess.errors import JobError, LabelError
    from spinestream.shards.config import ConfigError
    from spinestream.shards.manifest import ManifestError
    from spinestream.shards.verify import VerifyError
    from spinestream.shards.wds import ShardError
    from spinestream.stages import RetrainRefused, StageError

    for cls in (ConfigError, RunError, DicomError, JobError, LabelError, ManifestError, ShardError, VerifyError,
                StageError, RetrainRefused, TrainingDiverged, BackendUnavailable, spinestream.InputError,
                spinestream.MissingInput):
        assert issubclass(cls, SpinestreamError), cls
    # the old bases stay, for callers that catch them
    assert issubclass(TrainingDiverged, RuntimeError) and issubclass(spinestream.MissingInput, FileNotFoundError)


def test_dali_missing_is_a_project_error(monkeypatch):
    from spinestream.engine import loader
    from spinestream.engine.loader import LoaderConfig

    monkeypatch.setattr(loader, "dali_available", lambda: False)
    with pytest.raises(SpinestreamError, match="nvidia-dali is not installed"):
        loader.build_loader(None, None, LoaderConfig(backend="dali"))


def _catches_value_or_runtime_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True  # a bare except hides everything
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ValueError", "RuntimeError", "Exception") for n in names)


def _verb_mains() -> list[tuple[str, str]]:
    from spinestream.benchmarks.cli import SUITES

    return [(v, m) for v, (m, _) in VERBS.items()] + [(f"bench {s}", m) for s, (m, _) in SUITES.items()]


@pytest.mark.parametrize("verb, module", _verb_mains())
def test_no_verb_main_catches_value_or_runtime_error(verb, module):
    tree = ast.parse(textwrap.dedent(inspect.getsource(importlib.import_module(module).main)))
    bad = [f"line {h.lineno}: except {ast.unparse(h.type) if h.type else ''}" for h in ast.walk(tree)
           if isinstance(h, ast.ExceptHandler) and _catches_value_or_runtime_error(h)]
    assert not bad, f"spinestream {verb}'s main hides bugs behind {bad}: raise a SpinestreamError instead"


def test_the_scan_sees_a_tuple():
    tree = ast.parse("try:\n    pass\nexcept (ConfigError, ValueError, RuntimeError) as e:\n    pass\n")
    assert _catches_value_or_runtime_error(next(n for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler)))


# --------------------------------------------------------------------------- YAML errors, through the console script


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path):
    bad = tmp_path / "x.yaml"
    bad.write_text("out: here\nshard:\n  data: a: b\n")
    r = _console("run", "-c", "x.yaml", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == "spinestream run: x.yaml:3:10: mapping values are not allowed here\n"


def test_a_yaml_error_in_a_set_value_names_the_override(tmp_path):
    r = _console("run", "--set", "out=a: b: c", "--print-config", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("spinestream run: --set 'out=a: b: c': not valid YAML (column 5: mapping values")
