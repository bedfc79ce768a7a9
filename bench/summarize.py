#!/usr/bin/env python3
"""Summarize an ingest benchmark: anim against Orthanc, with the same-run storescp bounds.

Reads the result JSON files that ../shared/bench/bench.py wrote for anim and for Orthanc
(``bench/run-ingest`` runs both) and prints Markdown tables: throughput and ratios per ingest
phase, disk used, server memory (RSS) per phase, server CPU per 1000 instances, and the noise
from other tenants of the machine.

    bench/summarize.py              # the newest anim-ingest-* and orthanc-ingest-* results
    bench/summarize.py --anim A.json --orthanc O.json --write docs/benchmarks.md

With ``--write FILE`` the summary also replaces the part of FILE between
``<!-- ingest:begin -->`` and ``<!-- ingest:end -->`` (FILE is created if missing).
Standard library only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- ingest:begin -->", "<!-- ingest:end -->"
PY_BOUND = "pynetdicom_write_tuned"
MIB = 2**20
INTRO = """# Benchmarks

Speed and memory of anim are measured here, by benchmarks, never by timed assertions in
tests. Every figure sits next to a reference measured in the same invocation on the same
machine: Orthanc and DCMTK's `storescp` from Debian, and a bare pynetdicom receiver. How to
run them and how to read them: `bench/README.md`.

## Ingest through C-STORE (acceptance point 8)

Target: at least Orthanc's ingest rate with one association and better with four, with peak
RSS flat as the dataset grows. Written by `bench/summarize.py --write docs/benchmarks.md`
(which `bench/run-ingest` runs); do not edit between the markers.

"""
PLACEHOLDER = "_Not measured yet: run `bench/run-ingest` on a quiet machine._\n"


# ---------------------------------------------------------------------------- reading
def dig(d: Any, *path: Any) -> Any:
    for p in path:
        in_list = isinstance(d, list) and isinstance(p, int) and -len(d) <= p < len(d)
        if not (in_list or (isinstance(d, dict) and p in d)):
            return None
        d = d[p]
    return d


def median(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


class Run:
    """One harness result file (one target, one or more rounds)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.res: dict[str, Any] = json.loads(path.read_text())
        self.meta: dict[str, Any] = self.res.get("meta", {})
        self.T: dict[str, Any] = self.res.get("target") or {}
        self.B: dict[str, Any] = self.res.get("bounds") or {}

    def runs(self, phase: str) -> list[dict[str, Any]]:
        return self.T.get(phase + "_runs") or []

    def values(self, phase: str, key: str) -> list[float]:
        return [r[key] for r in self.runs(phase) if isinstance(r.get(key), (int, float))]

    def bound_values(self, name: str, mode: str, key: str = "inst_per_s") -> list[float]:
        return [v for r in self.B.get("rounds") or [] if (v := dig(r, name, mode, key)) is not None]

    def paired(self, phase: str, name: str, mode: str, key: str = "inst_per_s") -> list[float]:
        """Per-round ratio target / bound, the bound measured in the same round."""
        out = []
        for t, b in zip(self.runs(phase), self.B.get("rounds") or [], strict=False):
            bv = dig(b, name, mode, key)
            if bv and t.get(key):
                out.append(t[key] / bv)
        return out

    def variant(self, v: str, key: str) -> int | None:
        return dig(self.meta, "dataset", "variants", v, key)


# ---------------------------------------------------------------------------- formatting
def num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "–"
    s = f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 100 else f"{v:.0f}"
    return s + (f" {unit}" if unit else "")


def spread(xs: list[float], scale: float = 1.0, unit: str = "") -> str:
    """Median, with (min–max) when there is more than one round."""
    if not xs:
        return "–"
    ys = [x * scale for x in xs]
    s = num(statistics.median(ys), unit)
    if len(ys) > 1:
        s += f" ({num(min(ys))}–{num(max(ys))})"
    return s


