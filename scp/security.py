"""Who may open an association: AE title and peer address checks, DICOM TLS.

Two gates, both before any DIMSE message is read:

- :func:`handle_tls_handshake` (``EVT_CONN_OPEN``): the TLS handshake of the DICOM
  TLS profiles (PS3.15 B.9 BCP 195, B.10 Non-Downgrading BCP 195), with the client's
  certificate required when ``[dimse].tls_client_auth`` is set;
- :func:`handle_requested` (``EVT_REQUESTED``): the A-ASSOCIATE-RQ's called and
  calling AE titles and the peer's address against ``[dimse]``, answered with an
  A-ASSOCIATE-RJ (PS3.8 9.3.4) when they do not match.

Both use pynetdicom 3's public event API (an ``EVT_REQUESTED`` handler may send the
A-ASSOCIATE-RJ itself: association.py ``run_reactor`` then skips negotiation).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event

from anim import DimseConfig
from anim.errors import ConfigError

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ PDU fields (PS3.8 9.3.4, Table 9-21)
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01  # "DICOM UL service-user"
NO_REASON_GIVEN = 0x01
CALLING_AE_NOT_RECOGNIZED = 0x03
CALLED_AE_NOT_RECOGNIZED = 0x07
# PS3.8 Table 9-21, source 3 "DICOM UL service-provider (presentation related)"
SOURCE_PROVIDER_PRESENTATION = 0x03
LOCAL_LIMIT_EXCEEDED = 0x02
REASONS = {
    NO_REASON_GIVEN: "no-reason-given",
    CALLING_AE_NOT_RECOGNIZED: "calling-AE-title-not-recognized",
    CALLED_AE_NOT_RECOGNIZED: "called-AE-title-not-recognized",
}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Refusal:
    """One connection or association turned away (for the audit trail)."""

    stage: str  # "tls" (handshake failed) | "association" (A-ASSOCIATE-RJ sent)
    address: str
    reason: str  # a Table 9-21 reason name, or the TLS error
    calling_ae: str = ""
    called_ae: str = ""


OnRefused = Callable[[Refusal], None]


def _notify(on_refused: OnRefused | None, refusal: Refusal) -> None:
    if on_refused is None:
        return
    try:
        on_refused(refusal)
    except Exception:  # the refusal stands whatever its listener does
        log.exception("DIMSE: refusal listener failed")


# ---- AE title and address ---------------------------------------------------------------


def ip_of(address: str) -> IPAddress | None:
    """The peer's address as an IP, IPv4-mapped IPv6 (a dual-stack socket) as IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def resolve(host: str) -> frozenset[IPAddress]:
    """Every address *host* names; empty (so every call from it is refused) when the
    name does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as e:
        log.warning("DIMSE: known AE host %r does not resolve (%s): its calls are refused",
                    host, e)
        return frozenset()
    return frozenset(ip for info in infos if (ip := ip_of(str(info[4][0]))) is not None)


class AssociationGate:
    """The called/calling AE title and peer address rules of ``[dimse]``.

    Host names are resolved once, when the gate is built (at server start): a
    changed DNS record takes effect on restart, and no lookup runs per association.
    """

    def __init__(self, cfg: DimseConfig,
                 resolver: Callable[[str], frozenset[IPAddress]] = resolve,
                 revoked: Callable[[], frozenset[str]] = frozenset) -> None:
        self.aet = cfg.aet
        self.revoked = revoked  # institutions whose AEs are refused (containment)
        self.per_ae = cfg.max_associations_per_ae
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()
        self.allow_unknown = cfg.allow_unknown_callers
        self.known = {ae.title: ae for ae in cfg.known_aes}
        self.addresses: dict[str, frozenset[IPAddress]] = {
            ae.title: resolver(ae.host)
            for ae in cfg.known_aes if ae.host and cfg.check_peer_address}

    def check(self, calling: str, called: str, address: str) -> int | None:
        """The A-ASSOCIATE-RJ reason (source: service-user) to answer, or None to go on.

        The called AE title is checked first, as pynetdicom's own checks do (acse.py
        ``_negotiate_as_acceptor``: "called" overrides "calling").
        """
        if called != self.aet:
            return CALLED_AE_NOT_RECOGNIZED
        known = self.known.get(calling)
        institution = known.institution_name if known else calling
        if institution in self.revoked():
            # a revoked (compromised) institution: its AEs are no longer recognised
            return CALLING_AE_NOT_RECOGNIZED
        if known is None:
            return None if self.allow_unknown else CALLING_AE_NOT_RECOGNIZED
        allowed = self.addresses.get(calling)
        if allowed is not None and ip_of(address) not in allowed:
            # Table 9-21 has no "wrong address" reason. The identity we recognise is
            # the (AE title, address) pair, so "calling-AE-title-not-recognized" is
            # true and points the peer's operator at the AE title configuration; it
            # is also exactly what an unknown title gets, so a scanner cannot tell a
            # valid title used from the wrong host from an invalid one (rather than
            # 0x01 "no-reason-given", which would tell them apart and help no one).
            return CALLING_AE_NOT_RECOGNIZED
        return None


    def admit(self, calling: str, assoc: Any) -> bool:
        """Count the association against its AE's limit; False when over it."""
        with self._lock:
            n = self._active.get(calling, 0)
            if self.per_ae and n >= self.per_ae:
                return False
            self._active[calling] = n + 1
        assoc._anim_counted = calling
        return True

    def release(self, event: Event) -> None:
        """``EVT_CONN_CLOSE``: the association no longer counts (once)."""
        calling = getattr(event.assoc, "_anim_counted", None)
        if calling is None:
            return
        event.assoc._anim_counted = None
        with self._lock:
            left = self._active.get(calling, 1) - 1
            if left > 0:
                self._active[calling] = left
            else:
                self._active.pop(calling, None)


