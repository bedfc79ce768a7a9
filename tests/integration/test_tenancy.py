"""Institutions as tenants (docs/security.md): two hospitals' modalities store studies;
each institution's AE finds and retrieves only its own over C-FIND, C-MOVE and C-GET,
and its token only its own over QIDO-RS, WADO-RS and FHIR; a sharing rule shows one
study, and only that one, to the other. Real DCMTK peers, a real server process.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.conftest import SAMPLES, AnimServer, dcmtk, storescu
from tests.integration.test_retrieve import (
    Destination,
    _free_port,
    final_status,
    getscu,
    movescu,
    received_in,
)

A_STUDIES = [SAMPLES / "SYN0001" / "study1", SAMPLES / "SYN0003" / "study1"]
B_STUDIES = [SAMPLES / "SYN0002" / "study1"]
SHARED = SAMPLES / "SYN0003" / "study1"  # one of A's, shared with B


def uid_of(folder: Path) -> str:
    return str(dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def sops_of(folder: Path) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)
            for p in folder.rglob("*.dcm")}


def config(path: Path, dest_a: int, dest_b: int, extra: str = "") -> Path:
    path.write_text(f"""
[security]
tenancy = true

[[security.shares]]
study = "{uid_of(SHARED)}"
institutions = ["HOSP-B"]

[dimse]
allow_unknown_callers = false

[dimse.known_aes.MOD_A]
host = "127.0.0.1"
institution = "HOSP-A"
[dimse.known_aes.MOD_B]
host = "127.0.0.1"
institution = "HOSP-B"
[dimse.known_aes.DEST_A]
host = "127.0.0.1"
port = {dest_a}
institution = "HOSP-A"
[dimse.known_aes.DEST_B]
host = "127.0.0.1"
port = {dest_b}
institution = "HOSP-B"
{extra}
""")
    return path


def find_studies(port: int, calling: str, tmp: Path) -> set[str]:
    out = tmp / f"find-{calling}"
    out.mkdir(exist_ok=True)
    r = subprocess.run([dcmtk("findscu"), "-aet", calling, "-aec", "ANIM", "-S", "-X",
                        "-od", str(out), "-k", "QueryRetrieveLevel=STUDY",
                        "-k", "StudyInstanceUID", "127.0.0.1", str(port)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    found = {str(dcmread(p).StudyInstanceUID) for p in out.glob("rsp*.dcm")}
    for p in out.glob("rsp*.dcm"):
        p.unlink()
    return found


def find_patients(port: int, calling: str, tmp: Path) -> set[str]:
    out = tmp / f"findp-{calling}"
    out.mkdir(exist_ok=True)
    r = subprocess.run([dcmtk("findscu"), "-aet", calling, "-aec", "ANIM", "-P", "-X",
                        "-od", str(out), "-k", "QueryRetrieveLevel=PATIENT",
                        "-k", "PatientID", "127.0.0.1", str(port)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return {str(dcmread(p).PatientID) for p in out.glob("rsp*.dcm")}


@pytest.fixture
def tenants(make_server: type[AnimServer], tmp_path: Path) -> Any:
    dest_a = Destination("DEST_A", _free_port(), tmp_path / "dest-a").start()
    dest_b = Destination("DEST_B", _free_port(), tmp_path / "dest-b").start()
    cfg = config(tmp_path / "anim.toml", dest_a.port, dest_b.port)
    srv = make_server(tmp_path / "data", args=["--config", str(cfg)]).start()
    for folder in A_STUDIES:
        assert storescu(srv.dimse_port, folder, calling="MOD_A").returncode == 0
    for folder in B_STUDIES:
        assert storescu(srv.dimse_port, folder, calling="MOD_B").returncode == 0
    yield srv, dest_a, dest_b
    dest_a.stop()
    dest_b.stop()


def test_c_find_shows_each_institution_its_own_and_what_is_shared(
        tenants: Any, tmp_path: Path) -> None:
    srv, _a, _b = tenants
    a = {uid_of(f) for f in A_STUDIES}
    b = {uid_of(f) for f in B_STUDIES}
    assert find_studies(srv.dimse_port, "MOD_A", tmp_path) == a
    assert find_studies(srv.dimse_port, "MOD_B", tmp_path) == b | {uid_of(SHARED)}
    # the patient level too: B sees its own patient and the shared study's, not SYN0001
    assert find_patients(srv.dimse_port, "MOD_B", tmp_path) == {"SYN0002", "SYN0003"}
    assert find_patients(srv.dimse_port, "MOD_A", tmp_path) == {"SYN0001", "SYN0003"}


def test_c_get_and_c_move_retrieve_only_what_the_caller_may_see(
        tenants: Any, tmp_path: Path) -> None:
    srv, dest_a, dest_b = tenants
    hidden = A_STUDIES[0]  # A's, not shared
    # C-GET by B of A's unshared study: nothing comes
    got = tmp_path / "get-hidden"
    r = getscu(srv.dimse_port, got, {"QueryRetrieveLevel": "STUDY",
                                     "StudyInstanceUID": uid_of(hidden)}, calling="MOD_B")
    assert final_status(r) == 0x0000
    assert received_in(got) == []
    # ... the shared one comes whole
    got = tmp_path / "get-shared"
    r = getscu(srv.dimse_port, got, {"QueryRetrieveLevel": "STUDY",
                                     "StudyInstanceUID": uid_of(SHARED)}, calling="MOD_B")
    assert final_status(r) == 0x0000
    assert {x.sop for x in received_in(got)} == sops_of(SHARED)
    # C-MOVE by B of A's unshared study to B's own destination: nothing arrives
    r = movescu(srv.dimse_port, "DEST_B", {"QueryRetrieveLevel": "STUDY",
                                           "StudyInstanceUID": uid_of(hidden)}, calling="MOD_B")
    assert final_status(r) == 0x0000
    assert dest_b.received() == []
    # A moves its own study to its own destination
    r = movescu(srv.dimse_port, "DEST_A", {"QueryRetrieveLevel": "STUDY",
                                           "StudyInstanceUID": uid_of(hidden)}, calling="MOD_A")
    assert final_status(r) == 0x0000
    assert {x.sop for x in dest_a.received()} == sops_of(hidden)
