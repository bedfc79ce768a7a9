"""C-MOVE and C-GET against real DCMTK peers (Query/Retrieve issue, points 2-5).

- DCMTK ``movescu`` moves a study to a DCMTK ``storescp +B`` the test started: every
  instance of the study arrives, nothing else, and each data set is byte for byte the one
  that was stored (DIMSE carries no File Meta Information, so everything after group 0002
  is compared). A move to an unknown AE fails with 0xA801; a C-CANCEL stops a move.
- DCMTK ``getscu`` retrieves a series into a folder, byte for byte.
- JPEG 2000 objects go to a peer that takes only uncompressed syntaxes decoded (same SOP
  Instance UID, pixels equal to pydicom's decode of the original), and to a peer that takes
  JPEG 2000 in their own codestream, byte for byte.
- Malformed identifiers get a failure status with an Error Comment; the server keeps serving.
- Permissions of known AEs (TOML): find-only, limited move destinations, unknown callers.
- Data sets that pydicom's writer would rewrite (retired group lengths, empty UN elements)
  go out byte for byte too: sub-operations send the stored bytes (scp/encoded.py).

One archive (the sample studies plus a few of pydicom's test files) and its storescp
destinations are shared by the tests of this module: retrieval does not change it, and each
test empties the destination folder it uses first.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tests.conftest import (
    PYDICOM_TEST_FILES,
    SAMPLES,
    AnimServer,
    dcmtk,
    echoscu,
    open_archive,
    sample_files,
    storescu,
)
from tests.integration.test_transfer_syntaxes import dataset_bytes

pytestmark = [pytest.mark.integration, pytest.mark.dcmtk]

UNCOMPRESSED = {str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)}
PENDING, SUCCESS, CANCEL = 0xFF00, 0x0000, 0xFE00
IDENTIFIER_DOES_NOT_MATCH, MOVE_DESTINATION_UNKNOWN, NOT_AUTHORIZED = 0xA900, 0xA801, 0x0124

# pydicom's JPEG 2000 test files: lossless (.90) and lossy (.91), grey and colour, one study
# each. (JPEG2000-embedded-sequence-delimiter.dcm shares a SOP Instance UID with
# JPEG2000.dcm, so it would be a second version of the same instance: left out.)
J2K_FILES = ("MR_small_jp2klossless.dcm", "examples_jpeg2k.dcm", "JPEG2000.dcm",
             "693_J2KI.dcm", "SC_rgb_gdcm_KY.dcm")
J2K_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}
# Data sets that pydicom's writer does not give back byte for byte: 693_J2KI.dcm has retired
# group length elements (gggg,0000), which write_dataset() drops; rtdose_rle.dcm has empty
# elements with VR UN, which it rewrites with their dictionary VR.
REENCODED = ("693_J2KI.dcm", "rtdose_rle.dcm")


@dataclass(frozen=True, slots=True)
class Instance:
    path: Path
    study: str
    series: str
    sop: str
    transfer_syntax: str
    patient: str


def describe(path: Path) -> Instance:
    ds = dcmread(path, stop_before_pixels=True)
    return Instance(path, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                    str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                    str(ds.get("PatientID", "")))


@dataclass(frozen=True, slots=True)
class Received:
    path: Path
    sop: str
    transfer_syntax: str
    data_set: bytes


def received_in(folder: Path) -> list[Received]:
    out = []
    for p in sorted(folder.iterdir()):
        raw = p.read_bytes()
        ds = dcmread(p, stop_before_pixels=True)
        out.append(Received(p, str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID),
                            dataset_bytes(raw)))
    return out


# ---- DCMTK peers -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Destination:
    """A DCMTK storescp writing exactly what it receives (+B) into its own folder."""

    title: str
    port: int
    out: Path
    proc: subprocess.Popen[str] | None = None

    def start(self, *extra: str) -> Destination:
        self.out.mkdir(parents=True)
        # +uf: unique file names, so an instance sent twice shows up as two files
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.title, "-od", str(self.out), "+B", "+uf",
             *extra, str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 20
        while echoscu(self.port, aet=self.title).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"storescp {self.title} did not start on {self.port}")
            time.sleep(0.05)  # poll interval, not a readiness guess
        return self

    def fresh(self) -> Destination:
        """Empty the folder: a test sees only what its own retrieve delivered."""
        for p in self.out.iterdir():
            p.unlink()
        return self

    def received(self) -> list[Received]:
        return received_in(self.out)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate(timeout=10)


def run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([dcmtk(tool), *args], capture_output=True, text=True, timeout=120)
    r.stdout += r.stderr  # DCMTK logs on stderr; one text to search and to show
    return r


def _keys(keys: dict[str, str]) -> list[str]:
    return [a for k, v in keys.items() for a in ("-k", f"{k}={v}")]


def movescu(port: int, dest: str, keys: dict[str, str], calling: str = "MOVESCU",
            model: str = "-S") -> subprocess.CompletedProcess[str]:
    return run("movescu", "-d", "-aet", calling, "-aec", "ANIM", "-aem", dest, model,
               *_keys(keys), "127.0.0.1", str(port))


def getscu(port: int, out: Path, keys: dict[str, str], calling: str = "GETSCU",
           model: str = "-S") -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    return run("getscu", "-d", "-aet", calling, "-aec", "ANIM", model, "+B", "-od", str(out),
               *_keys(keys), "127.0.0.1", str(port))


_RSP = re.compile(r"Message Type\s*:\s*C-(MOVE|GET) RSP.*?DIMSE Status\s*:\s*0x([0-9a-f]{4})",
                  re.DOTALL | re.IGNORECASE)


def statuses(output: str) -> list[int]:
    """Every C-MOVE/C-GET response status a DCMTK tool printed (-d), in order."""
    return [int(m.group(2), 16) for m in _RSP.finditer(output)]


def final_status(r: subprocess.CompletedProcess[str]) -> int:
    found = statuses(r.stdout)
    assert found, f"no C-MOVE/C-GET response in the output:\n{r.stdout[-3000:]}"
    return found[-1]


# ---- the shared archive --------------------------------------------------------------------


@dataclass
class Loaded:
    server: AnimServer
    plain: Destination  # storescp defaults: uncompressed syntaxes only
    anything: Destination  # +xa: every syntax DCMTK knows, JPEG 2000 included
    slow: Destination  # sleeps a second after each store: a move to it can be cancelled
    samples: list[Instance]  # sample_dicom/
    others: list[Instance]  # pydicom's test files: J2K_FILES and REENCODED

    @property
    def j2k(self) -> list[Instance]:
        return [i for i in self.others if i.path.name in J2K_FILES]

    @property
    def port(self) -> int:
        return self.server.dimse_port


def send_as_is(port: int, paths: list[Path], calling: str = "RAWSCU") -> dict[str, int]:
    """C-STORE each file's data set bytes untouched, in its own transfer syntax (pynetdicom):
    DCMTK storescu re-encodes what it sends, and these must stay the originals."""
    from pynetdicom import AE, _config

    objects = [describe(p) for p in paths]
    was = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title=calling)
        for o in objects:
            ae.add_requested_context(str(dcmread(o.path, stop_before_pixels=True).SOPClassUID),
                                     o.transfer_syntax)
        assoc = ae.associate("127.0.0.1", port, ae_title="ANIM")
        assert assoc.is_established
        try:
            return {o.path.name: int(assoc.send_c_store(o.path).get("Status", -1))
                    for o in objects}
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = was


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    for tool in ("storescp", "storescu", "movescu", "getscu", "echoscu"):
        dcmtk(tool)
    base = tmp_path_factory.mktemp("retrieve")
    dests: list[Destination] = []
    srv: AnimServer | None = None
    try:
        for title, extra in (("STORESCP", ()), ("ANYSCP", ("+xa",)),
                             ("SLOWSCP", ("--sleep-after", "1"))):
            dests.append(Destination(title, _free_port(), base / title).start(*extra))
        known = [a for d in dests for a in ("--known-ae", f"{d.title}=127.0.0.1:{d.port}")]
        srv = AnimServer(base / "data", args=known).start()
        r = storescu(srv.dimse_port, SAMPLES)
        assert r.returncode == 0, r.stdout + r.stderr
        names = sorted(set(J2K_FILES) | set(REENCODED))
        sent = send_as_is(srv.dimse_port, [PYDICOM_TEST_FILES / n for n in names])
        assert sent == dict.fromkeys(names, SUCCESS)
        samples = [describe(p) for p in sample_files()]
        others = [describe(PYDICOM_TEST_FILES / n) for n in names]
        assert len({i.study for i in others}) == len(others)  # one study each
        with open_archive(srv.data_dir) as archive:
            assert archive.index.counts()["instance"] == len(samples) + len(others)
        yield Loaded(srv, *dests, samples=samples, others=others)
    finally:
        if srv is not None:
            srv.stop()
        for d in dests:
            d.stop()


def biggest_study(instances: list[Instance]) -> list[Instance]:
    by_study = Counter(i.study for i in instances)
    uid, _ = by_study.most_common(1)[0]
    return [i for i in instances if i.study == uid]


def assert_byte_identical(received: list[Received], expected: list[Instance]) -> None:
    """Every expected instance arrived once, nothing else, in its own syntax, bytes equal."""
    assert Counter(r.sop for r in received) == Counter(i.sop for i in expected)
    by_uid = {i.sop: i for i in expected}
    syntax = [by_uid[r.sop].path.name for r in received
              if r.transfer_syntax != by_uid[r.sop].transfer_syntax]
    assert not syntax, f"arrived in another transfer syntax: {syntax}"
    changed = [by_uid[r.sop].path.name for r in received
               if r.data_set != dataset_bytes(by_uid[r.sop].path.read_bytes())]
    assert not changed, f"data set bytes differ: {changed}"


# ---- C-MOVE --------------------------------------------------------------------------------


def test_movescu_delivers_the_whole_study_byte_for_byte(loaded: Loaded) -> None:
    study = biggest_study(loaded.samples)
    assert len({i.series for i in study}) > 1  # a study of several series
    dest = loaded.plain.fresh()
    r = movescu(loaded.port, dest.title,
                {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study[0].study})
    assert r.returncode == 0, r.stdout
    assert statuses(r.stdout) == [PENDING] * len(study) + [SUCCESS], r.stdout[-3000:]
    assert_byte_identical(dest.received(), study)


def test_patient_root_move_of_a_patient_delivers_all_their_studies(loaded: Loaded) -> None:
    by_patient = Counter(i.patient for i in loaded.samples)
    patient = next(p for p in sorted(by_patient)
                   if len({i.study for i in loaded.samples if i.patient == p}) > 1)
    expected = [i for i in loaded.samples if i.patient == patient]
    dest = loaded.plain.fresh()
    r = movescu(loaded.port, dest.title, {"QueryRetrieveLevel": "PATIENT", "PatientID": patient},
                model="-P")
    assert final_status(r) == SUCCESS, r.stdout[-3000:]
    assert_byte_identical(dest.received(), expected)


def test_move_to_an_unknown_destination_fails_with_a801(loaded: Loaded) -> None:
    study = biggest_study(loaded.samples)[0].study
    r = movescu(loaded.port, "NOWHERE", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
    assert statuses(r.stdout) == [MOVE_DESTINATION_UNKNOWN], r.stdout[-3000:]
    assert loaded.server.alive()
    assert echoscu(loaded.port).returncode == 0


def test_cancel_stops_a_move_midway(loaded: Loaded) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelMove as StudyRootMove,
    )

    study = biggest_study(loaded.samples)
    dest = loaded.slow.fresh()
    ident = Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study[0].study
    ae = AE(ae_title="CANCELSCU")
    ae.add_requested_context(StudyRootMove)
    assoc = ae.associate("127.0.0.1", loaded.port, ae_title="ANIM")
    assert assoc.is_established
    responses: list[Dataset] = []
    try:
        for rsp, _ in assoc.send_c_move(ident, dest.title, StudyRootMove, msg_id=7):
            responses.append(rsp)
            if rsp.get("Status") == PENDING and len(responses) == 1:
                # the destination sleeps a second after each store: the cancel is there
                # long before the move could finish
                assoc.send_c_cancel(7, query_model=StudyRootMove)
    finally:
        assoc.release()
    codes = [r.get("Status") for r in responses]
    assert codes[0] == PENDING
    assert codes[-1] == CANCEL, codes
    final = responses[-1]
    assert final.NumberOfRemainingSuboperations > 0
    arrived = dest.received()
    assert 1 <= len(arrived) < len(study)
    assert len(arrived) == final.NumberOfCompletedSuboperations
    assert {r.sop for r in arrived} <= {i.sop for i in study}
    assert loaded.server.alive()


# ---- C-GET ---------------------------------------------------------------------------------


def test_getscu_retrieves_a_series_byte_for_byte(loaded: Loaded, tmp_path: Path) -> None:
    study = biggest_study(loaded.samples)
    series = [i for i in study if i.series == study[0].series]
    assert 1 < len(series) < len(study)
    r = getscu(loaded.port, tmp_path / "got",
               {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": series[0].study,
                "SeriesInstanceUID": series[0].series})
    assert r.returncode == 0, r.stdout[-3000:]
    assert final_status(r) == SUCCESS, r.stdout[-3000:]
    assert_byte_identical(received_in(tmp_path / "got"), series)


# ---- JPEG 2000: decoded for a peer that cannot take it, as is for one that can -------------


def move_each_study(loaded: Loaded, dest: Destination, instances: list[Instance]) -> None:
    for inst in instances:
        r = movescu(loaded.port, dest.title,
                    {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": inst.study})
        assert statuses(r.stdout) == [PENDING, SUCCESS], f"{inst.path.name}\n{r.stdout[-3000:]}"


def assert_decoded(received: list[Received], originals: list[Instance]) -> None:
    """Each original arrived once, uncompressed, valid, with the pixels of its decode."""
    assert Counter(r.sop for r in received) == Counter(i.sop for i in originals)
    by_uid = {i.sop: i for i in originals}
    for r in received:
        o = by_uid[r.sop]
        assert r.transfer_syntax in UNCOMPRESSED, o.path.name
        # DCMTK parses the whole file without an error or a warning
        check = subprocess.run([dcmtk("dcmdump"), str(r.path)], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stderr
        assert not check.stderr.strip(), check.stderr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's remarks about the test files
            want = dcmread(o.path)
            want_pixels = want.pixel_array
        got = dcmread(r.path)
        assert "PixelData" in got
        assert got.file_meta.TransferSyntaxUID == r.transfer_syntax
        got_pixels = got.pixel_array
        assert got_pixels.dtype == want_pixels.dtype, o.path.name
        assert np.array_equal(got_pixels, want_pixels), o.path.name
        for kw in ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID",
                   "Rows", "Columns", "SamplesPerPixel", "BitsAllocated"):
            assert got.get(kw) == want.get(kw), f"{o.path.name}: {kw}"


def test_move_to_an_uncompressed_only_peer_decodes_jpeg2000(loaded: Loaded) -> None:
    dest = loaded.plain.fresh()
    move_each_study(loaded, dest, loaded.j2k)
    assert_decoded(dest.received(), loaded.j2k)


def test_move_to_a_jpeg2000_peer_sends_the_codestream_as_stored(loaded: Loaded) -> None:
    dest = loaded.anything.fresh()
    as_is = [i for i in loaded.j2k if i.path.name not in REENCODED]
    assert {i.transfer_syntax for i in as_is} == J2K_SYNTAXES
    move_each_study(loaded, dest, as_is)
    assert_byte_identical(dest.received(), as_is)


def test_move_keeps_data_sets_byte_for_byte_that_pydicom_would_rewrite(loaded: Loaded) -> None:
    dest = loaded.anything.fresh()
    rewritten = [i for i in loaded.others if i.path.name in REENCODED]
    move_each_study(loaded, dest, rewritten)
    received = dest.received()
    assert {r.transfer_syntax for r in received} == {i.transfer_syntax for i in rewritten}
    assert_byte_identical(received, rewritten)


def test_getscu_with_default_proposals_gets_jpeg2000_decoded(
        loaded: Loaded, tmp_path: Path) -> None:
    out = tmp_path / "got"
    for inst in loaded.j2k:
        r = getscu(loaded.port, out, {"QueryRetrieveLevel": "IMAGE",
                                      "StudyInstanceUID": inst.study,
                                      "SeriesInstanceUID": inst.series,
                                      "SOPInstanceUID": inst.sop})
        assert final_status(r) == SUCCESS, f"{inst.path.name}\n{r.stdout[-3000:]}"
    assert_decoded(received_in(out), loaded.j2k)


# ---- malformed identifiers ---------------------------------------------------------------


def _ident(**keys: str) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


def test_malformed_retrieve_identifiers_fail_with_a_comment_and_the_server_keeps_serving(
        loaded: Loaded) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet as StudyRootGet,
    )
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelMove as StudyRootMove,
    )

    study = biggest_study(loaded.samples)
    uid = study[0].study
    bad = [  # (identifier, what the Error Comment must name)
        (_ident(StudyInstanceUID=uid), "Query/Retrieve Level"),
        (_ident(QueryRetrieveLevel="STUDY"), "StudyInstanceUID"),
        (_ident(QueryRetrieveLevel="SERIES", StudyInstanceUID=uid), "SeriesInstanceUID"),
        (_ident(QueryRetrieveLevel="SERIES", SeriesInstanceUID=study[0].series),
         "StudyInstanceUID"),
        (_ident(QueryRetrieveLevel="WARD", StudyInstanceUID=uid), "WARD"),
        (_ident(QueryRetrieveLevel="PATIENT", PatientID=study[0].patient), "PATIENT"),
    ]
    dest = loaded.plain.fresh()
    ae = AE(ae_title="BADSCU")
    ae.add_requested_context(StudyRootMove)
    ae.add_requested_context(StudyRootGet)
    assoc = ae.associate("127.0.0.1", loaded.port, ae_title="ANIM")
    assert assoc.is_established
    answers: list[tuple[str, str, int | None, str]] = []
    try:
        for n, (ident, named) in enumerate(bad):
            # one request at a time: send_c_move/send_c_get send as soon as they are called
            for op in ("move", "get"):
                if op == "move":
                    responses = assoc.send_c_move(ident, dest.title, StudyRootMove,
                                                  msg_id=2 * n + 1)
                else:
                    responses = assoc.send_c_get(ident, StudyRootGet, msg_id=2 * n + 2)
                rsps = [rsp for rsp, _ in responses]
                assert len(rsps) == 1, (op, named, rsps)  # one final response, no pending
                answers.append((op, named, rsps[0].get("Status"),
                                str(rsps[0].get("ErrorComment", ""))))
        # the same association still works: a good move of the whole study
        good = [rsp.get("Status") for rsp, _ in assoc.send_c_move(
            _ident(QueryRetrieveLevel="STUDY", StudyInstanceUID=uid), dest.title,
            StudyRootMove, msg_id=99)]
    finally:
        assoc.release()
    wrong = [a for a in answers if a[2] != IDENTIFIER_DOES_NOT_MATCH or a[1] not in a[3]]
    assert not wrong, wrong
    assert good == [PENDING] * len(study) + [SUCCESS]
    assert_byte_identical(dest.received(), study)  # and nothing from the refused ones
    assert loaded.server.alive()


# ---- permissions (TOML configuration) --------------------------------------------------------


@dataclass
class Restricted:
    server: AnimServer
    dest: Destination
    series: list[Instance]

    @property
    def port(self) -> int:
        return self.server.dimse_port

    def keys(self) -> dict[str, str]:
        return {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": self.series[0].study,
                "SeriesInstanceUID": self.series[0].series}


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restricted]:
    """An archive that admits only the AEs of its configuration, each with its rights."""
    for tool in ("storescp", "storescu", "movescu", "getscu", "echoscu", "findscu"):
        dcmtk(tool)
    base = tmp_path_factory.mktemp("restricted")
    dest = Destination("STORESCP", _free_port(), base / "out")
    srv: AnimServer | None = None
    try:
        dest.start()
        config = base / "anim.toml"
        config.write_text(f"""
