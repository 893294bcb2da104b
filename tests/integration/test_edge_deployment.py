"""An edge deployment as an operator runs it: kits from ``fedbrain provision``, the SuperLink
from ``fedbrain server start`` (TLS, node authentication, a persistent database), SuperNodes
from ``fedbrain node start``, jobs from ``fedbrain run`` -- real processes on loopback.

One deployment serves the module's tests, in order (each SuperNode message starts a
``flwr-clientapp`` process that imports torch, so a deployment and its rounds are the cost to
save): four nodes and one revoked node are provisioned; the revoked node and an unprovisioned
one are refused; a run that cannot start fails with a non-zero exit; a ``dp+secure-agg`` job
completes to a verified bundle while one of the four SuperNodes is killed during the masked-
input stage; then the SuperLink is killed mid-run, restarted, and the run resumed.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server.ledger import Ledger
from tests.integration.conftest import free_ports
from tests.integration.edge import EdgeDeployment

pytestmark = pytest.mark.slow

NODES = ("node-0", "node-1", "node-2", "node-3")
REVOKED = "node-4"
POLICY = """\
# The nodes of this test accept central DP too (the SuperLink-restart job uses it: two plain
# collections a round instead of ten SecAgg+ stages); the rest are the safe defaults.
[default]
min_privacy_level = "dp"
"""
SECURE_JOB = """\
component = "sensing"
base_model = "iot"
task = "normalizer"
privacy_level = "dp+secure-agg"
checkpoint_interval = 1

[federation]
num_rounds = 1
reliability_threshold = 0.1

[dp]
unit = "example"
target_epsilon = 4.0
delta = 1e-5
epsilon_budget = 10.0
planned_dropout = 0.3
"""
RESTART_JOB = """\
component = "sensing"
base_model = "iot"
task = "normalizer"
privacy_level = "dp"
checkpoint_interval = 1

[federation]
num_rounds = 2
reliability_threshold = 0.1

