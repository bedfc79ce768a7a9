"""The web page for people: one static page at ``/``, its files under ``/static/``.

The page is plain HTML, CSS and JavaScript modules with no build step; it reads the
archive only through its public endpoints (``/dicom-web``, ``/api``), so it is also
their first client. It has no inline script or style, so the Content-Security-Policy
can forbid both: whatever slips into a patient name cannot run.

Static files are revalidated on every use (``no-cache`` with the ETag and
Last-Modified that aiohttp sends), so an upgraded archive never runs a stale script
next to a new page; the answers are 304s, cheap on a hospital network.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

STATIC = Path(__file__).resolve().parent / "static"
INDEX = STATIC / "index.html"

# img-src blob: is not needed (images are plain URLs of this origin); connect-src 'self'
# covers QIDO, WADO and the admin API. Links to an external viewer are navigations,
# which CSP does not restrict.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # older browsers; frame-ancestors above for the rest
    "Cache-Control": "no-cache",
}
STATIC_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(INDEX, headers=PAGE_HEADERS)


async def _static_headers(request: web.Request, resp: web.StreamResponse) -> None:
    if request.path.startswith("/static/") and resp.status < 400:
        for name, value in STATIC_HEADERS.items():
            resp.headers[name] = value


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/", index)
    # add_static resolves each path inside STATIC and answers 404 (never a file outside
    # it) for "..", symlinks out of the folder and encoded separators
    r.add_static("/static/", STATIC, follow_symlinks=False, append_version=False)
    app.on_response_prepare.append(_static_headers)
