"""What the archive tells the national HCM layer: study references, change-event
payloads and their signatures (docs/hcm.md). Pure functions; web/ serves and sends them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any

from anim.studyinfo import StudyInfo

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
