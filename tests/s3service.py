"""A real S3-compatible object store for the tests: SeaweedFS, or the one CI names.

``SeaweedFS`` runs one ``weed server`` (master + volume + filer + S3 gateway in one
process, ../shared/SCALEOUT-NOTES.md §2) on free loopback ports, with SigV4 credentials
checked against an identity file. ``s3_from_env`` reads the endpoint a CI script started
(``ANIM_TEST_S3_ENDPOINT``, ``ANIM_TEST_S3_ACCESS_KEY``, ``ANIM_TEST_S3_SECRET_KEY``);
``new_bucket`` / ``drop_bucket`` give each test a bucket of its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WEED = ROOT / ".venv" / "bin" / "weed"
ACCESS_KEY = "anim-test"
SECRET_KEY = "anim-test-secret"
GRPC_OFFSET = 10000  # weed opens a gRPC port at every HTTP port + 10000


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """*count* ports that are free on loopback, each with port + 10000 free too.

    Drawn at random below the kernel's ephemeral range (32768 and up on Linux) so that
    the +10000 partner stays a valid port and outgoing connections rarely take one.
    """
    ports: list[int] = []
    while len(ports) < count:
        p = random.randint(20000, 22767)
        if p in ports or p + GRPC_OFFSET in ports:
            continue
        if _bindable(p) and _bindable(p + GRPC_OFFSET):
            ports.append(p)
    return ports


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL weed when the process that started it dies,
    even by SIGKILL, so that a killed test run leaves no server behind (Linux prctl)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def s3_client(endpoint: str, key: str, secret: str, **config: Any) -> Any:
    """A plain boto3 S3 client for test set-up (path-style, SigV4)."""
    import boto3
    from botocore.config import Config

    cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"},
                 retries={"mode": "standard", "max_attempts": 3}, **config)
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", config=cfg,
        aws_access_key_id=key, aws_secret_access_key=secret)


def new_bucket(endpoint: str, key: str, secret: str) -> str:
    """Create a bucket with a unique name and return the name."""
    name = f"anim-test-{uuid.uuid4().hex[:16]}"
    s3_client(endpoint, key, secret).create_bucket(Bucket=name)
    return name


def drop_bucket(endpoint: str, key: str, secret: str, name: str) -> None:
    """Empty the bucket (objects and unfinished multipart uploads) and delete it."""
    client = s3_client(endpoint, key, secret)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    for up in client.list_multipart_uploads(Bucket=name).get("Uploads", ()):
        client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
    client.delete_bucket(Bucket=name)


def s3_from_env() -> tuple[str, str, str] | None:
    """(endpoint, access key, secret key) of a store CI started, or None.

    Keys default to AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, as SCALEOUT-NOTES exports.
    """
    endpoint = os.environ.get("ANIM_TEST_S3_ENDPOINT", "")
    if not endpoint:
        return None
    key = os.environ.get("ANIM_TEST_S3_ACCESS_KEY") or os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret = (os.environ.get("ANIM_TEST_S3_SECRET_KEY")
              or os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
    return endpoint, key, secret


class SeaweedFS:
    """One ``weed server`` with an S3 gateway on loopback; data in a temporary folder."""

    def __init__(self, weed: Path = WEED, access_key: str = ACCESS_KEY,
                 secret_key: str = SECRET_KEY, die_with_parent: bool = False) -> None:
        """*die_with_parent*: weed gets SIGKILL when this process dies (for a test
        session's own server; not for a script that starts it for later processes)."""
        self.weed = Path(weed)
        self.die_with_parent = die_with_parent and sys.platform == "linux"
        self.access_key, self.secret_key = access_key, secret_key
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: list[int] = []
        self.endpoint = ""

    @staticmethod
    def available(weed: Path = WEED) -> bool:
        return Path(weed).is_file() and os.access(weed, os.X_OK)

    def start(self, timeout: float = 60.0, attempts: int = 3) -> SeaweedFS:
        """Start and wait until S3 answers and a bucket can be made.

        A port taken between choosing and binding makes weed exit: then again on
        other ports, up to *attempts* times.
        """
        self.root = Path(tempfile.mkdtemp(prefix="anim-seaweedfs-"))
        (self.root / "data").mkdir()
        identities = {"identities": [{
            "name": "anim", "credentials": [{"accessKey": self.access_key,
                                             "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.root / "s3.json").write_text(json.dumps(identities))
        deadline = time.monotonic() + timeout
        for _ in range(attempts):
            self._launch()
            if self._wait_ready(deadline):
                return self
            self._kill()
            if time.monotonic() > deadline:
                break
        log = self.log
        self.stop()
        raise RuntimeError(f"SeaweedFS did not start:\n{log[-4000:]}")

    def _launch(self) -> None:
        assert self.root is not None
        s3, master, volume, filer = self.ports = free_ports(4)
        self.endpoint = f"http://127.0.0.1:{s3}"
        cmd = [str(self.weed), "server", f"-dir={self.root / 'data'}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
               f"-master.port={master}", "-master.volumeSizeLimitMB=64",
               f"-volume.port={volume}", "-volume.max=0", "-volume.preStopSeconds=0",
               "-filer", f"-filer.port={filer}",
               "-s3", f"-s3.port={s3}", "-s3.port.iceberg=0", "-s3.port.lance=0",
               # like AWS: a PUT to a missing bucket fails instead of creating it
               "-s3.autoCreateBucket=false",
               f"-s3.config={self.root / 's3.json'}"]
        with open(self.root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
                preexec_fn=_die_with_parent if self.die_with_parent else None)

    def _wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if self._answers() and self._bucket_works():
                return True
            time.sleep(0.1)
        return False

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint + "/", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # 403 without credentials: the gateway is up
        except OSError:
            return False
        return True

    def _bucket_works(self) -> bool:
        # the gateway answers before the filer and volume are ready for writes
        try:
            name = new_bucket(self.endpoint, self.access_key, self.secret_key)
            client = s3_client(self.endpoint, self.access_key, self.secret_key)
            client.put_object(Bucket=name, Key="probe", Body=b"ok")
            drop_bucket(self.endpoint, self.access_key, self.secret_key, name)
        except Exception:
            return False
        return True

    @property
    def log(self) -> str:
        if self.root is None or not (self.root / "weed.log").exists():
            return ""
        return (self.root / "weed.log").read_text(errors="replace")

    def _kill(self) -> None:
        # SIGTERM takes 15-27 s (graceful volume shutdown); the data is throwaway
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None
        for port in self.ports:
            for p in (port, port + GRPC_OFFSET):
                for sock in glob.glob(f"/tmp/seaweedfs-*-{p}.sock"):
                    with contextlib.suppress(OSError):
                        os.unlink(sock)

    def stop(self) -> None:
        self._kill()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> SeaweedFS:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
