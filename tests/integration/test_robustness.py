"""Bad input, crashes and concurrency against a real anim serve process.

- A malformed C-STORE (truncated, not DICOM) fails with a clear status, garbage on the
  DIMSE port is dropped; the server keeps serving and nothing stored is touched.
- SIGKILL in the middle of a multi-association ingest: after a restart every
  acknowledged instance is there, byte for byte, and no index row lacks its blob.
- Eight storescu associations storing overlapping sets of one study: no lost
  instance, no duplicate row.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, _config
from sqlalchemy import select

from anim.index.schema import series as series_table
from anim.sample import generate
from tests.conftest import (
    AnimServer,
    blob_bytes,
    blob_store,
    echoscu,
    open_archive,
    sample_files,
    storescu,
)

pytestmark = [pytest.mark.integration, pytest.mark.dcmtk]

# Statuses of PS3.4 B.2.3 a sender must read as "this object was refused"
CANNOT_UNDERSTAND = range(0xC000, 0xD000)
DOES_NOT_MATCH_SOP_CLASS = range(0xA900, 0xAA00)
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}


# ---- helpers ----------------------------------------------------------------------------


def dataset_bytes(data: bytes) -> bytes:
    """The data set of a Part 10 object: what follows the preamble and group 0002.

    DIMSE carries no file meta, so this is what a sender's file and the archive's copy
    must share byte for byte (DESIGN.md "Storage").
    """
    pos = 132 if data[128:132] == b"DICM" else 0
    while pos + 8 <= len(data):
        (group,) = struct.unpack_from("<H", data, pos)
        if group != 0x0002:
            break
        if data[pos + 4 : pos + 6] in _LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
    return data[pos:]


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def snapshot(data_dir: Path) -> dict[str, Any]:
    """Row counts, a hash of every stored instance's bytes, and the blob bytes stored."""
    with open_archive(data_dir) as archive:
        counts = archive.index.counts()
        stored = {uid: hashlib.sha256(archive.read_bytes(uid)).hexdigest()
                  for uid in archive.index.instance_uids()}
    return {"counts": counts, "stored": stored, "blob_bytes": blob_bytes(data_dir)}


def store_scu(calling: str = "ROBUSTSCU", timeout: float = 60) -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


