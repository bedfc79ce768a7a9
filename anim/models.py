"""Frozen values that cross the boundary between anim and its edges."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StoreOutcome(enum.StrEnum):
    STORED = "stored"  # a new instance
    ALREADY_STORED = "already_stored"  # byte-identical content: idempotent success
    CORRECTED = "corrected"  # new content from the same institution: now current
    QUARANTINED = "quarantined"  # new content from another institution: kept aside


class VersionState(enum.StrEnum):
    CURRENT = "current"
    SUPERSEDED = "superseded"
    QUARANTINED = "quarantined"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class Source:
    """Where an object came from. ``institution`` decides correction vs conflict."""

    institution: str
    ae_title: str = ""
    host: str = ""
    protocol: str = "dimse"  # dimse | stow | import


@dataclass(frozen=True, slots=True)
class StoreResult:
    outcome: StoreOutcome
    sop_instance_uid: str
    study_instance_uid: str
    version_id: int
    new_bytes: int  # bytes written to the blob store by this call
    message: str = ""
    series_instance_uid: str = ""
    sop_class_uid: str = ""
    patient: tuple[str, str] = ("", "")  # (PatientID, IssuerOfPatientID)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    id: int
    sop_instance_uid: str
    study_instance_uid: str
    state: VersionState
    institution: str
    ae_title: str
    host: str
    received_at: str
    size: int
    transfer_syntax: str


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """Enough to stream an instance back: its pieces, in order, and its encoding."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    prefix: bytes  # preamble + file meta as received (empty for a bare data set)
    blob_keys: tuple[str, ...]  # header, [pixels], [trailer]
    size: int  # total bytes including prefix
    version_id: int


@dataclass(frozen=True, slots=True)
class Notification:
    """A webhook notification taken from the outbox for delivery."""

    id: int
    endpoint: str
    seq: int
    kind: str
    study_uid: str
    payload: str  # the JSON body, fixed when it was queued
    attempts: int  # deliveries tried so far
