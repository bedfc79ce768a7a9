"""Frames (anim.pixels) and server-side rendering (anim.render) on pydicom's test files.

Objects are stored in a real archive (blob split, DICOM JSON from ingest) and the
frames read back are compared with pydicom's own frame extraction and decoding.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.pixels import apply_voi_lut, pack_bits
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from anim import Archive, InvalidQuery, NotAcceptable, NotFound, Source, pixels, render
from anim.models import StoredInstance
from anim.render import RenderParams
from tests.conftest import PYDICOM_TEST_FILES, open_archive

# One file per stored transfer syntax, plus multi-frame, colour and 1-bit cases
FILES = [
    "CT_small.dcm",  # Explicit VR LE
    "MR_small_implicit.dcm",  # Implicit VR LE
    "MR_small_bigendian.dcm",  # Explicit VR BE
    "SC_rgb_small_odd_big_endian.dcm",  # BE, 8-bit OW (word-swapped bytes)
    "image_dfl.dcm",  # Deflated: one blob, read whole
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG Baseline, YBR_FULL
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG Baseline, YBR_FULL_422
    "JPGExtended.dcm",  # JPEG Extended 12-bit
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG Lossless SV1
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "SC_rgb_jls_lossy_line.dcm",  # JPEG-LS near-lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "JPEG2000.dcm",  # JPEG 2000, no Basic Offset Table
    "MR_small_RLE.dcm",  # RLE
    "SC_rgb_rle_2frame.dcm",  # RLE, 2 frames, BOT
    "SC_rgb_rle_16bit_2frame.dcm",
    "rtdose.dcm",  # 15 native frames, 32-bit
    "rtdose_expb.dcm",  # 15 big endian frames
    "rtdose_rle.dcm",  # 15 RLE frames, no BOT
    "examples_ybr_color.dcm",  # 30 JPEG Baseline frames, BOT
    "liver_1frame.dcm",  # BitsAllocated 1
    "SC_ybr_full_422_uncompressed.dcm",  # native YBR_FULL_422: 2 samples a pixel
]
# Little endian twins of big endian files: the decoded frames must match them
BIG_ENDIAN_TWINS = {
    "MR_small_bigendian.dcm": "MR_small.dcm",
    "rtdose_expb.dcm": "rtdose.dcm",
    "SC_rgb_small_odd_big_endian.dcm": "SC_rgb_small_odd.dcm",
    "liver_expb_1frame.dcm": "liver_1frame.dcm",
}


def _read(path: Path | bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(path) if isinstance(path, bytes) else path, force=True)


def _test_file(name: str) -> bytes:
    """A pydicom test file; the few without Study / Series UIDs (pydicom's JPEG-LS
    near-lossless files) get fixed ones so that the archive takes them."""
    data = (PYDICOM_TEST_FILES / name).read_bytes()
    ds = _read(data)
    if "StudyInstanceUID" in ds and "SeriesInstanceUID" in ds:
        return data
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or f"1.2.826.0.1.3680043.8.498.{len(name)}"
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or f"{ds.StudyInstanceUID}.1"
    return _part10(ds)


def _frames(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames") or 1)


def _part10(ds: Dataset) -> bytes:
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


class Stored:
    """A module-wide archive; each object is stored once and its (inst, meta) kept.

    Several pydicom files share a SOP Instance UID (they become versions of one
    instance), so the version and the JSON are taken right after each store.
    """

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._cache: dict[bytes, tuple[StoredInstance, dict[str, Any]]] = {}

    def put(self, data: bytes) -> tuple[StoredInstance, dict[str, Any]]:
        if data not in self._cache:
            sop = self.archive.store(data, Source("test", protocol="import")).sop_instance_uid
            self._cache[data] = (self.archive.locate(sop), self.archive.instance_json(sop))
        return self._cache[data]

    def file(self, name: str) -> tuple[StoredInstance, dict[str, Any], bytes]:
        data = _test_file(name)
        inst, meta = self.put(data)
        return inst, meta, data

    def frames(self, data: bytes, numbers: list[int], **kw: Any) -> list[bytes]:
        inst, meta = self.put(data)
        return pixels.stored_frames(kw.get("open_blob", self.archive.blobs.open), inst,
                                    kw.get("meta", meta), numbers)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    archive = open_archive(tmp_path_factory.mktemp("pixels") / "data")
    yield Stored(archive)
    archive.close()


def _expected_stored(ds: Dataset) -> list[bytes]:
    """pydicom's own frame extraction: encapsulated frames, or equal native slices."""
    elem = ds["PixelData"]
    n = _frames(ds)
    if elem.is_undefined_length:
        return list(generate_frames(elem.value, number_of_frames=n))
    length = get_expected_length(ds, unit="bytes") // n
    return [elem.value[i * length : (i + 1) * length] for i in range(n)]


