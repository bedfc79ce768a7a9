"""Prometheus metrics and the health endpoints (issue 8, "Operations").

A real ``anim serve``: the samples go in with DCMTK storescu, are searched with QIDO-RS
and DCMTK findscu and fetched with WADO-RS, and ``/metrics`` is read with
prometheus_client's own parser: the counters match what was done, and no label carries
a UID or a patient's name or ID. Readiness is made to fail for real (the blob folder
replaced by a file: even root cannot write a file inside a file) and to recover; with
``[auth]`` on, /metrics needs the admin scope while the health checks stay open.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from pydicom import dcmread

from tests.conftest import SAMPLES, AnimServer, dcmtk, sample_files, storescu
from tests.integration.test_http_auth import Idp, auth_toml, bearer, write_jwks

pytestmark = pytest.mark.integration

TIMEOUT = 60
EVENTUALLY = 60.0  # seconds to wait for a value that is reused or recorded late (not a speed limit)
MULTIPART_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def scrape(srv: AnimServer, token: str | None = None) -> list[Sample]:
    r = requests.get(f"{srv.url}/metrics", timeout=TIMEOUT,
                     headers=bearer(token) if token else {})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return [s for fam in text_string_to_metric_families(r.text) for s in fam.samples]


def scrape_until(srv: AnimServer, done: Callable[[list[Sample]], bool]) -> list[Sample]:
    deadline = time.monotonic() + EVENTUALLY
    while not done(m := scrape(srv)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return m


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of *name*'s samples whose labels include *labels*."""
    return sum(s.value for s in samples
               if s.name == name and labels.items() <= s.labels.items())


def sample_identifiers() -> set[str]:
    """Every UID, patient name and ID, accession number and issuer in the samples."""
    out: set[str] = set()
    for path in sample_files():
        ds = dcmread(path, stop_before_pixels=True)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID",
                   "PatientName", "IssuerOfPatientID", "AccessionNumber"):
            v = str(ds.get(kw, "") or "")
            if v:
                out.add(v)
                out.update(p for p in v.split("^") if len(p) >= 4)  # name components
    return out


def findscu_study(srv: AnimServer) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [dcmtk("findscu"), "-aet", "FINDSCU", "-aec", srv.aet, "-S",
         "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientID",
         "127.0.0.1", str(srv.dimse_port)], capture_output=True, timeout=TIMEOUT)


def getscu_study(srv: AnimServer, study: str, out: Path) -> subprocess.CompletedProcess[bytes]:
    out.mkdir()
    return subprocess.run(
        [dcmtk("getscu"), "-aet", "GETSCU", "-aec", srv.aet, "-S", "-od", str(out),
         "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
         "127.0.0.1", str(srv.dimse_port)], capture_output=True, timeout=TIMEOUT)


STOW_BOUNDARY = "anim-metrics-test"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={STOW_BOUNDARY}'


