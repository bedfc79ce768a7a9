"""C-FIND / C-MOVE / C-GET Identifier ⇄ anim.Query (PS3.4 C.4).

Only translation and the rules of the hierarchical model live here; matching is
the query engine's job.
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)

from anim import InvalidQuery, Level, Query
from scp import encoded, fastident

PATIENT_ROOT = {
    str(PatientRootQueryRetrieveInformationModelFind),
    str(PatientRootQueryRetrieveInformationModelMove),
    str(PatientRootQueryRetrieveInformationModelGet),
}

# The unique key of each level of the hierarchy (PS3.4 C.6.1.1 and C.6.2.1)
_UNIQUE = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}
_LEVEL_OF_UNIQUE = {v: k for k, v in _UNIQUE.items()}
_SKIP = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}
# Return keys answered by the SCP itself, not by the index
SCP_KEYS = {"RetrieveAETitle", "InstanceAvailability"}


def _level(identifier: Dataset, patient_root: bool) -> Level:
    # PS3.4 C.4.1.1.3.1: (0008,0052) Query/Retrieve Level is required
    raw = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if not raw:
        raise InvalidQuery("the Identifier has no Query/Retrieve Level (0008,0052)")
    try:
        level = Level(raw)
    except ValueError:
        raise InvalidQuery(f"unknown Query/Retrieve Level {raw!r}") from None
    if level is Level.PATIENT and not patient_root:
        raise InvalidQuery("the Study Root model has no PATIENT level")
    return level


def _text(elem: Any) -> str:
    if elem.VR == "SQ":
        return ""  # sequences: returned, never matched here
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def to_query(identifier: Dataset, model_uid: str, retrieve: bool = False) -> Query:
    """Build the Query for a C-FIND (or the selection of a C-MOVE/C-GET) Identifier.

    Raises
    ------
    InvalidQuery
        No or unknown level; a unique key of a level above missing or not a single
        value (PS3.4 C.4.1.2.1); a key below the query level; an element whose VR is
        not the one of its attribute.
    """
    patient_root = model_uid in PATIENT_ROOT
    level = _level(identifier, patient_root)
    match: dict[str, str] = {}
    for elem in identifier:
        kw = elem.keyword
        if not kw or kw in _SKIP or elem.tag.group == 0x0002:
            continue
        expected = dictionary_VR(elem.tag)
        if elem.VR not in (expected, "UN") and elem.VR not in expected.split(" or "):
            raise InvalidQuery(f"{kw} has VR {elem.VR}, expected {expected}")
        own_level = _LEVEL_OF_UNIQUE.get(kw)
        if own_level is not None and own_level.depth > level.depth:
            raise InvalidQuery(f"{kw} is below the {level.value} level")
        match[kw] = _text(elem)
    top = Level.PATIENT if patient_root else Level.STUDY
    for lv in Level:
        if top.depth <= lv.depth < level.depth:
            key = _UNIQUE[lv]
            value = match.get(key, "")
            if not value or "\\" in value or "*" in value or "?" in value:
                raise InvalidQuery(
                    f"{key} must be given as a single value above the {level.value} level")
    if retrieve:
        # C-MOVE/C-GET select by unique keys only (PS3.4 C.4.2.2.1, C.4.3.2.1)
        key = _UNIQUE[level]
        if not match.get(key):
            raise InvalidQuery(f"{key} is required to retrieve at the {level.value} level")
        match = {k: v for k, v in match.items() if k in _LEVEL_OF_UNIQUE and v}
    return Query(level=level, match=match)


def encoded_response(result: dict[str, Any], query: Query, charset: str, aet: str) -> Dataset:
    """:func:`response`, written directly from the JSON when every value is plain ASCII
    text (scp/fastident.py); else built by pydicom, the same way as :func:`response`."""
    elements = fastident.elements_of(result)
    if elements is None:
        return response(result, query, charset, aet)
    # what response() adds; all-ASCII values keep the requested character set
    elements[0x00080052] = ("CS", query.level.value)
    keys = set(query.keys)
    if "RetrieveAETitle" in keys:
        elements[0x00080054] = ("AE", aet)
    if "InstanceAvailability" in keys:
        elements[0x00080056] = ("CS", "ONLINE")
    if charset:
        elements[0x00080005] = ("CS", charset)
    return encoded.Encoded(fastident.encoder(elements),
                           lambda: response(result, query, charset, aet))


def response(result: dict[str, Any], query: Query, charset: str, aet: str) -> Dataset:
    """A C-FIND response Identifier from one match (DICOM JSON)."""
    ds = Dataset.from_json(result)
    ds.QueryRetrieveLevel = query.level.value
    keys = set(query.keys)
    if "RetrieveAETitle" in keys:
        ds.RetrieveAETitle = aet
    if "InstanceAvailability" in keys:
        ds.InstanceAvailability = "ONLINE"
    cs = _charset(ds, charset)
    if cs:
        ds.SpecificCharacterSet = cs
    return ds


def _charset(ds: Dataset, requested: str) -> str:
    """Answer in the requester's character set when every value fits, else UTF-8.

    '' is the default repertoire (no Specific Character Set element).
    """
    texts = [str(e.value) for e in ds if e.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC")
             and e.value is not None]
    if all(t.isascii() for t in texts):
        return requested
    python_codec = {"ISO_IR 100": "latin_1", "ISO_IR 192": "utf_8", "": "ascii"}.get(
        requested, "")
    if python_codec:
        try:
            for t in texts:
                t.encode(python_codec)
            return requested
        except UnicodeEncodeError:
            pass
    return "ISO_IR 192"
