"""The audit trail: hash chain, tamper detection, search, DICOM audit messages, syslog.

Database tests run on SQLite and on a real PostgreSQL (``index_url``); syslog tests use
real UDP, TCP and TLS listeners on loopback.
"""

from __future__ import annotations

import argparse
import base64
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from anim import Archive, load_config
from anim.audit import (
    GENESIS,
    AuditAction,
    AuditEvent,
    SyslogSender,
    dicom_audit_message,
    from_principal,
    record_hash,
    syslog_message,
)
from anim.audit_cli import add_parser, parse_patient
from anim.index.audit_log import AuditLog, AuditRecorder, create_audit_table
from anim.index.engine import make_engine
from anim.index.migrations import migrate
from anim.security import Principal
from tests.conftest import ROOT

PAT_A = ("PA-1", "HOSP-A")
PAT_B = ("PB-7", "HOSP-B")
STUDY_A1, STUDY_A2, STUDY_B = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.12", \
    "1.2.826.0.1.3680043.8.498.2"
CT_A = Principal(kind="ae", subject="CT_A", institution="HOSP-A", address="10.1.0.5")
DR_B = Principal(kind="token", subject="dr.b", institution="HOSP-B", address="10.2.0.7")


def ev(action: AuditAction, who: Principal = CT_A, outcome: str = "success",
       patient: tuple[str, str] = ("", ""), studies: tuple[str, ...] = (),
       detail: str = "", reason: str = "ok") -> AuditEvent:
    return from_principal(who, action, outcome, reason, patient_id=patient[0],
                          issuer=patient[1], study_uids=studies, detail=detail)


# ---- the database under test -------------------------------------------------------------


def prepare(url: str) -> Engine:
    engine = make_engine(url)
    migrate(engine)
    with engine.connect().execution_options(anim_writer=True) as conn, conn.begin():
        create_audit_table(conn)
        create_audit_table(conn)  # idempotent
    return engine


@pytest.fixture
def engine(index_url: str) -> Iterator[Engine]:
    e = prepare(index_url)
    yield e
    e.dispose()


def seqs_and_links(engine: Engine) -> list[tuple[int, str, str]]:
    with engine.connect() as conn:
        return [(int(r.seq), r.prev_hash, r.hash) for r in
                conn.execute(text("SELECT seq, prev_hash, hash FROM audit ORDER BY seq"))]


def tamper(engine: Engine, sql: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(sql))


# ---- hash chain -------------------------------------------------------------------------


def test_appends_form_one_chain(engine: Engine) -> None:
    log = AuditLog(engine)
    assert log.append([]) == []
    assert log.append([ev(AuditAction.ASSOCIATION)]) == [1]
    assert log.append([ev(AuditAction.STORE, patient=PAT_A, studies=(STUDY_A1,)),
                       ev(AuditAction.QUERY, detail="STUDY")]) == [2, 3]
    rows = seqs_and_links(engine)
    assert [r[0] for r in rows] == [1, 2, 3]
    assert rows[0][1] == GENESIS
    assert [r[1] for r in rows[1:]] == [r[2] for r in rows[:-1]]  # each links the previous
    first = log.search(action="association")[0]
    assert rows[0][2] == record_hash(GENESIS, 1, AuditEvent(
        action=AuditAction.ASSOCIATION, outcome="success", reason="ok", who_kind="ae",
        who="CT_A", institution="HOSP-A", address="10.1.0.5", at=first["at"]))
    assert log.verify().ok
    assert log.verify().checked == 3
    assert log.last_seq() == 3


def test_empty_trail_verifies(engine: Engine) -> None:
    r = AuditLog(engine).verify()
    assert (r.ok, r.checked, r.first_bad_seq) == (True, 0, None)


def test_events_are_clipped_and_cleaned_before_hashing(engine: Engine) -> None:
    log = AuditLog(engine)
    long = AuditEvent(action=AuditAction.QUERY, outcome="failure", reason="x" * 500,
                      who_kind="token", who="a\x00b\nc", detail="d" * 1000)
    assert (len(long.reason), long.who, len(long.detail)) == (128, "abc", 256)
    log.append([long])
    assert log.verify().ok
    with pytest.raises(ValueError, match="outcome"):
        AuditEvent(action=AuditAction.QUERY, outcome="maybe")
    with pytest.raises(ValueError, match="peek"):
        AuditEvent(action="peek", outcome="success")  # type: ignore[arg-type]