@pytest.fixture
def raw_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom send a file's data set bytes as they are, without decoding them.

    With STORE_SEND_CHUNKED_DATASET, ``send_c_store(path)`` reads only the file meta (for
    the SOP Class, SOP Instance and transfer syntax) and streams the rest of the file:
    the only way to put a truncated or non-DICOM data set on the wire.
    """
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def part10(payload: bytes, sop_class: str, sop_instance: str) -> bytes:
    """A valid preamble and File Meta Information followed by *payload* as the data set."""
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = meta
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    head = buf.getvalue()
    assert dataset_bytes(head) == b""  # nothing but preamble and meta
    return head + payload


def patient_identifiers() -> set[str]:
    """Names (whole and family name) and IDs of the sample patients."""
    found: set[str] = set()
    for path in sample_files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        name = str(ds.PatientName)
        found |= {name, name.split("^")[0], str(ds.PatientID)}
    return found


def assert_no_patient_data_logged(srv: AnimServer) -> None:
    ids = patient_identifiers()
    leaks = [line for line in srv.lines if any(x in line for x in ids)]
    assert not leaks, "patient data in the INFO log:\n" + "\n".join(leaks[:5])


# ---- A: bad C-STOREs and garbage on the DIMSE port ---------------------------------------


def _truncated(src: Path) -> bytes:
    """The file cut in the middle of its pixel data (the last element of the samples)."""
    full = src.read_bytes()
    pixels = len(pydicom.dcmread(src).PixelData)
    cut = full[: len(full) - pixels // 2]
    assert len(dataset_bytes(cut)) < len(dataset_bytes(full))  # file meta intact
    return cut


def _png(src: Path) -> bytes:
    """A PNG image where the data set should be, under a valid CT file meta."""
    head = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x40\x00\x00\x00\x40\x08\x00"
    return part10(head + random.Random(7).randbytes(4000), CTImageStorage, sop_uid(src))


def _text(src: Path) -> bytes:
    """A text document where the data set should be, under a valid CT file meta."""
    letter = b"This is a discharge letter, not a DICOM data set.\r\n" * 80
    return part10(letter, CTImageStorage, sop_uid(src))


# name -> what to send instead of the held-back sample file
BAD_OBJECTS: dict[str, Callable[[Path], bytes]] = {
    "truncated-pixel-data": _truncated,
    "png-image": _png,
    "plain-text": _text,
}


@pytest.fixture
def stored_samples(serve: AnimServer) -> tuple[AnimServer, Path, dict[str, Any]]:
    """The server with every sample but one stored; the held-back file and a snapshot."""
    files = sample_files()
    held_back = next(p for p in reversed(files)
                     if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == CTImageStorage)
    r = storescu(serve.dimse_port, *[p for p in files if p != held_back])
    assert r.returncode == 0, r.stdout + r.stderr
    snap = snapshot(serve.data_dir)
    assert snap["counts"]["instance"] == len(files) - 1
    assert sop_uid(held_back) not in snap["stored"]
    return serve, held_back, snap


def assert_still_serving(srv: AnimServer, held_back: Path, before: dict[str, Any]) -> None:
    """Nothing stored was touched, nothing was added; echo and a new store still work."""
    assert srv.alive(), srv.log
    assert snapshot(srv.data_dir) == before
    r = echoscu(srv.dimse_port)
    assert r.returncode == 0, r.stdout + r.stderr
    r = storescu(srv.dimse_port, held_back)
    assert r.returncode == 0, r.stdout + r.stderr
    with open_archive(srv.data_dir) as archive:
        assert archive.index.counts()["instance"] == before["counts"]["instance"] + 1
        got = archive.read_bytes(sop_uid(held_back))
    assert dataset_bytes(got) == dataset_bytes(held_back.read_bytes())
    assert srv.alive(), srv.log
    assert_no_patient_data_logged(srv)


@pytest.mark.usefixtures("raw_send")
@pytest.mark.parametrize("kind", list(BAD_OBJECTS))
def test_bad_cstore_fails_clearly_and_server_keeps_serving(
    stored_samples: tuple[AnimServer, Path, dict[str, Any]], tmp_path: Path, kind: str
) -> None:
    srv, held_back, before = stored_samples
    path = tmp_path / f"{kind}.dcm"
    path.write_bytes(BAD_OBJECTS[kind](held_back))

    assoc = store_scu().associate("127.0.0.1", srv.dimse_port, ae_title="ANIM")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(path)
        assert "Status" in rsp, f"no C-STORE response (association aborted?)\n{srv.log}"
        # the association survives a refused object: the next one on it is stored
        ok = assoc.send_c_store(sample_files()[0])
    finally:
        if assoc.is_established:
            assoc.release()

    code = int(rsp.Status)
    assert code in CANNOT_UNDERSTAND or code in DOES_NOT_MATCH_SOP_CLASS, hex(code)
    comment = str(rsp.get("ErrorComment", "")).strip()
    assert comment, "a refused object needs an ErrorComment saying why"
    if kind == "truncated-pixel-data":
        assert "truncated" in comment.lower(), comment
    assert int(ok.Status) == 0x0000  # already stored, identical: idempotent success
    assert_still_serving(srv, held_back, before)


def _random_bytes() -> bytes:
    return random.Random(2026).randbytes(64 * 1024)


def _bogus_associate_rq() -> bytes:
    body = random.Random(11).randbytes(300)
    return struct.pack(">BBL", 0x01, 0x00, len(body)) + body


def _associate_rq_with_broken_items() -> bytes:
    # A plausible fixed part (protocol version, AE titles) followed by an item whose
    # declared length runs past the end of the PDU.
    fixed = struct.pack(">HH", 1, 0) + b"ANIM".ljust(16) + b"GARBAGE".ljust(16) + bytes(32)
    items = struct.pack(">BBH", 0x10, 0x00, 0xFFFF) + b"1.2.840.10008.3.1.1.1"
    body = fixed + items
    return struct.pack(">BBL", 0x01, 0x00, len(body)) + body


def _pdata_without_association() -> bytes:
    pdv = struct.pack(">LBB", 5, 1, 0x03) + b"ABC"
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv


def _huge_declared_length() -> bytes:
    # A-ASSOCIATE-RQ claiming ~4 GiB, then the peer goes away
    return struct.pack(">BBL", 0x01, 0x00, 0xFFFFFFF0) + random.Random(3).randbytes(1024)


GARBAGE: dict[str, Callable[[], bytes]] = {
    "random-64KiB": _random_bytes,
    "bogus-associate-rq": _bogus_associate_rq,
    "associate-rq-broken-item": _associate_rq_with_broken_items,
    "p-data-before-association": _pdata_without_association,
    "associate-rq-4GiB-length": _huge_declared_length,
}


def send_garbage(port: int, data: bytes, deadline_s: float = 90.0) -> bytes:
    """Write *data* to the DIMSE port, then read until the server closes the connection.

    Returns what the server sent back. Fails if the connection is still open at the
    deadline (the server must drop a peer that speaks no DICOM, at the latest when the
    peer stops sending).
    """
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # the peer has nothing more to say
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already hung up: fine
        end = time.monotonic() + deadline_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                pytest.fail(f"server kept the connection open; got {bytes(received[:64])!r}")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                continue
            if not chunk:
                break
            received += chunk
    return bytes(received)


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_on_dimse_port_is_dropped_and_server_keeps_serving(
    stored_samples: tuple[AnimServer, Path, dict[str, Any]], kind: str
) -> None:
    srv, held_back, before = stored_samples
    reply = send_garbage(srv.dimse_port, GARBAGE[kind]())
    # Nothing, an A-ASSOCIATE-RJ (0x03) or an A-ABORT (0x07): never an A-ASSOCIATE-AC
    # nor a P-DATA answer to a peer that did not speak DICOM.
    if reply:
        assert reply[0] in (0x03, 0x07), reply[:16]
    assert_still_serving(srv, held_back, before)


# ---- B: SIGKILL in the middle of a multi-association ingest ------------------------------


class AckingSenders:
    """Parallel pynetdicom associations storing disjoint shares of *files*.

    Records the SOP Instance UID of every C-STORE answered with Success, and sets
    :attr:`enough` once *threshold* of them have been acknowledged.
    """

    def __init__(self, port: int, files: list[Path], uid_of: dict[Path, str],
                 associations: int, threshold: int) -> None:
        self.port, self.files, self.uid_of = port, files, uid_of
        self.n, self.threshold = associations, threshold
        self.acked: list[str] = []
        self.errors: list[BaseException] = []
        self.enough = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, args=(i,), daemon=True)
                         for i in range(associations)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self, timeout: float) -> bool:
        """Wait for every association to end; False if one is still running."""
        for t in self._threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self._threads)

    def _send(self, i: int) -> None:
        try:
            # pynetdicom's SCU notices a dead peer only when its DIMSE timeout expires
            # (the reactor is paused while send_c_store waits): keep it short here.
            assoc = store_scu(f"CRASH{i}", timeout=10).associate(
                "127.0.0.1", self.port, ae_title="ANIM")
            try:
                self._store_all(assoc, self.files[i :: self.n])
            finally:
                if assoc.is_established:
                    assoc.release()
                assoc.join(30)
                # pynetdicom leaves the socket open when the peer vanished
                sock = getattr(assoc.dul.socket, "socket", None)
                if sock is not None:
                    sock.close()
        except BaseException as e:  # reported by the test, not lost in a thread
            self.errors.append(e)

    def _store_all(self, assoc: Any, files: list[Path]) -> None:
        for path in files:
            if not assoc.is_established:
                return
            try:
                rsp = assoc.send_c_store(path)
            except RuntimeError:  # association gone between the check and the send
                return
            if rsp.get("Status") == 0x0000:
                self._ack(self.uid_of[path])

    def _ack(self, uid: str) -> None:
        with self._lock:
            self.acked.append(uid)
            if len(self.acked) >= self.threshold:
                self.enough.set()


def assert_blobs_intact(data_dir: Path, keys: set[str]) -> None:
    """Every blob the index references is in the blob store and hashes to its key."""
    assert keys
    store = blob_store(data_dir)
    for key in keys:
        assert store.exists(key), f"index row points at missing blob {key}"
        with store.open(key) as f:
            assert hashlib.sha256(f.read()).hexdigest() == key, f"blob {key} is corrupt"


@pytest.mark.usefixtures("raw_send")
def test_sigkill_mid_ingest_keeps_every_acknowledged_instance(
    make_server: type[AnimServer], tmp_path: Path
) -> None:
    files = generate(tmp_path / "in", patients=20, seed=4242, rows=128)
    uid_of = {p: sop_uid(p) for p in files}
    data_dir = tmp_path / "data"
    srv = make_server(data_dir).start()

    senders = AckingSenders(srv.dimse_port, files, uid_of, associations=4, threshold=30)
    senders.start()
    assert senders.enough.wait(120), f"fewer than 30 C-STOREs acknowledged\n{srv.log}"
    srv.kill()
    assert senders.join(90), "an SCU association hung after the kill"
    assert not senders.errors, senders.errors
    acked = set(senders.acked)
    assert 30 <= len(acked) < len(files), "the kill must land in the middle of the ingest"

    srv2 = make_server(data_dir).start()
    sent = {uid_of[p]: dataset_bytes(p.read_bytes()) for p in files}
    with open_archive(data_dir) as archive:
        present = set(archive.index.instance_uids())
        lost = sorted(acked - present)
        assert not lost, f"{len(lost)} acknowledged instance(s) lost, e.g. {lost[:3]}"
        # every row the index has (acknowledged or not) has its bytes, intact
        for uid in present:
            assert dataset_bytes(archive.read_bytes(uid)) == sent[uid], uid
        assert_blobs_intact(data_dir, set(archive.index.referenced_blobs()))

    # the restarted server takes the whole set again and ends with one row per instance
    r = storescu(srv2.dimse_port, tmp_path / "in")
    assert r.returncode == 0, r.stdout + r.stderr
    with open_archive(data_dir) as archive:
        assert sorted(archive.index.instance_uids()) == sorted(sent)
        counts = archive.index.counts()
        assert counts["instance"] == counts["version"] == len(files)
        for uid, expected in sent.items():
            assert dataset_bytes(archive.read_bytes(uid)) == expected, uid
    assert srv2.alive()


# ---- C: eight parallel associations, overlapping sets of one study -----------------------


def one_big_study(out: Path, copies: int = 4) -> list[Path]:
    """A CT study of 12 x *copies* instances in 2 x *copies* series (pixels shared by copies).

    The generator makes at most 12 instances per study; copies get new series and SOP
    Instance UIDs, so they are distinct instances whose pixel blobs deduplicate.
    """
    base = generate(out / "base", patients=1, seed=77, rows=64)
    paths: list[Path] = []
    for c in range(copies):
        for n, src in enumerate(base):
            ds = pydicom.dcmread(src)
            ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"robust|{c}|{ds.SeriesInstanceUID}"])
            ds.SeriesNumber = c * 10 + int(ds.SeriesNumber)
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"robust|{c}|{n}"])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            path = out / "study" / f"{c}-{n:02d}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def test_eight_parallel_overlapping_stores_lose_nothing_and_duplicate_nothing(
    serve: AnimServer, tmp_path: Path
) -> None:
    files = one_big_study(tmp_path)
    n = len(files)
    study_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
                  for p in files}
    assert len(study_uids) == 1
    (study_uid,) = study_uids
    window = -(-n * 6 // 10)  # 60 % of the study, rounded up
    subsets = [[files[(k * n // 8 + j) % n] for j in range(window)] for k in range(8)]
    assert set().union(*subsets) == set(files)

    with ThreadPoolExecutor(max_workers=8) as pool:
        runs = list(pool.map(
            lambda k: storescu(serve.dimse_port, *subsets[k], calling=f"PACS{k}"), range(8)))
    for r in runs:
        assert r.returncode == 0, r.stdout + r.stderr

    series_of: dict[str, int] = {}
    for p in files:
        s = str(pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID)
        series_of[s] = series_of.get(s, 0) + 1
    with open_archive(serve.data_dir) as archive:
        counts = archive.index.counts()
        assert counts["patient"] == counts["study"] == 1
        assert counts["series"] == len(series_of)
        assert counts["instance"] == counts["version"] == n
        assert counts["change"] == n  # one "instance_created" each, nothing for repeats
        row = archive.index.study_row(study_uid)
        assert row["num_instances"] == n
        assert row["num_series"] == len(series_of)
        with archive.index.engine.connect() as conn:
            per_series = dict(conn.execute(
                select(series_table.c.series_uid, series_table.c.num_instances)).all())
        assert per_series == series_of
        for p in files:
            assert dataset_bytes(archive.read_bytes(sop_uid(p))) == dataset_bytes(p.read_bytes())
    assert serve.alive()
