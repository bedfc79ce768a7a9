"""The index: writes go through one group-commit writer; reads use the pool.

Writers (DIMSE associations, STOW requests, imports) hand their index work to
``GroupCommitter``, which runs up to ``batch_max`` of them in one transaction and
wakes each caller only after the COMMIT returned: one fsync of the WAL covers a
whole batch, and no caller is told "stored" before its rows are durable. Each
item runs in its own SAVEPOINT, so one bad item never fails its neighbours.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, case, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from anim.errors import AnimError, BlobGone, NotFound, StorageUnavailable
from anim.index.schema import (
    blob_condemned,
    change,
    counter,
    instance,
    patient,
    restriction,
    revocation,
    series,
    study,
    study_source,
    version,
)
from anim.models import (
    Source,
    StoredInstance,
    StoreOutcome,
    StoreResult,
    VersionInfo,
    VersionState,
)
from anim.security import Viewer
from anim.studyinfo import StudyInfo

log = logging.getLogger(__name__)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True, slots=True)
class IngestItem:
    """Everything the index needs to record one received object."""

    keys: dict[str, Any]  # dicomfile.index_keys
    digest: str
    header_key: str
    pixel_key: str | None
    trailer_key: str | None
    prefix: bytes
    transfer_syntax: str
    size: int
    dicom_json: str
    source: Source
    new_bytes: int
    put_at: float = 0.0  # time.time() when the blobs were put (or refreshed)
    fresh: bool = False  # the blobs were put again after a BlobGone


# A store must be recorded within this many seconds of putting its blobs, or put them
# again: garbage collection with a grace period longer than this can never remove a blob
# a store is about to reference (anim.maintenance, docs/deploy.md).
PUT_TO_RECORD_MAX = 300.0

Cache = dict[tuple[str, ...], tuple[Any, ...]]
MANIFEST_PROTOCOL = "manifest"  # Source.protocol of the manifests the archive stores
_Work = Callable[[Connection, Cache], Any]


class GroupCommitter:
    """One writer thread; callers block until their batch is committed."""

    def __init__(self, engine: Engine, batch_max: int) -> None:
        self._engine = engine
        self._batch_max = batch_max
        self._queue: queue.Queue[tuple[_Work, Future[Any]] | None] = queue.Queue()
        # ids and attributes of rows this writer wrote last: lets a new instance of a
        # known series skip re-writing unchanged patient, study and series rows.
        # Owned by the writer thread; cleared whenever a write is rolled back.
        self._cache: Cache = {}
        self._thread = threading.Thread(target=self._run, name="anim-index-writer", daemon=True)
        self._thread.start()

    def submit(self, work: _Work) -> Any:
        fut: Future[Any] = Future()
        self._queue.put((work, fut))
        return fut.result()

    def depth(self) -> int:
        """Writes waiting for the writer thread (a metric)."""
        return self._queue.qsize()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._batch_max:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)

    def _apply(self, conn: Connection, work: _Work) -> tuple[Any, BaseException | None]:
        """Run one write in its own SAVEPOINT; its failure is its caller's alone."""
        pending = _pending_changes(conn)
        mark = len(pending)
        try:
            with conn.begin_nested():
                return work(conn, self._cache), None
        except (AnimError, IntegrityError) as e:
            self._cache.clear()
            del pending[mark:]  # its changes were rolled back with it
            return None, e
        except OperationalError:
            raise  # the connection or database is in trouble: the whole batch fails
        except Exception as e:
            self._cache.clear()
            del pending[mark:]
            log.exception("index: unexpected error in a write")
            return None, e

    def _commit(self, batch: list[tuple[_Work, Future[Any]]]) -> None:
        for attempt in range(_RETRIES):
            try:
                results = self._transaction(batch)
                break
            except Exception as e:
                # The writer thread must survive anything: a dead writer would hang every
                # association waiting on it.
                self._cache.clear()
                if _retryable(e) and attempt + 1 < _RETRIES:
                    # deadlock, serialization failure or a locked SQLite file: another
                    # writer (another node) got in the way; back off with jitter, retry
                    log.info("index: batch of %d retried after %s", len(batch), type(e).__name__)
                    time.sleep(random.uniform(0.005, 0.02) * 2**attempt)
                    continue
                if isinstance(e, DBAPIError | OSError):
                    log.error("index: commit of %d writes failed: %s", len(batch), e)
                else:
                    log.exception("index: commit of %d writes failed", len(batch))
                err = StorageUnavailable(f"index write failed: {type(e).__name__}")
                for _work, fut in batch:
                    fut.set_exception(err)
                return
        for fut, (value, err) in zip((f for _w, f in batch), results, strict=True):
            if err is None:
                fut.set_result(value)
            else:
                fut.set_exception(err)

    def _transaction(self, batch: list[tuple[_Work, Future[Any]]]
                     ) -> list[tuple[Any, BaseException | None]]:
        conn_cm = self._engine.connect().execution_options(anim_writer=True)
        with conn_cm as conn, conn.begin():
            conn.info["anim_changes"] = []
            results = [self._apply(conn, work) for work, _fut in batch]
            _flush_changes(conn)
            return results


def _pending_changes(conn: Connection) -> list[dict[str, Any]]:
    return conn.info.setdefault("anim_changes", [])  # type: ignore[no-any-return]


