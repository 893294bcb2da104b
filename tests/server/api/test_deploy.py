"""deploy/: the Grafana dashboard queries only metrics that /metrics exposes; the Prometheus
config scrapes /metrics with a bearer credentials file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from server.api.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"


def _exposed() -> set[str]:
    metrics = Metrics()
    metrics.observe_event(
        {
            "kind": "round_finished",
            "artifact_name": "a",
            "metrics": {
                "seconds": 1.0,
                "participants": 3,
                "dropouts": 1,
                "epsilon": 1.0,
                "reliability": 0.9,
            },
        }
    )
    metrics.observe_event({"kind": "job_finished", "artifact_name": "a", "message": "passed: x"})
    metrics.observe_event(
        {"kind": "stage", "artifact_name": "a", "stage": "train", "metrics": {"seconds": 1.0}}
    )
    metrics.observe_request("/api/v1/runs", "GET", 200, 0.01)
    metrics.jobs.labels("succeeded").inc()
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        names.update(sample.name for sample in family.samples)
    return names


def test_every_dashboard_query_uses_an_exposed_metric() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exposed = _exposed()
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"fedbrain_[a-z_]+", target["expr"])
    }
    assert used and used <= exposed, used - exposed


def test_prometheus_config_scrapes_metrics_with_a_bearer_file() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["credentials_file"]
