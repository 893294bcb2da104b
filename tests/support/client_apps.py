"""The real ClientApp called as a Flower SuperNode calls it, and a server driving it.

Shared by the ClientApp tests (``tests/clients/test_app.py``) and the malicious-server tests
(``tests/clients/test_malicious_server.py``): messages with Flower metadata, a call through
Flower's protobuf serialization (message, context and reply, as a deployed SuperNode does),
provisioned nodes with demo data (:func:`write_nodes`), and :func:`drive_secure_collection`,
which plays the server of one authenticated SecAgg+ session against the apps -- honestly, or
with ``tamper`` / per-node ``envelopes`` as a malicious server.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)

from aggregation.codec import RingLayout, Summed, sum_contributions
from aggregation.secagg import (
    Roster,
    SecAggMessage,
    SecAggParams,
    ServerSession,
    Stage,
    node_id_for,
)
from clients import protocol
from clients.config import NodeConfig
from clients.credentials import IDENTITY_FILE, load_identity
from clients.demo_data import write_demo_dataset
from clients.jobs import metrics_for, model_spec_for_job, ring_layout, update_length_for
from clients.models import build_model, get_weights, weight_names
from clients.node import Node, NodeState
from clients.protocol import RoundConfig
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec
from manifests.keys import TrustedKeys
from manifests.roster import verify_roster
from manifests.signed_job import envelope_job_id
from server.provision import OPEN_POLICY
from tests.support.federation import Federation, provision

__all__ = [
    "BIG_IDS",
    "RUN_ID",
    "TINY",
    "App",
    "Driven",
    "Nodes",
    "Tamper",
    "content",
    "context",
    "drive_secure_collection",
    "error_reason",
    "iot_job",
    "job_context",
    "message",
    "named",
    "over_the_wire",
    "own_sums",
    "run_secure_collection",
    "secagg_params",
    "secure_layout",
    "server_session",
    "vit_job",
    "weights_record",
    "write_nodes",
]

RUN_ID = 4
_IDS = itertools.count()
TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "batch_size": 8}
BIG_IDS = (2**64 - 3, 12, 2**63 + 7)  # Flower node ids are unsigned 64-bit

App = Callable[[Message, Context], Message]
Tamper = Callable[[Stage, int, SecAggMessage], SecAggMessage]
"""``tamper(stage, flower_node_id, request)``: the request a malicious server sends instead."""


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


def iot_job(**extra: object) -> JobSpec:
    return JobSpec.from_mapping(
        {"component": "sensing", "base_model": "iot", "task": "normalizer", **extra}
    )


# ------------------------------------------------------------------------ messages


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


def over_the_wire(app: App, msg: Message, ctx: Context) -> tuple[Message, Context]:
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


def weights_record(job: JobSpec, seed: int = 1) -> ArrayRecord:
    model = build_model(model_spec_for_job(job), seed=seed)
    return protocol.weights_to_record(weight_names(model), get_weights(model))


def named(record: ArrayRecord) -> list[tuple[str, np.ndarray]]:
    return list(zip(record.keys(), protocol.record_to_weights(record), strict=True))


def content(envelope: bytes, rnd: RoundConfig | None = None, **arrays: ArrayRecord) -> RecordDict:
    """A message's content: the signed job (``envelope``), the round and any arrays."""
    records: dict[str, ConfigRecord | ArrayRecord] = {
        protocol.SIGNED_JOB: protocol.signed_job_record(envelope)
    }
    if rnd is not None:
        records[protocol.ROUND] = rnd.to_record()
    records.update(arrays)
    return RecordDict(records)  # type: ignore[arg-type]


def error_reason(reply: Message) -> str:
    assert reply.has_error(), reply.content
    assert reply.error.code == 2  # ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.metadata.reply_to_message_id.startswith("m")
    return reply.error.reason or ""


# ----------------------------------------------------------------------- provisioned nodes


