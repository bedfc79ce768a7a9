"""scp/security.py without an archive: the AE title/address rules, the TLS context, and
the pynetdicom 3 behaviour they rely on (a real pynetdicom acceptor and requestor on
loopback, so a pynetdicom release that changes it fails here, not in production)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from anim import DimseConfig
from anim.config import KnownAE
from anim.errors import ConfigError
from scp import security
from scp.security import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    AssociationGate,
    Refusal,
    dimse_ssl_context,
    ip_of,
)

LOOPBACK = frozenset({ipaddress.ip_address("127.0.0.1")})


def fixed(table: dict[str, frozenset[Any]]) -> Any:
    return lambda host: table.get(host, frozenset())


def gate(allow_unknown: bool = False, check_address: bool = True) -> AssociationGate:
    cfg = DimseConfig(aet="ANIM", allow_unknown_callers=allow_unknown,
                      check_peer_address=check_address,
                      known_aes=(KnownAE("NEAR", host="near.example"),
                                 KnownAE("FAR", host="far.example"),
                                 KnownAE("ANYWHERE")))
    return AssociationGate(cfg, resolver=fixed({
        "near.example": LOOPBACK,
        "far.example": frozenset({ipaddress.ip_address("10.1.2.3")})}))


# ---- the rules --------------------------------------------------------------------------


@pytest.mark.parametrize(("calling", "called", "address", "allow_unknown", "expected"), [
    ("NEAR", "ANIM", "127.0.0.1", False, None),
    ("NEAR", "ANIM", "::ffff:127.0.0.1", False, None),  # dual-stack socket
    ("FAR", "ANIM", "127.0.0.1", False, CALLING_AE_NOT_RECOGNIZED),
    ("FAR", "ANIM", "10.1.2.3", False, None),
    ("ANYWHERE", "ANIM", "192.0.2.7", False, None),  # no host: no address check
    ("STRANGER", "ANIM", "127.0.0.1", False, CALLING_AE_NOT_RECOGNIZED),
    ("STRANGER", "ANIM", "127.0.0.1", True, None),
    ("FAR", "ANIM", "127.0.0.1", True, CALLING_AE_NOT_RECOGNIZED),  # known: still bound
    ("NEAR", "OTHER", "127.0.0.1", False, CALLED_AE_NOT_RECOGNIZED),
    ("STRANGER", "OTHER", "127.0.0.1", False, CALLED_AE_NOT_RECOGNIZED),  # called first
    ("NEAR", "ANIM", "not an address", False, CALLING_AE_NOT_RECOGNIZED),
])
def test_gate(calling: str, called: str, address: str, allow_unknown: bool,
              expected: int | None) -> None:
    assert gate(allow_unknown).check(calling, called, address) == expected


def test_address_check_can_be_switched_off() -> None:
    assert gate(check_address=False).check("FAR", "ANIM", "127.0.0.1") is None


def test_unresolvable_host_refuses_every_call() -> None:
    cfg = DimseConfig(known_aes=(KnownAE("LOST", host="no-such-host.invalid"),))
    assert security.resolve("no-such-host.invalid") == frozenset()
    assert AssociationGate(cfg).check("LOST", "ANIM", "127.0.0.1") == CALLING_AE_NOT_RECOGNIZED


def test_resolve_names_and_literals() -> None:
    assert ipaddress.ip_address("127.0.0.1") in security.resolve("localhost")
    assert security.resolve("127.0.0.2") == {ipaddress.ip_address("127.0.0.2")}
    assert ip_of("fe80::1%eth0") == ipaddress.ip_address("fe80::1")


# ---- TLS context ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA(key_type=trustme.KeyType.RSA)


@pytest.fixture
def pem(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "server.pem",
             "key": tmp_path / "server.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    server = ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA)
    server.cert_chain_pems[0].write_to_path(str(files["cert"]))
    server.private_key_pem.write_to_path(str(files["key"]))
    return {k: str(v) for k, v in files.items()}


def tls_config(pem: dict[str, str], client_auth: bool = True) -> DimseConfig:
    return DimseConfig(aet="ANIM", tls_cert=pem["cert"], tls_key=pem["key"], tls_ca=pem["ca"],
                       tls_client_auth=client_auth)


def test_no_certificate_no_tls() -> None:
    assert dimse_ssl_context(DimseConfig()) is None


def test_context_follows_the_non_downgrading_bcp195_profile(pem: dict[str, str]) -> None:
    ctx = dimse_ssl_context(tls_config(pem))
    assert ctx is not None
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    names = {c["name"] for c in ctx.get_ciphers()}
    # PS3.15 B.10: these four shall all be supported
    assert {"DHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
            "DHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384"} <= names
    assert not any("CBC" in n or "RC4" in n or "3DES" in n or n.startswith("AES")
                   for n in names)  # no static RSA key exchange, no CBC
    no_auth = dimse_ssl_context(tls_config(pem, client_auth=False))
    assert no_auth is not None
    assert no_auth.verify_mode == ssl.CERT_NONE


def test_unreadable_certificate_is_a_configuration_error(pem: dict[str, str],
                                                         tmp_path: Path) -> None:
    cfg = DimseConfig(tls_cert=str(tmp_path / "missing.pem"), tls_key=pem["key"])
    with pytest.raises(ConfigError, match=r"\[dimse\] TLS"):
        dimse_ssl_context(cfg)


@pytest.mark.parametrize("cipher", ["DHE-RSA-AES128-GCM-SHA256",
                                    "ECDHE-RSA-AES256-GCM-SHA384"])
def test_required_suites_are_negotiated(pem: dict[str, str], ca: trustme.CA,
                                        cipher: str) -> None:
    ctx = dimse_ssl_context(tls_config(pem, client_auth=False))
    assert ctx is not None
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.set_ciphers(cipher)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        c = socket.create_connection(listener.getsockname())
        s, _ = listener.accept()
        with ctx.wrap_socket(s, server_side=True) as server_side:
            t = threading.Thread(target=server_side.do_handshake)
            t.start()
            with client.wrap_socket(c, server_hostname="127.0.0.1") as tls:
                assert tls.cipher()[0] == cipher
            t.join(10)


# ---- with pynetdicom --------------------------------------------------------------------


class Acceptor:
    """A pynetdicom acceptor with the archive's security handlers (and C-ECHO only)."""

    def __init__(self, cfg: DimseConfig, resolver: Any = security.resolve) -> None:
        self.refusals: list[Refusal] = []
        self.ae = AE(ae_title=cfg.aet)
        self.ae.add_supported_context(Verification)
        self.ae.acse_timeout = 5
        ctx = dimse_ssl_context(cfg)
        handlers: list[Any] = [(evt.EVT_REQUESTED, security.handle_requested,
                                [AssociationGate(cfg, resolver), self.refusals.append])]
        if ctx is not None:
            handlers.append((evt.EVT_CONN_OPEN, security.handle_tls_handshake,
                             [5, self.refusals.append]))
        self.server: ThreadedAssociationServer = self.ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=handlers, ssl_context=ctx)
        self.port = int(self.server.server_address[1])

    def idle(self, within: float = 5.0) -> bool:
        """True once no association is left (none lingers for a time-out)."""
        deadline = time.monotonic() + within
        while self.ae.active_associations:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True


