"""The XDS-I.b / MADO KOS manifest: content, retrieve locations, reproducibility, and that
pydicom, highdicom and DCMTK's dcmdump all read the Part 10 bytes back."""

from __future__ import annotations

import dataclasses
import io
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import pydicom
import pytest
from highdicom.ko import KeyObjectSelectionDocument
from pydicom.uid import UID, ExplicitVRLittleEndian

from anim.manifest import (
    KOS_SOP_CLASS,
    build_kos,
    kos_part10,
    manifest_uids,
    referenced_instances,
)
from anim.studyinfo import InstanceInfo, SeriesInfo, StudyInfo, derived_uid
from tests.conftest import dcmtk

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"  # multi-frame
BASIC_SR = "1.2.840.10008.5.1.4.1.1.88.11"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
PRIVATE = "1.3.6.1.4.1.99999.1.1"  # a vendor's private SOP class
EVRLE = "1.2.840.10008.1.2.1"
ROOT = "http://archive.example:8042/dicom-web"
AET = "ANIM_NAT"
WHEN = datetime(2025, 3, 4, 5, 6, 7)
STUDY = "2.25.1001"


def _study(issuer: str = "LU-CNS", extra: tuple[InstanceInfo, ...] = ()) -> StudyInfo:
    ct = tuple(InstanceInfo(f"{STUDY}.1.{n}", CT, n, None, EVRLE) for n in (1, 2, 3)) + extra
    return StudyInfo(
        study_uid=STUDY, accession_number="ACC-42", study_id="S7", study_date="20250301",
        study_time="101500", description="CT Thorax", referring_physician="Weber^Anna",
        modalities=("CT", "SR", "OT"), patient_id="P-123", issuer=issuer,
        patient_name="Müller^Jean", birth_date="19610215", sex="F",
        updated_at="2025-03-01T10:20:00Z",
        series=(
            SeriesInfo(f"{STUDY}.1", 1, "CT", "Axial 1mm", "CHEST", ct),
            SeriesInfo(f"{STUDY}.2", 2, "CT", "Enhanced", "CHEST", (
                InstanceInfo(f"{STUDY}.2.1", ENHANCED_CT, 1, 120, EVRLE),)),
            SeriesInfo(f"{STUDY}.3", 3, "OT", "", "", (
                InstanceInfo(f"{STUDY}.3.1", BASIC_SR, 1, None, EVRLE),
                InstanceInfo(f"{STUDY}.3.2", PDF, 2, None, EVRLE),
                InstanceInfo(f"{STUDY}.3.3", PRIVATE, None, None, EVRLE))),
        ),
    )


def _kos(info: StudyInfo, when: datetime = WHEN) -> bytes:
    return kos_part10(build_kos(info, wado_root=ROOT, retrieve_aet=AET, content_time=when,
                                institution="ANIM Luxembourg"))


def _read(data: bytes) -> pydicom.FileDataset:
    return pydicom.dcmread(io.BytesIO(data))


def _instances(info: StudyInfo) -> set[tuple[str, str, str]]:
    return {(info.study_uid, s.series_uid, i.sop_uid) for s in info.series for i in s.instances}


def test_part10_reads_back_as_a_manifest_kos() -> None:
    data = _kos(_study())
    assert data[128:132] == b"DICM"
    ds = _read(data)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == KOS_SOP_CLASS == "1.2.840.10008.5.1.4.1.1.88.59"
    assert ds.Modality == "KO"
    title = ds.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113030", "DCM", "Manifest")
    kos = KeyObjectSelectionDocument.from_dataset(ds)
    assert len(kos.content.get_references()) == _study().num_instances
    assert kos.resolve_reference(f"{STUDY}.2.1") == (STUDY, f"{STUDY}.2", f"{STUDY}.2.1")


