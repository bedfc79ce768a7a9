"""FHIR R4 under ``/fhir``: ImagingStudy, the DICOMweb Endpoint and the MADO imaging
manifest DocumentReference of the studies the archive holds (read-only).

The resources are built by ``anim.fhir``; this module parses searches, runs them on
the archive's one query engine (``archive.find``: C-FIND, QIDO-RS and this share it,
and so its future tenancy filters) and wraps the results in Bundles.

Choices where FHIR R4 search (search.html) leaves room:
- unknown search parameters are refused with 400, not ignored (search.html#errors lets a server
  ignore them, but a search for ``patinet.identifier=X`` silently widened to "all
  studies" is worse than an error), and so is a search with no criteria at all: no
  whole-archive dumps;
- one value per parameter: a comma list (OR) or a repeated parameter (AND) is 400;
- token search is exact, so ``*``, ``?`` and ``\\`` in a value (the query engine's
  wildcards and list separator) are refused rather than matched as patterns;
- ``patient.identifier`` and ``patient:identifier`` (the R4 reference modifier) both search
  the logical subject reference (no Patient resource is served): ``system|value``
  is (IssuerOfPatientID, PatientID) via ``anim.fhir.issuer_of_system``, a value alone
  any issuer, ``|value`` an identifier without system (none here: no match); the
  bare ``urn:anim:issuer:`` (patients without an issuer) cannot be said to the query
  engine (an empty value is universal matching) and is filtered after it: such pages
  may come out short, without ``total``;
- paging is offset based: ``_count`` (default 50, at most 1000) and ``_offset``, which
  the ``next`` link carries; ``total`` is given when it is known without a count
  query (on the last page);
- responses are ``application/fhir+json``; ``_format`` (http.html#mime-type) may say json,
  anything else is 406, as is an Accept header that admits no JSON;
- every error is an OperationOutcome, never the archive's generic JSON error.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from anim import AnimError, Archive, Level, NotFound, Query, __version__
from anim import fhir as build
from anim.manifest import manifest_uids
from anim.security import Viewer
from anim.studyinfo import StudyInfo
from web import urls
from web.errors import status_of
from web.keys import archive_key, run_sync, viewer
from web.media import parse_accept

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
DEFAULT_COUNT = 50
MAX_COUNT = 1000
MAX_OFFSET = 2**31 - 1
_JSON_FORMATS = {"json", "application/json", FHIR_JSON}
_ISSUE = {400: "invalid", 404: "not-found", 405: "not-supported", 406: "not-supported",
          503: "transient"}

Handler = Callable[[web.Request], Awaitable[web.Response]]


class FhirError(Exception):
    """A request this server refuses: the status and the OperationOutcome issue."""

    def __init__(self, status: int, text: str, code: str = "") -> None:
        super().__init__(text)
        self.status = status
        self.code = code or _ISSUE.get(status, "processing")
        self.text = text


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False)


def _response(body: dict[str, Any], status: int = 200, text: str = "") -> web.Response:
    return web.Response(status=status, text=text or _dumps(body), content_type=FHIR_JSON,
                        charset="utf-8")


async def _send(request: web.Request, body: dict[str, Any]) -> web.Response:
    """A large resource (a study of thousands of instances, a page of them) is encoded
    on the executor: it would hold the event loop for as long."""
    return _response(body, text=await run_sync(request, _dumps, body))


def _outcome(status: int, text: str, code: str = "") -> web.Response:
    severity = "fatal" if status >= 500 else "error"
    issue = code or _ISSUE.get(status, "processing")
    return _response(build.operation_outcome(severity, issue, text), status)


def _check_format(request: web.Request) -> None:
    fmt = request.query.get("_format")
    if fmt is not None:
        if fmt.split(";")[0].strip().lower() not in _JSON_FORMATS:
            raise FhirError(406, f"_format {fmt!r}: this server answers JSON only "
                                 "(_format=json or application/fhir+json)")
        return  # _format overrides Accept (FHIR R4 http.html#mime-type)
    ranges = parse_accept(request.headers.get("Accept"))
    if not any(r.matches(FHIR_JSON) or r.matches("application/json") for r in ranges):
        raise FhirError(406, "Accept admits no JSON: this server answers "
                             "application/fhir+json only")


def _fhir(handler: Handler) -> Handler:
    """Run *handler* with the format check; every failure becomes an OperationOutcome."""
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        try:
            _check_format(request)
            return await handler(request)
        except FhirError as e:
            return _outcome(e.status, e.text, e.code)
        except AnimError as e:  # NotFound 404, InvalidQuery 400, NotAcceptable 406...
            return _outcome(status_of(e), str(e))
        except Exception:
            log.exception("FHIR %s %s failed", request.method, request.path)
            return _outcome(500, "internal error; the server log has the details",
                            "exception")
    return wrapped


def _origin(request: web.Request) -> str:
    return urls.root(request)[: -len(urls.PREFIX)]


def _base(request: web.Request) -> str:
    return _origin(request) + "/fhir"


# ---- search parameters ------------------------------------------------------------------


@dataclass
class Criteria:
    """What a search asks of the query engine, and what it cannot ask of it."""

    match: dict[str, str] = field(default_factory=dict)
    no_issuer: bool = False  # patients without IssuerOfPatientID (filtered after the query)
    nothing: bool = False  # a criterion nothing here can meet: no match, by FHIR rules
    narrowed: bool = False  # some criterion selects studies (else: refused, no dumps)

    def put(self, key: str, value: str, param: str) -> None:
        if not value:
            raise FhirError(400, f"{param}: a value is required")
        if any(c in value for c in "*?\\"):
            raise FhirError(400, f"{param}: token search is exact; '*', '?' and '\\' "
                                 "cannot be searched for")
        if self.match.get(key, value) != value:
            self.nothing = True  # two criteria that contradict each other
        self.match[key] = value
        self.narrowed = True

    def impossible(self) -> None:
        self.nothing = self.narrowed = True


def _parts(param: str, raw: str, most: int) -> list[str]:
    """Split a token on unescaped ``|`` (FHIR R4 search.html#escaping: ``\\|``, ``\\,``,
    ``\\$``, ``\\\\``); an unescaped comma is a list of values, which is refused."""
    parts: list[str] = []
    cur: list[str] = []
    chars = iter(raw)
    for ch in chars:
        if ch == "\\":
            cur.append(next(chars, "\\"))
        elif ch == ",":
            raise FhirError(400, f"{param}: one value only (no comma lists); search "
                                 "once per value", "not-supported")
        elif ch == "|":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    if len(parts) > most:
        raise FhirError(400, f"{param}: too many '|' in {raw!r}")
    return parts


def _system_value(param: str, raw: str) -> tuple[str | None, str]:
    parts = _parts(param, raw, 2)
    return (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])


def _uid(value: str) -> str:
    return value.removeprefix("urn:oid:")


def _patient(c: Criteria, param: str, raw: str) -> None:
    system, value = _system_value(param, raw)
    c.put("PatientID", value, param)
    if system is None:
        return
    if system == "":
        c.impossible()  # every patient identifier here has a system
        return
    issuer = build.issuer_of_system(system)
    if issuer:
        c.put("IssuerOfPatientID", issuer, param)
    else:  # urn:anim:issuer: alone: the patients without an issuer
        c.no_issuer = True


def _study_id(c: Criteria, param: str, raw: str) -> None:
    c.put("StudyInstanceUID", _uid(raw), param)


def _study_identifier(c: Criteria, param: str, raw: str) -> None:
    """ImagingStudy.identifier: the Study Instance UID (``urn:dicom:uid|urn:oid:<uid>``
    or ``urn:oid:<uid>``) or the Accession Number (no system: the index keeps no
    Issuer of Accession Number)."""
    system, value = _system_value(param, raw)
    if system == build.DICOM_UID_SYSTEM or (system is None and value.startswith("urn:oid:")):
        c.put("StudyInstanceUID", _uid(value), param)
    elif not system:
        c.put("AccessionNumber", value, param)
    else:
        c.impossible()  # no identifier here has that system


def _study_identifier_of_type(c: Criteria, param: str, raw: str) -> None:
    """``identifier:of-type=type-system|type-code|value`` (FHIR R4 token modifier)."""
    parts = _parts(param, raw, 3)
    if len(parts) != 3:
        raise FhirError(400, f"{param}: expected type-system|type-code|value")
    kind = (parts[0], parts[1])
    if kind in ((build.V2_0203, "ACSN"), (build.DCM, "121022")):
        c.put("AccessionNumber", parts[2], param)
    elif kind == (build.DCM, "110180"):
        c.put("StudyInstanceUID", _uid(parts[2]), param)
    else:
        c.impossible()


def _mado_study_uid(c: Criteria, param: str, raw: str) -> None:
    system, value = _system_value(param, raw)
    if system in (None, build.DICOM_UID_SYSTEM):
        c.put("StudyInstanceUID", _uid(value), param)
    else:
        c.impossible()


def _mado_accession(c: Criteria, param: str, raw: str) -> None:
    system, value = _system_value(param, raw)
    if system:
        c.impossible()  # the Accession Number identifier here has no system
    else:
        c.put("AccessionNumber", value, param)


def _doc_status(c: Criteria, param: str, raw: str) -> None:
    """``status`` (IHE MHD consumers send ``current``): the manifest is always current."""
    if "current" not in raw.split(","):
        c.nothing = True


@dataclass(frozen=True)
class Param:
    type: str
    doc: str
    apply: Callable[[Criteria, str, str], None]


_PATIENT_DOC = ("the patient: system|value (system from IssuerOfPatientID), or a "
                "value alone (any issuer)")
IMAGING_STUDY_PARAMS: dict[str, Param] = {
    "_id": Param("token", "the Study Instance UID", _study_id),
    "identifier": Param("token", "urn:dicom:uid|urn:oid:<Study Instance UID>, "
                        "urn:oid:<uid>, or an Accession Number", _study_identifier),
    "identifier:of-type": Param("token", "v2-0203|ACSN|<Accession Number> or "
                                "DCM|110180|<Study Instance UID>", _study_identifier_of_type),
    "patient.identifier": Param("token", _PATIENT_DOC, _patient),
    "patient:identifier": Param("token", _PATIENT_DOC, _patient),
}
DOCUMENT_REFERENCE_PARAMS: dict[str, Param] = {
    "study": Param("token", "the Study Instance UID (plain or urn:oid:)", _study_id),
    "study-instance-uid": Param("token", "MADO: [urn:dicom:uid|]urn:oid:<uid>",
                                _mado_study_uid),
    "accession-number": Param("token", "MADO: the Accession Number", _mado_accession),
    "patient.identifier": Param("token", _PATIENT_DOC, _patient),
    "patient:identifier": Param("token", _PATIENT_DOC, _patient),
    "status": Param("token", "current (manifests are always current)", _doc_status),
}


@dataclass(frozen=True)
class Page:
    count: int = DEFAULT_COUNT
    offset: int = 0
    include_endpoint: bool = False


def _int(name: str, raw: str, low: int, high: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise FhirError(400, f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise FhirError(400, f"{name} must be between {low} and {high}")
    return value


def _parse(request: web.Request, params: dict[str, Param],
           includes: tuple[str, ...] = ()) -> tuple[Criteria, Page]:
    c = Criteria()
    count, offset, include = DEFAULT_COUNT, 0, False
    for name in request.query:
        values = request.query.getall(name)
        if len(values) > 1:
            raise FhirError(400, f"{name} given more than once", "not-supported")
        raw = values[0]
        if name == "_format":
            continue  # checked before
        if name == "_count":
            count = _int(name, raw, 1, MAX_COUNT)
        elif name == "_offset":
            offset = _int(name, raw, 0, MAX_OFFSET)
        elif name == "_include" and raw in includes:
            include = True
        elif name in params:
            if raw:  # FHIR R4 search: empty parameters are ignored
                params[name].apply(c, name, raw)
        else:
            known = ", ".join([*params, "_count", "_offset", "_format",
                               *(f"_include={i}" for i in includes)])
            raise FhirError(400, f"unsupported search parameter {name}={raw!r}; this "
                                 f"server knows {known}", "not-supported")
    return c, Page(count, offset, include)


# ---- the archive side (run on the executor) -------------------------------------------


def _study_uids(archive: Archive, match: dict[str, str], limit: int, offset: int,
                viewer: Viewer | None) -> list[str]:
    q = Query(level=Level.STUDY, match=match, return_keys=("StudyInstanceUID",),
              limit=limit, offset=offset, viewer=viewer)
    return [r["0020000D"]["Value"][0] for r in archive.find(q)]


def _studies(archive: Archive, c: Criteria, page: Page, viewer: Viewer | None
             ) -> tuple[list[StudyInfo], int]:
    """The studies of one page and how many the engine matched (up to count + 1)."""
    uids = _study_uids(archive, c.match, page.count + 1, page.offset, viewer)
    infos = []
    for uid in uids[: page.count]:
        try:
            info = archive.index.study_info(uid)
        except NotFound:
            continue  # gone between the search and this read
        if not (c.no_issuer and info.issuer):
            infos.append(info)
    return infos, len(uids)


def _study(archive: Archive, uid: str, viewer: Viewer | None) -> StudyInfo:
    """One study, found through the query engine like a search (so its filters apply)."""
    if not build.is_fhir_id(uid) or not _study_uids(
            archive, {"StudyInstanceUID": uid}, 1, 0, viewer):
        raise FhirError(404, f"ImagingStudy/{uid} is not known here")
    return archive.index.study_info(uid)


# ---- handlers ---------------------------------------------------------------------------


def _manifest_uids(info: StudyInfo) -> tuple[str, str]:
    """The KOS manifest's (SOP Instance UID, Series Instance UID), as /hcm serves it."""
    uids = manifest_uids(info)
    return uids.sop_uid, uids.series_uid


