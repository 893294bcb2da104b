"""fedbrain on Flower's deployment engine: ``flwr run`` against a real local SuperLink with
three SuperNodes on loopback (insecure), in the already-installed environment.

The outcome is read from what the run wrote (the ledger and the signed bundle for fedbrain, a
result file for the minimal app), never from ``flwr run``'s exit code: Flower 1.42's
``flwr run`` returns 0 even when the run fails. See ``conftest.py`` for the harness and
``docs/deployment.md`` for the same steps by hand.
"""

from __future__ import annotations

import io
import json
import tomllib
import zipfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.integration.conftest import CONNECTION, FlowerDeployment, write_run_config_toml

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"
JOB_PREFIX = "job"
NODE_TYPES = ("sensing", "sensing", "sensing")
SEED = 7

# ------------------------------------------------------------------------------------------
# The harness itself, on a throwaway Message-API app (independent of fedbrain's apps)

MINI_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fbit-miniapp"
version = "0.1.0"
description = "Throwaway app for the deployment-engine harness test"
license = "Apache-2.0"
dependencies = ["flwr>=1.42,<1.43"]

[tool.flwr.app]
publisher = "fedbrain-it"

[tool.flwr.app.components]
serverapp = "fbit_miniapp.server:app"
clientapp = "fbit_miniapp.client:app"

[tool.flwr.app.config]
out-file = "result.json"
expected-nodes = 3
greeting = "hello"
"""

MINI_SERVER = '''\
"""Sends one query to every node and writes the answers to ``out-file``."""

import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    expected = int(context.run_config["expected-nodes"])
    deadline = time.monotonic() + 60
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        node_ids = list(grid.get_node_ids())
    greeting = str(context.run_config["greeting"])
    messages = [
        Message(RecordDict({"q": ConfigRecord({"greeting": greeting})}), nid, "query")
        for nid in node_ids
    ]
    replies = list(grid.send_and_receive(messages, timeout=60))
    answers = sorted(
        str(r.content["a"]["answer"]) for r in replies if r.has_content()
    )
    Path(str(context.run_config["out-file"])).write_text(
        json.dumps({"nodes": len(node_ids), "answers": answers})
    )
'''

MINI_CLIENT = '''\
"""Answers a query with the greeting and this node's ``node-type``."""

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    greeting = str(msg.content["q"]["greeting"])
    answer = f"{greeting} from {context.node_config['node-type']}"
    return Message(RecordDict({"a": ConfigRecord({"answer": answer})}), reply_to=msg)
