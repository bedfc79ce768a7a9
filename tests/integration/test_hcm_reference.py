"""Study references, KOS manifests and the MADO pair against a running archive:
DCMTK storescu stores, the manifest is read back with pydicom and highdicom, the FHIR
side is validated with fhir.resources (R4), and every URL is followed."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from fhir.resources.documentreference import DocumentReference
from fhir.resources.imagingstudy import ImagingStudy
from pydicom import dcmread

from anim.manifest import referenced_instances
from tests.conftest import SAMPLES, AnimServer, storescu
from tests.integration.hcm_helpers import feed, wait_for

STUDY = SAMPLES / "SYN0003" / "study1"


def held(folder: Path) -> dict[str, Any]:
    """What the sample files say the study is."""
    files = [dcmread(p, stop_before_pixels=True) for p in sorted(folder.rglob("*.dcm"))]
    first = files[0]
    return {
        "study": str(first.StudyInstanceUID),
        "refs": {(str(d.StudyInstanceUID), str(d.SeriesInstanceUID), str(d.SOPInstanceUID))
                 for d in files},
        "series": {str(d.SeriesInstanceUID) for d in files},
        "accession": str(first.get("AccessionNumber", "")),
        "patient": (str(first.PatientID), str(first.get("IssuerOfPatientID", ""))),
        "date": str(first.get("StudyDate", "")),
        "modalities": sorted({str(d.Modality) for d in files}),
    }


@pytest.fixture
def stored(serve: AnimServer) -> tuple[AnimServer, dict[str, Any]]:
    done = storescu(serve.dimse_port, STUDY, calling="MODALITY1")
    assert done.returncode == 0, done.stderr
    return serve, held(STUDY)


def get(url: str, **kw: Any) -> requests.Response:
    r = requests.get(url, timeout=30, **kw)
    assert r.status_code == 200, (url, r.status_code, r.text[:200])
    return r


def test_reference_says_what_a_registry_needs_and_its_links_resolve(
        stored: tuple[AnimServer, dict[str, Any]]) -> None:
    srv, want = stored
    ref = get(f"{srv.url}/hcm/studies/{want['study']}/reference").json()
    assert ref["study_uid"] == want["study"]
    assert ref["accession_number"] == want["accession"]
    assert (ref["patient"]["id"], ref["patient"]["issuer"]) == want["patient"]
    assert ref["study_date"] == want["date"]
    assert ref["modalities"] == want["modalities"]
    assert (ref["num_series"], ref["num_instances"]) == (len(want["series"]), len(want["refs"]))
    assert ref["state"] == "receiving"  # the default quiet period (60 s) has not passed
    assert len(get(ref["wado_rs"] + "/metadata").json()) == len(want["refs"])
    assert "text/html" in get(ref["viewer"]).headers["Content-Type"]
    study = get(ref["fhir_imaging_study"]).json()
    assert ImagingStudy.parse_obj(study).id == want["study"]
    assert ref["manifest"]["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.88.59"
    kos = dcmread(io.BytesIO(get(ref["manifest"]["url"]).content))
    assert kos.SOPInstanceUID == ref["manifest"]["sop_instance_uid"]
    assert kos.SeriesInstanceUID == ref["manifest"]["series_instance_uid"]
    bundle = get(ref["fhir_document_reference"]).json()
    assert bundle["entry"][0]["resource"]["masterIdentifier"]["value"] == (
        "urn:oid:" + ref["manifest"]["sop_instance_uid"])
    missing = requests.get(f"{srv.url}/hcm/studies/1.2.3.4/reference", timeout=30)
    assert missing.status_code == 404
    assert missing.json()["reason"]


def test_manifest_is_a_kos_of_exactly_the_study_with_retrieve_urls_that_resolve(
        stored: tuple[AnimServer, dict[str, Any]]) -> None:
    srv, want = stored
    r = get(f"{srv.url}/hcm/studies/{want['study']}/manifest")
    assert r.headers["Content-Type"] == "application/dicom"
    kos = dcmread(io.BytesIO(r.content))
    doc = hd.ko.KeyObjectSelectionDocument.from_dataset(kos)
    assert doc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert doc.ConceptNameCodeSequence[0].CodeValue == "113030"  # document title: Manifest
    assert referenced_instances(kos) == want["refs"]
    evidence = kos.CurrentRequestedProcedureEvidenceSequence[0]
    urls = []
    for item in evidence.ReferencedSeriesSequence:
        assert item.RetrieveAETitle == srv.aet
        (loc,) = item.WADORSRetrievalSequence
        urls.append(loc.RetrieveURL)
        listed = {i.ReferencedSOPInstanceUID for i in item.ReferencedSOPSequence}
        meta = get(loc.RetrieveURL + "/metadata").json()
        assert {m["00080018"]["Value"][0] for m in meta} == listed
    assert len(urls) == len(want["series"])
    # the same manifest again: same bytes (reproducible), and a conditional GET
    again = get(f"{srv.url}/hcm/studies/{want['study']}/manifest")
    assert again.content == r.content
    cond = requests.get(f"{srv.url}/hcm/studies/{want['study']}/manifest", timeout=30,
                        headers={"If-None-Match": r.headers["ETag"]})
    assert cond.status_code == 304
    as_json = get(f"{srv.url}/hcm/studies/{want['study']}/manifest",
                  headers={"Accept": "application/dicom+json"}).json()
    assert as_json["00080018"]["Value"] == [kos.SOPInstanceUID]


def test_mado_pair_document_reference_links_the_kos_and_the_imaging_study(
        stored: tuple[AnimServer, dict[str, Any]]) -> None:
    srv, want = stored
    bundle = get(f"{srv.url}/fhir/DocumentReference", params={"study": want["study"]}).json()
    (entry,) = bundle["entry"]
    doc = DocumentReference.parse_obj(entry["resource"])
    assert doc.type.coding[0].system == "http://loinc.org"
    assert doc.type.coding[0].code == "18748-4"
    by_type = {c.attachment.contentType: c.attachment.url for c in doc.content}
    kos = dcmread(io.BytesIO(get(by_type["application/dicom"]).content))
    assert doc.masterIdentifier.value == "urn:oid:" + kos.SOPInstanceUID
    assert referenced_instances(kos) == want["refs"]
    study = ImagingStudy.parse_obj(get(by_type["application/fhir+json"]).json())
    assert {(want["study"], s.uid, i.uid) for s in study.series for i in s.instance} == (
        want["refs"])


def test_stored_manifest_is_served_by_wado_rs_and_replaced_after_a_correction(
        make_server: type[AnimServer], tmp_path: Path) -> None:
    env = {"ANIM_HCM_STABLE_AFTER": "1", "ANIM_HCM_STORE_MANIFEST": "true"}
    srv = make_server(tmp_path / "data", env=env).start()
    want = held(STUDY)
    assert storescu(srv.dimse_port, STUDY, calling="MODALITY1").returncode == 0
    uid = want["study"]

    def manifest_in_archive() -> Any:
        ref = get(f"{srv.url}/hcm/studies/{uid}/reference").json()
        rows = get(f"{srv.url}/dicom-web/studies/{uid}/series",
                   params={"Modality": "KO"}).json()
        return ref["state"] == "stable" and rows and ref

    ref = wait_for("the stored manifest", manifest_in_archive)
    m = ref["manifest"]
    client = DICOMwebClient(f"{srv.url}/dicom-web")
    kos = client.retrieve_instance(uid, m["series_instance_uid"], m["sop_instance_uid"])
    assert referenced_instances(kos) == want["refs"]  # lists the study, not itself

    # a correction: a new manifest replaces the old one, and the study settles once
    src = sorted(STUDY.rglob("*.dcm"))[0]
    ds = dcmread(src)
    ds.SeriesDescription = "RELABELLED"
    (tmp_path / "fix").mkdir()
    ds.save_as(tmp_path / "fix" / "x.dcm")
    assert storescu(srv.dimse_port, tmp_path / "fix", calling="MODALITY1").returncode == 0
    wait_for("study_updated", lambda: any(
        e["kind"] == "study_updated" for e in feed(srv.url)))
    wait_for("the new manifest", lambda: get(
        f"{srv.url}/hcm/studies/{uid}/reference").json()["manifest"]["sop_instance_uid"]
        != m["sop_instance_uid"])
    time.sleep(3)  # storing manifests must not start another round of stability
    kinds = [e["kind"] for e in feed(srv.url) if e["study_uid"] == uid]
    assert kinds.count("study_stable") == 1
    assert kinds.count("study_updated") == 1
    new = get(f"{srv.url}/hcm/studies/{uid}/reference").json()
    assert new["state"] == "stable"
    held_manifests = client.search_for_instances(
        uid, m["series_instance_uid"])
    assert [i["00080018"]["Value"][0] for i in held_manifests] == [
        new["manifest"]["sop_instance_uid"]]
