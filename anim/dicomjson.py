"""An instance's DICOM JSON metadata (PS3.18 F.2), computed once at ingest.

Bulk data is not inlined: large binary values and the pixel data become
``BulkDataURI`` values written as ``anim-bulk:<path relative to the DICOMweb root>``;
the web edge turns the marker into an absolute URL when it serves the JSON.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.uid import DeflatedExplicitVRLittleEndian

from anim.dicomfile import ParsedObject

BULK_MARKER = "anim-bulk:"
BULK_THRESHOLD = 64 * 1024  # binary values above this are served as bulk data
_PIXEL_VR = {0x7FE00008: "OF", 0x7FE00009: "OD"}


def instance_json(p: ParsedObject) -> str:
    ds = p.dataset
    base = (
        f"{BULK_MARKER}studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}/bulkdata/"
    )

    def bulk(elem: DataElement) -> str:
        return f"{base}{elem.tag:08X}"

    try:
        d: dict[str, Any] = ds.to_json_dict(BULK_THRESHOLD, bulk)
    except Exception:
        # Values pydicom cannot convert must not block storage; keep what converts.
        d = {}
        for elem in ds:
            try:
                d.update(_one(elem, bulk))
            except Exception:
                continue
    if p.pixel_tag is None and p.transfer_syntax == DeflatedExplicitVRLittleEndian:
        # kept whole, not split at the pixel data: look for it in the inflated set
        for tag, vr in _deflated_pixels(p):
            d[f"{tag:08X}"] = {"vr": vr, "BulkDataURI": f"{base}{tag:08X}"}
    if p.pixel_tag is not None:
        vr = _PIXEL_VR.get(p.pixel_tag)
        if vr is None:
            vr = _explicit_vr(p) or ("OW" if int(ds.get("BitsAllocated", 8) or 8) > 8 else "OB")
        d[f"{p.pixel_tag:08X}"] = {"vr": vr, "BulkDataURI": f"{base}{p.pixel_tag:08X}"}
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False)


def _deflated_pixels(p: ParsedObject) -> list[tuple[int, str]]:
    try:
        full = dcmread(BytesIO(bytes(p.prefix) + bytes(p.header)), force=True)
    except Exception:  # unreadable pixel data: the header metadata stands alone
        return []
    return [(tag, str(full[tag].VR)) for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)
            if tag in full]


def _one(elem: DataElement, bulk: Any) -> dict[str, Any]:
    return {f"{elem.tag:08X}": elem.to_json_dict(bulk, BULK_THRESHOLD)}


def _explicit_vr(p: ParsedObject) -> str | None:
    h = p.header
    # explicit VR long form: tag(4) VR(2) reserved(2) length(4) ends the header
    if len(h) >= 12:
        vr = bytes(h[-8:-6])
        if vr in (b"OB", b"OW"):
            return vr.decode()
    return None
