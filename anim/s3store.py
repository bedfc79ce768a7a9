"""Blobs in an S3-compatible object store (AWS S3, Ceph RGW, SeaweedFS, ...).

Object ``<prefix><sha256>`` holds the blob with that key. One boto3 client serves every
thread of the archive: botocore clients are thread-safe (sessions are not, so each store
makes its own session once) and pool up to ``s3_max_connections`` connections.

- ``put`` asks with HEAD first. A known blob is not sent again: CopyObject onto itself
  with ``MetadataDirective=REPLACE`` makes the store stamp a new LastModified, which
  is the refresh garbage collection relies on (anim.storage). SeaweedFS 4.48 does it as
  a metadata update (same chunks, new mtime, in HEAD and in listings); AWS copies
  server-side, with no bytes on the wire either. New blobs go up with a Content-MD5 per
  request, so a body damaged on the way is refused (S3 ``BadDigest``); large ones as a
  multipart upload. ``put`` is durable when S3 answers 200.
- ``open`` gives a seekable reader that streams ranged GETs and never holds the whole
  object: see :class:`_ObjectReader`.
- Every botocore failure (connection, timeout, 5xx after retries, refused credentials)
  becomes StorageUnavailable with a short reason; missing objects become NotFound
  (``open``, ``size``) or None / False (``stat``, ``exists``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from anim.errors import ConfigError, NotFound, StorageUnavailable
from anim.storage import _KEY, BlobStat, _check_key, blob_key

if TYPE_CHECKING:
    from botocore.response import StreamingBody

    from anim.config import StorageConfig

MiB = 1 << 20
# AWS S3 multipart limits: parts of 5 MiB at least (but the last), at most 10,000 parts
MIN_PART = 5 * MiB
MAX_PARTS = 10_000
CONTENT_TYPE = "application/octet-stream"
# error codes that mean "these credentials may not do this": a configuration problem
AUTH_CODES = frozenset({"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                        "ExpiredToken", "InvalidToken", "AuthorizationHeaderMalformed"})


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code") or _status(e))


def _reason(e: Exception) -> str:
    """A short, credential-free reason for a botocore error."""
    if isinstance(e, ClientError):
        code, status = _code(e), _status(e)
        if status == 403 or code in AUTH_CODES:
            return f"access denied ({code}): check the S3 credentials and their permissions"
        return f"HTTP {status}" if code == str(status) else f"HTTP {status} {code}"
    if isinstance(e, NoCredentialsError):
        return ("no credentials: set [storage].s3_access_key / s3_secret_key or "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    if isinstance(e, EndpointConnectionError | ConnectTimeoutError):
        return "cannot connect to the endpoint"
    if isinstance(e, ReadTimeoutError):
        return "no answer in time"
    return type(e).__name__


def _unavailable(what: str, e: Exception) -> StorageUnavailable:
    return StorageUnavailable(f"S3 {what} failed: {_reason(e)}")


def _md5(view: memoryview) -> str:
    # Content-MD5 (RFC 1864) is integrity on the wire, not security
    return base64.b64encode(hashlib.md5(view, usedforsecurity=False).digest()).decode()


def _public_endpoint(endpoint: str) -> str:
    """The endpoint without any user:password@ part, for logs."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


