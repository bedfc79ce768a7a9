"""Background work of the HCM side in every `anim serve` process: the stability sweep
and webhook delivery from the persistent outbox (docs/hcm.md).

Both are safe to run on several nodes at once: the sweep announces a study exactly
once (a conditional UPDATE), and deliveries are leased in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from aiohttp import web

from anim import Archive, __version__
from anim.config import Webhook
from anim.errors import NotFound
from anim.hcm import event_payload, signed_headers, store_manifest, study_reference
from anim.models import Notification
from web.keys import archive_key, origin_key

log = logging.getLogger(__name__)

IDLE = 0.5  # seconds between looks at an empty outbox
PER_ENDPOINT = 4  # notifications of different studies in flight at once per endpoint
KEEP_DELIVERED = timedelta(days=7)


def origin(app: web.Application) -> str:
    """The archive's public base URL for links in notifications (no request to ask)."""
    public = app[archive_key].cfg.web.public_url.rstrip("/")
    return public or app[origin_key].get("origin", "")


def payload_builder(app: web.Application) -> Any:
    archive: Archive = app[archive_key]
    cfg = archive.cfg
    aet = cfg.hcm.retrieve_aet or cfg.dimse.aet

    def build(entry: dict[str, Any]) -> dict[str, Any]:
        ref = None
        if entry["kind"] in ("study_stable", "study_updated"):
            try:
                info = archive.index.study_info(entry["study_uid"])
                state = archive.index.study_state(entry["study_uid"])
                ref = study_reference(info, state=state, origin=origin(app), retrieve_aet=aet)
            except NotFound:
                ref = None  # deleted since: the payload still says what happened
        return event_payload(entry, ref)

    return build


async def _settle_loop(app: web.Application) -> None:
    archive: Archive = app[archive_key]
    quiet = archive.cfg.hcm.stable_after
    interval = min(max(quiet / 4, 0.1), 5.0)
    loop = asyncio.get_running_loop()
    while True:
        try:
            done = await loop.run_in_executor(None, archive.index.settle, quiet)
            if done:
                log.info("hcm: %d stud%s stable", len(done), "y" if len(done) == 1 else "ies")
                if archive.cfg.hcm.store_manifest:
                    await _store_manifests(app, done)
                continue  # there may be more than one sweep's worth
        except Exception as e:  # the sweep must outlive a database hiccup
            log.warning("hcm: stability sweep failed: %s", type(e).__name__)
        await asyncio.sleep(interval)


async def _store_manifests(app: web.Application, studies: list[str]) -> None:
    archive: Archive = app[archive_key]
    loop = asyncio.get_running_loop()
    wado_root = origin(app) + "/dicom-web"
    for uid in studies:
        try:
            await loop.run_in_executor(None, store_manifest, archive, uid, wado_root)
        except NotFound:
            pass  # deleted meanwhile
        except Exception as e:
            # the study is still announced; its manifest is served by /hcm regardless
            log.warning("hcm: storing a manifest failed: %s", type(e).__name__)


async def _post(session: aiohttp.ClientSession, hook: Webhook, note: Notification
                ) -> str | None:
    """Send one notification; None when the receiver took it (2xx), else why not."""
    body = note.payload.encode()
    headers = {"Content-Type": "application/json", "User-Agent": f"anim/{__version__}",
               **signed_headers(hook.secret, f"anim-change-{note.seq}", body)}
    try:
        async with session.post(hook.url, data=body, headers=headers,
                                allow_redirects=False) as resp:
            await resp.read()
            if 200 <= resp.status < 300:
                return None
            return f"HTTP {resp.status}"
    except (TimeoutError, aiohttp.ClientError, OSError) as e:
        return type(e).__name__


async def _deliver_loop(app: web.Application, hook: Webhook) -> None:
    archive: Archive = app[archive_key]
    outbox = archive.outbox
    build = payload_builder(app)
    loop = asyncio.get_running_loop()
    lease_ms = int((hook.timeout + 5) * 1000)
    timeout = aiohttp.ClientTimeout(total=hook.timeout)
    last_prune = 0.0
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                await loop.run_in_executor(None, outbox.fan_out, hook.name, hook.events, build)
                now_ms = int(time.time() * 1000)
                notes = await loop.run_in_executor(
                    None, outbox.claim, hook.name, now_ms, lease_ms, PER_ENDPOINT)
                if not notes:
                    if time.monotonic() - last_prune > 3600:
                        last_prune = time.monotonic()
                        cutoff = (datetime.now(UTC) - KEEP_DELIVERED).isoformat()
                        await loop.run_in_executor(None, outbox.prune, cutoff)
                    await asyncio.sleep(IDLE)
                    continue
                errors = await asyncio.gather(*(_post(session, hook, n) for n in notes))
                for note, err in zip(notes, errors, strict=True):
                    if err is None:
                        await loop.run_in_executor(None, outbox.delivered, note.id)
                        log.debug("hcm: webhook %s: change %d delivered", hook.name, note.seq)
                        continue
                    # exponential backoff from 1 s, capped, with jitter so that a
                    # receiver coming back is not hit by every retry at once
                    delay = min(hook.max_backoff, 2.0 ** min(note.attempts, 20))
                    due = int((time.time() + delay * random.uniform(0.8, 1.0)) * 1000)
                    await loop.run_in_executor(None, outbox.failed, note.id, due, err)
                    log.info("hcm: webhook %s: change %d not delivered (%s), attempt %d; "
                             "retry in %.0f s", hook.name, note.seq, err, note.attempts + 1,
                             delay)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("hcm: webhook %s: delivery loop error: %s", hook.name,
                            type(e).__name__)
                await asyncio.sleep(5)


@contextlib.asynccontextmanager
async def background(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: run the sweep and one delivery loop per configured webhook."""
    archive: Archive = app[archive_key]
    hcm = archive.cfg.hcm
    for hook in hcm.webhooks:
        # before the archive accepts anything, so that a new endpoint misses nothing
        seq = await asyncio.get_running_loop().run_in_executor(
            None, archive.outbox.register, hook.name)
        log.info("hcm: webhook %s notified of changes after %d", hook.name, seq)
    tasks = [asyncio.create_task(_settle_loop(app), name="hcm-settle")]
    for hook in hcm.webhooks:
        tasks.append(asyncio.create_task(_deliver_loop(app, hook), name=f"hcm-{hook.name}"))
    yield
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
