"""The archive: store, locate, read back; synchronous and thread-safe."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from pydicom.dataset import Dataset

from anim import dicomfile, dicomjson, transcode
from anim.audit import AuditAction, AuditEvent, from_principal
from anim.config import Config
from anim.errors import (
    AnimError,
    BlobGone,
    InvalidQuery,
    NotAcceptable,
    NotFound,
    SOPClassMismatch,
    StorageUnavailable,
    StudyMismatch,
)
from anim.index import search
from anim.index.audit_log import AuditLog, AuditRecorder
from anim.index.engine import make_engine
from anim.index.migrations import migrate, pending
from anim.index.outbox import Outbox
from anim.index.repo import Index, IngestItem
from anim.models import Source, StoredInstance, StoreResult, VersionInfo, VersionState
from anim.query import Level, Query
from anim.security import LOCAL as _LOCAL
from anim.security import Principal, Viewer
from anim.storage import BlobStore, open_blob_store

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class Archive:
    """One archive: a blob store and an index. Open with :meth:`open`, close when done."""

    def __init__(self, cfg: Config, blobs: BlobStore, index: Index) -> None:
        self.cfg = cfg
        self.blobs = blobs
        self.index = index
        self.outbox = Outbox(index.engine)  # webhook notifications (docs/hcm.md)
        # the hash-chained audit trail (docs/security.md); events are queued and committed
        # in batches by its own thread, so recording never waits for the database
        self._audit = (AuditRecorder(index.engine, cfg.audit.syslog_url,
                                     source_id=cfg.dimse.aet) if cfg.audit.enabled else None)
        self._io = ThreadPoolExecutor(max_workers=8, thread_name_prefix="anim-blob")

    def _put(self, piece: memoryview) -> tuple[str, int]:
        return self.blobs.put(piece, hashlib.sha256(piece).hexdigest())

    @classmethod
    def open(cls, cfg: Config) -> Archive:
        """Open (creating if needed) the archive that *cfg* describes; migrate its index."""
        Path(cfg.storage.data_dir).mkdir(parents=True, exist_ok=True)
        blobs = open_blob_store(cfg.storage)
        engine = make_engine(cfg.index_url, cfg.index.pool_size)
        if cfg.index.auto_migrate:
            migrate(engine)
        elif todo := pending(engine):
            engine.dispose()
            raise StorageUnavailable(
                f"the index lacks {len(todo)} schema step(s) (up to {todo[-1][0]}) and "
                "[index].auto_migrate is off: run `anim migrate` first")
        return cls(cfg, blobs, Index(engine, cfg.index.batch_max))

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()
        self._io.shutdown(wait=True)
        self.index.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- ingest -------------------------------------------------------------------

    def audit(self, event: AuditEvent) -> None:
        """Record *event* in the audit trail (queued; durable within a moment)."""
        if self._audit is not None:
            self._audit.record(event)

    def flush_audit(self, timeout: float = 10.0) -> bool:
        return self._audit.flush(timeout) if self._audit is not None else True

    def revoke(self, institution: str, after: str, reason: str = "",
               principal: Principal | None = None) -> list[str]:
        """Compromise containment (docs/security.md): refuse the institution's AEs and
        tokens, hide what it sent from *after* (ISO 8601) on; return the studies hit."""
        try:
            when = datetime.fromisoformat(after)
        except ValueError:
            raise InvalidQuery(f"after: not an ISO 8601 time: {after!r}") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        cutoff = when.astimezone(UTC).isoformat(timespec="microseconds")
        studies = self.index.revoke(institution, cutoff, reason)
        self.audit(from_principal(principal or _LOCAL, AuditAction.REVOKE, "success",
                                  reason=reason[:64], study_uids=tuple(studies),
                                  detail=f"{institution} after {cutoff}"))
        return studies

    def restore(self, institution: str, principal: Principal | None = None) -> list[str]:
        studies = self.index.restore(institution)
        self.audit(from_principal(principal or _LOCAL, AuditAction.RESTORE, "success",
                                  study_uids=tuple(studies), detail=institution))
        return studies

    def restrict(self, study_uid: str, reason: str = "", lift: bool = False,
                 principal: Principal | None = None) -> None:
        """A patient's restriction of a study (EHDS Art. 8), or its lifting."""
        if lift:
            self.index.lift_restriction(study_uid)
        else:
            self.index.restrict(study_uid, reason)
        pid, issuer = self.patient_of(study_uid)
        self.audit(from_principal(principal or _LOCAL, AuditAction.RESTRICT, "success",
                                  reason=reason[:64], patient_id=pid, issuer=issuer,
                                  study_uids=(study_uid,),
                                  detail="lifted" if lift else "restricted"))

    def patient_access(self, patient_id: str, issuer: str) -> list[dict[str, Any]]:
        """Who accessed this patient's images (EHDS Art. 8/9), from the audit trail."""
        self.flush_audit()
        return AuditLog(self.index.engine).patient_access(patient_id, issuer)

    def patient_of(self, study_uid: str) -> tuple[str, str]:
        """(PatientID, IssuerOfPatientID) of a study, ('', '') when not held."""
        try:
            row = self.index.study_row(study_uid)
        except NotFound:
            return "", ""
        return str(row["patient_id"]), str(row["issuer"])

    def store(
        self, data: bytes, source: Source, expect_sop_class: str | None = None,
        expect_study: str | None = None, principal: Principal | None = None,
    ) -> StoreResult:
        """Store one object and leave a trace of it in the audit trail (see _store)."""
        who = principal or _principal_of(source)
        try:
            result = self._store(data, source, expect_sop_class, expect_study)
        except AnimError as e:
            self.audit(from_principal(who, AuditAction.STORE, "failure",
                                      reason=type(e).__name__, detail=source.protocol))
            raise
        pid, issuer = result.patient
        self.audit(from_principal(who, AuditAction.STORE, "success", patient_id=pid,
                                  issuer=issuer, study_uids=(result.study_instance_uid,),
                                  detail=f"{source.protocol} {result.outcome.value}"))
        return result

    def _store(
        self, data: bytes, source: Source, expect_sop_class: str | None = None,
        expect_study: str | None = None,
    ) -> StoreResult:
        """Store one Part 10 object (or bare data set) received from *source*.

        The blobs are durable, then the index rows are committed; only then does
        this return. Identical content is an idempotent success.

        Raises
        ------
        InvalidInstance
            Not DICOM, truncated, required UIDs missing.
        SOPClassMismatch
            *expect_sop_class* given and the data set says otherwise.
        StudyMismatch
            *expect_study* given (STOW-RS to a study) and the data set is of another.
        StorageUnavailable
            Blobs or index cannot be written.
        """
        t0 = time.perf_counter()
        p = dicomfile.parse(data)
        if expect_sop_class is not None and p.sop_class_uid != expect_sop_class:
            raise SOPClassMismatch(
                f"SOP Class UID in the data set ({p.sop_class_uid}) differs from the one "
                f"the object was sent as ({expect_sop_class})")
        if expect_study is not None and str(p.dataset.StudyInstanceUID) != expect_study:
            raise StudyMismatch(
                f"Study Instance UID {p.dataset.StudyInstanceUID} is not the study the "
                f"object was sent to ({expect_study})")
        # Blob hashing and fsync release the GIL: write the pieces on the I/O pool
        # while this thread computes the metadata, then wait for both.
        pieces = [piece for piece in (p.header, p.pixels, p.trailer) if piece is not None]
        puts = [self._io.submit(self._put, piece) for piece in pieces]
        # JSON first: it converts every element once, so the index keys read cached values
        dicom_json = dicomjson.instance_json(p)
        keys = dicomfile.index_keys(p.dataset)
        written = [f.result() for f in puts]
        put_at = time.time()
        digest = hashlib.sha256("".join(k for k, _ in written).encode()).hexdigest()
        blob_keys: list[str | None] = [k for k, _ in written]
        blob_keys += [None] * (3 - len(blob_keys))
        new_bytes = sum(n for _, n in written)
        item = IngestItem(
            keys=keys, digest=digest,
            header_key=blob_keys[0] or "", pixel_key=blob_keys[1], trailer_key=blob_keys[2],
            prefix=p.prefix, transfer_syntax=p.transfer_syntax, size=len(data),
            dicom_json=dicom_json, source=source, new_bytes=new_bytes, put_at=put_at,
        )
        try:
            recorded = self.index.record(item)
        except BlobGone:
            # garbage collection removed one of these blobs meanwhile (anim.maintenance):
            # put them again; the index takes them back in the same transaction
            log.info("store %s: blobs put again after garbage collection", keys["sop_uid"])
            for piece in pieces:
                self._put(piece)
            recorded = self.index.record(dataclasses.replace(item, fresh=True))
        result = dataclasses.replace(recorded,
                                     series_instance_uid=keys["series_uid"],
                                     sop_class_uid=keys["sop_class_uid"],
                                     patient=(keys["patient_id"], keys["issuer"]))
        log.info("store %s from %s/%s: %s, %d new bytes, %.1f ms", result.sop_instance_uid,
                 source.ae_title or source.protocol, source.host, result.outcome.value,
                 new_bytes, (time.perf_counter() - t0) * 1000)
        return result

    # ---- retrieval ----------------------------------------------------------------

    def locate(self, sop_uid: str, version_id: int | None = None) -> StoredInstance:
        return self.index.locate(sop_uid, version_id)

    def iter_bytes(self, inst: StoredInstance, chunk: int = CHUNK) -> Iterator[bytes]:
        """The original bytes of a stored instance, streamed blob by blob."""
        if inst.prefix:
            yield inst.prefix
        yield from self.iter_dataset(inst, chunk)

    def iter_dataset(self, inst: StoredInstance, chunk: int = CHUNK) -> Iterator[bytes]:
        """The data set as received, without preamble and file meta: its blobs in turn."""
        for key in inst.blob_keys:
            with self.blobs.open(key) as f:
                while block := f.read(chunk):
                    yield block

    def iter_part10(self, inst: StoredInstance, target_ts: str | None = None,
                    chunk: int = CHUNK) -> Iterator[bytes]:
        """The instance as a Part 10 file, in *target_ts* (None: as stored), streamed.

        As stored, the bytes are the received ones (a file meta is made for a bare data
        set); in another syntax the one instance is decoded in memory.

        Raises
        ------
        NotAcceptable
            *target_ts* is neither the stored syntax nor an uncompressed one, or the
            pixel data cannot be decoded.
        """
        if target_ts is None or target_ts == inst.transfer_syntax:
            yield self.file_prefix(inst)
            yield from self.iter_dataset(inst, chunk)
            return
        yield transcode.encode(self.dataset_for(inst, [target_ts]))

    def file_prefix(self, inst: StoredInstance) -> bytes:
        """Preamble and file meta as received, or made for a bare data set."""
        if inst.prefix:
            return inst.prefix
        return transcode.file_meta_prefix(inst.sop_class_uid, inst.sop_instance_uid,
                                          inst.transfer_syntax)

    def read_bytes(self, sop_uid: str, version_id: int | None = None) -> bytes:
        return b"".join(self.iter_bytes(self.locate(sop_uid, version_id)))

    # ---- query and retrieve -------------------------------------------------------

    def find(self, query: Query) -> Iterator[dict[str, Any]]:
        """Stream the matches of *query* as DICOM JSON objects (PS3.18 F.2).

        The database connection stays open while the caller iterates; close the
        generator (or exhaust it) to release it.
        """
        revs = self.index.revocations()
        if revs and not query.contained:
            query = dataclasses.replace(query, contained=revs)
        with self.index.engine.connect() as conn:
            yield from search.run(conn, query)

    def select(self, query: Query) -> list[StoredInstance]:
        """The current versions of the instances a retrieve identifier selects."""
        q = Query(level=Level.IMAGE, match=dict(query.match), return_keys=("SOPInstanceUID",),
                  viewer=query.viewer)
        uids = [r["00080018"]["Value"][0] for r in self.find(q)]
        return self.index.locate_many(uids)

    def check_visible(self, study_uid: str, viewer: Viewer | None) -> None:
        """NotFound unless *viewer* may see the study (the query engine's tenancy filter;
        a study the caller may not see answers as if it were not held)."""
        if viewer is None and not self.index.revocations():
            return
        if not self.index.is_visible(study_uid, viewer):
            raise NotFound(f"no study {study_uid}")

    def scoped(self, study_uid: str, series_uid: str | None = None,
               sop_uid: str | None = None, with_json: bool = False
               ) -> Iterator[tuple[StoredInstance, str]]:
        """Current instances of a study / series / instance in reading order (see Index)."""
        return self.index.scoped(study_uid, series_uid, sop_uid, with_json)

    def instance_json(self, sop_uid: str) -> dict[str, Any]:
        """The DICOM JSON metadata computed at ingest (BulkDataURI as ``anim-bulk:``)."""
        return dict(json.loads(self.index.current_json(sop_uid)))

    def read_blob(self, key: str) -> bytes:
        with self.blobs.open(key) as f:
            return f.read()

    def dataset_for(self, inst: StoredInstance, accepted: Collection[str]) -> Dataset:
        """The instance as a Dataset in a transfer syntax among *accepted*.

        Raises
        ------
        NotAcceptable
            No accepted syntax is the stored one or an uncompressed one, or the pixel
            data cannot be decoded.
        """
        target = transcode.choose(inst.transfer_syntax, accepted)
        if target is None:
            raise NotAcceptable(
                f"the peer accepts neither {inst.transfer_syntax} nor an uncompressed syntax")
        ds = transcode.read(b"".join(self.iter_bytes(inst)), inst.transfer_syntax)
        if target != inst.transfer_syntax:
            ds = transcode.to_uncompressed(ds, target)
        return ds

    # ---- administration -----------------------------------------------------------

    def quarantined(self) -> list[VersionInfo]:
        return self.index.versions(VersionState.QUARANTINED)

    def versions(self, sop_uid: str) -> list[VersionInfo]:
        return self.index.versions(sop_uid=sop_uid)

    def promote(self, version_id: int) -> VersionInfo:
        info = self.index.promote(version_id)
        log.info("quarantine: version %d of %s promoted", version_id, info.sop_instance_uid)
        return info

    def reject(self, version_id: int) -> VersionInfo:
        info = self.index.reject(version_id)
        log.info("quarantine: version %d of %s rejected", version_id, info.sop_instance_uid)
        return info


def _principal_of(source: Source) -> Principal:
    """Who stored, when the caller gave no principal: the sending AE, or the operator."""
    kind = "ae" if source.protocol == "dimse" else "local"
    return Principal(kind=kind, subject=source.ae_title or source.protocol,
                     institution=source.institution, address=source.host)
