"""Bulk import of files and folders through the same store path as C-STORE."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from anim.archive import Archive
from anim.errors import AnimError, InvalidInstance
from anim.models import Source, StoreOutcome

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ImportSummary:
    outcomes: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)  # reason -> count
    not_dicom: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # storage errors: retry later
    bytes_read: int = 0
    new_bytes: int = 0
    seconds: float = 0.0

    def add(self, path: Path, what: str, reason: str, size: int, new: int) -> None:
        self.bytes_read += size
        self.new_bytes += new
        if what == "not_dicom":
            self.not_dicom.append(str(path))
        elif what == "rejected":
            self.rejected[reason] += 1
        elif what == "failed":
            self.failed.append(f"{path}: {reason}")
        else:
            self.outcomes[what] += 1

    @property
    def ok(self) -> bool:
        return not self.failed

    def report(self) -> str:
        total = sum(self.outcomes.values())
        lines = [
            f"imported {total} objects in {self.seconds:.1f} s: "
            f"{self.outcomes[StoreOutcome.STORED]} stored, "
            f"{self.outcomes[StoreOutcome.ALREADY_STORED]} duplicate, "
            f"{self.outcomes[StoreOutcome.CORRECTED]} corrected, "
            f"{self.outcomes[StoreOutcome.QUARANTINED]} quarantined; "
            f"{sum(self.rejected.values())} rejected, {len(self.not_dicom)} not DICOM, "
            f"{len(self.failed)} failed",
            f"read {self.bytes_read} bytes, wrote {self.new_bytes} new bytes",
        ]
        lines += [f"  rejected ({n}): {reason}" for reason, n in self.rejected.most_common()]
        lines += [f"  not DICOM: {p}" for p in self.not_dicom[:20]]
        if len(self.not_dicom) > 20:
            lines.append(f"  ... and {len(self.not_dicom) - 20} more non-DICOM files")
        lines += [f"  failed: {p}" for p in self.failed[:20]]
        return "\n".join(lines)


def iter_files(paths: list[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        elif p.exists():
            yield p
        else:
            log.warning("import: %s does not exist", p)


def _looks_like_dicom(data: bytes) -> bool:
    # Part 10 has "DICM" at 128; a bare data set starts with a group 0002 or 0008 tag
    return data[128:132] == b"DICM" or data[:2] in (b"\x02\x00", b"\x08\x00")


def _bounded_map(pool: ThreadPoolExecutor, fn: Callable[[Path], T], items: Iterator[Path],
                 window: int) -> Iterator[T]:
    """pool.map in order, with at most *window* items in flight: memory stays flat
    however many files an import walks (Executor.map would submit them all first)."""
    pending: deque[Future[T]] = deque()
    while True:
        while len(pending) < window and (item := next(items, None)) is not None:
            pending.append(pool.submit(fn, item))
        if not pending:
            return
        yield pending.popleft().result()


def import_paths(archive: Archive, paths: list[Path], institution: str = "import",
                 workers: int = 4, progress: bool = True) -> ImportSummary:
    """Store every file under *paths*; non-DICOM files are reported, not fatal."""
    summary = ImportSummary()
    source = Source(institution=institution, ae_title="", host="", protocol="import")
    t0 = time.monotonic()
    last = 0.0
    show = progress and sys.stderr.isatty()

    def one(path: Path) -> tuple[Path, str, str, int, int]:
        try:
            data = path.read_bytes()
        except OSError as e:
            return path, "failed", f"unreadable: {e.strerror}", 0, 0
        if not _looks_like_dicom(data):
            return path, "not_dicom", "", len(data), 0
        try:
            r = archive.store(data, source)
        except InvalidInstance as e:
            return path, "rejected", str(e), len(data), 0
        except AnimError as e:
            return path, "failed", str(e), len(data), 0
        return path, r.outcome.value, "", len(data), r.new_bytes

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = _bounded_map(pool, one, iter_files(paths), window=max(1, workers) * 4)
        for n, result in enumerate(results, start=1):
            summary.add(*result)
            now = time.monotonic()
            if show and now - last > 0.25:
                last = now
                rate = n / max(now - t0, 1e-6)
                sys.stderr.write(f"\rimport: {n} files, {summary.bytes_read / 1e6:.1f} MB, "
                                 f"{rate:.0f} files/s")
                sys.stderr.flush()
    if show:
        sys.stderr.write("\n")
    summary.seconds = time.monotonic() - t0
    return summary