def test_references_exactly_the_studys_instances_with_their_classes() -> None:
    info = _study()
    ds = _read(_kos(info))
    assert referenced_instances(ds) == _instances(info)
    [study_item] = ds.CurrentRequestedProcedureEvidenceSequence
    classes = {r.ReferencedSOPInstanceUID: r.ReferencedSOPClassUID
               for s in study_item.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
    assert classes == {i.sop_uid: i.sop_class_uid for s in info.series for i in s.instances}
    # images become IMAGE references, everything else (SR, PDF, private) COMPOSITE
    kinds = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: item.ValueType
             for item in ds.ContentSequence if "ReferencedSOPSequence" in item}
    assert kinds[f"{STUDY}.1.1"] == kinds[f"{STUDY}.2.1"] == "IMAGE"
    assert {kinds[f"{STUDY}.3.{n}"] for n in (1, 2, 3)} == {"COMPOSITE"}


def test_new_or_removed_instance_gives_a_new_manifest_with_other_references() -> None:
    base = _study()
    added = _study(extra=(InstanceInfo(f"{STUDY}.1.4", CT, 4, None, EVRLE),))
    first = base.series[0]
    removed = dataclasses.replace(
        base, series=(dataclasses.replace(first, instances=first.instances[1:]),
                      *base.series[1:]))
    uids = {manifest_uids(i).sop_uid for i in (base, added, removed)}
    assert len(uids) == 3
    assert {manifest_uids(i).series_uid for i in (base, added, removed)} == {
        derived_uid("anim-manifest-series", STUDY)}
    assert manifest_uids(base).sop_uid == derived_uid("anim-manifest", STUDY, base.fingerprint)
    refs = {name: referenced_instances(_read(_kos(i)))
            for name, i in (("base", base), ("added", added), ("removed", removed))}
    assert refs["added"] - refs["base"] == {(STUDY, f"{STUDY}.1", f"{STUDY}.1.4")}
    assert refs["base"] - refs["removed"] == {(STUDY, f"{STUDY}.1", f"{STUDY}.1.1")}
    assert _read(_kos(added)).SOPInstanceUID == manifest_uids(added).sop_uid


def test_every_series_carries_retrieve_ae_location_and_wado_rs_url() -> None:
    ds = _read(_kos(_study()))
    [study_item] = ds.CurrentRequestedProcedureEvidenceSequence
    assert "RetrieveURL" not in study_item  # MADO: per series, not per study
    series_items = study_item.ReferencedSeriesSequence
    assert len(series_items) == 3
    for item in series_items:
        expected = f"{ROOT}/studies/{STUDY}/series/{item.SeriesInstanceUID}"
        assert item.RetrieveAETitle == AET
        assert item.RetrieveLocationUID == derived_uid("anim-retrieve-location", AET)
        assert UID(item.RetrieveLocationUID).is_valid
        [wado] = item.WADORSRetrievalSequence
        assert wado.RetrieveURL == item.RetrieveURL == expected
        url = urlsplit(wado.RetrieveURL)
        assert (url.scheme, url.netloc) == ("http", "archive.example:8042")
        assert url.path.split("/")[-4:] == ["studies", STUDY, "series", item.SeriesInstanceUID]


def test_same_content_and_time_gives_identical_bytes() -> None:
    info = _study()
    shuffled = dataclasses.replace(info, series=tuple(
        dataclasses.replace(s, instances=s.instances[::-1]) for s in info.series[::-1]))
    assert _kos(info) == _kos(info) == _kos(shuffled)
    assert _kos(info) != _kos(info, WHEN + timedelta(seconds=1))


def test_patient_study_and_manifest_attributes() -> None:
    info = _study()
    ds = _read(_kos(info))
    assert (ds.PatientID, ds.IssuerOfPatientID, str(ds.PatientName)) == (
        "P-123", "LU-CNS", "Müller^Jean")
    assert (ds.PatientBirthDate, ds.PatientSex) == ("19610215", "F")
    assert (ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime) == (STUDY, "20250301", "101500")
    assert (ds.AccessionNumber, ds.StudyID, ds.StudyDescription) == ("ACC-42", "S7", "CT Thorax")
    assert str(ds.ReferringPhysicianName) == "Weber^Anna"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    uids = manifest_uids(info)
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (uids.series_uid, uids.sop_uid)
    assert (ds.SeriesNumber, ds.InstanceNumber) == (9999, 1)
    assert (ds.ContentDate, ds.ContentTime) == ("20250304", "050607")
    assert (ds.Manufacturer, ds.InstitutionName) == ("ANIM", "ANIM Luxembourg")
    [request] = ds.ReferencedRequestSequence
    assert (request.StudyInstanceUID, request.AccessionNumber) == (STUDY, "ACC-42")


