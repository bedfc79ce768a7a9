"""Schema migrations: an ordered list of steps, each applied once, in one transaction.

An old database is upgraded in place, never wiped. Add a step at the end of
``STEPS``; never edit one that has shipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, inspect, select

from anim.errors import StorageUnavailable
from anim.index import schema

log = logging.getLogger(__name__)


def _v1_initial(conn: Connection) -> None:
    tables = [t for t in schema.metadata.sorted_tables if t.name != "schema_version"]
    schema.metadata.create_all(conn, tables=tables)


def _v2_pattern_indexes(conn: Connection) -> None:
    # PostgreSQL can use a B-tree for LIKE 'ABC%' only with the pattern operator class
    # when the database collation is not C; SQLite's own indexes serve prefixes once
    # case_sensitive_like is on (anim.index.engine).
    if conn.dialect.name != "postgresql":
        return
    for table, column in (("patient", "patient_name_norm"), ("patient", "patient_id"),
                          ("study", "accession_number")):
        conn.exec_driver_sql(
            f"CREATE INDEX IF NOT EXISTS ix_{table}_{column}_pattern "
            f"ON {table} ({column} varchar_pattern_ops)")


def _v3_version_new_bytes(conn: Connection) -> None:
    # a database made by step 1 of this release has the column already
    if any(c["name"] == "new_bytes" for c in inspect(conn).get_columns("version")):
        return
    conn.exec_driver_sql("ALTER TABLE version ADD COLUMN new_bytes BIGINT")


STEPS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial schema", _v1_initial),
    (2, "prefix-match indexes for PostgreSQL", _v2_pattern_indexes),
    (3, "bytes each version added to the blob store", _v3_version_new_bytes),
]

LATEST = STEPS[-1][0]


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table("schema_version"):
        return 0
    v = conn.execute(select(schema.schema_version.c.version).order_by(
        schema.schema_version.c.version.desc()).limit(1)).scalar()
    return int(v or 0)


def migrate(engine: Engine) -> int:
    """Bring the database to the latest schema; return the number of steps applied."""
    applied = 0
    with engine.connect().execution_options(anim_writer=True) as conn:
        with conn.begin():
            schema.schema_version.create(conn, checkfirst=True)
        for number, title, step in STEPS:
            with conn.begin():
                if current_version(conn) >= number:
                    continue
                log.info("index: applying migration %d (%s)", number, title)
                step(conn)
                conn.execute(schema.schema_version.insert().values(
                    version=number, applied_at=datetime.now(UTC).isoformat()))
                applied += 1
        with conn.begin():
            v = current_version(conn)
    if v > LATEST:
        raise StorageUnavailable(
            f"the index has schema version {v}, newer than this program knows ({LATEST}); "
            "upgrade anim")
    return applied
