"""The shard job's error policy, decided once (issue 10 / DESIGN.md "one error policy").

* **Bad input** — :class:`spinestream.preprocess.dicom.DicomError`, ``OSError``, :class:`LabelError` — is
  reported per file or per study and the job goes on.
* **Data-changing warnings** — :class:`DataWarning`: something was kept but changed (a box on a
  slice the study lacks, an ordering fallback, a resized slice, a segmentation left out). Raise
  them with ``warnings.warn(msg, DataWarning)``; the shard job captures them per study and lists
  them in ``manifest.json``'s ``warnings``, naming the study and what was done.
* **Anything else is a bug** and stops the job with its traceback.
"""
from __future__ import annotations

from spinestream import SpinestreamError


class DataWarning(UserWarning):
    """Input was used, but changed or partly ignored; the message says what was done."""


class LabelError(SpinestreamError, ValueError):
    """A study's labels cannot be built from its inputs (bad input, not a bug)."""


class JobError(SpinestreamError, ValueError):
    """The shard job refuses to run as asked (another config or study selection in --out, nothing
    readable); the message says what to do. Not a bug: the CLI prints it without a traceback."""
