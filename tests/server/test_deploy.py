"""The deployment commands' own logic (no processes): the server kit, the SuperLink and
SuperNode command lines, the ServerApp's kit defaults and signed job, ``fedbrain run``'s
signed runs. The processes themselves: tests/integration/test_edge_deployment.py."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

import clients.daemon
from clients.daemon import (
    NodeDeploymentError,
    load_deployment,
    run_node,
    superexec_command,
    supernode_command,
)
from manifests.jobspec import JobSpec
from manifests.keys import ExpiredKeyError, SigningKey, TrustedKey, TrustedKeys
from manifests.signed_job import sign_job
from server.app import ServerConfigError, _from_context
from server.cli_deploy import _options
from server.federation_file import load_federation_file
from server.server_kit import SERVER_KIT_ENV, ServerKitError, load_server_kit
from server.startup_kits import provision_federation
from server.submit import SubmitError, load_operator_kit, prepare_run, run_config
from server.superlink import superlink_command

FEDERATION = """\
[federation]
name = "lab"
superlink = "127.0.0.1:19100"

[[operators]]
name = "op"

[[nodes]]
name = "n0"
node_type = "sensing"
data = "{data}"
"""
JOB = JobSpec.from_mapping(
    {
        "component": "sensing",
        "base_model": "iot",
        "task": "normalizer",
        "privacy_level": "dp+secure-agg",
        "federation": {"num_rounds": 1},
        "dp": {"unit": "example", "target_epsilon": 4.0, "delta": 1e-5},
    }
)


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("deploy")
    (root / "data").mkdir()
    path = root / "federation.toml"
    path.write_text(FEDERATION.format(data=root / "data"))
    provision_federation(load_federation_file(path), root / "kits")
    return root / "kits"


def test_the_superlink_runs_with_tls_node_auth_and_a_database(kits: Path) -> None:
    kit = load_server_kit(kits / "server")
    command = superlink_command(kit, insecure=False)
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    for flag, value in (
        ("--ssl-certfile", kit.folder / "superlink.crt.pem"),
        ("--ssl-keyfile", kit.folder / "superlink.key.pem"),
        ("--ssl-ca-certfile", kit.folder / "ca.crt.pem"),
        ("--database", kit.folder / "state" / "superlink.db"),
        ("--port", "19100"),
    ):
        assert command[command.index(flag) + 1] == str(value)
    insecure = superlink_command(kit, insecure=True)
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure


def test_a_server_kit_with_a_readable_private_key_is_refused(tmp_path: Path, kits: Path) -> None:
    import shutil

    copy = tmp_path / "server"
    shutil.copytree(kits / "server", copy)
    (copy / "superlink.key.pem").chmod(0o644)
    (copy / "roster.dsse.json").unlink()
    with pytest.raises(ServerKitError) as caught:
        load_server_kit(copy)
    assert "run chmod 600" in str(caught.value) and "roster.dsse.json: missing" in str(caught.value)
    with pytest.raises(ServerKitError, match="not a server kit"):
        load_server_kit(tmp_path)


def test_a_node_starts_its_supernode_with_tls_its_key_and_its_kit(kits: Path) -> None:
    node = load_deployment(kits / "nodes" / "n0")
    command = supernode_command(node, insecure=False)
    assert command[command.index("--superlink") + 1] == "127.0.0.1:19100"
    assert command[command.index("--root-certificates") + 1] == str(node.folder / "ca.crt.pem")
    key = command[command.index("--auth-supernode-private-key") + 1]
    assert key == str(node.folder / "flower-auth.key")
    config = command[command.index("--node-config") + 1]
    assert f'kit="{node.folder}"' in config and 'node-type="sensing"' in config
    assert command[command.index("--host") + 1] == "127.0.0.1"


def test_a_node_runs_its_supernode_in_process_isolation_beside_its_own_superexec(
    kits: Path,
) -> None:
    node = load_deployment(kits / "nodes" / "n0")
    assert supernode_command(node, insecure=False)[3:5] == ["--isolation", "process"]
    command = superexec_command(node, supernode_pid=4321)
    assert command[1:3] == ["-m", "clients.superexec"]
    assert command[command.index("--runtime-api-address") + 1] == f"127.0.0.1:{node.runtime_port}"
    assert command[command.index("--parent-pid") + 1] == "4321"


def test_a_node_whose_superexec_dies_stops_its_supernode_and_exits_one(
    kits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without its SuperExec a SuperNode would take messages it can never answer: the daemon
    stops it and exits non-zero (systemd restarts the node). Real flower-supernode process;
    no SuperLink listens at the kit's address, so it would otherwise retry for ever."""
    node = load_deployment(kits / "nodes" / "n0")
    monkeypatch.setattr(
        clients.daemon,
        "superexec_command",
        lambda *_a, **_k: [sys.executable, "-c", "raise SystemExit(3)"],
    )
    said: list[str] = []
    assert run_node(node, insecure=False, echo=said.append) == 1
    assert "its SuperExec exited (status 3); stopping the SuperNode" in said[-1]


def test_a_node_kit_that_cannot_defend_itself_is_refused(tmp_path: Path, kits: Path) -> None:
    import shutil

    copy = tmp_path / "n0"
    shutil.copytree(kits / "nodes" / "n0", copy)
    (copy / "flower-auth.key").chmod(0o640)
    (copy / "operators.json").write_text("[]\n")  # trusts no operator: the roster fails
    text = (copy / "node.toml").read_text().replace(str(kits.parent / "data"), "/no/such/data")
    (copy / "node.toml").write_text(text)
    with pytest.raises(NodeDeploymentError) as caught:
        load_deployment(copy)
    message = str(caught.value)
    assert "run chmod 600" in message
    assert "roster" in message
    assert "/no/such/data does not exist" in message


