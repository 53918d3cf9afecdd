"""WebDataset tar shards and their DALI ``.idx`` index files — writer and reader together.

A sample is two members, ``<slice_id:09d>.jpg`` (the 2.5D image, JPEG 4:4:4) and
``<slice_id:09d>.id`` (the slice_id as 8 little-endian bytes, so DALI's reader can return
it with ``dtypes=INT64``). Keys are integers because WebDataset splits member names at
the first dot and StudyInstanceUIDs are full of dots.

Tars are written byte-reproducibly: USTAR headers with mtime 0, uid/gid 0, empty owner
names, mode 0644, and the archive padded to tar's 10240-byte record like GNU tar and
Python's tarfile. The writer knows every member's data offset as it writes, so the
``.idx`` file (DALI's ``wds2idx`` format v1.2: a header line ``v1.2 <n_samples>`` then one
line per sample, ``<ext> <data offset> <size> <member name>`` for each component) costs
nothing and never needs a second pass over the tar.

The reader parses headers itself and accepts only regular files named like the
writer's members: no links, no directories, no paths (so nothing can point outside a
target directory), and a truncated archive is an error, not a short epoch.

Each shard has a third file, ``<name>.sums``: every sample's JPEG offset, size and CRC-32, in index
order (:func:`read_sums`), written with the tar. A shard's sha256 in the manifest says *that* it
changed; the sums say *which* sample did: ``spinestream verify`` names it, and the loaders check each
JPEG against its CRC as they read it (``loader.verify_samples``), so a sample corrupted after
sharding is never decoded into silent garbage (:class:`SampleError`). Shard sets written before the
sums existed have none; they read as before, without the per-sample check.

The loaders read samples at random through the index instead (:func:`index_records`: every
sample's tar, JPEG offset, size and slice_id; :class:`RecordReader`: its bytes by ``os.pread``):
random access is what gives a true global shuffle every epoch, an exact split between ranks and a
mid-epoch resume that is a seek instead of re-reading and discarding samples.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinestream import SpinestreamError

from .fsutil import NO_SPACE, WriteError, writing

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default blocking factor
IDX_VERSION = "v1.2"
KEY_DIGITS = 9
MEMBER_RE = re.compile(r"^(\d{9})\.(jpg|id)$")
EXTS = ("jpg", "id")


class ShardError(SpinestreamError, ValueError):
    """A shard or index file is missing, truncated, corrupt, or not what the manifest says."""


class SampleError(ShardError):
    """One sample of a shard is corrupt (its bytes fail their CRC-32, or its JPEG does not decode).

    ``tar``, ``slice_id`` and ``reason`` name it; the message is one line saying what to do."""

    def __init__(self, tar: str | Path, slice_id: int, reason: str):
        self.tar, self.slice_id, self.reason = str(tar), int(slice_id), reason
        super().__init__(f"{tar}: sample {key(slice_id)} (slice_id {slice_id}) {reason}; the shard is corrupt: "
                         f"run `spinestream verify` on the shard directory, re-shard it, or train on without "
                         f"such samples with loader.bad_samples=skip")

    def __reduce__(self):  # keep the fields across a DataLoader worker's pickling
        return (type(self), (self.tar, self.slice_id, self.reason))


SUMS_MAGIC = b"SSSUMS1\n"
SUMS_DTYPE = np.dtype([("offset", "<u8"), ("size", "<u4"), ("crc", "<u4")])


def sums_path(tar_path: str | Path) -> Path:
    """The per-sample checksum file of a shard: ``<name>.sums`` beside ``<name>.tar``."""
    return Path(tar_path).with_suffix(".sums")


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def read_sums(tar_path: str | Path) -> np.ndarray | None:
    """The shard's per-sample sums (:data:`SUMS_DTYPE`: JPEG offset, size, CRC-32 in index order), or None
    when the shard has none (written before they existed). A malformed file is a ShardError."""
    path = sums_path(tar_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    body = data[len(SUMS_MAGIC):]
    if not data.startswith(SUMS_MAGIC) or len(body) % SUMS_DTYPE.itemsize:
        raise ShardError(f"{path}: not a spinestream sums file (corrupt; re-shard, or delete it to read the "
                         "shard without per-sample checks)")
    return np.frombuffer(body, dtype=SUMS_DTYPE)


def key(slice_id: int) -> str:
    return f"{slice_id:0{KEY_DIGITS}d}"


def _header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


@dataclass
class ShardInfo:
    """What the writer produced; goes into the manifest."""

    samples: int
    bytes: int
    sha256: str
    index_sha256: str
    first_id: int
    last_id: int


class ShardWriter:
    """Write one tar + idx under temporary names; :meth:`close` renames both into place.

    Use as a context manager; on an exception the temporary files are removed and
    nothing appears under the final names.
    """

    def __init__(self, tar_path: str | Path, idx_path: str | Path | None = None):
        self.tar_path = Path(tar_path)
        self.idx_path = Path(idx_path) if idx_path else self.tar_path.with_suffix(".idx")
        self.sums_path = sums_path(self.tar_path)
        suffix = f".tmp-{os.getpid()}"
        self._tmp_tar = self.tar_path.with_name(self.tar_path.name + suffix)
        self._tmp_idx = self.idx_path.with_name(self.idx_path.name + suffix)
        self._tmp_sums = self.sums_path.with_name(self.sums_path.name + suffix)
        self._sums: list[tuple[int, int, int]] = []
        with writing(self.tar_path):
            self.tar_path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self._tmp_tar, "wb")
        self._sha = hashlib.sha256()
        self._offset = 0
        self._lines: list[str] = []
        self._ids: list[int] = []

    def _write(self, b: bytes) -> None:
        self._f.write(b)
        self._sha.update(b)
        self._offset += len(b)

    def _member(self, name: str, data: bytes) -> tuple[int, int]:
        self._write(_header(name, len(data)))
        off = self._offset
        self._write(data)
        pad = (-len(data)) % BLOCK
        if pad:
            self._write(b"\0" * pad)
        return off, len(data)

    def add(self, slice_id: int, jpeg: bytes) -> None:
        k = key(slice_id)
        parts = []
        for ext, data in (("jpg", jpeg), ("id", struct.pack("<q", slice_id))):
            off, size = self._member(f"{k}.{ext}", data)
            parts.append(f"{ext} {off} {size} {k}.{ext}")
            if ext == "jpg":
                self._sums.append((off, size, crc32(jpeg)))
        self._lines.append(" ".join(parts))
        self._ids.append(slice_id)

    def close(self) -> ShardInfo:
        if not self._ids:
            self.abort()
            raise ShardError(f"{self.tar_path}: refusing to write an empty shard")
        self._write(b"\0" * (2 * BLOCK))
        pad = (-self._offset) % RECORD
        if pad:
            self._write(b"\0" * pad)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        idx = (f"{IDX_VERSION} {len(self._lines)}\n" + "\n".join(self._lines) + "\n").encode()
        sums = SUMS_MAGIC + np.array(self._sums, dtype=SUMS_DTYPE).tobytes()
        for tmp, data in ((self._tmp_idx, idx), (self._tmp_sums, sums)):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        # sums and index first, then the tar: a tar under its final name always has both
        os.replace(self._tmp_sums, self.sums_path)
        os.replace(self._tmp_idx, self.idx_path)
        os.replace(self._tmp_tar, self.tar_path)
        return ShardInfo(
            samples=len(self._ids),
            bytes=self._offset,
            sha256=self._sha.hexdigest(),
            index_sha256=hashlib.sha256(idx).hexdigest(),
            first_id=self._ids[0],
            last_id=self._ids[-1],
        )

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        for p in (self._tmp_tar, self._tmp_idx, self._tmp_sums):
            p.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            if isinstance(exc, OSError) and exc.errno in NO_SPACE and not isinstance(exc, WriteError):
                raise WriteError.of(self.tar_path, exc) from exc  # a full disk names the shard


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of the data, not the header
    size: int


def scan_tar(path: str | Path) -> list[Member]:
    """List a shard's members (name, data offset, size), validating every header."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard file is missing")
    total = path.stat().st_size
    out: list[Member] = []
    with open(path, "rb") as f:
        pos = 0
        while True:
            hdr = f.read(BLOCK)
            if len(hdr) < BLOCK:
                raise ShardError(f"{path}: truncated at byte {pos} (no end-of-archive marker)")
            if hdr == b"\0" * BLOCK:
                break
            try:
                ti = tarfile.TarInfo.frombuf(hdr, "utf-8", "strict")
            except tarfile.HeaderError as e:
                raise ShardError(f"{path}: corrupt tar header at byte {pos} ({e})") from e
            if ti.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):  # no links, devices, sparse or pax members
                raise ShardError(f"{path}: member {ti.name!r} at byte {pos} is not a regular file")
            if ti.size < 0:  # base-256 sizes can be negative: the scan would go backwards, for ever
                raise ShardError(f"{path}: corrupt tar header at byte {pos} (member {ti.name!r} has size {ti.size})")
            if not MEMBER_RE.match(ti.name):
                raise ShardError(
                    f"{path}: unexpected member name {ti.name!r} at byte {pos} "
                    f"(expected <slice_id:09d>.jpg / .id; paths are never allowed)"
                )
            data_off = pos + BLOCK
            end = data_off + ti.size
            if end > total:
                raise ShardError(f"{path}: truncated inside member {ti.name!r}")
            out.append(Member(ti.name, data_off, ti.size))
            pos = data_off + ti.size + ((-ti.size) % BLOCK)
            f.seek(pos)
    return out


