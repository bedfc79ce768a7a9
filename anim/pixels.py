"""Frames of a stored instance, for WADO-RS Retrieve Frames (PS3.18 10.4.1.1.6).

Two forms:

- :func:`stored_frames`: each frame as the stored transfer syntax carries it, read
  from the pixel blob alone (DESIGN.md "Storage": the blob is the Pixel Data
  *value*), seeking to the asked frames. Native data: ``Rows * Columns * Samples *
  BitsAllocated / 8`` bytes per frame (YBR_FULL_422 native: 2 samples, PS3.3
  C.7.6.3.1.2); encapsulated: the frame's fragments concatenated (PS3.5 A.4), found
  through the Extended or Basic Offset Table when there is one.
- :func:`decoded_frames`: each frame as Explicit VR Little Endian carries it, i.e.
  exactly the bytes ``anim.transcode.to_uncompressed`` puts in a decoded instance.
  Native little endian: the stored bytes. Big endian: the same, byte-swapped per
  word. Compressed: pydicom's decoder with ``as_rgb=True``, as
  ``Dataset.decompress`` does, so YBR_FULL / YBR_FULL_422 JPEG frames come out as
  RGB, interleaved (PlanarConfiguration 0): the attributes of the decoded instance
  say so, while the stored metadata (``/metadata``) keeps the stored values.

Frame numbers are 1-based; 0 or past NumberOfFrames raises NotFound.
"""

from __future__ import annotations

import base64
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames, get_frame, parse_basic_offsets
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from anim import transcode
from anim.errors import NotAcceptable, NotFound
from anim.models import StoredInstance

OCTET_STREAM = "application/octet-stream"

# PS3.18 Table 8.7.3-5 "Media Types and Transfer Syntax UIDs for Compressed Data in
# Bulkdata" (sect_8.7.3.3.2; 2024 editions). The current table names image/dicom-rle
# and image/jls; image/x-dicom-rle and image/x-jls are their older spellings, which
# an edge may still accept in Accept (see MEDIA_TYPE_ALIASES).
_FRAME_MEDIA_TYPES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "image/jpeg",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57": "image/jpeg",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": "image/jpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "image/jls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "image/jls",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": "image/jp2",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91": "image/jp2",  # JPEG 2000
    "1.2.840.10008.1.2.4.92": "image/jpx",  # JPEG 2000 Part 2 Multi-component Lossless
    "1.2.840.10008.1.2.4.93": "image/jpx",  # JPEG 2000 Part 2 Multi-component
    "1.2.840.10008.1.2.4.201": "image/jphc",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "image/jphc",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "image/jphc",  # HTJ2K
    "1.2.840.10008.1.2.4.110": "image/jxl",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.111": "image/jxl",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112": "image/jxl",  # JPEG XL
    "1.2.840.10008.1.2.5": "image/dicom-rle",  # RLE Lossless
    "1.2.840.10008.1.2.4.100": "video/mpeg",  # MPEG2 MP@ML
    "1.2.840.10008.1.2.4.101": "video/mpeg",  # MPEG2 MP@HL
    "1.2.840.10008.1.2.4.102": "video/mp4",  # MPEG-4 AVC/H.264 High Profile 4.1
    "1.2.840.10008.1.2.4.103": "video/mp4",  # ... BD-compatible
    "1.2.840.10008.1.2.4.104": "video/mp4",  # ... 2D video
    "1.2.840.10008.1.2.4.105": "video/mp4",  # ... 3D video
    "1.2.840.10008.1.2.4.106": "video/mp4",  # ... Stereo High Profile
    "1.2.840.10008.1.2.4.107": "video/mp4",  # HEVC/H.265 Main Profile
    "1.2.840.10008.1.2.4.108": "video/mp4",  # HEVC/H.265 Main 10 Profile
}
MEDIA_TYPE_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}

_PIXEL_TAGS = ("7FE00010", "7FE00008", "7FE00009")  # Pixel, Float, Double Float Pixel Data
_FLOAT_BITS = {"7FE00008": 32, "7FE00009": 64}
_UNDEFINED = b"\xff\xff\xff\xff"
_NATIVE_LE = frozenset({
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
})


