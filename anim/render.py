"""Server-side rendering for WADO-RS Retrieve Rendered / Thumbnail (PS3.18 10.4.1.1.x).

One frame of a stored object becomes an 8-bit JPEG, PNG or GIF following the
grayscale pipeline of PS3.4 N.2: Modality LUT (Rescale Slope / Intercept, or a
Modality LUT Sequence), then VOI (the ``window`` query parameter, else the
object's first Window Center / Width with its VOI LUT Function, else a VOI LUT
Sequence, else the frame's min..max), MONOCHROME1 inverted. Colour frames are
decoded to RGB (YBR_* converted, as pydicom does with ``as_rgb``), PALETTE COLOR
through its palette; ``window`` does not apply to them. Then the source region
and the viewport (PS3.18 8.3.5.1.3), then the encoder.

Viewport ``vw,vh``: the image (or region) is scaled, keeping its aspect ratio, to
the largest size that fits in vw x vh (one side equals the viewport's, no
letterbox bars), enlarging small images too. The long form ``vw,vh,sx,sy,sw,sh``
first crops the region whose top-left pixel is (sx, sy) and whose size is
|sw| x |sh| (clipped to the image; a negative sw / sh flips it horizontally /
vertically; empty sw / sh mean "to the edge"). Pixel Aspect Ratio / non-square
pixel spacing is not corrected for.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from anim import transcode
from anim.errors import InvalidQuery, NotAcceptable, NotFound

JPEG, PNG, GIF = "image/jpeg", "image/png", "image/gif"
MEDIA_TYPES = (JPEG, PNG, GIF)  # what this renderer can produce, default first
THUMBNAIL_SIZE = (128, 128)
MAX_VIEWPORT = 8192  # a larger output is refused (InvalidQuery) rather than built
_FUNCTIONS = {"LINEAR": "LINEAR", "LINEAR_EXACT": "LINEAR_EXACT", "SIGMOID": "SIGMOID"}
# PS3.18 8.3.5.1 parameters; annotation (burned-in text) is not applied, nor an ICC
# profile other than "no"; charset has nothing to act on in an image
_KNOWN = ("accept", "quality", "viewport", "window", "charset", "annotation", "iccprofile")


@dataclass(frozen=True)
class RenderParams:
    """What a Retrieve Rendered / Thumbnail request asks for.

    ``window`` is (center, width, function) with function one of LINEAR,
    LINEAR_EXACT, SIGMOID (PS3.3 C.11.2.1.2-3). ``region`` is (sx, sy, sw, sh) of the
    long viewport form, sw / sh None for "to the image edge". ``ignored`` names the
    query parameters that were accepted but not applied (for a Warning header).
    """

    media_type: str = JPEG
    quality: int = 90
    viewport: tuple[int, int] | None = None
    window: tuple[float, float, str] | None = None
    region: tuple[int, int, int | None, int | None] | None = None
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def parse(cls, query: Mapping[str, str], accept: str, thumbnail: bool = False
              ) -> RenderParams:
        """Read the PS3.18 8.3.5.1 query parameters and the Accept header.

        An ``accept`` query parameter replaces the Accept header (PS3.18 8.3.3.1).
        A thumbnail defaults to a 128 x 128 viewport. Unknown parameters are ignored
        (listed in ``ignored``).

        Raises
        ------
        InvalidQuery
            A malformed or out-of-range quality, viewport or window value.
        NotAcceptable
            No acceptable media type is one this renderer produces.
        """
        media_type = _choose_media_type(query.get("accept") or accept)
        quality = _quality(query.get("quality"))
        viewport, region = _viewport(query.get("viewport"))
        if viewport is None and thumbnail:
            viewport = THUMBNAIL_SIZE
        window = _window(query.get("window"))
        ignored = tuple(k for k in query if k not in _KNOWN or k == "annotation" or (
            k == "iccprofile" and str(query[k]).lower() != "no"))
        return cls(media_type, quality, viewport, window, region, ignored)


parse = RenderParams.parse


# ---- query parsing ------------------------------------------------------------------


def _choose_media_type(accept: str) -> str:
    """The rendered media type for an Accept value: highest q first, JPEG for wildcards."""
    if not accept or not accept.strip():
        return JPEG
    ranked = [r for r in (_accept_item(i, item) for i, item in enumerate(accept.split(",")))
              if r is not None]
    for _q, _i, mtype in sorted(ranked):
        if mtype in MEDIA_TYPES:
            return mtype
        if mtype in ("*/*", "image/*"):
            return JPEG
    raise NotAcceptable(
        f"cannot render as {accept.strip()!r}; rendered media types: {', '.join(MEDIA_TYPES)}")


def _accept_item(i: int, item: str) -> tuple[float, int, str] | None:
    """(-q, position, media type) of one Accept entry; None when q is 0 or it is empty."""
    parts = [p.strip() for p in item.split(";")]
    mtype = parts[0].lower()
    q = 1.0
    for p in parts[1:]:
        key, _, value = p.partition("=")
        key, value = key.strip().lower(), value.strip().strip('"').lower()
        if key == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
        elif key == "type" and mtype == "multipart/related":
            mtype = value  # multipart/related; type="image/jpeg"
    return (-q, i, mtype) if mtype and q > 0 else None


def _quality(value: str | None) -> int:
    if value is None or value == "":
        return 90
    try:
        q = int(value)
    except ValueError:
        raise InvalidQuery(f"quality must be an integer from 1 to 100, got {value!r}") from None
    if not 1 <= q <= 100:
        raise InvalidQuery(f"quality must be from 1 to 100, got {q}")
    return q


def _viewport(value: str | None
              ) -> tuple[tuple[int, int] | None, tuple[int, int, int | None, int | None] | None]:
    if value is None or value == "":
        return None, None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 6):
        raise InvalidQuery(f"viewport must be vw,vh or vw,vh,sx,sy,sw,sh; got {value!r}")
    size: list[int] = []
    for name, p in zip(("vw", "vh"), parts[:2], strict=True):
        if not re.fullmatch(r"\d+", p) or not 1 <= int(p) <= MAX_VIEWPORT:
            raise InvalidQuery(
                f"viewport {name} must be an integer from 1 to {MAX_VIEWPORT}, got {p!r}")
        size.append(int(p))
    if len(parts) == 2:
        return (size[0], size[1]), None
    region: list[int | None] = []
    for name, p in zip(("sx", "sy", "sw", "sh"), parts[2:], strict=True):
        if p == "":
            region.append(0 if name in ("sx", "sy") else None)
            continue
        try:
            v = float(p)
        except ValueError:
            v = math.nan
        if not math.isfinite(v) or (name in ("sx", "sy") and v < 0) or (
                name in ("sw", "sh") and round(v) == 0):
            raise InvalidQuery(f"viewport {name} is not a valid value: {p!r}")
        region.append(round(v))
    sx, sy, sw, sh = region
    return (size[0], size[1]), (sx or 0, sy or 0, sw, sh)


def _window(value: str | None) -> tuple[float, float, str] | None:
    if value is None or value == "":
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) not in (2, 3):
        raise InvalidQuery(f"window must be center,width,function; got {value!r}")
    try:
        center, width = float(parts[0]), float(parts[1])
    except ValueError:
        raise InvalidQuery(f"window center and width must be numbers, got {value!r}") from None
    if not (math.isfinite(center) and math.isfinite(width)):
        raise InvalidQuery(f"window center and width must be finite, got {value!r}")
    name = parts[2].upper().replace("-", "_") if len(parts) == 3 and parts[2] else "LINEAR"
    function = _FUNCTIONS.get(name)
    if function is None:
        raise InvalidQuery(
            f"window function must be linear, linear-exact or sigmoid, got {parts[2]!r}")
    # PS3.3 C.11.2.1.2.1: width >= 1 for LINEAR; > 0 for the others (C.11.2.1.3)
    if (function == "LINEAR" and width < 1) or width <= 0:
        raise InvalidQuery(f"window width {width:g} is too small for {function.lower()}")
    return center, width, function


# ---- rendering ----------------------------------------------------------------------


def render(data: bytes, frame: int, params: RenderParams, *,
           transfer_syntax: str | None = None) -> bytes:
    """Frame *frame* (1-based) of the whole stored object *data*, rendered per *params*.

    Give *transfer_syntax* (``StoredInstance.transfer_syntax``) for objects kept
    without File Meta Information (received over DIMSE); without it a bare data set
    is read as uncompressed little endian.

    Raises
    ------
    NotFound
        The object has no pixel data, or no such frame.
    NotAcceptable
        The pixel data cannot be decoded.
    """
    ds = _read(data, transfer_syntax)
    image = frame_image(ds, frame, params.window)
    image = _crop(image, params.region)
    if params.viewport is not None:
        image = _fit(image, params.viewport)
    return _encode(image, params)


def _read(data: bytes, transfer_syntax: str | None) -> Dataset:
    if transfer_syntax:
        return transcode.read(data, transfer_syntax)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(BytesIO(data), force=True)
    if not getattr(ds, "file_meta", None):
        ds.file_meta = FileMetaDataset()
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit = bool(getattr(ds, "original_encoding", (False, True))[0])
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian)
    return ds


def frame_image(ds: Dataset, frame: int, window: tuple[float, float, str] | None = None
                ) -> np.ndarray:
    """Frame *frame* of *ds* as display-ready uint8: (rows, cols) gray or (rows, cols, 3).

    Raises NotFound / NotAcceptable as :func:`render`.
    """
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NotFound("the instance has no pixel data")
    try:
        frames = max(int(ds.get("NumberOfFrames") or 1), 1)
    except (TypeError, ValueError):
        frames = 1
    if not isinstance(frame, int) or not 1 <= frame <= frames:
        raise NotFound(f"frame {frame} does not exist: the instance has {frames} frame"
                       f"{'s' if frames != 1 else ''} (numbered from 1)")
    ts = UID(ds.file_meta.TransferSyntaxUID)
    try:
        decoder = get_decoder(ts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr, info = decoder.as_array(ds, index=frame - 1, as_rgb=True)
    except Exception as e:  # no plugin, corrupt stream, inconsistent attributes
        raise NotAcceptable(f"cannot decode {ts.name}: {type(e).__name__}: {e}") from None
    photometric = str(info.get("photometric_interpretation") or
                      ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        try:
            return _to_uint8(apply_color_lut(arr, ds))
        except Exception as e:  # a missing or malformed palette
            raise NotAcceptable(f"cannot apply the palette: {type(e).__name__}: {e}") from None
    if arr.ndim == 3:
        if photometric in ("YBR_FULL", "YBR_FULL_422"):  # left so by a decoder: convert
            arr = convert_color_space(arr, photometric, "RGB")
        return _colour_uint8(arr, ds)
    return _gray(arr, ds, frame, window, inverse=photometric == "MONOCHROME1")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    return (arr >> 8).astype(np.uint8) if arr.dtype == np.uint16 else arr.astype(np.uint8)


def _colour_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = (arr - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
        return np.nan_to_num(scaled).astype(np.uint8)
    stored = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    shift = max(stored - 8, 0)
    return np.clip(arr.astype(np.int64) >> shift, 0, 255).astype(np.uint8)


# ---- grayscale pipeline (PS3.4 N.2) -------------------------------------------------


def _functional(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """The *sequence* item of this frame in an enhanced multi-frame object, if any."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame - 1),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items and len(items) > index:
            inner = items[index].get(sequence)
            if inner:
                return inner[0]
    return None