def _flush_changes(conn: Connection) -> None:
    """Number this transaction's changes and write them, as its last statements.

    The counter row is locked from here to COMMIT, so transactions take their numbers
    in commit order and a rolled-back one gives its numbers back: readers of the change
    sequence never see a hole that fills later. Taking it last keeps the lock short
    and means no transaction waits for another lock while holding it (no deadlock).
    """
    pending = _pending_changes(conn)
    if not pending:
        return
    top = conn.execute(update(counter).where(counter.c.name == "change")
                       .values(value=counter.c.value + len(pending))
                       .returning(counter.c.value)).scalar_one()
    first = int(top) - len(pending) + 1
    conn.execute(change.insert(), [{**c, "seq": first + n} for n, c in enumerate(pending)])
    pending.clear()


_RETRIES = 6
_CACHE_MAX = 30_000  # patient/study/series rows remembered by the writer
_RETRY_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected


def _retryable(e: BaseException) -> bool:
    if not isinstance(e, DBAPIError):
        return False
    orig = e.orig
    if getattr(orig, "sqlstate", None) in _RETRY_SQLSTATES:
        return True
    msg = str(orig).lower()
    return "database is locked" in msg or "database is busy" in msg


def _insert(conn: Connection, table: Any) -> Any:
    if conn.dialect.name == "postgresql":
        return pg_insert(table)
    return sqlite_insert(table)


