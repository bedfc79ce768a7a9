"""Tenancy on URLs that name a study (WADO-RS, /rendered, /hcm, admin deletion): the
study must be visible to the caller, by the query engine's own filter, or the answer
is 404 as if the archive did not hold it (docs/security.md). Searches (QIDO-RS, FHIR,
C-FIND) carry the filter in their query instead.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from web.keys import archive_key, run_sync, viewer


@web.middleware
async def tenancy_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    study = request.match_info.get("study")
    # STOW-RS to /studies/{study} may create the study: storing needs no visibility
    if study is not None and request.method != "POST":
        await run_sync(request, request.app[archive_key].check_visible, study,
                       viewer(request))
    return await handler(request)
