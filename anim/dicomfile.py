"""Received bytes → header Dataset, the cut points of the blob split, and index keys.

The object is kept byte for byte. It is cut into: the *prefix* (preamble and File
Meta Information, kept per version, not content), the *header* (data set bytes up
to and including the top-level pixel data element's tag and length), the *pixels*
(that element's value) and the *trailer* (anything after it). Content identity is
header + pixels + trailer: the data set without group 0002 (DESIGN.md "Storage").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from anim.errors import InvalidInstance

_PIXEL_TAGS = (0x7FE00010, 0x7FE00009, 0x7FE00008)
_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class ParsedObject:
    """One received object, parsed (header only) and cut into pieces."""

    dataset: Dataset  # the header, pixel data not read
    transfer_syntax: str
    prefix: bytes
    header: memoryview
    pixels: memoryview | None
    trailer: memoryview | None
    pixel_tag: int | None

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)


def _meta_end(buf: BytesIO, data: bytes) -> tuple[int, FileMetaDataset | None]:
    """Return where the data set starts and the file meta, if any."""
    start = 128 if data[128:132] == b"DICM" else (0 if data[:4] == b"DICM" else -1)
    if start >= 0:
        buf.seek(start + 4)
    elif data[:2] == b"\x02\x00":  # group 0002 without preamble
        buf.seek(0)
    else:
        return 0, None
    try:
        meta = _read_file_meta_info(buf)
    except Exception as e:
        raise InvalidInstance(f"unreadable File Meta Information: {e}") from None
    return buf.tell(), meta


def _pixel_value_end(data: bytes, pos: int, implicit: bool, little: bool) -> tuple[int, int, int]:
    """Parse the pixel data element at *pos*; return (tag, value start, value end)."""
    e = "<" if little else ">"
    if len(data) < pos + 8:
        raise InvalidInstance("truncated object: pixel data element header is cut off")
    group, elem = struct.unpack_from(e + "HH", data, pos)
    tag = group << 16 | elem
    if implicit:
        (length,) = struct.unpack_from(e + "L", data, pos + 4)
        start = pos + 8
    else:
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN", b"UT", b"SQ", b"UC", b"UR"):
            if len(data) < pos + 12:
                raise InvalidInstance("truncated object: pixel data element header is cut off")
            (length,) = struct.unpack_from(e + "L", data, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from(e + "H", data, pos + 6)
            start = pos + 8
    if length != _UNDEFINED:
        end = start + length
        if end > len(data):
            raise InvalidInstance(
                f"truncated object: pixel data declares {length} bytes, "
                f"{len(data) - start} received"
            )
        return tag, start, end
    return tag, start, _encapsulated_end(data, start, e)


def _encapsulated_end(data: bytes, start: int, e: str) -> int:
    # Encapsulated (PS3.5 A.4): items until the sequence delimitation item
    p = start
    while True:
        if p + 8 > len(data):
            raise InvalidInstance("truncated object: encapsulated pixel data has no delimiter")
        g, el, ilen = struct.unpack_from(e + "HHL", data, p)
        itag = g << 16 | el
        p += 8
        if itag == _SEQ_DELIM:
            return p
        if itag != _ITEM or ilen == _UNDEFINED:
            raise InvalidInstance(f"malformed encapsulated pixel data at byte {p - 8}")
        p += ilen
        if p > len(data):
            raise InvalidInstance("truncated object: a pixel data fragment is cut off")


def parse(data: bytes) -> ParsedObject:
    """Parse a Part 10 file (or a bare data set) and cut it into blob pieces.

    Raises
    ------
    InvalidInstance
        Not DICOM, truncated, or missing the Study, Series or SOP Instance UID or
        the SOP Class UID.
    """
    if len(data) < 8:
        raise InvalidInstance(f"not a DICOM object: only {len(data)} bytes")
    buf = BytesIO(data)
    ds_start, meta = _meta_end(buf, data)
    buf.seek(0)
    try:
        ds = dcmread(buf, force=True, stop_before_pixels=True)
    except Exception as e:  # pydicom raises many kinds on garbage
        raise InvalidInstance(f"not a readable DICOM object: {type(e).__name__}: {e}") from None
    pos = buf.tell()
    ts = ""
    if meta is not None and "TransferSyntaxUID" in meta:
        ts = str(meta.TransferSyntaxUID)
    return from_dataset(ds, data, ds_start, pos, ts)


def _check_lengths(ds: Dataset) -> None:
    """Refuse an element whose value is shorter than its declared length.

    pydicom reads a cut-off value at the end of the data without complaint; an
    archive must not keep such an object as if it were whole.
    """
    for tag in ds.keys():  # noqa: SIM118 - iterating ds itself would convert values
        raw = ds.get_item(tag)
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if (isinstance(value, bytes) and isinstance(length, int) and length != _UNDEFINED
                and len(value) < length):
            raise InvalidInstance(
                f"truncated object: element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares "
                f"{length} bytes, {len(value)} received")


def from_dataset(ds: Dataset, data: bytes, ds_start: int, pos: int, ts: str) -> ParsedObject:
    """Finish :func:`parse` once pydicom has read the header up to *pos*."""
    _check_lengths(ds)
    _require_uids(ds)
    implicit, little = _encoding(ds, ts)
    if not ts:
        ts = _guess_ts(implicit, little)
    view = memoryview(data)
    prefix = bytes(view[:ds_start])
    if ts == DeflatedExplicitVRLittleEndian:
        # A deflated data set cannot be cut without inflating it: one blob.
        return ParsedObject(ds, ts, prefix, view[ds_start:], None, None, None)
    if pos >= len(data):
        return ParsedObject(ds, ts, prefix, view[ds_start:], None, None, None)
    tag, vstart, vend = _pixel_value_end(data, pos, implicit, little)
    if tag not in _PIXEL_TAGS:
        # pydicom stopped for another reason (a cut-off element): trust nothing after
        raise InvalidInstance(f"truncated or malformed object near byte {pos}")
    trailer = view[vend:] if vend < len(data) else None
    return ParsedObject(ds, ts, prefix, view[ds_start:vstart], view[vstart:vend], trailer, tag)


def _encoding(ds: Dataset, ts: str) -> tuple[bool, bool]:
    if ts:
        uid = UID(ts)
        if uid.is_transfer_syntax:
            return uid.is_implicit_VR, uid.is_little_endian
        # A private TS: pydicom read it as it guessed
    enc = getattr(ds, "original_encoding", (None, None))
    implicit = bool(enc[0]) if enc[0] is not None else False
    little = bool(enc[1]) if enc[1] is not None else True
    return implicit, little


def _guess_ts(implicit: bool, little: bool) -> str:
    if implicit:
        return "1.2.840.10008.1.2"
    return "1.2.840.10008.1.2.1" if little else "1.2.840.10008.1.2.2"


def _require_uids(ds: Dataset) -> None:
    missing = [
        k
        for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if not str(ds.get(k, "") or "").strip()
    ]
    if len(missing) == 4:
        raise InvalidInstance("not a DICOM data set: no SOP, Study or Series UID")
    if missing:
        raise InvalidInstance(f"required attribute(s) missing or empty: {', '.join(missing)}")
    for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        v = str(ds.get(k))
        if len(v) > 64:
            raise InvalidInstance(f"{k} is longer than 64 characters")


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    try:
        v = ds.get(keyword)
    except Exception:  # a value pydicom cannot convert: index it as empty
        return ""
    if v is None:
        return ""
    if isinstance(v, MultiValue | list | tuple):
        v = "\\".join(str(x) for x in v)
    return str(v).strip()[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        v = ds.get(keyword)
        return int(v) if v not in (None, "") else None
    except Exception:  # malformed IS: not matchable, still stored
        return None


def _date(ds: Dataset, keyword: str) -> str:
    """DA for the index: YYYYMMDD; the old ACR-NEMA form 1997.04.24 is normalised."""
    v = _text(ds, keyword, 32)
    digits = v.replace(".", "") if len(v) == 10 and v[4] == v[7] == "." else v
    return digits[:8] if len(digits) >= 8 and digits[:8].isdigit() else ""


def _time(ds: Dataset, keyword: str) -> str:
    """TM for the index: HHMMSS.FFFFFF; the old form 14:04:38 is normalised."""
    v = _text(ds, keyword, 32).replace(":", "")
    head = v.split(".")[0]
    return v[:16] if head.isdigit() and len(head) in (2, 4, 6) else ""


def index_keys(ds: Dataset) -> dict[str, object]:
    """The attributes the index keeps as columns (DESIGN.md "Index")."""
    name = _text(ds, "PatientName", 324)
    return {
        "patient_id": _text(ds, "PatientID"),
        "issuer": _text(ds, "IssuerOfPatientID"),
        "patient_name": name,
        "patient_name_norm": name.upper(),
        "birth_date": _date(ds, "PatientBirthDate"),
        "sex": _text(ds, "PatientSex", 16),
        "study_uid": _text(ds, "StudyInstanceUID"),
        "study_date": _date(ds, "StudyDate"),
        "study_time": _time(ds, "StudyTime"),
        "accession_number": _text(ds, "AccessionNumber"),
        "study_id": _text(ds, "StudyID", 16),
        "study_description": _text(ds, "StudyDescription"),
        "referring_physician": _text(ds, "ReferringPhysicianName", 324),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "modality": _text(ds, "Modality", 16),
        "series_number": _int(ds, "SeriesNumber"),
        "series_description": _text(ds, "SeriesDescription"),
        "body_part": _text(ds, "BodyPartExamined"),
        "series_date": _date(ds, "SeriesDate"),
        "sop_uid": _text(ds, "SOPInstanceUID"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "instance_number": _int(ds, "InstanceNumber"),
        "num_frames": _int(ds, "NumberOfFrames"),
    }


def index_keys_from_json(d: dict[str, object]) -> dict[str, object]:
    """Index keys of a stored version, from its DICOM JSON (used on promotion)."""
    ds = Dataset.from_json(d, bulk_data_uri_handler=lambda *_a: b"")
    return index_keys(ds)
