"""web.auth and web.tls without a server: the action table, check_bind, JWKS reload,
scopes, the validator's refusals, the TLS context."""

from __future__ import annotations

import dataclasses
import json
import os
import ssl
import time
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from anim.config import AuthConfig, Config, DimseConfig, TokenIssuer, WebConfig
from anim.errors import ConfigError
from anim.security import Action
from tests.integration.test_http_auth import (
    AUDIENCE,
    INSTITUTION,
    ISSUER,
    SUBJECT,
    Idp,
    public_jwk,
    write_jwks,
)
from web.auth import (
    JwksFile,
    KeysUnavailable,
    NoInstitution,
    TokenRefused,
    TokenValidator,
    actions_from_claims,
    check_bind,
    is_loopback,
    required_action,
)
from web.tls import server_ssl_context


@pytest.fixture(scope="module")
def idp() -> Idp:
    return Idp()


# ---- required_action ---------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "action"), [
    ("GET", "/dicom-web/studies", Action.READ),
    ("HEAD", "/dicom-web/studies", Action.READ),
    ("GET", "/dicom-web/studies/1.2/series/3.4/instances/5.6/frames/1", Action.READ),
    ("OPTIONS", "/dicom-web", Action.READ),
    ("GET", "/hcm/changes", Action.READ),
    ("GET", "/hcm/studies/1.2/manifest", Action.READ),
    ("GET", "/fhir/ImagingStudy", Action.READ),
    ("GET", "/api/ui-config", Action.READ),
    ("POST", "/dicom-web/studies", Action.WRITE),
    ("POST", "/dicom-web/studies/1.2", Action.WRITE),
    ("GET", "/api/admin/summary", Action.ADMIN),
    ("GET", "/api/admin/webhooks", Action.ADMIN),
    ("DELETE", "/api/admin/studies/1.2", Action.ADMIN),
    ("DELETE", "/dicom-web/studies/1.2", Action.ADMIN),
    # anything else: least privilege
    ("POST", "/fhir/ImagingStudy", Action.ADMIN),
    ("PUT", "/dicom-web/studies/1.2", Action.ADMIN),
    ("POST", "/dicom-web/studiesX", Action.ADMIN),
    ("POST", "/api/admin/studies", Action.ADMIN),
])
def test_required_action(method: str, path: str, action: Action) -> None:
    assert required_action(make_mocked_request(method, path)) is action


# ---- check_bind --------------------------------------------------------------------------


def _cfg(http: str = "127.0.0.1", dimse: str = "127.0.0.1", enabled: bool = False,
         override: bool = False) -> Config:
    return Config(web=WebConfig(host=http), dimse=DimseConfig(host=dimse),
                  auth=AuthConfig(enabled=enabled, allow_unauthenticated_remote=override))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost",
                                  "LOCALHOST"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)
    assert check_bind(_cfg(host, host)) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "192.168.0.7",
                                  "archive.example.org", "2001:db8::1"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_check_bind() -> None:
    why = check_bind(_cfg("0.0.0.0"))
    assert why is not None
    assert "HTTP on 0.0.0.0" in why
    assert "DIMSE" not in why
    assert "without authentication" in why
    assert "allow_unauthenticated_remote" in why
    assert "DIMSE on 10.0.0.5" in (check_bind(_cfg(dimse="10.0.0.5")) or "")
    assert "HTTP on *" in (check_bind(_cfg(http="")) or "")
    assert check_bind(_cfg("0.0.0.0", "0.0.0.0", enabled=True)) is None
    assert check_bind(_cfg("0.0.0.0", "0.0.0.0", override=True)) is None


# ---- JWKS file ---------------------------------------------------------------------------


def test_jwks_file_is_reloaded_when_it_changes(idp: Idp, tmp_path: Path) -> None:
    path = write_jwks(tmp_path / "jwks.json", public_jwk(idp.rsa_key, "k1", "RS256"))
    keys = JwksFile(path)
    assert keys.signing_key("k1").key_id == "k1"
    assert keys.signing_key(None).key_id == "k1"  # the only key: kid may be omitted
    with pytest.raises(TokenRefused):
        keys.signing_key("k2")

    # rotation: a new key replaces the old one, without a restart
    write_jwks(path, public_jwk(idp.ec_key, "k2", "ES256"),
               public_jwk(idp.ec2_key, "k3", "ES256"))
    future = time.time() + 5
    os.utime(path, (future, future))  # a different mtime even on a coarse clock
    assert keys.signing_key("k2").key_id == "k2"
    with pytest.raises(TokenRefused):
        keys.signing_key("k1")
    with pytest.raises(TokenRefused):
        keys.signing_key(None)  # two keys: ambiguous without a kid

    # a half-written file keeps the previous keys
    path.write_text('{"keys": [', encoding="utf-8")
    os.utime(path, (future + 5, future + 5))
    assert keys.signing_key("k3").key_id == "k3"

    path.unlink()
    with pytest.raises(KeysUnavailable):
        keys.signing_key("k3")


