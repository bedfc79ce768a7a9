"""STOW-RS (PS3.18 10.5): store instances sent as multipart/related application/dicom.

The body is read as a stream, part by part; each part is spooled (to disk above a
few MB) and goes through the same ``Archive.store`` as a C-STORE, so dedup,
correction, quarantine and durability are the same. Only one part is in memory at a
time: a STOW of any size holds at most its largest instance.

Response (PS3.18 10.5.3): 200 when every instance is stored, 202 when some failed or
carry a warning, 409 when none could be stored; the body is the Store Instances
Response Module as DICOM JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from pydicom import dcmread

from anim import (
    AnimError,
    Archive,
    InvalidInstance,
    Source,
    StorageUnavailable,
    StoreOutcome,
    StoreResult,
    StudyMismatch,
    metrics,
)
from anim.security import LOCAL, Principal
from web import urls
from web.errors import fail
from web.keys import archive_key, config_key, run_sync
from web.media import DICOM, parse_accept

log = logging.getLogger(__name__)

SPOOL_MEMORY = 8 << 20
READ_CHUNK = 1 << 20

# Failure reasons (PS3.18 10.5.3, from the C-STORE statuses of PS3.4 B.2.3)
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900  # also used for an instance of another study than the target
CANNOT_UNDERSTAND = 0xC000
COERCED = 0xB000  # warning: kept, but not as the current version (quarantine)


IN_FLIGHT = 4  # parts being stored at once per request (each held in memory meanwhile)


class _TooLarge(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Failure:
    sop_class: str
    sop_uid: str
    reason: int
    why: str


_Outcome = StoreResult | _Failure


async def _read_part(part: BodyPartReader, budget: int) -> tuple[bytes, int]:
    """The part's bytes (spooled while reading) and the bytes left in the budget."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY) as spool:
        while chunk := await part.read_chunk(READ_CHUNK):
            budget -= len(chunk)
            if budget < 0:
                raise _TooLarge
            spool.write(chunk)
        spool.seek(0)
        return spool.read(), budget


def _store(archive: Archive, data: bytes, source: Source, study: str | None,
           principal: Principal) -> StoreResult:
    return metrics.observed_store(archive, "stowrs", data, source, expect_study=study,
                                  principal=principal)


def _failure_reason(e: AnimError) -> int:
    if isinstance(e, StudyMismatch):
        return DOES_NOT_MATCH
    if isinstance(e, StorageUnavailable):
        return OUT_OF_RESOURCES
    if isinstance(e, InvalidInstance):
        return CANNOT_UNDERSTAND
    return PROCESSING_FAILURE


