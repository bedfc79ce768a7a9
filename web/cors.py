"""CORS for browser viewers (OHIF and the like) calling from another origin.

``Access-Control-Allow-Origin`` goes on every response, errors included, or the
browser hides the error from the viewer. A preflight (OPTIONS with
``Access-Control-Request-Method``) is answered here, before routing; the long
``Access-Control-Max-Age`` matters because a viewer that sends a quoted multipart
Accept triggers one preflight per frame URL.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from web.keys import config_key

ALLOW_METHODS = "GET, HEAD, POST, OPTIONS"
ALLOW_HEADERS = "accept, authorization, content-type, if-none-match, if-modified-since, range"
EXPOSE_HEADERS = "content-type, content-length, etag, last-modified, warning, content-location"
MAX_AGE = "86400"


def _allowed_origin(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if not origin:
        return None
    origins = request.app[config_key].origins
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def _decorate(resp: web.StreamResponse, origin: str) -> None:
    resp.headers["Access-Control-Allow-Origin"] = origin
    resp.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
    if origin != "*":
        resp.headers.add("Vary", "Origin")


@web.middleware
async def cors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer preflights; every other response is decorated by :func:`on_prepare`."""
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if _allowed_origin(request) is None:
            return web.Response(status=403, text="origin not allowed")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": MAX_AGE,
        })
    if request.method == "OPTIONS" and request.path.startswith("/dicom-web/"):
        # a plain OPTIONS on any DICOMweb resource: what the server supports (PS3.18 8.9)
        from web.capabilities import options

        return await options(request)
    return await handler(request)


async def on_prepare(request: web.Request, resp: web.StreamResponse) -> None:
    """Every response, streamed or not, errors included, goes through here."""
    origin = _allowed_origin(request)
    if origin is not None and "Access-Control-Allow-Origin" not in resp.headers:
        _decorate(resp, origin)