@dataclass
class Nodes:
    """Provisioned nodes: the federation (operator key, signed roster, one kit per node) and
    each partition's node config (with its kit)."""

    federation: Federation
    configs: dict[int, NodeConfig]
    _signed: dict[str, bytes] = field(default_factory=dict)

    def sign(self, job: JobSpec) -> bytes:
        """The job as the operator signed it (once per job: one envelope, one job id)."""
        key = json.dumps(job.to_run_config(), sort_keys=True)
        if key not in self._signed:
            self._signed[key] = self.federation.sign(job)
        return self._signed[key]

    def identity_key(self, partition: int) -> bytes:
        """The public identity key in the kit of ``partition``'s node."""
        return load_identity(self.federation.kits[partition] / IDENTITY_FILE).public_key

    def secagg_id(self, partition: int) -> int:
        """The SecAgg+ id of ``partition``'s node (derived from its identity key)."""
        return node_id_for(self.identity_key(partition))

    def roster(self) -> Roster:
        """The SecAgg+ roster of the operator-signed roster's members valid now."""
        now = datetime.now(UTC)
        trusted = TrustedKeys.load(self.federation.trusted_keys)
        verified = verify_roster(self.federation.roster.read_bytes(), trusted, now=now)
        return Roster(verified.members(now))


def write_nodes(
    tmp_path: Path,
    modality: str,
    node_type: NodeType,
    sizes: tuple[int, ...],
    *,
    policy: str | None = OPEN_POLICY,
) -> Nodes:
    """A provisioned federation of ``len(sizes)`` nodes with demo data of those sizes."""
    federation = provision(tmp_path / "federation", len(sizes), node_type, policy=policy)
    folders = []
    for k, n in enumerate(sizes):
        write_demo_dataset(modality, tmp_path / f"{modality}{k}" / modality, n, seed=k)
        folders.append(tmp_path / f"{modality}{k}")
    return Nodes(federation, federation.node_configs(folders))


def job_context(envelope: bytes) -> bytes:
    """The SecAgg+ session context of the signed job in ``envelope`` (what nodes bind to)."""
    return protocol.session_context(envelope_job_id(envelope))


# ----------------------------------------------------------------------- secure collection


def secure_layout(job: JobSpec, work: protocol.Work, group_size: int) -> RingLayout:
    return ring_layout(job, work, update_length=update_length_for(job), group_size=group_size)


def secagg_params(vector_length: int, num_clients: int = 3) -> SecAggParams:
    """Everyone neighbours everyone; threshold t with 2t > k + 1 (the nodes' default policy)."""
    return SecAggParams(
        num_clients=num_clients,
        num_neighbours=num_clients - 1,
        threshold=num_clients // 2 + 1,
        vector_length=vector_length,
        clipping_range=1.0,  # unused: nodes mask their own ring vectors
    )


def server_session(
    nodes: Nodes, vector_length: int, session: int, *, context: bytes = b""
) -> ServerSession:
    """An authenticated server session of the first three nodes (by their SecAgg+ ids)."""
    return ServerSession(
        secagg_params(vector_length, 3),
        run_id=RUN_ID,
        server_round=session,
        node_ids=[nodes.secagg_id(p) for p in range(3)],
        rng=np.random.default_rng(0),
        roster=nodes.roster(),
        context=context,
    )


@dataclass
class Driven:
    """One SecAgg+ session driven through the apps: the server's session, and by stage the
    nodes (Flower ids) that answered with an error, with the reason."""

    session: ServerSession
    errors: dict[Stage, dict[int, str]]


