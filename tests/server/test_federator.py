"""The federator-agg round loop on a LocalGrid of real ClientApps (tiny ViT, demo data).

Every test runs the real ``clients.app`` ClientApp in-process through
:class:`tests.support.local_grid.LocalGrid`; nothing is mocked. Models are tiny (hidden 32,
one layer) and each node holds 40 demo images, so a round takes well under a second (DP-SGD
a few).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from numpy.typing import NDArray
from safetensors.numpy import load_file

from aggregation.accountant import compute_epsilon
from aggregation.secagg import SecAggMessage, Stage
from clients import protocol as wire
from clients.app import make_client_app
from clients.config import Fault, NodeConfig
from clients.data import load_sensor_csv
from clients.demo_data import write_demo_dataset
from clients.jobs import initial_events, round_events, update_length_for
from clients.sensing import IOT_RANGES
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec
from manifests.keys import TrustedKeys
from manifests.verify import verify_bundle
from server.checkpoint import ACCOUNTANT_FILE
from server.discovery import NODES_FILE
from server.federator import run_federation
from server.ledger import (
    Ledger,
    ParticipantOutcome,
    Phase,
    RoundRecord,
    RoundStatus,
    RunStatus,
)
from server.options import EventKind, JobStatus, ProgressEvent, RunOptions
from server.plan import RunPlan, SamplingPlan, secagg_params
from tests.support.federation import Federation, provision
from tests.support.local_grid import LocalGrid, LocalNode, random_node_ids

IMAGES_PER_NODE = 40
TINY_VIT: dict[str, object] = {
    "component": "vision",
    "base_model": "vit-base16",
    "task": "embed",
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "input_size": 32,
    "embedding_dim": 16,
    "batch_size": 32,
    "learning_rate": 1e-3,
}
NODE_DP = {"unit": "node", "clipping_norm": 0.5, "noise_multiplier": 0.5, "delta": 1e-5}
EXAMPLE_DP = {"unit": "example", "clipping_norm": 1.0, "target_epsilon": 8.0, "delta": 1e-5}


def vit_job(
    settings: Mapping[str, object] | None = None,
    *,
    rounds: int = 2,
    nodes: int = 3,
    **extra: object,
) -> JobSpec:
    """The tiny ViT embed job (``settings`` and ``extra`` add or override job fields)."""
    federation = {"num_rounds": rounds, "clients_per_round": nodes, "reliability_threshold": 0.3}
    return JobSpec.from_mapping({**TINY_VIT, "federation": federation, **(settings or {}), **extra})


@dataclass
class Keys:
    """The provisioned federation of these tests: operator keys, roster, encoder kits."""

    federation: Federation

    @property
    def signing(self) -> Path:
        return self.federation.signing_key

    @property
    def trusted(self) -> Path:
        return self.federation.trusted_keys

    @property
    def trusted_keys(self) -> TrustedKeys:
        return TrustedKeys.load(self.trusted)

    @property
    def roster(self) -> Path:
        return self.federation.roster


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(provision(tmp_path_factory.mktemp("federation"), 4, NodeType.ENCODER))


@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four nodes' demo images (40 each, different seeds)."""
    root = tmp_path_factory.mktemp("vision-nodes")
    dirs = []
    for index in range(4):
        folder = root / f"node-{index}"
        write_demo_dataset("vision", folder / "vision", IMAGES_PER_NODE, seed=index, image_size=32)
        dirs.append(folder)
    return dirs


def encoder_grid(
    keys: Keys,
    dirs: Sequence[Path],
    *,
    faults: Mapping[int, tuple[Fault, ...]] | None = None,
    on_message: Callable[[Message], None] | None = None,
) -> LocalGrid:
    nodes = keys.federation.node_configs(dirs, faults=faults)
    return LocalGrid.with_app(make_client_app(nodes), len(dirs), on_message=on_message)


def options(run_dir: Path, keys: Keys, **extra: object) -> RunOptions:
    values: dict[str, object] = {
        "run_dir": run_dir,
        "signing_key": keys.signing,
        "trusted_keys": keys.trusted,
        "roster": keys.roster,
        "seed": 7,
        "deterministic_noise": True,
        "round_timeout": 120.0,
        "node_wait_timeout": 1.0,
    }
    values.update(extra)
    return RunOptions(**values)  # type: ignore[arg-type]


@dataclass
class Events:
    seen: list[ProgressEvent] = field(default_factory=list)

    def __call__(self, event: ProgressEvent) -> None:
        self.seen.append(event)

    def of(self, kind: EventKind) -> list[ProgressEvent]:
        return [e for e in self.seen if e.kind is kind]


def ledger_rounds(run_dir: Path, run_id: str) -> list[RoundRecord]:
    with Ledger.for_run_dir(run_dir, create=False) as ledger:
        return ledger.rounds(run_id)


# =========================================================================== LocalGrid


def echo_app() -> ClientApp:
    app = ClientApp()

    @app.query("node_info")
    def info(message: Message, context: Context) -> Message:
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("disk on fire")
        record = ConfigRecord({"partition": context.node_config["partition-id"]})
        return Message(RecordDict({"echo": record}), reply_to=message)

    return app


