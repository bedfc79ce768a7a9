"""The webhook outbox: notifications persisted before they are sent, so a receiver that
is down, or an archive that restarts, loses none (docs/hcm.md "Webhooks").

Fan-out copies matching entries of the change sequence into the outbox, advancing a
per-endpoint cursor in the same transaction; the change sequence has no holes, so the
cursor misses nothing. Delivery claims the oldest pending notification of each study
(a lease, so several archive processes can deliver side by side without sending one
twice at once), and a study's next notification waits until the previous one is
delivered: order per study, no head-of-line blocking across studies.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, select, update

from anim.index.repo import _insert, now
from anim.index.schema import change, webhook_cursor, webhook_outbox
from anim.models import Notification

o = webhook_outbox


class Outbox:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        # anim_writer: SQLite takes its write lock at BEGIN (anim.index.engine), so a
        # transaction that reads first never fails to upgrade while ingest writes
        with self.engine.connect().execution_options(anim_writer=True) as conn, conn.begin():
            yield conn

    def register(self, endpoint: str) -> int:
        """Give a newly configured endpoint its cursor, at the end of the sequence
        (history is for the change feed and FHIR search, not a flood of notifications);
        a known endpoint keeps its own. Called at start-up, before anything is received.
        """
        with self._write() as conn:
            start = int(conn.execute(select(func.max(change.c.seq))).scalar() or 0)
            conn.execute(_insert(conn, webhook_cursor).values(endpoint=endpoint, seq=start)
                         .on_conflict_do_nothing())
            return int(conn.execute(select(webhook_cursor.c.seq).where(
                webhook_cursor.c.endpoint == endpoint)).scalar_one())

    def fan_out(self, endpoint: str, kinds: frozenset[str],
                build: Callable[[dict[str, Any]], dict[str, Any]], batch: int = 200) -> int:
        """Queue the endpoint's next matching changes; return how many were queued."""
        with self._write() as conn:
            # FOR UPDATE: fan-outs of one endpoint on several nodes take turns
            cursor = int(conn.execute(select(webhook_cursor.c.seq).where(
                webhook_cursor.c.endpoint == endpoint).with_for_update()).scalar_one())
            rows = [dict(r) for r in conn.execute(
                select(change).where(change.c.seq > cursor).order_by(change.c.seq)
                .limit(batch)).mappings()]
            if not rows:
                return 0
            at = now()
            queued = [{
                "endpoint": endpoint, "seq": r["seq"], "kind": r["kind"],
                "study_uid": r["study_uid"], "payload": json.dumps(build(r)),
                "created_at": at, "state": "pending", "attempts": 0, "due_ms": 0,
                "lease_ms": 0, "last_error": "", "delivered_at": "",
            } for r in rows if r["kind"] in kinds]
            for q in queued:
                conn.execute(_insert(conn, o).values(**q).on_conflict_do_nothing())
            conn.execute(update(webhook_cursor).where(webhook_cursor.c.endpoint == endpoint)
                         .values(seq=rows[-1]["seq"]))
            return len(queued)

    def claim(self, endpoint: str, now_ms: int, lease_ms: int, limit: int
              ) -> list[Notification]:
        """Lease up to *limit* due notifications, each the oldest pending of its study."""
        heads = (select(func.min(o.c.id)).where(o.c.endpoint == endpoint,
                                                o.c.state == "pending")
                 .group_by(o.c.study_uid))
        with self._write() as conn:
            rows = conn.execute(
                select(o).where(o.c.id.in_(heads), o.c.due_ms <= now_ms,
                                o.c.lease_ms <= now_ms)
                .order_by(o.c.id).limit(limit)).mappings().all()
            claimed = []
            for r in rows:
                got = conn.execute(update(o).where(and_(
                    o.c.id == r["id"], o.c.state == "pending", o.c.lease_ms <= now_ms))
                    .values(lease_ms=now_ms + lease_ms)).rowcount
                if got == 1:
                    claimed.append(Notification(r["id"], r["endpoint"], r["seq"], r["kind"],
                                                r["study_uid"], r["payload"], r["attempts"]))
            return claimed

    def delivered(self, note_id: int) -> None:
        with self._write() as conn:
            conn.execute(update(o).where(o.c.id == note_id).values(
                state="delivered", delivered_at=now(), lease_ms=0,
                attempts=o.c.attempts + 1, last_error=""))

    def failed(self, note_id: int, due_ms: int, error: str) -> None:
        with self._write() as conn:
            conn.execute(update(o).where(o.c.id == note_id).values(
                attempts=o.c.attempts + 1, due_ms=due_ms, lease_ms=0,
                last_error=error[:256]))

    def status(self) -> list[dict[str, Any]]:
        """Per endpoint: pending and delivered counts, the oldest pending, last error."""
        q = (select(o.c.endpoint, o.c.state, func.count().label("n"),
                    func.min(o.c.created_at).label("oldest"),
                    func.max(o.c.attempts).label("max_attempts"))
             .group_by(o.c.endpoint, o.c.state))
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(q):
                e = out.setdefault(r.endpoint, {"endpoint": r.endpoint, "pending": 0,
                                                "delivered": 0, "oldest_pending": None,
                                                "max_attempts": 0, "last_error": ""})
                e[r.state] = int(r.n)
                if r.state == "pending":
                    e["oldest_pending"] = r.oldest
                    e["max_attempts"] = int(r.max_attempts or 0)
            for name, e in out.items():
                e["last_error"] = conn.execute(
                    select(o.c.last_error).where(o.c.endpoint == name, o.c.state == "pending",
                                                 o.c.last_error != "")
                    .order_by(o.c.id).limit(1)).scalar() or ""
            for r in conn.execute(select(webhook_cursor)):
                out.setdefault(r.endpoint, {"endpoint": r.endpoint, "pending": 0,
                                            "delivered": 0, "oldest_pending": None,
                                            "max_attempts": 0, "last_error": ""})
                out[r.endpoint]["cursor"] = int(r.seq)
        return sorted(out.values(), key=lambda e: e["endpoint"])

    def prune(self, before: str) -> int:
        """Forget notifications delivered before *before* (ISO time)."""
        with self._write() as conn:
            return int(conn.execute(o.delete().where(
                o.c.state == "delivered", o.c.delivered_at < before)).rowcount or 0)