def handle_requested(event: Event, gate: AssociationGate, on_refused: OnRefused | None
                     ) -> None:
    """``EVT_REQUESTED``: reject an A-ASSOCIATE-RQ the gate refuses, before negotiation.

    Fails closed: pynetdicom only logs an exception raised by a notification handler
    and goes on negotiating, so any error here becomes a rejection.
    """
    assoc = event.assoc
    calling = called = address = ""
    try:
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        address = str(assoc.requestor.address)
        diagnostic = gate.check(calling, called, address)
        result = REJECTED_PERMANENT  # the same request will be refused again
    except Exception:
        log.exception("DIMSE: association check failed; rejecting")
        result, diagnostic = REJECTED_TRANSIENT, NO_REASON_GIVEN
    source = SOURCE_SERVICE_USER
    if diagnostic is None:
        if gate.admit(calling, assoc):
            return
        # one AE may not take every association of the archive (PS3.8 Table 9-21:
        # transient, service-provider, local-limit-exceeded: it may try again later)
        result, source, diagnostic = (REJECTED_TRANSIENT, SOURCE_PROVIDER_PRESENTATION,
                                      LOCAL_LIMIT_EXCEEDED)
        reason = "local-limit-exceeded"
    else:
        reason = REASONS[diagnostic]
    log.info("DIMSE: association from %s at %s to %s rejected: %s",
             calling, address, called, reason)
    try:
        assoc.acse.send_reject(result, source, diagnostic)
    except Exception:
        log.exception("DIMSE: A-ASSOCIATE-RJ could not be sent; aborting")
        assoc.abort()
        return
    _notify(on_refused, Refusal("association", address, reason, calling, called))
    # as pynetdicom does after its own rejections (acse.py): notify, then wait for the
    # peer to close (or the ARTIM timer) so the A-ASSOCIATE-RJ is not cut off
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


# ---- TLS ---------------------------------------------------------------------------------

