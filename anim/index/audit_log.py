"""The audit trail in the index: an append-only, hash-chained table.

Record *n* stores the hash of record *n-1* and its own hash over that link and all its
fields (:func:`anim.audit.record_hash`). ``audit_head`` is a one-row table holding the
last (seq, hash): an append locks it with ``UPDATE ... RETURNING``, so appends from
several archive processes on one database queue behind each other and the chain stays
linear. (Locking the last ``audit`` row with ``SELECT ... FOR UPDATE`` would not do: a
waiter wakes up holding the row that *was* last and forks the chain.) The head also
lets :meth:`AuditLog.verify` notice records cut off the end.

There is deliberately no API to change or remove a record.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Index,
    Integer,
    String,
    Table,
    Text,
    and_,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Row

from anim.audit import (
    ACCESS_ACTIONS,
    GENESIS,
    AuditEvent,
    SyslogSender,
    dicom_audit_message,
    record_hash,
    syslog_message,
)
from anim.index.repo import _insert
from anim.index.schema import metadata

log = logging.getLogger(__name__)

audit = Table(
    "audit",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),  # 1, 2, 3 ...
    Column("at", String(32), nullable=False),  # ISO 8601 UTC
    Column("action", String(16), nullable=False),
    Column("outcome", String(8), nullable=False),
    Column("reason", String(128), nullable=False),
    Column("who_kind", String(8), nullable=False),
    Column("who", String(128), nullable=False),
    Column("institution", String(64), nullable=False),
    Column("address", String(64), nullable=False),
    Column("patient_id", String(64), nullable=False),
    Column("issuer", String(64), nullable=False),
    Column("study_uids", Text, nullable=False),  # '\'-joined
    Column("detail", String(256), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_patient", "patient_id", "issuer"),
    Index("ix_audit_at", "at"),
)

audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),  # always 1
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

_EVENT_COLUMNS = ("at", "action", "outcome", "reason", "who_kind", "who", "institution",
                  "address", "patient_id", "issuer", "detail")


def create_audit_table(conn: Connection) -> None:
    """Create the audit tables and the chain head if missing (idempotent)."""
    audit.create(conn, checkfirst=True)
    audit_head.create(conn, checkfirst=True)
    _ensure_head(conn)


def _ensure_head(conn: Connection) -> None:
    if conn.execute(select(audit_head.c.id)).first() is not None:
        return
    last = conn.execute(select(audit.c.seq, audit.c.hash)
                        .order_by(audit.c.seq.desc()).limit(1)).first()
    conn.execute(_insert(conn, audit_head).values(
        id=1, seq=int(last.seq) if last else 0, hash=last.hash if last else GENESIS)
        .on_conflict_do_nothing())


def event_from_row(row: Row[Any] | dict[str, Any]) -> AuditEvent:
    m = row._mapping if isinstance(row, Row) else row
    uids = m["study_uids"]
    return AuditEvent(study_uids=tuple(uids.split("\\")) if uids else (),
                      **{c: m[c] for c in _EVENT_COLUMNS})


def _row_dict(row: Row[Any]) -> dict[str, Any]:
    m = row._mapping
    out = {c: m[c] for c in ("seq", *_EVENT_COLUMNS, "hash")}
    out["seq"] = int(out["seq"])
    out["study_uids"] = m["study_uids"].split("\\") if m["study_uids"] else []
    return out


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    checked: int  # records whose hash and link were checked
    first_bad_seq: int | None = None
    reason: str = ""


class AuditLog:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # ---- write ----------------------------------------------------------------------

    def append(self, events: list[AuditEvent]) -> list[int]:
        """Append *events* in one transaction; return their sequence numbers."""
        events = [e.stamped() for e in events]
        if not events:
            return []
        # anim_writer: SQLite takes its write lock at BEGIN (anim.index.engine)
        with self.engine.connect().execution_options(anim_writer=True) as conn, \
                conn.begin():
            _ensure_head(conn)
            # The row lock on the head serialises appenders until this commit; under
            # READ COMMITTED a waiter re-reads the head once the holder has committed.
            head = conn.execute(
                update(audit_head).where(audit_head.c.id == 1)
                .values(seq=audit_head.c.seq + len(events))
                .returning(audit_head.c.seq, audit_head.c.hash)).one()
            seq, prev = int(head.seq) - len(events), str(head.hash)
            rows = []
            for e in events:
                seq += 1
                h = record_hash(prev, seq, e)
                rows.append({"seq": seq, **{c: getattr(e, c) for c in _EVENT_COLUMNS},
                             "action": e.action.value, "study_uids": "\\".join(e.study_uids),
                             "prev_hash": prev, "hash": h})
                prev = h
            conn.execute(audit.insert(), rows)
            conn.execute(update(audit_head).where(audit_head.c.id == 1).values(hash=prev))
        return [r["seq"] for r in rows]

    # ---- check ----------------------------------------------------------------------

    def verify(self) -> VerifyResult:
        """Recompute every record's hash and link in order (streamed, flat memory)."""
        conn = self.engine.connect()
        if conn.dialect.name == "postgresql":
            # one snapshot for the head and all records, though appends go on
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        with conn, conn.begin():
            head = conn.execute(select(audit_head.c.seq, audit_head.c.hash)
                                .where(audit_head.c.id == 1)).first()
            rows = conn.execution_options(stream_results=True, yield_per=1000).execute(
                select(audit).order_by(audit.c.seq))
            try:
                return self._walk(rows, head)
            finally:
                rows.close()

    @staticmethod
    def _walk(rows: Any, head: Row[Any] | None) -> VerifyResult:
        expected, prev, checked = 1, GENESIS, 0

        def bad(seq: int, why: str) -> VerifyResult:
            return VerifyResult(False, checked, seq, why)

        for row in rows:
            seq = int(row.seq)
            if seq != expected:
                gap = (f"record {expected} is missing" if seq == expected + 1
                       else f"records {expected} to {seq - 1} are missing")
                return bad(expected, f"{gap} (deleted): the next record is {seq}")
            if row.prev_hash != prev:
                return bad(seq, "its link to the previous record is broken "
                                "(a record was inserted or replaced before it)")
            try:
                event = event_from_row(row)
            except ValueError:
                return bad(seq, "its fields are not a valid audit event (modified)")
            if record_hash(prev, seq, event) != row.hash:
                return bad(seq, "its content does not match its hash (modified)")
            prev, expected, checked = row.hash, expected + 1, checked + 1
        return _check_head(expected - 1, prev, head, checked)

    # ---- read -----------------------------------------------------------------------

    def search(self, since: str | None = None, until: str | None = None,
               action: str | None = None, who: str | None = None,
               institution: str | None = None, patient_id: str | None = None,
               issuer: str | None = None, study_uid: str | None = None,
               limit: int = 100) -> list[dict[str, Any]]:
        """Matching records, newest first. Times compare as ISO 8601 text: a bare date
        ("2026-05-01") works as a bound."""
        a = audit.c
        cond = []
        for column, value in ((a.action, action), (a.who, who), (a.institution, institution),
                              (a.patient_id, patient_id), (a.issuer, issuer)):
            if value is not None:
                cond.append(column == value)
        if since:
            cond.append(a.at >= since)
        if until:
            cond.append(a.at < until)
        if study_uid is not None:
            cond.append(_has_study(study_uid))
        q = select(audit).where(and_(True, *cond)).order_by(a.seq.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [_row_dict(r) for r in conn.execute(q)]

    def patient_access(self, patient_id: str, issuer: str) -> list[dict[str, Any]]:
        """Who stored, queried, retrieved, exported or deleted this patient's images,
        newest first (EHDS Art. 8/9, "who accessed my data")."""
        a = audit.c
        q = (select(audit).where(a.patient_id == patient_id, a.issuer == issuer,
                                 a.action.in_([x.value for x in ACCESS_ACTIONS]))
             .order_by(a.seq.desc()))
        with self.engine.connect() as conn:
            return [_row_dict(r) for r in conn.execute(q)]

    def events(self, since: str | None = None, after_seq: int = 0
               ) -> Iterator[tuple[int, AuditEvent]]:
        """(seq, event) in chain order, streamed: for exports."""
        q = select(audit).where(audit.c.seq > after_seq).order_by(audit.c.seq)
        if since:
            q = q.where(audit.c.at >= since)
        with self.engine.connect() as conn, conn.begin():
            result = conn.execution_options(stream_results=True, yield_per=1000).execute(q)
            for row in result:
                yield int(row.seq), event_from_row(row)

    def last_seq(self) -> int:
        with self.engine.connect() as conn:
            v = conn.execute(select(audit_head.c.seq).where(audit_head.c.id == 1)).scalar()
        return int(v or 0)


def _check_head(last: int, prev: str, head: Row[Any] | None, checked: int) -> VerifyResult:
    """The records end where the head says, with its hash: none cut off or added."""
    if head is None:
        return (VerifyResult(True, checked) if last == 0
                else VerifyResult(False, checked, last, "the chain head is missing"))
    top = int(head.seq)
    if top > last:
        return VerifyResult(False, checked, last + 1, f"records {last + 1} to {top} are "
                            "missing at the end (deleted)")
    if top < last:
        return VerifyResult(False, checked, top + 1, "records past the chain head (inserted)")
    if head.hash != prev:
        return VerifyResult(False, checked, last,
                            "the last record does not match the chain head (modified)")
    return VerifyResult(True, checked)


def _has_study(uid: str) -> Any:
    # study_uids is '\'-joined: match a whole element. A UID is digits and dots
    # (PS3.5 9.1), so nothing in it needs escaping; anything else matches nothing.
    if not uid or not all(ch.isdigit() or ch == "." for ch in uid):
        return literal(False)
    wrapped = literal("\\") + audit.c.study_uids + literal("\\")
    return or_(audit.c.study_uids == uid, wrapped.like(f"%\\{uid}\\%", escape="!"))


class AuditRecorder:
    """Records events without slowing the request that caused them.

    :meth:`record` queues; one background thread appends what has queued up in one
    transaction (group commit), then hands each record to the syslog sender if one is
    configured. The thread lingers up to *linger* seconds after a first event so that a
    busy archive commits a few batches a second, not one per store: each commit is a
    write transaction on the index that every store's own commit would otherwise wait
    behind (bench/profile-ingest). :meth:`flush` cuts the linger short. A database
    outage is retried; past *queue_max* waiting events new ones are dropped with an
    error in the log.
    """

    def __init__(self, engine: Engine, syslog_url: str = "", source_id: str = "ANIM",
                 batch_max: int = 500, queue_max: int = 100_000,
                 linger: float = 0.2) -> None:
        self.log = AuditLog(engine)
        self.source_id = source_id
        self.sender = SyslogSender(syslog_url) if syslog_url else None
        self._batch_max = batch_max
        self._linger = linger
        self._queue: queue.Queue[AuditEvent | None] = queue.Queue(queue_max)
        self._cond = threading.Condition()
        self._recorded = 0  # events accepted by record()
        self._durable = 0  # of those, committed (or given up on at close)
        self.dropped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="anim-audit-writer",
                                         daemon=True)
        self._thread.start()

    def record(self, event: AuditEvent) -> None:
        """Queue *event* (stamped with the time now); never blocks, never raises."""
        with self._cond:
            if self._closed:
                log.error("audit: event recorded after close, dropped")
                return
            try:
                self._queue.put_nowait(event.stamped())
            except queue.Full:
                self.dropped += 1
                log.error("audit: queue full, event dropped (%d so far)", self.dropped)
                return
            self._recorded += 1

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every event recorded so far is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)  # ends the writer's linger now
        with self._cond:
            target = self._recorded
            while self._durable < target:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self.sender is not None:
            self.sender.close(timeout)

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if first is None:
                continue  # a flush with nothing waiting
            batch = self._gather(first)
            seqs = self._append(batch)
            with self._cond:
                self._durable += len(batch)
                self._cond.notify_all()
            if seqs and self.sender is not None:
                for seq, event in zip(seqs, batch, strict=True):
                    xml = dicom_audit_message(event, self.source_id)
                    self.sender.send(syslog_message(event, seq, xml))

    def _gather(self, first: AuditEvent) -> list[AuditEvent]:
        """*first* and what else comes within the linger (a flush or a full batch ends it)."""
        batch = [first]
        deadline = time.monotonic() + self._linger
        while len(batch) < self._batch_max:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                while len(batch) < self._batch_max:  # take what is there, without waiting
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is not None:
                        batch.append(more)
                break
            batch.append(nxt)
        return batch

    def _append(self, batch: list[AuditEvent]) -> list[int]:
        backoff = 0.1
        while True:
            try:
                return self.log.append(batch)
            except Exception as e:
                # The writer must outlive any database trouble; the events wait in
                # memory. Only the exception type is logged: bound values are patient data.
                if self._closed:
                    log.error("audit: %d event(s) lost at close: %s", len(batch),
                              type(e).__name__)
                    return []
                log.warning("audit: append of %d event(s) failed (%s); retrying",
                            len(batch), type(e).__name__)
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(backoff * 2, 10.0)
