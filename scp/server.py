"""The DIMSE server: an AE accepting every storage SOP class in every transfer syntax."""

from __future__ import annotations

import copy
import logging
import socket
import threading
from typing import Any

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, QueryRetrievePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from anim import Archive, DimseConfig, metrics
from anim.audit import AuditAction, AuditEvent
from scp import encoded, handlers, qr, reactor, security

log = logging.getLogger(__name__)


_UNCOMPRESSED_ORDER = [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                       ExplicitVRBigEndian, ImplicitVRLittleEndian]


def _preference(ts: UID) -> int:
    return _UNCOMPRESSED_ORDER.index(ts) + 1 if ts in _UNCOMPRESSED_ORDER else 0


def build_ae(cfg: DimseConfig) -> AE:
    ae = AE(ae_title=cfg.aet)
    # Accepted as sent: no transcoding on ingest, so every transfer syntax pydicom knows.
    # pynetdicom accepts the first of *our* syntaxes that the peer proposed, so the
    # order matters: a compressed syntax is only proposed for data already in it, and
    # Explicit VR Little Endian beats Implicit (whose VRs are lost).
    syntaxes = sorted(AllTransferSyntaxes, key=_preference)
    for cx in AllStoragePresentationContexts:
        # the roles let a C-GET requestor act as Storage SCP on its own association
        # (SCP/SCU Role Selection, PS3.7 D.3.3.4)
        ae.add_supported_context(cx.abstract_syntax, syntaxes, scu_role=True, scp_role=True)
    ae.add_supported_context(Verification)
    # Patient Root and Study Root, FIND/MOVE/GET (PS3.4 C.6.1, C.6.2)
    for cx in QueryRetrievePresentationContexts:
        if cx.abstract_syntax.name.startswith(("Patient Root", "Study Root")):
            ae.add_supported_context(cx.abstract_syntax)
    ae.maximum_pdu_size = cfg.max_pdu
    ae.maximum_associations = cfg.max_associations
    ae.network_timeout = cfg.network_timeout
    ae.acse_timeout = 30
    ae.dimse_timeout = cfg.network_timeout
    # A-ASSOCIATE-RJ "called AE title not recognised" for anything but our own title,
    # "calling AE title not recognised" for unknown callers. security.handle_requested
    # checks both first (and the peer's address), with a log line; these stay as a
    # second line should that handler ever not run.
    ae.require_called_aet = True
    if not cfg.allow_unknown_callers:
        ae.require_calling_aet = [a.title for a in cfg.known_aes]
    return ae


class _SupportedContexts(list[PresentationContext]):
    """The supported contexts, cheap to deep-copy.

    pynetdicom deep-copies the server's contexts for every incoming association
    (pynetdicom 3 transport.py); with every storage SOP class in every transfer
    syntax that is ~6,700 UIDs and 40-70 ms per association. Negotiation only reads
    them, so each association gets fresh context objects sharing the immutable UIDs.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        out = []
        for cx in self:
            c = copy.copy(cx)
            c._transfer_syntax = list(cx._transfer_syntax)
            out.append(c)
        return out


class _Server(ThreadedAssociationServer):
    # socketserver's default backlog of 5 drops connections when a burst of modalities
    # (or a migration with many associations) connects at once: they retry after 1 s
    request_queue_size = 128


class _ReusePortServer(_Server):
    """Binds with SO_REUSEPORT, so that worker processes share the port (scp/workers.py)."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def start(archive: Archive, cfg: DimseConfig,
          on_refused: security.OnRefused | None = None,
          reuse_port: bool = False) -> ThreadedAssociationServer:
    """Start listening (returns at once; pynetdicom serves each association in a thread).

    *reuse_port*: listen with SO_REUSEPORT, alongside the other worker processes.

    *on_refused* is told of each TLS handshake and association the archive refuses
    (by default: a failed "association" record in the audit trail).
    """
    if on_refused is None:
        def on_refused(r: security.Refusal) -> None:
            archive.audit(AuditEvent(
                action=AuditAction.ASSOCIATION, outcome="failure", reason=r.reason[:64],
                who_kind="ae", who=r.calling_ae, address=r.address,
                detail=f"{r.stage} to {r.called_ae}"))
    reactor.install()  # event-driven DUL and association loops (scp/reactor.py)
    encoded.install()  # retrieves send the stored bytes (scp/encoded.py)
    if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        # pynetdicom's "standard" handlers format every PDU and DIMSE message for its
        # debug log (decoding the command set again) even when that log is off; without
        # --debug nobody reads them (pynetdicom _config.LOG_HANDLER_LEVEL, documented)
        pynetdicom_config.LOG_HANDLER_LEVEL = "none"
        # ...and it walks every C-FIND request and response Identifier for that log
        pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
        pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    ae = build_ae(cfg)
    ssl_context = security.dimse_ssl_context(cfg)  # None: plain TCP
    gate = security.AssociationGate(cfg, revoked=archive.index.revoked_institutions)
    evt_handlers: list[Any] = []
    if ssl_context is not None:
        evt_handlers.append((evt.EVT_CONN_OPEN, security.handle_tls_handshake,
                             [ae.acse_timeout, on_refused]))
    evt_handlers += [
        (evt.EVT_CONN_OPEN, handlers.handle_conn_open),
        (evt.EVT_REQUESTED, security.handle_requested, [gate, on_refused]),
        (evt.EVT_CONN_CLOSE, gate.release),
        (evt.EVT_ACCEPTED, handlers.handle_accepted, [archive]),
        (evt.EVT_REJECTED, handlers.handle_rejected, [archive]),
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [archive, cfg]),
        (evt.EVT_C_FIND, qr.handle_find, [archive, cfg]),
        (evt.EVT_C_MOVE, qr.handle_move, [archive, cfg]),
        (evt.EVT_C_GET, qr.handle_get, [archive, cfg]),
    ]
    # ae.start_server(block=False) with our server class: make_server is pynetdicom's
    # documented way to use a custom one
    server = ae.make_server((cfg.host, cfg.port), evt_handlers=evt_handlers,
                            contexts=_SupportedContexts(ae.supported_contexts),
                            ssl_context=ssl_context,
                            server_class=_ReusePortServer if reuse_port else _Server)
    threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
    ae._servers.append(server)  # so ae.shutdown() stops it, as start_server would
    metrics.of(archive).sampled.add(
        "anim_dimse_associations_open", "DIMSE associations established now",
        lambda: sum(1 for a in server.active_associations if a.is_established))
    host, port = server.server_address[:2]
    tls = "" if ssl_context is None else (
        " (TLS, client certificate required)" if cfg.tls_client_auth else " (TLS)")
    log.info("DIMSE: AE %s listening on %s:%d%s", cfg.aet, host, port, tls)
    return server
