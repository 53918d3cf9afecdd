"""A child process that reads DICOM files for the fuzz suite (tests/test_fuzz_dicom.py).

The DICOM reader ends in C and Rust decoders (OpenJPEG, CharLS, libjpeg, GDCM, pylibjpeg-rle); a
malformed file can crash or hang them, which would take a pytest process down with it. So the fuzz
tests send each case here, one JSON line per request on stdin, and read one JSON line back on
stdout; :class:`FuzzWorker` (the parent side) bounds every request by a timeout and notices a
crash (the pipe closes), keeps the input for reproduction, and starts a new child.

A request is ``{"fn": "read_hu" | "read_series", "path": ...}``; the answer is the outcome classified
the way the suite's contract needs it (``kind``: ``ok`` | ``dicom_error`` | ``other``), never a
traceback across the pipe unless something other than a DicomError escaped.
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path


def _classify(fn: str, path: str) -> dict:
    import numpy as np

    from spinestream.preprocess.dicom import DicomError, read_hu, read_series

    try:
        if fn == "read_hu":
            out = read_hu(path)
            bad: list = []
        else:
            out, meta = read_series(path)
            bad = [list(b) for b in meta.bad_files]
    except DicomError as e:
        return {"kind": "dicom_error", "message": str(e), "path": e.path}
    except BaseException as e:  # noqa: BLE001 - the whole point: report anything else
        if isinstance(e, KeyboardInterrupt):
            raise
        return {"kind": "other", "type": type(e).__name__, "message": str(e)[:2000],
                "traceback": traceback.format_exc()[-4000:]}
    arr = np.asarray(out)
    return {"kind": "ok", "dtype": str(arr.dtype), "shape": list(arr.shape),
            "finite": bool(np.isfinite(arr).all()), "bad_files": bad}


def serve() -> None:
    """The child's loop: one request line in, one answer line out, until stdin closes."""
    warnings.simplefilter("ignore")  # pydicom warns about every odd value; the answer is what counts
    out = sys.stdout
    sys.stdout = sys.stderr  # nothing a decoder prints may corrupt the answer channel
    # the parent's "ready" handshake: imports are done, the first request will not pay for them
    import spinestream.preprocess.dicom  # noqa: F401

    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        out.write(json.dumps(_classify(req["fn"], req["path"])) + "\n")
        out.flush()


class Crash(Exception):
    """The child died (a signal, an abort) or went silent past the timeout on one request."""


class FuzzWorker:
    """The parent side: ``worker.run("read_hu", path, timeout=10)`` -> the child's answer dict.

    Raises :class:`Crash` when the child dies or exceeds ``timeout`` on that request (it is then
    killed, and the next call starts a fresh child)."""

    def __init__(self) -> None:
        root = str(Path(__file__).resolve().parent.parent)  # the checkout: spinestream imports from there
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        self.env = dict(os.environ, PYTHONPATH=path, PYTHONFAULTHANDLER="1")
        self.proc: subprocess.Popen | None = None
        self.started = 0

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env,
            text=True, bufsize=1)
        self.started += 1
        self._read(timeout=120)  # the ready line

    def _read(self, timeout: float) -> dict:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise Crash(f"no answer within {timeout:.0f} s (a hang)")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    rc = self.proc.wait()
                    self.proc = None
                    sig = f" (signal {signal.Signals(-rc).name})" if rc < 0 else ""
                    raise Crash(f"the reader process died, exit status {rc}{sig}")
                return json.loads(line)

    def run(self, fn: str, path: str | Path, timeout: float = 20.0) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"fn": fn, "path": str(path)}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            self.proc = None
            raise Crash("the reader process died before the request") from None
        return self._read(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


if __name__ == "__main__":
    serve()