class _ViewReader(io.RawIOBase):
    """A request body over a memoryview: botocore streams it (and rewinds it to retry
    or to hash it for SigV4) without a copy of the whole buffer."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), len(self._view) - self._pos))
        out[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


# Reading: a first GET from a position asks for a bounded window (small random reads such
# as one frame, or the 4 bytes at a header's end, fetch little); when a window is read to
# its end without a seek, the reader is streaming and the next GET is open-ended.
FIRST_WINDOW = 256 * 1024
DRAIN_MAX = 64 * 1024  # a seek with at most this much unread drains it to keep the connection
READ_BUFFER = 64 * 1024


class _ObjectReader(io.RawIOBase):
    """A seekable raw reader over one object, streamed by ranged GETs (RFC 9110 14.1.2)."""

    mode = "rb"

    def __init__(self, client: Any, bucket: str, name: str, size: int) -> None:
        super().__init__()
        self._client, self._bucket, self._name = client, bucket, name
        # pydicom takes any io.BufferedReader for a file and asks its name (only a
        # deferred read, which the archive does not use, would reopen it by that name)
        self.name = f"s3://{bucket}/{name}"
        self._size = size
        self._pos = 0
        self._body: StreamingBody | None = None
        self._left = 0  # bytes of the open response not yet read
        self._streaming = False

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if self.closed:
            raise ValueError("seek of a closed blob reader")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        pos = base + offset
        if pos < 0:
            raise ValueError("negative seek position")
        if pos != self._pos:
            self._release()
            self._streaming = False
            self._pos = pos
        return self._pos

    def readinto(self, b: Any) -> int:
        out = memoryview(b).cast("B")
        data = self._read_some(len(out))
        out[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        chunks = []
        while chunk := self._read_some(self._size - self._pos):
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def close(self) -> None:
        if not self.closed:
            self._release()
        super().close()

    def _read_some(self, n: int) -> bytes:
        """Up to *n* bytes from the current position (fewer at a window's end)."""
        if self.closed:
            raise ValueError("read of a closed blob reader")
        n = min(n, self._size - self._pos)
        if n <= 0:
            return b""
        for attempt in (1, 2):
            if self._body is None:
                self._open(n)
            assert self._body is not None
            try:
                data = self._body.read(min(n, self._left))
            except (BotoCoreError, OSError) as e:
                # a connection that broke mid-body: once more from here on a new GET
                self._release(drain=False)
                if attempt == 2:
                    raise _unavailable("GET", e) from e
                continue
            if not data:
                self._release(drain=False)
                raise StorageUnavailable(f"S3 GET ended early at byte {self._pos}")
            break
        self._pos += len(data)
        self._left -= len(data)
        if self._left == 0:
            self._release()
            self._streaming = True
        return data

    def _open(self, n: int) -> None:
        end = self._size if self._streaming else min(self._size, self._pos + max(n, FIRST_WINDOW))
        rng = f"bytes={self._pos}-" if end == self._size else f"bytes={self._pos}-{end - 1}"
        try:
            r = self._client.get_object(Bucket=self._bucket, Key=self._name, Range=rng)
        except ClientError as e:
            if _status(e) == 404:
                raise NotFound(f"blob {self._name} is missing") from None
            raise _unavailable("GET", e) from e
        except BotoCoreError as e:
            raise _unavailable("GET", e) from e
        if self._pos and not str(r.get("ContentRange", "")).startswith(f"bytes {self._pos}-"):
            r["Body"].close()  # a 200 with the whole object: its bytes are not from here
            raise StorageUnavailable("S3 GET ignored the Range header")
        self._body, self._left = r["Body"], int(r["ContentLength"])

    def _release(self, drain: bool = True) -> None:
        """Let go of the open response: read a small rest so the connection is reused,
        else close it (which drops that connection)."""
        body, self._body = self._body, None
        if body is None:
            return
        try:
            if drain and 0 < self._left <= DRAIN_MAX:
                body.read(self._left)
        except (BotoCoreError, OSError):
            pass
        finally:
            body.close()
            self._left = 0


class S3BlobStore:
    """Blobs as objects ``<prefix><sha256>`` of one bucket."""

    def __init__(self, bucket: str, *, endpoint: str = "", region: str = "us-east-1",
                 prefix: str = "", access_key: str = "", secret_key: str = "",
                 addressing: str = "path", part_size: int = 16 * MiB,
                 max_connections: int = 32, create_bucket: bool = False,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 max_attempts: int = 8) -> None:
        if not bucket:
            raise ConfigError("the S3 blob store needs a bucket")
        self.bucket, self.prefix, self.endpoint, self.region = bucket, prefix, endpoint, region
        self.part_size = max(part_size, MIN_PART)
        config = Config(
            region_name=region,
            signature_version="s3v4",
            max_pool_connections=max_connections,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            tcp_keepalive=True,
            retries={"mode": "standard", "max_attempts": max_attempts},
            s3={"addressing_style": addressing},
            # we send Content-MD5 ourselves; botocore's default CRC32 trailers (aws-chunked
            # bodies) are not understood by every S3-compatible store
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        try:
            self.client = boto3.session.Session().client(
                "s3", endpoint_url=endpoint or None, config=config,
                aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None)
        except (ValueError, BotoCoreError) as e:
            raise ConfigError(f"S3 blob store: {_reason(e)}") from e
        if create_bucket:
            self._ensure_bucket()

    @classmethod
    def from_config(cls, cfg: StorageConfig) -> S3BlobStore:
        """The store ``[storage]`` names; credentials from there or the AWS environment."""
        access = cfg.s3_access_key or os.environ.get("AWS_ACCESS_KEY_ID", "")
        secret = cfg.s3_secret_key or os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if bool(access) != bool(secret):
            raise ConfigError("[storage]: an S3 access key needs its secret key, and back")
        # neither set: boto3's own chain (profile, instance role, ...) finds them
        return cls(cfg.s3_bucket, endpoint=cfg.s3_endpoint, region=cfg.s3_region,
                   prefix=cfg.s3_prefix, access_key=access, secret_key=secret,
                   addressing=cfg.s3_addressing, part_size=cfg.s3_part_size_mb * MiB,
                   max_connections=cfg.s3_max_connections,
                   create_bucket=cfg.s3_create_bucket)

    # ---- requests ------------------------------------------------------------------

    def _request(self, what: str, op: Callable[..., dict[str, Any]],
                 **kw: Any) -> dict[str, Any] | None:
        """One S3 call on the bucket: its answer, or None for 404; other errors
        become StorageUnavailable."""
        try:
            return op(Bucket=self.bucket, **kw)
        except ClientError as e:
            if _status(e) == 404:
                return None
            raise _unavailable(what, e) from e
        except BotoCoreError as e:
            raise _unavailable(what, e) from e

    def _call(self, what: str, op: Callable[..., dict[str, Any]], **kw: Any) -> dict[str, Any]:
        """Like _request, where a 404 (no such bucket or upload) is a failure too."""
        r = self._request(what, op, **kw)
        if r is None:
            raise StorageUnavailable(f"S3 {what} failed: not found (bucket {self.bucket} missing?)")
        return r

    def _name(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _head(self, key: str) -> dict[str, Any] | None:
        return self._request("HEAD", self.client.head_object, Key=self._name(key))

    def _ensure_bucket(self) -> None:
        if self._request("HEAD bucket", self.client.head_bucket) is not None:
            return
        kw: dict[str, Any] = {}
        if self.region != "us-east-1":  # us-east-1 refuses its own LocationConstraint
            kw["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(Bucket=self.bucket, **kw)
        except ClientError as e:
            if _code(e) != "BucketAlreadyOwnedByYou":  # another node made it meanwhile
                raise _unavailable("CreateBucket", e) from e
        except BotoCoreError as e:
            raise _unavailable("CreateBucket", e) from e

    # ---- BlobStore -----------------------------------------------------------------

    def put(self, data: bytes | memoryview, key: str | None = None) -> tuple[str, int]:
        key = _check_key(key) if key else blob_key(data)
        view = memoryview(data).cast("B")
        if self._refresh(key, view.nbytes):
            return key, 0
        if view.nbytes > self.part_size:
            self._put_multipart(self._name(key), view)
        else:
            # the key is the body's SHA-256: as x-amz-checksum-sha256 it costs no hashing,
            # and a store that checks it refuses bytes that are not the blob named
            self._call("PUT", self.client.put_object, Key=self._name(key),
                       Body=_ViewReader(view), ContentLength=view.nbytes,
                       ContentMD5=_md5(view), ContentType=CONTENT_TYPE,
                       ChecksumSHA256=base64.b64encode(bytes.fromhex(key)).decode())
        return key, view.nbytes

    def _refresh(self, key: str, size: int) -> bool:
        """Stamp a held blob with a new LastModified; False when it must be written."""
        head = self._head(key)
        if head is None or int(head["ContentLength"]) != size:
            return False  # missing, or a damaged copy the new PUT repairs
        name = self._name(key)
        try:
            self.client.copy_object(Bucket=self.bucket, Key=name, MetadataDirective="REPLACE",
                                    CopySource={"Bucket": self.bucket, "Key": name},
                                    ContentType=CONTENT_TYPE)
        except ClientError as e:
            # gone since the HEAD (garbage collection), or too large for one copy
            # (over 5 GB on AWS): write it again instead
            if _status(e) == 404 or _code(e) in ("InvalidRequest", "EntityTooLarge"):
                return False
            raise _unavailable("refresh (CopyObject)", e) from e
        except BotoCoreError as e:
            raise _unavailable("refresh (CopyObject)", e) from e
        return True

    def _put_multipart(self, name: str, view: memoryview) -> None:
        part = max(self.part_size, -(-view.nbytes // MAX_PARTS))
        upload = self._call("CreateMultipartUpload", self.client.create_multipart_upload,
                            Key=name, ContentType=CONTENT_TYPE)["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, view.nbytes, part), 1):
                chunk = view[start : start + part]
                r = self._call("UploadPart", self.client.upload_part, Key=name,
                               UploadId=upload, PartNumber=number, Body=_ViewReader(chunk),
                               ContentLength=chunk.nbytes, ContentMD5=_md5(chunk))
                parts.append({"ETag": r["ETag"], "PartNumber": number})
            self._call("CompleteMultipartUpload", self.client.complete_multipart_upload,
                       Key=name, UploadId=upload, MultipartUpload={"Parts": parts})
        except BaseException:
            # the parts would otherwise be kept (and billed) until a lifecycle rule ran
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name,
                                                   UploadId=upload)
            raise

    def open(self, key: str) -> BinaryIO:
        head = self._head(key)
        if head is None:
            raise NotFound(f"blob {key} is missing")
        raw = _ObjectReader(self.client, self.bucket, self._name(key),
                            int(head["ContentLength"]))
        return io.BufferedReader(raw, READ_BUFFER)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise NotFound(f"blob {key} is missing")
        return int(head["ContentLength"])

    def stat(self, key: str) -> BlobStat | None:
        head = self._head(key)
        if head is None:
            return None
        return BlobStat(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        # S3 answers 204 for a missing key too; 404 (no bucket) leaves nothing to delete
        self._request("DELETE", self.client.delete_object, Key=self._name(key))

    def list(self, after: str = "") -> Iterator[BlobStat]:
        # ListObjectsV2 returns keys in UTF-8 binary order, which is str order for hex
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
        if after:
            kw["StartAfter"] = self.prefix + after
        pages = self.client.get_paginator("list_objects_v2").paginate(**kw)
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(self.prefix):]
                    if _KEY.match(key):
                        yield BlobStat(key, int(obj["Size"]), obj["LastModified"].timestamp())
        except (ClientError, BotoCoreError) as e:
            raise _unavailable("LIST", e) from e

    def check(self) -> None:
        if self._request("HEAD bucket", self.client.head_bucket) is None:
            raise StorageUnavailable(f"S3 bucket {self.bucket} is missing")
        probe = f"{self.prefix}.ready/{secrets.token_hex(8)}"
        self._call("PUT (readiness probe)", self.client.put_object, Key=probe, Body=b"")
        self._request("DELETE (readiness probe)", self.client.delete_object, Key=probe)

    def describe(self) -> str:
        where = _public_endpoint(self.endpoint) if self.endpoint else f"AWS {self.region}"
        return f"s3://{self.bucket}/{self.prefix} at {where}"
