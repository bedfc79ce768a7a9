#!/usr/bin/env python3
"""Bulk-load a large synthetic index into an anim database, for the query benchmark.

The rows go straight into the archive's own tables: the engine comes from
``anim.index.engine.make_engine``, the schema from ``anim.index.migrations.migrate`` and the
tables from ``anim.index.schema``. Nothing is sent through DIMSE, and no blob is written. The
version rows name fake blob keys (the SHA-256 of a counter), so the fake instances can be found
but not retrieved. To have a few studies with real blobs (for C-MOVE), run
``anim import`` on the same archive afterwards (``bench/run-query`` does that):

    bench/load_index.py sqlite:////tmp/x/data/index.sqlite     # 100k studies, 1M instances
    bench/load_index.py postgresql://archive@127.0.0.1:55499/anim --studies 2000 \
        --instances 20000 --patients 800
    .venv/bin/anim import --data /tmp/x/data /tmp/dicom-bench/data-small/A

What is generated (deterministic for a given ``--seed`` and sizes):

- patients (default 40,000): family^given names, upper case, drawn uniformly from 300 family
  names (only SMITH starts with SMI, so ``PatientName=SMI*`` matches about 1/300 of the studies)
  and 120 given names; patient IDs ``P0000001``…, birth dates 1930–2020, sex M/F (a few O);
- studies (default 100,000): every patient has at least one, the rest are spread at random;
  dates over 10 years (2015–2024, fewer on weekends), ids in date order (as an archive fills);
  accession numbers, study IDs, descriptions and referring physicians by modality; the primary
  modality is drawn from CT 28 %, CR 20 %, MR 18 %, DX 10 %, US 10 %, MG 6 %, PT 2 % (with a CT
  series), NM 2 %, XA 2 %, RF 0.4 %, OT 1.6 %; 8 % of the studies also hold an SR series;
- series: 1–5 per study (about 3 on average), by modality;
- instances (default 1,000,000): CR/DX/MG/SR series hold 1–2 instances, the other series share
  the rest in proportion to a modality weight (CT and PT most), so the total is exact;
- one ``version`` row per instance: state ``current``, fake digest and blob keys, size by
  modality, a compact realistic DICOM JSON header (about 1 KB: the identifying attributes of
  the patient, study, series and instance; ``--json empty`` stores ``{}``);
- ``instance.current_version_fk`` set; the denormalised counts (``patient.num_studies``,
  ``study.num_series``/``num_instances``/``modalities``, ``series.num_instances``) consistent.
  One ``study_source`` row per study (its institution: the tenancy filter's table). No
  ``change`` rows.

The database must be empty (only the schema). SQLite is loaded with SQLAlchemy Core
``executemany`` in batches, with ``synchronous=OFF`` and a large page cache on the loading
connection only (the archive's own connections keep their settings). PostgreSQL is loaded with
``COPY … FROM STDIN`` through psycopg (``--method core`` uses executemany there too), then the id
sequences are moved past the loaded ids and ``VACUUM ANALYZE`` runs, as autovacuum would after
a bulk load. During a COPY load the secondary indexes, unique and foreign-key constraints of the
loaded tables are dropped and built again at the end (``--no-defer`` keeps them): one sort per
index instead of millions of random inserts into B-trees larger than the cache. SQLite gets no
``ANALYZE``, because anim never runs it either.

At the end it prints the load rate and writes a JSON marker (``--marker``, by default
``load_index.json`` next to a SQLite file) that holds the parameters, the counts and the
timings. ``bench/run-query`` uses that marker to reuse a complete index.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, func, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from anim.index import schema  # noqa: E402
from anim.index.engine import make_engine  # noqa: E402
from anim.index.migrations import migrate  # noqa: E402


def _words(s: str) -> list[str]:
    return s.split()


FAMILY = _words("""
SMITH JOHNSON WILLIAMS BROWN JONES GARCIA MILLER DAVIS RODRIGUEZ MARTINEZ HERNANDEZ LOPEZ
GONZALEZ WILSON ANDERSON THOMAS TAYLOR MOORE JACKSON MARTIN LEE PEREZ THOMPSON WHITE HARRIS
SANCHEZ CLARK RAMIREZ LEWIS ROBINSON WALKER YOUNG ALLEN KING WRIGHT SCOTT TORRES NGUYEN HILL
FLORES GREEN ADAMS NELSON BAKER HALL RIVERA CAMPBELL MITCHELL CARTER ROBERTS GOMEZ PHILLIPS
EVANS TURNER DIAZ PARKER CRUZ EDWARDS COLLINS REYES STEWART MORRIS MORALES MURPHY COOK ROGERS
GUTIERREZ ORTIZ MORGAN COOPER PETERSON BAILEY REED KELLY HOWARD RAMOS KIM COX WARD RICHARDSON
WATSON BROOKS CHAVEZ WOOD JAMES BENNETT GRAY MENDOZA RUIZ HUGHES PRICE ALVAREZ CASTILLO
SANDERS PATEL MYERS LONG ROSS FOSTER JIMENEZ POWELL JENKINS PERRY RUSSELL SULLIVAN BELL
COLEMAN BUTLER HENDERSON BARNES GONZALES FISHER VASQUEZ SIMMONS ROMERO JORDAN PATTERSON
ALEXANDER HAMILTON GRAHAM REYNOLDS GRIFFIN WALLACE MORENO WEST COLE HAYES BRYANT HERRERA
GIBSON ELLIS TRAN MEDINA AGUILAR STEVENS MURRAY FORD CASTRO MARSHALL OWENS HARRISON FERNANDEZ
MCDONALD WOODS WASHINGTON KENNEDY WELLS VARGAS HENRY CHEN FREEMAN WEBB TUCKER GUZMAN BURNS
CRAWFORD OLSON SIMPSON PORTER HUNTER GORDON MENDEZ SILVA SHAW SNYDER MASON DIXON MUNOZ HUNT
HICKS HOLMES PALMER WAGNER BLACK ROBERTSON BOYD ROSE STONE SALAZAR FOX WARREN MILLS MEYER
RICE SCHMIDT GARZA DANIELS FERGUSON NICHOLS STEPHENS SOTO WEAVER RYAN GARDNER PAYNE GRANT
DUNN KELLEY SPENCER HAWKINS ARNOLD PIERCE VAZQUEZ HANSEN PETERS SANTOS HART BRADLEY KNIGHT
ELLIOTT CUNNINGHAM DUNCAN ARMSTRONG HUDSON CARROLL LANE RILEY ANDREWS ALVARADO RAY DELGADO
BERRY PERKINS HOFFMAN JOHNSTON MATTHEWS PENA RICHARDS CONTRERAS WILLIS CARPENTER LAWRENCE
SANDOVAL GUERRERO GEORGE CHAPMAN RIOS ESTRADA ORTEGA WATKINS GREENE NUNEZ WHEELER VALDEZ
HARPER BURKE LARSON SANTIAGO MALDONADO MORRISON FRANKLIN CARLSON AUSTIN DOMINGUEZ CARR
LAWSON JACOBS OBRIEN LYNCH SINGH VEGA BISHOP MONTGOMERY OLIVER JENSEN HARVEY WILLIAMSON
GILBERT DEAN SIMS ESPINOZA HOWELL LI WONG REID HANSON LE MCCOY GARRETT BURTON FULLER WANG
WEBER WELCH ROJAS LUCAS MARQUEZ FIELDS PARK YANG LITTLE BANKS PADILLA DAY WALSH BOWMAN
SCHULTZ LUNA FOWLER MEJIA DAVIDSON ACOSTA BREWER MAY HOLLAND JUAREZ NEWMAN PEARSON CURTIS
CORTEZ DOUGLAS SCHNEIDER JOSEPH BARRETT NAVARRO FIGUEROA KELLER AVILA WADE MOLINA STANLEY
HOPKINS CAMPOS BARNETT BATES CHAMBERS CALDWELL BECK LAMBERT MIRANDA BYRD CRAIG AYALA LOWE
FRAZIER POWERS NEAL LEONARD GREGORY CARRILLO SUTTON FLEMING RHODES SHELTON SCHWARTZ NORRIS
JENNINGS WATTS DURAN WALTERS COHEN MCDANIEL MORAN PARKS STEELE VAUGHN BECKER HOLT DELEON
""")[:300]

GIVEN = _words("""
JAMES MARY JOHN PATRICIA ROBERT JENNIFER MICHAEL LINDA WILLIAM ELIZABETH DAVID BARBARA RICHARD
SUSAN JOSEPH JESSICA THOMAS SARAH CHARLES KAREN CHRISTOPHER LISA DANIEL NANCY MATTHEW BETTY
ANTHONY MARGARET MARK SANDRA DONALD ASHLEY STEVEN KIMBERLY PAUL EMILY ANDREW DONNA JOSHUA
MICHELLE KENNETH CAROL KEVIN AMANDA BRIAN DOROTHY GEORGE MELISSA TIMOTHY DEBORAH RONALD
STEPHANIE EDWARD REBECCA JASON SHARON JEFFREY LAURA RYAN CYNTHIA JACOB KATHLEEN GARY AMY
NICHOLAS ANGELA ERIC SHIRLEY JONATHAN ANNA STEPHEN BRENDA LARRY PAMELA JUSTIN EMMA SCOTT
NICOLE BRANDON HELEN BENJAMIN SAMANTHA SAMUEL KATHERINE GREGORY CHRISTINE ALEXANDER DEBRA
FRANK RACHEL PATRICK CAROLYN RAYMOND JANET JACK CATHERINE DENNIS MARIA JERRY HEATHER TYLER
DIANE AARON RUTH JOSE JULIE ADAM OLIVIA NATHAN JOYCE HENRY VIRGINIA DOUGLAS VICTORIA ZACHARY
KELLY PETER LAUREN KYLE CHRISTINA
""")[:120]

# primary modality of a study: (modality, share, series range, SOP class, description choices)
MODALITIES: list[tuple[str, float, tuple[int, int], str, tuple[str, ...]]] = [
    ("CT", 0.28, (2, 5), "1.2.840.10008.5.1.4.1.1.2",
     ("CT HEAD W/O CONTRAST", "CT CHEST WITH CONTRAST", "CT ABDOMEN PELVIS WITH CONTRAST",
      "CT CHEST W/O CONTRAST", "CT ANGIO PULMONARY", "CT SPINE LUMBAR", "CT SINUS")),
    ("CR", 0.20, (1, 3), "1.2.840.10008.5.1.4.1.1.1",
     ("XR CHEST 2 VIEWS", "XR KNEE 3 VIEWS", "XR HAND", "XR ANKLE", "XR PELVIS", "XR SPINE")),
    ("MR", 0.18, (3, 5), "1.2.840.10008.5.1.4.1.1.4",
     ("MR BRAIN W/O CONTRAST", "MR KNEE", "MR SPINE LUMBAR", "MR SHOULDER", "MR PROSTATE",
      "MR BRAIN WITH AND W/O CONTRAST")),
    ("DX", 0.10, (1, 3), "1.2.840.10008.5.1.4.1.1.1.1",
     ("DX CHEST PA LAT", "DX FOOT", "DX WRIST", "DX ABDOMEN")),
    ("US", 0.10, (1, 3), "1.2.840.10008.5.1.4.1.1.6.1",
     ("US ABDOMEN COMPLETE", "US THYROID", "US OB 2ND TRIMESTER", "US RENAL", "US CAROTID")),
    ("MG", 0.06, (2, 4), "1.2.840.10008.5.1.4.1.1.1.2",
     ("MG SCREENING BILATERAL", "MG DIAGNOSTIC LEFT", "MG DIAGNOSTIC RIGHT")),
    ("PT", 0.02, (2, 3), "1.2.840.10008.5.1.4.1.1.128",
     ("PET CT WHOLE BODY", "PET CT SKULL TO THIGH")),
    ("NM", 0.02, (1, 3), "1.2.840.10008.5.1.4.1.1.20",
     ("NM BONE SCAN WHOLE BODY", "NM THYROID UPTAKE", "NM MYOCARDIAL PERFUSION")),
    ("XA", 0.02, (1, 5), "1.2.840.10008.5.1.4.1.1.12.1",
     ("XA CORONARY ANGIOGRAPHY", "XA CEREBRAL ANGIOGRAPHY")),
    ("RF", 0.004, (1, 3), "1.2.840.10008.5.1.4.1.1.12.2",
     ("RF BARIUM SWALLOW", "RF UPPER GI")),
    ("OT", 0.016, (1, 2), "1.2.840.10008.5.1.4.1.1.7", ("OUTSIDE IMAGES", "SCANNED DOCUMENT")),
]
SOP_CLASS = {m[0]: m[3] for m in MODALITIES} | {"SR": "1.2.840.10008.5.1.4.1.1.88.22"}
# share of the instances a series gets, relative (series of FIXED modalities hold 1-2)
WEIGHT = {"CT": 20.0, "PT": 25.0, "MR": 10.0, "US": 3.0, "XA": 6.0, "RF": 3.0, "NM": 2.0,
          "OT": 1.0}
FIXED = {"CR", "DX", "MG", "SR"}
SIZE = {"CT": 526_000, "MR": 133_000, "PT": 66_000, "NM": 262_000, "US": 921_000,
        "XA": 1_049_000, "RF": 1_049_000, "CR": 8_400_000, "DX": 11_000_000, "MG": 26_000_000,
        "OT": 790_000, "SR": 6_000}
BODY = {"CT": ("CHEST", "HEAD", "ABDOMEN", "SPINE"), "MR": ("BRAIN", "KNEE", "LSPINE", "SHOULDER"),
        "CR": ("CHEST", "KNEE", "HAND"), "DX": ("CHEST", "FOOT"), "US": ("ABDOMEN", "NECK"),
        "MG": ("BREAST",), "PT": ("WHOLEBODY",), "NM": ("WHOLEBODY", "HEART"), "XA": ("HEART",),
        "RF": ("ESOPHAGUS",), "OT": ("",), "SR": ("",)}
INSTITUTIONS = ("GENERAL HOSPITAL", "UNIVERSITY MEDICAL CENTER", "ST MARY CLINIC",
                "NORTH IMAGING CENTER", "CHILDRENS HOSPITAL")
EXPLICIT_LE = "1.2.840.10008.1.2.1"
FIRST_DAY = dt.date(2015, 1, 1)
DAYS = (dt.date(2024, 12, 31) - FIRST_DAY).days + 1
RECEIVED_AT = "2025-01-15T03:00:00.000000+00:00"


# ------------------------------------------------------------------------------- generation
@dataclass(slots=True)
class Series:
    uid: str
    modality: str
    number: int
    description: str
    body_part: str
    instances: int = 0


@dataclass(slots=True)
class Study:
    uid: str
    patient: int  # index into the patient list
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    referring: str
    institution: str
    series: list[Series] = field(default_factory=list)


@dataclass(slots=True)
class Patient:
    patient_id: str
    name: str
    birth_date: str
    sex: str
    studies: int = 0


class Generator:
    """Deterministic synthetic patients, studies and series; instances are streamed."""

    def __init__(self, seed: int, patients: int, studies: int, instances: int) -> None:
        if studies < patients:
            raise SystemExit("need at least as many studies as patients")
        self.rng = random.Random(seed)
        self.n_instances = instances
        self.patients = [self._patient(i) for i in range(patients)]
        self.studies = self._studies(studies)
        self._assign_instances()

    def uid(self) -> str:
        return f"2.25.{self.rng.getrandbits(127)}"

    def _patient(self, i: int) -> Patient:
        r = self.rng
        born = dt.date(1930, 1, 1) + dt.timedelta(days=r.randrange(90 * 365))
        sex = "O" if r.random() < 0.002 else r.choice("MF")
        return Patient(f"P{i + 1:07d}", f"{r.choice(FAMILY)}^{r.choice(GIVEN)}",
                       born.strftime("%Y%m%d"), sex)

    def _day(self) -> dt.date:
        while True:  # weekends get 40 % of a weekday's studies
            d = FIRST_DAY + dt.timedelta(days=self.rng.randrange(DAYS))
            if d.weekday() < 5 or self.rng.random() < 0.4:
                return d

    def _studies(self, n: int) -> list[Study]:
        r = self.rng
        owners = list(range(len(self.patients)))
        owners += [r.randrange(len(self.patients)) for _ in range(n - len(owners))]
        cum = list(_cumulative([m[1] for m in MODALITIES]))
        dated = sorted(((self._day(), r.randrange(7 * 3600, 20 * 3600), p) for p in owners),
                       key=lambda x: (x[0], x[1]))
        out = []
        for k, (day, secs, p) in enumerate(dated):
            m = MODALITIES[bisect.bisect_left(cum, r.random() * cum[-1])]
            st = Study(self.uid(), p, day.strftime("%Y%m%d"),
                       f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}",
                       f"{day.year % 100:02d}{k + 1:08d}", str(r.randrange(1, 100000)),
                       r.choice(m[4]), f"{r.choice(FAMILY)}^{r.choice(GIVEN)}^^DR",
                       r.choice(INSTITUTIONS))
            self._add_series(st, m[0], m[2])
            self.patients[p].studies += 1
            out.append(st)
        return out

    def _add_series(self, st: Study, modality: str, nrange: tuple[int, int]) -> None:
        r = self.rng
        mods = [modality] * r.randint(*nrange)
        if modality == "PT":
            mods[-1] = "CT"  # the attenuation-correction CT of a PET/CT
        if r.random() < 0.08:
            mods.append("SR")
        for i, m in enumerate(mods):
            desc = "DOSE REPORT" if m == "SR" else f"{m} SERIES {i + 1}"
            st.series.append(Series(self.uid(), m, i + 1, desc, r.choice(BODY[m])))

    def _assign_instances(self) -> None:
        r = self.rng
        fixed, scalable = [], []
        for st in self.studies:
            for se in st.series:
                (fixed if se.modality in FIXED else scalable).append(se)
        for se in fixed:
            se.instances = 1 if se.modality in ("SR", "MG") or r.random() < 0.7 else 2
        left = self.n_instances - sum(se.instances for se in fixed)
        if left < len(scalable):
            raise SystemExit(f"--instances too small: need at least "
                             f"{self.n_instances - left + len(scalable)}")
        weights = [WEIGHT[se.modality] * r.uniform(0.5, 1.5) for se in scalable]
        scale = (left - len(scalable)) / sum(weights)
        for se, w in zip(scalable, weights, strict=True):
            se.instances = 1 + int(w * scale)
        short = left - sum(se.instances for se in scalable)
        for se in r.sample(scalable, short):  # the rounding remainder, one each
            se.instances += 1


def _cumulative(xs: Sequence[float]) -> Iterator[float]:
    acc = 0.0
    for x in xs:
        acc += x
        yield acc


def _sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def _js(tag: str, vr: str, value: Any) -> str:
    if value in (None, ""):
        return f'"{tag}":{{"vr":"{vr}"}}'
    if vr == "PN":
        return f'"{tag}":{{"vr":"PN","Value":[{{"Alphabetic":{json.dumps(value)}}}]}}'
    return f'"{tag}":{{"vr":"{vr}","Value":[{json.dumps(value)}]}}'


def series_json(p: Patient, st: Study, se: Series) -> str:
    """The part of an instance's DICOM JSON shared by its series (sorted by tag)."""
    return ",".join([
        _js("00080005", "CS", "ISO_IR 100"), _js("00080020", "DA", st.date),
        _js("00080021", "DA", st.date), _js("00080030", "TM", st.time),
        _js("00080050", "SH", st.accession), _js("00080060", "CS", se.modality),
        _js("00080070", "LO", "ACME MEDICAL"), _js("00080080", "LO", st.institution),
        _js("00080090", "PN", st.referring), _js("00081030", "LO", st.description),
        _js("0008103E", "LO", se.description), _js("00100010", "PN", p.name),
        _js("00100020", "LO", p.patient_id), _js("00100030", "DA", p.birth_date),
        _js("00100040", "CS", p.sex), _js("00180015", "CS", se.body_part),
        _js("0020000D", "UI", st.uid), _js("0020000E", "UI", se.uid),
        _js("00200010", "SH", st.study_id), _js("00200011", "IS", se.number),
    ])


