"""Shared pieces of the DICOMweb integration tests (QIDO-RS, WADO-RS, STOW-RS).

Plain HTTP (requests) for what a test must see on the wire (status, headers, the exact
bytes of each multipart part); dicomweb-client for what a real client does with it.
Multipart bodies are parsed here strictly (RFC 2046 5.1.1 framing, closing delimiter
required), so a malformed response fails the test instead of being papered over.
"""

from __future__ import annotations

import json
import re
import secrets
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import requests
from pydicom import dcmread
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.conftest import AnimServer
from tests.integration.test_transfer_syntaxes import StorageObject, anim_cli, storage_objects

DICOM_JSON = "application/dicom+json"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
ANY_TS = "*"
TIMEOUT = 120


def root(srv: AnimServer) -> str:
    return f"{srv.url}/dicom-web"


def client(srv: AnimServer) -> Any:
    """A dicomweb-client pointed at the archive (imported here: a test dependency)."""
    from dicomweb_client import DICOMwebClient

    return DICOMwebClient(url=root(srv))


# ---- DICOM JSON (PS3.18 F.2) ------------------------------------------------------------


def tag_of(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return f"{tag:08X}"


def values(obj: dict[str, Any], keyword: str) -> list[Any]:
    """The Value array of *keyword* in a DICOM JSON object ([] when absent or empty)."""
    return list(obj.get(tag_of(keyword), {}).get("Value", []))


def first(obj: dict[str, Any], keyword: str) -> Any:
    v = values(obj, keyword)
    return v[0] if v else None


def pn_text(value: Any) -> str:
    """A PN value of the JSON model ({"Alphabetic": ..., ...}) as its DICOM string."""
    groups = [value.get(k, "") for k in ("Alphabetic", "Ideographic", "Phonetic")]
    return "=".join(groups).rstrip("=")


def keywords(obj: dict[str, Any]) -> set[str]:
    return {keyword_for_tag(int(t, 16)) or t for t in obj}


# ---- HTTP ------------------------------------------------------------------------------


def get(url: str, accept: str = "", **headers: str) -> requests.Response:
    if accept:
        headers["Accept"] = accept
    return requests.get(url, headers=headers, timeout=TIMEOUT)


def qido(srv: AnimServer, path: str, params: Any = None, **headers: str) -> requests.Response:
    return requests.get(f"{root(srv)}{path}", params=params,
                        headers={"Accept": DICOM_JSON, **headers}, timeout=TIMEOUT)


def qido_ok(srv: AnimServer, path: str, params: Any = None) -> list[dict[str, Any]]:
    r = qido(srv, path, params)
    assert r.status_code == 200, f"{path} {params}: {r.status_code} {r.text[:500]}"
    assert media_type(r.headers.get("Content-Type", "")) == DICOM_JSON, r.headers
    body = r.json()
    assert isinstance(body, list), body
    return body


def healthy(srv: AnimServer) -> bool:
    """The server is up and answers (after a bad request, say)."""
    if not srv.alive():
        return False
    r = requests.get(f"{srv.url}/health", timeout=TIMEOUT)
    return r.status_code == 200 and r.json().get("status") == "ok"


def has_reason(r: requests.Response) -> bool:
    """An error response says why, in its body (PS3.18 8.6: a client can act on it)."""
    text = r.text.strip()
    return bool(text) and "Traceback" not in text and len(text) > 8


# ---- media types and multipart ---------------------------------------------------------


def media_params(value: str) -> tuple[str, dict[str, str]]:
    """'multipart/related; type="a/b"; boundary=x' -> ('multipart/related', {...})."""
    head, *rest = value.split(";")
    params: dict[str, str] = {}
    for item in rest:
        name, _, v = item.strip().partition("=")
        params[name.strip().lower()] = v.strip().strip('"')
    return head.strip().lower(), params


def media_type(value: str) -> str:
    return media_params(value)[0]


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def parse_multipart(content_type: str, body: bytes) -> list[Part]:
    """The parts of a multipart body; AssertionError when its framing is wrong."""
    mtype, params = media_params(content_type)
    assert mtype == "multipart/related", content_type
    boundary = params.get("boundary", "")
    assert boundary, f"no boundary in {content_type!r}"
    delim = b"--" + boundary.encode()
    start = body.find(delim)
    assert start >= 0, "no delimiter in the body"
    assert start == 0 or body[start - 2:start] == b"\r\n", "delimiter not at a line start"
    segments = body[start + len(delim):].split(b"\r\n" + delim)
    parts: list[Part] = []
    for i, seg in enumerate(segments):
        if seg.startswith(b"--"):
            assert i == len(segments) - 1, "data after the closing delimiter's part"
            return parts
        assert re.match(rb"[ \t]*\r\n", seg), "bad delimiter line"
        seg = seg[seg.index(b"\r\n") + 2:]
        if seg.startswith(b"\r\n"):  # a part with no header fields
            head, content = b"", seg[2:]
        else:
            head, sep, content = seg.partition(b"\r\n\r\n")
            assert sep, "part headers not ended by CRLF CRLF"
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            if line:
                name, _, v = line.partition(":")
                headers[name.strip().lower()] = v.strip()
        parts.append(Part(headers, content))
    raise AssertionError("multipart body without its closing delimiter")


def multipart(r: requests.Response) -> list[Part]:
    return parse_multipart(r.headers.get("Content-Type", ""), r.content)


def accept_dicom(ts: str = "") -> str:
    suffix = f"; transfer-syntax={ts}" if ts else ""
    return f'multipart/related; type="application/dicom"{suffix}'


def accept_octets(ts: str = "", quoted: bool = True) -> str:
    t = '"application/octet-stream"' if quoted else "application/octet-stream"
    suffix = f"; transfer-syntax={ts}" if ts else ""
    return f"multipart/related; type={t}{suffix}"


# ---- STOW-RS request bodies ------------------------------------------------------------


@dataclass
class Body:
    """A multipart/related request body built part by part (or streamed)."""

    parts: list[tuple[bytes, str]] = field(default_factory=list)
    boundary: str = field(default_factory=lambda: f"anim-test-{secrets.token_hex(8)}")
    close: bool = True

    def add(self, data: bytes, part_type: str = "application/dicom") -> Body:
        self.parts.append((data, part_type))
        return self

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def encode(self) -> bytes:
        return b"".join(stream_parts(((d, t) for d, t in self.parts), self.boundary,
                                     self.close))


def stream_parts(parts: Iterable[tuple[bytes, str]], boundary: str,
                 close: bool = True) -> Iterator[bytes]:
    """The body of a multipart/related message, chunk by chunk (RFC 2046 5.1.1)."""
    for data, part_type in parts:
        yield f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
        yield data
        yield b"\r\n"
    if close:
        yield f"--{boundary}--\r\n".encode()


def stow(srv: AnimServer, body: Body | bytes | Iterable[bytes], study: str = "",
         content_type: str = "") -> requests.Response:
    url = f"{root(srv)}/studies" + (f"/{study}" if study else "")
    data: Any = body
    if isinstance(body, Body):
        content_type = content_type or body.content_type
        data = body.encode()
    return requests.post(url, data=data, timeout=TIMEOUT * 5,
                         headers={"Content-Type": content_type, "Accept": DICOM_JSON})


def store_response(r: requests.Response) -> dict[str, Any]:
    assert media_type(r.headers.get("Content-Type", "")) == DICOM_JSON, (
        r.status_code, r.headers, r.text[:500])
    body = r.json()
    assert isinstance(body, dict), body
    return body


def referenced(resp: dict[str, Any]) -> list[dict[str, Any]]:
    return values(resp, "ReferencedSOPSequence")


def failed(resp: dict[str, Any]) -> list[dict[str, Any]]:
    return values(resp, "FailedSOPSequence")


# ---- data ------------------------------------------------------------------------------


def header(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some of pydicom's files are odd on purpose
        return dcmread(path, stop_before_pixels=True)


def full(path: Path | bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(BytesIO(path) if isinstance(path, bytes) else path)


def rounds() -> list[list[StorageObject]]:
    """pydicom's storage objects in rounds with one file per SOP Instance UID each.

    pydicom ships several encodings of one instance under the same UID; stored together
    they would be versions of one instance (only the newest is served), so each round
    holds at most one of them, and each round goes into an archive of its own.
    """
    by_uid: dict[str, list[StorageObject]] = {}
    for o in storage_objects():
        by_uid.setdefault(o.sop_instance_uid, []).append(o)
    out: list[list[StorageObject]] = []
    for group in by_uid.values():
        for i, o in enumerate(group):
            if i == len(out):
                out.append([])
            out[i].append(o)
    return out


def import_files(data_dir: Path, paths: Iterable[Path]) -> str:
    """``anim import`` (the CLI, in a subprocess): the files are stored whole."""
    r = anim_cli("import", "--data", str(data_dir), "--quiet", *(str(p) for p in paths))
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"; (\d+) rejected, (\d+) not DICOM, (\d+) failed", r.stdout)
    assert m, r.stdout
    assert m.groups() == ("0", "0", "0"), r.stdout
    return r.stdout


def frames_of(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


# ---- memory ----------------------------------------------------------------------------


class RssSampler:
    """Samples a process's resident set size on a thread while a request runs."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        self.proc = psutil.Process(pid)
        self.every = every
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.proc.memory_info().rss)
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self.samples.append(self.proc.memory_info().rss)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.samples.append(self.proc.memory_info().rss)

    @property
    def peak(self) -> int:
        return max(self.samples)


# ---- byte order ------------------------------------------------------------------------


def swap_words(data: bytes, size: int) -> bytes:
    """Big endian words of *size* bytes to little endian (and back)."""
    if size <= 1:
        return data
    n = len(data) // size
    fmt = {2: "H", 4: "L", 8: "Q"}[size]
    return struct.pack(f"<{n}{fmt}", *struct.unpack(f">{n}{fmt}", data[:n * size])) + \
        data[n * size:]


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)[:2000]


# ---- large synthetic instances (memory tests) ------------------------------------------

BIG_ROWS = BIG_COLS = 512
BIG_FRAMES = 16  # 8 MiB of 16-bit pixels per instance
BIG_PIXEL_BYTES = BIG_ROWS * BIG_COLS * 2 * BIG_FRAMES


def big_instance(study: str, series: str, i: int) -> bytes:
    """The header of one large instance, ending with the Pixel Data element's header
    (tag, VR, length): the caller writes the 8 MiB value (:func:`big_pixels`) after it."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[study, str(i)])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID = "SYNTHETIC^BIG", "SYNBIG"
    ds.StudyDate, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "20240101", "OT", 1, i
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns, ds.NumberOfFrames = BIG_ROWS, BIG_COLS, BIG_FRAMES
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, BIG_PIXEL_BYTES)


def big_pixels() -> bytearray:
    """One 8 MiB buffer of noise. Each instance stamps its number into the first 8 bytes
    (:func:`stamp`), so every instance's pixel blob is distinct: the archive deduplicates
    identical pixel data by content hash, and identical buffers would be 1 GB on the wire
    but one blob on disk."""
    rng = np.random.default_rng(4)
    return bytearray(rng.integers(0, 4096, BIG_PIXEL_BYTES // 2, dtype="<u2").tobytes())


def stamp(pixels: bytearray, i: int) -> None:
    pixels[:8] = i.to_bytes(8, "little")
