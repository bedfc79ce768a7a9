"""HTTP authentication (issue 7, acceptance 2, 5 and 6): OAuth 2.0 bearer JWTs.

A real ``anim serve`` with ``[auth]`` on and two issuers whose keys are JWKS files;
tokens are minted here with real RSA and EC keys. Every kind of bad token is refused
with 401 (403 for a good token without the scope) and the body says nothing about it.
Then HTTPS with a trustme CA, and refusing to start unprotected on 0.0.0.0.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydicom import dcmread

from tests.conftest import ROOT, AnimServer, sample_files

pytestmark = pytest.mark.integration

ISSUER = "https://idp.example.test/realms/anim"
ISSUER2 = "https://idp2.example.test"
AUDIENCE = "anim-archive"
SUBJECT = "subject-7f3a9c"  # distinctive: must never show up in a body or the log
INSTITUTION = "HOSPITAL-ZEBRA"
INVALID = {"status": 401, "reason": "invalid token"}
TIMEOUT = 60


# ---- an identity provider in miniature ---------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict[str, Any]) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str,
               alg: str) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if alg.startswith(("RS", "PS")) \
        else jwt.algorithms.ECAlgorithm
    jwk: dict[str, Any] = algo.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def write_jwks(path: Path, *jwks: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"keys": list(jwks)}), encoding="utf-8")
    return path


@dataclass
class Idp:
    """Keys and token minting for the tests (issuer 1: RSA + EC; issuer 2: EC only)."""

    rsa_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    ec_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    ec2_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def jwks(self) -> dict[str, Any]:
        return {"keys": [public_jwk(self.rsa_key, "rsa-1", "RS256"),
                         public_jwk(self.ec_key, "ec-1", "ES256")]}

    def jwks2(self) -> dict[str, Any]:
        return {"keys": [public_jwk(self.ec2_key, "idp2-ec", "ES256")]}

    @staticmethod
    def claims(scope: str = "anim.read", **over: Any) -> dict[str, Any]:
        now = int(time.time())
        c = {"iss": ISSUER, "aud": AUDIENCE, "sub": SUBJECT, "institution": INSTITUTION,
             "scope": scope, "iat": now, "exp": now + 600}
        c.update(over)
        return {k: v for k, v in c.items() if v is not None}

    def token(self, claims: dict[str, Any] | None = None, *, key: Any = None,
              kid: str | None = "rsa-1", alg: str = "RS256") -> str:
        headers = {"kid": kid} if kid is not None else {}
        return jwt.encode(claims or self.claims(), key or self.rsa_key, algorithm=alg,
                          headers=headers)

    def public_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def alg_none(self) -> str:
        # crafted by hand: PyJWT would never produce an unsigned token with a kid
        return f'{segment({"alg": "none", "typ": "JWT", "kid": "rsa-1"})}.' \
               f'{segment(self.claims())}.'

    def hs256_with_public_key(self) -> str:
        # algorithm confusion: HMAC keyed with the issuer's public key, which anyone has
        signing_input = f'{segment({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"})}.' \
                        f'{segment(self.claims())}'
        mac = hmac.new(self.public_pem(), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"


def auth_toml(path: Path, jwks: Path, jwks2: Path, extra: str = "") -> Path:
    path.write_text(f"""
[auth]
enabled = true

[auth.issuers.idp]
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
jwks_file = "{jwks}"

