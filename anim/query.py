"""The one query model shared by C-FIND and QIDO-RS (DESIGN.md "One query engine").

A :class:`Query` is a level, matching keys (keyword → the DICOM matching string, as a
C-FIND identifier or a QIDO parameter carries it), the keys to return, and paging.
``anim.index.search`` turns it into SQL; the front ends only translate to and from it.
Results are DICOM JSON objects (PS3.18 F.2), one per matching entity.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from anim.errors import InvalidQuery


class Level(enum.StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"

    @property
    def depth(self) -> int:
        return _DEPTH[self]


_DEPTH = {Level.PATIENT: 0, Level.STUDY: 1, Level.SERIES: 2, Level.IMAGE: 3}

# The attribute each level is identified by (PS3.4 C.6.1.1 / C.6.2.1 unique keys)
UNIQUE_KEY = {
    Level.PATIENT: "PatientID",
    Level.STUDY: "StudyInstanceUID",
    Level.SERIES: "SeriesInstanceUID",
    Level.IMAGE: "SOPInstanceUID",
}

# Attributes the index can match on, and the level each belongs to.
INDEXED: dict[str, Level] = {
    "PatientName": Level.PATIENT,
    "PatientID": Level.PATIENT,
    "IssuerOfPatientID": Level.PATIENT,
    "PatientBirthDate": Level.PATIENT,
    "PatientSex": Level.PATIENT,
    "NumberOfPatientRelatedStudies": Level.PATIENT,
    "NumberOfPatientRelatedSeries": Level.PATIENT,
    "NumberOfPatientRelatedInstances": Level.PATIENT,
    "StudyInstanceUID": Level.STUDY,
    "StudyDate": Level.STUDY,
    "StudyTime": Level.STUDY,
    "AccessionNumber": Level.STUDY,
    "StudyID": Level.STUDY,
    "StudyDescription": Level.STUDY,
    "ReferringPhysicianName": Level.STUDY,
    "ModalitiesInStudy": Level.STUDY,
    "SOPClassesInStudy": Level.STUDY,
    "NumberOfStudyRelatedSeries": Level.STUDY,
    "NumberOfStudyRelatedInstances": Level.STUDY,
    "SeriesInstanceUID": Level.SERIES,
    "Modality": Level.SERIES,
    "SeriesNumber": Level.SERIES,
    "SeriesDescription": Level.SERIES,
    "BodyPartExamined": Level.SERIES,
    "SeriesDate": Level.SERIES,
    "NumberOfSeriesRelatedInstances": Level.SERIES,
    "SOPInstanceUID": Level.IMAGE,
    "SOPClassUID": Level.IMAGE,
    "InstanceNumber": Level.IMAGE,
    "NumberOfFrames": Level.IMAGE,
}

# Computed attributes (PS3.4 C.3.4, C.6.1.1.x): return keys only, never matched
COMPUTED_RETURN_ONLY = {"SOPClassesInStudy"}

# Query/Retrieve attributes of the request itself, never returned as data
_CONTROL = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}


def keyword_of(key: str) -> str:
    """A keyword from a keyword or an 8-hex-digit tag ("00100010" or "PatientName")."""
    if tag_for_keyword(key) is not None:
        return key
    try:
        tag = int(key, 16) if len(key) == 8 else None
    except ValueError:
        tag = None
    kw = keyword_for_tag(tag) if tag is not None else ""
    if not kw:
        raise InvalidQuery(f"unknown attribute {key!r}")
    return kw


def vr_of(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise InvalidQuery(f"unknown attribute {keyword!r}")
    return str(dictionary_VR(tag))


@dataclass(frozen=True, slots=True)
class Query:
    """One search: *match* holds matching values ('' = universal: return only)."""

    level: Level
    match: Mapping[str, str] = field(default_factory=dict)
    return_keys: tuple[str, ...] = ()
    limit: int | None = None
    offset: int = 0

    def __post_init__(self) -> None:
        for kw, value in self.match.items():
            if kw in _CONTROL:
                continue
            vr_of(kw)
            if not isinstance(value, str):
                raise InvalidQuery(f"{kw}: matching value must be text")
        if self.limit is not None and self.limit < 0:
            raise InvalidQuery("limit must not be negative")
        if self.offset < 0:
            raise InvalidQuery("offset must not be negative")

    @property
    def matching(self) -> dict[str, str]:
        """Keys with a non-universal matching value that the index can match on."""
        return {k: v for k, v in self.match.items()
                if v != "" and v != "*" and k in INDEXED and k not in COMPUTED_RETURN_ONLY
                and INDEXED[k].depth <= self.level.depth}

    @property
    def unsupported(self) -> list[str]:
        """Keys with a matching value the index cannot match on (returned, not matched)."""
        return sorted(k for k, v in self.match.items()
                      if v not in ("", "*") and k not in _CONTROL
                      and (k not in INDEXED or k in COMPUTED_RETURN_ONLY))

    @property
    def keys(self) -> list[str]:
        """Every key to return, in a stable order, the unique keys of the level included."""
        seen: dict[str, None] = {}
        for k in (*self.match, *self.return_keys):
            if k not in _CONTROL:
                seen[k] = None
        return list(seen)