# ------------------------------------------------------------------------------- rows
def patient_rows(g: Generator) -> Iterator[dict[str, Any]]:
    for i, p in enumerate(g.patients):
        yield {"id": i + 1, "patient_id": p.patient_id, "issuer": "", "patient_name": p.name,
               "patient_name_norm": p.name.upper(), "birth_date": p.birth_date, "sex": p.sex,
               "num_studies": p.studies}


def study_rows(g: Generator) -> Iterator[dict[str, Any]]:
    for i, st in enumerate(g.studies):
        mods = sorted({se.modality for se in st.series})
        yield {"id": i + 1, "study_uid": st.uid, "patient_fk": st.patient + 1,
               "study_date": st.date, "study_time": st.time, "accession_number": st.accession,
               "study_id": st.study_id, "description": st.description,
               "referring_physician": st.referring, "modalities": "\\".join(mods),
               "num_series": len(st.series),
               "num_instances": sum(se.instances for se in st.series),
               "updated_at": RECEIVED_AT,
               # long settled (docs/hcm.md): a loaded study is not announced again
               "settled": 1, "changed_at": RECEIVED_AT, "stable_events": 1}


def study_source_rows(g: Generator) -> Iterator[dict[str, Any]]:
    """Who sent each study (the tenancy filter's table, as migration 5 fills it)."""
    for i, st in enumerate(g.studies):
        yield {"study_fk": i + 1, "institution": st.institution}