def test_local_grid_delivers_through_the_client_app_and_turns_exceptions_into_error_replies() -> (
    None
):
    seen: list[Message] = []
    grid = LocalGrid.with_app(echo_app(), 3, on_message=seen.append)
    ids = list(grid.get_node_ids())
    assert len(set(ids)) == 3 and all(2 <= i < 2**64 for i in ids)
    out = [Message(RecordDict(), dst_node_id=n, message_type=wire.NODE_INFO) for n in ids]
    replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(out, timeout=10)}
    assert set(replies) == set(ids)
    for position, node in enumerate(ids):
        reply = replies[node]
        assert reply.metadata.dst_node_id == SUPERLINK_NODE_ID
        assert reply.metadata.reply_to_message_id == out[position].metadata.message_id
        if position == 1:
            assert reply.has_error()
            assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            assert "disk on fire" in str(reply.error.reason)
        else:
            assert reply.content.config_records["echo"]["partition"] == position
    assert len(seen) == 6  # three deliveries, three replies


def test_local_grid_drop_rule_silences_a_node_and_push_pull_match_replies() -> None:
    grid = LocalGrid.with_app(echo_app(), 3)
    ids = list(grid.get_node_ids())
    grid.drop = lambda node, message_type, server_round: node == ids[2] and server_round == 4
    out = [
        Message(RecordDict(), dst_node_id=n, message_type=wire.NODE_INFO, group_id="4") for n in ids
    ]
    message_ids = list(grid.push_messages(out))
    replies = list(grid.pull_messages(message_ids))
    assert {r.metadata.src_node_id for r in replies} == {ids[0], ids[1]}
    assert list(grid.pull_messages(message_ids)) == []  # each reply is pulled once


def test_local_grid_drops_replies_that_come_after_the_timeout() -> None:
    ticks = iter(range(0, 1000, 10))
    grid = LocalGrid(
        [LocalNode(n, echo_app(), {"partition-id": 0}) for n in (7, 8)],
        clock=lambda: float(next(ticks)),
    )
    out = [Message(RecordDict(), dst_node_id=n, message_type=wire.NODE_INFO) for n in (7, 8)]
    assert list(grid.send_and_receive(out, timeout=5.0)) == []  # every node took 10 s
    out = [Message(RecordDict(), dst_node_id=n, message_type=wire.NODE_INFO) for n in (7, 8)]
    assert len(list(grid.send_and_receive(out, timeout=100.0))) == 2


def test_local_grid_refuses_reserved_or_duplicate_node_ids() -> None:
    app = echo_app()
    with pytest.raises(ValueError, match="distinct"):
        LocalGrid([LocalNode(5, app), LocalNode(5, app)])
    with pytest.raises(ValueError, match="other than 0 and 1"):
        LocalGrid([LocalNode(1, app)])
    assert len(set(random_node_ids(50))) == 50


# =========================================================================== privacy levels

LEVELS: dict[str, dict[str, object]] = {
    "none": {"privacy_level": "none"},
    "none-median": {"privacy_level": "none", "federation": {"robust_aggregation": "median"}},
    "secure-agg": {"privacy_level": "secure-agg", "dp": {"clipping_norm": 2.0}},
    "dp-node": {"privacy_level": "dp", "dp": NODE_DP},
    "dp-example": {"privacy_level": "dp", "dp": EXAMPLE_DP},
    "dp+secure-agg-node": {"privacy_level": "dp+secure-agg", "dp": NODE_DP},
    "dp+secure-agg-example": {"privacy_level": "dp+secure-agg", "dp": EXAMPLE_DP},
}


def _settings(level: str) -> dict[str, object]:
    settings = dict(LEVELS[level])
    federation: dict[str, object] = {
        "num_rounds": 2,
        "clients_per_round": 3,
        "reliability_threshold": 0.0,
    }
    extra = settings.pop("federation", {})
    assert isinstance(extra, dict)
    federation.update(extra)
    return {**settings, "federation": federation}


