"""Content-addressed blob stores: a blob's key is the SHA-256 of its bytes.

Keys come only from hashes, never from anything a client sent, so no request can
name a path. ``put`` is durable when it returns: for files, temp file in the final
folder, fsync, rename, fsync of the folder; for S3, the PUT's 200 (anim.s3store).

Two stores implement the protocol: :class:`FileBlobStore` and
``anim.s3store.S3BlobStore``; :func:`open_blob_store` picks one from the configuration.
Garbage collection (anim.maintenance) relies on one rule every store keeps: ``put`` of
a key that is already there refreshes its modified time, so a blob a store is about to
reference always looks recent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from anim.errors import NotFound, StorageUnavailable

if TYPE_CHECKING:
    from anim.config import StorageConfig

_KEY = re.compile(r"^[0-9a-f]{64}$")


def blob_key(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class BlobStat:
    key: str
    size: int
    modified: float  # POSIX seconds of the last put (or refresh)


class BlobStore(Protocol):
    """What the archive needs from a place that keeps bytes by content."""

    def put(self, data: bytes | memoryview, key: str | None = None) -> tuple[str, int]:
        """Store *data*; return its key and how many bytes were newly written (0 if known).

        A key already held is not written again, but its modified time is refreshed.
        """
        ...

    def open(self, key: str) -> BinaryIO:
        """A seekable reader; NotFound when the blob is missing."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def stat(self, key: str) -> BlobStat | None:
        """Size and modified time, or None when the blob is missing."""
        ...

    def delete(self, key: str) -> None:
        """Remove the blob (no error when it is already gone)."""
        ...

    def list(self, after: str = "") -> Iterator[BlobStat]:
        """Every blob whose key sorts after *after*, in key order."""
        ...

    def check(self) -> None:
        """Raise StorageUnavailable unless the store can be read and written (readiness)."""
        ...

    def describe(self) -> str:
        """Where the blobs are, for logs (no credentials)."""
        ...


def open_blob_store(cfg: StorageConfig) -> BlobStore:
    """The blob store *cfg* names: files under ``cfg.blobs`` or an S3 bucket."""
    if cfg.backend == "s3":
        from anim.s3store import S3BlobStore

        return S3BlobStore.from_config(cfg)
    return FileBlobStore(cfg.blobs)


def _check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"not a blob key: {key!r}")
    return key


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FANOUT = 3  # hex digits of the key naming the folder: 4096 folders


class FileBlobStore:
    """Blobs as files ``<root>/abc/<sha256>``.

    The 4096 folders are made once, when the store is first opened, so that a
    write never has to create (and fsync) a folder on the hot path; 100 million
    blobs still leave fewer than 25,000 files per folder.
    """

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._prepare()

    def _prepare(self) -> None:
        marker = self.root / ".layout-v1"
        if marker.exists():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for i in range(16**FANOUT):
            (self.root / f"{i:0{FANOUT}x}").mkdir(exist_ok=True)
        if self.fsync:
            _fsync_dir(self.root)
            _fsync_dir(self.root.parent)
        marker.touch()

    def path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key[:FANOUT] / key

    def put(self, data: bytes | memoryview, key: str | None = None) -> tuple[str, int]:
        key = _check_key(key) if key else blob_key(data)
        final = self.path(key)
        try:
            # known content: refresh its time, so that garbage collection sees it as
            # recent (anim.maintenance); gone in between means write it after all
            os.utime(final)
            return key, 0
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageUnavailable(f"cannot refresh blob: {e.strerror or e}") from e
        try:
            tmp = final.parent / f".{key[:16]}.{secrets.token_hex(6)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            if self.fsync:
                _fsync_dir(final.parent)
        except OSError as e:
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)
            reason = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise StorageUnavailable(f"cannot write blob: {reason}") from e
        return key, len(data)

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self.path(key), "rb")
        except FileNotFoundError:
            raise NotFound(f"blob {key} is missing") from None

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def size(self, key: str) -> int:
        try:
            return self.path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"blob {key} is missing") from None

    def stat(self, key: str) -> BlobStat | None:
        try:
            st = self.path(key).stat()
        except FileNotFoundError:
            return None
        return BlobStat(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    def list(self, after: str = "") -> Iterator[BlobStat]:
        # folder by folder in name order: the keys come out sorted, one folder in memory
        for i in range(16**FANOUT):
            folder = f"{i:0{FANOUT}x}"
            if after and folder < after[:FANOUT]:
                continue
            try:
                with os.scandir(self.root / folder) as it:
                    entries = sorted((e for e in it if _KEY.match(e.name) and e.name > after),
                                     key=lambda e: e.name)
            except FileNotFoundError:
                continue
            for e in entries:
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue  # removed while listing
                yield BlobStat(e.name, st.st_size, st.st_mtime)

    def keys(self) -> Iterator[str]:
        return (s.key for s in self.list())

    def check(self) -> None:
        probe = self.root / f".ready.{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StorageUnavailable(f"blob folder not writable: {e.strerror or e}") from e

    def describe(self) -> str:
        return f"files under {self.root}"
