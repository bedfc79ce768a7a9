"""Blob store maintenance: ``anim verify`` and ``anim gc``.

**verify** re-hashes every blob and compares it with its key (the SHA-256 the archive
named it by), and checks that every blob the index references is there. It is the
archive's defence against silent corruption and tampering: a flipped byte on a disk or
an object overwritten in a bucket shows as *corrupt*; a lost one as *missing*. Both
are reported with the instances they belong to. Nothing is changed.

**gc** removes blobs no version references (left by deletions, or by stores whose index
write failed), safely while the archive keeps ingesting. Deduplication is what makes
that delicate: a new store may reuse a blob gc is about to remove. The protocol:

1. Candidates are unreferenced blobs whose modified time is older than the grace
   period. ``put`` of a known blob refreshes its time, and a store records its
   blobs within ``PUT_TO_RECORD_MAX`` of putting them (else it puts them again), so
   with a grace period longer than that no store in flight relies on a candidate.
2. gc writes a ``blob_condemned`` row for each candidate, with the time it saw.
3. For each condemned blob, gc locks its row, checks again that nothing references
   it and that its modified time is still the one seen (a put in between refreshed
   it), removes the blob, marks the row ``deleted`` and commits.
4. A store removes the condemned rows of its blobs in the transaction that records
   them. That waits for a gc holding the row (step 3); a ``deleted`` row it finds
   makes it put the blobs again first (``BlobGone``). So a store either commits its
   reference before gc looks (gc keeps the blob), or learns the blob went (and puts it
   back).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, delete, or_, select, union, update

from anim.errors import NotFound
from anim.index.repo import PUT_TO_RECORD_MAX
from anim.index.schema import blob_condemned, instance, version
from anim.storage import BlobStat, BlobStore

log = logging.getLogger(__name__)

BATCH = 500
DEFAULT_GRACE = 3600.0
_DELETED_ROWS_KEPT = timedelta(days=7)  # far longer than any store takes
Progress = Callable[[str], None]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _batches(stats: Iterable[BlobStat], n: int = BATCH) -> Iterator[list[BlobStat]]:
    batch: list[BlobStat] = []
    for s in stats:
        batch.append(s)
        if len(batch) >= n:
            yield batch
            batch = []
    if batch:
        yield batch


def referenced(conn: Connection, keys: Iterable[str]) -> set[str]:
    """Those of *keys* some version (current, superseded or quarantined) references."""
    ks = list(keys)
    if not ks:
        return set()
    v = version.c
    found: set[str] = set()
    for col in (v.header_key, v.pixel_key, v.trailer_key):
        found.update(conn.execute(select(col).where(col.in_(ks)).distinct()).scalars())
    return found


# ---- verify -------------------------------------------------------------------------


@dataclass
class VerifyReport:
    blobs: int = 0
    bytes: int = 0
    referenced: int = 0
    corrupt: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unreferenced: int = 0
    instances: dict[str, list[str]] = field(default_factory=dict)  # key -> SOP UIDs

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing

    def as_dict(self) -> dict[str, object]:
        return {"ok": self.ok, "blobs": self.blobs, "bytes": self.bytes,
                "referenced": self.referenced, "unreferenced": self.unreferenced,
                "corrupt": self.corrupt, "missing": self.missing,
                "instances": self.instances}


def _hash_blob(blobs: BlobStore, key: str) -> str | None:
    """The SHA-256 of the blob's bytes, streamed; None when it vanished meanwhile."""
    h = hashlib.sha256()
    try:
        with blobs.open(key) as f:
            while block := f.read(1 << 20):
                h.update(block)
    except NotFound:
        return None
    return h.hexdigest()


def _referenced_sorted(conn: Connection) -> Iterator[str]:
    v = version.c
    q = union(*(select(c.label("k")).where(c.is_not(None)) for c in
                (v.header_key, v.pixel_key, v.trailer_key))).subquery()
    yield from conn.execution_options(stream_results=True, yield_per=10_000).execute(
        select(q.c.k).order_by(q.c.k)).scalars()


def verify(blobs: BlobStore, engine: Engine, rehash: bool = True, workers: int = 4,
           progress: Progress | None = None) -> VerifyReport:
    """Re-hash every blob against its key; find referenced blobs that are missing.

    The store lists its blobs in key order and the index its references in key order:
    one merge of the two finds the missing ones, whatever their number.
    """
    rep = VerifyReport()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="anim-verify")
    with engine.connect() as conn, pool:
        refs = _referenced_sorted(conn)
        ref = next(refs, None)
        t0 = time.monotonic()
        for batch in _batches(blobs.list()):
            hashes = (pool.map(lambda s: _hash_blob(blobs, s.key), batch) if rehash
                      else iter([s.key for s in batch]))
            for s, digest in zip(batch, hashes, strict=True):
                rep.blobs += 1
                rep.bytes += s.size
                if digest is not None and digest != s.key:
                    rep.corrupt.append(s.key)
                while ref is not None and ref < s.key:
                    rep.missing.append(ref)  # referenced, not in the store
                    rep.referenced += 1
                    ref = next(refs, None)
                if ref == s.key:
                    rep.referenced += 1
                    ref = next(refs, None)
                else:
                    rep.unreferenced += 1
            if progress:
                progress(f"verify: {rep.blobs} blobs, {rep.bytes / 1e9:.2f} GB, "
                         f"{len(rep.corrupt)} corrupt, {len(rep.missing)} missing "
                         f"({time.monotonic() - t0:.0f} s)")
        while ref is not None:
            rep.missing.append(ref)
            rep.referenced += 1
            ref = next(refs, None)
        rep.instances = _instances_of(conn, rep.corrupt + rep.missing)
    for key in rep.corrupt:
        log.error("verify: blob %s does not match its key (corrupt or tampered)", key)
    for key in rep.missing:
        log.error("verify: blob %s is referenced by the index but missing", key)
    return rep