def iter_samples(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(slice_id, jpeg_bytes)`` for every sample of a shard, in file order."""
    path = Path(path)
    members = scan_tar(path)
    if len(members) % 2:
        raise ShardError(f"{path}: odd number of members ({len(members)}); a sample is incomplete")
    with open(path, "rb") as f:
        for jm, im in zip(members[0::2], members[1::2]):
            kj, ej = MEMBER_RE.match(jm.name).groups()
            ki, ei = MEMBER_RE.match(im.name).groups()
            if (ej, ei) != EXTS or kj != ki:
                raise ShardError(f"{path}: expected {kj}.jpg then {kj}.id, got {jm.name}, {im.name}")
            f.seek(im.offset)
            raw = f.read(im.size)
            if im.size != 8:
                raise ShardError(f"{path}: {im.name} holds {im.size} bytes, expected 8")
            (sid,) = struct.unpack("<q", raw)
            if key(sid) != kj:
                raise ShardError(f"{path}: {im.name} holds slice_id {sid}, which does not match its name")
            f.seek(jm.offset)
            yield sid, f.read(jm.size)


def read_index(path: str | Path) -> list[list[tuple[str, int, int, str]]]:
    """Parse a DALI ``.idx`` file: one list of ``(ext, offset, size, name)`` per sample."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: index file is missing (rewrite the shards with `spinestream shard`)")
    lines = path.read_text().splitlines()
    if not lines:
        raise ShardError(f"{path}: index file is empty")
    head = lines[0].split()
    if len(head) != 2 or head[0] != IDX_VERSION or not head[1].isdigit():
        raise ShardError(f"{path}: bad index header {lines[0]!r} (expected '{IDX_VERSION} <n>')")
    n = int(head[1])
    if len(lines) - 1 != n:
        raise ShardError(f"{path}: header says {n} samples, file has {len(lines) - 1}")
    out = []
    for i, line in enumerate(lines[1:], 1):
        tok = line.split()
        if len(tok) % 4 or not all(tok[j].isdigit() and tok[j + 1].isdigit() for j in range(1, len(tok), 4)):
            raise ShardError(f"{path}: line {i + 1} is malformed (expected '<ext> <offset> <size> <name>' "
                             "groups with non-negative integers)")
        out.append([(tok[j], int(tok[j + 1]), int(tok[j + 2]), tok[j + 3]) for j in range(0, len(tok), 4)])
    return out


