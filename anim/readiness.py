"""Readiness probes of an archive: can it do its work now? (web.health serves them.)"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import text

if TYPE_CHECKING:
    from anim.archive import Archive


def ping_index(archive: Archive) -> None:
    """A trivial query: raises if the index cannot be reached (pool, network, server)."""
    with archive.index.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def check_blobs(archive: Archive) -> None:
    """The blob store's own check (raises StorageUnavailable)."""
    archive.blobs.check()
