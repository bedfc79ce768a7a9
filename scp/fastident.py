"""C-FIND response Identifiers written straight from a match's DICOM JSON.

A match is DICOM JSON (PS3.18 F.2) from the query engine; the Identifier pynetdicom sends
is its binary encoding (PS3.5 7.1). Going through ``Dataset.from_json`` and pydicom's
writer costs about half of each C-FIND response's time (bench/run-speed, py-spy), for
values that are nearly all short text. :func:`encoder` writes those (and integer VRs)
directly, little endian, explicit or implicit VR, and gives up (returns None) on anything
it does not handle plainly: a non-ASCII value (character sets), a sequence, other binary
or floating point VRs, a DS given as a number. Then the Identifier goes the pydicom way, as before.
``tests/unit/test_fastident.py`` checks the bytes against pydicom's on the archive's own
matches.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

# VRs whose value is text; every other VR makes the fast path give up
_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "SH", "ST", "TM", "UI", "UT",
                   "UC", "UR", "PN", "IS"})
# binary integers: little endian, the struct format of one value
_INT = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}
# explicit VR with a 4-byte length (PS3.5 7.1.2); the rest of _TEXT has 2 bytes
_LONG = frozenset({"UT", "UC", "UR"})
_PACK_TAG = struct.Struct("<HH").pack
_PACK_SHORT = struct.Struct("<HH2sH").pack
_PACK_LONG = struct.Struct("<HH2sHI").pack
_PACK_IMPLICIT = struct.Struct("<HHI").pack


def _text_of(vr: str, values: list[Any]) -> str | None:
    parts: list[str] = []
    for v in values:
        if v is None:
            parts.append("")
        elif vr == "PN":
            if not isinstance(v, dict) or set(v) - {"Alphabetic"}:
                return None  # ideographic/phonetic groups: character sets, pydicom's job
            parts.append(str(v.get("Alphabetic", "")))
        elif vr == "IS":
            if isinstance(v, bool) or not isinstance(v, int | str):
                return None
            parts.append(str(v))
        elif isinstance(v, str):
            parts.append(v)
        else:
            return None
    return "\\".join(parts)


def _element(tag: int, vr: str, raw: bytes, implicit: bool) -> bytes:
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "  # even length (PS3.5 7.1.1)
    g, e = tag >> 16, tag & 0xFFFF
    if implicit:
        return _PACK_IMPLICIT(g, e, len(raw)) + raw
    if vr in _LONG:
        return _PACK_LONG(g, e, vr.encode(), 0, len(raw)) + raw
    if len(raw) > 0xFFFF:
        raise ValueError("too long for a 2-byte length")
    return _PACK_SHORT(g, e, vr.encode(), len(raw)) + raw


Value = str | bytes | None  # text, an integer VR's packed bytes, or empty


def encode(elements: dict[int, tuple[str, Value]], implicit: bool) -> bytes | None:
    """*elements*: tag → (VR, value), in any order."""
    out = []
    try:
        for tag in sorted(elements):
            vr, value = elements[tag]
            raw = value.encode("ascii") if isinstance(value, str) else (value or b"")
            out.append(_element(tag, vr, raw, implicit))
    except (UnicodeEncodeError, ValueError):
        return None
    return b"".join(out)


def _ints(vr: str, values: list[Any]) -> bytes | None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return None
    try:
        return struct.pack(f"<{len(values)}{_INT[vr]}", *values)
    except struct.error:  # out of the VR's range
        return None


def elements_of(match: dict[str, Any]) -> dict[int, tuple[str, Value]] | None:
    """The match's elements as (VR, value), or None if one is neither plain text nor
    integers."""
    out: dict[int, tuple[str, Value]] = {}
    for key, attr in match.items():
        vr = attr.get("vr", "")
        if (vr not in _TEXT and vr not in _INT) or "InlineBinary" in attr \
                or "BulkDataURI" in attr:
            return None
        values = attr.get("Value")
        value: Value = None
        if values:
            value = _ints(vr, values) if vr in _INT else _text_of(vr, values)
            if value is None:
                return None
        out[int(key, 16)] = (vr, value)
    return out


def encoder(elements: dict[int, tuple[str, Value]]
            ) -> Callable[[bool, bool, bool], bytes | None]:
    """For scp.encoded.Encoded: bytes for a little endian, not deflated context."""
    def encode_for(implicit: bool, little_endian: bool, deflated: bool) -> bytes | None:
        if not little_endian or deflated:
            return None
        return encode(elements, implicit)
    return encode_for
