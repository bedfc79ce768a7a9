"""Imaging study manifests: a DICOM Key Object Selection (KOS) document that references
every current instance of a study, for IHE XDS-I.b and IHE MADO consumers (the HCM side).

The manifest is built with highdicom (``KeyObjectSelection`` + ``KeyObjectSelectionDocument``)
from a :class:`~anim.studyinfo.StudyInfo` alone; no pixel data is read. It is a pure function
of the study content, the retrieve configuration and ``content_time``: every node produces the
same UIDs and the same bytes for the same input.

What is followed, and from where
--------------------------------
PS3.3 A.35.4 (Key Object Selection Document IOD), C.17.6 (Key Object Document Series and
Key Object Document modules), C.17.2.1 (Hierarchical SOP Instance Reference macro):
  SOP Class 1.2.840.10008.5.1.4.1.1.88.59, Modality KO, document title (113030, DCM,
  "Manifest") per PS3.16 TID 2010 / CID 7010, root Continuity of Content SEPARATE, one
  Current Requested Procedure Evidence Sequence item for the study with one Referenced Series
  Sequence item per series and one Referenced SOP Sequence item per current instance.
IHE RAD XDS-I.b KOS manifest requirements (RAD TF-3 4.68.4.1.2.3), read here through the
"IHE-RAD R / R+" column of the Xt-EHR / MCWG KOS manifest specification (hl7-eu/
imaging-manifest, kos-specification, "Key Object Document Module" table):
  one manifest per study; Retrieve AE Title (0008,0054) and Retrieve Location UID
  (0040,E011) in every Referenced Series Sequence item; Referenced Request Sequence when the
  study has an Accession Number; Patient and General Study attributes copied from the study.
IHE RAD MADO (trial implementation; IG https://build.fhir.org/ig/IHE/RAD.MADO, pages
"FHIR Imaging Manifest", "Mappings between MADO FHIR and MADO DICOM KOS" Table 4.3-1, the
2026-04 decision "WADO endpoint at the study level", and the EU MADO tables of the MADO KOS
templates TID 2010 / 1600 / 1601 / 1602):
  * WADO-RS location per series, not per study ("For each series, the manifest SHALL contain
    the WADO endpoint"; study-level was discussed and rejected in favour of repeating it per
    series). Each Referenced Series Sequence item carries the WADO-RS Retrieval Sequence
    (0040,E025) with one item holding Retrieve URL (0008,1190) =
    ``{wado_root}/studies/{study}/series/{series}``.
  * The same URL is also given directly as Retrieve URL (0008,1190) in the series item: PS3.3
    defines that attribute as a PS3.18 retrieve URL, and the MCWG specification asks for it
    (base + study + series). MADO's mapping reserves the study-level Retrieve URL of the
    evidence for an XC-WADO gateway; ANIM has none, so no study-level URL is written.
  * Series and instance descriptors live in the SR content tree, not in the evidence:
    TID 2010 INCLUDE TID 1600 "Image Library" with the study modalities and (131565, DCM,
    "Number of Study Related Series"); one (126200, DCM, "Image Library Group") per series
    with the TID 1602 descriptors Modality, Series Instance UID, Series Number, Series
    Description (131563), Target Region (as TEXT, from Body Part Examined) and (131564, DCM,
    "Number of Series Related Instances"); one TID 1601 entry per instance with Instance
    Number and, for multi-frame objects, Number of Frames.
  The flat TID 2010 reference list (IMAGE or COMPOSITE per SOP class) is kept too,
  so that plain XDS-I.b consumers, which read only that list and the evidence, still work.

The TID 1600 tree uses CONTAINER and HAS ACQ CONTEXT items below the KOS root, which the
MADO KOS extension allows; a validator that knows only the pre-MADO KOS relationship table
(PS3.3 A.35.4.3.1.2) may flag them.

Not followed: Series Date/Time, Target Region codes, Issuer of Accession Number and the order
placer/filler identifiers are not in :class:`StudyInfo` and are left out. Waveforms are
referenced as COMPOSITE, not WAVEFORM: highdicom 0.28 cannot read WAVEFORM items back. The
UCUM count units ({series}, {instances}, {frames}) are our choice. The MADO supplement PDF
itself could not be consulted verbatim (only the IG pages and EU tables named above).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from io import BytesIO

from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    CompositeContentItem,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    ImageContentItem,
    NumContentItem,
    RelationshipTypeValues,
    TextContentItem,
    UIDRefContentItem,
)
from pydicom import Dataset, dcmwrite
from pydicom.dataset import FileMetaDataset
from pydicom.sr._concepts_dict import concepts
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM

from anim.studyinfo import InstanceInfo, SeriesInfo, StudyInfo, derived_uid

MANIFEST_SERIES_NUMBER = 9999
KOS_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.88.59")  # PS3.4 B.5, Key Object Selection

# highdicom names every reference "Source" (PS3.3 C.17.3: anonymous items are discouraged)
_SOURCE = CodedConcept("260753009", "SCT", "Source")
# TID 1600 / 1602 codes added for MADO (CP-2595); not yet in pydicom's dictionary
_SERIES_DESCRIPTION = CodedConcept("131563", "DCM", "Series Description")
_SERIES_INSTANCES = CodedConcept("131564", "DCM", "Number of Series Related Instances")
_STUDY_SERIES = CodedConcept("131565", "DCM", "Number of Study Related Series")
# UCUM annotations ({...}) are dimensionless counts
_UNIT_FRAMES = CodedConcept("{frames}", "UCUM", "frames")
_UNIT_INSTANCES = CodedConcept("{instances}", "UCUM", "instances")
_UNIT_SERIES = CodedConcept("{series}", "UCUM", "series")
_ACQ = RelationshipTypeValues.HAS_ACQ_CONTEXT
_CONTAINS = RelationshipTypeValues.CONTAINS
_SEXES = {"M", "F", "O"}  # PS3.3 C.7.1.1 Enumerated Values of Patient's Sex


@dataclass(frozen=True)
class ManifestUIDs:
    series_uid: str
    sop_uid: str


def manifest_series_uid(study_uid: str) -> str:
    """The series the archive's own manifests of a study go in (when stored)."""
    return derived_uid("anim-manifest-series", study_uid)


