"""The whole URL table, on one screen."""

from __future__ import annotations

from aiohttp import web

from web import health, qido


def setup_routes(app: web.Application) -> None:
    app.router.add_get("/health", health.health)
    app.router.add_get("/version", health.version)
    app.router.add_get("/dicom-web/studies", qido.search_studies)
