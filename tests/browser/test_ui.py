"""The archive's own web page (web/static, served at /) in headless Chromium.

One archive for the module: the synthetic samples (imported before it starts) plus two of
pydicom's test files sent by DCMTK storescu from a configured AE title: a JPEG 2000 image
and a two-frame RLE colour image, re-identified so they are studies of their own. Each
test opens a fresh browser context and fails on any console error, uncaught page error,
failed request or HTTP status >= 400 the page saw, and on an error in the server's log.

Pixels are read back from the page: the viewer's <img> is drawn into a canvas (same
origin, so not tainted) and decoded with Pillow; "shows an image" means variance > 0,
"changes" means the pixels differ.
"""

from __future__ import annotations

import base64
import http.client
import io
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import generate_uid

from tests.conftest import PYDICOM_TEST_FILES, ROOT, SAMPLES, AnimServer, sample_files, storescu

pytestmark = pytest.mark.integration

WAIT_MS = 30_000  # bounds a hang on a slow machine; not a speed assertion
OHIF_URL = "https://ohif.example.org/"
SENDER = "UITEST"

# (pydicom test file, patient ID, study description, storescu's proposal of its syntax)
EXTRA_FILES = [
    ("JPEG2000.dcm", "UI01", "JPEG 2000 NM", "-xw"),
    ("SC_rgb_rle_2frame.dcm", "UI02", "RLE two frames", "-xr"),
]


@dataclass
class Series:
    uid: str
    description: str
    modality: str
    instances: int


@dataclass
class Study:
    uid: str
    patient_id: str
    family_name: str
    description: str
    series: dict[str, Series] = field(default_factory=dict)


def sample_studies() -> list[Study]:
    by_uid: dict[str, Study] = {}
    for path in sample_files():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        st = by_uid.setdefault(ds.StudyInstanceUID, Study(
            ds.StudyInstanceUID, ds.PatientID, ds.PatientName.family_name, ds.StudyDescription))
        se = st.series.setdefault(ds.SeriesInstanceUID, Series(
            ds.SeriesInstanceUID, ds.SeriesDescription, ds.Modality, 0))
        se.instances += 1
    return sorted(by_uid.values(), key=lambda s: (s.patient_id, s.description))


