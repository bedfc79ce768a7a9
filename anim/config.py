"""Configuration: defaults < TOML file < ``ANIM_<SECTION>_<KEY>`` environment < CLI flags.

The embedded default needs neither a file nor a variable: data under ``./anim-data``
(SQLite index + files), DIMSE on 11112 and HTTP on 8080, both on loopback.
Everything is validated once at load and frozen; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anim.errors import ConfigError

PERMISSIONS = ("store", "find", "move", "get")


@dataclass(frozen=True, slots=True)
class KnownAE:
    """A DICOM peer known by its AE title (a modality, a PACS, a move destination)."""

    title: str
    host: str = ""
    port: int = 104
    institution: str = ""
    permissions: frozenset[str] = frozenset(PERMISSIONS)
    destinations: frozenset[str] = frozenset()  # C-MOVE targets it may use; empty = any known

    @property
    def institution_name(self) -> str:
        return self.institution or self.title


STORAGE_BACKENDS = ("file", "s3")


@dataclass(frozen=True, slots=True)
class StorageConfig:
    data_dir: Path = Path("anim-data")
    blob_dir: Path | None = None  # default: <data_dir>/blobs
    # where blobs live: "file" (blob_dir) or "s3" (an S3-compatible object store)
    backend: str = "file"
    s3_endpoint: str = ""  # e.g. http://127.0.0.1:8333; empty: AWS's own endpoints
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_prefix: str = ""  # keys are <prefix><sha256>; lets one bucket hold several archives
    # credentials: here, or from the usual AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    s3_access_key: str = ""
    s3_secret_key: str = ""
    s3_addressing: str = "path"  # "path" (most on-premises stores) or "virtual"
    s3_part_size_mb: int = 16  # blobs larger than this go up as multipart uploads
    s3_max_connections: int = 32
    s3_create_bucket: bool = False  # create the bucket at start if it is missing

    @property
    def blobs(self) -> Path:
        return self.blob_dir if self.blob_dir is not None else self.data_dir / "blobs"


@dataclass(frozen=True, slots=True)
class IndexConfig:
    url: str = ""  # default: sqlite:///<data_dir>/index.sqlite
    batch_max: int = 64  # group commit: at most this many stores per transaction
    pool_size: int = 8
    # upgrade the schema at start; off: refuse to start on an old schema and let the
    # operator run `anim migrate` (several nodes, change windows; docs/deploy.md)
    auto_migrate: bool = True


@dataclass(frozen=True, slots=True)
class DimseConfig:
    host: str = "127.0.0.1"
    port: int = 11112
    aet: str = "ANIM"
    max_pdu: int = 0  # 0 = unlimited: fewer, larger P-DATA PDUs
    max_associations: int = 32  # per process (see workers)
    # processes accepting associations on the port (SO_REUSEPORT, Linux): 1 = this one;
    # more use more cores for parallel associations (scp/workers.py, docs/deploy.md)
    workers: int = 1
    max_associations_per_ae: int = 8  # at once from one calling AE title; 0 = no limit
    network_timeout: float = 60.0
    allow_unknown_callers: bool = True
    # a known AE with a host may only call from that address (docs/security.md)
    check_peer_address: bool = True
    # DICOM TLS (PS3.15 B.1/B.9): certificate and key make the port TLS-only;
    # tls_ca + tls_client_auth require client certificates signed by that CA
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    tls_client_auth: bool = False
    known_aes: tuple[KnownAE, ...] = ()

    def find_ae(self, title: str) -> KnownAE | None:
        for ae in self.known_aes:
            if ae.title == title:
                return ae
        return None


@dataclass(frozen=True, slots=True)
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # the archive's address as clients see it (behind a proxy): prefix of RetrieveURL
    # and BulkDataURI; empty = taken from each request's Host
    public_url: str = ""
    # origins a browser viewer may call from: comma-separated, "*" = any, "" = none
    cors_origins: str = "*"
    max_stow_bytes: int = 8 << 30  # one STOW-RS request body; above: 413
    qido_max_results: int = 1000  # a larger or absent limit is cut here, with a Warning
    institution: str = "DICOMweb"  # the institution STOW-RS stores are recorded under
    ohif_url: str = ""  # an OHIF viewer the web page links studies to; empty = no link
    tls_cert: str = ""  # HTTPS when both are set
    tls_key: str = ""
    rate_limit: float = 0.0  # requests per second per client (token or address); 0 = off
    rate_burst: int = 0  # requests a client may make at once; 0 = twice rate_limit
    # on SIGTERM, answer /health/ready with 503 this long before closing the listeners,
    # so a load balancer stops sending first (its check interval × fall; docs/deploy.md)
    drain_seconds: float = 0.0

    @property
    def origins(self) -> frozenset[str]:
        return frozenset(o.strip() for o in self.cors_origins.split(",") if o.strip())


WEBHOOK_EVENTS = ("study_stable", "study_updated", "study_deleted", "instance_created",
                  "instance_replaced", "instance_deleted", "instance_quarantined",
                  "patient_updated")


@dataclass(frozen=True, slots=True)
class Webhook:
    """An HCM endpoint notified of changes by a signed POST (docs/hcm.md)."""

    name: str
    url: str
    secret: str  # HMAC-SHA256 key; "whsec_<base64>" is decoded (Standard Webhooks)
    events: frozenset[str] = frozenset({"study_stable", "study_updated", "study_deleted"})
    timeout: float = 10.0  # seconds for one POST
    max_backoff: float = 300.0  # retry delays double from 1 s up to this


@dataclass(frozen=True, slots=True)
class HcmConfig:
    # a study is stable once no instance arrived, changed or went for this long
    stable_after: float = 60.0
    # store the study's KOS manifest in the archive (series "anim-manifest") each time
    # it becomes stable, so that WADO-RS and C-MOVE serve it like any instance
    store_manifest: bool = False
    # Retrieve AE Title put in manifests; empty = [dimse].aet
    retrieve_aet: str = ""
    webhooks: tuple[Webhook, ...] = ()


@dataclass(frozen=True, slots=True)
class TokenIssuer:
    """An OAuth 2.0 authorization server whose JWT access tokens the HTTP side accepts."""

    name: str
    issuer: str  # the tokens' "iss"
    audience: str  # their required "aud"
    jwks_file: str = ""  # its signing keys as a JWKS file, or
    jwks_url: str = ""  # its JWKS URL (fetched and cached)
    algorithms: tuple[str, ...] = ("RS256", "ES256")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """HTTP authentication (docs/security.md)."""

    enabled: bool = False  # require a bearer token on every HTTP request but /health
    institution_claim: str = "institution"  # the claim naming the caller's institution
    read_scope: str = "anim.read"
    write_scope: str = "anim.write"
    admin_scope: str = "anim.admin"
    # start without authentication on a non-loopback address anyway (explicit override)
    allow_unauthenticated_remote: bool = False
    issuers: tuple[TokenIssuer, ...] = ()


@dataclass(frozen=True, slots=True)
class InstitutionRule:
    """What an institution sees besides its own studies."""

    name: str
    sees: frozenset[str] = frozenset()  # other institutions whose studies it sees
    national: bool = False  # a national role: sees every study


@dataclass(frozen=True, slots=True)
class ShareRule:
    """An explicit sharing rule: one study, or a patient's studies, shown to others."""

    institutions: frozenset[str]
    study_uid: str = ""
    patient_id: str = ""
    issuer: str = ""


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    # each caller sees only its institution's studies (and what rules share with it)
    tenancy: bool = False
    institutions: tuple[InstitutionRule, ...] = ()
    shares: tuple[ShareRule, ...] = ()