class Index:
    """The archive's index over one SQLAlchemy Engine."""

    def __init__(self, engine: Engine, batch_max: int = 64) -> None:
        self.engine = engine
        self._writer = GroupCommitter(engine, batch_max)
        self._revs: tuple[float, tuple[tuple[str, str], ...]] = (0.0, ())

    def close(self) -> None:
        self._writer.close()
        self.engine.dispose()

    def writer_queue_depth(self) -> int:
        return self._writer.depth()

    # ---- writes ---------------------------------------------------------------

    def record(self, item: IngestItem) -> StoreResult:
        """Record a received object and decide what it is (DESIGN.md "Storage")."""
        return self._writer.submit(lambda conn, cache: _record(conn, item, cache))

    def promote(self, version_id: int) -> VersionInfo:
        """Make a quarantined version current; the current one becomes superseded."""
        return self._writer.submit(lambda conn, cache: _promote(conn, version_id, cache))

    def reject(self, version_id: int) -> VersionInfo:
        return self._writer.submit(lambda conn, _cache: _reject(conn, version_id))

    def delete(self, study_uid: str, series_uid: str | None = None,
               sop_uid: str | None = None, unsettle: bool = True) -> int:
        """Remove a study, series or instance from the index; return the number of
        instances removed. Each removal is an entry of the change sequence; the blobs
        stay until garbage collection (nothing is overwritten or erased here).
        *unsettle* False: the study stays stable (an outdated stored manifest going)."""
        return int(self._writer.submit(lambda conn, cache: _delete(
            conn, cache, study_uid, series_uid, sop_uid, unsettle)))

    def settle(self, quiet_seconds: float, limit: int = 500) -> list[str]:
        """Mark studies quiet for *quiet_seconds* as stable: a ``study_stable`` change
        the first time, ``study_updated`` after a later change. Safe to run on every
        node at once: the conditional UPDATE lets exactly one of them announce it."""
        cutoff = (datetime.now(UTC) - timedelta(seconds=quiet_seconds)).isoformat(
            timespec="microseconds")
        return list(self._writer.submit(lambda conn, _cache: _settle(conn, cutoff, limit)))

    # ---- reads ----------------------------------------------------------------

    def locate(self, sop_uid: str, version_id: int | None = None) -> StoredInstance:
        """Where the bytes of an instance (current version unless told) are."""
        v, i = version, instance
        if version_id is None:
            cond = and_(i.c.sop_uid == sop_uid, v.c.id == i.c.current_version_fk)
        else:
            cond = and_(i.c.sop_uid == sop_uid, v.c.id == version_id)
        q = select(
            i.c.sop_uid, i.c.sop_class_uid, v.c.transfer_syntax, v.c.prefix, v.c.header_key,
            v.c.pixel_key, v.c.trailer_key, v.c.size, v.c.id,
        ).select_from(i.join(v, v.c.instance_fk == i.c.id)).where(cond)
        with self.engine.connect() as conn:
            row = conn.execute(q).first()
        if row is None:
            raise NotFound(f"no instance {sop_uid}")
        return _stored(row)

    def locate_many(self, sop_uids: list[str]) -> list[StoredInstance]:
        """:meth:`locate` for many instances (current versions), in the given order."""
        v, i = version, instance
        found: dict[str, StoredInstance] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(sop_uids), 500):
                chunk = sop_uids[start:start + 500]
                q = select(
                    i.c.sop_uid, i.c.sop_class_uid, v.c.transfer_syntax, v.c.prefix,
                    v.c.header_key, v.c.pixel_key, v.c.trailer_key, v.c.size, v.c.id,
                ).select_from(i.join(v, v.c.id == i.c.current_version_fk)).where(
                    i.c.sop_uid.in_(chunk))
                for row in conn.execute(q):
                    found[row.sop_uid] = _stored(row)
        return [found[u] for u in sop_uids if u in found]

    def scoped(self, study_uid: str, series_uid: str | None = None,
               sop_uid: str | None = None, with_json: bool = False
               ) -> Iterator[tuple[StoredInstance, str]]:
        """The current instances of a study, series or instance, in reading order.

        Yields each instance with its DICOM JSON text (``""`` unless *with_json*):
        ordered by series, then instance number, then arrival, so that a viewer gets a
        series in slice order. The hierarchy is checked: a series UID of another study
        selects nothing. Streams from the database; nothing is held for the whole study.
        """
        v, i = version, instance
        cols = [i.c.sop_uid, i.c.sop_class_uid, v.c.transfer_syntax, v.c.prefix,
                v.c.header_key, v.c.pixel_key, v.c.trailer_key, v.c.size, v.c.id]
        if with_json:
            cols.append(v.c.dicom_json)
        q = _in_scope(select(*cols), study_uid, series_uid, sop_uid, self.revocations())
        # NULL instance numbers last on both engines
        q = q.order_by(series.c.id, i.c.instance_number.is_(None), i.c.instance_number, i.c.id)
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=100).execute(q)
            for row in result:
                yield _stored(row), (row.dicom_json if with_json else "")

    def current_json(self, sop_uid: str) -> str:
        """The DICOM JSON text of the current version of an instance."""
        q = (select(version.c.dicom_json)
             .select_from(instance.join(version, version.c.id == instance.c.current_version_fk))
             .where(instance.c.sop_uid == sop_uid))
        with self.engine.connect() as conn:
            text = conn.execute(q).scalar()
        if text is None:
            raise NotFound(f"no instance {sop_uid}")
        return str(text)

    def scope_stamp(self, study_uid: str, series_uid: str | None = None,
                    sop_uid: str | None = None) -> tuple[int, int, datetime | None]:
        """(number of current instances, highest current version id, latest arrival).

        Any store, correction or promotion in the scope changes it: a cheap validator
        for ETag and conditional requests.
        """
        v = version
        q = _in_scope(select(func.count(), func.coalesce(func.max(v.c.id), 0),
                             func.max(v.c.received_at)), study_uid, series_uid, sop_uid,
                      self.revocations())
        with self.engine.connect() as conn:
            n, top, last = conn.execute(q).one()
        return int(n), int(top), datetime.fromisoformat(last) if last else None

    def storage_summary(self) -> dict[str, int]:
        """Counts, and bytes held (each distinct object once) against bytes written.

        Versions stored before migration 3 did not record what they wrote: they are
        left out of the byte figures and counted in ``unmeasured_versions``.
        """
        v = version
        measured = v.c.new_bytes.is_not(None)
        with self.engine.connect() as conn:
            held, written, unmeasured = conn.execute(select(
                func.coalesce(func.sum(case((measured, v.c.size), else_=0)), 0),
                func.coalesce(func.sum(v.c.new_bytes), 0),
                func.coalesce(func.sum(case((measured, 0), else_=1)), 0))).one()
        counts = self.counts()
        return {"patients": counts["patient"], "studies": counts["study"],
                "series": counts["series"], "instances": counts["instance"],
                "versions": counts["version"], "received_bytes": int(held),
                "stored_bytes": int(written), "saved_bytes": int(held) - int(written),
                "unmeasured_versions": int(unmeasured)}

    def recent_changes(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest entries of the change sequence, newest first."""
        q = select(change).order_by(change.c.seq.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def sources(self) -> list[dict[str, Any]]:
        """Who sent what: per calling AE / host / institution / protocol, the number of
        versions received and the latest arrival."""
        v = version
        q = (select(v.c.source_ae, v.c.source_host, v.c.institution, v.c.protocol,
                    func.count().label("instances"), func.max(v.c.received_at).label("last"))
             .group_by(v.c.source_ae, v.c.source_host, v.c.institution, v.c.protocol)
             .order_by(func.max(v.c.received_at).desc()))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def versions(
        self, state: VersionState | None = None, sop_uid: str | None = None
    ) -> list[VersionInfo]:
        q = _version_info_query()
        if state is not None:
            q = q.where(version.c.state == state.value)
        if sop_uid is not None:
            q = q.where(instance.c.sop_uid == sop_uid)
        with self.engine.connect() as conn:
            return [_version_info(r) for r in conn.execute(q.order_by(version.c.id))]

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                t.name: int(conn.execute(select(func.count()).select_from(t)).scalar() or 0)
                for t in (patient, study, series, instance, version, change)
            }

    def referenced_blobs(self) -> Iterator[str]:
        with self.engine.connect() as conn:
            for row in conn.execute(
                select(version.c.header_key, version.c.pixel_key, version.c.trailer_key)
            ):
                for k in row:
                    if k:
                        yield k

    def study_uids(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(study.c.study_uid).order_by(study.c.id)).scalars())

    def instance_uids(self, study_uid: str | None = None) -> list[str]:
        q = select(instance.c.sop_uid).order_by(instance.c.id)
        if study_uid is not None:
            q = q.select_from(
                instance.join(series, series.c.id == instance.c.series_fk).join(
                    study, study.c.id == series.c.study_fk)
            ).where(study.c.study_uid == study_uid)
        with self.engine.connect() as conn:
            return list(conn.execute(q).scalars())

    def study_row(self, study_uid: str) -> dict[str, Any]:
        q = select(study, patient.c.patient_id, patient.c.issuer, patient.c.patient_name,
                   patient.c.birth_date, patient.c.sex).join(
            patient, patient.c.id == study.c.patient_fk).where(study.c.study_uid == study_uid)
        with self.engine.connect() as conn:
            row = conn.execute(q).mappings().first()
        if row is None:
            raise NotFound(f"no study {study_uid}")
        return dict(row)

    def study_info(self, study_uid: str) -> StudyInfo:
        """The study, its patient, and its series and current instances, in order."""
        from anim.studyinfo import InstanceInfo, SeriesInfo, StudyInfo

        row = self.study_row(study_uid)
        q = (select(series.c.series_uid, series.c.series_number, series.c.modality,
                    series.c.description, series.c.body_part, instance.c.sop_uid,
                    instance.c.sop_class_uid, instance.c.instance_number,
                    instance.c.num_frames, version.c.transfer_syntax,
                    instance.c.current_version_fk)
             .select_from(series.join(instance, instance.c.series_fk == series.c.id)
                          .join(version, version.c.id == instance.c.current_version_fk))
             .where(series.c.study_fk == row["id"])
             .order_by(series.c.series_number, series.c.id, instance.c.instance_number,
                       instance.c.id))
        grouped: dict[str, tuple[Any, list[InstanceInfo]]] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(q):
                _s, insts = grouped.setdefault(r.series_uid, (r, []))
                insts.append(InstanceInfo(r.sop_uid, r.sop_class_uid, r.instance_number,
                                          r.num_frames, r.transfer_syntax,
                                          int(r.current_version_fk)))
        return StudyInfo(
            study_uid=study_uid, accession_number=row["accession_number"],
            study_id=row["study_id"], study_date=row["study_date"],
            study_time=row["study_time"], description=row["description"],
            referring_physician=row["referring_physician"],
            modalities=tuple(m for m in row["modalities"].split("\\") if m),
            patient_id=row["patient_id"], issuer=row["issuer"],
            patient_name=row["patient_name"], birth_date=row["birth_date"], sex=row["sex"],
            # the last change of content (a stored manifest is not one)
            updated_at=row["changed_at"] or row["updated_at"],
            series=tuple(SeriesInfo(s.series_uid, s.series_number, s.modality,
                                    s.description, s.body_part, tuple(insts))
                         for s, insts in grouped.values()))

    def changes_since(self, seq: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        q = select(change).where(change.c.seq > seq).order_by(change.c.seq).limit(limit)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def last_seq(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(change.c.seq))).scalar() or 0)

    def change_feed(self, since: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        """Entries after *since*, in order, each with the *current* state of what it
        names: an instance ``current`` / ``replaced`` / ``deleted`` / ``quarantined`` /
        ``rejected``, a study ``stable`` / ``receiving`` / ``deleted``."""
        c, v, i, s = change, version, instance, study
        q = (select(c, v.c.state.label("v_state"), i.c.current_version_fk.label("i_cur"),
                    i.c.id.label("i_id"), s.c.settled.label("s_settled"),
                    s.c.id.label("s_id"))
             .select_from(c.outerjoin(v, v.c.id == c.c.version_fk)
                          .outerjoin(i, and_(i.c.sop_uid == c.c.sop_uid, c.c.sop_uid != ""))
                          .outerjoin(s, s.c.study_uid == c.c.study_uid))
             .where(c.c.seq > since).order_by(c.c.seq).limit(limit))
        out = []
        with self.engine.connect() as conn:
            for r in conn.execute(q).mappings():
                entry = {k: r[k] for k in ("seq", "at", "kind", "study_uid", "series_uid",
                                           "sop_uid", "patient_id", "issuer")}
                entry["state"] = _current_state(r)
                out.append(entry)
        return out

    # ---- compromise containment (docs/security.md) ----------------------------------

    def revocations(self) -> tuple[tuple[str, str], ...]:
        """(institution, cut-off) of the revocations in force; read at most once a second
        (every node sees a revocation within a second)."""
        at, revs = self._revs
        if time.monotonic() - at < 1.0:
            return revs
        q = select(revocation.c.institution, revocation.c.after).where(
            revocation.c.restored_at == "").order_by(revocation.c.id)
        with self.engine.connect() as conn:
            revs = tuple((r.institution, r.after) for r in conn.execute(q))
        self._revs = (time.monotonic(), revs)
        return revs

    def revoked_institutions(self) -> frozenset[str]:
        return frozenset(inst for inst, _after in self.revocations())

    def revoke(self, institution: str, after: str, reason: str = "") -> list[str]:
        """Revoke *institution*; hide what it sent from *after* on. Returns the studies
        touched; each gets a ``study_contained`` change."""
        done = self._writer.submit(lambda conn, _c: _revoke(conn, institution, after, reason))
        self._revs = (0.0, ())
        return list(done)

    def restore(self, institution: str) -> list[str]:
        """End the revocations of *institution*: everything comes back as it was."""
        done = self._writer.submit(lambda conn, _c: _restore(conn, institution))
        self._revs = (0.0, ())
        return list(done)

    def restrict(self, study_uid: str, reason: str = "") -> None:
        """A patient's restriction: hide the study from all but its senders."""
        self.study_row(study_uid)  # NotFound for a study not held
        with self.engine.connect().execution_options(anim_writer=True) as conn, conn.begin():
            conn.execute(_insert(conn, restriction).values(
                study_uid=study_uid, created_at=now(), reason=reason[:256])
                .on_conflict_do_nothing())

    def lift_restriction(self, study_uid: str) -> None:
        with self.engine.connect().execution_options(anim_writer=True) as conn, conn.begin():
            gone = conn.execute(restriction.delete().where(
                restriction.c.study_uid == study_uid)).rowcount
        if not gone:
            raise NotFound(f"no restriction on study {study_uid}")

    def is_visible(self, study_uid: str, viewer: Viewer | None) -> bool:
        from anim.index.search import _uncontained, visible_study
        from anim.query import Level

        q = select(study.c.id).where(study.c.study_uid == study_uid)
        if viewer is not None:
            q = q.where(visible_study(viewer))
        revs = self.revocations()
        if revs:
            q = q.where(_uncontained(Level.STUDY, revs))
        with self.engine.connect() as conn:
            return conn.execute(q).first() is not None

    def study_state(self, study_uid: str) -> str:
        """``stable`` or ``receiving`` (NotFound when the study is not held)."""
        return "stable" if self.study_row(study_uid)["settled"] else "receiving"


def _in_scope(q: Any, study_uid: str, series_uid: str | None, sop_uid: str | None,
              revs: tuple[tuple[str, str], ...] = ()) -> Any:
    """*q* over the current versions of the instances of a study / series / instance."""
    i, v = instance, version
    q = (q.select_from(i.join(v, v.c.id == i.c.current_version_fk)
                       .join(series, series.c.id == i.c.series_fk)
                       .join(study, study.c.id == series.c.study_fk))
         .where(study.c.study_uid == study_uid))
    if series_uid is not None:
        q = q.where(series.c.series_uid == series_uid)
    if sop_uid is not None:
        q = q.where(i.c.sop_uid == sop_uid)
    if revs:
        from anim.index.search import contained

        q = q.where(~contained(revs))
    return q


# ---- the write transactions (run on the writer thread) --------------------------


def _stored(row: Any) -> StoredInstance:
    keys = tuple(k for k in (row.header_key, row.pixel_key, row.trailer_key) if k)
    return StoredInstance(
        sop_instance_uid=row.sop_uid, sop_class_uid=row.sop_class_uid,
        transfer_syntax=row.transfer_syntax, prefix=bytes(row.prefix), blob_keys=keys,
        size=int(row.size), version_id=int(row.id),
    )


def _version_info_query() -> Any:
    return select(
        version.c.id, instance.c.sop_uid, study.c.study_uid, version.c.state,
        version.c.institution, version.c.source_ae, version.c.source_host,
        version.c.received_at, version.c.size, version.c.transfer_syntax,
    ).select_from(
        version.join(instance, instance.c.id == version.c.instance_fk)
        .join(series, series.c.id == instance.c.series_fk)
        .join(study, study.c.id == series.c.study_fk)
    )


def _version_info(r: Any) -> VersionInfo:
    return VersionInfo(
        id=int(r.id), sop_instance_uid=r.sop_uid, study_instance_uid=r.study_uid,
        state=VersionState(r.state), institution=r.institution, ae_title=r.source_ae,
        host=r.source_host, received_at=r.received_at, size=int(r.size),
        transfer_syntax=r.transfer_syntax,
    )


def _get_or_create(conn: Connection, table: Any, key: dict[str, Any],
                   values: dict[str, Any]) -> tuple[int, bool]:
    """Upsert-by-key that is safe across processes (ON CONFLICT DO NOTHING).

    An existing row whose attributes differ is updated, and ``conn.info["anim_updated"]``
    is set, so that the caller can tell (patient updated)."""
    cond = and_(*(table.c[k] == v for k, v in key.items()))
    row = conn.execute(select(table.c.id, *(table.c[c] for c in values)).where(cond)).first()
    conn.info["anim_updated"] = False
    if row is not None:
        if values and any(getattr(row, c) != v for c, v in values.items()):
            conn.execute(update(table).where(table.c.id == row.id).values(**values))
            conn.info["anim_updated"] = True
        return int(row.id), False
    # RETURNING, not rowcount: psycopg reports -1 for ON CONFLICT DO NOTHING
    stmt = _insert(conn, table).values(**key, **values).on_conflict_do_nothing().returning(
        table.c.id)
    new_id = conn.execute(stmt).scalar_one_or_none()
    if new_id is not None:
        return int(new_id), True
    row = conn.execute(select(table.c.id).where(cond)).first()
    if row is None:  # cannot happen: ON CONFLICT means the row exists
        raise StorageUnavailable(f"index: {table.name} row vanished during upsert")
    return int(row.id), False


def _cached(conn: Connection, cache: Cache, ck: tuple[str, ...], table: Any,
            key: dict[str, Any], values: dict[str, Any]) -> tuple[int, bool]:
    hit = cache.get(ck)
    attrs = tuple(values.values())
    if hit is not None and hit[1] == attrs:
        return int(hit[0]), False
    rid, created = _get_or_create(conn, table, key, values)
    if len(cache) >= _CACHE_MAX:
        cache.clear()  # bounded: memory must not grow with the archive
    cache[ck] = (rid, attrs)
    return rid, created


def _attach(conn: Connection, k: dict[str, Any], at: str,
            cache: Cache) -> tuple[int, int, bool, bool]:
    """Upsert patient, study and series from an instance's keys.

    Returns (study id, series id, study created, series created). The newest
    header wins for patient, study and series attributes.
    """
    conn.info["anim_updated"] = False
    pid, _ = _cached(conn, cache, ("p", k["patient_id"], k["issuer"]), patient,
                     {"patient_id": k["patient_id"], "issuer": k["issuer"]}, {
        "patient_name": k["patient_name"], "patient_name_norm": k["patient_name_norm"],
        "birth_date": k["birth_date"], "sex": k["sex"],
    })
    if conn.info["anim_updated"]:
        # the newest header changed the patient's demographics
        _log_change(conn, "patient_updated", {**k, "series_uid": "", "sop_uid": ""}, None, at)
    sid, study_new = _cached(conn, cache, ("st", k["study_uid"]), study,
                             {"study_uid": k["study_uid"]}, {
        "patient_fk": pid, "study_date": k["study_date"], "study_time": k["study_time"],
        "accession_number": k["accession_number"], "study_id": k["study_id"],
        "description": k["study_description"], "referring_physician": k["referring_physician"],
    })
    if study_new:
        conn.execute(update(patient).where(patient.c.id == pid)
                     .values(num_studies=patient.c.num_studies + 1))
    seid, series_new = _cached(conn, cache, ("se", k["series_uid"]), series,
                               {"series_uid": k["series_uid"]}, {
        "study_fk": sid, "modality": k["modality"], "series_number": k["series_number"],
        "description": k["series_description"], "body_part": k["body_part"],
        "series_date": k["series_date"],
    })
    return sid, seid, study_new, series_new


def _refresh_study(conn: Connection, study_id: int) -> None:
    """Recompute a study's denormalised series-level figures (after a series change)."""
    mods = sorted({m for m in conn.execute(
        select(series.c.modality).where(series.c.study_fk == study_id)).scalars() if m})
    n_series = conn.execute(select(func.count()).select_from(series)
                            .where(series.c.study_fk == study_id)).scalar()
    conn.execute(update(study).where(study.c.id == study_id).values(
        modalities="\\".join(mods), num_series=n_series))


def _version_values(item: IngestItem, instance_id: int, state: VersionState,
                    at: str) -> dict[str, Any]:
    return {
        "instance_fk": instance_id, "state": state.value, "digest": item.digest,
        "header_key": item.header_key, "pixel_key": item.pixel_key,
        "trailer_key": item.trailer_key, "prefix": item.prefix,
        "transfer_syntax": item.transfer_syntax, "size": item.size,
        "dicom_json": item.dicom_json, "institution": item.source.institution[:64],
        "source_ae": item.source.ae_title[:16], "source_host": item.source.host[:64],
        "protocol": item.source.protocol, "received_at": at, "new_bytes": item.new_bytes,
    }


def _log_change(conn: Connection, kind: str, k: dict[str, Any], version_id: int | None,
                at: str) -> None:
    """Queue an entry of the change sequence; numbered at commit (_flush_changes)."""
    _pending_changes(conn).append({
        "at": at, "kind": kind, "study_uid": k["study_uid"],
        "series_uid": k.get("series_uid", ""), "sop_uid": k.get("sop_uid", ""),
        "version_fk": version_id, "patient_id": k.get("patient_id", ""),
        "issuer": k.get("issuer", "")})


def _unsettle(conn: Connection, study_id: int, at: str) -> None:
    """The study's content changed: it is stable again only after a quiet period."""
    conn.execute(update(study).where(study.c.id == study_id)
                 .values(settled=0, changed_at=at, updated_at=at))


def _claim_blobs(conn: Connection, item: IngestItem) -> None:
    """Take this store's blobs back from garbage collection, in its own transaction.

    Removing their condemned rows waits for a gc that holds one (it is removing that
    blob right now); a row gc marked "deleted" means the blob is gone: BlobGone makes
    the archive put it again and record once more (with ``fresh``).
    """
    keys = [k for k in (item.header_key, item.pixel_key, item.trailer_key) if k]
    gone = conn.execute(blob_condemned.delete().where(blob_condemned.c.key.in_(keys))
                        .returning(blob_condemned.c.state)).scalars().all()
    if item.fresh:
        return
    if "deleted" in gone:
        raise BlobGone("a blob of this object was garbage-collected while it was stored")
    if item.put_at and time.time() - item.put_at > PUT_TO_RECORD_MAX:
        raise BlobGone("the blobs of this object were put too long ago to rely on")


def _record(conn: Connection, item: IngestItem, cache: Cache) -> StoreResult:
    _claim_blobs(conn, item)
    k = item.keys
    at = now()
    row = conn.execute(select(instance.c.id, instance.c.current_version_fk)
                       .where(instance.c.sop_uid == k["sop_uid"])).first()
    if row is None:
        return _record_new(conn, item, at, cache)
    inst_id = int(row.id)
    known = conn.execute(select(version.c.id, version.c.state).where(and_(
        version.c.instance_fk == inst_id, version.c.digest == item.digest))).first()
    if known is not None:
        # Byte-identical content (after group 0002): idempotent
        outcome = (StoreOutcome.QUARANTINED if known.state == VersionState.QUARANTINED
                   else StoreOutcome.ALREADY_STORED)
        return StoreResult(outcome, k["sop_uid"], k["study_uid"], int(known.id), item.new_bytes,
                           "identical content already received")
    cur = conn.execute(select(version.c.id, version.c.institution)
                       .where(version.c.id == row.current_version_fk)).first()
    if cur is not None and cur.institution != item.source.institution[:64]:
        vid = conn.execute(version.insert().values(
            _version_values(item, inst_id, VersionState.QUARANTINED, at))).inserted_primary_key[0]
        _log_change(conn, "instance_quarantined", k, int(vid), at)
        return StoreResult(
            StoreOutcome.QUARANTINED, k["sop_uid"], k["study_uid"], int(vid), item.new_bytes,
            f"SOP Instance UID already held with other content from another institution; "
            f"kept in quarantine as version {vid}, the current version is unchanged")
    vid = int(conn.execute(version.insert().values(
        _version_values(item, inst_id, VersionState.CURRENT, at))).inserted_primary_key[0])
    if cur is not None:
        conn.execute(update(version).where(version.c.id == cur.id)
                     .values(state=VersionState.SUPERSEDED.value))
    sid = _make_current(conn, inst_id, vid, k, at, cache,
                        unsettle=item.source.protocol != MANIFEST_PROTOCOL)
    _add_source(conn, cache, sid, item.source.institution[:64])
    _log_change(conn, "instance_replaced", k, vid, at)
    return StoreResult(StoreOutcome.CORRECTED, k["sop_uid"], k["study_uid"], vid, item.new_bytes,
                       f"correction: version {vid} is now current")


def _record_new(conn: Connection, item: IngestItem, at: str, cache: Cache) -> StoreResult:
    k = item.keys
    study_id, series_id, _study_new, series_new = _attach(conn, k, at, cache)
    new_id = conn.execute(_insert(conn, instance).values(
        sop_uid=k["sop_uid"], series_fk=series_id, sop_class_uid=k["sop_class_uid"],
        instance_number=k["instance_number"], num_frames=k["num_frames"],
    ).on_conflict_do_nothing().returning(instance.c.id)).scalar_one_or_none()
    if new_id is None:
        # another process inserted it between our read and write: decide again
        return _record(conn, item, cache)
    inst_id = int(new_id)
    vid = int(conn.execute(version.insert().values(
        _version_values(item, inst_id, VersionState.CURRENT, at))).inserted_primary_key[0])
    conn.execute(update(instance).where(instance.c.id == inst_id).values(current_version_fk=vid))
    conn.execute(update(series).where(series.c.id == series_id)
                 .values(num_instances=series.c.num_instances + 1))
    conn.execute(update(study).where(study.c.id == study_id)
                 .values(num_instances=study.c.num_instances + 1, updated_at=at))
    if item.source.protocol != MANIFEST_PROTOCOL:  # our own manifest changes nothing
        _unsettle(conn, study_id, at)
    _add_source(conn, cache, study_id, item.source.institution[:64])
    if series_new:
        _refresh_study(conn, study_id)
    _log_change(conn, "instance_created", k, vid, at)
    return StoreResult(StoreOutcome.STORED, k["sop_uid"], k["study_uid"], vid, item.new_bytes)


def _add_source(conn: Connection, cache: Cache, study_id: int, institution: str) -> None:
    """Record that *institution* sent current content of the study (tenancy)."""
    ck = ("ss", str(study_id), institution)
    if ck in cache:
        return
    conn.execute(_insert(conn, study_source).values(study_fk=study_id, institution=institution)
                 .on_conflict_do_nothing())
    cache[ck] = ()


def _make_current(conn: Connection, inst_id: int, vid: int, k: dict[str, Any], at: str,
                  cache: Cache, unsettle: bool = True) -> int:
    """Point the instance at version *vid* and re-index it from that version's keys."""
    old = conn.execute(select(instance.c.series_fk, series.c.study_fk).join(
        series, series.c.id == instance.c.series_fk).where(instance.c.id == inst_id)).one()
    study_id, series_id, _sn, _sen = _attach(conn, k, at, cache)
    conn.execute(update(instance).where(instance.c.id == inst_id).values(
        current_version_fk=vid, series_fk=series_id, sop_class_uid=k["sop_class_uid"],
        instance_number=k["instance_number"], num_frames=k["num_frames"]))
    if series_id != old.series_fk:
        conn.execute(update(series).where(series.c.id == old.series_fk)
                     .values(num_instances=series.c.num_instances - 1))
        conn.execute(update(series).where(series.c.id == series_id)
                     .values(num_instances=series.c.num_instances + 1))
        if study_id != old.study_fk:
            conn.execute(update(study).where(study.c.id == old.study_fk)
                         .values(num_instances=study.c.num_instances - 1))
            conn.execute(update(study).where(study.c.id == study_id)
                         .values(num_instances=study.c.num_instances + 1))
        for sid in {study_id, int(old.study_fk)}:
            _refresh_study(conn, sid)
            _unsettle(conn, sid, at)
    if unsettle:
        _unsettle(conn, study_id, at)
    else:
        conn.execute(update(study).where(study.c.id == study_id).values(updated_at=at))
    return study_id


def _load_version(conn: Connection, version_id: int) -> Any:
    row = conn.execute(select(version, instance.c.sop_uid, instance.c.current_version_fk).join(
        instance, instance.c.id == version.c.instance_fk).where(version.c.id == version_id)).first()
    if row is None:
        raise NotFound(f"no version {version_id}")
    return row


def _info(conn: Connection, version_id: int) -> VersionInfo:
    return _version_info(conn.execute(
        _version_info_query().where(version.c.id == version_id)).one())


def _promote(conn: Connection, version_id: int, cache: Cache) -> VersionInfo:
    import json

    from anim.dicomfile import index_keys_from_json

    row = _load_version(conn, version_id)
    if row.state != VersionState.QUARANTINED:
        raise NotFound(f"version {version_id} is {row.state}, not quarantined")
    at = now()
    conn.execute(update(version).where(version.c.id == row.current_version_fk)
                 .values(state=VersionState.SUPERSEDED.value))
    conn.execute(update(version).where(version.c.id == version_id)
                 .values(state=VersionState.CURRENT.value))
    k = index_keys_from_json(json.loads(row.dicom_json))
    sid = _make_current(conn, int(row.instance_fk), version_id, k, at, cache)
    _add_source(conn, cache, sid, row.institution)
    _log_change(conn, "instance_replaced", k, version_id, at)
    return _info(conn, version_id)


def _reject(conn: Connection, version_id: int) -> VersionInfo:
    row = _load_version(conn, version_id)
    if row.state != VersionState.QUARANTINED:
        raise NotFound(f"version {version_id} is {row.state}, not quarantined")
    conn.execute(update(version).where(version.c.id == version_id)
                 .values(state=VersionState.REJECTED.value))
    return _info(conn, version_id)


def _current_state(r: Any) -> str:
    kind = r["kind"]
    if kind.startswith("study_"):
        if r["s_id"] is None:
            return "deleted"
        return "stable" if r["s_settled"] else "receiving"
    if kind.startswith("instance_"):
        if r["i_id"] is None:
            return "deleted"
        if r["i_cur"] == r["version_fk"]:
            return "current"
        if r["v_state"] in (VersionState.QUARANTINED, VersionState.REJECTED):
            return str(r["v_state"])
        return "replaced"
    return "current"


def _settle(conn: Connection, cutoff: str, limit: int) -> list[str]:
    rows = conn.execute(
        select(study.c.id, study.c.study_uid, patient.c.patient_id, patient.c.issuer)
        .join(patient, patient.c.id == study.c.patient_fk)
        .where(study.c.settled == 0, study.c.changed_at <= cutoff)
        .order_by(study.c.changed_at).limit(limit)).all()
    settled = []
    at = now()
    for r in rows:
        n = conn.execute(update(study).where(
            study.c.id == r.id, study.c.settled == 0, study.c.changed_at <= cutoff)
            .values(settled=1, stable_events=study.c.stable_events + 1)
            .returning(study.c.stable_events)).scalar_one_or_none()
        if n is None:
            continue  # another node announced it, or it changed again meanwhile
        kind = "study_stable" if n == 1 else "study_updated"
        _log_change(conn, kind, {"study_uid": r.study_uid, "patient_id": r.patient_id,
                                 "issuer": r.issuer}, None, at)
        settled.append(r.study_uid)
    return settled


def _delete(conn: Connection, cache: Cache, study_uid: str, series_uid: str | None,
            sop_uid: str | None, unsettle: bool) -> int:
    cache.clear()  # it may remember rows that are about to go
    st = conn.execute(select(study.c.id, study.c.patient_fk, patient.c.patient_id,
                             patient.c.issuer).join(patient, patient.c.id == study.c.patient_fk)
                      .where(study.c.study_uid == study_uid)).first()
    if st is None:
        raise NotFound(f"no study {study_uid}")
    q = (select(instance.c.id, instance.c.sop_uid, instance.c.current_version_fk,
                series.c.id.label("series_id"), series.c.series_uid)
         .join(series, series.c.id == instance.c.series_fk).where(series.c.study_fk == st.id))
    if series_uid is not None:
        q = q.where(series.c.series_uid == series_uid)
    if sop_uid is not None:
        q = q.where(instance.c.sop_uid == sop_uid)
    doomed = conn.execute(q).all()
    if not doomed:
        raise NotFound("nothing to delete in that scope")
    at = now()
    pk = {"study_uid": study_uid, "patient_id": st.patient_id, "issuer": st.issuer}
    for r in doomed:
        _log_change(conn, "instance_deleted",
                    {**pk, "series_uid": r.series_uid, "sop_uid": r.sop_uid},
                    r.current_version_fk, at)
    ids = [r.id for r in doomed]
    for chunk in range(0, len(ids), 500):
        part = ids[chunk:chunk + 500]
        conn.execute(update(instance).where(instance.c.id.in_(part))
                     .values(current_version_fk=None))
        conn.execute(version.delete().where(version.c.instance_fk.in_(part)))
        conn.execute(instance.delete().where(instance.c.id.in_(part)))
    _recount_after_removal(conn, st, {r.series_id for r in doomed}, pk, at, unsettle)
    return len(doomed)


def _recount_after_removal(conn: Connection, st: Any, series_ids: set[int],
                           pk: dict[str, Any], at: str, unsettle: bool) -> None:
    """Fix the counts of what a deletion left; drop emptied series, study, patient."""
    for series_id in series_ids:
        left = conn.execute(select(func.count()).select_from(instance)
                            .where(instance.c.series_fk == series_id)).scalar_one()
        if left:
            conn.execute(update(series).where(series.c.id == series_id)
                         .values(num_instances=left))
        else:
            conn.execute(series.delete().where(series.c.id == series_id))
    left = conn.execute(select(func.count()).select_from(
        instance.join(series, series.c.id == instance.c.series_fk))
        .where(series.c.study_fk == st.id)).scalar_one()
    if left:
        conn.execute(update(study).where(study.c.id == st.id).values(num_instances=left))
        _refresh_study(conn, st.id)
        if unsettle:
            _unsettle(conn, st.id, at)
    else:
        conn.execute(study_source.delete().where(study_source.c.study_fk == st.id))
        conn.execute(study.delete().where(study.c.id == st.id))
        conn.execute(update(patient).where(patient.c.id == st.patient_fk)
                     .values(num_studies=patient.c.num_studies - 1))
        conn.execute(patient.delete().where(patient.c.id == st.patient_fk,
                                            patient.c.num_studies <= 0))
        _log_change(conn, "study_deleted", pk, None, at)


def _contained_studies(conn: Connection, institution: str, after: str) -> list[Any]:
    """Studies with current content *institution* sent from *after* on."""
    return conn.execute(
        select(study.c.study_uid, patient.c.patient_id, patient.c.issuer).distinct()
        .select_from(instance.join(version, version.c.id == instance.c.current_version_fk)
                     .join(series, series.c.id == instance.c.series_fk)
                     .join(study, study.c.id == series.c.study_fk)
                     .join(patient, patient.c.id == study.c.patient_fk))
        .where(version.c.institution == institution, version.c.received_at >= after)
        .order_by(study.c.study_uid)).all()


def _revoke(conn: Connection, institution: str, after: str, reason: str) -> list[str]:
    at = now()
    conn.execute(revocation.insert().values(institution=institution, after=after,
                                            revoked_at=at, restored_at="", reason=reason))
    rows = _contained_studies(conn, institution, after)
    for r in rows:
        _log_change(conn, "study_contained", {"study_uid": r.study_uid,
                                              "patient_id": r.patient_id,
                                              "issuer": r.issuer}, None, at)
    return [r.study_uid for r in rows]


def _restore(conn: Connection, institution: str) -> list[str]:
    active = conn.execute(select(revocation.c.id, revocation.c.after).where(
        revocation.c.institution == institution, revocation.c.restored_at == "")).all()
    if not active:
        raise NotFound(f"no revocation of {institution} in force")
    at = now()
    conn.execute(update(revocation).where(revocation.c.id.in_([r.id for r in active]))
                 .values(restored_at=at))
    rows = _contained_studies(conn, institution, min(r.after for r in active))
    for r in rows:
        _log_change(conn, "study_restored", {"study_uid": r.study_uid,
                                             "patient_id": r.patient_id,
                                             "issuer": r.issuer}, None, at)
    return [r.study_uid for r in rows]