def series_rows(g: Generator) -> Iterator[dict[str, Any]]:
    sid = 0
    for i, st in enumerate(g.studies):
        for se in st.series:
            sid += 1
            yield {"id": sid, "series_uid": se.uid, "study_fk": i + 1, "modality": se.modality,
                   "series_number": se.number, "description": se.description,
                   "body_part": se.body_part, "series_date": st.date,
                   "num_instances": se.instances}


def instance_rows(g: Generator, json_mode: str
                  ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(instance row, version row) pairs; both get the same id."""
    iid = sid = 0
    for st in g.studies:
        p = g.patients[st.patient]
        for se in st.series:
            sid += 1
            sop_class = SOP_CLASS[se.modality]
            shared = series_json(p, st, se) if json_mode == "compact" else ""
            for n in range(1, se.instances + 1):
                iid += 1
                uid = g.uid()
                yield ({"id": iid, "sop_uid": uid, "series_fk": sid, "sop_class_uid": sop_class,
                        "instance_number": n, "num_frames": None, "current_version_fk": iid},
                       _version(iid, se.modality, st.institution, uid, sop_class, n, shared))


def _version(iid: int, modality: str, institution: str, uid: str, sop_class: str, n: int,
             shared: str) -> dict[str, Any]:
    if shared:
        doc = ("{" + _js("00080016", "UI", sop_class) + "," + _js("00080018", "UI", uid) + ","
               + shared + "," + _js("00200013", "IS", n) + "}")
    else:
        doc = "{}"
    key = str(iid)
    return {"id": iid, "instance_fk": iid, "state": "current", "digest": _sha("d" + key),
            "header_key": _sha("h" + key),
            "pixel_key": None if modality == "SR" else _sha("p" + key), "trailer_key": None,
            "prefix": b"", "transfer_syntax": EXPLICIT_LE, "size": SIZE[modality],
            "dicom_json": doc, "institution": institution, "source_ae": "MODALITY",
            "source_host": "10.0.0.1", "protocol": "DIMSE", "received_at": RECEIVED_AT,
            "new_bytes": SIZE[modality]}


# ------------------------------------------------------------------------------- writing
class Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.quiet = total, quiet
        self.t0 = self.last = time.perf_counter()
        self.done = 0

    def add(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.perf_counter()
        if self.quiet or (now - self.last < 1.0 and not force):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate else 0
        print(f"\rload_index: {self.done:>9,}/{self.total:,} instances  {rate:8,.0f}/s  "
              f"elapsed {now - self.t0:5.0f} s  eta {eta:5.0f} s ", end="", file=sys.stderr,
              flush=True)


def _batches(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for r in rows:
        batch.append(r)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class CoreWriter:
    """SQLAlchemy Core executemany, one transaction per batch."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.conn = engine.connect().execution_options(anim_writer=True)
        if engine.dialect.name == "sqlite":
            # on the DBAPI connection (autocommit): SQLAlchemy would open a transaction
            raw = self.conn.connection.dbapi_connection
            assert raw is not None
            for pragma in ("synchronous=OFF", "cache_size=-524288", "temp_store=MEMORY"):
                raw.execute(f"PRAGMA {pragma}")

    def write(self, table: Any, rows: list[dict[str, Any]]) -> None:
        with self.conn.begin():
            self.conn.execute(table.insert(), rows)

    def write_pair(self, rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        with self.conn.begin():
            self.conn.execute(schema.instance.insert(), [a for a, _ in rows])
            self.conn.execute(schema.version.insert(), [b for _, b in rows])

    def close(self) -> None:
        self.conn.close()


class CopyWriter(CoreWriter):
    """PostgreSQL COPY FROM STDIN through the psycopg connection under the engine."""

    def _copy(self, table: Any, rows: list[dict[str, Any]]) -> None:
        cols = [c.name for c in table.columns]
        raw = self.conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur, cur.copy(
                f"COPY {table.name} ({', '.join(cols)}) FROM STDIN") as cp:
            for r in rows:
                cp.write_row([r[c] for c in cols])

    def write(self, table: Any, rows: list[dict[str, Any]]) -> None:
        with self.conn.begin():
            self._copy(table, rows)

    def write_pair(self, rows: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        with self.conn.begin():
            self._copy(schema.instance, [a for a, _ in rows])
            self._copy(schema.version, [b for _, b in rows])


def _check_empty(engine: Engine) -> None:
    with engine.connect() as conn:
        for t in (schema.patient, schema.study, schema.study_source, schema.series,
                  schema.instance, schema.version):
            n = conn.execute(select(func.count()).select_from(t)).scalar()
            if n:
                raise SystemExit(f"load_index: table {t.name} already has {n} rows: the "
                                 "database must be empty (a fresh SQLite file or database)")


_LOADED = ("patient", "study", "study_source", "series", "instance", "version")


def _defer_constraints(engine: Engine) -> list[tuple[str, str]]:
    """Drop the secondary indexes, unique and foreign-key constraints of the loaded tables
    and return the statements that make them again (in that order).

    Built once after the load, an index is one sort (maintenance_work_mem) instead of
    10 M random B-tree inserts into indexes far larger than the cache (random UIDs and
    digests), and a foreign key is checked by one join instead of one trigger per row.
    The primary keys stay: ids are loaded in order, so their B-trees only append.
    """
    names = ", ".join(f"'{t}'" for t in _LOADED)
    with engine.connect() as conn:
        cons = conn.execute(text(
            "SELECT c.conname, c.conrelid::regclass::text, c.contype, "
            "pg_get_constraintdef(c.oid) FROM pg_constraint c "
            f"WHERE c.contype IN ('u', 'f') AND c.conrelid::regclass::text IN ({names}) "
            "ORDER BY c.contype DESC, c.conname")).all()  # unique first, then foreign
        idx = conn.execute(text(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i "
            f"WHERE i.schemaname = current_schema() AND i.tablename IN ({names}) "
            "AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
            " ORDER BY i.indexname")).all()
    restore = [(n, d) for n, d in idx]
    restore += [(n, f"ALTER TABLE {t} ADD CONSTRAINT {n} {d}") for n, t, _k, d in cons]
    with engine.begin() as conn:
        for n, t, _kind, _d in sorted(cons, key=lambda c: c[2]):  # foreign keys first
            conn.exec_driver_sql(f"ALTER TABLE {t} DROP CONSTRAINT {n}")
        for n, _d in idx:
            conn.exec_driver_sql(f"DROP INDEX {n}")
    return restore


def _restore_constraints(engine: Engine, restore: list[tuple[str, str]]) -> float:
    t0 = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("SET maintenance_work_mem = '1GB'")
        for name, ddl in restore:
            t = time.perf_counter()
            conn.exec_driver_sql(ddl)
            log(f"  {name}: {time.perf_counter() - t:.1f} s")
    return time.perf_counter() - t0


def _postgres_finish(engine: Engine) -> dict[str, float]:
    """Move the id sequences past the loaded ids, then VACUUM ANALYZE (autovacuum's job)."""
    t0 = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for t in (schema.patient, schema.study, schema.series, schema.instance, schema.version):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{t.name}', 'id'), "
                              f"(SELECT coalesce(max(id), 1) FROM {t.name}))"))
        t1 = time.perf_counter()
        conn.exec_driver_sql("VACUUM ANALYZE")
    return {"setval_s": t1 - t0, "vacuum_analyze_s": time.perf_counter() - t1}


def _db_bytes(engine: Engine, url: str) -> int | None:
    if engine.dialect.name == "sqlite":
        db = make_url(url).database
        if not db:
            return None
        return sum(os.path.getsize(p) for p in (db, db + "-wal", db + "-shm")
                   if os.path.exists(p))
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar()
                   or 0)