@pytest.fixture
def acceptors() -> Iterator[list[Acceptor]]:
    made: list[Acceptor] = []
    yield made
    for a in made:
        a.server.shutdown()


def associate(port: int, calling: str, called: str = "ANIM",
              tls_args: tuple[ssl.SSLContext, str] | None = None) -> tuple[Any, list[Any]]:
    seen: list[Any] = []
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_ACSE_RECV,
                                        lambda e: seen.append(e.primitive))])
    return assoc, seen


def test_pynetdicom_rejection_from_evt_requested(acceptors: list[Acceptor]) -> None:
    cfg = DimseConfig(aet="ANIM", allow_unknown_callers=False,
                      known_aes=(KnownAE("NEAR", host="127.0.0.1"),
                                 KnownAE("FAR", host="127.0.0.2")))
    acc = Acceptor(cfg)
    acceptors.append(acc)
    for calling in ("STRANGER", "FAR"):
        assoc, seen = associate(acc.port, calling)
        assert assoc.is_rejected
        rj = seen[-1]
        # PS3.8 Table 9-21: rejected-permanent, DICOM UL service-user, reason 3
        assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)
    assoc, _ = associate(acc.port, "NEAR")
    assert assoc.is_established
    assoc.release()
    assert [(r.stage, r.calling_ae, r.address, r.reason) for r in acc.refusals] == [
        ("association", "STRANGER", "127.0.0.1", "calling-AE-title-not-recognized"),
        ("association", "FAR", "127.0.0.1", "calling-AE-title-not-recognized")]
    assert acc.idle()