def write_subset_index(src: str | Path, dst: str | Path, keep) -> int:
    """Write ``dst``: the ``.idx`` ``src`` restricted to the samples where ``keep`` (one bool per
    sample, in index order) is true, lines copied verbatim. DALI's reader then reads only those
    samples of the same tar (how positive oversampling adds extra reads of a shard's positives
    without copying any image). Atomic; returns the number of samples kept."""
    from .fsutil import atomic_write_bytes

    lines = Path(src).read_text().splitlines()
    read_index(src)  # validates the header and the line count
    keep = list(keep)
    if len(keep) != len(lines) - 1:
        raise ValueError(f"{src}: {len(lines) - 1} samples, keep has {len(keep)}")
    chosen = [line for line, k in zip(lines[1:], keep) if k]
    atomic_write_bytes(dst, "\n".join([f"{IDX_VERSION} {len(chosen)}", *chosen, ""]).encode())
    return len(chosen)


def check_index(tar_path: str | Path, idx_path: str | Path) -> int:
    """Check that an index describes its tar exactly; returns the number of samples."""
    members = scan_tar(tar_path)
    entries = [c for sample in read_index(idx_path) for c in sample]
    got = [(name, off, size) for _, off, size, name in entries]
    want = [(m.name, m.offset, m.size) for m in members]
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise ShardError(
            f"{idx_path}: does not match {tar_path} (first difference at component {first}: "
            f"index {got[first] if first < len(got) else None}, tar {want[first] if first < len(want) else None})"
        )
    return len(members) // 2


