"""Content-addressed blob stores: a blob's key is the SHA-256 of its bytes.

Keys come only from hashes, never from anything a client sent, so no request can
name a path. ``FileBlobStore.put`` is durable when it returns: temp file in the
final folder, fsync, rename, fsync of the folder (and of any folder it created).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from anim.errors import NotFound, StorageUnavailable

_KEY = re.compile(r"^[0-9a-f]{64}$")


def blob_key(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore(Protocol):
    """What the archive needs from a place that keeps bytes by content."""

    def put(self, data: bytes | memoryview, key: str | None = None) -> tuple[str, int]:
        """Store *data*; return its key and how many bytes were newly written (0 if known)."""
        ...

    def open(self, key: str) -> BinaryIO: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None: ...

    def keys(self) -> Iterator[str]: ...


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
        if final.exists():
            return key, 0
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

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    def keys(self) -> Iterator[str]:
        for _dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if _KEY.match(name):
                    yield name