def manifest_content(info: StudyInfo) -> StudyInfo:
    """The study without the archive's own stored manifests: what a manifest lists."""
    own = manifest_series_uid(info.study_uid)
    if all(s.series_uid != own for s in info.series):
        return info
    return dataclasses.replace(info, series=tuple(s for s in info.series if s.series_uid != own))


def manifest_uids(info: StudyInfo) -> ManifestUIDs:
    """The manifest's Series and SOP Instance UIDs, derived from the study content.

    Every node computes the same UIDs for the same content; a study whose set of current
    instances changes gets a new SOP Instance UID (a new manifest), in the same series.
    """
    content = manifest_content(info)
    return ManifestUIDs(
        series_uid=manifest_series_uid(info.study_uid),
        sop_uid=derived_uid("anim-manifest", info.study_uid, content.fingerprint),
    )


def build_kos(
    info: StudyInfo,
    *,
    wado_root: str,
    retrieve_aet: str,
    content_time: datetime,
    institution: str = "",
    manufacturer: str = "ANIM",
) -> Dataset:
    """Build the KOS manifest of a study.

    Parameters
    ----------
    info : StudyInfo
        The study's current content.
    wado_root : str
        DICOMweb root URL as consumers reach it, e.g. ``https://pacs.example/dicom-web``.
    retrieve_aet : str
        AE Title from which the instances can be retrieved with C-MOVE / C-GET.
    content_time : datetime
        Content Date/Time of the manifest (also its creation and series date/time). An aware
        datetime is written in UTC with Timezone Offset From UTC ``+0000``.
    institution, manufacturer : str
        General Equipment Module values of the manifest creator.

    Returns
    -------
    pydicom.Dataset
        A ``highdicom.ko.KeyObjectSelectionDocument``, Explicit VR Little Endian.

    Raises
    ------
    ValueError
        When the study has no instances (a KOS references at least one), or ``wado_root`` or
        ``retrieve_aet`` is not usable.
    """
    info = manifest_content(info)  # a manifest never lists an earlier stored manifest
    if info.num_instances == 0:
        raise ValueError(f"build_kos: study {info.study_uid} has no instances to reference")
    if not wado_root.startswith(("http://", "https://")):
        raise ValueError(f"build_kos: expected an http(s) wado_root, got {wado_root!r}")
    if not 0 < len(retrieve_aet.strip()) <= 16 or "\\" in retrieve_aet:  # PS3.5 6.2 AE
        raise ValueError(f"build_kos: expected an AE Title of 1-16 chars, got {retrieve_aet!r}")
    wado_root = wado_root.rstrip("/")
    when, aware = _utc(content_time)
    series = _ordered(info)
    evidence = [_reference(info.study_uid, s, i) for s in series for i in s.instances]
    evidence[0].update(_patient_and_study(info))

    content = KeyObjectSelection(document_title=codes.DCM.Manifest, referenced_objects=evidence)
    root = content[0]
    root.ContinuityOfContent = "SEPARATE"  # PS3.3 A.35.4.3.1: the KOS root is SEPARATE
    root.ContentSequence.append(_image_library(info, series))

    uids = manifest_uids(info)
    kos = KeyObjectSelectionDocument(
        evidence=evidence,
        content=content,
        series_instance_uid=uids.series_uid,
        series_number=MANIFEST_SERIES_NUMBER,
        sop_instance_uid=uids.sop_uid,
        instance_number=1,
        manufacturer=manufacturer,
        institution_name=institution or None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        specific_character_set=_charset(info, institution, manufacturer),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    # highdicom stamps the wall clock in these; the manifest must depend on content_time only
    kos.InstanceCreationDate = kos.ContentDate
    kos.InstanceCreationTime = kos.ContentTime
    stamp = when.strftime("%Y%m%d%H%M%S.%f") + ("+0000" if aware else "")
    for equipment in kos.get("ContributingEquipmentSequence", []):
        equipment.ContributionDateTime = stamp
    if aware:
        kos.TimezoneOffsetFromUTC = "+0000"
    _copy_patient_and_study(kos, info)
    _add_retrieve_locations(kos, wado_root, retrieve_aet)
    return kos


def kos_part10(ds: Dataset) -> bytes:
    """Part 10 bytes of a manifest: preamble, File Meta Information, Explicit VR Little
    Endian data set (PS3.10 7.1). Sets *ds*'s File Meta Information to match."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def referenced_instances(ds: Dataset) -> set[tuple[str, str, str]]:
    """(Study, Series, SOP Instance UID) of every instance in a KOS's Current Requested
    Procedure Evidence Sequence."""
    return {
        (str(study.StudyInstanceUID), str(series.SeriesInstanceUID),
         str(ref.ReferencedSOPInstanceUID))
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for ref in series.get("ReferencedSOPSequence", [])
    }


def series_url(wado_root: str, study_uid: str, series_uid: str) -> str:
    """WADO-RS series resource (PS3.18 10.4.1.1.2)."""
    return f"{wado_root.rstrip('/')}/studies/{study_uid}/series/{series_uid}"


def _ordered(info: StudyInfo) -> list[SeriesInfo]:
    """Series and instances in a fixed order, so that bytes do not depend on index order."""
    def by_number(n: int | None, uid: str) -> tuple[bool, int, str]:
        return (n is None, n or 0, uid)

    out = []
    for s in sorted(info.series, key=lambda s: by_number(s.number, s.series_uid)):
        if s.instances:
            insts = tuple(sorted(s.instances, key=lambda i: by_number(i.number, i.sop_uid)))
            out.append(SeriesInfo(s.series_uid, s.number, s.modality, s.description,
                                  s.body_part, insts))
    return out


def _value_type(sop_class_uid: str) -> str:
    """IMAGE for image storage classes, else COMPOSITE (PS3.3 C.18.4 / C.18.3), also for
    waveforms: highdicom 0.28 cannot read WAVEFORM items back, and consumers must.
    Unknown and private classes are COMPOSITE."""
    return "IMAGE" if "Image Storage" in UID(sop_class_uid).name else "COMPOSITE"


def _reference(study_uid: str, series: SeriesInfo, inst: InstanceInfo) -> Dataset:
    """The minimal header highdicom needs to reference an instance (no pixel data)."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series.series_uid
    ds.SOPInstanceUID = inst.sop_uid
    ds.SOPClassUID = inst.sop_class_uid
    if _value_type(inst.sop_class_uid) == "IMAGE":
        ds.Rows = ds.Columns = 0  # highdicom's test for an IMAGE reference; never written
    return ds


def _patient_and_study(info: StudyInfo) -> Dataset:
    """What highdicom reads from the first evidence item. The names are set afterwards:
    highdicom warns on valid single-component PNs, and values it cannot parse become empty."""
    ds = Dataset()
    ds.PatientID = info.patient_id
    ds.PatientName = ""
    ds.PatientBirthDate = _valid(DA, info.birth_date)
    ds.PatientSex = info.sex.upper() if info.sex.upper() in _SEXES else ""
    ds.AccessionNumber = info.accession_number
    ds.StudyID = info.study_id
    ds.StudyDate = _valid(DA, info.study_date)
    ds.StudyTime = _valid(TM, info.study_time)
    return ds


def _copy_patient_and_study(kos: Dataset, info: StudyInfo) -> None:
    kos.PatientName = info.patient_name
    kos.ReferringPhysicianName = info.referring_physician
    if info.issuer:  # Type 3 (PS3.3 C.7.1.1): absent rather than empty
        kos.IssuerOfPatientID = info.issuer
    if info.description:
        kos.StudyDescription = info.description
    if info.accession_number:
        # PS3.3 C.17.6.2 Referenced Request Sequence: Type 1C, required when the document
        # answers a requested procedure (XDS-I.b and MADO: R+); Type 2 members left empty
        req = Dataset()
        req.StudyInstanceUID = info.study_uid
        req.ReferencedStudySequence = []
        req.AccessionNumber = info.accession_number
        req.PlacerOrderNumberImagingServiceRequest = ""
        req.FillerOrderNumberImagingServiceRequest = ""
        req.RequestedProcedureID = ""
        req.RequestedProcedureDescription = ""
        req.RequestedProcedureCodeSequence = []
        kos.ReferencedRequestSequence = [req]


def _add_retrieve_locations(kos: Dataset, wado_root: str, retrieve_aet: str) -> None:
    """Per series: Retrieve AE Title and Retrieve Location UID (XDS-I.b), Retrieve URL
    (PS3.3 C.17.2.1, MCWG) and the WADO-RS Retrieval Sequence (MADO)."""
    location = derived_uid("anim-retrieve-location", retrieve_aet)
    for study in kos.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            url = series_url(wado_root, study.StudyInstanceUID, series.SeriesInstanceUID)
            series.RetrieveAETitle = retrieve_aet
            series.RetrieveLocationUID = location
            series.RetrieveURL = url
            wado = Dataset()
            wado.RetrieveURL = url
            series.WADORSRetrievalSequence = [wado]


def _image_library(info: StudyInfo, series: list[SeriesInfo]) -> ContainerContentItem:
    """TID 1600 Image Library, as MADO populates it (see module docstring)."""
    library = ContainerContentItem(
        name=codes.DCM.ImageLibrary, is_content_continuous=False, template_id="1600",
        relationship_type=_CONTAINS,
    )
    items: list[ContentItem] = [
        CodeContentItem(name=codes.DCM.Modality, value=_modality(m), relationship_type=_ACQ)
        for m in sorted({s.modality for s in series if s.modality})
    ]
    items.append(NumContentItem(name=_STUDY_SERIES, value=len(series), unit=_UNIT_SERIES,
                                relationship_type=_ACQ))
    items += [_library_group(info.study_uid, s) for s in series]
    library.ContentSequence = ContentSequence(items)
    return library


def _library_group(study_uid: str, s: SeriesInfo) -> ContainerContentItem:
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, is_content_continuous=False,
                                 relationship_type=_CONTAINS)
    items: list[ContentItem] = []
    if s.modality:
        items.append(CodeContentItem(name=codes.DCM.Modality, value=_modality(s.modality),
                                     relationship_type=_ACQ))
    items.append(UIDRefContentItem(name=codes.DCM.SeriesInstanceUID, value=s.series_uid,
                                   relationship_type=_ACQ))
    if s.number is not None:
        items.append(TextContentItem(name=codes.DCM.SeriesNumber, value=str(s.number),
                                     relationship_type=_ACQ))
    if s.description:
        items.append(TextContentItem(name=_SERIES_DESCRIPTION, value=s.description,
                                     relationship_type=_ACQ))
    if s.body_part:
        items.append(TextContentItem(name=codes.DCM.TargetRegion, value=s.body_part,
                                     relationship_type=_ACQ))
    items.append(NumContentItem(name=_SERIES_INSTANCES, value=len(s.instances),
                                unit=_UNIT_INSTANCES, relationship_type=_ACQ))
    items += [_library_entry(i) for i in s.instances]
    group.ContentSequence = ContentSequence(items)
    return group