@dataclass(frozen=True, slots=True)
class AuditConfig:
    enabled: bool = True
    # also send each record to an ATNA audit repository: udp://, tcp:// or tls://host:port
    # (RFC 5424 over RFC 5426 / 6587 / 5425), the message a DICOM audit message (PS3.15 A.5)
    syslog_url: str = ""


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "INFO"


@dataclass(frozen=True, slots=True)
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    dimse: DimseConfig = field(default_factory=DimseConfig)
    web: WebConfig = field(default_factory=WebConfig)
    hcm: HcmConfig = field(default_factory=HcmConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def index_url(self) -> str:
        if self.index.url:
            return self.index.url
        return f"sqlite:///{(self.storage.data_dir / 'index.sqlite').resolve()}"


_SECTIONS: dict[str, type] = {
    "storage": StorageConfig,
    "index": IndexConfig,
    "dimse": DimseConfig,
    "web": WebConfig,
    "hcm": HcmConfig,
    "auth": AuthConfig,
    "security": SecurityConfig,
    "audit": AuditConfig,
    "log": LogConfig,
}


def _check_aet(title: str, what: str) -> str:
    # PS3.8 9.3.2: AE titles are 1-16 characters of the default repertoire, no backslash
    t = title.strip()
    if not t or len(t) > 16 or "\\" in t or not t.isascii() or not t.isprintable():
        raise ConfigError(f"{what}: invalid AE title {title!r} (1-16 ASCII characters)")
    return t


def _check_port(port: Any, what: str) -> int:
    try:
        p = int(port)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: port must be an integer, got {port!r}") from None
    if not 0 <= p <= 65535:
        raise ConfigError(f"{what}: port {p} out of range 0-65535")
    return p


def parse_known_ae(spec: str) -> KnownAE:
    """Parse ``TITLE=HOST:PORT`` (the ``--known-ae`` flag) into a KnownAE."""
    title, sep, rest = spec.partition("=")
    host, sep2, port = rest.rpartition(":")
    if not sep or not sep2 or not host:
        raise ConfigError(f"--known-ae: expected TITLE=HOST:PORT, got {spec!r}")
    return KnownAE(
        title=_check_aet(title, "--known-ae"),
        host=host,
        port=_check_port(port, "--known-ae"),
    )


def _known_ae_from_table(title: str, table: Mapping[str, Any]) -> KnownAE:
    unknown = set(table) - {"host", "port", "institution", "permissions", "destinations"}
    if unknown:
        raise ConfigError(f"[dimse.known_aes.{title}]: unknown keys {sorted(unknown)}")
    perms = table.get("permissions", list(PERMISSIONS))
    if not isinstance(perms, list) or not set(perms) <= set(PERMISSIONS):
        raise ConfigError(
            f"[dimse.known_aes.{title}].permissions: expected a list of {list(PERMISSIONS)}"
        )
    dests = table.get("destinations", [])
    if not isinstance(dests, list) or not all(isinstance(d, str) for d in dests):
        raise ConfigError(f"[dimse.known_aes.{title}].destinations: expected a list of AE titles")
    return KnownAE(
        title=_check_aet(title, "[dimse.known_aes]"),
        host=str(table.get("host", "")),
        port=_check_port(table.get("port", 104), f"[dimse.known_aes.{title}]"),
        institution=str(table.get("institution", "")),
        permissions=frozenset(perms),
        destinations=frozenset(_check_aet(d, f"[dimse.known_aes.{title}].destinations")
                               for d in dests),
    )


def _webhook_from_table(name: str, table: Mapping[str, Any]) -> Webhook:
    what = f"[hcm.webhooks.{name}]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{what} must be a table")
    unknown = set(table) - {"url", "secret", "events", "timeout", "max_backoff"}
    if unknown:
        raise ConfigError(f"{what}: unknown keys {sorted(unknown)}")
    url, secret = str(table.get("url", "")), str(table.get("secret", ""))
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{what}.url: expected an http(s) URL, got {url!r}")
    if len(secret) < 16:
        raise ConfigError(f"{what}.secret: at least 16 characters")
    events = table.get("events", sorted(Webhook.__dataclass_fields__["events"].default))
    if not isinstance(events, list) or not set(events) <= set(WEBHOOK_EVENTS):
        raise ConfigError(f"{what}.events: expected a list of {list(WEBHOOK_EVENTS)}")
    try:
        timeout = float(table.get("timeout", 10.0))
        backoff = float(table.get("max_backoff", 300.0))
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: timeout and max_backoff are numbers of seconds") from None
    if timeout <= 0 or backoff < 1:
        raise ConfigError(f"{what}: timeout must be positive and max_backoff at least 1")
    return Webhook(name=name, url=url, secret=secret, events=frozenset(events),
                   timeout=timeout, max_backoff=backoff)


