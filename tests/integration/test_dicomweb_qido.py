"""QIDO-RS against a running archive (DICOMweb issue, acceptance points 1 and 2).

One archive for the module: the synthetic samples sent with DCMTK storescu, and one
encoding of each of pydicom's storage objects imported with ``anim import`` before the
server starts. Every expectation is computed here from the files' headers.

- The six search resources (PS3.18 10.6.1), through plain HTTP and dicomweb-client.
- Matching by keyword and by tag, wildcards (PN case-insensitive, as OHIF sends
  ``*smith*``), date ranges, UID lists, IssuerOfPatientID; ``includefield`` (list,
  repeated, ``all``); ``limit``/``offset`` paging that never repeats nor skips.
- The default return attributes of PS3.18 Tables 10.6.3-3 to -5, RetrieveURL, and the
  JSON model of PS3.18 F.2 (PN as objects, IS/US as numbers).
- ``fuzzymatching`` / ``emptyvaluematching`` / ``multiplevaluematching`` are accepted,
  with the ``Warning: 299`` header of PS3.18 8.3.4.4-8.3.4.6 when not honoured; a result
  cut at the server's limit carries a Warning too (PS3.18 8.3.4.4).
- Bad requests get 400 with a reason; no match is 200 with ``[]``.
- Acceptance 2: QIDO and DCMTK findscu (C-FIND) give the same entities and the same key
  values for the same keys on the same data.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from tests.conftest import SAMPLES, AnimServer, sample_files, storescu
from tests.integration.dicomweb_helpers import (
    DICOM_JSON,
    client,
    first,
    has_reason,
    header,
    healthy,
    import_files,
    keywords,
    pn_text,
    qido,
    qido_ok,
    root,
    rounds,
    tag_of,
    values,
)
from tests.integration.test_cfind import findscu

pytestmark = [pytest.mark.integration, pytest.mark.dcmtk]

LEVEL_UID = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID",
             "instance": "SOPInstanceUID"}

# PS3.18 Table 10.6.3-3 (Type R, U, and RetrieveURL: this archive retrieves everything)
STUDY_DEFAULT = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
                 "ReferringPhysicianName", "RetrieveURL", "PatientName", "PatientID",
                 "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                 "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
# PS3.18 Table 10.6.3-4 (Type R and U)
SERIES_DEFAULT = ("Modality", "RetrieveURL", "SeriesInstanceUID", "SeriesNumber",
                  "NumberOfSeriesRelatedInstances")
# PS3.18 Table 10.6.3-5 (Type R and U); the C ones "shall be present if known"
INSTANCE_DEFAULT = ("SOPClassUID", "SOPInstanceUID", "RetrieveURL", "InstanceNumber")
INSTANCE_IF_KNOWN = ("Rows", "Columns", "BitsAllocated", "NumberOfFrames")
NUMERIC_VRS = {"IS", "DS", "US", "UL", "SS", "SL", "UV", "SV", "FL", "FD"}


# ---- the archive under test ------------------------------------------------------------


@dataclass
class Loaded:
    server: AnimServer
    headers: list[Dataset]  # one per stored instance

    @property
    def samples(self) -> list[Dataset]:
        return [h for h in self.headers if str(h.get("PatientID", "")).startswith("SYN")]

    def entities(self, level: str, pred: Callable[[Dataset], bool] = lambda h: True
                 ) -> set[str]:
        return {str(h.get(LEVEL_UID[level])) for h in self.headers if pred(h)}

    def study(self, patient_id: str) -> Dataset:
        return min((h for h in self.headers if h.get("PatientID") == patient_id),
                   key=lambda h: (h.StudyDate, h.StudyInstanceUID))

    def series_of(self, study: str) -> list[str]:
        return sorted({h.SeriesInstanceUID for h in self.headers
                       if h.StudyInstanceUID == study})


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    base = tmp_path_factory.mktemp("qido")
    others = rounds()[0]  # one file per SOP Instance UID: no versions
    import_files(base / "data", [o.path for o in others])
    srv = AnimServer(base / "data").start()
    try:
        r = storescu(srv.dimse_port, SAMPLES)
        assert r.returncode == 0, r.stdout + r.stderr
        headers = [header(p) for p in sample_files()] + [header(o.path) for o in others]
        yield Loaded(srv, headers)
    finally:
        srv.stop()


def uids(results: list[dict[str, Any]], level: str) -> list[str]:
    return [first(r, LEVEL_UID[level]) for r in results]


def text(h: Dataset, kw: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # badVR.dcm's NumberOfFrames '1A', on purpose
        v = h.get(kw)
    if v is None:
        return ""
    if isinstance(v, MultiValue | list):
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def wild(pattern: str, value: str, fold: bool = False) -> bool:
    if fold:
        pattern, value = pattern.upper(), value.upper()
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.DOTALL) is not None


def modern_date(h: Dataset) -> str:
    d = text(h, "StudyDate")
    return d if re.fullmatch(r"\d{8}", d) else ""


# ---- the six resources -----------------------------------------------------------------


def _resource(loaded: Loaded, which: str) -> tuple[str, str, set[str]]:
    st = loaded.study("SYN0001").StudyInstanceUID
    se = loaded.series_of(st)[0]
    return {
        "studies": ("/studies", "study", loaded.entities("study")),
        "series": ("/series", "series", loaded.entities("series")),
        "instances": ("/instances", "instance", loaded.entities("instance")),
        "study-series": (f"/studies/{st}/series", "series",
                         loaded.entities("series", lambda h: h.StudyInstanceUID == st)),
        "study-instances": (f"/studies/{st}/instances", "instance",
                            loaded.entities("instance", lambda h: h.StudyInstanceUID == st)),
        "series-instances": (f"/studies/{st}/series/{se}/instances", "instance",
                             loaded.entities("instance", lambda h: h.SeriesInstanceUID == se)),
    }[which]


RESOURCES = ("studies", "series", "instances", "study-series", "study-instances",
             "series-instances")


@pytest.mark.parametrize("which", RESOURCES)
def test_each_search_resource_returns_each_of_its_entities_once(loaded: Loaded,
                                                                which: str) -> None:
    path, level, want = _resource(loaded, which)
    got = uids(qido_ok(loaded.server, path), level)
    assert len(got) == len(set(got)), f"{path}: an entity listed twice"
    assert set(got) == want, f"{path}: missing {want - set(got)}, extra {set(got) - want}"


def test_dicomweb_client_searches_every_resource(loaded: Loaded) -> None:
    dw = client(loaded.server)
    st = loaded.study("SYN0001").StudyInstanceUID
    se = loaded.series_of(st)[0]
    found = {
        "studies": dw.search_for_studies(),
        "series": dw.search_for_series(),
        "instances": dw.search_for_instances(),
        "study-series": dw.search_for_series(study_instance_uid=st),
        "study-instances": dw.search_for_instances(study_instance_uid=st),
        "series-instances": dw.search_for_instances(study_instance_uid=st,
                                                    series_instance_uid=se),
    }
    for which, results in found.items():
        _, level, want = _resource(loaded, which)
        assert set(uids(results, level)) == want, which
    # a keyword search, as a script would write it
    smith = dw.search_for_studies(search_filters={"PatientID": "SYN0003"})
    assert set(uids(smith, "study")) == loaded.entities("study",
                                                        lambda h: h.get("PatientID") == "SYN0003")


# ---- default attributes and the JSON model ---------------------------------------------


def _missing(results: list[dict[str, Any]], required: tuple[str, ...]) -> list[str]:
    return sorted({kw for r in results for kw in required if tag_of(kw) not in r})


def test_study_results_carry_the_default_attributes(loaded: Loaded) -> None:
    results = qido_ok(loaded.server, "/studies")
    assert not _missing(results, STUDY_DEFAULT), "PS3.18 Table 10.6.3-3"


def test_series_results_carry_the_default_attributes(loaded: Loaded) -> None:
    st = loaded.study("SYN0001").StudyInstanceUID
    assert not _missing(qido_ok(loaded.server, f"/studies/{st}/series"), SERIES_DEFAULT)
    # all series (no study in the path): the study's attributes too (PS3.18 10.6.3.3.2)
    assert not _missing(qido_ok(loaded.server, "/series"), SERIES_DEFAULT + STUDY_DEFAULT)


def test_instance_results_carry_the_default_attributes(loaded: Loaded) -> None:
    st = loaded.study("SYN0001").StudyInstanceUID
    se = loaded.series_of(st)[0]
    own = qido_ok(loaded.server, f"/studies/{st}/series/{se}/instances")
    assert not _missing(own, INSTANCE_DEFAULT)
    # the study's instances: their series attributes too; all instances: study's as well
    assert not _missing(qido_ok(loaded.server, f"/studies/{st}/instances"),
                        INSTANCE_DEFAULT + SERIES_DEFAULT)
    everything = qido_ok(loaded.server, "/instances")
    assert not _missing(everything, INSTANCE_DEFAULT + SERIES_DEFAULT + STUDY_DEFAULT)
    # Rows, Columns, Bits Allocated, Number of Frames: "shall be present if known"
    by_uid = {h.SOPInstanceUID: h for h in loaded.headers}
    absent = []
    for r in everything:
        h = by_uid[first(r, "SOPInstanceUID")]
        for kw in INSTANCE_IF_KNOWN:
            known = re.fullmatch(r"\d+", text(h, kw))
            if known and values(r, kw) != [int(text(h, kw))]:
                absent.append((h.SOPInstanceUID[-12:], kw, values(r, kw), text(h, kw)))
    assert not absent, absent


def test_values_follow_the_dicom_json_model(loaded: Loaded) -> None:
    doe = loaded.study("SYN0001")
    [study] = qido_ok(loaded.server, "/studies", {"StudyInstanceUID": doe.StudyInstanceUID})
    name = study[tag_of("PatientName")]
    assert name == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}, "PS3.18 F.2.2"
    assert values(study, "ReferringPhysicianName") == [{"Alphabetic": str(
        doe.ReferringPhysicianName)}]
    n = len(loaded.entities("instance", lambda h: h.StudyInstanceUID == doe.StudyInstanceUID))
    assert study[tag_of("NumberOfStudyRelatedInstances")] == {"vr": "IS", "Value": [n]}
    assert values(study, "NumberOfStudyRelatedSeries") == [
        len(loaded.series_of(doe.StudyInstanceUID))]
    assert study[tag_of("StudyDate")] == {"vr": "DA", "Value": [doe.StudyDate]}
    assert values(study, "ModalitiesInStudy") == ["CT"]
    # non-ASCII names come back as the text they are (UTF-8 JSON)
    [muller] = qido_ok(loaded.server, "/studies", {"PatientID": "SYN0002"})
    assert values(muller, "PatientName") == [{"Alphabetic": "MÜLLER^JÖRG"}]
    # every number of every result is a JSON number, every name an object (F.2.3)
    bad = []
    for r in qido_ok(loaded.server, "/instances"):
        for tag, elem in r.items():
            vr = elem.get("vr")
            for v in elem.get("Value", []):
                if (vr in NUMERIC_VRS and not isinstance(v, int | float)) or (
                        vr == "PN" and not isinstance(v, dict)):
                    bad.append((tag, vr, v))
    assert not bad, bad[:20]


def test_values_equal_the_stored_headers(loaded: Loaded) -> None:
    study_keys = ("PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "AccessionNumber", "StudyID", "StudyDescription")
    by_study = {h.StudyInstanceUID: h for h in loaded.samples}
    results = qido_ok(loaded.server, "/studies", {"PatientID": "SYN*",
                                                  "includefield": "StudyDescription"})
    assert {first(r, "StudyInstanceUID") for r in results} == set(by_study)
    for r in results:
        h = by_study[first(r, "StudyInstanceUID")]
        for kw in study_keys:
            assert "\\".join(map(str, values(r, kw))) == text(h, kw), kw
        assert pn_text(first(r, "PatientName")) == text(h, "PatientName")
    for h in loaded.samples[:6]:
        path = f"/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}/instances"
        [r] = qido_ok(loaded.server, path, {"SOPInstanceUID": h.SOPInstanceUID})
        assert values(r, "InstanceNumber") == [int(h.InstanceNumber)]
        assert values(r, "SOPClassUID") == [h.SOPClassUID]


# ---- matching -------------------------------------------------------------------------


Case = tuple[str, dict[str, str], str, Callable[[Dataset], bool]]


def _cases(loaded: Loaded) -> dict[str, Case]:
    doe = loaded.study("SYN0001")
    smith = sorted({h.StudyInstanceUID for h in loaded.samples if h.PatientID == "SYN0003"})
    st = doe.StudyInstanceUID
    two_sops = sorted(h.SOPInstanceUID for h in loaded.samples)[:2]
    ct = "1.2.840.10008.5.1.4.1.1.2"
    return {
        "patient-id": ("/studies", {"PatientID": "SYN0001"}, "study",
                       lambda h: h.get("PatientID") == "SYN0001"),
        "patient-id-by-tag": ("/studies", {"00100020": "SYN0001"}, "study",
                              lambda h: h.get("PatientID") == "SYN0001"),
        "name-lower-wildcards": ("/studies", {"PatientName": "*smith*"}, "study",
                                 lambda h: "SMITH" in text(h, "PatientName").upper()),
        "name-non-ascii-lower": ("/studies", {"PatientName": "*müller*"}, "study",
                                 lambda h: "MÜLLER" in text(h, "PatientName").upper()),
        "name-exact-other-case": ("/studies", {"PatientName": "doe^jane"}, "study",
                                  lambda h: text(h, "PatientName").upper() == "DOE^JANE"),
        "name-by-tag-prefix": ("/studies", {"00100010": "SMITH*"}, "study",
                               lambda h: text(h, "PatientName").upper().startswith("SMITH")),
        "date": ("/studies", {"StudyDate": doe.StudyDate}, "study",
                 lambda h: modern_date(h) == doe.StudyDate),
        "date-range": ("/studies", {"StudyDate": "20240401-20240520"}, "study",
                       lambda h: "20240401" <= modern_date(h) <= "20240520"),
        "date-from": ("/studies", {"StudyDate": "20240501-"}, "study",
                      lambda h: modern_date(h) >= "20240501"),
        "date-until": ("/studies", {"StudyDate": "-20240331", "PatientID": "SYN*"}, "study",
                       lambda h: text(h, "PatientID").startswith("SYN")
                       and "" < modern_date(h) <= "20240331"),
        "study-uid-list": ("/studies", {"StudyInstanceUID": ",".join(smith)}, "study",
                           lambda h: h.StudyInstanceUID in smith),
        "modalities-in-study": ("/studies", {"ModalitiesInStudy": "MR"}, "study",
                                lambda h: h.StudyInstanceUID in loaded.entities(
                                    "study", lambda x: x.get("Modality") == "MR")),
        "accession-wildcard": ("/studies", {"AccessionNumber": "ACC2026000?"}, "study",
                               lambda h: wild("ACC2026000?", text(h, "AccessionNumber"))),
        "issuer": ("/studies", {"IssuerOfPatientID": "HOSP-A"}, "study",
                   lambda h: text(h, "IssuerOfPatientID") == "HOSP-A"),
        "issuer-mismatch": ("/studies", {"PatientID": "SYN0001", "IssuerOfPatientID": "NOPE"},
                            "study", lambda h: False),
        "series-modality": ("/series", {"Modality": "CT"}, "series",
                            lambda h: h.get("Modality") == "CT"),
        "series-modality-and-patient": ("/series", {"00080060": "MR", "PatientID": "SYN0003"},
                                        "series", lambda h: h.get("Modality") == "MR"
                                        and h.get("PatientID") == "SYN0003"),
        "study-series-number": (f"/studies/{st}/series", {"SeriesNumber": "2"}, "series",
                                lambda h: h.StudyInstanceUID == st
                                and text(h, "SeriesNumber") == "2"),
        "sop-uid-list": ("/instances", {"SOPInstanceUID": ",".join(two_sops)}, "instance",
                         lambda h: h.SOPInstanceUID in two_sops),
        "sop-class": (f"/studies/{st}/instances", {"SOPClassUID": ct}, "instance",
                      lambda h: h.StudyInstanceUID == st and h.SOPClassUID == ct),
        "instance-number": (f"/studies/{st}/instances", {"InstanceNumber": "3"}, "instance",
                            lambda h: h.StudyInstanceUID == st
                            and text(h, "InstanceNumber") == "3"),
    }


CASES = ("patient-id", "patient-id-by-tag", "name-lower-wildcards", "name-non-ascii-lower",
         "name-exact-other-case", "name-by-tag-prefix", "date", "date-range", "date-from",
         "date-until", "study-uid-list", "modalities-in-study", "accession-wildcard",
         "issuer", "issuer-mismatch", "series-modality", "series-modality-and-patient",
         "study-series-number", "sop-uid-list", "sop-class", "instance-number")


@pytest.mark.parametrize("case", CASES)
def test_matching(loaded: Loaded, case: str) -> None:
    path, params, level, pred = _cases(loaded)[case]
    want = loaded.entities(level, pred)
    if case != "issuer-mismatch":
        assert want, f"{case} selects nothing: not a test"
    got = uids(qido_ok(loaded.server, path, params), level)
    assert sorted(got) == sorted(want), f"{params}: extra {set(got) - want}, " \
                                        f"missing {want - set(got)}"


def test_keyword_and_tag_give_the_same_answer(loaded: Loaded) -> None:
    for kw, value in (("PatientID", "SYN0003"), ("PatientName", "*smith*"),
                      ("StudyDate", "20240401-20240520")):
        by_kw = qido_ok(loaded.server, "/studies", {kw: value})
        by_tag = qido_ok(loaded.server, "/studies", {tag_of(kw): value})
        assert by_kw == by_tag, kw
        assert by_kw, kw


@pytest.mark.parametrize("params", [
    {"PatientID": "NOBODY"},
    {"PatientName": "*nobody-at-all*"},
    {"StudyDate": "19000101-19000102"},
    {"StudyInstanceUID": "1.2.3.4.5.6.7.8.9"},
], ids=["id", "name", "date-range", "uid"])
def test_no_match_is_200_with_an_empty_array(loaded: Loaded, params: dict[str, str]) -> None:
    # CP-2473: an empty result is 200 with [] (this archive never answers 204)
    r = qido(loaded.server, "/studies", params)
    assert r.status_code == 200, (r.status_code, r.text[:300])
    assert r.json() == []
    r = qido(loaded.server, "/instances", {"SOPInstanceUID": "1.2.3.4.5.6.7.8.9"})
    assert (r.status_code, r.json()) == (200, [])


# ---- includefield ----------------------------------------------------------------------


def test_ohif_study_list_query(loaded: Loaded) -> None:
    """The first request OHIF 3.13 sends, with and without its patient filter."""
    base = {"limit": "101", "offset": "0", "fuzzymatching": "false",
            "includefield": "00081030,00080060,00080090,00100030"}
    every = qido_ok(loaded.server, "/studies", base)
    assert set(uids(every, "study")) == loaded.entities("study")
    for r in every:
        if str(first(r, "PatientID") or "").startswith("SYN"):
            assert first(r, "StudyDescription"), "asked for with includefield=00081030"
    smith = qido_ok(loaded.server, "/studies", {**base, "PatientName": "*smith*"})
    assert set(uids(smith, "study")) == loaded.entities(
        "study", lambda h: "SMITH" in text(h, "PatientName").upper())
    # the patient's other studies, by tag number
    other = qido_ok(loaded.server, "/studies", {**base, "00100020": "SYN0003"})
    assert set(uids(other, "study")) == set(uids(smith, "study"))


@pytest.mark.parametrize("form", ["comma", "repeated", "keywords"])
def test_includefield_list_at_series_level(loaded: Loaded, form: str) -> None:
    st = loaded.study("SYN0001").StudyInstanceUID
    params: Any = {
        "comma": {"includefield": "0008103E,00080021"},
        "repeated": [("includefield", "0008103E"), ("includefield", "00080021")],
        "keywords": {"includefield": "SeriesDescription,SeriesDate"},
    }[form]
    results = qido_ok(loaded.server, f"/studies/{st}/series", params)
    by_series = {h.SeriesInstanceUID: h for h in loaded.samples}
    assert {first(r, "SeriesInstanceUID") for r in results} == set(loaded.series_of(st))
    for r in results:
        h = by_series[first(r, "SeriesInstanceUID")]
        assert values(r, "SeriesDescription") == [h.SeriesDescription]
        assert values(r, "SeriesDate") == [h.SeriesDate]


def test_ohif_series_query(loaded: Loaded) -> None:
    st = loaded.study("SYN0003").StudyInstanceUID
    results = qido_ok(loaded.server, f"/studies/{st}/series",
                      {"includefield": "00080021,00080031,0008103E,00200011"})
    assert {first(r, "SeriesInstanceUID") for r in results} == set(loaded.series_of(st))
    for r in results:
        assert first(r, "SeriesDescription")
        assert first(r, "SeriesDate")
        assert isinstance(first(r, "SeriesNumber"), int)
    # the first instance of a series (OHIF's thumbnail set-up)
    se = loaded.series_of(st)[0]
    one = qido_ok(loaded.server, f"/studies/{st}/series/{se}/instances",
                  {"limit": "1", "includefield": "00080018"})
    assert len(one) == 1
    assert first(one[0], "SeriesInstanceUID") in (None, se)
    assert first(one[0], "SOPInstanceUID") in loaded.entities(
        "instance", lambda h: h.SeriesInstanceUID == se)


def test_includefield_all_returns_more_than_the_defaults(loaded: Loaded) -> None:
    st = loaded.study("SYN0001").StudyInstanceUID
    [plain] = qido_ok(loaded.server, "/studies", {"StudyInstanceUID": st})
    [everything] = qido_ok(loaded.server, "/studies", {"StudyInstanceUID": st,
                                                       "includefield": "all"})
    assert keywords(everything) > keywords(plain)
    assert "StudyDescription" in keywords(everything)
    series = qido_ok(loaded.server, f"/studies/{st}/series", {"includefield": "all"})
    assert all("SeriesDescription" in keywords(r) for r in series)


# ---- paging ----------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "level", "size"), [
    ("/instances", "instance", 7), ("/studies", "study", 2), ("/series", "series", 3)])
def test_limit_offset_paging_never_repeats_or_skips(loaded: Loaded, path: str, level: str,
                                                    size: int) -> None:
    whole = uids(qido_ok(loaded.server, path), level)
    assert len(whole) > 3 * size, "too few entities for paging to mean anything"
    pages: list[str] = []
    offset = 0
    while True:
        page = uids(qido_ok(loaded.server, path, {"limit": size, "offset": offset}), level)
        assert len(page) <= size
        if not page:
            break
        pages += page
        offset += size
        assert offset < 10 * len(whole), "paging does not end"
    assert len(pages) == len(set(pages)), "an entity on two pages"
    assert pages == whole, "paged order differs from the whole answer (stable order)"


# ---- matching options and warnings -----------------------------------------------------


def _warning(r: Any) -> str:
    return r.headers.get("Warning", "")


@pytest.mark.parametrize(("option", "params"), [
    ("fuzzymatching", {"PatientName": "DOE^JANE"}),
    ("emptyvaluematching", {"StudyDescription": "CT*"}),
    ("multiplevaluematching", {"ModalitiesInStudy": "CT"}),
])
def test_matching_options_are_accepted(loaded: Loaded, option: str,
                                       params: dict[str, str]) -> None:
    """PS3.18 Table 8.3.4-1: an origin server accepts these; one it does not honour gets
    'Warning: 299 <service>: The <option> parameter is not supported ...' (8.3.4.4-6)."""
    plain = qido(loaded.server, "/studies", params)
    off = qido(loaded.server, "/studies", {**params, option: "false"})
    on = qido(loaded.server, "/studies", {**params, option: "true"})
    for r in (plain, off, on):
        assert r.status_code == 200, (option, r.status_code, r.text[:300])
    assert off.json() == plain.json()
    warning = _warning(on)
    if warning:
        assert re.match(r"299 \S+", warning), warning
        assert option in warning, warning
    elif option != "multiplevaluematching":
        # honoured: then it must have changed something for these keys
        assert on.json() != plain.json(), f"{option}=true neither honoured nor warned about"


def test_results_cut_at_the_server_limit_carry_a_warning(make_server: Any,
                                                         tmp_path: Path) -> None:
    srv = make_server(tmp_path / "data", env={"ANIM_WEB_QIDO_MAX_RESULTS": "5"}).start()
    r = storescu(srv.dimse_port, SAMPLES)
    assert r.returncode == 0, r.stdout + r.stderr
    cut = qido(srv, "/instances")
    assert cut.status_code == 200
    assert len(cut.json()) == 5
    assert re.match(r"299 \S+", _warning(cut)), cut.headers
    small = qido(srv, "/instances", {"limit": "3"})
    assert len(small.json()) == 3
    assert not _warning(small)
    # the rest is reachable with offset
    rest = qido(srv, "/instances", {"limit": "5", "offset": "5"})
    assert len(rest.json()) == 5
    assert not {first(x, "SOPInstanceUID") for x in rest.json()} & {
        first(x, "SOPInstanceUID") for x in cut.json()}


# ---- bad requests ----------------------------------------------------------------------


@pytest.mark.parametrize(("path", "params"), [
    ("/studies", {"NoSuchAttribute": "1"}),
    ("/studies", {"0010001G": "x"}),
    ("/studies", {"includefield": "NoSuchAttribute"}),
    ("/studies", {"limit": "abc"}),
    ("/studies", {"offset": "-1"}),
    ("/studies", {"StudyDate": "notadate"}),
    ("/studies", {"StudyInstanceUID": "1.2.*"}),
    ("/series", {"Modality": "CT", "limit": "1x"}),
    ("/instances", {"SOPInstanceUID": "1.2.3", "Frobnicate": "1"}),
], ids=["unknown-keyword", "bad-tag", "unknown-includefield", "limit-not-a-number",
        "negative-offset", "bad-date", "uid-wildcard", "series-bad-limit",
        "instances-unknown-keyword"])
def test_bad_query_is_400_with_a_reason(loaded: Loaded, path: str,
                                        params: dict[str, str]) -> None:
    r = qido(loaded.server, path, params)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert has_reason(r), r.text
    assert healthy(loaded.server)
    assert qido_ok(loaded.server, "/studies", {"PatientID": "SYN0001"})


# ---- RetrieveURL -----------------------------------------------------------------------


def test_retrieve_url_names_the_entity_and_resolves(loaded: Loaded) -> None:
    base = root(loaded.server)
    doe = loaded.study("SYN0001")
    st = doe.StudyInstanceUID
    [study] = qido_ok(loaded.server, "/studies", {"StudyInstanceUID": st})
    assert values(study, "RetrieveURL") == [f"{base}/studies/{st}"]
    for r in qido_ok(loaded.server, f"/studies/{st}/series"):
        se = first(r, "SeriesInstanceUID")
        assert values(r, "RetrieveURL") == [f"{base}/studies/{st}/series/{se}"]
    for r in qido_ok(loaded.server, f"/studies/{st}/instances"):
        se, sop = first(r, "SeriesInstanceUID"), first(r, "SOPInstanceUID")
        assert values(r, "RetrieveURL") == [f"{base}/studies/{st}/series/{se}/instances/{sop}"]
    import requests

    meta = requests.get(f"{first(study, 'RetrieveURL')}/metadata",
                        headers={"Accept": DICOM_JSON}, timeout=60)
    assert meta.status_code == 200, meta.text[:300]
    assert len(meta.json()) == len(loaded.entities("instance",
                                                   lambda h: h.StudyInstanceUID == st))


def test_qido_answers_carry_cors_headers(loaded: Loaded) -> None:
    r = qido(loaded.server, "/studies", {"PatientID": "SYN0001"},
             Origin="http://viewer.example")
    assert r.status_code == 200
    assert r.headers.get("Access-Control-Allow-Origin") in ("*", "http://viewer.example")


# ---- acceptance 2: QIDO equals C-FIND ---------------------------------------------------


PARITY_RETURN = {
    "STUDY": ("StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
              "AccessionNumber", "StudyID", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"),
    "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}
PARITY = {
    "patient-name-wildcard": ("STUDY", {"PatientName": "*smith*"}),
    "patient-id": ("STUDY", {"PatientID": "SYN0001"}),
    "study-date-range": ("STUDY", {"StudyDate": "20240401-20240520"}),
    "modalities-in-study": ("STUDY", {"ModalitiesInStudy": "MR"}),
    "accession-wildcard": ("STUDY", {"AccessionNumber": "ACC*"}),
    "universal": ("STUDY", {}),
    "series-modality": ("SERIES", {"Modality": "CT"}),
    "series-number": ("SERIES", {"SeriesNumber": "1"}),
    "instance-number": ("IMAGE", {"InstanceNumber": "2"}),
}


def _norm(kw: str, vals: list[Any]) -> Any:
    vr = dictionary_VR(kw)
    if kw in ("ModalitiesInStudy", "SOPClassesInStudy"):
        return sorted(str(v) for v in vals)
    if vr in ("IS", "US", "UL", "SS", "SL"):
        return [int(v) for v in vals if str(v).strip()]
    if vr == "PN":
        return "\\".join((pn_text(v) if isinstance(v, dict) else str(v)).rstrip("=")
                         for v in vals)
    return "\\".join(str(v).strip() for v in vals)


def from_cfind(ds: Dataset, kw: str) -> Any:
    v = ds.get(kw)
    if v is None or v == "":
        return _norm(kw, [])
    return _norm(kw, list(v) if isinstance(v, MultiValue | list) else [v])


def from_qido(obj: dict[str, Any], kw: str) -> Any:
    return _norm(kw, values(obj, kw))


def _compare(cfind: list[Dataset], results: list[dict[str, Any]], level: str,
             what: str) -> int:
    keys = PARITY_RETURN[level]
    unique = keys[0]
    by_dimse = {str(ds.get(unique)): {kw: from_cfind(ds, kw) for kw in keys} for ds in cfind}
    by_web = {first(r, unique): {kw: from_qido(r, kw) for kw in keys} for r in results}
    assert len(by_dimse) == len(cfind), f"{what}: C-FIND answered an entity twice"
    assert len(by_web) == len(results), f"{what}: QIDO answered an entity twice"
    assert set(by_web) == set(by_dimse), (
        f"{what}: QIDO only {set(by_web) - set(by_dimse)}, "
        f"C-FIND only {set(by_dimse) - set(by_web)}")
    for uid, row in by_dimse.items():
        assert by_web[uid] == row, f"{what} {uid}: QIDO {by_web[uid]} != C-FIND {row}"
    return len(by_web)


@pytest.mark.parametrize("case", list(PARITY))
def test_qido_equals_cfind(loaded: Loaded, tmp_path: Path, case: str) -> None:
    level, keys = PARITY[case]
    ret = PARITY_RETURN[level]
    include = {"includefield": ",".join(k for k in ret if k not in keys)}
    srv = loaded.server
    if level == "STUDY":
        cfind = findscu(srv, "study", {"QueryRetrieveLevel": level, **dict.fromkeys(ret, ""),
                                       **keys}, tmp_path)
        n = _compare(cfind, qido_ok(srv, "/studies", {**keys, **include}), level, case)
        assert n, f"{case} selects nothing: not a test"
        return
    total = 0
    every_study = sorted(loaded.entities("study"))
    scopes = ([(st, None) for st in every_study] if level == "SERIES" else
              [(h.StudyInstanceUID, se) for h in loaded.samples
               for se in [h.SeriesInstanceUID]])
    for st, se in sorted(set(scopes)):
        ident = {"QueryRetrieveLevel": level, **dict.fromkeys(ret, ""), **keys,
                 "StudyInstanceUID": st}
        path = f"/studies/{st}/series"
        if se is not None:
            ident["SeriesInstanceUID"] = se
            path = f"/studies/{st}/series/{se}/instances"
        cfind = findscu(srv, "study", ident, tmp_path)
        total += _compare(cfind, qido_ok(srv, path, {**keys, **include}), level,
                          f"{case} in {path}")
    assert total, f"{case} selects nothing: not a test"
    if level == "SERIES":
        # the all-series resource gives the union of the per-study answers
        everywhere = qido_ok(srv, "/series", {**keys, **include})
        assert len(everywhere) == total
