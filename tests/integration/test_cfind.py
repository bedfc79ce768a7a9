"""C-FIND against a running archive (Query/Retrieve issue, acceptance points 1 and 5).

One archive for the module holds the synthetic samples (sent with DCMTK storescu),
the pydicom test files it accepts (sent one by one with pynetdicom, so the test knows
exactly which are stored) and one large synthetic series (for C-CANCEL). The expected
answer of every query is computed here, from the files sent, with plain Python
matching (PS3.4 C.2.2.2), independently of the archive's SQL; DCMTK findscu asks the
questions in the Patient Root and Study Root models and every response it writes
(``-X``) is compared with that expectation: the set of entities, and the value of
every requested key.

Malformed identifiers (wrong VR, no or unknown level, missing unique keys, a key below
the level) are sent with pynetdicom, which can build them: each gets a failure status
with an Error Comment, and the next query is answered normally. A C-CANCEL sent after
the first match ends a C-FIND of the large series with Cancel (0xFE00).
"""

from __future__ import annotations

import re
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import config, dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.conftest import PYDICOM_TEST_FILES, SAMPLES, AnimServer, dcmtk, sample_files, storescu

pytestmark = [pytest.mark.integration, pytest.mark.dcmtk]

# ---- the expected index, computed from the files --------------------------------------

PATIENT_KEYS = ("PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate",
                "PatientSex")
STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
              "StudyDescription", "ReferringPhysicianName")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "BodyPartExamined", "SeriesDate")
IMAGE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
LEVEL_KEYS = {"PATIENT": PATIENT_KEYS, "STUDY": STUDY_KEYS, "SERIES": SERIES_KEYS,
              "IMAGE": IMAGE_KEYS}
COMPUTED = {
    "PATIENT": ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"),
    "STUDY": ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
              "ModalitiesInStudy", "SOPClassesInStudy"),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
    "IMAGE": (),
}
# the large series a C-CANCEL interrupts
BULK_INSTANCES = 200
BULK_PATIENT = "SYNBULK"


def text(ds: Dataset, kw: str) -> str:
    """An attribute as the archive should see it: '' when absent, values joined by '\\'."""
    v = ds.get(kw)
    if v is None:
        return ""
    if isinstance(v, MultiValue | list | tuple):
        return "\\".join(str(x) for x in v)
    return str(v).strip()


def number(value: Any) -> int | None:
    s = str(value).strip() if value is not None else ""
    return int(s) if s else None


def own_row(ds: Dataset) -> dict[str, Any]:
    """The attributes of every level for one instance (a flat IMAGE-level row)."""
    row: dict[str, Any] = {kw: text(ds, kw) for level in LEVELS for kw in LEVEL_KEYS[level]}
    for kw in ("SeriesNumber", "InstanceNumber"):
        row[kw] = number(row[kw])
    row["_ds"] = ds
    return row


def modern_dates(row: dict[str, Any]) -> bool:
    """Dates and times in today's formats (YYYYMMDD, HHMMSS.FFFFFF). pydicom's files
    include ACR-NEMA ones ('1997.04.24', '14:04:38'); the index keeps only the first 8
    characters of a date, so those are left out here (reported: anim/dicomfile.py)."""
    dates = [row[k] for k in ("StudyDate", "SeriesDate")]
    return (all(not d or re.fullmatch(r"\d{8}", d) for d in dates)
            and re.fullmatch(r"(\d{2,6}(\.\d{1,6})?)?", row["StudyTime"]) is not None)


def entity_key(row: dict[str, Any], level: str) -> tuple[str, ...]:
    if level == "PATIENT":
        return row["PatientID"], row["IssuerOfPatientID"]
    return (row[{"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
                 "IMAGE": "SOPInstanceUID"}[level]],)


def _signature(row: dict[str, Any], level: str) -> tuple[Any, ...]:
    """What must agree between two instances of the same entity (its parent included)."""
    parent = {"PATIENT": (), "STUDY": entity_key(row, "PATIENT"),
              "SERIES": (row["StudyInstanceUID"],), "IMAGE": ()}[level]
    return (*parent, *(row[k] for k in LEVEL_KEYS[level]))