def _document_reference(info: StudyInfo, origin: str, wado_root: str) -> dict[str, Any]:
    sop, series = _manifest_uids(info)
    return build.document_reference(
        info, manifest_sop_uid=sop, manifest_series_uid=series,
        kos_url=f"{origin}/hcm/studies/{info.study_uid}/manifest",
        imaging_study_url=f"{origin}/fhir/ImagingStudy/{info.study_uid}",
        wado_root=wado_root)


def _resources(kind: str, infos: list[StudyInfo], origin: str, wado_root: str
               ) -> list[dict[str, Any]]:
    if kind == "ImagingStudy":
        return [build.imaging_study(i, wado_root=wado_root) for i in infos]
    return [_document_reference(i, origin, wado_root) for i in infos]


def _link(request: web.Request, kind: str, **override: int) -> str:
    items = [(k, v) for k, v in request.query.items() if k not in override]
    items += [(k, str(v)) for k, v in override.items()]
    return f"{_base(request)}/{kind}?{urlencode(items)}"


async def _search(request: web.Request, kind: str, params: dict[str, Param],
                  includes: tuple[str, ...] = ()) -> web.Response:
    c, page = _parse(request, params, includes)
    if not c.narrowed:
        raise FhirError(400, f"{kind} search needs a criterion ({', '.join(params)}); "
                             "the whole archive is not listed")
    infos: list[StudyInfo] = []
    matched = 0
    if not c.nothing:
        infos, matched = await run_sync(request, _studies, request.app[archive_key], c, page,
                                        viewer(request))
    more = matched > page.count
    total = None
    if not more and not c.no_issuer and (matched or page.offset == 0):
        total = page.offset + len(infos)
    root = urls.root(request)
    resources = await run_sync(request, _resources, kind, infos, _origin(request), root)
    bundle = build.searchset(
        resources, base=_base(request), total=total,
        self_url=_link(request, kind, _count=page.count, _offset=page.offset),
        next_url=_link(request, kind, _count=page.count, _offset=page.offset + page.count)
        if more else None,
        included=[build.endpoint(root)] if page.include_endpoint and resources else [])
    return await _send(request, bundle)


