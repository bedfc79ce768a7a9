"""Prometheus metrics of one archive (docs/deploy.md "Metrics").

Every collector lives on a registry of its own (not prometheus_client's global one), one
per :class:`~anim.archive.Archive`, so two archives in one process, or tests, never add
to each other's counts. The edges record what they do (``scp`` the DIMSE services,
``web`` the HTTP requests) through :func:`of`; queue depths are read when scraped.

Names follow the Prometheus conventions (``anim_`` prefix, base units, ``_total`` on
counters). Label values come from small fixed sets (protocol, outcome, level, route
template, status class): never a UID, a patient's name or ID, an AE title or an address,
so no patient data leaves through a scrape and the number of series stays bounded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select

from anim.index.schema import webhook_outbox
from anim.models import StoreOutcome

if TYPE_CHECKING:
    from anim.archive import Archive
    from anim.models import Source, StoreResult

log = logging.getLogger(__name__)

# from a header-only C-FIND (milliseconds) to a whole study over WADO-RS (minutes)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)
STORE_PROTOCOLS = ("dimse", "stowrs")
# StoreOutcome's own values, then the two ways a store does not happen
STORE_OUTCOMES = (*(o.value for o in StoreOutcome), "failed", "refused")
QUERY_PROTOCOLS = ("cfind", "qido", "fhir")
LEVELS = ("patient", "study", "series", "image")
RETRIEVE_PROTOCOLS = ("cmove", "cget", "wado")
# no *_created series: they double the series of every counter and histogram, and the
# 0.0.4 text format Prometheus scrapes by default shows them as gauges of their own
disable_created_metrics()

OUTBOX_TTL = 5.0  # seconds a webhook outbox count is reused: a scrape never hammers the DB


class Sampled(Collector):
    """Gauges read when scraped (queue depths): each a callback returning a number.

    A callback that fails leaves its sample out of that scrape; the scrape itself (and
    the other samples) still answer.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gauges: dict[str, tuple[str, tuple[str, ...],
                                      list[tuple[tuple[str, ...], Callable[[], float]]]]] = {}

    def add(self, name: str, doc: str, fn: Callable[[], float], **labels: str) -> None:
        keys = tuple(sorted(labels))
        with self._lock:
            _, known, entries = self._gauges.setdefault(name, (doc, keys, []))
            if known != keys:
                raise ValueError(f"{name}: labels {keys} differ from {known}")
            values = tuple(labels[k] for k in keys)
            # registering again (a restarted server in the same process) replaces
            entries[:] = [e for e in entries if e[0] != values] + [(values, fn)]

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            gauges = [(n, d, k, list(e)) for n, (d, k, e) in self._gauges.items()]
        for name, doc, keys, entries in gauges:
            family = GaugeMetricFamily(name, doc, labels=keys)
            for values, fn in entries:
                try:
                    family.add_metric(values, float(fn()))
                except Exception as e:
                    log.debug("metric %s%s not read: %s", name, values, type(e).__name__)
            yield family


class Cached:
    """*fn*'s value, computed at most once per *ttl* seconds (a failure too: a database
    that is down is not asked again at every scrape)."""

    def __init__(self, fn: Callable[[], float], ttl: float) -> None:
        self.fn, self.ttl = fn, ttl
        self._lock = threading.Lock()
        self._at = -ttl - 1.0
        self._value: float | BaseException = 0.0

    def __call__(self) -> float:
        with self._lock:
            now = time.monotonic()
            if now - self._at >= self.ttl:
                try:
                    self._value = self.fn()
                except Exception as e:
                    self._value = e
                self._at = now
            if isinstance(self._value, BaseException):
                raise self._value
            return self._value


def outbox_pending(engine: Engine) -> int:
    """Webhook notifications not yet delivered, over all endpoints."""
    o = webhook_outbox
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(o)
                                .where(o.c.state == "pending")).scalar_one())


def _level(level: Any) -> str:
    """``Level.STUDY`` (or "STUDY") -> "study"; anything else is not a label value."""
    value = str(getattr(level, "value", level)).lower()
    return value if value in LEVELS else "other"


