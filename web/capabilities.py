"""What this origin server supports (PS3.18 8.9 capabilities, answered to OPTIONS)."""

from __future__ import annotations

from aiohttp import web

import anim

_DOC = {
    "server": f"anim {anim.__version__}",
    "dicomweb": {
        "qido-rs": {
            "resources": ["/studies", "/series", "/instances", "/studies/{study}/series",
                          "/studies/{study}/instances",
                          "/studies/{study}/series/{series}/instances"],
            "parameters": ["{attribute}={value}", "includefield", "limit", "offset",
                           "fuzzymatching (accepted, not honoured: Warning 299)",
                           "emptyvaluematching (accepted, not honoured: Warning 299)",
                           "multiplevaluematching"],
            "media-types": ["application/dicom+json"],
        },
        "wado-rs": {
            "resources": ["study", "series", "instance", "metadata", "frames", "bulkdata",
                          "rendered", "thumbnail"],
            "media-types": ["multipart/related; type=\"application/dicom\"",
                            "multipart/related; type=\"application/octet-stream\"",
                            "application/dicom+json", "image/jpeg", "image/png"],
            "transfer-syntax": ["* (as stored)", "1.2.840.10008.1.2.1 (decoded)"],
        },
        "stow-rs": {
            "resources": ["/studies", "/studies/{study}"],
            "media-types": ["multipart/related; type=\"application/dicom\""],
        },
    },
}


async def options(request: web.Request) -> web.Response:
    return web.json_response(_DOC, headers={"Allow": "GET, HEAD, POST, OPTIONS"})
