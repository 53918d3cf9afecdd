"""A light DICOM parse for the common case, with pydicom's semantics (issue 21).

``pydicom.dcmread`` costs ~0.35 ms for a CT slice's ~80 header elements (a Python object per
element, eagerly read sequences): 5x the decode itself for uncompressed and RLE files. For the
files nearly every CT archive holds -- a DICM preamble, explicit VR little endian or an
encapsulated (compressed) syntax, no Enhanced-CT functional groups -- :func:`parse` walks the
elements with one ``struct`` call each and returns a :class:`LightDataset`: the Dataset
``dcmread`` would give, made of the same ``RawDataElement`` tuples, but built only when pydicom
first touches it (any attribute, ``in``, ``[]``, ``get``, ``pixel_array``). Until then the reader
takes the few values it needs straight from the file's bytes (:func:`raw`, through
``preprocess.decoders.get``: the values pydicom would give, checked against it in
tests/test_decoders.py), so a plain CT slice is read -- checked, decoded, rescaled, positioned --
without building pydicom's dataset at all. Once built, pydicom converts a value on first access
exactly as after ``dcmread`` (character sets, UN -> dictionary VR, malformed DS kept as a string
with a warning, ...). What it leaves out: the contents of sequences (skipped; the reader uses none
but the functional groups, and a file with those is left to ``dcmread``).

Anything else -- no preamble, implicit VR, big endian, deflate, an unknown VR, an undefined-length
UN, a length past the end of the file, a malformed sequence or encapsulation -- returns ``None``
and the caller uses ``dcmread``, which then reads the file or raises as it always has. ``parse``
never raises.

Cost (dev-2c, 693_UNCR.dcm, 80 elements): the walk ~20-35 us; building pydicom's state ~60 us more,
paid only by a caller that needs it. A pure-Python walk stays ~2x a C++ parser's (dicomsdl): the
remaining gap to it for uncompressed files (BENCHMARKS.md, "DICOM decode per transfer syntax").
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from pydicom import uid
from pydicom.dataelem import RawDataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag

__all__ = ["parse"]

_HEAD = struct.Struct("<HH2sH").unpack_from
_LONG_LEN = struct.Struct("<L").unpack_from
_ITEM = struct.Struct("<HHL").unpack_from
_LONG = frozenset(v.encode() for v in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"))
_SHORT = frozenset(v.encode() for v in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL", "SS", "ST", "TM",
    "UI", "UL", "US"))
_VR_STR = {v: v.decode() for v in _LONG | _SHORT}
_PIXEL_DATA = 0x7FE00010
# Enhanced CT keeps rescale/position in these: such files go to dcmread (sequences are read there).
_NEEDS_SEQUENCES = frozenset((0x52009229, 0x52009230))  # Shared / PerFrame FunctionalGroupsSequence
_ITEM_TAG, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_MAX_DEPTH = 16

# Explicit VR little endian datasets: the native syntax and every encapsulated one except deflate.
_SYNTAXES = frozenset(
    [uid.ExplicitVRLittleEndian]
    + [ts for ts in uid.AllTransferSyntaxes if uid.UID(ts).is_encapsulated and uid.UID(ts).is_little_endian
       and not uid.UID(ts).is_deflated]
)


class _Bad(Exception):
    """Not a file for the light parse."""


def _skip_items(data: bytes, pos: int, depth: int) -> int:
    """Past the Sequence Delimitation Item of the undefined-length sequence starting at ``pos``."""
    if depth > _MAX_DEPTH:
        raise _Bad
    n = len(data)
    while pos + 8 <= n:
        group, elem, length = _ITEM(data, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM_TAG:
            raise _Bad
        if length == 0xFFFFFFFF:  # an item of undefined length: its elements, then an Item Delimitation
            pos = _skip_elements(data, pos, depth + 1)
        else:
            pos += length
    raise _Bad


def _skip_elements(data: bytes, pos: int, depth: int) -> int:
    """Past the Item Delimitation Item closing the undefined-length item starting at ``pos``."""
    n = len(data)
    while pos + 8 <= n:
        group, elem, vr, length = _HEAD(data, pos)
        tag = group << 16 | elem
        if tag == _ITEM_END:
            return pos + 8
        if vr in _LONG:
            if pos + 12 > n:
                raise _Bad
            length = _LONG_LEN(data, pos + 8)[0]
            pos += 12
        elif vr in _SHORT:
            pos += 8
        else:
            raise _Bad
        if length == 0xFFFFFFFF:
            if vr != b"SQ":
                raise _Bad
            pos = _skip_items(data, pos, depth + 1)
        else:
            pos += length
    raise _Bad


def _fragments_end(data: bytes, pos: int) -> int:
    """Start of the Sequence Delimitation Item closing the encapsulated Pixel Data at ``pos``."""
    n = len(data)
    while pos + 8 <= n:
        group, elem, length = _ITEM(data, pos)
        tag = group << 16 | elem
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM_TAG or length == 0xFFFFFFFF or pos + 8 + length > n:
            raise _Bad
        pos += 8 + length
    raise _Bad


_EMPTY = {vr_s: empty_value_for_VR(vr_s, raw=True) for vr_s in _VR_STR.values()}
_new_raw = tuple.__new__  # RawDataElement(...) through NamedTuple's __new__ costs 3x more


def _elements(data: bytes, pos: int, *, meta: bool) -> tuple[dict[int, tuple[str, int, int, int]], int]:
    """Top-level elements from ``pos`` (only group 0002 when ``meta``) -> ({tag: (VR, length, start,
    end)}, end of the last one). ``length`` is the header's (0xFFFFFFFF for encapsulated Pixel Data,
    whose value is ``data[start:end]``, the items without the Sequence Delimitation Item).

    The loop is the parse's cost (~80 elements per CT slice): one ``struct`` call per short element
    and nothing else; an element running past the end stops the loop and is refused after it."""
    out: dict[int, tuple[str, int, int, int]] = {}
    n = len(data)
    head, long_len, long_vrs, short_vrs, vr_str = _HEAD, _LONG_LEN, _LONG, _SHORT, _VR_STR
    while pos + 8 <= n:
        group, elem, vr, length = head(data, pos)
        if meta and group != 0x0002:
            return out, pos
        if vr in short_vrs:
            start = pos + 8
            pos = start + length
            out[group << 16 | elem] = (vr_str[vr], length, start, pos)
            continue
        if vr not in long_vrs or pos + 12 > n:
            raise _Bad
        length = long_len(data, pos + 8)[0]
        start = pos + 12
        tag = group << 16 | elem
        if vr == b"SQ":
            if tag in _NEEDS_SEQUENCES:
                raise _Bad
            pos = _skip_items(data, start, 0) if length == 0xFFFFFFFF else start + length
            continue
        if length == 0xFFFFFFFF:
            if tag != _PIXEL_DATA:
                raise _Bad  # e.g. an undefined-length UN: implicit VR inside
            end = _fragments_end(data, start)
            pos = end + 8
        else:
            end = pos = start + length
        out[tag] = (vr_str[vr], length, start, end)
    if pos != n and not (meta and pos < n):
        raise _Bad  # an element past the end, or a few bytes too few for one more
    return out, pos


def value(data: bytes, tag: int, entry: tuple[str, int, int, int]) -> bytes | memoryview:
    """The raw value of one element of :func:`_elements`, as the RawDataElement ``dcmread`` makes for it
    holds it: bytes (pydicom's encaps functions need them), a view for native Pixel Data (no copy of the
    file's bulk)."""
    vr, length, start, end = entry
    if not length:
        return _EMPTY[vr]
    if tag == _PIXEL_DATA and length != 0xFFFFFFFF:
        return memoryview(data)[start:end]
    return data[start:end]


def _raw_elements(data: bytes, table: dict[int, tuple[str, int, int, int]]) -> dict[BaseTag, RawDataElement]:
    raw_cls, new, base_tag = RawDataElement, _new_raw, BaseTag
    out = {}
    for tag, entry in table.items():
        t = base_tag(tag)
        out[t] = new(raw_cls, (t, entry[0], entry[1], value(data, tag, entry), entry[2], False, True, True, False))
    return out


class Light(NamedTuple):
    """What an unbuilt :class:`LightDataset` holds (its ``_light`` attribute)."""

    cache: dict  # values derived from the raw elements (raw_cache)
    data: bytes  # the whole file
    meta: dict[int, tuple[str, int, int, int]]  # group 0002: tag -> (VR, length, start, end)
    table: dict[int, tuple[str, int, int, int]]  # the dataset's top-level elements, the same way


class LightDataset(Dataset):
    """The Dataset ``dcmread`` would give, built on first use.

    :func:`parse` walks the file once and keeps where each element is; pydicom's own state (a
    RawDataElement per element, the file meta dataset: ~60 % of the parse) is built the first
    time pydicom touches the dataset -- any attribute, ``in``, ``[]``, ``get``, ``pixel_array``
    -- after which it is an ordinary Dataset. The reader's hot path asks for the few values it
    needs with :func:`raw`, which reads them from the file's bytes without building anything
    (``preprocess.decoders.get``), so a plain CT slice is read without pydicom's state at all.
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: D107 -- built by parse() only
        raise TypeError("LightDataset is made by lightparse.parse")

    def __getattr__(self, name: str):
        light = self.__dict__.pop("_light", None)  # popped first: the build's own lookups must not recurse
        if light is not None:  # first use by pydicom: build its state, then answer as a Dataset
            try:
                _materialize(self, light)
            except BaseException:
                self.__dict__.clear()
                self.__dict__["_light"] = light  # unbuilt again, never half-built
                raise
            return getattr(self, name)
        return Dataset.__getattr__(self, name)


def _materialize(ds: LightDataset, light: Light) -> None:
    Dataset.__init__(ds, _raw_elements(light.data, light.table))
    ds.file_meta = FileMetaDataset(_raw_elements(light.data, light.meta))
    ds.preamble = light.data[:128]
    ds.set_original_encoding(False, True)


ABSENT = object()
"""What :func:`raw` returns for an element the (unbuilt) dataset does not have."""


def raw(ds: Dataset, tag: int, *, meta: bool = False):
    """Element ``tag`` of a :class:`LightDataset` pydicom has not touched yet, straight from the file:
    ``(VR, raw value)``, :data:`ABSENT`, or None when ``ds`` is not such a dataset (ask pydicom).
    ``meta``: look in the file meta information (group 0002)."""
    light = ds.__dict__.get("_light")
    if light is None:
        return None
    entry = (light.meta if meta else light.table).get(tag)
    if entry is None:
        return ABSENT
    return entry[0], value(light.data, tag, entry)


def raw_cache(ds: Dataset) -> dict | None:
    """A dict kept with a :class:`LightDataset` pydicom has not built (values derived from its raw
    elements: nothing can change them until it is built, which drops the dict), else None."""
    light = ds.__dict__.get("_light")
    return None if light is None else light.cache


def parse(data: bytes) -> Dataset | None:
    """``data`` (a whole file) as the Dataset ``pydicom.dcmread`` gives (a :class:`LightDataset`,
    built on first use), or None (see the module doc)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    try:
        meta, pos = _elements(data, 132, meta=True)
        ts_elem = meta.get(0x00020010)
        if ts_elem is None or not ts_elem[1]:
            return None
        ts = data[ts_elem[2]:ts_elem[3]].decode("ascii", "replace").strip(" \x00")
        if ts not in _SYNTAXES:
            return None
        elements, _ = _elements(data, pos, meta=False)
    except (_Bad, struct.error, KeyError):
        return None
    if _PIXEL_DATA not in elements:
        return None  # let dcmread decide what this file is
    ds = object.__new__(LightDataset)
    ds.__dict__["_light"] = Light({}, data, meta, elements)
    return ds
