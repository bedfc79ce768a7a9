"""QIDO-RS, study level (PS3.18 10.6): for now the listing of all studies.

Matching keys are not supported yet; a request that asks for matching gets
400 with the reason rather than an answer that ignores the filter.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from web.keys import archive_key, run_sync

_PAGING = {"limit", "offset", "includefield"}
MAX_RESULTS = 1000


def _attr(vr: str, value: Any) -> dict[str, Any]:
    if value in (None, ""):
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": value}]}
    if vr == "CS" and isinstance(value, str):
        return {"vr": vr, "Value": [v for v in value.split("\\") if v]}
    return {"vr": vr, "Value": [value]}


def study_json(row: dict[str, Any]) -> dict[str, Any]:
    # PS3.18 Table 10.6.3-3: default study-level return attributes
    return {
        "00080020": _attr("DA", row["study_date"]),
        "00080030": _attr("TM", row["study_time"]),
        "00080050": _attr("SH", row["accession_number"]),
        "00080061": _attr("CS", row["modalities"]),
        "00080090": _attr("PN", row["referring_physician"]),
        "00081030": _attr("LO", row["description"]),
        "00100010": _attr("PN", row["patient_name"]),
        "00100020": _attr("LO", row["patient_id"]),
        "00100021": _attr("LO", row["issuer"]),
        "0020000D": _attr("UI", row["study_uid"]),
        "00200010": _attr("SH", row["study_id"]),
        "00201206": _attr("IS", row["num_series"]),
        "00201208": _attr("IS", row["num_instances"]),
    }


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
    rows = await run_sync(request, request.app[archive_key].index.studies, limit, offset)
    return web.json_response([study_json(r) for r in rows], content_type="application/dicom+json")