APPENDER = """
import sys
from anim.audit import AuditAction, AuditEvent
from anim.index.audit_log import AuditLog
from anim.index.engine import make_engine
url, who, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = AuditLog(make_engine(url))
for i in range(rounds):
    log.append([AuditEvent(action=AuditAction.RETRIEVE, outcome="success", who_kind="ae",
                           who=who, detail=str(i))] * (1 + i % 3))
"""


def test_concurrent_appenders_keep_one_linear_chain(index_url: str) -> None:
    engine = prepare(index_url)
    try:
        log = AuditLog(engine)
        rounds = 20
        per_writer = sum(1 + i % 3 for i in range(rounds))
        procs = [subprocess.Popen([sys.executable, "-c", APPENDER, index_url, f"PROC{n}",
                                   str(rounds)], cwd=ROOT) for n in range(3)]

        def thread_writer(who: str) -> None:
            own = AuditLog(engine)
            for i in range(rounds):
                own.append([AuditEvent(action=AuditAction.QUERY, outcome="success",
                                       who_kind="token", who=who, detail=str(i))]
                           * (1 + i % 3))

        threads = [threading.Thread(target=thread_writer, args=(f"THREAD{n}",))
                   for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert [p.wait(120) for p in procs] == [0, 0, 0]
        total = 6 * per_writer
        result = log.verify()
        assert result.ok, result
        assert result.checked == total
        assert [r[0] for r in seqs_and_links(engine)] == list(range(1, total + 1))
        for who in [f"PROC{n}" for n in range(3)] + [f"THREAD{n}" for n in range(3)]:
            assert len(log.search(who=who, limit=1000)) == per_writer
    finally:
        engine.dispose()


# ---- tamper detection -------------------------------------------------------------------


def fill(engine: Engine, n: int = 6) -> AuditLog:
    log = AuditLog(engine)
    for i in range(n):
        log.append([ev(AuditAction.RETRIEVE, patient=PAT_A, studies=(STUDY_A1,),
                       detail=f"{i} instances")])
    assert log.verify().ok
    return log


def test_a_changed_row_is_found(engine: Engine) -> None:
    log = fill(engine)
    tamper(engine, "UPDATE audit SET who = 'SOMEONE_ELSE' WHERE seq = 3")
    r = log.verify()
    assert (r.ok, r.first_bad_seq, r.checked) == (False, 3, 2)
    assert "modified" in r.reason


def test_a_changed_row_with_a_recomputed_hash_breaks_the_next_link(engine: Engine) -> None:
    log = fill(engine)
    with engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM audit WHERE seq = 3")).mappings().one()
    forged = AuditEvent(**{k: row[k] for k in ("at", "outcome", "reason", "who_kind",
                                               "institution", "address", "patient_id",
                                               "issuer", "detail")},
                        action=AuditAction(row["action"]), who="SOMEONE_ELSE",
                        study_uids=tuple(row["study_uids"].split("\\")))
    h = record_hash(row["prev_hash"], 3, forged)
    tamper(engine, f"UPDATE audit SET who = 'SOMEONE_ELSE', hash = '{h}' WHERE seq = 3")
    r = log.verify()
    assert (r.ok, r.first_bad_seq) == (False, 4)
    assert "link" in r.reason


def test_a_deleted_row_is_found_as_a_gap(engine: Engine) -> None:
    log = fill(engine)
    tamper(engine, "DELETE FROM audit WHERE seq = 4")
    r = log.verify()
    assert (r.ok, r.first_bad_seq) == (False, 4)
    assert "record 4 is missing" in r.reason


def test_rows_cut_off_the_end_are_found(engine: Engine) -> None:
    log = fill(engine)
    tamper(engine, "DELETE FROM audit WHERE seq >= 5")
    r = log.verify()
    assert (r.ok, r.first_bad_seq) == (False, 5)
    assert "missing at the end" in r.reason


def test_a_forged_row_appended_past_the_head_is_found(engine: Engine) -> None:
    log = fill(engine)
    # a well-formed record 7 with a correct hash and link, written around the API
    last = seqs_and_links(engine)[-1]
    forged = AuditEvent(action=AuditAction.RETRIEVE, outcome="success", who_kind="ae",
                        who="INTRUDER", at="2026-01-01T00:00:00.000000+00:00")
    h = record_hash(last[2], 7, forged)
    tamper(engine, "INSERT INTO audit (seq, at, action, outcome, reason, who_kind, who, "
                   "institution, address, patient_id, issuer, study_uids, detail, "
                   f"prev_hash, hash) VALUES (7, '{forged.at}', 'retrieve', 'success', '', "
                   f"'ae', 'INTRUDER', '', '', '', '', '', '', '{last[2]}', '{h}')")
    r = log.verify()
    assert (r.ok, r.first_bad_seq, r.checked) == (False, 7, 7)
    assert "past the chain head" in r.reason


# ---- search and the per-patient report ------------------------------------------------


def test_search_and_patient_access_return_exactly_what_was_recorded(engine: Engine) -> None:
    log = AuditLog(engine)
    recorded = [
        ev(AuditAction.ASSOCIATION),
        ev(AuditAction.STORE, patient=PAT_A, studies=(STUDY_A1, STUDY_A2), detail="12"),
        ev(AuditAction.LOGIN, who=DR_B),
        ev(AuditAction.STORE, who=DR_B, patient=PAT_B, studies=(STUDY_B,)),
        ev(AuditAction.QUERY, who=DR_B, patient=PAT_A, detail="STUDY", outcome="failure",
           reason="forbidden"),
        ev(AuditAction.RETRIEVE, patient=PAT_A, studies=(STUDY_A1,)),
        ev(AuditAction.QUARANTINE, patient=PAT_A, studies=(STUDY_A2,)),  # not an access
        ev(AuditAction.EXPORT, patient=PAT_B, studies=(STUDY_B,)),
        ev(AuditAction.DELETE, patient=PAT_A, studies=(STUDY_A2,)),
    ]
    for e in recorded:
        log.append([e])
    a = log.patient_access(*PAT_A)
    assert [(r["seq"], r["action"], r["who"], r["outcome"]) for r in a] == [
        (9, "delete", "CT_A", "success"), (6, "retrieve", "CT_A", "success"),
        (5, "query", "dr.b", "failure"), (2, "store", "CT_A", "success")]
    assert a[-1]["study_uids"] == [STUDY_A1, STUDY_A2]
    assert a[-1]["institution"] == "HOSP-A"
    assert a[-1]["address"] == "10.1.0.5"
    assert [r["seq"] for r in log.patient_access(*PAT_B)] == [8, 4]
    assert log.patient_access("PA-1", "OTHER") == []

    assert [r["seq"] for r in log.search(action="store")] == [4, 2]
    assert [r["seq"] for r in log.search(who="dr.b")] == [5, 4, 3]
    assert [r["seq"] for r in log.search(institution="HOSP-B")] == [5, 4, 3]
    assert [r["seq"] for r in log.search(patient_id=PAT_A[0], issuer=PAT_A[1])] == \
        [9, 7, 6, 5, 2]
    # whole-UID match: STUDY_A1 is a prefix of STUDY_A2 and must not match it
    assert [r["seq"] for r in log.search(study_uid=STUDY_A1)] == [6, 2]
    assert [r["seq"] for r in log.search(study_uid=STUDY_A2)] == [9, 7, 2]
    assert log.search(study_uid="1.2.826%") == []
    assert [r["seq"] for r in log.search(limit=2)] == [9, 8]
    at = {r["seq"]: r["at"] for r in log.search(limit=100)}
    assert [r["seq"] for r in log.search(since=at[3], until=at[6])] == [5, 4, 3]
    assert log.search(since="2999-01-01") == []
    assert [s for s, _e in log.events(since=at[8])] == [8, 9]


# ---- DICOM audit messages (PS3.15 A.5) --------------------------------------------------


def codes(el: ET.Element | None) -> tuple[str, str, str]:
    assert el is not None
    return el.get("csd-code", ""), el.get("codeSystemName", ""), el.get("originalText", "")


def participants(root: ET.Element) -> list[dict[str, Any]]:
    return [{**p.attrib, "roles": [codes(r)[0] for r in p.findall("RoleIDCode")]}
            for p in root.findall("ActiveParticipant")]


def objects(root: ET.Element) -> list[tuple[str, str, str, str]]:
    return [(o.get("ParticipantObjectID", ""), o.get("ParticipantObjectTypeCode", ""),
             o.get("ParticipantObjectTypeCodeRole", ""),
             codes(o.find("ParticipantObjectIDTypeCode"))[0])
            for o in root.findall("ParticipantObjectIdentification")]


@pytest.mark.parametrize(("action", "event_id", "action_code", "type_code"), [
    (AuditAction.STORE, "110104", "C", None),
    (AuditAction.RETRIEVE, "110104", "R", None),
    (AuditAction.QUERY, "110112", "E", None),
    (AuditAction.EXPORT, "110106", "R", None),
    (AuditAction.DELETE, "110105", "D", None),
    (AuditAction.ASSOCIATION, "110113", "E", "110126"),
    (AuditAction.LOGIN, "110114", "E", "110122"),
    (AuditAction.QUARANTINE, "110113", "E", "110135"),
    (AuditAction.RESTORE, "110113", "E", "110135"),
    (AuditAction.SHARE, "110113", "E", "110135"),
    (AuditAction.RESTRICT, "110113", "E", "110135"),
    (AuditAction.REVOKE, "110113", "E", "110137"),
    (AuditAction.AUDIT, "110101", "R", None),
])
def test_dicom_audit_message_codes(action: AuditAction, event_id: str, action_code: str,
                                   type_code: str | None) -> None:
    e = ev(action, patient=PAT_A, studies=(STUDY_A1, STUDY_A2), detail="STUDY")
    xml = dicom_audit_message(e, "ANIM")
    root = ET.fromstring(xml.encode("utf-8"))
    assert root.tag == "AuditMessage"
    assert [c.tag for c in root][:1] == ["EventIdentification"]
    ident = root.find("EventIdentification")
    assert ident is not None
    assert codes(ident.find("EventID"))[:2] == (event_id, "DCM")
    assert ident.get("EventActionCode") == action_code
    assert ident.get("EventOutcomeIndicator") == "0"
    assert ident.get("EventDateTime")
    assert [codes(t)[0] for t in ident.findall("EventTypeCode")] == \
        ([type_code] if type_code else [])
    ps = participants(root)
    caller = [p for p in ps if p["UserID"] == "CT_A"]
    assert len(caller) == 1
    assert caller[0]["NetworkAccessPointID"] == "10.1.0.5"
    assert caller[0]["NetworkAccessPointTypeCode"] == "2"
    assert any(p["UserID"] == "ANIM" and p["UserIsRequestor"] == "false" for p in ps)
    src = root.find("AuditSourceIdentification")
    assert src is not None
    assert src.get("AuditSourceID") == "ANIM"
    objs = objects(root)
    assert ("PA-1^^^HOSP-A", "1", "1", "2") in objs  # patient: person, patient, RFC-3881 2
    assert (STUDY_A1, "2", "3", "110180") in objs  # study: system object, report
    assert (STUDY_A2, "2", "3", "110180") in objs


def test_dicom_audit_message_roles_and_outcomes() -> None:
    def roles(action: AuditAction) -> dict[str, tuple[str, list[str]]]:
        root = ET.fromstring(dicom_audit_message(ev(action), "ANIM"))
        return {p["UserID"]: (p["UserIsRequestor"], p["roles"]) for p in participants(root)}

    # A.5.3.7: on store the caller is the source; on retrieve the destination
    assert roles(AuditAction.STORE) == {"CT_A": ("true", ["110153"]),
                                        "ANIM": ("false", ["110152"])}
    assert roles(AuditAction.RETRIEVE) == {"ANIM": ("false", ["110153"]),
                                           "CT_A": ("true", ["110152"])}
    assert roles(AuditAction.QUERY)["CT_A"] == ("true", ["110153"])  # A.5.3.10
    assert "110154" in roles(AuditAction.EXPORT)["10.1.0.5"][1]  # A.5.3.4 media
    local_export = ET.fromstring(dicom_audit_message(
        AuditEvent(AuditAction.EXPORT, "success"), "ANIM"))
    media_type = local_export.find("ActiveParticipant/MediaIdentifier/MediaType")
    assert codes(media_type) == ("110037", "DCM", "URI")
    # A.5.3.11: performing participants of a Security Alert are not requestors
    assert roles(AuditAction.ASSOCIATION)["CT_A"] == ("false", [])

    failed = ET.fromstring(dicom_audit_message(
        ev(AuditAction.QUERY, outcome="failure", reason="forbidden", detail="STUDY"), "ANIM"))
    ident = failed.find("EventIdentification")
    assert ident is not None
    assert ident.get("EventOutcomeIndicator") == "4"
    assert ident.findtext("EventOutcomeDescription") == "forbidden"
    query = [o for o in failed.findall("ParticipantObjectIdentification")
             if codes(o.find("ParticipantObjectIDTypeCode"))[0] == "110181"]
    assert len(query) == 1
    assert query[0].get("ParticipantObjectID") == \
        "1.2.840.10008.5.1.4.1.2.2.1"
    assert base64.b64decode(query[0].findtext("ParticipantObjectQuery") or "") == b"STUDY"
    serious = ET.fromstring(dicom_audit_message(ev(AuditAction.STORE, outcome="serious"), "A"))
    assert serious.find("EventIdentification").get("EventOutcomeIndicator") == "8"  # type: ignore[union-attr]


def test_dicom_audit_message_escapes_markup_and_hl7_delimiters() -> None:
    who = Principal(kind="token", subject='<x&y "z">', institution="I&I", address="host.example")
    e = from_principal(who, AuditAction.RETRIEVE, "success", patient_id="P^1&2",
                       issuer="ISS", study_uids=(STUDY_A1,))
    xml = dicom_audit_message(e, "ANIM")
    root = ET.fromstring(xml.encode("utf-8"))
    assert any(p["UserID"] == '<x&y "z">' and p["NetworkAccessPointTypeCode"] == "1"
               for p in participants(root))
    assert ("P\\S\\1\\T\\2^^^ISS", "1", "1", "2") in objects(root)
    assert "\n" not in xml  # one message per line in exports
    local = ET.fromstring(dicom_audit_message(AuditEvent(AuditAction.DELETE, "success"), "A"))
    assert participants(local)[0]["UserID"].startswith("local@")


# ---- syslog over real sockets -------------------------------------------------------------

FRAME = re.compile(rb"^<(\d+)>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) \xef\xbb\xbf(.*)$",
                   re.DOTALL)


def parse_frame(msg: bytes) -> dict[str, Any]:
    m = FRAME.match(msg)
    assert m, msg[:200]
    pri = int(m.group(1))
    return {"facility": pri // 8, "severity": pri % 8, "timestamp": m.group(2).decode(),
            "host": m.group(3).decode(), "app": m.group(4).decode(),
            "procid": m.group(5).decode(), "msgid": m.group(6).decode(),
            "sd": m.group(7).decode(), "xml": ET.fromstring(m.group(8))}


def split_octet_counted(stream: bytes) -> list[bytes]:
    """RFC 6587 3.4.1 framing: ``LEN SP MSG`` repeated, nothing in between."""
    out = []
    while stream:
        length, sep, rest = stream.partition(b" ")
        assert sep, stream[:40]
        assert length.isdigit(), stream[:40]
        n = int(length)
        assert len(rest) >= n
        out.append(rest[:n])
        stream = rest[n:]
    return out


class Collector:
    """A real syslog collector on loopback: UDP datagrams, or TCP/TLS byte streams."""

    def __init__(self, kind: str, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.datagrams: list[bytes] = []
        self.streams: list[bytearray] = []
        got = threading.Condition()
        self.got = got
        collector = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with got:
                    collector.datagrams.append(self.request[0])
                    got.notify_all()

        class Tcp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                conn = self.request
                if tls is not None:
                    conn = tls.wrap_socket(conn, server_side=True)
                buf = bytearray()
                with got:
                    collector.streams.append(buf)
                while chunk := conn.recv(65536):
                    with got:
                        buf.extend(chunk)
                        got.notify_all()
                if tls is not None:
                    conn.close()

        class TcpServer(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server: socketserver.BaseServer = (
            socketserver.UDPServer(("127.0.0.1", port), Udp) if kind == "udp"
            else TcpServer(("127.0.0.1", port), Tcp))
        self.port = self.server.server_address[1]  # type: ignore[index]
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def messages(self) -> list[bytes]:
        with self.got:
            if self.datagrams:
                return list(self.datagrams)
            return [m for s in self.streams for m in split_octet_counted(bytes(s))]

    def wait_for(self, n: int, timeout: float = 10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msgs = self.messages()
            except AssertionError:  # a frame still arriving
                msgs = []
            if len(msgs) >= n or time.monotonic() > deadline:
                return msgs
            with self.got:
                self.got.wait(0.05)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def collectors() -> Iterator[list[Collector]]:
    made: list[Collector] = []
    yield made
    for c in made:
        c.close()


@pytest.fixture
def senders() -> Iterator[list[SyslogSender]]:
    """Senders a test made; closed at teardown even when the test failed."""
    made: list[SyslogSender] = []
    yield made
    for s in made:
        s.close(timeout=0.5)


def frames_for(n: int) -> list[tuple[AuditEvent, bytes]]:
    out = []
    for i in range(n):
        e = ev(AuditAction.RETRIEVE, patient=PAT_A, studies=(STUDY_A1,), detail=f"{i}").stamped()
        out.append((e, syslog_message(e, i + 1, dicom_audit_message(e, "ANIM"),
                                      hostname="archive.example")))
    return out


def check_frame(raw: bytes, seq: int) -> None:
    f = parse_frame(raw)
    assert (f["facility"], f["severity"]) == (10, 5)  # authpriv.notice
    assert (f["host"], f["app"], f["msgid"]) == ("archive.example", "anim", "IHE+RFC-3881")
    assert f["sd"] == f'[meta sequenceId="{seq}"]'
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", f["timestamp"])
    ident = f["xml"].find("EventIdentification")
    assert codes(ident.find("EventID"))[0] == "110104"


def test_syslog_over_udp_one_datagram_per_message(collectors: list[Collector],
                                                   senders: list[SyslogSender]) -> None:
    c = Collector("udp")
    collectors.append(c)
    sender = SyslogSender(f"udp://127.0.0.1:{c.port}")
    senders.append(sender)
    frames = frames_for(3)
    for _e, raw in frames:
        sender.send(raw)
    assert sender.flush(10)
    got = c.wait_for(3)
    sender.close()
    assert got == [raw for _e, raw in frames]
    for i, raw in enumerate(got):
        check_frame(raw, i + 1)


def test_syslog_over_tcp_octet_counting_and_reconnect(collectors: list[Collector],
                                                       senders: list[SyslogSender]) -> None:
    # nothing listens yet: the sender must queue and retry, never raise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = SyslogSender(f"tcp://127.0.0.1:{port}")
    senders.append(sender)
    frames = frames_for(4)
    sender.send(frames[0][1])
    assert not sender.flush(0.5)
    c = Collector("tcp", port)
    collectors.append(c)
    for _e, raw in frames[1:]:
        sender.send(raw)
    assert sender.flush(60)
    got = c.wait_for(4)
    assert got == [raw for _e, raw in frames]  # exact octet counts, order kept
    assert bytes(c.streams[0]).startswith(str(len(frames[0][1])).encode() + b" <85>1 ")
    for i, raw in enumerate(got):
        check_frame(raw, i + 1)
    sender.close()
    assert (sender.sent, sender.dropped) == (4, 0)


def test_syslog_over_tls(collectors: list[Collector], senders: list[SyslogSender],
                         tmp_path: Path) -> None:
    import trustme
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    c = Collector("tcp", tls=server_ctx)
    collectors.append(c)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sender = SyslogSender(f"tls://127.0.0.1:{c.port}?ca={ca_file}")
    senders.append(sender)
    frames = frames_for(2)
    for _e, raw in frames:
        sender.send(raw)
    assert sender.flush(20)
    assert c.wait_for(2) == [raw for _e, raw in frames]
    sender.close()


def test_syslog_sender_drops_past_its_queue_and_rejects_bad_urls(
        senders: list[SyslogSender]) -> None:
    with pytest.raises(ValueError, match="syslog_url"):
        SyslogSender("http://127.0.0.1:514")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = SyslogSender(f"tcp://127.0.0.1:{port}", queue_max=2)
    senders.append(sender)
    for _ in range(10):
        sender.send(b"x")  # never raises
    sender.close(timeout=0.5)
    assert sender.dropped >= 8


# ---- the recorder: group commit, durability, forwarding ---------------------------------


def test_recorder_flush_makes_events_durable_and_forwards(
        engine: Engine, collectors: list[Collector]) -> None:
    c = Collector("tcp")  # TCP: 400 datagrams at once would overrun a UDP socket buffer
    collectors.append(c)
    commits = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    recorder = AuditRecorder(engine, syslog_url=f"tcp://127.0.0.1:{c.port}", source_id="ANIM")
    n_threads, per_thread = 4, 100

    def work(k: int) -> None:
        for i in range(per_thread):
            recorder.record(ev(AuditAction.QUERY, detail=f"{k}/{i}", patient=PAT_A))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert recorder.flush(60)
    total = n_threads * per_thread
    fresh = AuditLog(engine)  # what another reader sees: committed
    assert len(fresh.search(limit=10_000)) == total
    assert fresh.verify().ok
    assert len(commits) < total  # group commit: many events per transaction
    assert recorder.sender is not None
    assert recorder.sender.flush(30)
    got = c.wait_for(total)
    recorder.close()
    assert len(got) == total
    seqs = sorted(int(re.search(rb'sequenceId="(\d+)"', m).group(1)) for m in got)  # type: ignore[union-attr]
    assert seqs == list(range(1, total + 1))
    recorder.record(ev(AuditAction.QUERY))  # after close: dropped, no exception


# ---- the command line -------------------------------------------------------------------


def cli_parser() -> argparse.ArgumentParser:
    from anim.cli import _common

    parser = argparse.ArgumentParser(prog="anim")
    add_parser(parser.add_subparsers(dest="command", required=True), _common)
    return parser


def cli(*argv: str) -> int:
    args = cli_parser().parse_args(list(argv))
    return int(args.func(args))


CLI = """
import sys
from tests.unit.test_audit import cli
sys.exit(cli(*sys.argv[1:]))
"""


def run_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    cfg = load_config(env={}, overrides={"storage": {"data_dir": str(data)}})
    with Archive.open(cfg) as archive:
        engine = archive.index.engine
        with engine.connect().execution_options(anim_writer=True) as conn, conn.begin():
            create_audit_table(conn)
        log = AuditLog(engine)
        log.append([ev(AuditAction.STORE, patient=PAT_A, studies=(STUDY_A1,)),
                    ev(AuditAction.RETRIEVE, who=DR_B, patient=PAT_A, studies=(STUDY_A1,)),
                    ev(AuditAction.QUERY, who=DR_B, patient=PAT_B, detail="STUDY")])
    return data


def test_cli_verify_exit_codes(data_dir: Path) -> None:
    ok = run_cli("audit", "verify", "--data", str(data_dir))
    assert ok.returncode == 0, ok.stderr
    assert "intact: 3 record(s)" in ok.stdout
    engine = make_engine(f"sqlite:///{data_dir / 'index.sqlite'}")
    tamper(engine, "UPDATE audit SET who = 'NOBODY' WHERE seq = 2")
    engine.dispose()
    bad = run_cli("audit", "verify", "--data", str(data_dir))
    assert bad.returncode == 1
    assert "BROKEN at seq 2" in bad.stdout
    assert "modified" in bad.stdout


def test_cli_search_patient_and_export(data_dir: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    import json

    assert parse_patient("HOSP-A|PA-1") == ("PA-1", "HOSP-A")
    assert parse_patient("PA-1") == ("PA-1", "")
    assert cli("audit", "search", "--data", str(data_dir), "--patient", "HOSP-A|PA-1") == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["seq"], r["action"], r["who"]) for r in lines] == [
        (2, "retrieve", "dr.b"), (1, "store", "CT_A")]
    assert cli("audit", "search", "--data", str(data_dir), "--study", STUDY_A1,
               "--action", "store") == 0
    assert [json.loads(x)["seq"] for x in capsys.readouterr().out.splitlines()] == [1]

    assert cli("audit", "patient", "--data", str(data_dir), "HOSP-A|PA-1") == 0
    report = capsys.readouterr().out
    assert "token:dr.b" in report
    assert "ae:CT_A" in report
    assert "2 access(es)" in report
    assert "PB-7" not in report

    assert cli("audit", "export", "--data", str(data_dir), "--format", "dicom") == 0
    out = capsys.readouterr().out.splitlines()
    # 3 recorded + 3 "Audit Log Used" from the reads above (PS3.15 A.5.3.2)
    assert len(out) == 6
    ids = [codes(ET.fromstring(x).find("EventIdentification/EventID"))[0] for x in out]
    assert ids == ["110104", "110104", "110112", "110101", "110101", "110101"]

    proc = run_cli("audit", "export", "--data", str(data_dir), "--format", "syslog")
    assert proc.returncode == 0, proc.stderr
    msgs = split_octet_counted(proc.stdout.encode("utf-8"))
    assert len(msgs) == 7
    assert [parse_frame(m)["msgid"] for m in msgs] == ["IHE+RFC-3881"] * 7
    engine = make_engine(f"sqlite:///{data_dir / 'index.sqlite'}")
    assert AuditLog(engine).verify().ok
    engine.dispose()
