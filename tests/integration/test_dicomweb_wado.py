"""WADO-RS against a running archive (DICOMweb issue, acceptance points 1, 4 and 5).

The archives are filled with ``anim import`` before their server starts, so every
object is kept as the whole file it was, file meta included. The synthetic samples
and one encoding of each of pydicom's storage objects share the first archive;
pydicom ships several encodings under one SOP Instance UID (which would be versions
of one instance, only the newest served), so the other encodings go, round by round,
into archives of their own (``dicomweb_helpers.rounds``).

For every object, in every transfer syntax pydicom ships:

- ``transfer-syntax=*``: the part is the imported file, byte for byte; its frames are
  the stored frames (pydicom's ``generate_frames`` for encapsulated data, a slice of
  the Pixel Data otherwise) and each part's Content-Type names the transfer syntax;
  OHIF's unquoted and quoted Accept forms both work.
- the default (Explicit VR Little Endian): dicomweb-client gets a data set whose
  pixels equal pydicom's decode of the original; what cannot be decoded is 406.
- metadata: every BulkDataURI is absolute and gives back the element's bytes.
- rendered JPEG and PNG decode with Pillow and are not blank.

On the samples: study / series / instance retrieval and metadata through dicomweb-client,
conditional requests (ETag, Last-Modified), gzip, CORS (errors and preflight included),
404 with a reason, 406, rendered and thumbnail with viewport / window / quality.
Acceptance 5: C-STORE (storescu) then QIDO and WADO; STOW then findscu and movescu.
Acceptance 4: a whole-study retrieve of more than 1 GB with the server's RSS sampled.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID, generate_uid

from tests.conftest import SAMPLES, AnimServer, sample_files, storescu
from tests.integration.dicomweb_helpers import (
    ANY_TS,
    DICOM_JSON,
    EXPLICIT_LE,
    Body,
    RssSampler,
    accept_dicom,
    accept_octets,
    big_instance,
    big_pixels,
    client,
    first,
    frames_of,
    full,
    get,
    has_reason,
    header,
    healthy,
    import_files,
    media_params,
    media_type,
    multipart,
    qido_ok,
    root,
    rounds,
    stamp,
    stow,
    swap_words,
)
from tests.integration.test_cfind import findscu
from tests.integration.test_retrieve import Destination, _free_port, movescu, received_in
from tests.integration.test_transfer_syntaxes import StorageObject, dataset_bytes

pytestmark = [pytest.mark.integration, pytest.mark.dcmtk,
              # pydicom's odd files hold invalid values on purpose (badVR.dcm's '1A')
              pytest.mark.filterwarnings("ignore:Invalid value for VR")]

EXPLICIT_BE = "1.2.840.10008.1.2.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE = {IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED}
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
SEQ_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
RENDERABLE = {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT",
              "YBR_ICT", "PALETTE COLOR"}
ORIGIN = "http://viewer.example"
ROUNDS = rounds()
OBJECTS = [(n, o) for n, objs in enumerate(ROUNDS) for o in objs]
IDS = [o.path.name for _, o in OBJECTS]


# ---- the archives under test -----------------------------------------------------------


class Archives:
    """One archive per round of pydicom's objects (the samples join round 0), each
    filled by ``anim import`` and served; started on first use, stopped at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers: dict[int, AnimServer] = {}

    def server(self, n: int) -> AnimServer:
        if n not in self.servers:
            data = self.base / f"round{n}"
            paths = [o.path for o in ROUNDS[n]] + (sample_files() if n == 0 else [])
            import_files(data, paths)
            self.servers[n] = AnimServer(data).start()
        return self.servers[n]

    def stop(self) -> None:
        for srv in self.servers.values():
            srv.stop()


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archives]:
    a = Archives(tmp_path_factory.mktemp("wado"))
    try:
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="module")
def samples(archives: Archives) -> AnimServer:
    return archives.server(0)


def quiet_read(data: bytes | Path) -> Dataset:
    return full(data)