class Corpus:
    """What the archive holds, as the test knows it: one row per stored instance."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self._seen: dict[tuple[str, tuple[str, ...]], tuple[Any, ...]] = {}

    def consistent(self, row: dict[str, Any]) -> bool:
        """True if *row* agrees with every stored entity it belongs to (same patient,
        study and series attributes): then the expectation does not depend on which
        header the archive saw last."""
        if ("IMAGE", entity_key(row, "IMAGE")) in self._seen:
            return False
        return all(self._seen.get((lv, entity_key(row, lv)), _signature(row, lv))
                   == _signature(row, lv) for lv in LEVELS[:3])

    def add(self, row: dict[str, Any]) -> None:
        assert self.consistent(row)
        for lv in LEVELS:
            self._seen[(lv, entity_key(row, lv))] = _signature(row, lv)
        self.rows.append(row)

    def groups(self, level: str) -> dict[tuple[str, ...], list[dict[str, Any]]]:
        out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for r in self.rows:
            out.setdefault(entity_key(r, level), []).append(r)
        return out

    def entities(self, level: str) -> list[dict[str, Any]]:
        """The rows a universal query at *level* returns, with the computed keys of
        their own level and of the levels above."""
        above = {lv: self.groups(lv) for lv in LEVELS[:LEVELS.index(level)]}
        out = []
        for members in self.groups(level).values():
            e = {**members[0], "_members": members, **computed(level, members)}
            for lv, groups in above.items():
                e.update(computed(lv, groups[entity_key(e, lv)]))
            out.append(e)
        return out


def computed(level: str, members: list[dict[str, Any]]) -> dict[str, Any]:
    """The computed keys of an entity of *level* whose instances are *members*."""
    n_studies = len({m["StudyInstanceUID"] for m in members})
    n_series = len({m["SeriesInstanceUID"] for m in members})
    return {
        "PATIENT": {"NumberOfPatientRelatedStudies": n_studies,
                    "NumberOfPatientRelatedSeries": n_series,
                    "NumberOfPatientRelatedInstances": len(members)},
        "STUDY": {"NumberOfStudyRelatedSeries": n_series,
                  "NumberOfStudyRelatedInstances": len(members),
                  "ModalitiesInStudy": sorted({m["Modality"] for m in members} - {""}),
                  "SOPClassesInStudy": sorted({m["SOPClassUID"] for m in members})},
        "SERIES": {"NumberOfSeriesRelatedInstances": len(members)},
        "IMAGE": {},
    }[level]


# ---- PS3.4 C.2.2.2 matching, in plain Python ----------------------------------------


def _wildcard(pattern: str, value: str) -> bool:
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, value, re.DOTALL) is not None


def _in_range(query: str, value: str) -> bool:
    if not value:
        return False  # an entity without a value is in no range
    lo, _, hi = query.partition("-")
    # an upper bound names a whole period: -0930 includes 09:30:59
    return (not lo or value >= lo) and (not hi or value[:len(hi)] <= hi)


def matches(kw: str, query: str, entity: dict[str, Any]) -> bool:
    """Does *entity* match the key *kw* = *query* (PS3.4 C.2.2.2)?"""
    if query in ("", "*"):
        return True  # universal matching
    value = entity[kw]
    vr = dictionary_VR(kw)
    alternatives = query.split("\\")
    if kw == "ModalitiesInStudy":
        return any(_wildcard(q, m) for q in alternatives for m in value)
    if vr == "UI":
        return value in alternatives
    if vr in ("DA", "TM"):
        return _in_range(query, value) if "-" in query else value == query
    if vr == "IS":
        return value is not None and value in {int(q) for q in alternatives}
    if vr == "PN":
        return any(_pn_matches(q.upper(), value.upper()) for q in alternatives)
    return any(_wildcard(q, value) for q in alternatives)  # case-sensitive


def _pn_matches(query: str, name: str) -> bool:
    """Names match ignoring case; a bare family name also matches FAMILY^GIVEN."""
    if "*" in query or "?" in query:
        return _wildcard(query, name)
    return name == query or ("^" not in query and "=" not in query
                             and name.startswith(query + "^"))


def expected(corpus: Corpus, level: str, keys: dict[str, str]) -> list[dict[str, Any]]:
    return [e for e in corpus.entities(level)
            if all(matches(kw, q, e) for kw, q in keys.items()
                   if kw not in ("QueryRetrieveLevel", "SpecificCharacterSet"))]


# ---- the archive under test ----------------------------------------------------------


@dataclass
class Loaded:
    server: AnimServer
    corpus: Corpus
    pydicom_files: list[str]
    bulk_study: str
    bulk_series: str


def header(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some of pydicom's files are odd on purpose
        return dcmread(path, stop_before_pixels=True)


def scu(title: str) -> AE:
    """A pynetdicom SCU patient with a busy machine (the suite runs on 2 shared cores)."""
    ae = AE(ae_title=title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    return ae


def _store_status(assoc: Any, what: Path | Dataset) -> int:
    status = assoc.send_c_store(what)
    assert "Status" in status, f"no C-STORE response for {what}"
    return int(status.Status)


def _pydicom_candidates() -> list[list[Path]]:
    """Part 10 test files with the UIDs an archive needs, grouped by SOP Instance UID
    (pydicom ships the same instance in several transfer syntaxes)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(PYDICOM_TEST_FILES.glob("*.dcm")):
        if path.read_bytes()[128:132] != b"DICM":
            continue
        try:
            ds = header(path)
        except Exception:
            continue  # not a file pydicom reads: not a candidate
        uids = [text(ds, k) for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
                                      "SeriesInstanceUID")]
        if all(uids) and all(len(u) <= 64 for u in uids):
            groups.setdefault(uids[1], []).append(path)
    return list(groups.values())