def test_empty_issuer_leaves_issuer_of_patient_id_out() -> None:
    ds = _read(_kos(_study(issuer="")))
    assert "IssuerOfPatientID" not in ds
    assert ds.PatientID == "P-123"


def test_aware_content_time_is_written_in_utc() -> None:
    cet = datetime(2025, 3, 4, 6, 6, 7, tzinfo=timezone(timedelta(hours=1)))
    ds = _read(_kos(_study(), cet))
    assert (ds.ContentDate, ds.ContentTime, ds.TimezoneOffsetFromUTC) == (
        "20250304", "050607", "+0000")
    assert _kos(_study(), cet) == _kos(_study(), cet.astimezone(UTC))


def _named(items: pydicom.Sequence, code: str) -> list[pydicom.Dataset]:
    return [i for i in items if i.ConceptNameCodeSequence[0].CodeValue == code]


def test_image_library_describes_series_and_instances() -> None:
    # MADO: TID 1600 Image Library, one Image Library Group per series (TID 1602 descriptors),
    # TID 1601 entries with Instance Number and Number of Frames
    ds = _read(_kos(_study()))
    [library] = _named(ds.ContentSequence, "111028")
    [n_series] = _named(library.ContentSequence, "131565")
    assert float(n_series.MeasuredValueSequence[0].NumericValue) == 3
    groups = _named(library.ContentSequence, "126200")
    by_series = {_named(g.ContentSequence, "112002")[0].UID: g for g in groups}
    assert list(by_series) == [f"{STUDY}.1", f"{STUDY}.2", f"{STUDY}.3"]
    axial = by_series[f"{STUDY}.1"].ContentSequence
    assert _named(axial, "121139")[0].ConceptCodeSequence[0].CodeValue == "CT"
    assert _named(axial, "113607")[0].TextValue == "1"
    assert _named(axial, "131563")[0].TextValue == "Axial 1mm"
    assert float(_named(axial, "131564")[0].MeasuredValueSequence[0].NumericValue) == 3
    [enhanced] = [i for i in by_series[f"{STUDY}.2"].ContentSequence if i.ValueType == "IMAGE"]
    [frames] = _named(enhanced.ContentSequence, "121140")
    assert float(frames.MeasuredValueSequence[0].NumericValue) == 120
    entries = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
               for g in groups for i in g.ContentSequence if "ReferencedSOPSequence" in i]
    assert sorted(entries) == sorted(sop for _, _, sop in _instances(_study()))


def test_study_without_instances_is_refused() -> None:
    empty = dataclasses.replace(_study(), series=())
    with pytest.raises(ValueError, match="has no instances"):
        build_kos(empty, wado_root=ROOT, retrieve_aet=AET, content_time=WHEN)


def test_dcmdump_reads_the_manifest(tmp_path: Path) -> None:
    tool = dcmtk("dcmdump")
    path = tmp_path / "manifest.dcm"
    path.write_bytes(_kos(_study()))
    # +L: print long values whole; +U8: show the UTF-8 patient name as such
    done = subprocess.run([tool, "+L", "+U8", str(path)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "E:" not in done.stderr, done.stderr
    assert "W:" not in done.stderr, done.stderr
    assert "=KeyObjectSelectionDocumentStorage" in done.stdout
    assert "(0040,e025)" in done.stdout  # WADORSRetrievalSequence
    assert f"[{ROOT}/studies/{STUDY}/series/{STUDY}.2]" in done.stdout
    assert "[Müller^Jean]" in done.stdout
