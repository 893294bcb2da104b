"""The federator-agg round loop on a LocalGrid of real ClientApps (tiny ViT, demo data).

Every test runs the real ``clients.app`` ClientApp in-process through
:class:`server.local_grid.LocalGrid`; nothing is mocked. Models are tiny (hidden 32, one layer)
and each node holds 40 demo images, so a round takes well under a second (DP-SGD a few).
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from numpy.typing import NDArray
from safetensors.numpy import load_file

from aggregation.accountant import SubsampledGaussianEvent, compute_epsilon
from aggregation.secagg import SecAggMessage, Stage
from clients import protocol as wire
from clients.app import make_client_app
from clients.demo_data import write_demo_dataset
from clients.models import build_model, get_weights
from clients.node import (
    Fault,
    Node,
    NodeConfig,
    NodeState,
    model_spec_for_job,
    normalizer_from_sum,
    sensing_contribution,
)
from clients.sensing import IOT_RANGES
from manifests.catalog import NodeType
from manifests.demo import write_keys
from manifests.jobspec import JobSpec
from manifests.keys import SigningKey, TrustedKeys
from manifests.verify import verify_bundle
from server.checkpoint import ACCOUNTANT_FILE
from server.federator import (
    NODES_FILE,
    SamplingPlan,
    plan_privacy,
    run_federation,
    secagg_params,
)
from server.ledger import (
    Ledger,
    ParticipantOutcome,
    Phase,
    RoundRecord,
    RoundStatus,
    RunStatus,
)
from server.local_grid import LocalGrid, LocalNode, random_node_ids
from server.options import EventKind, JobStatus, ProgressEvent, RunOptions

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
EXAMPLE_DP = {"unit": "example", "clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}


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
    signing: Path
    trusted: Path

    @property
    def trusted_keys(self) -> TrustedKeys:
        return TrustedKeys.load(self.trusted)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    now = datetime.now(UTC)
    signing, _, trusted = write_keys(
        tmp_path_factory.mktemp("keys"),
        SigningKey.generate(),
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=1),
    )
    return Keys(signing, trusted)


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
    dirs: Sequence[Path],
    *,
    faults: Mapping[int, tuple[Fault, ...]] | None = None,
    on_message: Callable[[Message], None] | None = None,
) -> LocalGrid:
    nodes = {
        i: NodeConfig(NodeType.ENCODER, folder, faults=(faults or {}).get(i, ()))
        for i, folder in enumerate(dirs)
    }
    return LocalGrid.with_app(make_client_app(nodes), len(dirs), on_message=on_message)


def options(run_dir: Path, keys: Keys, **extra: object) -> RunOptions:
    values: dict[str, object] = {
        "run_dir": run_dir,
        "signing_key": keys.signing,
        "trusted_keys": keys.trusted,
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
    "none-median": {"privacy_level": "none", "federation.robust_aggregation": "median"},
    "dp-node": {"privacy_level": "dp", "dp": NODE_DP},
    "dp+secure-agg-node": {"privacy_level": "dp+secure-agg", "dp": NODE_DP},
    "dp+secure-agg-example": {"privacy_level": "dp+secure-agg", "dp": EXAMPLE_DP},
}


@pytest.mark.parametrize("level", list(LEVELS))
def test_each_privacy_level_trains_signs_and_records_every_round(
    level: str, vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    job = vit_job(LEVELS[level])
    events = Events()
    outcome = run_federation(
        encoder_grid(vision_dirs[:3]), job, options(tmp_path, keys), progress=events
    )

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    assert outcome.rounds_completed == 2
    assert outcome.bundle is not None and outcome.manifest is not None
    verified = verify_bundle(outcome.bundle, keys.trusted_keys)
    manifest = verified.manifest
    assert manifest.privacy_level == job.privacy_level.value
    assert manifest.provenance.participants_per_round == [3, 3]
    assert (manifest.provenance.secagg is not None) == job.privacy_level.uses_secure_agg
    rounds = ledger_rounds(tmp_path, outcome.run_id)
    assert [r.round for r in rounds] == [1, 2]
    for record in rounds:
        assert record.status is RoundStatus.COMPLETED
        assert (record.sampled, record.responded, record.dropped) == (3, 3, 0)
        contributed = [
            p for p in record.participants if p.outcome is ParticipantOutcome.CONTRIBUTED
        ]
        phase = Phase.SECAGG if job.privacy_level.uses_secure_agg else Phase.TRAIN
        assert sorted(p.phase for p in contributed).count(phase) == 3
        assert record.metric(wire.EVAL_LOSS) is not None
        assert record.reliability is not None and record.reliability > 0.3
    finished = events.of(EventKind.ROUND_FINISHED)
    assert [e.server_round for e in finished] == [1, 2]
    if job.privacy_level.uses_dp:
        assert manifest.provenance.dp is not None
        assert manifest.provenance.dp.unit == job.dp.unit.value
        epsilons = [r.epsilon for r in rounds]
        assert epsilons[0] is not None and epsilons[1] is not None
        assert 0 < epsilons[0] < epsilons[1] == pytest.approx(outcome.epsilon)
        assert manifest.provenance.dp.epsilon == pytest.approx(outcome.epsilon)
        assert [e.metrics["epsilon"] for e in finished] == pytest.approx(epsilons)
        if job.dp.unit.value == "example":  # the largest epsilon a node reported
            reported = [r.measurements["example_epsilon_max_reported"] for r in rounds]
            assert epsilons == pytest.approx(reported)
            assert manifest.provenance.dp.noise_multiplier == 1.0  # the DP-SGD sigma
    else:
        assert outcome.epsilon is None and manifest.provenance.dp is None
    if level == "none-median":
        assert all(r.measurements["robust_method"] == "median" for r in rounds)


def test_node_level_epsilon_is_the_composition_of_one_subsampled_gaussian_per_round(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    # 3 of 4 nodes per round: q = 3/4, one event per round.
    job = vit_job(nodes=3, privacy_level="dp", dp=NODE_DP)
    outcome = run_federation(encoder_grid(vision_dirs), job, options(tmp_path, keys))
    assert outcome.status is JobStatus.PASSED, outcome.reasons
    event = SubsampledGaussianEvent(noise_multiplier=0.5, sample_rate=0.75)
    assert outcome.epsilon == pytest.approx(compute_epsilon([event, event], delta=1e-5))
    rounds = ledger_rounds(tmp_path, outcome.run_id)
    assert [r.sampled for r in rounds] == [3, 3]
    assert all(r.measurements["dp_expected_count"] == 3 for r in rounds)
    assert all(r.measurements["dp_noise_stddev"] == pytest.approx(0.25) for r in rounds)


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
    return out


def test_server_never_receives_a_plain_update_under_secure_aggregation(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    job = vit_job(rounds=1, privacy_level="secure-agg", dp={"clipping_norm": 2.0})
    to_nodes: dict[int, Message] = {}
    to_server: list[Message] = []

    def watch(message: Message) -> None:
        if message.metadata.dst_node_id == SUPERLINK_NODE_ID:
            to_server.append(message)
        elif message.metadata.message_type == wire.SECAGG_MASKED:
            to_nodes[message.metadata.dst_node_id] = message

    handled: list[SecAggMessage] = []
    dirs = vision_dirs[:3]
    grid = encoder_grid(dirs, on_message=watch)
    outcome = run_federation(grid, job, options(tmp_path, keys), secagg_hook=handled.append)
    assert outcome.status is JobStatus.PASSED, outcome.reasons

    # Each node's update, computed independently from what the server sent it.
    updates: dict[int, NDArray[np.float64]] = {}
    ids = list(grid.get_node_ids())
    for partition, node_id in enumerate(ids):
        sent = to_nodes[node_id]
        rnd = wire.RoundConfig.from_record(sent.content.config_records[wire.ROUND])
        record = sent.content.array_records[wire.WEIGHTS]
        weights = list(zip(record.keys(), wire.record_to_weights(record), strict=True))
        node = Node(NodeConfig(NodeType.ENCODER, dirs[partition]), node_id=node_id)
        result = node.fit(job, rnd, weights, NodeState())
        updates[node_id] = result.summable.astype(np.float64)
    size = next(iter(updates.values())).size

    assert {m.metadata.message_type for m in to_server} >= {wire.NODE_INFO, wire.EVALUATE}
    for message in to_server:
        assert not message.has_error()
        for vector in _flat_floats(message.content):
            if vector.size < size:
                continue
            for update in updates.values():
                assert not np.allclose(vector[:size], update, atol=1e-3)
                assert abs(np.corrcoef(vector[:size], update)[0, 1]) < 0.05
        if message.metadata.message_type == wire.SECAGG_MASKED:
            metrics = message.content.metric_records[wire.METRICS]
            assert set(metrics) <= {"num_examples", "train_loss", "train_seconds"}
    replies = [m for m in handled if m.stage is Stage.MASKED_INPUT and m.KIND == "reply"]
    assert len(replies) == 3

    # ... and the server still got their sum: w1 = w0 + mean(updates) (FedAvg, eta 1).
    initial = np.concatenate(
        [w.ravel() for w in get_weights(build_model(model_spec_for_job(job), seed=7))]
    )
    bundle_weights = load_file(str(tmp_path / "model.safetensors"))
    names = list(to_nodes[ids[0]].content.array_records[wire.WEIGHTS].keys())
    final = np.concatenate([bundle_weights[n].astype(np.float64).ravel() for n in names])
    mean = np.mean([u[: size - 2] for u in updates.values()], axis=0)
    assert np.allclose(final, initial + mean, atol=1e-5)
    assert not np.allclose(final, initial, atol=1e-5)


def test_node_failing_in_the_masked_input_stage_is_a_dropout_and_the_round_completes(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    job = vit_job(rounds=1, nodes=4, privacy_level="dp+secure-agg", dp=NODE_DP)
    grid = encoder_grid(vision_dirs, faults={2: (Fault(wire.SECAGG_MASKED, 1),)})
    failing = list(grid.get_node_ids())[2]
    outcome = run_federation(grid, job, options(tmp_path, keys))

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    (record,) = ledger_rounds(tmp_path, outcome.run_id)
    assert record.status is RoundStatus.COMPLETED
    assert (record.sampled, record.responded) == (4, 3)
    assert record.dropped_by_stage == {"masked_input": 1}
    secagg = {p.node_id: p for p in record.participants if p.phase is Phase.SECAGG}
    assert secagg[failing].outcome is ParticipantOutcome.DROPPED
    assert secagg[failing].stage == "masked_input"
    assert sum(p.outcome is ParticipantOutcome.CONTRIBUTED for p in secagg.values()) == 3
    assert record.measurements["secagg_n_mask_keys_rebuilt"] == 1
    assert record.measurements["dp_n_contributions"] == 3
    assert record.measurements["dp_expected_count"] == 4  # the fixed denominator
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
    grid = encoder_grid(vision_dirs, faults={0: masked_round_1, 3: masked_round_1})
    events = Events()
    outcome = run_federation(
        grid, job, options(tmp_path, keys, stop_on_aborted_round=stop), progress=events
    )

    rounds = ledger_rounds(tmp_path, outcome.run_id)
    aborted = rounds[0]
    assert aborted.status is RoundStatus.ABORTED
    assert "threshold" in str(aborted.measurements["abort_reason"])
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
        run_federation(encoder_grid(vision_dirs[:3]), job, options(tmp_path, keys), progress=crash)
    with Ledger.for_run_dir(tmp_path, create=False) as ledger:
        (first,) = ledger.list_runs()
        assert first.status is RunStatus.FAILED
        before = {r.round: r.recorded_at for r in ledger.rounds(first.run_id)}
    assert sorted(before) == list(range(1, crash_after + 1))

    events = Events()
    outcome = run_federation(
        encoder_grid(vision_dirs[:3]), job, options(tmp_path, keys, resume=True), progress=events
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
    composed = crash_after + len(rerun)
    event = SubsampledGaussianEvent(noise_multiplier=0.5, sample_rate=1.0)
    assert outcome.epsilon == pytest.approx(compute_epsilon([event] * composed, delta=1e-5))
    assert outcome.bundle is not None
    provenance = verify_bundle(outcome.bundle, keys.trusted_keys).manifest.provenance
    assert provenance.rounds == 3 and provenance.participants_per_round == [3, 3, 3]


def test_exhausted_privacy_budget_stops_training_before_the_round(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    event = SubsampledGaussianEvent(noise_multiplier=0.5, sample_rate=1.0)
    two = compute_epsilon([event] * 2, delta=1e-5)
    three = compute_epsilon([event] * 3, delta=1e-5)
    budget = (two + three) / 2
    job = vit_job(rounds=4, privacy_level="dp", dp={**NODE_DP, "epsilon_budget": budget})
    events = Events()
    outcome = run_federation(
        encoder_grid(vision_dirs[:3]), job, options(tmp_path, keys), progress=events
    )

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    assert outcome.rounds_completed == 2
    assert outcome.epsilon == pytest.approx(two)
    assert outcome.epsilon is not None and outcome.epsilon <= budget
    assert any("budget exhausted before round 3" in r for r in outcome.reasons)
    assert [e.server_round for e in events.of(EventKind.ROUND_STARTED)] == [1, 2]
    assert [r.round for r in ledger_rounds(tmp_path, outcome.run_id)] == [1, 2]
    state = json.loads((tmp_path / ACCOUNTANT_FILE).read_text())
    assert len(state["accountant"]["history"]) == 2  # the refused round composed nothing


# =========================================================================== nodes, sensing


def test_ineligible_nodes_are_refused_with_reasons_and_too_few_fail_the_job(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    nodes = {
        0: NodeConfig(NodeType.ENCODER, vision_dirs[0]),
        1: NodeConfig(NodeType.SENSING, vision_dirs[1]),  # wrong node type
        2: NodeConfig(NodeType.ENCODER, tmp_path / "no-data"),  # no images
    }
    grid = LocalGrid.with_app(make_client_app(nodes), 3)
    events = Events()
    outcome = run_federation(grid, vit_job(nodes=2), options(tmp_path, keys), progress=events)

    assert outcome.status is JobStatus.FAILED
    assert "only 1 eligible node(s) of 3 connected; the job needs 2" in outcome.reasons[0]
    refused = json.loads((tmp_path / NODES_FILE).read_text())["refused"]
    assert len(refused) == 2
    assert all(r["reason"].startswith("not eligible: ") for r in refused)
    assert outcome.bundle is None and not list(tmp_path.glob("*.zip"))
    with Ledger.for_run_dir(tmp_path, create=False) as ledger:
        assert ledger.get_run(outcome.run_id).status is RunStatus.FAILED
    assert events.of(EventKind.JOB_FINISHED)[0].message.startswith("failed: ")


SIGMA = 0.5
CLIP = 4.0  # above sqrt(11), the largest IoT contribution norm: nothing is clipped


@pytest.mark.parametrize("level", ["none", "secure-agg", "dp+secure-agg"])
def test_sensing_normalizer_matches_the_pooled_data_plainly_or_through_secure_aggregation(
    level: str, keys: Keys, tmp_path: Path
) -> None:
    dirs = []
    for index in range(3):
        folder = tmp_path / "nodes" / f"node-{index}"
        write_demo_dataset("iot", folder / "iot", 200, seed=10 + index)
        dirs.append(folder)
    settings: dict[str, object] = {
        "component": "sensing",
        "base_model": "iot",
        "task": "normalizer",
        "privacy_level": level,
        "federation": {"num_rounds": 1, "clients_per_round": 3},
    }
    if level == "dp+secure-agg":
        settings["dp"] = {
            "unit": "example",
            "clipping_norm": CLIP,
            "noise_multiplier": SIGMA,
            "delta": 1e-5,
        }
    job = JobSpec.from_mapping(settings)
    nodes = {i: NodeConfig(NodeType.SENSING, folder) for i, folder in enumerate(dirs)}
    run_dir = tmp_path / "run"
    outcome = run_federation(
        LocalGrid.with_app(make_client_app(nodes), 3), job, options(run_dir, keys)
    )

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    assert outcome.bundle is not None
    manifest = verify_bundle(outcome.bundle, keys.trusted_keys).manifest
    assert manifest.artifact_name == "sensing-iot-normalizer-v1"
    weights = load_file(str(run_dir / "model.safetensors"))
    clip = CLIP if job.privacy_level.uses_dp else 0.0
    pooled = np.sum([sensing_contribution(job, d, clip)[0] for d in dirs], axis=0)
    expected = normalizer_from_sum(job, pooled)
    n = float(expected.count[0])
    if job.privacy_level.uses_secure_agg:
        assert manifest.provenance.secagg is not None
        assert manifest.provenance.secagg.clipping_range == pytest.approx(n / 3)  # 200 a node
    else:
        assert manifest.provenance.secagg is None
    if not job.privacy_level.uses_dp:  # exact up to SecAgg+'s quantization
        assert weights["count"] == pytest.approx(expected.count, abs=1e-3)
        assert weights["mean"] == pytest.approx(expected.mean, rel=1e-5, abs=1e-6)
        assert weights["std"] == pytest.approx(expected.std, rel=1e-3)
        assert outcome.epsilon is None
        return
    # N(0, (sigma C)^2) on every summed coordinate: 5 standard deviations of slack on the
    # count and on each mean (range width x noise / n, for the sum and for the count).
    assert outcome.dp_unit == "example" and outcome.epsilon is not None
    noise = SIGMA * CLIP
    width = IOT_RANGES.high - IOT_RANGES.low
    assert weights["count"] == pytest.approx(expected.count, abs=5 * noise)
    assert np.all(np.abs(weights["mean"] - expected.mean) <= 5 * width * noise * np.sqrt(2) / n)
    assert np.all(np.isfinite(weights["std"])) and np.all(weights["std"] >= 0)


def test_run_below_the_reliability_threshold_is_rejected_without_a_bundle(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    # DP noise far above the signal costs the noise-to-signal deduction: 0.85 < 0.95.
    job = vit_job(
        rounds=1,
        privacy_level="dp",
        dp=NODE_DP,
        federation={"num_rounds": 1, "clients_per_round": 3, "reliability_threshold": 0.95},
    )
    outcome = run_federation(encoder_grid(vision_dirs[:3]), job, options(tmp_path, keys))

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
    assert any(r.startswith("noise-to-signal") for r in record.reliability_reasons)


def test_too_few_connected_nodes_fail_after_the_wait(keys: Keys, tmp_path: Path) -> None:
    grid = LocalGrid.with_app(echo_app(), 2)
    outcome = run_federation(grid, vit_job(nodes=3), options(tmp_path, keys, node_wait_timeout=0.2))
    assert outcome.status is JobStatus.FAILED
    assert outcome.reasons == ("only 2 node(s) connected within 0.2 s; the job needs at least 3",)


def test_sampling_is_seeded_uniform_or_poisson_with_the_accounted_rate() -> None:
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
    with pytest.raises(ValueError, match="only 20 eligible nodes"):
        SamplingPlan.for_job(vit_job(nodes=21), population)


def test_secagg_parameters_default_from_the_round_size_and_refuse_misfits() -> None:
    def params(n: int, **secagg: object) -> tuple[int, int]:
        job = vit_job(privacy_level="secure-agg", secagg=secagg)
        p = secagg_params(job, num_clients=n, vector_length=10, clipping_range=1.0)
        return p.num_neighbours, p.threshold

    assert params(3) == (2, 2)
    assert params(4) == (3, 3)
    assert params(100) == (14, 8)  # ceil(2 log2 n) neighbours, a majority of them to unmask
    assert params(3, num_neighbours=2, reconstruction_threshold=3) == (2, 3)
    assert params(2, num_neighbours=2) == (1, 2)  # a smaller round masks with everyone
    with pytest.raises(ValueError, match="threshold"):
        params(3, reconstruction_threshold=3, num_neighbours=1)
    with pytest.raises(ValueError, match="quantization_bits"):
        params(4, quantization_bits=16)


def test_sensing_with_node_level_dp_is_refused_with_the_fix(keys: Keys, tmp_path: Path) -> None:
    job = JobSpec.from_mapping(
        {
            "component": "sensing",
            "base_model": "iot",
            "task": "normalizer",
            "privacy_level": "dp",
            "dp": {"unit": "node", "clipping_norm": 4.0, "noise_multiplier": 1.0, "delta": 1e-5},
        }
    )
    with pytest.raises(ValueError, match=r"set dp\.unit = example"):
        plan_privacy(job, SamplingPlan.for_job(job, [11, 12]), num_examples=[5, 5])


def test_calibrated_example_level_sigma_keeps_the_worst_node_within_the_target() -> None:
    job = vit_job(
        rounds=3,
        privacy_level="dp",
        dp={"unit": "example", "clipping_norm": 1.0, "target_epsilon": 3.0, "delta": 1e-5},
    )
    sampling = SamplingPlan.for_job(job, [1, 2, 3])
    plan = plan_privacy(job, sampling, num_examples=[32, 320, 3200])
    assert plan.event is not None
    assert plan.event.sample_rate == 1.0  # the 32-example node: one batch per epoch
    spent = compute_epsilon([plan.event] * 3, delta=1e-5)
    assert 2.5 < spent <= 3.0
    assert plan.central_noise_multiplier == 0.0 and plan.dp_sgd_noise_multiplier > 0


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
    nodes = {i: NodeConfig(NodeType.ENCODER, folder) for i, folder in enumerate(vision_dirs[:3])}
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


def test_epsilon_budget_too_small_for_one_round_fails_before_any_training(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    one = compute_epsilon(
        [SubsampledGaussianEvent(noise_multiplier=0.5, sample_rate=1.0)], delta=1e-5
    )
    job = vit_job(privacy_level="dp", dp={**NODE_DP, "epsilon_budget": one / 2})
    events = Events()
    outcome = run_federation(
        encoder_grid(vision_dirs[:3]), job, options(tmp_path, keys), progress=events
    )

    assert outcome.status is JobStatus.FAILED
    assert any("budget exhausted before round 1" in r for r in outcome.reasons), outcome.reasons
    assert outcome.rounds_completed == 0 and outcome.bundle is None
    assert events.of(EventKind.ROUND_STARTED) == []  # nothing was trained or sent for training
    assert ledger_rounds(tmp_path, outcome.run_id) == []


def test_resumed_example_dp_run_reports_the_servers_bound_not_the_restarted_nodes(
    vision_dirs: list[Path], keys: Keys, tmp_path: Path
) -> None:
    job = vit_job(rounds=3, privacy_level="dp", dp=EXAMPLE_DP, checkpoint_interval=1)

    def crash(event: ProgressEvent) -> None:
        if event.kind is EventKind.ROUND_FINISHED and event.server_round == 1:
            raise CrashError("killed after round 1")

    with pytest.raises(CrashError):
        run_federation(encoder_grid(vision_dirs[:3]), job, options(tmp_path, keys), progress=crash)
    # New node processes: their DP-SGD history (context.state) is gone, as after a restart.
    outcome = run_federation(
        encoder_grid(vision_dirs[:3]), job, options(tmp_path, keys, resume=True)
    )

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    last = ledger_rounds(tmp_path, outcome.run_id)[-1]
    bound = float(last.measurements["example_epsilon_bound"])
    reported = float(last.measurements["example_epsilon_max_reported"])
    assert reported < bound  # the nodes only saw rounds 2 and 3
    assert outcome.epsilon == pytest.approx(bound)
    assert last.epsilon == pytest.approx(bound)
