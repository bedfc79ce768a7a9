"""HTTP errors with a reason a client can act on; never a traceback on the wire."""

from __future__ import annotations

import json
import logging
from typing import Any, NoReturn

from aiohttp import HttpVersion10, web

from anim import (
    AnimError,
    InvalidInstance,
    InvalidQuery,
    NotAcceptable,
    NotFound,
    StorageUnavailable,
)

log = logging.getLogger(__name__)

_STATUS: list[tuple[type[AnimError], int]] = [
    (InvalidQuery, 400),
    (InvalidInstance, 400),
    (NotFound, 404),
    (NotAcceptable, 406),
    (StorageUnavailable, 503),
]


def status_of(e: AnimError) -> int:
    for cls, code in _STATUS:
        if isinstance(e, cls):
            return code
    return 400


def error_response(status: int, reason: str, headers: dict[str, str] | None = None
                   ) -> web.Response:
    body = json.dumps({"status": status, "reason": reason})
    return web.Response(status=status, text=body, content_type="application/json",
                        headers=headers)


def fail(status: int, reason: str) -> NoReturn:
    """Stop the handler with *status* and a JSON body carrying *reason*."""
    cls = web.HTTPException
    for c in (web.HTTPBadRequest, web.HTTPNotFound, web.HTTPNotAcceptable,
              web.HTTPRequestEntityTooLarge, web.HTTPUnsupportedMediaType,
              web.HTTPConflict, web.HTTPServiceUnavailable, web.HTTPMethodNotAllowed):
        if c.status_code == status:
            cls = c
            break
    if cls is web.HTTPRequestEntityTooLarge:
        raise web.HTTPRequestEntityTooLarge(
            max_size=0, actual_size=0, text=json.dumps({"status": status, "reason": reason}),
            content_type="application/json")
    raise cls(text=json.dumps({"status": status, "reason": reason}),
              content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.version < HttpVersion10:
        # a request line without a version (HTTP/0.9) does not match the HTTP/1.1 grammar
        # (RFC 9112 3: 400); it is also what a CR LF smuggled into the target leaves
        return error_response(400, "HTTP/1.0 or HTTP/1.1 request line required")
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status >= 400 and not e.text.startswith("{"):
            # aiohttp's own errors (404 route, 405 method): the same JSON shape
            allow = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else None
            return error_response(e.status, e.reason, headers=allow)
        raise
    except AnimError as e:
        return error_response(status_of(e), str(e))
    except Exception:
        log.exception("HTTP %s %s failed", request.method, request.path)
        return error_response(500, "internal error; the server log has the details")


@web.middleware
async def nul_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """No NUL in a URL: not a character of any DICOM UID or text (PS3.5 6.1.3, 9.1), and
    PostgreSQL cannot hold it; refused before anything looks anything up."""
    if "\x00" in request.path or "\x00" in request.match_info.get("study", ""):
        return error_response(400, "a NUL character is not allowed in a URL")
    return await handler(request)