def pixels_of(ds: Dataset) -> np.ndarray | None:
    """pydicom's decode (None when pydicom cannot decode it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ds.pixel_array
        except Exception:
            return None


def instance_url(srv: AnimServer, h: Dataset) -> str:
    return (f"{root(srv)}/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}"
            f"/instances/{h.SOPInstanceUID}")


def sop_of(part_body: bytes) -> str:
    return str(quiet_read(part_body).SOPInstanceUID)


# ---- every pydicom storage object: transfer-syntax=* ----------------------------------


@pytest.mark.parametrize(("n", "obj"), OBJECTS, ids=IDS)
def test_instance_as_stored_is_the_imported_file(archives: Archives, n: int,
                                                 obj: StorageObject) -> None:
    srv = archives.server(n)
    h = header(obj.path)
    r = get(instance_url(srv, h), accept_dicom(ANY_TS))
    assert r.status_code == 200, (r.status_code, r.text[:300])
    [part] = multipart(r)
    ptype, params = media_params(part.content_type)
    assert ptype == "application/dicom"
    assert params.get("transfer-syntax", obj.transfer_syntax) == obj.transfer_syntax
    assert part.body == obj.path.read_bytes(), "not the imported file byte for byte"
    # dicomweb-client asks the same way and reads the same data set
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's odd files warn when read
        ds = client(srv).retrieve_instance(h.StudyInstanceUID, h.SeriesInstanceUID,
                                           h.SOPInstanceUID,
                                           media_types=(("application/dicom", ANY_TS),))
    assert ds.SOPInstanceUID == obj.sop_instance_uid
    assert ds.file_meta.TransferSyntaxUID == obj.transfer_syntax


# ---- every pydicom storage object: the default syntax ----------------------------------


@pytest.mark.parametrize(("n", "obj"), OBJECTS, ids=IDS)
def test_instance_by_default_is_explicit_le_with_pydicoms_pixels(
        archives: Archives, n: int, obj: StorageObject) -> None:
    srv = archives.server(n)
    h = header(obj.path)
    original = quiet_read(obj.path)
    want = pixels_of(original) if "PixelData" in original else None
    r = get(instance_url(srv, h), accept_dicom())
    if obj.transfer_syntax == EXPLICIT_LE:
        assert r.status_code == 200, (r.status_code, r.text[:300])
        [part] = multipart(r)
        assert dataset_bytes(part.body) == dataset_bytes(obj.path.read_bytes())
        return
    if "PixelData" in original and want is None:
        # pydicom cannot decode it: nor can the archive, and it says so
        assert r.status_code == 406, (r.status_code, r.text[:300])
        assert has_reason(r)
        return
    assert r.status_code == 200, (r.status_code, r.text[:300])
    [part] = multipart(r)
    assert media_params(part.content_type)[1].get("transfer-syntax", EXPLICIT_LE) == EXPLICIT_LE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dicomweb-client's own default is transfer-syntax=*: ask for Explicit VR LE
        ds = client(srv).retrieve_instance(h.StudyInstanceUID, h.SeriesInstanceUID,
                                           h.SOPInstanceUID,
                                           media_types=(("application/dicom", EXPLICIT_LE),))
    assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert ds.SOPInstanceUID == obj.sop_instance_uid
    if want is not None:
        got = pixels_of(ds)
        assert got is not None, "the decoded instance's pixels cannot be read"
        assert got.shape == want.shape, (got.shape, want.shape)
        assert np.array_equal(got, want), "decoded pixels differ from pydicom's decode"
    else:
        # no pixel data: the same attributes with the same values
        meta_free = {e.tag for e in original if e.tag.group != 2 and e.tag.element != 0}
        assert meta_free <= {e.tag for e in ds}
        for tag in sorted(meta_free):
            if original[tag].VR != "SQ":
                assert ds[tag].value == original[tag].value, tag


# ---- every pydicom storage object: frames ----------------------------------------------


def _frame_length(ds: Dataset) -> int | None:
    bits = int(ds.BitsAllocated) * int(ds.Rows) * int(ds.Columns) * int(
        ds.get("SamplesPerPixel", 1))
    return bits // 8 if bits % 8 == 0 else None


def swap_width(ds: Dataset) -> int:
    """The word size big endian pixel data is swapped by: OW is 16-bit words even for
    8-bit samples (PS3.5 7.3), OB is bytes."""
    bits = int(ds.BitsAllocated)
    if bits >= 16:
        return bits // 8
    return 2 if ds["PixelData"].VR == "OW" else 1


def stored_frames(obj: StorageObject, original: Dataset) -> list[bytes] | None:
    """What ``transfer-syntax=*`` frames are: pydicom's frame extraction, or a slice."""
    n = frames_of(original)
    if UID(obj.transfer_syntax).is_encapsulated:
        try:
            return list(generate_frames(original.PixelData, number_of_frames=n))
        except Exception:
            return None  # pydicom cannot split it either
    length = _frame_length(original)
    if length is None:
        return [bytes(original.PixelData)] if n == 1 else None
    data = bytes(original.PixelData)
    return [data[i * length:(i + 1) * length] for i in range(n)]


def _pixel_objects() -> list[tuple[int, StorageObject]]:
    out = []
    for n, o in OBJECTS:
        ds = quiet_read(o.path)
        if "PixelData" in ds and "Rows" in ds and "BitsAllocated" in ds:
            out.append((n, o))
    return out


