"""Compromise containment (docs/security.md): revoking an institution with a cut-off
hides what it sent after it from every query and retrieval path, keeps what it sent
before, refuses its AEs and tokens; restoring brings everything back byte for byte.
The patient access report then lists exactly the accesses this test made.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from tests.conftest import SAMPLES, AnimServer, storescu
from tests.integration.test_http_auth import AUDIENCE, ISSUER, Idp, write_jwks
from tests.integration.test_retrieve import final_status, getscu, received_in
from tests.integration.test_tenancy import find_studies, sops_of, uid_of

EARLY = SAMPLES / "SYN0001" / "study1"  # HOSP-A, before the cut-off
LATE = SAMPLES / "SYN0003" / "study1"  # HOSP-A, after it (patient SYN0003, issuer HOSP-A)
OTHER = SAMPLES / "SYN0002" / "study1"  # HOSP-B
STUDY_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def parts(body: bytes, ctype: str) -> list[bytes]:
    """The bodies of a multipart/related response, in order."""
    boundary = ctype.split("boundary=")[1].split(";")[0].strip('"').encode()
    out = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        out.append(chunk.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n"))
    return out


def test_revoking_an_institution_contains_it_and_restoring_brings_all_back(
        make_server: type[AnimServer], tmp_path: Path) -> None:
    idp = Idp()
    jwks = write_jwks(tmp_path / "jwks.json", *idp.jwks()["keys"])
    cfg = tmp_path / "anim.toml"
    cfg.write_text(f"""
[auth]
enabled = true
[auth.issuers.idp]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "{jwks}"

[dimse]
allow_unknown_callers = false
[dimse.known_aes.MOD_A]
host = "127.0.0.1"
institution = "HOSP-A"
[dimse.known_aes.MOD_B]
host = "127.0.0.1"
institution = "HOSP-B"
""")
    srv = make_server(tmp_path / "data", args=["--config", str(cfg)]).start()

    def bearer(institution: str, sub: str, scope: str) -> dict[str, str]:
        claims = idp.claims(scope=scope, institution=institution, sub=sub)
        return {"Authorization": f"Bearer {idp.token(claims)}"}

    admin = bearer("NATIONAL", "operator-1", "anim.read anim.admin")
    hosp_a = bearer("HOSP-A", "reader-a", "anim.read")

    def get(path: str, who: dict[str, str], **kw: Any) -> requests.Response:
        return requests.get(f"{srv.url}{path}", headers=who, timeout=30, **kw)

    def studies() -> set[str]:
        return {s["0020000D"]["Value"][0] for s in get("/dicom-web/studies", admin).json()}

    def study_bytes(uid: str) -> list[bytes]:
        r = get(f"/dicom-web/studies/{uid}", {**admin, "Accept": STUDY_ACCEPT})
        assert r.status_code == 200
        return sorted(parts(r.content, r.headers["Content-Type"]))

    assert storescu(srv.dimse_port, EARLY, calling="MOD_A").returncode == 0
    time.sleep(0.05)
    cutoff = datetime.now(UTC).isoformat()
    time.sleep(0.05)
    assert storescu(srv.dimse_port, LATE, calling="MOD_A").returncode == 0
    assert storescu(srv.dimse_port, OTHER, calling="MOD_B").returncode == 0
    early, late, other = uid_of(EARLY), uid_of(LATE), uid_of(OTHER)
    assert studies() == {early, late, other}
    before = study_bytes(late)  # access 1 to the patient of LATE: a retrieve
    assert len(before) == len(sops_of(LATE))

    # one command (here the API; `anim revoke HOSP-A --after …` is the same call)
    r = requests.post(f"{srv.url}/api/admin/revocations", headers=admin, timeout=30,
                      json={"institution": "HOSP-A", "after": cutoff, "reason": "breach"})
    assert r.status_code == 200
    assert r.json()["contained_studies"] == [late]

    # hidden from every path, earlier content kept
    assert studies() == {early, other}
    assert get(f"/dicom-web/studies/{late}", {**admin, "Accept": STUDY_ACCEPT}
               ).status_code == 404  # access 2: a refused retrieve
    assert get(f"/dicom-web/studies/{early}/metadata", admin).status_code == 200
    assert get("/fhir/ImagingStudy", admin,
               params={"identifier": f"urn:oid:{late}"}).json().get("entry", []) == []
    assert find_studies(srv.dimse_port, "MOD_B", tmp_path) == {early, other}
    got = tmp_path / "get-late"
    r = getscu(srv.dimse_port, got, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": late},
               calling="MOD_B")  # access 3: a retrieve that finds nothing
    assert final_status(r) == 0x0000
    assert received_in(got) == []
    # its AEs and tokens are refused
    refused = storescu(srv.dimse_port, OTHER, calling="MOD_A")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert get("/dicom-web/studies", hosp_a).status_code == 403
    feed = requests.get(f"{srv.url}/hcm/changes", headers=admin, params={"limit": 1000},
                        timeout=30).json()["changes"]
    assert [(e["kind"], e["study_uid"]) for e in feed if e["kind"] == "study_contained"] == [
        ("study_contained", late)]

    # restore: everything back, byte for byte
    r = requests.delete(f"{srv.url}/api/admin/revocations/HOSP-A", headers=admin, timeout=30)
    assert r.status_code == 200
    assert r.json()["restored_studies"] == [late]
    time.sleep(1.1)  # every node re-reads revocations within a second
    assert studies() == {early, late, other}
    assert study_bytes(late) == before  # access 4
    assert get("/dicom-web/studies", hosp_a).status_code == 200

    # the patient's access report: exactly what this test did to SYN0003's images
    report = get("/api/admin/audit/patient", admin, params={"patient": "HOSP-A|SYN0003"})
    assert report.status_code == 200
    seen = Counter((e["action"], e["who"], e["outcome"]) for e in report.json())
    assert seen == Counter({
        ("store", "MOD_A", "success"): len(sops_of(LATE)),
        ("retrieve", "operator-1", "success"): 2,
        ("retrieve", "operator-1", "failure"): 1,
        ("retrieve", "MOD_B", "success"): 1,
    })