def _uids_of(data: bytes) -> tuple[str, str]:
    """Best-effort SOP Class/Instance UIDs of a part that failed, for the response."""
    try:
        ds = dcmread(BytesIO(data), force=True, stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # not DICOM at all: the item names no instance
        return "", ""


def _item(sop_class: str, sop_uid: str) -> dict[str, Any]:
    def ui(v: str) -> dict[str, Any]:
        return {"vr": "UI", "Value": [v]} if v else {"vr": "UI"}

    return {"00081150": ui(sop_class), "00081155": ui(sop_uid)}


class _Response:
    def __init__(self, base: str, study: str | None) -> None:
        self.base = base
        self.study = study
        self.stored: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.warned = False

    def ok(self, result: StoreResult) -> None:
        item = _item(result.sop_class_uid, result.sop_instance_uid)
        item["00081190"] = {"vr": "UR", "Value": [urls.instance_url(
            self.base, result.study_instance_uid, result.series_instance_uid,
            result.sop_instance_uid)]}
        if result.outcome is StoreOutcome.QUARANTINED:
            # kept aside (same UID, other content, other institution): a warning
            item["00081196"] = {"vr": "US", "Value": [COERCED]}
            self.warned = True
        self.stored.append(item)

    def fail(self, f: _Failure) -> None:
        item = _item(f.sop_class, f.sop_uid)
        item["00081197"] = {"vr": "US", "Value": [f.reason]}
        item["00090010"] = {"vr": "LO", "Value": ["ANIM"]}  # private creator
        item["00091001"] = {"vr": "LT", "Value": [f.why[:1024]]}  # the reason, in words
        self.failed.append(item)

    def status(self) -> int:
        if not self.stored and self.failed:
            return 409
        if self.failed or self.warned:
            return 202
        return 200

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.study is not None:
            out["00081190"] = {"vr": "UR", "Value": [urls.study_url(self.base, self.study)]}
        if self.failed:
            out["00081198"] = {"vr": "SQ", "Value": self.failed}
        if self.stored:
            out["00081199"] = {"vr": "SQ", "Value": self.stored}
        return out


async def store(request: web.Request) -> web.Response:
    """POST /studies and /studies/{study}."""
    ctype = request.content_type.lower()
    declared = parse_accept(request.headers.get("Content-Type", "") or "x/none")
    if ctype != "multipart/related" or len(declared) != 1 or declared[0].part_type not in (
            "", DICOM):
        fail(415, f"STOW-RS takes multipart/related; type=\"{DICOM}\", not {ctype or 'none'}")
    cfg = request.app[config_key]
    if request.content_length is not None and request.content_length > cfg.max_stow_bytes:
        fail(413, f"the body ({request.content_length} bytes) is larger than this archive "
                  f"accepts in one request ({cfg.max_stow_bytes}); send fewer instances")
    study = request.match_info.get("study")
    resp = _Response(urls.root(request), study)
    principal = request.get("principal", LOCAL)
    # a token's institution owns what it stores (tenancy); without one, [web].institution
    institution = principal.institution if principal.kind == "token" else cfg.institution
    source = Source(institution=institution, host=request.remote or "", protocol="stow")
    try:
        reader = await request.multipart()
        await _store_parts(request, reader, resp, source, study, cfg.max_stow_bytes)
    except _TooLarge:
        fail(413, f"the body is larger than this archive accepts in one request "
                  f"({cfg.max_stow_bytes} bytes); instances before the limit were stored")
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as e:
        # aiohttp's multipart reader: missing boundary, bad framing, cut-off body
        stored = len(resp.stored)
        fail(400, f"broken multipart body: {e}; {stored} instance(s) before it were stored")
    if not resp.stored and not resp.failed:
        fail(400, "the multipart body has no parts")
    # exactly application/dicom+json, without a charset: some clients compare it whole
    return web.Response(status=resp.status(), body=json.dumps(resp.body()).encode(),
                        headers={"Content-Type": "application/dicom+json"})


async def _store_parts(request: web.Request, reader: MultipartReader, resp: _Response,
                       source: Source, study: str | None, budget: int) -> None:
    """Read parts while earlier ones are stored: up to IN_FLIGHT stores overlap, so the
    index's group commit shares one transaction and fsync among them. The response
    lists the parts in the order they came, and only once each store has returned."""
    archive = request.app[archive_key]
    slots = asyncio.Semaphore(IN_FLIGHT)
    pending: list[asyncio.Task[_Outcome]] = []

    async def store_one(data: bytes) -> _Outcome:
        try:
            return await run_sync(request, _store, archive, data, source, study,
                                  request.get("principal", LOCAL))
        except AnimError as e:
            log.warning("STOW part refused from %s: %s", source.host, e)
            return _Failure(*_uids_of(data), _failure_reason(e), str(e))
        finally:
            slots.release()

    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ValueError("nested multipart parts are not DICOM instances")
            data, budget = await _read_part(part, budget)
            ptype = (part.headers.get("Content-Type") or DICOM).split(";")[0].strip().lower()
            if ptype != DICOM:
                failure = _Failure(*_uids_of(data), CANNOT_UNDERSTAND,
                                   f"a part of type {ptype} is not {DICOM}")
                pending.append(asyncio.ensure_future(_done(failure)))
                continue
            await slots.acquire()
            pending.append(asyncio.ensure_future(store_one(data)))
    finally:
        # whatever ends the body, the stores already started finish and are reported
        for outcome in await asyncio.gather(*pending):
            if isinstance(outcome, _Failure):
                resp.fail(outcome)
            else:
                resp.ok(outcome)


async def _done(outcome: _Outcome) -> _Outcome:
    return outcome
