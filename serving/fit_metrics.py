"""The fit-latency metric: upload accepted -> job ended, from the kept results of the server's fit jobs.

Every fit job's result (UPLOADS/results/<job id>.json) records `seconds` from the moment its upload
was admitted to its end, and its `runner` (worker: resident fit workers; jobs: a Ray job). A
`FitLatencyCollector` turns the kept results into the histogram `premier_fit_latency_seconds`
(labels: runner, status) at scrape time, the way the fit-job counts are collected: register it on
a ServeMetrics registry with the manager's `latencies` (serving.metrics is another module's;
see docs/onboarding.md for the one line that wires it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client.core import HistogramMetricFamily

FIT_LATENCY_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
Latency = tuple[str, str, float]
"""(runner, status, seconds) of one ended fit job."""


class FitLatencyCollector:
    def __init__(self, latencies: Callable[[], Iterable[Latency] | None]):
        self._latencies = latencies

    def collect(self):
        family = HistogramMetricFamily(
            "premier_fit_latency_seconds",
            "Fit jobs: upload accepted -> job ended (kept results), by runner and status.",
            labels=["runner", "status"],
        )
        try:
            rows = list(self._latencies() or [])
        except Exception:  # a scrape must not fail because of the uploads folder
            rows = []
        groups: dict[tuple[str, str], list[float]] = {}
        for runner, status, seconds in rows:
            groups.setdefault((runner, status), []).append(seconds)
        for (runner, status), values in sorted(groups.items()):
            buckets = [(str(b), float(sum(v <= b for v in values))) for b in FIT_LATENCY_BUCKETS]
            buckets.append(("+Inf", float(len(values))))
            family.add_metric([runner, status], buckets, sum_value=float(sum(values)))
        yield family


__all__ = ["FitLatencyCollector", "FIT_LATENCY_BUCKETS", "Latency"]