def _instances_of(conn: Connection, keys: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    v = version.c
    for i in range(0, len(keys), BATCH):
        part = keys[i:i + BATCH]
        rows = conn.execute(
            select(v.header_key, v.pixel_key, v.trailer_key, instance.c.sop_uid)
            .join(instance, instance.c.id == v.instance_fk)
            .where(or_(v.header_key.in_(part), v.pixel_key.in_(part),
                       v.trailer_key.in_(part))))
        wanted = set(part)
        for r in rows:
            for k in (r.header_key, r.pixel_key, r.trailer_key):
                if k in wanted:
                    out.setdefault(k, []).append(r.sop_uid)
    return out


# ---- gc -----------------------------------------------------------------------------


@dataclass
class GcReport:
    blobs: int = 0
    recent: int = 0  # younger than the grace period: not considered
    unreferenced: int = 0  # candidates
    deleted: int = 0
    deleted_bytes: int = 0
    kept: int = 0  # candidates found referenced or refreshed on the second look
    deleted_keys: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {"blobs": self.blobs, "recent": self.recent,
                "unreferenced": self.unreferenced, "deleted": self.deleted,
                "deleted_bytes": self.deleted_bytes, "kept": self.kept}


def gc(blobs: BlobStore, engine: Engine, grace: float = DEFAULT_GRACE, dry_run: bool = False,
       progress: Progress | None = None) -> GcReport:
    """Remove the blobs no version references and older than *grace* seconds."""
    if grace < PUT_TO_RECORD_MAX:
        log.warning("gc: a grace period of %.0f s is shorter than the %.0f s a store may "
                    "take between putting and recording its blobs", grace, PUT_TO_RECORD_MAX)
    rep = GcReport()
    started = time.time()
    writer = engine.connect().execution_options(anim_writer=True)
    with writer, engine.connect() as reader:
        with writer.begin():
            writer.execute(delete(blob_condemned).where(
                blob_condemned.c.state == "deleted",
                blob_condemned.c.at < (datetime.now(UTC) - _DELETED_ROWS_KEPT).isoformat()))
        for batch in _batches(blobs.list()):
            rep.blobs += len(batch)
            old = [s for s in batch if s.modified < started - grace]
            rep.recent += len(batch) - len(old)
            with reader.begin():
                refs = referenced(reader, (s.key for s in old))
            candidates = [s for s in old if s.key not in refs]
            rep.unreferenced += len(candidates)
            if candidates and not dry_run:
                _condemn(writer, candidates)
                _collect(writer, blobs, candidates, rep)
            if progress:
                progress(f"gc: {rep.blobs} blobs seen, {rep.unreferenced} unreferenced, "
                         f"{rep.deleted} removed ({rep.deleted_bytes / 1e6:.1f} MB)")
    log.info("gc: %d blobs, %d unreferenced, %d removed (%d bytes), %d kept",
             rep.blobs, rep.unreferenced, rep.deleted, rep.deleted_bytes, rep.kept)
    return rep


def _condemn(writer: Connection, candidates: list[BlobStat]) -> None:
    with writer.begin():
        have = set(writer.execute(select(blob_condemned.c.key).where(
            blob_condemned.c.key.in_([s.key for s in candidates]))).scalars())
        rows = [{"key": s.key, "state": "condemned", "modified": s.modified, "at": _now_iso()}
                for s in candidates if s.key not in have]
        if rows:
            writer.execute(blob_condemned.insert(), rows)


def _collect(writer: Connection, blobs: BlobStore, candidates: list[BlobStat],
             rep: GcReport) -> None:
    """Step 3, one blob per transaction: a store waits at most for one removal."""
    for s in candidates:
        with writer.begin():
            row = writer.execute(select(blob_condemned.c.state, blob_condemned.c.modified)
                                 .where(blob_condemned.c.key == s.key)
                                 .with_for_update()).first()
            if row is None or row.state != "condemned":
                continue  # a store took it back, or another gc removed it
            now = blobs.stat(s.key)
            if referenced(writer, [s.key]) or (now is not None and now.modified != row.modified):
                writer.execute(delete(blob_condemned).where(blob_condemned.c.key == s.key))
                rep.kept += 1
                continue
            if now is not None:
                blobs.delete(s.key)
                rep.deleted += 1
                rep.deleted_bytes += now.size
                rep.deleted_keys.append(s.key)
            writer.execute(update(blob_condemned).where(blob_condemned.c.key == s.key)
                           .values(state="deleted", at=_now_iso()))