def _bulk_datasets() -> list[Dataset]:
    """A synthetic series large enough that a C-FIND of it is still running when the
    C-CANCEL arrives."""
    study = generate_uid(entropy_srcs=["anim-test-cfind", "bulk-study"])
    series = generate_uid(entropy_srcs=["anim-test-cfind", "bulk-series"])
    out = []
    for i in range(1, BULK_INSTANCES + 1):
        ds = Dataset()
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["anim-test-cfind", "bulk", str(i)])
        ds.PatientName = "SYNTHETIC^BULK"
        ds.PatientID = BULK_PATIENT
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyDate = "20230102"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "SYNBULK1"
        ds.Modality = "OT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = i
        ds.InstitutionName = "ANIM Synthetic Bulk Hospital"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def _send_datasets(srv: AnimServer, datasets: list[Dataset]) -> list[int]:
    ae = scu("BULKSCU")
    ae.add_requested_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", srv.dimse_port, ae_title=srv.aet)
    assert assoc.is_established
    try:
        return [_store_status(assoc, ds) for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    dcmtk("findscu")
    srv = AnimServer(tmp_path_factory.mktemp("cfind") / "data").start()
    try:
        yield _load(srv)
    finally:
        srv.stop()


def _load(srv: AnimServer) -> Loaded:
    corpus = Corpus()
    r = storescu(srv.dimse_port, SAMPLES)
    assert r.returncode == 0, r.stdout + r.stderr
    for path in sample_files():
        corpus.add(own_row(header(path)))

    groups = _pydicom_candidates()
    bulk = _bulk_datasets()
    ae = scu("PYDICOMFILES")
    contexts = {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                for m in (read_file_meta_info(p) for g in groups for p in g)}
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", srv.dimse_port, ae_title=srv.aet)
    assert assoc.is_established
    stored: list[str] = []
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # send each file's bytes as they are
    try:
        for group in groups:
            # the first variant of each instance that the archive accepts
            for path in group:
                row = own_row(header(path))
                if not corpus.consistent(row) or not modern_dates(row):
                    continue  # another header of a stored patient/study/series; old dates
                status = _store_status(assoc, path)
                if status == 0x0000:
                    corpus.add(row)
                    stored.append(path.name)
                    break
                assert 0xA000 <= status <= 0xCFFF, f"{path.name}: status 0x{status:04X}"
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    # four associations at once: the archive commits their instances in groups
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda part: _send_datasets(srv, bulk[part::4]), range(4)))
    assert all(s == 0x0000 for part in statuses for s in part)
    for ds in bulk:
        corpus.add(own_row(ds))
    # enough of pydicom's variety to make the comparison worth it
    assert len(stored) >= 20, stored
    return Loaded(srv, corpus, stored, bulk[0].StudyInstanceUID, bulk[0].SeriesInstanceUID)


# ---- asking with DCMTK findscu -------------------------------------------------------


