"""The real OHIF viewer (3.13) against a running archive, straight from another origin.

No proxy: OHIF's prebuilt dist/ is served on one loopback port, the archive on another,
and OHIF's DICOMweb data sources talk to the archive's /dicom-web, so every request goes
through the archive's CORS answers. Headless Chromium (Debian's) runs the page. Each test
fails on any console error, uncaught page error, failed request or HTTP error status seen
by the page, except the entries of ALLOWED below, each with its reason.

What is opened: the study list (all sample patients; a patient-name filter), every sample
study in the viewer through two data-source set-ups (unquoted and quoted multipart Accept,
client-drawn and server thumbnails), and one study per stored transfer syntax made from
pydicom's test files, which OHIF must decode from the frames exactly as stored.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from tests.browser.conftest import StaticSite, app_config
from tests.conftest import PYDICOM_TEST_FILES, ROOT, SAMPLES, AnimServer, sample_files

pytestmark = pytest.mark.integration

# Generous waits for a 2-core machine rendering WebGL in software (SwiftShader); they bound
# a hang, they are not speed assertions.
LOAD_MS = 90_000

# Console messages, failed requests or error statuses that are not the archive's fault and
# that OHIF itself causes. Each entry: (regex on the problem's text, why it is allowed).
# Empty: OHIF 3.13 against the archive logs no error at all.
ALLOWED: list[tuple[str, str]] = []


@dataclass
class Study:
    uid: str
    patient_id: str
    family_name: str
    description: str
    instances: int


def sample_studies() -> list[Study]:
    by_uid: dict[str, Study] = {}
    for path in sample_files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        st = by_uid.setdefault(ds.StudyInstanceUID, Study(
            ds.StudyInstanceUID, ds.PatientID, ds.PatientName.family_name,
            ds.StudyDescription, 0))
        st.instances += 1
    return sorted(by_uid.values(), key=lambda s: (s.patient_id, s.description))


STUDIES = sample_studies()

# One image per transfer syntax OHIF must decode from the stored bytes it gets with
# transfer-syntax=* (PS3.18 8.7.3.5: the frame's part names its syntax), from pydicom's
# test files: (file, label). Each gets its own patient and study (tagged_copies).
SYNTAX_FILES = [
    ("MR_small_implicit.dcm", "Implicit VR Little Endian"),
    ("MR_small_bigendian.dcm", "Explicit VR Big Endian"),
    ("image_dfl.dcm", "Deflated Explicit VR Little Endian"),
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG Baseline YBR"),
    ("JPEG-lossy.dcm", "JPEG Extended 12-bit"),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless SV1"),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless"),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 Lossless"),
    ("693_J2KI.dcm", "JPEG 2000"),
    ("MR_small_RLE.dcm", "RLE Lossless"),
    ("examples_ybr_color.dcm", "JPEG Baseline multi-frame"),
]


def tagged_copies(out: Path | None = None) -> list[Study]:
    """SYNTAX_FILES re-identified (fresh UIDs, one patient each), pixel data untouched,
    written to *out* when given.

    Several of pydicom's files are variants of one image with one SOP Instance UID; as
    they are, the archive would keep them as versions of one instance.
    """
    studies = []
    for i, (name, label) in enumerate(SYNTAX_FILES, 1):
        ds = pydicom.dcmread(PYDICOM_TEST_FILES / name)
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, key, generate_uid(entropy_srcs=["anim-ohif-test", name, key]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = f"TS{i:02d}"
        ds.PatientName = f"SYNTAX^{i:02d}"
        ds.StudyDescription = label
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            ds.save_as(out / name)  # in the file's own transfer syntax
        studies.append(Study(ds.StudyInstanceUID, ds.PatientID, "SYNTAX", label, 1))
    return studies


SYNTAX_STUDIES = tagged_copies()


@dataclass
class Seen:
    method: str
    path: str  # below /dicom-web, with the query string
    status: int
    accept: str


@dataclass
class Watch:
    """Everything the page reported that could mean trouble, and the archive's traffic."""

    archive: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    archive_requests: list[Seen] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda e: self._problem(f"page error: {e}"))
        page.on("requestfailed", lambda r: self._problem(
            f"request failed: {r.method} {r.url}: {r.failure}"))
        page.on("response", self._response)

    def _problem(self, text: str) -> None:
        if not any(re.search(rx, text) for rx, _ in ALLOWED):
            self.problems.append(text)

    def _console(self, msg: Any) -> None:
        if msg.type == "error":
            self._problem(f"console error: {msg.text}")
        elif msg.type == "warning":
            self.warnings.append(msg.text)

    def _response(self, resp: Any) -> None:
        req = resp.request
        root = self.archive + "/dicom-web"
        if resp.url.startswith(root):
            self.archive_requests.append(Seen(req.method, resp.url[len(root):], resp.status,
                                              req.headers.get("accept", "")))
        if resp.status >= 400:
            try:
                body = resp.text()[:500]
            except Exception as e:  # the body may be gone (aborted loads)
                body = f"<no body: {e}>"
            self._problem(f"HTTP {resp.status}: {req.method} {resp.url}: {body}")

    def ok(self, pattern: str) -> list[Seen]:
        """Successful archive requests whose path matches the regex."""
        return [s for s in self.archive_requests if s.status < 400 and re.search(pattern, s.path)]

    def report(self) -> str:
        reqs = "\n".join(f"  {s.method} {s.status} {s.path}  [Accept: {s.accept}]"
                         for s in self.archive_requests)
        return ("\n".join(self.problems) + f"\n-- archive requests:\n{reqs}"
                + "\n-- console warnings:\n" + "\n".join(self.warnings[:20]))

    def wait(self, step: Callable[[], object]) -> None:
        """Run a Playwright wait; on a timeout, fail with what the page saw meanwhile."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            step()
        except PlaywrightTimeout as e:
            pytest.fail(f"{e}\n{self.report()}")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnimServer]:
    """An archive holding the sample studies and the syntax set, imported before it starts."""
    base = tmp_path_factory.mktemp("ohif")
    data = base / "data"
    assert [s.uid for s in tagged_copies(base / "syntaxes")] == [s.uid for s in SYNTAX_STUDIES]
    done = subprocess.run([sys.executable, "-m", "anim", "import", "--data", str(data), "-q",
                           str(SAMPLES), str(base / "syntaxes")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    srv = AnimServer(data).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def site(archive: AnimServer, ohif_dist: Path) -> Iterator[StaticSite]:
    with StaticSite(ohif_dist, app_config(f"{archive.url}/dicom-web")) as s:
        yield s


# A returning user: OHIF's first-visit onboarding tour (a popover over the viewport) was
# already dismissed. It is DOM, not canvas, so it only matters for the screenshots.
SEEN_TOUR = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));"


@pytest.fixture
def page(browser: Any, archive: AnimServer, site: StaticSite) -> Iterator[tuple[Any, Watch]]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    ctx.add_init_script(SEEN_TOUR)
    pg = ctx.new_page()
    watch = Watch(archive.url)
    watch.attach(pg)
    seen = len(archive.lines)
    yield pg, watch
    ctx.close()
    assert archive.alive(), archive.log
    # a request the page saw succeed may still have logged a failure on the server
    logged = "\n".join(archive.lines[seen:])
    assert not re.search(r" (ERROR|CRITICAL) |Traceback", logged), logged


def screenshot(page: Any, name: str, tmp_path: Path) -> Path:
    out = tmp_path / f"ohif-{name}.png"
    page.screenshot(path=str(out))
    extra = os.environ.get("ANIM_SCREENSHOTS", "")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(extra) / out.name)
    return out


def settle(pg: Any, watch: Watch) -> None:
    """Wait until the page has no request in flight (OHIF prefetches the rest of a series)."""
    watch.wait(lambda: pg.wait_for_load_state("networkidle", timeout=LOAD_MS))


def test_study_list_shows_the_sample_patients(page: tuple[Any, Watch], site: StaticSite,
                                              tmp_path: Path) -> None:
    pg, watch = page
    pg.goto(site.url + "/")
    for st in STUDIES:
        watch.wait(lambda st=st: pg.get_by_text(st.description, exact=True).first.wait_for(
            timeout=LOAD_MS))
    settle(pg, watch)
    text = pg.inner_text("body")
    for st in STUDIES:
        assert st.family_name in text, text
    assert "MÜLLER" in text, text  # ISO_IR 192 name, through DICOM JSON, intact
    assert watch.ok(r"^/studies\?.*includefield="), watch.report()
    screenshot(pg, "study-list", tmp_path)
    assert not watch.problems, watch.report()


def test_study_list_filters_by_patient_name(page: tuple[Any, Watch], site: StaticSite,
                                            tmp_path: Path) -> None:
    # The filter as a user types it (OHIF keeps it in the URL): OHIF sends
    # PatientName=*smith*, which must match SMITH^JOHN case-insensitively and nobody else.
    pg, watch = page
    smith = [st for st in STUDIES if st.family_name == "SMITH"]
    others = [st for st in STUDIES if st.family_name != "SMITH"]
    assert smith
    assert others
    pg.goto(site.url + "/?patientName=smith")
    for st in smith:
        watch.wait(lambda st=st: pg.get_by_text(st.description, exact=True).first.wait_for(
            timeout=LOAD_MS))
    settle(pg, watch)
    text = pg.inner_text("body")
    for st in smith:
        assert st.description in text, text
    for st in others:
        assert st.description not in text, text
    assert watch.ok(r"^/studies\?.*PatientName=\*smith\*"), watch.report()
    screenshot(pg, "study-list-smith", tmp_path)
    assert not watch.problems, watch.report()


CANVAS_PNG = """() => {
    const c = document.querySelector('canvas.cornerstone-canvas');
    return c && c.width > 0 ? c.toDataURL('image/png') : null;
}"""
# Copied through a fresh 2D canvas: works whatever context the viewport's canvas uses.
CANVAS_VARIES = """() => {
    const c = document.querySelector('canvas.cornerstone-canvas');
    if (!c || !c.width || !c.height) return false;
    const t = document.createElement('canvas');
    t.width = c.width; t.height = c.height;
    const g = t.getContext('2d');
    g.drawImage(c, 0, 0);
    const d = g.getImageData(0, 0, t.width, t.height).data;
    for (let i = 4; i < d.length; i += 4) if (d[i] !== d[0]) return true;
    return false;
}"""


def canvas_pixels(pg: Any) -> np.ndarray | None:
    url = pg.evaluate(CANVAS_PNG)
    if not url:
        return None
    raw = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("L"), dtype=np.float64)


# The two data sources of tests/browser/ohif/app-config.js, by viewer route.
SOURCES = {"anim": "/viewer", "anim-quoted": "/viewer/anim-quoted"}


@pytest.mark.parametrize("source", list(SOURCES))
@pytest.mark.parametrize("study", STUDIES, ids=[f"{s.patient_id}-{s.description}"
                                                for s in STUDIES])
def test_viewer_renders_the_study(page: tuple[Any, Watch], site: StaticSite, study: Study,
                                  source: str, tmp_path: Path) -> None:
    open_in_viewer(page, site, study, source, tmp_path)


@pytest.mark.parametrize("study", SYNTAX_STUDIES, ids=[s.description for s in SYNTAX_STUDIES])
def test_viewer_decodes_each_stored_transfer_syntax(page: tuple[Any, Watch], site: StaticSite,
                                                    study: Study, tmp_path: Path) -> None:
    open_in_viewer(page, site, study, "anim", tmp_path)


def open_in_viewer(page: tuple[Any, Watch], site: StaticSite, study: Study, source: str,
                   tmp_path: Path) -> None:
    """Open one study in OHIF's basic viewer; its first image must reach the canvas."""
    pg, watch = page
    pg.goto(f"{site.url}{SOURCES[source]}?StudyInstanceUIDs={study.uid}")
    watch.wait(lambda: pg.wait_for_selector("canvas.cornerstone-canvas", timeout=LOAD_MS))
    # The viewport's canvas is the image alone (overlays are DOM/SVG above it), so pixel
    # variance > 0 means image data reached the screen; a viewport with no image is flat.
    watch.wait(lambda: pg.wait_for_function(CANVAS_VARIES, timeout=LOAD_MS, polling=250))
    settle(pg, watch)
    pixels = canvas_pixels(pg)
    assert pixels is not None
    assert pixels.var() > 0
    # an image, not a stray line: a good share of the viewport is lit
    assert (pixels > pixels.min()).mean() > 0.02, pixels.mean()
    name = re.sub(r"[^A-Za-z0-9]+", "-", f"{source}-{study.patient_id}-{study.description}")
    screenshot(pg, f"viewer-{name.lower()}", tmp_path)

    uid = re.escape(study.uid)
    assert watch.ok(rf"^/studies/{uid}/series/[\d.]+/metadata$"), watch.report()
    frames = watch.ok(rf"^/studies/{uid}/series/[\d.]+/instances/[\d.]+/frames/\d+$")
    assert frames, watch.report()
    quoted = 'type="application/octet-stream"'
    if source == "anim":
        assert all(quoted not in f.accept and "transfer-syntax=*" in f.accept
                   for f in frames), watch.report()
    else:
        # the preflighted form, and the server-side thumbnails of the study browser
        assert all(quoted in f.accept for f in frames), watch.report()
        assert watch.ok(rf"^/studies/{uid}/series/[\d.]+(/instances/[\d.]+)?/thumbnail"), \
            watch.report()
    assert not watch.problems, watch.report()
