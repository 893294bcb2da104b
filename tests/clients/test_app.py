"""The real ClientApp, called as Flower calls it (``app(message, context)``), on provisioned
nodes (each with its kit) and jobs the operator signed: eligibility without example counts,
refusal of jobs no trusted operator signed, clear-text fit and evaluation with only the allowed
metrics, refusal of clear text under secure aggregation, secure collections driven by the
authenticated SecAgg+ server session (nodes addressed by their identity-derived ids) and
decoded from the ring, distributed DP noise and the survivor sets a node refuses to sign for
it, DP-SGD calibrated on the node, session order, secret sampling, and injected faults and
malformed messages as error replies."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import base64
import json
import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    RecordDict,
)
from flwr.app.message.message import make_message

from aggregation.accountant import SubsampledGaussianEvent, compute_epsilon
from aggregation.codec import Metric, Summed
from aggregation.secagg import (
    Stage,
)
from clients import protocol
from clients.app import STATE_DP, STATE_SECAGG, STATE_SECAGG_ROUND, make_client_app
from clients.config import NodeConfig
from clients.credentials import IDENTITY_FILE, load_identity
from clients.datasets import model_data, moment_rows, sensing_values
from clients.demo_data import write_demo_dataset
from clients.jobs import (
    analytics_row_bound,
    dp_sgd_noise_multiplier,
    dp_sgd_steps,
    loss_bound,
    metrics_for,
    min_survivors,
    model_spec_for_job,
    release_events,
    update_length_for,
)
from clients.node import Node, NodeState, public_unigram_log_probs
from clients.protocol import RoundConfig, Work
from clients.sensing import IOT_RANGES, FeatureRanges, normalizer_from_centred_sum
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec
from manifests.keys import SigningKey
from manifests.signed_job import sign_job
from tests.support.client_apps import (
    BIG_IDS,
    RUN_ID,
    TINY,
    App,
    Nodes,
    content,
    context,
    drive_secure_collection,
    error_reason,
    iot_job,
    message,
    named,
    over_the_wire,
    own_sums,
    run_secure_collection,
    secure_layout,
    server_session,
    vit_job,
    weights_record,
    write_nodes,
)
from tests.support.federation import provision

EXAMPLE_DP = {  # batches of 2: Poisson rate 0.2 keeps the node's calibration fast
    "batch_size": 2,
    "privacy_level": "dp",
    "dp": {"unit": "example", "clipping_norm": 1.0, "target_epsilon": 4.0, "delta": 1e-5},
    "federation": {"num_rounds": 2},
}
NODE_Z, NODE_C = 1.0, 0.05
NODE_DP = {"unit": "node", "clipping_norm": NODE_C, "noise_multiplier": NODE_Z, "delta": 1e-5}


def plain_sums(reply: Message, job: JobSpec, work: Work, *, update_length: int = 0) -> Summed:
    assert not reply.has_error(), reply.error
    return protocol.summed_from_content(
        reply.content,
        update_length=update_length,
        metrics=metrics_for(job, work),
        statistics_length=0,
    )


def dp_steps(ctx: Context) -> list[SubsampledGaussianEvent]:
    record = ctx.state.config_records[STATE_DP]
    columns = [record[k] for k in ("noise_multiplier", "sample_rate", "steps")]
    return [
        SubsampledGaussianEvent(float(z), float(q), int(n))
        for z, q, n in zip(*columns, strict=True)
    ]


@pytest.fixture
def encoders(tmp_path: Path) -> Nodes:
    return write_nodes(tmp_path, "vision", NodeType.ENCODER, (20, 20, 20))


# ------------------------------------------------------------------------- node_info


def test_node_info_says_eligible_or_why_not_and_never_reports_an_example_count(
    tmp_path: Path, encoders: Nodes
) -> None:
    write_demo_dataset("vision", tmp_path / "big" / "vision", 60, seed=5)
    federation = provision(tmp_path / "four", 4, NodeType.ENCODER)
    data = [encoders.configs[0].data_dir, tmp_path / "big", encoders.configs[0].data_dir]
    nodes = federation.node_configs([*data, tmp_path / "missing"])
    nodes[2] = replace(nodes[2], node_type=NodeType.SENSING)
    app = make_client_app(nodes)
    job = vit_job()
    envelope = federation.sign(job)
    records = []
    for partition in range(4):
        reply = app(
            message(protocol.NODE_INFO, content(envelope), 10 + partition),
            context(10 + partition, partition),
        )
        assert not reply.has_error(), reply.error
        assert set(reply.content) == {protocol.NODE_INFO_RECORD}
        records.append(reply.content.config_records[protocol.NODE_INFO_RECORD])
    for record in records:
        assert "num_examples" not in record
        assert all(isinstance(v, str | bool) for v in record.values())  # no count anywhere
    infos = [protocol.NodeInfo.from_record(r) for r in records]
    assert infos[0].eligible and infos[0].model_fingerprint.startswith("sha256:")
    # 10 and 30 training examples: nothing but the nodes' identities tells them apart.
    assert replace(infos[0], identity_key="") == replace(infos[1], identity_key="")
    assert not infos[2].eligible and "for encoder nodes; this is a sensing node" in infos[2].reason
    assert not infos[3].eligible and "does not exist" in infos[3].reason
    # Eligible or not, each node says who it is: the identity key of its kit.
    keys = [load_identity(kit / IDENTITY_FILE).public_key for kit in federation.kits]
    assert [info.identity_public_key for info in infos] == keys


def test_deployed_app_reads_its_node_from_the_supernode_config(tmp_path: Path) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    federation = provision(tmp_path / "federation", 1, NodeType.ENCODER)
    envelope = federation.sign(vit_job())
    app = make_client_app()
    ctx = Context(
        run_id=RUN_ID,
        node_id=5,
        state=RecordDict(),
        run_config={},
        node_config={
            "node-type": "encoder",
            "data-dir": str(tmp_path),
            "kit": str(federation.kits[0]),
        },
    )
    reply = app(message(protocol.NODE_INFO, content(envelope), 5), ctx)
    assert reply.content.config_records[protocol.NODE_INFO_RECORD]["eligible"] is True
    ctx.node_config = {**ctx.node_config, "node-type": "sensing"}
    reply = app(message(protocol.NODE_INFO, content(envelope), 5), ctx)
    assert reply.content.config_records[protocol.NODE_INFO_RECORD]["eligible"] is False
    ctx.node_config = {"node-type": "encoder", "data-dir": str(tmp_path)}  # no kit
    info = app(message(protocol.NODE_INFO, content(envelope), 5), ctx).content.config_records[
        protocol.NODE_INFO_RECORD
    ]
    assert info["eligible"] is False and "this node is not provisioned" in str(info["reason"])
    ctx.node_config = {"data-dir": str(tmp_path)}
    reason = error_reason(app(message(protocol.NODE_INFO, content(envelope), 5), ctx))
    assert "NodeConfigError" in reason and "node-type: is required" in reason


def test_simulation_app_refuses_a_partition_it_has_no_node_for(encoders: Nodes) -> None:
    app = make_client_app(encoders.configs)
    body = content(encoders.sign(vit_job()))
    reason = error_reason(app(message(protocol.NODE_INFO, body, 9), context(9, 7)))
    assert "No node is configured for partition 7" in reason


# ----------------------------------------------------------------------- signed jobs


def _tampered(envelope: bytes) -> bytes:
    """The envelope with one job field changed after signing (a server raising the rounds)."""
    document = json.loads(envelope)
    payload = json.loads(base64.b64decode(document["payload"]))
    payload["job"]["federation.num_rounds"] = 50
    document["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(document).encode()


def test_a_job_not_signed_by_a_trusted_operator_is_refused_at_node_info_and_at_fit(
    encoders: Nodes,
) -> None:
    app = make_client_app(encoders.configs)
    job = vit_job(dp={"clipping_norm": 0.05})
    weights = weights_record(job)
    rnd = RoundConfig(server_round=1, seed=3)
    now = datetime.now(UTC)
    operator = SigningKey.from_pem(encoders.federation.signing_key.read_bytes())
    genuine = encoders.sign(job)
    assert (
        "federation.num_rounds"
        in json.loads(base64.b64decode(json.loads(genuine)["payload"]))["job"]
    )
    forged = {
        "tampered": (_tampered(genuine), "DSSE signature does not verify under trusted key"),
        "another key": (
            sign_job(job, SigningKey.generate(), federation="test-federation", issued_at=now),
            "is not in the trusted-keys file",
        ),
        "another federation": (
            sign_job(job, operator, federation="other-federation", issued_at=now),
            "signed for federation 'other-federation'; this node belongs to 'test-federation'",
        ),
    }
    ctx = context(10, 0)
    for case, (envelope, why) in forged.items():
        reply = app(message(protocol.NODE_INFO, content(envelope), 10), ctx)
        info = protocol.NodeInfo.from_record(
            reply.content.config_records[protocol.NODE_INFO_RECORD]
        )
        assert not info.eligible and info.model_fingerprint == "", case
        assert why in info.reason, (case, info.reason)
        reason = error_reason(
            app(message(protocol.FIT, content(envelope, rnd, weights=weights), 10), ctx)
        )
        assert "JobRefusedError" in reason and why in reason, (case, reason)
    assert ctx.state.config_records == {}  # nothing was trained or started
    reply = app(message(protocol.FIT, content(genuine, rnd, weights=weights), 10), ctx)
    assert not reply.has_error(), reply.error  # the operator's own envelope is accepted


# ------------------------------------------------------------------------------ fit


def test_clear_text_fit_returns_a_clipped_update_of_the_model_length_with_examples_and_loss(
    encoders: Nodes,
) -> None:
    app = make_client_app(encoders.configs)
    job = vit_job(dp={"clipping_norm": 0.05})  # level none, with an update bound
    weights = weights_record(job)
    length = update_length_for(job)
    rnd = RoundConfig(server_round=1, seed=3)
    body = content(encoders.sign(job), rnd, weights=weights)
    reply = app(message(protocol.FIT, body, 10), context(10, 0))
    assert set(reply.content) == {protocol.UPDATE, protocol.METRICS}
    summed = plain_sums(reply, job, Work.FIT, update_length=length)
    assert length == sum(a.size for _, a in named(weights))
    assert float(np.linalg.norm(summed.update)) == pytest.approx(0.05, rel=1e-5)
    assert set(summed.metrics) == {Metric.EXAMPLES, Metric.TRAIN_LOSS}
    assert summed.metrics[Metric.EXAMPLES] == 10  # 20 examples, one per class held out
    loss = summed.metrics[Metric.TRAIN_LOSS]
    assert 0 < loss <= 10 * loss_bound(job) and math.isfinite(loss)

    unclipped = vit_job()  # level none without a bound: the update is not clipped
    body = content(encoders.sign(unclipped), rnd, weights=weights)
    reply = app(message(protocol.FIT, body, 10), context(10, 0))
    summed = plain_sums(reply, unclipped, Work.FIT, update_length=length)
    assert float(np.linalg.norm(summed.update)) > 0.05


def test_clear_text_fit_under_dp_releases_only_counts(encoders: Nodes) -> None:
    app = make_client_app(encoders.configs)
    rnd = RoundConfig(server_round=1, seed=3)
    node_level = vit_job(privacy_level="dp", dp=NODE_DP)
    weights = weights_record(node_level)
    length = update_length_for(node_level)
    body = content(encoders.sign(node_level), rnd, weights=weights)
    reply = app(message(protocol.FIT, body, 10), context(10, 0))
    summed = plain_sums(reply, node_level, Work.FIT, update_length=length)
    assert summed.metrics == {Metric.CLIPPED: 1.0}  # no loss, not even a count
    assert float(np.linalg.norm(summed.update)) == pytest.approx(0.05, rel=1e-5)

    example_level = vit_job(**EXAMPLE_DP)
    body = content(encoders.sign(example_level), rnd, weights=weights)
    reply = app(message(protocol.FIT, body, 10), context(10, 0))
    summed = plain_sums(reply, example_level, Work.FIT, update_length=length)
    assert set(summed.metrics) == {Metric.EXAMPLES}  # the count only, no training loss
    assert float(np.linalg.norm(summed.update)) <= 1.0 + 1e-5  # the update bound (C)


# ------------------------------------------------------------------------- evaluate


def test_clear_text_eval_returns_per_example_sums_and_the_classifier_heads_top1(
    encoders: Nodes,
) -> None:
    app = make_client_app(encoders.configs)
    job = vit_job()
    # A head that ignores the embedding and prefers class 3 by a margin b: every held-out
    # example is predicted as class 3, with a known cross-entropy.
    b = 2.0
    arrays = dict(named(weights_record(job)))
    arrays["classifier.weight"] = np.zeros_like(arrays["classifier.weight"])
    arrays["classifier.bias"] = np.where(np.arange(10) == 3, b, 0.0).astype(np.float32)
    weights = protocol.weights_to_record(list(arrays), list(arrays.values()))
    rnd = RoundConfig(server_round=1, work=Work.EVALUATE)
    body = content(encoders.sign(job), rnd, weights=weights)
    reply = app(message(protocol.EVALUATE, body, 10), context(10, 0))
    assert set(reply.content) == {protocol.METRICS}  # no update, no statistics
    summed = plain_sums(reply, job, Work.EVALUATE)
    data = model_data(job, model_spec_for_job(job), encoders.configs[0].data_dir)
    held = [int(data.labels[i]) for i in data.held_out.indices]
    threes = held.count(3)
    assert summed.metrics[Metric.EXAMPLES] == len(held) == 10
    assert summed.metrics[Metric.EVAL_CORRECT] == threes == 1
    log_z = math.log(math.exp(b) + 9)
    expected = threes * (log_z - b) + (len(held) - threes) * log_z
    assert summed.metrics[Metric.EVAL_LOSS] == pytest.approx(expected, rel=1e-5)


def test_lm_eval_reports_next_byte_accuracy_and_the_public_unigram_baseline(
    tmp_path: Path,
) -> None:
    nodes = write_nodes(tmp_path, "lm", NodeType.INFERENCE, (30,))
    app = make_client_app(nodes.configs)
    job = JobSpec.from_mapping(
        {
            "component": "inference",
            "base_model": "gpt-small-v1",
            "task": "lm-finetune",
            "max_seq_length": 32,
            **TINY,
        }
    )
    rnd = RoundConfig(server_round=0, work=Work.EVALUATE)
    sums = []
    for seed in (1, 2):  # two different global models
        weights = weights_record(job, seed=seed)
        body = content(nodes.sign(job), rnd, weights=weights)
        reply = app(message(protocol.EVALUATE, body, 10), context(10, 0))
        sums.append(plain_sums(reply, job, Work.EVALUATE))
    for summed in sums:
        assert set(summed.metrics) == {
            Metric.EXAMPLES,
            Metric.EVAL_LOSS,
            Metric.EVAL_CORRECT,
            Metric.BASELINE_LOSS,
        }
        n = summed.metrics[Metric.EXAMPLES]
        assert n >= 1 and n == int(n)
        assert 0 <= summed.metrics[Metric.EVAL_CORRECT] <= n
        assert 0 < summed.metrics[Metric.EVAL_LOSS] <= n * loss_bound(job)
        assert all(math.isfinite(v) for v in summed.metrics.values())
    # The baseline is the public unigram model's: the same whatever the global model, and
    # better than a uniform byte model on the node's text.
    baseline = sums[0].metrics[Metric.BASELINE_LOSS]
    assert baseline == pytest.approx(sums[1].metrics[Metric.BASELINE_LOSS], rel=1e-6)
    assert 0 < baseline / sums[0].metrics[Metric.EXAMPLES] < math.log(256)
    assert public_unigram_log_probs().shape == (260,)


# ------------------------------------------------------------- clear text is refused


@pytest.mark.parametrize("level", ["secure-agg", "dp+secure-agg"])
def test_secure_agg_levels_refuse_clear_text_fit_and_eval(encoders: Nodes, level: str) -> None:
    app = make_client_app(encoders.configs)
    extra: dict[str, object] = {"privacy_level": level}
    if level == "dp+secure-agg":
        extra |= {"dp": NODE_DP, "federation": {"clients_per_round": 3}}
    job = vit_job(**extra)
    weights = weights_record(job)
    ctx = context(10, 0)
    for message_type, work in ((protocol.FIT, Work.FIT), (protocol.EVALUATE, Work.EVALUATE)):
        rnd = RoundConfig(server_round=1, work=work)
        body = content(encoders.sign(job), rnd, weights=weights)
        reason = error_reason(app(message(message_type, body, 10), ctx))
        assert "SecAggRefusedError" in reason and "never in the clear" in reason
    assert STATE_DP not in ctx.state.config_records  # nothing was trained


def test_a_node_refuses_secagg_for_a_job_without_secure_aggregation(encoders: Nodes) -> None:
    app = make_client_app(encoders.configs)
    job = vit_job()
    rnd = RoundConfig(server_round=1)
    server = server_session(encoders, update_length_for(job) + 2, rnd.secagg_round)
    body = content(encoders.sign(job), rnd)
    request = server.advertise_keys()[encoders.secagg_id(0)]
    protocol.secagg_to_content(request.to_record(), body)
    reason = error_reason(app(message(protocol.SECAGG_ADVERTISE, body, 10), context(10, 0)))
    assert "uses no secure aggregation" in reason


# ------------------------------------------------------------------ secure collections


def test_secure_fit_and_eval_collections_decode_to_the_sum_of_the_nodes_own_contributions(
    encoders: Nodes,
) -> None:
    app = make_client_app(encoders.configs)
    job = vit_job(privacy_level="secure-agg", secagg={"quantization_range": 0.05})
    weights = weights_record(job)
    ids = dict(zip(BIG_IDS, range(3), strict=True))
    contexts = {node: context(node, p) for node, p in ids.items()}
    fit = RoundConfig(server_round=3, seed=11)

    def malformed_first(node: int, body: RecordDict) -> None:
        # A wrong-dtype weights record is refused; the session survives for the real request.
        broken = RecordDict(dict(body.items()))
        broken[protocol.WEIGHTS] = ArrayRecord(
            {n: Array(a.numpy().astype(np.float64)) for n, a in weights.items()}
        )
        reply, contexts[node] = over_the_wire(
            app, message(protocol.SECAGG_MASKED, broken, node), contexts[node]
        )
        assert "must be float32" in error_reason(reply)
        assert STATE_SECAGG in contexts[node].state.config_records

    total = run_secure_collection(app, encoders, contexts, job, fit, weights, malformed_first)
    expected = own_sums(encoders, ids, job, fit, weights)
    layout = secure_layout(job, Work.FIT, 3)
    assert total.update.shape == (update_length_for(job),)
    # Stochastic rounding moves each node's coordinate by less than one step.
    np.testing.assert_allclose(total.update, expected.update, rtol=0, atol=3 * layout.update_step)
    assert 0 < float(np.linalg.norm(expected.update)) <= 3 * 0.05 * (1 + 1e-5)
    assert total.metrics[Metric.EXAMPLES] == expected.metrics[Metric.EXAMPLES] == 30  # exact
    # Each example's loss is rounded to the metric grid on its own.
    grid = 1 / layout.metric_scales[1]
    assert total.metrics[Metric.TRAIN_LOSS] == pytest.approx(
        expected.metrics[Metric.TRAIN_LOSS], abs=3 * grid
    )
    for ctx in contexts.values():
        assert STATE_SECAGG not in ctx.state.config_records  # session done: secrets dropped

    evaluation = RoundConfig(server_round=3, work=Work.EVALUATE)
    total = run_secure_collection(app, encoders, contexts, job, evaluation, weights)
    expected = own_sums(encoders, ids, job, evaluation, weights)
    assert total.update.size == 0
    assert (
        total.metrics[Metric.EXAMPLES] == 30
        and total.metrics[Metric.EVAL_CORRECT] == (expected.metrics[Metric.EVAL_CORRECT])
    )
    eval_grid = 1 / secure_layout(job, Work.EVALUATE, 3).metric_scales[1]
    assert total.metrics[Metric.EVAL_LOSS] == pytest.approx(
        expected.metrics[Metric.EVAL_LOSS], abs=30 * eval_grid / 2
    )


def test_secure_analytics_collections_decode_ranges_then_moments_to_the_pooled_normalizer(
    tmp_path: Path,
) -> None:
    nodes = write_nodes(tmp_path, "iot", NodeType.SENSING, (40, 70, 25))
    app = make_client_app(nodes.configs)
    job = iot_job(privacy_level="secure-agg")
    ids = {100 + k: k for k in nodes.configs}
    contexts = {node: context(node, p) for node, p in ids.items()}

    ranges = RoundConfig(server_round=1, work=Work.RANGES)
    total = run_secure_collection(app, nodes, contexts, job, ranges)
    expected = own_sums(nodes, ids, job, ranges, None)
    step = secure_layout(job, Work.RANGES, 3).statistics_step
    assert total.statistics.shape == expected.statistics.shape == (5 * 64,)
    np.testing.assert_allclose(total.statistics, expected.statistics, atol=135 * step / 2)
    bound = analytics_row_bound(job, Work.RANGES)
    counts = (total.statistics * bound).reshape(5, 64).sum(axis=1)
    np.testing.assert_allclose(counts, 135, rtol=1e-3)  # every example, once per feature

    values = np.concatenate([sensing_values(job, c.data_dir) for c in nodes.configs.values()])
    low, high = values.min(axis=(0, 1)) - 1.0, values.max(axis=(0, 1)) + 1.0
    moments = RoundConfig(
        server_round=1, work=Work.MOMENTS, range_low=tuple(low), range_high=tuple(high)
    )
    total = run_secure_collection(app, nodes, contexts, job, moments)
    expected = own_sums(nodes, ids, job, moments, None)
    bound = analytics_row_bound(job, Work.MOMENTS)
    np.testing.assert_allclose(total.statistics, expected.statistics, atol=135 * step / 2)
    pooled = moment_rows(values, low, high).sum(axis=0)  # without DP no row is clipped
    np.testing.assert_allclose(total.statistics * bound, pooled, atol=135 * step * bound)
    norm = normalizer_from_centred_sum(
        FeatureRanges(IOT_RANGES.features, low, high), total.statistics * bound
    )
    rows = values[:, 0, :]
    assert norm.count[0] == pytest.approx(135, rel=1e-4)
    # Fixed-point rows (step 2^-12 after scaling by 1 / sqrt(11)): errors of ~1e-3 half-ranges.
    half = (high - low) / 2
    assert np.all(np.abs(norm.mean - rows.mean(axis=0)) <= 1e-3 * half)
    assert np.all(np.abs(norm.std - rows.std(axis=0)) <= 1e-2 * rows.std(axis=0) + 1e-3 * half)


# ------------------------------------------------------------------ distributed DP


def _residual_variance(total: Summed, expected: Summed) -> float:
    residual = total.update - expected.update
    return float(np.mean(np.square(residual - residual.mean())))


def test_dp_secure_agg_sum_differs_from_the_noiseless_sum_by_noise_of_the_planned_variance(
    encoders: Nodes,
) -> None:
    app = make_client_app(encoders.configs)
    job = vit_job(privacy_level="dp+secure-agg", dp=NODE_DP, federation={"clients_per_round": 3})
    weights = weights_record(job)
    ids = dict(zip(BIG_IDS, range(3), strict=True))
    contexts = {node: context(node, p) for node, p in ids.items()}
    rnd = RoundConfig(server_round=1, seed=5)
    total = run_secure_collection(app, encoders, contexts, job, rnd, weights)
    expected = own_sums(encoders, ids, job, rnd, weights)

    # Each node adds the share of min_survivors = floor(3 (1 - 0.2)) = 2 nodes: the noise of
    # any 2 honest shares is (z C)^2; the 3 shares of this sum carry 3/2 of it.
    n_min = min_survivors(job, 3)
    assert n_min == 2 and min_survivors(job, 10) == 8
    planned = 3 / n_min * (NODE_Z * NODE_C) ** 2
    assert total.update.shape == expected.update.shape
    assert _residual_variance(total, expected) == pytest.approx(planned, rel=0.05)
    assert abs(float(np.mean(total.update - expected.update))) < 5 * math.sqrt(
        planned / total.update.size
    )
    # The released metric (how many updates were clipped) is noised too.
    units = secure_layout(job, Work.FIT, 3).metric_units
    std = job.dp.metrics_noise_multiplier * math.sqrt(3 / n_min) / units[0]
    assert expected.metrics == {Metric.CLIPPED: 3.0}
    assert total.metrics[Metric.CLIPPED] != expected.metrics[Metric.CLIPPED]
    assert abs(total.metrics[Metric.CLIPPED] - 3.0) < 6 * std


def test_dp_secure_agg_analytics_sum_carries_the_planned_noise_on_every_statistic(
    tmp_path: Path,
) -> None:
    nodes = write_nodes(tmp_path, "iot", NodeType.SENSING, (40, 70, 25))
    app = make_client_app(nodes.configs)
    z = 0.5
    job = iot_job(
        privacy_level="dp+secure-agg",
        dp={"unit": "example", "noise_multiplier": z, "delta": 1e-5, "planned_dropout": 0.0},
    )
    ids = {100 + k: k for k in nodes.configs}
    contexts = {node: context(node, p) for node, p in ids.items()}
    rnd = RoundConfig(server_round=1, work=Work.RANGES)
    total = run_secure_collection(app, nodes, contexts, job, rnd)
    expected = own_sums(nodes, ids, job, rnd, None)
    # No planned dropout: the 3 shares together carry exactly (z * 1)^2 per statistic (rows
    # have L2 norm <= 1), 320 statistics of one release.
    assert min_survivors(job, 3) == 3
    residual = total.statistics - expected.statistics
    assert residual.shape == (5 * 64,)
    assert float(np.var(residual)) == pytest.approx(z**2, rel=0.3)
    assert abs(float(np.mean(residual))) < 5 * z / math.sqrt(residual.size)


def test_a_node_refuses_a_consistency_check_whose_survivor_set_is_too_small_for_its_noise(
    tmp_path: Path,
) -> None:
    nodes = write_nodes(tmp_path, "iot", NodeType.SENSING, (20, 20, 20, 20))
    app = make_client_app(nodes.configs)
    dp = {"unit": "example", "noise_multiplier": 0.5, "delta": 1e-5}
    ids = {100 + k: k for k in nodes.configs}
    contexts = {node: context(node, p) for node, p in ids.items()}

    # No planned dropout: each node's noise share is sized for all 4 survivors. When one node
    # drops after masking, the other three refuse to sign the survivor set of 3 -- signing it
    # would let the server unmask a sum that carries only 3/4 of the planned noise. (3 is
    # within the nodes' SecAgg+ minimum group: the distributed noise alone refuses it.)
    strict = iot_job(privacy_level="dp+secure-agg", dp={**dp, "planned_dropout": 0.0})
    assert min_survivors(strict, 4) == 4
    ranges = RoundConfig(server_round=1, work=Work.RANGES)
    driven = drive_secure_collection(
        app,
        nodes,
        contexts,
        strict,
        ranges,
        silent_in_masked_input={103},
        until=Stage.CONSISTENCY_CHECK,
    )
    assert set(driven.errors) == {Stage.CONSISTENCY_CHECK}
    refusals = driven.errors[Stage.CONSISTENCY_CHECK]
    assert sorted(refusals) == [100, 101, 102]
    for reason in refusals.values():
        assert "SecAggRefusedError" in reason
        assert "refuses to sign a survivor set of 3" in reason and "at least 4" in reason
    assert driven.session.state.consistency_signatures == {}  # nothing to unmask with

    # Sized for 3 survivors (planned dropout 0.25), the same dropout is within the plan: the
    # three sign and their sum is unmasked.
    planned = iot_job(privacy_level="dp+secure-agg", dp={**dp, "planned_dropout": 0.25})
    assert min_survivors(planned, 4) == 3
    again = RoundConfig(server_round=2, work=Work.RANGES)
    driven = drive_secure_collection(
        app, nodes, contexts, planned, again, silent_in_masked_input={103}
    )
    assert driven.errors == {}
    assert sorted(driven.session.result().contributors) == sorted(
        nodes.secagg_id(p) for p in (0, 1, 2)
    )


def test_secret_sampling_includes_data_at_rate_q_and_otherwise_contributes_zeros_and_noise(
    encoders: Nodes,
) -> None:
    def job_at(fraction: float) -> JobSpec:
        return vit_job(
            privacy_level="dp+secure-agg",
            dp=NODE_DP,
            federation={"clients_per_round": 3, "sampling": "secret", "fraction": fraction},
        )

    # The draw comes from the node's own CSPRNG: about a fraction q of the rounds include data.
    node = Node(encoders.configs[0], node_id=10)
    q = 0.3
    draws = [node._included(job_at(q)) for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(q, abs=0.04)

    # A node that includes nothing contributes a zero update and no metric row ...
    job = job_at(0.5)
    weights = weights_record(job)
    rnd = RoundConfig(server_round=1, seed=2)
    seen: set[bool] = set()
    for _ in range(40):
        part = node.contribution(job, rnd, named(weights), NodeState())
        included = bool(part.update.any())
        seen.add(included)
        assert part.metric_rows.shape == ((1, 1) if included else (0, 1))
        if seen == {True, False}:
            break
    assert seen == {True, False}

    # ... and still adds its noise share: a round where (almost surely) no node includes its
    # data decodes to pure noise of the planned variance.
    job = job_at(1e-9)
    app = make_client_app(encoders.configs)
    contexts = {n: context(n, p) for n, p in zip(BIG_IDS, range(3), strict=True)}
    total = run_secure_collection(app, encoders, contexts, job, rnd, weights)
    planned = 3 / min_survivors(job, 3) * (NODE_Z * NODE_C) ** 2
    assert float(np.var(total.update)) == pytest.approx(planned, rel=0.05)
    assert abs(float(np.mean(total.update))) < 5 * math.sqrt(planned / total.update.size)
    std = (
        job.dp.metrics_noise_multiplier
        * math.sqrt(1.5)
        / secure_layout(job, Work.FIT, 3).metric_units[0]
    )
    assert abs(total.metrics[Metric.CLIPPED]) < 6 * std


# ---------------------------------------------------------------------------- DP-SGD


def test_dp_sgd_noise_is_calibrated_on_the_node_and_its_events_accumulate_in_the_state(
    encoders: Nodes,
) -> None:
    app = make_client_app(encoders.configs)
    job = vit_job(**EXAMPLE_DP)
    envelope = encoders.sign(job)
    weights = weights_record(job)
    ctx = context(10, 0)
    sigma = dp_sgd_noise_multiplier(job, 10)  # the node's own count: 10 training examples
    rate, steps = dp_sgd_steps(job, 10)
    assert (rate, steps) == (0.2, 5)
    for server_round in (1, 2):
        rnd = RoundConfig(server_round=server_round, seed=1)
        reply = app(message(protocol.FIT, content(envelope, rnd, weights=weights), 10), ctx)
        assert not reply.has_error(), reply.error
        events = dp_steps(ctx)
        assert sum(e.steps for e in events) == steps * server_round
        assert {(e.noise_multiplier, e.sample_rate) for e in events} == {(sigma, rate)}
    # Over the planned rounds, DP-SGD plus every metric release stays within the target.
    releases = release_events(job, noise_multiplier=1.0, update_length=0)
    epsilon = compute_epsilon([*dp_steps(ctx), *releases], delta=1e-5)
    assert 0.9 * 4.0 < epsilon <= 4.0 * (1 + 1e-3)
    # A node with more data calibrates less noise; the server never learned either count.
    assert dp_sgd_noise_multiplier(job, 1000) < sigma

    other = context(11, 1)  # a node that has not trained yet starts from zero
    rnd = RoundConfig(server_round=2, seed=1)
    body = content(envelope, rnd, weights=weights)
    assert not app(message(protocol.FIT, body, 11), other).has_error()
    assert sum(e.steps for e in dp_steps(other)) == steps


# ------------------------------------------------------------------- session order


def _advertise(
    app: App,
    nodes: Nodes,
    ctx: Context,
    job: JobSpec,
    rnd: RoundConfig,
    session: int | None = None,
) -> Message:
    """Ask ``ctx``'s node (partition 0) to advertise keys for an authenticated session."""
    layout = secure_layout(job, rnd.work, 3)
    server = server_session(nodes, layout.length, rnd.secagg_round if session is None else session)
    body = content(nodes.sign(job), rnd)
    request = server.advertise_keys()[nodes.secagg_id(0)]
    protocol.secagg_to_content(request.to_record(), body)
    message_type = protocol.secagg_message_type(rnd.work.category, Stage.ADVERTISE_KEYS)
    return app(message(message_type, body, ctx.node_id), ctx)


