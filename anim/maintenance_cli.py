"""``anim migrate``, ``anim verify`` and ``anim gc``: the operator's maintenance commands.

They work on the configured index and blob store directly, without a running server, and
may run while nodes serve (docs/deploy.md). Exit status 0 when all is well, 1 when verify
found a problem, 2 for a usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from anim import maintenance
from anim.config import Config, load_config
from anim.index import migrations
from anim.index.engine import make_engine
from anim.storage import BlobStore, open_blob_store


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    m = sub.add_parser("migrate", help="upgrade the index schema in place")
    common(m)
    m.add_argument("--check", action="store_true",
                   help="only list the steps not applied yet (exit 1 if there are some)")
    m.set_defaults(func=cmd_migrate)

    v = sub.add_parser("verify", help="re-hash every blob against its key; find missing ones")
    common(v)
    v.add_argument("--no-hash", action="store_true",
                   help="only check that referenced blobs exist (fast)")
    v.add_argument("--workers", type=int, default=4, help="blobs hashed at once (default 4)")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=cmd_verify)

    g = sub.add_parser("gc", help="remove blobs no instance references (safe while ingesting)")
    common(g)
    g.add_argument("--grace", type=float, default=maintenance.DEFAULT_GRACE,
                   help="only blobs older than this many seconds (default 3600)")
    g.add_argument("--dry-run", action="store_true", help="count, remove nothing")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.set_defaults(func=cmd_gc)


def _config(args: argparse.Namespace) -> Config:
    over: dict[str, dict[str, Any]] = {}
    if args.data:
        over["storage"] = {"data_dir": args.data}
    cfg = load_config(args.config, overrides=over)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cfg


class _Progress:
    """One line on stderr, rewritten at most every second."""

    def __init__(self) -> None:
        self._last = 0.0
        self._tty = sys.stderr.isatty()

    def __call__(self, line: str) -> None:
        now = time.monotonic()
        if now - self._last < 1.0:
            return
        self._last = now
        print(("\r" if self._tty else "") + line, end="" if self._tty else "\n",
              file=sys.stderr, flush=True)

    def done(self) -> None:
        if self._tty and self._last:
            print(file=sys.stderr)


@contextmanager
def _store_and_index(args: argparse.Namespace
                     ) -> Iterator[tuple[BlobStore, Engine, _Progress]]:
    """The configured blob store and index, and a progress line, for one command."""
    cfg = _config(args)
    blobs = open_blob_store(cfg.storage)
    engine = make_engine(cfg.index_url, 2)
    progress = _Progress()
    try:
        yield blobs, engine, progress
    finally:
        progress.done()
        engine.dispose()


def cmd_migrate(args: argparse.Namespace) -> int:
    cfg = _config(args)
    Path(cfg.storage.data_dir).mkdir(parents=True, exist_ok=True)
    engine = make_engine(cfg.index_url, 1)
    try:
        todo = migrations.pending(engine)
        for n, title in todo:
            print(f"{'pending' if args.check else 'applying'}: {n} {title}")
        if args.check:
            print(f"{len(todo)} step(s) pending; the latest schema is {migrations.LATEST}")
            return 1 if todo else 0
        applied = migrations.migrate(engine)
        print(f"{applied} step(s) applied; the index is at schema {migrations.LATEST}")
    finally:
        engine.dispose()
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with _store_and_index(args) as (blobs, engine, progress):
        rep = maintenance.verify(blobs, engine, rehash=not args.no_hash,
                                 workers=args.workers, progress=progress)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        print(f"{rep.blobs} blobs ({rep.bytes} bytes) in {blobs.describe()}; "
              f"{rep.referenced} referenced by the index, {rep.unreferenced} unreferenced")
        for key in rep.corrupt:
            print(f"CORRUPT {key} (its bytes do not hash to its key): "
                  f"{' '.join(rep.instances.get(key, [])) or 'no instance'}")
        for key in rep.missing:
            print(f"MISSING {key}: {' '.join(rep.instances.get(key, []))}")
        print("verify: ok" if rep.ok else
              f"verify: {len(rep.corrupt)} corrupt, {len(rep.missing)} missing")
    return 0 if rep.ok else 1


def cmd_gc(args: argparse.Namespace) -> int:
    with _store_and_index(args) as (blobs, engine, progress):
        rep = maintenance.gc(blobs, engine, grace=args.grace, dry_run=args.dry_run,
                             progress=progress)
    if args.json:
        print(json.dumps(rep.as_dict(), indent=2))
    else:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{rep.blobs} blobs, {rep.recent} younger than {args.grace:g} s; "
              f"{rep.unreferenced} unreferenced: {verb} "
              f"{rep.unreferenced if args.dry_run else rep.deleted} "
              f"({rep.deleted_bytes} bytes), {rep.kept} kept on a second look")
    return 0
