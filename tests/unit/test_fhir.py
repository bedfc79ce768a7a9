"""anim/fhir.py builders against hand-made studies, each resource validated by
fhir.resources (FHIR R4 4.0.1 models); the issuer ↔ system mapping; DICOM dates."""

from __future__ import annotations

import dataclasses
import string
from typing import Any

import pytest
from fhir.resources.bundle import Bundle
from fhir.resources.capabilitystatement import CapabilityStatement
from fhir.resources.documentreference import DocumentReference
from fhir.resources.endpoint import Endpoint
from fhir.resources.imagingstudy import ImagingStudy
from fhir.resources.operationoutcome import OperationOutcome

from anim import fhir
from anim.studyinfo import InstanceInfo, SeriesInfo, StudyInfo, derived_uid

WADO = "https://archive.example/dicom-web"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def study(**change: Any) -> StudyInfo:
    ct = SeriesInfo("1.2.826.0.1.3680043.9.1.2", 2, "CT", "Axial 1mm", "CHEST", (
        InstanceInfo("1.2.826.0.1.3680043.9.1.2.1", CT_IMAGE, 1, None, "1.2.840.10008.1.2.1"),
        InstanceInfo("1.2.826.0.1.3680043.9.1.2.2", CT_IMAGE, 2, None, "1.2.840.10008.1.2.1"),
    ))
    # a negative Series/Instance Number (IS allows it) cannot be a FHIR unsignedInt
    sr = SeriesInfo("1.2.826.0.1.3680043.9.1.3", -1, "SR", "", "", (
        InstanceInfo("1.2.826.0.1.3680043.9.1.3.1", BASIC_SR, None, None,
                     "1.2.840.10008.1.2.1"),
    ))
    info = StudyInfo(
        study_uid="1.2.826.0.1.3680043.9.1", accession_number="ACC-7", study_id="S1",
        study_date="20240310", study_time="081500.25", description="CT chest",
        referring_physician="SMITH^ANN^^DR", modalities=("CT", "SR"),
        patient_id="P-001", issuer="HOSP-A", patient_name="DOE^JOHN",
        birth_date="19700101", sex="M", updated_at="2024-03-10T08:20:00.123456+00:00",
        series=(ct, sr))
    return dataclasses.replace(info, **change)


def _doc(info: StudyInfo, **kw: str) -> dict[str, Any]:
    args = {"manifest_sop_uid": "2.25.11", "manifest_series_uid": "2.25.12",
            "kos_url": "https://archive.example/hcm/studies/x/manifest",
            "imaging_study_url": f"https://archive.example/fhir/ImagingStudy/{info.study_uid}",
            "wado_root": WADO, **kw}
    return fhir.document_reference(info, **args)


# ---- ImagingStudy ---------------------------------------------------------------------


def test_imaging_study_is_valid_r4_and_mirrors_the_study() -> None:
    info = study()
    d = fhir.imaging_study(info, wado_root=WADO)
    ImagingStudy.parse_obj(d)
    assert d["id"] == info.study_uid
    assert d["status"] == "available"
    uid_id, acsn = d["identifier"]
    assert (uid_id["system"], uid_id["value"]) == ("urn:dicom:uid", f"urn:oid:{info.study_uid}")
    assert acsn["value"] == "ACC-7"
    assert {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN",
            "display": "Accession ID"} in acsn["type"]["coding"]
    assert d["subject"] == {"type": "Patient", "display": "JOHN DOE",
                            "identifier": {"system": "urn:anim:issuer:HOSP-A",
                                           "value": "P-001"}}
    assert d["started"] == "2024-03-10"  # no zone known: the date only
    assert d["referrer"] == {"display": "DR ANN SMITH"}
    # SR is not an acquisition modality (FHIR R4 ImagingStudy.modality, CID 29)
    assert [m["code"] for m in d["modality"]] == ["CT"]
    assert (d["numberOfSeries"], d["numberOfInstances"]) == (2, 3)
    assert d["endpoint"][0]["reference"] == "Endpoint/dicomweb"
    ct, sr = d["series"]
    assert ct["uid"] == info.series[0].series_uid
    assert ct["number"] == 2
    assert ct["modality"]["system"] == "http://dicom.nema.org/resources/ontology/DCM"
    assert ct["bodySite"] == {"display": "CHEST"}
    assert [i["uid"] for i in ct["instance"]] == [i.sop_uid for i in info.series[0].instances]
    assert ct["instance"][0]["sopClass"] == {"system": "urn:ietf:rfc:3986",
                                             "code": f"urn:oid:{CT_IMAGE}"}
    assert "number" not in sr
    assert "number" not in sr["instance"][0]
    assert sr["modality"]["code"] == "SR"
    assert sr["endpoint"] == ct["endpoint"] == d["endpoint"]


