"""One bad client is one dropout, at the federator: a real federation, one client malicious.

Five provisioned sensing nodes run the real ClientApp (``clients.app.make_client_app``) in a
:class:`~tests.support.local_grid.LocalGrid` (every message through Flower's protobuf form) and
the real federator runs a ``secure-agg`` normalizer job: one round of two secure collections
(ranges, then moments), SecAgg+ with k = 4 neighbours and threshold 3. One node's ClientApp is
wrapped by an adversary that answers honestly except at one stage of one collection, where it
replaces its reply with malformed content (hypothesis draws which node, collection, stage and
malformation): wrong types, an empty reply, huge fields, NaN/inf arrays, an invalid or
low-order curve point signed with the node's own identity key, undecryptable or inconsistent
shares, wrong lengths or dtypes, garbage bytes, empty or zip-like array bytes.

Whatever it sends: the run completes and passes, the bad node is recorded in the ledger with
the stage and the reason (a dropout when it misbehaved before its masked input was summed; a
contributor with the reason when it was refused later), no honest node is blamed, and each
collection's secure sum equals, bit for bit, the decoded sum of the ring vectors of the nodes
the ledger lists as contributors (their own quantized inputs, recomputed here from their data).

The secure sums are read where the federator hands them to the aggregator
(``server.federator._round_input``, wrapped to record its argument and call through); nothing
else is replaced.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from aggregation.secagg import AdvertiseKeysRequest, Stage, message_from_record, shamir
from aggregation.secagg.identity import advertise_statement
from clients import protocol
from clients.app import make_client_app
from clients.credentials import IDENTITY_FILE, load_identity
from clients.demo_data import write_demo_dataset
from clients.jobs import ring_layout
from clients.node import Node, NodeState
from clients.protocol import RoundConfig, Work
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec
from server import federator
from server.collect import Contributions
from server.federator import run_federation
from server.ledger import Ledger, ParticipantOutcome, Phase
from server.options import JobStatus
from tests.support.client_apps import job_context
from tests.support.federation import Federation, provision
from tests.support.local_grid import LocalGrid, LocalNode, random_node_ids

NODES = 5
IOT_SIZES = (30, 45, 25, 40, 35)
ORDER = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY_CHECK,
    Stage.UNMASK,
)
LATE = (Stage.CONSISTENCY_CHECK, Stage.UNMASK)  # after the bad node's input was summed
GENERIC = (
    "empty-reply",
    "random-record",
    "wrong-type-field",
    "missing-field",
    "other-stage",
    "other-node",
    "huge-field",
    "empty-array-bytes",
    "zip-array-bytes",
    "garbage-bytes",
)
SPECIFIC = {
    Stage.ADVERTISE_KEYS: ("zero-key", "low-order-key", "bad-signature"),
    Stage.SHARE_KEYS: ("garbage-all", "garbage-one", "wrong-length-ciphertext"),
    Stage.MASKED_INPUT: ("nan-array", "inf-array", "wrong-length", "wrong-dtype", "huge-array"),
    Stage.CONSISTENCY_CHECK: ("bad-signature", "other-round"),
    Stage.UNMASK: ("forged-share", "random-shares", "not-field-element", "missing-share"),
}
ORDER_8 = bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157")
JOB = JobSpec.from_mapping(
    {
        "component": "sensing",
        "base_model": "iot",
        "task": "normalizer",
        "privacy_level": "secure-agg",
        "federation": {"num_rounds": 1, "clients_per_round": NODES},
    }
)

Corrupt = Callable[[Message, Message], RecordDict | None]
"""``corrupt(request, honest_reply)``: the content the adversary sends instead (None: honest)."""


@dataclass(frozen=True)
class Setup:
    federation: Federation
    data_dirs: tuple[Path, ...]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("bad-client")
    federation = provision(root / "federation", NODES, NodeType.SENSING)
    dirs = []
    for index, size in enumerate(IOT_SIZES):
        folder = root / f"node-{index}"
        write_demo_dataset("iot", folder / "iot", size, seed=index)
        dirs.append(folder)
    return Setup(federation, tuple(dirs))


def adversary(real: ClientApp, corrupt: Corrupt) -> ClientApp:
    """A ClientApp that runs the real one and lets ``corrupt`` replace its reply's content."""
    app = ClientApp()
    decorators = {"query": app.query, "train": app.train, "evaluate": app.evaluate}

    def handle(message: Message, context: Context) -> Message:
        reply = real(message, context)
        if reply.has_error():
            return reply
        forged = corrupt(message, reply)
        return reply if forged is None else Message(forged, reply_to=message)

    for message_type in protocol.MESSAGE_TYPES:
        category, action = message_type.split(".")
        decorators[category](action)(handle)
    return app


