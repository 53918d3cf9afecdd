"""spinestream: the application layer on top of preprocess, engine, benchmarks and shards.

Everything installs under this one package (pyproject.toml maps the checkout's top-level folders
``engine/``, ``shards/``, ``preprocess/``, ``benchmarks/`` and ``configs/`` to ``spinestream.engine``
and so on), so nothing generic lands top-level in site-packages. In a plain checkout that is not
installed (``PYTHONPATH=$PWD``), the same names resolve because the checkout's root is appended to
this package's search path below; installed, the folders are inside the package and the root is not.

The console script's verb table (:mod:`spinestream.cli`) and the demo live here; it is the
only package that may import all the others (ARCHITECTURE.md, "Layout").
"""
from __future__ import annotations

from pathlib import Path as _Path

_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "engine" / "__init__.py").is_file():
    __path__.append(str(_root))  # a checkout: spinestream.engine is <root>/engine (see the docstring)

try:
    from importlib.metadata import PackageNotFoundError, version as _version

    __version__ = _version("spinestream")
except PackageNotFoundError:  # a plain checkout, never installed: pyproject.toml's one definition
    import re as _re

    __version__ = _re.search(r'^version = "([^"]+)"', (_root / "pyproject.toml").read_text(), _re.M).group(1)


class SpinestreamError(Exception):
    """Base of every error spinestream raises on purpose: a bad config, bad input, a run or shard set
    in a state the command cannot use, an unreadable DICOM. Its message says what to do; the console
    script prints it on one line and exits 2. Anything else is a bug (or the system's error, such as an
    out-of-memory) and keeps its traceback. Every layer may import it (it lives in the package root)."""


class InputError(SpinestreamError, ValueError):
    """Input the command was given (a file, a table, a directory's contents) cannot be used as it is; the
    message names it and what to do. A ValueError too, for callers that test values."""


class MissingInput(SpinestreamError, FileNotFoundError):
    """A file or directory the command needs does not exist; the message names it and what makes it. A
    FileNotFoundError too, for callers that treat a missing file as "not made yet"."""
