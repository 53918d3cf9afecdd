"""``spinestream verify OUT``: check a shard directory against its manifest.

Checks, and exits non-zero naming the file on the first class of problem found:

* every shard and index file listed exists, with the recorded sha256 and byte size; where a shard's
  sha256 differs, its ``.sums`` (every sample's CRC-32) names the samples whose bytes changed, with
  their study and slice number (a shard set written before the sums existed can only name the shard);
* every sample matches its CRC-32 and the sums file lists the samples the index does;
* every tar parses (regular members named ``<slice_id:09d>.jpg/.id`` only, nothing
  truncated), holds the recorded number of samples, and each ``.id`` matches its name;
* every index file describes its tar exactly (same members, offsets and sizes);
* every slice_id of ``slices.parquet`` is in exactly one shard, the one the table names,
  and no shard holds a slice_id the table lacks;
* the label table covers only known slices; every study has its volume with as many
  slices as the table says;
* no stray ``.tar`` files lie in ``wds/`` (a leftover from another run).

``--quick`` skips hashing and tar parsing (index files and tables only). On success it
also prints a summary of the manifest's data warnings (what the job changed on the way:
boxes on missing slices, resized slices, segmentations left out, ordering fallbacks).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from spinestream import SpinestreamError

from .progress import bar
from .fsutil import sha256_file
from .layout import Layout
from .manifest import Manifest, ShardEntry, read_manifest
from .tables import read_label_table, read_slice_table, read_study_table
from .wds import ShardError, check_index, crc32, iter_samples, read_index, read_sums, sums_path


class VerifyError(SpinestreamError, ValueError):
    """The shard set does not match its manifest (every problem found is listed)."""


def verify(root: str | Path, *, quick: bool = False, decode: bool = False, progress: bool = True) -> dict:
    """Verify ``root``; returns counts, raises :class:`VerifyError` listing every problem found."""
    root = Path(root)
    lay = Layout(root)
    m = read_manifest(root)
    problems: list[str] = []
    slices = read_slice_table(lay.slices)
    n_total = len(slices)
    seen = np.zeros(n_total, dtype=np.int32)  # (N,) how many shards hold each slice_id
    if not np.array_equal(slices.slice_id.to_numpy(), np.arange(n_total)):
        problems.append(f"{lay.slices}: slice_id is not 0..{n_total - 1} in order")
    shard_col = slices.shard.to_numpy()
    study_col, number_col = slices.StudyInstanceUID.to_numpy(), slices.slice_number.to_numpy()

    def describe(sid: int) -> str:
        if 0 <= sid < n_total:
            return f"{sid:09d} (study {study_col[sid]}, slice {number_col[sid]})"
        return f"{sid:09d}"

    for s in bar(m.shards, desc="verify", unit="shard", disable=not progress):
        try:
            ids, bad_samples = _shard_ids(root, s, quick=quick, decode=decode, describe=describe)
            problems += bad_samples  # the shard's structure is sound: its slice_ids still count below
            bad = ids[(ids < 0) | (ids >= n_total)]
            if len(bad):
                raise ShardError(f"{root / s.path}: slice_ids {bad[:5].tolist()} are not in slices.parquet")
            np.add.at(seen, ids, 1)
            wrong = ids[shard_col[ids] != s.name]
            if len(wrong):
                problems.append(f"{root / s.path}: holds slice_ids {wrong[:5].tolist()} that slices.parquet "
                                "puts in another shard")
        except ShardError as e:
            problems.append(str(e))
    problems += _coverage_problems(lay, m, seen)

    truth = read_label_table(lay.truth).frame
    tid = truth.slice_id.to_numpy()
    if len(tid) and (tid.min() < 0 or tid.max() >= n_total or len(np.unique(tid)) != len(tid)):
        problems.append(f"{lay.truth}: slice_ids outside slices.parquet or duplicated")
    studies = read_study_table(lay.studies)
    if not quick:
        problems += _volume_problems(lay, studies)
    if len(m.warnings) != m.counts.warnings:
        problems.append(f"manifest: {len(m.warnings)} warnings listed, counts.warnings says {m.counts.warnings}")
    if problems:
        raise VerifyError("\n".join(problems))
    return {"shards": len(m.shards), "slices": n_total, "studies": len(studies), "labelled": len(truth),
            "warnings": warning_summary(m)}


def _shard_ids(root: Path, s: ShardEntry, *, quick: bool, decode: bool, describe=str) -> tuple[np.ndarray, list[str]]:
    """The slice_ids one shard holds and its problems that leave them known (corrupt samples, named where
    the shard has its ``.sums``); a ShardError when the shard itself does not match its manifest entry."""
    tar, idx = root / s.path, root / s.index
    if not tar.is_file():
        raise ShardError(f"{tar}: listed in the manifest but missing")
    if not idx.is_file():
        raise ShardError(f"{idx}: index file is missing (DALI needs it; rerun `spinestream shard` into a new --out)")
    if tar.stat().st_size != s.bytes:
        raise ShardError(f"{tar}: {tar.stat().st_size} bytes, manifest says {s.bytes} (truncated or replaced?)")
    found: list[str] = []
    if quick:
        ids = [int(c[0][3].split(".")[0]) for c in read_index(idx)]
        n = len(ids)
    else:
        tar_ok = sha256_file(tar) == s.sha256
        if sha256_file(idx) != s.index_sha256:
            raise ShardError(f"{idx}: sha256 does not match the manifest")
        sums = read_sums(tar)
        try:
            n = check_index(tar, idx)
            ids, changed, undecodable = [], [], []
            for k, (sid, data) in enumerate(iter_samples(tar)):
                ids.append(sid)
                if sums is not None and (k >= len(sums) or crc32(data) != int(sums["crc"][k])):
                    changed.append(sid)
                if decode:
                    from .sample import decode_jpeg

                    try:
                        decode_jpeg(data)
                    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
                        undecodable.append(f"{describe(sid)}: {type(e).__name__}: {e}")
        except ShardError as e:
            raise ShardError(f"{e}" if tar_ok else f"{tar}: sha256 does not match the manifest; {e}") from None
        if sums is not None and len(sums) != n:
            raise ShardError(f"{sums_path(tar)}: lists {len(sums)} samples, the shard holds {n} (stale sums file)")
        found = []
        if not tar_ok:
            if changed:
                shown = ", ".join(describe(i) for i in changed[:5]) + (" ..." if len(changed) > 5 else "")
                found.append(f"{tar}: sha256 does not match the manifest; {len(changed)} corrupt sample(s) "
                             f"(bytes changed since sharding): {shown}; re-shard, or train with "
                             f"loader.bad_samples=skip")
            else:
                found.append(f"{tar}: sha256 does not match the manifest (corrupt or replaced"
                             + ("; no per-sample sums in this shard set to say which sample)" if sums is None else
                                "; every sample still matches its CRC-32: a tar header or padding changed)"))
        elif changed:
            found.append(f"{sums_path(tar)}: does not match {tar}, whose sha256 matches the manifest "
                         "(the sums file is corrupt; re-shard, or delete it)")
        if undecodable:
            found.append(f"{tar}: {len(undecodable)} sample(s) do not decode: {'; '.join(undecodable[:3])}")
    if n != s.samples:
        raise ShardError(f"{tar}: {n} samples, manifest says {s.samples}")
    return np.asarray(ids, dtype=np.int64), found


def _coverage_problems(lay: Layout, m: Manifest, seen: np.ndarray) -> list[str]:
    """Every slice_id in exactly one shard, no stray tars, the counts adding up."""
    problems = []
    missing, dup = np.flatnonzero(seen == 0), np.flatnonzero(seen > 1)
    if len(missing):
        problems.append(f"{len(missing)} slice_ids are in no shard (first: {missing[:5].tolist()})")
    if len(dup):
        problems.append(f"{len(dup)} slice_ids are in more than one shard (first: {dup[:5].tolist()})")
    listed = {Path(s.path).name for s in m.shards}
    stray = sorted(p.name for p in lay.wds.glob("*.tar") if p.name not in listed) if lay.wds.exists() else []
    if stray:
        problems.append(f"{lay.wds}: shards not in the manifest: {stray[:5]} (left from another run?)")
    if len(m.shards) and sum(s.samples for s in m.shards) != m.counts.slices:
        problems.append("manifest: shard sample counts do not add up to counts.slices")
    return problems


def _volume_problems(lay: Layout, studies) -> list[str]:
    """Every study has its volume, with as many slices and the slice_id offset the table says."""
    from .volumes import open_volume, read_attrs

    problems = []
    for row in studies.itertuples(index=False):
        try:
            vol = open_volume(lay.volumes, row.StudyInstanceUID)
            attrs = read_attrs(lay.volumes / row.StudyInstanceUID)
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
            continue
        if vol.shape[0] != row.n_slices or attrs.slice_id_offset != row.slice_id_offset or len(attrs.z) != row.n_slices:
            problems.append(f"{lay.volumes / row.StudyInstanceUID}: {vol.shape[0]} slices / offset "
                            f"{attrs.slice_id_offset}, studies.parquet says {row.n_slices} / {row.slice_id_offset}")
    return problems


def warning_summary(m: Manifest, examples: int = 3) -> list[str]:
    """Lines summarising the manifest's data warnings: how many, in how many studies, by kind."""
    if not m.warnings:
        return []
    kinds: dict[str, list[str]] = {}
    for w in m.warnings:
        kinds.setdefault(_kind(w.message), []).append(w.study or "(job)")
    studies = {w.study for w in m.warnings if w.study}
    lines = [f"{len(m.warnings)} data warning(s) in {len(studies)} studies (manifest.json 'warnings'):"]
    for kind, who in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(sorted(set(who))[:examples]) + (" ..." if len(set(who)) > examples else "")
        lines.append(f"  {len(who):5d}  {kind}  [{shown}]")
    return lines


_KINDS = (("segmentation", "segmentation left out"), ("box", "boxes dropped"), ("resized", "slices resized"),
          ("ordered by", "slice order fallback"), ("spacing", "spacing fallback"), ("PixelSpacing", "spacing fallback"))


def _kind(message: str) -> str:
    for needle, kind in _KINDS:
        if needle in message:
            return kind
    return "other"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinestream verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="a directory written by `spinestream shard`")
    p.add_argument("--quick", action="store_true", help="index files and tables only (no hashing, no tar parsing)")
    p.add_argument("--decode", action="store_true", help="also decode every JPEG")
    args = p.parse_args(argv)
    try:
        r = verify(args.out, quick=args.quick, decode=args.decode)
    except VerifyError as e:  # the verdict, every problem listed (not a shard set at all: the console script's line)
        print(f"spinestream verify: FAILED for {args.out}\n{e}", file=sys.stderr)
        return 1
    print(f"spinestream verify: OK — {r['shards']} shards, {r['slices']} slices (each exactly once), "
          f"{r['studies']} studies with volumes, {r['labelled']} labelled slices")
    for line in r["warnings"]:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
