"""The archive's public URLs: DICOMweb root, RetrieveURL, BulkDataURI."""

from __future__ import annotations

from aiohttp import web

from anim.dicomjson import BULK_MARKER
from web.keys import config_key

PREFIX = "/dicom-web"


def root(request: web.Request) -> str:
    """The DICOMweb root as the client reaches it (``[web].public_url`` behind a proxy)."""
    public = request.app[config_key].public_url.rstrip("/")
    if public:
        return public + PREFIX
    return f"{request.scheme}://{_host(request)}{PREFIX}"


def _host(request: web.Request) -> str:
    """The Host header, with this socket's port when a client left it out while
    addressing this very socket by IP (dicomweb-client sends ``Host: 127.0.0.1``).
    A name without a port is a proxy's business: ``[web].public_url`` says it."""
    host = request.host
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if sock and ":" not in host.rsplit("]", 1)[-1] and host == sock[0]:
        return f"{host}:{sock[1]}"
    return host


def study_url(base: str, study: str) -> str:
    return f"{base}/studies/{study}"


def series_url(base: str, study: str, series: str) -> str:
    return f"{base}/studies/{study}/series/{series}"


def instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def absolute_bulk(text: str, base: str) -> str:
    """Turn the ``anim-bulk:`` BulkDataURI markers of stored metadata into URLs."""
    return text.replace(f'"{BULK_MARKER}', f'"{base}/')
