"""STOW-RS against a running archive (DICOMweb issue, acceptance points 1, 3 and 4).

- dicomweb-client stores the samples and pydicom's storage objects; the store response
  (PS3.18 10.5.3) lists each in ReferencedSOPSequence with a RetrieveURL that resolves,
  and WADO-RS with ``transfer-syntax=*`` gives back what was sent, byte for byte.
  pydicom's several encodings of one instance are sent one round after another: each
  is a correction of the one before and becomes the instance that is served.
- An instance of another study sent to /studies/{study}, a truncated object, a
  non-DICOM part: that part fails with a FailureReason, the good parts of the same body
  are stored (202), a body with no good part is refused (409 or 400).
- A wrong Content-Type is 415, a broken multipart body 400, a body over the configured
  size 413; each with a reason, and the server answers the next request.
- The same instance twice is success both times.
- Acceptance 4: a 500 MB STOW, streamed from a generator, with the server's RSS sampled.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

from tests.conftest import AnimServer, sample_files
from tests.integration.dicomweb_helpers import (
    ANY_TS,
    DICOM_JSON,
    Body,
    RssSampler,
    accept_dicom,
    big_instance,
    big_pixels,
    client,
    failed,
    first,
    full,
    get,
    has_reason,
    header,
    healthy,
    multipart,
    qido_ok,
    referenced,
    root,
    rounds,
    store_response,
    stow,
    stream_parts,
)
from tests.integration.test_transfer_syntaxes import dataset_bytes

pytestmark = pytest.mark.integration

MEMORY_BOUND = 100 * 2**20


def by_study() -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in sample_files():
        out.setdefault(str(header(p).StudyInstanceUID), []).append(p)
    return out


def two_studies() -> tuple[list[Path], list[Path]]:
    groups = sorted(by_study().values(), key=len, reverse=True)
    return groups[0], groups[1]


def retrieved(srv: AnimServer, path_or_bytes: Path | bytes) -> bytes:
    """The instance as stored (``transfer-syntax=*``), one part."""
    h = full(path_or_bytes) if isinstance(path_or_bytes, bytes) else header(path_or_bytes)
    r = get(f"{root(srv)}/studies/{h.StudyInstanceUID}/series/{h.SeriesInstanceUID}"
            f"/instances/{h.SOPInstanceUID}", accept_dicom(ANY_TS))
    assert r.status_code == 200, (r.status_code, r.text[:300])
    [part] = multipart(r)
    return part.body


def ref_uids(resp: dict[str, Any]) -> list[str]:
    return sorted(first(i, "ReferencedSOPInstanceUID") for i in referenced(resp))


def stored_count(srv: AnimServer) -> int:
    return len(qido_ok(srv, "/instances"))


# ---- storing ---------------------------------------------------------------------------


def test_store_samples_with_dicomweb_client(serve: AnimServer) -> None:
    datasets = [pydicom.dcmread(p) for p in sample_files()]
    resp = client(serve).store_instances(datasets)
    assert "FailedSOPSequence" not in resp
    refs = resp.ReferencedSOPSequence
    assert sorted(i.ReferencedSOPInstanceUID for i in refs) == sorted(
        ds.SOPInstanceUID for ds in datasets)
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for item in refs:
        ds = by_uid[item.ReferencedSOPInstanceUID]
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.RetrieveURL == (
            f"{root(serve)}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}")
    assert stored_count(serve) == len(datasets)
    # what the client sent (pydicom's encoding of each data set) is what comes back
    for ds in datasets[:5]:
        sent = io.BytesIO()
        pydicom.dcmwrite(sent, ds)
        assert dataset_bytes(retrieved(serve, sent.getvalue())) == dataset_bytes(
            sent.getvalue())


def test_store_response_lists_each_instance_with_a_retrieve_url_that_resolves(
        serve: AnimServer) -> None:
    files, _ = two_studies()
    body = Body()
    for p in files:
        body.add(p.read_bytes())
    r = stow(serve, body)
    assert r.status_code == 200, r.text[:500]
    resp = store_response(r)
    assert not failed(resp)
    assert ref_uids(resp) == sorted(str(header(p).SOPInstanceUID) for p in files)
    for item in referenced(resp):
        assert first(item, "ReferencedSOPClassUID")
        url = first(item, "RetrieveURL")
        w = get(url, accept_dicom(ANY_TS))
        assert w.status_code == 200, url
        [part] = multipart(w)
        assert str(full(part.body).SOPInstanceUID) == first(item, "ReferencedSOPInstanceUID")
    for p in files:
        assert retrieved(serve, p) == p.read_bytes(), p


def test_every_pydicom_object_round_trips_byte_for_byte(serve: AnimServer) -> None:
    """Each round in one request; later rounds are corrections of earlier ones (same
    institution), so after each round its own encodings are the ones served."""
    wrong: list[str] = []
    for n, objects in enumerate(rounds()):
        body = Body()
        for o in objects:
            body.add(o.path.read_bytes())
        r = stow(serve, body)
        resp = store_response(r)
        assert not failed(resp), (n, failed(resp))
        assert r.status_code in ((200,) if n == 0 else (200, 202)), (n, r.status_code)
        assert ref_uids(resp) == sorted(o.sop_instance_uid for o in objects)
        for o in objects:
            got = retrieved(serve, o.path)
            if got != o.path.read_bytes():
                same_data = dataset_bytes(got) == dataset_bytes(o.path.read_bytes())
                wrong.append(f"{o.path.name}" + (" (file meta only)" if same_data else ""))
    assert not wrong, f"not given back as sent: {wrong}"
    assert healthy(serve)


def test_dicomweb_client_stores_pydicom_objects(serve: AnimServer) -> None:
    objects = rounds()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's odd files warn when read and written
        datasets = [pydicom.dcmread(o.path) for o in objects]
        resp = client(serve).store_instances(datasets)
        sent = {}
        for ds in datasets:
            b = io.BytesIO()
            pydicom.dcmwrite(b, ds)
            sent[ds.SOPInstanceUID] = b.getvalue()
    assert "FailedSOPSequence" not in resp
    assert sorted(i.ReferencedSOPInstanceUID for i in resp.ReferencedSOPSequence) == sorted(
        sent)
    for uid, data in sent.items():
        assert dataset_bytes(retrieved(serve, data)) == dataset_bytes(data), uid


def test_same_instance_twice_is_success_both_times(serve: AnimServer) -> None:
    p = sample_files()[0]
    for _ in range(2):
        r = stow(serve, Body().add(p.read_bytes()))
        assert r.status_code == 200, r.text[:300]
        assert ref_uids(store_response(r)) == [str(header(p).SOPInstanceUID)]
    assert stored_count(serve) == 1


# ---- parts that fail -------------------------------------------------------------------


def test_instance_of_another_study_fails_that_part(serve: AnimServer) -> None:
    a, b = two_studies()
    st = str(header(a[0]).StudyInstanceUID)
    mixed = stow(serve, Body().add(a[0].read_bytes()).add(b[0].read_bytes()), study=st)
    assert mixed.status_code == 202, (mixed.status_code, mixed.text[:500])
    resp = store_response(mixed)
    assert ref_uids(resp) == [str(header(a[0]).SOPInstanceUID)]
    [bad] = failed(resp)
    assert first(bad, "ReferencedSOPInstanceUID") == str(header(b[0]).SOPInstanceUID)
    assert isinstance(first(bad, "FailureReason"), int)
    only_bad = stow(serve, Body().add(b[1].read_bytes()), study=st)
    assert only_bad.status_code == 409, (only_bad.status_code, only_bad.text[:500])
    assert len(failed(store_response(only_bad))) == 1
    # nothing of the other study was stored
    assert qido_ok(serve, "/studies", {"StudyInstanceUID": str(header(b[0]).StudyInstanceUID)}
                   ) == []
    assert stored_count(serve) == 1


def _bad_parts() -> dict[str, bytes]:
    data = sample_files()[0].read_bytes()
    return {
        "truncated-in-pixel-data": data[:len(data) // 2],
        "truncated-in-header": data[:300],
        "not-dicom": b"This is a text file, not a DICOM object.\n" * 20,
        "empty": b"",
    }


@pytest.mark.parametrize("kind", list(_bad_parts()))
def test_a_body_with_only_a_bad_part_is_refused_with_a_reason(serve: AnimServer,
                                                              kind: str) -> None:
    r = stow(serve, Body().add(_bad_parts()[kind]))
    assert r.status_code in (400, 409), (r.status_code, r.text[:300])
    assert has_reason(r), r.text
    if r.headers.get("Content-Type", "").startswith(DICOM_JSON):
        resp = r.json()
        assert not referenced(resp)
        [bad] = failed(resp)
        assert isinstance(first(bad, "FailureReason"), int)
    assert healthy(serve)
    assert stored_count(serve) == 0


def test_mixed_body_stores_the_good_parts(serve: AnimServer) -> None:
    files, _ = two_studies()
    good = [files[0], files[1], files[2]]
    bad = _bad_parts()
    body = (Body().add(good[0].read_bytes()).add(bad["truncated-in-pixel-data"])
            .add(good[1].read_bytes()).add(bad["not-dicom"]).add(good[2].read_bytes()))
    r = stow(serve, body)
    assert r.status_code == 202, (r.status_code, r.text[:500])
    resp = store_response(r)
    assert ref_uids(resp) == sorted(str(header(p).SOPInstanceUID) for p in good)
    failures = failed(resp)
    assert len(failures) == 2
    assert all(isinstance(first(f, "FailureReason"), int) for f in failures)
    for p in good:
        assert retrieved(serve, p) == p.read_bytes()
    assert stored_count(serve) == len(good)
    assert healthy(serve)


# ---- bad requests ----------------------------------------------------------------------


@pytest.mark.parametrize("content_type", [
    "application/json",
    "text/plain",
    'multipart/related; type="text/plain"; boundary=xyz',
    "",
], ids=["json", "text", "multipart-of-text", "none"])
def test_wrong_content_type_is_415(serve: AnimServer, content_type: str) -> None:
    data = sample_files()[0].read_bytes()
    if content_type.startswith("multipart"):
        data = b"".join(stream_parts([(b"hello", "text/plain")], "xyz"))
    r = requests.post(f"{root(serve)}/studies", data=data, timeout=60,
                      headers={"Content-Type": content_type} if content_type else {})
    assert r.status_code == 415, (r.status_code, r.text[:300])
    assert has_reason(r)
    assert healthy(serve)
    assert stored_count(serve) == 0


def _broken_bodies() -> dict[str, tuple[str, bytes]]:
    data = sample_files()[0].read_bytes()
    good = Body().add(data)
    ctype = good.content_type
    unclosed = Body(parts=good.parts, boundary=good.boundary, close=False).encode()
    return {
        "missing-closing-boundary": (ctype, unclosed[:-2]),
        "garbage": (ctype, b"garbage, no boundary anywhere\r\n" * 50),
        "no-boundary-parameter": ('multipart/related; type="application/dicom"',
                                  good.encode()),
        "part-headers-never-end": (ctype, f"--{good.boundary}\r\nContent-Type: application/"
                                          "dicom\r\n".encode() + b"x" * 5000),
        "empty-body": (ctype, b""),
    }


@pytest.mark.parametrize("kind", list(_broken_bodies()))
def test_broken_multipart_is_400_with_a_reason(serve: AnimServer, kind: str) -> None:
    ctype, data = _broken_bodies()[kind]
    r = stow(serve, data, content_type=ctype)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    assert has_reason(r), r.text
    assert healthy(serve)
    # and the next, well-formed, request is served
    p = sample_files()[1]
    assert stow(serve, Body().add(p.read_bytes())).status_code == 200


def test_body_over_the_configured_size_is_413(make_server: Any, tmp_path: Path) -> None:
    srv = make_server(tmp_path / "data", env={"ANIM_WEB_MAX_STOW_BYTES": "100000"}).start()
    files = sample_files()
    big = Body()
    for p in files:
        big.add(p.read_bytes())
    assert len(big.encode()) > 100000
    r = stow(srv, big)
    assert r.status_code == 413, (r.status_code, r.text[:300])
    assert has_reason(r)
    # the same, streamed (chunked: no Content-Length to refuse it by)
    chunked = stow(srv, stream_parts(big.parts, big.boundary), content_type=big.content_type)
    assert chunked.status_code == 413, (chunked.status_code, chunked.text[:300])
    assert healthy(srv)
    small = stow(srv, Body().add(files[0].read_bytes()))
    assert small.status_code == 200


# ---- acceptance 4: a 500 MB STOW, memory flat ------------------------------------------

PARTS = 64  # x 8 MiB of pixels: more than 500 MB in one request


def big_body(study: str, series: str, boundary: str) -> Iterator[bytes]:
    """The request body, generated as it is sent: the test holds one 8 MiB buffer."""
    pixels = big_pixels()
    view = memoryview(pixels)
    for i in range(1, PARTS + 1):
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield big_instance(study, series, i)
        yield i.to_bytes(8, "little")  # every instance's pixels distinct (no dedup)
        yield bytes(view[8:])
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def test_stow_of_500mb_keeps_server_memory_flat(serve: AnimServer) -> None:
    study, series = generate_uid(), generate_uid()
    boundary = "anim-big-stow"
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    # warm up: the store path loaded before the baseline is taken
    assert stow(serve, Body().add(sample_files()[0].read_bytes())).status_code == 200
    assert serve.proc is not None
    with RssSampler(serve.proc.pid) as rss:
        r = requests.post(f"{root(serve)}/studies", data=big_body(study, series, boundary),
                          headers={"Content-Type": ctype, "Accept": DICOM_JSON}, timeout=900)
    assert r.status_code == 200, (r.status_code, r.text[:500])
    assert len(referenced(store_response(r))) == PARTS
    sent = PARTS * (8 << 20)
    assert sent > 500 * 10**6
    growth = rss.peak - rss.samples[0]
    print(f"server RSS growth: {growth / 2**20:.1f} MiB for a {sent / 2**20:.0f} MiB STOW")
    assert growth < MEMORY_BOUND, (
        f"server RSS grew by {growth / 2**20:.0f} MiB while storing {sent / 2**20:.0f} MiB")
    found = qido_ok(serve, f"/studies/{study}/instances")
    assert len(found) == PARTS
    # spot check: one of them comes back whole
    h = found[PARTS // 2]
    one = get(f"{root(serve)}/studies/{study}/series/{series}/instances/"
              f"{first(h, 'SOPInstanceUID')}", accept_dicom(ANY_TS))
    [part] = multipart(one)
    n = int(full(part.body).InstanceNumber)
    assert np.frombuffer(full(part.body).PixelData[:8], "<u8")[0] == n
    assert healthy(serve)