def _strings(value: Any, what: str) -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what}: expected a list of names")
    return frozenset(value)


def _issuer_from_table(name: str, table: Mapping[str, Any]) -> TokenIssuer:
    what = f"[auth.issuers.{name}]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{what} must be a table")
    unknown = set(table) - {"issuer", "audience", "jwks_file", "jwks_url", "algorithms"}
    if unknown:
        raise ConfigError(f"{what}: unknown keys {sorted(unknown)}")
    issuer, audience = str(table.get("issuer", "")), str(table.get("audience", ""))
    jf, ju = str(table.get("jwks_file", "")), str(table.get("jwks_url", ""))
    if not issuer or not audience:
        raise ConfigError(f"{what}: issuer and audience are required")
    if bool(jf) == bool(ju):
        raise ConfigError(f"{what}: give exactly one of jwks_file and jwks_url")
    algs = table.get("algorithms", ["RS256", "ES256"])
    if (not isinstance(algs, list) or not algs
            or any(a.lower() == "none" or a.upper().startswith("HS") for a in algs)):
        # "none" is never a signature, and shared-secret algorithms would let anyone
        # holding the public JWKS forge tokens (algorithm confusion)
        raise ConfigError(f"{what}.algorithms: a list of asymmetric algorithms (RS*, ES*, PS*)")
    return TokenIssuer(name=name, issuer=issuer, audience=audience, jwks_file=jf,
                       jwks_url=ju, algorithms=tuple(str(a) for a in algs))