def _other_type(value: object) -> object:
    """A value of another type than ``value``, so the field can never parse."""
    if isinstance(value, bytes):
        return 12345
    if isinstance(value, int):
        return b"\x01" * 8
    if isinstance(value, np.ndarray):
        return [1, 2, 3]
    if isinstance(value, list):
        return "not-a-list"
    return b"not-" + str(value).encode()


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    stage = draw(st.sampled_from(ORDER))
    return {
        "bad": draw(st.integers(0, NODES - 1)),
        "work": draw(st.sampled_from((Work.RANGES, Work.MOMENTS))),
        "stage": stage,
        "attack": draw(st.sampled_from(GENERIC + SPECIFIC[stage])),
        "pick": draw(st.integers(0, 2**16)),
        "junk": draw(st.binary(min_size=0, max_size=80)),
    }


def make_corrupt(case: dict[str, Any], identity_path: Path) -> Corrupt:
    """The adversary's replacement of its reply at ``case``'s stage of ``case``'s collection."""
    attack, pick, junk = case["attack"], case["pick"], case["junk"]
    message_type = protocol.secagg_message_type("train", case["stage"])
    rng = np.random.default_rng(pick)

    def signed(request: Message, record: dict[str, Any], **keys: bytes) -> dict[str, Any]:
        parsed = message_from_record(protocol.secagg_from_content(request.content))
        assert isinstance(parsed, AdvertiseKeysRequest)
        record = {**record, **keys}
        statement = advertise_statement(
            run_id=record["run_id"],
            server_round=record["round"],
            node_id=record["node_id"],
            params=parsed.params,
            share_public_key=record["share_public_key"],
            mask_public_key=record["mask_public_key"],
            seed_commitment=record["seed_commitment"],
            context=job_context(protocol.signed_job_from_content(request.content)),
        )
        return {**record, "signature": load_identity(identity_path).sign(statement)}

    def forge(request: Message, record: dict[str, Any]) -> dict[str, Any] | RecordDict:
        length = 0
        if isinstance(record.get("masked_input"), np.ndarray):
            length = record["masked_input"].size
        if attack == "empty-reply":
            return RecordDict()
        if attack == "random-record":
            return {"junk": junk, str(pick): pick}
        if attack == "wrong-type-field":
            key = sorted(record)[pick % len(record)]
            return {**record, key: _other_type(record[key])}
        if attack == "missing-field":
            key = sorted(record)[pick % len(record)]
            return {k: v for k, v in record.items() if k != key}
        if attack == "other-stage":
            stages = [str(s) for s in ORDER if str(s) != record["stage"]]
            return {**record, "stage": stages[pick % len(stages)]}
        if attack == "other-node":
            return {**record, "node_id": (record["node_id"] + 1 + pick) % 2**64}
        if attack == "other-round":
            return {**record, "round": record["round"] + 1}
        if attack == "huge-field":
            return {**record, "signature": bytes(2**20), "masked_input": np.zeros(2**20, np.uint32)}
        if attack in ("empty-array-bytes", "zip-array-bytes", "garbage-bytes"):
            data = {"empty-array-bytes": b"", "zip-array-bytes": b"PK\x03\x04" + junk}.get(
                attack, rng.bytes(4 * max(length, 1) + 1)
            )
            out = RecordDict()
            protocol.secagg_to_content(
                {k: v for k, v in record.items() if k != "masked_input"}, out
            )
            out[protocol.SECAGG_ARRAYS] = ArrayRecord(
                {"masked_input": Array("uint32", (max(length, 1),), "numpy.ndarray", data)}
            )
            return out
        if attack == "zero-key":
            return signed(request, record, share_public_key=bytes(32))
        if attack == "low-order-key":
            return signed(request, record, mask_public_key=ORDER_8)
        if attack == "bad-signature":
            return {**record, "signature": (junk * 64 + bytes(64))[:64]}
        if attack in ("garbage-all", "garbage-one"):
            cts = list(record["ciphertexts"])
            targets = range(len(cts)) if attack == "garbage-all" else [pick % len(cts)]
            for i in targets:
                cts[i] = rng.bytes(len(cts[i]))
            return {**record, "ciphertexts": cts}
        if attack == "wrong-length-ciphertext":
            cts = list(record["ciphertexts"])
            cts[pick % len(cts)] = cts[pick % len(cts)][:-1]
            return {**record, "ciphertexts": cts}
        if attack in ("nan-array", "inf-array"):
            value = np.nan if attack == "nan-array" else np.inf
            return {**record, "masked_input": np.full(length, value, dtype=np.float32)}
        if attack == "wrong-length":
            size = length + 1 if pick % 2 else length - 1
            return {**record, "masked_input": np.zeros(size, dtype=np.uint32)}
        if attack == "wrong-dtype":
            dtype = (np.uint64, np.int32, np.float64)[pick % 3]
            return {**record, "masked_input": record["masked_input"].astype(dtype)}
        if attack == "huge-array":
            return {**record, "masked_input": np.zeros(64 * length, dtype=np.uint32)}
        shares = list(record["seed_shares"])
        if attack == "forged-share":
            i = pick % len(shares)
            value = (int.from_bytes(shares[i], "big") + 1 + pick) % shamir.PRIME
            shares[i] = value.to_bytes(shamir.SHARE_SIZE, "big")
        elif attack == "random-shares":
            shares = [
                (int.from_bytes(rng.bytes(66), "big") % shamir.PRIME).to_bytes(66, "big")
                for _ in shares
            ]
        elif attack == "not-field-element":
            shares[pick % len(shares)] = b"\xff" * shamir.SHARE_SIZE
        elif attack == "missing-share":
            i = pick % len(shares)
            ids = record["seed_share_ids"]
            return {
                **record,
                "seed_shares": shares[:i] + shares[i + 1 :],
                "seed_share_ids": ids[:i] + ids[i + 1 :],
            }
        return {**record, "seed_shares": shares}

    def corrupt(request: Message, reply: Message) -> RecordDict | None:
        if request.metadata.message_type != message_type:
            return None
        rnd = RoundConfig.from_record(request.content.config_records[protocol.ROUND])
        if rnd.work is not case["work"]:
            return None
        forged = forge(request, protocol.secagg_from_content(reply.content))
        if isinstance(forged, RecordDict):
            return forged
        out = RecordDict()
        protocol.secagg_to_content(forged, out)
        return out

    return corrupt


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def test_one_bad_client_is_one_recorded_dropout_and_the_sums_are_exactly_the_others(
    setup: Setup, tmp_path_factory: pytest.TempPathFactory, case: dict[str, Any]
) -> None:
    configs = setup.federation.node_configs(setup.data_dirs)
    real = make_client_app(configs)
    ids = random_node_ids(NODES)
    bad = ids[case["bad"]]
    corrupt = make_corrupt(case, setup.federation.kits[case["bad"]] / IDENTITY_FILE)
    rounds: dict[Work, RoundConfig] = {}

    def watch(message: Message) -> None:  # the round configs the nodes were sent
        if message.metadata.message_type == protocol.SECAGG_MASKED and message.has_content():
            record = message.content.config_records.get(protocol.ROUND)
            if record is not None:
                rnd = RoundConfig.from_record(record)
                rounds[rnd.work] = rnd

    grid = LocalGrid(
        [
            LocalNode(
                node,
                adversary(real, corrupt) if node == bad else real,
                {"partition-id": index, "num-partitions": NODES},
            )
            for index, node in enumerate(ids)
        ],
        on_message=watch,
    )
    captured: dict[Work, Contributions] = {}
    hand_over = federator._round_input

    def record_input(contributions: Contributions) -> Any:
        captured[contributions.work] = contributions
        return hand_over(contributions)

    run_dir = tmp_path_factory.mktemp("run")
    options = setup.federation.run_options(
        run_dir, seed=3, round_timeout=60.0, node_wait_timeout=1.0
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(federator, "_round_input", record_input)
        outcome = run_federation(grid, JOB, options)
    with Ledger.for_run_dir(run_dir, create=False) as ledger:
        (record,) = ledger.rounds(outcome.run_id)
    rows = {(p.phase, p.node_id): p for p in record.participants}
    attacked = Phase(case["work"].value)
    note(f"{case['attack']} at {case['work']}/{case['stage']}: {rows.get((attacked, bad))}")
    event(f"{case['stage']}/{case['attack']}")

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    late = case["stage"] in LATE
    for (phase, node), row in rows.items():
        if (phase, node) != (attacked, bad):  # nobody else is blamed, nobody else drops
            assert row.outcome is ParticipantOutcome.CONTRIBUTED and row.reason is None, row
    row = rows[attacked, bad]
    assert row.reason, row  # the stage and the reason are in the ledger
    if late:  # its input was summed before it misbehaved: it counts, with the reason
        assert row.outcome is ParticipantOutcome.CONTRIBUTED and row.stage in LATE, row
    else:
        assert row.outcome is ParticipantOutcome.DROPPED, row
        stages = [str(s) for s in ORDER]
        assert stages.index(str(case["stage"])) <= stages.index(str(row.stage)), row
        assert stages.index(str(row.stage)) <= stages.index(Stage.MASKED_INPUT), row
    assert record.responded == (NODES if late or case["work"] is Work.RANGES else NODES - 1)

    for work in (Work.RANGES, Work.MOMENTS):
        contributions = captured[work]
        expected_nodes = set(ids)
        if work is case["work"] and not late:
            expected_nodes.discard(bad)
        assert set(contributions.contributors) == expected_nodes
        assert contributions.secure_sum is not None
        layout = ring_layout(JOB, work, update_length=0, group_size=NODES)
        total = np.zeros(layout.length, dtype=np.uint32)
        for node in expected_nodes:
            config = configs[ids.index(node)]
            own = Node(config, node_id=node).contribution(JOB, rounds[work], None, NodeState())
            total += layout.encode(own)
        seed = protocol.rotation_seed(int(grid.run.run_id), rounds[work].secagg_round)
        expected = layout.decode(total, rotation_seed=seed)
        np.testing.assert_array_equal(contributions.secure_sum.statistics, expected.statistics)


# ----------------------------------------------------------- NaN/inf metrics in the clear


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
    "privacy_level": "none",
    "federation": {"num_rounds": 2, "clients_per_round": 4, "reliability_threshold": 0.3},
}


