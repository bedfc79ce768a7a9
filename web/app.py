"""The aiohttp application: factory, typed keys, executor lifetime, run()."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from anim import Archive, WebConfig
from web import audit, auth, cors, health, metrics, ratelimit, routes, tenancy, webhooks
from web.errors import errors_middleware, nul_middleware
from web.keys import archive_key, config_key, executor_key, origin_key, stream_executor_key

log = logging.getLogger(__name__)

CleanupCtx = Callable[[web.Application], contextlib.AbstractAsyncContextManager[None]]

@contextlib.asynccontextmanager
async def _executor(app: web.Application) -> AsyncIterator[None]:
    pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="anim-web")
    streams = ThreadPoolExecutor(max_workers=64, thread_name_prefix="anim-stream")
    app[executor_key] = pool
    app[stream_executor_key] = streams
    yield
    streams.shutdown(wait=True, cancel_futures=True)
    pool.shutdown(wait=True, cancel_futures=True)


def create_app(archive: Archive, cfg: WebConfig,
               extra_ctx: Sequence[CleanupCtx] = ()) -> web.Application:
    # client_max_size bounds only bodies read whole; STOW streams its body
    # audit outermost: it sees every outcome, refused tokens included; auth next: it
    # guards every handler and the CORS capabilities answer after it; tenancy inside
    # the error middleware, whose 404 it raises for a study the caller may not see;
    # metrics outermost of all: it counts every answer, refusals included
    app = web.Application(middlewares=[metrics.metrics_middleware, nul_middleware,
                                       audit.audit_middleware,
                                       auth.auth_middleware,
                                       ratelimit.ratelimit_middleware,
                                       cors.cors_middleware, errors_middleware,
                                       tenancy.tenancy_middleware])
    app.on_response_prepare.append(cors.on_prepare)
    auth.setup(app, archive.cfg)
    app[archive_key] = archive
    app[config_key] = cfg
    app[origin_key] = {}
    app.cleanup_ctx.append(_executor)
    app.cleanup_ctx.append(metrics.executors)
    app.cleanup_ctx.append(health.readiness)
    app.on_shutdown.append(health.start_draining)
    app.cleanup_ctx.append(webhooks.background)
    for ctx in extra_ctx:
        app.cleanup_ctx.append(ctx)
    routes.setup_routes(app)
    return app
