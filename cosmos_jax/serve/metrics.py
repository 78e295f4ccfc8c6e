"""The server's Prometheus metrics (GET /metrics): queue depth, batch sizes, latencies, compiles, errors.

One registry per app (not the process-global one), so several servers in one process (tests) keep their own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


class Metrics:
    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("cosmos_serve_queue_depth", "Requests waiting for a batch", registry=r)
        self.in_flight = Gauge("cosmos_serve_in_flight", "Requests in the batch now running", registry=r)
        self.compiling = Gauge("cosmos_serve_compiling", "1 while a batch of a new shape is compiling", registry=r)
        self.batch_size = Histogram("cosmos_serve_batch_size", "Requests per batched call",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.batch_seconds = Histogram("cosmos_serve_batch_seconds", "Seconds per batched call",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("cosmos_serve_request_seconds", "Seconds from arrival to reply",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.requests = Counter("cosmos_serve_requests", "Requests answered", ["endpoint"], registry=r)
        self.errors = Counter("cosmos_serve_errors", "Requests refused or failed", ["endpoint", "status"],
                              registry=r)
        self.compiles = Counter("cosmos_serve_compiles", "Batches that compiled a new shape", registry=r)

    def text(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