def load(a: argparse.Namespace) -> dict[str, Any]:
    engine = make_engine(a.url, pool_size=2)
    migrate(engine)
    _check_empty(engine)
    t0 = time.perf_counter()
    g = Generator(a.seed, a.patients, a.studies, a.instances)
    t_gen = time.perf_counter() - t0
    n_series = sum(len(st.series) for st in g.studies)
    log(f"generated {len(g.patients):,} patients, {len(g.studies):,} studies, "
        f"{n_series:,} series in {t_gen:.1f} s; loading {a.instances:,} instances "
        f"into {engine.dialect.name}")
    method = a.method if a.method != "auto" else (
        "copy" if engine.dialect.name == "postgresql" else "core")
    t1 = time.perf_counter()
    deferred = _defer_constraints(engine) if method == "copy" and a.defer else []
    w: CoreWriter = CopyWriter(engine) if method == "copy" else CoreWriter(engine)
    try:
        for table, rows in ((schema.patient, patient_rows(g)), (schema.study, study_rows(g)),
                            (schema.study_source, study_source_rows(g)),
                            (schema.series, series_rows(g))):
            for b in _batches(rows, a.batch):
                w.write(table, b)
        t2 = time.perf_counter()
        prog = Progress(a.instances, a.quiet)
        for b in _batches(instance_rows(g, a.json), a.batch):
            w.write_pair(b)
            prog.add(len(b))
        prog.add(0, force=True)
    finally:
        w.close()
    t3 = time.perf_counter()
    if not a.quiet:
        print(file=sys.stderr)
    finish: dict[str, float] = {}
    if deferred:
        log(f"building {len(deferred)} deferred indexes and constraints")
        finish["indexes_s"] = _restore_constraints(engine, deferred)
    if engine.dialect.name == "postgresql":
        finish |= _postgres_finish(engine)
    t4 = time.perf_counter()
    with engine.connect() as conn:
        counts = {t.name: int(conn.execute(select(func.count()).select_from(t)).scalar() or 0)
                  for t in (schema.patient, schema.study, schema.series, schema.instance,
                            schema.version)}
    size = _db_bytes(engine, a.url)
    engine.dispose()
    rows_total = sum(counts.values())
    return {
        "url": a.url, "backend": engine.dialect.name, "method": method, "seed": a.seed,
        "json": a.json, "batch": a.batch, "counts": counts, "db_bytes": size,
        "generate_s": t_gen, "parents_s": t2 - t1, "instances_s": t3 - t2,
        "finish": finish, "load_s": t4 - t1,
        "instances_per_s": counts["instance"] / (t3 - t2),
        "rows_per_s": rows_total / (t4 - t1),
        "params": {"patients": a.patients, "studies": a.studies, "instances": a.instances},
        "smi_studies": sum(1 for st in g.studies
                           if g.patients[st.patient].name.startswith("SMI")),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }


