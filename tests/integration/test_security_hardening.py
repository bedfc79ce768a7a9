"""Hostile requests get a 4xx, never a file, an injected header, a 5xx or a dead server
(issue 7, acceptance 5): path traversal, header injection, oversized requests, SQL
metacharacters in QIDO values and malformed bearer tokens.

Requests whose bytes an HTTP client would tidy up (dot segments, CR LF, NUL) go over a
plain socket, exactly as written here.
"""

from __future__ import annotations

import json
import re
import socket
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, SAMPLES, AnimServer, sample_files, storescu
from tests.integration.test_http_auth import AUDIENCE, ISSUER, Idp, b64url, segment, write_jwks

pytestmark = pytest.mark.integration

TIMEOUT = 60
MAX_STOW = 100_000
STOW_TYPE = 'multipart/related; type="application/dicom"; boundary=b'
# what would show that a file outside the static folder, or the archive's own code or
# configuration, came back
LEAKS = (b"root:", b"daemon:", b"import ", b"[storage]", b"def ", b"BEGIN ")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnimServer]:
    srv = AnimServer(tmp_path_factory.mktemp("hostile") / "data",
                     env={"ANIM_WEB_MAX_STOW_BYTES": str(MAX_STOW)}).start()
    done = storescu(srv.dimse_port, SAMPLES)
    assert done.returncode == 0, done.stderr
    yield srv
    srv.stop()


def raw(srv: AnimServer, request: bytes) -> tuple[int, bytes, bytes]:
    """Send *request* as it is; (status, head, body) of the answer."""
    with socket.create_connection(("127.0.0.1", srv.http_port), timeout=TIMEOUT) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head, body


def get_raw(srv: AnimServer, target: bytes, *headers: bytes) -> tuple[int, bytes, bytes]:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: 127.0.0.1", *headers,
             b"Connection: close"]
    return raw(srv, b"\r\n".join(lines) + b"\r\n\r\n")


# per server: log lines already looked at
_checked: weakref.WeakKeyDictionary[AnimServer, int] = weakref.WeakKeyDictionary()


def server_errors(srv: AnimServer) -> list[str]:
    """New ERROR records of the server log, but for aiohttp's parser refusing a request
    (it logs those as errors, traceback included; they are the client's, answered 400)."""
    lines = list(srv.lines)
    start, _checked[srv] = _checked.get(srv, 0), len(lines)
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", "\n".join(lines[start:]))
    return [r for r in records if " ERROR " in r.split("\n", 1)[0]
            and "aiohttp.http_exceptions." not in r]


