"""Jobs through the real worker: `fedbrain simulate` subprocesses on Flower's Simulation
Engine, followed over server-sent events with the API client; cancel; the remote CLI."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.api.app import ApiSettings, create_app
from server.api_client import ApiClient
from server.cli import app as cli
from tests.server.api.conftest import TEMPLATE
from tests.server.api.live import serving

IOT = {
    "component": "sensing",
    "base_model": "iot",
    "task": "normalizer",
    "privacy_level": "dp+secure-agg",
    "federation": {"num_rounds": 1, "reliability_threshold": 0.5},
    "dp": {
        "unit": "example",
        "noise_multiplier": 2.0,
        "delta": 1e-5,
        "epsilon_budget": 10.0,
    },
}
VIT = {
    "component": "vision",
    "base_model": "vit-base16",
    "task": "embed",
    "embedding_dim": 16,
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "input_size": 32,
    "batch_size": 16,
    "epochs": 2,
    "privacy_level": "secure-agg",
    "federation": {"num_rounds": 3, "reliability_threshold": 0.0},
    "secagg": {"quantization_range": 4.0},
}

pytestmark = pytest.mark.slow


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    app = create_app(
        ApiSettings(
            database_url=f"sqlite:///{tmp_path / 'api.sqlite'}",
            data_dir=tmp_path / "data",
            worker={"scenario_template": TEMPLATE, "cancel_grace": 5.0},
        )
    )
    keys = {
        role: app.state.fedbrain.keys.create(name=role, role=role, created_by="test")[1]
        for role in ("viewer", "operator", "admin")
    }
    with serving(app) as url:
        yield url, keys


def test_a_submitted_job_runs_streams_its_rounds_and_its_bundle_verifies(
    live: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, keys = live
    with ApiClient(url, keys["operator"]) as api:
        job = api.submit(IOT)
        events = list(api.events(job["job_id"]))
        kinds = [e.data.get("kind") for e in events if e.event == "progress"]
        assert kinds[0] == "job_started" and "round_finished" in kinds
        assert kinds[-1] == "job_finished" and events[-1].event == "end"
        final = api.job(job["job_id"])
        assert final["status"] == "succeeded", final
        run = api.run(final["run_id"])
        assert run["status"] == "completed" and run["rounds_recorded"] == 1
        assert run["job_id"] == job["job_id"] and run["refused_nodes"] == []
        (round_,) = api.rounds(final["run_id"])
        assert round_["contributors"] == 3 and round_["epsilon_spent"] > 0
        assert api.verification(final["run_id"])["verified"] is True
        assert api.manifest(final["run_id"])["artifact_name"] == "sensing-iot-normalizer-v1"
        assert api.runs()["total"] == 1
        metrics = api.metrics()
        assert 'fedbrain_rounds_total{artifact="sensing-iot-normalizer-v1"} 1.0' in metrics
        assert 'fedbrain_bundles_signed_total{artifact="sensing-iot-normalizer-v1"} 1.0' in metrics
    with ApiClient(url, keys["admin"]) as admin:
        actions = [(e["action"], e["target"]) for e in admin.audit()]
        assert ("job.submitted", job["job_id"]) in actions
        assert ("bundle.signed", final["run_id"]) in actions
        assert admin.audit_verify()["ok"] is True

    out = tmp_path / "fetched.zip"
    result = CliRunner().invoke(
        cli,
        ["remote", "fetch", final["run_id"], "--out", str(out), "--url", url],
        env={"FEDBRAIN_API_KEY": keys["viewer"]},
    )
    assert result.exit_code == 0, result.output
    assert "verified (sensing-iot-normalizer-v1" in result.output
    listing = CliRunner().invoke(
        cli, ["remote", "list", "--url", url], env={"FEDBRAIN_API_KEY": keys["viewer"]}
    )
    assert listing.exit_code == 0 and "sensing-iot-normalizer-v1" in listing.output


def test_a_cancelled_job_ends_cancelled_and_its_run_aborted_never_running(
    live: tuple[str, dict[str, str]],
) -> None:
    url, keys = live
    with ApiClient(url, keys["operator"]) as api:
        job = api.submit(VIT)
        for event in api.events(job["job_id"]):
            if event.event == "progress" and event.data.get("kind") == "round_started":
                api.cancel(job["job_id"])
                break
        deadline = time.monotonic() + 60
        while api.job(job["job_id"])["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
        final = api.job(job["job_id"])
        assert final["status"] == "cancelled", final
        assert final["run_id"] is not None
        run = api.run(final["run_id"])
        assert run["status"] == "aborted" and "cancelled" in (run["error"] or "")
        second = api.submit(IOT)
        assert api.cancel(second["job_id"])["job_id"] == second["job_id"]
    with ApiClient(url, keys["viewer"]) as viewer:
        statuses = {j["job_id"]: j["status"] for j in viewer.jobs()}
        assert statuses[job["job_id"]] == "cancelled"
