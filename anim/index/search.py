"""Query → SQL: PS3.4 C.2.2.2 matching over the index, results as DICOM JSON.

Matching rules, by VR of the key:

- universal (empty value, or ``*``): no condition; the key is returned (C.2.2.2.3)
- UI: single value or a backslash-separated list of UIDs (C.2.2.2.2)
- DA, TM, DT: single value or a range ``A-B``, ``A-``, ``-B``, inclusive (C.2.2.2.5)
- PN: case-insensitive (C.2.2.2.1 lets the SCP ignore case); a value without ``^`` and
  without wildcards also matches the family name component, as a reader expects
- anything else: single value, ``*``/``?`` wildcards (C.2.2.2.4), or a backslash list
  of values (any of them), case-sensitive
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydicom.datadict import tag_for_keyword
from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    func,
    literal,
    literal_column,
    or_,
    select,
)

from anim.errors import InvalidQuery
from anim.index.schema import (
    instance,
    patient,
    restriction,
    series,
    study,
    study_source,
    version,
)
from anim.query import INDEXED, Level, Query, level_of_tag, vr_of
from anim.security import Viewer

_ESC = "!"
_MAX_INT = 2**31 - 1  # the counts and numbers are 32-bit INTEGER columns on both engines


def _like(value: str) -> str:
    v = value.replace(_ESC, _ESC * 2).replace("%", _ESC + "%").replace("_", _ESC + "_")
    return v.replace("*", "%").replace("?", "_")


def _has_wildcard(value: str) -> bool:
    return "*" in value or "?" in value


# Columns of the index, by keyword
_COLUMNS: dict[str, Any] = {
    "PatientName": patient.c.patient_name,
    "PatientID": patient.c.patient_id,
    "IssuerOfPatientID": patient.c.issuer,
    "PatientBirthDate": patient.c.birth_date,
    "PatientSex": patient.c.sex,
    "StudyInstanceUID": study.c.study_uid,
    "StudyDate": study.c.study_date,
    "StudyTime": study.c.study_time,
    "AccessionNumber": study.c.accession_number,
    "StudyID": study.c.study_id,
    "StudyDescription": study.c.description,
    "ReferringPhysicianName": study.c.referring_physician,
    "ModalitiesInStudy": study.c.modalities,
    "NumberOfStudyRelatedSeries": study.c.num_series,
    "NumberOfStudyRelatedInstances": study.c.num_instances,
    "SeriesInstanceUID": series.c.series_uid,
    "Modality": series.c.modality,
    "SeriesNumber": series.c.series_number,
    "SeriesDescription": series.c.description,
    "BodyPartExamined": series.c.body_part,
    "SeriesDate": series.c.series_date,
    "NumberOfSeriesRelatedInstances": series.c.num_instances,
    "SOPInstanceUID": instance.c.sop_uid,
    "SOPClassUID": instance.c.sop_class_uid,
    "InstanceNumber": instance.c.instance_number,
    "NumberOfFrames": instance.c.num_frames,
}

# Over an alias of study: at the STUDY level and below the outer query has study too,
# and the subquery must count all the patient's studies, not correlate to the one row.
_patient_studies = study.alias("patient_studies")
_PATIENT_COUNTS = {
    "NumberOfPatientRelatedStudies": func.count(_patient_studies.c.id),
    "NumberOfPatientRelatedSeries": func.coalesce(func.sum(_patient_studies.c.num_series), 0),
    "NumberOfPatientRelatedInstances": func.coalesce(
        func.sum(_patient_studies.c.num_instances), 0),
}

_modality_series = series.alias("modality_series")

_ID = {Level.PATIENT: patient.c.id, Level.STUDY: study.c.id, Level.SERIES: series.c.id,
       Level.IMAGE: instance.c.id}


def _patient_count(kw: str) -> Any:
    return (select(_PATIENT_COUNTS[kw]).where(_patient_studies.c.patient_fk == patient.c.id)
            .correlate(patient).scalar_subquery())


def _column(kw: str) -> Any:
    if kw in _PATIENT_COUNTS:
        return _patient_count(kw)
    return _COLUMNS[kw]


def _range(col: Any, vr: str, value: str) -> ColumnElement[bool]:
    lo, _, hi = value.partition("-")
    lo, hi = lo.strip(), hi.strip()
    if not lo and not hi:
        raise InvalidQuery(f"empty range {value!r}")
    # an entity without a value lies in no range (without this, '' <= hi let every
    # empty date or time match an open-start range "-B")
    conds = [col != ""]
    if lo:
        conds.append(col >= lo)
    if hi:
        # an upper bound names a whole period: 0930 includes 09:30:59.999999
        if vr == "TM" and len(hi) in (2, 4, 6):
            hi += "5959.999999"[len(hi) - 2:]
        conds.append(col <= hi)
    return and_(*conds)


def _check_format(kw: str, vr: str, value: str) -> None:
    if vr == "DA":
        for part in value.split("-"):
            if part and (len(part) != 8 or not part.isdigit()):
                raise InvalidQuery(f"{kw}: {value!r} is not a date or date range (YYYYMMDD)")
    if vr == "TM":
        for part in value.split("-"):
            if part and not part.replace(".", "").isdigit():
                raise InvalidQuery(f"{kw}: {value!r} is not a time or time range (HHMMSS)")


def condition(kw: str, value: str, alone: bool = True) -> ColumnElement[bool]:
    """The SQL condition for one matching key (PS3.4 C.2.2.2).

    *alone*: no other key narrows the query; it picks the plan for ModalitiesInStudy.
    """
    vr = vr_of(kw)
    col = _column(kw)
    if vr == "UI":
        uids = [u.strip() for u in value.split("\\") if u.strip()]
        if any(_has_wildcard(u) for u in uids):
            raise InvalidQuery(f"{kw}: wildcards are not allowed in UIDs")
        if not uids:
            raise InvalidQuery(f"{kw}: {value!r} names no UID")
        return col.in_(uids) if len(uids) > 1 else col == uids[0]
    if vr in ("DA", "TM", "DT"):
        _check_format(kw, vr, value)
        if "-" in value:
            return _range(col, vr, value)
        return col == value
    if kw == "ModalitiesInStudy":
        mods = [m for m in value.split("\\") if m]
        if not alone:
            # other keys find the few candidate studies: filter them on the
            # denormalised set, held as 'CT\MR'
            wrapped = literal("\\") + col + literal("\\")
            return or_(*(wrapped.like("%\\" + _like(m) + "\\%", escape=_ESC)
                         for m in mods))
        # alone: studies having a series of any of these modalities, served by
        # ix_series_modality (an alias: at SERIES level and below the outer query has
        # its own series row)
        ms = _modality_series
        cond = or_(*(ms.c.modality.like(_like(m), escape=_ESC) if _has_wildcard(m)
                     else ms.c.modality == m for m in mods))
        return study.c.id.in_(select(ms.c.study_fk).where(cond))
    if vr in ("IS", "US", "UL", "SL", "SS"):
        return col.in_(_integers(kw, value))
    if vr == "PN":
        return _pn_condition(kw, value)
    return or_(*(col.like(_like(v), escape=_ESC) if _has_wildcard(v) else col == v
                 for v in value.split("\\")))


def _integers(kw: str, value: str) -> list[int]:
    try:
        nums = [int(v) for v in value.split("\\")]
    except ValueError:
        raise InvalidQuery(f"{kw}: {value!r} is not an integer") from None
    if any(abs(n) > _MAX_INT for n in nums):
        raise InvalidQuery(f"{kw}: {value!r} is out of range")
    return nums


def _pn_condition(kw: str, value: str) -> ColumnElement[bool]:
    col = patient.c.patient_name_norm if kw == "PatientName" else func.upper(_COLUMNS[kw])
    conds = []
    for v in value.split("\\"):
        v = v.upper()
        if _has_wildcard(v):
            conds.append(col.like(_like(v), escape=_ESC))
        elif "^" in v or "=" in v:
            conds.append(col == v)
        else:  # a bare family name: SMITH matches SMITH and SMITH^JOHN
            conds.append(or_(col == v, col.like(_like(v) + "^%", escape=_ESC)))
    return or_(*conds)


def _from(level: Level) -> Any:
    j = patient
    if level.depth >= 1:
        j = study.join(patient, patient.c.id == study.c.patient_fk)
    if level.depth >= 2:
        j = series.join(j, study.c.id == series.c.study_fk)
    if level.depth >= 3:
        j = instance.join(j, series.c.id == instance.c.series_fk)
    return j


def build(q: Query, with_json: bool = False, postgresql: bool = False
          ) -> tuple[Select[Any], list[str]]:
    """The SELECT for *q* and the keywords its columns hold, in order.

    *with_json* (IMAGE level): also the instance's stored DICOM JSON, as ``_json``.
    *postgresql*: the SQL is for PostgreSQL (a page of studies is chosen first, below).
    """
    keys = [k for k in q.keys if k in INDEXED and INDEXED[k].depth <= q.level.depth
            and k != "SOPClassesInStudy"]
    cols = [_column(k).label(k) for k in keys]
    stmt = select(_ID[q.level].label("_id"), *cols).select_from(_from(q.level))
    if with_json:
        stmt = stmt.add_columns(version.c.dicom_json.label("_json")).join(
            version, version.c.id == instance.c.current_version_fk)
    conds = _conditions(q)
    if postgresql and q.level is Level.STUDY and (q.limit is not None or q.offset):
        # A page of a study search: its ids first, from the study table alone, then the
        # columns of those rows only. Without this PostgreSQL joins every skipped row of
        # an OFFSET to its patient (offset 100,000: 560 ms instead of 9 ms at 1 M
        # studies; docs/benchmarks.md, "Query latency at national scale").
        sort_all = any(k in q.matching for k in _FIND_ALL_FIRST)
        page = _paged(select(study.c.id).where(*conds), q, sort_all)
        return stmt.where(study.c.id.in_(page)).order_by(study.c.id), keys
    return _paged(stmt.where(*conds), q), keys


# Keys whose matches a page of studies must find first, then sort, rather than walk the
# primary key until LIMIT of them turn up (PostgreSQL; docs/benchmarks.md, "Query
# latency at national scale"):
# - StudyDate: studies are indexed in about the order they were made, so a date range
#   holds the last ids, not ids spread evenly over the table as the planner assumes;
#   walking the key for the first 101 studies of 2024 read ~90 % of 1 M studies (180-350 ms);
# - PatientName, PatientID: a person typed them, they match few studies, and the planner
#   misjudges a LIKE pattern's share of patients; walking the key probing each study's
#   patient took 290 ms for SMI* (0.3 % of 1 M studies) against ~10 ms by the name index.
# Finding them all costs in proportion to the matches (index-only for a date range).
_FIND_ALL_FIRST = ("StudyDate", "PatientName", "PatientID")


def _paged(stmt: Select[Any], q: Query, sort_all: bool = False) -> Select[Any]:
    order: Any = _ID[q.level]
    if sort_all:
        # "+ 0" hides the primary key's order from the planner: it must find every
        # match by its own index (ix_study_date_id, the name indexes) and sort them
        order = order + literal_column("0")
    stmt = stmt.order_by(order)
    if q.limit is not None:
        stmt = stmt.limit(q.limit)
    if q.offset:
        stmt = stmt.offset(q.offset)
    return stmt


def _conditions(q: Query) -> list[ColumnElement[bool]]:
    """The WHERE conditions of *q*. At the STUDY level they name only ``study`` (patient
    keys become a subquery), so a page of study ids can be chosen from that table alone."""
    matching = q.matching
    conds, on_patient = [], []
    for kw, value in matching.items():
        cond = condition(kw, value, alone=len(matching) == 1)
        if q.level is not Level.PATIENT and INDEXED[kw] is Level.PATIENT:
            on_patient.append(cond)
        else:
            conds.append(cond)
    if q.contained:
        conds.append(_uncontained(q.level, q.contained))
    if q.viewer is not None:
        if q.level is Level.PATIENT:
            conds.append(patient.c.id.in_(
                select(study.c.patient_fk).where(visible_study(q.viewer))))
        else:
            conds.append(visible_study(q.viewer))
    if on_patient:
        # as a set of patients first: the planner then finds the few patients (an infix
        # name wildcard scans the small patient index) and their studies by index,
        # instead of walking every study in id order and joining each to its patient
        conds.append(study.c.patient_fk.in_(select(patient.c.id).where(*on_patient)))
    return conds


def contained(revs: tuple[tuple[str, str], ...]) -> ColumnElement[bool]:
    """True for a version a revoked institution sent after its cut-off."""
    return or_(*(and_(version.c.institution == inst, version.c.received_at >= after)
                 for inst, after in revs))


def _uncontained(level: Level, revs: tuple[tuple[str, str], ...]) -> ColumnElement[bool]:
    """Entities with at least one current instance not contained (docs/security.md)."""
    if level is Level.IMAGE:
        return instance.c.current_version_fk.notin_(
            select(version.c.id).where(contained(revs)))
    live = (select(instance.c.series_fk)
            .join(version, version.c.id == instance.c.current_version_fk)
            .where(~contained(revs)))
    if level is Level.SERIES:
        return series.c.id.in_(live)
    studies = select(series.c.study_fk).where(series.c.id.in_(live))
    if level is Level.STUDY:
        return study.c.id.in_(studies)
    return patient.c.id.in_(select(study.c.patient_fk).where(study.c.id.in_(studies)))


def visible_study(viewer: Viewer) -> ColumnElement[bool]:
    """The tenancy filter on ``study`` rows (docs/security.md): a study sent (in part) by
    an institution the viewer sees, or one a sharing rule shows it."""
    own = study.c.id.in_(select(study_source.c.study_fk).where(
        study_source.c.institution == viewer.institution))
    # a patient's restriction: only the institutions that sent the study still see it
    unrestricted = or_(study.c.study_uid.notin_(select(restriction.c.study_uid)), own)
    if viewer.national:
        return unrestricted
    conds: list[ColumnElement[bool]] = [study.c.id.in_(
        select(study_source.c.study_fk).where(study_source.c.institution.in_(viewer.sees)))]
    if viewer.shared_studies:
        conds.append(study.c.study_uid.in_(sorted(viewer.shared_studies)))
    if viewer.shared_patients:
        conds.append(study.c.patient_fk.in_(select(patient.c.id).where(or_(*(
            and_(patient.c.issuer == issuer, patient.c.patient_id == pid)
            for issuer, pid in sorted(viewer.shared_patients))))))
    return and_(or_(*conds), unrestricted)


def _converter(vr: str) -> Any:
    """value → DICOM JSON attribute for one VR (the per-row work of a search)."""
    empty = {"vr": vr}
    if vr == "PN":
        return lambda v: ({"vr": vr, "Value": [_pn(p) for p in v.split("\\")]}
                          if v else dict(empty))
    if vr in ("IS", "US", "UL", "SL", "SS"):
        return lambda v: {"vr": vr, "Value": [int(v)]} if v not in (None, "") else dict(empty)
    if vr in ("CS", "UI", "AE"):
        return lambda v: ({"vr": vr, "Value": [p for p in v.split("\\") if p]}
                          if v else dict(empty))
    return lambda v: {"vr": vr, "Value": [str(v)]} if v not in (None, "") else dict(empty)


def _json_value(vr: str, value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [_pn(v) for v in str(value).split("\\")]}
    if vr in ("IS", "US", "UL", "SL", "SS"):
        return {"vr": vr, "Value": [int(value)]}
    if vr in ("CS", "UI", "AE") and isinstance(value, str):
        return {"vr": vr, "Value": [v for v in value.split("\\") if v]} if value else {"vr": vr}
    return {"vr": vr, "Value": [str(value)]}


_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def _pn(value: str) -> dict[str, str]:
    """A person name as PS3.18 F.2.2: its '='-separated component groups by name."""
    return {g: v for g, v in zip(_PN_GROUPS, value.split("="), strict=False) if v}


def _tag(kw: str) -> str:
    return f"{tag_for_keyword(kw):08X}"


def _representative_json(conn: Connection, level: Level, row_id: int) -> dict[str, Any]:
    """The stored metadata of one instance of the entity, for keys the index lacks."""
    inst = instance.join(version, version.c.id == instance.c.current_version_fk)
    q = select(version.c.dicom_json)
    if level is Level.IMAGE:
        q = q.select_from(inst).where(instance.c.id == row_id)
    elif level is Level.SERIES:
        q = q.select_from(inst).where(instance.c.series_fk == row_id)
    elif level is Level.STUDY:
        q = q.select_from(inst.join(series, series.c.id == instance.c.series_fk)).where(
            series.c.study_fk == row_id)
    else:
        q = q.select_from(inst.join(series, series.c.id == instance.c.series_fk).join(
            study, study.c.id == series.c.study_fk)).where(study.c.patient_fk == row_id)
    text = conn.execute(q.order_by(instance.c.id).limit(1)).scalar()
    return json.loads(text) if text else {}


def _sop_classes(conn: Connection, study_id: int) -> list[str]:
    q = (select(instance.c.sop_class_uid).distinct()
         .select_from(instance.join(series, series.c.id == instance.c.series_fk))
         .where(series.c.study_fk == study_id).order_by(instance.c.sop_class_uid))
    return list(conn.execute(q).scalars())


def run(conn: Connection, q: Query) -> Iterator[dict[str, Any]]:
    """Stream the matches of *q* as DICOM JSON objects, in a stable order."""
    keys = build(q)[1]
    extra = [k for k in q.keys if k not in keys and k != "SOPClassesInStudy"]
    # an instance's own metadata comes in the same query; above it, one per entity
    inline = q.level is Level.IMAGE and bool(extra or q.include_all)
    stmt, keys = build(q, with_json=inline, postgresql=conn.dialect.name == "postgresql")
    want_sop_classes = "SOPClassesInStudy" in q.keys and q.level is Level.STUDY
    result = conn.execution_options(stream_results=True, yield_per=200).execute(stmt)
    # row layout: _id, the keys in order, [_json]; converters picked once, not per row
    columns = sorted((_tag(k), i + 1, _converter(vr_of(k))) for i, k in enumerate(keys))
    needs_sort = bool(want_sop_classes or extra or q.include_all)
    for rows in result.partitions():
        for row in rows:
            out = {tag: conv(row[i]) for tag, i, conv in columns}
            if needs_sort:
                _add_unindexed(conn, q, row, out, extra, inline, want_sop_classes)
                out = dict(sorted(out.items()))
            yield out


def _add_unindexed(conn: Connection, q: Query, row: Any, out: dict[str, Any],
                   extra: list[str], inline: bool, want_sop_classes: bool) -> None:
    if want_sop_classes:
        out[_tag("SOPClassesInStudy")] = {"vr": "UI", "Value": _sop_classes(conn, row[0])}
    if not (extra or q.include_all):
        return
    meta = json.loads(row[-1]) if inline else _representative_json(conn, q.level, row[0])
    for k in extra:
        t = _tag(k)
        out[t] = meta.get(t, {"vr": vr_of(k)})
    if q.include_all:
        for t, v in meta.items():
            if t not in out and level_of_tag(int(t, 16)).depth <= q.level.depth:
                out[t] = v
