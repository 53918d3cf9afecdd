"""``spinestream bench decode``: DICOM decode per transfer syntax -- spinestream's read path next to
every library that can decode the syntax alone, measured side by side (issue 21).

One real 512x512 CT slice (pydicom-data's ``693_UNCR.dcm``: signed, 14 bits stored; pydicom's
``CT_small.dcm`` tiled to 512x512 when pydicom-data is not installed) is written in each syntax
(GDCM's encoder for JPEG Lossless and JPEG-LS where installed, as archives are; OpenJPH for HTJ2K;
pydicom's RLE; pydicom-data's real ``693_J2KR.dcm`` for JPEG 2000). Per syntax, every candidate
turns the file into the slice's stored values, **file read and parse included**, in alternating
rounds (each round calls every candidate once, in a rotating order), and the median per candidate
is kept -- of its **CPU time** (every thread of the process counted; wall time is in the JSON): the
shard job and predict run one decoding process per core, so a library that starts threads of its
own (GDCM's JPEG 2000 decoder does, on every core) gains nothing there and is charged for them:

* ``spinestream`` -- the reader's own path (``preprocess.dicom``: parse, then
  ``preprocess.decoders``' chain), and ``spinestream (before)``, the same with
  ``SPINESTREAM_DICOM_DECODER=legacy`` (the decoder choice before issue 21);
* ``pydicom+<plugin>`` -- ``pydicom.pixels.pixel_array`` with each installed plugin;
* ``pydicom+imagecodecs.<codec>`` -- pydicom's parse, the frame's bytes, the codec alone;
* ``dicomsdl`` -- its own (C++) parse and decode, where installed.

Each candidate's output is compared with the reference stored values (the source slice); a
candidate that gives other values is listed as *wrong* and never counts as the floor. The
**decode floor** is the fastest correct library candidate (spinestream's rows excluded); the
table gives spinestream's rate as a fraction of it (>= 0.9 is the goal), and slices/s per core
(one process, one thread: the shard job and predict run one decoding process per core).

``decode_table()`` returns the rows and ``print_decode_table()`` prints them, for ``bench predict``
(and ``bench shard``) to show the same table. Figures go to ``benchmarks/results/decode.json``.
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SYNTAXES = ("explicit", "jpeg-lossless", "jpeg-lossless-p14", "jpeg-ls", "htj2k", "rle", "j2k")
"""``jpeg-lossless`` is GDCM's encoding (as archives hold it); ``jpeg-lossless-p14`` libjpeg-turbo's at
precision == BitsStored (14), the case where a decoder that does not sign-extend returns -2000 as 14384."""
KAGGLE_STUDIES, KAGGLE_SLICES, LIMIT_H = 1500, 350, 9.0


@dataclass
class Candidate:
    name: str
    read: Callable[[Path], np.ndarray]
    ours: bool = False  # spinestream's own rows: never the floor


def _uid(syntax: str) -> str:
    from pydicom import uid

    return {"explicit": uid.ExplicitVRLittleEndian, "jpeg-lossless": uid.JPEGLosslessSV1,
            "jpeg-lossless-p14": uid.JPEGLosslessSV1,
            "jpeg-ls": uid.JPEGLSLossless, "htj2k": uid.HTJ2KLossless, "rle": uid.RLELossless,
            "j2k": uid.JPEG2000Lossless}[syntax]


def source_slice():
    """(dataset, description) of the real CT slice the files are made from."""
    import pydicom
    from pydicom.data import get_testdata_file

    p = get_testdata_file("693_UNCR.dcm", download=False)
    if p is not None:
        return pydicom.dcmread(p), "pydicom-data 693_UNCR.dcm (512x512 CT, signed, 14 bits stored)"
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    a = np.tile(ds.pixel_array, (4, 4))
    ds.Rows, ds.Columns = a.shape
    ds.PixelData = a.tobytes()
    return ds, "pydicom CT_small.dcm tiled to 512x512 (signed 16-bit; pydicom-data not installed)"


def write_syntax(ds, syntax: str, path: Path) -> Path:
    """``ds`` (explicit VR little endian) written in ``syntax`` to ``path``."""
    import imagecodecs
    from pydicom.encaps import encapsulate

    ts = _uid(syntax)
    plain = path.with_name(path.stem + "-plain.dcm")
    ds.save_as(plain, enforce_file_format=True)
    if syntax == "explicit":
        return plain.replace(path)
    if syntax in _GDCM_NAMES:
        try:
            if gdcm_transcode(plain, path, _GDCM_NAMES[syntax]):
                return path
        except ImportError:
            pass  # no GDCM: imagecodecs' encoder below
    if syntax == "j2k":
        from pydicom.data import get_testdata_file

        real = get_testdata_file("693_J2KR.dcm", download=False)
        if real is not None and "693_UNCR" in str(ds.filename or ""):
            path.write_bytes(Path(real).read_bytes())
            return path
    out = copy.deepcopy(ds)
    a = out.pixel_array
    bits = int(out.BitsStored)
    samples = (a.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint16)
    if syntax == "rle" or syntax == "j2k":
        out.compress(ts, encoding_plugin="pydicom" if syntax == "rle" else "pylibjpeg")
        out.save_as(path, enforce_file_format=True)
        return path
    frame = {"jpeg-lossless-p14": lambda: imagecodecs.jpeg8_encode(samples, lossless=True, predictor=1, bitspersample=bits),
             "jpeg-lossless": lambda: imagecodecs.jpeg8_encode(samples, lossless=True, predictor=1, bitspersample=bits),
             "jpeg-ls": lambda: imagecodecs.jpegls_encode(a.view(np.uint16) if a.dtype.kind == "i" else a),
             "htj2k": lambda: imagecodecs.htj2k_encode(a, reversible=True)}[syntax]()
    out.PixelData = encapsulate([frame])
    out["PixelData"].VR = "OB"
    out["PixelData"].is_undefined_length = True
    out.file_meta.TransferSyntaxUID = ts
    out.save_as(path, enforce_file_format=True)
    return path


_GDCM_NAMES = {"jpeg-lossless": "JPEGLosslessProcess14_1", "jpeg-ls": "JPEGLSLossless"}


def gdcm_transcode(src: Path, dst: Path, ts_name: str) -> bool:
    """``src`` re-encoded by GDCM in ``gdcm.TransferSyntax.<ts_name>`` at ``dst`` (GDCM is the installed encoder
    of JPEG Lossless process 14 and JPEG-LS as archives hold them) -> whether every step succeeded. Raises
    ImportError without python-gdcm. The tests' real-CT fixtures are made with it too."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        return False
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, ts_name)))
    change.SetInput(reader.GetImage())
    if not change.Change():
        return False
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    return bool(writer.Write())


