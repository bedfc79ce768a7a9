"""scp/fastident.py writes C-FIND response Identifiers byte for byte as pydicom would.

The archive's own matches (the sample studies and pydicom's test files, stored in an
embedded archive) at every level, with many return keys and character sets, go through
both ways: ``identifiers.encoded_response`` (direct when it can) and ``identifiers.response``
encoded by pynetdicom's pydicom-based encoder. Both must give the same bytes in explicit
and implicit VR little endian; and the direct way must really have been taken for most
matches, or the test proves nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode as pydicom_encode

from anim import Archive, Level, Query, Source
from anim.config import load_config
from scp import encoded, fastident, identifiers
from tests.conftest import PYDICOM_TEST_FILES, sample_files

SOURCE = Source(institution="HOSP-A", ae_title="CT1", host="127.0.0.1")
KEYS = {
    Level.PATIENT: ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "IssuerOfPatientID", "NumberOfPatientRelatedStudies",
                    "NumberOfPatientRelatedInstances"),
    Level.STUDY: ("PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber",
                  "StudyID", "StudyDescription", "ReferringPhysicianName",
                  "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                  "NumberOfStudyRelatedInstances", "StudyInstanceUID", "RetrieveAETitle",
                  "InstanceAvailability", "PatientBirthDate", "OtherPatientIDs"),
    Level.SERIES: ("Modality", "SeriesNumber", "SeriesDescription", "SeriesInstanceUID",
                   "StudyInstanceUID", "NumberOfSeriesRelatedInstances", "BodyPartExamined",
                   "SeriesDate"),
    Level.IMAGE: ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "NumberOfFrames",
                  "Rows", "Columns", "StudyInstanceUID", "SeriesInstanceUID",
                  "ImageType", "AcquisitionDate"),
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    d = tmp_path_factory.mktemp("fastident")
    cfg = load_config(env={}, overrides={"storage": {"data_dir": str(d)}})
    with Archive.open(cfg) as a:
        files = sample_files() + sorted(p for p in PYDICOM_TEST_FILES.glob("*.dcm"))[:60]
        for f in files:
            try:
                a.store(f.read_bytes(), SOURCE)
            except Exception:  # some of pydicom's files are not storable
                continue
        yield a


def _both(result: dict, query: Query, charset: str) -> tuple[Dataset, Dataset]:  # type: ignore[type-arg]
    return (identifiers.encoded_response(result, query, charset, "ANIM"),
            identifiers.response(result, query, charset, "ANIM"))


@pytest.mark.parametrize("level", list(KEYS))
@pytest.mark.parametrize("charset", ["", "ISO_IR 100", "ISO_IR 192"])
def test_the_same_bytes_as_pydicom(archive: Archive, level: Level, charset: str) -> None:
    query = Query(level=level, match=dict.fromkeys(KEYS[level], ""), return_keys=KEYS[level])
    results = list(archive.find(query))
    assert results
    fast = 0
    for result in results:
        quick, slow = _both(result, query, charset)
        for implicit in (False, True):
            expected = pydicom_encode(slow, implicit, True, False)
            if isinstance(quick, encoded.Encoded):
                got = quick.anim_encoder(implicit, True, False)
                if got is None:  # gave up at encoding (a non-ASCII value): pydicom's way
                    got = pydicom_encode(quick.anim_decode(), implicit, True, False)
                else:
                    fast += 1
            else:
                got = pydicom_encode(quick, implicit, True, False)
            assert got == expected, (level, result)
    # the direct way was really taken (else this test would compare pydicom with itself)
    assert fast >= len(results), (fast, len(results))


def test_it_gives_up_on_what_it_does_not_write() -> None:
    assert fastident.elements_of({"00280030": {"vr": "DS", "Value": [0.5, 0.5]}}) is None
    assert fastident.elements_of({"00081115": {"vr": "SQ", "Value": [{}]}}) is None
    assert fastident.elements_of({"00280010": {"vr": "US", "Value": [70000]}}) is None
    assert fastident.elements_of({"00180088": {"vr": "FD", "Value": [1.5]}}) is None
    assert fastident.elements_of({"00100010": {"vr": "PN", "Value": [
        {"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎"}]}}) is None
    els = fastident.elements_of({"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller"}]}})
    assert els is not None
    assert fastident.encoder(els)(False, True, False) is None  # not ASCII: pydicom's way
    assert fastident.encoder(els)(False, False, False) is None  # big endian: pydicom's way