def _library_entry(inst: InstanceInfo) -> ContentItem:
    """TID 1601 entry: the reference with its TID 1602 instance descriptors."""
    kind = ImageContentItem if _value_type(inst.sop_class_uid) == "IMAGE" else CompositeContentItem
    entry = kind(name=_SOURCE, referenced_sop_class_uid=inst.sop_class_uid,
                 referenced_sop_instance_uid=inst.sop_uid, relationship_type=_CONTAINS)
    items: list[ContentItem] = []
    if inst.number is not None:
        items.append(TextContentItem(name=codes.DCM.InstanceNumber, value=str(inst.number),
                                     relationship_type=_ACQ))
    if inst.num_frames is not None and inst.num_frames > 1:
        items.append(NumContentItem(name=codes.DCM.NumberOfFrames, value=inst.num_frames,
                                    unit=_UNIT_FRAMES, relationship_type=_ACQ))
    if items:
        entry.ContentSequence = ContentSequence(items)
    return entry


@cache
def _modality(modality: str) -> CodedConcept:
    """Modality as a DCM code (CID 29/33), meaning from pydicom's dictionary when known
    (pydicom has no public lookup by code value)."""
    meaning = next((m for entry in concepts["DCM"].values()
                    for code, (m, _cids) in entry.items() if code == modality), modality)
    return CodedConcept(modality, "DCM", meaning)


def _valid(vr: type[DA] | type[TM], value: str) -> str:
    """*value* if it parses as the given VR, else '' (Type 2 attributes may be empty)."""
    try:
        vr(value)
    except ValueError:
        return ""
    return value


def _utc(moment: datetime) -> tuple[datetime, bool]:
    if moment.tzinfo is None:
        return moment, False
    return moment.astimezone(UTC).replace(tzinfo=None), True


def _charset(info: StudyInfo, *extra: str) -> str | None:
    """ISO_IR 192 (UTF-8) when any text is outside the default repertoire (PS3.5 6.1)."""
    texts = (info.patient_name, info.patient_id, info.issuer, info.referring_physician,
             info.description, info.accession_number, info.study_id, *extra,
             *(t for s in info.series for t in (s.description, s.body_part)))
    return None if all(t.isascii() for t in texts) else "ISO_IR 192"