def _gray(arr: np.ndarray, ds: Dataset, frame: int, window: tuple[float, float, str] | None,
          inverse: bool) -> np.ndarray:
    x = _modality(arr, ds, frame)
    if window is None:
        window = _stored_window(ds, frame)
    if window is None and "VOILUTSequence" in ds and x.dtype.kind != "f":
        y = _voi_lut(x, ds)
    elif window is not None:
        y = _apply_window(x, *window)
    else:
        y = _full_range(x)
    if inverse:
        np.subtract(255.0, y, out=y)
    return (y + 0.5).astype(np.uint8)


def _modality(arr: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    """Modality LUT output (PS3.3 C.11.1) as float32 (or int for a LUT sequence)."""
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds)
    source: Any = _functional(ds, frame, "PixelValueTransformationSequence") or ds
    try:
        slope = float(source.get("RescaleSlope", 1) or 1)
        intercept = float(source.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    x = arr.astype(np.float32)
    if slope != 1.0:
        x *= np.float32(slope)
    if intercept != 0.0:
        x += np.float32(intercept)
    return x


def _first(value: Any) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)


def _stored_window(ds: Dataset, frame: int) -> tuple[float, float, str] | None:
    source: Any = ds
    if "WindowCenter" not in ds:
        source = _functional(ds, frame, "FrameVOILUTSequence")
    if source is None or "WindowCenter" not in source or "WindowWidth" not in source:
        return None
    try:
        center, width = _first(source.WindowCenter), _first(source.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    function = _FUNCTIONS.get(str(source.get("VOILUTFunction", "LINEAR") or "LINEAR").upper(),
                              "LINEAR")
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        return None
    if function == "LINEAR" and width < 1:
        width = 1.0
    return center, width, function


def _apply_window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI window to 0..255 float32 (PS3.3 C.11.2.1.2.1, C.11.2.1.3.1, C.11.2.1.3.2)."""
    x = x.astype(np.float32, copy=False)
    if function == "SIGMOID":
        y = np.exp(x * np.float32(-4.0 / width) + np.float32(4.0 * center / width))
        y += 1.0
        return np.divide(np.float32(255.0), y, out=y)
    if function == "LINEAR_EXACT":
        scale, offset = 255.0 / width, (0.5 - center / width) * 255.0
    elif width <= 1:  # LINEAR with width 1: a threshold at center - 0.5
        return np.where(x > center - 0.5, np.float32(255), np.float32(0))
    else:
        scale = 255.0 / (width - 1)
        offset = ((0.5 - center) / (width - 1) + 0.5) * 255.0
    y = x * np.float32(scale)
    y += np.float32(offset)
    return np.clip(y, 0, 255, out=y)


def _full_range(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return np.zeros(x.shape, np.float32)
    y = (x - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.nan_to_num(y, copy=False)


def _voi_lut(x: np.ndarray, ds: Dataset) -> np.ndarray:
    """A VOI LUT Sequence (PS3.3 C.11.2.1.1), scaled from its output range to 0..255."""
    y = apply_voi_lut(np.rint(x).astype(np.int64), ds, index=0, prefer_lut=True)
    try:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
    except (AttributeError, IndexError, TypeError, ValueError):
        bits = 16
    top = float(2**bits - 1) if 0 < bits <= 16 else float(np.max(y) or 1)
    return np.clip(y.astype(np.float32) * np.float32(255.0 / top), 0, 255)


# ---- geometry and encoding ----------------------------------------------------------


def _crop(image: np.ndarray, region: tuple[int, int, int | None, int | None] | None
          ) -> np.ndarray:
    if region is None:
        return image
    sx, sy, sw, sh = region
    rows, cols = image.shape[:2]
    right = cols if sw is None else min(cols, sx + abs(sw))
    bottom = rows if sh is None else min(rows, sy + abs(sh))
    if sx >= cols or sy >= rows or right <= sx or bottom <= sy:
        raise InvalidQuery(f"viewport region starts outside the {cols}x{rows} image")
    out = image[sy:bottom, sx:right]
    if sw is not None and sw < 0:
        out = out[:, ::-1]
    if sh is not None and sh < 0:
        out = out[::-1]
    return np.ascontiguousarray(out)


def _fit(image: np.ndarray, viewport: tuple[int, int]) -> np.ndarray | Image.Image:
    rows, cols = image.shape[:2]
    scale = min(viewport[0] / cols, viewport[1] / rows)
    size = (min(viewport[0], max(1, round(cols * scale))),
            min(viewport[1], max(1, round(rows * scale))))
    if size == (cols, rows):
        return image
    pil = Image.fromarray(image)
    # LANCZOS when shrinking (no aliasing), BICUBIC when enlarging; reducing_gap
    # shrinks by whole factors first, which keeps big images fast
    if size[0] < cols:
        return pil.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return pil.resize(size, Image.Resampling.BICUBIC)


def _encode(image: np.ndarray | Image.Image, params: RenderParams) -> bytes:
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    out = BytesIO()
    if params.media_type == PNG:
        pil.save(out, format="PNG", compress_level=3)  # speed over a few % of size
    elif params.media_type == GIF:
        if pil.mode == "RGB":
            pil = pil.quantize(colors=256)
        pil.save(out, format="GIF")
    else:
        pil.save(out, format="JPEG", quality=params.quality)
    return out.getvalue()
