"""Query/Retrieve SCP handlers: C-FIND, C-MOVE, C-GET (PS3.4 Annex C).

Each handler: Identifier → anim.Query → one archive call → pynetdicom yields.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import build_context, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from anim import (
    AnimError,
    Archive,
    DimseConfig,
    InvalidQuery,
    KnownAE,
    Query,
    StoredInstance,
    metrics,
)
from anim.audit import AuditAction, from_principal
from anim.transcode import UNCOMPRESSED
from scp import encoded, identifiers, status
from scp.handlers import handle_conn_open, may, peer, principal_of, status_reply, viewer_of

log = logging.getLogger(__name__)

# PS3.4 C.4.1.1.4 / C.4.2.1.5 / C.4.3.1.4
PENDING = 0xFF00
CANCEL = 0xFE00
IDENTIFIER_DOES_NOT_MATCH = 0xA900
MOVE_DESTINATION_UNKNOWN = 0xA801
UNABLE_TO_PROCESS = 0xC000
MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255
_PROTOCOL = {"EVT_C_MOVE": "cmove", "EVT_C_GET": "cget"}  # anim_retrieved_* labels


def _identifier(event: Event) -> Dataset:
    try:
        return event.identifier
    except Exception as e:
        raise InvalidQuery(f"the Identifier cannot be decoded: {type(e).__name__}") from None


def handle_find(event: Event, archive: Archive, cfg: DimseConfig) -> Iterator[Any]:
    ae_title, host = peer(event)
    if not may(archive, ae_title, "find"):
        _audit(event, archive, AuditAction.QUERY, "failure", None, "C-FIND",
               reason="not permitted")
        yield status_reply(status.REFUSED_NOT_AUTHORIZED, f"AE {ae_title} may not query"), None
        return
    t0 = time.perf_counter()
    try:
        ident = _identifier(event)
        query = dataclasses.replace(
            identifiers.to_query(ident, str(event.request.AffectedSOPClassUID)),
            viewer=viewer_of(event, archive))
        charset = _charset_of(ident)
        n = 0
        for result in archive.find(query):
            if event.is_cancelled:
                log.info("C-FIND from %s cancelled after %d matches", ae_title, n)
                yield CANCEL, None
                return
            n += 1
            yield PENDING, identifiers.encoded_response(result, query, charset, cfg.aet)
    except InvalidQuery as e:
        log.warning("C-FIND from %s (%s) refused: %s", ae_title, host, e)
        yield status_reply(IDENTIFIER_DOES_NOT_MATCH, str(e)), None
        return
    except AnimError as e:
        log.warning("C-FIND from %s (%s) failed: %s", ae_title, host, e)
        yield status_reply(UNABLE_TO_PROCESS, str(e)), None
        return
    _audit(event, archive, AuditAction.QUERY, "success", query,
           f"C-FIND {query.level.value} {n} matches")
    log.info("C-FIND from %s/%s at %s level: %d matches, %.1f ms", ae_title, host,
             query.level.value, n, (time.perf_counter() - t0) * 1000)
    metrics.of(archive).queried("cfind", query.level, time.perf_counter() - t0)


def _charset_of(ident: Dataset) -> str:
    cs = ident.get("SpecificCharacterSet", "") or ""
    if isinstance(cs, MultiValue | list | tuple):
        cs = cs[-1] if len(cs) else ""
    return str(cs).strip()


def _select(event: Event, archive: Archive, what: str) -> list[StoredInstance]:
    ident = _identifier(event)
    query = identifiers.to_query(ident, str(event.request.AffectedSOPClassUID), retrieve=True)
    # only what the caller may see is retrieved (the same filter as C-FIND)
    found = archive.select(dataclasses.replace(query, viewer=viewer_of(event, archive)))
    _audit(event, archive, AuditAction.RETRIEVE, "success", query,
           f"{what} {len(found)} instances")
    return found


def _audit(event: Event, archive: Archive, action: AuditAction, outcome: str,
           query: Query | None, detail: str, reason: str = "") -> None:
    """One audit record per request (docs/security.md): who, which patient and studies
    the identifier named, the outcome."""
    match = query.match if query is not None else {}
    studies = tuple(u for u in match.get("StudyInstanceUID", "").split("\\") if u)
    pid, issuer = match.get("PatientID", ""), match.get("IssuerOfPatientID", "")
    if not pid and len(studies) == 1:
        pid, issuer = archive.patient_of(studies[0])
    archive.audit(from_principal(principal_of(event, archive.cfg.dimse), action, outcome,
                                 reason=reason, patient_id=pid, issuer=issuer,
                                 study_uids=studies, detail=detail))


def _failed(inst: StoredInstance) -> Dataset:
    """A stand-in that pynetdicom cannot send: it counts as a failed sub-operation and
    its SOP Instance UID lands in the Failed SOP Instance UID List (PS3.4 C.4.2.1.4.2)."""
    ds = Dataset()
    ds.SOPClassUID = inst.sop_class_uid
    ds.SOPInstanceUID = inst.sop_instance_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(inst.transfer_syntax)
    return ds


def _send_items(event: Event, archive: Archive, instances: list[StoredInstance],
                accepted: dict[str, set[str]]) -> Iterator[Any]:
    """(status, dataset) for each instance; honours C-CANCEL between sub-operations."""
    for inst in instances:
        if event.is_cancelled:
            log.info("retrieve cancelled by the peer")
            yield CANCEL, None
            return
        ok = accepted.get(inst.sop_class_uid, set())
        try:
            ds = _encoded(archive, inst, ok) or archive.dataset_for(inst, ok)
        except AnimError as e:
            log.warning("retrieve: %s cannot be sent: %s", inst.sop_instance_uid, e)
            ds = _failed(inst)
        else:
            metrics.of(archive).retrieved(_PROTOCOL[event.event.name], inst.size, 1)
        yield PENDING, ds


def _encoded(archive: Archive, inst: StoredInstance, ok: set[str]) -> Dataset | None:
    """The stored bytes, to go out as they are, when the peer took the stored syntax."""
    if not encoded.active() or inst.transfer_syntax not in ok:
        return None
    body = b"".join(archive.iter_dataset(inst))
    return encoded.stored(inst.sop_class_uid, inst.sop_instance_uid, inst.transfer_syntax,
                          body, lambda: archive.dataset_for(inst, ok))


def _contexts(instances: list[StoredInstance]) -> list[Any]:
    """One context per (SOP class, transfer syntax): the stored one first, then the
    uncompressed ones, so the peer's choice tells us exactly what it takes."""
    wanted: dict[tuple[str, str], None] = {}
    for inst in instances:
        wanted[(inst.sop_class_uid, inst.transfer_syntax)] = None
    for sop in {i.sop_class_uid for i in instances}:
        for ts in UNCOMPRESSED:
            wanted[(sop, str(ts))] = None
    return [build_context(sop, ts) for sop, ts in list(wanted)[:MAX_CONTEXTS]]


