"""``anim audit``: verify, search and export the audit trail; the per-patient report.

Reading the trail is itself audited (PS3.15 A.5.3.2 "Audit Log Used") when auditing is
enabled; ``verify`` only checks and records nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from anim.audit import AuditAction, AuditEvent, dicom_audit_message, syslog_message
from anim.config import Config, load_config


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``audit`` and its commands to the ``anim`` parser's subparsers *sub*."""
    a = sub.add_parser("audit", help="verify, search and export the audit trail")
    cmds = a.add_subparsers(dest="audit_command", required=True)

    v = cmds.add_parser("verify", help="check the hash chain (exit 1 when broken)")
    common(v)
    v.set_defaults(func=cmd_verify)

    s = cmds.add_parser("search", help="matching records as JSON lines, newest first")
    common(s)
    s.add_argument("--since", help="from this time (ISO 8601, UTC), inclusive")
    s.add_argument("--until", help="before this time (ISO 8601, UTC)")
    s.add_argument("--action", choices=[x.value for x in AuditAction])
    s.add_argument("--who", help="AE title or token subject")
    s.add_argument("--institution")
    s.add_argument("--patient", metavar="ISSUER|ID", help="IssuerOfPatientID|PatientID")
    s.add_argument("--study", metavar="UID", help="Study Instance UID")
    s.add_argument("--limit", type=int, default=100)
    s.set_defaults(func=cmd_search)

    p = cmds.add_parser("patient", help="who accessed this patient's images")
    common(p)
    p.add_argument("patient", metavar="ISSUER|ID", help="IssuerOfPatientID|PatientID")
    p.set_defaults(func=cmd_patient)

    e = cmds.add_parser("export", help="DICOM audit messages (one per line) or an "
                                       "RFC 5424 stream (octet-counted) on stdout")
    common(e)
    e.add_argument("--format", choices=["dicom", "syslog"], default="dicom")
    e.add_argument("--since", help="from this time (ISO 8601, UTC), inclusive")
    e.set_defaults(func=cmd_export)


def parse_patient(value: str) -> tuple[str, str]:
    """``ISSUER|ID`` → (patient ID, issuer); a value without ``|`` is an ID alone."""
    issuer, sep, pid = value.partition("|")
    return (pid, issuer) if sep else (value, "")


def _cfg(args: argparse.Namespace) -> Config:
    over: dict[str, dict[str, Any]] = {}
    if getattr(args, "data", None):
        over["storage"] = {"data_dir": args.data}
    return load_config(getattr(args, "config", None), overrides=over)


@contextmanager
def _opened(args: argparse.Namespace) -> Iterator[tuple[Config, Any]]:
    from anim import Archive
    from anim.index.audit_log import AuditLog, create_audit_table

    cfg = _cfg(args)
    with Archive.open(cfg) as archive:
        engine = archive.index.engine
        with engine.connect().execution_options(anim_writer=True) as conn, conn.begin():
            create_audit_table(conn)  # idempotent; an index from before the audit trail
        yield cfg, AuditLog(engine)


def _used(cfg: Config, log: Any, what: str, patient_id: str = "", issuer: str = "") -> None:
    if cfg.audit.enabled:
        log.append([AuditEvent(action=AuditAction.AUDIT, outcome="success", reason="ok",
                               patient_id=patient_id, issuer=issuer, detail=what)])


def cmd_verify(args: argparse.Namespace) -> int:
    with _opened(args) as (_, log):
        r = log.verify()
    if r.ok:
        print(f"audit trail intact: {r.checked} record(s)")
        return 0
    print(f"audit trail BROKEN at seq {r.first_bad_seq}: {r.reason} "
          f"({r.checked} record(s) before it are intact)")
    return 1


def cmd_search(args: argparse.Namespace) -> int:
    pid, issuer = parse_patient(args.patient) if args.patient else (None, None)
    with _opened(args) as (cfg, log):
        rows = log.search(since=args.since, until=args.until, action=args.action,
                          who=args.who, institution=args.institution, patient_id=pid,
                          issuer=issuer, study_uid=args.study, limit=args.limit)
        for r in rows:
            print(json.dumps(r, ensure_ascii=False))
        _used(cfg, log, f"search {len(rows)}")
    return 0


def cmd_patient(args: argparse.Namespace) -> int:
    pid, issuer = parse_patient(args.patient)
    with _opened(args) as (cfg, log):
        rows = log.patient_access(pid, issuer)
        _used(cfg, log, f"patient report {len(rows)}", pid, issuer)
    print(f"{'when (UTC)':<27} {'action':<9} {'outcome':<8} {'who':<28} {'institution':<16} "
          f"{'address':<16} studies")
    for r in rows:
        who = f"{r['who_kind']}:{r['who']}"
        print(f"{r['at'][:26]:<27} {r['action']:<9} {r['outcome']:<8} {who:<28} "
              f"{r['institution'] or '-':<16} {r['address'] or '-':<16} "
              f"{','.join(r['study_uids']) or '-'}")
    print(f"{len(rows)} access(es) to patient {pid!r} (issuer {issuer!r})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    n = 0
    with _opened(args) as (cfg, log):
        source = cfg.dimse.aet
        for seq, event in log.events(since=args.since):
            xml = dicom_audit_message(event, source)
            if args.format == "dicom":
                out.write(xml.encode("utf-8") + b"\n")
            else:  # octet-counting framing (RFC 6587 3.4.1): pipe it to a TCP collector
                msg = syslog_message(event, seq, xml)
                out.write(str(len(msg)).encode("ascii") + b" " + msg)
            n += 1
        out.flush()
        _used(cfg, log, f"export {args.format} {n}")
    return 0
