"""The index behaves the same on SQLite and on a real PostgreSQL.

Every test runs twice through the ``index_url`` fixture: once on a fresh SQLite file and
once on a fresh database of the PostgreSQL server that ``./run-tests`` starts. Expected
numbers are derived from the sample files with pydicom, never written down.
"""

from __future__ import annotations

import contextlib
import functools
import random
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from anim import Archive, NotFound, Source, StoreOutcome, VersionState, load_config
from anim.index import schema
from anim.index.migrations import STEPS, migrate
from tests.conftest import sample_files

HOSP_A = Source(institution="HOSP-A", ae_title="CT_A", host="10.1.0.5", protocol="dimse")
HOSP_A_PACS = Source(institution="HOSP-A", ae_title="PACS_A", host="10.1.0.9", protocol="dimse")
HOSP_B = Source(institution="HOSP-B", ae_title="PACS_B", host="10.2.0.9", protocol="dimse")

TABLES = ("patient", "study", "series", "instance", "version", "change")


# ---- expectations derived from the files ---------------------------------------------------


@dataclass
class StudyFacts:
    series: set[str] = field(default_factory=set)
    instances: int = 0
    modalities: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class SampleFacts:
    patients: frozenset[tuple[str, str]]  # (PatientID, IssuerOfPatientID)
    studies: dict[str, StudyFacts]
    series: frozenset[str]
    instances: tuple[str, ...]

    def counts(self) -> dict[str, int]:
        n = len(self.instances)
        return {"patient": len(self.patients), "study": len(self.studies),
                "series": len(self.series), "instance": n, "version": n, "change": n}


@functools.cache
def facts() -> SampleFacts:
    patients: set[tuple[str, str]] = set()
    studies: dict[str, StudyFacts] = defaultdict(StudyFacts)
    series: set[str] = set()
    sops: list[str] = []
    for path in sample_files():
        ds = dcmread(path, stop_before_pixels=True)
        patients.add((str(ds.PatientID), str(ds.get("IssuerOfPatientID", "") or "")))
        st = studies[str(ds.StudyInstanceUID)]
        st.series.add(str(ds.SeriesInstanceUID))
        st.instances += 1
        st.modalities.add(str(ds.Modality))
        series.add(str(ds.SeriesInstanceUID))
        sops.append(str(ds.SOPInstanceUID))
    assert len(set(sops)) == len(sops), "sample SOP Instance UIDs must be unique"
    return SampleFacts(frozenset(patients), dict(studies), frozenset(series), tuple(sops))


@functools.cache
def sample_bytes() -> tuple[bytes, ...]:
    return tuple(p.read_bytes() for p in sample_files())


def edited(data: bytes, **attrs: Any) -> bytes:
    """The object in *data* with some attributes changed, as Part 10 bytes."""
    ds = dcmread(BytesIO(data))
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    out = BytesIO()
    ds.save_as(out)
    return out.getvalue()