def test_a_node_refuses_an_older_or_repeated_secagg_session_and_a_mismatched_one(
    encoders: Nodes,
) -> None:
    app = make_client_app(encoders.configs)
    job = vit_job(privacy_level="secure-agg")
    ctx = context(10, 0)
    fit2 = RoundConfig(server_round=2)
    assert not _advertise(app, encoders, ctx, job, fit2).has_error()
    started = dict(ctx.state.config_records[STATE_SECAGG_ROUND])
    assert started["round"] == fit2.secagg_round

    not_newer = f"is not newer than round {fit2.secagg_round}, which this node already took part"
    older = RoundConfig(server_round=1, work=Work.EVALUATE)
    assert not_newer in error_reason(_advertise(app, encoders, ctx, job, older))
    assert not_newer in error_reason(_advertise(app, encoders, ctx, job, fit2))
    mismatched = error_reason(
        _advertise(app, encoders, ctx, job, fit2, session=fit2.secagg_round + 1)
    )
    assert f"is for session {fit2.secagg_round + 1}" in mismatched
    assert dict(ctx.state.config_records[STATE_SECAGG_ROUND]) == started  # unchanged
    # The last session is kept in the node's kit, not only in Flower's state: a restarted
    # node (fresh context) still refuses to join it again.
    restarted = context(10, 0)
    assert not_newer in error_reason(_advertise(app, encoders, restarted, job, fit2))

    eval2 = RoundConfig(server_round=2, work=Work.EVALUATE)
    assert not _advertise(app, encoders, ctx, job, eval2).has_error()  # the next: newer
    assert ctx.state.config_records[STATE_SECAGG_ROUND]["round"] == eval2.secagg_round