@pytest.mark.parametrize("level", list(LEVELS))
def test_each_privacy_level_trains_signs_and_records_every_round(
    level: str, vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    job = vit_job(_settings(level))
    events = Events()
    outcome = run_federation(
        encoder_grid(keys, vision_dirs[:3]), job, options(tmp_path, keys), progress=events
    )

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    assert outcome.rounds_completed == 2
    assert outcome.bundle is not None and outcome.manifest is not None
    manifest = verify_bundle(outcome.bundle, keys.trusted_keys).manifest
    assert manifest.privacy_level == job.privacy_level
    assert manifest.provenance.participants_per_round == [3, 3]
    assert (manifest.provenance.secagg is not None) == job.privacy_level.uses_secure_agg
    rounds = ledger_rounds(tmp_path, outcome.run_id)
    assert [r.round for r in rounds] == [1, 2]
    for record in rounds:
        assert record.status is RoundStatus.COMPLETED
        assert (record.sampled, record.responded, record.dropped) == (3, 3, 0)
        train = [p for p in record.participants if p.phase is Phase.TRAIN]
        assert sorted(p.outcome for p in train) == [ParticipantOutcome.CONTRIBUTED] * 3
        assert all(p.reason is None for p in train)
        assert record.metric("eval_loss") is not None
        assert record.reliability is not None
    # The initial model is evaluated once, before round 1, and recorded with it.
    assert "initial" in rounds[0].metrics and "initial" not in rounds[1].metrics
    finished = events.of(EventKind.ROUND_FINISHED)
    assert [e.server_round for e in finished] == [1, 2]
    assert "initial_eval_loss" in finished[0].metrics
    if job.privacy_level.uses_dp:
        dp = manifest.provenance.dp
        assert dp is not None and dp.unit == job.dp.unit.value
        assert dp.metrics_noise_multiplier == job.dp.metrics_noise_multiplier
        assert "no amplification" in dp.sampling
        distributed = job.privacy_level.uses_secure_agg
        assert ("distributed Skellam" in dp.mechanism) == distributed
        assert ("central Gaussian" in dp.mechanism) == (not distributed)
        epsilons = [r.epsilon for r in rounds]
        assert all(e is not None for e in epsilons)
        assert dp.epsilon == pytest.approx(outcome.epsilon)
        if job.dp.unit.value == "example":  # each node calibrated its run to the target
            assert epsilons == [8.0, 8.0] and outcome.epsilon == 8.0
            assert "DP-SGD" in dp.mechanism
        else:
            assert 0 < epsilons[0] < epsilons[1] == pytest.approx(outcome.epsilon)  # type: ignore[operator]
        assert [e.metrics["epsilon"] for e in finished] == pytest.approx(epsilons)
        # Under DP a fit releases counts only: no training loss, no per-node value.
        assert all("train_loss" not in r.metrics.get("train", {}) for r in rounds)
    else:
        assert outcome.epsilon is None and manifest.provenance.dp is None
        assert all("train_loss" in r.metrics["train"] for r in rounds)
    if level == "none-median":
        assert all(r.measurements["train_robust_method"] == "median" for r in rounds)


def _node_level_events(job: JobSpec, rounds: int) -> list[object]:
    length = update_length_for(job)
    per_round = round_events(job, noise_multiplier=0.5, update_length=length)
    return [*initial_events(job, update_length=length), *per_round * rounds]


@pytest.mark.parametrize("level", ["dp", "dp+secure-agg"])
def test_node_level_epsilon_composes_every_release_without_amplification(
    level: str, vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    # 3 of 4 nodes per round, chosen by the server: the sample is public, so no amplification.
    job = vit_job(
        nodes=3,
        privacy_level=level,
        dp={**NODE_DP, "clipping_norm": 5.0},
        federation={
            "num_rounds": 2,
            "clients_per_round": 3,
            "reliability_threshold": 0.0,
            "server_learning_rate": 0.01,
        },
    )
    outcome = run_federation(encoder_grid(keys, vision_dirs), job, options(tmp_path, keys))
    assert outcome.status is JobStatus.PASSED, outcome.reasons
    events = _node_level_events(job, 2)
    assert all(getattr(e, "sample_rate", 1.0) == 1.0 for e in events)
    assert outcome.epsilon == pytest.approx(compute_epsilon(events, delta=1e-5))  # type: ignore[arg-type]
    rounds = ledger_rounds(tmp_path, outcome.run_id)
    assert [r.sampled for r in rounds] == [3, 3]
    assert all(r.measurements["train_expected_count"] == 3 for r in rounds)
    if level == "dp":
        assert all(r.measurements["train_dp_noise_stddev"] == pytest.approx(2.5) for r in rounds)


def test_secret_sampling_credits_amplification_at_the_inclusion_rate(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    job = vit_job(
        privacy_level="dp+secure-agg",
        dp={**NODE_DP, "clipping_norm": 5.0},
        federation={
            "num_rounds": 2,
            "clients_per_round": 4,
            "sampling": "secret",
            "fraction": 0.5,
            "reliability_threshold": 0.0,
            "server_learning_rate": 0.01,  # 2 expected nodes: keep the noise from diverging
        },
    )
    outcome = run_federation(encoder_grid(keys, vision_dirs), job, options(tmp_path, keys))
    assert outcome.status is JobStatus.PASSED, outcome.reasons
    events = _node_level_events(job, 2)
    # Fits (update and clipped count) are amplified; evaluations, which every node answers, not.
    assert {getattr(e, "sample_rate", None) for e in events} == {0.5, 1.0}
    assert outcome.epsilon == pytest.approx(compute_epsilon(events, delta=1e-5))  # type: ignore[arg-type]
    public = vit_job(
        privacy_level="dp+secure-agg",
        dp={**NODE_DP, "clipping_norm": 5.0},
        federation={"num_rounds": 2, "clients_per_round": 4},
    )
    assert outcome.epsilon < compute_epsilon(_node_level_events(public, 2), delta=1e-5)  # type: ignore[arg-type,operator]
    manifest = verify_bundle(outcome.bundle, keys.trusted_keys).manifest  # type: ignore[arg-type]
    assert manifest.provenance.dp is not None
    assert "secret self-selection at rate 0.5" in manifest.provenance.dp.sampling
    # Every cohort node takes part in SecAgg+ (the server cannot tell who included data).
    assert [r.responded for r in ledger_rounds(tmp_path, outcome.run_id)] == [4, 4]


def test_plan_credits_no_amplification_to_a_server_chosen_sample() -> None:
    job = vit_job(nodes=5, privacy_level="dp", dp=NODE_DP)
    plan = RunPlan.for_job(job, SamplingPlan.for_job(job, random_node_ids(20)), update_length=10)
    assert all(getattr(e, "sample_rate", 1.0) == 1.0 for e in plan.events_per_round)
    assert any("no amplification" in n for n in plan.notes)


# =========================================================================== secure aggregation


def _flat_floats(content: RecordDict) -> list[NDArray[np.float64]]:
    out: list[NDArray[np.float64]] = []
    for record in content.array_records.values():
        for name in record:
            out.append(record[name].numpy().astype(np.float64).ravel())
    for config in content.config_records.values():
        for value in config.values():
            if isinstance(value, list) and value and isinstance(value[0], float):
                out.append(np.asarray(value, dtype=np.float64))
    for metrics in content.metric_records.values():
        out.append(np.asarray(list(metrics.values()), dtype=np.float64))
    return out


@pytest.mark.parametrize("level", ["secure-agg", "dp+secure-agg"])
def test_server_receives_nothing_in_the_clear_under_secure_aggregation(
    level: str, vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    dp = {"clipping_norm": 2.0} if level == "secure-agg" else EXAMPLE_DP
    job = vit_job(rounds=1, privacy_level=level, dp=dp)
    to_server: list[Message] = []

    def watch(message: Message) -> None:
        if message.metadata.dst_node_id == SUPERLINK_NODE_ID:
            to_server.append(message)

    handled: list[SecAggMessage] = []
    grid = encoder_grid(keys, vision_dirs[:3], on_message=watch)
    outcome = run_federation(grid, job, options(tmp_path, keys), secagg_hook=handled.append)
    assert outcome.status is JobStatus.PASSED, outcome.reasons

    kinds = {m.metadata.message_type for m in to_server}
    assert wire.FIT not in kinds and wire.EVALUATE not in kinds  # no clear-text collection
    assert kinds >= {wire.NODE_INFO, wire.SECAGG_MASKED}
    for message in to_server:
        assert not message.has_error()
        assert wire.UPDATE not in message.content.array_records
        assert wire.METRICS not in message.content.metric_records
        if message.metadata.message_type == wire.NODE_INFO:
            record = message.content.config_records[wire.NODE_INFO_RECORD]
            assert set(record) == {
                "node_type",
                "eligible",
                "model_fingerprint",
                "reason",
                "identity_key",
                "base_digest",  # of the public base checkpoint it holds ("" without one)
            }
    masked = [m for m in handled if m.stage is Stage.MASKED_INPUT and m.KIND == "reply"]
    assert len(masked) == 9  # initial evaluation, train and eval collections, 3 nodes each
    (round_record,) = ledger_rounds(tmp_path, outcome.run_id)
    evaluation = round_record.metrics["eval"]
    # Under DP the example count is a noised sum too; with these few holdout examples it can
    # come out <= 0 (it did once in CI), and then there is no mean loss to report.
    examples = evaluation["eval_examples"]
    assert isinstance(examples, float)
    if examples > 0:
        assert "eval_loss" in evaluation


def test_node_failing_in_the_masked_input_stage_is_a_dropout_with_its_reason(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    job = vit_job(rounds=1, nodes=4, privacy_level="dp+secure-agg", dp=EXAMPLE_DP)
    grid = encoder_grid(keys, vision_dirs, faults={2: (Fault(wire.SECAGG_MASKED, 1),)})
    failing = list(grid.get_node_ids())[2]
    outcome = run_federation(grid, job, options(tmp_path, keys))

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    (record,) = ledger_rounds(tmp_path, outcome.run_id)
    assert record.status is RoundStatus.COMPLETED
    assert (record.sampled, record.responded) == (4, 3)
    assert record.dropped_by_stage == {"masked_input": 1}
    train = {p.node_id: p for p in record.participants if p.phase is Phase.TRAIN}
    assert train[failing].outcome is ParticipantOutcome.DROPPED
    assert train[failing].stage == "masked_input"
    reason = train[failing].reason
    assert reason is not None and "injected fault" in reason
    assert sum(p.outcome is ParticipantOutcome.CONTRIBUTED for p in train.values()) == 3
    assert record.measurements["train_secagg_n_mask_keys_rebuilt"] == 1
    assert outcome.bundle is not None
    provenance = verify_bundle(outcome.bundle, keys.trusted_keys).manifest.provenance
    assert provenance.participants_per_round == [3]


@pytest.mark.parametrize("stop", [False, True])
def test_too_many_failures_abort_the_round_cleanly_and_the_run_goes_on_or_stops(
    stop: bool, vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    # k = 3 neighbours, threshold 3: two of four failing leaves too few masked inputs.
    job = vit_job(rounds=2, nodes=4, privacy_level="secure-agg", dp={"clipping_norm": 1.0})
    masked_round_1 = (Fault(wire.SECAGG_MASKED, 1),)
    grid = encoder_grid(keys, vision_dirs, faults={0: masked_round_1, 3: masked_round_1})
    events = Events()
    outcome = run_federation(
        grid, job, options(tmp_path, keys, stop_on_aborted_round=stop), progress=events
    )

    rounds = ledger_rounds(tmp_path, outcome.run_id)
    aborted = rounds[0]
    assert aborted.status is RoundStatus.ABORTED
    assert "threshold" in str(aborted.measurements["train_aborted"])
    assert aborted.dropped_by_stage == {"masked_input": 2}
    assert aborted.reliability is None
    with Ledger.for_run_dir(tmp_path, create=False) as ledger:
        summary = ledger.get_run(outcome.run_id)
    if stop:
        assert outcome.status is JobStatus.FAILED
        assert "stop_on_aborted_round" in outcome.reasons[0]
        assert [r.round for r in rounds] == [1]
        assert summary.status is RunStatus.FAILED
    else:
        assert outcome.status is JobStatus.PASSED, outcome.reasons
        assert [(r.round, r.status) for r in rounds] == [
            (1, RoundStatus.ABORTED),
            (2, RoundStatus.COMPLETED),
        ]
        assert rounds[1].responded == 4
        assert outcome.rounds_completed == 1
        assert "1 round(s) aborted" in outcome.reasons
        assert summary.status is RunStatus.COMPLETED
        assert outcome.bundle is not None
        provenance = verify_bundle(outcome.bundle, keys.trusted_keys).manifest.provenance
        assert provenance.participants_per_round == [0, 4]


def test_sum_with_fewer_survivors_than_the_noise_is_sized_for_is_discarded(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    # 4 nodes planning for no dropout: each node's noise share is a quarter of the target, so
    # a sum of the 3 that survive one failure (enough for SecAgg+, t = 3) is under-noised.
    job = vit_job(
        rounds=1, nodes=4, privacy_level="dp+secure-agg", dp={**EXAMPLE_DP, "planned_dropout": 0.0}
    )
    grid = encoder_grid(keys, vision_dirs, faults={0: (Fault(wire.SECAGG_MASKED, 1),)})
    outcome = run_federation(grid, job, options(tmp_path, keys))
    assert outcome.status is JobStatus.FAILED
    (record,) = ledger_rounds(tmp_path, outcome.run_id)
    assert record.status is RoundStatus.ABORTED
    # The survivors themselves refuse to sign (so to unmask) the under-noised survivor set.
    reasons = [p.reason or "" for p in record.participants if p.phase is Phase.TRAIN]
    assert sum("would be under-noised" in r for r in reasons) == 3


# =========================================================================== resume, budget


class CrashError(RuntimeError):
    """Stands for the server process being killed."""


@pytest.mark.parametrize(("interval", "crash_after"), [(1, 2), (2, 3)])
def test_resume_after_a_crash_runs_every_round_exactly_once(
    interval: int, crash_after: int, vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    job = vit_job(rounds=3, privacy_level="dp", dp=NODE_DP, checkpoint_interval=interval)

    def crash(event: ProgressEvent) -> None:
        if event.kind is EventKind.ROUND_FINISHED and event.server_round == crash_after:
            raise CrashError(f"killed after round {crash_after}")

    with pytest.raises(CrashError):
        run_federation(
            encoder_grid(keys, vision_dirs[:3]), job, options(tmp_path, keys), progress=crash
        )
    with Ledger.for_run_dir(tmp_path, create=False) as ledger:
        (first,) = ledger.list_runs()
        assert first.status is RunStatus.FAILED
        before = {r.round: r.recorded_at for r in ledger.rounds(first.run_id)}
    assert sorted(before) == list(range(1, crash_after + 1))

    events = Events()
    outcome = run_federation(
        encoder_grid(keys, vision_dirs[:3]),
        job,
        options(tmp_path, keys, resume=True),
        progress=events,
    )

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    assert outcome.run_id == first.run_id
    checkpointed = crash_after - crash_after % interval
    rerun = list(range(checkpointed + 1, 4))
    assert [e.server_round for e in events.of(EventKind.ROUND_FINISHED)] == rerun
    rounds = ledger_rounds(tmp_path, outcome.run_id)
    assert [r.round for r in rounds] == [1, 2, 3]
    for record in rounds:
        if record.round <= checkpointed:
            assert record.recorded_at == before[record.round]  # kept, not repeated
        else:
            previous = before[crash_after]
            assert record.recorded_at is not None and previous is not None
            assert record.recorded_at > previous
    # Privacy of the rolled-back round stays spent (conservative resume).
    composed = _node_level_events(job, crash_after + len(rerun))
    assert outcome.epsilon == pytest.approx(compute_epsilon(composed, delta=1e-5))  # type: ignore[arg-type]
    assert outcome.bundle is not None
    provenance = verify_bundle(outcome.bundle, keys.trusted_keys).manifest.provenance
    assert provenance.rounds == 3 and provenance.participants_per_round == [3, 3, 3]


def test_exhausted_privacy_budget_stops_training_before_the_round(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    probe = vit_job(rounds=4, privacy_level="dp", dp=NODE_DP)
    two = compute_epsilon(_node_level_events(probe, 2), delta=1e-5)  # type: ignore[arg-type]
    three = compute_epsilon(_node_level_events(probe, 3), delta=1e-5)  # type: ignore[arg-type]
    budget = (two + three) / 2
    job = vit_job(rounds=4, privacy_level="dp", dp={**NODE_DP, "epsilon_budget": budget})
    events = Events()
    outcome = run_federation(
        encoder_grid(keys, vision_dirs[:3]), job, options(tmp_path, keys), progress=events
    )

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    assert outcome.rounds_completed == 2
    assert outcome.epsilon == pytest.approx(two)
    assert outcome.epsilon is not None and outcome.epsilon <= budget
    assert any("budget exhausted before round 3" in r for r in outcome.reasons)
    assert [e.server_round for e in events.of(EventKind.ROUND_STARTED)] == [1, 2]
    assert [r.round for r in ledger_rounds(tmp_path, outcome.run_id)] == [1, 2]
    state = json.loads((tmp_path / ACCOUNTANT_FILE).read_text())
    per_round = len(_node_level_events(job, 1)) - 1  # minus the initial evaluation
    assert len(state["accountant"]["history"]) == 1 + 2 * per_round  # the refused round: none


def test_epsilon_budget_too_small_for_one_round_fails_before_any_training(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    probe = vit_job(privacy_level="dp", dp=NODE_DP)
    one = compute_epsilon(_node_level_events(probe, 1), delta=1e-5)  # type: ignore[arg-type]
    job = vit_job(privacy_level="dp", dp={**NODE_DP, "epsilon_budget": one * 0.9})
    events = Events()
    outcome = run_federation(
        encoder_grid(keys, vision_dirs[:3]), job, options(tmp_path, keys), progress=events
    )

    assert outcome.status is JobStatus.FAILED
    assert any("budget exhausted before round 1" in r for r in outcome.reasons), outcome.reasons
    assert outcome.rounds_completed == 0 and outcome.bundle is None
    assert events.of(EventKind.ROUND_STARTED) == []  # nothing was trained or sent for training
    assert ledger_rounds(tmp_path, outcome.run_id) == []


# =========================================================================== nodes, sensing


def test_ineligible_nodes_are_refused_with_reasons_and_too_few_fail_the_job(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    nodes = {
        0: NodeConfig(NodeType.ENCODER, vision_dirs[0], kit=keys.federation.kits[0]),
        1: NodeConfig(NodeType.SENSING, vision_dirs[1], kit=keys.federation.kits[1]),  # wrong type
        2: NodeConfig(NodeType.ENCODER, tmp_path / "no-data", kit=keys.federation.kits[2]),
    }
    grid = LocalGrid.with_app(make_client_app(nodes), 3)
    events = Events()
    outcome = run_federation(grid, vit_job(nodes=2), options(tmp_path, keys), progress=events)

    assert outcome.status is JobStatus.FAILED
    assert "only 1 eligible node(s) of 3 connected; the job needs 2" in outcome.reasons[0]
    document = json.loads((tmp_path / NODES_FILE).read_text())
    assert document["eligible"] == [{"node_id": n} for n in sorted(grid.get_node_ids())[:0]] or all(
        set(e) == {"node_id"} for e in document["eligible"]
    )  # no example counts
    refused = document["refused"]
    assert len(refused) == 2
    assert all(r["reason"].startswith("not eligible: ") for r in refused)
    assert outcome.bundle is None and not list(tmp_path.glob("*.zip"))
    with Ledger.for_run_dir(tmp_path, create=False) as ledger:
        assert ledger.get_run(outcome.run_id).status is RunStatus.FAILED
        recorded = ledger.refused_nodes(outcome.run_id)  # in the ledger too, not only the file
    assert [(n.node_id, n.reason) for n in recorded] == [
        (r["node_id"], r["reason"]) for r in refused
    ]
    assert events.of(EventKind.JOB_FINISHED)[0].message.startswith("failed: ")


def test_nodes_refused_by_their_policy_are_recorded_in_the_ledger_of_a_run_that_passes(
    keys: Keys, tmp_path: Path
) -> None:
    # node 3 belongs to another federation: it does not trust this operator and refuses
    stranger = provision(tmp_path / "stranger", 1, NodeType.SENSING).kits[0]
    dirs = _iot_dirs(tmp_path, count=4)
    nodes = keys.federation.node_configs(dirs[:3], node_type=NodeType.SENSING)
    nodes[3] = NodeConfig(NodeType.SENSING, dirs[3], name="stranger", kit=stranger)
    job = JobSpec.from_mapping(
        {
            "component": "sensing",
            "base_model": "iot",
            "task": "normalizer",
            "privacy_level": "none",
            "federation": {"num_rounds": 1, "clients_per_round": 3},
        }
    )
    ids = random_node_ids(4)
    grid = LocalGrid.with_app(make_client_app(nodes), 4, node_ids=ids)
    outcome = run_federation(grid, job, options(tmp_path, keys))

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    with Ledger.for_run_dir(tmp_path, create=False) as ledger:
        (refused,) = ledger.refused_nodes(outcome.run_id)
    assert refused.node_id == ids[3]
    assert refused.reason.startswith("not eligible: the job is not signed by an operator")
    (written,) = json.loads((tmp_path / NODES_FILE).read_text())["refused"]
    assert (written["node_id"], written["reason"]) == (refused.node_id, refused.reason)


def _iot_dirs(root: Path, rows: int = 300, count: int = 3) -> list[Path]:
    dirs = []
    for index in range(count):
        folder = root / "nodes" / f"node-{index}"
        write_demo_dataset("iot", folder / "iot", rows, seed=10 + index)
        dirs.append(folder)
    return dirs


def _pooled_iot(dirs: Sequence[Path]) -> NDArray[np.float64]:
    values = []
    for folder in dirs:
        table = load_sensor_csv(folder / "iot")
        rows = table.values[:, [table.columns.index(c) for c in IOT_RANGES.features]]
        values.append(rows[np.all(np.isfinite(rows), axis=1)])
    return np.concatenate(values)


@pytest.mark.parametrize("level", ["none", "secure-agg", "dp", "dp+secure-agg"])
def test_sensing_normalizer_matches_the_pooled_data_plainly_or_through_secure_aggregation(
    level: str, keys: Keys, tmp_path: Path
) -> None:
    dirs = _iot_dirs(tmp_path)
    settings: dict[str, object] = {
        "component": "sensing",
        "base_model": "iot",
        "task": "normalizer",
        "privacy_level": level,
        "federation": {"num_rounds": 1, "clients_per_round": 3},
    }
    if level.startswith("dp"):
        settings["dp"] = {"unit": "example", "target_epsilon": 6.0, "delta": 1e-5}
    job = JobSpec.from_mapping(settings)
    nodes = keys.federation.node_configs(dirs, node_type=NodeType.SENSING)
    run_dir = tmp_path / "run"
    outcome = run_federation(
        LocalGrid.with_app(make_client_app(nodes), 3), job, options(run_dir, keys)
    )

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    assert outcome.bundle is not None
    manifest = verify_bundle(outcome.bundle, keys.trusted_keys).manifest
    assert manifest.artifact_name == "sensing-iot-normalizer-v1"
    assert (manifest.provenance.secagg is not None) == job.privacy_level.uses_secure_agg
    weights = load_file(str(run_dir / "model.safetensors"))
    pooled = _pooled_iot(dirs)
    if not job.privacy_level.uses_dp:  # exact up to the ranges' clipping and fixed point
        assert weights["count"] == pytest.approx(np.full(5, pooled.shape[0]), abs=1e-2)
        assert weights["mean"] == pytest.approx(pooled.mean(axis=0), rel=1e-3, abs=1e-4)
        assert weights["std"] == pytest.approx(pooled.std(axis=0), rel=0.03)
        assert outcome.epsilon is None
        return
    # At epsilon 6 the released statistics are useful: every std within 10 % of the truth.
    assert outcome.dp_unit == "example" and outcome.epsilon is not None
    assert outcome.epsilon <= 6.0
    assert np.all(np.abs(weights["std"] / pooled.std(axis=0) - 1) < 0.10)
    assert np.all(np.abs(weights["mean"] - pooled.mean(axis=0)) < 0.1 * pooled.std(axis=0))


def test_run_below_the_reliability_threshold_is_rejected_without_a_bundle(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    # Node-level DP noise far above 3 nodes' signal costs the noise-to-signal deduction.
    job = vit_job(
        rounds=1,
        privacy_level="dp",
        dp=NODE_DP,
        federation={"num_rounds": 1, "clients_per_round": 3, "reliability_threshold": 0.95},
    )
    outcome = run_federation(encoder_grid(keys, vision_dirs[:3]), job, options(tmp_path, keys))

    assert outcome.status is JobStatus.REJECTED
    assert outcome.reliability is not None and outcome.reliability < 0.95
    assert any("< threshold 0.950" in r for r in outcome.reasons)
    assert outcome.bundle is None and outcome.manifest is None
    assert not list(tmp_path.glob("*.zip")) and not (tmp_path / "model.safetensors").exists()
    with Ledger.for_run_dir(tmp_path, create=False) as ledger:
        summary = ledger.get_run(outcome.run_id)
    assert summary.status is RunStatus.REJECTED
    assert summary.verdict_reasons == outcome.reasons and summary.bundle_path is None
    (record,) = ledger_rounds(tmp_path, outcome.run_id)
    assert record.reliability_reasons


def test_too_few_connected_nodes_fail_after_the_wait(keys: Keys, tmp_path: Path) -> None:
    grid = LocalGrid.with_app(echo_app(), 2)
    outcome = run_federation(grid, vit_job(nodes=3), options(tmp_path, keys, node_wait_timeout=0.2))
    assert outcome.status is JobStatus.FAILED
    assert outcome.reasons == ("only 2 node(s) connected within 0.2 s; the job needs at least 3",)


def test_secure_aggregation_never_runs_with_fewer_than_three_nodes(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    job = vit_job(nodes=2, privacy_level="secure-agg", dp={"clipping_norm": 1.0})
    outcome = run_federation(
        encoder_grid(keys, vision_dirs[:2]), job, options(tmp_path, keys, node_wait_timeout=0.2)
    )
    assert outcome.status is JobStatus.FAILED
    assert "needs at least 3" in outcome.reasons[0]
    assert outcome.bundle is None


def test_sampling_is_seeded_uniform_or_poisson_and_secret_keeps_the_cohort() -> None:
    population = random_node_ids(20)
    uniform = SamplingPlan.for_job(vit_job(nodes=5), population)
    assert (uniform.count, uniform.rate, uniform.expected_count) == (5, 0.25, 5.0)
    first = uniform.sample(np.random.default_rng(1))
    assert first == uniform.sample(np.random.default_rng(1)) and len(set(first)) == 5
    poisson_job = JobSpec.from_mapping(
        {**TINY_VIT, "federation": {"sampling": "poisson", "fraction": 0.3}}
    )
    poisson = SamplingPlan.for_job(poisson_job, population)
    assert poisson.rate == 0.3 and poisson.expected_count == pytest.approx(6.0)
    sizes = [len(poisson.sample(np.random.default_rng(seed))) for seed in range(400)]
    assert np.mean(sizes) == pytest.approx(6.0, abs=0.3)  # 4 standard errors
    assert len(set(sizes)) > 3  # the round size varies, as Poisson sampling does
    secret_job = vit_job(
        privacy_level="secure-agg",
        dp={"clipping_norm": 1.0},
        federation={"clients_per_round": 8, "sampling": "secret", "fraction": 0.25},
    )
    secret = SamplingPlan.for_job(secret_job, population)
    assert secret.count == 8 and secret.include_rate == 0.25
    assert secret.expected_count == pytest.approx(2.0)  # the fixed denominator
    with pytest.raises(ValueError, match="only 20 eligible nodes"):
        SamplingPlan.for_job(vit_job(nodes=21), population)


def test_secagg_parameters_default_from_the_round_size_and_refuse_misfits() -> None:
    def params(n: int, **secagg: object) -> tuple[int, int]:
        job = vit_job(privacy_level="secure-agg", secagg=secagg)
        p = secagg_params(job, num_clients=n, vector_length=10)
        return p.num_neighbours, p.threshold

    assert params(3) == (2, 2)
    assert params(4) == (3, 3)
    assert params(100) == (14, 8)  # ceil(2 log2 n) neighbours, more than half of them to unmask
    assert params(3, num_neighbours=2, reconstruction_threshold=3) == (2, 3)
    with pytest.raises(ValueError, match="at least 3 nodes"):
        params(2)
    with pytest.raises(ValueError, match="threshold"):
        params(3, reconstruction_threshold=3, num_neighbours=1)
    with pytest.raises(ValueError, match="quantization_bits"):
        params(4, quantization_bits=16)


def test_sensing_with_node_level_dp_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"set dp\.unit = example"):
        JobSpec.from_mapping(
            {
                "component": "sensing",
                "base_model": "iot",
                "task": "normalizer",
                "privacy_level": "dp",
                "dp": {"unit": "node", "noise_multiplier": 1.0, "delta": 1e-5},
            }
        )


def _stale_model_app(real: ClientApp) -> ClientApp:
    """A node running another model definition: it answers node_info with its own fingerprint
    (as a node with a different fedbrain version or base config would) and delegates the rest."""
    app = ClientApp()

    @app.query("node_info")
    def info(message: Message, context: Context) -> Message:
        reply = real(message, context)
        record = reply.content.config_records[wire.NODE_INFO_RECORD]
        record["model_fingerprint"] = "sha256:" + "0" * 64
        return Message(reply.content, reply_to=message)

    return app


def test_node_whose_model_config_disagrees_is_refused_with_the_reason(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    nodes = keys.federation.node_configs(vision_dirs[:3])
    real = make_client_app(nodes)
    ids = random_node_ids(3)
    grid = LocalGrid(
        [
            LocalNode(ids[0], real, {"partition-id": 0, "num-partitions": 3}),
            LocalNode(ids[1], real, {"partition-id": 1, "num-partitions": 3}),
            LocalNode(ids[2], _stale_model_app(real), {"partition-id": 2, "num-partitions": 3}),
        ]
    )
    outcome = run_federation(grid, vit_job(nodes=3), options(tmp_path, keys))

    assert outcome.status is JobStatus.FAILED
    assert "only 2 eligible node(s) of 3 connected; the job needs 3" in outcome.reasons[0]
    (refused,) = json.loads((tmp_path / NODES_FILE).read_text())["refused"]
    assert "model fingerprint sha256:000" in refused["reason"]
    assert "differs from the server's" in refused["reason"]
    assert outcome.bundle is None


def test_eval_metrics_are_the_trained_classifiers_and_the_initial_model_is_the_baseline(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    job = vit_job(rounds=2, learning_rate=3e-3)
    outcome = run_federation(encoder_grid(keys, vision_dirs[:3]), job, options(tmp_path, keys))
    assert outcome.status is JobStatus.PASSED, outcome.reasons
    first, second = ledger_rounds(tmp_path, outcome.run_id)
    initial = first.metrics["initial"]
    assert initial["eval_examples"] == second.metrics["eval"]["eval_examples"]
    for metrics in (initial, first.metrics["eval"], second.metrics["eval"]):
        assert 0.0 <= float(metrics["eval_accuracy"]) <= 1.0
        assert float(metrics["eval_loss"]) > 0
    # The classifier head learns: its loss falls from the initial model's.
    assert float(second.metrics["eval"]["eval_loss"]) < float(initial["eval_loss"])
