"""Deduplication, corrections and quarantine over DIMSE, measured in the blob store.

Acceptance (ingest issue): sending the same study twice leaves one index row per
instance and adds no pixel bytes to disk; re-sending a study with a corrected
PatientName from the same AE adds only header bytes and makes the correction
current; the same study corrected by another institution's AE is quarantined and
the original stays current (DESIGN.md "Storage: deduplicated by content").
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import (
    SAMPLES,
    AnimServer,
    anim_cli,
    blob_bytes,
    blob_count,
    open_archive,
    storescu,
)

pytestmark = pytest.mark.integration

STUDY = SAMPLES / "SYN0001" / "study1"  # one patient's CT study: 2 series, 12 instances
ORIGINAL_NAME = "DOE^JANE"
CORRECTED_NAME = "DOE^JANE^MARIE"
OTHER_NAME = "DOE^JANET"
WARNING_COERCION = 0xB000  # PS3.4 B.2.3; scp/status.py: quarantined


def renamed_copy(src: Path, dst: Path, name: str) -> list[Path]:
    """A copy of every file of *src* with PatientName set to *name*, all else kept.

    pydicom writes the data set back in the transfer syntax it was read in; the pixel
    data value is the same bytes.
    """
    out: list[Path] = []
    for path in sorted(src.rglob("*.dcm")):
        ds = dcmread(path)
        ds.PatientName = name
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(target)
        back = dcmread(target)
        assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert back.PixelData == dcmread(path).PixelData
        out.append(target)
    return out


def pixel_bytes(paths: list[Path]) -> int:
    return sum(len(dcmread(p).PixelData) for p in paths)


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def name_in(data: bytes) -> str:
    from io import BytesIO

    return str(dcmread(BytesIO(data), stop_before_pixels=True).PatientName)


def send(port: int, folder: Path, calling: str) -> str:
    """storescu (verbose) a folder; return its log, which names each response's status."""
    r = storescu(port, folder, calling=calling, extra=("-v",))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


@pytest.fixture
def study(tmp_path: Path) -> dict[str, Path]:
    """The original study and two corrected copies, each in its own folder."""
    original = tmp_path / "original"
    shutil.copytree(STUDY, original)
    corrected = tmp_path / "corrected"
    other = tmp_path / "other"
    renamed_copy(original, corrected, CORRECTED_NAME)
    renamed_copy(original, other, OTHER_NAME)
    return {"original": original, "corrected": corrected, "other": other}


def test_same_study_twice_adds_no_rows_and_no_bytes(
        serve: AnimServer, study: dict[str, Path]) -> None:
    files = sorted(study["original"].rglob("*.dcm"))
    send(serve.dimse_port, study["original"], "MODALITY1")
    with open_archive(serve.data_dir) as archive:
        first = archive.index.counts()
    assert first["instance"] == len(files)
    assert first["version"] == len(files)
    bytes_first, files_first = blob_bytes(serve.data_dir), blob_count(serve.data_dir)
    # header + pixel blob per instance; the pixels of 12 phantoms are all different
    assert files_first == 2 * len(files)

    log = send(serve.dimse_port, study["original"], "MODALITY1")
    assert log.count("Received Store Response (Success)") == len(files), log
    with open_archive(serve.data_dir) as archive:
        assert archive.index.counts() == first
    assert blob_bytes(serve.data_dir) == bytes_first
    assert blob_count(serve.data_dir) == files_first


def test_correction_from_same_ae_adds_only_headers_and_becomes_current(
        serve: AnimServer, study: dict[str, Path]) -> None:
    originals = sorted(study["original"].rglob("*.dcm"))
    corrected = sorted(study["corrected"].rglob("*.dcm"))
    send(serve.dimse_port, study["original"], "MODALITY1")
    with open_archive(serve.data_dir) as archive:
        before = archive.index.counts()
        first = {sop_uid(p): archive.read_bytes(sop_uid(p)) for p in originals}
        first_vid = {u: archive.locate(u).version_id for u in first}
    bytes_before, files_before = blob_bytes(serve.data_dir), blob_count(serve.data_dir)

    send(serve.dimse_port, study["corrected"], "MODALITY1")
    growth = blob_bytes(serve.data_dir) - bytes_before
    headers = sum(p.stat().st_size for p in corrected) - pixel_bytes(corrected)
    assert 0 < growth < headers, (growth, headers)
    # one new header blob per instance, no new pixel blob
    assert blob_count(serve.data_dir) - files_before == len(corrected)

    with open_archive(serve.data_dir) as archive:
        after = archive.index.counts()
        assert after["instance"] == before["instance"]
        assert after["version"] == before["version"] + len(corrected)
        for uid, old_bytes in first.items():
            states = {v.id: v.state.value for v in archive.versions(uid)}
            current = archive.locate(uid)
            assert current.version_id != first_vid[uid]
            assert states == {first_vid[uid]: "superseded", current.version_id: "current"}
            assert name_in(archive.read_bytes(uid)) == CORRECTED_NAME
            old = archive.read_bytes(uid, first_vid[uid])
            assert old == old_bytes
            assert name_in(old) == ORIGINAL_NAME


