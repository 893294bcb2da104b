"""A node's persistent privacy budget and participation log: restarts, other processes, and
two processes spending at once."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Final

import pytest

from aggregation.secagg import SecAggRefusedError
from clients.budget import (
    BUDGET_FILE,
    BudgetExceededError,
    BudgetStore,
    BudgetStoreError,
    ParticipationStore,
    StoreLockTimeoutError,
    dataset_key,
)
from clients.credentials import STATE_DIR
from clients.demo_data import write_demo_dataset
from clients.policy import NodePolicy, parse_policy
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec
from manifests.signed_job import sign_job, verify_signed_job
from tests.clients.test_policy import sensing
from tests.manifests.test_roster import NOW, OPERATOR, trusted
from tests.support.federation import provision

ROOT: Final = Path(__file__).resolve().parents[2]
DATA: Final = "iot:/data/node-1"

RESERVE_SCRIPT: Final = """
import sys
from pathlib import Path
from clients.budget import BudgetStore
store = BudgetStore(Path(sys.argv[1]))
store.reserve(sys.argv[2], sys.argv[3], epsilon=float(sys.argv[4]), delta=1e-5,
              lifetime=float(sys.argv[5]))
"""

RACE_SCRIPT: Final = """
import sys, time
from pathlib import Path
from clients.budget import BudgetExceededError, BudgetStore
folder, name = Path(sys.argv[1]), sys.argv[2]
store = BudgetStore(folder)
(folder / f"ready-{name}").touch()
while not (folder / "go").exists():
    time.sleep(0.001)
accepted = 0
for i in range(15):
    try:
        store.reserve("iot:/data", f"{name}-{i}", epsilon=1.0, delta=1e-6, lifetime=10.0)
        accepted += 1
    except BudgetExceededError:
        pass
