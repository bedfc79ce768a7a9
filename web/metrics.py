"""``GET /metrics`` (Prometheus exposition) and the middleware that counts HTTP requests.

Requests are labelled by the route *template* the router matched
(``/dicom-web/studies/{study}/series``), never the path: a path carries UIDs, and one
series per UID would both leak them and make the number of series unbounded. QIDO-RS
and FHIR searches also count as queries, WADO-RS answers as retrieval bytes, both told
apart by the handler the route leads to. With ``[auth]`` on, ``/metrics`` needs the
admin scope (web.auth.required_action); without it, it is as open as the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from anim import metrics
from web import fhir, qido, rendered, wado
from web.keys import archive_key, executor_key, run_sync, stream_executor_key

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
UNMATCHED = "unmatched"  # 404, 405: no route template to name
CLIENT_CLOSED = 499  # nginx's "client closed request": counted as 4xx

# searches, by the handler their route leads to: (protocol, query level)
_SEARCHES: dict[Callable[..., Any], tuple[str, str]] = {
    qido.search_studies: ("qido", "study"),
    qido.search_all_series: ("qido", "series"),
    qido.search_study_series: ("qido", "series"),
    qido.search_all_instances: ("qido", "image"),
    qido.search_study_instances: ("qido", "image"),
    qido.search_series_instances: ("qido", "image"),
    fhir.search_imaging_study: ("fhir", "study"),
    fhir.search_document_reference: ("fhir", "study"),
}
# WADO-RS resources (PS3.18 10.4): their bodies are retrieval bytes
_RETRIEVALS: frozenset[Callable[..., Any]] = frozenset({
    wado.retrieve, wado.metadata, wado.frames, wado.bulkdata,
    rendered.rendered, rendered.thumbnail})


def route_of(request: web.BaseRequest) -> tuple[str, Callable[..., Any] | None]:
    """The matched route's template and handler, or ("unmatched", None)."""
    route = getattr(request, "match_info", None)
    route = getattr(route, "route", None)
    resource = getattr(route, "resource", None)
    if resource is None or route is None:
        return UNMATCHED, None
    return resource.canonical, route.handler


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


def body_bytes(resp: web.StreamResponse) -> int:
    """The body's size: the declared length (sendfile bypasses aiohttp's writer, so
    nothing else knows it), else what the writer counted once the body ended."""
    if resp.content_length is not None:
        return int(resp.content_length)
    return int(resp.body_length)


def _record(request: web.Request, resp: web.StreamResponse | None, status: int,
            seconds: float) -> None:
    m = metrics.of(request.app[archive_key])
    route, handler = route_of(request)
    method = request.method if request.method in METHODS else "other"
    m.http_requests.labels(method, route, status_class(status)).inc()
    m.http_seconds.labels(method, route).observe(seconds)
    if handler is None or status >= 400:
        return
    if handler in _SEARCHES:
        protocol, level = _SEARCHES[handler]
        m.queried(protocol, level, seconds)
    elif handler in _RETRIEVALS and resp is not None:
        m.retrieved("wado", body_bytes(resp))


@web.middleware
async def metrics_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    m = metrics.of(request.app[archive_key])
    t0 = time.perf_counter()
    status, resp = 500, None
    m.http_in_progress.inc()
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        status = CLIENT_CLOSED  # the client went away: not a server error
        raise
    finally:
        m.http_in_progress.dec()
        _record(request, resp, status, time.perf_counter() - t0)


async def scrape(request: web.Request) -> web.Response:
    """The registry in the format the scraper asked for (Prometheus text 0.0.4 unless
    its Accept names OpenMetrics or text 1.0.0)."""
    registry = metrics.of(request.app[archive_key]).registry
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    # on the executor: scrape-time gauges may read the database
    body = await run_sync(request, encode, registry)
    resp = web.Response(body=body, headers={"Content-Type": content_type,
                                            "Cache-Control": "no-store"})
    resp.enable_compression()
    return resp


def _queued(pool: ThreadPoolExecutor) -> int:
    # _work_queue: the executor's own queue of submitted, not yet started calls (no
    # public accessor; stable since Python 3.2)
    return pool._work_queue.qsize()


@contextlib.asynccontextmanager
async def executors(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context (after the executors'): their queues as scrape-time gauges."""
    m = metrics.of(app[archive_key])
    for pool_name, key in (("web", executor_key), ("stream", stream_executor_key)):
        pool = app[key]
        m.sampled.add("anim_executor_queue_depth",
                      "Calls waiting for a thread of an HTTP executor",
                      lambda p=pool: _queued(p), pool=pool_name)
    yield