def sop_uid(data: bytes) -> str:
    return str(dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def header(data: bytes) -> Dataset:
    return dcmread(BytesIO(data), stop_before_pixels=True)


# ---- archive on the backend under test -----------------------------------------------------


@contextlib.contextmanager
def open_at(data_dir: Path, index_url: str) -> Iterator[Archive]:
    cfg = load_config(env={}, overrides={"storage": {"data_dir": str(data_dir)},
                                         "index": {"url": index_url}})
    with Archive.open(cfg) as archive:
        yield archive


@pytest.fixture
def archive(tmp_path: Path, index_url: str) -> Iterator[Archive]:
    with open_at(tmp_path / "d", index_url) as a:
        yield a


def store_all(archive: Archive, source: Source = HOSP_A) -> list[StoreOutcome]:
    return [archive.store(data, source).outcome for data in sample_bytes()]


def series_instances(archive: Archive, series_uid: str) -> int:
    s = schema.series
    with archive.index.engine.connect() as conn:
        return int(conn.execute(select(s.c.num_instances)
                                .where(s.c.series_uid == series_uid)).scalar_one())


# ---- tests ------------------------------------------------------------------------------------


def test_storing_the_samples_creates_one_row_per_entity(archive: Archive) -> None:
    outcomes = store_all(archive)
    assert outcomes == [StoreOutcome.STORED] * len(facts().instances)
    assert archive.index.counts() == facts().counts()
    assert sorted(archive.index.instance_uids()) == sorted(facts().instances)
    assert sorted(archive.index.study_uids()) == sorted(facts().studies)


def test_identical_resend_is_already_stored_and_adds_no_rows(archive: Archive) -> None:
    store_all(archive)
    before = archive.index.counts()
    # the same modality again, another AE of the same hospital, and another hospital
    # forwarding the very same objects: content is identical, so nothing new
    for source in (HOSP_A, HOSP_A_PACS, HOSP_B):
        assert set(store_all(archive, source)) == {StoreOutcome.ALREADY_STORED}
    assert archive.index.counts() == before
    assert archive.quarantined() == []


def test_resend_with_other_file_meta_is_already_stored(archive: Archive) -> None:
    data = sample_bytes()[0]
    first = archive.store(data, HOSP_A)
    ds = dcmread(BytesIO(data))
    ds.file_meta.ImplementationVersionName = "OTHER_PACS_9"
    ds.file_meta.SourceApplicationEntityTitle = "PACS_B"
    out = BytesIO()
    ds.save_as(out)
    assert out.getvalue() != data
    again = archive.store(out.getvalue(), HOSP_B)
    assert again.outcome == StoreOutcome.ALREADY_STORED
    assert again.version_id == first.version_id
    assert archive.index.counts()["version"] == 1


def test_correction_from_same_institution_becomes_current(archive: Archive) -> None:
    store_all(archive)
    before = archive.index.counts()
    original = sample_bytes()[0]
    uid = sop_uid(original)
    corrected = edited(original, PatientName="DOE^JANE^MARIE")

    res = archive.store(corrected, HOSP_A_PACS)

    assert res.outcome == StoreOutcome.CORRECTED
    assert res.sop_instance_uid == uid
    versions = archive.versions(uid)
    assert [v.state for v in versions] == [VersionState.SUPERSEDED, VersionState.CURRENT]
    assert versions[-1].id == res.version_id
    assert archive.read_bytes(uid) == corrected
    assert archive.read_bytes(uid, versions[0].id) == original
    after = archive.index.counts()
    assert after == {**before, "version": before["version"] + 1,
                     "change": before["change"] + 2}
    row = archive.index.study_row(res.study_instance_uid)
    assert row["patient_name"] == "DOE^JANE^MARIE"  # the newest header wins
    # the new name is a patient update, then the instance's replacement
    news = archive.index.change_feed(before["change"], 10)
    assert [(c["kind"], c["sop_uid"]) for c in news] == [
        ("patient_updated", ""), ("instance_replaced", uid)]


def test_other_institution_is_quarantined_and_current_is_unchanged(archive: Archive) -> None:
    store_all(archive)
    before = archive.index.counts()
    original = sample_bytes()[0]
    uid = sop_uid(original)
    conflicting = edited(original, PatientName="OTHER^PERSON")

    res = archive.store(conflicting, HOSP_B)

    assert res.outcome == StoreOutcome.QUARANTINED
    assert archive.read_bytes(uid) == original
    assert archive.read_bytes(uid, res.version_id) == conflicting
    assert [v.state for v in archive.versions(uid)] == [VersionState.CURRENT,
                                                        VersionState.QUARANTINED]
    [q] = archive.quarantined()
    assert (q.id, q.institution, q.sop_instance_uid) == (res.version_id, "HOSP-B", uid)
    assert archive.index.counts() == {**before, "version": before["version"] + 1,
                                      "change": before["change"] + 1}
    last = archive.index.changes_since(before["change"])
    assert [(c["kind"], c["sop_uid"]) for c in last] == [("instance_quarantined", uid)]
    name = str(header(original).PatientName)
    assert archive.index.study_row(res.study_instance_uid)["patient_name"] == name
    # the same conflicting bytes again: still quarantined, no second copy
    again = archive.store(conflicting, HOSP_B)
    assert (again.outcome, again.version_id) == (StoreOutcome.QUARANTINED, res.version_id)
    assert archive.index.counts()["version"] == before["version"] + 1


def test_promoting_a_quarantined_version_makes_it_current(archive: Archive) -> None:
    store_all(archive)
    original = sample_bytes()[0]
    uid = sop_uid(original)
    conflicting = edited(original, PatientName="OTHER^PERSON")
    vid = archive.store(conflicting, HOSP_B).version_id
    changes_before = archive.index.counts()["change"]

    info = archive.promote(vid)

    assert (info.id, info.state) == (vid, VersionState.CURRENT)
    assert archive.read_bytes(uid) == conflicting
    assert [v.state for v in archive.versions(uid)] == [VersionState.SUPERSEDED,
                                                        VersionState.CURRENT]
    assert archive.quarantined() == []
    assert archive.index.study_row(info.study_instance_uid)["patient_name"] == "OTHER^PERSON"
    assert [c["kind"] for c in archive.index.changes_since(changes_before)] == [
        "patient_updated", "instance_replaced"]
    with pytest.raises(NotFound, match="not quarantined"):
        archive.promote(vid)


def test_rejecting_a_quarantined_version_keeps_the_current_one(archive: Archive) -> None:
    store_all(archive)
    original = sample_bytes()[0]
    uid = sop_uid(original)
    conflicting = edited(original, PatientName="OTHER^PERSON")
    vid = archive.store(conflicting, HOSP_B).version_id

    info = archive.reject(vid)

    assert (info.id, info.state) == (vid, VersionState.REJECTED)
    assert archive.read_bytes(uid) == original
    assert [v.state for v in archive.versions(uid)] == [VersionState.CURRENT,
                                                        VersionState.REJECTED]
    assert archive.quarantined() == []
    with pytest.raises(NotFound, match="not quarantined"):
        archive.promote(vid)
    with pytest.raises(NotFound, match="not quarantined"):
        archive.reject(vid)


def test_study_rows_carry_series_instance_and_modality_counts(archive: Archive) -> None:
    store_all(archive)
    for study_uid, expected in facts().studies.items():
        row = archive.index.study_row(study_uid)
        assert row["num_series"] == len(expected.series), study_uid
        assert row["num_instances"] == expected.instances, study_uid
        assert row["modalities"] == "\\".join(sorted(expected.modalities)), study_uid


def test_correction_into_a_new_series_moves_the_counts(archive: Archive) -> None:
    store_all(archive)
    original = sample_bytes()[0]
    ds = header(original)
    study_uid, old_series = str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
    study_before = archive.index.study_row(study_uid)
    old_series_before = series_instances(archive, old_series)
    new_series = generate_uid()

    res = archive.store(edited(original, SeriesInstanceUID=new_series, Modality="OT"), HOSP_A)

    assert res.outcome == StoreOutcome.CORRECTED
    study_after = archive.index.study_row(study_uid)
    assert study_after["num_series"] == study_before["num_series"] + 1
    assert study_after["num_instances"] == study_before["num_instances"]
    assert study_after["modalities"] == "\\".join(
        sorted(facts().studies[study_uid].modalities | {"OT"}))
    assert series_instances(archive, old_series) == old_series_before - 1
    assert series_instances(archive, new_series) == 1
    assert archive.index.counts()["instance"] == len(facts().instances)


def test_patient_is_identified_by_id_and_issuer(archive: Archive) -> None:
    base = sample_bytes()[0]

    def synthetic(issuer: str) -> bytes:
        return edited(base, PatientID="COLLIDE-0001", IssuerOfPatientID=issuer,
                      StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid(),
                      SOPInstanceUID=generate_uid())

    a, b, a2 = synthetic("HOSP-A"), synthetic("HOSP-B"), synthetic("HOSP-A")
    results = [archive.store(data, HOSP_A) for data in (a, b, a2)]

    assert [r.outcome for r in results] == [StoreOutcome.STORED] * 3
    assert archive.index.counts()["patient"] == 2
    rows = [archive.index.study_row(r.study_instance_uid) for r in results]
    assert [(r["patient_id"], r["issuer"]) for r in rows] == [
        ("COLLIDE-0001", "HOSP-A"), ("COLLIDE-0001", "HOSP-B"), ("COLLIDE-0001", "HOSP-A")]
    assert rows[0]["patient_fk"] == rows[2]["patient_fk"] != rows[1]["patient_fk"]


def test_changes_since_pages_through_a_strictly_increasing_sequence(archive: Archive) -> None:
    store_all(archive)
    original = sample_bytes()[0]
    archive.store(edited(original, PatientName="DOE^JANE^MARIE"), HOSP_A)
    archive.store(edited(original, PatientName="OTHER^PERSON"), HOSP_B)

    seen: list[dict[str, Any]] = []
    seq = 0
    while page := archive.index.changes_since(seq, limit=7):
        seen.extend(page)
        seq = page[-1]["seq"]
    seqs = [c["seq"] for c in seen]
    assert seqs == list(range(1, len(seqs) + 1))  # gap-free, in order
    assert len(seen) == archive.index.counts()["change"] == len(facts().instances) + 3
    assert archive.index.changes_since(seqs[-1]) == []
    assert Counter(c["kind"] for c in seen) == {
        "instance_created": len(facts().instances), "instance_replaced": 1,
        "instance_quarantined": 1, "patient_updated": 1}
    created = [c["sop_uid"] for c in seen if c["kind"] == "instance_created"]
    assert created == list(facts().instances)  # stored in this order


def test_reopening_applies_no_migration_and_keeps_the_data(tmp_path: Path,
                                                           index_url: str) -> None:
    data_dir = tmp_path / "d"
    with open_at(data_dir, index_url) as archive:
        store_all(archive)
        counts = archive.index.counts()
    for _ in range(2):
        with open_at(data_dir, index_url) as archive:
            assert migrate(archive.index.engine) == 0
            sv = schema.schema_version
            with archive.index.engine.connect() as conn:
                versions = list(conn.execute(select(sv.c.version).order_by(sv.c.version))
                                .scalars())
                dup = conn.execute(select(func.count()).select_from(sv)).scalar_one()
            assert versions == [number for number, _title, _step in STEPS]
            assert dup == len(STEPS)
            assert archive.index.counts() == counts
            for data in sample_bytes()[:3]:
                assert archive.read_bytes(sop_uid(data)) == data


def _hammer(archives: list[Archive], threads: int) -> list[tuple[str, StoreOutcome]]:
    """*threads* threads store every sample, each in its own order, over *archives*."""
    items = list(sample_bytes())
    results: list[tuple[str, StoreOutcome]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def work(n: int) -> None:
        order = items[:]
        random.Random(n).shuffle(order)
        archive = archives[n % len(archives)]
        try:
            start.wait(30)
            for data in order:
                r = archive.store(data, HOSP_A)
                with lock:
                    results.append((r.sop_instance_uid, r.outcome))
        except BaseException as e:  # reported below, in the test's thread
            with lock:
                errors.append(e)

    pool = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    assert not any(t.is_alive() for t in pool), "a storing thread hung"
    assert errors == [], errors
    return results


def _assert_stored_once(archive: Archive, results: list[tuple[str, StoreOutcome]],
                        threads: int) -> None:
    n = len(facts().instances)
    assert len(results) == threads * n
    stored = Counter(uid for uid, outcome in results if outcome == StoreOutcome.STORED)
    assert stored == dict.fromkeys(facts().instances, 1)
    assert {o for _u, o in results} == {StoreOutcome.STORED, StoreOutcome.ALREADY_STORED}
    assert archive.index.counts() == facts().counts()
    for study_uid, expected in facts().studies.items():
        row = archive.index.study_row(study_uid)
        assert (row["num_series"], row["num_instances"]) == (
            len(expected.series), expected.instances), study_uid


def test_concurrent_overlapping_stores_add_no_duplicate_rows(archive: Archive) -> None:
    results = _hammer([archive], threads=8)
    _assert_stored_once(archive, results, threads=8)


def test_two_archives_on_one_index_add_no_duplicate_rows(tmp_path: Path,
                                                         index_url: str) -> None:
    # two nodes sharing one index and one blob folder (scale-out), 4 threads each
    with open_at(tmp_path / "d", index_url) as a, open_at(tmp_path / "d", index_url) as b:
        results = _hammer([a, b], threads=8)
        _assert_stored_once(a, results, threads=8)