# ---- stored frames ------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_stored_frames_equal_pydicom_frames(stored: Stored, name: str) -> None:
    inst, meta, data = stored.file(name)
    ds = _read(data)
    n = _frames(ds)
    got = pixels.stored_frames(stored.archive.blobs.open, inst, meta, list(range(1, n + 1)))
    assert got == _expected_stored(ds)
    # asked out of order and twice: answered in the order asked
    again = pixels.stored_frames(stored.archive.blobs.open, inst, meta, [n, 1, n])
    assert again == [got[-1], got[0], got[-1]]


def test_every_stored_syntax_is_covered(stored: Stored) -> None:
    syntaxes = {stored.file(name)[0].transfer_syntax for name in FILES}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
            "1.2.840.10008.1.2.5"} <= syntaxes


class Counting:
    """An open_blob that counts the bytes read from each blob."""

    def __init__(self, open_blob: Any) -> None:
        self.open_blob = open_blob
        self.read: dict[str, int] = {}

    def __call__(self, key: str) -> BinaryIO:
        f = self.open_blob(key)
        self.read.setdefault(key, 0)
        real_read = f.read

        def read(size: int = -1) -> bytes:
            b = real_read(size)
            self.read[key] += len(b)
            return b

        f.read = read  # type: ignore[method-assign]
        return f


@pytest.mark.parametrize(("name", "frame"), [("rtdose.dcm", 15),
                                              ("examples_ybr_color.dcm", 30)])
def test_only_the_asked_frame_is_read(stored: Stored, name: str, frame: int) -> None:
    inst, meta, _ = stored.file(name)
    counting = Counting(stored.archive.blobs.open)
    [got] = pixels.stored_frames(counting, inst, meta, [frame])
    pixel_blob = stored.archive.blobs.size(inst.blob_keys[1])
    read = counting.read[inst.blob_keys[1]]
    # the frame (plus, encapsulated, the offset table and item headers) - not the rest
    assert len(got) <= read < len(got) + 8 * frame + 256
    assert read < pixel_blob / 5


def _jpeg_frames(count: int) -> tuple[Dataset, list[bytes]]:
    ds = _read(PYDICOM_TEST_FILES / "examples_ybr_color.dcm")
    return ds, list(generate_frames(ds.PixelData, number_of_frames=_frames(ds)))[:count]


def _with_pixels(ds: Dataset, value: bytes, frames: int) -> bytes:
    ds = ds.copy()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.NumberOfFrames = frames
    ds.PixelData = value
    ds["PixelData"].is_undefined_length = True
    return _part10(ds)


def _padded(frame: bytes) -> bytes:
    return frame + b"\x00" if len(frame) % 2 else frame  # items have even lengths


@pytest.mark.parametrize("has_bot", [True, False])
def test_frames_split_in_several_fragments(stored: Stored, has_bot: bool) -> None:
    ds, frames = _jpeg_frames(4)
    data = _with_pixels(ds, encapsulate(frames, fragments_per_frame=3, has_bot=has_bot), 4)
    got = stored.frames(data, [1, 2, 3, 4])
    assert got == [_padded(f) for f in frames]
    assert stored.frames(data, [3]) == [_padded(frames[2])]
    # and they decode to what pydicom decodes from the same object
    decoded = pixels.decoded_frames(data, JPEGBaseline8Bit, [2])
    assert decoded == [_read(data).pixel_array[1].tobytes()]


