"""Every storage object among pydicom's own test files is stored and read back as sent.

Acceptance (ingest issue): every readable storage object among pydicom's test files,
in every transfer syntax it ships (implicit/explicit little endian, big endian,
deflated, JPEG, JPEG-LS, JPEG 2000, RLE), is stored, and reading it back gives the
identical bytes. Three ways in:

- ``anim import`` (the real CLI in a subprocess): the whole file comes back.
- DIMSE with pynetdicom sending each file's own data set bytes untouched, on a
  presentation context of the file's transfer syntax: the data set (everything
  after group 0002; DIMSE carries no file meta) comes back, in that syntax.
- DIMSE with DCMTK ``storescu``, which re-encodes what it sends (it drops Data Set
  Trailing Padding, re-deflates): a DCMTK ``storescp +B`` witness records the bytes
  DCMTK put on the wire, and the archive must hold exactly those.

Several pydicom files share a SOP Instance UID (variants of one image); from one
source they are corrections of each other, so each is looked up among all the
versions of its UID.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import struct
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from tests.conftest import (
    PYDICOM_TEST_FILES,
    AnimServer,
    anim_cli,
    dcmtk,
    echoscu,
    open_archive,
    storescu,
)

pytestmark = pytest.mark.integration

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"

# The issue names these; pydicom's test files must contain each of them.
REQUIRED_SYNTAXES = frozenset({
    IMPLICIT_LE, EXPLICIT_LE, EXPLICIT_BE, DEFLATED, JPEG_BASELINE, JPEG_EXTENDED,
    JPEG_LS_LOSSLESS, JPEG_2000_LOSSLESS, JPEG_2000, RLE,
})
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
UNDEFINED_LENGTH = 0xFFFFFFFF

# storescu proposes one transfer syntax first (PS3.8 negotiation: the acceptor takes one
# per context); with the file's own syntax first, nothing is converted on the way.
STORESCU_PROPOSAL = {
    IMPLICIT_LE: "-xi", EXPLICIT_LE: "-xe", EXPLICIT_BE: "-xb", DEFLATED: "-xd",
    JPEG_BASELINE: "-xy", JPEG_EXTENDED: "-xx", JPEG_LOSSLESS_SV1: "-xs",
    JPEG_LS_LOSSLESS: "-xt", JPEG_LS_NEAR_LOSSLESS: "-xu", JPEG_2000_LOSSLESS: "-xv",
    JPEG_2000: "-xw", RLE: "-xr",
}


@dataclass(frozen=True, slots=True)
class StorageObject:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def _truncated(ds: Dataset) -> str:
    """The first top-level element whose value is shorter than its declared length."""
    # by tag, not by iterating the Dataset: that would convert the raw elements
    for tag in tuple(ds.keys()):
        raw = ds.get_item(tag)
        if (isinstance(raw, RawDataElement) and raw.length != UNDEFINED_LENGTH
                and raw.value is not None and len(raw.value) < raw.length):
            return f"{raw.tag} declares {raw.length} bytes, {len(raw.value)} present"
    return ""


def classify(path: Path) -> StorageObject | str:
    """A storage object the archive must accept, or why *path* is not one.

    Readable means pydicom reads the whole file without a warning (a file whose
    data set contradicts its declared transfer syntax is read only by guessing).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            ds = dcmread(path)
        except Exception as e:  # pydicom raises many kinds on bad files
            return f"unreadable: {type(e).__name__}: {e}"
        cut = _truncated(ds)  # before any value is converted: raw lengths are needed
        if cut:
            return f"truncated: {cut}"
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        if not ts:
            return "no File Meta Information with a Transfer Syntax UID"
        try:
            missing = [k for k in REQUIRED_UIDS if not str(ds.get(k) or "").strip()]
        except Exception as e:
            return f"unreadable UID: {e}"
        if missing:
            return f"missing {', '.join(missing)}"
        return StorageObject(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ts))