def test_nan_inf_or_impossible_metrics_from_one_node_are_its_dropout_not_a_veto(
    tmp_path: Path,
) -> None:
    """Level ``none``: the node's fit reply claims infinitely many examples, its evaluations a
    NaN loss, then a loss of 1e300 over 1e-300 examples (finite, but its per-node loss is
    infinite). Each reply makes it a dropout of that collection with the reason; the run and
    its reliability are the other three nodes'."""
    federation = provision(tmp_path / "federation", 4, NodeType.ENCODER)
    dirs = []
    for index in range(4):
        folder = tmp_path / f"node-{index}"
        write_demo_dataset("vision", folder / "vision", 40, seed=index, image_size=32)
        dirs.append(folder)
    real = make_client_app(federation.node_configs(dirs))
    forged = {
        protocol.FIT: {"examples": math.inf, "train_loss": 1.0},
        protocol.EVALUATE: {"examples": 10.0, "eval_loss": math.nan, "eval_correct": 1.0},
    }

    def corrupt(request: Message, reply: Message) -> RecordDict | None:
        values = forged.get(request.metadata.message_type)
        if values is None:
            return None
        rnd = RoundConfig.from_record(request.content.config_records[protocol.ROUND])
        if rnd.server_round == 2 and rnd.work is Work.EVALUATE:
            values = {"examples": 1e-300, "eval_loss": 1e300, "eval_correct": 0.0}
        content = RecordDict(dict(reply.content.items()))
        content[protocol.METRICS] = MetricRecord(values)  # type: ignore[arg-type]
        return content

    ids = random_node_ids(4)
    bad = ids[3]
    grid = LocalGrid(
        [
            LocalNode(node, adversary(real, corrupt) if node == bad else real, {"partition-id": i})
            for i, node in enumerate(ids)
        ]
    )
    run_dir = tmp_path / "run"
    outcome = run_federation(
        grid, JobSpec.from_mapping(TINY_VIT), federation.run_options(run_dir, seed=7)
    )
    assert outcome.status is JobStatus.PASSED, outcome.reasons
    with Ledger.for_run_dir(run_dir, create=False) as ledger:
        records = ledger.rounds(outcome.run_id)
    assert [r.round for r in records] == [1, 2]
    reasons = {
        (r.round, p.phase): p.reason or ""
        for r in records
        for p in r.participants
        if p.node_id == bad
    }
    for key, why in {
        (1, Phase.INITIAL): "`metrics.eval_loss` must be finite and >= 0. Found nan",
        (1, Phase.TRAIN): "`metrics.examples` must be finite and >= 0. Found inf",
        (1, Phase.EVAL): "`metrics.eval_loss` must be finite and >= 0. Found nan",
        (2, Phase.TRAIN): "`metrics.examples` must be finite and >= 0. Found inf",
        (2, Phase.EVAL): "`metrics.eval_loss` is 1e+300, above its bound",
    }.items():
        assert why in reasons[key], (key, reasons)
    for r in records:
        assert r.responded == 3
        assert r.measurements["reliability_fatal"] is False
        assert not any("non-finite" in reason for reason in r.reliability_reasons)
        assert all(
            p.outcome is ParticipantOutcome.CONTRIBUTED for p in r.participants if p.node_id != bad
        )