@pytest.mark.parametrize("inline", [True, False])
def test_extended_offset_table(stored: Stored, inline: bool) -> None:
    ds, frames = _jpeg_frames(3)
    value, offsets, lengths = encapsulate_extended(frames)
    ds = ds.copy()
    ds.ExtendedOffsetTable = offsets
    ds.ExtendedOffsetTableLengths = lengths
    data = _with_pixels(ds, value, 3)
    inst, meta = stored.put(data)
    assert "7FE00001" in meta
    if not inline:  # a large table is bulk data in the JSON: read from the header blob
        meta = {**meta, "7FE00001": {"vr": "OV", "BulkDataURI": "anim-bulk:x"},
                "7FE00002": {"vr": "OV", "BulkDataURI": "anim-bulk:y"}}
    got = pixels.stored_frames(stored.archive.blobs.open, inst, meta, [3, 1])
    assert got == [frames[2], frames[0]]


def _native(rows: int, cols: int, frames: int, bits: int, value: bytes, **extra: Any) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID = "PIX"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    for k, v in extra.items():
        setattr(ds, k, v)
    if "FloatPixelData" not in extra:
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
        ds.PixelData = value
    return _part10(ds)


def test_one_bit_frames_off_byte_boundaries_are_repacked(stored: Stored) -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 2, (4, 3, 3), dtype=np.uint8)  # 9 bits a frame
    data = _native(3, 3, 4, 1, pack_bits(arr, pad=True))
    got = stored.frames(data, [1, 2, 3, 4])
    assert got == [pack_bits(arr[i], pad=False) for i in range(4)]
    unpacked = [np.unpackbits(np.frombuffer(g, np.uint8), bitorder="little")[:9] for g in got]
    assert all(np.array_equal(u, arr[i].ravel()) for i, u in enumerate(unpacked))
    inst, _ = stored.put(data)
    assert pixels.decoded_frames(data, inst.transfer_syntax, [3]) == [got[2]]


def test_float_pixel_data(stored: Stored) -> None:
    arr = np.arange(2 * 4 * 5, dtype="<f4").reshape(2, 4, 5) / 7
    data = _native(4, 5, 2, 32, b"", FloatPixelData=arr.tobytes())
    assert stored.frames(data, [2, 1]) == [arr[1].tobytes(), arr[0].tobytes()]
    assert pixels.decoded_frames(data, ExplicitVRLittleEndian, [2]) == [arr[1].tobytes()]


@pytest.mark.parametrize("numbers", [[0], [2], [1, 2], [-1]])
def test_frame_out_of_range_is_not_found(stored: Stored, numbers: list[int]) -> None:
    inst, meta, data = stored.file("CT_small.dcm")
    with pytest.raises(NotFound, match="does not exist"):
        pixels.stored_frames(stored.archive.blobs.open, inst, meta, numbers)
    with pytest.raises(NotFound, match="does not exist"):
        pixels.decoded_frames(data, inst.transfer_syntax, numbers)


def test_frame_past_the_last_of_a_multiframe_is_not_found(stored: Stored) -> None:
    inst, meta, _ = stored.file("examples_ybr_color.dcm")
    with pytest.raises(NotFound, match="30 frames"):
        pixels.stored_frames(stored.archive.blobs.open, inst, meta, [31])


def test_instance_without_pixel_data_is_not_found(stored: Stored) -> None:
    inst, meta, data = stored.file("rtplan.dcm")
    with pytest.raises(NotFound, match="no pixel data"):
        pixels.stored_frames(stored.archive.blobs.open, inst, meta, [1])
    with pytest.raises(NotFound, match="no pixel data"):
        pixels.decoded_frames(data, inst.transfer_syntax, [1])


# ---- decoded frames -----------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_decoded_frames_equal_pydicom_pixels(stored: Stored, name: str) -> None:
    inst, _meta, data = stored.file(name)
    ds = _read(data)
    n = _frames(ds)
    got = pixels.decoded_frames(data, inst.transfer_syntax, list(range(1, n + 1)))
    ts = UID(inst.transfer_syntax)
    if ts.is_compressed:
        arr = ds.pixel_array if n > 1 else ds.pixel_array[None]
        assert got == [a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arr]
        assert len(got[0]) == ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
    elif name in BIG_ENDIAN_TWINS:
        twin = (PYDICOM_TEST_FILES / BIG_ENDIAN_TWINS[name]).read_bytes()
        assert got == _expected_stored(_read(twin))
    else:  # native little endian: what Explicit VR Little Endian carries is the stored value
        assert got == _expected_stored(ds)


