"""Who is calling over HTTP: OAuth 2.0 bearer tokens (JWT) or, without [auth], the operator.

With ``[auth] enabled`` every request but the public ones (``/health``,
``/health/live``, ``/health/ready``, ``/version``, the web page and its static files,
CORS preflights) carries ``Authorization: Bearer <JWT>`` (RFC 6750); ``/metrics``
needs the admin scope. The token is a JWT access token (RFC 9068) from one of the
configured issuers: the unverified ``iss`` picks the issuer, ``kid`` picks its key from
that issuer's JWKS (a file, reloaded when it changes, or a URL, cached), and PyJWT
verifies the signature with the issuer's configured algorithms only (never the
header's: no ``alg: none``, no HS256 signed with the public key), then ``exp``,
``nbf``, ``iss`` and ``aud``. Scopes (``scope`` or ``scp``) grant actions; the
institution claim names the caller's tenant.

Refusals follow RFC 6750 3.1: 401 without an error code when no token came, 401
``invalid_token`` for any bad token, 403 ``insufficient_scope`` for a good token without
the scope the request needs. Bodies say only that much; the specific reason goes to
the log, never the token or its claims.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web

from anim.config import AuthConfig, Config, TokenIssuer
from anim.security import LOCAL, Action, Principal
from web import health, ui
from web.errors import error_response
from web.keys import archive_key, run_sync

log = logging.getLogger(__name__)

PRINCIPAL = "principal"  # request[PRINCIPAL]: the Principal of every request
LEEWAY = 30  # seconds of clock skew allowed on exp and nbf
REALM = 'Bearer realm="anim"'
_PUBLIC_HANDLERS: frozenset[Callable[..., Any]] = frozenset(
    {health.health, health.live, health.ready, health.version, ui.index})

# ---- which requests need what ----------------------------------------------------------


def required_action(request: web.BaseRequest) -> Action:
    """The action a request needs. Anything not listed needs ADMIN (least privilege:
    a new kind of request must be added here on purpose)."""
    path, method = request.path, request.method
    if (method == "DELETE" or path in ("/api/admin", "/metrics")
            or path.startswith("/api/admin/")):
        return Action.ADMIN
    if method in ("GET", "HEAD", "OPTIONS"):  # plain OPTIONS: capabilities (PS3.18 8.9)
        return Action.READ
    if method == "POST" and (path == "/dicom-web/studies"
                             or path.startswith("/dicom-web/studies/")):
        return Action.WRITE  # STOW-RS (PS3.18 10.5)
    return Action.ADMIN


def is_public(request: web.Request) -> bool:
    """Decided on the route the router matched, not on the path string, so no spelling
    of a path can reach a protected handler through a public prefix."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return True  # a CORS preflight never carries credentials (Fetch standard)
    route = request.match_info.route
    return (route.handler in _PUBLIC_HANDLERS
            or isinstance(route.resource, web.StaticResource))


def principal_for_unauthenticated(cfg: Config) -> Principal:
    """The caller of a request when [auth] is off: the local operator."""
    return LOCAL


def actions_from_claims(claims: dict[str, Any], auth: AuthConfig) -> frozenset[Action]:
    """``scope`` is a space-separated string (RFC 8693 4.2, RFC 9068 2.2.3); some issuers
    send ``scp`` instead, as a list or a string."""
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            scopes.update(value.split())
        elif isinstance(value, list):
            scopes.update(v for v in value if isinstance(v, str))
    grants = {auth.read_scope: Action.READ, auth.write_scope: Action.WRITE,
              auth.admin_scope: Action.ADMIN}
    return frozenset(action for scope, action in grants.items() if scope in scopes)


# ---- signing keys ----------------------------------------------------------------------


class TokenRefused(Exception):
    """The token is not acceptable; the message is for the log only."""


class NoInstitution(Exception):
    """A valid token that names no institution: it cannot be given a tenant."""


class KeysUnavailable(Exception):
    """The issuer's keys cannot be read now (file missing, JWKS URL down)."""


def _pick(keys: Iterable[jwt.PyJWK], kid: str | None) -> jwt.PyJWK:
    signing = [k for k in keys if k.public_key_use in ("sig", None)]
    if kid is None:
        # RFC 7515 4.1.4: kid is optional; without it only a single key is unambiguous
        if len(signing) == 1:
            return signing[0]
        raise TokenRefused("no kid and several keys")
    for k in signing:
        if k.key_id == kid:
            return k
    raise TokenRefused("no key for the token's kid")


