"""The query engine's SQL on a real PostgreSQL: the hot searches use their indexes.

A synthetic index (bench/load_index.py: 1,200 patients, 3,000 studies, 30,000 instances)
is loaded into a fresh database, migrated, given the PostgreSQL query indexes
(``anim.index.pg_tuning.v10_postgres_query_indexes``) and ANALYZEd. Each viewer search
runs through the real engine (``anim.index.search.run``); the SELECT it issues is
captured and EXPLAINed as anim runs it (a server-side cursor), and the plan must use the
intended index and scan no table. The answers are checked against independent counts
(hand-written SQL with other operators than the engine's). Not timed: speed is measured
by bench/run-scale.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from anim.index import search
from anim.index.engine import make_engine
from anim.index.migrations import migrate
from anim.index.pg_tuning import has_trigram, v10_postgres_query_indexes
from anim.query import Level, Query
from tests.conftest import fresh_pg_database
from web.qido import STUDY_KEYS

ROOT = Path(__file__).resolve().parents[2]
PATIENTS, STUDIES, INSTANCES = 1_200, 3_000, 30_000
TABLES = ("patient", "study", "series", "instance", "version")


def _loader() -> Any:
    spec = importlib.util.spec_from_file_location("load_index", ROOT / "bench" / "load_index.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A loaded, migrated, tuned and analysed index in a fresh database."""
    with fresh_pg_database("anim_plans") as url:
        yield from _loaded(url, tmp_path_factory)


