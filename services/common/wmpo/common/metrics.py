"""Prometheus metrics helpers shared by the services.

Metric names are prefixed ``wmpo_``. The factories are idempotent (asking twice for the same name
returns the same collector), so servers can be created several times in one process (tests, hot
reload) without "Duplicated timeseries" errors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

NAMESPACE = "wmpo"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds; suits gRPC calls from ~1 ms (policy on GPU) to seconds (world model on CPU)."""

_C = TypeVar("_C", Counter, Gauge, Histogram)
_lock = threading.Lock()
_collectors: dict[tuple[int, str], Any] = {}


def _get_or_create(
    kind: type[_C], name: str, doc: str, labels: Sequence[str], registry: CollectorRegistry, **kw: Any
) -> _C:
    full = f"{NAMESPACE}_{name}"
    key = (id(registry), full)
    with _lock:
        existing = _collectors.get(key)
        if existing is not None:
            if not isinstance(existing, kind):
                raise ValueError(f"metric {full} already exists as a {type(existing).__name__}")
            return existing
        collector = kind(full, doc, labelnames=tuple(labels), registry=registry, **kw)
        _collectors[key] = collector
        return collector


def counter(name: str, doc: str, labels: Sequence[str] = (), registry: CollectorRegistry = REGISTRY) -> Counter:
    """A ``wmpo_<name>`` counter (Prometheus appends ``_total``)."""
    return _get_or_create(Counter, name, doc, labels, registry)


def gauge(name: str, doc: str, labels: Sequence[str] = (), registry: CollectorRegistry = REGISTRY) -> Gauge:
    """A ``wmpo_<name>`` gauge."""
    return _get_or_create(Gauge, name, doc, labels, registry)


def histogram(
    name: str,
    doc: str,
    labels: Sequence[str] = (),
    buckets: Sequence[float] = LATENCY_BUCKETS,
    registry: CollectorRegistry = REGISTRY,
) -> Histogram:
    """A ``wmpo_<name>`` histogram, latency buckets in seconds by default."""
    return _get_or_create(Histogram, name, doc, labels, registry, buckets=tuple(buckets))


@contextmanager
def timed(hist: Histogram) -> Iterator[None]:
    """Observe the wall time of the block (seconds) in `hist`, also when it raises."""
    start = time.perf_counter()
    try:
        yield
    finally:
        hist.observe(time.perf_counter() - start)


def serve_metrics(port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY) -> int:
    """Serve ``/metrics`` over HTTP in a background thread; returns the bound port (0 picks a free one)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