PIXEL_OBJECTS = _pixel_objects()
PIXEL_IDS = [o.path.name for _, o in PIXEL_OBJECTS]


@pytest.mark.parametrize("quoted", [True, False], ids=["quoted", "unquoted"])
@pytest.mark.parametrize(("n", "obj"), PIXEL_OBJECTS, ids=PIXEL_IDS)
def test_frames_as_stored_are_the_stored_frames(archives: Archives, n: int,
                                                obj: StorageObject, quoted: bool) -> None:
    srv = archives.server(n)
    original = quiet_read(obj.path)
    count = frames_of(original)
    url = f"{instance_url(srv, original)}/frames/{','.join(map(str, range(1, count + 1)))}"
    r = get(url, accept_octets(ANY_TS, quoted=quoted))
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert media_params(r.headers["Content-Type"])[1].get("type") == "application/octet-stream"
    parts = multipart(r)
    assert len(parts) == count
    want = stored_frames(obj, original)
    width = swap_width(original)
    for i, part in enumerate(parts):
        ptype, params = media_params(part.content_type)
        assert ptype == "application/octet-stream"
        named = params.get("transfer-syntax")
        assert named, f"part {i + 1}: Content-Type {part.content_type!r} names no syntax"
        if UID(obj.transfer_syntax).is_encapsulated:
            assert named == obj.transfer_syntax
        else:
            assert named in (obj.transfer_syntax, EXPLICIT_LE, IMPLICIT_LE), named
        if want is None:
            continue
        expected = want[i]
        if obj.transfer_syntax == EXPLICIT_BE and named != EXPLICIT_BE:
            expected = swap_words(expected, width)
        assert part.body == expected, f"frame {i + 1} differs ({len(part.body)} bytes, " \
                                      f"expected {len(expected)})"
    if want is not None and quoted:
        got = client(srv).retrieve_instance_frames(
            original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID,
            frame_numbers=list(range(1, count + 1)),
            media_types=(("application/octet-stream", ANY_TS),))
        assert [bytes(g) for g in got] == [p.body for p in parts]


def decoded_frames(original: Dataset, transfer_syntax: str) -> list[bytes] | None:
    """pydicom's decode of each frame as Explicit VR Little Endian native bytes."""
    ds = quiet_read(original.filename) if original.filename else original
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if UID(transfer_syntax).is_compressed:
                ds.decompress(generate_instance_uid=False)
            length = _frame_length(ds)
        except Exception:
            return None
    if length is None:
        return None
    data = bytes(ds.PixelData)
    if transfer_syntax == EXPLICIT_BE:
        data = swap_words(data, swap_width(ds))
    return [data[i * length:(i + 1) * length] for i in range(frames_of(ds))]


@pytest.mark.parametrize(("n", "obj"), PIXEL_OBJECTS, ids=PIXEL_IDS)
def test_frames_by_default_are_decoded_little_endian(archives: Archives, n: int,
                                                     obj: StorageObject) -> None:
    srv = archives.server(n)
    original = quiet_read(obj.path)
    count = frames_of(original)
    url = f"{instance_url(srv, original)}/frames/{','.join(map(str, range(1, count + 1)))}"
    r = get(url, accept_octets())
    want = decoded_frames(original, obj.transfer_syntax)
    if want is None and pixels_of(original) is None:
        assert r.status_code == 406, (r.status_code, r.text[:300])
        assert has_reason(r)
        return
    assert r.status_code == 200, (r.status_code, r.text[:300])
    parts = multipart(r)
    assert len(parts) == count
    for i, part in enumerate(parts):
        named = media_params(part.content_type)[1].get("transfer-syntax", EXPLICIT_LE)
        assert named in (EXPLICIT_LE, IMPLICIT_LE), named
        if want is not None:
            assert part.body == want[i], f"frame {i + 1} differs from pydicom's decode"


# ---- every pydicom storage object: metadata and bulk data ------------------------------


def bulk_refs(obj: dict[str, Any], ds: Dataset | None) -> list[tuple[str, Any]]:
    """(BulkDataURI, the element it stands for) for every bulk value, nested included."""
    out: list[tuple[str, Any]] = []
    for tag, elem in obj.items():
        t = int(tag, 16)
        original = ds[t] if ds is not None and t in ds else None
        if "BulkDataURI" in elem:
            out.append((elem["BulkDataURI"], original))
        if elem.get("vr") == "SQ":
            items = list(original.value) if original is not None else []
            for i, item in enumerate(elem.get("Value", [])):
                out += bulk_refs(item, items[i] if i < len(items) else None)
    return out


