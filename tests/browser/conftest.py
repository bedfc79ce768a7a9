"""Fixtures for the browser tests: OHIF's prebuilt viewer on its own origin, Debian's Chromium.

The heavy parts stay out of the repo. OHIF's dist/ comes from the npm package @ohif/app,
which tests/browser/fetch-ohif puts in a cache outside the tree. ./run-tests runs that
script and exports ANIM_OHIF_DIST; a plain pytest run calls it here. The browser is
Debian's chromium package: Playwright drives it through executable_path and never downloads
a browser of its own. Under CI=true or ANIM_REQUIRE_PEERS=1 a missing piece fails.
"""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need_peer

HERE = Path(__file__).resolve().parent
FETCH = HERE / "fetch-ohif"
CONFIG_TEMPLATE = HERE / "ohif" / "app-config.js"
CHROMIUM = os.environ.get("ANIM_CHROMIUM", "/usr/bin/chromium")
# What the machine's network allows (see the env notes): no background or update traffic,
# which a closed network refuses and Chromium would log. --headless comes from Playwright.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="session")
def ohif_dist() -> Path:
    """OHIF's dist/ folder: $ANIM_OHIF_DIST, else what fetch-ohif puts in the cache."""
    env = os.environ.get("ANIM_OHIF_DIST", "")
    if env:
        dist = Path(env)
        need_peer((dist / "index.html").is_file(), f"OHIF dist at ANIM_OHIF_DIST={env}")
        return dist
    need_peer(shutil.which("npm") is not None, "npm (to fetch @ohif/app)")
    done = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, timeout=600)
    need_peer(done.returncode == 0, f"OHIF viewer (tests/browser/fetch-ohif: {done.stderr})")
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    need_peer(Path(CHROMIUM).is_file(), f"Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need_peer(False, "playwright (pip install -e '.[test]')")
        raise
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class StaticSite:
    """OHIF's dist/ served on its own loopback origin, single-page-app style.

    A path that is not a file falls back to index.html (OHIF routes /viewer, /:mode... on
    the client). /app-config.js is the test's configuration, not the one in dist/. Every
    response carries COOP/COEP, as OHIF's deployment docs ask, so the page is cross-origin
    isolated (SharedArrayBuffer for its decoders and volumes); the archive's CORS answers
    are what let such a page read it.
    """

    def __init__(self, root: Path, app_config: str) -> None:
        self.root = root
        self.app_config = app_config.encode()
        self.requests: list[tuple[str, int]] = []
        site = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            extensions_map = {  # noqa: RUF012 (class attribute of the stdlib handler)
                **http.server.SimpleHTTPRequestHandler.extensions_map,
                ".js": "text/javascript", ".mjs": "text/javascript",
                ".wasm": "application/wasm", ".json": "application/json",
            }

            def __init__(self, *a: Any, **kw: Any) -> None:
                super().__init__(*a, directory=str(site.root), **kw)

            def end_headers(self) -> None:
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cache-Control", "no-store")
                super().end_headers()

            def send_response(self, code: int, message: str | None = None) -> None:
                site.requests.append((self.path, code))
                super().send_response(code, message)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0].split("#", 1)[0]
                if path == "/app-config.js":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/javascript")
                    self.send_header("Content-Length", str(len(site.app_config)))
                    self.end_headers()
                    self.wfile.write(site.app_config)
                    return
                local = Path(self.translate_path(path))
                if not local.is_file() and "." not in path.rsplit("/", 1)[-1]:
                    self.path = "/index.html"  # client-side route
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # kept in site.requests instead

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> StaticSite:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def app_config(dicomweb_root: str) -> str:
    text = CONFIG_TEMPLATE.read_text()
    assert "__ANIM_DICOMWEB__" in text
    return text.replace("__ANIM_DICOMWEB__", dicomweb_root)