def findscu(server: AnimServer, model: str, keys: dict[str, str | bytes], tmp: Path
            ) -> list[Dataset]:
    """Run findscu (-P or -S) and return the response identifiers it extracted."""
    out = tmp / f"find-{uuid.uuid4().hex[:8]}"
    out.mkdir()
    args: list[str | bytes] = [dcmtk("findscu"), "-v", "-aet", "FINDSCU", "-aec", server.aet,
                               "-P" if model == "patient" else "-S", "-X"]
    for kw, value in keys.items():
        if isinstance(value, bytes):
            args += ["-k", kw.encode() + b"=" + value]
        else:
            args += ["-k", f"{kw}={value}" if value else kw]
    args += ["127.0.0.1", str(server.dimse_port)]
    r = subprocess.run(args, cwd=out, capture_output=True, timeout=120)
    log = (r.stdout + r.stderr).decode("utf-8", "replace")
    assert r.returncode == 0, log
    assert "Received Final Find Response (Success)" in log, log + server.log[-4000:]
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _normal(kw: str, value: Any) -> Any:
    if kw in ("ModalitiesInStudy", "SOPClassesInStudy"):
        if value in (None, ""):
            return []
        return sorted(str(v) for v in (value if isinstance(value, MultiValue | list) else
                                       [value]))
    if dictionary_VR(kw) in ("IS", "US", "UL"):
        return number(value)
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(x) for x in value)
    return str(value).strip()


UNIQUE = ("PatientID", "IssuerOfPatientID", "StudyInstanceUID", "SeriesInstanceUID",
          "SOPInstanceUID")


def check(loaded: Loaded, model: str, level: str, keys: dict[str, str | bytes], tmp: Path,
          at_least: int = 1) -> list[Dataset]:
    """Ask with findscu; compare the answer with the expectation, entity by entity and
    key by key. *at_least*: how many matches the query must have to be a real test
    (0: it must have none)."""
    own = UNIQUE[:2] if level == "PATIENT" else UNIQUE[LEVELS.index(level) + 1:][:1]
    query: dict[str, str | bytes] = {"QueryRetrieveLevel": level, **dict.fromkeys(own, ""),
                                     **keys}
    responses = findscu(loaded.server, model, query, tmp)
    codec = {"ISO_IR 100": "latin_1"}.get(str(keys.get("SpecificCharacterSet", "")), "utf_8")
    asked = {k: v.decode(codec) if isinstance(v, bytes) else v for k, v in query.items()
             if k not in ("QueryRetrieveLevel", "SpecificCharacterSet")}
    want = {entity_key(e, level): e for e in expected(loaded.corpus, level, asked)}
    if at_least:
        assert len(want) >= at_least, f"{query} selects too little to test anything"
    else:
        assert not want, f"{query} was meant to select nothing"
    got: list[tuple[str, ...]] = []
    for rsp in responses:
        assert rsp.QueryRetrieveLevel == level
        row = {kw: _normal(kw, rsp.get(kw)) for kw in UNIQUE}
        got.append(entity_key(row, level))
        e = want.get(got[-1])
        if e is None:
            continue  # reported below, with the whole difference
        for kw in asked:
            assert kw in rsp, f"requested key {kw} missing from a response to {query}"
            value = _normal(kw, rsp[kw].value)
            if kw in e:
                assert value == _normal(kw, e[kw]), f"{kw} of {got[-1]}: {value!r}"
            else:  # not an index attribute: read from one of the entity's instances
                allowed = {_normal(kw, m["_ds"].get(kw)) for m in e["_members"]}
                assert value in allowed, f"{kw} of {got[-1]}: {value!r} not in {allowed}"
    assert sorted(got) == sorted(want), (
        f"{query}: unexpected {set(got) - set(want)}, missing {set(want) - set(got)}")
    return responses


# ---- helpers to pick entities of the corpus --------------------------------------------


def study_of(corpus: Corpus, patient_id: str, n: int = 0) -> dict[str, Any]:
    studies = sorted((e for e in corpus.entities("STUDY") if e["PatientID"] == patient_id),
                     key=lambda e: e["StudyDate"])
    return studies[n]


def series_in(corpus: Corpus, study_uid: str) -> list[dict[str, Any]]:
    return sorted((e for e in corpus.entities("SERIES") if e["StudyInstanceUID"] == study_uid),
                  key=lambda e: e["SeriesInstanceUID"])