@pytest.mark.parametrize("name", sorted(BIG_ENDIAN_TWINS))
def test_big_endian_decodes_to_its_little_endian_twin(stored: Stored, name: str) -> None:
    inst, _meta, data = stored.file(name)
    twin = _read((PYDICOM_TEST_FILES / BIG_ENDIAN_TWINS[name]).read_bytes())
    n = _frames(twin)
    assert pixels.decoded_frames(data, inst.transfer_syntax, list(range(1, n + 1))) \
        == _expected_stored(twin)
    # the stored form stays big endian (and differs, except for byte data)
    stored_form = stored.frames(data, [1])
    assert len(stored_form[0]) == len(_expected_stored(twin)[0])


def test_decoding_a_broken_stream_is_not_acceptable(stored: Stored) -> None:
    inst, _meta, data = stored.file("JPEG-lossy.dcm")  # pydicom cannot decode it either
    with pytest.raises(NotAcceptable, match="cannot decode"):
        pixels.decoded_frames(data, inst.transfer_syntax, [1])


def test_decoded_jpeg_is_rgb_like_a_decompressed_instance(stored: Stored) -> None:
    inst, _meta, data = stored.file("SC_rgb_dcmtk_+eb+cy+np.dcm")  # YBR_FULL_422
    ds = _read(data)
    ds.decompress(generate_instance_uid=False)
    assert ds.PhotometricInterpretation == "RGB"
    assert pixels.decoded_frames(data, inst.transfer_syntax, [1]) == [ds.PixelData]


def test_frame_media_types() -> None:
    assert pixels.frame_media_type("1.2.840.10008.1.2.4.50") == "image/jpeg"
    assert pixels.frame_media_type("1.2.840.10008.1.2.4.70") == "image/jpeg"
    assert pixels.frame_media_type("1.2.840.10008.1.2.4.80") == "image/jls"
    assert pixels.frame_media_type("1.2.840.10008.1.2.4.90") == "image/jp2"
    assert pixels.frame_media_type("1.2.840.10008.1.2.4.92") == "image/jpx"
    assert pixels.frame_media_type("1.2.840.10008.1.2.5") == "image/dicom-rle"
    assert pixels.frame_media_type("1.2.840.10008.1.2.4.100") == "video/mpeg"
    assert pixels.frame_media_type("1.2.840.10008.1.2.4.102") == "video/mp4"
    assert pixels.frame_media_type("1.2.840.10008.1.2.1") == "application/octet-stream"
    assert pixels.MEDIA_TYPE_ALIASES["image/x-dicom-rle"] == "image/dicom-rle"
    assert pixels.frames_are_native("1.2.840.10008.1.2")
    assert not pixels.frames_are_native("1.2.840.10008.1.2.2")


# ---- rendering ----------------------------------------------------------------------


def _image(out: bytes, fmt: str = "JPEG") -> np.ndarray:
    im = Image.open(io.BytesIO(out))
    assert im.format == fmt
    im.load()
    return np.asarray(im)


def _ct(**attrs: Any) -> bytes:
    ds = _read(PYDICOM_TEST_FILES / "CT_small.dcm")
    for k, v in attrs.items():
        setattr(ds, k, v)
    return _part10(ds)


PNG = RenderParams(media_type="image/png")


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
                                  "SC_rgb_jpeg_dcmtk.dcm", "examples_palette.dcm",
                                  "image_dfl.dcm", "liver_expb_1frame.dcm", "rtdose_rle.dcm",
                                  "SC_ybr_full_422_uncompressed.dcm"])
@pytest.mark.parametrize("media", ["image/jpeg", "image/png"])
def test_render_gives_an_image_of_the_viewport_size(name: str, media: str) -> None:
    data = _test_file(name)
    params = RenderParams(media_type=media, viewport=(90, 90))
    arr = _image(render.render(data, 1, params), "JPEG" if media == "image/jpeg" else "PNG")
    ds = _read(data)
    expected = (90, 90) if ds.Rows == ds.Columns else None
    if expected:
        assert arr.shape[:2] == expected
    else:
        assert max(arr.shape[:2]) == 90
    colour = ds.SamplesPerPixel == 3 or ds.PhotometricInterpretation == "PALETTE COLOR"
    assert arr.ndim == (3 if colour else 2)
    assert float(arr.var()) > 0