def _institution_from_table(name: str, table: Mapping[str, Any]) -> InstitutionRule:
    what = f"[security.institutions.{name}]"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{what} must be a table")
    unknown = set(table) - {"sees", "national"}
    if unknown:
        raise ConfigError(f"{what}: unknown keys {sorted(unknown)}")
    national = table.get("national", False)
    if not isinstance(national, bool):
        raise ConfigError(f"{what}.national: expected true/false")
    return InstitutionRule(name=name, sees=_strings(table.get("sees", []), f"{what}.sees"),
                           national=national)


def _share_from_table(n: int, table: Mapping[str, Any]) -> ShareRule:
    what = f"[[security.shares]] #{n + 1}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{what} must be a table")
    unknown = set(table) - {"institutions", "study", "patient"}
    if unknown:
        raise ConfigError(f"{what}: unknown keys {sorted(unknown)}")
    study, patient = str(table.get("study", "")), str(table.get("patient", ""))
    if bool(study) == bool(patient):
        raise ConfigError(f"{what}: give exactly one of study (a UID) and patient "
                          "(ISSUER|ID)")
    issuer, _, pid = patient.rpartition("|")
    if patient and not pid:
        raise ConfigError(f"{what}.patient: expected ISSUER|ID")
    return ShareRule(institutions=_strings(table.get("institutions", []),
                                           f"{what}.institutions"),
                     study_uid=study, patient_id=pid, issuer=issuer)


def _coerce(section: str, key: str, ftype: Any, value: Any) -> Any:
    what = f"[{section}].{key}"
    t = str(ftype)
    if "Path" in t:
        return Path(str(value)) if value not in ("", None) else None
    if t == "bool":
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{what}: expected true/false, got {value!r}")
    if t == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: expected an integer, got {value!r}") from None
    if t == "float":
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what}: expected a number, got {value!r}") from None
    return str(value)


# Keys holding tables of named tables (or, for shares, an array of tables): parsed by
# their own function, appended to what earlier sources gave.
_TABLES: dict[tuple[str, str], Any] = {
    ("dimse", "known_aes"): lambda v: tuple(_known_ae_from_table(t, x) for t, x in v.items()),
    ("auth", "issuers"): lambda v: tuple(_issuer_from_table(n, x) for n, x in v.items()),
    ("security", "institutions"): lambda v: tuple(
        _institution_from_table(n, x) for n, x in v.items()),
    ("hcm", "webhooks"): lambda v: tuple(_webhook_from_table(n, x) for n, x in v.items()),
}


def _apply(cfg: Config, section: str, values: Mapping[str, Any], origin: str) -> Config:
    if section not in _SECTIONS:
        raise ConfigError(f"{origin}: unknown section [{section}]")
    current = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(current)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if (section, key) in _TABLES:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: [{section}.{key}] must be a table of tables")
            changes[key] = getattr(current, key) + _TABLES[section, key](value)
            continue
        if (section, key) == ("security", "shares"):
            if not isinstance(value, list):
                raise ConfigError(f"{origin}: [[security.shares]] must be an array of tables")
            changes[key] = current.shares + tuple(
                _share_from_table(n, v) for n, v in enumerate(value))
            continue
        if key not in fields:
            raise ConfigError(f"{origin}: unknown key {key!r} in [{section}]")
        changes[key] = _coerce(section, key, fields[key].type, value)
    if section == "storage" and changes.get("data_dir") is None and "data_dir" in changes:
        raise ConfigError(f"{origin}: [storage].data_dir must not be empty")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(current, **changes)})


