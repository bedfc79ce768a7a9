"""Shared fixtures: real `anim serve` processes on free loopback ports, peers, PostgreSQL.

Under CI (``CI=true``) or ``ANIM_REQUIRE_PEERS=1`` a missing real peer (DCMTK,
PostgreSQL) fails the test; elsewhere it skips with the reason.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path

import pytest

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
        env = {**os.environ, **self.env}
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


def open_archive(data_dir: Path, index_url: str = ""):  # type: ignore[no-untyped-def]
    """Open the archive a server wrote (read side, same process as the test)."""
    from anim import Archive, load_config

    over: dict[str, dict[str, object]] = {"storage": {"data_dir": str(data_dir)}}
    if index_url:
        over["index"] = {"url": index_url}
    return Archive.open(load_config(env={}, overrides=over))


def blob_bytes(data_dir: Path) -> int:
    """Bytes of blob files on disk (what deduplication saves is measured with this)."""
    return sum(p.stat().st_size for p in (data_dir / "blobs").rglob("*") if p.is_file()
               and not p.name.startswith("."))


# ---- PostgreSQL -------------------------------------------------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database on the real PostgreSQL named by ANIM_TEST_PG_URL."""
    base = os.environ.get("ANIM_TEST_PG_URL", "")
    need_peer(bool(base), "PostgreSQL (ANIM_TEST_PG_URL, started by ./run-tests)")
    import psycopg

    name = f"anim_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = base.rsplit("/", 1)[0] + "/" + name
    yield url
    with psycopg.connect(base, autocommit=True) as conn, contextlib.suppress(Exception):
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def index_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Run a test once on SQLite and once on a real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'index.sqlite'}"
    return str(request.getfixturevalue("pg_url"))
