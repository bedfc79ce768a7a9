"""The admin view's JSON: counts and storage, recent changes, who sends what.

Read-only and small. It answers what an imaging IT team asks first: is data
arriving, from whom, and what does deduplication save. (Who may call it is issue 7's
business; until then the archive listens on loopback by default.)
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from anim import Archive
from anim.audit import AuditAction, from_principal
from anim.security import LOCAL, Principal
from web.errors import fail
from web.keys import archive_key, config_key, run_sync

MAX_CHANGES = 500


async def summary(request: web.Request) -> web.Response:
    archive = request.app[archive_key]
    return web.json_response(await run_sync(request, archive.index.storage_summary))


async def changes(request: web.Request) -> web.Response:
    try:
        limit = int(request.query.get("limit", 50))
    except ValueError:
        fail(400, "limit must be an integer")
    if not 1 <= limit <= MAX_CHANGES:
        fail(400, f"limit must be between 1 and {MAX_CHANGES}")
    rows = await run_sync(request, request.app[archive_key].index.recent_changes, limit)
    keep = ("seq", "at", "kind", "study_uid", "series_uid", "sop_uid")
    return web.json_response([{k: r[k] for k in keep} for r in rows])


def _peers(archive: Archive) -> list[dict[str, Any]]:
    """Configured AE titles with their activity, then any other sender seen."""
    seen = archive.index.sources()
    out: list[dict[str, Any]] = []
    for ae in archive.cfg.dimse.known_aes:
        mine = [s for s in seen if s["source_ae"] == ae.title and s["protocol"] == "dimse"]
        out.append({
            "ae_title": ae.title, "host": ae.host, "port": ae.port,
            "institution": ae.institution_name, "configured": True,
            "permissions": sorted(ae.permissions),
            "last_activity": max((s["last"] for s in mine), default=None),
            "instances": sum(s["instances"] for s in mine),
        })
    known = {ae.title for ae in archive.cfg.dimse.known_aes}
    for s in seen:
        if s["protocol"] == "dimse" and s["source_ae"] in known:
            continue
        out.append({
            "ae_title": s["source_ae"] or f"({s['protocol']})", "host": s["source_host"],
            "port": None, "institution": s["institution"], "configured": False,
            "permissions": [], "last_activity": s["last"], "instances": s["instances"],
        })
    return out


async def peers(request: web.Request) -> web.Response:
    return web.json_response(await run_sync(request, _peers, request.app[archive_key]))


async def ui_config(request: web.Request) -> web.Response:
    return web.json_response({"ohif_url": request.app[config_key].ohif_url})


# ---- compromise containment and patients' rights (docs/security.md) -------------------


async def revocations_post(request: web.Request) -> web.Response:
    """POST /api/admin/revocations {"institution", "after", "reason"}."""
    try:
        body = await request.json()
        institution, after = str(body["institution"]), str(body.get("after") or "1970-01-01")
    except (ValueError, KeyError, TypeError):
        fail(400, "expected JSON with institution and after (ISO 8601)")
    archive = request.app[archive_key]
    studies = await run_sync(request, lambda: archive.revoke(
        institution, after, str(body.get("reason", ""))[:256], _principal(request)))
    return web.json_response({"institution": institution, "contained_studies": studies})


async def revocations_delete(request: web.Request) -> web.Response:
    """DELETE /api/admin/revocations/{institution}: restore."""
    archive = request.app[archive_key]
    institution = request.match_info["institution"]
    studies = await run_sync(request, lambda: archive.restore(institution, _principal(request)))
    return web.json_response({"institution": institution, "restored_studies": studies})


async def patient_access(request: web.Request) -> web.Response:
    """GET /api/admin/audit/patient?patient=ISSUER|ID: who accessed this patient's images."""
    issuer, sep, pid = request.query.get("patient", "").rpartition("|")
    if not sep or not pid:
        fail(400, "patient must be ISSUER|ID (ISSUER may be empty: |ID)")
    archive = request.app[archive_key]
    rows = await run_sync(request, archive.patient_access, pid, issuer)
    archive.audit(from_principal(_principal(request), AuditAction.AUDIT, "success",
                                 patient_id=pid, issuer=issuer, detail="patient access report"))
    return web.json_response(rows)


def _principal(request: web.Request) -> Principal:
    return request.get("principal") or LOCAL


async def restrictions_post(request: web.Request) -> web.Response:
    """POST /api/admin/restrictions {"study", "reason"}: a patient's restriction."""
    try:
        body = await request.json()
        study = str(body["study"])
    except (ValueError, KeyError, TypeError):
        fail(400, "expected JSON with study (a Study Instance UID) and reason")
    archive = request.app[archive_key]
    await run_sync(request, lambda: archive.restrict(
        study, str(body.get("reason", ""))[:256], principal=_principal(request)))
    return web.json_response({"study": study, "restricted": True})


async def restrictions_delete(request: web.Request) -> web.Response:
    archive = request.app[archive_key]
    study = request.match_info["restricted"]
    await run_sync(request, lambda: archive.restrict(study, lift=True,
                                                     principal=_principal(request)))
    return web.json_response({"study": study, "restricted": False})
