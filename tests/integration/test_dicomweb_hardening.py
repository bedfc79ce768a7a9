"""Requests that once hurt the server: out-of-range numbers, repeated frames, HEAD on
streamed resources, a look-alike STOW type. Each gets a clear 4xx; the server stays up
and logs no patient data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import SAMPLES, AnimServer, storescu


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnimServer]:
    srv = AnimServer(tmp_path_factory.mktemp("hard") / "data").start()
    done = storescu(srv.dimse_port, SAMPLES)
    assert done.returncode == 0, done.stderr
    yield srv
    srv.stop()


def _first_instance(srv: AnimServer) -> str:
    rows = requests.get(f"{srv.url}/dicom-web/instances?limit=1", timeout=30).json()
    return str(rows[0]["00081190"]["Value"][0])


@pytest.mark.parametrize("query", [
    "PatientName=SECRETNAME*&offset=99999999999999999999",
    "PatientName=SECRETNAME*&limit=99999999999999999999",
])
def test_out_of_range_paging_is_400_and_logs_no_patient_data(loaded: AnimServer,
                                                              query: str) -> None:
    r = requests.get(f"{loaded.url}/dicom-web/studies?{query}", timeout=30)
    assert r.status_code == 400, r.text
    assert "between 0 and" in r.json()["reason"]
    assert "SECRETNAME" not in loaded.log


def test_out_of_range_integer_match_is_400(loaded: AnimServer) -> None:
    r = requests.get(f"{loaded.url}/dicom-web/instances?InstanceNumber=99999999999999999999",
                     timeout=30)
    assert r.status_code == 400, r.text
    assert "out of range" in r.json()["reason"]


def test_a_frame_asked_twice_is_400(loaded: AnimServer) -> None:
    url = _first_instance(loaded) + "/frames/1,1"
    r = requests.get(url, headers={"Accept": "multipart/related; type=application/octet-stream;"
                                             " transfer-syntax=*"}, timeout=30)
    assert r.status_code == 400, r.text
    assert "more than once" in r.json()["reason"]


def test_head_on_a_streamed_resource_sends_no_body(loaded: AnimServer) -> None:
    url = _first_instance(loaded)
    r = requests.head(url, timeout=30)
    assert r.status_code == 405
    assert r.content == b""
    # the connection is still usable: a GET on the same session answers whole
    with requests.Session() as s:
        s.head(url, timeout=30)
        got = s.get(url + "/metadata", timeout=30)
        assert got.status_code == 200
        assert got.json()[0]["00080018"]["Value"]


def test_stow_of_dicom_json_parts_is_415(loaded: AnimServer, tmp_path: Path) -> None:
    body = b'--b\r\nContent-Type: application/dicom+json\r\n\r\n[]\r\n--b--\r\n'
    r = requests.post(f"{loaded.url}/dicom-web/studies", data=body, timeout=30, headers={
        "Content-Type": 'multipart/related; type="application/dicom+json"; boundary=b'})
    assert r.status_code == 415, r.text
    assert requests.get(f"{loaded.url}/health", timeout=30).status_code == 200