def candidates(syntax: str) -> list[Candidate]:
    """Every way this machine has to turn a file of ``syntax`` into stored values."""
    import pydicom
    from pydicom.pixels import pixel_array

    from spinestream.preprocess import decoders, dicom

    ts = _uid(syntax)
    options = dict(dicom._DECODE_OPTIONS, correct_unused_bits=True)

    def ours(path: Path) -> np.ndarray:
        return dicom._decode_frame(dicom._read_dataset(path), path, 0)

    def before(path: Path) -> np.ndarray:
        with decoders.pinned("legacy"):
            return ours(path)

    out = [Candidate("spinestream", ours, ours=True), Candidate("spinestream (before)", before, ours=True)]
    for plugin in decoders._pydicom_plugins(ts):
        out.append(Candidate(f"pydicom+{plugin or 'numpy'}", lambda p, plugin=plugin: pixel_array(
            pydicom.dcmread(io.BytesIO(p.read_bytes())), decoding_plugin=plugin, **options)))
    for d in decoders.chain_for(ts, "auto"):
        if d.codec is None:
            continue

        def codec(p: Path, d=d) -> np.ndarray:
            ds = pydicom.dcmread(io.BytesIO(p.read_bytes()))
            info = decoders.frame_info(ds)
            data = decoders.frame_bytes(ds, info, 0)
            return decoders.normalise(d.codec(data, info), data, info, correct_unused_bits=True)

        out.append(Candidate(f"pydicom+{d.name}", codec))
    if ts == pydicom.uid.ExplicitVRLittleEndian:
        def frombuffer(p: Path) -> np.ndarray:
            ds = pydicom.dcmread(io.BytesIO(p.read_bytes()))
            info = decoders.frame_info(ds)
            return decoders._native(ds, info, 0, True)

        out.append(Candidate("pydicom+frombuffer", frombuffer))
    try:
        import dicomsdl
    except ImportError:
        dicomsdl = None
    if dicomsdl is not None:
        def sdl(p: Path) -> np.ndarray:
            d = dicomsdl.open_memory(p.read_bytes())
            info = d.getPixelDataInfo()
            arr = np.empty((info["Rows"], info["Cols"]), dtype=np.dtype(info["dtype"]))
            d.copyFrameData(0, arr)
            return arr

        out.append(Candidate("dicomsdl", sdl))
    return out