@_fhir
async def metadata(request: web.Request) -> web.Response:
    def triples(params: dict[str, Param]) -> tuple[tuple[str, str, str], ...]:
        """One entry per parameter name; chains and modifiers are in its documentation."""
        out: dict[str, tuple[str, str, str]] = {}
        for name, p in params.items():
            base = re.split(r"[.:]", name)[0]
            kind = "reference" if base == "patient" else p.type
            doc = f"{out[base][2]}; {name}: {p.doc}" if base in out else f"{name}: {p.doc}"
            out[base] = (base, kind, doc)
        return tuple(out.values())

    return _response(build.capability_statement(
        _base(request), version=__version__,
        imaging_study_params=triples(IMAGING_STUDY_PARAMS),
        document_reference_params=triples(DOCUMENT_REFERENCE_PARAMS)))


@_fhir
async def search_imaging_study(request: web.Request) -> web.Response:
    return await _search(request, "ImagingStudy", IMAGING_STUDY_PARAMS,
                         ("ImagingStudy:endpoint",))


@_fhir
async def read_imaging_study(request: web.Request) -> web.Response:
    uid = request.match_info["id"]
    info = await run_sync(request, _study, request.app[archive_key], uid, viewer(request))
    return await _send(request, build.imaging_study(info, wado_root=urls.root(request)))