def test_viewport_keeps_the_aspect_ratio() -> None:
    data = (PYDICOM_TEST_FILES / "JPEG2000.dcm").read_bytes()  # 1024 rows x 256 columns
    arr = _image(render.render(data, 1, RenderParams(viewport=(100, 100))))
    assert arr.shape == (100, 25)
    arr = _image(render.render(data, 1, RenderParams(viewport=(1000, 512))))
    assert arr.shape == (512, 128)


def test_render_via_the_archive_as_stored(stored: Stored) -> None:
    inst, _meta, _ = stored.file("SC_rgb_jpeg_dcmtk.dcm")
    data = stored.archive.read_bytes(inst.sop_instance_uid)
    arr = _image(render.render(data, 1, PNG, transfer_syntax=inst.transfer_syntax), "PNG")
    # a lossless output of a decoded JPEG: pydicom's RGB pixels, unchanged
    assert np.array_equal(arr, _read(data).pixel_array)


def test_stored_window_is_applied_like_pydicom() -> None:
    data = _ct(WindowCenter=40, WindowWidth=400)
    got = _image(render.render(data, 1, PNG), "PNG").astype(int)
    ds = _read(data)
    voi = apply_voi_lut(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept),
                        ds)
    # pydicom maps the window onto the stored bit range (signed 16 here), rescaled
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    lo, hi = -(2**15) * slope + intercept, (2**15 - 1) * slope + intercept
    expected = np.rint((voi - lo) * 255 / (hi - lo)).astype(int)
    assert np.abs(got - expected).max() <= 1
    assert got.min() == 0
    assert got.max() == 255


def test_window_parameter_overrides_and_changes_the_pixels() -> None:
    data = _ct(WindowCenter=40, WindowWidth=400)
    default = _image(render.render(data, 1, PNG), "PNG")
    narrow = _image(render.render(data, 1, RenderParams("image/png", window=(
        40.0, 80.0, "LINEAR"))), "PNG")
    sigmoid = _image(render.render(data, 1, RenderParams("image/png", window=(
        40.0, 400.0, "SIGMOID"))), "PNG")
    exact = _image(render.render(data, 1, RenderParams("image/png", window=(
        40.0, 400.0, "LINEAR_EXACT"))), "PNG")
    assert not np.array_equal(default, narrow)
    assert not np.array_equal(default, sigmoid)
    assert np.abs(default.astype(int) - exact.astype(int)).max() <= 1  # nearly the same line
    # a narrower window saturates more pixels
    assert (narrow == 255).sum() + (narrow == 0).sum() > (default == 255).sum() + (
        default == 0).sum()


def test_no_window_uses_the_full_range() -> None:
    data = _ct()  # CT_small has no Window Center / Width
    arr = _image(render.render(data, 1, PNG), "PNG")
    assert arr.min() == 0
    assert arr.max() == 255


def test_monochrome1_is_inverted() -> None:
    mono2 = _image(render.render(_ct(WindowCenter=40, WindowWidth=400), 1, PNG), "PNG")
    mono1 = _image(render.render(_ct(WindowCenter=40, WindowWidth=400,
                                     PhotometricInterpretation="MONOCHROME1"), 1, PNG), "PNG")
    assert np.abs((255 - mono2.astype(int)) - mono1.astype(int)).max() <= 1


@pytest.mark.parametrize("name", ["rtdose.dcm", "SC_rgb_rle_2frame.dcm",
                                  "examples_ybr_color.dcm"])
def test_multiframe_frames_render_differently(name: str) -> None:
    data = (PYDICOM_TEST_FILES / name).read_bytes()
    one = _image(render.render(data, 1, PNG), "PNG")
    two = _image(render.render(data, 2, PNG), "PNG")
    assert one.shape == two.shape
    assert not np.array_equal(one, two)


@pytest.mark.parametrize("frame", [0, 2, -1])
def test_render_missing_frame_is_not_found(frame: int) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        render.render(_ct(), frame, PNG)


def test_render_undecodable_is_not_acceptable() -> None:
    data = (PYDICOM_TEST_FILES / "JPEG-lossy.dcm").read_bytes()
    with pytest.raises(NotAcceptable, match="cannot decode"):
        render.render(data, 1, PNG)