def _loaded(url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    marker = tmp_path_factory.mktemp("plans") / "load.json"
    loader = _loader()
    loader.load(argparse.Namespace(
        url=url, patients=PATIENTS, studies=STUDIES, instances=INSTANCES, seed=2026,
        batch=20_000, json="compact", method="copy", defer=True, marker=marker, quiet=True))
    eng = make_engine(url, pool_size=2)
    migrate(eng)
    with eng.begin() as conn:
        v10_postgres_query_indexes(conn)
    with eng.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("ANALYZE")
    yield eng
    eng.dispose()


def _captured(engine: Engine, q: Query) -> tuple[str, Any, list[dict[str, Any]]]:
    """Run *q* on the real engine: the SELECT it streamed, its parameters, the results."""
    seen: list[tuple[str, Any]] = []

    def grab(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", grab)
    try:
        with engine.connect() as conn:
            rows = list(search.run(conn, q))
    finally:
        event.remove(engine, "before_cursor_execute", grab)
    selects = [s for s in seen if s[0].lstrip().upper().startswith("SELECT")]
    assert selects, "the engine issued no SELECT"
    return selects[0][0], selects[0][1], rows


def _plan(engine: Engine, sql: str, params: Any) -> str:
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur:
            # The test index is small: patient and study fit in a few dozen pages, which
            # the planner rightly finds cheaper to scan (or to hash whole) than to probe,
            # and such a plan says nothing about 10 M instances. With scans and hash or
            # merge joins priced out, the plan shows whether the SQL can be served by its
            # indexes at all: a condition no index serves still scans (_scans). Left
            # alone at 10 M instances the planner picks these same indexes: bench/run-scale
            # EXPLAINs the same SQL there and records the plans.
            for setting in ("enable_seqscan", "enable_hashjoin", "enable_mergejoin"):
                cur.execute(f"SET LOCAL {setting} = off")
            # as anim runs it: streamed through a server-side cursor (anim.index.engine sets
            # cursor_tuple_fraction=1 on its connections, so this plans for all rows)
            cur.execute("EXPLAIN (ANALYZE, BUFFERS) DECLARE plan_c CURSOR FOR " + sql, params)
            lines = [str(r[0]) for r in cur.fetchall()]
        raw.rollback()
    return "\n".join(lines)


def _scans(plan: str) -> set[str]:
    """Tables the plan reads whole: a Seq Scan, or an index scan without an Index Cond
    (the whole index in its order: a scan in disguise)."""
    lines = plan.splitlines()
    out = set()
    for i, line in enumerate(lines):
        m = re.search(r"(Seq Scan on|Scan using \w+ on) (\w+)", line)
        if not m:
            continue
        if m.group(1).startswith("Seq"):
            out.add(m.group(2))
            continue
        depth = len(line) - len(line.lstrip())
        details = []
        for nxt in lines[i + 1:]:  # this node's own lines, up to its first child
            if "->" in nxt or len(nxt) - len(nxt.lstrip()) <= depth:
                break
            details.append(nxt)
        if not any("Index Cond" in d for d in details):
            out.add(m.group(2))
    return out


@dataclass(frozen=True)
class Case:
    name: str
    level: Level
    match: dict[str, str]
    uses: tuple[str, ...]  # every one of these indexes is in the plan ("a|b": either)
    truth: str  # independent SQL: the unique keys of the matches, in id order
    limit: int | None = None


_S = "SELECT s.study_uid FROM study s JOIN patient p ON p.id = s.patient_fk WHERE "
_DATE = "ix_study_date_id|ix_study_study_date"
_MOD = "strpos('\\' || s.modalities || '\\', '\\{m}\\') > 0"


def _cases(v: dict[str, str]) -> list[Case]:
    st, fam, given = Level.STUDY, v["family"], v["given"]
    return [
        Case("patient_id", st, {"PatientID": v["pid"]}, ("ix_study_patient_fk",),
             _S + f"p.patient_id = '{v['pid']}'"),
        Case("name_prefix", st, {"PatientName": fam[:3] + "*"},
             ("ix_patient_patient_name_norm_pattern", "ix_study_patient_fk"),
             _S + f"left(p.patient_name_norm, 3) = '{fam[:3]}'", 101),
        Case("name_given", st, {"PatientName": given.lower() + "*"},  # PN: any case
             ("ix_patient_patient_name_norm_pattern", "ix_study_patient_fk"),
             _S + f"left(p.patient_name_norm, {len(given)}) = '{given}'"),
        Case("name_family", st, {"PatientName": fam},
             ("ix_patient_patient_name_norm_pattern", "ix_study_patient_fk"),
             _S + f"split_part(p.patient_name_norm, '^', 1) = '{fam}'"),
        Case("name_infix", st, {"PatientName": f"*{fam[1:4]}*"},
             ("ix_patient_name_norm_trgm", "ix_study_patient_fk"),
             _S + f"strpos(p.patient_name_norm, '{fam[1:4]}') > 0", 101),
        Case("accession", st, {"AccessionNumber": v["acc"]}, ("ix_study_accession_number",),
             _S + f"s.accession_number = '{v['acc']}'"),
        Case("study_uid", st, {"StudyInstanceUID": v["uid"]}, ("study_study_uid_key",),
             _S + f"s.study_uid = '{v['uid']}'"),
        Case("day", st, {"StudyDate": v["day"]}, (_DATE,),
             _S + f"s.study_date = '{v['day']}'", 101),
        Case("week", st, {"StudyDate": v["week"]}, (_DATE,),
             _S + "s.study_date BETWEEN '{}' AND '{}'".format(*v["week"].split("-")), 101),
        Case("modality", st, {"ModalitiesInStudy": "RF"}, ("ix_series_modality",),
             _S + _MOD.format(m="RF"), 101),
        Case("week_modality", st, {"StudyDate": v["week"], "ModalitiesInStudy": v["mod"]},
             (_DATE,),
             _S + "s.study_date BETWEEN '{}' AND '{}' AND ".format(*v["week"].split("-"))
             + _MOD.format(m=v["mod"]), 101),
        Case("series_of_study", Level.SERIES, {"StudyInstanceUID": v["uid"]},
             ("study_study_uid_key", "ix_series_study_fk"),
             f"SELECT se.series_uid FROM series se JOIN study s ON s.id = se.study_fk "
             f"WHERE s.study_uid = '{v['uid']}'"),
        Case("instances_of_study", Level.IMAGE, {"StudyInstanceUID": v["uid"]},
             ("study_study_uid_key", "ix_series_study_fk", "ix_instance_series_fk",
              "version_pkey"),
             "SELECT i.sop_uid FROM instance i JOIN series se ON se.id = i.series_fk JOIN study s "
             f"ON s.id = se.study_fk WHERE s.study_uid = '{v['uid']}'"),
        Case("instances_of_series", Level.IMAGE,
             {"StudyInstanceUID": v["uid"], "SeriesInstanceUID": v["series"]},
             ("series_series_uid_key", "ix_instance_series_fk"),
             f"SELECT i.sop_uid FROM instance i JOIN series se ON se.id = i.series_fk "
             f"WHERE se.series_uid = '{v['series']}'"),
    ]


def _values(engine: Engine) -> dict[str, str]:
    with engine.connect() as c:
        pid = c.execute(text("SELECT patient_id FROM patient WHERE num_studies >= 3 "
                             "ORDER BY id LIMIT 1")).scalar()
        acc, uid, sid = c.execute(text("SELECT accession_number, study_uid, id FROM study "
                                       "WHERE num_series >= 2 ORDER BY id LIMIT 1 OFFSET 1500")
                                  ).one()
        ser = c.execute(text("SELECT series_uid FROM series WHERE study_fk = :s ORDER BY id"),
                        {"s": sid}).scalars().first()
        day = c.execute(text("SELECT study_date FROM study GROUP BY study_date "
                             "ORDER BY count(*) DESC, study_date LIMIT 1")).scalar()
        # the commonest family name, and its commonest given-name initial
        given = c.execute(text(
            "SELECT left(patient_name_norm, strpos(patient_name_norm, '^') + 1) AS g "
            "FROM patient WHERE split_part(patient_name_norm, '^', 1) = (SELECT split_part("
            "patient_name_norm, '^', 1) AS f FROM patient GROUP BY f ORDER BY count(*) DESC, "
            "f LIMIT 1) GROUP BY g ORDER BY count(*) DESC, g LIMIT 1")).scalar()
        mods = c.execute(text("SELECT modalities FROM study WHERE study_date BETWEEN :a AND "
                              ":b ORDER BY id LIMIT 1"),
                         {"a": str(day)[:6] + "01", "b": str(day)[:6] + "07"}).scalar()
    d, g = str(day), str(given)
    return {"mod": str(mods).split("\\")[-1], "pid": str(pid), "acc": str(acc), "uid": str(uid),
            "series": str(ser), "day": d, "week": f"{d[:6]}01-{d[:6]}07",
            "family": g.split("^")[0], "given": g}


_UID = {Level.STUDY: "0020000D", Level.SERIES: "0020000E", Level.IMAGE: "00080018"}
_ORDER = {Level.STUDY: " ORDER BY s.id", Level.SERIES: " ORDER BY se.id",
          Level.IMAGE: " ORDER BY i.id"}
_KEYS = {Level.STUDY: STUDY_KEYS, Level.SERIES: ("SeriesInstanceUID", "Modality"),
         Level.IMAGE: ("SOPInstanceUID", "InstanceNumber", "Rows")}


def _check(engine: Engine, case: Case) -> None:
    keys = [k for k in _KEYS[case.level] if k not in ("InstanceAvailability",
                                                       "TimezoneOffsetFromUTC")]
    q = Query(case.level, match={**dict.fromkeys(keys, ""), **case.match}, limit=case.limit)
    sql, params, rows = _captured(engine, q)
    plan = _plan(engine, sql, params)
    for table in TABLES:
        assert table not in _scans(plan), f"{case.name}: scans {table}\n{plan}"
    for index in case.uses:  # "a|b": either will do
        assert any(i in plan for i in index.split("|")), \
            f"{case.name}: {index} not used\n{sql}\n{plan}"
    with engine.connect() as c:
        truth = list(c.execute(text(case.truth + _ORDER[case.level])).scalars())
    assert truth, f"{case.name}: the data has no match; pick other values"
    got = [r[_UID[case.level]]["Value"][0] for r in rows]
    assert got == truth[:case.limit], case.name  # the same entities, in the same order


def test_hot_searches_use_their_indexes(engine: Engine) -> None:
    with engine.connect() as conn:
        assert has_trigram(conn), "pg_trgm is part of Debian's postgresql-15"
    failures = []
    for case in _cases(_values(engine)):
        try:
            _check(engine, case)
        except AssertionError as e:  # report every search that misses, not the first
            failures.append(str(e))
    assert not failures, "\n\n".join(failures)


def test_study_list_pages_by_primary_key(engine: Engine) -> None:
    """OHIF's study list (no filter, limit and offset): walked in id order, no sort."""
    q = Query(Level.STUDY, match={k: "" for k in STUDY_KEYS if k != "InstanceAvailability"},
              limit=101, offset=101)
    sql, params, rows = _captured(engine, q)
    plan = _plan(engine, sql, params)
    assert len(rows) == 101
    # the page's ids come from the primary key alone, the columns for those 101 rows only
    assert "Index Only Scan using study_pkey" in plan, plan
    assert "Seq Scan" not in plan, plan
    with engine.connect() as c:
        first = c.execute(text("SELECT study_uid FROM study ORDER BY id LIMIT 1 OFFSET 101")
                          ).scalar()
        got = list(search.run(c, q))
    assert got[0]["0020000D"]["Value"] == [first]


def test_step_is_idempotent_and_a_no_op_on_sqlite(engine: Engine, tmp_path: Path) -> None:
    with engine.begin() as conn:
        v10_postgres_query_indexes(conn)  # again: IF NOT EXISTS everywhere
        names = set(conn.execute(text(
            "SELECT indexname FROM pg_indexes WHERE indexname IN "
            "('ix_patient_name_norm_trgm', 'ix_study_date_id')")).scalars())
    assert names == {"ix_patient_name_norm_trgm", "ix_study_date_id"}
    lite = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    migrate(lite)
    with lite.begin() as conn:
        before = set(conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index'").scalars())
        v10_postgres_query_indexes(conn)
        after = set(conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index'").scalars())
    lite.dispose()
    assert before == after
