"""One audit record per HTTP request that touches patient data (docs/security.md):
searches are queries, reads of a study are retrievals, DELETE is a deletion, and a
refused token is a failed login. Stores are recorded per instance by the archive.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from anim.audit import AuditAction, from_principal
from anim.fhir import issuer_of_system
from anim.security import LOCAL, Principal
from web.keys import archive_key, run_sync

_QUIET = ("/health", "/version", "/api/ui-config", "/static/", "/favicon")


def _action(request: web.Request, status: int) -> AuditAction | None:
    path, method = request.path, request.method
    if status in (401, 403):
        return AuditAction.LOGIN  # refused: no valid token, too little scope, revoked
    if method == "DELETE":
        return AuditAction.DELETE
    if method != "GET" or path == "/" or path.startswith(_QUIET):
        return None  # STOW: each instance is recorded by the archive as it is stored
    if path.startswith("/api/admin"):
        return None  # counts and configuration, no patient data
    if path.startswith("/fhir/metadata"):
        return None
    if path.startswith("/fhir/ImagingStudy/"):
        return AuditAction.RETRIEVE  # a read by id
    if path.startswith(("/dicom-web", "/hcm/studies")):
        searching = path.rstrip("/").endswith(("/studies", "/series", "/instances"))
        if "study" in request.match_info and not searching:
            return AuditAction.RETRIEVE
        return AuditAction.QUERY
    if path.startswith(("/fhir", "/hcm/changes")):
        return AuditAction.QUERY
    return None


def _patient(request: web.Request) -> tuple[str, str]:
    q = request.query
    pid = q.get("PatientID") or q.get("00100020") or ""
    if pid:
        return pid, q.get("IssuerOfPatientID") or q.get("00100021") or ""
    token = q.get("patient.identifier") or q.get("patient:identifier") or ""
    if token:
        system, _, value = token.rpartition("|")
        try:
            return value, issuer_of_system(system) if system else ""
        except ValueError:
            return value, ""
    return "", ""


def _record(request: web.Request, action: AuditAction, status: int,
            principal: Principal) -> None:
    archive = request.app[archive_key]
    study = request.match_info.get("study") or (
        request.match_info.get("id", "") if request.path.startswith("/fhir/ImagingStudy/")
        else "")
    pid, issuer = _patient(request)
    if study and not pid:
        pid, issuer = archive.patient_of(study)
    ok = status < 400
    archive.audit(from_principal(
        principal, action, "success" if ok else "failure",
        reason="" if ok else f"HTTP {status}", patient_id=pid, issuer=issuer,
        study_uids=(study,) if study else (), detail=f"{request.method} {request.path}"[:200]))


@web.middleware
async def audit_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    finally:
        action = _action(request, status)
        if action is not None:
            principal = request.get("principal") or _unauthenticated(request)
            await run_sync(request, _record, request, action, status, principal)


def _unauthenticated(request: web.Request) -> Principal:
    """A refused caller: who it is is unknown, where it calls from is not."""
    if request.get("principal") is None and request.headers.get("Authorization"):
        return Principal(kind="token", subject="(invalid token)", institution="",
                         address=request.remote or "", actions=frozenset())
    return Principal(kind=LOCAL.kind, subject=LOCAL.subject, institution="",
                     address=request.remote or "")
