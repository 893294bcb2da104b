"""The real ClientApp, called as Flower calls it (``app(message, context)``): eligibility,
clipped updates, DP-SGD epsilon across rounds, a full SecAgg+ round driven by the server
session, a sensing round, injected faults and malformed messages as error replies."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Message,
    Metadata,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from numpy.typing import NDArray

from aggregation.secagg import (
    SecAggMessage,
    SecAggParams,
    ServerSession,
    Stage,
    dequantize_sum,
    message_from_record,
)
from clients import protocol
from clients.app import STATE_DP, STATE_SECAGG, make_client_app
from clients.data import load_images
from clients.demo_data import write_demo_dataset
from clients.models import build_model, get_weights, weight_names
from clients.node import NodeConfig, model_spec_for_job, normalizer_from_sum
from clients.protocol import RoundConfig, summable_vector
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec

RUN_ID = 4
_IDS = itertools.count()
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "batch_size": 8}


def vit_job(**extra: object) -> JobSpec:
    return JobSpec.from_mapping(
        {
            "component": "vision",
            "base_model": "vit-base16",
            "task": "embed",
            "embedding_dim": 16,
            "input_size": 32,
            **TINY,
            **extra,
        }
    )


DP_JOB = {
    "privacy_level": "dp",
    "dp": {"unit": "example", "clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5},
}


def message(message_type: str, content: RecordDict, node_id: int) -> Message:
    metadata = Metadata(
        run_id=RUN_ID,
        message_id=f"m{next(_IDS)}",
        src_node_id=1,
        dst_node_id=node_id,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )
    # As flwr builds a received message (the public constructor needs the task identity of a
    # running SuperNode/ServerApp process).
    return make_message(metadata, content)


def over_the_wire(
    app: Callable[[Message, Context], Message], msg: Message, ctx: Context
) -> tuple[Message, Context]:
    """Call the app as a deployed SuperNode does: message, context and reply through protobuf."""
    ctx = context_from_proto(context_to_proto(ctx))
    reply = app(message_from_proto(message_to_proto(msg)), ctx)
    return message_from_proto(message_to_proto(reply)), context_from_proto(context_to_proto(ctx))


def context(node_id: int, partition: int) -> Context:
    return Context(
        run_id=RUN_ID,
        node_id=node_id,
        node_config={"partition-id": partition, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )


def global_weights(job: JobSpec) -> ArrayRecord:
    model = build_model(model_spec_for_job(job), seed=1)
    return ArrayRecord(
        {n: Array(a) for n, a in zip(weight_names(model), get_weights(model), strict=True)}
    )


def content(job: JobSpec, rnd: RoundConfig | None = None, **arrays: ArrayRecord) -> RecordDict:
    records: dict[str, ConfigRecord | ArrayRecord] = {protocol.JOB: job_record(job)}
    if rnd is not None:
        records[protocol.ROUND] = rnd.to_record()
    records.update(arrays)
    return RecordDict(records)  # type: ignore[arg-type]


def job_record(job: JobSpec, **overrides: ConfigRecordValues) -> ConfigRecord:
    values: dict[str, ConfigRecordValues] = {**job.to_run_config(), **overrides}
    return ConfigRecord(values)


def error_reason(reply: Message) -> str:
    assert reply.has_error(), reply.content
    assert reply.error.code == 2  # ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.metadata.reply_to_message_id.startswith("m")
    return reply.error.reason or ""


def update_vector(reply: Message) -> NDArray[np.float32]:
    """The fit reply as the summable vector SecAgg+ would mask."""
    assert not reply.has_error(), reply.error
    update = reply.content.array_records[protocol.UPDATE]
    metrics = reply.content.metric_records[protocol.METRICS]
    return summable_vector(
        protocol.record_to_weights(update),
        was_clipped=bool(metrics["was_clipped"]),
        preclip_norm=float(metrics["preclip_norm"]),  # type: ignore[arg-type]
    )


@pytest.fixture
def encoders(tmp_path: Path) -> dict[int, NodeConfig]:
    nodes = {}
    for k in range(3):
        write_demo_dataset("vision", tmp_path / f"e{k}" / "vision", 20, seed=k)
        nodes[k] = NodeConfig(NodeType.ENCODER, tmp_path / f"e{k}", name=f"e{k}")
    return nodes


# ------------------------------------------------------------------------- node_info


def test_node_info_says_eligible_or_why_not(
    tmp_path: Path, encoders: dict[int, NodeConfig]
) -> None:
    nodes = {
        0: encoders[0],
        1: NodeConfig(NodeType.SENSING, encoders[0].data_dir),
        2: NodeConfig(NodeType.ENCODER, tmp_path / "missing"),
    }
    app = make_client_app(nodes)
    job = vit_job()
    infos = []
    for partition in range(3):
        reply = app(
            message(protocol.NODE_INFO, content(job), 10 + partition),
            context(10 + partition, partition),
        )
        infos.append(
            protocol.NodeInfo.from_record(reply.content.config_records[protocol.NODE_INFO_RECORD])
        )
    assert infos[0].eligible and infos[0].num_examples == 10
    assert infos[0].model_fingerprint.startswith("sha256:")
    assert not infos[1].eligible and "for encoder nodes; this is a sensing node" in infos[1].reason
    assert not infos[2].eligible and "does not exist" in infos[2].reason


def test_deployed_app_reads_its_node_from_the_supernode_config(tmp_path: Path) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    app = make_client_app()
    ctx = Context(
        run_id=RUN_ID,
        node_id=5,
        state=RecordDict(),
        run_config={},
        node_config={"node-type": "encoder", "data-dir": str(tmp_path)},
    )
    reply = app(message(protocol.NODE_INFO, content(vit_job()), 5), ctx)
    assert reply.content.config_records[protocol.NODE_INFO_RECORD]["eligible"] is True
    ctx.node_config = {"data-dir": str(tmp_path)}
    reason = error_reason(app(message(protocol.NODE_INFO, content(vit_job()), 5), ctx))
    assert "NodeConfigError" in reason and "node-type: is required" in reason


# ------------------------------------------------------------------------------ fit


def test_fit_returns_a_clipped_update_shaped_like_the_model(
    encoders: dict[int, NodeConfig],
) -> None:
    app = make_client_app(encoders)
    job = vit_job()
    weights = global_weights(job)
    rnd = RoundConfig(server_round=1, seed=3, clipping_norm=0.05)
    reply = app(message(protocol.FIT, content(job, rnd, weights=weights), 10), context(10, 0))
    assert not reply.has_error(), reply.error
    update = reply.content.array_records[protocol.UPDATE]
    assert list(update.keys()) == list(weights.keys())
    arrays = protocol.record_to_weights(update)
    assert [a.shape for a in arrays] == [a.shape for a in protocol.record_to_weights(weights)]
    norm = float(np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in arrays)))
    metrics = reply.content.metric_records[protocol.METRICS]
    assert metrics["was_clipped"] == 1.0 and metrics["preclip_norm"] > 0.05  # type: ignore[operator]
    assert norm == pytest.approx(0.05, rel=1e-5)
    assert metrics["num_examples"] == 10 and np.isfinite(metrics["train_loss"])
    assert protocol.EXAMPLE_EPSILON not in metrics

    unclipped = RoundConfig(server_round=1, seed=3, local_steps=1)
    reply = app(message(protocol.FIT, content(job, unclipped, weights=weights), 10), context(10, 0))
    metrics = reply.content.metric_records[protocol.METRICS]
    assert metrics["was_clipped"] == 0.0 and metrics["preclip_norm"] > 0  # type: ignore[operator]


def test_dp_sgd_epsilon_accumulates_across_rounds_in_the_node_state(
    encoders: dict[int, NodeConfig],
) -> None:
    app = make_client_app(encoders)
    job = vit_job(**DP_JOB)
    weights = global_weights(job)
    ctx = context(10, 0)
    epsilons = []
    for server_round in (1, 2):
        rnd = RoundConfig(
            server_round=server_round,
            seed=1,
            clipping_norm=1.0,
            dp_noise_multiplier=1.0,
            dp_max_grad_norm=1.0,
            dp_delta=1e-5,
            local_steps=2,
        )
        reply = app(message(protocol.FIT, content(job, rnd, weights=weights), 10), ctx)
        assert not reply.has_error(), reply.error
        epsilons.append(reply.content.metric_records[protocol.METRICS][protocol.EXAMPLE_EPSILON])
        assert sum(ctx.state.config_records[STATE_DP]["steps"]) == 2 * server_round  # type: ignore[arg-type]
    assert 0 < epsilons[0] < epsilons[1]  # type: ignore[operator]

    other = context(11, 1)  # a node that has not trained yet starts from zero
    rnd = RoundConfig(
        server_round=2,
        seed=1,
        dp_noise_multiplier=1.0,
        dp_max_grad_norm=1.0,
        dp_delta=1e-5,
        local_steps=2,
    )
    reply = app(message(protocol.FIT, content(job, rnd, weights=weights), 11), other)
    assert reply.content.metric_records[protocol.METRICS][protocol.EXAMPLE_EPSILON] == epsilons[0]


# --------------------------------------------------------------------------- secagg


def run_secagg(
    app: Callable[[Message, Context], Message],
    contexts: dict[int, Context],
    job: JobSpec,
    rnd: RoundConfig,
    params: SecAggParams,
    weights: ArrayRecord | None,
    before_masked: Callable[[int, RecordDict], None] | None = None,
) -> tuple[NDArray[np.float64], dict[int, Message]]:
    """Drive one SecAgg+ round through the apps: server session -> messages -> replies."""
    server = ServerSession(
        params,
        run_id=RUN_ID,
        server_round=rnd.server_round,
        node_ids=sorted(contexts),
        rng=np.random.default_rng(0),
    )
    stages: list[tuple[Stage, Callable[[], Mapping[int, SecAggMessage]]]] = [
        (Stage.ADVERTISE_KEYS, server.advertise_keys),
        (Stage.SHARE_KEYS, server.share_keys),
        (Stage.MASKED_INPUT, server.masked_input),
        (Stage.UNMASK, server.unmask),
    ]
    masked_replies = {}
    for stage, open_stage in stages:
        for node, request in open_stage().items():
            extra = {"weights": weights} if stage is Stage.MASKED_INPUT and weights else {}
            body = content(job, rnd, **extra)
            protocol.secagg_to_content(request.to_record(), body)
            if stage is Stage.MASKED_INPUT and before_masked is not None:
                before_masked(node, body)
            msg = message(protocol.STAGE_MESSAGE_TYPE[stage], body, node)
            reply, contexts[node] = over_the_wire(app, msg, contexts[node])
            assert not reply.has_error(), reply.error
            assert set(reply.content.array_records) <= {protocol.SECAGG_ARRAYS}  # never `update`
            if stage is Stage.MASKED_INPUT:
                masked_replies[node] = reply
            server.receive(message_from_record(protocol.secagg_from_content(reply.content)))
    result = server.result()
    total = dequantize_sum(result.total, num_summands=len(result.contributors), params=params)
    return total, masked_replies


def test_secagg_round_sums_exactly_the_fit_updates(encoders: dict[int, NodeConfig]) -> None:
    app = make_client_app(encoders)
    job = vit_job()
    weights = global_weights(job)
    ids = {2**64 - 3: 0, 12: 1, 2**63 + 7: 2}  # Flower node ids are unsigned 64-bit
    contexts = {node: context(node, p) for node, p in ids.items()}
    rnd = RoundConfig(server_round=3, seed=11, clipping_norm=0.05, local_steps=2)
    plain = [
        update_vector(
            app(message(protocol.FIT, content(job, rnd, weights=weights), n), context(n, p))
        )
        for n, p in ids.items()
    ]
    expected = np.sum([v.astype(np.float64) for v in plain], axis=0)
    params = SecAggParams(
        num_clients=3,
        num_neighbours=2,
        threshold=2,
        vector_length=expected.size,
        clipping_range=4.0,
    )

    def malformed_first(node: int, body: RecordDict) -> None:
        # A wrong-dtype weights record is refused; the session survives for the real request.
        broken = RecordDict(dict(body.items()))
        broken["weights"] = ArrayRecord(
            {n: Array(a.numpy().astype(np.float64)) for n, a in weights.items()}
        )
        reason = error_reason(app(message(protocol.SECAGG_MASKED, broken, node), contexts[node]))
        assert "must be float32" in reason

    total, masked = run_secagg(app, contexts, job, rnd, params, weights, malformed_first)
    step = params.quantization_step
    np.testing.assert_allclose(total, expected, rtol=0, atol=3 * step + 1e-6)
    assert total[-2] == pytest.approx(3.0, abs=1e-6)  # all three were clipped
    for reply in masked.values():
        metrics = reply.content.metric_records[protocol.METRICS]
        assert set(metrics) == {"num_examples", "train_loss", "train_seconds"}
    for ctx in contexts.values():
        assert STATE_SECAGG not in ctx.state.config_records  # round done: secrets dropped
    # A node takes part once per round: advertising again for round 3 is refused.
    server = ServerSession(
        params, run_id=RUN_ID, server_round=3, node_ids=sorted(ids), rng=np.random.default_rng(1)
    )
    node, request = next(iter(server.advertise_keys().items()))
    body = content(job, rnd)
    protocol.secagg_to_content(request.to_record(), body)
    assert "already advertised keys" in error_reason(
        app(message(protocol.SECAGG_ADVERTISE, body, node), contexts[node])
    )


def test_sensing_round_through_secagg_gives_the_pooled_normalizer(tmp_path: Path) -> None:
    nodes = {}
    for k, n in enumerate((9, 14, 6)):
        write_demo_dataset("vision", tmp_path / f"s{k}" / "vision", n, seed=20 + k)
        nodes[k] = NodeConfig(NodeType.SENSING, tmp_path / f"s{k}")
    app = make_client_app(nodes)
    job = JobSpec.from_mapping(
        {"component": "sensing", "base_model": "camera", "task": "preproc", "input_size": 32}
    )
    contexts = {100 + k: context(100 + k, k) for k in nodes}
    rnd = RoundConfig(server_round=1, seed=0, clipping_norm=3.0)  # >= sqrt(7): clips nothing
    params = SecAggParams(
        num_clients=3, num_neighbours=2, threshold=2, vector_length=7, clipping_range=64.0
    )
    total, masked = run_secagg(app, contexts, job, rnd, params, None)
    assert [m.content.metric_records["metrics"]["num_examples"] for m in masked.values()] == [
        9,
        14,
        6,
    ]
    plain = app(message(protocol.FIT, content(job, rnd), 100), context(100, 0)).content
    statistics = plain.array_records[protocol.UPDATE]["statistics"].numpy()
    assert statistics.shape == (7,) and statistics[0] == 9.0  # the clear-text path (no SecAgg)
    norm = normalizer_from_sum(job, total)
    pixels = (
        np.concatenate(
            [
                load_images(c.data_dir / "vision", input_size=32)
                .inputs.numpy()
                .transpose(0, 2, 3, 1)
                .reshape(-1, 3)
                for c in nodes.values()
            ]
        )
        / 255.0
    )
    assert norm.count[0] == pytest.approx(29, abs=1e-5)
    np.testing.assert_allclose(norm.mean, pixels.mean(0), rtol=1e-5)
    np.testing.assert_allclose(norm.std, pixels.std(0), rtol=1e-3)


# --------------------------------------------------------------- faults, bad input


def test_injected_fault_is_an_error_reply_only_in_its_round(tmp_path: Path) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    node = NodeConfig(
        NodeType.ENCODER,
        tmp_path,
        faults=NodeConfig.from_flower(
            {"node-type": "encoder", "data-dir": str(tmp_path), "fail-on": "evaluate.eval@2"}
        ).faults,
    )
    app = make_client_app({0: node})
    job = vit_job()
    weights = global_weights(job)
    for server_round in (1, 2):
        rnd = RoundConfig(server_round=server_round, seed=0)
        reply = app(
            message(protocol.EVALUATE, content(job, rnd, weights=weights), 10), context(10, 0)
        )
        if server_round == 1:
            metrics = reply.content.metric_records[protocol.METRICS]
            assert metrics["num_examples"] == 10 and np.isfinite(metrics["eval_loss"])
        else:
            assert "FaultInjectedError" in error_reason(reply)
            assert "evaluate.eval@2" in error_reason(reply)


def test_malformed_messages_are_error_replies_and_leave_the_state_alone(
    encoders: dict[int, NodeConfig],
) -> None:
    app = make_client_app(encoders)
    job = vit_job(**DP_JOB)
    weights = global_weights(job)
    ctx = context(10, 0)
    rnd = RoundConfig(
        server_round=1,
        seed=0,
        dp_noise_multiplier=1.0,
        dp_max_grad_norm=1.0,
        dp_delta=1e-5,
        local_steps=1,
    )
    assert not app(message(protocol.FIT, content(job, rnd, weights=weights), 10), ctx).has_error()
    before = dict(ctx.state.config_records[STATE_DP])

    names = list(weights.keys())
    arrays = protocol.record_to_weights(weights)
    short = ArrayRecord({n: Array(a) for n, a in zip(names[:-1], arrays[:-1], strict=True)})
    reshaped = ArrayRecord(
        {
            n: Array(a.reshape(-1) if i == 0 else a)
            for i, (n, a) in enumerate(zip(names, arrays, strict=True))
        }
    )
    bad_job = content(job, rnd, weights=weights)
    bad_job[protocol.JOB] = job_record(job, learning_rate=-1.0)
    bad_round = content(job, rnd, weights=weights)
    bad_round[protocol.ROUND] = ConfigRecord({"server_round": 1, "seed": 0, "evil": 1})
    negative = RoundConfig(server_round=1, seed=0, clipping_norm=-1.0)
    cases = {
        "no `job` ConfigRecord": RecordDict({protocol.ROUND: rnd.to_record(), "weights": weights}),
        "no `round` ConfigRecord": content(job, None, weights=weights),
        "must carry the `weights` record": content(job, rnd),
        "does not fit the job's model": content(job, rnd, weights=short),
        "model expects": content(job, rnd, weights=reshaped),
        "learning_rate: must be > 0": bad_job,
        "unknown keys": bad_round,
        "`round.clipping_norm` must be a finite number >= 0": content(
            job, negative, weights=weights
        ),
    }
    for expected, body in cases.items():
        reason = error_reason(app(message(protocol.FIT, body, 10), ctx))
        assert expected in reason, (expected, reason)
    secagg_in_fit = content(job, rnd, weights=weights)
    reason = error_reason(app(message(protocol.SECAGG_SHARE, secagg_in_fit, 10), ctx))
    assert "no `secagg` ConfigRecord" in reason
    wrong_length = SecAggParams(
        num_clients=2, num_neighbours=1, threshold=2, vector_length=5, clipping_range=1.0
    )
    server = ServerSession(
        wrong_length, run_id=RUN_ID, server_round=1, node_ids=[10, 11], rng=np.random.default_rng(0)
    )
    advertise = server.advertise_keys()[10]
    body = content(job, rnd)
    protocol.secagg_to_content(advertise.to_record(), body)
    wrong_stage = error_reason(app(message(protocol.SECAGG_SHARE, body, 10), ctx))
    assert "must carry a share_keys request; it carries: advertise_keys request" in wrong_stage
    assert "vector_length is 5" in error_reason(
        app(message(protocol.SECAGG_ADVERTISE, body, 10), ctx)
    )
    assert dict(ctx.state.config_records[STATE_DP]) == before  # nothing spent or lost
    assert STATE_SECAGG not in ctx.state.config_records