def test_a_failing_check_rejects(acceptors: list[Acceptor]) -> None:
    class Broken(frozenset[Any]):
        def __contains__(self, item: object) -> bool:
            raise RuntimeError("a bug in the address check")

    def broken(host: str) -> frozenset[Any]:
        return Broken()

    acc = Acceptor(DimseConfig(aet="ANIM", known_aes=(KnownAE("NEAR", host="x"),)),
                   resolver=broken)
    acceptors.append(acc)
    assoc, seen = associate(acc.port, "NEAR")
    assert assoc.is_rejected
    assert (seen[-1].result, seen[-1].result_source, seen[-1].diagnostic) == (2, 1, 1)


class ClientContext(ssl.SSLContext):
    """Keeps its sockets: pynetdicom's requestor drops a socket unclosed when the
    server ends the handshake (transport.py ``_shutdown_socket``), so the test closes
    them (a ResourceWarning is an error here)."""

    sockets: list[ssl.SSLSocket]

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        sock = super().wrap_socket(*args, **kwargs)
        self.sockets.append(sock)
        return sock

    def close_all(self) -> None:
        for sock in self.sockets:
            sock.close()


def _client(ca: trustme.CA, cert: trustme.LeafCert | None) -> ClientContext:
    ctx = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sockets = []
    ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


def test_tls_handshake_on_the_association_thread(acceptors: list[Acceptor], ca: trustme.CA,
                                                 pem: dict[str, str]) -> None:
    acc = Acceptor(tls_config(pem))
    acceptors.append(acc)
    good = _client(ca, ca.issue_cert("modality1", common_name="MODALITY1"))
    rogue_ca = trustme.CA()
    rogue = _client(ca, rogue_ca.issue_cert("modality1", common_name="MODALITY1"))

    # a silent client does not hold up the accept loop (pynetdicom wraps sockets there)
    with socket.create_connection(("127.0.0.1", acc.port)):
        assoc, _ = associate(acc.port, "MODALITY1", tls_args=(good, "127.0.0.1"))
        assert assoc.is_established
        subject = security.tls_subject(next(a for a in acc.ae.active_associations))
        assert subject == "MODALITY1"
        assoc.release()

    for client in (rogue, _client(ca, None)):
        assoc, _ = associate(acc.port, "MODALITY1", tls_args=(client, "127.0.0.1"))
        assert not assoc.is_established
        client.close_all()
    # the silent client (closed without a handshake), the rogue one, the anonymous one
    reasons = sorted(r.reason for r in acc.refusals if r.stage == "tls")
    assert len(acc.refusals) == len(reasons) == 3
    assert "TLS: CERTIFICATE_VERIFY_FAILED" in reasons
    assert "TLS: PEER_DID_NOT_RETURN_A_CERTIFICATE" in reasons
    # a refused connection does not wait out the ACSE time-out
    assert acc.idle(within=3)
