"""The DIMSE server: an AE accepting every storage SOP class in every transfer syntax."""

from __future__ import annotations

import logging

from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from anim import Archive, DimseConfig
from scp import handlers

log = logging.getLogger(__name__)


def build_ae(cfg: DimseConfig) -> AE:
    ae = AE(ae_title=cfg.aet)
    # Accepted as sent: no transcoding on ingest, so every transfer syntax pydicom knows
    syntaxes = list(AllTransferSyntaxes)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, syntaxes)
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = cfg.max_pdu
    ae.maximum_associations = cfg.max_associations
    ae.network_timeout = cfg.network_timeout
    ae.acse_timeout = 30
    ae.dimse_timeout = cfg.network_timeout
    # A-ASSOCIATE-RJ "called AE title not recognised" for anything but our own title
    ae.require_called_aet = True
    if not cfg.allow_unknown_callers:
        ae.require_calling_aet = [a.title for a in cfg.known_aes]
    return ae


def start(archive: Archive, cfg: DimseConfig) -> ThreadedAssociationServer:
    """Start listening (returns at once; pynetdicom serves each association in a thread)."""
    ae = build_ae(cfg)
    evt_handlers = [
        (evt.EVT_CONN_OPEN, handlers.handle_conn_open),
        (evt.EVT_C_ECHO, handlers.handle_echo),
        (evt.EVT_C_STORE, handlers.handle_store, [archive, cfg]),
    ]
    server = ae.start_server((cfg.host, cfg.port), block=False, evt_handlers=evt_handlers)
    host, port = server.server_address[:2]
    log.info("DIMSE: AE %s listening on %s:%d", cfg.aet, host, port)
    return server
