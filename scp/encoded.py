"""Data sets that go out already encoded: pynetdicom sends their bytes as they are.

pynetdicom's service classes take a ``Dataset`` from our handlers and encode it with
pydicom's ``write_dataset``: for each C-STORE sub-operation of a C-MOVE or C-GET that
meant decoding a stored instance in full and writing it back (more work than the network,
and what pydicom normalises, retired group lengths or empty UN elements, was rewritten);
for each C-FIND match, building a Dataset from the match's DICOM JSON and writing it.

:class:`Encoded` is a ``Dataset`` holding only the few elements pynetdicom reads before
encoding (SOP Class and Instance UID, the transfer syntax) and an *encoder*: given the
presentation context's encoding (implicit VR, little endian, deflated) it returns the
bytes, or None when it cannot, and then *decode* gives the full Dataset, encoded as
before. ``install`` wraps the ``encode`` that ``pynetdicom.association`` (C-STORE) and
``pynetdicom.service_class`` (C-FIND identifiers) call, pinned to pynetdicom 3.0.4 like
scp/reactor.py (:func:`scp.reactor.is_pinned`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pynetdicom.association
import pynetdicom.service_class
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from scp import reactor

_original: dict[str, Any] = {}
_lock = threading.Lock()


Encoder = Callable[[bool, bool, bool], bytes | None]


class Encoded(Dataset):
    """A data set whose bytes *encoder* gives; *decode* builds it when it cannot."""

    def __init__(self, encoder: Encoder, decode: Callable[[], Dataset]) -> None:
        super().__init__()
        # plain attributes (pydicom keeps non-DICOM names as ordinary attributes)
        self.anim_encoder = encoder
        self.anim_decode = decode


def stored(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, body: bytes,
           decode: Callable[[], Dataset]) -> Encoded:
    """An instance to send as *body*, its data set as stored in *transfer_syntax*."""
    ts = UID(transfer_syntax)
    own = (ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
    ds = Encoded(lambda *enc: body if enc == own else None, decode)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def _encode(ds: Dataset, is_implicit_vr: bool, is_little_endian: bool,
            deflated: bool = False) -> bytes | None:
    if isinstance(ds, Encoded):
        out = ds.anim_encoder(is_implicit_vr, is_little_endian, deflated)
        if out is not None:
            return out
        ds = ds.anim_decode()
    return _original["encode"](ds, is_implicit_vr, is_little_endian, deflated)  # type: ignore[no-any-return]


def install() -> bool:
    """Wrap pynetdicom's encode (idempotent); False on another pynetdicom version, where
    an Encoded is never built (:func:`active`)."""
    with _lock:
        if _original:
            return True
        if not reactor.is_pinned("retrieves and C-FIND answers are encoded by pydicom"):
            return False
        # both modules imported dsutils.encode by name
        _original["encode"] = pynetdicom.association.encode
        pynetdicom.association.encode = _encode  # type: ignore[attr-defined]
        pynetdicom.service_class.encode = _encode  # type: ignore[attr-defined]
        return True


def active() -> bool:
    return bool(_original)
