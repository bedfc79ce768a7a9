"""Engine creation: SQLite (WAL, synchronous=FULL) or PostgreSQL (psycopg 3)."""

from __future__ import annotations

import fcntl
import os
import re
import threading
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

_MULTI_HOST = re.compile(r"^(postgresql[+\w]*://)([^@/]*@)?([^/?]*,[^/?]*)(/[^?]*)?(\?.*)?$")


def _libpq_hosts(url: str) -> str:
    """``postgresql://u@h1:p1,h2:p2/db?…`` (libpq's multi-host form, which SQLAlchemy's URL
    parser refuses) as ``postgresql://u@/db?host=h1:p1&host=h2:p2&…``, which it passes on:
    with ``target_session_attrs=read-write`` the driver finds the primary (docs/deploy.md)."""
    m = _MULTI_HOST.match(url)
    if m is None:
        return url
    scheme, user, hosts, path, query = m.groups()
    params = "&".join(f"host={h}" for h in hosts.split(","))
    rest = (query or "?")[1:]
    return f"{scheme}{user or ''}{path or '/'}?{params}{'&' + rest if rest else ''}"


def make_engine(url: str, pool_size: int = 8) -> Engine:
    """Create the engine for *url*; ``postgresql://`` uses psycopg 3."""
    u = make_url(_libpq_hosts(url))
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() == "sqlite":
        engine = create_engine(
            u,
            hide_parameters=True,  # bound values are patient data: never in error text
            pool_size=pool_size,
            max_overflow=pool_size,
            connect_args={"timeout": 30, "check_same_thread": False},
        )
        _sqlite_pragmas(engine, _WriteGate(u.database))
        return engine
    # Query results are streamed through server-side cursors, which PostgreSQL plans
    # for the first 10 % of rows by default: with ORDER BY id that walks the whole
    # table by primary key. Plan for all rows instead.
    return create_engine(u, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                         hide_parameters=True,
                         connect_args={"options": "-c cursor_tuple_fraction=1"})


class _WriteGate:
    """One SQLite write transaction at a time, handed over without SQLite's busy sleeps.

    SQLite lets one writer in; the others wait in its busy handler, which sleeps 1, 2, 5,
    ... up to 100 ms between attempts. Two writers that keep committing (the index writer
    and the audit writer of one process, or the DIMSE worker processes of one archive)
    then starve each other: a store waited up to half a second for the lock (bench/
    run-speed, 4 associations). Here a writer first takes a lock that wakes the next one
    the moment it is released: a thread lock inside the process, then an flock(2) on
    ``<database>.writelock`` between processes. It is released after COMMIT or ROLLBACK.
    """

    def __init__(self, database: str | None) -> None:
        self._lock = threading.Lock()
        self._path = f"{database}.writelock" if database and database != ":memory:" else ""
        self._fd = -1
        self._holder: int | None = None  # id() of the DBAPI connection in a write

    def acquire(self, dbapi_conn: Any) -> None:
        # as long as SQLite's own busy timeout: a writer stuck that long is an error
        if not self._lock.acquire(timeout=30):
            raise TimeoutError("SQLite write lock not obtained within 30 s")
        try:
            if self._path:
                if self._fd < 0:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o640)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise
        self._holder = _raw_id(dbapi_conn)

    def release(self, dbapi_conn: Any) -> None:
        if self._holder != _raw_id(dbapi_conn):
            return
        self._holder = None
        if self._path:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._lock.release()


def _raw_id(conn: Any) -> int:
    """id() of the DBAPI connection, given it or the pool's proxy of it (SQLAlchemy's
    dialect.do_commit receives the proxy)."""
    return id(getattr(conn, "dbapi_connection", conn))


def _sqlite_pragmas(engine: Engine, gate: _WriteGate) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (SAVEPOINT works then),
        # as the SQLAlchemy SQLite dialect docs recommend for pysqlite.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk when it returns (durability before acknowledging)
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        # LIKE is case-sensitive on PostgreSQL; make SQLite agree (PN matching uses an
        # upper-case column, so names stay case-insensitive on both)
        cur.execute("PRAGMA case_sensitive_like=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        # Writers take the write lock up front: no read-then-upgrade deadlock
        # between processes sharing the file.
        if conn.get_execution_options().get("anim_writer"):
            dbapi_conn = conn.connection.dbapi_connection
            gate.acquire(dbapi_conn)
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                gate.release(dbapi_conn)
                raise
        else:
            conn.exec_driver_sql("BEGIN")

    dialect = engine.dialect
    do_commit, do_rollback = dialect.do_commit, dialect.do_rollback

    def commit_then_release(dbapi_conn: Any) -> None:
        try:
            do_commit(dbapi_conn)
        finally:
            gate.release(dbapi_conn)

    def rollback_then_release(dbapi_conn: Any) -> None:
        try:
            do_rollback(dbapi_conn)
        finally:
            gate.release(dbapi_conn)

    # per engine: this dialect object belongs to this engine alone
    dialect.do_commit = commit_then_release  # type: ignore[method-assign]
    dialect.do_rollback = rollback_then_release  # type: ignore[method-assign]
