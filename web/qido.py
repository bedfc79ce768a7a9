"""QIDO-RS, study level (PS3.18 10.6): for now the listing of all studies.

Answered by the archive's one query engine (anim.Query), like C-FIND. Matching keys
are not supported yet; a request that asks for matching gets 400 with the reason
rather than an answer that ignores the filter.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from anim import Archive, Level, Query
from web.keys import archive_key, run_sync

_PAGING = {"limit", "offset", "includefield"}
MAX_RESULTS = 1000
# PS3.18 Table 10.6.3-3: default study-level return attributes
STUDY_KEYS = (
    "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
    "ReferringPhysicianName", "StudyDescription", "PatientName", "PatientID",
    "IssuerOfPatientID", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)


def _find_all(archive: Archive, query: Query) -> list[dict[str, Any]]:
    return list(archive.find(query))


async def search_studies(request: web.Request) -> web.Response:
    unsupported = sorted(set(request.query) - _PAGING)
    if unsupported:
        keys = ", ".join(unsupported)
        raise web.HTTPBadRequest(reason=f"matching on {keys} is not supported yet")
    try:
        limit = min(int(request.query.get("limit", MAX_RESULTS)), MAX_RESULTS)
        offset = int(request.query.get("offset", 0))
    except ValueError:
        raise web.HTTPBadRequest(reason="limit and offset must be integers") from None
    if limit < 0 or offset < 0:
        raise web.HTTPBadRequest(reason="limit and offset must not be negative")
    query = Query(level=Level.STUDY, return_keys=STUDY_KEYS, limit=limit, offset=offset)
    rows = await run_sync(request, _find_all, request.app[archive_key], query)
    return web.json_response(rows, content_type="application/dicom+json")