# --------------------------------------------------------------- faults, bad input


def test_injected_fault_is_an_error_reply_only_in_its_round(tmp_path: Path) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    federation = provision(tmp_path / "federation", 1, NodeType.ENCODER)
    node = NodeConfig.from_flower(
        {
            "node-type": "encoder",
            "data-dir": str(tmp_path),
            "fail-on": "evaluate.eval@2",
            "kit": str(federation.kits[0]),
        }
    )
    app = make_client_app({0: node})
    job = vit_job()
    envelope = federation.sign(job)
    weights = weights_record(job)
    for server_round in (1, 2, 3):
        rnd = RoundConfig(server_round=server_round, work=Work.EVALUATE)
        reply = app(
            message(protocol.EVALUATE, content(envelope, rnd, weights=weights), 10),
            context(10, 0),
        )
        if server_round == 2:
            reason = error_reason(reply)
            assert "FaultInjectedError" in reason and "evaluate.eval@2" in reason
        else:
            summed = plain_sums(reply, job, Work.EVALUATE)
            assert summed.metrics[Metric.EXAMPLES] == 10
            assert math.isfinite(summed.metrics[Metric.EVAL_LOSS])
    rnd = RoundConfig(server_round=2)
    fit = app(message(protocol.FIT, content(envelope, rnd, weights=weights), 10), context(10, 0))
    assert not fit.has_error()  # another message type in the same round


