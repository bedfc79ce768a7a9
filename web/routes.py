"""The whole URL table, on one screen."""

from __future__ import annotations

from aiohttp import web

from web import admin, capabilities, fhir, hcm, health, metrics, qido, rendered, stow, ui, wado

DW = "/dicom-web"
STUDY = DW + "/studies/{study}"
SERIES = STUDY + "/series/{series}"
INSTANCE = SERIES + "/instances/{instance}"
FRAMES = INSTANCE + "/frames/{frames}"


def setup_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/health", health.health)
    r.add_get("/health/live", health.live)  # public, like /health (web.auth)
    r.add_get("/health/ready", health.ready)
    r.add_get("/metrics", metrics.scrape)  # admin scope when [auth] is on
    r.add_get("/version", health.version)
    r.add_get("/api/admin/summary", admin.summary)
    r.add_get("/api/admin/changes", admin.changes)
    r.add_get("/api/admin/peers", admin.peers)
    r.add_post("/api/admin/revocations", admin.revocations_post)
    r.add_delete("/api/admin/revocations/{institution}", admin.revocations_delete)
    r.add_get("/api/admin/audit/patient", admin.patient_access)
    r.add_post("/api/admin/restrictions", admin.restrictions_post)
    # {restricted}, not {study}: lifting must not be hidden by the restriction itself
    r.add_delete("/api/admin/restrictions/{restricted}", admin.restrictions_delete)
    r.add_get("/api/ui-config", admin.ui_config)
    r.add_route("OPTIONS", DW, capabilities.options)
    # QIDO-RS (PS3.18 10.6)
    r.add_get(DW + "/studies", qido.search_studies)
    r.add_get(DW + "/series", qido.search_all_series)
    r.add_get(DW + "/instances", qido.search_all_instances)
    r.add_get(STUDY + "/series", qido.search_study_series)
    r.add_get(STUDY + "/instances", qido.search_study_instances)
    r.add_get(SERIES + "/instances", qido.search_series_instances)
    # STOW-RS (PS3.18 10.5)
    r.add_post(DW + "/studies", stow.store)
    r.add_post(STUDY, stow.store)
    # WADO-RS (PS3.18 10.4)
    # GET only: these stream their bodies, and a HEAD would get one (aiohttp's
    # automatic HEAD runs the GET handler)
    for base in (STUDY, SERIES, INSTANCE):
        r.add_route("GET", base, wado.retrieve)
        r.add_route("GET", base + "/metadata", wado.metadata)
        r.add_route("GET", base + "/rendered", rendered.rendered)
        r.add_route("GET", base + "/thumbnail", rendered.thumbnail)
    r.add_route("GET", FRAMES, wado.frames)
    r.add_route("GET", FRAMES + "/rendered", rendered.rendered)
    r.add_route("GET", FRAMES + "/thumbnail", rendered.thumbnail)
    r.add_route("GET", INSTANCE + "/bulkdata/{tag}", wado.bulkdata)
    hcm.add_routes(r)  # /hcm: change feed, study references, manifests
    fhir.add_routes(r)  # /fhir: FHIR R4 ImagingStudy, Endpoint, DocumentReference
    ui.setup(app)
