"""HTTPS for the web server: a TLS server context from [web] tls_cert and tls_key."""

from __future__ import annotations

import ssl

from anim.config import WebConfig
from anim.errors import ConfigError


def server_ssl_context(cfg: WebConfig) -> ssl.SSLContext | None:
    """None (plain HTTP) when neither file is set. TLS 1.2 or later only, with the
    standard library's secure defaults for ciphers (BCP 195, RFC 9325 3.1)."""
    if not cfg.tls_cert and not cfg.tls_key:
        return None
    if not cfg.tls_cert or not cfg.tls_key:
        # one without the other is a mistake, not a request for plain HTTP
        raise ConfigError("[web] tls_cert and tls_key must be given together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=cfg.tls_cert, keyfile=cfg.tls_key)
    except (OSError, ssl.SSLError) as e:
        # the reason only: never echo the files' contents
        raise ConfigError(f"[web] tls_cert/tls_key ({cfg.tls_cert}, {cfg.tls_key}): "
                          f"{e.strerror or getattr(e, 'reason', None) or 'unusable'}") from None
    return ctx
