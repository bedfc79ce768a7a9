"""The index on PostgreSQL with a hot-standby replica (docs/deploy.md), both real servers.

A node given both hosts, the standby first, with ``target_session_attrs=read-write``
(libpq's multi-host form) writes to the primary; what DCMTK storescu sent reaches the
standby by streaming replication, change sequence included; and a node pointed at the
standby alone refuses to start with a clear reason instead of half-working.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from tests.conftest import AnimServer, need_peer, sample_files, storescu

pytestmark = [pytest.mark.integration, pytest.mark.postgres, pytest.mark.dcmtk]


def _hostport(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2]


def _counts(url: str) -> tuple[int, int]:
    with psycopg.connect(url, connect_timeout=10) as conn:
        inst = conn.execute("SELECT count(*) FROM instance").fetchone()
        top = conn.execute("SELECT coalesce(max(seq), 0) FROM change").fetchone()
    assert inst is not None
    assert top is not None
    return int(inst[0]), int(top[0])


def test_a_node_writes_to_the_primary_and_the_standby_follows(pg_url: str,
                                                              tmp_path: Path) -> None:
    replica = os.environ.get("ANIM_TEST_PG_REPLICA_URL", "")
    need_peer(bool(replica), "a PostgreSQL hot standby (ANIM_TEST_PG_REPLICA_URL, run-tests)")
    primary = urlsplit(pg_url)
    db = primary.path  # the fresh database of this test, on the primary ...
    user = primary.netloc.rpartition("@")[0]
    standby_url = f"postgresql://{user}@{_hostport(replica)}{db}"  # ... and on the standby
    both = (f"postgresql://{user}@{_hostport(replica)},{_hostport(pg_url)}{db}"
            "?target_session_attrs=read-write")

    srv = AnimServer(tmp_path / "data", env={"ANIM_INDEX_URL": both}).start()
    try:
        r = storescu(srv.dimse_port, *sample_files())
        assert r.returncode == 0, r.stderr
    finally:
        srv.stop()
    on_primary = _counts(pg_url)
    assert on_primary[0] == len(sample_files())
    assert on_primary[1] >= len(sample_files())  # one change per instance at least
    deadline = time.monotonic() + 60
    while True:  # streaming replication: the standby catches up within moments
        try:
            on_standby = _counts(standby_url)
        except psycopg.OperationalError:  # the database itself not replayed yet
            on_standby = (-1, -1)
        if on_standby == on_primary or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert on_standby == on_primary

    # the standby alone: read-only, so no node can run on it; it says so and exits
    alone = AnimServer(tmp_path / "data2", env={"ANIM_INDEX_URL": standby_url})
    with pytest.raises(RuntimeError, match=r"read-only hot standby"):
        alone.start(timeout=60)
