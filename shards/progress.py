"""Progress bars for every verb: one tqdm wrapper that suits where the output goes.

On a terminal a bar redraws in place, so frequent updates cost nothing. Written to a file, a pipe or a
notebook's captured log (a Kaggle commit, ``nohup``), every redraw is a new chunk of text: tqdm's default
0.1 s interval and a ``set_postfix`` per step wrote 262 updates (30 KB) for a 200-step CPU run, and a real
epoch (~20k steps) floods the log. So off a terminal a bar redraws at most every
:data:`NON_TTY_INTERVAL` seconds (postfix and description changes wait for that redraw), and
``--no-progress`` (any verb: :func:`spinestream.cli.main` calls :func:`set_enabled`) turns every bar off.
"""
from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

NON_TTY_INTERVAL = 30.0
"""Seconds between redraws of a bar whose output is not a terminal."""

_enabled = True


def set_enabled(on: bool) -> None:
    """Turn every bar made after this call on or off (``--no-progress``: off for the whole process)."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    return _enabled


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Bar(tqdm):
    """tqdm whose postfix and description changes redraw at once only on a terminal (elsewhere they show at
    the next timed redraw: tqdm's own ``set_postfix`` redraws on every call, i.e. every step)."""

    def __init__(self, *args, file=None, **kwargs):
        self._tty = is_tty(sys.stderr if file is None else file)  # tqdm's default file
        super().__init__(*args, file=file, **kwargs)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=refresh and self._tty, **kwargs)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=refresh and self._tty)


def bar(iterable=None, *, file=None, disable: bool = False, **kwargs) -> Bar:
    """``tqdm(iterable, **kwargs)`` to ``file`` (default stderr), redrawn at most every NON_TTY_INTERVAL s when
    ``file`` is not a terminal, and disabled when ``disable`` or :func:`set_enabled(False) <set_enabled>`."""
    file = sys.stderr if file is None else file
    if not is_tty(file):
        kwargs.setdefault("mininterval", NON_TTY_INTERVAL)
        kwargs.setdefault("maxinterval", max(NON_TTY_INTERVAL, kwargs["mininterval"]))
    return Bar(iterable, file=file, disable=disable or not _enabled, **kwargs)


def write(message: str, file=None) -> None:
    """Print a line above any open bar (``tqdm.write``), to stdout by default."""
    tqdm.write(message, file=file)
