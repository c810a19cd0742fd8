"""Prometheus metrics of the server, recorded by the ingress and exposed at GET /metrics.

Every generation answer (`serving.protocol.ImageResult`) carries its own timings and batch facts, so
the ingress sees the whole picture: request latency, queue wait, batch sizes (each batch counted
once, by the request at position 0), queue depth, images per second and the user-embedding
cache outcome. Fit-job counts are read from the fit-job manager at scrape time. A registry per
ingress replica (not the process-global one) keeps replicas and tests independent.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from serving.fit_metrics import FitLatencyCollector, Latency

if TYPE_CHECKING:
    from serving.protocol import ImageResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
RATE_WINDOW_S = 10.0
FIT_STATUSES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")


class _FitJobCollector:
    def __init__(self, counts: Callable[[], dict[str, int] | None]):
        self._counts = counts

    def collect(self):
        g = GaugeMetricFamily(
            "premier_fit_jobs", "Fit jobs: live ones and the kept results of ended ones, by status.", labels=["status"]
        )
        try:
            counts = self._counts() or {}
        except Exception:  # a scrape must not fail because the Jobs API is away
            counts = {}
        for status in sorted(set(FIT_STATUSES) | set(counts)):
            g.add_metric([status], float(counts.get(status, 0)))
        yield g


class ServeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        fit_counts: Callable[[], dict[str, int] | None] = lambda: None,
        fit_latencies: Callable[[], Iterable[Latency] | None] = lambda: None,
    ):
        r = self.registry = CollectorRegistry()
        self.latency = Histogram(
            "premier_request_latency_seconds",
            "End-to-end latency of answered generation requests.",
            ["protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "premier_queue_wait_seconds",
            "Time from arrival until the request's batch started.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "premier_batch_size",
            "Requests per pipeline forward (each batch counted once).",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_occupancy = Histogram(
            "premier_step_occupancy",
            "Step-level batching: requests in the running batch at each denoising step.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_joins = Histogram(
            "premier_step_joins",
            "Step-level batching: requests joining at each step.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.step_leaves = Histogram(
            "premier_step_leaves",
            "Step-level batching: requests leaving (finished or failed) at each step.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.first_step = Histogram(
            "premier_time_to_first_step_seconds",
            "Step-level batching: time from arrival until the request's first denoising step is done.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "premier_queue_depth", "Generation requests admitted and not yet answered.", registry=r
        )
        self.requests = Counter(
            "premier_requests",
            "Generation requests by protocol and outcome (HTTP status).",
            ["protocol", "code"],
            registry=r,
        )
        self.images = Counter("premier_images_generated", "Images generated.", registry=r)
        self.dropped = Counter(
            "premier_requests_dropped",
            "Admitted requests dropped before or instead of reaching the model: expired (deadline passed), "
            "cancelled or disconnected (the client went away).",
            ["reason"],
            registry=r,
        )
        self.cache = Counter(
            "premier_user_cache_lookups",
            "User-embedding lookups by outcome (hit, miss, checkpoint).",
            ["result"],
            registry=r,
        )
        Gauge(
            "premier_images_per_second", f"Images generated per second over the last {RATE_WINDOW_S:g} s.", registry=r
        ).set_function(self.images_per_second)
        Gauge(
            "premier_user_cache_hit_ratio", "Share of store lookups answered from the embedding cache.", registry=r
        ).set_function(self.cache_hit_ratio)
        r.register(_FitJobCollector(fit_counts))
        r.register(FitLatencyCollector(fit_latencies))
        self._done: deque[float] = deque()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def observe(self, protocol: str, result: ImageResult, end_to_end_s: float) -> None:
        """Record one answered generation."""
        self.requests.labels(protocol, "200").inc()
        self.latency.labels(protocol).observe(end_to_end_s)
        self.queue_wait.observe(result.timings.get("queue_wait_s", 0.0))
        if result.batch_position == 0:
            self.batch_size.observe(result.batch_size)
        for occupancy, joins, leaves in result.step_log:
            self.step_occupancy.observe(occupancy)
            self.step_joins.observe(joins)
            self.step_leaves.observe(leaves)
        if "first_step_s" in result.timings:
            self.first_step.observe(result.timings["first_step_s"])
        self.images.inc()
        outcome = result.user_cache
        if outcome != "none":
            self.cache.labels(outcome).inc()
        with self._lock:
            self._done.append(time.monotonic())
            self._hits += outcome == "hit"
            self._misses += outcome == "miss"

    def refused(self, protocol: str, code: int) -> None:
        self.requests.labels(protocol, str(code)).inc()

    def images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0] < now - RATE_WINDOW_S:
                self._done.popleft()
            return len(self._done) / RATE_WINDOW_S

    def cache_hit_ratio(self) -> float:
        with self._lock:
            n = self._hits + self._misses
            return self._hits / n if n else 0.0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["ServeMetrics"]