def _bulk_ok(body_parts: list[bytes], elem: Any, obj: StorageObject,
             original: Dataset) -> bool:
    value = bytes(elem.value)
    joined = b"".join(body_parts)
    if elem.tag == 0x7FE00010 and UID(obj.transfer_syntax).is_encapsulated:
        frames = stored_frames(obj, original)
        return joined in (value, value + SEQ_DELIMITER) or body_parts == frames
    if elem.tag == 0x7FE00010:
        # the value, or its frames (the value without its trailing padding)
        frames = stored_frames(obj, original) or []
        value_options = (value, b"".join(frames))
    else:
        value_options = (value,)
    if obj.transfer_syntax == EXPLICIT_BE and elem.VR in ("OW", "OF", "OL", "OD", "OV"):
        size = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}[elem.VR]
        value_options += tuple(swap_words(v, size) for v in value_options)
    return joined in value_options


@pytest.mark.parametrize(("n", "obj"), OBJECTS, ids=IDS)
def test_metadata_bulk_data_uris_give_back_the_element_bytes(
        archives: Archives, n: int, obj: StorageObject) -> None:
    srv = archives.server(n)
    original = quiet_read(obj.path)
    r = get(f"{instance_url(srv, original)}/metadata", DICOM_JSON)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    [meta] = r.json()
    assert first(meta, "SOPInstanceUID") == obj.sop_instance_uid
    assert first(meta, "SOPClassUID") == obj.sop_class_uid
    assert first(meta, "StudyInstanceUID") == original.StudyInstanceUID
    refs = bulk_refs(meta, original)
    if "PixelData" in original:
        assert "7FE00010" in meta
        assert "BulkDataURI" in meta["7FE00010"], "Pixel Data is not inlined"
    wrong = []
    for uri, elem in refs:
        assert uri.startswith(f"{root(srv)}/"), f"not an absolute URL of the archive: {uri}"
        b = get(uri, accept_octets(ANY_TS))
        assert b.status_code == 200, (uri, b.status_code, b.text[:300])
        if elem is None or not isinstance(elem.value, bytes | bytearray):
            continue
        if not _bulk_ok([p.body for p in multipart(b)], elem, obj, original):
            wrong.append(uri.rsplit("/dicom-web/", 1)[-1])
    assert not wrong, f"bulk data differs from the element's bytes: {wrong}"


# ---- every pydicom storage object: rendered --------------------------------------------


def _image(data: bytes, fmt: str) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    assert img.format == fmt, img.format
    img.load()
    return img


def _not_blank(img: Image.Image) -> bool:
    lo_hi = img.convert("L").getextrema()
    return bool(lo_hi[0] < lo_hi[1])


@pytest.mark.parametrize(("n", "obj"), PIXEL_OBJECTS, ids=PIXEL_IDS)
def test_rendered_instance_is_a_picture_of_it(archives: Archives, n: int,
                                              obj: StorageObject) -> None:
    srv = archives.server(n)
    original = quiet_read(obj.path)
    arr = pixels_of(original)
    url = f"{instance_url(srv, original)}/rendered"
    if frames_of(original) > 1:
        url = f"{instance_url(srv, original)}/frames/1/rendered"
    renderable = (arr is not None and str(original.get("PhotometricInterpretation"))
                  in RENDERABLE and int(original.BitsAllocated) in (8, 16, 32))
    for accept, fmt in (("image/jpeg", "JPEG"), ("image/png", "PNG")):
        r = get(url, accept)
        if not renderable:
            assert r.status_code < 500, (r.status_code, r.text[:300])
            continue
        assert r.status_code == 200, (accept, r.status_code, r.text[:300])
        assert media_type(r.headers["Content-Type"]) == accept
        img = _image(r.content, fmt)
        frame = arr[0] if frames_of(original) > 1 else arr
        if np.ptp(frame) > 0:
            assert _not_blank(img), f"{accept}: a blank picture of a non-blank image"
    if renderable:
        via_client = client(srv).retrieve_instance_rendered(
            original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID,
            media_types=("image/png",))
        _image(via_client, "PNG")


# ---- the sample studies ----------------------------------------------------------------


def sample_headers() -> list[Dataset]:
    return [header(p) for p in sample_files()]


def sample_paths_by_sop() -> dict[str, Path]:
    return {str(header(p).SOPInstanceUID): p for p in sample_files()}


def biggest_sample_study() -> tuple[str, list[Dataset]]:
    by_study: dict[str, list[Dataset]] = {}
    for h in sample_headers():
        by_study.setdefault(h.StudyInstanceUID, []).append(h)
    st = max(by_study, key=lambda s: (len({h.SeriesInstanceUID for h in by_study[s]}),
                                      len(by_study[s]), s))
    return st, by_study[st]


