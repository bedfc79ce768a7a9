"""The race garbage collection must survive, forced step by step (anim.maintenance).

gc has looked at an unreferenced blob (old, no version names it) and is about to remove
it; at that moment a store of the same bytes (deduplication: the same key) puts the blob
(it is there: only its time is refreshed) and records it. The store must not end up
referencing a removed blob. A blob store wrapper holds gc inside ``delete`` until the
store is under way, on SQLite and on a real PostgreSQL (where the store's transaction
waits for gc's row lock).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from anim import Archive, load_config, maintenance
from anim.models import Source
from anim.storage import BlobStore
from tests.conftest import sample_files

pytestmark = pytest.mark.integration


class HeldDelete:
    """The archive's blob store, but gc's first ``delete`` waits for a go."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.deleting = threading.Event()
        self.go = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def delete(self, key: str) -> None:
        self.deleting.set()
        assert self.go.wait(60)
        self.inner.delete(key)


def test_a_store_racing_gc_for_the_same_blob_keeps_its_bytes(tmp_path: Path,
                                                              index_url: str) -> None:
    cfg = load_config(env={}, overrides={"storage": {"data_dir": str(tmp_path / "data"),
                                                     "backend": "file"},
                                         "index": {"url": index_url}})
    path = max(sample_files(), key=lambda p: p.stat().st_size)
    data = path.read_bytes()
    src = Source(protocol="test", ae_title="RACE", host="127.0.0.1", institution="RACE")
    with Archive.open(cfg) as archive:
        first = archive.store(data, src)
        keys = archive.locate(first.sop_instance_uid).blob_keys
        archive.index.delete(first.study_instance_uid)
        old = time.time() - 3600
        for k in keys:  # unreferenced and an hour old: gc's to take
            os.utime(archive.blobs.path(k), (old, old))  # type: ignore[attr-defined]

        held = HeldDelete(archive.blobs)
        report: list[maintenance.GcReport] = []
        gc = threading.Thread(target=lambda: report.append(maintenance.gc(
            held, archive.index.engine, grace=600)))  # type: ignore[arg-type]
        gc.start()
        assert held.deleting.wait(60), "gc never reached a delete"
        # gc has checked the blob (unreferenced, unchanged) and holds its row: the same
        # bytes arrive again now
        stored: list[Any] = []
        store = threading.Thread(target=lambda: stored.append(archive.store(data, src)))
        store.start()
        time.sleep(1.0)  # the store has put (refreshed) its blobs and waits for the index
        held.go.set()
        gc.join(60)
        store.join(60)
        assert not gc.is_alive()
        assert not store.is_alive()
        assert report[0].deleted >= 1  # gc did remove a blob under the store's feet ...
        assert stored, "the store failed"
        # ... and the store put it back before recording: every byte is readable
        assert archive.read_bytes(first.sop_instance_uid) == data
        for k in archive.locate(first.sop_instance_uid).blob_keys:
            assert archive.blobs.exists(k), f"blob {k} referenced but gone"