def test_imaging_study_leaves_out_what_is_unknown() -> None:
    d = fhir.imaging_study(study(study_date="", study_time="", accession_number="",
                                 description="", referring_physician="", patient_name="",
                                 issuer="", updated_at=""), wado_root=WADO)
    ImagingStudy.parse_obj(d)
    assert "started" not in d
    assert "referrer" not in d
    assert "description" not in d
    assert "meta" not in d
    assert len(d["identifier"]) == 1
    assert d["subject"] == {"type": "Patient", "identifier": {"system": "urn:anim:issuer:",
                                                               "value": "P-001"}}


def test_a_uid_that_is_no_fhir_id_gets_no_id() -> None:
    d = fhir.imaging_study(study(study_uid="1." + "2" * 70), wado_root=WADO)
    ImagingStudy.parse_obj(d)
    assert "id" not in d


# ---- Endpoint, DocumentReference --------------------------------------------------------


def test_endpoint_is_the_wado_rs_root() -> None:
    d = fhir.endpoint(WADO)
    Endpoint.parse_obj(d)
    assert d["id"] == "dicomweb"
    assert d["address"] == WADO
    assert d["connectionType"]["code"] == "dicom-wado-rs"
    assert d["connectionType"]["system"] == (
        "http://terminology.hl7.org/CodeSystem/endpoint-connection-type")
    assert d["payloadType"]
    assert "application/dicom" in d["payloadMimeType"]


def test_document_reference_is_the_mado_manifest() -> None:
    info = study()
    d = _doc(info)
    DocumentReference.parse_obj(d)
    assert d["id"] == "2.25.11"
    assert d["status"] == "current"
    assert d["type"]["coding"][0]["system"] == "http://loinc.org"
    assert d["type"]["coding"][0]["code"] == "18748-4"
    assert d["masterIdentifier"] == {"system": "urn:ietf:rfc:3986", "value": "urn:oid:2.25.11"}
    assert d["masterIdentifier"] in d["identifier"]  # MADO mado-docref-1
    assert d["subject"]["identifier"] == {"system": "urn:anim:issuer:HOSP-A",
                                          "value": "P-001"}
    kos, fhir_json = d["content"]
    assert kos["attachment"]["contentType"] == "application/dicom"
    assert kos["attachment"]["url"] == "https://archive.example/hcm/studies/x/manifest"
    assert kos["format"]["code"] == "1.2.840.10008.5.1.4.1.1.88.59"
    assert fhir_json["attachment"]["contentType"] == "application/fhir+json"
    assert fhir_json["attachment"]["url"].endswith(f"/fhir/ImagingStudy/{info.study_uid}")
    ctx = d["context"]
    assert ctx["period"] == {"start": "2024-03-10"}
    assert ctx["related"][0] == {"reference": fhir_json["attachment"]["url"],
                                 "type": "ImagingStudy"}
    uid_ref, acsn_ref = ctx["related"][1]["identifier"], ctx["related"][2]["identifier"]
    assert uid_ref["value"] == f"urn:oid:{info.study_uid}"
    assert uid_ref["type"]["coding"][0]["code"] == "110180"  # MADO study-instance-uid
    assert acsn_ref["value"] == "ACC-7"
    assert {c["code"] for c in acsn_ref["type"]["coding"]} == {"ACSN", "121022"}
    modalities = [e["valueCodeableConcept"]["coding"][0]["code"] for e in d["extension"]]
    assert modalities == ["CT", "SR"]


def test_document_reference_without_kos_url_points_at_the_stored_kos() -> None:
    info = study(accession_number="", study_date="")
    d = _doc(info, kos_url="")
    DocumentReference.parse_obj(d)
    assert d["content"][0]["attachment"]["url"] == (
        f"{WADO}/studies/{info.study_uid}/series/2.25.12/instances/2.25.11")
    assert "period" not in d["context"]
    assert len(d["context"]["related"]) == 2


def test_manifest_uids_are_the_kos_sides() -> None:
    from web.fhir import _manifest_uids

    info = study()
    sop, series = _manifest_uids(info)
    assert sop == derived_uid("anim-manifest", info.study_uid, info.fingerprint)
    assert series == derived_uid("anim-manifest-series", info.study_uid)
    import anim.manifest as manifest
    uids = manifest.manifest_uids(info)
    assert (uids.sop_uid, uids.series_uid) == (sop, series)


# ---- Bundle, OperationOutcome, CapabilityStatement -------------------------------------


