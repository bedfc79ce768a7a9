"""Engine creation: SQLite (WAL, synchronous=FULL) or PostgreSQL (psycopg 3)."""

from __future__ import annotations

import re
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
        _sqlite_pragmas(engine)
        return engine
    # Query results are streamed through server-side cursors, which PostgreSQL plans
    # for the first 10 % of rows by default: with ORDER BY id that walks the whole
    # table by primary key. Plan for all rows instead.
    return create_engine(u, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True,
                         hide_parameters=True,
                         connect_args={"options": "-c cursor_tuple_fraction=1"})


def _sqlite_pragmas(engine: Engine) -> None:
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
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")
