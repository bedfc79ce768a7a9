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
from anim.security import Viewer


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
    # QIDO-RS includefield=all: also every attribute of the level held in the
    # stored metadata of a representative instance (PS3.18 8.3.4.3)
    include_all: bool = False
    # whose eyes: None sees everything (tenancy off, the local operator, a national
    # role); otherwise only the studies the caller's institution may see (docs/security.md)
    viewer: Viewer | None = None
    # revoked institutions and since when: what they sent from then on is hidden from
    # everyone (compromise containment); the archive fills this in
    contained: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for kw, value in self.match.items():
            if kw in _CONTROL:
                continue
            vr_of(kw)
            if not isinstance(value, str):
                raise InvalidQuery(f"{kw}: matching value must be text")
            if "\x00" in value:
                # not a DICOM text character (PS3.5 6.1.3), and PostgreSQL text cannot
                # hold it: refused alike on both engines, for C-FIND as for QIDO-RS
                raise InvalidQuery(f"{kw}: a NUL character is not allowed")
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


# Attributes of the study and series levels beyond INDEXED, by tag, for includefield=all.
# Patient-level attributes are group 0010; anything not listed is instance level.
_STUDY_TAGS = frozenset({
    0x00080020, 0x00080030, 0x00080050, 0x00080051, 0x00080056, 0x00080061, 0x00080062,
    0x00080090, 0x00080201, 0x00081030, 0x00081032, 0x00081048, 0x00081060, 0x00081080,
    0x00200010, 0x0020000D, 0x00201206, 0x00201208, 0x00321032, 0x00321060, 0x00400244,
    0x00400245,
})
_SERIES_TAGS = frozenset({
    0x00080021, 0x00080031, 0x00080060, 0x00080070, 0x00080080, 0x00081010, 0x0008103E,
    0x00081040, 0x00081050, 0x00081070, 0x00081090, 0x00180015, 0x00181030, 0x00185100,
    0x0020000E, 0x00200011, 0x00200060, 0x00201209, 0x00400275, 0x00400253,
})


def level_of_tag(tag: int) -> Level:
    """The level an attribute belongs to, for includefield=all (coarse, by module)."""
    if tag >> 16 == 0x0010:
        return Level.PATIENT
    if tag in _STUDY_TAGS:
        return Level.STUDY
    if tag in _SERIES_TAGS:
        return Level.SERIES
    return Level.IMAGE