def _median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def measure(syntax: str, path: Path, expected: np.ndarray, rounds: int) -> dict:
    """One syntax: every candidate, ``rounds`` alternating calls each -> a table row."""
    import warnings

    cands = candidates(syntax)
    correct: dict[str, str] = {}
    for c in cands:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = c.read(path)
        except Exception as e:  # noqa: BLE001 -- a library that cannot read the file is listed as such
            correct[c.name] = f"failed: {type(e).__name__}"
            continue
        ok = got is not None and got.shape == expected.shape and np.array_equal(got, expected)
        correct[c.name] = "ok" if ok else "wrong pixels"
    live = [c for c in cands if correct[c.name] == "ok" or not c.ours and correct[c.name] == "wrong pixels"]
    times: dict[str, list[float]] = {c.name: [] for c in live}
    cpu: dict[str, list[float]] = {c.name: [] for c in live}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(rounds):
            k = r % len(live)
            for c in live[k:] + live[:k]:  # rotate who goes first
                c0, t0 = time.process_time(), time.perf_counter()
                c.read(path)
                times[c.name].append(time.perf_counter() - t0)
                cpu[c.name].append(time.process_time() - c0)
    # Per core: CPU time, every thread of the process counted. A library that starts threads on its
    # own (GDCM's JPEG 2000 decoder, on every core) is charged for them: the shard job and predict
    # already keep every core busy with one decoding process each, so its wall time there is its CPU
    # time. Single-threaded candidates (spinestream's) have CPU time == wall time, give or take I/O.
    ms = {name: _median_ms(t) for name, t in cpu.items()}
    wall_ms = {name: _median_ms(t) for name, t in times.items()}
    libs = {c.name: ms[c.name] for c in live if not c.ours and correct[c.name] == "ok"}
    floor_name = min(libs, key=libs.get) if libs else None
    ours = ms.get("spinestream")
    row = {
        "syntax": syntax, "transfer_syntax": _uid(syntax), "file_bytes": path.stat().st_size,
        "spinestream_ms": ours, "before_ms": ms.get("spinestream (before)"),
        "floor": floor_name, "floor_ms": libs.get(floor_name) if floor_name else None,
        "candidates_ms": ms, "candidates_wall_ms": wall_ms, "correct": correct, "rounds": rounds,
        "spinestream_wall_ms": wall_ms.get("spinestream"),
    }
    row["ratio_vs_floor"] = (row["floor_ms"] / ours) if ours and row["floor_ms"] else None
    row["speedup_vs_before"] = (row["before_ms"] / ours) if ours and row["before_ms"] else None
    row["slices_s_per_core"] = 1e3 / ours if ours else None
    row["before_slices_s_per_core"] = 1e3 / row["before_ms"] if row["before_ms"] else None
    row["floor_slices_s_per_core"] = 1e3 / row["floor_ms"] if row["floor_ms"] else None
    return row