class Metrics:
    """The collectors of one archive, on their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, memory, open fds
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_* (registers itself on CPython only)
        self.stores = Counter(
            "anim_stores", "Objects received for storage, by protocol and outcome "
            "(StoreOutcome; failed: not stored; refused: the caller may not store)",
            ["protocol", "outcome"], registry=r)
        self.received_bytes = Counter(
            "anim_store_received_bytes", "Bytes of objects received for storage",
            ["protocol"], registry=r)
        self.written_bytes = Counter(
            "anim_store_written_bytes", "Bytes written to the blob store by stores (new "
            "content only: what deduplication did not save)", ["protocol"], registry=r)
        self.store_seconds = Histogram(
            "anim_store_duration_seconds", "Time to store one object, blobs and index "
            "committed", ["protocol"], buckets=LATENCY_BUCKETS, registry=r)
        self.queries = Counter(
            "anim_queries", "Searches answered (C-FIND, QIDO-RS, FHIR), by query level",
            ["protocol", "level"], registry=r)
        self.query_seconds = Histogram(
            "anim_query_duration_seconds", "Time to answer a search, matches sent",
            ["protocol", "level"], buckets=LATENCY_BUCKETS, registry=r)
        self.retrieved_bytes = Counter(
            "anim_retrieved_bytes", "Bytes sent by retrievals (C-MOVE and C-GET: stored "
            "size of the instances handed to the sub-operations; WADO-RS: response bodies)",
            ["protocol"], registry=r)
        self.retrieved_instances = Counter(
            "anim_retrieved_instances", "Instances sent by retrievals", ["protocol"],
            registry=r)
        self.associations = Counter(
            "anim_dimse_associations", "DIMSE associations requested, by result",
            ["result"], registry=r)
        self.http_requests = Counter(
            "anim_http_requests", "HTTP requests answered, by method, route template "
            "and status class", ["method", "route", "status"], registry=r)
        self.http_seconds = Histogram(
            "anim_http_request_duration_seconds", "Time to answer an HTTP request (a "
            "streamed body: until its last byte is written)", ["method", "route"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.http_in_progress = Gauge(
            "anim_http_requests_in_progress", "HTTP requests being answered", registry=r)
        self.sampled = Sampled()
        r.register(self.sampled)
        self._zeros()

    def _zeros(self) -> None:
        """Known series start at 0, so a rate() sees the first event (Prometheus docs,
        "Instrumentation": avoid missing metrics)."""
        for p in STORE_PROTOCOLS:
            for o in STORE_OUTCOMES:
                self.stores.labels(p, o)
            self.received_bytes.labels(p)
            self.written_bytes.labels(p)
        for p in ("cfind", "qido"):
            for lv in LEVELS if p == "cfind" else LEVELS[1:]:
                self.queries.labels(p, lv)
        self.queries.labels("fhir", "study")
        for p in RETRIEVE_PROTOCOLS:
            self.retrieved_bytes.labels(p)
            self.retrieved_instances.labels(p)
        for result in ("accepted", "rejected"):
            self.associations.labels(result)

    def watch_archive(self, archive: Archive) -> None:
        """Queue depths of *archive*, read at scrape time. The callbacks hold its index
        and engine, never the archive itself (of() keys on it weakly)."""
        index = archive.index
        self.sampled.add("anim_index_writer_queue_depth",
                         "Index writes waiting for the group-commit writer",
                         index.writer_queue_depth)
        self.sampled.add("anim_webhook_outbox_pending",
                         f"Webhook notifications not yet delivered (read at most every "
                         f"{OUTBOX_TTL:g} s)",
                         Cached(lambda: outbox_pending(index.engine), OUTBOX_TTL))

    # ---- recording ----------------------------------------------------------------

    def store_refused(self, protocol: str) -> None:
        self.stores.labels(protocol, "refused").inc()

    def queried(self, protocol: str, level: Any, seconds: float) -> None:
        lv = _level(level)
        self.queries.labels(protocol, lv).inc()
        self.query_seconds.labels(protocol, lv).observe(seconds)

    def retrieved(self, protocol: str, nbytes: int, instances: int = 0) -> None:
        self.retrieved_bytes.labels(protocol).inc(max(nbytes, 0))
        if instances:
            self.retrieved_instances.labels(protocol).inc(instances)

    def association(self, result: str) -> None:
        self.associations.labels(result).inc()

    @contextlib.contextmanager
    def stored(self, protocol: str, size: int, result: StoreResult | None,
               seconds: float) -> None:
        """One store under *protocol*: its outcome (None: it failed), bytes and time."""
        self.stores.labels(protocol, result.outcome.value if result else "failed").inc()
        self.received_bytes.labels(protocol).inc(size)
        if result is not None:
            self.written_bytes.labels(protocol).inc(result.new_bytes)
        self.store_seconds.labels(protocol).observe(seconds)


_BY_ARCHIVE: weakref.WeakKeyDictionary[Any, Metrics] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def of(archive: Archive) -> Metrics:
    """The metrics of *archive* (made, with its queue-depth gauges, on first use)."""
    m = _BY_ARCHIVE.get(archive)
    if m is None:
        with _LOCK:
            m = _BY_ARCHIVE.get(archive)
            if m is None:
                m = _BY_ARCHIVE[archive] = Metrics()
                m.watch_archive(archive)
    return m


def observed_store(archive: Archive, protocol: str, data: bytes, source: Source,
                   **kwargs: Any) -> StoreResult:
    """``archive.store(data, source, **kwargs)``, counted and timed under *protocol*."""
    t0, result = time.perf_counter(), None
    try:
        result = archive.store(data, source, **kwargs)
        return result
    finally:
        of(archive).stored(protocol, len(data), result, time.perf_counter() - t0)