def test_malformed_messages_are_error_replies_and_leave_the_state_alone(encoders: Nodes) -> None:
    app = make_client_app(encoders.configs)
    job = vit_job(**EXAMPLE_DP)
    envelope = encoders.sign(job)
    weights = weights_record(job)
    ctx = context(10, 0)
    rnd = RoundConfig(server_round=1, seed=0)
    body = content(envelope, rnd, weights=weights)
    assert not app(message(protocol.FIT, body, 10), ctx).has_error()
    before = dict(ctx.state.config_records[STATE_DP])

    names = list(weights.keys())
    arrays = protocol.record_to_weights(weights)
    short = protocol.weights_to_record(names[:-1], arrays[:-1])
    reshaped = protocol.weights_to_record(names, [arrays[0].reshape(-1), *arrays[1:]])
    # The operator signed an invalid job (validation skipped): the node validates it itself.
    invalid = encoders.sign(job.model_copy(update={"learning_rate": -1.0}))
    bad_job = content(invalid, rnd, weights=weights)
    two_values = content(envelope, rnd, weights=weights)
    two_values[protocol.SIGNED_JOB] = ConfigRecord({"envelope": envelope, "job": b"{}"})
    not_json = content(b"not an envelope", rnd, weights=weights)
    private_knob = content(envelope, rnd, weights=weights)
    private_knob[protocol.ROUND] = ConfigRecord(
        {"server_round": 1, "work": "fit", "dp_noise_multiplier": 0.1}
    )
    wrong_work = content(envelope, RoundConfig(server_round=1, work=Work.EVALUATE), weights=weights)
    cases = {
        "no `signed_job` record": RecordDict(
            {protocol.ROUND: rnd.to_record(), protocol.WEIGHTS: weights}
        ),
        "must hold exactly one bytes value `envelope`": two_values,
        "not signed by an operator this node trusts: envelope: invalid JSON": not_json,
        "no `round` ConfigRecord": content(envelope, None, weights=weights),
        "must carry the `weights` record": content(envelope, rnd),
        "does not fit the job's model": content(envelope, rnd, weights=short),
        "model expects": content(envelope, rnd, weights=reshaped),
        "not a valid job spec: learning_rate: must be > 0": bad_job,
        "unknown keys ['dp_noise_multiplier']": private_knob,  # no privacy knob from the server
        "cannot carry evaluate work": wrong_work,
    }
    for expected, body in cases.items():
        reason = error_reason(app(message(protocol.FIT, body, 10), ctx))
        assert expected in reason, (expected, reason)
    sensing_work = content(envelope, RoundConfig(server_round=1, work=Work.RANGES), weights=weights)
    assert "has no ranges collections" in error_reason(
        app(message(protocol.FIT, sensing_work, 10), ctx)
    )

    secure = vit_job(privacy_level="secure-agg")
    secagg_in_fit = content(encoders.sign(secure), rnd, weights=weights)
    reason = error_reason(app(message(protocol.SECAGG_SHARE, secagg_in_fit, 10), ctx))
    assert "no `secagg` ConfigRecord" in reason
    server = server_session(encoders, 5, rnd.secagg_round)
    body = content(encoders.sign(secure), rnd)
    protocol.secagg_to_content(server.advertise_keys()[encoders.secagg_id(0)].to_record(), body)
    wrong_stage = error_reason(app(message(protocol.SECAGG_SHARE, body, 10), ctx))
    assert "must carry a share_keys request; it carries: advertise_keys request" in wrong_stage
    assert "vector_length is 5" in error_reason(
        app(message(protocol.SECAGG_ADVERTISE, body, 10), ctx)
    )
    share = error_reason(app(message(protocol.SECAGG_UNMASK, body, 10), ctx))
    assert "must carry a unmask request" in share
    no_content = make_message(message(protocol.FIT, RecordDict(), 10).metadata, error=Error(0))
    assert "carries no content" in error_reason(app(no_content, ctx))
    assert dict(ctx.state.config_records[STATE_DP]) == before  # nothing spent or lost
    assert STATE_SECAGG not in ctx.state.config_records
    assert STATE_SECAGG_ROUND not in ctx.state.config_records