def _validate_security(cfg: Config) -> None:
    if cfg.auth.enabled and not cfg.auth.issuers:
        raise ConfigError("[auth].enabled needs at least one [auth.issuers.NAME]")
    if bool(cfg.web.tls_cert) != bool(cfg.web.tls_key):
        raise ConfigError("[web].tls_cert and [web].tls_key go together")
    if bool(cfg.dimse.tls_cert) != bool(cfg.dimse.tls_key):
        raise ConfigError("[dimse].tls_cert and [dimse].tls_key go together")
    if cfg.dimse.tls_client_auth and not (cfg.dimse.tls_ca and cfg.dimse.tls_cert):
        raise ConfigError("[dimse].tls_client_auth needs tls_cert, tls_key and tls_ca")
    url = cfg.audit.syslog_url
    if url and not url.startswith(("udp://", "tcp://", "tls://")):
        raise ConfigError("[audit].syslog_url: expected udp://, tcp:// or tls://host:port")


def _validate_storage(s: StorageConfig) -> None:
    if s.backend not in STORAGE_BACKENDS:
        raise ConfigError(f"[storage].backend: expected one of {list(STORAGE_BACKENDS)}, "
                          f"got {s.backend!r}")
    if s.backend == "s3" and not s.s3_bucket:
        raise ConfigError('[storage].backend = "s3" needs [storage].s3_bucket')
    if s.s3_addressing not in ("path", "virtual"):
        raise ConfigError('[storage].s3_addressing: expected "path" or "virtual"')
    if not 5 <= s.s3_part_size_mb <= 5120:
        raise ConfigError("[storage].s3_part_size_mb: 5 to 5120 (S3's multipart part limits)")


def _validate_dimse(d: DimseConfig) -> None:
    if d.max_pdu < 0:
        raise ConfigError("[dimse].max_pdu must be 0 (unlimited) or positive")
    if d.max_associations < 1:
        raise ConfigError("[dimse].max_associations must be at least 1")
    if not 1 <= d.workers <= 64:
        raise ConfigError("[dimse].workers: 1 to 64 processes")
    if d.workers > 1 and not hasattr(socket, "SO_REUSEPORT"):
        raise ConfigError("[dimse].workers > 1 needs SO_REUSEPORT (Linux, BSD)")


def _validate(cfg: Config) -> Config:
    _check_aet(cfg.dimse.aet, "[dimse].aet")
    _check_port(cfg.dimse.port, "[dimse].port")
    _check_port(cfg.web.port, "[web].port")
    if cfg.web.max_stow_bytes < 1 or cfg.web.qido_max_results < 1:
        raise ConfigError("[web].max_stow_bytes and [web].qido_max_results must be positive")
    _validate_dimse(cfg.dimse)
    _validate_storage(cfg.storage)
    if cfg.index.batch_max < 1:
        raise ConfigError("[index].batch_max must be at least 1")
    if cfg.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"[log].level: expected DEBUG/INFO/WARNING/ERROR, got {cfg.log.level!r}")
    _validate_security(cfg)
    if cfg.hcm.stable_after <= 0:
        raise ConfigError("[hcm].stable_after must be a positive number of seconds")
    if cfg.hcm.retrieve_aet:
        _check_aet(cfg.hcm.retrieve_aet, "[hcm].retrieve_aet")
    names = [w.name for w in cfg.hcm.webhooks]
    if len(names) != len(set(names)):
        raise ConfigError("[hcm.webhooks]: a webhook name is listed twice")
    titles = [ae.title for ae in cfg.dimse.known_aes]
    if len(titles) != len(set(titles)):
        raise ConfigError("[dimse.known_aes]: an AE title is listed twice")
    return cfg


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the configuration: defaults < TOML file < ANIM_* environment < overrides.

    Parameters
    ----------
    path : the TOML file, or None for none.
    env : the environment (``os.environ`` when None); ``ANIM_DIMSE_PORT=11113`` sets
        ``[dimse].port``. ``ANIM_CONFIG`` names a TOML file when *path* is None.
    overrides : ``{section: {key: value}}`` from command-line flags.

    Raises
    ------
    ConfigError
        An unreadable file, an unknown key or a bad value.
    """
    env = os.environ if env is None else env
    cfg = Config()
    path = path or env.get("ANIM_CONFIG") or None
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"configuration file {path}: {e}") from None
        for section, values in data.items():
            if not isinstance(values, Mapping):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            cfg = _apply(cfg, section, values, str(path))
    for name, value in sorted(env.items()):
        if not name.startswith("ANIM_") or name == "ANIM_CONFIG":
            continue
        rest = name[5:].lower()
        section, _, key = rest.partition("_")
        if section in _SECTIONS and key:
            cfg = _apply(cfg, section, {key: value}, f"environment {name}")
    for section, values in (overrides or {}).items():
        cfg = _apply(cfg, section, values, "command line")
    return _validate(cfg)
