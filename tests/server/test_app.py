"""The ServerApps: options from the run config, and both apps driving a job on a Grid."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict
from flwr.app.user_config import UserConfig

from clients.app import make_client_app
from clients.demo_data import write_demo_dataset
from manifests.catalog import NodeType
from manifests.demo import write_keys
from manifests.jobspec import JobSpec
from manifests.keys import SigningKey, TrustedKeys
from manifests.verify import verify_bundle
from server.app import (
    JOB_PREFIX,
    ServerConfigError,
    app,
    make_server_app,
    options_from_run_config,
)
from server.ledger import Ledger, RunStatus
from server.options import EventKind, JobOutcome, JobStatus, ProgressEvent, RunOptions
from tests.support.federation import Federation, provision
from tests.support.local_grid import LocalGrid

SENSING_JOB = JobSpec.from_mapping(
    {
        "component": "sensing",
        "base_model": "iot",
        "task": "normalizer",
        "privacy_level": "secure-agg",
        "federation": {"num_rounds": 1, "clients_per_round": 3},
    }
)


def sensing_grid(tmp_path: Path) -> LocalGrid:
    federation = provision(tmp_path, 3, NodeType.SENSING)
    dirs = []
    for index in range(3):
        folder = tmp_path / "nodes" / f"node-{index}"
        write_demo_dataset("iot", folder / "iot", 60, seed=index)
        dirs.append(folder)
    return LocalGrid.with_app(make_client_app(federation.node_configs(dirs)), 3)


def federation_of(tmp_path: Path) -> Federation:
    """The federation :func:`sensing_grid` provisioned under ``tmp_path``."""
    return Federation(
        tmp_path / "keys" / "signing_key.pem",
        tmp_path / "keys" / "trusted_keys.json",
        tmp_path / "federation" / "roster.dsse.json",
        tuple(tmp_path / "federation" / "nodes" / f"node-{i}" for i in range(3)),
        NodeType.SENSING,
    )


def key_files(tmp_path: Path) -> tuple[Path, Path]:
    now = datetime.now(UTC)
    signing, _, trusted = write_keys(
        tmp_path / "keys",
        SigningKey.generate(),
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=1),
    )
    return signing, trusted


def context(run_config: UserConfig) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_options_come_from_the_fedbrain_keys(tmp_path: Path) -> None:
    signing, trusted = key_files(tmp_path)
    options = options_from_run_config(
        {
            "fedbrain.run-dir": str(tmp_path / "run"),
            "fedbrain.signing-key": str(signing),
            "fedbrain.trusted-keys": str(trusted),
            "fedbrain.database-url": "sqlite://",
            "fedbrain.seed": 11,
            "fedbrain.deterministic-noise": True,
            "fedbrain.resume": True,
            "fedbrain.run-id": "run-a",
            "fedbrain.round-timeout": 30,
            "fedbrain.node-wait-timeout": 2.5,
            "fedbrain.min-nodes": 4,
            "fedbrain.stop-on-aborted-round": True,
            "job.component": "ignored here",
        }
    )
    assert options == RunOptions(
        run_dir=tmp_path / "run",
        signing_key=signing,
        trusted_keys=trusted,
        database_url="sqlite://",
        seed=11,
        deterministic_noise=True,
        resume=True,
        run_id="run-a",
        round_timeout=30.0,
        node_wait_timeout=2.5,
        min_nodes=4,
        stop_on_aborted_round=True,
    )
    defaults = options_from_run_config({"fedbrain.run-dir": "runs/x", "fedbrain.signing-key": ""})
    assert defaults == RunOptions(run_dir=Path("runs/x"))


def test_invalid_options_are_all_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ServerConfigError) as caught:
        options_from_run_config(
            {
                "fedbrain.seed": 1.5,
                "fedbrain.resume": "yes",
                "fedbrain.round-timeout": -1,
                "fedbrain.signing-key": str(tmp_path / "missing.pem"),
                "fedbrain.rounds": 3,
            }
        )
    problems = caught.value.problems
    assert problems == (
        "fedbrain.rounds: is not a fedbrain setting (known: run-dir, signing-key, trusted-keys, "
        "database-url, seed, deterministic-noise, resume, run-id, round-timeout, "
        "node-wait-timeout, min-nodes, stop-on-aborted-round, roster, signed-job, job-envelope).",
        "fedbrain.run-dir: is required (where the ledger and bundle go).",
        f"fedbrain.signing-key: no such file {str(tmp_path / 'missing.pem')!r}.",
        "fedbrain.seed: must be a whole number. Found 1.5.",
        "fedbrain.round-timeout: must be >= 0.001. Found -1.",
        "fedbrain.resume: must be true or false. Found 'yes'.",
    )


def test_deployment_app_runs_the_job_of_its_run_config(tmp_path: Path) -> None:
    grid = sensing_grid(tmp_path)
    federation = federation_of(tmp_path)
    trusted = federation.trusted_keys
    envelope = tmp_path / "job.dsse.json"
    envelope.write_bytes(federation.sign(SENSING_JOB))  # the operator signs on their machine
    run_dir = tmp_path / "run"
    run_config: UserConfig = {
        **SENSING_JOB.to_run_config(prefix=JOB_PREFIX),
        "fedbrain.run-dir": str(run_dir),
        "fedbrain.signing-key": str(federation.signing_key),
        "fedbrain.trusted-keys": str(trusted),
        "fedbrain.roster": str(federation.roster),
        "fedbrain.signed-job": str(envelope),
        "fedbrain.seed": 3,
    }
    app(grid, context(run_config))

    with Ledger.for_run_dir(run_dir, create=False) as ledger:
        (run,) = ledger.list_runs()
    assert run.status is RunStatus.COMPLETED
    assert run.rounds_recorded == 1 and run.bundle_path is not None
    verified = verify_bundle(Path(run.bundle_path), TrustedKeys.load(trusted))
    assert verified.artifact_name == run.artifact_name == "sensing-iot-normalizer-v1"
    assert verified.manifest.privacy_level == "secure-agg"


def test_deployment_app_refuses_an_invalid_run_config_before_running(tmp_path: Path) -> None:
    run_config: UserConfig = {
        **SENSING_JOB.to_run_config(prefix=JOB_PREFIX),
        "job.federation.num_rounds": 0,
        "fedbrain.seed": "x",
    }
    with pytest.raises(ServerConfigError) as caught:
        app(sensing_grid(tmp_path), context(run_config))
    assert caught.value.problems == (
        "job.federation.num_rounds: must be >= 1. Found 0.",
        "fedbrain.run-dir: is required (where the ledger and bundle go).",
        "fedbrain.seed: must be a whole number. Found 'x'.",
    )
    assert not (tmp_path / "run").exists()


def test_simulation_app_reports_outcome_and_progress(tmp_path: Path) -> None:
    outcomes: list[JobOutcome] = []
    events: list[ProgressEvent] = []
    grid = sensing_grid(tmp_path)
    federation = federation_of(tmp_path)
    server_app = make_server_app(
        SENSING_JOB,
        RunOptions(  # the operator signed the job; the server holds no artifact signing key
            run_dir=tmp_path / "run",
            node_wait_timeout=1.0,
            trusted_keys=federation.trusted_keys,
            roster=federation.roster,
            job_envelope=federation.sign(SENSING_JOB),
        ),
        progress=events.append,
        outcomes=outcomes,
    )
    server_app(grid, context({}))

    (outcome,) = outcomes
    assert outcome.status is JobStatus.PASSED
    assert outcome.bundle is None  # no signing key: unsigned, and said so
    assert outcome.manifest == tmp_path / "run" / "artifact_manifest.json"
    assert any(r.startswith("not signed: no signing key") for r in outcome.reasons)
    kinds = [e.kind for e in events]
    assert kinds[0] is EventKind.JOB_STARTED and kinds[-1] is EventKind.JOB_FINISHED
    assert [e.stage for e in events if e.kind is EventKind.STAGE] == [
        f"{work}:{stage}"
        for work in ("ranges", "moments")
        for stage in ("advertise_keys", "share_keys", "masked_input", "consistency_check", "unmask")
    ]
