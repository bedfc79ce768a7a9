"""A rate limit per client (docs/security.md): a token bucket per token subject, or per
address for callers without one. Over it: 429 with Retry-After. Off unless
``[web].rate_limit`` is set (requests per second; ``rate_burst`` the bucket size).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from aiohttp import web

from web.errors import error_response
from web.keys import config_key

MAX_CLIENTS = 10_000  # buckets remembered; the least recently seen go first
# a load balancer's health checks are never slowed down
_EXEMPT = frozenset({"/health", "/health/live", "/health/ready", "/version"})


class Buckets:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(max(burst, 1))
        self._b: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """0 when the request may go, else the seconds until it could."""
        now = time.monotonic() if now is None else now
        tokens, last = self._b.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._b[key] = (tokens, now)
        if len(self._b) > MAX_CLIENTS:
            self._b.popitem(last=False)
        return wait


buckets_key = web.AppKey("rate_buckets", Buckets)


@web.middleware
async def ratelimit_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    cfg = request.app[config_key]
    if cfg.rate_limit <= 0 or request.path in _EXEMPT:
        return await handler(request)
    if buckets_key not in request.app:
        request.app[buckets_key] = Buckets(cfg.rate_limit, cfg.rate_burst or
                                           int(cfg.rate_limit * 2))
    principal = request.get("principal")
    key = (f"sub:{principal.subject}" if principal is not None and principal.kind == "token"
           else f"addr:{request.remote}")
    wait = request.app[buckets_key].take(key)
    if wait > 0:
        return error_response(429, "too many requests from this client; slow down",
                              headers={"Retry-After": str(max(1, round(wait)))})
    return await handler(request)
