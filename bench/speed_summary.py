#!/usr/bin/env python3
"""Summarize the speed benchmark of issue 9: anim against Orthanc, one row per target.

Reads the result JSON files that ../shared/bench/bench.py wrote for anim and for Orthanc
(``bench/run-speed`` runs both, phases bounds,ingest,echo,find,move,wado) and prints a Markdown
section: how and where it was measured, then a table with, for every target of issue 9, anim's
and Orthanc's figure, the ratio anim ÷ Orthanc, the target and whether it is met; plus DCMTK
storescp's ingest rate in the same rounds (the C++ bound) and a list of answer checks.

    bench/speed_summary.py              # the newest anim-speed-* and orthanc-speed-* results
    bench/speed_summary.py --anim A.json --orthanc O.json --write docs/benchmarks.md

With ``--write FILE`` the section also replaces the part of FILE between
``<!-- speed:begin -->`` and ``<!-- speed:end -->``; without the markers, a section
"## Speed against Orthanc (issue 9)" holding them is appended to FILE. Standard library only.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the ingest summary's helpers (this folder is on sys.path when run as a script)
import summarize
from summarize import cli, dig, median, minutes, num, shown, table

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
SECTION = """## Speed against Orthanc (issue 9)

Targets of issue 9 on the 2-core machine, anim against Orthanc (Debian packages `orthanc` +
`orthanc-dicomweb`) on the same generated dataset in the same invocation, with DCMTK `storescp`
as the C++ bound. Written by `bench/speed_summary.py --write docs/benchmarks.md` (which
`bench/run-speed` runs); do not edit between the markers.

