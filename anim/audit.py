"""The audit trail's records and how they leave the archive (docs/security.md "Audit").

An :class:`AuditEvent` says who did what to which patient's studies, when, and how it
ended. The index keeps the events in an append-only, hash-chained table
(:mod:`anim.index.audit_log`); each record's hash covers the previous record's hash, so a
changed, removed or inserted row breaks the chain. For an ATNA audit repository each
event is also rendered as a DICOM Audit Message (PS3.15 A.5, derived from RFC 3881) in an
RFC 5424 syslog frame, sent over UDP (RFC 5426), TCP (RFC 6587) or TLS (RFC 5425) as
IHE ITI TF-2 3.20.6 (Record Audit Event) asks.

Events carry identifiers (patient ID, study UIDs) but never names or other demographics,
and the ``reason`` and ``detail`` texts are short codes and counts.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import enum
import functools
import hashlib
import ipaddress
import json
import logging
import os
import queue
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

if TYPE_CHECKING:
    from anim.security import Principal

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # the previous hash of the first record


class AuditAction(enum.StrEnum):
    STORE = "store"
    QUERY = "query"
    RETRIEVE = "retrieve"
    EXPORT = "export"
    DELETE = "delete"
    ASSOCIATION = "association"  # a DICOM association accepted or rejected
    LOGIN = "login"  # an HTTP bearer token accepted or refused
    QUARANTINE = "quarantine"
    RESTORE = "restore"
    REVOKE = "revoke"
    SHARE = "share"
    RESTRICT = "restrict"  # a patient-requested restriction (EHDS Art. 8)
    AUDIT = "audit"  # the audit trail itself was read (PS3.15 A.5.3.2)


# Actions that touch a patient's images: the "who accessed" report (EHDS Art. 8/9)
ACCESS_ACTIONS = (AuditAction.RETRIEVE, AuditAction.QUERY, AuditAction.EXPORT,
                  AuditAction.STORE, AuditAction.DELETE)

# "serious" is for the archive's own failures (an error, not a refusal)
OUTCOMES = ("success", "failure", "serious")
WHO_KINDS = ("ae", "token", "local")

# Column sizes of the audit table; values are clipped to them before hashing, so what
# is hashed is exactly what the database keeps.
LIMITS = {"reason": 128, "who": 128, "institution": 64, "address": 64, "patient_id": 64,
          "issuer": 64, "detail": 256, "at": 32}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _clean(value: object, limit: int) -> str:
    # PostgreSQL text cannot hold NUL; control characters have no place in an audit line
    s = "".join(ch for ch in str(value or "") if ch >= " " or ch == "\t")
    return s[:limit]


@dataclass(frozen=True)
class AuditEvent:
    action: AuditAction
    outcome: str  # "success" | "failure" | "serious"
    reason: str = ""  # short and free of patient data: "ok", "forbidden", "unknown AE"
    who_kind: str = "local"  # "ae" | "token" | "local"
    who: str = "local"  # AE title, token subject, or "local"
    institution: str = ""
    address: str = ""  # peer IP address
    patient_id: str = ""
    issuer: str = ""  # IssuerOfPatientID
    study_uids: tuple[str, ...] = ()
    detail: str = ""  # e.g. the query level or a count; never names
    at: str = ""  # ISO 8601 UTC; filled when recorded

    def __post_init__(self) -> None:
        put = object.__setattr__
        put(self, "action", AuditAction(self.action))
        if self.outcome not in OUTCOMES:
            raise ValueError(f"audit outcome must be one of {OUTCOMES}, not {self.outcome!r}")
        if self.who_kind not in WHO_KINDS:
            raise ValueError(f"audit who_kind must be one of {WHO_KINDS}, "
                             f"not {self.who_kind!r}")
        for name, limit in LIMITS.items():
            put(self, name, _clean(getattr(self, name), limit))
        # '\' joins the UIDs in the table; a UID never holds one (PS3.5 9.1)
        put(self, "study_uids", tuple(_clean(u, 64).replace("\\", "")
                                      for u in self.study_uids if u))

    def stamped(self) -> AuditEvent:
        """This event with its time filled in (now) when it has none."""
        return self if self.at else dataclasses.replace(self, at=now())


FIELDS = tuple(f.name for f in dataclasses.fields(AuditEvent))


def from_principal(principal: Principal, action: AuditAction | str, outcome: str,
                   reason: str = "", *, patient_id: str = "", issuer: str = "",
                   study_uids: tuple[str, ...] | list[str] = (), detail: str = "",
                   at: str = "") -> AuditEvent:
    """The event of *principal* doing *action*."""
    return AuditEvent(action=AuditAction(action), outcome=outcome, reason=reason,
                      who_kind=principal.kind, who=principal.subject,
                      institution=principal.institution, address=principal.address,
                      patient_id=patient_id, issuer=issuer, study_uids=tuple(study_uids),
                      detail=detail, at=at)


# ---- hash chain ---------------------------------------------------------------------


def canonical(seq: int, prev_hash: str, event: AuditEvent) -> bytes:
    """The bytes a record's hash covers: sorted-key JSON of its place and every field."""
    doc: dict[str, object] = {"seq": int(seq), "prev_hash": prev_hash}
    for name in FIELDS:
        value = getattr(event, name)
        doc[name] = list(value) if name == "study_uids" else str(value)
    return json.dumps(doc, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def record_hash(prev_hash: str, seq: int, event: AuditEvent) -> str:
    return hashlib.sha256(canonical(seq, prev_hash, event)).hexdigest()


# ---- DICOM Audit Message (PS3.15 A.5) -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    system: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# EventID (CID 400) and EventActionCode per action, with the EventTypeCode where the
# message's table requires one. Sections are those of PS3.15 A.5.3.
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")  # A.5.3.7
SECURITY_ALERT = _dcm("110113", "Security Alert")  # A.5.3.11; types from CID 403
OBJECT_SECURITY_CHANGED = _dcm("110135", "Object Security Attributes Changed")
EVENTS: dict[AuditAction, tuple[Code, str, Code | None]] = {
    # the archive receives: "C" as it did not hold the copies (A.5.3.7)
    AuditAction.STORE: (INSTANCES_TRANSFERRED, "C", None),
    AuditAction.QUERY: (_dcm("110112", "Query"), "E", None),  # A.5.3.10
    # the archive sends and cannot know what the receiver held: "R" (A.5.3.7)
    AuditAction.RETRIEVE: (INSTANCES_TRANSFERRED, "R", None),
    AuditAction.EXPORT: (_dcm("110106", "Export"), "R", None),  # A.5.3.4
    AuditAction.DELETE: (_dcm("110105", "DICOM Study Deleted"), "D", None),  # A.5.3.8
    # node authentication of an association peer, success or failure (A.5.3.11 note)
    AuditAction.ASSOCIATION: (SECURITY_ALERT, "E", _dcm("110126", "Node Authentication")),
    AuditAction.LOGIN: (_dcm("110114", "User Authentication"), "E",  # A.5.3.12
                        _dcm("110122", "Login")),
    AuditAction.QUARANTINE: (SECURITY_ALERT, "E", OBJECT_SECURITY_CHANGED),
    AuditAction.RESTORE: (SECURITY_ALERT, "E", OBJECT_SECURITY_CHANGED),
    AuditAction.SHARE: (SECURITY_ALERT, "E", OBJECT_SECURITY_CHANGED),
    AuditAction.RESTRICT: (SECURITY_ALERT, "E", OBJECT_SECURITY_CHANGED),
    AuditAction.REVOKE: (SECURITY_ALERT, "E", _dcm("110137", "User security Attributes Changed")),
    AuditAction.AUDIT: (_dcm("110101", "Audit Log Used"), "R", None),  # A.5.3.2
}

# RFC 3881 5.1.4: 0 success, 4 minor failure, 8 serious failure (action terminated).
# A refusal is a minor failure: the security mitigation worked (A.5.3.11).
OUTCOME_INDICATOR = {"success": "0", "failure": "4", "serious": "8"}

SOURCE_ROLE = _dcm("110153", "Source Role ID")
DESTINATION_ROLE = _dcm("110152", "Destination Role ID")
MEDIA_ROLE = _dcm("110154", "Destination Media")
MEDIA_URI = _dcm("110037", "URI")  # CID 405 Media Type
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
STUDY_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
URI = Code("12", "RFC-3881", "URI")
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # PS3.4 C.6.2


def _coded(parent: ET.Element, tag: str, c: Code) -> ET.Element:
    # CodedValueType of the A.5.1 schema: csd-code, codeSystemName, originalText
    return ET.SubElement(parent, tag, {"csd-code": c.code, "codeSystemName": c.system,
                                       "originalText": c.meaning})


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _hl7_escape(s: str) -> str:
    # HL7 v2 escapes for the CX delimiters (HL7 v2.5 2.7.4)
    return (s.replace("\\", "\\E\\").replace("^", "\\S\\").replace("&", "\\T\\")
            .replace("~", "\\R\\").replace("|", "\\F\\"))


def patient_object_id(patient_id: str, issuer: str) -> str:
    """The patient as an HL7 CX: ``ID^^^ISSUER`` (IssuerOfPatientID is the assigning
    authority's namespace, CX.4.1), or the bare ID without an issuer."""
    pid = _hl7_escape(patient_id)
    return f"{pid}^^^{_hl7_escape(issuer)}" if issuer else pid


def _address_type(address: str) -> str:
    # RFC 3881 NetworkAccessPointTypeCode: 1 machine name, 2 IP address
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return "1"
    return "2"


def _participant(root: ET.Element, user_id: str, requestor: bool, address: str = "",
                 roles: tuple[Code, ...] = ()) -> ET.Element:
    attrs = {"UserID": user_id or "-", "UserIsRequestor": "true" if requestor else "false"}
    if address:
        attrs["NetworkAccessPointID"] = address
        attrs["NetworkAccessPointTypeCode"] = _address_type(address)
    el = ET.SubElement(root, "ActiveParticipant", attrs)
    for role in roles:
        _coded(el, "RoleIDCode", role)
    return el


def _participants(root: ET.Element, e: AuditEvent, source_id: str) -> None:
    """The caller and the archive, in the roles the action's message table gives them."""
    a = e.action
    caller = e.who if e.who_kind != "local" else f"local@{socket.gethostname()}"
    if a in (AuditAction.STORE, AuditAction.QUERY, AuditAction.DELETE):
        _participant(root, caller, True, e.address, (SOURCE_ROLE,))
        _participant(root, source_id, False, roles=(DESTINATION_ROLE,))
    elif a is AuditAction.RETRIEVE:
        _participant(root, source_id, False, roles=(SOURCE_ROLE,))
        _participant(root, caller, True, e.address, (DESTINATION_ROLE,))
    elif a is AuditAction.EXPORT:  # A.5.3.4: the remote receiver, the exporter, the media
        _participant(root, caller, True, e.address, (DESTINATION_ROLE,))
        _participant(root, source_id, False, roles=(SOURCE_ROLE,))
        media = _participant(root, e.address or caller, False, e.address, (MEDIA_ROLE,))
        if not e.address:  # A.5.3.4: MediaIdentifier when there is no network address
            _coded(ET.SubElement(media, "MediaIdentifier"), "MediaType", MEDIA_URI)
    elif a in (AuditAction.LOGIN, AuditAction.AUDIT):
        _participant(root, caller, True, e.address)
        _participant(root, source_id, False)
    else:
        # Security Alert (A.5.3.11): the archive reports; the performing participant's
        # UserIsRequestor "shall be false"
        _participant(root, source_id, False)
        _participant(root, caller, False, e.address)


def _objects(root: ET.Element, e: AuditEvent) -> None:
    alert = EVENTS[e.action][0] is SECURITY_ALERT
    description = e.reason or e.action.value
    if e.action is AuditAction.QUERY:
        # A.5.3.10: the query, named by its information model's SOP Class; the query
        # keys themselves are not kept (they may hold names), only the level
        q = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": STUDY_ROOT_FIND, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})
        _coded(q, "ParticipantObjectIDTypeCode", SOP_CLASS_UID)
        ET.SubElement(q, "ParticipantObjectQuery").text = _b64(e.detail)
    if e.action is AuditAction.AUDIT:
        log_obj = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": "anim:audit", "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "13"})  # A.5.3.2: Security Resource
        _coded(log_obj, "ParticipantObjectIDTypeCode", URI)
        ET.SubElement(log_obj, "ParticipantObjectName").text = "Security Audit Log"
    for uid in e.study_uids:
        s = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": uid, "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3"})  # System Object, Report
        _coded(s, "ParticipantObjectIDTypeCode", STUDY_UID)
        if alert:  # A.5.3.11: each alert subject carries an "Alert Description"
            ET.SubElement(s, "ParticipantObjectDetail",
                          {"type": "Alert Description", "value": _b64(description)})
    if e.patient_id:
        p = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": patient_object_id(e.patient_id, e.issuer),
            "ParticipantObjectTypeCode": "1", "ParticipantObjectTypeCodeRole": "1"})
        _coded(p, "ParticipantObjectIDTypeCode", PATIENT_NUMBER)
        if alert:
            ET.SubElement(p, "ParticipantObjectDetail",
                          {"type": "Alert Description", "value": _b64(description)})


