"""anim outcomes and errors → DIMSE statuses: the one table for the DIMSE edge."""

from __future__ import annotations

from anim import (
    AnimError,
    InvalidInstance,
    NotFound,
    SOPClassMismatch,
    StorageUnavailable,
    StoreOutcome,
)

SUCCESS = 0x0000
# PS3.7 C.5.x general statuses
REFUSED_NOT_AUTHORIZED = 0x0124
# Storage Service Class specific status codes - PS3.4 B.2.3 (Table B.2-1)
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
# Warning "Coercion of Data Elements": what the archive serves under this SOP
# Instance UID is not what the sender sent (it was kept aside in quarantine).
WARNING_COERCION = 0xB000

STORE_OUTCOME_STATUS: dict[StoreOutcome, int] = {
    StoreOutcome.STORED: SUCCESS,
    StoreOutcome.ALREADY_STORED: SUCCESS,
    StoreOutcome.CORRECTED: SUCCESS,
    StoreOutcome.QUARANTINED: WARNING_COERCION,
}

# Most specific first: SOPClassMismatch is an InvalidInstance.
STORE_ERROR_STATUS: list[tuple[type[AnimError], int]] = [
    (SOPClassMismatch, DATASET_DOES_NOT_MATCH_SOP_CLASS),
    (InvalidInstance, CANNOT_UNDERSTAND),
    (StorageUnavailable, OUT_OF_RESOURCES),
    (NotFound, CANNOT_UNDERSTAND),
    (AnimError, CANNOT_UNDERSTAND),
]


def store_error_status(err: AnimError) -> int:
    for cls, status in STORE_ERROR_STATUS:
        if isinstance(err, cls):
            return status
    return CANNOT_UNDERSTAND