def test_correction_from_other_institution_is_quarantined_until_promoted(
        serve: AnimServer, study: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    n = len(list(study["original"].rglob("*.dcm")))
    send(serve.dimse_port, study["original"], "MODALITY1")
    send(serve.dimse_port, study["corrected"], "MODALITY1")
    with open_archive(serve.data_dir) as archive:
        counts = archive.index.counts()
        uids = archive.index.instance_uids()
        current = {u: archive.locate(u).version_id for u in uids}
        current_bytes = {u: archive.read_bytes(u) for u in uids}
        history = {u: [v.id for v in archive.versions(u)] for u in uids}
    bytes_before = blob_bytes(serve.data_dir)

    # Another hospital forwarding the identical corrected study: idempotent, no conflict
    log = send(serve.dimse_port, study["corrected"], "OTHERHOSP")
    assert log.count("Received Store Response (Success)") == n, log
    with open_archive(serve.data_dir) as archive:
        assert archive.index.counts() == counts
    assert blob_bytes(serve.data_dir) == bytes_before

    # Another hospital's different correction: a warning, kept aside
    log = send(serve.dimse_port, study["other"], "OTHERHOSP")
    # DCMTK names 0xB000 "CoercionOfDataElements"
    assert log.count("Received Store Response (Warning: CoercionOfDataElements)") == n, log
    assert "Received Store Response (Success)" not in log, log

    # The exact status and comment, as a pynetdicom SCU reads them (re-send of one file)
    from pynetdicom import AE, _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    one = sorted(study["other"].rglob("*.dcm"))[0]
    meta = dcmread(one, stop_before_pixels=True).file_meta
    ae = AE(ae_title="OTHERHOSP")
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", serve.dimse_port, ae_title="ANIM")
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(one)
    finally:
        assoc.release()
    assert rsp.Status == WARNING_COERCION
    assert "quarantine" in str(rsp.get("ErrorComment", "")).lower()

    with open_archive(serve.data_dir) as archive:
        after = archive.index.counts()
        assert after["instance"] == counts["instance"]
        assert after["version"] == counts["version"] + n  # the re-send added nothing
        quarantined = archive.quarantined()
        assert len(quarantined) == n
        assert {v.institution for v in quarantined} == {"OTHERHOSP"}
        assert {v.sop_instance_uid for v in quarantined} == set(uids)
        for u in uids:
            assert archive.locate(u).version_id == current[u]
            assert archive.read_bytes(u) == current_bytes[u]
            assert name_in(archive.read_bytes(u)) == CORRECTED_NAME
        q_of = {v.sop_instance_uid: v.id for v in quarantined}
        for v in quarantined:
            assert name_in(archive.read_bytes(v.sop_instance_uid, v.id)) == OTHER_NAME

    # Administrators decide, with the CLI, on the same index (server stopped first)
    serve.stop()
    data = str(serve.data_dir)
    r = anim_cli("quarantine", "list", "--data", data)
    assert r.returncode == 0, r.stdout + r.stderr
    listed = {int(m.group(1)): m.group(2)
              for m in re.finditer(r"^(\d+)\t(\S+)\t", r.stdout, re.MULTILINE)}
    assert listed == {vid: uid for uid, vid in q_of.items()}, r.stdout
    assert f"{n} quarantined version(s)" in r.stdout

    promoted_uid, rejected_uid = uids[0], uids[1]
    r = anim_cli("quarantine", "promote", str(q_of[promoted_uid]), "--data", data)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"version {q_of[promoted_uid]} of {promoted_uid} is now current" in r.stdout
    r = anim_cli("quarantine", "reject", str(q_of[rejected_uid]), "--data", data)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"version {q_of[rejected_uid]} of {rejected_uid} is now rejected" in r.stdout

    with open_archive(serve.data_dir) as archive:
        states = {v.id: v.state.value for v in archive.versions(promoted_uid)}
        original_vid, corrected_vid = history[promoted_uid]
        assert states == {original_vid: "superseded", corrected_vid: "superseded",
                          q_of[promoted_uid]: "current"}
        assert name_in(archive.read_bytes(promoted_uid)) == OTHER_NAME
        # the superseded correction is still there, byte for byte
        assert archive.read_bytes(promoted_uid, corrected_vid) == current_bytes[promoted_uid]

        states = {v.id: v.state.value for v in archive.versions(rejected_uid)}
        original_vid, corrected_vid = history[rejected_uid]
        assert states == {original_vid: "superseded", corrected_vid: "current",
                          q_of[rejected_uid]: "rejected"}
        assert archive.read_bytes(rejected_uid) == current_bytes[rejected_uid]
        assert len(archive.quarantined()) == n - 2
    r = anim_cli("quarantine", "list", "--data", data)
    assert f"{n - 2} quarantined version(s)" in r.stdout, r.stdout


def test_correction_from_another_ae_of_same_configured_institution_is_current(
        make_server: type[AnimServer], study: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "anim.toml"
    config.write_text(
        '[dimse.known_aes.CT1]\nhost = "127.0.0.1"\nport = 104\ninstitution = "HOSP-A"\n\n'
        '[dimse.known_aes.CT2]\nhost = "127.0.0.1"\nport = 104\ninstitution = "HOSP-A"\n',
        encoding="utf-8")
    srv = make_server(tmp_path / "data", args=["--config", str(config)]).start()
    n = len(list(study["original"].rglob("*.dcm")))
    send(srv.dimse_port, study["original"], "CT1")
    log = send(srv.dimse_port, study["corrected"], "CT2")
    assert log.count("Received Store Response (Success)") == n, log
    with open_archive(srv.data_dir) as archive:
        counts = archive.index.counts()
        assert counts["instance"] == n
        assert counts["version"] == 2 * n
        assert archive.quarantined() == []
        for uid in archive.index.instance_uids():
            versions = archive.versions(uid)
            assert [(v.state.value, v.ae_title, v.institution) for v in versions] == [
                ("superseded", "CT1", "HOSP-A"), ("current", "CT2", "HOSP-A")]
            assert name_in(archive.read_bytes(uid)) == CORRECTED_NAME
