"""Prometheus metrics of the operator API and of the runs its worker follows.

One :class:`Metrics` per app, on its own registry (tests build many apps). Round metrics are
fed from the progress events of the runs (:meth:`Metrics.observe_event`); labels are the
artifact name, a stage or an HTTP route template -- never a run id, key or path parameter, so
the number of series stays bounded.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_ROUND_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)
_API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter(
            "fedbrain_rounds", "Rounds finished, by artifact.", ["artifact"], registry=r
        )
        self.round_seconds = Histogram(
            "fedbrain_round_duration_seconds",
            "Wall-clock seconds of a round.",
            ["artifact"],
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "fedbrain_stage_duration_seconds",
            "Seconds of a protocol stage within a round (train, SecAgg+ stages, eval, ...).",
            ["artifact", "stage"],
            buckets=_ROUND_BUCKETS,
            registry=r,
        )
        self.participants = Gauge(
            "fedbrain_round_participants",
            "Nodes that contributed to the last round.",
            ["artifact"],
            registry=r,
        )
        self.dropouts = Counter(
            "fedbrain_round_dropouts", "Nodes that dropped out of rounds.", ["artifact"], registry=r
        )
        self.epsilon = Gauge(
            "fedbrain_epsilon_spent",
            "Privacy spent so far by the artifact's current run (epsilon at its delta).",
            ["artifact"],
            registry=r,
        )
        self.reliability = Gauge(
            "fedbrain_reliability",
            "Reliability score of the artifact's last round (result-aggregator, 0..1).",
            ["artifact"],
            registry=r,
        )
        self.bundles = Counter(
            "fedbrain_bundles_signed", "Signed artifact bundles produced.", ["artifact"], registry=r
        )
        self.jobs = Counter("fedbrain_jobs", "Jobs that ended, by status.", ["status"], registry=r)
        self.jobs_running = Gauge("fedbrain_jobs_running", "Jobs running now.", registry=r)
        self.requests = Counter(
            "fedbrain_api_requests",
            "API requests, by route template, method and status code.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "fedbrain_api_request_duration_seconds",
            "API request latency, by route template and method.",
            ["route", "method"],
            buckets=_API_BUCKETS,
            registry=r,
        )

    def observe_event(self, event: Mapping[str, object]) -> None:
        """Update the round metrics from one progress event (a JSON line)."""
        artifact = str(event.get("artifact_name", "")) or "unknown"
        kind = event.get("kind")
        raw = event.get("metrics")
        metrics: Mapping[str, object] = raw if isinstance(raw, Mapping) else {}
        if kind == "stage":
            seconds = _number(metrics.get("seconds"))
            if seconds is not None:
                self.stage_seconds.labels(artifact, str(event.get("stage", ""))).observe(seconds)
        elif kind == "round_finished":
            self.rounds.labels(artifact).inc()
            seconds = _number(metrics.get("seconds"))
            if seconds is not None:
                self.round_seconds.labels(artifact).observe(seconds)
            for gauge, name in (
                (self.participants, "participants"),
                (self.epsilon, "epsilon"),
                (self.reliability, "reliability"),
            ):
                value = _number(metrics.get(name))
                if value is not None:
                    gauge.labels(artifact).set(value)
            dropped = _number(metrics.get("dropouts"))
            if dropped:
                self.dropouts.labels(artifact).inc(dropped)
        elif kind == "job_finished" and str(event.get("message", "")).startswith("passed"):
            self.bundles.labels(artifact).inc()

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