def stow_body(data: bytes) -> bytes:
    return (f"--{STOW_BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + data + f"\r\n--{STOW_BOUNDARY}--\r\n".encode())


def test_stores_queries_and_retrievals_are_counted_without_patient_data(
        serve: AnimServer, tmp_path: Path) -> None:
    n = len(sample_files())
    first = storescu(serve.dimse_port, SAMPLES)
    assert first.returncode == 0, first.stderr
    m = scrape(serve)
    assert value(m, "anim_stores_total", protocol="dimse", outcome="stored") == n
    assert value(m, "anim_stores_total", outcome="failed") == 0
    assert value(m, "anim_store_duration_seconds_count", protocol="dimse") == n
    assert value(m, "anim_store_received_bytes_total", protocol="dimse") > 0
    assert value(m, "anim_dimse_associations_total", result="accepted") >= 1
    assert value(m, "anim_index_writer_queue_depth") == 0
    assert value(m, "anim_webhook_outbox_pending") == 0
    assert value(m, "process_resident_memory_bytes") > 0

    again = storescu(serve.dimse_port, SAMPLES)
    assert again.returncode == 0, again.stderr
    m = scrape(serve)
    assert value(m, "anim_stores_total", protocol="dimse", outcome="stored") == n
    assert value(m, "anim_stores_total", protocol="dimse", outcome="already_stored") == n
    assert value(m, "anim_store_written_bytes_total") < value(
        m, "anim_store_received_bytes_total")  # the re-sent bytes were not written again

    # searches: QIDO-RS (with a patient in the query string) and C-FIND
    r = requests.get(f"{serve.url}/dicom-web/studies", params={"PatientID": "SYN0001"},
                     timeout=TIMEOUT)
    assert r.status_code == 200
    assert len(r.json()) == 1
    found = findscu_study(serve)
    assert found.returncode == 0, found.stderr
    m = scrape(serve)
    assert value(m, "anim_queries_total", protocol="qido", level="study") == 1
    assert value(m, "anim_queries_total", protocol="cfind", level="study") == 1
    assert value(m, "anim_query_duration_seconds_count", protocol="cfind") == 1

    # a whole study over WADO-RS, as stored
    study = dcmread(sample_files()[0], stop_before_pixels=True).StudyInstanceUID
    in_study = sum(1 for p in sample_files()
                   if dcmread(p, stop_before_pixels=True).StudyInstanceUID == study)
    before = value(m, "anim_retrieved_bytes_total", protocol="wado")
    r = requests.get(f"{serve.url}/dicom-web/studies/{study}", timeout=TIMEOUT,
                     headers={"Accept": MULTIPART_AS_STORED})
    assert r.status_code == 200
    # a streamed answer is counted when its handler returns, which may be just after
    # the client has the last byte (the audit record is written in between)
    m = scrape_until(serve, lambda m: value(m, "anim_retrieved_bytes_total",
                                            protocol="wado") > before)
    assert value(m, "anim_retrieved_bytes_total", protocol="wado") - before >= len(r.content)
    assert value(m, "anim_retrieved_instances_total", protocol="wado") == in_study
    assert value(m, "anim_http_requests_total", method="GET",
                 route="/dicom-web/studies/{study}", status="2xx") == 1

    # the same study over C-GET, one file over STOW-RS, an association refused
    got = getscu_study(serve, study, tmp_path / "got")
    assert got.returncode == 0, got.stderr
    assert len(list((tmp_path / "got").iterdir())) == in_study
    data = sample_files()[0].read_bytes()
    stow = requests.post(f"{serve.url}/dicom-web/studies", data=stow_body(data),
                         headers={"Content-Type": STOW_TYPE}, timeout=TIMEOUT)
    assert stow.status_code == 200, stow.text
    refused = storescu(serve.dimse_port, sample_files()[0], aet="NOT-THIS-ARCHIVE")
    assert refused.returncode != 0
    # the rejection is counted just after the peer is told
    m = scrape_until(serve, lambda m: value(m, "anim_dimse_associations_total",
                                            result="rejected") == 1)
    assert value(m, "anim_dimse_associations_total", result="rejected") == 1
    assert value(m, "anim_retrieved_instances_total", protocol="cget") == in_study
    assert value(m, "anim_retrieved_bytes_total", protocol="cget") > 0
    assert value(m, "anim_stores_total", protocol="stowrs", outcome="already_stored") == 1
    assert value(m, "anim_store_received_bytes_total", protocol="stowrs") == len(data)

    # labels name protocols, outcomes, levels and route templates: never patient data
    secrets = sample_identifiers()
    assert {study, "SYN0001", "DOE^JANE"} <= secrets
    labels = {v for s in m for v in s.labels.values()}
    leaked = {(v, s) for v in labels for s in secrets if s in v}
    assert not leaked
    routes = {s.labels["route"] for s in m if "route" in s.labels}
    assert {"/dicom-web/studies/{study}", "/dicom-web/studies"} <= routes


def test_live_and_ready_and_readiness_follows_the_blob_store(
        make_server: type[AnimServer], tmp_path: Path) -> None:
    # a rate limit that lets one request through: the health checks must not count
    srv = make_server(tmp_path / "data", env={"ANIM_WEB_RATE_LIMIT": "0.01",
                                              "ANIM_WEB_RATE_BURST": "1"}).start()
    live = requests.get(f"{srv.url}/health/live", timeout=TIMEOUT)
    assert (live.status_code, live.json()) == (200, {"status": "alive"})
    ready = requests.get(f"{srv.url}/health/ready", timeout=TIMEOUT)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"index": "ok", "blobs": "ok",
                                                          "shutdown": "ok"}}
    health = requests.get(f"{srv.url}/health", timeout=TIMEOUT).json()
    assert health == {"status": "ok", "instances": 0, "studies": 0}
    # the limit is on, and the checks are exempt from it
    codes = [requests.get(f"{srv.url}/dicom-web/studies", timeout=TIMEOUT).status_code
             for _ in range(2)]
    assert codes == [200, 429]
    for _ in range(5):
        assert requests.get(f"{srv.url}/health/ready", timeout=TIMEOUT).status_code == 200
        assert requests.get(f"{srv.url}/health/live", timeout=TIMEOUT).status_code == 200

    # the blob folder becomes a file: nothing can be written under it, root or not
    blobs = srv.data_dir / "blobs"
    aside = srv.data_dir / "blobs.aside"
    blobs.rename(aside)
    blobs.write_bytes(b"not a folder")
    down = _until(srv, 503)
    body = down.json()
    assert body["status"] == "not ready"
    assert body["failed"] == ["blobs"]
    assert body["checks"]["index"] == "ok"
    assert body["checks"]["blobs"].startswith("unavailable")
    assert str(srv.data_dir) not in down.text  # fixed words, no paths
    assert requests.get(f"{srv.url}/health/live", timeout=TIMEOUT).status_code == 200

    blobs.unlink()
    aside.rename(blobs)
    up = _until(srv, 200)
    assert up.json()["status"] == "ready"
    assert "readiness: blobs check failed" in srv.log


