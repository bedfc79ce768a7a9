"""Schema migrations: an ordered list of steps, each applied once, in one transaction.

An old database is upgraded in place, never wiped. Add a step at the end of
``STEPS``; never edit one that has shipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, func, inspect, select

from anim.errors import StorageUnavailable
from anim.index import schema
from anim.index.pg_tuning import v10_postgres_query_indexes

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


def _v4_hcm(conn: Connection) -> None:
    """Study stability, patient keys on changes, the gap-free change counter, webhooks."""
    insp = inspect(conn)
    have = {t: {c["name"] for c in insp.get_columns(t)} for t in ("study", "change")}
    for table, column, ddl in (
        ("study", "settled", "INTEGER NOT NULL DEFAULT 1"),  # old studies: not re-announced
        ("study", "changed_at", "VARCHAR(32) NOT NULL DEFAULT ''"),
        ("study", "stable_events", "INTEGER NOT NULL DEFAULT 0"),
        ("change", "patient_id", "VARCHAR(64) NOT NULL DEFAULT ''"),
        ("change", "issuer", "VARCHAR(64) NOT NULL DEFAULT ''"),
    ):
        if column not in have[table]:
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
    if "ix_study_unsettled" not in {i["name"] for i in insp.get_indexes("study")}:
        conn.exec_driver_sql("CREATE INDEX ix_study_unsettled ON study (settled, changed_at)")
    for t in (schema.counter, schema.webhook_cursor, schema.webhook_outbox):
        t.create(conn, checkfirst=True)
    if conn.execute(select(schema.counter.c.value).where(
            schema.counter.c.name == "change")).first() is None:
        top = conn.execute(select(func.max(schema.change.c.seq))).scalar() or 0
        conn.execute(schema.counter.insert().values(name="change", value=int(top)))


def _v5_study_sources(conn: Connection) -> None:
    """Tenancy: who sent each study's current content, filled from the versions."""
    schema.study_source.create(conn, checkfirst=True)
    conn.exec_driver_sql(
        "INSERT INTO study_source (study_fk, institution) "
        "SELECT DISTINCT s.study_fk, v.institution FROM instance i "
        "JOIN version v ON v.id = i.current_version_fk JOIN series s ON s.id = i.series_fk "
        "WHERE NOT EXISTS (SELECT 1 FROM study_source x "
        "WHERE x.study_fk = s.study_fk AND x.institution = v.institution)")


def _v6_audit(conn: Connection) -> None:
    from anim.index.audit_log import create_audit_table

    create_audit_table(conn)


def _v7_revocation(conn: Connection) -> None:
    schema.revocation.create(conn, checkfirst=True)


def _v8_restriction(conn: Connection) -> None:
    schema.restriction.create(conn, checkfirst=True)


def _v9_blob_gc(conn: Connection) -> None:
    """Safe garbage collection: the condemned blobs, and trailer keys found by index."""
    schema.blob_condemned.create(conn, checkfirst=True)
    conn.exec_driver_sql(
        "CREATE INDEX IF NOT EXISTS ix_version_trailer_key ON version (trailer_key)")


STEPS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial schema", _v1_initial),
    (2, "prefix-match indexes for PostgreSQL", _v2_pattern_indexes),
    (3, "bytes each version added to the blob store", _v3_version_new_bytes),
    (4, "study stability, gap-free change counter, webhook outbox", _v4_hcm),
    (5, "study sources for tenancy", _v5_study_sources),
    (6, "hash-chained audit trail", _v6_audit),
    (7, "revocation of a compromised institution", _v7_revocation),
    (8, "patients' restrictions", _v8_restriction),
    (9, "garbage collection of unreferenced blobs", _v9_blob_gc),
    (10, "PostgreSQL trigram and date-page indexes", v10_postgres_query_indexes),
]

LATEST = STEPS[-1][0]
_LOCK_ID = 0x616E696D  # "anim": the advisory lock that serialises migrations


def current_version(conn: Connection) -> int:
    if not inspect(conn).has_table("schema_version"):
        return 0
    v = conn.execute(select(schema.schema_version.c.version).order_by(
        schema.schema_version.c.version.desc()).limit(1)).scalar()
    return int(v or 0)


def _serialise(conn: Connection) -> None:
    # nodes starting together on one PostgreSQL: one applies a step, the others wait for
    # it and then find it applied (SQLite: the writer's BEGIN IMMEDIATE does the same)
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_ID})")


def pending(engine: Engine) -> list[tuple[int, str]]:
    """The steps this database still lacks (``anim migrate --check``)."""
    with engine.connect() as conn:
        v = current_version(conn)
    return [(n, title) for n, title, _step in STEPS if n > v]


def migrate(engine: Engine) -> int:
    """Bring the database to the latest schema; return the number of steps applied."""
    applied = 0
    with engine.connect().execution_options(anim_writer=True) as conn:
        with conn.begin():
            if conn.dialect.name == "postgresql" and conn.exec_driver_sql(
                    "SELECT pg_is_in_recovery()").scalar():
                raise StorageUnavailable(
                    "the index database is a read-only hot standby: give the primary "
                    "(or both hosts with target_session_attrs=read-write; docs/deploy.md)")
            _serialise(conn)
            schema.schema_version.create(conn, checkfirst=True)
        for number, title, step in STEPS:
            with conn.begin():
                _serialise(conn)
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
