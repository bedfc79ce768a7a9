"""The admin view's JSON (/api/admin/*): counts and dedup savings, recent changes, peers.

A real server, real DCMTK storescu; the byte figures are checked against what the
blob store holds (files on disk, or S3 objects), so a made-up number cannot pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.conftest import SAMPLES, AnimServer, blob_bytes, sample_files, storescu
from tests.integration.test_dedup_versions import renamed_copy


@pytest.fixture
def server(make_server: type[AnimServer], tmp_path: Path) -> AnimServer:
    return make_server(tmp_path / "data",
                       args=["--known-ae", "PACS=127.0.0.1:11150"]).start()


def _get(srv: AnimServer, path: str) -> requests.Response:
    return requests.get(f"{srv.url}{path}", timeout=30)


def test_summary_counts_and_dedup_savings_match_the_disk(server: AnimServer,
                                                         tmp_path: Path) -> None:
    first = storescu(server.dimse_port, SAMPLES, calling="MODALITY1")
    assert first.returncode == 0, first.stderr
    s1 = _get(server, "/api/admin/summary").json()
    n = len(sample_files())
    assert (s1["instances"], s1["versions"], s1["patients"]) == (n, n, 3)
    assert s1["received_bytes"] > 0
    assert s1["stored_bytes"] == blob_bytes(server.data_dir)
    assert s1["saved_bytes"] == s1["received_bytes"] - s1["stored_bytes"]

    # the same study again, renamed: new versions, only their headers are new bytes
    study = next(p for p in sorted(SAMPLES.iterdir()) if p.is_dir())
    corrected = renamed_copy(study, tmp_path / "corrected", "RENAMED^PATIENT")
    again = storescu(server.dimse_port, tmp_path / "corrected", calling="MODALITY1")
    assert again.returncode == 0, again.stderr
    s2 = _get(server, "/api/admin/summary").json()
    assert s2["versions"] == n + len(corrected)
    assert s2["stored_bytes"] == blob_bytes(server.data_dir)
    received = s2["received_bytes"] - s1["received_bytes"]
    written = s2["stored_bytes"] - s1["stored_bytes"]
    assert received > 0
    assert 0 < written < received  # one new header blob per instance, the pixels shared
    # the pixel data of the corrections were already held: most of it was saved
    assert s2["saved_bytes"] - s1["saved_bytes"] > received / 2


def test_changes_newest_first_and_peers_with_activity(server: AnimServer) -> None:
    done = storescu(server.dimse_port, SAMPLES, calling="MODALITY1")
    assert done.returncode == 0, done.stderr
    changes = _get(server, "/api/admin/changes?limit=5").json()
    assert len(changes) == 5
    seqs = [c["seq"] for c in changes]
    assert seqs == sorted(seqs, reverse=True)
    assert all(c["kind"] == "instance_created" and c["sop_uid"] for c in changes)

    peers = {p["ae_title"]: p for p in _get(server, "/api/admin/peers").json()}
    assert peers["PACS"]["configured"] is True
    assert peers["PACS"]["instances"] == 0
    assert peers["PACS"]["last_activity"] is None
    modality = peers["MODALITY1"]
    assert modality["configured"] is False
    assert modality["instances"] == len(sample_files())
    assert modality["last_activity"] >= changes[-1]["at"][:19]


def test_changes_limit_is_checked(server: AnimServer) -> None:
    for query in ("limit=0", "limit=501", "limit=x"):
        r = _get(server, f"/api/admin/changes?{query}")
        assert r.status_code == 400, query
        assert "limit" in r.json()["reason"]