[dimse]
allow_unknown_callers = false

[dimse.known_aes.LOADER]

[dimse.known_aes.RESTRICTED]
permissions = ["find"]

[dimse.known_aes.MOVER]
permissions = ["move"]
destinations = ["OTHER"]

[dimse.known_aes.STORESCP]
host = "127.0.0.1"
port = {dest.port}

# the same storescp under another title (it answers to any called AE title)
[dimse.known_aes.OTHER]
host = "127.0.0.1"
port = {dest.port}
""")
        srv = AnimServer(base / "data", args=["--config", str(config)]).start()
        series_dir = sorted(p.parent for p in sample_files())[0]
        series = [describe(p) for p in sorted(series_dir.glob("*.dcm"))]
        assert len({i.series for i in series}) == 1
        r = storescu(srv.dimse_port, series_dir, calling="LOADER")
        assert r.returncode == 0, r.stdout + r.stderr
        with open_archive(srv.data_dir) as archive:
            assert archive.index.counts()["instance"] == len(series)
        yield Restricted(srv, dest, series)
    finally:
        if srv is not None:
            srv.stop()
        dest.stop()


def test_find_only_ae_may_query_but_not_move_or_get(
        restricted: Restricted, tmp_path: Path) -> None:
    found = run("findscu", "-v", "-aet", "RESTRICTED", "-aec", "ANIM", "-S",
                *_keys(restricted.keys()), "127.0.0.1", str(restricted.port))
    assert found.returncode == 0, found.stdout
    assert "Find Response: 1 (Pending)" in found.stdout, found.stdout
    assert "Received Final Find Response (Success)" in found.stdout, found.stdout

    dest = restricted.dest.fresh()
    moved = movescu(restricted.port, dest.title, restricted.keys(), calling="RESTRICTED")
    assert final_status(moved) == NOT_AUTHORIZED, moved.stdout[-3000:]
    assert PENDING not in statuses(moved.stdout)
    got = getscu(restricted.port, tmp_path / "got", restricted.keys(), calling="RESTRICTED")
    assert final_status(got) == NOT_AUTHORIZED, got.stdout[-3000:]
    assert dest.received() == []
    assert list((tmp_path / "got").iterdir()) == []


def test_move_destinations_limit_where_an_ae_may_send(restricted: Restricted) -> None:
    dest = restricted.dest.fresh()
    refused = movescu(restricted.port, "STORESCP", restricted.keys(), calling="MOVER")
    assert final_status(refused) == NOT_AUTHORIZED, refused.stdout[-3000:]
    assert dest.received() == []
    allowed = movescu(restricted.port, "OTHER", restricted.keys(), calling="MOVER")
    assert final_status(allowed) == SUCCESS, allowed.stdout[-3000:]
    assert_byte_identical(dest.received(), restricted.series)


def test_unknown_caller_is_rejected_at_association(restricted: Restricted) -> None:
    stranger = echoscu(restricted.port, calling="STRANGER")
    assert stranger.returncode != 0
    assert "Calling AE Title Not Recognized" in stranger.stdout + stranger.stderr, (
        stranger.stdout + stranger.stderr)
    assert echoscu(restricted.port, calling="LOADER").returncode == 0
    assert restricted.server.alive()