def test_study_series_instance_retrieve_through_dicomweb_client(samples: AnimServer) -> None:
    st, members = biggest_sample_study()
    assert len({h.SeriesInstanceUID for h in members}) > 1
    paths = sample_paths_by_sop()
    dw = client(samples)
    study = dw.retrieve_study(st)
    assert sorted(ds.SOPInstanceUID for ds in study) == sorted(h.SOPInstanceUID for h in members)
    for ds in study:
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert np.array_equal(ds.pixel_array, quiet_read(paths[ds.SOPInstanceUID]).pixel_array)
    se = members[0].SeriesInstanceUID
    series = dw.retrieve_series(st, se, media_types=(("application/dicom", ANY_TS),))
    assert sorted(ds.SOPInstanceUID for ds in series) == sorted(
        h.SOPInstanceUID for h in members if h.SeriesInstanceUID == se)
    one = dw.retrieve_instance(st, se, members[0].SOPInstanceUID)
    assert one.SOPInstanceUID == members[0].SOPInstanceUID
    # streamed iteration gives the same
    assert sorted(ds.SOPInstanceUID for ds in dw.iter_study(st)) == sorted(
        ds.SOPInstanceUID for ds in study)


@pytest.mark.parametrize("level", ["study", "series", "instance"])
def test_retrieve_as_stored_is_the_imported_files(samples: AnimServer, level: str) -> None:
    st, members = biggest_sample_study()
    h = members[0]
    url, want = {
        "study": (f"{root(samples)}/studies/{st}", members),
        "series": (f"{root(samples)}/studies/{st}/series/{h.SeriesInstanceUID}",
                   [m for m in members if m.SeriesInstanceUID == h.SeriesInstanceUID]),
        "instance": (instance_url(samples, h), [h]),
    }[level]
    r = get(url, accept_dicom(ANY_TS))
    assert r.status_code == 200, r.text[:300]
    assert media_params(r.headers["Content-Type"])[1].get("type") == "application/dicom"
    paths = sample_paths_by_sop()
    got = {sop_of(p.body): p.body for p in multipart(r)}
    assert sorted(got) == sorted(m.SOPInstanceUID for m in want)
    for sop, body in got.items():
        assert body == paths[sop].read_bytes(), sop


def test_study_metadata_is_one_object_per_instance_equal_to_instance_metadata(
        samples: AnimServer) -> None:
    st, members = biggest_sample_study()
    dw = client(samples)
    study = dw.retrieve_study_metadata(st)
    assert sorted(first(m, "SOPInstanceUID") for m in study) == sorted(
        h.SOPInstanceUID for h in members)
    se = members[0].SeriesInstanceUID
    series = dw.retrieve_series_metadata(st, se)
    by_sop = {first(m, "SOPInstanceUID"): m for m in study}
    assert {first(m, "SOPInstanceUID") for m in series} == {
        h.SOPInstanceUID for h in members if h.SeriesInstanceUID == se}
    paths = sample_paths_by_sop()
    for h in members:
        inst = dw.retrieve_instance_metadata(st, h.SeriesInstanceUID, h.SOPInstanceUID)
        assert inst == by_sop[h.SOPInstanceUID]
        if h.SeriesInstanceUID == se:
            assert inst in series
        uri = inst["7FE00010"]["BulkDataURI"]
        assert uri.startswith(f"{root(samples)}/studies/{st}/")
        pixels = dw.retrieve_bulkdata(uri)
        assert b"".join(pixels) == bytes(quiet_read(paths[h.SOPInstanceUID]).PixelData)
        assert first(inst, "PatientName") == {"Alphabetic": str(h.PatientName)}


