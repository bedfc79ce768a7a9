"""The per-client rate limit: a token bucket per address (or token subject)."""

from __future__ import annotations

import time
from pathlib import Path

import requests

from tests.conftest import AnimServer
from web.ratelimit import Buckets


def test_bucket_refills_at_the_rate() -> None:
    b = Buckets(rate=2.0, burst=3)
    assert [b.take("x", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("x", now=0.0) == 0.5  # one token comes back every 0.5 s
    assert b.take("y", now=0.0) == 0.0  # another client has its own bucket
    assert b.take("x", now=0.6) == 0.0


def test_a_client_over_the_limit_gets_429_and_health_never_does(
        make_server: type[AnimServer], tmp_path: Path) -> None:
    env = {"ANIM_WEB_RATE_LIMIT": "2", "ANIM_WEB_RATE_BURST": "3"}
    srv = make_server(tmp_path / "data", env=env).start()
    answers = [requests.get(f"{srv.url}/dicom-web/studies", timeout=30) for _ in range(8)]
    codes = [r.status_code for r in answers]
    assert codes[:3] == [200, 200, 200]
    assert 429 in codes
    limited = next(r for r in answers if r.status_code == 429)
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["status"] == 429
    assert all(requests.get(f"{srv.url}/health", timeout=30).status_code == 200
               for _ in range(10))
    time.sleep(1.1)
    assert requests.get(f"{srv.url}/dicom-web/studies", timeout=30).status_code == 200