def extra_copies(out: Path) -> list[Study]:
    """EXTRA_FILES with fresh UIDs and a patient each, written to *out*, pixels untouched.

    pydicom ships several encodings of one image under one SOP Instance UID; as they
    are, the archive would keep them as versions of one instance.
    """
    out.mkdir(parents=True, exist_ok=True)
    studies = []
    for name, pid, desc, _ in EXTRA_FILES:
        ds = pydicom.dcmread(PYDICOM_TEST_FILES / name)
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            setattr(ds, key, generate_uid(entropy_srcs=["anim-ui-test", name, key]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = pid
        ds.PatientName = f"UITEST^{pid}"
        ds.StudyDescription = desc
        ds.SeriesDescription = desc
        ds.save_as(out / name)  # in its own transfer syntax
        st = Study(ds.StudyInstanceUID, pid, "UITEST", desc)
        st.series[ds.SeriesInstanceUID] = Series(ds.SeriesInstanceUID, desc, ds.Modality, 1)
        studies.append(st)
    return studies


SAMPLE_STUDIES = sample_studies()
DOE = next(s for s in SAMPLE_STUDIES if s.family_name == "DOE")
DOE_SOFT = next(se for se in DOE.series.values() if "soft" in se.description)


@dataclass
class Watch:
    """What the page reported that could mean trouble, and the requests it made."""

    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("console", lambda m: m.type == "error" and self.problems.append(
            f"console error: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(
            f"request failed: {r.method} {r.url}: {r.failure}"))
        page.on("response", self._response)

    def _response(self, resp: Any) -> None:
        self.requests.append(resp.url)
        if resp.status >= 400:
            self.problems.append(f"HTTP {resp.status}: {resp.request.method} {resp.url}")

    def wait(self, step: Callable[[], object]) -> None:
        """Run a Playwright wait; on a timeout, fail with what the page saw meanwhile."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        try:
            step()
        except PlaywrightTimeout as e:
            pytest.fail(f"{e}\n" + "\n".join(self.problems + self.requests[-30:]))


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AnimServer, list[Study]]]:
    base = tmp_path_factory.mktemp("ui")
    data = base / "data"
    extra = extra_copies(base / "extra")
    done = subprocess.run([sys.executable, "-m", "anim", "import", "--data", str(data), "-q",
                           str(SAMPLES)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    srv = AnimServer(data, args=["--known-ae", f"{SENDER}=127.0.0.1:11119"],
                     env={"ANIM_WEB_OHIF_URL": OHIF_URL}).start()
    try:
        for name, _, _, proposal in EXTRA_FILES:
            sent = storescu(srv.dimse_port, base / "extra" / name, calling=SENDER,
                            extra=("-R", proposal))
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert "Store Failed" not in sent.stdout + sent.stderr
        yield srv, extra
    finally:
        srv.stop()


@pytest.fixture
def page(browser: Any, archive: tuple[AnimServer, list[Study]]) -> Iterator[tuple[Any, Watch]]:
    srv, _ = archive
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    watch = Watch()
    watch.attach(pg)
    seen = len(srv.lines)
    yield pg, watch
    ctx.close()
    assert srv.alive(), srv.log
    logged = "\n".join(srv.lines[seen:])
    assert not re.search(r" (ERROR|CRITICAL) |Traceback", logged), logged


def settle(pg: Any, watch: Watch) -> None:
    """No request in flight (thumbnails, prefetched images), then nothing went wrong."""
    watch.wait(lambda: pg.wait_for_load_state("networkidle", timeout=WAIT_MS))
    assert not watch.problems, "\n".join(watch.problems)


def screenshot(pg: Any, name: str, tmp_path: Path) -> Path:
    out = tmp_path / f"ui-{name}.png"
    pg.screenshot(path=str(out))
    extra = os.environ.get("ANIM_SCREENSHOTS", "")
    if extra:
        # the README's copies: 256 colours, half the bytes, no visible difference here
        Path(extra).mkdir(parents=True, exist_ok=True)
        img = Image.open(out).convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        img.save(Path(extra) / out.name, optimize=True)
    return out


IMG_PNG = """(sel) => {
    const img = document.querySelector(sel);
    if (!img || !img.complete || !img.naturalWidth) return null;
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    c.getContext('2d').drawImage(img, 0, 0);
    return c.toDataURL('image/png');
}"""


def pixels(pg: Any, selector: str = "#stage img") -> np.ndarray:
    url = pg.evaluate(IMG_PNG, selector)
    assert url, f"no loaded image at {selector}"
    raw = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.float64)


def shown(pg: Any, watch: Watch, index: int, contains: str = "") -> None:
    """Wait until the viewer shows image *index* (0-based) from a URL containing *contains*."""
    watch.wait(lambda: pg.wait_for_function(
        """([i, part]) => {
            const s = document.getElementById('stage');
            const img = s && s.querySelector('img');
            return s && s.dataset.index === String(i) && (s.dataset.shown || '').includes(part)
                && img && img.complete && img.naturalWidth > 0;
        }""", arg=[index, contains], timeout=WAIT_MS))


# What a screen reader needs of every control and image on the page, checked on the DOM:
# a label for each form field, a name for each button and link, alt text for each image.
UNNAMED = """() => {
    const bad = [];
    const name = (e) => (e.getAttribute('aria-label') || e.textContent || '').trim()
        || [...(e.labels || [])].map(l => l.textContent).join('').trim()
        || (e.getAttribute('aria-labelledby') || '').split(' ').map(
            id => document.getElementById(id)?.textContent || '').join('').trim();
    for (const e of document.querySelectorAll('input, select, textarea'))
        if (!e.labels.length && !e.getAttribute('aria-label')) bad.push(e.outerHTML);
    for (const e of document.querySelectorAll('button, a[href]'))
        if (!name(e)) bad.push(e.outerHTML);
    for (const e of document.querySelectorAll('img'))
        if (!(e.getAttribute('alt') || '').trim()) bad.push(e.outerHTML);
    return bad;
}"""


def assert_named(pg: Any) -> None:
    bad = pg.evaluate(UNNAMED)
    assert not bad, bad


def open_viewer(pg: Any, watch: Watch, url: str, study: Study, series: Series) -> None:
    pg.goto(f"{url}/#/viewer/{study.uid}/{series.uid}")
    shown(pg, watch, 0)


def rows(pg: Any) -> list[str]:
    return [t.strip() for t in pg.locator("table.studies tbody tr").all_inner_texts()]


def column(pg: Any, n: int) -> list[str]:
    return [t.strip() for t in pg.locator(f"table.studies tbody td:nth-child({n})")
            .all_inner_texts()]


def wait_rows(pg: Any, watch: Watch, n: int) -> list[str]:
    watch.wait(lambda: pg.wait_for_function(
        "(n) => document.querySelectorAll('table.studies tbody tr').length === n"
        " && !document.querySelector('.results[aria-busy]')", arg=n, timeout=WAIT_MS))
    return rows(pg)


# ---- the page and its headers ---------------------------------------------------------


def test_page_and_static_files_carry_security_headers(archive: tuple[AnimServer, list[Study]]
                                                      ) -> None:
    srv, _ = archive
    with urllib.request.urlopen(srv.url + "/") as resp:
        html = resp.read().decode()
        h = resp.headers
    assert resp.status == 200
    assert h["Content-Type"].startswith("text/html")
    csp = {d.split()[0]: d.split()[1:]
           for d in h["Content-Security-Policy"].split(";") if d.strip()}
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]  # no 'unsafe-inline', no 'unsafe-eval'
    assert csp["style-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert h["X-Content-Type-Options"] == "nosniff"
    assert h["Referrer-Policy"] == "no-referrer"
    # what the CSP forbids, the page must not need: no inline script, style or handler
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), html
    assert not re.search(r"\sstyle=|\son[a-z]+=|<style", html), html
    with urllib.request.urlopen(srv.url + "/static/app.js") as resp:
        assert resp.headers["Content-Type"] in ("text/javascript", "application/javascript")
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["ETag"] or resp.headers["Last-Modified"]
    # the static route reaches nothing outside web/static, however the path is spelled
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    for path in ("/static/../ui.py", "/static/%2e%2e/ui.py", "/static/..%2fui.py",
                 "/static/%2e%2e%2f%2e%2e%2fpyproject.toml"):
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status in (403, 404), (path, resp.status)
        assert b"import" not in body, path
        assert b"[project]" not in body, path
    conn.close()


# ---- study list ----------------------------------------------------------------------


def test_study_list_shows_the_sample_patients(page: tuple[Any, Watch],
                                              archive: tuple[AnimServer, list[Study]],
                                              tmp_path: Path) -> None:
    pg, watch = page
    srv, extra = archive
    pg.goto(srv.url + "/")
    found = wait_rows(pg, watch, len(SAMPLE_STUDIES) + len(extra))
    text = "\n".join(found)
    for st in SAMPLE_STUDIES:
        assert st.family_name in text, text
        assert st.description in text, text
        assert st.patient_id in text, text
    assert "MÜLLER, JÖRG" in text, text  # ISO_IR 192, through DICOM JSON, intact
    # counts of series and images: DOE's CT THORAX has 2 series, 12 images
    doe = next(r for r in found if DOE.description in r)
    assert re.search(r"\b2\s+12$", doe), doe
    assert pg.inner_text("#result-count") == f"{len(found)} studies"
    assert pg.get_attribute("#result-count", "aria-live") == "polite"
    settle(pg, watch)
    thumbs = pg.eval_on_selector_all(
        "table.studies img.thumb", "els => els.map(e => [e.naturalWidth, e.alt])")
    assert len(thumbs) == len(found)
    assert all(w > 0 and alt for w, alt in thumbs), thumbs
    assert_named(pg)
    screenshot(pg, "list", tmp_path)
    # the first Tab reaches the skip link, which moves the focus past the navigation
    pg.keyboard.press("Tab")
    assert pg.evaluate("document.activeElement.className") == "skip"
    pg.keyboard.press("Enter")
    assert pg.evaluate("document.activeElement.id") == "main"
    assert pg.evaluate("location.hash") == ""  # not a route
    settle(pg, watch)


def test_search_narrows_the_list(page: tuple[Any, Watch],
                                 archive: tuple[AnimServer, list[Study]]) -> None:
    pg, watch = page
    srv, extra = archive
    smith = [s for s in SAMPLE_STUDIES if s.family_name == "SMITH"]
    pg.goto(srv.url + "/")
    wait_rows(pg, watch, len(SAMPLE_STUDIES) + len(extra))
    # a part of the name, in lower case: PatientName=*smi*, matched case-insensitively
    pg.get_by_label("Patient name").fill("smi")
    pg.get_by_role("button", name="Search").click()
    found = wait_rows(pg, watch, len(smith))
    assert all("SMITH" in r for r in found), found
    assert any("PatientName=*smi*" in urllib.parse.unquote(u) for u in watch.requests)
    assert "name=smi" in pg.evaluate("location.hash")
    # and a modality on top: only the knee MR
    pg.get_by_label("Modality").select_option("MR")
    pg.get_by_role("button", name="Search").click()
    found = wait_rows(pg, watch, 1)
    assert "MR KNEE RIGHT" in found[0], found
    # patient ID, accession number, date range: each alone finds its study
    for label, value, expect in [
        ("Patient ID", "SYN0002", "MR BRAIN"),
        ("Accession number", "ACC20260020", "CT ABDOMEN"),
    ]:
        pg.get_by_role("button", name="Clear").click()
        wait_rows(pg, watch, len(SAMPLE_STUDIES) + len(extra))
        pg.get_by_label(label).fill(value)
        pg.get_by_label(label).press("Enter")
        found = wait_rows(pg, watch, 1)
        assert expect in found[0], (label, found)
    pg.get_by_role("button", name="Clear").click()
    wait_rows(pg, watch, len(SAMPLE_STUDIES) + len(extra))
    pg.get_by_label("Study date from").fill("2024-05-01")
    pg.get_by_label("Study date to").fill("2024-05-12")
    pg.get_by_role("button", name="Search").click()
    found = wait_rows(pg, watch, 1)
    assert "CT ABDOMEN" in found[0], found
    assert any("StudyDate=20240501-20240512" in u for u in watch.requests)
    # no match: an empty list and a message, not an error
    pg.get_by_label("Patient ID").fill("NOBODY")
    pg.get_by_label("Patient ID").press("Enter")
    wait_rows(pg, watch, 0)
    assert pg.inner_text("#result-count") == "No study matches."
    settle(pg, watch)


def test_list_pages_and_sorts(page: tuple[Any, Watch],
                              archive: tuple[AnimServer, list[Study]]) -> None:
    pg, watch = page
    srv, extra = archive
    total = len(SAMPLE_STUDIES) + len(extra)
    pg.goto(srv.url + "/#/?size=4")
    first = wait_rows(pg, watch, 4)
    assert "more on the next page" in pg.inner_text("#result-count")
    assert pg.get_by_role("button", name="← Previous").is_disabled()
    pg.get_by_role("button", name="Next →").click()
    second = wait_rows(pg, watch, total - 4)
    assert not set(first) & set(second)
    assert pg.inner_text("#result-count") == f"Studies 5–{total}"
    assert pg.get_by_role("button", name="Next →").is_disabled()
    assert any("limit=5&offset=4" in u for u in watch.requests), watch.requests
    pg.get_by_role("button", name="← Previous").click()
    assert wait_rows(pg, watch, 4) == first
    # sorting this page by patient ID, then the other way round
    pg.get_by_role("button", name="Patient ID").click()
    wait_rows(pg, watch, 4)
    ids = column(pg, 3)
    assert ids == sorted(ids), ids
    assert pg.get_attribute("th[aria-sort]", "aria-sort") == "ascending"
    pg.get_by_role("button", name="Patient ID").click()
    watch.wait(lambda: pg.wait_for_selector("th[aria-sort=descending]", timeout=WAIT_MS))
    wait_rows(pg, watch, 4)
    ids = column(pg, 3)
    assert ids == sorted(ids, reverse=True), ids
    settle(pg, watch)


# ---- study page ----------------------------------------------------------------------


def test_study_page_shows_series_thumbnails(page: tuple[Any, Watch],
                                            archive: tuple[AnimServer, list[Study]],
                                            tmp_path: Path) -> None:
    pg, watch = page
    srv, extra = archive
    pg.goto(srv.url + "/")
    wait_rows(pg, watch, len(SAMPLE_STUDIES) + len(extra))
    # by keyboard: the patient's link, then Enter
    pg.get_by_role("link", name="DOE, JANE").focus()
    pg.keyboard.press("Enter")
    watch.wait(lambda: pg.wait_for_selector(".series-card", timeout=WAIT_MS))
    assert DOE.uid in pg.evaluate("location.hash")
    cards = pg.locator(".series-card")
    watch.wait(lambda: pg.wait_for_function(
        "(n) => document.querySelectorAll('.series-card').length === n",
        arg=len(DOE.series), timeout=WAIT_MS))
    text = "\n".join(cards.all_inner_texts())
    for se in DOE.series.values():
        assert se.description in text, text
        assert f"{se.modality} · {se.instances} images" in text, text
    header = pg.inner_text(".study-header")
    assert "SYN0001" in header, header
    assert "DOE, JANE" in header, header
    # the external viewer link, as /api/ui-config names one
    ohif = pg.get_by_role("link", name=re.compile("Open in OHIF"))
    assert ohif.get_attribute("href") == (
        f"{OHIF_URL.rstrip('/')}/viewer?StudyInstanceUIDs={DOE.uid}")
    settle(pg, watch)
    sizes = pg.eval_on_selector_all(".series-card img", "els => els.map(e => e.naturalWidth)")
    assert len(sizes) == len(DOE.series), sizes
    assert all(w > 0 for w in sizes), sizes
    assert_named(pg)
    screenshot(pg, "study", tmp_path)
    settle(pg, watch)


# ---- viewer --------------------------------------------------------------------------


def test_viewer_scrolls_windows_and_zooms(page: tuple[Any, Watch],
                                          archive: tuple[AnimServer, list[Study]],
                                          tmp_path: Path) -> None:
    pg, watch = page
    srv, _ = archive
    open_viewer(pg, watch, srv.url, DOE, DOE_SOFT)
    assert pg.get_attribute("#stage", "data-count") == str(DOE_SOFT.instances)
    one = pixels(pg)
    assert one.var() > 0
    assert (one.mean(axis=2) > one.mean(axis=2).min()).mean() > 0.05  # an image, not a dot
    assert pg.inner_text("#v-position") == f"Image 1 of {DOE_SOFT.instances}"
    # scrolling: a key, the wheel, the slider; each shows another slice
    pg.locator("#stage").focus()
    pg.keyboard.press("ArrowDown")
    shown(pg, watch, 1)
    two = pixels(pg)
    assert two.shape == one.shape
    assert np.abs(two - one).mean() > 0
    pg.locator("#stage").hover()
    pg.mouse.wheel(0, 120)
    shown(pg, watch, 2)
    assert np.abs(pixels(pg) - two).mean() > 0
    pg.locator("#v-slider").focus()
    pg.keyboard.press("End")  # the slider's own keys
    shown(pg, watch, 5)
    pg.keyboard.press("Home")
    shown(pg, watch, 0)
    assert np.array_equal(pixels(pg), one)  # scrolling back: the same image
    # the next images were prefetched
    assert any("/rendered" in u and "instances" in u for u in watch.requests)
    # a window preset re-renders the same slice with ?window=
    auto = pixels(pg)
    pg.get_by_role("button", name="Lung").click()
    shown(pg, watch, 0, "window=-600,1500")
    lung = pixels(pg)
    assert np.abs(lung - auto).mean() > 1, "the lung window did not change the pixels"
    assert pg.get_attribute("[data-preset=lung]", "aria-pressed") == "true"
    pg.keyboard.press("1")  # soft tissue, by key
    shown(pg, watch, 0, "window=40,400")
    assert np.abs(pixels(pg) - lung).mean() > 1
    # window by drag: the server renders the new window once the drag ends
    box = pg.locator("#stage").bounding_box()
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    pg.mouse.move(cx, cy)
    pg.mouse.down()
    pg.mouse.move(cx + 120, cy + 40, steps=4)
    pg.mouse.up()
    watch.wait(lambda: pg.wait_for_function(
        "() => /window=(?!40,400)/.test(document.getElementById('stage').dataset.shown)",
        timeout=WAIT_MS))
    assert "W 587.5" in pg.inner_text(".ov.bl"), pg.inner_text(".ov.bl")
    pg.get_by_role("button", name="Auto").click()
    shown(pg, watch, 0)
    assert "window=" not in (pg.get_attribute("#stage", "data-shown") or "")
    # zoom (button, ctrl+wheel) and pan (shift+drag) move the image, not the request
    frame = pg.locator("#stage .frame")
    pg.get_by_role("button", name="Zoom in").click()
    assert "scale(1.25)" in (frame.get_attribute("style") or "")
    pg.locator("#stage").hover()
    pg.keyboard.down("Control")
    pg.mouse.wheel(0, -100)
    pg.keyboard.up("Control")
    zoomed = frame.evaluate("e => e.style.transform")
    assert "scale(1.25)" not in zoomed, zoomed
    pg.keyboard.down("Shift")
    pg.mouse.move(cx, cy)
    pg.mouse.down()
    pg.mouse.move(cx + 50, cy + 30, steps=3)
    pg.mouse.up()
    pg.keyboard.up("Shift")
    assert frame.evaluate("e => e.style.transform") != zoomed
    assert pg.get_attribute("#stage", "data-index") == "0"  # no scrolling on the way
    pg.get_by_role("button", name="Fit").click()
    assert frame.evaluate("e => e.style.transform") == "translate(0px, 0px) scale(1)"
    # the attributes of the image on screen, from /metadata
    watch.wait(lambda: pg.wait_for_selector("table.attrs td.tag", timeout=WAIT_MS))
    attrs = pg.inner_text("table.attrs")
    for text in ("(0010,0010)", "PatientName", "DOE^JANE"):
        assert text in attrs, attrs
    pg.get_by_label("Filter attributes").fill("windowcenter")
    visible = pg.locator("table.attrs tbody tr:visible").all_inner_texts()
    assert visible
    assert all("WindowCenter" in r for r in visible), visible
    pg.get_by_label("Filter attributes").fill("")
    pg.keyboard.press("ArrowDown")  # in the filter box, keys stay there
    assert pg.get_attribute("#stage", "data-index") == "0"
    settle(pg, watch)
    pg.locator("#stage").focus()
    pg.keyboard.press("ArrowDown")
    pg.keyboard.press("ArrowDown")
    shown(pg, watch, 2)
    settle(pg, watch)
    assert_named(pg)
    pg.evaluate("document.activeElement.blur()")
    pg.mouse.move(0, 0)
    screenshot(pg, "viewer", tmp_path)
    # another series of the study: choosing it does not leave the page, Enter opens it
    lung = next(se for se in DOE.series.values() if se is not DOE_SOFT)
    pg.get_by_label("Series").select_option(lung.uid)
    assert DOE_SOFT.uid in pg.evaluate("location.hash")
    pg.get_by_label("Series").press("Enter")
    watch.wait(lambda: pg.wait_for_function(
        "(uid) => location.hash.endsWith(uid)", arg=lung.uid, timeout=WAIT_MS))
    shown(pg, watch, 0)
    assert pg.get_attribute("#stage", "data-count") == str(lung.instances)
    settle(pg, watch)


def test_viewer_shows_jpeg_2000(page: tuple[Any, Watch],
                                archive: tuple[AnimServer, list[Study]]) -> None:
    pg, watch = page
    srv, extra = archive
    j2k = next(s for s in extra if s.patient_id == "UI01")
    open_viewer(pg, watch, srv.url, j2k, next(iter(j2k.series.values())))
    px = pixels(pg)
    assert px.shape[:2] == (1024, 256)  # rows x columns of JPEG2000.dcm, at full size
    assert px.var() > 0
    settle(pg, watch)


def test_viewer_walks_and_plays_frames(page: tuple[Any, Watch],
                                       archive: tuple[AnimServer, list[Study]],
                                       tmp_path: Path) -> None:
    pg, watch = page
    srv, extra = archive
    mf = next(s for s in extra if s.patient_id == "UI02")
    open_viewer(pg, watch, srv.url, mf, next(iter(mf.series.values())))
    assert pg.get_attribute("#stage", "data-count") == "2"
    assert "/frames/1/rendered" in (pg.get_attribute("#stage", "data-shown") or "")
    one = pixels(pg)
    assert one.var() > 0
    assert pg.inner_text("#v-position") == "Image 1 of 1, frame 1 of 2"
    pg.locator("#v-slider").focus()
    pg.keyboard.press("ArrowRight")
    shown(pg, watch, 1, "/frames/2/rendered")
    two = pixels(pg)
    assert np.abs(two - one).mean() > 1, "frame 2 looks like frame 1"
    # play walks the frames (and loops); pause stops it
    play = pg.locator("button.play")
    play.click()
    shown(pg, watch, 0, "/frames/1/rendered")
    shown(pg, watch, 1, "/frames/2/rendered")
    assert play.get_attribute("aria-pressed") == "true"
    play.click()
    assert play.get_attribute("aria-pressed") == "false"
    # colour: the presets are the CT ones only, so just Auto here
    assert pg.locator("[data-preset]").count() == 1
    settle(pg, watch)


# ---- admin ---------------------------------------------------------------------------


def test_admin_view_shows_holdings_changes_and_senders(page: tuple[Any, Watch],
                                                       archive: tuple[AnimServer, list[Study]],
                                                       tmp_path: Path) -> None:
    pg, watch = page
    srv, extra = archive
    pg.goto(srv.url + "/#/admin")
    watch.wait(lambda: pg.wait_for_selector("dl.cards", timeout=WAIT_MS))
    watch.wait(lambda: pg.wait_for_selector("table.data", timeout=WAIT_MS))
    cards = dict(zip(pg.locator(".card dt").all_inner_texts(),
                     pg.locator(".card dd").all_inner_texts(), strict=True))
    instances = sum(se.instances for st in SAMPLE_STUDIES for se in st.series.values())
    assert cards["Studies"] == str(len(SAMPLE_STUDIES) + len(extra)), cards
    assert cards["Instances"] == str(instances + len(extra)), cards
    assert cards["Patients"] == str(len({s.patient_id for s in SAMPLE_STUDIES}) + len(extra))
    assert "Saved by deduplication" in cards
    watch.wait(lambda: pg.wait_for_function(
        "() => document.querySelectorAll('table.data').length === 2", timeout=WAIT_MS))
    senders = pg.locator("section[aria-labelledby=a-peers] tbody tr").all_inner_texts()
    mine = [r for r in senders if r.startswith(SENDER)]
    assert len(mine) == 1, senders
    assert "\tyes\t" in mine[0], mine
    assert mine[0].endswith(f"\t{len(extra)}"), mine
    changes = pg.locator("section[aria-labelledby=a-chg] tbody tr").all_inner_texts()
    assert len(changes) == 50 or len(changes) == instances + len(extra), len(changes)
    # newest first: the storescu sends came last
    newest = pg.locator("section[aria-labelledby=a-chg] tbody tr a").first
    assert newest.get_attribute("href") in {f"#/study/{s.uid}" for s in extra}
    settle(pg, watch)
    assert_named(pg)
    screenshot(pg, "admin", tmp_path)
    settle(pg, watch)