# The ffdhe2048 group of RFC 7919 (as `openssl genpkey -genparam -algorithm DH -pkeyopt
# group:ffdhe2048` writes it), for the DHE suites PS3.15 B.10 requires ("key length
# 2048 bits or more"); Python's ssl module enables none without parameters.
FFDHE2048_PEM = """\
-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


class DeferredHandshakeContext(ssl.SSLContext):
    """An SSLContext whose server sockets shake hands later, in their own thread.

    pynetdicom wraps each accepted socket in the server's accept loop (transport.py
    ``AssociationServer.get_request``); a handshake there would let one client that
    connects and stays silent hold up every other association. The handshake runs
    instead in :func:`handle_tls_handshake`, on the association's thread, with a
    time-out.
    """

    def wrap_socket(self, sock: socket.socket, server_side: bool = False,
                    do_handshake_on_connect: bool = True, *args: Any,
                    **kwargs: Any) -> ssl.SSLSocket:
        now = do_handshake_on_connect and not server_side  # clients as asked
        return super().wrap_socket(sock, server_side, now, *args, **kwargs)


def dimse_ssl_context(cfg: DimseConfig) -> ssl.SSLContext | None:
    """The DIMSE port's TLS context, or None when ``[dimse].tls_cert`` is not set.

    The BCP 195 TLS Profile (PS3.15 B.9) as narrowed by the Non-Downgrading one
    (B.10, DCMTK's default): never TLS 1.0 or 1.1, and the four suites B.10 requires
    (TLS_(EC)DHE_RSA_WITH_AES_128/256_GCM) plus their ECDSA and ChaCha20 kin; TLS 1.3
    suites are OpenSSL's, all AEAD. With ``tls_client_auth`` the client must present
    a certificate issued by ``tls_ca`` (mutual authentication); otherwise none is
    asked for.
    """
    if not cfg.tls_cert:
        return None
    ctx = DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE+AESGCM:DHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!DSS")
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    with tempfile.TemporaryDirectory() as tmp:  # load_dh_params reads only a file
        path = f"{tmp}/ffdhe2048.pem"
        with open(path, "w") as f:
            f.write(FFDHE2048_PEM)
        ctx.load_dh_params(path)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
        if cfg.tls_ca:
            ctx.load_verify_locations(cafile=cfg.tls_ca)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"[dimse] TLS certificate, key or CA cannot be loaded: {e}") from e
    if cfg.tls_client_auth:
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def handle_tls_handshake(event: Event, timeout: float, on_refused: OnRefused | None
                         ) -> None:
    """``EVT_CONN_OPEN`` (runs on the association's thread, before its DUL starts):
    complete the TLS handshake, or close the connection.

    A failed handshake (no, or an untrusted, client certificate; plain DICOM on the
    TLS port; an old TLS version) closes the transport: pynetdicom sees "transport
    connection closed" (Evt17) and ends the association without reading from it.
    """
    assoc_socket = event.assoc.dul.socket
    sock = getattr(assoc_socket, "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return
    address = str(event.address[0])
    try:
        sock.settimeout(timeout)
        sock.do_handshake()
        sock.settimeout(None)  # pynetdicom's accepted sockets block (select() first)
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or type(e).__name__
        log.info("DIMSE: TLS handshake with %s refused: %s", address, reason)
        assoc_socket.close()  # Evt17 for the DUL
        sock.close()  # pynetdicom skips close() when shutdown() fails (peer gone)
        # nothing will arrive: do not wait the ACSE time-out for an A-ASSOCIATE-RQ
        event.assoc.acse_timeout = 0
        _notify(on_refused, Refusal("tls", address, f"TLS: {reason}"))
        return
    log.debug("DIMSE: TLS %s with %s (%s)", sock.version(), address, tls_subject(event.assoc))


def tls_subject(assoc: Association) -> str:
    """The common name of the peer's verified client certificate ("" if none)."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return ""
    try:
        cert = sock.getpeercert() or {}
    except (OSError, ValueError):
        return ""
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""