def test_region_crops_and_flips() -> None:
    data = _ct(WindowCenter=40, WindowWidth=400)
    full = _image(render.render(data, 1, PNG), "PNG")
    params = render.parse({"viewport": "64,32,10,20,64,32"}, "image/png")
    crop = _image(render.render(data, 1, params), "PNG")
    assert np.array_equal(crop, full[20:52, 10:74])
    flipped = render.parse({"viewport": "64,32,10,20,-64,-32"}, "image/png")
    assert np.array_equal(_image(render.render(data, 1, flipped), "PNG"),
                          full[20:52, 10:74][::-1, ::-1])


def test_thumbnail_defaults_to_a_small_jpeg() -> None:
    params = render.parse({}, "", thumbnail=True)
    assert params.media_type == "image/jpeg"
    assert params.viewport == (128, 128)
    arr = _image(render.render(_ct(), 1, params))
    assert arr.shape == (128, 128)


# ---- parameters ---------------------------------------------------------------------


def test_parse_reads_the_parameters() -> None:
    p = render.parse({"quality": "55", "viewport": "300,200",
                      "window": "40,400,linear-exact"}, "image/png")
    assert p == RenderParams("image/png", 55, (300, 200), (40.0, 400.0, "LINEAR_EXACT"))
    assert render.parse({"window": "-600,1500,SIGMOID"}, "").window == (-600.0, 1500.0,
                                                                         "SIGMOID")
    p = render.parse({"annotation": "patient", "foo": "1", "iccprofile": "no",
                      "charset": "utf-8"}, "")
    assert p.ignored == ("annotation", "foo")
    assert p.media_type == "image/jpeg"


@pytest.mark.parametrize(("accept", "media"), [
    ("", "image/jpeg"),
    ("*/*", "image/jpeg"),
    ("image/*", "image/jpeg"),
    ("image/png", "image/png"),
    ("image/gif", "image/gif"),
    ("image/png;q=0.5, image/jpeg", "image/jpeg"),
    ("image/webp, image/png;q=0.2", "image/png"),
    ("application/dicom, */*;q=0.1", "image/jpeg"),
    ('multipart/related; type="image/png"', "image/png"),
])
def test_accept_picks_the_media_type(accept: str, media: str) -> None:
    assert render.parse({}, accept).media_type == media


def test_accept_query_parameter_replaces_the_header() -> None:
    assert render.parse({"accept": "image/png"}, "image/jpeg").media_type == "image/png"


@pytest.mark.parametrize("accept", ["application/dicom", "image/webp", "image/png;q=0",
                                    "text/html, application/json"])
def test_accept_without_a_rendered_type_is_not_acceptable(accept: str) -> None:
    with pytest.raises(NotAcceptable, match="cannot render"):
        render.parse({}, accept)


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("quality", "abc", "quality"),
    ("quality", "0", "quality"),
    ("quality", "101", "quality"),
    ("viewport", "128", "viewport"),
    ("viewport", "a,b", "vw"),
    ("viewport", "0,10", "vw"),
    ("viewport", "10,99999", "vh"),
    ("viewport", "10,10,1,2,3", "viewport"),
    ("viewport", "10,10,-1,0,5,5", "sx"),
    ("viewport", "10,10,0,0,0,5", "sw"),
    ("window", "40", "window"),
    ("window", "a,b,linear", "numbers"),
    ("window", "40,0,linear", "width"),
    ("window", "40,0.5,linear", "width"),
    ("window", "40,nan,linear", "finite"),
    ("window", "40,400,cubic", "function"),
])
def test_bad_parameters_are_invalid_queries(key: str, value: str, reason: str) -> None:
    with pytest.raises(InvalidQuery, match=reason):
        render.parse({key: value}, "")


def test_float_pixel_data_renders() -> None:
    arr = np.linspace(-1.5, 2.5, 2 * 16 * 16, dtype="<f4").reshape(2, 16, 16)
    data = _native(16, 16, 2, 32, b"", FloatPixelData=arr.tobytes())
    out = _image(render.render(data, 2, PNG), "PNG")
    assert out.shape == (16, 16)
    assert out.min() == 0
    assert out.max() == 255


def test_gif_output() -> None:
    out = render.render(_ct(), 1, RenderParams("image/gif", viewport=(32, 32)))
    assert Image.open(io.BytesIO(out)).format == "GIF"
