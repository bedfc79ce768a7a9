"""The archive's errors, translated once at each edge (scp/status.py, web/).

::

    AnimError
    ├── ConfigError          bad or unknown setting (startup only)
    ├── InvalidInstance      not DICOM / required UID missing / undecodable header
    │   ├── SOPClassMismatch data set's SOP Class differs from the one negotiated
    │   └── StudyMismatch    data set of another study than the one it was sent to
    ├── InvalidQuery         bad level, key or matching value (PS3.4 C.2.2.2)
    ├── NotFound             no such study / series / instance / version
    ├── NotAcceptable        a transfer syntax or media type that cannot be produced
    └── StorageUnavailable   disk full or unwritable, index unreachable or locked
"""

from __future__ import annotations


class AnimError(Exception):
    """Base of every error the archive raises on purpose."""


class ConfigError(AnimError):
    """A setting is unknown or invalid."""


class InvalidInstance(AnimError):
    """The object cannot be understood as a DICOM instance we can keep."""


class SOPClassMismatch(InvalidInstance):
    """The data set does not match the SOP Class it was sent as (PS3.4 B.2.3, 0xA900)."""


class StudyMismatch(InvalidInstance):
    """STOW-RS to a study: the data set belongs to another study (PS3.18 10.5)."""


class InvalidQuery(AnimError):
    """A query the archive cannot run as asked: the reason says what to change."""


class NotAcceptable(AnimError):
    """The object cannot be produced in any of the requested forms."""


class NotFound(AnimError):
    """The requested object does not exist."""


class StorageUnavailable(AnimError):
    """Blobs or index cannot be written now; the sender may retry later."""


class BlobGone(AnimError):
    """A blob this store relies on was removed by garbage collection meanwhile (or was
    put too long ago to rely on): put it again, then record again (anim.maintenance)."""
