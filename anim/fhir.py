"""FHIR R4 (4.0.1) resources for a study the archive holds: pure builders, no network.

What the national HCM layer reads of a study, as FHIR: an ``ImagingStudy`` (FHIR R4
imagingstudy.html), the DICOMweb ``Endpoint`` that resolves its series and instances, and
the imaging manifest ``DocumentReference`` of IHE RAD MADO (Manifest-based Access to
DICOM Objects, trial implementation 0.1.0) with the HL7 Europe imaging-manifest
extensions. Every function takes what the index knows (:class:`StudyInfo`) and returns
plain dicts ready for ``json.dumps``; ``web/fhir.py`` serves them.

Identifiers, as FHIR R4 ImagingStudy's notes and MADO say:

- Study Instance UID: ``system`` ``urn:dicom:uid``, ``value`` ``urn:oid:<uid>``
  (FHIR R4 ImagingStudy.identifier; MADO's Study Instance UID identifier adds the
  ``type`` DCM 110180 "Study Instance UID").
- Accession Number: ``type`` v2-0203 ACSN and DCM 121022 (MADO Accession Number
  identifier). MADO wants ``system`` = the Issuer of Accession Number (0008,0051); the
  index does not keep that sequence, so the identifier has no system.
- The patient is (IssuerOfPatientID, PatientID) everywhere in the archive (DESIGN.md):
  a logical reference by identifier, ``system`` from :func:`patient_system`. No Patient
  resource is served; the HCM layer owns patients.

The manifest DocumentReference follows MADO's ``MadoDicomKosDocumentReference`` and
the HL7 Europe ``ImManifestDocumentReference`` where they are specific:

- ``type`` LOINC 18748-4 "Diagnostic imaging study" (also the MADO example category);
  ``status`` current; ``subject`` the patient;
- ``masterIdentifier`` = the KOS SOP Instance UID (MADO), written as IHE MHD writes an
  XDS uniqueId OID (``urn:ietf:rfc:3986`` | ``urn:oid:<uid>``), and repeated in
  ``identifier`` (MADO invariant mado-docref-1);
- ``content``: the KOS (``application/dicom``, format DCMUID
  1.2.840.10008.5.1.4.1.1.88.59 "Key Object Selection Document", the code MADO fixes
  and the IHE FormatCode value set lists; the IHE FormatCode code system itself has no
  KOS code) and the FHIR ImagingStudy (``application/fhir+json``, format
  ``urn:ihe:iti:xds:2017:mimeTypeSufficient``: a bare ImagingStudy is not MADO's FHIR
  manifest Bundle, so its ``urn:ihe:rad:MADO:fhir-manifest`` code would be a false claim).
  FHIR R4 DocumentReference.content allows one repetition per format; HL7 Europe
  slices ``content`` into exactly these two;
- ``context.period.start`` = the study's start, ``context.related`` = the
  ImagingStudy, the Study Instance UID identifier and the Accession Number identifier
  (MADO slices ``study-instance-uid`` and ``accession-number``, which its
  ``study-instance-uid`` / ``accession-number`` search parameters read);
  ``context.practiceSetting`` SNOMED CT 394914008 "Radiology" (MADO example);
- modality: the R5 cross-version extension ``DocumentReference.modality`` (MADO 1..*).

Not followed (the archive cannot know them): ``attachment.language``,
``context.facilityType``, ``author`` (MADO Creator device), ``securityLabel``.

Dates: FHIR R4 dateTime requires a time zone whenever a time is given (datatypes.html#dateTime).
DICOM StudyTime is local wall-clock time, and the index keeps no Timezone Offset From
UTC, so ``started`` and ``context.period.start`` carry the date only; inventing a zone
would shift the study by hours for some readers.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote, unquote

from anim.studyinfo import SeriesInfo, StudyInfo

FHIR_VERSION = "4.0.1"
DICOM_UID_SYSTEM = "urn:dicom:uid"
RFC3986 = "urn:ietf:rfc:3986"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DCMUID = "http://dicom.nema.org/resources/ontology/DCMUID"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
IHE_FORMAT = "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode"
CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
# R5 element used in R4 (FHIR cross-version extensions), as MADO and HL7 Europe do
MODALITY_EXT = "http://hl7.org/fhir/5.0/StructureDefinition/extension-DocumentReference.modality"
ISSUER_PREFIX = "urn:anim:issuer:"
ENDPOINT_ID = "dicomweb"
KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
# URIs taken as they are: a URN (RFC 8141 namespace) or an http(s) URL, no whitespace
_URI = re.compile(r"(urn:[A-Za-z0-9][A-Za-z0-9-]{0,31}:\S+|https?://\S+)")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")  # FHIR R4 datatypes.html#id

# PS3.16 CID 29 is the acquisition modalities: ImagingStudy.modality lists only those
# (FHIR R4 ImagingStudy.modality); these are the common derived / non-image ones
_NOT_ACQUISITION = frozenset({
    "KO", "PR", "SR", "DOC", "REG", "SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "RTDOSE",
    "PLAN", "FID", "RWV", "AU",
})
_MODALITY_NAMES = {
    "CR": "Computed Radiography", "CT": "Computed Tomography", "DX": "Digital Radiography",
    "ES": "Endoscopy", "IO": "Intra-oral Radiography", "MG": "Mammography",
    "MR": "Magnetic Resonance", "NM": "Nuclear Medicine", "OP": "Ophthalmic Photography",
    "OPT": "Ophthalmic Tomography", "OT": "Other", "PT": "Positron emission tomography",
    "PX": "Panoramic X-Ray", "RF": "Radio Fluoroscopy", "SM": "Slide Microscopy",
    "US": "Ultrasound", "XA": "X-Ray Angiography", "XC": "External-camera Photography",
    "KO": "Key Object Selection", "PR": "Presentation State", "SR": "SR Document",
    "SEG": "Segmentation", "DOC": "Document", "ECG": "Electrocardiography",
}


# ---- identifiers ----------------------------------------------------------------------


def patient_system(issuer: str) -> str:
    """The FHIR ``Identifier.system`` of patient IDs issued by *issuer* (IssuerOfPatientID).

    - an OID (``1.2.3``) → ``urn:oid:1.2.3`` (FHIR R4 datatypes.html#oid);
    - already a URI (``urn:<nid>:…``, ``http(s)://…``, no whitespace) → itself, except
      a ``urn:oid:`` or ``urn:anim:issuer:`` one, which would read back as something
      else and so is encoded as a name;
    - any other name (``HOSP-A``) → ``urn:anim:issuer:`` + the name percent-encoded
      (RFC 3986, every byte outside the unreserved set);
    - no issuer → ``urn:anim:issuer:`` alone: patients without an issuer are their own
      namespace, distinct from every named one.

    :func:`issuer_of_system` inverts it exactly, so a system read from a response can be
    searched on again.
    """
    if _OID.fullmatch(issuer):
        return "urn:oid:" + issuer
    if (_URI.fullmatch(issuer) and not issuer.startswith("urn:oid:")
            and not issuer.startswith(ISSUER_PREFIX)):
        return issuer
    return ISSUER_PREFIX + quote(issuer, safe="")


def issuer_of_system(system: str) -> str:
    """The IssuerOfPatientID a FHIR identifier system stands for (see :func:`patient_system`)."""
    if system.startswith(ISSUER_PREFIX):
        return unquote(system[len(ISSUER_PREFIX):])
    if system.startswith("urn:oid:") and _OID.fullmatch(system[8:]):
        return system[8:]
    return system


def is_fhir_id(value: str) -> bool:
    return _FHIR_ID.fullmatch(value) is not None


def patient_identifier(info: StudyInfo) -> dict[str, Any]:
    return {"system": patient_system(info.issuer), "value": info.patient_id}


def patient_reference(info: StudyInfo) -> dict[str, Any]:
    """A logical reference (FHIR R4 references.html#logical): no Patient resource."""
    ref: dict[str, Any] = {"type": "Patient", "identifier": patient_identifier(info)}
    name = person_name(info.patient_name)
    if name:
        ref["display"] = name
    return ref


def study_uid_identifier(study_uid: str) -> dict[str, Any]:
    return {
        "type": {"coding": [{"system": DCM, "code": "110180",
                             "display": "Study Instance UID"}]},
        "system": DICOM_UID_SYSTEM, "value": "urn:oid:" + study_uid,
    }


def accession_identifier(accession: str) -> dict[str, Any]:
    return {
        "type": {"coding": [
            {"system": V2_0203, "code": "ACSN", "display": "Accession ID"},
            {"system": DCM, "code": "121022", "display": "Accession Number"},
        ]},
        "value": accession,
    }


def study_identifiers(info: StudyInfo) -> list[dict[str, Any]]:
    out = [study_uid_identifier(info.study_uid)]
    if info.accession_number:
        out.append(accession_identifier(info.accession_number))
    return out


# ---- values ---------------------------------------------------------------------------


def fhir_date(da: str) -> str | None:
    """DICOM DA (``YYYYMMDD``; the ACR-NEMA ``YYYY.MM.DD`` too) → FHIR date, or None."""
    digits = da.strip().replace(".", "")
    if len(digits) != 8 or not digits.isdigit():
        return None
    try:
        return date(int(digits[:4]), int(digits[4:6]), int(digits[6:])).isoformat()
    except ValueError:
        return None


def _time(tm: str) -> str | None:
    """DICOM TM (``HH[MM[SS[.F{1,6}]]]``, legacy ``HH:MM:SS`` too) → ``HH:MM:SS[.F]``."""
    whole, _, frac = tm.strip().replace(":", "").partition(".")
    if not whole.isdigit() or len(whole) not in (2, 4, 6) or (frac and not frac.isdigit()):
        return None
    hh, mm, ss = whole[:2], whole[2:4] or "00", whole[4:6] or "00"
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 60:
        return None
    return f"{hh}:{mm}:{ss}" + (f".{frac}" if frac and len(whole) == 6 else "")


def fhir_datetime(da: str, tm: str = "", tz: str = "") -> str | None:
    """DICOM date, time and UTC offset (``+HHMM``, as Timezone Offset From UTC) → FHIR
    dateTime. FHIR R4 requires a zone with a time, so without *tz* (or without a valid
    time) only the date is given; None when there is no valid date."""
    day = fhir_date(da)
    if day is None:
        return None
    clock = _time(tm) if tm else None
    m = re.fullmatch(r"([+-])(\d\d)(\d\d)", tz.strip())
    if clock is None or m is None or int(m.group(2)) > 14 or int(m.group(3)) > 59:
        return day
    return f"{day}T{clock}{m.group(1)}{m.group(2)}:{m.group(3)}"


def fhir_instant(iso: str) -> str | None:
    """An ISO 8601 timestamp (the index's UTC ``updated_at``) → FHIR instant, or None."""
    try:
        at = datetime.fromisoformat(iso)
    except (TypeError, ValueError):
        return None
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)  # the index writes UTC
    return at.isoformat(timespec="milliseconds")


def person_name(pn: str) -> str:
    """DICOM PN (``Family^Given^Middle^Prefix^Suffix``, alphabetic group) → display text."""
    parts = [*pn.split("=", 1)[0].split("^"), "", "", "", ""][:5]
    family, given, middle, prefix, suffix = (p.strip() for p in parts)
    return " ".join(p for p in (prefix, given, middle, family, suffix) if p)


def modality_coding(code: str) -> dict[str, Any]:
    coding: dict[str, Any] = {"system": DCM, "code": code or "OT"}
    if coding["code"] in _MODALITY_NAMES:
        coding["display"] = _MODALITY_NAMES[coding["code"]]
    return coding


def _unsigned(n: int | None) -> int | None:
    """FHIR unsignedInt; DICOM IS numbers can be negative, which FHIR cannot carry."""
    return n if n is not None and n >= 0 else None


def _prune(d: dict[str, Any]) -> dict[str, Any]:
    """Drop absent values: FHIR JSON has no nulls and no empty strings or arrays."""
    return {k: v for k, v in d.items() if v not in (None, "", [], {})}


# ---- resources ------------------------------------------------------------------------


def endpoint(wado_root: str) -> dict[str, Any]:
    """The archive's DICOMweb service (FHIR R4 Endpoint; MADO ``MadoWadoEndpoint``):
    ImagingStudy.series[].uid and .instance[].uid resolve under *wado_root* as
    ``{address}/studies/{study}/series/{series}/instances/{sop}`` (PS3.18 10.4)."""
    return {
        "resourceType": "Endpoint",
        "id": ENDPOINT_ID,
        "status": "active",
        "connectionType": {"system": CONNECTION_TYPE, "code": "dicom-wado-rs",
                           "display": "DICOM WADO-RS"},
        "name": "ANIM DICOMweb (WADO-RS, QIDO-RS, STOW-RS)",
        # R4 payloadType is 1..*; MADO sets its text, there is no code for it
        "payloadType": [{"text": "DICOM WADO-RS"}],
        "payloadMimeType": ["application/dicom", "application/dicom+json",
                            "application/octet-stream", "image/jpeg", "image/png"],
        "address": wado_root,
    }


def endpoint_reference(wado_root: str) -> dict[str, Any]:
    return {"reference": f"Endpoint/{ENDPOINT_ID}", "display": f"DICOMweb {wado_root}"}


def _series(s: SeriesInfo, endpoint_ref: dict[str, Any]) -> dict[str, Any]:
    return _prune({
        "uid": s.series_uid,
        "number": _unsigned(s.number),
        "modality": modality_coding(s.modality),
        "description": s.description,
        "numberOfInstances": len(s.instances),
        "endpoint": [endpoint_ref],
        # BodyPartExamined is a DICOM defined term, not a SNOMED code (PS3.16 Annex L
        # maps them); the term is kept as display text only
        "bodySite": {"display": s.body_part} if s.body_part else None,
        "instance": [_prune({
            "uid": i.sop_uid,
            "sopClass": {"system": RFC3986, "code": "urn:oid:" + i.sop_class_uid},
            "number": _unsigned(i.number),
        }) for i in s.instances],
    })


def imaging_study(info: StudyInfo, *, wado_root: str) -> dict[str, Any]:
    """The study as a FHIR R4 ImagingStudy, ``id`` = the Study Instance UID (a UID is a
    valid FHIR id: digits and dots, at most 64; a non-conformant one gets no id)."""
    ep = endpoint_reference(wado_root)
    modalities = [m for m in dict.fromkeys(info.modalities) if m not in _NOT_ACQUISITION]
    referrer = person_name(info.referring_physician)
    return _prune({
        "resourceType": "ImagingStudy",
        "id": info.study_uid if is_fhir_id(info.study_uid) else None,
        "meta": _prune({"lastUpdated": fhir_instant(info.updated_at)}),
        "identifier": study_identifiers(info),
        "status": "available",
        "modality": [modality_coding(m) for m in modalities],
        "subject": patient_reference(info),
        "started": fhir_datetime(info.study_date, info.study_time),
        "referrer": {"display": referrer} if referrer else None,
        "endpoint": [ep],
        "numberOfSeries": info.num_series,
        "numberOfInstances": info.num_instances,
        "description": info.description,
        "series": [_series(s, ep) for s in info.series],
    })


def document_reference(info: StudyInfo, *, manifest_sop_uid: str, manifest_series_uid: str,
                       kos_url: str = "", imaging_study_url: str,
                       wado_root: str) -> dict[str, Any]:
    """The study's imaging manifest as a MADO / HL7 Europe DocumentReference (see the
    module docstring for what is followed), ``id`` = the KOS SOP Instance UID.

    *kos_url* serves the KOS Part 10 object; when empty, the KOS's WADO-RS instance URL
    under *wado_root* is used (valid when the manifest is stored in the archive).
    """
    if not kos_url:
        kos_url = (f"{wado_root}/studies/{info.study_uid}/series/{manifest_series_uid}"
                   f"/instances/{manifest_sop_uid}")
    doc_id = {"system": RFC3986, "value": "urn:oid:" + manifest_sop_uid}
    created = fhir_instant(info.updated_at)
    related: list[dict[str, Any]] = [
        {"reference": imaging_study_url, "type": "ImagingStudy"},
        {"identifier": study_uid_identifier(info.study_uid)},
    ]
    if info.accession_number:
        related.append({"identifier": accession_identifier(info.accession_number)})
    started = fhir_datetime(info.study_date, info.study_time)
    modalities = list(dict.fromkeys(s.modality for s in info.series if s.modality))
    return _prune({
        "resourceType": "DocumentReference",
        "id": manifest_sop_uid,
        "meta": _prune({"lastUpdated": created}),
        "extension": [{"url": MODALITY_EXT,
                       "valueCodeableConcept": {"coding": [modality_coding(m)]}}
                      for m in modalities],
        "masterIdentifier": doc_id,
        "identifier": [doc_id],
        "status": "current",
        "type": {"coding": [{"system": LOINC, "code": "18748-4",
                             "display": "Diagnostic imaging study"}]},
        "category": [{"coding": [{"system": LOINC, "code": "18748-4",
                                  "display": "Diagnostic imaging study"}]}],
        "subject": patient_reference(info),
        "date": created,
        "description": ("Imaging manifest for study urn:oid:" + info.study_uid
                        + (f" ({info.description})" if info.description else "")),
        "content": [
            {"attachment": _prune({"contentType": "application/dicom", "url": kos_url,
                                   "title": "DICOM KOS imaging manifest",
                                   "creation": created}),
             "format": {"system": DCMUID, "code": KOS_SOP_CLASS,
                        "display": "Key Object Selection Document"}},
            {"attachment": _prune({"contentType": "application/fhir+json",
                                   "url": imaging_study_url,
                                   "title": "FHIR ImagingStudy", "creation": created}),
             "format": {"system": IHE_FORMAT,
                        "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient",
                        "display": "mimeType Sufficient"}},
        ],
        "context": _prune({
            "period": {"start": started} if started else None,
            "practiceSetting": {"coding": [{"system": SNOMED, "code": "394914008",
                                            "display": "Radiology"}]},
            "related": related,
        }),
    })


def searchset(resources: list[dict[str, Any]], *, base: str, self_url: str,
              total: int | None, next_url: str | None,
              included: list[dict[str, Any]] | tuple[dict[str, Any], ...] = ()
              ) -> dict[str, Any]:
    """A FHIR R4 search result Bundle (search.html#paging, Bundle.entry.search.mode):
    *resources* as ``match``, *included* as ``include``, fullUrl = base/type/id."""
    def entry(r: dict[str, Any], mode: str) -> dict[str, Any]:
        e: dict[str, Any] = {"resource": r, "search": {"mode": mode}}
        if "id" in r:
            e = {"fullUrl": f"{base}/{r['resourceType']}/{r['id']}", **e}
        return e

    links = [{"relation": "self", "url": self_url}]
    if next_url:
        links.append({"relation": "next", "url": next_url})
    return _prune({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": [entry(r, "match") for r in resources]
        + [entry(r, "include") for r in included],
    })


def operation_outcome(severity: str, code: str, text: str) -> dict[str, Any]:
    """One issue (FHIR R4 OperationOutcome; *code* from the IssueType value set)."""
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


def capability_statement(base: str, *, version: str = "", date_: str = "",
                         imaging_study_params: tuple[tuple[str, str, str], ...] = (),
                         document_reference_params: tuple[tuple[str, str, str], ...] = (),
                         ) -> dict[str, Any]:
    """What ``/fhir`` serves (FHIR R4 CapabilityStatement, kind instance). The search
    parameters are (name, type, documentation) triples, supplied by the server that
    parses them, so the statement cannot drift from what is accepted."""
    def params(triples: tuple[tuple[str, str, str], ...]) -> list[dict[str, Any]]:
        return [{"name": n, "type": t, "documentation": d} for n, t, d in triples]

    paging = [{"name": "_count", "type": "number",
               "documentation": "page size, default 50, at most 1000"},
              {"name": "_offset", "type": "number",
               "documentation": "first match to return (what the next link carries)"}]
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date_ or datetime.now(UTC).date().isoformat(),
        "publisher": "ANIM",
        "kind": "instance",
        "software": _prune({"name": "ANIM archive", "version": version}),
        "implementation": {"description": "ANIM national imaging archive: FHIR R4 "
                           "references to the studies it holds (read-only)", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "Read-only. Unknown search parameters are refused (400), "
                             "searches without criteria too.",
            "resource": [
                {"type": "ImagingStudy", "interaction": [{"code": "read"},
                                                         {"code": "search-type"}],
                 "searchInclude": ["ImagingStudy:endpoint"],
                 "searchParam": params(imaging_study_params) + paging},
                {"type": "Endpoint", "interaction": [{"code": "read"},
                                                     {"code": "search-type"}]},
                {"type": "DocumentReference", "interaction": [{"code": "search-type"}],
                 "searchParam": params(document_reference_params) + paging},
            ],
        }],
    }
