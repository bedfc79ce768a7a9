"""A real webhook receiver on loopback (http.server in a thread) and change-feed helpers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from anim.hcm import verify

SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGhlLXRlc3RzLW9ubHk="  # base64 of a test key


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered

    @property
    def json(self) -> dict[str, Any]:
        return dict(json.loads(self.body))


@dataclass
class Receiver:
    """Answers 503 to the first *fail_first* requests (and while ``down``), 204 after."""

    fail_first: int = 0
    down: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    def start(self) -> Receiver:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    refuse = outer.down or len(outer.deliveries) < outer.fail_first
                    status = 503 if refuse else 204
                    outer.deliveries.append(Delivery(
                        {k.lower(): v for k, v in self.headers.items()}, body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def accepted(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.status == 204]

    def all(self) -> list[Delivery]:
        with self.lock:
            return list(self.deliveries)


def signed_ok(d: Delivery) -> bool:
    return verify(SECRET, d.headers, d.body)


def write_config(path: Path, receiver_url: str, stable_after: float = 1.0,
                 events: tuple[str, ...] = ("study_stable", "study_updated", "study_deleted"),
                 extra: str = "") -> Path:
    ev = ", ".join(f'"{e}"' for e in events)
    path.write_text(f"""
[hcm]
stable_after = {stable_after}

[hcm.webhooks.national]
url = "{receiver_url}"
secret = "{SECRET}"
events = [{ev}]
timeout = 3
max_backoff = 1
{extra}
""")
    return path


def feed(base_url: str, since: int = 0) -> list[dict[str, Any]]:
    """The whole change feed after *since*, paged."""
    out: list[dict[str, Any]] = []
    while True:
        r = requests.get(f"{base_url}/hcm/changes", params={"since": since, "limit": 250},
                         timeout=30)
        r.raise_for_status()
        page = r.json()["changes"]
        if not page:
            return out
        out.extend(page)
        since = page[-1]["seq"]


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