[dp]
unit = "example"
target_epsilon = 4.0
delta = 1e-5
epsilon_budget = 10.0
"""


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeDeployment]:
    from clients.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("edge")
    deployment = EdgeDeployment(root)
    names = (*NODES, REVOKED)
    for index, name in enumerate(names):
        write_demo_dataset("iot", root / "data" / name / "iot", 200, seed=11 + index)
    (root / "secure-job.toml").write_text(SECURE_JOB)
    (root / "restart-job.toml").write_text(RESTART_JOB)
    try:
        deployment.provision([(n, str(root / "data" / n)) for n in names], policy=POLICY)
        revoked = deployment.fedbrain("provision", "revoke-node", str(deployment.kits), REVOKED)
        assert revoked.returncode == 0, revoked.stderr
        deployment.start_server()
        for name in NODES:
            deployment.start_node(name)
        deployment.wait_online(NODES)
        yield deployment
    finally:
        deployment.stop()
        assert not deployment.serverapps()


def _ledger(edge: EdgeDeployment) -> Ledger:
    return Ledger(f"sqlite:///{edge.server_kit / 'state' / 'ledger.sqlite'}", create=False)


def _ids(output: str) -> tuple[str, int]:
    run = re.search(r"run (run-\S+) is Flower run (\d+)", output)
    assert run is not None, output
    return run.group(1), int(run.group(2))


def _verify(edge: EdgeDeployment, bundle: str | None) -> str:
    from manifests.keys import TrustedKeys
    from manifests.verify import verify_bundle

    assert bundle is not None
    trusted = TrustedKeys.load(edge.operator_kit / "trusted-keys.json")
    return verify_bundle(Path(bundle), trusted, now=datetime.now(UTC)).artifact_name


def test_a_revoked_node_and_an_unprovisioned_node_cannot_connect(edge: EdgeDeployment) -> None:
    from server.pki import new_node_auth_key

    rogue = edge.root / "rogue-kit"
    shutil.copytree(edge.kits / "nodes" / "node-3", rogue)
    (rogue / "flower-auth.key").unlink()
    (rogue / "flower-auth.key").write_bytes(new_node_auth_key().private_openssh)
    (rogue / "flower-auth.key").chmod(0o600)
    text = (rogue / "node.toml").read_text()
    port = free_ports(1)[0]
    (rogue / "node.toml").write_text(re.sub(r"runtime_port = \d+", f"runtime_port = {port}", text))
    refused = [edge.start_node(REVOKED), edge.start_node("rogue", rogue)]
    for process in refused:
        code = edge.finish(process, timeout=240)
        assert code != 0, process.log()
        assert "Failed to activate SuperNode" in process.log(), process.log()
    assert edge.online() == sorted(NODES)
    edge.note("revoked and unprovisioned nodes refused")


def test_fedbrain_run_exits_non_zero_when_the_run_fails(edge: EdgeDeployment) -> None:
    from server.ledger import RunStatus

    run = edge.run(
        edge.root / "secure-job.toml",
        "--option", "min-nodes=9",
        "--option", "node-wait-timeout=2",
        name="failed-run",
    )  # fmt: skip
    code = edge.finish(run, timeout=600)
    output = run.log()
    assert code == 1, output
    assert "finished:failed" in output
    run_id, _ = _ids(output)
    with _ledger(edge) as ledger:
        assert ledger.get_run(run_id).status is RunStatus.FAILED
    edge.note("a failed run exits 1")


def test_dp_secure_agg_job_completes_when_a_supernode_is_killed_during_masked_input(
    edge: EdgeDeployment,
) -> None:
    from server.ledger import ParticipantOutcome, Phase, RoundStatus, RunStatus

    with edge.control() as client:
        node_ids = {n.name: n.node_id for n in client.nodes() if n.status == "online"}
    run = edge.run(edge.root / "secure-job.toml", "--option", "min-nodes=4", name="secure-run")
    victim = next(p for p in edge.processes if p.name == "node-node-3")
    edge.wait_for(lambda: "Receiving: train.secagg_masked" in victim.log() or not run.alive(), 1200)
    assert run.alive(), run.log()
    victim.kill9()
    edge.note("node-3 killed (kill -9) during the masked-input stage")
    code = edge.finish(run, timeout=1500)
    output = run.log()
    assert code == 0, edge.diagnostics()
    assert "round_finished round 1/1" in output  # fedbrain's progress, through flwr log
    run_id, flower_run = _ids(output)
    with _ledger(edge) as ledger:
        summary = ledger.get_run(run_id)
        rounds = ledger.rounds(run_id)
    assert summary.status is RunStatus.COMPLETED, summary
    assert summary.flower_run_id == flower_run
    assert [r.round for r in rounds] == [1] and rounds[0].status is RoundStatus.COMPLETED
    record = rounds[0]
    assert (record.sampled, record.responded) == (4, 3), record
    dropped = {
        p.phase: p.stage
        for p in record.participants
        if p.node_id == node_ids["node-3"] and p.outcome is ParticipantOutcome.DROPPED
    }
    # killed in the first collection's masked-input stage; offline for the second one
    assert dropped.get(Phase.RANGES) == "masked_input", record.participants
    assert dropped.get(Phase.MOMENTS) == "advertise_keys", record.participants
    assert _verify(edge, summary.bundle_path) == "sensing-iot-normalizer-v1"


def test_superlink_killed_mid_run_resumes_without_losing_or_repeating_a_round(
    edge: EdgeDeployment,
) -> None:
    from server.ledger import RoundStatus, RunStatus

    alive = [
        p.name.removeprefix("node-")
        for p in edge.processes
        if p.name.startswith("node-node") and p.alive()
    ]
    job = edge.root / "restart-job.toml"
    run = edge.run(job, name="restart-run")
    edge.wait_for(lambda: "is Flower run" in run.log(), 600)
    run_id, first_flower_run = _ids(run.log())

    def round_one_recorded() -> bool:
        try:
            with _ledger(edge) as ledger:
                return ledger.last_round(run_id) >= 1
        except Exception:  # not there yet
            return False

    edge.wait_for(round_one_recorded, 1200, [run])
    server = next(p for p in edge.processes if p.name == "server")
    server.kill9()
    edge.note("SuperLink killed (kill -9) after round 1")
    assert edge.finish(run, timeout=300) == 1
    assert f"--resume {run_id}" in run.log()

    # The ServerApp stops with its SuperLink (Flower's helpers watch their parent), though its
    # exit handler may wait for a SuperLink to report to: the restarted server marks the run
    # interrupted at its start, or as soon as that process is gone.
    restarted = edge.spawn("server-2", "server", "start", "--kit", str(edge.server_kit))
    edge.wait_for(
        lambda: f"run {run_id} was interrupted" in restarted.log(), 240, [restarted], poll=1.0
    )
    with _ledger(edge) as ledger:
        assert ledger.get_run(run_id).status is RunStatus.INTERRUPTED
    assert not edge.serverapps()
    edge.wait_online(alive, timeout=300)

    resumed = edge.run(job, "--resume", run_id, name="resumed-run")
    assert edge.finish(resumed, timeout=1200) == 0, edge.diagnostics()
    _, second_flower_run = _ids(resumed.log())
    assert second_flower_run != first_flower_run
    with _ledger(edge) as ledger:
        summary = ledger.get_run(run_id)
        rounds = ledger.rounds(run_id)
    assert summary.status is RunStatus.COMPLETED, summary
    assert [r.round for r in rounds] == [1, 2]  # each round exactly once
    assert all(r.status is RoundStatus.COMPLETED for r in rounds)
    assert [i["round"] for i in summary.interruptions] == [2]
    assert summary.flower_run_id == second_flower_run
    assert rounds[1].epsilon is not None and rounds[0].epsilon is not None
    assert rounds[1].epsilon >= rounds[0].epsilon  # accounting continues, never restarts
    assert _verify(edge, summary.bundle_path) == "sensing-iot-normalizer-v1"
