"""WADO-RS (PS3.18 10.4): instances, metadata, frames and bulk data.

Everything streams: a study goes out blob by blob through a bounded queue (see
``web.streaming``), metadata instance by instance from the JSON computed at ingest.

Transfer syntaxes (PS3.18 8.7.3.5): ``transfer-syntax=*`` returns what is stored,
byte for byte; no parameter means Explicit VR Little Endian (the default of
``application/dicom`` and ``application/octet-stream``), decoded where the stored
object is compressed; any other syntax is served only if it is the stored one, else
406. A study whose instances cannot all be served in an acceptable syntax is 406
before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import zlib
from collections.abc import Iterator
from email.utils import format_datetime
from typing import Any

from aiohttp import web

from anim import Archive, NotAcceptable, NotFound, StoredInstance, metrics, pixels, transcode
from anim.storage import FileBlobStore
from web import urls
from web.errors import fail
from web.keys import archive_key, run_sync
from web.media import (
    DICOM,
    EXPLICIT_LE,
    MULTIPART,
    OCTET,
    MediaRange,
    parse_accept,
    wants_json,
)
from web.streaming import (
    WRITE_TIMEOUT,
    Chunks,
    boundary,
    closing,
    decode_slots,
    iterate_sync,
    part_head,
    send_stream,
    write,
)

log = logging.getLogger(__name__)

# below this a blob is read and written with its neighbours: a sendfile call costs more
# than copying a header
SMALL_BLOB = 64 * 1024

IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
UNCOMPRESSED = (EXPLICIT_LE, IMPLICIT_LE)
NATIVE_LE = (EXPLICIT_LE, IMPLICIT_LE)
_PIXEL_TAGS = ("7FE00010", "7FE00008", "7FE00009")


def _uids(request: web.Request) -> tuple[str, str | None, str | None]:
    m = request.match_info
    return m["study"], m.get("series"), m.get("instance")


def _scope_name(study: str, series: str | None, sop: str | None) -> str:
    if sop is not None:
        return f"instance {sop} in series {series} of study {study}"
    if series is not None:
        return f"series {series} in study {study}"
    return f"study {study}"


def _list_instances(archive: Archive, study: str, series: str | None,
                    sop: str | None) -> list[StoredInstance]:
    return [inst for inst, _ in archive.scoped(study, series, sop)]


async def instances_in_scope(request: web.Request) -> list[StoredInstance]:
    """The current instances the path names, in reading order; 404 if none."""
    study, series, sop = _uids(request)
    found = await run_sync(request, _list_instances, request.app[archive_key],
                           study, series, sop)
    if not found:
        fail(404, f"no {_scope_name(study, series, sop)}")
    return found


# ---- instances ------------------------------------------------------------------------


def _target_for(r: MediaRange, stored: str) -> str | bool | None:
    """The syntax *r* asks an instance in *stored* be sent in: None = as stored,
    False = this range cannot serve it."""
    if not (r.type in ("*/*", "multipart/*", MULTIPART, DICOM)
            and r.part_type in ("", DICOM, "*/*")):
        return False
    ts = r.transfer_syntax
    if ts is None:
        # */* alone: the cheapest acceptable answer, the stored bytes
        ts = "*" if r.type in ("*/*", "multipart/*") and not r.part_type else EXPLICIT_LE
    if ts == "*" or ts == stored:
        return None
    if ts in UNCOMPRESSED:
        return ts
    return False


def plan_syntaxes(ranges: list[MediaRange], insts: list[StoredInstance]
                  ) -> list[tuple[StoredInstance, str | None]]:
    plan: list[tuple[StoredInstance, str | None]] = []
    for inst in insts:
        for r in ranges:
            target = _target_for(r, inst.transfer_syntax)
            if target is not False:
                plan.append((inst, target if isinstance(target, str) else None))
                break
        else:
            raise NotAcceptable(
                f"instance {inst.sop_instance_uid} is stored in {inst.transfer_syntax}, which "
                f"can be sent as stored (transfer-syntax=*) or as {EXPLICIT_LE}; "
                f"the Accept header allows neither")
    return plan


def _multipart_dicom(archive: Archive, plan: list[tuple[StoredInstance, str | None]],
                     bnd: str) -> Iterator[bytearray]:
    ch = Chunks()
    for inst, target in plan:
        ts = target or inst.transfer_syntax
        yield from ch.add(part_head(bnd, f"{DICOM}; transfer-syntax={ts}"))
        if target is None:  # as stored: the blobs, read straight into the chunks
            yield from ch.add(archive.file_prefix(inst))
            for key in inst.blob_keys:
                with archive.blobs.open(key) as f:
                    yield from ch.read_from(f)
        else:
            for piece in archive.iter_part10(inst, target):
                yield from ch.add(piece)
        yield from ch.add(b"\r\n")
    yield from ch.add(closing(bnd))
    yield from ch.rest()


async def retrieve(request: web.Request) -> web.StreamResponse:
    """Study, series or instance as multipart/related; type="application/dicom"."""
    ranges = parse_accept(request.headers.get("Accept"))
    insts = await instances_in_scope(request)
    plan = plan_syntaxes(ranges, insts)
    metrics.of(request.app[archive_key]).retrieved("wado", 0, len(plan))  # bytes: web.metrics
    bnd = boundary()
    resp = web.StreamResponse(headers={
        "Content-Type": f'{MULTIPART}; type="{DICOM}"; boundary={bnd}'})
    if _local_files(request) and all(target is None for _, target in plan):
        return await _send_stored(request, resp, plan, bnd)
    chunks = iterate_sync(request, _multipart_dicom, request.app[archive_key], plan, bnd)
    return await send_stream(request, resp, chunks)


def _local_files(request: web.Request) -> bool:
    """Blobs are local files: sendfile can send them. An object store's blobs are read
    on a worker thread instead (the event loop never waits for the network)."""
    return isinstance(request.app[archive_key].blobs, FileBlobStore)


async def _send_stored(request: web.Request, resp: web.StreamResponse,
                       plan: list[tuple[StoredInstance, str | None]],
                       bnd: str) -> web.StreamResponse:
    """Everything as stored: the blobs go from the page cache to the socket with
    sendfile (no copy through Python), and the exact length is known up front from
    the sizes recorded at ingest, so the body is not chunked."""
    archive = request.app[archive_key]
    heads: list[tuple[bytes, tuple[str, ...]]] = []
    total = len(closing(bnd))
    for inst, _ in plan:
        head = (part_head(bnd, f"{DICOM}; transfer-syntax={inst.transfer_syntax}")
                + archive.file_prefix(inst))
        heads.append((head, inst.blob_keys))
        total += len(head) + inst.size - len(inst.prefix) + 2
    resp.content_length = total
    await resp.prepare(request)
    loop = asyncio.get_running_loop()
    pending = bytearray()  # small pieces gathered into one write before each sendfile
    try:
        for head, keys in heads:
            pending += head
            for key in keys:
                with archive.blobs.open(key) as f:
                    if os.fstat(f.fileno()).st_size <= SMALL_BLOB:
                        pending += f.read()
                        continue
                    await write(resp, pending)
                    pending = bytearray()
                    await asyncio.wait_for(loop.sendfile(request.transport, f),  # type: ignore[arg-type]
                                           WRITE_TIMEOUT)
            pending += b"\r\n"
        pending += closing(bnd)
        await write(resp, pending)
        await resp.write_eof()
    except (ConnectionError, TimeoutError) as e:
        log.info("HTTP GET %s: the client went away mid-response (%s)", request.path,
                 type(e).__name__)
        if request.transport is not None:
            request.transport.close()
    except Exception as e:  # a missing blob: the length can no longer be kept
        log.warning("HTTP GET %s: response cut after its start: %s", request.path, e)
        if request.transport is not None:
            request.transport.close()
    return resp


# ---- metadata -------------------------------------------------------------------------


def _json_chunks(archive: Archive, study: str, series: str | None, sop: str | None,
                 base: str) -> Iterator[bytes]:
    batch: list[str] = []
    first = True
    for _, text in archive.scoped(study, series, sop, with_json=True):
        batch.append(text)
        if len(batch) == 64:
            yield _piece(batch, first, base)
            first, batch = False, []
    if batch or first:
        yield _piece(batch, first, base)
    yield b"]"


def _piece(batch: list[str], first: bool, base: str) -> bytes:
    text = ",".join(batch)
    return (("[" if first else ",") + urls.absolute_bulk(text, base)).encode()


async def metadata(request: web.Request) -> web.StreamResponse:
    """PS3.18 10.4.1.1.2: the DICOM JSON of every instance, from the index alone."""
    if not wants_json(parse_accept(request.headers.get("Accept"))):
        fail(406, "metadata is sent as application/dicom+json")
    study, series, sop = _uids(request)
    archive = request.app[archive_key]
    n, top, last = await run_sync(request, archive.index.scope_stamp, study, series, sop)
    if n == 0:
        fail(404, f"no {_scope_name(study, series, sop)}")
    base = urls.root(request)
    # the validator changes with any store, correction or promotion in the scope, and
    # with the base URL the BulkDataURIs are written with
    etag = f'"{n}-{top}-{zlib.crc32(base.encode()):08x}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if last is not None:
        headers["Last-Modified"] = format_datetime(last, usegmt=True)
    if _not_modified(request, etag, last):
        return web.Response(status=304, headers=headers)
    resp = web.StreamResponse(headers=headers)
    resp.content_type = "application/dicom+json"
    resp.enable_compression()
    chunks = iterate_sync(request, _json_chunks, archive, study, series, sop, base)
    return await send_stream(request, resp, chunks)


def _not_modified(request: web.Request, etag: str, last: Any) -> bool:
    inm = request.headers.get("If-None-Match")
    if inm is not None:
        return etag in [t.strip().removeprefix("W/") for t in inm.split(",")] or inm == "*"
    ims = request.if_modified_since
    return ims is not None and last is not None and last.replace(microsecond=0) <= ims


# ---- frames ---------------------------------------------------------------------------


def parse_frame_list(text: str) -> list[int]:
    try:
        numbers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        numbers = []
    if not numbers or any(n < 1 for n in numbers):
        fail(400, f"frame list {text!r}: expected comma-separated frame numbers from 1")
    if len(set(numbers)) != len(numbers):
        fail(400, f"frame list {text!r}: a frame is asked for more than once")
    return numbers


def _frame_choice(ranges: list[MediaRange], stored: str) -> tuple[str, bool, bool]:
    """(part media type, decode to Explicit VR LE?, single part?) for the frames."""
    native = pixels.frames_are_native(stored)
    compressed_type = pixels.frame_media_type(stored)
    for r in ranges:
        single = r.type not in (MULTIPART, "*/*", "multipart/*")
        part = r.type if single else (r.part_type or OCTET)
        part = pixels.MEDIA_TYPE_ALIASES.get(part, part)
        ts = r.transfer_syntax
        if part in (OCTET, "*/*"):
            if ts == "*" or ts == stored or (native and ts in (None, EXPLICIT_LE)):
                return OCTET, False, single
            if ts in (None, EXPLICIT_LE):
                return OCTET, True, single
        elif part == compressed_type and ts in (None, "*", stored):
            return part, False, single
    raise NotAcceptable(
        f"the frames are stored in {stored} ({compressed_type}); they can be sent as "
        f"stored (transfer-syntax=*) or decoded as {OCTET} in {EXPLICIT_LE}")


def _frames(archive: Archive, inst: StoredInstance, numbers: list[int],
            decode: bool) -> list[bytes]:
    meta = archive.instance_json(inst.sop_instance_uid)
    if decode:
        with decode_slots:
            data = b"".join(archive.iter_bytes(inst))
            return pixels.decoded_frames(data, inst.transfer_syntax, numbers)
    return pixels.stored_frames(archive.blobs.open, inst, meta, numbers)


async def frames(request: web.Request) -> web.StreamResponse:
    """PS3.18 10.4.1.1.6: frames of one instance, stored or decoded."""
    numbers = parse_frame_list(request.match_info["frames"])
    inst = (await instances_in_scope(request))[0]
    ranges = parse_accept(request.headers.get("Accept"))
    part_type, decode, single = _frame_choice(ranges, inst.transfer_syntax)
    if single and len(numbers) != 1:
        fail(406, "a single-part response carries one frame; ask for multipart/related")
    data = await run_sync(request, _frames, request.app[archive_key], inst, numbers, decode)
    # inflated deflate frames are native Explicit VR LE pixels; stored ones as stored
    ts = EXPLICIT_LE if decode or inst.transfer_syntax == DEFLATED else inst.transfer_syntax
    ctype = f"{part_type}; transfer-syntax={ts}"
    if single:
        return web.Response(body=data[0], headers={"Content-Type": ctype})
    return await _send_parts(request, part_type, ctype, data)


async def _send_parts(request: web.Request, part_type: str, ctype: str,
                      parts: list[bytes]) -> web.Response:
    bnd = boundary()
    pieces: list[bytes] = []
    for p in parts:
        pieces += (part_head(bnd, ctype), p, b"\r\n")
    pieces.append(closing(bnd))
    return web.Response(body=b"".join(pieces), headers={
        "Content-Type": f'{MULTIPART}; type="{part_type}"; boundary={bnd}'})


# ---- bulk data ------------------------------------------------------------------------


def _bulk(archive: Archive, inst: StoredInstance, tag: str) -> tuple[list[bytes], str]:
    meta = archive.instance_json(inst.sop_instance_uid)
    if tag in _PIXEL_TAGS and tag in meta:
        n = int((meta.get("00280008", {}).get("Value") or [1])[0] or 1)
        return (pixels.stored_frames(archive.blobs.open, inst, meta, list(range(1, n + 1))),
                inst.transfer_syntax)
    # other bulk values lie in the header blob (before the pixel data): read only that
    head = archive.file_prefix(inst) + archive.read_blob(inst.blob_keys[0])
    elem = _find_element(transcode.read(head, inst.transfer_syntax), int(tag, 16))
    if elem is None and len(inst.blob_keys) > 2:  # the rare trailer after the pixels
        with decode_slots:
            ds = transcode.read(b"".join(archive.iter_bytes(inst)), inst.transfer_syntax)
            elem = _find_element(ds, int(tag, 16))
    if elem is None or not isinstance(elem.value, bytes | bytearray):
        raise NotFound(f"instance {inst.sop_instance_uid} has no bulk data element {tag}")
    return [bytes(elem.value)], inst.transfer_syntax


def _native_pixel_blob(archive: Archive, inst: StoredInstance, tag: str) -> str | None:
    """The blob that holds the whole native pixel data value, when there is one."""
    if (tag in _PIXEL_TAGS and inst.transfer_syntax in NATIVE_LE
            and len(inst.blob_keys) > 1 and inst.transfer_syntax != DEFLATED):
        return inst.blob_keys[1]
    return None


def _blob_part(archive: Archive, key: str, head: bytes, tail: bytes) -> Iterator[bytearray]:
    ch = Chunks()
    yield from ch.add(head)
    with archive.blobs.open(key) as f:
        yield from ch.read_from(f)
    yield from ch.add(tail)
    yield from ch.rest()


async def _stream_blob_part(request: web.Request, key: str, ctype: str
                            ) -> web.StreamResponse:
    """One blob of an object store as the single part, streamed from a worker thread."""
    bnd = boundary()
    resp = web.StreamResponse(headers={
        "Content-Type": f'{MULTIPART}; type="{OCTET}"; boundary={bnd}'})
    chunks = iterate_sync(request, _blob_part, request.app[archive_key], key,
                          part_head(bnd, ctype), b"\r\n" + closing(bnd))
    return await send_stream(request, resp, chunks)


async def _send_blob_part(request: web.Request, key: str, ctype: str) -> web.StreamResponse:
    """One blob as the single part of a multipart answer, by sendfile."""
    archive = request.app[archive_key]
    bnd = boundary()
    head, tail = part_head(bnd, ctype), b"\r\n" + closing(bnd)
    with archive.blobs.open(key) as f:
        size = os.fstat(f.fileno()).st_size
        resp = web.StreamResponse(headers={
            "Content-Type": f'{MULTIPART}; type="{OCTET}"; boundary={bnd}'})
        resp.content_length = len(head) + size + len(tail)
        await resp.prepare(request)
        try:
            await write(resp, head)
            await asyncio.wait_for(
                asyncio.get_running_loop().sendfile(request.transport, f),  # type: ignore[arg-type]
                WRITE_TIMEOUT)
            await write(resp, tail)
            await resp.write_eof()
        except (ConnectionError, TimeoutError):
            if request.transport is not None:
                request.transport.close()
    return resp


def _find_element(ds: Any, tag: int) -> Any:
    if tag in ds:
        return ds[tag]
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                found = _find_element(item, tag)
                if found is not None:
                    return found
    return None


async def bulkdata(request: web.Request) -> web.StreamResponse:
    """PS3.18 10.4.1.1.5: the value a BulkDataURI of the metadata points at."""
    tag = request.match_info["tag"].upper()
    if len(tag) != 8 or any(c not in "0123456789ABCDEF" for c in tag):
        fail(400, f"bulk data tag {tag!r}: expected 8 hexadecimal digits")
    inst = (await instances_in_scope(request))[0]
    ranges = parse_accept(request.headers.get("Accept"))
    if not any(r.matches(OCTET) or (r.type in (MULTIPART, "multipart/*", "*/*")
                                     and r.part_type in ("", OCTET, "*/*"))
               for r in ranges):
        fail(406, f"bulk data is sent as {MULTIPART}; type={OCTET}")
    key = _native_pixel_blob(request.app[archive_key], inst, tag)
    if key is not None and tag in await run_sync(
            request, request.app[archive_key].instance_json, inst.sop_instance_uid):
        # native pixel data: the stored value as is, by sendfile (memory flat)
        ctype = f"{OCTET}; transfer-syntax={EXPLICIT_LE}"
        if _local_files(request):
            return await _send_blob_part(request, key, ctype)
        return await _stream_blob_part(request, key, ctype)
    parts, ts = await run_sync(request, _bulk, request.app[archive_key], inst, tag)
    ctype = f"{OCTET}; transfer-syntax={ts}"
    return await _send_parts(request, OCTET, ctype, parts)
