"""A real Prometheus (Debian's prometheus) scrapes the live /metrics endpoint once, with a
bearer token from a credentials file, and its query API returns fedbrain's series. The same
endpoint also parses with prometheus_client's own parser."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import ApiSettings, create_app
from tests.server.api.live import free_port, serving
from tests.server.postgres import missing

pytestmark = pytest.mark.slow


def _query(port: int, expression: str) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    return list(body["data"]["result"])


def test_prometheus_scrapes_the_metrics_endpoint(tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        missing("Prometheus (Debian package prometheus)")
        return
    app = create_app(
        ApiSettings(
            database_url=f"sqlite:///{tmp_path / 'api.sqlite'}",
            data_dir=tmp_path / "data",
            start_worker=False,
        )
    )
    _, key = app.state.fedbrain.keys.create(name="prometheus", role="viewer", created_by="t")
    with serving(app) as url:
        headers = {"Authorization": f"Bearer {key}"}
        httpx.get(f"{url}/api/v1/runs", headers=headers)
        assert httpx.get(f"{url}/metrics").status_code == 401
        text = httpx.get(f"{url}/metrics", headers=headers).text
        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"fedbrain_api_requests", "fedbrain_api_request_duration_seconds"} <= names
        assert {"fedbrain_rounds", "fedbrain_epsilon_spent", "fedbrain_bundles_signed"} <= names

        credentials = tmp_path / "token"
        credentials.write_text(key)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: fedbrain\n"
            "    metrics_path: /metrics\n"
            "    authorization:\n"
            f"      credentials_file: {credentials}\n"
            "    static_configs:\n"
            f"      - targets: ['{url.removeprefix('http://')}']\n"
        )
        port = free_port()
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "prometheus.log").open("wb"),
        )
        try:
            deadline = time.monotonic() + 60
            found: list[dict[str, object]] = []
            while time.monotonic() < deadline and not found:
                time.sleep(1)
                try:
                    found = _query(port, 'fedbrain_api_requests_total{route="/api/v1/runs"}')
                except OSError:
                    continue
            assert found, (tmp_path / "prometheus.log").read_text()[-2000:]
            up = _query(port, 'up{job="fedbrain"}')
            assert up and up[0]["value"][1] == "1"  # type: ignore[index]
        finally:
            process.terminate()
            process.wait(30)