def frame_media_type(transfer_syntax: str) -> str:
    """The media type of one frame in *transfer_syntax* (PS3.18 Table 8.7.3-5).

    Native (uncompressed) syntaxes, and those the table does not list, give
    ``application/octet-stream``.
    """
    return _FRAME_MEDIA_TYPES.get(transfer_syntax, OCTET_STREAM)


def frames_are_native(transfer_syntax: str) -> bool:
    """True when :func:`stored_frames` already gives what Explicit VR Little Endian
    carries (implicit / explicit / deflated little endian), so no decoding is needed."""
    return transfer_syntax in _NATIVE_LE


# ---- layout -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Layout:
    rows: int
    cols: int
    samples: int
    bits: int
    frames: int
    photometric: str

    @property
    def frame_bits(self) -> int:
        # Native YBR_FULL_422 keeps 2 samples a pixel (PS3.3 C.7.6.3.1.2)
        spp = 2 if self.photometric == "YBR_FULL_422" and self.samples == 3 else self.samples
        return self.rows * self.cols * spp * self.bits


def _json_value(meta: dict[str, Any], tag: str) -> Any:
    values = (meta.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def _json_int(meta: dict[str, Any], tag: str, default: int) -> int:
    try:
        v = _json_value(meta, tag)
        return int(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _layout_from_json(meta: dict[str, Any]) -> _Layout:
    tag = next((t for t in _PIXEL_TAGS if t in meta), None)
    if tag is None:
        raise NotFound("the instance has no pixel data")
    return _Layout(
        rows=_json_int(meta, "00280010", 0),
        cols=_json_int(meta, "00280011", 0),
        samples=_json_int(meta, "00280002", 1),
        bits=_json_int(meta, "00280100", _FLOAT_BITS.get(tag, 16)),
        frames=max(_json_int(meta, "00280008", 1), 1),
        photometric=str(_json_value(meta, "00280004") or "").strip(),
    )


def _layout_from_dataset(ds: Dataset) -> _Layout:
    def num(keyword: str, default: int) -> int:
        try:
            v = ds.get(keyword)
            return int(v) if v not in (None, "") else default
        except (TypeError, ValueError):
            return default

    bits_default = 32 if "FloatPixelData" in ds else 64 if "DoubleFloatPixelData" in ds else 16
    return _Layout(
        rows=num("Rows", 0), cols=num("Columns", 0), samples=num("SamplesPerPixel", 1),
        bits=num("BitsAllocated", bits_default), frames=max(num("NumberOfFrames", 1), 1),
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip(),
    )


def _check_numbers(numbers: Sequence[int], frames: int) -> None:
    for n in numbers:
        if not isinstance(n, int) or n < 1 or n > frames:
            raise NotFound(
                f"frame {n} does not exist: the instance has {frames} frame"
                f"{'s' if frames != 1 else ''} (numbered from 1)")


# ---- native -------------------------------------------------------------------------


def _native_frames(f: BinaryIO, lay: _Layout, numbers: Sequence[int]) -> list[bytes]:
    """Frames of native pixel data read from *f*, positioned at the value's start."""
    if lay.rows <= 0 or lay.cols <= 0 or lay.bits <= 0:
        raise NotFound("the instance's Rows, Columns or Bits Allocated are missing")
    start = f.tell()
    fbits = lay.frame_bits
    out: list[bytes] = []
    for n in numbers:
        first_bit = (n - 1) * fbits
        if first_bit % 8 == 0 and fbits % 8 == 0:
            f.seek(start + first_bit // 8)
            frame = f.read(fbits // 8)
            if len(frame) < fbits // 8:
                raise NotFound(f"frame {n} is cut off: the pixel data is shorter than declared")
        else:
            frame = _bit_frame(f, start, first_bit, fbits, n)
        out.append(frame)
    return out


def _bit_frame(f: BinaryIO, start: int, first_bit: int, fbits: int, n: int) -> bytes:
    """A BitsAllocated 1 frame that does not start (or end) on a byte boundary.

    Repacked to start at bit 0 of its first byte, padded with zero bits to a whole
    byte; pixels are packed from the least significant bit (PS3.5 8.1.1).
    """
    shift = first_bit % 8
    f.seek(start + first_bit // 8)
    nbytes = (shift + fbits + 7) // 8
    raw = f.read(nbytes)
    if len(raw) < nbytes:
        raise NotFound(f"frame {n} is cut off: the pixel data is shorter than declared")
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    return np.packbits(bits[shift : shift + fbits], bitorder="little").tobytes()


def _swap_words(value: bytes, size: int) -> bytes:
    """Big endian words of *size* bytes to little endian."""
    if size <= 1:
        return value
    whole = len(value) // size * size
    arr = np.frombuffer(value, dtype=np.uint8, count=whole).reshape(-1, size)[:, ::-1]
    return arr.tobytes() + value[whole:]


# ---- encapsulated -------------------------------------------------------------------


def _encapsulated_frames(f: BinaryIO, frames: int, numbers: Sequence[int],
                         extended: tuple[bytes, bytes] | None) -> list[bytes]:
    """Frames of encapsulated pixel data (PS3.5 A.4) read from *f* at the BOT item."""
    start = f.tell()
    wanted = sorted(set(numbers))
    found: dict[int, bytes] = {}
    try:
        has_bot = bool(parse_basic_offsets(f))
        f.seek(start)
        if extended or has_bot or len(wanted) == 1:
            # Offsets known (or one frame wanted): seek to each frame only
            for n in wanted:
                found[n] = get_frame(f, n - 1, extended_offsets=extended,
                                     number_of_frames=frames)
                f.seek(start)
        else:
            # No table: walk the fragments once, up to the last frame asked for
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns on short data: we check
                for i, frame in enumerate(generate_frames(f, number_of_frames=frames), 1):
                    if i in wanted:
                        found[i] = frame
                    if i >= wanted[-1]:
                        break
    except (ValueError, EOFError, OSError) as e:
        raise NotFound(f"frame not found in the encapsulated pixel data: {e}") from None
    missing = [n for n in wanted if n not in found]
    if missing:
        raise NotFound(f"frame {missing[0]} not found in the encapsulated pixel data")
    return [found[n] for n in numbers]


def _extended_offsets(open_blob: Callable[[str], BinaryIO], inst: StoredInstance,
                      meta: dict[str, Any]) -> tuple[bytes, bytes] | None:
    """(7FE0,0001) Extended Offset Table and (7FE0,0002) its lengths, if present."""
    if "7FE00001" not in meta or "7FE00002" not in meta:
        return None
    inline = [(meta[t] or {}).get("InlineBinary") for t in ("7FE00001", "7FE00002")]
    if all(inline):
        return base64.b64decode(inline[0]), base64.b64decode(inline[1])
    # Large tables are bulk data in the JSON: read them from the header blob
    with open_blob(inst.blob_keys[0]) as h, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(h, force=True, stop_before_pixels=True,
                     specific_tags=[0x7FE00001, 0x7FE00002])
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        return bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths)
    return None


# ---- public -------------------------------------------------------------------------


def stored_frames(open_blob: Callable[[str], BinaryIO], inst: StoredInstance,
                  meta: dict[str, Any], numbers: Sequence[int]) -> list[bytes]:
    """The frames *numbers* (1-based, in the order asked) in their stored form.

    *meta* is the instance's DICOM JSON from ingest. Only the pixel blob is read,
    at the frames' offsets; a deflated or unsplit object is read whole instead.
    Deflated data gives the inflated (native little endian) frames; big endian data
    gives big endian frames.

    Raises
    ------
    NotFound
        No pixel data, a frame number of 0 or past NumberOfFrames, or pixel data
        shorter than its attributes declare.
    NotAcceptable
        A big endian 1-bit frame that does not start on a byte boundary.
    """
    if len(inst.blob_keys) < 2 or inst.transfer_syntax == DeflatedExplicitVRLittleEndian:
        # Not split (deflated): the ingest JSON may not even name the pixel data
        return _frames_of_whole(open_blob, inst, numbers)
    lay = _layout_from_json(meta)
    _check_numbers(numbers, lay.frames)
    if not numbers:
        return []
    with open_blob(inst.blob_keys[0]) as h:
        # the header ends with the pixel element's tag, VR and length (DESIGN.md)
        h.seek(-4, 2)
        encapsulated = h.read(4) == _UNDEFINED
    if encapsulated:
        extended = _extended_offsets(open_blob, inst, meta)
        with open_blob(inst.blob_keys[1]) as f:
            return _encapsulated_frames(f, lay.frames, numbers, extended)
    if (inst.transfer_syntax == ExplicitVRBigEndian and lay.bits == 1
            and any((n - 1) * lay.frame_bits % 8 for n in numbers)):
        raise NotAcceptable("big endian 1-bit frames off byte boundaries are not supported")
    with open_blob(inst.blob_keys[1]) as f:
        return _native_frames(f, lay, numbers)


def _frames_of_whole(open_blob: Callable[[str], BinaryIO], inst: StoredInstance,
                     numbers: Sequence[int]) -> list[bytes]:
    parts = [inst.prefix]
    for key in inst.blob_keys:
        with open_blob(key) as f:
            parts.append(f.read())
    ds = transcode.read(b"".join(parts), inst.transfer_syntax)
    elem, lay = _pixel_element(ds)
    _check_numbers(numbers, lay.frames)
    if not numbers:
        return []
    if elem.is_undefined_length:
        ext = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            ext = (bytes(ds.ExtendedOffsetTable), bytes(ds.ExtendedOffsetTableLengths))
        return _encapsulated_frames(BytesIO(elem.value), lay.frames, numbers, ext)
    return _native_frames(BytesIO(elem.value), lay, numbers)


def _pixel_element(ds: Dataset) -> tuple[DataElement, _Layout]:
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            return ds[keyword], _layout_from_dataset(ds)
    raise NotFound("the instance has no pixel data")


def decoded_frames(data: bytes, transfer_syntax: str, numbers: Sequence[int]) -> list[bytes]:
    """The frames *numbers* of the whole stored object *data* as Explicit VR Little
    Endian carries them (see the module docstring for colour handling).

    *transfer_syntax* is the stored one (``StoredInstance.transfer_syntax``): an
    object received over DIMSE is kept without File Meta Information.

    Raises
    ------
    NotFound
        No pixel data, or a frame number out of range.
    NotAcceptable
        The pixel data cannot be decoded (no plugin for its compression, corrupt).
    """
    ds = transcode.read(data, transfer_syntax)
    elem, lay = _pixel_element(ds)
    _check_numbers(numbers, lay.frames)
    if not numbers:
        return []
    ts = UID(transfer_syntax)
    if not elem.is_undefined_length:
        value = elem.value
        if ts == ExplicitVRBigEndian:
            # OB holds bytes; OW / OF / OD hold words of BitsAllocated (OW: 16 at most 8)
            size = lay.bits // 8 if lay.bits >= 16 else (2 if elem.VR == "OW" else 1)
            value = _swap_words(value, size)
        return _native_frames(BytesIO(value), lay, numbers)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise NotAcceptable(f"no decoder for {ts.name}") from None
    out: list[bytes] = []
    cache: dict[int, bytes] = {}
    for n in numbers:
        if n not in cache:
            try:
                # as_rgb=True is what Dataset.decompress uses (anim.transcode)
                arr, _info = decoder.as_array(ds, index=n - 1, as_rgb=True)
            except Exception as e:  # missing plugin, corrupt stream: report, never crash
                raise NotAcceptable(
                    f"cannot decode frame {n} ({ts.name}): {type(e).__name__}: {e}") from None
            cache[n] = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        out.append(cache[n])
    return out

