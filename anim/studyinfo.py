"""What the archive holds of one study, read from the index: the source of study
references, FHIR ImagingStudy resources and KOS manifests (the HCM side).

Only current versions count; quarantined content is not part of a study's reference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    sop_uid: str
    sop_class_uid: str
    number: int | None
    num_frames: int | None
    transfer_syntax: str
    version_id: int = 0  # the current version: a correction changes it


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    series_uid: str
    number: int | None
    modality: str
    description: str
    body_part: str
    instances: tuple[InstanceInfo, ...]


@dataclass(frozen=True, slots=True)
class StudyInfo:
    study_uid: str
    accession_number: str
    study_id: str
    study_date: str  # DICOM DA, '' when absent
    study_time: str  # DICOM TM, '' when absent
    description: str
    referring_physician: str
    modalities: tuple[str, ...]
    patient_id: str
    issuer: str  # IssuerOfPatientID, '' when absent
    patient_name: str  # DICOM PN as received
    birth_date: str
    sex: str
    updated_at: str  # ISO 8601 UTC, last change of the study's content
    series: tuple[SeriesInfo, ...]

    @property
    def num_series(self) -> int:
        return len(self.series)

    @property
    def num_instances(self) -> int:
        return sum(len(s.instances) for s in self.series)

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the study's current instances and their versions: two readings
        of the same content give the same value, a correction another (manifest UIDs)."""
        h = hashlib.sha256(self.study_uid.encode())
        for s in sorted(self.series, key=lambda s: s.series_uid):
            for i in sorted(s.instances, key=lambda i: i.sop_uid):
                h.update(f"|{s.series_uid}/{i.sop_uid}@{i.version_id}".encode())
        return h.hexdigest()


def derived_uid(*parts: str) -> str:
    """A UID derived from *parts* (PS3.5 B.2: 2.25 + a 128-bit integer from a hash), so
    that every node computes the same UID for the same thing without coordination."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(digest, 'big')}"
