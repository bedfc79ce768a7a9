"""``[dimse] workers``: several processes accept associations on one port (scp/workers.py).

A real ``anim serve --dimse-workers 2`` and DCMTK peers: associations land on both processes
(the worker's log lines are tagged), what either stored is one archive (QIDO on the main
process sees all of it, with one row per instance), C-FIND and C-GET work through any of
them, a killed worker is replaced, and no worker outlives the main process, however it ends.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import AnimServer, dcmtk, echoscu, sample_files, storescu
from tests.integration.test_cfind import findscu

WORKER_TAG = re.compile(r"\[dimse worker (\d+)\]")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        kids += [int(c) for c in f.read_text().split()]
    return kids


def _workers(srv: AnimServer) -> list[int]:
    assert srv.proc is not None
    out = []
    for k in _children(srv.proc.pid):
        try:
            if b"scp.workers" in Path(f"/proc/{k}/cmdline").read_bytes():
                out.append(k)
        except OSError:
            pass
    return out


def _wait(cond, timeout: float = 30.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _serving(srv: AnimServer, pid: int) -> bool:
    return f"[dimse worker {pid}] scp.workers: DIMSE worker pid {pid} serving" in srv.log


@pytest.fixture
def two(tmp_path: Path) -> AnimServer:
    srv = AnimServer(tmp_path / "data", args=["--dimse-workers", "2"]).start()
    _wait(lambda: len(_workers(srv)) == 1, what="the worker process")
    wpid = _workers(srv)[0]
    _wait(lambda: _serving(srv, wpid), what="the worker to serve")
    yield srv
    srv.stop()


def _instances(srv: AnimServer) -> list[str]:
    r = requests.get(f"{srv.url}/dicom-web/instances", params={"limit": "1000"}, timeout=30)
    assert r.status_code in (200, 204), r.text
    return [] if r.status_code == 204 else [o["00080018"]["Value"][0] for o in r.json()]


def test_associations_are_spread_over_the_processes(two: AnimServer, tmp_path: Path) -> None:
    files = sample_files()
    assert len(files) >= 8
    # one association per file, 4 at a time: the kernel spreads new connections over the
    # two listening sockets
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda f: storescu(two.dimse_port, f), files))
    for r in results:
        assert r.returncode == 0, r.stdout + r.stderr
    stored = [ln for ln in two.lines if " store " in ln and ": stored," in ln]
    by_worker = [ln for ln in stored if WORKER_TAG.search(ln)]
    assert len(stored) == len(files)
    assert 0 < len(by_worker) < len(files), "both processes should have taken associations"
    uids = _instances(two)
    assert len(uids) == len(set(uids)) == len(files)

    # the same files again, in parallel: duplicates on both processes, still one row each
    with ThreadPoolExecutor(4) as pool:
        again = list(pool.map(lambda f: storescu(two.dimse_port, f), files))
    assert all(r.returncode == 0 for r in again)
    assert sorted(_instances(two)) == sorted(uids)


def test_find_and_get_through_any_process(two: AnimServer, tmp_path: Path) -> None:
    files = sample_files()
    r = storescu(two.dimse_port, *files)
    assert r.returncode == 0, r.stderr
    studies = {_study_of(f) for f in files}
    study = _study_of(files[0])
    for i in range(8):  # new connections: both processes answer some of them
        found = findscu(two, "study", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""},
                        tmp_path)
        assert {str(d.StudyInstanceUID) for d in found} == studies
        out = tmp_path / f"get{i}"
        out.mkdir()
        get = subprocess.run(
            [dcmtk("getscu"), "-S", "-aet", "GETSCU", "-aec", two.aet, "-od", str(out),
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
             "127.0.0.1", str(two.dimse_port)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "TCP_NODELAY": "1"})
        assert get.returncode == 0, get.stderr
        assert len(list(out.iterdir())) == sum(1 for f in files if _study_of(f) == study)


def _study_of(f: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(f, stop_before_pixels=True).StudyInstanceUID)


def test_a_dead_worker_is_replaced(two: AnimServer) -> None:
    old = _workers(two)[0]
    os.kill(old, signal.SIGKILL)
    _wait(lambda: _workers(two) and _workers(two)[0] != old, what="a new worker")
    new = _workers(two)[0]
    _wait(lambda: _serving(two, new), what="the new worker to serve")
    assert re.search(rf"DIMSE worker 1 \(pid {old}\) exited with -9; restarting", two.log)
    for _ in range(6):
        assert echoscu(two.dimse_port).returncode == 0


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_no_worker_outlives_the_main_process(two: AnimServer, how: str) -> None:
    worker = _workers(two)[0]
    if how == "SIGTERM":
        assert two.stop() == 0
    else:
        two.kill()  # the worker sees its stdin pipe close
    _wait(lambda: not _alive(worker), timeout=30, what=f"worker {worker} to exit")
    assert "Traceback" not in two.log
    assert "Fatal Python error" not in two.log