# ------------------------------------------------------------------ the ServerApp in a kit


def _context(run_config: dict[str, str | bool | int | float]) -> Context:
    return Context(run_id=77, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def _operator_envelope(kits: Path) -> bytes:
    key = SigningKey.from_pem((kits / "operators" / "op" / "signing-key.pem").read_bytes())
    return sign_job(JOB, key, federation="lab", issued_at=datetime.now(UTC))


def test_the_serverapp_takes_the_signed_job_and_the_kits_files(
    kits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SERVER_KIT_ENV, str(kits / "server"))
    envelope = _operator_envelope(kits)
    job, options = _from_context(
        _context({"fedbrain.job-envelope": envelope.decode(), "fedbrain.run-dir": "runs/r1"})
    )
    assert job.to_run_config() == JOB.to_run_config()
    assert options.job_envelope == envelope
    assert options.run_dir == kits / "server" / "runs" / "r1"
    assert options.roster == kits / "server" / "roster.dsse.json"
    assert options.trusted_keys == kits / "server" / "trusted-keys.json"
    assert options.signing_key == kits / "server" / "artifact-signing-key.pem"
    assert options.database_url == f"sqlite:///{kits / 'server' / 'state' / 'ledger.sqlite'}"
    assert options.flower_run_id == 77


def test_the_serverapp_refuses_a_job_no_trusted_key_signed(
    kits: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SERVER_KIT_ENV, str(kits / "server"))
    stranger = SigningKey.generate()
    envelope = sign_job(JOB, stranger, federation="lab", issued_at=datetime.now(UTC))
    with pytest.raises(ServerConfigError, match="job-envelope: refused"):
        _from_context(
            _context({"fedbrain.job-envelope": envelope.decode(), "fedbrain.run-dir": "r"})
        )


def test_the_serverapp_refuses_an_artifact_key_past_its_window_before_training(
    tmp_path: Path, kits: Path
) -> None:
    now = datetime.now(UTC)
    key = SigningKey.generate()
    (tmp_path / "key.pem").write_bytes(key.private_pem())
    os.chmod(tmp_path / "key.pem", 0o600)
    operators = TrustedKeys.load(kits / "server" / "trusted-keys.json")
    old = TrustedKey(key.public_key(), now - timedelta(days=30), now - timedelta(days=1))
    (tmp_path / "trusted.json").write_bytes(TrustedKeys((*operators.keys, old)).to_json())
    run_config: dict[str, str | bool | int | float] = {
        "fedbrain.job-envelope": _operator_envelope(kits).decode(),
        "fedbrain.run-dir": str(tmp_path / "run"),
        "fedbrain.signing-key": str(tmp_path / "key.pem"),
        "fedbrain.trusted-keys": str(tmp_path / "trusted.json"),
        "fedbrain.roster": str(kits / "server" / "roster.dsse.json"),
    }
    with pytest.raises(ServerConfigError, match=r"cannot sign the artifact: .* window ended"):
        _from_context(_context(run_config))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ fedbrain run


def test_a_new_run_is_signed_and_kept_and_a_resume_sends_the_same_signed_job(
    tmp_path: Path, kits: Path
) -> None:
    import shutil

    shutil.copytree(kits / "operators" / "op", tmp_path / "op")
    kit = load_operator_kit(tmp_path / "op")
    first = prepare_run(kit, JOB, resume=None)
    assert (tmp_path / "op" / "runs" / first.run_id / "job.dsse.json").read_bytes() == (
        first.envelope
    )
    again = prepare_run(kit, JOB, resume=first.run_id)
    assert again.envelope == first.envelope and again.resume
    table = run_config(again, {"node-wait-timeout": 5.0})["fedbrain"]
    assert isinstance(table, dict)
    assert table["run-id"] == first.run_id and table["resume"] is True
    assert table["run-dir"] == f"runs/{first.run_id}" and table["node-wait-timeout"] == 5.0
    other = JOB.model_copy(update={"batch_size": 7})
    with pytest.raises(SubmitError, match="not the job run"):
        prepare_run(kit, other, resume=first.run_id)
    with pytest.raises(SubmitError, match="no signed job for run 'nope'"):
        prepare_run(kit, JOB, resume="nope")


def test_an_operator_key_past_its_window_signs_no_job(tmp_path: Path, kits: Path) -> None:
    import shutil

    shutil.copytree(kits / "operators" / "op", tmp_path / "op")
    kit = load_operator_kit(tmp_path / "op")
    later = datetime.now(UTC) + timedelta(days=400)  # the federation's keys last 365 days
    with pytest.raises(ExpiredKeyError, match="can no longer sign"):
        prepare_run(kit, JOB, resume=None, now=later)
    assert not (tmp_path / "op" / "runs").exists()


def test_run_options_are_typed_from_their_text() -> None:
    assert _options(["node-wait-timeout=5", "fedbrain.resume=true", "run-dir=runs/x"]) == {
        "node-wait-timeout": 5,
        "resume": True,
        "run-dir": "runs/x",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _options(["oops"])


def test_the_commands_refuse_a_folder_that_is_not_their_kit_with_exit_two(
    tmp_path: Path,
) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    runner = CliRunner()
    (tmp_path / "job.toml").write_text('component = "sensing"\nbase_model = "iot"\n')
    for args, expected in (
        (["server", "start", "--kit", str(tmp_path)], "not a server kit"),
        (["server", "sync-nodes", "--kit", str(tmp_path)], "not a server kit"),
        (["node", "start", "--kit", str(tmp_path)], "not a node kit"),
        (["run", str(tmp_path / "job.toml"), "--kit", str(tmp_path)], "not an operator kit"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in result.stderr, result.stderr