class JwksFile:
    """A JWKS file, read once and again whenever its mtime or size changes (key
    rotation without a restart). A half-written file keeps the previous keys."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys: jwt.PyJWKSet | None = None

    def keys(self) -> jwt.PyJWKSet:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise KeysUnavailable(f"JWKS file {self.path}: {e.strerror}") from None
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._keys = jwt.PyJWKSet.from_json(self.path.read_text(encoding="utf-8"))
                    self._stamp = stamp
                except (OSError, ValueError, jwt.PyJWTError) as e:
                    log.warning("JWKS file %s unreadable (%s); keeping the previous keys",
                                self.path, type(e).__name__)
            if self._keys is None:
                raise KeysUnavailable(f"JWKS file {self.path} has no usable keys")
            return self._keys

    def signing_key(self, kid: str | None) -> jwt.PyJWK:
        return _pick(self.keys().keys, kid)


class JwksUrl:
    """A JWKS URL: PyJWKClient caches the set for 5 minutes and refetches for an unknown
    kid at most every 30 s, so forged kids cannot make us hammer the issuer."""

    def __init__(self, url: str) -> None:
        self.client = jwt.PyJWKClient(url, cache_jwk_set=True, lifespan=300,
                                      timeout=10, cooldown_duration=30)

    def signing_key(self, kid: str | None) -> jwt.PyJWK:
        try:
            if kid is None:
                return _pick(self.client.get_signing_keys(), None)
            return self.client.get_signing_key(kid)
        except (jwt.PyJWKClientConnectionError, jwt.PyJWKSetError) as e:
            raise KeysUnavailable(f"JWKS {self.client.uri}: {type(e).__name__}") from None
        except jwt.PyJWKClientError:
            raise TokenRefused("no key for the token's kid") from None


# ---- validation ------------------------------------------------------------------------

_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidSignatureError, "bad signature"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidKeyError, "key does not fit the algorithm"),
    (jwt.DecodeError, "malformed"),
)


def _reason(e: jwt.PyJWTError) -> str:
    # our own words only: library messages may quote token contents (kid, alg, claims)
    if isinstance(e, jwt.MissingRequiredClaimError):
        return f"missing claim {e.claim}"  # one of the names we require
    return next((r for cls, r in _REASONS if isinstance(e, cls)), type(e).__name__)


class TokenValidator:
    """Validates bearer tokens against the configured issuers (thread-safe; blocking)."""

    def __init__(self, auth: AuthConfig) -> None:
        self.auth = auth
        self.issuers: dict[str, tuple[TokenIssuer, JwksFile | JwksUrl]] = {
            i.issuer: (i, JwksFile(i.jwks_file) if i.jwks_file else JwksUrl(i.jwks_url))
            for i in auth.issuers}

    def validate(self, token: str, address: str = "") -> Principal:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
            issuer, keys = self.issuers[unverified.get("iss")]
        except (jwt.PyJWTError, KeyError, TypeError) as e:
            raise TokenRefused("unknown issuer" if isinstance(e, (KeyError, TypeError))
                               else _reason(e)) from None
        alg, kid = header.get("alg"), header.get("kid")
        # the issuer's list, never the header's choice (RFC 8725 3.1); checked before
        # any key lookup so junk tokens cannot trigger JWKS fetches
        if alg not in issuer.algorithms:
            raise TokenRefused("algorithm not allowed")
        if kid is not None and not isinstance(kid, str):
            raise TokenRefused("malformed kid")
        key = keys.signing_key(kid)
        try:
            # a PyJWK, not its bare key: PyJWT then also requires the header's alg to be
            # the key's own (its "alg", or the default for its type and curve)
            claims = jwt.decode(
                token, key=key, algorithms=list(issuer.algorithms),
                audience=issuer.audience, issuer=issuer.issuer, leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.PyJWTError as e:
            raise TokenRefused(_reason(e)) from None
        institution = claims.get(self.auth.institution_claim)
        if not isinstance(institution, str) or not institution:
            raise NoInstitution(f"no {self.auth.institution_claim!r} claim")
        return Principal(kind="token", subject=str(claims["sub"]), institution=institution,
                         address=address, actions=actions_from_claims(claims, self.auth))


# ---- the middleware --------------------------------------------------------------------

validator_key = web.AppKey("token_validator", TokenValidator)


def _refuse(status: int, reason: str, challenge: str) -> web.Response:
    return error_response(status, reason, headers={"WWW-Authenticate": challenge})


def _bearer(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.strip().partition(" ")
    # RFC 7235 2.1: the scheme name is case-insensitive
    return token.strip() if scheme.lower() == "bearer" else None


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    cfg = request.app[archive_key].cfg
    if not cfg.auth.enabled:
        request[PRINCIPAL] = principal_for_unauthenticated(cfg)
        return await handler(request)
    if is_public(request):
        return await handler(request)
    token = _bearer(request)
    if token is None:
        # RFC 6750 3.1: no credentials at all -> no error code
        return _refuse(401, "authentication required", REALM)
    address = request.remote or ""
    invalid = f'{REALM}, error="invalid_token"'
    try:
        principal = await run_sync(request, request.app[validator_key].validate, token, address)
    except (TokenRefused, UnicodeError) as e:  # UnicodeError: a token that is not ASCII
        log.info("HTTP %s %s from %s: token refused: %s", request.method, request.path,
                 address, e)
        return _refuse(401, "invalid token", invalid)
    except NoInstitution as e:
        log.info("HTTP %s %s from %s: token refused: %s", request.method, request.path,
                 address, e)
        return _refuse(403, "the token names no institution", REALM)
    except KeysUnavailable as e:
        log.warning("cannot verify tokens: %s", e)
        return error_response(503, "token keys unavailable; try again later")
    # known from here on, refused or not: the audit trail names who was refused
    request[PRINCIPAL] = principal
    need = required_action(request)
    if not principal.may(need):
        log.info("HTTP %s %s from %s: token lacks the %s scope", request.method,
                 request.path, address, need.value)
        scope = {Action.READ: cfg.auth.read_scope, Action.WRITE: cfg.auth.write_scope,
                 Action.ADMIN: cfg.auth.admin_scope}[need]
        return _refuse(403, "insufficient scope",
                       f'{REALM}, error="insufficient_scope", scope="{scope}"')
    revoked = await run_sync(request, request.app[archive_key].index.revoked_institutions)
    if principal.institution in revoked:
        # compromise containment: every token of a revoked institution is refused
        log.info("HTTP %s %s from %s: the token's institution is revoked", request.method,
                 request.path, address)
        return _refuse(403, "access revoked", f'{REALM}, error="invalid_token"')
    request[PRINCIPAL] = principal
    return await handler(request)


def principal_of(request: web.Request) -> Principal:
    """The caller of *request*, set by :func:`auth_middleware`."""
    principal: Principal = request[PRINCIPAL]
    return principal


# ---- response headers ------------------------------------------------------------------

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
HSTS = "max-age=31536000"  # one year (RFC 6797); only meaningful over TLS


async def security_headers(request: web.Request, resp: web.StreamResponse) -> None:
    # the web page sets its own (CSP, frame options, the same two): left as they are
    for name, value in SECURITY_HEADERS.items():
        if name not in resp.headers:
            resp.headers[name] = value
    if request.secure and "Strict-Transport-Security" not in resp.headers:
        resp.headers["Strict-Transport-Security"] = HSTS


def setup(app: web.Application, cfg: Config) -> None:
    """Add the token validator and the security headers (the middleware is listed in
    create_app, first, so that it guards everything after it)."""
    app[validator_key] = TokenValidator(cfg.auth)
    app.on_response_prepare.append(security_headers)


# ---- refusing to start unprotected -----------------------------------------------------


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name or a wildcard ("", "0.0.0.0", "::"): reachable from outside


def check_bind(cfg: Config) -> str | None:
    """Why the servers must not start as configured, or None. Without authentication the
    archive is open to anyone who can reach it: that is allowed on loopback only,
    unless [auth] allow_unauthenticated_remote says otherwise."""
    if cfg.auth.enabled or cfg.auth.allow_unauthenticated_remote:
        return None
    exposed = [f"{what} on {host or '*'}" for what, host in
               (("HTTP", cfg.web.host), ("DIMSE", cfg.dimse.host)) if not is_loopback(host)]
    if not exposed:
        return None
    return (f"refusing to listen ({', '.join(exposed)}) without authentication: enable "
            "[auth] with token issuers, bind to 127.0.0.1, or set [auth] "
            "allow_unauthenticated_remote = true")
