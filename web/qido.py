"""QIDO-RS (PS3.18 10.6): search for studies, series and instances.

The request becomes an ``anim.Query`` and runs on the archive's one query engine, the
one C-FIND uses; this module only translates parameters in and adds the URLs out.

Choices where the standard leaves room:
- no match is 200 with ``[]`` (CP-2473: a 204 cannot carry the empty payload);
- ``limit`` above ``[web].qido_max_results`` (or absent, with more matches than
  that) is cut there, with a ``Warning: 299`` header saying more results exist;
- ``fuzzymatching=true`` and ``emptyvaluematching=true`` are accepted and not
  honoured: literal matching (person names case-insensitively) is done, and a
  ``Warning: 299`` says so (PS3.18 8.3.4.1 / Table 8.3.4-1);
- multiple values are comma-separated (PS3.18 8.3.4.2) for UIDs always, for other
  attributes with ``multiplevaluematching=true``; a backslash list also works;
- matching on an attribute the index cannot match on, or on an attribute of a
  level below the resource's, is 400 with the reason, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy
from pydicom.datadict import tag_for_keyword

from anim import Archive, InvalidQuery, Level, Query
from anim.query import INDEXED, UNIQUE_KEY, keyword_of, level_of_tag, vr_of
from web import urls
from web.keys import archive_key, config_key, run_sync, viewer
from web.media import parse_accept, wants_json

# PS3.18 Tables 10.6.3-3, -4 and -5: the attributes every result carries
STUDY_KEYS = (
    "StudyDate", "StudyTime", "AccessionNumber", "InstanceAvailability",
    "ModalitiesInStudy", "ReferringPhysicianName", "TimezoneOffsetFromUTC",
    "StudyDescription", "PatientName", "PatientID", "IssuerOfPatientID",
    "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "SeriesInstanceUID",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "RequestAttributesSequence", "SeriesNumber", "NumberOfSeriesRelatedInstances",
    "SeriesDate", "BodyPartExamined",
)
INSTANCE_KEYS = (
    "SOPClassUID", "SOPInstanceUID", "InstanceAvailability", "TimezoneOffsetFromUTC",
    "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
)
MAX_PAGING = 2**31 - 1
IS_RANGE = range(-(2**31), 2**31)  # PS3.5 Table 6.2-1: the values an IS may hold
_TAG = re.compile(r"[0-9A-Fa-f]{8}")  # PS3.18 8.3.4.1: a tag is exactly 8 hex digits
_CONTROL = {"limit", "offset", "includefield", "fuzzymatching", "emptyvaluematching",
            "multiplevaluematching", "orderby"}
_NAMES = {Level.PATIENT: "patient", Level.STUDY: "study", Level.SERIES: "series",
          Level.IMAGE: "instance"}
_AVAILABILITY = "00080056"
_RETRIEVE_URL = "00081190"
WARN_AGENT = "anim"
# rows are fresh trees of dicts and lists: no cycle check (it doubles the encoding time)
JSON = json.JSONEncoder(ensure_ascii=False, check_circular=False, separators=(",", ":"))


def _flag(params: MultiDictProxy[str], name: str) -> bool:
    value = params.get(name, "false").strip().lower()
    if value not in ("true", "false"):
        raise InvalidQuery(f"{name} must be true or false, got {value!r}")
    return value == "true"


def _int(params: MultiDictProxy[str], name: str, default: int | None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidQuery(f"{name} must be an integer, got {raw!r}") from None
    if not 0 <= value <= MAX_PAGING:
        raise InvalidQuery(f"{name} must be between 0 and {MAX_PAGING}")
    return value


def default_keys(level: Level, study_in_path: bool, series_in_path: bool) -> tuple[str, ...]:
    """PS3.18 10.6.3.3: a search across studies returns the study attributes too."""
    if level is Level.STUDY:
        return STUDY_KEYS
    if level is Level.SERIES:
        return SERIES_KEYS if study_in_path else SERIES_KEYS + STUDY_KEYS
    keys = INSTANCE_KEYS
    if not series_in_path:
        keys += SERIES_KEYS
    if not study_in_path:
        keys += STUDY_KEYS
    return keys


def build_query(params: MultiDictProxy[str], level: Level, path: dict[str, str],
                max_results: int) -> tuple[Query, list[str], int]:
    """The Query for a QIDO request, its Warning texts, and the server-side limit.

    Raises
    ------
    InvalidQuery
        An unknown attribute, a bad control parameter, a key the index cannot match
        or that lies below the resource's level.
    """
    # NUL is none of the control characters DICOM text allows (PS3.5 6.1.3) and
    # PostgreSQL text cannot hold one: refused here, alike on both index engines,
    # instead of failing in the database (a 500)
    if any("\x00" in t for t in (*path.values(), *params.keys(), *params.values())):
        raise InvalidQuery("a NUL character is not allowed in a query")
    for kw, uid in path.items():
        # the path names one entity: not a list, a wildcard or nothing (which would
        # match every study, or none at all)
        if not uid.strip() or any(c in uid for c in "\\,*?"):
            raise InvalidQuery(f"{kw} {uid!r} in the path is not one UID")
    warnings = _option_warnings(params)
    multiple = _flag(params, "multiplevaluematching")
    limit = _int(params, "limit", None)
    offset = _int(params, "offset", 0) or 0
    # the server caps the answer only when the client asked for more (or for no limit)
    capped = limit is None or limit > max_results
    server_limit = max_results if capped else int(limit or 0)

    match: dict[str, str] = dict(path)
    includes = [f.strip() for raw in params.getall("includefield", [])
                for f in raw.split(",") if f.strip()]
    include_all = any(f.lower() == "all" for f in includes)
    includes = [kw for kw in (_attribute(f) for f in includes if f.lower() != "all")
                if _level_of(kw).depth <= level.depth]
    for name, raw in params.items():
        if name.lower() in _CONTROL:
            continue
        kw = _attribute(name)
        if kw in path and raw != path[kw]:
            raise InvalidQuery(f"{kw} in the query differs from the one in the path")
        match[kw] = _merge(match.get(kw), _value(kw, raw, multiple))
    for kw, value in match.items():
        _check_key(kw, value, level)
    # InstanceAvailability is the server's to say, not the index's: added per result
    return_keys = tuple(k for k in default_keys(level, "StudyInstanceUID" in path,
                                                "SeriesInstanceUID" in path) + tuple(includes)
                        if k != "InstanceAvailability")
    # one more than asked, to know whether the server limit cut the results
    query = Query(level=level, match=match, return_keys=return_keys,
                  limit=server_limit + 1 if capped else server_limit, offset=offset,
                  include_all=include_all)
    return query, warnings, server_limit


def _option_warnings(params: MultiDictProxy[str]) -> list[str]:
    warnings = []
    if _flag(params, "fuzzymatching"):
        warnings.append("The fuzzymatching parameter is not supported. "
                        "Only literal matching has been performed.")
    if _flag(params, "emptyvaluematching"):
        warnings.append("The emptyvaluematching parameter is not supported. "
                        "Empty values only match universal matching.")
    return warnings


def _level_of(kw: str) -> Level:
    """The level an attribute belongs to. An includefield of a lower level (a series'
    Modality on /studies) is left out: one series' value would misdescribe the study,
    and finding one costs a metadata read per result."""
    own = INDEXED.get(kw)
    return own if own is not None else level_of_tag(tag_for_keyword(kw) or 0)


def _attribute(name: str) -> str:
    if "." in name:
        raise InvalidQuery(f"{name}: matching inside sequences is not supported")
    # a keyword or 8 hex digits, nothing int() would also take ("-0010010", "0x100010")
    if tag_for_keyword(name) is None and not _TAG.fullmatch(name):
        raise InvalidQuery(f"unknown attribute {name!r}")
    return keyword_of(name)


def _value(kw: str, raw: str, multiple: bool) -> str:
    # PS3.18 8.3.4.2: a comma separates values of a UID list; for other attributes
    # only with multiplevaluematching=true (a name may contain a comma otherwise)
    if vr_of(kw) == "UI":
        # a backslash also separates UIDs (PS3.4 C.2.2.2.2); a list of separators only
        # names no UID at all
        uids = [u.strip() for u in re.split(r"[,\\]", raw) if u.strip()]
        if not uids and raw.strip():
            raise InvalidQuery(f"{kw}: {raw!r} names no UID")
        return "\\".join(uids)
    if multiple:
        return "\\".join(v.strip() for v in raw.split(",") if v.strip())
    return raw


def _merge(old: str | None, new: str) -> str:
    return new if not old else f"{old}\\{new}"


def _check_key(kw: str, value: str, level: Level) -> None:
    if value in ("", "*"):
        return
    own = INDEXED.get(kw)
    if own is None or kw == "SOPClassesInStudy":
        raise InvalidQuery(
            f"matching on {kw} is not supported; it can be returned with includefield")
    if own.depth > level.depth:
        hint = " (use ModalitiesInStudy)" if kw == "Modality" else ""
        raise InvalidQuery(
            f"{kw} is a {_NAMES[own]}-level attribute; this resource searches "
            f"{_NAMES[level]} level{hint}")
    if vr_of(kw) == "IS":
        # beyond it no stored value can match, and PostgreSQL's INTEGER columns refuse
        # the parameter (a database error, a 500) where SQLite would just find nothing
        for v in value.split("\\"):
            try:
                n = int(v)
            except ValueError:
                continue  # not a number: the engine says so
            if n not in IS_RANGE:
                raise InvalidQuery(f"{kw}: {v!r} is out of range for an IS value")


def _run(archive: Archive, query: Query) -> list[dict[str, Any]]:
    # results are capped by the server limit: one executor call for the whole page
    return list(archive.find(query))


def _decorate(row: dict[str, Any], level: Level, base: str) -> None:
    def uid(kw: str) -> str:
        v = row.get(f"{tag_for_keyword(kw):08X}", {}).get("Value", [""])
        return str(v[0]) if v else ""

    row[_AVAILABILITY] = {"vr": "CS", "Value": ["ONLINE"]}
    st = uid("StudyInstanceUID")
    if level is Level.STUDY:
        url = urls.study_url(base, st)
    elif level is Level.SERIES:
        url = urls.series_url(base, st, uid("SeriesInstanceUID"))
    else:
        url = urls.instance_url(base, st, uid("SeriesInstanceUID"), uid("SOPInstanceUID"))
    row[_RETRIEVE_URL] = {"vr": "UR", "Value": [url]}


def _make_handler(level: Level, path_keys: tuple[str, ...]) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        if not wants_json(parse_accept(request.headers.get("Accept"))):
            raise web.HTTPNotAcceptable(
                text=json.dumps({"status": 406, "reason":
                                 "QIDO-RS answers application/dicom+json only"}),
                content_type="application/json")
        path = {kw: request.match_info[UNIQUE_KEY_PARAM[kw]] for kw in path_keys}
        cfg = request.app[config_key]
        query, warnings, server_limit = build_query(request.query, level, path,
                                                    cfg.qido_max_results)
        query = dataclasses.replace(query, viewer=viewer(request))
        base = urls.root(request)
        # the engine's ORDER BY is the entity's id: paging never repeats or skips
        rows = await run_sync(request, _run, request.app[archive_key], query)
        if len(rows) > server_limit:
            rows = rows[:server_limit]
            warnings.append(f"The number of results exceeded the maximum supported by "
                            f"the server ({server_limit}). Additional results can be "
                            f"requested with offset.")
        for row in rows:
            _decorate(row, level, base)
        rows = [dict(sorted(row.items())) for row in rows]  # F.2: in tag order
        body = urls.absolute_bulk(JSON.encode(rows), base)
        resp = web.Response(body=body.encode(), headers={"Content-Type": "application/dicom+json"})
        for w in warnings:
            resp.headers.add("Warning", f'299 {WARN_AGENT} "{w}"')
        if len(body) > 1024:
            resp.enable_compression()
        return resp

    return handler


UNIQUE_KEY_PARAM = {
    UNIQUE_KEY[Level.STUDY]: "study",
    UNIQUE_KEY[Level.SERIES]: "series",
    UNIQUE_KEY[Level.IMAGE]: "instance",
}

search_studies = _make_handler(Level.STUDY, ())
search_all_series = _make_handler(Level.SERIES, ())
search_all_instances = _make_handler(Level.IMAGE, ())
search_study_series = _make_handler(Level.SERIES, ("StudyInstanceUID",))
search_study_instances = _make_handler(Level.IMAGE, ("StudyInstanceUID",))
search_series_instances = _make_handler(Level.IMAGE, ("StudyInstanceUID", "SeriesInstanceUID"))