'''


def _write_mini_app(root: Path) -> Path:
    app_dir = root / "miniapp"
    package = app_dir / "fbit_miniapp"
    package.mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(MINI_PYPROJECT)
    (package / "__init__.py").write_text("")
    (package / "server.py").write_text(MINI_SERVER)
    (package / "client.py").write_text(MINI_CLIENT)
    return app_dir


@pytest.mark.slow
def test_minimal_message_app_runs_on_local_superlink_with_three_supernodes(
    flower_deployment: FlowerDeployment, tmp_path: Path
) -> None:
    app_dir = _write_mini_app(tmp_path)
    flower_deployment.start(
        [{"node-type": f"node{i}", "data-dir": str(tmp_path / f"data-{i}")} for i in range(3)],
        timeout=90,
    )
    out_file = tmp_path / "result.json"
    overrides = write_run_config_toml(
        tmp_path / "overrides.toml", {"out-file": str(out_file), "greeting": "hi"}
    )

    run_id = flower_deployment.run(app_dir, overrides)
    run = flower_deployment.wait_for_run(run_id, timeout=120, outcome_written=out_file.is_file)

    assert run["status"] == "finished:completed", f"{run}\n{flower_deployment.diagnostics(run_id)}"
    assert out_file.is_file(), flower_deployment.diagnostics(run_id)
    result = json.loads(out_file.read_text())
    assert result == {
        "nodes": 3,
        "answers": ["hi from node0", "hi from node1", "hi from node2"],
    }


@pytest.mark.slow
def test_failed_serverapp_is_reported_by_flwr_ls_not_by_flwr_run(
    flower_deployment: FlowerDeployment, tmp_path: Path
) -> None:
    """Why the fedbrain test checks files: ``flwr run`` succeeds, the run fails."""
    app_dir = _write_mini_app(tmp_path)
    flower_deployment.start([{"node-type": "node0"}], timeout=90)
    overrides = write_run_config_toml(
        tmp_path / "overrides.toml",
        {"out-file": str(tmp_path / "no-such-dir" / "result.json"), "expected-nodes": 1},
    )

    run_id = flower_deployment.run(app_dir, overrides)  # "success": true
    run = flower_deployment.wait_for_run(run_id, timeout=120)

    assert run["status"] == "finished:failed"
    assert "No such file or directory" in str(run.get("status-details"))


@pytest.mark.slow
def test_unknown_run_config_key_is_refused(
    flower_deployment: FlowerDeployment, tmp_path: Path
) -> None:
    """Override keys must exist in ``[tool.flwr.app.config]``; ``flwr run`` still exits 0."""
    app_dir = _write_mini_app(tmp_path)
    flower_deployment.start([{"node-type": "node0"}], timeout=90)
    overrides = write_run_config_toml(tmp_path / "overrides.toml", {"no-such-key": 1})

    result = flower_deployment.flwr(
        ["run", str(app_dir), CONNECTION, "--run-config", str(overrides), "--format", "json"]
    )

    assert result.returncode == 0
    doc = result.json()
    assert doc["success"] is False
    assert "Invalid run configuration" in doc["error-message"]


# ------------------------------------------------------------------------------------------
# fedbrain's own apps (server.app:app, clients.app:app)


def _pyproject() -> dict[str, object]:
    with PYPROJECT.open("rb") as handle:
        return tomllib.load(handle)


def _flwr_table() -> Mapping[str, object]:
    tool = _pyproject()["tool"]
    assert isinstance(tool, dict)
    flwr = tool["flwr"]
    assert isinstance(flwr, dict)
    return flwr


def _default_run_config() -> dict[str, bool | int | float | str]:
    from flwr.common.config import flatten_dict

    app = _flwr_table()["app"]
    assert isinstance(app, dict)
    flat = flatten_dict(app.get("config", {}))
    return dict(flat)


def test_pyproject_declares_the_fedbrain_flower_app() -> None:
    flwr = _flwr_table()
    app = flwr["app"]
    assert isinstance(app, dict)
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "clients.app:app"}
    # `flwr run` migrates this legacy table into ~/.flwr/config.toml and comments it out of
    # the pyproject (it rewrites the file): SuperLink connections live in $FLWR_HOME only.
    assert "federations" not in flwr


def test_default_run_config_holds_a_valid_job_and_every_run_option() -> None:
    """Flower refuses overrides of keys missing from [tool.flwr.app.config]: the defaults must
    hold every job field the default job writes and every ``fedbrain.*`` option."""
    from manifests.jobspec import JobSpec
    from server.app import job_from_run_config

    config = _default_run_config()
    job = job_from_run_config(config)
    declared = {k for k in config if k.startswith(f"{JOB_PREFIX}.")}
    unset = {k for k in declared if config[k] == ""}
    written = set(job.to_run_config(prefix=JOB_PREFIX))
    assert written <= declared and declared - written <= unset
    # every unset key names a job field that a run config may set
    with_all = dict(JobSpec.model_fields)
    for key in unset:
        section, _, name = key.removeprefix(f"{JOB_PREFIX}.").partition(".")
        model = with_all[section].annotation if name else None
        assert name in getattr(model, "model_fields", {}) if name else section in with_all
    if (REPO / "server" / "app.py").is_file():
        from server.app import JOB_PREFIX as SERVER_JOB_PREFIX
        from server.app import OPTION_KEYS, options_from_run_config

        assert SERVER_JOB_PREFIX == JOB_PREFIX
        assert {f"fedbrain.{k}" for k in OPTION_KEYS} == {
            k for k in config if k.startswith("fedbrain.")
        }
        options = options_from_run_config(config)
        assert options.signing_key is None and options.trusted_keys is None


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pathspec's, inside flwr
def test_fab_built_from_the_repo_ships_the_packages_and_not_the_environment() -> None:
    """What `flwr run <repo>` uploads: the app packages only (fab-include), never .venv."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import FAB_MAX_SIZE

    fab = build_fab_from_disk(REPO)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        names = archive.namelist()
        shipped = tomllib.loads(archive.read("pyproject.toml").decode())
    assert len(fab) < FAB_MAX_SIZE
    expected = [
        "server/ledger.py",
        "server/app.py",
        "clients/app.py",
        "clients/demo_data.py",
        "aggregation/__init__.py",
        "manifests/jobspec.py",
        "manifests/schema/artifact_manifest.schema.json",
    ]
    for name in expected:
        if (REPO / name).is_file():
            assert name in names
    packages = {"server", "clients", "aggregation", "manifests"}
    assert {n.split("/")[0] for n in names} == packages | {"pyproject.toml", ".info"}
    assert not [n for n in names if "__pycache__" in n]
    assert shipped["tool"]["flwr"]["app"]["components"]["serverapp"] == "server.app:app"
    assert "federations" not in shipped["tool"]["flwr"]


def _fedbrain_apps_missing() -> list[str]:
    return [p for p in ("server/app.py", "clients/app.py") if not (REPO / p).is_file()]


def _ledger_finished(run_dir: Path) -> bool:
    """Whether the run dir's ledger has a run that is no longer running (cheap, read-only)."""
    from sqlalchemy.exc import SQLAlchemyError

    from server.ledger import Ledger, LedgerError, RunStatus

    if not (run_dir / "ledger.sqlite").is_file():
        return False
    try:
        with Ledger.for_run_dir(run_dir, create=False) as ledger:
            return any(run.status is not RunStatus.RUNNING for run in ledger.list_runs())
    except (LedgerError, SQLAlchemyError, OSError):
        return False


@pytest.mark.slow
def test_fedbrain_job_runs_on_local_superlink_with_three_supernodes(
    flower_deployment: FlowerDeployment, tmp_path: Path
) -> None:
    missing = _fedbrain_apps_missing()
    if missing:
        pytest.skip(f"fedbrain's Flower apps are not written yet: {', '.join(missing)} missing")

    from clients.demo_data import write_demo_dataset
    from manifests.catalog import NodeType
    from manifests.keys import TrustedKeys
    from manifests.verify import verify_bundle
    from server.app import job_from_run_config
    from server.ledger import Ledger, RoundStatus, RunStatus
    from tests.support.federation import provision

    # The operator's keys, the signed roster and three provisioned nodes (each with its kit
    # and its data), all under tmp_path; the nodes keep the safe default policy.
    federation = provision(tmp_path, len(NODE_TYPES), NodeType.SENSING, policy=None)
    signing_key, trusted_keys = federation.signing_key, federation.trusted_keys
    node_configs: list[dict[str, str | int | float | bool]] = []
    for index, node_type in enumerate(NODE_TYPES):
        node_dir = tmp_path / "nodes" / f"node-{index}"
        write_demo_dataset("iot", node_dir / "iot", 300, SEED + index)
        node_configs.append(
            {"node-type": node_type, "data-dir": str(node_dir), "kit": str(federation.kits[index])}
        )
    run_dir = tmp_path / "run"

    defaults = _default_run_config()
    job = job_from_run_config(defaults)
    overrides = write_run_config_toml(
        tmp_path / "overrides.toml",
        {
            "fedbrain.run-dir": str(run_dir),
            "fedbrain.signing-key": str(signing_key),
            "fedbrain.trusted-keys": str(trusted_keys),
            "fedbrain.roster": str(federation.roster),
            "fedbrain.seed": SEED,
        },
    )

    flower_deployment.start(node_configs, timeout=120)
    run_id = flower_deployment.run(REPO, overrides)
    # A generous ceiling: each message starts a fresh `flwr-clientapp` process per node, which
    # imports torch and Opacus (about 5 CPU-seconds); the five messages of a SecAgg+ round took
    # ~100 s on a 2-core machine at load 6-7, several minutes at higher load.
    run = flower_deployment.wait_for_run(
        run_id, timeout=420, outcome_written=lambda: _ledger_finished(run_dir)
    )
    context = f"flwr ls: {run}\n{flower_deployment.diagnostics(run_id)}"
    # The deployment ServerApp fails a run that does not pass, so Flower's status follows the
    # job's outcome; the ledger says why.
    assert run["status"] == "finished:completed", context

    assert (run_dir / "ledger.sqlite").is_file(), context
    with Ledger.for_run_dir(run_dir, create=False) as ledger:
        runs = ledger.list_runs()
        assert len(runs) == 1, context
        summary = runs[0]
        assert summary.status is RunStatus.COMPLETED, f"{summary}\n{context}"
        assert summary.finished_at is not None
        assert summary.artifact_name == "sensing-iot-normalizer-v1"
        assert summary.privacy_level == job.privacy_level.value
        assert summary.last_round == job.federation.num_rounds, f"{summary}\n{context}"
        assert summary.rounds_recorded == job.federation.num_rounds
        rounds = ledger.rounds(summary.run_id)
        assert [r.round for r in rounds] == list(range(1, job.federation.num_rounds + 1))
        for record in rounds:
            assert record.status is RoundStatus.COMPLETED, f"{record}\n{context}"
            assert record.responded == len(NODE_TYPES), f"{record}\n{context}"
        assert summary.bundle_path is not None, f"{summary}\n{context}"
        bundle = Path(summary.bundle_path)
        if not bundle.is_absolute():
            bundle = run_dir / bundle
    assert bundle.is_file(), context
    assert bundle.resolve().is_relative_to(run_dir.resolve())
    verified = verify_bundle(bundle, TrustedKeys.load(trusted_keys), now=datetime.now(UTC))
    assert verified.artifact_name == summary.artifact_name