def test_searchset_marks_matches_and_includes() -> None:
    d = fhir.searchset([fhir.imaging_study(study(), wado_root=WADO)],
                       base="https://archive.example/fhir",
                       self_url="https://archive.example/fhir/ImagingStudy?_id=1",
                       total=None, next_url="https://archive.example/fhir/ImagingStudy?x",
                       included=[fhir.endpoint(WADO)])
    Bundle.parse_obj(d)
    assert d["type"] == "searchset"
    assert "total" not in d
    assert [(link["relation"]) for link in d["link"]] == ["self", "next"]
    match, include = d["entry"]
    assert match["fullUrl"] == (
        f"https://archive.example/fhir/ImagingStudy/{study().study_uid}")
    assert match["search"] == {"mode": "match"}
    assert include["fullUrl"] == "https://archive.example/fhir/Endpoint/dicomweb"
    assert include["search"] == {"mode": "include"}


def test_empty_searchset_has_a_total() -> None:
    d = fhir.searchset([], base="b", self_url="https://x/fhir/ImagingStudy?a=b", total=0,
                       next_url=None)
    Bundle.parse_obj(d)
    assert d["total"] == 0
    assert "entry" not in d


def test_operation_outcome_and_capability_statement_are_valid() -> None:
    oo = fhir.operation_outcome("error", "not-found", "no such study")
    OperationOutcome.parse_obj(oo)
    assert oo["issue"][0]["diagnostics"] == "no such study"
    cs = fhir.capability_statement(
        "https://archive.example/fhir", version="0.1.0",
        imaging_study_params=(("identifier", "token", "the study"),),
        document_reference_params=(("study", "token", "the study"),))
    CapabilityStatement.parse_obj(cs)
    assert cs["fhirVersion"] == "4.0.1"
    types = {r["type"]: r for r in cs["rest"][0]["resource"]}
    assert set(types) == {"ImagingStudy", "Endpoint", "DocumentReference"}
    assert types["ImagingStudy"]["searchInclude"] == ["ImagingStudy:endpoint"]


# ---- IssuerOfPatientID ↔ Identifier.system ----------------------------------------------


@pytest.mark.parametrize(("issuer", "system"), [
    ("1.2.250.1.71.4.2.1", "urn:oid:1.2.250.1.71.4.2.1"),
    ("2.25.12345", "urn:oid:2.25.12345"),
    ("http://hospital.example/ids", "http://hospital.example/ids"),
    ("urn:uuid:0b1e2f6a-7c41-4f4e-9c52-3a2b1c0d9e8f",
     "urn:uuid:0b1e2f6a-7c41-4f4e-9c52-3a2b1c0d9e8f"),
    ("HOSP-A", "urn:anim:issuer:HOSP-A"),
    ("CHL PACS/2", "urn:anim:issuer:CHL%20PACS%2F2"),
    ("CHL:PACS", "urn:anim:issuer:CHL%3APACS"),  # a colon alone does not make a URI
    ("01.2", "urn:anim:issuer:01.2"),  # leading zero: not an OID
    ("", "urn:anim:issuer:"),
    # URIs that would read back as something else are encoded as names
    ("urn:oid:1.2.3", "urn:anim:issuer:urn%3Aoid%3A1.2.3"),
    ("urn:anim:issuer:X", "urn:anim:issuer:urn%3Aanim%3Aissuer%3AX"),
])
def test_patient_system(issuer: str, system: str) -> None:
    assert fhir.patient_system(issuer) == system
    assert fhir.issuer_of_system(system) == issuer


def test_issuer_round_trips_for_any_text() -> None:
    alphabet = string.ascii_letters + string.digits + " .:/%^-_~é|\\*?"
    samples = ["", "é", "%41", "a%2", "1.2.3 ", " 1.2.3", "urn:", "http://", "http://a b"]
    samples += [alphabet[i:i + n] for i in range(len(alphabet)) for n in (1, 3, 7)]
    for issuer in samples:
        system = fhir.patient_system(issuer)
        assert fhir.issuer_of_system(system) == issuer, issuer
        assert " " not in system


def test_foreign_systems_are_read_as_issuers() -> None:
    assert fhir.issuer_of_system("urn:oid:1.2.3") == "1.2.3"
    assert fhir.issuer_of_system("https://ids.example/mrn") == "https://ids.example/mrn"


# ---- DICOM dates and names ---------------------------------------------------------------


@pytest.mark.parametrize(("da", "expected"), [
    ("20240310", "2024-03-10"), ("2024.03.10", "2024-03-10"), ("", None),
    ("20241310", None), ("20240230", None), ("2024031", None), ("abcdefgh", None),
])
def test_fhir_date(da: str, expected: str | None) -> None:
    assert fhir.fhir_date(da) == expected


