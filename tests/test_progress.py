"""Quiet, conventional logging (issue 17 C): progress bars that do not flood a log file, ``--no-progress`` for
every verb, and wandb where and how the user asks (spinestream/shards/progress.py, engine/trainlog.py)."""
from __future__ import annotations

import io
import sys
import types
from pathlib import Path

import pytest

from spinestream import cli
from spinestream.engine.trainlog import TrainLog, wandb_mode
from spinestream.shards import progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_bar(stream, steps: int = 200) -> str:
    with progress.bar(total=steps, desc="train", unit="step", file=stream) as b:
        for k in range(steps):
            b.update()
            b.set_postfix(loss=f"{1 / (k + 1):.4f}")  # as the trainer and predict do, every step or study
    return stream.getvalue()


@pytest.fixture(autouse=True)
def _progress_on():
    progress.set_enabled(True)
    yield
    progress.set_enabled(True)


def test_a_bar_into_a_file_writes_a_handful_of_updates():
    text = _run_bar(io.StringIO())
    assert 1 <= text.count("\r") <= 3, text  # the first draw and the final one (tqdm's default: ~200)
    assert "200/200" in text and "loss=0.0050" in text  # the last state still reaches the log


def test_a_bar_on_a_terminal_still_follows_the_steps():
    assert _run_bar(Tty()).count("\r") > 3  # set_postfix redraws at once on a terminal


def test_no_progress_writes_nothing():
    progress.set_enabled(False)
    assert _run_bar(io.StringIO()) == ""


def test_every_verb_takes_no_progress(monkeypatch):
    seen = {}

    def main(argv):
        seen.update(argv=argv, enabled=progress.enabled())
        return 0

    monkeypatch.setitem(sys.modules, "fake_verb", types.SimpleNamespace(main=main))
    monkeypatch.setitem(cli.VERBS, "fake", ("fake_verb", "test"))
    monkeypatch.setitem(cli.VERBS, "predict", ("fake_verb", "test"))
    assert cli.main(["fake", "--x", "1", "--no-progress"]) == 0
    assert seen == {"argv": ["--x", "1"], "enabled": False}  # the verb's own parser never sees the flag
    progress.set_enabled(True)
    assert cli.main(["predict", "--no-progress"]) == 0
    assert seen == {"argv": ["--no-progress"], "enabled": False}  # predict keeps its own flag


@pytest.mark.parametrize("configured, env, expected", [
    ("offline", {}, "offline"),
    ("offline", {"WANDB_MODE": "disabled"}, "disabled"),  # issue 17: WANDB_MODE=disabled was ignored
    ("online", {"WANDB_MODE": "offline"}, "offline"),
    ("offline", {"WANDB_MODE": "dryrun"}, "offline"),
    ("disabled", {"WANDB_MODE": "online"}, "disabled"),  # log.wandb: disabled never imports wandb
    ("online", {"WANDB_MODE": "sometimes"}, "online"),  # unknown: warned about, ignored
    ("online", {"WANDB_MODE": ""}, "online"),
])
def test_wandb_mode_precedence(configured, env, expected):
    assert wandb_mode(configured, env) == expected


class _Cfg:
    name = "r1"

    def __init__(self, wandb: str):
        self.log = types.SimpleNamespace(wandb=wandb, project="p")


def _fake_wandb(monkeypatch, calls: list) -> None:
    fake = types.ModuleType("wandb")
    fake.Settings = lambda **kw: kw
    fake.init = lambda **kw: calls.append(kw) or types.SimpleNamespace(log=None, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)


def test_wandb_goes_in_the_run_directory_quietly_in_the_mode_wandb_mode_says(monkeypatch, tmp_path):
    calls: list[dict] = []
    _fake_wandb(monkeypatch, calls)
    monkeypatch.setattr("spinestream.engine.trainlog.to_dict", lambda cfg: {})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    TrainLog(Path("runs/r1")).start_wandb(_Cfg("online"))
    (kw,) = calls
    assert kw["mode"] == "offline" and kw["dir"] == str(tmp_path / "runs" / "r1")  # absolute: never the cwd's
    assert kw["settings"] == {"silent": True}
    monkeypatch.setenv("WANDB_MODE", "disabled")
    TrainLog(tmp_path).start_wandb(_Cfg("online"))
    assert len(calls) == 1


def test_log_wandb_disabled_never_imports_wandb(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import would raise ImportError -> "wandb unavailable"
    monkeypatch.setenv("WANDB_MODE", "online")
    log = TrainLog(tmp_path)
    log.start_wandb(_Cfg("disabled"))
    assert log.wandb is None and "wandb" not in capsys.readouterr().err
