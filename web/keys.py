"""Typed application keys and the bridge to the synchronous archive."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from anim import Archive, WebConfig
from anim.security import LOCAL, Viewer, viewer_for

T = TypeVar("T")

archive_key = web.AppKey("archive", Archive)
config_key = web.AppKey("config", WebConfig)
executor_key = web.AppKey("executor", ThreadPoolExecutor)
# streamed responses hold a thread while the client reads: their own pool, so slow or
# stalled readers can never starve short requests (QIDO, /health) of threads
stream_executor_key = web.AppKey("stream_executor", ThreadPoolExecutor)
# {"origin": "http://host:port"} once the HTTP socket is bound (links in webhooks)
origin_key = web.AppKey("origin", dict)


def viewer(request: web.Request) -> Viewer | None:
    """What the caller may see (the query engine's tenancy filter, docs/security.md)."""
    principal = request.get("principal", LOCAL)
    return viewer_for(principal, request.app[archive_key].cfg)


async def run_sync(request: web.Request, fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking archive call on the bounded executor, never on the loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app[executor_key], fn, *args)