def index_records(indexes: Sequence[str | Path], samples: Sequence[int]) -> dict[str, np.ndarray]:
    """Every sample of the shards whose ``.idx`` files are ``indexes`` (``samples``: how many each must
    hold, the manifest's count), shard by shard in index order: ``shard`` (position in ``indexes``),
    ``offset`` and ``size`` of its JPEG in the tar, and its ``slice_id`` (from the member name)."""
    shard, off, size, sid = [], [], [], []
    for k, (idx, want) in enumerate(zip(indexes, samples, strict=True)):
        entries = read_index(idx)
        if len(entries) != want:
            raise ShardError(f"{idx}: {len(entries)} samples, manifest says {want}")
        for comps in entries:
            jpg = next((c for c in comps if c[0] == "jpg"), None)
            m = MEMBER_RE.match(jpg[3]) if jpg is not None else None
            if m is None:
                raise ShardError(f"{idx}: a sample has no <slice_id:09d>.jpg component ({comps})")
            shard.append(k)
            off.append(jpg[1])
            size.append(jpg[2])
            sid.append(int(m.group(1)))
    return {"shard": np.asarray(shard, np.int32), "offset": np.asarray(off, np.int64),
            "size": np.asarray(size, np.int64), "slice_id": np.asarray(sid, np.int64)}


def sample_crcs(tars: Sequence[str | Path], rec: dict[str, np.ndarray]) -> np.ndarray | None:
    """Each record's CRC-32 from its shard's ``.sums`` (int64, -1 where the shard has none), or None when no
    shard has any. A sums file that does not list a record's (offset, size) is a ShardError (stale)."""
    n = len(rec["slice_id"])
    out = np.full(n, -1, dtype=np.int64)
    shard = rec["shard"]
    if n and np.any(np.diff(shard) < 0):
        raise ValueError("records must be grouped shard by shard (as index_records returns them)")
    bounds = np.searchsorted(shard, np.arange(len(tars) + 1))
    cache: dict[str, np.ndarray | None] = {}
    found = False
    for k, tar in enumerate(tars):
        a, b = bounds[k], bounds[k + 1]
        if a == b:
            continue
        if str(tar) not in cache:
            cache[str(tar)] = read_sums(tar)
        sums = cache[str(tar)]
        if sums is None:
            continue
        found = True
        off, size = rec["offset"][a:b], rec["size"][a:b]
        pos = np.clip(np.searchsorted(sums["offset"], off), 0, max(len(sums) - 1, 0))
        if not len(sums) or not (np.array_equal(sums["offset"][pos], off) and np.array_equal(sums["size"][pos], size)):
            raise ShardError(f"{sums_path(tar)}: does not list the samples its index names (left from another "
                             "run? re-shard, or delete it to read the shard without per-sample checks)")
        out[a:b] = sums["crc"][pos]
    return out if found else None


class RecordReader:
    """Record ``i`` of :func:`index_records` -> its JPEG bytes, read with ``os.pread``.

    One descriptor per shard, opened lazily; ``pread`` never moves a file offset, so forked
    DataLoader workers may share inherited descriptors (spawned ones reopen them).

    Every record must lie inside its tar (checked once here: a stale or forged ``.idx`` would
    otherwise ask ``pread`` for any size at any offset). With ``verify`` (the default) each read is
    checked against the shard's CRC-32 (:func:`sample_crcs`; ~27 µs per 120 KB) and a mismatch is a
    :class:`SampleError` naming the shard and the sample."""

    def __init__(self, tars: list[str], rec: dict[str, np.ndarray], *, verify: bool = True,
                 crc: np.ndarray | None = None):
        self.tars, self.rec = tars, rec
        self._fds: dict[int, int] = {}
        if crc is None:
            self._check_bounds()
            crc = sample_crcs(tars, rec) if verify else None
        self.crc = crc

    def _check_bounds(self) -> None:
        if not len(self.rec["slice_id"]):
            return
        sizes = np.asarray([os.stat(t).st_size for t in self.tars], dtype=np.int64)
        off, size = self.rec["offset"], self.rec["size"]
        bad = np.flatnonzero((off < 0) | (size <= 0) | (off + size > sizes[self.rec["shard"]]))
        if len(bad):
            i = int(bad[0])
            tar = self.tars[int(self.rec["shard"][i])]
            raise ShardError(f"{tar}: its index puts sample {key(int(self.rec['slice_id'][i]))} at bytes "
                             f"{int(off[i])}..{int(off[i] + size[i])}, outside the {sizes[self.rec['shard'][i]]}-byte "
                             f"tar ({len(bad)} such samples; a stale or forged .idx: re-shard)")

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
        if self.crc is not None and self.crc[i] >= 0 and crc32(data) != self.crc[i]:
            raise SampleError(self.tars[k], int(self.rec["slice_id"][i]),
                              f"(JPEG at byte {off}, {size} bytes) fails its CRC-32")
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
        return {"tars": self.tars, "rec": self.rec, "crc": self.crc}

    def __setstate__(self, state):
        self.tars, self.rec, self.crc = state["tars"], state["rec"], state["crc"]
        self._fds = {}
