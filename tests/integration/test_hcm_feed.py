"""The HCM change feed and webhooks, end to end: real `anim serve` processes, DCMTK
storescu, a real HTTP receiver on loopback, and (for two nodes) a real PostgreSQL.

Acceptance points of the HCM issue: a study becomes stable once after the quiet
period and is seen exactly once by the feed and the receiver, a correction is an
update; a receiver that refuses, and an archive killed with pending notifications,
lose nothing and keep each study's order; two processes on one PostgreSQL make one
gap-free sequence.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
from pydicom import dcmread

from tests.conftest import SAMPLES, AnimServer, storescu
from tests.integration.hcm_helpers import (
    Receiver,
    feed,
    signed_ok,
    wait_for,
    write_config,
)

STUDY_A = SAMPLES / "SYN0001" / "study1"
STUDY_B = SAMPLES / "SYN0002" / "study1"
QUIET = 1.0


def study_uid(folder: Path) -> str:
    return str(dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def kinds(entries: list[dict[str, Any]], study: str) -> list[str]:
    return [e["kind"] for e in entries if e["study_uid"] == study]


def corrected_copy(folder: Path, dst: Path, description: str) -> tuple[Path, str]:
    """One instance of *folder* with a new StudyDescription: a correction."""
    src = sorted(folder.rglob("*.dcm"))[0]
    ds = dcmread(src)
    ds.StudyDescription = description
    dst.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst / "corrected.dcm")
    return dst, str(ds.SOPInstanceUID)


@pytest.fixture
def receiver() -> Any:
    r = Receiver().start()
    yield r
    r.stop()


def send(srv: AnimServer, folder: Path, calling: str = "MODALITY1") -> None:
    done = storescu(srv.dimse_port, folder, calling=calling)
    assert done.returncode == 0, done.stderr


def test_stable_once_then_an_update_after_a_correction(
        make_server: type[AnimServer], tmp_path: Path, receiver: Receiver) -> None:
    cfg = write_config(tmp_path / "anim.toml", receiver.url, stable_after=QUIET)
    srv = make_server(tmp_path / "data", args=["--config", str(cfg)]).start()
    uid = study_uid(STUDY_A)
    n = len(list(STUDY_A.rglob("*.dcm")))

    send(srv, STUDY_A)
    wait_for("study_stable in the feed",
             lambda: "study_stable" in kinds(feed(srv.url), uid))
    entries = feed(srv.url)
    created = [e for e in entries if e["kind"] == "instance_created"]
    assert len(created) == n
    assert all(e["state"] == "current" for e in created)
    stable = [e for e in entries if e["kind"] == "study_stable"]
    assert len(stable) == 1
    assert stable[0]["state"] == "stable"
    # ISO 8601 UTC with the same format: compares as text; stable only after the quiet
    from datetime import datetime
    quiet = (datetime.fromisoformat(stable[0]["at"])
             - datetime.fromisoformat(max(e["at"] for e in created))).total_seconds()
    assert quiet >= QUIET

    hooks = wait_for("the webhook", receiver.accepted)
    note = hooks[0].json
    assert (note["type"], note["study_uid"], note["seq"]) == ("study_stable", uid,
                                                              stable[0]["seq"])
    assert signed_ok(hooks[0])
    assert note["study"]["num_instances"] == n
    # the links in the notification resolve against the running archive
    meta = requests.get(note["study"]["wado_rs"] + "/metadata", timeout=30)
    assert meta.status_code == 200
    assert len(meta.json()) == n

    # nothing more happens while the study stays quiet: exactly once, both ways
    import time
    time.sleep(3 * QUIET)
    assert kinds(feed(srv.url), uid).count("study_stable") == 1
    assert [d.json["type"] for d in receiver.accepted()] == ["study_stable"]

    # a correction re-send: the instance is replaced, then the study is updated
    folder, sop = corrected_copy(STUDY_A, tmp_path / "fix", "CORRECTED DESCRIPTION")
    send(srv, folder)
    wait_for("study_updated", lambda: "study_updated" in kinds(feed(srv.url), uid))
    entries = feed(srv.url)
    replaced = [e for e in entries if e["kind"] == "instance_replaced"]
    assert [(e["sop_uid"], e["state"]) for e in replaced] == [(sop, "current")]
    first = next(e for e in entries if e["kind"] == "instance_created" and e["sop_uid"] == sop)
    assert first["state"] == "replaced"
    hooks = wait_for("the update webhook", lambda: len(receiver.accepted()) >= 2 and
                     receiver.accepted())
    assert [d.json["type"] for d in hooks] == ["study_stable", "study_updated"]
    assert hooks[1].json["study"]["description"] == "CORRECTED DESCRIPTION"
    assert all(signed_ok(d) for d in hooks)

    # a deletion: every instance and then the study, and a notification
    r = requests.delete(f"{srv.url}/api/admin/studies/{uid}", timeout=30)
    assert r.status_code == 200
    assert r.json() == {"deleted_instances": n}
    entries = feed(srv.url)
    assert kinds(entries, uid).count("instance_deleted") == n
    assert kinds(entries, uid)[-1] == "study_deleted"
    assert all(e["state"] == "deleted" for e in entries if e["study_uid"] == uid)
    hooks = wait_for("the deletion webhook", lambda: len(receiver.accepted()) >= 3 and
                     receiver.accepted())
    assert hooks[2].json["type"] == "study_deleted"
    assert "study" not in hooks[2].json
    assert requests.get(f"{srv.url}/hcm/studies/{uid}/reference", timeout=30).status_code == 404
    seqs = [e["seq"] for e in feed(srv.url)]
    assert seqs == list(range(1, len(seqs) + 1))


def test_refused_notifications_are_retried_in_order_per_study(
        make_server: type[AnimServer], tmp_path: Path) -> None:
    receiver = Receiver(fail_first=4).start()
    try:
        cfg = write_config(tmp_path / "anim.toml", receiver.url, stable_after=QUIET)
        srv = make_server(tmp_path / "data", args=["--config", str(cfg)]).start()
        a, b = study_uid(STUDY_A), study_uid(STUDY_B)
        send(srv, STUDY_A)
        send(srv, STUDY_B)
        wait_for("both stable", lambda: all(
            "study_stable" in kinds(feed(srv.url), s) for s in (a, b)))
        folder, _sop = corrected_copy(STUDY_A, tmp_path / "fix", "SECOND LOOK")
        send(srv, folder)
        wait_for("four deliveries", lambda: len(receiver.accepted()) >= 3, timeout=90)
        wait_for("the update", lambda: any(
            d.json["type"] == "study_updated" for d in receiver.accepted()), timeout=90)
    finally:
        receiver.stop()
    tried = receiver.all()
    assert sum(d.status == 503 for d in tried) == 4  # refused, then retried
    ok = receiver.accepted()
    assert all(signed_ok(d) for d in tried)
    assert Counter(d.headers["webhook-id"] for d in ok).most_common(1)[0][1] == 1
    by_study = {s: [d.json for d in ok if d.json["study_uid"] == s] for s in (a, b)}
    assert [n["type"] for n in by_study[a]] == ["study_stable", "study_updated"]
    assert [n["type"] for n in by_study[b]] == ["study_stable"]
    assert by_study[a][0]["seq"] < by_study[a][1]["seq"]
    # a retried notification is the same message (same id, same body), newly signed
    first_try = next(d for d in tried if d.status == 503)
    same = [d for d in ok if d.headers["webhook-id"] == first_try.headers["webhook-id"]]
    assert len(same) == 1
    assert same[0].body == first_try.body


def test_pending_notifications_survive_a_killed_archive(
        make_server: type[AnimServer], tmp_path: Path) -> None:
    receiver = Receiver(down=True).start()
    try:
        cfg = write_config(tmp_path / "anim.toml", receiver.url, stable_after=QUIET)
        srv = make_server(tmp_path / "data", args=["--config", str(cfg)]).start()
        a, b = study_uid(STUDY_A), study_uid(STUDY_B)
        send(srv, STUDY_A)
        send(srv, STUDY_B)
        wait_for("both stable", lambda: all(
            "study_stable" in kinds(feed(srv.url), s) for s in (a, b)))
        folder, _sop = corrected_copy(STUDY_A, tmp_path / "fix", "THIRD LOOK")
        send(srv, folder)
        wait_for("study_updated", lambda: "study_updated" in kinds(feed(srv.url), a))
        assert requests.delete(f"{srv.url}/api/admin/studies/{b}", timeout=30).ok

        def outbox() -> dict[str, Any]:
            rows = requests.get(f"{srv.url}/api/admin/webhooks", timeout=30).json()
            return dict(rows[0])

        state = wait_for("four pending, tried", lambda: (
            (s := outbox())["pending"] == 4 and s["max_attempts"] >= 1 and s))
        assert state["delivered"] == 0
        assert state["last_error"] == "HTTP 503"
        srv.kill()  # SIGKILL: no clean shutdown

        receiver.down = False
        srv2 = make_server(tmp_path / "data", args=["--config", str(cfg)]).start()
        wait_for("all four delivered", lambda: len(receiver.accepted()) >= 4, timeout=90)
        wait_for("outbox drained", lambda: outbox_of(srv2)["pending"] == 0)
    finally:
        receiver.stop()
    ok = receiver.accepted()
    assert len(ok) == 4
    assert all(signed_ok(d) for d in ok)
    assert [d.json["type"] for d in ok if d.json["study_uid"] == a] == [
        "study_stable", "study_updated"]
    assert [d.json["type"] for d in ok if d.json["study_uid"] == b] == [
        "study_stable", "study_deleted"]


def outbox_of(srv: AnimServer) -> dict[str, Any]:
    return dict(requests.get(f"{srv.url}/api/admin/webhooks", timeout=30).json()[0])


def test_two_processes_on_one_postgresql_make_one_gap_free_sequence(
        make_server: type[AnimServer], tmp_path: Path, pg_url: str) -> None:
    from anim.sample import generate

    files = generate(tmp_path / "gen", patients=8, rows=16)
    env = {"ANIM_INDEX_URL": pg_url, "ANIM_HCM_STABLE_AFTER": str(QUIET)}
    nodes = [make_server(tmp_path / "data", env=env).start() for _ in range(2)]
    halves = [tmp_path / "gen" / p.name for p in sorted((tmp_path / "gen").iterdir())]
    groups = [halves[0::2], halves[1::2]]

    # a reader follows node 0's feed while both nodes ingest: every page it gets must
    # continue exactly where the previous ended (a hole filled later would be a loss)
    seen: list[int] = []
    stop = threading.Event()
    problems: list[str] = []

    def follow() -> None:
        cursor = 0
        while not stop.is_set():
            r = requests.get(f"{nodes[0].url}/hcm/changes",
                             params={"since": cursor, "limit": 50}, timeout=30)
            page = [e["seq"] for e in r.json()["changes"]]
            if page and page != list(range(cursor + 1, cursor + 1 + len(page))):
                problems.append(f"after {cursor}: {page[:5]}")
            seen.extend(page)
            cursor = page[-1] if page else cursor

    reader = threading.Thread(target=follow)
    reader.start()
    # both nodes receive everything, two associations each: overlapping instances
    jobs = [threading.Thread(target=send_all, args=(node, group, f"NODE{i}{j}"))
            for i, node in enumerate(nodes) for j, group in enumerate(groups)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    studies = {str(dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    wait_for("every study stable", lambda: Counter(
        e["kind"] for e in feed(nodes[1].url))["study_stable"] >= len(studies), timeout=120)
    import time
    time.sleep(3 * QUIET)  # both nodes sweep: still one stable event per study
    stop.set()
    reader.join(60)

    one, two = feed(nodes[0].url), feed(nodes[1].url)
    assert one == two
    seqs = [e["seq"] for e in one]
    assert seqs == list(range(1, len(seqs) + 1))
    assert not problems
    assert seen == seqs[: len(seen)]
    created = Counter(e["sop_uid"] for e in one if e["kind"] == "instance_created")
    assert len(created) == len(files)
    assert set(created.values()) == {1}
    stable = Counter(e["study_uid"] for e in one if e["kind"] == "study_stable")
    assert set(stable) == studies
    assert set(stable.values()) == {1}


def send_all(node: AnimServer, folders: list[Path], calling: str) -> None:
    done = storescu(node.dimse_port, *folders, calling=calling)
    assert done.returncode == 0, done.stderr