STUDY_RETURN = {"PatientName": "", "PatientID": "", "StudyDate": "", "StudyTime": "",
                "AccessionNumber": "", "StudyDescription": "", "ModalitiesInStudy": "",
                "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""}


# ---- PATIENT level (Patient Root only) -------------------------------------------------


def test_patient_level_universal_returns_every_patient_and_its_counts(
        loaded: Loaded, tmp_path: Path) -> None:
    keys = dict.fromkeys(PATIENT_KEYS + COMPUTED["PATIENT"], "")
    rsp = check(loaded, "patient", "PATIENT", keys, tmp_path, at_least=10)
    assert len(rsp) == len(loaded.corpus.entities("PATIENT"))


@pytest.mark.parametrize(("name", "charset"), [
    ("DOE*", ""),
    ("?OE^JANE", ""),
    ("doe^jane", ""),  # PN matching ignores case
    ("SMITH", ""),  # a bare family name matches SMITH^JOHN
    ("*JÖRG", "ISO_IR 192"),
    ("müller^jörg", "ISO_IR 192"),
    ("*JÖRG", "ISO_IR 100"),
    ("*^G", ""),  # Lestrade^G of pydicom's files
    ("DOE^J", ""),  # not a prefix match: nothing
], ids=["wildcard-star", "wildcard-question", "case", "family-name", "utf8", "utf8-case",
        "latin1", "pydicom", "no-prefix-match"])
@pytest.mark.parametrize(("model", "level"), [("patient", "PATIENT"), ("study", "STUDY")])
def test_patient_name_matching(loaded: Loaded, tmp_path: Path, model: str, level: str,
                               name: str, charset: str) -> None:
    keys: dict[str, str | bytes] = {"PatientName": name, "PatientID": ""}
    if charset:
        keys["SpecificCharacterSet"] = charset
        keys["PatientName"] = name.encode("latin_1" if charset == "ISO_IR 100" else "utf_8")
    rsp = check(loaded, model, level, keys, tmp_path, at_least=0 if name == "DOE^J" else 1)
    if charset and rsp:
        # the answer comes in the requester's character set
        assert rsp[0].SpecificCharacterSet == charset


@pytest.mark.parametrize("keys", [
    {"PatientID": "SYN0003"},
    {"PatientID": "SYN000?"},
    {"PatientSex": "F"},
    {"PatientBirthDate": "19500101-19801231"},
    {"PatientBirthDate": "19850227"},
], ids=["id", "id-wildcard", "sex", "birth-date-range", "birth-date"])
def test_patient_level_matching(loaded: Loaded, tmp_path: Path, keys: dict[str, str]) -> None:
    check(loaded, "patient", "PATIENT", {"PatientName": "", "PatientBirthDate": "",
                                         "NumberOfPatientRelatedStudies": "", **keys}, tmp_path)


# ---- STUDY level ----------------------------------------------------------------------


def test_study_level_universal_returns_every_study_with_computed_keys(
        loaded: Loaded, tmp_path: Path) -> None:
    keys = {**STUDY_RETURN, "StudyID": "", "ReferringPhysicianName": "",
            "SOPClassesInStudy": "", "NumberOfPatientRelatedStudies": "",
            # not in the index: from the stored metadata, empty where no file has one
            "InstitutionName": "", "PatientComments": ""}
    rsp = check(loaded, "study", "STUDY", keys, tmp_path, at_least=10)
    assert len(rsp) == len(loaded.corpus.entities("STUDY"))
    sample = next(r for r in rsp if r.PatientID == "SYN0001")
    assert sample.InstitutionName == "ANIM Synthetic Hospital A"
    assert all(r.PatientComments in ("", None) for r in rsp)


# (matching keys, how many studies they must select at least: 0 = none expected)
@pytest.mark.parametrize(("keys", "at_least"), [
    pytest.param({"PatientID": "SYN0003"}, 2, id="patient-id"),
    pytest.param({"AccessionNumber": "ACC20260010"}, 1, id="accession"),
    pytest.param({"AccessionNumber": "ACC20260000\\ACC20260020"}, 2, id="accession-list"),
    pytest.param({"AccessionNumber": "ACC202600?0"}, 3, id="accession-wildcard"),
    # wildcard matching is case-sensitive outside PN
    pytest.param({"AccessionNumber": "acc*"}, 0, id="accession-case"),
    pytest.param({"StudyDescription": "CT*"}, 2, id="description"),
    # '_' and '%' are characters, not SQL wildcards
    pytest.param({"StudyDescription": "CT_*"}, 0, id="description-underscore"),
    pytest.param({"StudyDescription": "%"}, 0, id="description-percent"),
    pytest.param({"StudyDate": "20240310"}, 1, id="date"),
    pytest.param({"StudyDate": "20240401-20240515"}, 2, id="date-closed"),
    pytest.param({"StudyDate": "-20240401"}, 5, id="date-open-start"),
    pytest.param({"StudyDate": "20240501-"}, 2, id="date-open-end"),
    pytest.param({"StudyTime": "0816-0900"}, 2, id="time-closed"),
    pytest.param({"StudyTime": "0934-0934"}, 1, id="time-fraction-in-minute"),
    pytest.param({"StudyTime": "-0815"}, 2, id="time-open-start"),
    pytest.param({"StudyTime": "1200-"}, 2, id="time-open-end"),
    pytest.param({"StudyDate": "20240101-20241231", "StudyTime": "-0816"}, 2,
                 id="date-and-time"),
    pytest.param({"ModalitiesInStudy": "MR"}, 3, id="modality"),
    pytest.param({"ModalitiesInStudy": "CT\\MR"}, 6, id="modality-list"),
    pytest.param({"ModalitiesInStudy": "M?"}, 3, id="modality-wildcard"),
    pytest.param({"ModalitiesInStudy": "SEG"}, 1, id="modality-pydicom"),
    # with another key the archive filters on the study's modality set instead
    pytest.param({"ModalitiesInStudy": "MR", "StudyDate": "20240101-20241231"}, 2,
                 id="modality-with-date"),
    pytest.param({"ModalitiesInStudy": "CT\\MR", "PatientID": "SYN0003"}, 2,
                 id="modality-list-with-patient"),
    pytest.param({"ModalitiesInStudy": "US", "PatientID": "SYN0003"}, 0,
                 id="modality-absent-with-patient"),
])
def test_study_level_matching(loaded: Loaded, tmp_path: Path, keys: dict[str, str],
                              at_least: int) -> None:
    check(loaded, "study", "STUDY", {**STUDY_RETURN, **keys}, tmp_path, at_least)


def test_study_uid_list_returns_exactly_those_studies(loaded: Loaded, tmp_path: Path) -> None:
    a, b = study_of(loaded.corpus, "SYN0001"), study_of(loaded.corpus, "SYN0003", 1)
    uids = f"{a['StudyInstanceUID']}\\{b['StudyInstanceUID']}"
    rsp = check(loaded, "study", "STUDY", {**STUDY_RETURN, "StudyInstanceUID": uids}, tmp_path)
    assert len(rsp) == 2


def test_patient_root_study_level_needs_and_uses_the_patient(loaded: Loaded,
                                                             tmp_path: Path) -> None:
    for pid in sorted({e["PatientID"] for e in loaded.corpus.entities("PATIENT")} - {""}):
        check(loaded, "patient", "STUDY", {**STUDY_RETURN, "PatientID": pid}, tmp_path)


# ---- SERIES and IMAGE levels -----------------------------------------------------------

SERIES_RETURN = {"Modality": "", "SeriesNumber": "", "SeriesDescription": "",
                 "BodyPartExamined": "", "NumberOfSeriesRelatedInstances": ""}
IMAGE_RETURN = {"SOPClassUID": "", "InstanceNumber": ""}


def test_series_level_of_every_study_in_both_models(loaded: Loaded, tmp_path: Path) -> None:
    for study in loaded.corpus.entities("STUDY"):
        uid = study["StudyInstanceUID"]
        check(loaded, "study", "SERIES", {**SERIES_RETURN, "StudyInstanceUID": uid}, tmp_path)
        if study["PatientID"]:
            check(loaded, "patient", "SERIES", {
                **SERIES_RETURN, "PatientID": study["PatientID"], "StudyInstanceUID": uid},
                tmp_path)


@pytest.mark.parametrize("keys", [
    {"Modality": "MR"},
    {"Modality": "CT"},  # none in this study
    {"SeriesDescription": "T? *axial"},
    {"SeriesDescription": "t1*"},  # case-sensitive: none
    {"SeriesNumber": "2"},
    {"SeriesInstanceUID": "<both>"},
], ids=["modality", "modality-none", "description-wildcard", "description-case",
        "number", "uid-list"])
@pytest.mark.parametrize("model", ["study", "patient"])
def test_series_level_matching(loaded: Loaded, tmp_path: Path, model: str,
                               keys: dict[str, str]) -> None:
    study = study_of(loaded.corpus, "SYN0002")
    if "SeriesInstanceUID" in keys:
        keys = {"SeriesInstanceUID": "\\".join(
            s["SeriesInstanceUID"] for s in series_in(loaded.corpus, study["StudyInstanceUID"]))}
    at_least = 0 if keys in ({"Modality": "CT"}, {"SeriesDescription": "t1*"}) else 1
    check(loaded, model, "SERIES", {**SERIES_RETURN, "PatientID": "SYN0002",
                                    "StudyInstanceUID": study["StudyInstanceUID"], **keys},
          tmp_path, at_least)


def test_image_level_of_every_series_in_both_models(loaded: Loaded, tmp_path: Path) -> None:
    for series in loaded.corpus.entities("SERIES"):
        if series["SeriesInstanceUID"] == loaded.bulk_series:
            continue  # covered by the C-CANCEL test
        uids = {"StudyInstanceUID": series["StudyInstanceUID"],
                "SeriesInstanceUID": series["SeriesInstanceUID"]}
        check(loaded, "study", "IMAGE", {**IMAGE_RETURN, **uids}, tmp_path)
        if series["PatientID"]:
            check(loaded, "patient", "IMAGE", {**IMAGE_RETURN, **uids,
                                               "PatientID": series["PatientID"]}, tmp_path)


@pytest.mark.parametrize("keys", [
    {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"},  # CT Image Storage: all of the series
    {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"},  # MR Image Storage: none
    {"InstanceNumber": "3"},
    {"InstanceNumber": "2\\5"},
    {"SOPInstanceUID": "<one>"},
    {"SOPInstanceUID": "<two>"},
], ids=["sop-class", "sop-class-none", "instance-number", "instance-number-list", "sop-uid",
        "sop-uid-list"])
def test_image_level_matching(loaded: Loaded, tmp_path: Path, keys: dict[str, str]) -> None:
    study = study_of(loaded.corpus, "SYN0001")
    series = series_in(loaded.corpus, study["StudyInstanceUID"])[0]
    if "SOPInstanceUID" in keys:
        uids = [m["SOPInstanceUID"] for m in series["_members"][2:4]]
        keys = {"SOPInstanceUID": uids[0] if keys["SOPInstanceUID"] == "<one>" else
                "\\".join(uids)}
    uids = {"StudyInstanceUID": study["StudyInstanceUID"],
            "SeriesInstanceUID": series["SeriesInstanceUID"]}
    at_least = 0 if keys.get("SOPClassUID", "").endswith(".4") else 1
    check(loaded, "study", "IMAGE", {**IMAGE_RETURN, **uids, **keys}, tmp_path, at_least)
    check(loaded, "patient", "IMAGE", {**IMAGE_RETURN, **uids, **keys, "PatientID": "SYN0001"},
          tmp_path, at_least)


# ---- malformed identifiers and C-CANCEL, with pynetdicom as the SCU ----------------------

MODELS = {"patient": PatientRootQueryRetrieveInformationModelFind,
          "study": StudyRootQueryRetrieveInformationModelFind}
PENDING = (0xFF00, 0xFF01)


def identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for kw, value in keys.items():
        setattr(ds, kw, value)
    return ds


def wrong_vr() -> Dataset:
    ds = identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="")
    ds.add(DataElement(0x00100010, "US", 5))  # Patient's Name is PN
    return ds


def uid_wildcard() -> Dataset:
    ds = identifier(QueryRetrieveLevel="STUDY")
    ds.add(DataElement(0x0020000D, "UI", "1.2.*", validation_mode=config.IGNORE))
    return ds


@dataclass
class FindResult:
    final: Dataset
    pending: list[Dataset]

    @property
    def status(self) -> int:
        return int(self.final.Status)


def pynetdicom_find(assoc: Any, model: str, ident: Dataset, msg_id: int = 1,
                    cancel_after: int | None = None) -> FindResult:
    """One C-FIND on *assoc*; with *cancel_after*, a C-CANCEL after that many matches."""
    pending: list[Dataset] = []
    final = None
    for status, rsp in assoc.send_c_find(ident, MODELS[model], msg_id=msg_id):
        assert "Status" in status, "no C-FIND response (association aborted?)"
        if status.Status in PENDING:
            pending.append(rsp)
            if len(pending) == cancel_after:
                assoc.send_c_cancel(msg_id, query_model=MODELS[model])
        else:
            assert final is None, "two final responses"
            final = status
    assert final is not None
    return FindResult(final, pending)


@pytest.fixture
def find_assoc(loaded: Loaded) -> Iterator[Any]:
    ae = scu("PYFINDSCU")
    for uid in MODELS.values():
        # Explicit VR: the identifier carries each element's VR as we set it
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", loaded.server.dimse_port, ae_title=loaded.server.aet)
    assert assoc.is_established
    yield assoc
    assoc.release()


@pytest.mark.parametrize(("model", "ident"), [
    ("study", wrong_vr()),
    ("study", identifier(PatientName="DOE*", StudyInstanceUID="")),  # no level
    ("study", identifier(QueryRetrieveLevel="FOO", StudyInstanceUID="")),
    ("study", identifier(QueryRetrieveLevel="PATIENT", PatientID="")),  # not in Study Root
    ("study", identifier(QueryRetrieveLevel="SERIES", SeriesInstanceUID="", Modality="CT")),
    ("study", identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID="1.2.3\\1.2.4",
                         SeriesInstanceUID="")),  # the study must be one value
    ("patient", identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="")),  # no PatientID
    ("patient", identifier(QueryRetrieveLevel="IMAGE", PatientID="SYN0001",
                           StudyInstanceUID="1.2.3", SOPInstanceUID="")),  # no series
    ("study", identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="",
                         SOPInstanceUID="")),  # a key below the level
    ("study", uid_wildcard()),
], ids=["wrong-vr", "no-level", "unknown-level", "patient-level-in-study-root",
        "series-without-study", "series-in-two-studies", "study-without-patient",
        "image-without-series", "key-below-level", "uid-wildcard"])