[auth.issuers.idp2]
issuer = "{ISSUER2}"
audience = "{AUDIENCE}"
jwks_file = "{jwks2}"
algorithms = ["ES256"]
{extra}""", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def idp() -> Idp:
    return Idp()


@pytest.fixture(scope="module")
def server(idp: Idp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnimServer]:
    tmp = tmp_path_factory.mktemp("auth")
    jwks = write_jwks(tmp / "jwks.json", *idp.jwks()["keys"])
    jwks2 = write_jwks(tmp / "jwks2.json", *idp.jwks2()["keys"])
    srv = AnimServer(tmp / "data", args=["--config", str(auth_toml(tmp / "anim.toml", jwks,
                                                                   jwks2))]).start()
    yield srv
    srv.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def get(srv: AnimServer, path: str, token: str | None = None,
        **headers: str) -> requests.Response:
    h = {**(bearer(token) if token is not None else {}), **headers}
    return requests.get(f"{srv.url}{path}", headers=h, timeout=TIMEOUT)


def dw_client(srv: AnimServer, token: str) -> Any:
    from dicomweb_client import DICOMwebClient

    return DICOMwebClient(url=f"{srv.url}/dicom-web", headers=bearer(token))


def assert_nothing_leaked(r: requests.Response, *secrets: str) -> None:
    blob = r.text + json.dumps(dict(r.headers))
    for s in (SUBJECT, INSTITUTION, *secrets):
        if len(s) >= 8:  # "a.b.c" has pieces found in any text
            assert s not in blob


# ---- good tokens -----------------------------------------------------------------------


def test_a_write_token_stores_and_a_read_token_finds(server: AnimServer, idp: Idp) -> None:
    ds = dcmread(sample_files()[0])
    writer = dw_client(server, idp.token(idp.claims(scope="anim.write")))
    writer.store_instances(datasets=[ds])
    reader = dw_client(server, idp.token())
    found = reader.search_for_studies()
    assert [s["0020000D"]["Value"][0] for s in found] == [ds.StudyInstanceUID]
    r = get(server, "/dicom-web/studies", idp.token())
    assert r.status_code == 200
    assert r.json()[0]["0020000D"]["Value"][0] == ds.StudyInstanceUID


@pytest.mark.parametrize("how", ["ec-key", "scp-list", "second-issuer", "lowercase-scheme"])
def test_other_good_tokens(server: AnimServer, idp: Idp, how: str) -> None:
    headers: dict[str, str]
    if how == "ec-key":
        headers = bearer(idp.token(key=idp.ec_key, kid="ec-1", alg="ES256"))
    elif how == "scp-list":
        claims = idp.claims(scope=None, scp=["openid", "anim.read"])
        headers = bearer(idp.token(claims))
    elif how == "second-issuer":
        headers = bearer(idp.token(idp.claims(iss=ISSUER2), key=idp.ec2_key, kid="idp2-ec",
                                   alg="ES256"))
    else:
        headers = {"Authorization": f"bearer {idp.token()}"}  # RFC 7235: case-insensitive
    r = requests.get(f"{server.url}/dicom-web/studies", headers=headers, timeout=TIMEOUT)
    assert r.status_code == 200, r.text


def test_clock_skew_within_leeway_is_accepted(server: AnimServer, idp: Idp) -> None:
    now = int(time.time())
    r = get(server, "/dicom-web/studies", idp.token(idp.claims(exp=now - 5, nbf=now + 5)))
    assert r.status_code == 200


# ---- bad tokens: 401 invalid_token, nothing in the body -----------------------------------


def bad_tokens(idp: Idp) -> dict[str, str]:
    now = int(time.time())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "bad signature (another key, same kid)": idp.token(key=other),
        "tampered payload": (lambda t: ".".join(
            [t.split(".")[0], segment(idp.claims(scope="anim.admin")), t.split(".")[2]]))(
            idp.token()),
        "another issuer": idp.token(idp.claims(iss="https://evil.example.test")),
        "another audience": idp.token(idp.claims(aud="someone-else")),
        "expired": idp.token(idp.claims(exp=now - 120)),
        "not yet valid": idp.token(idp.claims(nbf=now + 300)),
        "no exp": idp.token(idp.claims(exp=None)),
        "no sub": idp.token(idp.claims(sub=None)),
        "alg none": idp.alg_none(),
        "HS256 keyed with the public key": idp.hs256_with_public_key(),
        "unknown kid": idp.token(kid="rsa-2"),
        "RS256 under the EC key's kid": idp.token(kid="ec-1"),
        "ES256 under the RSA key's kid": idp.token(key=idp.ec_key, kid="rsa-1", alg="ES256"),
        "PS256, not an allowed algorithm": idp.token(alg="PS256"),
        "issuer 2 claimed, issuer 1's key": idp.token(idp.claims(iss=ISSUER2)),
        "issuer 2's key, issuer 1 claimed": idp.token(key=idp.ec2_key, kid="idp2-ec",
                                                      alg="ES256"),
        "malformed abc": "abc",
        "malformed a.b.c": "a.b.c",
        "malformed not base64": "!!!.@@@.###",
        "malformed header json": f"{b64url(b'{not json')}.{segment(idp.claims())}.c2ln",
        "malformed payload not an object": f'{segment({"alg": "RS256", "kid": "rsa-1"})}.'
                                           f'{b64url(b"[1,2]")}.c2ln',
        "empty": "",
    }


def _bad_names() -> list[str]:
    # the case names, without minting keys at collection time
    return ["bad signature (another key, same kid)", "tampered payload", "another issuer",
            "another audience", "expired", "not yet valid", "no exp", "no sub", "alg none",
            "HS256 keyed with the public key", "unknown kid", "RS256 under the EC key's kid",
            "ES256 under the RSA key's kid", "PS256, not an allowed algorithm",
            "issuer 2 claimed, issuer 1's key", "issuer 2's key, issuer 1 claimed",
            "malformed abc", "malformed a.b.c", "malformed not base64",
            "malformed header json", "malformed payload not an object", "empty"]


@pytest.fixture(scope="module")
def tokens(idp: Idp) -> dict[str, str]:
    t = bad_tokens(idp)
    assert sorted(t) == sorted(_bad_names())
    return t


@pytest.mark.parametrize("case", _bad_names())
def test_bad_tokens_are_refused_and_nothing_leaks(server: AnimServer, tokens: dict[str, str],
                                                  case: str) -> None:
    token = tokens[case]
    r = get(server, "/dicom-web/studies", token)
    assert r.status_code == 401, (case, r.text)
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="anim", error="invalid_token"'
    assert r.json() == INVALID
    assert_nothing_leaked(r, token, *token.split(".")[:2])
    # the log has the reason, never the token or its subject
    if len(token) >= 8:
        assert token not in server.log
    assert SUBJECT not in server.log


def test_bad_tokens_through_dicomweb_client(server: AnimServer, tokens: dict[str, str]) -> None:
    for case in ("alg none", "expired", "another audience", "malformed a.b.c"):
        with pytest.raises(requests.HTTPError) as err:
            dw_client(server, tokens[case]).search_for_studies()
        assert err.value.response.status_code == 401, case


def test_missing_or_foreign_credentials(server: AnimServer) -> None:
    for headers in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer"}):
        r = requests.get(f"{server.url}/dicom-web/studies", headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401, headers
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="anim"')
    r = get(server, "/dicom-web/studies")
    # RFC 6750 3.1: no error code when the request carried no credentials
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="anim"'
    assert r.json()["status"] == 401


@pytest.mark.parametrize("path", ["/api/admin/summary", "/api/ui-config", "/hcm/changes",
                                  "/fhir/ImagingStudy", "/fhir/metadata", "/nope",
                                  "/dicom-web/studies/1.2.3/metadata"])
def test_every_api_needs_a_token(server: AnimServer, path: str) -> None:
    r = get(server, path)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="anim"'


def test_plain_options_needs_a_token_a_preflight_does_not(server: AnimServer) -> None:
    r = requests.options(f"{server.url}/dicom-web", timeout=TIMEOUT)
    assert r.status_code == 401
    pre = requests.options(f"{server.url}/dicom-web/studies", timeout=TIMEOUT, headers={
        "Origin": "https://viewer.example.test", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 204
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"]
    # a browser viewer must be allowed to read the 401 to know it should log in
    r = get(server, "/dicom-web/studies", Origin="https://viewer.example.test")
    assert r.status_code == 401
    assert r.headers["Access-Control-Allow-Origin"] == "*"


def test_dot_segments_cannot_reach_a_protected_route_through_static(
        server: AnimServer) -> None:
    for path in ("/static/../api/admin/summary", "/static/%2e%2e/api/admin/summary",
                 "/static/..%2fapi/admin/summary", "/static/%2e%2e%2fapi%2fadmin%2fsummary"):
        conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=TIMEOUT)
        try:
            conn.request("GET", path)  # sent as is: no client-side normalisation
            resp = conn.getresponse()
            body = resp.read().decode()
        finally:
            conn.close()
        assert resp.status in (401, 403, 404), (path, resp.status)
        assert "instances" not in body


# ---- scopes: 403 insufficient_scope -----------------------------------------------------


def test_a_read_token_may_not_store_or_administer(server: AnimServer, idp: Idp) -> None:
    token = idp.token()
    r = requests.post(f"{server.url}/dicom-web/studies", headers={
        **bearer(token), "Content-Type": 'multipart/related; type="application/dicom"; '
                                        'boundary=x'}, data=b"--x--\r\n", timeout=TIMEOUT)
    assert r.status_code == 403
    assert r.headers["WWW-Authenticate"] == \
        'Bearer realm="anim", error="insufficient_scope", scope="anim.write"'
    assert r.json() == {"status": 403, "reason": "insufficient scope"}
    assert_nothing_leaked(r, token)
    with pytest.raises(requests.HTTPError) as err:
        dw_client(server, token).store_instances(datasets=[dcmread(sample_files()[0])])
    assert err.value.response.status_code == 403

    r = get(server, "/api/admin/summary", token)
    assert r.status_code == 403
    assert 'scope="anim.admin"' in r.headers["WWW-Authenticate"]
    assert get(server, "/api/admin/summary", idp.token(idp.claims("anim.admin"))).status_code \
        == 200


def test_delete_needs_admin(server: AnimServer, idp: Idp) -> None:
    writer = idp.token(idp.claims("anim.read anim.write"))
    r = requests.delete(f"{server.url}/api/admin/studies/1.2.3", headers=bearer(writer),
                        timeout=TIMEOUT)
    assert r.status_code == 403


def test_a_write_only_token_may_not_read(server: AnimServer, idp: Idp) -> None:
    r = get(server, "/dicom-web/studies", idp.token(idp.claims("anim.write")))
    assert r.status_code == 403
    assert 'scope="anim.read"' in r.headers["WWW-Authenticate"]


def test_a_token_without_institution_is_forbidden(server: AnimServer, idp: Idp) -> None:
    token = idp.token(idp.claims(institution=None))
    r = get(server, "/dicom-web/studies", token)
    assert r.status_code == 403
    assert_nothing_leaked(r, token)
    for empty in ("", ["HOSPITAL-ZEBRA"]):
        assert get(server, "/dicom-web/studies",
                   idp.token(idp.claims(institution=empty))).status_code == 403


# ---- public resources and headers ------------------------------------------------------


def test_health_version_and_the_page_need_no_token(server: AnimServer) -> None:
    assert get(server, "/health").status_code == 200
    assert get(server, "/version").status_code == 200
    page = get(server, "/")
    assert page.status_code == 200
    assert "<html" in page.text.lower()
    assert "Content-Security-Policy" in page.headers
    for asset in ("/static/app.js", "/static/app.css", "/static/favicon.svg"):
        assert get(server, asset).status_code == 200, asset


def test_security_headers_once_and_no_hsts_over_http(server: AnimServer) -> None:
    for path in ("/", "/health", "/static/app.js", "/dicom-web/studies"):
        r = get(server, path)
        assert r.headers["X-Content-Type-Options"] == "nosniff", path  # not duplicated
        assert r.headers["Referrer-Policy"] == "no-referrer", path
        assert "Strict-Transport-Security" not in r.headers


# ---- HTTPS (needs cli.py to pass web.tls.server_ssl_context to TCPSite) -----------------


def test_https_with_a_trusted_ca(make_server: type[AnimServer], tmp_path: Path) -> None:
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(cert_pem), append=i > 0)
    cfg = tmp_path / "tls.toml"
    cfg.write_text(f'[web]\ntls_cert = "{cert_pem}"\ntls_key = "{key_pem}"\n',
                   encoding="utf-8")
    srv = make_server(tmp_path / "data", args=["--config", str(cfg)]).start()
    https = f"https://127.0.0.1:{srv.http_port}"
    r = requests.get(f"{https}/health", verify=str(ca_pem), timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Strict-Transport-Security"].startswith("max-age=")
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{https}/health", timeout=TIMEOUT)  # a CA the client does not trust
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{srv.http_port}/health", timeout=TIMEOUT)


# ---- refusing to start unprotected (needs cli.py to call web.auth.check_bind) -----------


def test_serve_on_all_interfaces_without_auth_refuses_to_start(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "anim", "serve", "--data", str(tmp_path / "data"),
           "--host", "0.0.0.0", "--dimse-port", "0", "--http-port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    said: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            said.append(line)
            if "ready:" in line:  # it started on every interface: stop it at once
                proc.terminate()
                pytest.fail("anim serve --host 0.0.0.0 without [auth] started")
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code != 0
    text = "".join(said)
    assert "without authentication" in text
    assert "allow_unauthenticated_remote" in text


def test_refused_tokens_and_scopes_are_in_the_audit_trail(server: AnimServer, idp: Idp) -> None:
    from tests.integration.test_tenancy import trail_rows

    marker = "/dicom-web/studies/1.2.3.999.4242/metadata"
    assert get(server, marker, "a.b.c").status_code == 401
    assert get(server, marker, idp.alg_none()).status_code == 401
    read_only = idp.token(idp.claims(scope="anim.read"))
    r = requests.get(f"{server.url}/api/admin/summary", headers=bearer(read_only),
                     timeout=TIMEOUT)
    assert r.status_code == 403
    logins = trail_rows(server, lambda r: r["action"] == "login" and marker in r["detail"], 2)
    assert len(logins) == 2
    assert all((r["outcome"], r["reason"], r["who"]) == ("failure", "HTTP 401",
                                                         "(invalid token)") for r in logins)
    assert SUBJECT not in str(logins)
    scoped = trail_rows(server, lambda r: r["action"] == "login" and r["reason"] == "HTTP 403"
                        and r["detail"] == "GET /api/admin/summary", 1)
    assert [(r["who"], r["institution"]) for r in scoped][:1] == [(SUBJECT, INSTITUTION)]
