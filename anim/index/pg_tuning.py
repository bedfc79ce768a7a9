"""PostgreSQL indexes for the query engine's hot searches (docs/benchmarks.md, "Query
latency at national scale").

The query engine (``anim.index.search``) emits plain SQL that both engines run. SQLite's
own B-trees serve it; PostgreSQL needs a few more access paths for the searches a viewer
makes on a national-size index (10 M instances and more), checked with
``EXPLAIN (ANALYZE, BUFFERS)`` (tests/integration/test_pg_plans.py, bench/run-scale):

- a person-name wildcard inside the value (``*MIT*``, ``*JOHN*``): ``LIKE '%MIT%'`` has no
  fixed prefix, so no B-tree can serve it; a trigram GIN index (``pg_trgm``, shipped with
  PostgreSQL) can. A prefix (``SMI*``) is served by the ``varchar_pattern_ops`` B-trees of
  migration 2, whatever the database collation;
- a page of a study search by date (``StudyDate`` range, ``ORDER BY study.id LIMIT``):
  the ids of the range come from ``(study_date, id)`` alone, an index-only scan, and a
  top-N sort picks the page (``anim.index.search._paged`` says why the primary key must
  not be walked instead).

Searched and found served without new indexes (EXPLAIN at 10 M instances): PatientID,
AccessionNumber and the UIDs (their unique or B-tree indexes), ModalitiesInStudy alone
(``ix_series_modality``) or with a date (the date index, then a filter on the few
studies of the range), the series and instances of a study (the foreign-key indexes).

Every statement is idempotent (``IF NOT EXISTS``): the step can run again on a database
where an operator already made the indexes by hand (``CREATE INDEX CONCURRENTLY`` on a
live archive).
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

log = logging.getLogger(__name__)

TRIGRAM_INDEXES = (
    # patient names are matched upper-cased (anim.index.search._pn_condition)
    "CREATE INDEX IF NOT EXISTS ix_patient_name_norm_trgm "
    "ON patient USING gin (patient_name_norm gin_trgm_ops)",
)

INDEXES = (
    # a page of a date-range search takes the ids of the range from here, without the
    # table (an index-only scan), and sorts them (anim.index.search._paged)
    "CREATE INDEX IF NOT EXISTS ix_study_date_id ON study (study_date, id)",
)


def v10_postgres_query_indexes(conn: Connection) -> None:
    """Migration step 10: the trigram and the date-page indexes (PostgreSQL only)."""
    if conn.dialect.name != "postgresql":
        return
    if has_trigram(conn, create=True):
        for ddl in TRIGRAM_INDEXES:
            conn.exec_driver_sql(ddl)
    else:
        # an infix name wildcard then scans the patient table: slower, still correct
        log.warning("index: the pg_trgm extension is not available (install PostgreSQL's "
                    "contrib modules); name wildcards inside a value will scan patients")
    for ddl in INDEXES:
        conn.exec_driver_sql(ddl)


def has_trigram(conn: Connection, create: bool = False) -> bool:
    """Whether pg_trgm is installed in the database (*create*: install it if available).

    pg_trgm is a trusted extension (PostgreSQL 13+): the database owner may create it
    without being a superuser.
    """
    if conn.exec_driver_sql(
            "SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm'").first() is not None:
        return True
    if not create or conn.exec_driver_sql(
            "SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'").first() is None:
        return False
    try:
        with conn.begin_nested():  # a savepoint: the migration goes on without it
            conn.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except DBAPIError as e:  # e.g. no CREATE privilege on the database
        log.warning("index: cannot create the pg_trgm extension: %s", e.orig)
        return False
    return True