def _until(srv: AnimServer, status: int) -> requests.Response:
    """/health/ready once it answers *status* (results are reused for a moment)."""
    deadline = time.monotonic() + EVENTUALLY
    while True:
        r = requests.get(f"{srv.url}/health/ready", timeout=TIMEOUT)
        if r.status_code == status or time.monotonic() > deadline:
            assert r.status_code == status, r.text
            return r
        time.sleep(0.2)


@pytest.fixture(scope="module")
def idp() -> Idp:
    return Idp()


def test_metrics_need_the_admin_scope_and_health_stays_open(
        make_server: type[AnimServer], tmp_path: Path, idp: Idp) -> None:
    jwks = write_jwks(tmp_path / "jwks.json", *idp.jwks()["keys"])
    jwks2 = write_jwks(tmp_path / "jwks2.json", *idp.jwks2()["keys"])
    cfg = auth_toml(tmp_path / "anim.toml", jwks, jwks2)
    srv = make_server(tmp_path / "data", args=["--config", str(cfg)]).start()

    def get(path: str, token: str | None = None) -> requests.Response:
        return requests.get(f"{srv.url}{path}", timeout=TIMEOUT,
                            headers=bearer(token) if token else {})

    assert get("/metrics").status_code == 401
    reader = idp.token(idp.claims(scope="anim.read anim.write"))
    refused = get("/metrics", reader)
    assert refused.status_code == 403
    assert 'scope="anim.admin"' in refused.headers["WWW-Authenticate"]
    admin = idp.token(idp.claims(scope="anim.admin"))
    m = scrape(srv, admin)
    # the refusals above are in it, by route template and status class
    assert value(m, "anim_http_requests_total", route="/metrics", status="4xx") == 2
    for path in ("/health/ready", "/health/live", "/health"):
        assert get(path).status_code == 200, path
    assert get("/dicom-web/studies").status_code == 401  # the rest is still closed


def test_a_stopping_node_says_not_ready_before_it_closes(make_server: type[AnimServer],
                                                         tmp_path: Path) -> None:
    """SIGTERM with [web].drain_seconds: readiness turns 503 while the listener still
    answers, so a load balancer's check takes the node out before connections close."""
    import signal

    srv = make_server(tmp_path / "data", env={"ANIM_WEB_DRAIN_SECONDS": "4"}).start()
    assert requests.get(f"{srv.url}/health/ready", timeout=30).status_code == 200
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGTERM)
    seen: list[int] = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline and 503 not in seen:
        try:
            seen.append(requests.get(f"{srv.url}/health/ready", timeout=5).status_code)
        except requests.ConnectionError:
            break
        time.sleep(0.1)
    assert 503 in seen, seen
    # still alive while draining, and it does stop
    assert srv.proc.wait(30) == 0
