"""FHIR R4 under /fhir against a real archive: the samples are stored with DCMTK
storescu, then found by patient, Study Instance UID and accession, read, paged; every
resource is validated with fhir.resources (R4 4.0.1 models), every series and instance
is checked against the sample files, and the Endpoint resolves them on WADO-RS.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pydicom
import pytest
import requests
from fhir.resources.bundle import Bundle
from fhir.resources.capabilitystatement import CapabilityStatement
from fhir.resources.documentreference import DocumentReference
from fhir.resources.endpoint import Endpoint
from fhir.resources.imagingstudy import ImagingStudy
from fhir.resources.operationoutcome import OperationOutcome

from anim.fhir import patient_system
from tests.conftest import AnimServer, sample_files, storescu

MODELS = {"Bundle": Bundle, "CapabilityStatement": CapabilityStatement,
          "DocumentReference": DocumentReference, "Endpoint": Endpoint,
          "ImagingStudy": ImagingStudy, "OperationOutcome": OperationOutcome}
ACSN = "http://terminology.hl7.org/CodeSystem/v2-0203|ACSN"


@dataclass
class Sample:
    """One study of the sample files, as pydicom reads it."""

    uid: str
    patient_id: str
    issuer: str
    accession: str
    # series UID → {SOP Instance UID: (SOP Class UID, Instance Number)}
    series: dict[str, dict[str, tuple[str, int]]] = field(default_factory=dict)


def _samples() -> dict[str, Sample]:
    studies: dict[str, Sample] = {}
    for path in sample_files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        s = studies.setdefault(ds.StudyInstanceUID, Sample(
            ds.StudyInstanceUID, ds.PatientID, ds.get("IssuerOfPatientID", ""),
            ds.get("AccessionNumber", "")))
        s.series.setdefault(ds.SeriesInstanceUID, {})[ds.SOPInstanceUID] = (
            ds.SOPClassUID, int(ds.InstanceNumber))
    return studies


SAMPLES = _samples()


@pytest.fixture
def archive(serve: AnimServer) -> AnimServer:
    done = storescu(serve.dimse_port, *sample_files())
    assert done.returncode == 0, done.stderr
    return serve


def _get(srv: AnimServer, path: str, **params: str) -> requests.Response:
    return requests.get(f"{srv.url}{path}", params=params, timeout=30)


def _fhir(r: requests.Response, status: int = 200) -> dict[str, Any]:
    """The body of a FHIR answer, checked: status, media type, a valid R4 resource."""
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/fhir+json"), r.headers
    body = r.json()
    MODELS[body["resourceType"]].parse_obj(body)
    for entry in body.get("entry", []):
        MODELS[entry["resource"]["resourceType"]].parse_obj(entry["resource"])
    return body


def _search(srv: AnimServer, kind: str, **params: str) -> dict[str, Any]:
    bundle = _fhir(_get(srv, f"/fhir/{kind}", **params))
    assert bundle["type"] == "searchset"
    return bundle


def _matches(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _ids(bundle: dict[str, Any]) -> set[str]:
    return {r["id"] for r in _matches(bundle)}


def _outcome(r: requests.Response, status: int) -> str:
    body = _fhir(r, status)
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["diagnostics"])


def test_search_by_patient_identifier(archive: AnimServer) -> None:
    by_patient: dict[tuple[str, str], set[str]] = defaultdict(set)
    for s in SAMPLES.values():
        by_patient[(s.issuer, s.patient_id)].add(s.uid)
    assert max(len(v) for v in by_patient.values()) > 1  # a patient with two studies
    for (issuer, pid), uids in by_patient.items():
        token = f"{patient_system(issuer)}|{pid}"
        bundle = _search(archive, "ImagingStudy", **{"patient.identifier": token})
        assert _ids(bundle) == uids
        assert bundle["total"] == len(uids)
        for study in _matches(bundle):
            assert study["subject"]["identifier"] == {"system": patient_system(issuer),
                                                      "value": pid}
        # the R4 :identifier modifier, and the value alone (any issuer), say the same
        assert _ids(_search(archive, "ImagingStudy", **{"patient:identifier": token})) == uids
        assert _ids(_search(archive, "ImagingStudy", **{"patient.identifier": pid})) == uids
    # the same PatientID under another issuer is another patient
    (issuer, pid), _uids = next(iter(by_patient.items()))
    other = _search(archive, "ImagingStudy",
                    **{"patient.identifier": f"{patient_system(issuer + 'X')}|{pid}"})
    assert other["total"] == 0
    assert "entry" not in other


def test_search_by_study_uid_and_accession(archive: AnimServer) -> None:
    for s in SAMPLES.values():
        for params in ({"identifier": f"urn:oid:{s.uid}"},
                       {"identifier": f"urn:dicom:uid|urn:oid:{s.uid}"},
                       {"_id": s.uid},
                       {"identifier": s.accession},
                       {"identifier": f"|{s.accession}"},
                       {"identifier:of-type": f"{ACSN}|{s.accession}"}):
            bundle = _search(archive, "ImagingStudy", **params)
            assert _ids(bundle) == {s.uid}, params
            assert bundle["total"] == 1
    unknown = _search(archive, "ImagingStudy", identifier="urn:oid:1.2.3.999999")
    assert unknown["total"] == 0


def test_imaging_study_matches_the_archive_and_resolves_on_wado_rs(
        archive: AnimServer) -> None:
    address = _fhir(_get(archive, "/fhir/Endpoint/dicomweb"))["address"]
    assert address == f"{archive.url}/dicom-web"
    for s in SAMPLES.values():
        study = _fhir(_get(archive, f"/fhir/ImagingStudy/{s.uid}"))
        assert study["id"] == s.uid
        assert study["numberOfSeries"] == len(s.series)
        assert study["numberOfInstances"] == sum(len(i) for i in s.series.values())
        held = {se["uid"]: {i["uid"]: (i["sopClass"]["code"].removeprefix("urn:oid:"),
                                       i["number"]) for i in se["instance"]}
                for se in study["series"]}
        assert held == s.series
        for se in study["series"]:
            assert se["numberOfInstances"] == len(se["instance"])
            assert se["endpoint"] == [{"reference": "Endpoint/dicomweb",
                                       "display": f"DICOMweb {address}"}]
            for inst in se["instance"]:
                url = f"{address}/studies/{s.uid}/series/{se['uid']}/instances/{inst['uid']}"
                r = requests.get(f"{url}/metadata", timeout=30,
                                 headers={"Accept": "application/dicom+json"})
                assert r.status_code == 200, url
                assert r.json()[0]["00080018"]["Value"] == [inst["uid"]]


def test_paging_with_next_links_and_the_included_endpoint(archive: AnimServer) -> None:
    s = next(s for s in SAMPLES.values()
             if sum(o.patient_id == s.patient_id for o in SAMPLES.values()) > 1)
    token = f"{patient_system(s.issuer)}|{s.patient_id}"
    first = _search(archive, "ImagingStudy", _count="1", _include="ImagingStudy:endpoint",
                    **{"patient.identifier": token})
    assert len(_matches(first)) == 1
    assert "total" not in first  # not known without counting: more pages follow
    links = {link["relation"]: link["url"] for link in first["link"]}
    included = [e for e in first["entry"] if e["search"]["mode"] == "include"]
    assert [e["resource"]["id"] for e in included] == ["dicomweb"]
    assert included[0]["fullUrl"] == f"{archive.url}/fhir/Endpoint/dicomweb"
    assert included[0]["resource"]["address"] == f"{archive.url}/dicom-web"
    second = _fhir(requests.get(links["next"], timeout=30))
    assert len(_matches(second)) == 1
    assert second["total"] == 2
    assert "next" not in {link["relation"] for link in second["link"]}
    assert _ids(first) | _ids(second) == {o.uid for o in SAMPLES.values()
                                          if o.patient_id == s.patient_id}
    match = first["entry"][0]
    assert match["fullUrl"] == f"{archive.url}/fhir/ImagingStudy/{match['resource']['id']}"


def test_document_reference_names_the_kos_it_serves(archive: AnimServer) -> None:
    s = next(iter(SAMPLES.values()))
    for params in ({"study": s.uid}, {"study-instance-uid": f"urn:dicom:uid|urn:oid:{s.uid}"},
                   {"accession-number": s.accession, "status": "current"},
                   {"patient.identifier": f"{patient_system(s.issuer)}|{s.patient_id}"}):
        bundle = _search(archive, "DocumentReference", **params)
        docs = [d for d in _matches(bundle)
                if d["context"]["related"][1]["identifier"]["value"] == f"urn:oid:{s.uid}"]
        assert len(docs) == 1, params
    doc = docs[0]
    kos_part, study_part = doc["content"]
    r = requests.get(kos_part["attachment"]["url"], timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("application/dicom")
    kos = pydicom.dcmread(io.BytesIO(r.content))
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert kos.SOPInstanceUID == doc["id"]
    assert doc["masterIdentifier"]["value"] == f"urn:oid:{kos.SOPInstanceUID}"
    assert kos.StudyInstanceUID == s.uid
    study = _fhir(requests.get(study_part["attachment"]["url"], timeout=30))
    assert study["id"] == s.uid
    assert doc["context"]["related"][0]["reference"] == study_part["attachment"]["url"]
    assert _search(archive, "DocumentReference", study=s.uid, status="superseded")["total"] == 0


def test_errors_are_operation_outcomes(archive: AnimServer) -> None:
    s = next(iter(SAMPLES.values()))
    assert "not known" in _outcome(_get(archive, "/fhir/ImagingStudy/1.2.3.999"), 404)
    assert "foo" in _outcome(_get(archive, "/fhir/ImagingStudy", foo="1"), 400)
    assert "criterion" in _outcome(_get(archive, "/fhir/ImagingStudy"), 400)
    assert "criterion" in _outcome(_get(archive, "/fhir/ImagingStudy", _count="5"), 400)
    assert "one value" in _outcome(
        _get(archive, "/fhir/ImagingStudy", identifier=f"{s.accession},X"), 400)
    assert "exact" in _outcome(_get(archive, "/fhir/ImagingStudy", identifier="ACC*"), 400)
    assert "_count" in _outcome(
        _get(archive, "/fhir/ImagingStudy", identifier=s.accession, _count="0"), 400)
    assert "JSON" in _outcome(
        _get(archive, "/fhir/ImagingStudy", identifier=s.accession, _format="xml"), 406)
    r = requests.get(f"{archive.url}/fhir/metadata", timeout=30,
                     headers={"Accept": "application/fhir+xml"})
    assert "JSON" in _outcome(r, 406)
    r = requests.post(f"{archive.url}/fhir/ImagingStudy", json={}, timeout=30)
    assert "read-only" in _outcome(r, 405)
    assert _outcome(_get(archive, "/fhir/Patient/1"), 404)
    assert _outcome(_get(archive, "/fhir/Endpoint/other"), 404)
    # _format=json is honoured whatever the Accept header says
    r = requests.get(f"{archive.url}/fhir/ImagingStudy/{s.uid}", params={"_format": "json"},
                     headers={"Accept": "text/html"}, timeout=30)
    assert _fhir(r)["id"] == s.uid


def test_metadata_is_a_capability_statement(serve: AnimServer) -> None:
    cs = _fhir(_get(serve, "/fhir/metadata"))
    assert cs["resourceType"] == "CapabilityStatement"
    assert cs["fhirVersion"] == "4.0.1"
    assert cs["implementation"]["url"] == f"{serve.url}/fhir"
    resources = {r["type"]: r for r in cs["rest"][0]["resource"]}
    params = {p["name"] for p in resources["ImagingStudy"]["searchParam"]}
    assert {"_id", "identifier", "patient", "_count", "_offset"} <= params
