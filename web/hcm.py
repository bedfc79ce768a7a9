"""The HCM prefix (docs/hcm.md): the change feed, study references and KOS manifests.

The national Health Content Management layer does not copy images: it keeps
references, and learns of arrivals, changes and deletions from the change feed (or
webhooks, web/webhooks.py).
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

from aiohttp import web
from pydicom import dcmread

from anim import Archive
from anim.hcm import build_manifest, study_reference
from web.errors import fail
from web.keys import archive_key, run_sync
from web.media import parse_accept
from web.urls import PREFIX, root

MAX_LIMIT = 1000
MAX_WAIT = 60.0
POLL = 0.25  # seconds between looks while a long-polling client waits


def origin(request: web.Request) -> str:
    return root(request)[: -len(PREFIX)]


def _number(request: web.Request, name: str, default: float, low: float, high: float,
            integer: bool = True) -> Any:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        fail(400, f"{name} must be a number, got {raw!r}")
    if not low <= value <= high:
        fail(400, f"{name} must be between {low:g} and {high:g}")
    return value


async def changes(request: web.Request) -> web.Response:
    """GET /hcm/changes?since=&limit=&wait= — the change sequence after *since*.

    ``next`` is the cursor for the following call. With ``wait`` (seconds, long
    polling) an empty answer is held until something happens or the time is up.
    """
    archive = request.app[archive_key]
    since = _number(request, "since", 0, 0, 2**62)
    limit = _number(request, "limit", 100, 1, MAX_LIMIT)
    wait = _number(request, "wait", 0.0, 0.0, MAX_WAIT, integer=False)
    deadline = asyncio.get_running_loop().time() + wait
    while True:
        rows = await run_sync(request, archive.index.change_feed, since, limit)
        if rows or asyncio.get_running_loop().time() >= deadline:
            break
        await asyncio.sleep(POLL)
    latest = await run_sync(request, archive.index.last_seq)
    return web.json_response({"changes": rows, "next": rows[-1]["seq"] if rows else since,
                              "latest": latest})


def _reference(archive: Archive, study_uid: str, base: str) -> dict[str, Any]:
    info = archive.index.study_info(study_uid)
    state = archive.index.study_state(study_uid)
    cfg = archive.cfg
    ref = study_reference(info, state=state, origin=base,
                          retrieve_aet=cfg.hcm.retrieve_aet or cfg.dimse.aet)
    ref["fhir_document_reference"] = f"{base}/fhir/DocumentReference?study={study_uid}"
    return ref


async def reference(request: web.Request) -> web.Response:
    """GET /hcm/studies/{study}/reference — what a document registry needs, in one JSON."""
    archive = request.app[archive_key]
    ref = await run_sync(request, _reference, archive, request.match_info["study"],
                         origin(request))
    return web.json_response(ref)


async def manifest(request: web.Request) -> web.Response:
    """GET /hcm/studies/{study}/manifest — the KOS as a Part 10 file (application/dicom),
    or as DICOM JSON when the client asks for application/dicom+json."""
    from anim.manifest import kos_part10

    archive = request.app[archive_key]
    study = request.match_info["study"]
    types = [r.type for r in parse_accept(request.headers.get("Accept"))]
    as_json = "application/dicom+json" in types and "application/dicom" not in types
    ds = await run_sync(request, build_manifest, archive, study, root(request))
    etag = f'"{ds.SOPInstanceUID}"'
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag})
    body = await run_sync(request, kos_part10, ds)
    if as_json:
        # from the encoded bytes: highdicom leaves value objects pydicom's JSON cannot take
        text = json.dumps(dcmread(io.BytesIO(body)).to_json_dict())
        return web.Response(text=text, headers={"ETag": etag},
                            content_type="application/dicom+json")
    return web.Response(body=body, content_type="application/dicom", headers={
        "ETag": etag,
        "Content-Disposition": f'attachment; filename="{ds.SOPInstanceUID}.dcm"'})


async def webhooks(request: web.Request) -> web.Response:
    """GET /api/admin/webhooks — the outbox per endpoint: pending, delivered, errors."""
    archive = request.app[archive_key]
    status = await run_sync(request, archive.outbox.status)
    configured = {w.name: w for w in archive.cfg.hcm.webhooks}
    for s in status:
        hook = configured.get(s["endpoint"])
        s["configured"] = hook is not None
        s["url"] = hook.url if hook else None
        s["events"] = sorted(hook.events) if hook else []
    return web.json_response(status)


async def delete(request: web.Request) -> web.Response:
    """DELETE /api/admin/studies/{study}[/series/{series}[/instances/{instance}]]."""
    archive = request.app[archive_key]
    m = request.match_info
    n = await run_sync(request, archive.index.delete, m["study"], m.get("series"),
                       m.get("instance"))
    return web.json_response({"deleted_instances": n})


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/hcm/changes", changes)
    r.add_get("/hcm/studies/{study}/reference", reference)
    r.add_get("/hcm/studies/{study}/manifest", manifest)
    r.add_get("/api/admin/webhooks", webhooks)
    base = "/api/admin/studies/{study}"
    for path in (base, base + "/series/{series}", base + "/series/{series}/instances/{instance}"):
        r.add_delete(path, delete)