@_fhir
async def search_document_reference(request: web.Request) -> web.Response:
    return await _search(request, "DocumentReference", DOCUMENT_REFERENCE_PARAMS)


@_fhir
async def read_endpoint(request: web.Request) -> web.Response:
    if request.match_info["id"] != build.ENDPOINT_ID:
        raise FhirError(404, f"Endpoint/{request.match_info['id']} is not known here; "
                             f"the one endpoint is Endpoint/{build.ENDPOINT_ID}")
    return _response(build.endpoint(urls.root(request)))


def _endpoint_id(c: Criteria, param: str, raw: str) -> None:
    if raw != build.ENDPOINT_ID:
        c.nothing = True


def _endpoint_type(c: Criteria, param: str, raw: str) -> None:
    system, value = _system_value(param, raw)
    if value != "dicom-wado-rs" or system not in (None, build.CONNECTION_TYPE):
        c.nothing = True


def _endpoint_status(c: Criteria, param: str, raw: str) -> None:
    if "active" not in raw.split(","):
        c.nothing = True


ENDPOINT_PARAMS: dict[str, Param] = {
    "_id": Param("token", f"{build.ENDPOINT_ID}", _endpoint_id),
    "connection-type": Param("token", "dicom-wado-rs", _endpoint_type),
    "status": Param("token", "active", _endpoint_status),
}


