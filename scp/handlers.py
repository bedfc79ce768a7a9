"""One function per DIMSE service: Event → one anim call → status."""

from __future__ import annotations

import logging
import socket
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom.events import Event

from anim import AnimError, Archive, DimseConfig, Source, StoreOutcome, metrics
from anim.audit import AuditAction, from_principal
from anim.security import Principal, Viewer, viewer_for
from scp import status

log = logging.getLogger(__name__)


def status_reply(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        # ErrorComment is LO: 64 characters at most (PS3.7 C.4)
        ds.ErrorComment = comment[:64]
    return ds


def peer(event: Event) -> tuple[str, str]:
    req = event.assoc.requestor
    return str(req.ae_title).strip(), str(req.address)


def source_of(cfg: DimseConfig, ae_title: str, host: str) -> Source:
    known = cfg.find_ae(ae_title)
    # An unknown caller (allowed in the embedded default) is its own institution.
    institution = known.institution_name if known else ae_title
    return Source(institution=institution, ae_title=ae_title, host=host, protocol="dimse")


def principal_of(event: Event, cfg: DimseConfig) -> Principal:
    """The caller of an association: its AE title, institution and address."""
    ae_title, host = peer(event)
    return Principal(kind="ae", subject=ae_title,
                     institution=source_of(cfg, ae_title, host).institution, address=host)


def viewer_of(event: Event, archive: Archive) -> Viewer | None:
    """What the caller may see: the query engine's tenancy filter (docs/security.md)."""
    return viewer_for(principal_of(event, archive.cfg.dimse), archive.cfg)


def may(archive: Archive, ae_title: str, permission: str) -> bool:
    cfg = archive.cfg.dimse
    known = cfg.find_ae(ae_title)
    institution = known.institution_name if known else ae_title
    if institution in archive.index.revoked_institutions():
        return False  # a revoked (compromised) institution's AEs are refused outright
    if known is None:
        return cfg.allow_unknown_callers
    return permission in known.permissions


def handle_conn_open(event: Event) -> None:
    """Disable Nagle on every DICOM socket: each turn would stall ~40 ms otherwise."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            log.debug("TCP_NODELAY could not be set", exc_info=True)


def handle_accepted(event: Event, archive: Archive) -> None:
    """``EVT_ACCEPTED``: an association is a login (PS3.15 A.5.3.11): in the audit trail."""
    metrics.of(archive).association("accepted")
    archive.audit(from_principal(principal_of(event, archive.cfg.dimse),
                                 AuditAction.ASSOCIATION, "success", detail="accepted"))


def handle_rejected(event: Event, archive: Archive) -> None:
    """``EVT_REJECTED``: counted (the audit record is security.handle_requested's)."""
    metrics.of(archive).association("rejected")


def handle_echo(event: Event) -> int:
    return status.SUCCESS


def handle_store(event: Event, archive: Archive, cfg: DimseConfig) -> Any:
    ae_title, host = peer(event)
    if not may(archive, ae_title, "store"):
        log.warning("C-STORE refused: %s (%s) may not store", ae_title, host)
        metrics.of(archive).store_refused("dimse")
        archive.audit(from_principal(principal_of(event, cfg), AuditAction.STORE, "failure",
                                     reason="not permitted", detail="dimse"))
        return status_reply(status.REFUSED_NOT_AUTHORIZED, f"AE {ae_title} may not store")
    req = event.request
    try:
        data = event.encoded_dataset()
        result = metrics.observed_store(archive, "dimse", data, source_of(cfg, ae_title, host),
                                        expect_sop_class=str(req.AffectedSOPClassUID))
    except AnimError as e:
        code = status.store_error_status(e)
        log.warning("C-STORE from %s (%s) failed 0x%04X: %s", ae_title, host, code, e)
        return status_reply(code, str(e))
    code = status.STORE_OUTCOME_STATUS[result.outcome]
    if result.outcome is StoreOutcome.QUARANTINED:
        return status_reply(code, "Quarantined: same SOP Instance UID, other content")
    return code