print(accepted)
"""


NODE_SCRIPT: Final = """
import sys
from pathlib import Path
from clients import protocol
from clients.app import make_client_app
from clients.config import NodeConfig
from clients.protocol import RoundConfig, Work
from manifests.catalog import NodeType
from tests.support.client_apps import content, context, message
kit, data, job = map(Path, sys.argv[1:4])
app = make_client_app({0: NodeConfig(NodeType.SENSING, data, kit=kit)})
rnd = RoundConfig(server_round=1, work=Work.RANGES)
reply = app(message(protocol.FIT, content(job.read_bytes(), rnd), 10), context(10, 0))
print(reply.error.reason if reply.has_error() else "released")
"""


def run_python(script: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=timeout,
    )


def test_a_reservation_is_recorded_and_survives_a_restart(tmp_path: Path) -> None:
    first = BudgetStore(tmp_path).reserve(DATA, "job-a", epsilon=4.0, delta=1e-5, lifetime=10.0)
    assert first.charged and (first.spent_epsilon, first.spent_delta) == (4.0, 1e-5)
    restarted = BudgetStore(tmp_path)
    assert restarted.spent(DATA) == (4.0, 1e-5)
    assert restarted.jobs(DATA) == {"job-a": (4.0, 1e-5)}
    assert restarted.spent("iot:/elsewhere") == (0.0, 0.0)


def test_lifetime_budget_survives_a_restart_and_refuses_a_job_that_would_exceed_it(
    tmp_path: Path,
) -> None:
    """The issue's acceptance: one node process spends, the node restarts, and a job that would
    take the dataset past its lifetime budget is refused; the same job again is not charged."""
    node_policy = parse_policy({"default": {"max_epsilon": 5.0, "lifetime_epsilon": 10.0}})
    job = sensing(target_epsilon=4.0)
    decision = node_policy.check(job)
    assert decision.accepted and decision.epsilon is not None and decision.epsilon > 3.5
    ids = [
        verify_signed_job(
            sign_job(job, OPERATOR, federation="lab", issued_at=NOW - timedelta(hours=h)),
            trusted(),
            now=NOW,
        ).job_id
        for h in (1, 2, 3)
    ]
    eps, lifetime = str(decision.epsilon), str(decision.lifetime_epsilon)
    for job_id in ids[:2]:  # the first node process trains two jobs, then stops
        run_python(RESERVE_SCRIPT, str(tmp_path), DATA, job_id, eps, lifetime)
    before = (tmp_path / BUDGET_FILE).read_bytes()

    restarted = BudgetStore(tmp_path)
    with pytest.raises(BudgetExceededError) as caught:
        restarted.reserve(
            DATA, ids[2], epsilon=decision.epsilon, delta=1e-5, lifetime=decision.lifetime_epsilon
        )
    message = str(caught.value)
    assert f"job {ids[2]} needs epsilon {decision.epsilon:.4g}" in message
    assert f"has spent {2 * decision.epsilon:.4g} of its lifetime budget 10" in message
    assert (tmp_path / BUDGET_FILE).read_bytes() == before  # nothing recorded

    again = restarted.reserve(
        DATA, ids[0], epsilon=decision.epsilon, delta=1e-5, lifetime=decision.lifetime_epsilon
    )
    assert not again.charged and again.spent_epsilon == pytest.approx(2 * decision.epsilon)
    assert (tmp_path / BUDGET_FILE).read_bytes() == before


def test_a_resumed_job_is_not_charged_twice_but_pays_any_increase(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path)
    store.reserve(DATA, "job-a", epsilon=3.0, delta=1e-6, lifetime=10.0)
    assert not store.reserve(DATA, "job-a", epsilon=3.0, delta=1e-6, lifetime=10.0).charged
    bigger = store.reserve(DATA, "job-a", epsilon=4.0, delta=1e-6, lifetime=10.0)
    assert bigger.charged and bigger.spent_epsilon == 4.0
    with pytest.raises(BudgetExceededError):
        store.reserve(DATA, "job-a", epsilon=11.0, delta=1e-6, lifetime=10.0)
    assert store.spent(DATA) == (4.0, 1e-6)


def test_the_budget_is_exact_at_the_lifetime_and_deltas_add(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path)
    for index in range(10):
        store.reserve(DATA, f"job-{index}", epsilon=1.0, delta=1e-6, lifetime=10.0)
    spent_epsilon, spent_delta = store.spent(DATA)
    assert spent_epsilon == 10.0 and spent_delta == pytest.approx(1e-5)
    with pytest.raises(BudgetExceededError, match=r"\(0 left\)"):
        store.reserve(DATA, "one-more", epsilon=1e-9, delta=0.0, lifetime=10.0)


def test_two_processes_reserving_at_once_never_overspend(tmp_path: Path) -> None:
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_SCRIPT, str(tmp_path), name],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{n}").exists() for n in ("a", "b")):
        assert time.monotonic() < deadline, "the racing processes did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    accepted = [int(p.communicate(timeout=60)[0]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    assert sum(accepted) == 10
    jobs = BudgetStore(tmp_path).jobs("iot:/data")
    assert len(jobs) == 10 and BudgetStore(tmp_path).spent("iot:/data")[0] == 10.0


def test_a_malformed_budget_file_is_an_error_not_a_reset(tmp_path: Path) -> None:
    (tmp_path / BUDGET_FILE).write_text('{"version": 1, "datasets": {"d": {"j": {"epsilon": -1')
    with pytest.raises(BudgetStoreError, match=BUDGET_FILE):
        BudgetStore(tmp_path).reserve(DATA, "job", epsilon=1.0, delta=0.0, lifetime=10.0)
    (tmp_path / BUDGET_FILE).write_text(
        json.dumps({"version": 1, "datasets": {"d": {"j": {"epsilon": -1.0, "delta": 0.0}}}})
    )
    with pytest.raises(BudgetStoreError, match="epsilon"):
        BudgetStore(tmp_path).spent("d")
    assert "-1.0" in (tmp_path / BUDGET_FILE).read_text()


@pytest.mark.parametrize(
    ("epsilon", "delta", "lifetime", "error"),
    [
        (float("nan"), 0.0, 10.0, ValueError),
        (float("inf"), 0.0, 10.0, ValueError),
        (-1.0, 0.0, 10.0, ValueError),
        (True, 0.0, 10.0, TypeError),
        (1.0, 1.0, 10.0, ValueError),
        (1.0, 0.0, 0.0, ValueError),
        (1.0, 0.0, float("nan"), ValueError),
    ],
)
def test_invalid_reservations_are_refused_before_anything_is_written(
    tmp_path: Path, epsilon: float, delta: float, lifetime: float, error: type[Exception]
) -> None:
    with pytest.raises(error):
        BudgetStore(tmp_path).reserve(DATA, "job", epsilon=epsilon, delta=delta, lifetime=lifetime)
    assert not (tmp_path / BUDGET_FILE).exists()


def test_a_held_lock_times_out_instead_of_waiting_forever(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path, lock_timeout=0.05)
    fd = os.open(tmp_path / ".budget.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(StoreLockTimeoutError, match="held the lock"):
            store.reserve(DATA, "job", epsilon=1.0, delta=0.0, lifetime=10.0)
    finally:
        os.close(fd)
    assert store.reserve(DATA, "job", epsilon=1.0, delta=0.0, lifetime=10.0).charged


def test_dataset_keys_name_the_modality_and_the_resolved_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert dataset_key(Path("data"), "iot") == dataset_key(tmp_path / "data", "iot")
    assert dataset_key(Path("data"), "iot") == f"iot:{tmp_path.resolve() / 'data'}"
    assert dataset_key(Path("data"), "vision") != dataset_key(Path("data"), "iot")


def test_the_default_policy_and_the_store_agree_on_the_lifetime(tmp_path: Path) -> None:
    decision = NodePolicy().check(sensing(target_epsilon=4.0))
    assert decision.epsilon is not None
    store = BudgetStore(tmp_path)
    charged = [
        store.reserve(DATA, f"job-{i}", epsilon=decision.epsilon, delta=1e-5, lifetime=30.0)
        for i in range(7)
    ]
    assert charged[-1].spent_epsilon <= 30.0
    with pytest.raises(BudgetExceededError):
        store.reserve(DATA, "job-7", epsilon=decision.epsilon, delta=1e-5, lifetime=30.0)


# --------------------------------------------------------------------------- participation


def test_the_participation_log_refuses_old_or_replayed_rounds_after_a_restart(
    tmp_path: Path,
) -> None:
    ParticipationStore(tmp_path).admit(run_id=7, server_round=3)
    restarted = ParticipationStore(tmp_path)
    for stale in (3, 2):
        with pytest.raises(SecAggRefusedError, match="not newer than round 3"):
            restarted.admit(7, stale)
    restarted.check(7, 4)
    restarted.admit(7, 4)
    restarted.admit(8, 1)  # another run has its own rounds
    assert ParticipationStore(tmp_path).log().last_round == {7: 4, 8: 1}


def test_a_malformed_participation_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "participation.json").write_text('{"version": 1, "run_ids": [1], "rounds": []}')
    with pytest.raises(BudgetStoreError, match="participation"):
        ParticipationStore(tmp_path).admit(1, 1)


def test_a_restarted_node_process_keeps_its_lifetime_budget_and_refuses_a_job_beyond_it(
    tmp_path: Path,
) -> None:
    """The node itself, restarted: each job runs in a fresh process that loads the kit and
    answers through the ClientApp. The first process releases a job of epsilon ~4 against a
    lifetime of 6; the next process refuses a job of epsilon 3 with the reason (nothing
    written), and still answers the first job, which it does not charge again."""
    policy = '[default]\nmin_privacy_level = "dp"\nmax_epsilon = 5.0\nlifetime_epsilon = 6.0\n'
    federation = provision(tmp_path / "federation", 1, NodeType.SENSING, policy=policy)
    write_demo_dataset("iot", tmp_path / "data" / "iot", 30, seed=4)
    kit, data = federation.kits[0], tmp_path / "data"
    jobs = {}
    for name, epsilon in (("first", 4.0), ("second", 3.0)):
        job = JobSpec.from_mapping(
            {
                "component": "sensing",
                "base_model": "iot",
                "task": "normalizer",
                "privacy_level": "dp",
                "dp": {"unit": "example", "target_epsilon": epsilon, "delta": 1e-5},
            }
        )
        jobs[name] = tmp_path / f"{name}.dsse.json"
        jobs[name].write_bytes(federation.sign(job))
    budget = kit / STATE_DIR / BUDGET_FILE

    def node_process(job: str) -> str:
        # a node process imports torch and flwr: allow for a loaded CI machine
        process = run_python(NODE_SCRIPT, str(kit), str(data), str(jobs[job]), timeout=600.0)
        return process.stdout.strip()

    assert node_process("first") == "released"
    spent = json.loads(budget.read_bytes())
    before = budget.read_bytes()
    reason = node_process("second")  # a new process: nothing but the kit's files remembers
    assert "JobRefusedError: this node's lifetime privacy budget refuses it" in reason, reason
    assert "of its lifetime budget 6" in reason
    assert budget.read_bytes() == before  # the refused job was not recorded
    assert node_process("first") == "released"  # the same job again: charged once
    assert json.loads(budget.read_bytes()) == spent
