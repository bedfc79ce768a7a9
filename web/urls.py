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
    return f"{request.scheme}://{request.host}{PREFIX}"


def study_url(base: str, study: str) -> str:
    return f"{base}/studies/{study}"


def series_url(base: str, study: str, series: str) -> str:
    return f"{base}/studies/{study}/series/{series}"


def instance_url(base: str, study: str, series: str, sop: str) -> str:
    return f"{base}/studies/{study}/series/{series}/instances/{sop}"


def absolute_bulk(text: str, base: str) -> str:
    """Turn the ``anim-bulk:`` BulkDataURI markers of stored metadata into URLs."""
    return text.replace(f'"{BULK_MARKER}', f'"{base}/')