def log(msg: str) -> None:
    print(f"load_index: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("url", help="index URL: sqlite:////abs/path/index.sqlite or "
                                "postgresql://user@host:port/db (the database must exist)")
    ap.add_argument("--patients", type=int, default=40_000)
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--instances", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--batch", type=int, default=20_000, help="rows per transaction")
    ap.add_argument("--json", choices=["compact", "empty"], default="compact",
                    help="version.dicom_json: a ~1 KB header (default) or '{}'")
    ap.add_argument("--method", choices=["auto", "core", "copy"], default="auto",
                    help="auto: COPY on PostgreSQL, Core executemany on SQLite")
    ap.add_argument("--no-defer", dest="defer", action="store_false",
                    help="with COPY: keep the secondary indexes and constraints during the "
                         "load (by default they are dropped and built again at the end)")
    ap.add_argument("--marker", type=Path, help="write the load report (JSON) here (default: "
                                                "load_index.json next to a SQLite file)")
    ap.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    a = ap.parse_args(argv)
    if a.method == "copy" and not a.url.startswith("postgresql"):
        ap.error("--method copy needs PostgreSQL")
    rep = load(a)
    marker = a.marker
    if marker is None and rep["backend"] == "sqlite":
        marker = Path(make_url(a.url).database or ".").parent / "load_index.json"
    c = rep["counts"]
    log(f"loaded {c['patient']:,} patients, {c['study']:,} studies, {c['series']:,} series, "
        f"{c['instance']:,} instances + {c['version']:,} versions in {rep['load_s']:.0f} s: "
        f"{rep['instances_per_s']:,.0f} instances/s ({rep['rows_per_s']:,.0f} rows/s overall); "
        f"database {(rep['db_bytes'] or 0) / 1e9:.2f} GB")
    if marker is not None:
        marker.write_text(json.dumps(rep, indent=1) + "\n")
        log(f"report: {marker}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