def drive_secure_collection(
    app: App,
    nodes: Nodes,
    contexts: dict[int, Context],
    job: JobSpec,
    rnd: RoundConfig,
    weights: ArrayRecord | None = None,
    *,
    before_masked: Callable[[int, RecordDict], None] | None = None,
    silent_in_masked_input: Collection[int] = (),
    until: Stage = Stage.UNMASK,
    params: SecAggParams | None = None,
    envelope_for: Callable[[Stage, int], bytes | None] | None = None,
    tamper: Tamper | None = None,
) -> Driven:
    """Drive the authenticated SecAgg+ protocol through the apps as the server does: the
    session addresses nodes by their identity-derived SecAgg+ ids and the messages go to their
    Flower ids (``contexts``' keys); stage by stage (``session.stages()``) up to ``until``, each
    request out, each reply in -- an error reply, or a node in ``silent_in_masked_input`` at
    that stage, is rejected as a dropout with its reason.

    A malicious server: ``params`` replaces the session's parameters, ``envelope_for(stage,
    node)`` (when not None) is the signed job sent to that node at that stage instead of the
    job's (the session verifies replies under ``job``'s context), and ``tamper`` rewrites any
    request before it is sent.
    """
    layout = secure_layout(job, rnd.work, len(contexts))
    secagg_ids = {
        node: nodes.secagg_id(int(ctx.node_config["partition-id"]))
        for node, ctx in contexts.items()
    }
    transport = {secagg_id: node for node, secagg_id in secagg_ids.items()}
    envelope = nodes.sign(job)
    session = ServerSession(
        params or secagg_params(layout.length, len(contexts)),
        run_id=RUN_ID,
        server_round=rnd.secagg_round,
        node_ids=sorted(transport),
        rng=np.random.default_rng(0),
        roster=nodes.roster(),
        context=job_context(envelope),
    )
    assert session.authenticated
    errors: dict[Stage, dict[int, str]] = {}
    for stage, open_stage in session.stages():
        for secagg_id, request in open_stage().items():
            node = transport[secagg_id]
            if stage is Stage.MASKED_INPUT and node in silent_in_masked_input:
                session.reject(secagg_id, "no reply before the timeout")
                continue
            if tamper is not None:
                request = tamper(stage, node, request)
            extra = {protocol.WEIGHTS: weights} if stage is Stage.MASKED_INPUT and weights else {}
            sent = envelope_for(stage, node) if envelope_for is not None else None
            body = content(sent or envelope, rnd, **extra)
            protocol.secagg_to_content(request.to_record(), body)
            if stage is Stage.MASKED_INPUT and before_masked is not None:
                before_masked(node, body)
            msg = message(protocol.secagg_message_type(rnd.work.category, stage), body, node)
            reply, contexts[node] = over_the_wire(app, msg, contexts[node])
            if reply.has_error():
                errors.setdefault(stage, {})[node] = error_reason(reply)
                session.reject(secagg_id, f"error reply: {reply.error.reason}")
                continue
            # Under secure aggregation nothing but the SecAgg+ records leaves a node.
            assert set(reply.content) == {protocol.SECAGG, protocol.SECAGG_ARRAYS}
            session.receive_record(secagg_id, protocol.secagg_from_content(reply.content))
        if stage is until:
            break
    return Driven(session, errors)


def run_secure_collection(
    app: App,
    nodes: Nodes,
    contexts: dict[int, Context],
    job: JobSpec,
    rnd: RoundConfig,
    weights: ArrayRecord | None = None,
    before_masked: Callable[[int, RecordDict], None] | None = None,
) -> Summed:
    """Drive one whole SecAgg+ session through the apps (every node answers every stage) and
    decode the unmasked sum as the server does."""
    driven = drive_secure_collection(
        app, nodes, contexts, job, rnd, weights, before_masked=before_masked
    )
    assert driven.errors == {}
    session = driven.session
    assert [stage for stage, _ in session.stages()] == [
        Stage.ADVERTISE_KEYS,
        Stage.SHARE_KEYS,
        Stage.MASKED_INPUT,
        Stage.CONSISTENCY_CHECK,
        Stage.UNMASK,
    ]
    result = session.result()
    assert sorted(result.contributors) == sorted(
        nodes.secagg_id(int(ctx.node_config["partition-id"])) for ctx in contexts.values()
    )
    layout = secure_layout(job, rnd.work, len(contexts))
    return layout.decode(
        result.total, rotation_seed=protocol.rotation_seed(RUN_ID, rnd.secagg_round)
    )


def own_sums(
    nodes: Nodes,
    ids: Mapping[int, int],
    job: JobSpec,
    rnd: RoundConfig,
    weights: ArrayRecord | None,
) -> Summed:
    """The sum of the nodes' own clear-text contributions (what the secure sum must equal)."""
    arrays = named(weights) if weights is not None else None
    parts = [
        Node(nodes.configs[p], node_id=n)
        .contribution(job, rnd, arrays, NodeState())
        .summed(metrics_for(job, rnd.work))
        for n, p in ids.items()
    ]
    return sum_contributions(parts)
