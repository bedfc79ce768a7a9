"""The aiohttp application: factory, typed keys, executor lifetime, run()."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from anim import AnimError, Archive, WebConfig
from web import routes
from web.keys import archive_key, config_key, executor_key

log = logging.getLogger(__name__)

CleanupCtx = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]

@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except AnimError as e:
        return web.json_response({"error": type(e).__name__, "reason": str(e)}, status=400)
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return web.json_response({"error": "internal"}, status=500)


@contextlib.asynccontextmanager
async def _executor(app: web.Application) -> AsyncIterator[None]:
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="anim-web")
    app[executor_key] = pool
    yield
    pool.shutdown(wait=True, cancel_futures=True)


def create_app(archive: Archive, cfg: WebConfig,
               extra_ctx: Sequence[CleanupCtx] = ()) -> web.Application:
    app = web.Application(middlewares=[errors_middleware])
    app[archive_key] = archive
    app[config_key] = cfg
    app.cleanup_ctx.append(_executor)
    for ctx in extra_ctx:
        app.cleanup_ctx.append(ctx)
    routes.setup_routes(app)
    return app
