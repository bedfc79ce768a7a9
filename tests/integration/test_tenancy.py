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
    logins = trail_rows(srv, lambda r: r["action"] == "association", 4)
    assert {(r["who"], r["institution"], r["outcome"]) for r in logins} >= {
        ("MOD_A", "HOSP-A", "success"), ("MOD_B", "HOSP-B", "success")}
    rows = trail_rows(srv, lambda r: r["action"] == "query", 4)
    assert {(r["who"], r["institution"], r["outcome"]) for r in rows} == {
        ("MOD_A", "HOSP-A", "success"), ("MOD_B", "HOSP-B", "success")}
    assert all(r["who_kind"] == "ae" and r["address"] == "127.0.0.1" for r in rows)


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
    rows = trail_rows(srv, lambda r: r["action"] == "retrieve", 4)
    got = sorted((r["who"], r["detail"]) for r in rows)
    assert got == [("MOD_A", f"C-MOVE to DEST_A {len(sops_of(hidden))} instances"),
                   ("MOD_B", "C-GET 0 instances"),
                   ("MOD_B", f"C-GET {len(sops_of(SHARED))} instances"),
                   ("MOD_B", "C-MOVE to DEST_B 0 instances")]
    assert all(uid_of(hidden) in r["study_uids"] for r in rows
               if r["detail"].endswith(" 0 instances"))


def trail_rows(srv: AnimServer, keep: Any, n: int) -> list[dict[str, Any]]:
    """The audit records *keep* selects, once there are *n* (the trail commits within a
    moment of each request)."""
    import time

    from anim.index.audit_log import AuditLog
    from anim.index.engine import make_engine

    engine = make_engine(f"sqlite:///{srv.data_dir / 'index.sqlite'}")
    try:
        deadline = time.monotonic() + 30
        while True:
            rows = [r for r in AuditLog(engine).search(limit=5000) if keep(r)]
            if len(rows) >= n or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)
    finally:
        engine.dispose()


# ---- the HTTP side: tokens of two institutions, and the audit trail -----------------------


def test_tokens_see_only_their_institutions_studies_and_the_trail_says_so(
        make_server: type[AnimServer], tmp_path: Path) -> None:
    import time

    import requests

    from anim.index.audit_log import AuditLog
    from anim.index.engine import make_engine
    from tests.integration.test_http_auth import AUDIENCE, ISSUER, Idp, write_jwks

    idp = Idp()
    jwks = write_jwks(tmp_path / "jwks.json", *idp.jwks()["keys"])
    auth = f"""
[auth]
enabled = true
[auth.issuers.idp]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "{jwks}"
"""
    cfg = config(tmp_path / "anim.toml", _free_port(), _free_port(), extra=auth)
    srv = make_server(tmp_path / "data", args=["--config", str(cfg)]).start()
    for folder in A_STUDIES:
        assert storescu(srv.dimse_port, folder, calling="MOD_A").returncode == 0
    for folder in B_STUDIES:
        assert storescu(srv.dimse_port, folder, calling="MOD_B").returncode == 0

    def token(institution: str, sub: str) -> dict[str, str]:
        claims = idp.claims(institution=institution, sub=sub)
        return {"Authorization": f"Bearer {idp.token(claims)}"}

    a, b = token("HOSP-A", "reader-a"), token("HOSP-B", "reader-b")
    hidden, shared = uid_of(A_STUDIES[0]), uid_of(SHARED)

    def get(path: str, who: dict[str, str], **kw: Any) -> requests.Response:
        return requests.get(f"{srv.url}{path}", headers=who, timeout=30, **kw)

    def qido(who: dict[str, str]) -> set[str]:
        r = get("/dicom-web/studies", who)
        assert r.status_code == 200
        return {s["0020000D"]["Value"][0] for s in r.json()}

    assert qido(a) == {uid_of(f) for f in A_STUDIES}
    assert qido(b) == {uid_of(f) for f in B_STUDIES} | {shared}
    # WADO-RS, rendered, HCM and FHIR reads of a study B may not see: 404, as if absent
    for path in (f"/dicom-web/studies/{hidden}/metadata", f"/dicom-web/studies/{hidden}",
                 f"/dicom-web/studies/{hidden}/thumbnail",
                 f"/hcm/studies/{hidden}/reference", f"/fhir/ImagingStudy/{hidden}"):
        assert get(path, b).status_code == 404, path
        assert get(path, a).status_code == 200, path
    assert get(f"/dicom-web/studies/{shared}/metadata", b).status_code == 200
    bundle = get("/fhir/ImagingStudy", b, params={"identifier": f"urn:oid:{hidden}"}).json()
    assert bundle.get("entry", []) == []
    bundle = get("/fhir/ImagingStudy", b, params={"identifier": f"urn:oid:{shared}"}).json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == [shared]
    # an invalid token is a failed login in the trail
    assert get("/dicom-web/studies", {"Authorization": "Bearer abc.def.ghi"}).status_code == 401

    # the audit trail: the right subject, outcome, and study for each of these
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    trail = AuditLog(engine)

    def recorded() -> list[dict[str, Any]]:
        return trail.search(limit=1000)

    deadline = time.monotonic() + 30
    while not any(r["action"] == "login" for r in recorded()):
        assert time.monotonic() < deadline, "the refused login never reached the trail"
        time.sleep(0.2)
    rows = recorded()

    def has(study: str = "", **want: Any) -> bool:
        return any(all(r[k] == v for k, v in want.items())
                   and (not study or study in r["study_uids"]) for r in rows)

    assert has(action="store", who="MOD_A", institution="HOSP-A", outcome="success",
               study=hidden)
    assert has(action="store", who="MOD_B", institution="HOSP-B", outcome="success")
    assert has(action="retrieve", who="reader-b", institution="HOSP-B", outcome="failure",
               study=hidden)
    assert has(action="retrieve", who="reader-a", institution="HOSP-A", outcome="success",
               study=hidden)
    assert has(action="retrieve", who="reader-b", outcome="success", study=shared)
    assert has(action="query", who="reader-b", outcome="success")
    assert has(action="login", outcome="failure")
    assert trail.verify().ok
    engine.dispose()


