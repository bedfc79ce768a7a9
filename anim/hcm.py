"""What the archive tells the national HCM layer: study references, change-event
payloads and their signatures (docs/hcm.md). Pure functions; web/ serves and sends them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from anim.studyinfo import StudyInfo

if TYPE_CHECKING:
    from pydicom import Dataset

    from anim.archive import Archive

log = logging.getLogger(__name__)

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document


def study_reference(info: StudyInfo, *, state: str, origin: str, retrieve_aet: str
                    ) -> dict[str, Any]:
    """Everything a document registry needs to index one study, in one object.

    *origin* is the archive's public base URL (scheme://host:port, no trailing slash).
    """
    from anim.manifest import manifest_uids

    uids = manifest_uids(info)
    study = info.study_uid
    return {
        "study_uid": study,
        "accession_number": info.accession_number,
        "patient": {"id": info.patient_id, "issuer": info.issuer},
        "study_date": info.study_date,
        "study_time": info.study_time,
        "description": info.description,
        "modalities": list(info.modalities),
        "num_series": info.num_series,
        "num_instances": info.num_instances,
        "state": state,
        "updated_at": info.updated_at,
        "wado_rs": f"{origin}/dicom-web/studies/{study}",
        "viewer": f"{origin}/#/study/{study}",
        "fhir_imaging_study": f"{origin}/fhir/ImagingStudy/{study}",
        "manifest": {
            "sop_class_uid": KOS_SOP_CLASS,
            "sop_instance_uid": uids.sop_uid,
            "series_instance_uid": uids.series_uid,
            "study_instance_uid": study,
            "retrieve_aet": retrieve_aet,
            "url": f"{origin}/hcm/studies/{study}/manifest",
        },
    }


def build_manifest(archive: Archive, study_uid: str, wado_root: str) -> Dataset:
    """The study's KOS manifest (XDS-I.b / MADO). Reproducible: its UIDs come from the
    study's content and its content time is the study's last change, so every node
    builds the same bytes for the same study."""
    from anim.manifest import build_kos

    info = archive.index.study_info(study_uid)
    cfg = archive.cfg
    when = (datetime.fromisoformat(info.updated_at) if info.updated_at
            else datetime(1970, 1, 1, tzinfo=UTC))
    return build_kos(info, wado_root=wado_root,
                     retrieve_aet=cfg.hcm.retrieve_aet or cfg.dimse.aet, content_time=when,
                     institution=cfg.web.institution)


def store_manifest(archive: Archive, study_uid: str, wado_root: str) -> str | None:
    """Store the manifest of a study that just became stable as an instance of the study
    (its own series), and remove the outdated ones; return its SOP Instance UID.

    Neither step makes the study unstable again: the manifest describes the study, it
    is not new content (DESIGN: "stability").
    """
    from anim.index.repo import MANIFEST_PROTOCOL
    from anim.manifest import kos_part10, manifest_content, manifest_series_uid
    from anim.models import Source

    info = archive.index.study_info(study_uid)
    if manifest_content(info).num_instances == 0:
        return None  # nothing but manifests left
    ds = build_manifest(archive, study_uid, wado_root)
    aet = archive.cfg.hcm.retrieve_aet or archive.cfg.dimse.aet
    archive.store(kos_part10(ds), Source(institution=archive.cfg.web.institution,
                                         ae_title=aet, protocol=MANIFEST_PROTOCOL))
    own = manifest_series_uid(study_uid)
    for s in info.series:
        if s.series_uid != own:
            continue
        for old in s.instances:
            if old.sop_uid != ds.SOPInstanceUID:
                archive.index.delete(study_uid, own, old.sop_uid, unsettle=False)
    return str(ds.SOPInstanceUID)


def event_payload(entry: dict[str, Any], reference: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON body of one webhook notification for a change-sequence *entry*."""
    body: dict[str, Any] = {
        "type": entry["kind"],
        "seq": entry["seq"],
        "at": entry["at"],
        "study_uid": entry["study_uid"],
        "series_uid": entry["series_uid"] or None,
        "sop_uid": entry["sop_uid"] or None,
        "patient": {"id": entry["patient_id"], "issuer": entry["issuer"]},
    }
    if reference is not None:
        body["study"] = reference
    return body


# ---- signatures: the Standard Webhooks scheme (standardwebhooks.com) ----------------------
# signed content = "{id}.{timestamp}.{body}", HMAC-SHA256, base64, header "v1,<sig>"


def secret_key(secret: str) -> bytes:
    """The HMAC key: ``whsec_<base64>`` secrets are decoded, others used as UTF-8."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret[6:])
    return secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body,
                   hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signed_headers(secret: str, msg_id: str, body: bytes, now: float | None = None
                   ) -> dict[str, str]:
    ts = int(time.time() if now is None else now)
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, msg_id, ts, body)}


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance: float = 300.0,
           now: float | None = None) -> bool:
    """A receiver's check: a signature matches and the timestamp is recent (replays)."""
    try:
        msg_id = headers["webhook-id"]
        ts = int(headers["webhook-timestamp"])
        given = headers["webhook-signature"].split()
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance:
        return False
    expected = sign(secret, msg_id, ts, body)
    return any(hmac.compare_digest(expected, g) for g in given)
