"""C-STORE sub-operations send the stored bytes, not a re-encoded pydicom Dataset.

pynetdicom's C-MOVE and C-GET service classes take a ``Dataset`` for each sub-operation
and ``send_c_store`` encodes it again with pydicom's ``write_dataset``: a retrieve used to
decode every instance in full and write it back, which costs more than the network, and
rewrote what pydicom normalises (retired group lengths, empty UN elements).

:class:`Encoded` is a ``Dataset`` that carries the data set's bytes as the archive holds
them (the blobs, in the transfer syntax they were received in) and only the few elements
pynetdicom reads (SOP Class and Instance UID, the transfer syntax). ``install`` wraps
``pynetdicom.association.encode``: given an ``Encoded`` and a presentation context whose
encoding is the stored one, it returns the stored bytes unchanged; for any other context
(an uncompressed syntax the peer chose instead) it decodes and converts as before. The
wrap is pinned to pynetdicom 3.0.4, like scp/reactor.py.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pynetdicom
import pynetdicom.association
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

log = logging.getLogger(__name__)

PINNED = "3.0.4"
_original: dict[str, Any] = {}
_lock = threading.Lock()


class Encoded(Dataset):
    """A data set to send as the bytes *body* (encoded in *transfer_syntax*).

    *decode* gives the full Dataset, for a peer that needs another syntax.
    """

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                 body: bytes, decode: Callable[[], Dataset]) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self.file_meta = FileMetaDataset()
        self.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        # plain attributes (pydicom keeps non-DICOM names as ordinary attributes)
        self.anim_body = body
        self.anim_decode = decode


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
            deflated: bool = False) -> bytes | None:
    if isinstance(ds, Encoded):
        ts = UID(ds.file_meta.TransferSyntaxUID)
        if (ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated) == (
                is_implicit_vr, is_little_endian, deflated):
            return ds.anim_body  # type: ignore[no-any-return]
        ds = ds.anim_decode()
    return _original["encode"](ds, is_implicit_vr, is_little_endian, deflated)  # type: ignore[no-any-return]


def install() -> bool:
    """Wrap pynetdicom's encode (idempotent); False on another pynetdicom version, where
    an Encoded is never built (:func:`active`)."""
    with _lock:
        if _original:
            return True
        if pynetdicom.__version__ != PINNED:
            log.warning("pynetdicom %s is not %s: retrieves re-encode each data set",
                        pynetdicom.__version__, PINNED)
            return False
        _original["encode"] = pynetdicom.association.encode
        pynetdicom.association.encode = _encode  # type: ignore[attr-defined]
        return True


def active() -> bool:
    return bool(_original)