def dicom_audit_message(event: AuditEvent, source_id: str) -> str:
    """*event* as a DICOM Audit Message (PS3.15 A.5.1 schema): one line of UTF-8 XML."""
    e = event.stamped()
    event_id, action_code, type_code = EVENTS[e.action]
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": action_code, "EventDateTime": e.at,
        "EventOutcomeIndicator": OUTCOME_INDICATOR[e.outcome]})
    _coded(ident, "EventID", event_id)
    if type_code is not None:
        _coded(ident, "EventTypeCode", type_code)
    if e.reason:
        ET.SubElement(ident, "EventOutcomeDescription").text = e.reason
    _participants(root, e, source_id)
    src_attrs = {"AuditSourceID": source_id}
    if e.institution:
        src_attrs["AuditEnterpriseSiteID"] = e.institution
    src = ET.SubElement(root, "AuditSourceIdentification", src_attrs)
    # RFC 3881 5.4.3 type 4: application server process tier
    _coded(src, "AuditSourceTypeCode", Code("4", "RFC-3881", "Application Server"))
    _objects(root, e)
    return ET.tostring(root, encoding="unicode")


# ---- syslog (RFC 5424) --------------------------------------------------------------

FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5
MSGID = "IHE+RFC-3881"  # IHE ITI TF-2a 3.20.6.1
BOM = b"\xef\xbb\xbf"