@functools.cache
def storage_objects() -> tuple[StorageObject, ...]:
    found = (classify(p) for p in sorted(PYDICOM_TEST_FILES.rglob("*.dcm")))
    return tuple(o for o in found if isinstance(o, StorageObject))


def dataset_bytes(data: bytes) -> bytes:
    """The bytes after the preamble and File Meta Information (group 0002, PS3.10 7.1).

    Group 0002 is always Explicit VR Little Endian; walked element by element so that
    a wrong group length cannot shift the cut.
    """
    pos = 132 if data[128:132] == b"DICM" else 0
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        if data[pos + 4 : pos + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + struct.unpack_from("<L", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
    return data[pos:]


def test_pydicom_test_files_cover_every_transfer_syntax() -> None:
    objects = storage_objects()
    covered = {o.transfer_syntax for o in objects}
    assert covered >= REQUIRED_SYNTAXES, f"missing: {sorted(REQUIRED_SYNTAXES - covered)}"
    # The selection is made by reading, not by name: the truncated file is left out
    names = {o.path.name for o in objects}
    assert "MR_truncated.dcm" not in names
    assert "CT_small.dcm" in names


# ---- import ---------------------------------------------------------------------------


def test_import_stores_every_storage_object_byte_for_byte(tmp_path: Path) -> None:
    objects = storage_objects()
    data_dir = tmp_path / "data"
    r = anim_cli("import", "--data", str(data_dir), "--quiet", *(str(o.path) for o in objects))
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"imported (\d+) objects .*; (\d+) rejected, (\d+) not DICOM, (\d+) failed",
                  r.stdout)
    assert m, r.stdout
    assert m.groups() == (str(len(objects)), "0", "0", "0"), r.stdout

    missing: list[str] = []
    stored_syntaxes: set[str] = set()
    distinct: set[tuple[str, bytes]] = set()
    with open_archive(data_dir) as archive:
        for o in objects:
            want = o.path.read_bytes()
            assert dataset_bytes(want), o.path.name
            distinct.add((o.sop_instance_uid, dataset_bytes(want)))
            match = [v for v in archive.versions(o.sop_instance_uid)
                     if archive.read_bytes(o.sop_instance_uid, v.id) == want]
            if not match:
                missing.append(o.path.name)
                continue
            assert {v.transfer_syntax for v in match} == {o.transfer_syntax}, o.path.name
            stored_syntaxes.add(match[0].transfer_syntax)
        counts = archive.index.counts()
    assert not missing, f"not read back byte for byte: {missing}"
    assert stored_syntaxes >= REQUIRED_SYNTAXES
    # nothing lost, nothing doubled: one instance per UID, one version per distinct content
    assert counts["instance"] == len({o.sop_instance_uid for o in objects})
    assert counts["version"] == len(distinct)


# MR_truncated: pixel data cut off; rtplan_truncated: no pixel data, Beam Sequence cut off
@pytest.mark.parametrize("name", ["MR_truncated.dcm", "rtplan_truncated.dcm"])
def test_import_rejects_truncated_file_with_reason(tmp_path: Path, name: str) -> None:
    path = PYDICOM_TEST_FILES / name
    why = classify(path)
    assert isinstance(why, str), f"{name} should be truncated"
    assert why.startswith("truncated"), why
    data_dir = tmp_path / "data"
    r = anim_cli("import", "--data", str(data_dir), "--quiet", str(path))
    assert r.returncode != 2, r.stderr  # not a usage error
    assert re.search(r"imported 0 objects .*; 1 rejected", r.stdout), r.stdout
    assert re.search(r"rejected \(1\): .*truncated", r.stdout, re.IGNORECASE), r.stdout
    with open_archive(data_dir) as archive:
        assert archive.index.counts()["instance"] == 0


# ---- DIMSE: the files' own bytes (pynetdicom) -----------------------------------------


def test_dimse_stores_each_files_own_data_set_in_its_transfer_syntax(
        serve: AnimServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from pynetdicom import AE, _config

    # Send the data set bytes exactly as they are in the file: no decode, no re-encode
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    objects = storage_objects()
    contexts = sorted({(o.sop_class_uid, o.transfer_syntax) for o in objects})
    assert len(contexts) <= 128  # one association (PS3.8 9.3.2.2: odd IDs 1..255)
    ae = AE(ae_title="RAWSCU")
    for sop_class, ts in contexts:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", serve.dimse_port, ae_title="ANIM")
    assert assoc.is_established
    statuses: dict[str, int | None] = {}
    try:
        for o in objects:
            rsp = assoc.send_c_store(o.path)
            statuses[o.path.name] = rsp.get("Status")
    finally:
        assoc.release()
    assert {n: s for n, s in statuses.items() if s != 0x0000} == {}

    missing: list[str] = []
    with open_archive(serve.data_dir) as archive:
        for o in objects:
            want = dataset_bytes(o.path.read_bytes())
            assert want, o.path.name
            match = [v for v in archive.versions(o.sop_instance_uid)
                     if dataset_bytes(archive.read_bytes(o.sop_instance_uid, v.id)) == want]
            if not match:
                missing.append(o.path.name)
                continue
            assert {v.transfer_syntax for v in match} == {o.transfer_syntax}, o.path.name
    assert not missing, f"data set not read back byte for byte: {missing}"


# ---- DIMSE: DCMTK storescu, with a storescp witness ----------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def storescp_witness(out: Path) -> Iterator[int]:
    """DCMTK storescp writing exactly the bytes it receives (+B) into *out*; yields its port."""
    exe = dcmtk("storescp")
    out.mkdir()
    port = _free_port()
    proc = subprocess.Popen([exe, "+B", "+uf", "+xa", "-od", str(out), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 20
        while echoscu(port).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"storescp did not start on port {port}")
            time.sleep(0.05)  # poll interval, not a readiness guess
        yield port
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)


def test_storescu_every_transfer_syntax_is_stored_as_dcmtk_sent_it(
        serve: AnimServer, tmp_path: Path) -> None:
    groups: dict[str, list[Path]] = {}
    for o in storage_objects():
        if o.transfer_syntax in STORESCU_PROPOSAL:  # others: DCMTK 3.6 cannot propose them
            groups.setdefault(o.transfer_syntax, []).append(o.path)
    witness_dir = tmp_path / "witness"
    with storescp_witness(witness_dir) as witness_port:
        for ts, paths in sorted(groups.items()):
            extra = ("-R", STORESCU_PROPOSAL[ts], "-nh", "-v")
            to_anim = storescu(serve.dimse_port, *paths, calling="DCMTKSCU", extra=extra)
            to_witness = storescu(witness_port, *paths, aet="WITNESS", calling="DCMTKSCU",
                                  extra=extra)
            for r in (to_anim, to_witness):
                assert r.returncode == 0, r.stdout + r.stderr
                assert "Store Failed" not in r.stdout + r.stderr, r.stdout + r.stderr
            sent = to_anim.stdout + to_anim.stderr
            assert sent.count("Received Store Response (Success)") == (
                (to_witness.stdout + to_witness.stderr).count("Received Store Response"))

    received = sorted(witness_dir.iterdir())
    witnessed_syntaxes: set[str] = set()
    missing: list[str] = []
    with open_archive(serve.data_dir) as archive:
        for path in received:
            on_wire = path.read_bytes()
            ds = dcmread(path, stop_before_pixels=True)
            uid, ts = str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)
            witnessed_syntaxes.add(ts)
            want = dataset_bytes(on_wire)
            assert want, path.name
            match = [v for v in archive.versions(uid)
                     if dataset_bytes(archive.read_bytes(uid, v.id)) == want]
            if not match:
                missing.append(f"{uid} ({ts})")
                continue
            assert {v.transfer_syntax for v in match} == {ts}, uid
    assert received
    assert not missing, f"not stored as DCMTK sent it: {missing}"
    # DCMTK sent every required syntax without converting it (else the witness shows it)
    assert witnessed_syntaxes >= REQUIRED_SYNTAXES, sorted(REQUIRED_SYNTAXES - witnessed_syntaxes)