def test_malformed_identifier_fails_with_comment_and_server_keeps_serving(
        loaded: Loaded, find_assoc: Any, tmp_path: Path, model: str, ident: Dataset) -> None:
    bad = pynetdicom_find(find_assoc, model, ident)
    assert not bad.pending
    assert 0xA900 <= bad.status <= 0xA9FF or 0xC000 <= bad.status <= 0xCFFF, hex(bad.status)
    assert str(bad.final.get("ErrorComment", "")).strip(), bad.final
    # the same association, and the server, answer the next query normally
    good = pynetdicom_find(find_assoc, "study", identifier(
        QueryRetrieveLevel="STUDY", PatientID="SYN0003", StudyInstanceUID=""), msg_id=2)
    assert good.status == 0x0000
    assert sorted(r.StudyInstanceUID for r in good.pending) == sorted(
        e["StudyInstanceUID"] for e in expected(loaded.corpus, "STUDY", {"PatientID": "SYN0003"}))
    assert loaded.server.alive()
    check(loaded, "study", "STUDY", {"AccessionNumber": "ACC20260010"}, tmp_path)


def test_c_cancel_stops_a_find_before_all_matches_are_sent(loaded: Loaded,
                                                           find_assoc: Any) -> None:
    ident = identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID=loaded.bulk_study,
                       SeriesInstanceUID=loaded.bulk_series, SOPInstanceUID="",
                       InstanceNumber="", InstitutionName="")
    cancelled = pynetdicom_find(find_assoc, "study", ident, msg_id=7, cancel_after=1)
    assert cancelled.status == 0xFE00
    assert 1 <= len(cancelled.pending) < BULK_INSTANCES
    # uncancelled, the same query on the same association returns the whole series
    whole = pynetdicom_find(find_assoc, "study", ident, msg_id=8)
    assert whole.status == 0x0000
    want = expected(loaded.corpus, "IMAGE", {"SeriesInstanceUID": loaded.bulk_series})
    assert sorted(r.SOPInstanceUID for r in whole.pending) == sorted(
        e["SOPInstanceUID"] for e in want)
    assert len(want) == BULK_INSTANCES
