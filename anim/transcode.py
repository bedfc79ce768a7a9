"""Producing a stored instance in a transfer syntax the peer accepts.

The stored transfer syntax is always preferred (the bytes go out as they came in).
Otherwise the data set is decoded to Explicit VR Little Endian (or Implicit VR Little
Endian) with pydicom and the pylibjpeg plugins; an object whose pixel data cannot be
decoded raises NotAcceptable, which the edge reports as a failed sub-operation.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from io import BytesIO

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from anim.errors import NotAcceptable

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def choose(stored: str, accepted: Collection[str]) -> str | None:
    """The transfer syntax to send in: the stored one when accepted, else a decoded one."""
    if stored in accepted:
        return stored
    for ts in UNCOMPRESSED:
        if ts in accepted:
            return str(ts)
    return None


def read(data: bytes, stored_ts: str) -> Dataset:
    """The stored bytes as a pydicom Dataset whose raw elements are left untouched."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(BytesIO(data), force=True)
    if not getattr(ds, "file_meta", None):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(stored_ts)
    return ds


def _swap_words(raw: bytes, bits_allocated: int) -> bytes:
    width = bits_allocated // 8
    if width <= 1:
        return raw
    n = len(raw) // width * width
    arr = np.frombuffer(raw[:n], dtype=f">u{width}")
    return arr.astype(f"<u{width}").tobytes() + raw[n:]


# word size of the binary VRs whose raw bytes depend on byte order (PS3.5 7.3)
_WORD = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}


def _to_little_endian(ds: Dataset) -> None:
    """Re-encode a big endian data set as little endian, in place.

    Converting every element to its value (``iterall``) lets pydicom write numbers in
    the new byte order; binary values stay raw bytes and are swapped here by word. The
    pixel data is swapped by its BitsAllocated: pixel_array would unpack 1-bit data and
    interleave planar colour, changing what the attributes describe.
    """
    for elem in ds.iterall():
        if not isinstance(elem.value, bytes):
            continue
        if elem.tag == 0x7FE00010:
            # pixel words are BitsAllocated wide; 8-bit (and 1-bit) pixels in OW still
            # travel as byte-swapped 16-bit words (PS3.5 8.1.1, 8.2)
            bits = int(ds.get("BitsAllocated", 8) or 8)
            elem.value = _swap_words(elem.value, bits if bits > 8 else
                                     16 if elem.VR == "OW" else 8)
        elif elem.VR in _WORD:
            elem.value = _swap_words(elem.value, 8 * _WORD[elem.VR])
    ds.set_original_encoding(False, True, ds.original_character_set)


def to_uncompressed(ds: Dataset, target: str) -> Dataset:
    """Decode *ds* in place to *target* (an uncompressed little endian syntax).

    Raises
    ------
    NotAcceptable
        The pixel data cannot be decoded (no plugin for its compression, corrupt data).
    """
    ts = UID(ds.file_meta.TransferSyntaxUID)
    try:
        if ts.is_compressed:
            # the same instance in another transfer syntax: its SOP Instance UID stays
            ds.decompress(generate_instance_uid=False)
        elif ts == ExplicitVRBigEndian:
            _to_little_endian(ds)
        elif ts == DeflatedExplicitVRLittleEndian:
            ds.set_original_encoding(False, True, ds.original_character_set)
    except NotImplementedError as e:
        raise NotAcceptable(f"cannot decode {ts.name}: {e}") from None
    except Exception as e:  # a corrupt or unsupported stream: report, never crash
        raise NotAcceptable(f"cannot decode {ts.name}: {type(e).__name__}: {e}") from None
    target_uid = UID(target)
    ds.file_meta.TransferSyntaxUID = target_uid
    if target_uid == ImplicitVRLittleEndian:
        ds.set_original_encoding(True, True, ds.original_character_set)
    return ds


def file_meta_prefix(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble and File Meta Information (PS3.10 7.1) for a stored bare data set.

    Objects received without one (an imported bare data set) still leave the archive
    as Part 10 files, which WADO-RS application/dicom requires.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    buf = BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def encode(ds: Dataset) -> bytes:
    """A (decoded) data set as a Part 10 file in its file meta's transfer syntax."""
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
