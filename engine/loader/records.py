"""Random access to the samples of a selection: JPEG bytes by their ``.idx`` offset (``os.pread``).

Both backends read through this: random access is what gives a true global shuffle every
epoch, an exact split between ranks and a mid-epoch resume that is a seek instead of
re-reading and discarding samples. One descriptor per shard, opened lazily; ``pread`` never
moves a file offset, so forked DataLoader workers may share inherited descriptors.
"""
from __future__ import annotations

import os

import numpy as np


class RecordReader:
    """Record ``i`` of :meth:`Selection.records` -> its JPEG bytes."""

    def __init__(self, tars: list[str], rec: dict[str, np.ndarray]):
        self.tars, self.rec = tars, rec
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.rec["slice_id"])

    def _fd(self, k: int) -> int:
        fd = self._fds.get(k)
        if fd is None:
            fd = self._fds[k] = os.open(self.tars[k], os.O_RDONLY)
        return fd

    def read(self, i: int) -> bytes:
        k = int(self.rec["shard"][i])
        size, off = int(self.rec["size"][i]), int(self.rec["offset"][i])
        data = os.pread(self._fd(k), size, off)
        if len(data) != size:
            raise OSError(f"{self.tars[k]}: short read at offset {off} (truncated shard?)")
        return data

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __del__(self):
        self.close()

    def __getstate__(self):  # descriptors do not travel to spawned workers; they reopen
        return {"tars": self.tars, "rec": self.rec}

    def __setstate__(self, state):
        self.__init__(state["tars"], state["rec"])