def test_jwks_file_unreadable_from_the_start(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": []}), encoding="utf-8")
    with pytest.raises(KeysUnavailable):
        JwksFile(path).signing_key("k1")


def test_jwks_file_skips_encryption_keys(idp: Idp, tmp_path: Path) -> None:
    enc = {**public_jwk(idp.rsa_key, "k1", "RS256"), "use": "enc"}
    path = write_jwks(tmp_path / "jwks.json", enc, public_jwk(idp.ec_key, "k2", "ES256"))
    with pytest.raises(TokenRefused):
        JwksFile(path).signing_key("k1")


# ---- scopes ------------------------------------------------------------------------------


@pytest.mark.parametrize(("claims", "actions"), [
    ({"scope": "openid anim.read"}, {Action.READ}),
    ({"scope": "anim.read anim.write anim.admin"}, set(Action)),
    ({"scp": ["anim.write"]}, {Action.WRITE}),
    ({"scp": "anim.admin profile"}, {Action.ADMIN}),
    ({"scope": "anim.readx anim"}, set()),
    ({"scope": ["anim.read"], "scp": 7}, {Action.READ}),
    ({}, set()),
])
def test_scopes_to_actions(claims: dict[str, object], actions: set[Action]) -> None:
    assert actions_from_claims(claims, AuthConfig()) == actions


def test_scope_names_come_from_the_config() -> None:
    auth = AuthConfig(read_scope="pacs:read", write_scope="pacs:write", admin_scope="root")
    assert actions_from_claims({"scope": "pacs:read root anim.write"}, auth) == \
        {Action.READ, Action.ADMIN}


# ---- the validator -----------------------------------------------------------------------


@pytest.fixture
def validator(idp: Idp, tmp_path: Path) -> TokenValidator:
    jwks = write_jwks(tmp_path / "jwks.json", *idp.jwks()["keys"])
    issuer = TokenIssuer(name="idp", issuer=ISSUER, audience=AUDIENCE, jwks_file=str(jwks))
    return TokenValidator(AuthConfig(enabled=True, issuers=(issuer,)))


def test_a_good_token_gives_a_principal(validator: TokenValidator, idp: Idp) -> None:
    p = validator.validate(idp.token(idp.claims("anim.read anim.write")), "10.0.0.9")
    assert (p.kind, p.subject, p.institution, p.address) == \
        ("token", SUBJECT, INSTITUTION, "10.0.0.9")
    assert p.actions == {Action.READ, Action.WRITE}


def test_the_institution_claim_is_configurable(validator: TokenValidator, idp: Idp) -> None:
    v = TokenValidator(dataclasses.replace(validator.auth, institution_claim="org"))
    assert v.validate(idp.token(idp.claims(org="H2"))).institution == "H2"
    with pytest.raises(NoInstitution):
        v.validate(idp.token())


def test_refusals_never_carry_token_contents(validator: TokenValidator, idp: Idp) -> None:
    from tests.integration.test_http_auth import bad_tokens

    for case, token in bad_tokens(idp).items():
        with pytest.raises(TokenRefused) as err:
            validator.validate(token)
        reason = str(err.value)
        assert SUBJECT not in reason, case
        assert "rsa-" not in reason, case  # no kid echoed
        assert "ec-" not in reason, case


def test_unknown_issuer_without_keys_is_refused_before_any_lookup(tmp_path: Path,
                                                                  idp: Idp) -> None:
    issuer = TokenIssuer(name="idp", issuer=ISSUER, audience=AUDIENCE,
                         jwks_file=str(tmp_path / "missing.json"))
    v = TokenValidator(AuthConfig(enabled=True, issuers=(issuer,)))
    with pytest.raises(TokenRefused, match="unknown issuer"):
        v.validate(idp.token(idp.claims(iss="https://other.test")))
    with pytest.raises(TokenRefused, match="algorithm"):
        v.validate(idp.alg_none())
    with pytest.raises(KeysUnavailable):  # a good-looking token: the keys are missing
        v.validate(idp.token())


def test_jwks_url_issuer(idp: Idp) -> None:
    """A JWKS URL that cannot be reached is 'keys unavailable', not a refusal."""
    issuer = TokenIssuer(name="idp", issuer=ISSUER, audience=AUDIENCE,
                         jwks_url="http://127.0.0.1:9/jwks.json")  # discard port: refused
    v = TokenValidator(AuthConfig(enabled=True, issuers=(issuer,)))
    with pytest.raises(KeysUnavailable):
        v.validate(idp.token())


# ---- TLS ---------------------------------------------------------------------------------


def test_server_ssl_context(tmp_path: Path) -> None:
    import trustme
    assert server_ssl_context(WebConfig()) is None
    with pytest.raises(ConfigError, match="together"):
        server_ssl_context(WebConfig(tls_cert="cert.pem"))
    with pytest.raises(ConfigError, match="tls_cert"):
        server_ssl_context(WebConfig(tls_cert=str(tmp_path / "no.pem"),
                                     tls_key=str(tmp_path / "no.key")))
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ctx = server_ssl_context(WebConfig(tls_cert=str(tmp_path / "cert.pem"),
                                       tls_key=str(tmp_path / "key.pem")))
    assert ctx is not None
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert not ctx.check_hostname  # a server context
