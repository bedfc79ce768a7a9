"""Placeholder: routes added as the HCM issue lands."""

from __future__ import annotations

from aiohttp import web


def add_routes(r: web.UrlDispatcher) -> None:
    del r