def healthy(srv: AnimServer) -> None:
    assert srv.alive()
    r = requests.get(f"{srv.url}/health", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    assert server_errors(srv) == []


def study_count(srv: AnimServer) -> tuple[int, int]:
    studies = requests.get(f"{srv.url}/dicom-web/studies", timeout=TIMEOUT)
    instances = requests.get(f"{srv.url}/dicom-web/instances", timeout=TIMEOUT)
    assert studies.status_code == instances.status_code == 200
    return len(studies.json()), len(instances.json())


# ---- path traversal ---------------------------------------------------------------------

TRAVERSALS = [
    b"/static/../../etc/passwd",
    b"/static/../../../../../../../../etc/passwd",
    b"/static/%2e%2e/%2e%2e/etc/passwd",
    b"/static/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    b"/static/..%2f..%2fetc%2fpasswd",
    b"/static/..%5c..%5cetc%5cpasswd",
    b"/static/%252e%252e/%252e%252e/etc/passwd",  # encoded twice
    b"/static/../ui.py",  # the archive's own code, next to the static folder
    b"/static/..%2fui.py",
    b"/static//etc/passwd",
    b"/../../etc/passwd",
    b"//etc/passwd",
    b"/dicom-web/studies/..%2f..%2fetc/metadata",
    b"/dicom-web/studies/1.2.3/series/../../../x",
    b"/dicom-web/studies/1.2.3/series/../../../../../etc/passwd",
    b"/dicom-web/studies/1.2/series/1.2/instances/1.2/bulkdata/..%2f..%2f..%2fetc%2fpasswd",
    b"/fhir/ImagingStudy/..%2f..%2fetc%2fpasswd",
    # NUL: a C library would stop reading the name there
    b"/static/%00",
    b"/static/index.html%00.png",
    b"/static/..%00/..%00/etc/passwd",
    b"/dicom-web/studies/%00/metadata",
    b"/dicom-web/studies/1.2%00/series",
    # overlong UTF-8 for "." and "/" (RFC 3629 forbids them; old decoders took them)
    b"/static/%c0%ae%c0%ae/%c0%ae%c0%ae/etc/passwd",
    b"/static/%c0%ae%c0%ae%c0%af%c0%ae%c0%ae%c0%afetc%c0%afpasswd",
    b"/static/%e0%80%ae%e0%80%ae/etc/passwd",
    b"/dicom-web/studies/%c0%ae%c0%ae%c0%af/metadata",
]


@pytest.mark.parametrize("target", TRAVERSALS, ids=lambda t: t.decode())
def test_path_traversal_is_4xx_and_returns_no_file(loaded: AnimServer, target: bytes) -> None:
    status, _head, body = get_raw(loaded, target)
    assert status in (400, 404), (status, body[:300])
    for leak in LEAKS:
        assert leak not in body, (leak, body[:300])
    healthy(loaded)


NUL_URLS = [
    "/dicom-web/studies/%00", "/dicom-web/studies/%00/metadata",
    "/dicom-web/studies/1.2%00/series", "/dicom-web/studies/1.2/series/%00/instances",
    "/dicom-web/studies/1.2/series/1.3/instances/%00", "/dicom-web/studies?PatientName=%00",
    "/dicom-web/studies?PatientID=a%00'%20OR%201=1", "/fhir/ImagingStudy/%00",
    "/fhir/ImagingStudy?identifier=%00", "/hcm/studies/%00/manifest", "/static/%00",
]


def test_nul_in_the_url_is_4xx_on_both_index_engines(
        make_server: type[AnimServer], tmp_path: Path, index_url: str) -> None:
    # PostgreSQL text cannot hold NUL: a NUL that reaches a query would be a database error
    srv = make_server(tmp_path / "data", env={"ANIM_INDEX_URL": index_url}).start()
    answers = {url: get_raw(srv, url.encode()) for url in NUL_URLS}
    # a searched value may simply match nothing (FHIR: an empty Bundle); a path is 4xx
    wrong = {u: (st, body[:200]) for u, (st, _, body) in answers.items()
             if not (400 <= st < 500 or (st == 200 and "?" in u and b'"total": 0' in body))}
    assert wrong == {}
    healthy(srv)


def test_the_static_folder_still_serves_its_own_files(loaded: AnimServer) -> None:
    # the traversal refusals above are not a static route that refuses everything
    own = sorted(p.name for p in (ROOT / "web" / "static").iterdir() if p.is_file())
    status, _, body = get_raw(loaded, b"/static/" + own[0].encode())
    assert status == 200
    assert body


# ---- header injection -------------------------------------------------------------------

INJECTED = b"X-Injected"
# CR/LF (raw, or percent-encoded into a value the server might echo) in every place a
# request carries text: the request target, the query values QIDO echoes into its
# Warning header or error reason, Accept, Origin, the STOW boundary and part headers
INJECTIONS: list[tuple[str, bytes]] = [
    ("raw CR LF in the request target",
     b"GET /dicom-web/studies?PatientName=a\r\nX-Injected: yes HTTP/1.1\r\n"
     b"Host: x\r\nConnection: close\r\n\r\n"),
    ("raw LF in the request target",
     b"GET /dicom-web/studies?PatientName=a\nX-Injected: yes HTTP/1.1\r\n"
     b"Host: x\r\nConnection: close\r\n\r\n"),
    ("encoded CR LF in fuzzymatching (echoed in Warning)",
     b"GET /dicom-web/studies?fuzzymatching=true%0d%0aX-Injected:%20yes HTTP/1.1\r\n"
     b"Host: x\r\nConnection: close\r\n\r\n"),
    ("encoded CR LF in includefield",
     b"GET /dicom-web/studies?includefield=PatientAge%0d%0aX-Injected:%20yes HTTP/1.1\r\n"
     b"Host: x\r\nConnection: close\r\n\r\n"),
    ("encoded CR LF in limit",
     b"GET /dicom-web/studies?limit=1%0d%0aX-Injected:%20yes HTTP/1.1\r\n"
     b"Host: x\r\nConnection: close\r\n\r\n"),
    ("bare CR in Accept",
     b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
     b"Accept: application/dicom+json\rX-Injected: yes\r\nConnection: close\r\n\r\n"),
    ("bare LF in Accept",
     b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
     b"Accept: application/dicom+json\nX-Injected: yes\r\nConnection: close\r\n\r\n"),
    ("NUL in Accept",
     b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
     b"Accept: application/dicom+json\x00X-Injected: yes\r\nConnection: close\r\n\r\n"),
    ("folded Accept (obs-fold)",
     b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
     b"Accept: application/dicom+json\r\n X-Injected: yes\r\nConnection: close\r\n\r\n"),
    ("encoded CR LF in Accept",
     b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
     b"Accept: text/html%0d%0aX-Injected: yes\r\nConnection: close\r\n\r\n"),
    ("bare CR in Origin (echoed by CORS)",
     b"GET /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
     b"Origin: http://a\rX-Injected: yes\r\nConnection: close\r\n\r\n"),
    ("bare CR in the STOW boundary",
     b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
     b"Content-Type: multipart/related; type=\"application/dicom\"; boundary=ab\r"
     b"X-Injected: yes\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"),
    ("encoded CR LF in the STOW boundary",
     b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
     b"Content-Type: multipart/related; type=\"application/dicom\"; "
     b"boundary=\"ab%0d%0aX-Injected: yes\"\r\nContent-Length: 10\r\nConnection: close\r\n"
     b"\r\n0123456789"),
    ("bare CR in a STOW part header",
     b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\n"
     b"Content-Type: multipart/related; type=\"application/dicom\"; boundary=b\r\n"
     b"Content-Length: 71\r\nConnection: close\r\n\r\n"
     b"--b\r\nContent-Type: application/dicom\rX-Injected: yes\r\n\r\nxx\r\n--b--\r\n"),
]


@pytest.mark.parametrize(("why", "request_bytes"), INJECTIONS, ids=[w for w, _ in INJECTIONS])
def test_header_injection_is_4xx_and_injects_nothing(loaded: AnimServer, why: str,
                                                     request_bytes: bytes) -> None:
    status, head, body = raw(loaded, request_bytes)
    assert 400 <= status < 500, (status, head, body[:300])
    lines = head.split(b"\r\n")[1:]
    assert not any(line.lower().startswith(INJECTED.lower()) for line in lines), head
    assert b"\n" + INJECTED not in head
    healthy(loaded)


@pytest.mark.parametrize(("method", "header", "value", "status"), [
    ("GET", "Accept", ";", 406),
    ("GET", "Accept", ",;,", 406),
    ("GET", "Accept", "application/dicom+json; q=x", 406),
    ("POST", "Content-Type", ";", 415),
    ("POST", "Content-Type", 'multipart/related; type="application/dicom"; boundary=b, ;', 400),
])
def test_malformed_media_types_are_4xx(loaded: AnimServer, method: str, header: str,
                                       value: str, status: int) -> None:
    r = requests.request(method, f"{loaded.url}/dicom-web/studies", data=b"--b--\r\n",
                         headers={header: value}, timeout=TIMEOUT)
    assert r.status_code == status, r.text[:300]
    assert r.json()["status"] == status
    healthy(loaded)


@pytest.mark.parametrize(("target", "status"), [
    (b"/dicom-web/studies?PatientName=a%0d%0aX-Injected:%20yes&fuzzymatching=true", 200),
    (b"/dicom-web/studies?StudyDescription=*%0d%0aX-Injected:%20yes*", 200),
    (b"/dicom-web/studies/1.2%0d%0aX-Injected:%20yes/series", 200),
    (b"/dicom-web/studies/1.2%0d%0aX-Injected:%20yes/metadata", 404),
], ids=["PatientName", "StudyDescription", "QIDO path UID", "WADO path UID"])
def test_a_crlf_in_a_matching_value_is_data_and_injects_nothing(
        loaded: AnimServer, target: bytes, status: int) -> None:
    # free text to match (or a UID to look up), not a header: it simply matches nothing
    got, head, body = get_raw(loaded, target)
    assert got == status, body[:300]
    if status == 200:
        assert json.loads(body) == []
    for line in head.split(b"\r\n")[1:]:
        assert not line.lower().startswith(INJECTED.lower()), head


# ---- oversized requests -----------------------------------------------------------------


def _stow_parts(count: int) -> Iterator[bytes]:
    files = sample_files()
    for i in range(count):
        yield (b"--b\r\nContent-Type: application/dicom\r\n\r\n"
               + files[i % len(files)].read_bytes() + b"\r\n")
    yield b"--b--\r\n"


def _too_large(r: requests.Response) -> None:
    assert r.status_code == 413, r.text[:300]
    assert r.json()["status"] == 413
    assert str(MAX_STOW) in r.json()["reason"]


def test_stow_declaring_a_body_over_the_limit_is_413(loaded: AnimServer) -> None:
    before = study_count(loaded)
    body = b"".join(_stow_parts(MAX_STOW // 9000 + 2))
    assert len(body) > MAX_STOW
    r = requests.post(f"{loaded.url}/dicom-web/studies", data=body,
                      headers={"Content-Type": STOW_TYPE}, timeout=TIMEOUT)
    _too_large(r)
    assert study_count(loaded) == before  # refused before reading: nothing stored
    healthy(loaded)


def test_stow_declaring_a_huge_body_is_refused_before_it_is_sent(loaded: AnimServer) -> None:
    # 8 GiB announced, nothing sent: the answer comes from the headers alone
    status, _head, body = raw(loaded, (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {STOW_TYPE}\r\n"
        f"Content-Length: {8 << 30}\r\nConnection: close\r\n\r\n").encode())
    assert status == 413, body[:300]
    assert json.loads(body)["status"] == 413
    healthy(loaded)


def test_stow_chunked_past_the_limit_is_413(loaded: AnimServer) -> None:
    # no Content-Length: the limit is counted while the parts stream in
    r = requests.post(f"{loaded.url}/dicom-web/studies", data=_stow_parts(40),
                      headers={"Content-Type": STOW_TYPE}, timeout=TIMEOUT)
    _too_large(r)
    healthy(loaded)


def test_stow_one_chunked_part_past_the_limit_is_413(loaded: AnimServer) -> None:
    def body() -> Iterator[bytes]:
        yield b"--b\r\nContent-Type: application/dicom\r\n\r\n"
        for _ in range(30):
            yield b"\0" * 10_000
        yield b"\r\n--b--\r\n"

    r = requests.post(f"{loaded.url}/dicom-web/studies", data=body(),
                      headers={"Content-Type": STOW_TYPE}, timeout=TIMEOUT)
    _too_large(r)
    healthy(loaded)


def test_an_oversized_json_body_is_413(loaded: AnimServer) -> None:
    # bodies read whole (the admin API's JSON) stop at aiohttp's client_max_size (1 MiB)
    body = json.dumps({"institution": "NOBODY", "pad": "x" * (2 << 20)}).encode()
    r = requests.post(f"{loaded.url}/api/admin/revocations", data=body, timeout=TIMEOUT,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert r.json()["status"] == 413
    healthy(loaded)


@pytest.mark.parametrize(("what", "target", "headers"), [
    ("100 kB URL", b"/dicom-web/studies?PatientName=" + b"A" * 100_000, []),
    ("100 kB path", b"/dicom-web/studies/" + b"1." * 50_000 + b"/metadata", []),
    ("100 kB header", b"/dicom-web/studies", [b"X-Big: " + b"a" * 100_000]),
    ("100 kB Accept", b"/dicom-web/studies", [b"Accept: " + b"*/*," * 25_000]),
    ("1000 headers", b"/dicom-web/studies", [b"X-H%d: v" % i for i in range(1000)]),
    ("200 Accept headers", b"/dicom-web/studies", [b"Accept: */*"] * 200),
])
def test_oversized_request_heads_are_4xx(loaded: AnimServer, what: str, target: bytes,
                                          headers: list[bytes]) -> None:
    status, _head, body = get_raw(loaded, target, *headers)
    assert 400 <= status < 500, (what, status, body[:200])
    healthy(loaded)


# ---- SQL metacharacters in QIDO values --------------------------------------------------

SQL_VALUES: list[tuple[str, str, str]] = [
    ("studies", "PatientName", "' OR 1=1 --"),
    ("studies", "PatientName", "' OR '1'='1"),
    ("studies", "PatientName", "*' OR '1'='1"),
    ("studies", "PatientName", "\" OR \"\"=\""),
    ("studies", "PatientName", "x'; DELETE FROM patient; --"),
    ("studies", "PatientID", "%'; DROP TABLE study; --"),
    ("studies", "PatientID", "1; DROP TABLE study"),
    ("studies", "PatientID", "' UNION SELECT sqlite_version() --"),
    ("studies", "PatientID", "%"),
    ("studies", "PatientID", "_"),
    ("studies", "PatientID", "%%"),
    ("studies", "PatientID", "____"),
    ("studies", "PatientID", "!"),
    ("studies", "PatientID", "!%"),
    ("studies", "PatientID", "\\"),
    ("studies", "PatientID", "\\\\"),
    ("studies", "PatientID", "\\%"),
    ("studies", "AccessionNumber", "*%*"),
    ("studies", "AccessionNumber", "?_?"),
    ("studies", "AccessionNumber", "[A-Z]*"),
    ("studies", "StudyDescription", "*' AND 1=1 AND '*"),
    ("studies", "StudyDate", "2020'"),
    ("studies", "StudyDate", "2020' OR '1'='1"),
    ("studies", "StudyDate", "20200101-20201231' --"),
    ("studies", "StudyTime", "12' --"),
    ("studies", "StudyInstanceUID", "1.2.3' OR '1'='1"),
    ("studies", "StudyInstanceUID", "\\"),
    ("studies", "StudyInstanceUID", ","),
    ("studies", "StudyInstanceUID", "%"),
    ("studies", "NumberOfStudyRelatedInstances", "1 OR 1=1"),
    ("studies", "NumberOfStudyRelatedInstances", "99999999999"),
    ("studies", "ModalitiesInStudy", "CT' --"),
    ("studies", "ModalitiesInStudy", "%"),
    ("studies", "PatientName", "Ñoño^Ç'"),
    ("studies", "PatientName", "山田^太郎' --"),
    ("studies", "PatientName", "\U0001F600*"),
    ("studies", "PatientName", "\u202e' OR 1=1"),
    ("studies", "PatientName", "\x00"),
    ("studies", "PatientID", "a\x00' OR 1=1 --"),
    ("studies", "PatientName", "'" * 2000),
    ("studies", "PatientName", "A" * 6000),
    ("studies", "includefield", "PatientName' --"),
    ("series", "Modality", "' OR 1=1 --"),
    ("series", "SeriesNumber", "1 OR 1=1"),
    ("series", "SeriesDescription", "%' --"),
    ("instances", "SOPClassUID", "1.2'%"),
    ("instances", "InstanceNumber", "'"),
]


@pytest.fixture(scope="module")
def counts(loaded: AnimServer) -> tuple[int, int]:
    return study_count(loaded)


@pytest.mark.parametrize(("resource", "key", "value"), SQL_VALUES,
                         ids=[f"{r}-{k}-{v[:20]!r}" for r, k, v in SQL_VALUES])
def test_sql_metacharacters_match_nothing_or_are_400(
        loaded: AnimServer, counts: tuple[int, int], resource: str, key: str,
        value: str) -> None:
    r = requests.get(f"{loaded.url}/dicom-web/{resource}", params={key: value},
                     timeout=TIMEOUT)
    assert r.status_code in (200, 400), (r.status_code, r.text[:300])
    if r.status_code == 200:
        assert key != "includefield", "an unknown includefield was accepted"
        assert r.json() == [], r.text[:300]
    else:
        assert r.json()["status"] == 400
    assert study_count(loaded) == counts  # the data is intact


def test_wildcards_still_match_after_the_hostile_values(loaded: AnimServer,
                                                        counts: tuple[int, int]) -> None:
    r = requests.get(f"{loaded.url}/dicom-web/studies", params={"PatientID": "*"},
                     timeout=TIMEOUT)
    assert len(r.json()) == counts[0]
    healthy(loaded)


# ---- malformed bearer tokens ------------------------------------------------------------

INVALID = {"status": 401, "reason": "invalid token"}


@pytest.fixture(scope="module")
def idp() -> Idp:
    return Idp()


def _auth_toml(folder: Path, jwks: Path) -> Path:
    toml = folder / "anim.toml"
    toml.write_text(f"""
[auth]
enabled = true

[auth.issuers.idp]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "{jwks}"
""", encoding="utf-8")
    return toml


@pytest.fixture(scope="module")
def guarded(idp: Idp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnimServer]:
    tmp = tmp_path_factory.mktemp("jwt")
    jwks = write_jwks(tmp / "jwks.json", *idp.jwks()["keys"])
    srv = AnimServer(tmp / "data", args=["--config", str(_auth_toml(tmp, jwks))]).start()
    yield srv
    srv.stop()


def _refused(r: requests.Response, token: str | bytes) -> None:
    assert r.status_code == 401, (r.status_code, r.text[:300])
    assert r.json() == INVALID
    challenge = r.headers.get("WWW-Authenticate", "")
    assert 'error="invalid_token"' in challenge
    text = token.decode("utf-8", "replace") if isinstance(token, bytes) else token
    if len(text) >= 12:  # nothing of the token comes back
        assert text not in r.text
        assert text not in challenge


def _send(srv: AnimServer, token: str | bytes, path: str = "/dicom-web/studies"
          ) -> requests.Response:
    value = b"Bearer " + (token.encode() if isinstance(token, str) else token)
    return requests.get(f"{srv.url}{path}", headers={"Authorization": value},
                        timeout=TIMEOUT)


def _json_segment(value: Any) -> str:
    return b64url(json.dumps(value).encode())


_b64 = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/",
               max_size=60)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3),
    max_leaves=8)
_header = st.fixed_dictionaries({}, optional={
    "alg": st.one_of(st.sampled_from(["RS256", "ES256", "HS256", "none", "None", "PS256",
                                      "EdDSA", ""]), _json),
    "kid": st.one_of(st.sampled_from(["rsa-1", "ec-1", "../../etc/passwd", ""]), _json),
    "typ": st.one_of(st.just("JWT"), _json),
    "jku": st.just("http://127.0.0.1:9/jwks.json"),
    "crit": _json,
})
_claims = st.fixed_dictionaries({}, optional={
    "iss": st.one_of(st.just(ISSUER), _json),
    "aud": st.one_of(st.just(AUDIENCE), st.just([AUDIENCE]), _json),
    "sub": st.one_of(st.just("someone"), _json),
    "exp": st.one_of(st.integers(), st.floats(allow_nan=False), _json),
    "nbf": st.one_of(st.integers(), _json),
    "institution": _json,
    "scope": st.one_of(st.just("anim.read anim.write anim.admin"), _json),
})
_tokens = st.one_of(
    # dots and base64 pieces
    st.lists(_b64, max_size=6).map(".".join),
    st.text(alphabet=".", max_size=10),
    # JSON header and claims, any signature: shaped like a JWT, signed by no one
    st.tuples(_header.map(_json_segment), _claims.map(_json_segment),
              st.one_of(_b64, st.just(""))).map(".".join),
    # a header that is JSON but no object, or no JSON at all
    st.tuples(st.one_of(_json.map(_json_segment), _b64), _claims.map(_json_segment),
              _b64).map(".".join),
    # printable junk of any kind, non-ASCII included (sent as UTF-8)
    st.text(alphabet=st.characters(exclude_categories=("Cs", "Cc")), max_size=80)
    .map(str.strip),
)


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(token=_tokens)
def test_malformed_tokens_are_always_401(guarded: AnimServer, token: str) -> None:
    r = _send(guarded, token.encode("utf-8"))
    _refused(r, token)


@pytest.mark.parametrize("how", [
    "empty", "one dot", "two dots", "alg none, forged claims", "alg none, no signature dot",
    "unknown kid", "kid path", "kid object", "header not JSON", "header JSON array",
    "payload not JSON", "huge exp", "exp string", "iss list", "iss object",
    "signature from another token", "UTF-8 junk", "8 kB of dots",
])
def test_malformed_token_shapes_are_401(guarded: AnimServer, idp: Idp, how: str) -> None:
    good = idp.token(idp.claims(scope="anim.read"))
    h, p, sig = good.split(".")
    claims = idp.claims()
    tokens: dict[str, str | bytes] = {
        "empty": "",
        "one dot": ".",
        "two dots": "..",
        "alg none, forged claims": f'{segment({"alg": "none"})}.{segment(claims)}.',
        "alg none, no signature dot": f'{segment({"alg": "none"})}.{segment(claims)}',
        "unknown kid": idp.token(kid="no-such-kid"),
        "kid path": idp.token(kid="../../../../etc/passwd"),
        "kid object": f'{segment({"alg": "RS256", "kid": {"a": 1}})}.{p}.{sig}',
        "header not JSON": f"{b64url(b'{not json')}.{p}.{sig}",
        "header JSON array": f'{_json_segment(["RS256"])}.{p}.{sig}',
        "payload not JSON": f"{h}.{b64url(b'{not json')}.{sig}",
        "huge exp": f'{h}.{segment({**claims, "exp": 10**400})}.{sig}',
        "exp string": f'{h}.{segment({**claims, "exp": "tomorrow"})}.{sig}',
        "iss list": f'{h}.{segment({**claims, "iss": [ISSUER]})}.{sig}',
        "iss object": f'{h}.{segment({**claims, "iss": {"a": ISSUER}})}.{sig}',
        "signature from another token": f"{h}.{segment({**claims, 'sub': 'x'})}.{sig}",
        "UTF-8 junk": "ÄÖÜ.日本語.🙂".encode(),
        "8 kB of dots": "." * 8000,
    }
    token = tokens[how]
    _refused(_send(guarded, token), token)
    healthy(guarded)


@pytest.mark.parametrize("size", [8_000, 65_536])
def test_huge_tokens_are_refused_with_a_4xx(guarded: AnimServer, idp: Idp, size: int) -> None:
    token = (idp.token() + "A" * size)[:size]
    r = _send(guarded, token)
    if size < 8190 - len("Authorization: Bearer "):
        _refused(r, token)
    else:
        # longer than aiohttp's limit for one header line (8190 bytes): its parser
        # refuses the request (400) before any handler, so it is never read as a token
        assert r.status_code in (400, 431), r.status_code
    healthy(guarded)


@pytest.mark.parametrize("token", [b"\xe9.\xfc.\xdf", b"\xff", b"eyJ.eyJ\x80.sig"],
                         ids=["latin-1", "0xff", "stray continuation byte"])
def test_tokens_that_are_not_utf8_are_401(make_server: type[AnimServer], idp: Idp,
                                          tmp_path: Path, token: bytes) -> None:
    # a server of its own: a 500 here must not fail the tests after it
    jwks = write_jwks(tmp_path / "jwks.json", *idp.jwks()["keys"])
    srv = make_server(tmp_path / "data", args=["--config", str(_auth_toml(tmp_path, jwks))])
    srv.start()
    _refused(_send(srv, token), token)
    healthy(srv)


def test_the_guarded_server_still_takes_a_good_token(guarded: AnimServer, idp: Idp) -> None:
    r = _send(guarded, idp.token())
    assert r.status_code == 200, r.text
    healthy(guarded)
