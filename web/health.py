"""Liveness and version."""

from __future__ import annotations

from aiohttp import web

import anim
from web.keys import archive_key, run_sync


async def health(request: web.Request) -> web.Response:
    archive = request.app[archive_key]
    counts = await run_sync(request, archive.index.counts)
    return web.json_response({"status": "ok", "instances": counts["instance"],
                              "studies": counts["study"]})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"name": "anim", "version": anim.__version__})
