"""Rendered and thumbnail resources (PS3.18 10.4.1.1.3 and 10.4.1.1.4).

Pixels are decoded, windowed and encoded by ``anim.render``; this module picks the
instance and frame a URL names. A study or series renders its representative
instance: the middle one in reading order (series by series, slices in order), as a
viewer's thumbnail would show it. Rendering is CPU work: it runs on the executor.
"""

from __future__ import annotations

from aiohttp import web

from anim import Archive, StoredInstance, render
from web.errors import fail
from web.keys import archive_key, run_sync
from web.streaming import decode_slots
from web.wado import instances_in_scope, parse_frame_list


def _representative(insts: list[StoredInstance]) -> StoredInstance:
    return insts[len(insts) // 2]


def _render(archive: Archive, inst: StoredInstance, frame: int,
            params: render.RenderParams) -> bytes:
    with decode_slots:
        return render.render(b"".join(archive.iter_bytes(inst)), frame, params,
                             transfer_syntax=inst.transfer_syntax)


async def _answer(request: web.Request, thumbnail: bool) -> web.Response:
    params = render.RenderParams.parse(request.query, request.headers.get("Accept", ""),
                                       thumbnail=thumbnail)
    insts = await instances_in_scope(request)
    frame = 1
    if "frames" in request.match_info:
        numbers = parse_frame_list(request.match_info["frames"])
        if len(numbers) != 1:
            fail(400, "rendered frames: one frame per request")
        frame = numbers[0]
    inst = insts[0] if "instance" in request.match_info else _representative(insts)
    body = await run_sync(request, _render, request.app[archive_key], inst, frame, params)
    resp = web.Response(body=body, content_type=params.media_type,
                        headers={"Cache-Control": "private, max-age=3600"})
    for name in params.ignored:
        # PS3.18 8.3.5.1: a rendering parameter the server does not support is ignored
        resp.headers.add("Warning", f'299 anim "The {name} parameter is not supported '
                                    f'and was ignored."')
    return resp


async def rendered(request: web.Request) -> web.Response:
    return await _answer(request, thumbnail=False)


async def thumbnail(request: web.Request) -> web.Response:
    return await _answer(request, thumbnail=True)