@_fhir
async def search_endpoint(request: web.Request) -> web.Response:
    """The one Endpoint, unless a criterion excludes it (listing it dumps nothing)."""
    c, _page = _parse(request, ENDPOINT_PARAMS)
    found = [] if c.nothing else [build.endpoint(urls.root(request))]
    return _response(build.searchset(found, base=_base(request), total=len(found),
                                     self_url=_link(request, "Endpoint"), next_url=None))


@_fhir
async def read_document_reference(request: web.Request) -> web.Response:
    # the id is derived from the study's content (a hash): it does not lead back to it
    raise FhirError(404, f"DocumentReference/{request.match_info['id']}: read by id is "
                         "not supported; search DocumentReference?study=<Study Instance "
                         "UID> or ?patient.identifier=system|value")


@_fhir
async def unknown(request: web.Request) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        resp = _outcome(405, f"{request.method} is not supported: this FHIR server is "
                             "read-only")
        resp.headers["Allow"] = "GET, HEAD"
        return resp
    raise FhirError(404, f"{request.path} is not served; GET /fhir/metadata lists what is")


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/fhir/metadata", metadata)
    r.add_get("/fhir/ImagingStudy", search_imaging_study)
    r.add_get("/fhir/ImagingStudy/{id}", read_imaging_study)
    r.add_get("/fhir/Endpoint", search_endpoint)
    r.add_get("/fhir/Endpoint/{id}", read_endpoint)
    r.add_get("/fhir/DocumentReference", search_document_reference)
    r.add_get("/fhir/DocumentReference/{id}", read_document_reference)
    # last: anything else under /fhir (other types, other methods) as an OperationOutcome
    r.add_route("*", "/fhir", unknown)
    r.add_route("*", "/fhir/{tail:.*}", unknown)