"""
MIB = 2**20
INGEST_PHASES = ("ingest_single", "ingest_parallel", "resend")
MARGIN = 0.10  # a ratio this close to its threshold is marked: repeat before concluding


# ---------------------------------------------------------------------------- reading
class Run(summarize.Run):
    """One harness result file, with what the speed table reads besides the ingest one."""

    def to_bound(self, phase: str, name: str, mode: str) -> list[float]:
        """Per-round target ÷ bound, the bound measured in the same round."""
        return self.paired(phase, name, mode)

    def peak_rss(self) -> list[float]:
        """Per round: the highest server RSS (process tree) over the C-STORE ingest phases."""
        n = max((len(self.runs(p)) for p in INGEST_PHASES), default=0)
        out = []
        for i in range(n):
            peaks = [rs[i].get("server_peak_rss") for p in INGEST_PHASES
                     if len(rs := self.runs(p)) > i]
            if vals := [x for x in peaks if isinstance(x, (int, float))]:
                out.append(float(max(vals)))
        return out

    def rounds(self) -> int:
        return len(self.runs("ingest_single"))


# ---------------------------------------------------------------------------- formatting
def spread(xs: list[float], unit: str = "") -> str:
    """Median, with (min–max) when there is more than one value."""
    if not xs:
        return "–"
    s = num(statistics.median(xs), unit)
    if len(xs) > 1:
        s += f" ({num(min(xs))}–{num(max(xs))})"
    return s


# ---------------------------------------------------------------------------- one figure
@dataclass
class Fig:
    """One side of a row: the value compared (a median), its text, and wrong answers if any."""

    value: float | None
    text: str
    wrong: str = ""


NONE = Fig(None, "–")


def ingest_fig(r: Run | None, phase: str) -> Fig:
    xs = r.values(phase, "inst_per_s") if r else []
    if not xs or r is None:
        return NONE
    bad = [i + 1 for i, x in enumerate(r.runs(phase))
           if x.get("status_success") != x.get("instances") or x.get("status_failure")
           or x.get("error_lines")]
    wrong = f"C-STORE failures in round(s) {bad}" if bad else ""
    return Fig(statistics.median(xs), spread(xs, "inst/s"), wrong)


def rss_fig(r: Run | None) -> Fig:
    xs = [x / MIB for x in r.peak_rss()] if r else []
    return Fig(statistics.median(xs), spread(xs, "MiB")) if xs else NONE


def latency_fig(d: Any, wrong: str = "") -> Fig:
    """A latency dict of the harness (ms; median, p95, n over the requests of the last round)."""
    med = dig(d, "median")
    if med is None:
        return NONE
    return Fig(med, f"{num(med, 'ms')} (p95 {num(dig(d, 'p95'))}, n {dig(d, 'n')})", wrong)


def echo_fig(r: Run | None) -> Fig:
    e = dig(r.T, "echo") if r else None
    bad = dig(e, "failures")
    return latency_fig(dig(e, "echo_on_open_assoc"), f"{bad} failed C-ECHO" if bad else "")


def find_fig(r: Run | None, query: str) -> Fig:
    q = dig(r.T, "find", "raw", query) if r else None
    wrong = ""
    if q is not None and (q.get("ok") is False or q.get("failures")):
        wrong = (f"matches {q.get('results')} (expected {q.get('expected')}), "
                 f"{q.get('failures')} failures")
    return latency_fig(dig(q, "open_assoc"), wrong)


def mbps_fig(d: Any, bad: Any, what: str) -> Fig:
    """MB/s per request (median (min–max), n requests of the last round)."""
    v = dig(d, "mb_per_s")
    med = dig(v, "median")
    if med is None:
        return NONE
    text = f"{num(med, 'MB/s')} ({num(dig(v, 'min'))}–{num(dig(v, 'max'))}, n {dig(v, 'n')})"
    return Fig(med, text, f"{bad} {what}" if bad else "")


def move_fig(r: Run | None, key: str) -> Fig:
    d = dig(r.T, "move", key) if r else None
    err = dig(r.T, "move", "move_error") if r else None
    if d is None and err:
        return Fig(None, "–", str(err))
    return mbps_fig(d, dig(d, "count_mismatches"), "studies with a wrong sub-operation count")


def wado_fig(r: Run | None, enc: str) -> Fig:
    d = dig(r.T, f"wado_{enc}", "study_retrieve") if r else None
    codes = {k: v for k, v in (dig(d, "status") or {}).items() if str(k) != "200"}
    f = mbps_fig(d, dig(d, "part_count_mismatches"), "responses with a wrong status or part count")
    if codes:
        f.wrong = (f.wrong + "; " if f.wrong else "") + f"HTTP status {codes}"
    return f


# ---------------------------------------------------------------------------- rows
@dataclass
class Target:
    op: str  # ">=" (anim ÷ Orthanc at least thr) or "<="
    thr: float

    def text(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {self.thr:g}×"

    def met(self, ratio: float | None, wrong: bool) -> str:
        if ratio is None:
            return "–"
        if wrong:
            return "**not met** (wrong answers)"
        ok = ratio >= self.thr if self.op == ">=" else ratio <= self.thr
        s = "**met**" if ok else "**not met**"
        return s + " †" if abs(ratio / self.thr - 1) < MARGIN else s


def ratio_text(ratio: float | None, extra: str = "") -> str:
    return "–" if ratio is None else f"{ratio:.2f}×" + (f" {extra}" if extra else "")


def paired_ratio(a: list[float], o: list[float]) -> tuple[float | None, str, bool]:
    """anim ÷ Orthanc: per round then the median when the round counts match, else of medians."""
    if a and o and len(a) == len(o):
        rs = [x / y for x, y in zip(a, o, strict=True) if y]
        if rs:
            extra = f"({min(rs):.2f}–{max(rs):.2f})" if len(rs) > 1 else ""
            return statistics.median(rs), extra, True
    am, om = median(a), median(o)
    if am is not None and om:
        return am / om, "(of medians)" if len(a) > 1 or len(o) > 1 else "", False
    return None, "", False


class Rows:
    def __init__(self, anim: Run | None, orth: Run | None) -> None:
        self.anim, self.orth = anim, orth
        self.rows: list[list[str]] = []
        self.results: list[tuple[str, str]] = []  # (target number, met text)
        self.methods: set[bool] = set()  # True = per-round ratios, False = ratio of medians

    def add(self, no: str, metric: str, a: Fig, o: Fig, tgt: Target,
            ratio: tuple[float | None, str] | None = None) -> None:
        r, extra = ratio if ratio else ((a.value / o.value, "")
                                        if a.value is not None and o.value else (None, ""))
        wrong = bool(a.wrong)
        cells = [f"{f.text} **[{f.wrong}]**" if f.wrong else f.text for f in (a, o)]
        met = tgt.met(r, wrong)
        self.rows.append([no, metric, *cells, ratio_text(r, extra), tgt.text(), met])
        self.results.append((no, met))

    def add_ingest(self, no: str, metric: str, phase: str, tgt: Target) -> None:
        a, o = ingest_fig(self.anim, phase), ingest_fig(self.orth, phase)
        av = self.anim.values(phase, "inst_per_s") if self.anim else []
        ov = self.orth.values(phase, "inst_per_s") if self.orth else []
        r, extra, per_round = paired_ratio(av, ov)
        if r is not None:
            self.methods.add(per_round)
        self.add(no, metric, a, o, tgt, (r, extra))

    def add_rss(self, no: str, tgt: Target) -> None:
        av = self.anim.peak_rss() if self.anim else []
        ov = self.orth.peak_rss() if self.orth else []
        r, extra, per_round = paired_ratio(av, ov)
        if r is not None:
            self.methods.add(per_round)
        self.add(no, "peak server RSS during C-STORE ingest (process tree; highest of the ingest "
                 "phases per round)", rss_fig(self.anim), rss_fig(self.orth), tgt, (r, extra))

    def add_bound(self, metric: str, phase: str, mode: str) -> None:
        def cell(r: Run | None) -> str:
            return spread(r.bound_values("storescp_write", mode), "inst/s") if r else "–"

        def share(name: str, r: Run | None) -> str:
            xs = r.to_bound(phase, "storescp_write", mode) if r else []
            return f"{name} {100 * statistics.median(xs):.0f} %" if xs else ""

        parts = [s for s in (share("anim", self.anim), share("Orthanc", self.orth)) if s]
        of = (", ".join(parts) + " of it") if parts else "–"
        self.rows.append(["", metric, cell(self.anim), cell(self.orth), of, "C++ bound", "–"])


def n_assoc(runs: list[Run]) -> int:
    return next((int(v) for r in runs for v in r.values("ingest_parallel", "processes")), 4)


def build(anim: Run | None, orth: Run | None) -> Rows:
    rows = Rows(anim, orth)
    both = [r for r in (anim, orth) if r]
    n = n_assoc(both)
    rows.add_ingest("1", "C-STORE ingest, 1 association (inst/s)", "ingest_single",
                    Target(">=", 1.5))
    rows.add_ingest("2", f"C-STORE ingest, {n} associations (inst/s)", "ingest_parallel",
                    Target(">=", 1.5))
    rows.add("3", "C-ECHO on an open association (ms)", echo_fig(anim), echo_fig(orth),
             Target("<=", 3))
    labels = next((q for r in both if (q := dig(r.T, "find", "queries"))), None) or {
        "patientname_wildcard": "PatientName=SMI*", "studydate_range": "StudyDate range"}
    for k, label in labels.items():
        rows.add("4", f"C-FIND study, {label}, open association (ms)", find_fig(anim, k),
                 find_fig(orth, k), Target("<=", 3))
    rows.add("5", "C-MOVE of a study to storescp (MB/s per study)",
             move_fig(anim, "c_move_study"), move_fig(orth, "c_move_study"), Target(">=", 1))
    rows.add("5", "C-GET of a study, getscu (MB/s per study)", move_fig(anim, "c_get_study"),
             move_fig(orth, "c_get_study"), Target(">=", 1))
    rows.add("6", "WADO-RS study retrieve, no compression (MB/s per request)",
             wado_fig(anim, "identity"), wado_fig(orth, "identity"), Target(">=", 1))
    rows.add("6", "WADO-RS study retrieve, `Accept-Encoding: gzip, deflate` (MB/s per request)",
             wado_fig(anim, "gzip"), wado_fig(orth, "gzip"), Target(">=", 1))
    rows.add_rss("7", Target("<=", 1))
    rows.add_bound("DCMTK storescp, 1 association (inst/s), in the same rounds",
                   "ingest_single", "single")
    rows.add_bound(f"DCMTK storescp --fork, {n} associations (inst/s), in the same rounds",
                   "ingest_parallel", "parallel")
    floor = [latency_fig(dig(r.B, "storescp_echo", "echo_on_open_assoc")).text if r else "–"
             for r in (anim, orth)]
    rows.rows.append(["", "DCMTK storescp C-ECHO on an open association (ms), before the read "
                      "phases", *floor, "–", "C++ floor", "–"])
    return rows


# ---------------------------------------------------------------------------- sections
def header(anim: Run | None, orth: Run | None, command: str | None) -> list[str]:
    ex = anim or orth
    assert ex is not None
    m, mc = ex.meta, ex.meta.get("machine", {})
    out = []
    if any(dig(r.meta, "args", "quick") for r in (anim, orth) if r):
        out += ["**SMOKE RUN (`--quick`): one round, few requests, no waiting for a quiet "
                "machine. It shows that the pipeline works; the figures are not a "
                "measurement.**", ""]
    dates = " / ".join(f"{name} {r.meta.get('date', '?')} ({minutes(r.meta.get('runtime_s'))})"
                       for name, r in (("anim", anim), ("Orthanc", orth)) if r)
    out.append(f"- **Date**: {dates}")
    if command:
        out.append(f"- **Command**: `{command}` (from the repository root)")
    load = dig(mc, "loadavg_at_start")
    out.append(f"- **Machine**: {mc.get('cpu', '?')}, nproc {mc.get('cores', '?')}, "
               f"{num(mc.get('mem_gib'))} GiB RAM, {mc.get('os', '?')}; storage on "
               f"{mc.get('fs', '?')}; load average at start "
               f"{num(load[0] if isinstance(load, list) and load else None)}")
    dv = dig(m, "dataset", "variants") or {}
    sizes = ", ".join(f"{v}: {d['instances']} instances / {d['bytes'] / 1e6:.0f} MB"
                      for v, d in dv.items() if v in "AB")
    rounds = " / ".join(f"{name} {r.rounds()}" for name, r in (("anim", anim), ("Orthanc", orth))
                        if r)
    out.append(f"- **Dataset**: gen_dataset.py {dig(m, 'dataset', 'params')}, seed "
               f"{dig(m, 'dataset', 'seed')}; {sizes}; rounds: {rounds}, each on a fresh, empty "
               f"archive; phases {', '.join(m.get('phases') or [])}")
    for name, r in (("anim", anim), ("Orthanc", orth)):
        if r:
            out.append(f"- **{name}**: {r.meta.get('notes') or '–'}; "
                       f"`{dig(r.meta, 'target', 'server_cmd')}`")
    dcmtk = dig(m, "tools", "dcmtk")
    if dcmtk:
        out.append(f"- **DCMTK**: {dcmtk}")
    out.append(f"- **Other tenants** (CPU of processes outside the benchmark during the ingest "
               f"phases): {noise_line(anim, orth)}")
    names = ", ".join(f"`{shown(r.path.with_suffix('.md'))}`" for r in (anim, orth) if r)
    out.append(f"- **Files**: {names} (the harness' tables) and their `.json` (all data)")
    return [*out, ""]


def noise_line(anim: Run | None, orth: Run | None) -> str:
    parts = []
    for name, r in (("anim run", anim), ("Orthanc run", orth)):
        xs = [x["foreign_cores"] for p in INGEST_PHASES for x in (r.runs(p) if r else [])
              if x.get("foreign_cores") is not None]
        if xs:
            parts.append(f"{name} median {statistics.median(xs):.2f} cores, max {max(xs):.2f}")
    return "; ".join(parts) or "not recorded"


def explain(rows: Rows) -> list[str]:
    if rows.methods == {True}:
        how = ("per round (anim's round i ÷ Orthanc's round i), then the median (min–max)")
    elif rows.methods == {False}:
        how = "as the ratio of the medians (the two runs have different numbers of rounds)"
    else:
        how = "per round then the median where both have the same rounds, else of the medians"
    return ["Ingest (rows 1, 2, 7): median over rounds (min–max). Their ratio anim ÷ Orthanc is "
            f"computed {how}. The other rows come from the last round only, on the filled archive "
            "(variants A + B): latencies are the median (p95, n) of n requests with the harness' "
            "raw-socket SCU (TCP_NODELAY); MB/s is per study or per request, median (min–max, n). "
            "The ratio is always anim ÷ Orthanc: for latencies and memory lower is better, so the "
            "target is a ceiling. † = within 10 % of the threshold: repeat before concluding. "
            "storescp writes one file per instance (no index, no fsync); its row shows it in the "
            "anim run's and the Orthanc run's rounds, with each target's share of it (per round, "
            "median).", ""]


def checks(anim: Run | None, orth: Run | None) -> list[str]:
    def line(name: str, r: Run) -> str:
        counts = ", ".join(str([x.get("archive_instances_after") for x in r.runs(p)])
                           for p in INGEST_PHASES if r.runs(p))
        quiet = [q for p in INGEST_PHASES for x in r.runs(p) if (q := x.get("quiet"))]
        waited = (f"{sum(bool(q.get('quiet')) for q in quiet)} of {len(quiet)} ingest phases "
                  "started on a quiet machine" if any("quiet" in q for q in quiet)
                  else "no waiting for a quiet machine")
        warn = "; ".join(r.T.get("warnings") or []) or "none"
        return (f"- {name}: instances in the archive after 1 association / {n_assoc([r])} "
                f"associations / re-send, per round: {counts}; {waited}; harness warnings: "
                f"{warn}")

    return [line(n, r) for n, r in (("anim", anim), ("Orthanc", orth)) if r] + [""]


def verdict(rows: Rows, both: bool) -> list[str]:
    if not both:
        return ["Targets: need both an anim and an Orthanc result.", ""]
    met = [no for no, m in rows.results if m.startswith("**met**")]
    bad = [no for no, m in rows.results if not m.startswith("**met**")]
    s = f"**{len(met)} of {len(rows.results)} rows met**"
    if bad:
        s += f"; not met or not measured: target(s) {', '.join(dict.fromkeys(bad))}"
    return [s + ".", ""]


def report(anim: Run | None, orth: Run | None, command: str | None) -> str:
    rows = build(anim, orth)
    L = header(anim, orth, command)
    L += table(["#", "Metric", "anim", "Orthanc", "anim ÷ Orthanc", "Target", "Status"],
               rows.rows)
    L += verdict(rows, bool(anim and orth))
    L += explain(rows)
    L += checks(anim, orth)
    return "\n".join(L)


# ---------------------------------------------------------------------------- output
def write_section(path: Path, body: str, today: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = (f"{BEGIN}\n<!-- written by bench/speed_summary.py on {today} -->\n"
               f"{body.rstrip()}\n{END}")
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        pre, rest = text.split(BEGIN, 1)
        text = pre + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + SECTION + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    return cli(argv, __doc__, "speed", report, write_section, Run)


if __name__ == "__main__":
    sys.exit(main())
