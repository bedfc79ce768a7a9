"""The ``anim`` command: serve, import, sample, quarantine, delete, changes, audit, migrate,
verify, gc. The composition root.

Exit codes: 0 success, 1 failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from anim import __version__, audit_cli, maintenance_cli
from anim.archive import Archive
from anim.config import Config, load_config, parse_known_ae
from anim.errors import AnimError, ConfigError

log = logging.getLogger("anim")


def _setup_logging(level: str, debug: bool) -> None:
    # aiohttp logs a malformed request at ERROR with the offending bytes (tokens, query
    # values: patient data); the client got its 400 already. Shown with --debug only.
    if not debug:
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs identifiers (patient data) at INFO: keep it at WARNING unless -d
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if debug else logging.WARNING)
    # pydicom's validation warnings may quote element values (a birth date, a name):
    # route warnings through logging and keep them out of anything above DEBUG.
    logging.captureWarnings(True)
    for name in ("py.warnings", "pydicom"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    o: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            o.setdefault(section, {})[key] = value

    put("storage", "data_dir", getattr(args, "data", None))
    host = getattr(args, "host", None)
    put("dimse", "host", host)
    put("web", "host", host)
    put("dimse", "port", getattr(args, "dimse_port", None))
    put("web", "port", getattr(args, "http_port", None))
    put("dimse", "aet", getattr(args, "aet", None))
    put("dimse", "workers", getattr(args, "dimse_workers", None))
    return o


def _config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, overrides=_overrides(args))
    extra = tuple(parse_known_ae(s) for s in (getattr(args, "known_ae", None) or []))
    if extra:
        import dataclasses

        known = tuple(a for a in cfg.dimse.known_aes if a.title not in {e.title for e in extra})
        cfg = dataclasses.replace(
            cfg, dimse=dataclasses.replace(cfg.dimse, known_aes=known + extra))
    return cfg


# ---- serve -------------------------------------------------------------------------


async def _serve(cfg: Config, ssl_ctx: ssl.SSLContext | None = None,
                 debug: bool = False) -> None:
    from aiohttp import web as aioweb

    from scp import server as scp_server
    from web import app as web_app
    from web.keys import origin_key

    with Archive.open(cfg) as archive:
        ports: dict[str, int] = {}

        @contextlib.asynccontextmanager
        async def dimse(_app: Any) -> AsyncIterator[None]:
            from scp.workers import Workers

            many = cfg.dimse.workers > 1
            server = scp_server.start(archive, cfg.dimse, reuse_port=many)
            ports["dimse"] = int(server.server_address[1])
            workers = (Workers(cfg, ports["dimse"], cfg.dimse.workers - 1, debug)
                       if many else None)
            if workers is not None:
                workers.start()
            yield
            if workers is not None:
                await asyncio.to_thread(workers.stop)
            await asyncio.to_thread(server.shutdown)

        app = web_app.create_app(archive, cfg.web, extra_ctx=[dimse])
        runner = aioweb.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            site = aioweb.TCPSite(runner, cfg.web.host, cfg.web.port, ssl_context=ssl_ctx)
            scheme = "https" if ssl_ctx is not None else "http"
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []
            http_port = sockets[0].getsockname()[1] if sockets else cfg.web.port
            host = f"[{cfg.web.host}]" if ":" in cfg.web.host else cfg.web.host
            app[origin_key]["origin"] = f"{scheme}://{host}:{http_port}"
            log.info("anim %s ready: DIMSE %s@%s:%d, HTTP %s://%s:%d/, data in %s",
                     __version__, cfg.dimse.aet, cfg.dimse.host, ports.get("dimse", 0),
                     scheme, cfg.web.host, http_port, cfg.storage.data_dir)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            log.info("anim: stopping")
            if cfg.web.drain_seconds > 0:
                from web import health

                await health.start_draining(app)  # /health/ready: 503 from now on
                await asyncio.sleep(cfg.web.drain_seconds)
        finally:
            await runner.cleanup()


def cmd_serve(args: argparse.Namespace) -> int:
    from web.auth import check_bind
    from web.tls import server_ssl_context

    cfg = _config(args)
    _setup_logging(cfg.log.level, args.debug)
    # secure by default: no data off this machine without authentication
    why = check_bind(cfg)
    if why is not None:
        log.error("cannot start: %s", why)
        return 2
    ssl_ctx = server_ssl_context(cfg.web)
    try:
        asyncio.run(_serve(cfg, ssl_ctx, args.debug))
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    return 0


# ---- import, sample, quarantine ------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    from anim.importer import import_paths

    cfg = _config(args)
    _setup_logging("WARNING" if not args.debug else "DEBUG", args.debug)
    with Archive.open(cfg) as archive:
        summary = import_paths(archive, [Path(p) for p in args.paths],
                               institution=args.institution, workers=args.workers,
                               progress=not args.quiet)
    print(summary.report())
    return 0 if summary.ok else 1


def cmd_sample(args: argparse.Namespace) -> int:
    from anim.sample import generate

    paths = generate(Path(args.out), patients=args.patients, seed=args.seed)
    print(f"wrote {len(paths)} synthetic instances under {args.out}")
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _setup_logging("WARNING", args.debug)
    with Archive.open(cfg) as archive:
        if args.action == "list":
            rows = archive.quarantined()
            for v in rows:
                print(f"{v.id}\t{v.sop_instance_uid}\tstudy={v.study_instance_uid}\t"
                      f"from={v.institution}/{v.ae_title}@{v.host}\tat={v.received_at}\t"
                      f"{v.size} bytes")
            print(f"{len(rows)} quarantined version(s)")
            return 0
        if args.version is None:
            print("anim quarantine: give the version id to promote or reject", file=sys.stderr)
            return 2
        v = archive.promote(args.version) if args.action == "promote" else archive.reject(
            args.version)
        print(f"version {v.id} of {v.sop_instance_uid} is now {v.state.value}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _setup_logging("WARNING", args.debug)
    with Archive.open(cfg) as archive:
        n = archive.index.delete(args.study, args.series, args.instance)
    print(f"{n} instance(s) removed from the index (blobs stay until garbage collection)")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _setup_logging("WARNING", args.debug)
    with Archive.open(cfg) as archive:
        if args.restore:
            studies = archive.restore(args.institution)
            print(f"{args.institution} restored; {len(studies)} stud(ies) visible again")
        else:
            studies = archive.revoke(args.institution, args.after, args.reason)
            print(f"{args.institution} revoked: its AEs and tokens are refused; "
                  f"{len(studies)} stud(ies) with content sent after {args.after} hidden")
        for uid in studies:
            print(uid)
    return 0


def cmd_restrict(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _setup_logging("WARNING", args.debug)
    with Archive.open(cfg) as archive:
        archive.restrict(args.study, args.reason, lift=args.lift)
    print(f"study {args.study}: restriction {'lifted' if args.lift else 'in force'}")
    return 0


def cmd_changes(args: argparse.Namespace) -> int:
    import json

    cfg = _config(args)
    _setup_logging("WARNING", args.debug)
    with Archive.open(cfg) as archive:
        for entry in archive.index.change_feed(args.since, args.limit):
            print(json.dumps(entry))
    return 0


# ---- parser ---------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML configuration file (also ANIM_CONFIG)")
    p.add_argument("--data", help="data directory (default ./anim-data)")
    p.add_argument("--debug", "-d", action="store_true", help="debug logging (shows identifiers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anim", description="ANIM national imaging archive")
    parser.add_argument("--version", action="version", version=f"anim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the DIMSE and HTTP servers")
    _common(s)
    s.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--dimse-port", type=int, help="DIMSE port (default 11112; 0 = any free)")
    s.add_argument("--http-port", type=int, help="HTTP port (default 8080; 0 = any free)")
    s.add_argument("--aet", help="the archive's AE title (default ANIM)")
    s.add_argument("--dimse-workers", type=int, metavar="N",
                   help="processes accepting DIMSE associations on the port (default 1)")
    s.add_argument("--known-ae", action="append", metavar="TITLE=HOST:PORT",
                   help="a known DICOM peer, e.g. a move destination (repeatable)")
    s.set_defaults(func=cmd_serve)

    i = sub.add_parser("import", help="import files and folders (recursively)")
    _common(i)
    i.add_argument("paths", nargs="+")
    i.add_argument("--institution", default="import",
                   help="institution the imported objects come from (default: import)")
    i.add_argument("--workers", type=int, default=4, help="parallel readers (default 4)")
    i.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_import)

    m = sub.add_parser("sample", help="write synthetic studies (deterministic)")
    m.add_argument("--out", default="sample_dicom")
    m.add_argument("--patients", type=int, default=3)
    m.add_argument("--seed", type=int, default=2026)
    m.set_defaults(func=cmd_sample)

    q = sub.add_parser("quarantine", help="list, promote or reject quarantined versions")
    _common(q)
    q.add_argument("action", choices=["list", "promote", "reject"])
    q.add_argument("version", type=int, nargs="?")
    q.set_defaults(func=cmd_quarantine)

    d = sub.add_parser("delete", help="remove a study, series or instance (a change event)")
    _common(d)
    d.add_argument("study")
    d.add_argument("--series")
    d.add_argument("--instance")
    d.set_defaults(func=cmd_delete)

    c = sub.add_parser("changes", help="print the change sequence as JSON lines")
    _common(c)
    c.add_argument("--since", type=int, default=0)
    c.add_argument("--limit", type=int, default=100)
    c.set_defaults(func=cmd_changes)

    r = sub.add_parser("revoke", help="contain a compromised institution (or --restore it)")
    _common(r)
    r.add_argument("institution")
    r.add_argument("--after", default="1970-01-01T00:00:00+00:00",
                   help="hide what it sent from this time on (ISO 8601; default: all)")
    r.add_argument("--reason", default="", help="why, for the audit trail")
    r.add_argument("--restore", action="store_true", help="end the revocation instead")
    r.set_defaults(func=cmd_revoke)

    t = sub.add_parser("restrict", help="a patient's restriction: hide a study from all but "
                                        "the institutions that sent it (or --lift it)")
    _common(t)
    t.add_argument("study")
    t.add_argument("--reason", default="")
    t.add_argument("--lift", action="store_true")
    t.set_defaults(func=cmd_restrict)

    audit_cli.add_parser(sub, _common)
    maintenance_cli.add_parser(sub, _common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"anim: configuration error: {e}", file=sys.stderr)
        return 2
    except AnimError as e:
        print(f"anim: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