@pytest.mark.parametrize(("da", "tm", "tz", "expected"), [
    ("20240310", "081500", "", "2024-03-10"),  # no zone: date only (R4 dateTime)
    ("20240310", "", "+0100", "2024-03-10"),
    ("20240310", "081500", "+0100", "2024-03-10T08:15:00+01:00"),
    ("20240310", "081500.123", "-0500", "2024-03-10T08:15:00.123-05:00"),
    ("20240310", "08", "+0000", "2024-03-10T08:00:00+00:00"),
    ("20240310", "0815", "+0000", "2024-03-10T08:15:00+00:00"),
    ("20240310", "08:15:00", "+0000", "2024-03-10T08:15:00+00:00"),
    ("20240310", "251500", "+0000", "2024-03-10"),  # bad time: the date still holds
    ("20240310", "081500", "+1500", "2024-03-10"),  # no such offset
    ("", "081500", "+0100", None),
])
def test_fhir_datetime(da: str, tm: str, tz: str, expected: str | None) -> None:
    got = fhir.fhir_datetime(da, tm, tz)
    assert got == expected
    if got:  # the FHIR R4 dateTime pattern, as the model checks it
        ImagingStudy.parse_obj({"resourceType": "ImagingStudy", "status": "available",
                                "subject": {"display": "x"}, "started": got})


def test_fhir_instant() -> None:
    assert fhir.fhir_instant("2024-03-10T08:20:00.123456+00:00") == (
        "2024-03-10T08:20:00.123+00:00")
    assert fhir.fhir_instant("2024-03-10T08:20:00") == "2024-03-10T08:20:00.000+00:00"
    assert fhir.fhir_instant("") is None
    assert fhir.fhir_instant("yesterday") is None


@pytest.mark.parametrize(("pn", "display"), [
    ("DOE^JOHN", "JOHN DOE"), ("DOE", "DOE"), ("DOE^JOHN^Q^DR^JR", "DR JOHN Q DOE JR"),
    ("Yamada^Tarou=山田^太郎", "Tarou Yamada"), ("", ""), ("^^^", ""),
])
def test_person_name(pn: str, display: str) -> None:
    assert fhir.person_name(pn) == display


# ---- search parameters (web/fhir.py), as the query engine will see them ------------------


def _criteria(apply: Any, raw: str) -> Any:
    from web.fhir import Criteria

    c = Criteria()
    apply(c, "p", raw)
    return c


def test_patient_tokens_become_issuer_and_patient_id() -> None:
    from web.fhir import _patient

    c = _criteria(_patient, "urn:anim:issuer:HOSP-A|P\\|1")  # \\| is an escaped pipe
    assert c.match == {"PatientID": "P|1", "IssuerOfPatientID": "HOSP-A"}
    assert _criteria(_patient, "urn:oid:1.2.3|P1").match["IssuerOfPatientID"] == "1.2.3"
    assert _criteria(_patient, "P1").match == {"PatientID": "P1"}  # any issuer
    assert _criteria(_patient, "|P1").nothing  # no identifier here lacks a system
    no_issuer = _criteria(_patient, "urn:anim:issuer:|P1")
    assert (no_issuer.match, no_issuer.no_issuer) == ({"PatientID": "P1"}, True)


def test_study_identifier_tokens() -> None:
    from web.fhir import _study_identifier, _study_identifier_of_type

    uid = {"StudyInstanceUID": "1.2.3"}
    assert _criteria(_study_identifier, "urn:oid:1.2.3").match == uid
    assert _criteria(_study_identifier, "urn:dicom:uid|urn:oid:1.2.3").match == uid
    assert _criteria(_study_identifier, "urn:dicom:uid|1.2.3").match == uid  # MADO style
    assert _criteria(_study_identifier, "A7").match == {"AccessionNumber": "A7"}
    assert _criteria(_study_identifier, "|A7").match == {"AccessionNumber": "A7"}
    assert _criteria(_study_identifier, "http://acc.example|A7").nothing
    of_type = _criteria(_study_identifier_of_type,
                        "http://terminology.hl7.org/CodeSystem/v2-0203|ACSN|A7")
    assert of_type.match == {"AccessionNumber": "A7"}


@pytest.mark.parametrize(("raw", "reason"), [
    ("A,B", "one value"), ("A*", "exact"), ("A?", "exact"), ("a|b|c", "too many"),
    ("urn:oid:1.2.3|", "required"),
])
def test_tokens_the_engine_would_misread_are_refused(raw: str, reason: str) -> None:
    from web.fhir import FhirError, _patient

    with pytest.raises(FhirError, match=reason) as e:
        _criteria(_patient, raw)
    assert e.value.status == 400