def test_a_patients_restriction_hides_a_study_from_all_but_its_sender_and_the_trail_holds(
        make_server: type[AnimServer], tmp_path: Path) -> None:
    import socket
    import sqlite3
    import sys

    import requests

    from tests.conftest import ROOT
    from tests.integration.test_http_auth import AUDIENCE, ISSUER, Idp, write_jwks

    idp = Idp()
    jwks = write_jwks(tmp_path / "jwks.json", *idp.jwks()["keys"])
    collector = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a test ATNA repository
    collector.bind(("127.0.0.1", 0))
    collector.settimeout(10)
    extra = f"""
[security.institutions.NATIONAL]
national = true
[audit]
syslog_url = "udp://127.0.0.1:{collector.getsockname()[1]}"
[auth]
enabled = true
[auth.issuers.idp]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "{jwks}"
"""
    cfg = config(tmp_path / "anim.toml", _free_port(), _free_port(), extra=extra)
    srv = make_server(tmp_path / "data", args=["--config", str(cfg)]).start()
    for folder in A_STUDIES:
        assert storescu(srv.dimse_port, folder, calling="MOD_A").returncode == 0

    def who(institution: str, scope: str = "anim.read") -> dict[str, str]:
        claims = idp.claims(scope=scope, institution=institution, sub=f"user-{institution}")
        return {"Authorization": f"Bearer {idp.token(claims)}"}

    def seen(institution: str) -> set[str]:
        r = requests.get(f"{srv.url}/dicom-web/studies", headers=who(institution), timeout=30)
        return {s["0020000D"]["Value"][0] for s in r.json()}

    shared = uid_of(SHARED)
    assert shared in seen("HOSP-B")
    assert seen("NATIONAL") == {uid_of(f) for f in A_STUDIES}
    admin = who("NATIONAL", "anim.read anim.admin")
    r = requests.post(f"{srv.url}/api/admin/restrictions", headers=admin, timeout=30,
                      json={"study": shared, "reason": "patient request"})
    assert r.status_code == 200
    assert shared not in seen("HOSP-B")  # the sharing rule no longer shows it
    assert shared not in seen("NATIONAL")  # nor does a national role
    assert shared in seen("HOSP-A")  # its sender still sees it
    assert requests.get(f"{srv.url}/dicom-web/studies/{shared}/metadata",
                        headers=who("HOSP-B"), timeout=30).status_code == 404
    r = requests.delete(f"{srv.url}/api/admin/restrictions/{shared}", headers=admin,
                        timeout=30)
    assert r.status_code == 200
    assert shared in seen("HOSP-B")

    # the audit records reached the ATNA repository as RFC 5424 syslog messages
    message = collector.recv(65536)
    assert message.startswith(b"<")
    assert b">1 " in message[:8]
    assert b"IHE+RFC-3881" in message
    assert b"<AuditMessage" in message
    collector.close()

    # anim audit verify: intact; then one row changed in the database: it names that row
    srv.stop()

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "anim", "audit", "verify",
                               "--data", str(tmp_path / "data")],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)

    assert verify().returncode == 0
    db = sqlite3.connect(tmp_path / "data" / "index.sqlite")
    seq = db.execute("SELECT seq FROM audit WHERE action = 'restrict' ORDER BY seq").fetchone()[0]
    db.execute("UPDATE audit SET who = 'someone-else' WHERE seq = ?", (seq,))
    db.commit()
    db.close()
    broken = verify()
    assert broken.returncode == 1
    assert str(seq) in broken.stdout + broken.stderr