def decode_table(*, syntaxes=SYNTAXES, rounds: int = 64, work: Path | None = None, quiet: bool = True) -> list[dict]:
    """Measure every syntax of ``syntaxes`` (see the module doc) -> one row per syntax."""
    ds, what = source_slice()
    expected = ds.pixel_array
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        base = Path(work or tmp)
        for syn in syntaxes:
            path = write_syntax(copy.deepcopy(ds), syn, base / f"{syn}.dcm")
            row = measure(syn, path, expected, rounds)
            row["source"] = what
            rows.append(row)
            if not quiet:
                print(_line(row), flush=True)
    return rows


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _line(r: dict) -> str:
    return (f"{r['syntax']:14s} {_fmt(r['spinestream_ms'], '7.2f')} ms {_fmt(r['slices_s_per_core'], '7.0f')}/s   "
            f"before {_fmt(r['before_ms'], '7.2f')} ms ({_fmt(r['speedup_vs_before'], '4.1f')}x faster now)   "
            f"floor {r['floor'] or '-':28s} {_fmt(r['floor_ms'], '7.2f')} ms   "
            f"spinestream/floor rate {_fmt(r['ratio_vs_floor'], '5.2f')}")


def print_decode_table(rows: list[dict], *, candidates: bool = True) -> None:
    """The table of :func:`decode_table`'s rows (ms per slice = file read + parse + decode, one core)."""
    print("DICOM decode per transfer syntax, CPU ms per slice (read + parse + decode; every thread counted), "
          "slices/s per core, median of alternating calls:")
    for r in rows:
        print(_line(r))
        if candidates:
            wall = r.get("candidates_wall_ms", {})
            for name, ms in sorted(r["candidates_ms"].items(), key=lambda kv: kv[1]):
                note = "" if r["correct"][name] == "ok" else f"  <- {r['correct'][name]}, not a floor"
                w = wall.get(name)
                if w is not None and abs(w - ms) > 0.15 * ms:
                    note = f"  (wall {w:.2f} ms: threads)" + note
                print(f"    {name:34s} {ms:8.2f} ms{note}")
            for name, why in r["correct"].items():
                if name not in r["candidates_ms"]:
                    print(f"    {name:34s}        -    <- {why}")


def project_decode(rows: list[dict], key: str = "slices_s_per_core") -> dict:
    """Decode-only hours for 1,500 x 350 slices on 2 and 4 cores from per-syntax rates: the mean mix
    (the mean rate over the syntaxes measured) and each syntax alone."""
    slices = KAGGLE_STUDIES * KAGGLE_SLICES
    rates = {r["syntax"]: r[key] for r in rows if r.get(key)}
    out = {}
    if rates:
        mixes = {"mean_mix": float(np.mean(list(rates.values())))} | {f"all_{k}": v for k, v in rates.items()}
        for mix, rate in mixes.items():
            out[mix] = {f"{c}_cores_h": slices / (rate * c) / 3600 for c in (2, 4)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="spinestream bench decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--syntaxes", nargs="+", default=list(SYNTAXES), choices=SYNTAXES)
    p.add_argument("--rounds", type=int, default=64, help="alternating calls per candidate (median kept)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode.json"))
    args = p.parse_args(argv)
    from spinestream.shards.fsutil import atomic_write_json

    rows = decode_table(syntaxes=args.syntaxes, rounds=args.rounds)
    print_decode_table(rows)
    proj = {"after": project_decode(rows), "before": project_decode(rows, "before_slices_s_per_core")}
    for mix in proj["after"]:
        a, b = proj["after"][mix], proj["before"].get(mix, {})
        print(f"decode-only projection, {mix:18s} {KAGGLE_STUDIES} x {KAGGLE_SLICES} slices: " + ", ".join(
            f"{c} cores {_fmt(b.get(f'{c}_cores_h'), '.2f')} h -> {a[f'{c}_cores_h']:.2f} h" for c in (2, 4)))
    atomic_write_json(args.out, {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "rows": rows, "projection_decode_only": proj,
    })
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
