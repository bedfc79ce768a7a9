"""Liveness, readiness and version.

``/health`` is the archive's counts (kept as it was). For load balancers and
orchestrators: ``/health/live`` answers while the event loop does (no database), and
``/health/ready`` is 200 only when this node can do its work: the index answers a
trivial query within 2 s, the blob store's check() passes, and the server is not
shutting down. The checks run on a small pool of their own, so a node whose request
executor is busy is slow, not "not ready" (which would make a balancer flap); each is
single-flight and its result reused briefly, so a check every second costs at most one
query and one probe write at a time. A 503 names the failed checks in fixed words; the
details (which may name hosts or buckets) go to the log, once per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

import anim
from anim import Archive
from anim import readiness as probes
from web.keys import archive_key, run_sync

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 2.0  # seconds a check may take before it counts as failed
INDEX_TTL = 1.0  # seconds a check's result is reused
BLOBS_TTL = 2.0


async def health(request: web.Request) -> web.Response:
    archive = request.app[archive_key]
    counts = await run_sync(request, archive.index.counts)
    return web.json_response({"status": "ok", "instances": counts["instance"],
                              "studies": counts["study"]})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"name": "anim", "version": anim.__version__})


async def live(request: web.Request) -> web.Response:
    return web.json_response({"status": "alive"})


# ---- readiness -------------------------------------------------------------------------


class Check:
    """One readiness check: run on *pool*, at most one at a time, its outcome (None:
    passed, else a reason in fixed words) reused for *ttl* seconds."""

    def __init__(self, name: str, fn: Callable[[], None], ttl: float) -> None:
        self.name, self.fn, self.ttl = name, fn, ttl
        self._at = -ttl - 1.0
        self._outcome: str | None = None
        self._running: asyncio.Future[None] | None = None

    async def outcome(self, pool: ThreadPoolExecutor) -> str | None:
        if time.monotonic() - self._at < self.ttl:
            return self._outcome
        if self._running is None or self._running.done():
            self._running = asyncio.get_running_loop().run_in_executor(pool, self.fn)
        try:
            # shielded: a check that times out keeps running for the next caller
            await asyncio.wait_for(asyncio.shield(self._running), CHECK_TIMEOUT)
        except TimeoutError:
            # not reused: the next caller waits on the same run again
            return self._settle(f"no answer within {CHECK_TIMEOUT:g} s", "")
        except Exception as e:
            return self._settle(f"unavailable ({type(e).__name__})", str(e), reuse=True)
        return self._settle(None, "", reuse=True)

    def _settle(self, outcome: str | None, detail: str, reuse: bool = False) -> str | None:
        if outcome != self._outcome:  # logged once per change, with the detail
            if outcome is None:
                log.info("readiness: %s check passes again", self.name)
            else:
                log.warning("readiness: %s check failed: %s %s", self.name, outcome, detail)
        self._outcome = outcome
        if reuse:
            self._at = time.monotonic()
        return outcome


class Readiness:
    def __init__(self, archive: Archive, pool: ThreadPoolExecutor) -> None:
        self.pool = pool
        self.draining = False
        self.checks = (Check("index", lambda: probes.ping_index(archive), INDEX_TTL),
                       Check("blobs", lambda: probes.check_blobs(archive), BLOBS_TTL))


readiness_key = web.AppKey("readiness", Readiness)


async def ready(request: web.Request) -> web.Response:
    state = request.app[readiness_key]
    results = await asyncio.gather(*(c.outcome(state.pool) for c in state.checks))
    checks = {c.name: r or "ok" for c, r in zip(state.checks, results, strict=True)}
    checks["shutdown"] = "shutting down" if state.draining else "ok"
    failed = [name for name, r in checks.items() if r != "ok"]
    body = {"status": "not ready" if failed else "ready", "checks": checks}
    if failed:
        body["failed"] = failed
    return web.json_response(body, status=503 if failed else 200,
                             headers={"Cache-Control": "no-store"})


async def start_draining(app: web.Application) -> None:
    """Answer "not ready" from now on, so a balancer stops sending. An on_shutdown hook;
    whoever stops the server may call it earlier, to give the balancer a drain period
    before the listener closes."""
    if readiness_key in app:
        app[readiness_key].draining = True


@contextlib.asynccontextmanager
async def readiness(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the checks and their two threads."""
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="anim-ready")
    app[readiness_key] = Readiness(app[archive_key], pool)
    yield
    pool.shutdown(wait=False, cancel_futures=True)