def _accepted(assoc: Any) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        out.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return out


def handle_move(event: Event, archive: Archive, cfg: DimseConfig) -> Iterator[Any]:
    ae_title, host = peer(event)
    dest_title = str(event.move_destination).strip()
    dest: KnownAE | None = cfg.find_ae(dest_title)
    if dest is None or not dest.host:
        log.warning("C-MOVE from %s to unknown destination %s", ae_title, dest_title)
        yield None, None  # pynetdicom answers 0xA801 Move destination unknown
        return
    problem = ""
    instances: list[StoredInstance] = []
    if not may(archive, ae_title, "move") or not _may_move_to(cfg, ae_title, dest_title):
        problem = f"AE {ae_title} may not move to {dest_title}"
    else:
        try:
            instances = _select(event, archive, f"C-MOVE to {dest_title}")
        except AnimError as e:
            problem = str(e)
    sub_assoc: dict[str, Any] = {}

    def established(ev: Event) -> None:
        sub_assoc["assoc"] = ev.assoc

    # A refused move still opens the sub-association (see below): the server AE requests
    # no contexts of its own, so propose Verification for it or associate() raises.
    kwargs = {"contexts": _contexts(instances) if instances else [build_context(Verification)],
              "evt_handlers": [(evt.EVT_CONN_OPEN, handle_conn_open),
                               (evt.EVT_ESTABLISHED, established)],
              "max_pdu": 0}
    yield dest.host, dest.port, kwargs
    if problem:
        # pynetdicom only reports a failure after the sub-association: one "sub-op"
        yield 1
        code = (status.REFUSED_NOT_AUTHORIZED if problem.startswith("AE ")
                else IDENTIFIER_DOES_NOT_MATCH)
        _audit(event, archive, AuditAction.RETRIEVE, "failure", None,
               f"C-MOVE to {dest_title}", reason=problem[:64])
        log.warning("C-MOVE from %s refused: %s", ae_title, problem)
        yield status_reply(code, problem), None
        return
    yield len(instances)
    log.info("C-MOVE from %s/%s to %s: %d instances", ae_title, host, dest_title,
             len(instances))
    accepted = _accepted(sub_assoc["assoc"]) if "assoc" in sub_assoc else {}
    yield from _send_items(event, archive, instances, accepted)


def _may_move_to(cfg: DimseConfig, ae_title: str, dest: str) -> bool:
    known = cfg.find_ae(ae_title)
    return known is None or not known.destinations or dest in known.destinations


def handle_get(event: Event, archive: Archive, cfg: DimseConfig) -> Iterator[Any]:
    ae_title, host = peer(event)
    if not may(archive, ae_title, "get"):
        _audit(event, archive, AuditAction.RETRIEVE, "failure", None, "C-GET",
               reason="not permitted")
        yield 1
        yield status_reply(status.REFUSED_NOT_AUTHORIZED, f"AE {ae_title} may not retrieve"), None
        return
    try:
        instances = _select(event, archive, "C-GET")
    except AnimError as e:
        log.warning("C-GET from %s (%s) refused: %s", ae_title, host, e)
        yield 1
        yield status_reply(IDENTIFIER_DOES_NOT_MATCH, str(e)), None
        return
    yield len(instances)
    log.info("C-GET from %s/%s: %d instances", ae_title, host, len(instances))
    yield from _send_items(event, archive, instances, _accepted(event.assoc))