def test_metadata_answers_conditional_requests(samples: AnimServer) -> None:
    st, members = biggest_sample_study()
    url = f"{root(samples)}/studies/{st}/metadata"
    r = get(url, DICOM_JSON)
    assert r.status_code == 200
    etag = r.headers.get("ETag")
    assert etag, r.headers
    again = get(url, DICOM_JSON, **{"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert get(url, DICOM_JSON, **{"If-None-Match": '"something-else"'}).status_code == 200
    last = r.headers.get("Last-Modified")
    if last:
        assert get(url, DICOM_JSON, **{"If-Modified-Since": last}).status_code == 304
    for level_url in (f"{root(samples)}/studies/{st}/series/{members[0].SeriesInstanceUID}"
                      "/metadata", f"{instance_url(samples, members[0])}/metadata"):
        tag = get(level_url, DICOM_JSON).headers.get("ETag")
        assert tag
        assert get(level_url, DICOM_JSON, **{"If-None-Match": tag}).status_code == 304


def test_metadata_is_gzipped_on_request(samples: AnimServer) -> None:
    st, _ = biggest_sample_study()
    url = f"{root(samples)}/studies/{st}/metadata"
    plain = requests.get(url, headers={"Accept": DICOM_JSON, "Accept-Encoding": "identity"},
                         timeout=60)
    zipped = requests.get(url, headers={"Accept": DICOM_JSON, "Accept-Encoding": "gzip"},
                          timeout=60, stream=True)
    assert zipped.headers.get("Content-Encoding") == "gzip", zipped.headers
    raw = zipped.raw.read(decode_content=False)
    assert json.loads(gzip.decompress(raw)) == plain.json()
    assert len(raw) < len(plain.content)


# ---- CORS ------------------------------------------------------------------------------


def test_cors_headers_on_success_and_on_errors(samples: AnimServer) -> None:
    st, members = biggest_sample_study()
    for url, status in ((f"{root(samples)}/studies/{st}/metadata", 200),
                        (f"{root(samples)}/studies/1.2.3.4.5.404/metadata", 404),
                        (f"{instance_url(samples, members[0])}/frames/1", 200),
                        (f"{root(samples)}/studies", 200)):
        accept = accept_octets(ANY_TS, quoted=False) if "frames" in url else DICOM_JSON
        r = get(url, accept, Origin=ORIGIN)
        assert r.status_code == status, (url, r.status_code)
        assert r.headers.get("Access-Control-Allow-Origin") in ("*", ORIGIN), (url, r.headers)


def test_cors_preflight_of_a_frame_request(samples: AnimServer) -> None:
    _, members = biggest_sample_study()
    r = requests.options(f"{instance_url(samples, members[0])}/frames/1", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "accept"}, timeout=60)
    assert 200 <= r.status_code < 300, (r.status_code, r.text[:300])
    assert r.headers.get("Access-Control-Allow-Origin") in ("*", ORIGIN), r.headers
    assert "GET" in r.headers.get("Access-Control-Allow-Methods", "").upper()
    allowed = {h.strip().lower() for h in r.headers.get("Access-Control-Allow-Headers",
                                                        "").split(",")}
    assert {"accept", "authorization", "content-type"} <= allowed or "*" in allowed, allowed
    assert int(r.headers.get("Access-Control-Max-Age", "0")) > 0


def test_cors_limited_to_the_configured_origins(make_server: Any, tmp_path: Path) -> None:
    srv = make_server(tmp_path / "data", env={"ANIM_WEB_CORS_ORIGINS": ORIGIN}).start()
    ok = get(f"{root(srv)}/studies", DICOM_JSON, Origin=ORIGIN)
    assert ok.headers.get("Access-Control-Allow-Origin") == ORIGIN
    other = get(f"{root(srv)}/studies", DICOM_JSON, Origin="http://elsewhere.example")
    assert "Access-Control-Allow-Origin" not in other.headers


# ---- errors ----------------------------------------------------------------------------


def test_unknown_uids_are_404_with_a_reason(samples: AnimServer) -> None:
    st, members = biggest_sample_study()
    h = members[0]
    nowhere = "1.2.3.4.5.6.7.8.404"
    base = root(samples)
    for url, accept in (
            (f"{base}/studies/{nowhere}", accept_dicom()),
            (f"{base}/studies/{nowhere}/metadata", DICOM_JSON),
            (f"{base}/studies/{st}/series/{nowhere}", accept_dicom()),
            (f"{base}/studies/{st}/series/{nowhere}/metadata", DICOM_JSON),
            (f"{base}/studies/{st}/series/{h.SeriesInstanceUID}/instances/{nowhere}",
             accept_dicom()),
            (f"{base}/studies/{st}/series/{h.SeriesInstanceUID}/instances/{nowhere}/metadata",
             DICOM_JSON),
            (f"{base}/studies/{st}/series/{h.SeriesInstanceUID}/instances/{nowhere}/frames/1",
             accept_octets()),
            (f"{base}/studies/{nowhere}/series/{h.SeriesInstanceUID}/instances/"
             f"{h.SOPInstanceUID}", accept_dicom()),  # right instance, wrong study
            (f"{base}/studies/{nowhere}/rendered", "image/jpeg"),
            (f"{instance_url(samples, h)}/bulkdata/00191010", accept_octets()),
    ):
        r = get(url, accept)
        assert r.status_code == 404, (url, r.status_code, r.text[:200])
        assert has_reason(r), (url, r.text)
    assert healthy(samples)


def test_frame_beyond_the_last_is_an_error_with_a_reason(samples: AnimServer) -> None:
    _, members = biggest_sample_study()
    for frames in ("2", "0", "1,x"):
        r = get(f"{instance_url(samples, members[0])}/frames/{frames}", accept_octets())
        assert r.status_code in (400, 404), (frames, r.status_code)
        assert has_reason(r)


def test_a_syntax_that_cannot_be_served_is_406(samples: AnimServer) -> None:
    _, members = biggest_sample_study()
    url = instance_url(samples, members[0])  # stored in Explicit VR Little Endian
    r = get(url, accept_dicom(JPEG_BASELINE))
    assert r.status_code == 406, r.status_code
    assert has_reason(r)
    r = get(f"{url}/frames/1", accept_octets(JPEG_BASELINE))
    assert r.status_code == 406, r.status_code
    assert has_reason(r)
    r = get(f"{url}/metadata", "application/pdf")
    assert r.status_code == 406, r.status_code
    assert healthy(samples)


# ---- frames of the samples: what OHIF sends --------------------------------------------


@pytest.mark.parametrize("quoted", [True, False], ids=["quoted", "unquoted"])
def test_ohif_frame_request(samples: AnimServer, quoted: bool) -> None:
    _, members = biggest_sample_study()
    paths = sample_paths_by_sop()
    h = members[0]
    r = get(f"{instance_url(samples, h)}/frames/1", accept_octets(ANY_TS, quoted=quoted))
    assert r.status_code == 200
    [part] = multipart(r)
    assert media_params(part.content_type) == ("application/octet-stream",
                                               {"transfer-syntax": EXPLICIT_LE})
    assert part.body == bytes(quiet_read(paths[h.SOPInstanceUID]).PixelData)


# ---- rendered and thumbnail of the samples ---------------------------------------------


def test_rendered_instance_viewport_window_quality(samples: AnimServer) -> None:
    _, members = biggest_sample_study()
    url = f"{instance_url(samples, members[0])}/rendered"
    h = members[0]
    jpeg = get(url, "image/jpeg")
    assert jpeg.status_code == 200
    img = _image(jpeg.content, "JPEG")
    assert img.size == (int(h.Columns), int(h.Rows))
    assert _not_blank(img)
    png = get(url, "image/png")
    assert _not_blank(_image(png.content, "PNG"))
    # PS3.18 8.3.5.1.3: scaled to fit the viewport
    small = _image(get(f"{url}?viewport=32,16", "image/jpeg").content, "JPEG")
    assert small.width <= 32
    assert small.height <= 16
    assert 16 in (small.width, small.height)
    # a window of its own changes the picture
    windowed = get(f"{url}?window=100,50,linear", "image/png")
    assert windowed.status_code == 200
    assert windowed.content != png.content
    low = get(f"{url}?quality=5", "image/jpeg").content
    high = get(f"{url}?quality=95", "image/jpeg").content
    assert len(low) < len(high)
    assert get(f"{url}?viewport=abc", "image/jpeg").status_code == 400


def test_rendered_study_series_and_frame(samples: AnimServer) -> None:
    st, members = biggest_sample_study()
    h = members[0]
    dw = client(samples)
    for data in (dw.retrieve_series_rendered(st, h.SeriesInstanceUID,
                                             media_types=("image/jpeg",)),
                 get(f"{root(samples)}/studies/{st}/rendered", "image/jpeg").content,
                 get(f"{instance_url(samples, h)}/frames/1/rendered", "image/jpeg").content):
        assert _not_blank(_image(data, "JPEG"))


@pytest.mark.parametrize("level", ["series", "instance"])
def test_thumbnail_as_ohif_asks(samples: AnimServer, level: str) -> None:
    st, members = biggest_sample_study()
    h = members[0]
    url = (f"{root(samples)}/studies/{st}/series/{h.SeriesInstanceUID}/thumbnail"
           if level == "series" else f"{instance_url(samples, h)}/thumbnail")
    r = get(f"{url}?viewport=256,256", "image/jpeg", Origin=ORIGIN)
    assert r.status_code == 200, r.text[:300]
    assert media_type(r.headers["Content-Type"]) == "image/jpeg"
    assert r.headers.get("Access-Control-Allow-Origin") in ("*", ORIGIN)
    img = _image(r.content, "JPEG")
    assert max(img.size) <= 256
    assert _not_blank(img)


# ---- acceptance 5: across protocols ----------------------------------------------------


def test_c_store_then_found_by_qido_and_retrieved_by_wado(serve: AnimServer) -> None:
    folder = SAMPLES / "SYN0001"
    files = sorted(folder.rglob("*.dcm"))
    r = storescu(serve.dimse_port, folder)
    assert r.returncode == 0, r.stdout + r.stderr
    by_sop = {str(header(p).SOPInstanceUID): p for p in files}
    st = str(header(files[0]).StudyInstanceUID)
    found = qido_ok(serve, f"/studies/{st}/instances")
    assert sorted(first(x, "SOPInstanceUID") for x in found) == sorted(by_sop)
    w = get(f"{root(serve)}/studies/{st}", accept_dicom(ANY_TS))
    assert w.status_code == 200
    got = {sop_of(p.body): p.body for p in multipart(w)}
    assert sorted(got) == sorted(by_sop)
    for sop, body in got.items():
        # DIMSE carries no file meta: the data set is what must be identical
        assert dataset_bytes(body) == dataset_bytes(by_sop[sop].read_bytes()), sop


@pytest.fixture
def destination(tmp_path: Path) -> Iterator[Destination]:
    dest = Destination("WEBDEST", _free_port(), tmp_path / "received").start("+xa")
    yield dest
    dest.stop()


def test_stow_then_found_by_findscu_and_moved_by_movescu(
        make_server: Any, tmp_path: Path, destination: Destination) -> None:
    srv = make_server(tmp_path / "data", args=[
        "--known-ae", f"{destination.title}=127.0.0.1:{destination.port}"]).start()
    files = sorted((SAMPLES / "SYN0002").rglob("*.dcm"))
    st = str(header(files[0]).StudyInstanceUID)
    body = Body()
    for p in files:
        body.add(p.read_bytes())
    r = stow(srv, body)
    assert r.status_code == 200, r.text[:500]
    studies = findscu(srv, "study", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": st,
                                     "PatientID": "", "NumberOfStudyRelatedInstances": ""},
                      tmp_path)
    assert [str(d.StudyInstanceUID) for d in studies] == [st]
    assert int(studies[0].NumberOfStudyRelatedInstances) == len(files)
    moved = movescu(srv.dimse_port, destination.title,
                    {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": st})
    assert moved.returncode == 0, moved.stdout[-3000:]
    received = {r.sop: r for r in received_in(destination.out)}
    by_sop = {str(header(p).SOPInstanceUID): p for p in files}
    assert sorted(received) == sorted(by_sop)
    for sop, rec in received.items():
        assert rec.data_set == dataset_bytes(by_sop[sop].read_bytes()), sop


# ---- acceptance 4: a study over 1 GB, memory flat --------------------------------------

BIG_INSTANCES = 132  # x 8 MiB (big_instance) > 1 GiB
MEMORY_BOUND = 100 * 2**20


def test_whole_study_retrieve_over_1gb_keeps_server_memory_flat(
        make_server: Any, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    src = tmp_path / "big"
    src.mkdir()
    pixels = big_pixels()
    for i in range(1, BIG_INSTANCES + 1):
        stamp(pixels, i)
        with (src / f"{i:04d}.dcm").open("wb") as f:
            f.write(big_instance(study, series, i))
            f.write(pixels)
    total = sum(p.stat().st_size for p in src.iterdir())
    assert total > 2**30
    data = tmp_path / "data"
    import_files(data, [src])
    shutil.rmtree(src)  # the archive's blobs are the only copy: 1 GB on disk, not 2
    srv = make_server(data).start()
    try:
        assert len(qido_ok(srv, f"/studies/{study}/instances")) == BIG_INSTANCES
        url = f"{root(srv)}/studies/{study}"
        # warm up: code paths loaded, pools created, before the baseline is taken
        warm = get(f"{url}/series/{series}/metadata", DICOM_JSON)
        assert warm.status_code == 200
        received, delimiters, tail = 0, 0, b""
        assert srv.proc is not None
        with RssSampler(srv.proc.pid) as rss, requests.get(
                url, headers={"Accept": accept_dicom()}, stream=True, timeout=600) as r:
            assert r.status_code == 200
            bnd = media_params(r.headers["Content-Type"])[1]["boundary"].encode()
            for chunk in r.iter_content(1 << 20):
                received += len(chunk)
                window = tail + chunk
                delimiters += window.count(b"--" + bnd) - tail.count(b"--" + bnd)
                tail = window[-(len(bnd) + 4):]
        baseline = rss.samples[0]
        print(f"server RSS growth: {(rss.peak - baseline) / 2**20:.1f} MiB for "
              f"{received / 2**30:.2f} GiB streamed")  # shown with -rP
        assert received > total - 2**20, f"{received} bytes for a {total}-byte study"
        # one delimiter per part, and the closing one
        assert delimiters == BIG_INSTANCES + 1, delimiters
        assert rss.peak - baseline < MEMORY_BOUND, (
            f"server RSS grew by {(rss.peak - baseline) / 2**20:.0f} MiB while streaming "
            f"{received / 2**30:.2f} GiB")
        assert healthy(srv)
    finally:
        srv.stop()
        shutil.rmtree(data, ignore_errors=True)
