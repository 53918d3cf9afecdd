"""A light DICOM parse for the common case, with pydicom's semantics (issue 21).

``pydicom.dcmread`` costs ~0.35 ms for a CT slice's ~80 header elements (a Python object per
element, eagerly read sequences): 5x the decode itself for uncompressed and RLE files. For the
files nearly every CT archive holds -- a DICM preamble, explicit VR little endian or an
encapsulated (compressed) syntax, no Enhanced-CT functional groups -- :func:`parse` walks the
elements with one ``struct`` call each and builds the same :class:`~pydicom.dataset.Dataset` that
``dcmread`` would, made of the same ``RawDataElement`` tuples; pydicom converts a value on first
access exactly as after ``dcmread`` (character sets, UN -> dictionary VR, malformed DS kept as a
string with a warning, ...). What it leaves out: the contents of sequences (skipped; the reader
uses none but the functional groups, and a file with those is left to ``dcmread``).

Anything else -- no preamble, implicit VR, big endian, deflate, an unknown VR, an undefined-length
UN, a length past the end of the file, a malformed sequence or encapsulation -- returns ``None``
and the caller uses ``dcmread``, which then reads the file or raises as it always has. ``parse``
never raises.
"""
from __future__ import annotations

import struct

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


def _elements(data: bytes, pos: int, *, meta: bool) -> tuple[dict[BaseTag, RawDataElement], int]:
    """Top-level elements from ``pos`` (only group 0002 when ``meta``) -> (elements, end)."""
    out: dict[BaseTag, RawDataElement] = {}
    n = len(data)
    head, long_len, long_vrs, short_vrs, vr_str, empty = _HEAD, _LONG_LEN, _LONG, _SHORT, _VR_STR, _EMPTY
    raw_cls, new, base_tag = RawDataElement, _new_raw, BaseTag
    view = memoryview(data)
    while pos < n:
        if pos + 8 > n:
            raise _Bad
        group, elem, vr, length = head(data, pos)
        if meta and group != 0x0002:
            break
        if vr in short_vrs:
            start = pos + 8
        elif vr in long_vrs:
            if pos + 12 > n:
                raise _Bad
            length = long_len(data, pos + 8)[0]
            start = pos + 12
        else:
            raise _Bad
        tag = group << 16 | elem
        if vr == b"SQ":
            if tag in _NEEDS_SEQUENCES:
                raise _Bad
            pos = _skip_items(data, start, 0) if length == 0xFFFFFFFF else start + length
            if pos > n:
                raise _Bad
            continue
        vr_s = vr_str[vr]
        if length == 0xFFFFFFFF:
            if tag != _PIXEL_DATA:
                raise _Bad  # e.g. an undefined-length UN: implicit VR inside
            end = _fragments_end(data, start)
            value = data[start:end]  # bytes: pydicom's encaps functions need them
            pos = end + 8
        else:
            pos = start + length
            if pos > n:
                raise _Bad
            if not length:
                value = empty[vr_s]
            elif tag == _PIXEL_DATA:
                value = view[start:pos]  # native pixels: a view, not a copy of the file's bulk
            else:
                value = data[start:pos]
        t = base_tag(tag)
        out[t] = new(raw_cls, (t, vr_s, length, value, start, False, True, True, False))
    return out, pos


def parse(data: bytes) -> Dataset | None:
    """``data`` (a whole file) as the Dataset ``pydicom.dcmread`` gives, or None (see the module doc)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return None
    try:
        meta, pos = _elements(data, 132, meta=True)
        ts_elem = meta.get(BaseTag(0x00020010))
        if ts_elem is None or not ts_elem.value:
            return None
        ts = ts_elem.value.decode("ascii", "replace").strip(" \x00")
        if ts not in _SYNTAXES:
            return None
        elements, _ = _elements(data, pos, meta=False)
    except (_Bad, struct.error, KeyError):
        return None
    if BaseTag(_PIXEL_DATA) not in elements:
        return None  # let dcmread decide what this file is
    file_meta = FileMetaDataset(meta)
    ds = Dataset(elements)
    ds.file_meta = file_meta
    ds.preamble = data[:128]
    ds.set_original_encoding(False, True)
    return ds