def _ascii_field(s: str, limit: int) -> str:
    # RFC 5424 6.2: header fields are PRINTUSASCII (33..126), NILVALUE "-" when empty
    out = "".join(ch for ch in s if 33 <= ord(ch) <= 126)[:limit]
    return out or "-"


def _timestamp(at: str) -> str:
    # RFC 5424 6.2.3: RFC 3339 with at most 6 fractional digits; "Z" for UTC
    try:
        t = datetime.fromisoformat(at)
    except ValueError:
        return "-"
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@functools.cache
def _hostname() -> str:
    return socket.getfqdn()  # may ask DNS: once per process


def syslog_message(event: AuditEvent, seq: int, xml: str, app_name: str = "anim",
                   hostname: str | None = None) -> bytes:
    """One RFC 5424 message: ``<85>1 TIMESTAMP HOST APP PROCID MSGID SD BOM XML``.

    The audit record's sequence number travels as RFC 5424 7.3.1 ``meta sequenceId`` so
    a repository can spot a lost message; it wraps at 2**31 - 1 as that section says.
    """
    pri = FACILITY_AUTHPRIV * 8 + SEVERITY_NOTICE
    host = _ascii_field(hostname if hostname is not None else _hostname(), 255)
    sequence = (int(seq) - 1) % 2147483647 + 1
    header = (f"<{pri}>1 {_timestamp(event.stamped().at)} {host} "
              f"{_ascii_field(app_name, 48)} {os.getpid()} {MSGID} "
              f'[meta sequenceId="{sequence}"] ')
    return header.encode("ascii") + BOM + xml.encode("utf-8")