def cores(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def minutes(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def pct(xs: list[float]) -> str:
    if not xs:
        return "–"
    s = f"{100 * statistics.median(xs):.0f} %"
    if len(xs) > 1:
        s += f" ({100 * min(xs):.0f}–{100 * max(xs):.0f})"
    return s


def times(a: float | None, b: float | None) -> str:
    return f"×{a / b:.2f}" if a and b else "–"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


# ---------------------------------------------------------------------------- sections
def phases(runs: list[Run]) -> list[tuple[str, str, str, str, str]]:
    """(phase key, label, storescp bound, its mode, variant sent)."""
    n = next((int(v) for r in runs for v in r.values("ingest_parallel", "processes")), 4)
    return [("ingest_single", "C-STORE, 1 association", "storescp_write", "single", "A"),
            ("ingest_parallel", f"C-STORE, {n} associations", "storescp_write", "parallel", "B"),
            ("resend", "re-send of A (all duplicates), 1 association", "storescp_ignore", "single",
             "A")]


def throughput(anim: Run | None, orth: Run | None) -> list[str]:
    both = [r for r in (anim, orth) if r]
    rows = []
    for key, label, bname, mode, _ in phases(both):
        def med(r: Run | None, k: str, key: str = key) -> float | None:
            return median(r.values(key, k)) if r else None

        def norm(r: Run | None, key: str = key, bname: str = bname,
                 mode: str = mode) -> float | None:
            return median(r.paired(key, bname, mode)) if r else None

        bound = [v for r in both for v in r.bound_values(bname, mode)]
        rows.append([
            label,
            spread(anim.values(key, "inst_per_s")) if anim else "–",
            spread(anim.values(key, "mb_per_s")) if anim else "–",
            spread(orth.values(key, "inst_per_s")) if orth else "–",
            spread(orth.values(key, "mb_per_s")) if orth else "–",
            "**" + times(med(anim, "inst_per_s"), med(orth, "inst_per_s")) + "**",
            times(norm(anim), norm(orth)),
            spread(bound) + (" (`--ignore`)" if bname == "storescp_ignore" else ""),
            pct(anim.paired(key, bname, mode)) if anim else "–",
            pct(orth.paired(key, bname, mode)) if orth else "–",
            pct(anim.paired(key, PY_BOUND, mode)) if anim else "–",
        ])
    return table(["Phase", "anim inst/s", "anim MB/s", "Orthanc inst/s", "Orthanc MB/s",
                  "anim ÷ Orthanc", "same, normalized by storescp", "storescp inst/s",
                  "anim ÷ storescp", "Orthanc ÷ storescp", "anim ÷ pynetdicom"], rows)


def per_target(anim: Run | None, orth: Run | None,
               metrics: list[tuple[str, Callable[[Run], str]]]) -> list[str]:
    rows = [[label, f(anim) if anim else "–", f(orth) if orth else "–"] for label, f in metrics]
    return table(["", "anim", "Orthanc"], rows)


def disk_ratio(r: Run, phase: str, variants: str) -> str:
    stored = sum(r.variant(v, "bytes") or 0 for v in variants)
    alloc = [d["allocated"] for x in r.runs(phase) if (d := x.get("disk_after"))]
    files = [d["files"] for x in r.runs(phase) if (d := x.get("disk_after"))]
    if not alloc or not stored:
        return "–"
    a = statistics.median(alloc)
    return f"{a / stored:.3f} ({a / 1e6:.0f} MB in {statistics.median(files):.0f} files)"


def storage(anim: Run | None, orth: Run | None) -> list[str]:
    return per_target(anim, orth, [
        ("disk used ÷ data stored, after 1-association ingest of A",
         lambda r: disk_ratio(r, "ingest_single", "A")),
        ("disk used ÷ data stored, after A + B", lambda r: disk_ratio(r, "ingest_parallel", "AB")),
        ("disk growth from re-sending A",
         lambda r: spread(r.values("resend", "disk_growth"), 1e-6, "MB")),
        ("empty archive (after start)",
         lambda r: num((dig(r.T, "disk_empty", "allocated") or 0) / 1e6, "MB")),
    ])


def rss_cell(r: Run, phase: str) -> str:
    peak = r.values(phase, "server_peak_rss")
    after = r.values(phase, "server_rss_after")
    if not peak:
        return "–"
    return f"{spread(peak, 1 / MIB)} / {spread(after, 1 / MIB)}"


def rss_growth(r: Run) -> float | None:
    """Peak RSS during the re-send (archive holds A + B) ÷ during the first ingest of A."""
    a = median(r.values("ingest_single", "server_peak_rss"))
    b = median(r.values("resend", "server_peak_rss"))
    return b / a if a and b else None


def memory(anim: Run | None, orth: Run | None) -> list[str]:
    def archive(r: Run, before: str, after: str) -> str:
        a = sum(r.variant(v, "instances") or 0 for v in before)
        b = sum(r.variant(v, "instances") or 0 for v in after)
        return f"{a} → {b}"

    def overall(r: Run) -> str:
        p, h = r.T.get("server_peak_rss_overall"), r.T.get("server_vmhwm")
        return f"{num(p / MIB if p else None)} MiB (VmHWM {num(h / MIB if h else None)} MiB)"

    ex = anim or orth
    return per_target(anim, orth, [
        ("idle after start", lambda r: num((r.T.get("rss_idle_at_start") or 0) / MIB, "MiB")),
        (f"peak / after, 1-association ingest (archive {archive(ex, '', 'A')} instances)",
         lambda r: rss_cell(r, "ingest_single")),
        (f"peak / after, parallel ingest (archive {archive(ex, 'A', 'AB')})",
         lambda r: rss_cell(r, "ingest_parallel")),
        (f"peak / after, re-send of A, 1 association (archive {archive(ex, 'AB', 'AB')})",
         lambda r: rss_cell(r, "resend")),
        ("**growth**: re-send peak ÷ first-ingest peak (1.00 = flat)",
         lambda r: f"**{num(rss_growth(r))}**"),
        ("peak over the last round", overall),
    ])


def cpu_per_1000(r: Run, phase: str) -> str:
    xs = [x["server_cpu_s"] * 1000 / x["instances"] for x in r.runs(phase)
          if x.get("server_cpu_s") is not None and x.get("instances")]
    return spread(xs, unit="s")


def cpu(anim: Run | None, orth: Run | None) -> list[str]:
    return per_target(anim, orth, [(label, lambda r, k=key: cpu_per_1000(r, k))
                                   for key, label, *_ in phases([x for x in (anim, orth) if x])])


def checks(anim: Run | None, orth: Run | None) -> list[str]:
    def answers(r: Run, phase: str) -> str:
        bad = []
        for i, x in enumerate(r.runs(phase)):
            n, ok = x.get("instances"), x.get("status_success")
            if ok != n or x.get("status_failure") or x.get("error_lines"):
                bad.append(f"round {i + 1}: {ok}/{n} Success, {x.get('status_warning')} warning, "
                           f"{x.get('status_failure')} failure")
        n = len(r.runs(phase))
        return "**" + "; ".join(bad) + "**" if bad else f"all Success ({n} round{'s' * (n != 1)})"

    def counts(r: Run) -> str:
        return ", ".join(str([x.get("archive_instances_after") for x in r.runs(k)])
                         for k, *_ in phases([r]))

    def quiet(r: Run) -> str:
        qs = [x.get("quiet") or {} for k, *_ in phases([r]) for x in r.runs(k)]
        if not any("quiet" in q for q in qs):
            return "not waited for (`--quick` or `--quiet-wait 0`)"
        n = sum(bool(q.get("quiet")) for q in qs)
        waited = sum(q.get("waited_s") or 0 for q in qs)
        return f"{n} of {len(qs)} (waited {waited:.0f} s in all)"

    def tenants(r: Run) -> str:
        xs = [x.get("foreign_cores") for k, *_ in phases([r]) for x in r.runs(k)]
        xs = [x for x in xs if x is not None]
        return f"{cores(median(xs))} cores (max {cores(max(xs))})" if xs else "–"

    metrics: list[tuple[str, Callable[[Run], str]]] = [
        (f"C-STORE answers, {label}", lambda r, k=key: answers(r, k))
        for key, label, *_ in phases([x for x in (anim, orth) if x])]
    metrics += [("instances in the archive after each phase (per round)", counts),
                ("phases started on a quiet machine (other tenants < 0.35 cores)", quiet),
                ("other tenants during the target's ingest: median (max)", tenants),
                ("harness warnings", lambda r: "; ".join(r.T.get("warnings") or []) or "none")]
    return per_target(anim, orth, metrics)


def verdict(anim: Run | None, orth: Run | None) -> list[str]:
    if not (anim and orth):
        return ["Target: needs both an anim and an Orthanc result.", ""]

    def ratio(key: str) -> float | None:
        a, o = median(anim.values(key, "inst_per_s")), median(orth.values(key, "inst_per_s"))
        return a / o if a and o else None

    def noise(x: float) -> str:
        if abs(x - 1) >= 0.25:
            return ""
        return " (within this machine's ±25 % noise: repeat before concluding)"

    out = ["Target check (indicative; one run on a shared machine):", ""]
    one, par = ratio("ingest_single"), ratio("ingest_parallel")
    if one is not None:
        out.append(f"- 1 association, at least Orthanc: anim ÷ Orthanc = {one:.2f} → "
                   f"{'met' if one >= 1 else 'not met'}{noise(one)}")
    if par is not None:
        out.append(f"- parallel associations, better than Orthanc: anim ÷ Orthanc = {par:.2f} → "
                   f"{'met' if par > 1 else 'not met'}{noise(par)}")
    gr = rss_growth(anim)
    if gr is not None:
        out.append(f"- peak RSS flat as the archive grows: re-send peak ÷ first-ingest peak = "
                   f"{gr:.2f} → {'flat (≤ 1.10)' if gr <= 1.10 else 'grows'}; "
                   f"Orthanc: {num(rss_growth(orth))}")
    return [*out, ""]


# ---------------------------------------------------------------------------- header
def header(anim: Run | None, orth: Run | None, command: str | None) -> list[str]:
    ex = anim or orth
    assert ex is not None
    m, mc = ex.meta, ex.meta.get("machine", {})
    quick = any(dig(r.meta, "args", "quick") for r in (anim, orth) if r)
    out = []
    if quick:
        out += ["**SMOKE RUN (`--quick`): one round, no waiting for a quiet machine. It shows "
                "that the pipeline works; the figures are not a measurement.**", ""]
    dates = " / ".join(
        f"{name} {r.meta.get('date', '?')} ({minutes(r.meta.get('runtime_s'))})"
        for name, r in (("anim", anim), ("Orthanc", orth)) if r)
    out.append(f"- **Date**: {dates}")
    if command:
        out.append(f"- **Command**: `{command}` (from the repository root)")
    out.append(f"- **Machine**: {mc.get('cpu', '?')}, nproc {mc.get('cores', '?')}, "
               f"{num(mc.get('mem_gib'))} GiB RAM, {mc.get('os', '?')}; "
               f"storage on {mc.get('fs', '?')}; "
               f"load average at start {cores(dig(mc, 'loadavg_at_start', 0))}")
    dv = dig(m, "dataset", "variants") or {}
    sizes = ", ".join(f"{v}: {d['instances']} instances / {d['bytes'] / 1e6:.0f} MB"
                      for v, d in dv.items() if v in "AB")
    out.append(f"- **Dataset**: gen_dataset.py {dig(m, 'dataset', 'params')}, "
               f"seed {dig(m, 'dataset', 'seed')}; {sizes}; {dig(ex.T, 'rounds')} round(s) per "
               f"target, each on a fresh, empty archive")
    for name, r in (("anim", anim), ("Orthanc", orth)):
        if r:
            cmd = dig(r.meta, "target", "server_cmd")
            out.append(f"- **{name}**: {r.meta.get('notes') or '–'}; `{cmd}`")
    out.append(f"- **Other tenants** (CPU used by processes outside the benchmark during the "
               f"target's ingest phases): {noise_line(anim, orth)}")
    names = ", ".join(f"`{shown(r.path.with_suffix('.md'))}`" for r in (anim, orth) if r)
    out.append(f"- **Files**: {names} (tables per round) and their `.json` (all data, not in git)")
    return [*out, ""]


def noise_line(anim: Run | None, orth: Run | None) -> str:
    parts = []
    for name, r in (("anim run", anim), ("Orthanc run", orth)):
        if not r:
            continue
        xs = [x["foreign_cores"] for k, *_ in phases([r]) for x in r.runs(k)
              if x.get("foreign_cores") is not None]
        if xs:
            parts.append(f"{name} median {cores(statistics.median(xs))} cores, "
                         f"max {cores(max(xs))}")
    return "; ".join(parts) or "not recorded"


def report(anim: Run | None, orth: Run | None, command: str | None) -> str:
    L = header(anim, orth, command)
    L += ["Throughput: median over rounds (min–max). *anim ÷ Orthanc* compares the medians; "
          "the next column divides each target's per-round ratio to its own storescp first, "
          "which cancels load that differed between the two runs. Ratios to a bound are per "
          "round, against the bound measured in the same round, then the median (min–max). "
          "storescp writes one file per instance (no index, no fsync); for the re-send it only "
          "receives (`--ignore`). pynetdicom = the harness' tuned bare pynetdicom receiver (the "
          "ceiling for a Python DIMSE server).", ""]
    L += throughput(anim, orth)
    L += verdict(anim, orth)
    L += ["Disk: allocated blocks of the storage directory (index included) ÷ bytes of the "
          "files sent.", ""]
    L += storage(anim, orth)
    L += ["Server memory (RSS of the server's process tree, sampled every 50 ms), MiB: peak "
          "during the phase / at its end. The re-send runs on the archive holding A + B with one "
          "association, like the first ingest of A on the empty archive: their ratio shows "
          "whether memory grows with the archive.", ""]
    L += memory(anim, orth)
    L += ["Server CPU seconds per 1000 instances (user + system, server process tree).", ""]
    L += cpu(anim, orth)
    L += ["Checks and noise.", ""]
    L += checks(anim, orth)
    return "\n".join(L)


# ---------------------------------------------------------------------------- output
def write_section(path: Path, body: str, today: str) -> None:
    text = path.read_text() if path.exists() else INTRO + BEGIN + "\n" + PLACEHOLDER + END + "\n"
    section = f"{BEGIN}\n<!-- written by bench/summarize.py on {today} -->\n{body.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        pre, rest = text.split(BEGIN, 1)
        post = rest.split(END, 1)[1]
        text = pre + section + post
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def shown(p: Path) -> str:
    """A path relative to the repository when it is inside it."""
    p = p.resolve()
    return str(p.relative_to(HERE.parent)) if p.is_relative_to(HERE.parent) else str(p)


def newest(label: str) -> Path | None:
    files = sorted((HERE / "results").glob(f"{label}-[0-9]*.json"))
    return files[-1] if files else None


def cli(argv: list[str] | None, doc: str | None, kind: str,
        report_of: Callable[[Any, Any, str | None], str],
        write: Callable[[Path, str, str], None], run_class: type | None = None) -> int:
    """The command line of a summary: bench/summarize.py (kind "ingest") and
    bench/speed_summary.py (kind "speed") differ only in what they tabulate."""
    ap = argparse.ArgumentParser(description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anim", type=Path,
                    help=f"anim result JSON (default: newest bench/results/anim-{kind}-*.json)")
    ap.add_argument("--orthanc", type=Path,
                    help=f"Orthanc result (default: newest bench/results/orthanc-{kind}-*.json)")
    ap.add_argument("--write", type=Path, metavar="FILE",
                    help="also replace the section between its markers in FILE")
    ap.add_argument("--command", help="the command that produced the results (recorded with them)")
    a = ap.parse_args(argv)
    paths = (a.anim or newest(f"anim-{kind}"), a.orthanc or newest(f"orthanc-{kind}"))
    if not any(paths):
        ap.error(f"no result files: give --anim/--orthanc or run bench/run-{kind}")
    load = run_class or Run
    anim, orth = (load(p) if p else None for p in paths)
    body = report_of(anim, orth, a.command)
    print(body)
    if a.write:
        write(a.write, body, dt.date.today().isoformat())
        print(f"updated {a.write}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(argv, __doc__, "ingest", report, write_section)


if __name__ == "__main__":
    sys.exit(main())