class SyslogSender:
    """Sends syslog messages to one collector from a background thread.

    ``udp://host:port`` sends one datagram per message (RFC 5426); ``tcp://`` and
    ``tls://`` use octet-counting framing, ``LEN SP MSG`` (RFC 6587 3.4.1, RFC 5425 4.3).
    For TLS, ``?ca=FILE&cert=FILE&key=FILE`` name the collector's CA and this node's
    certificate (IHE ATNA authenticates both ends).

    Never raises into the caller: a collector that is down costs a warning and, past a
    bounded queue, dropped messages. The audit table is the record of truth.
    """

    def __init__(self, url: str, queue_max: int = 10_000,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        u = urlsplit(url)
        if u.scheme not in ("udp", "tcp", "tls") or not u.hostname or not u.port:
            raise ValueError("audit syslog_url must be udp://, tcp:// or tls://host:port")
        self.scheme, self.host, self.port = u.scheme, u.hostname, u.port
        self._ssl = ssl_context
        if self.scheme == "tls" and self._ssl is None:
            q = {k: v[-1] for k, v in parse_qs(u.query).items()}
            self._ssl = ssl.create_default_context(cafile=q.get("ca"))
            if q.get("cert"):
                self._ssl.load_cert_chain(q["cert"], q.get("key"))
        self._queue: queue.Queue[bytes | None] = queue.Queue(queue_max)
        self._sock: socket.socket | None = None
        self._lock = threading.Condition()
        self._pending = 0  # queued or being sent
        self.sent = 0
        self.dropped = 0
        self._warned_at = 0.0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="anim-audit-syslog",
                                         daemon=True)
        self._thread.start()

    def send(self, message: bytes) -> None:
        """Queue *message*; drop it (and warn) when the queue is full."""
        with self._lock:
            if self._closed:
                return
            try:
                self._queue.put_nowait(message)
            except queue.Full:
                self.dropped += 1
                self._warn("audit syslog: queue full, message dropped (%d so far)",
                           self.dropped)
                return
            self._pending += 1

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued was sent or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout)
        self._disconnect()

    # -- the sending thread --

    def _warn(self, msg: str, *args: object) -> None:
        # at most one warning every 30 s; never the message (it holds patient IDs)
        t = time.monotonic()
        if t - self._warned_at >= 30:
            self._warned_at = t
            log.warning(msg, *args)

    def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                msg = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if msg is None:
                return
            if self._closed:  # close() gave the flush its time: drop what is left
                with self._lock:
                    self._finish(sent=False)
                continue
            while not self._attempt(msg):
                with self._lock:
                    if self._closed:  # close() already waited for the flush
                        self._finish(sent=False)
                        break
                    self._lock.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            else:
                backoff = 0.2

    def _attempt(self, msg: bytes) -> bool:
        """Send *msg*; True when it is done with (sent or undeliverable)."""
        if self.scheme == "udp" and len(msg) > 65507:
            # the largest IPv4 UDP payload (RFC 5426 3.2): it can never go
            self._warn("audit syslog: message of %d bytes too large for UDP, dropped", len(msg))
            with self._lock:
                self._finish(sent=False)
            return True
        try:
            self._deliver(msg)
        except OSError as e:
            self._disconnect()
            self._warn("audit syslog: cannot send to %s://%s:%d (%s); retrying",
                       self.scheme, self.host, self.port, type(e).__name__)
            return False
        with self._lock:
            self._finish(sent=True)
        return True

    def _finish(self, sent: bool) -> None:  # with self._lock held
        self._pending -= 1
        if sent:
            self.sent += 1
        else:
            self.dropped += 1
        self._lock.notify_all()

    def _deliver(self, msg: bytes) -> None:
        if self._sock is None:
            self._sock = self._connect()
        if self.scheme == "udp":
            self._sock.send(msg)
        else:
            self._sock.sendall(str(len(msg)).encode("ascii") + b" " + msg)

    def _connect(self) -> socket.socket:
        if self.scheme == "udp":
            family, _t, _p, _c, addr = socket.getaddrinfo(self.host, self.port,
                                                           type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect(addr)
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=10)
        if self._ssl is not None:
            try:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            except BaseException:
                sock.close()
                raise
        return sock

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
