"""A malicious server against the real ClientApp, through Flower's serialization.

One test per attack of issue 8's "Why" section, each played as the server would play it: the
messages are built by a real (authenticated) SecAgg+ server session or forged from its
requests, and each goes to the node and its reply comes back through Flower's protobuf form
(:func:`tests.support.client_apps.over_the_wire`). Every attack is refused with an error reply
whose reason names it, and the node keeps what it had: its Flower state (the SecAgg+ session
in progress, the last session it started, its DP-SGD steps), its lifetime budget and its
participation log are byte for byte what they were before the attack.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import base64
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message

from aggregation.secagg import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    ConsistencyCheckReply,
    ConsistencyCheckRequest,
    NodeIdentity,
    SecAggMessage,
    SecAggParams,
    ServerSession,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
    message_from_record,
)
from aggregation.secagg.identity import advertise_statement
from aggregation.secagg.primitives import generate_private_key, public_bytes
from clients import protocol
from clients.app import STATE_SECAGG, make_client_app
from clients.budget import BUDGET_FILE, PARTICIPATION_FILE
from clients.credentials import STATE_DIR
from clients.protocol import RoundConfig, Work
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec
from manifests.keys import SigningKey
from manifests.signed_job import sign_job
from server.provision import OPEN_POLICY
from tests.support.client_apps import (
    RUN_ID,
    App,
    Nodes,
    content,
    context,
    drive_secure_collection,
    error_reason,
    iot_job,
    job_context,
    message,
    over_the_wire,
    secagg_params,
    secure_layout,
    vit_job,
    weights_record,
    write_nodes,
)
from tests.support.federation import FEDERATION

NODE_DP = {"unit": "node", "clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}
IOT_DP = {"unit": "example", "noise_multiplier": 0.5, "delta": 1e-5}
RANGES = RoundConfig(server_round=1, work=Work.RANGES)

Snapshot = tuple[dict[int, dict[str, dict[str, object]]], list[tuple[bytes | None, ...]]]


@pytest.fixture
def sensing(tmp_path: Path) -> Nodes:
    return write_nodes(tmp_path, "iot", NodeType.SENSING, (20, 20, 20))


def contexts_of(nodes: Nodes) -> dict[int, Context]:
    """Each node's Flower context, keyed by a Flower node id (100 + partition)."""
    return {100 + p: context(100 + p, p) for p in nodes.configs}


def snapshot(nodes: Nodes, contexts: dict[int, Context]) -> Snapshot:
    """Everything a node keeps: its Flower state, and its budget and participation files."""
    state: dict[int, dict[str, dict[str, object]]] = {
        node: {name: dict(record) for name, record in ctx.state.config_records.items()}
        for node, ctx in contexts.items()
    }
    files = []
    for kit in nodes.federation.kits:
        folder = kit / STATE_DIR
        files.append(
            tuple(
                (folder / name).read_bytes() if (folder / name).exists() else None
                for name in (BUDGET_FILE, PARTICIPATION_FILE)
            )
        )
    return state, files


def ask(
    app: App,
    contexts: dict[int, Context],
    node: int,
    rnd: RoundConfig,
    request: SecAggMessage,
    envelope: bytes,
) -> Message:
    """Send one SecAgg+ request to ``node`` through Flower's serialization; its reply."""
    body = content(envelope, rnd)
    protocol.secagg_to_content(request.to_record(), body)
    message_type = protocol.secagg_message_type(rnd.work.category, request.stage)
    reply, contexts[node] = over_the_wire(app, message(message_type, body, node), contexts[node])
    return reply


def parsed(reply: Message) -> SecAggMessage:
    assert not reply.has_error(), reply.error
    return message_from_record(protocol.secagg_from_content(reply.content))


def honest_session(nodes: Nodes, job: JobSpec, rnd: RoundConfig, count: int = 3) -> ServerSession:
    """The authenticated session an honest server opens for ``job`` with the first nodes."""
    layout = secure_layout(job, rnd.work, count)
    return ServerSession(
        secagg_params(layout.length, count),
        run_id=RUN_ID,
        server_round=rnd.secagg_round,
        node_ids=[nodes.secagg_id(p) for p in range(count)],
        rng=np.random.default_rng(0),
        roster=nodes.roster(),
        context=job_context(nodes.sign(job)),
    )


# ------------------------------------------------------------- plain under secure-agg


def test_a_plain_collection_under_a_secure_agg_job_is_refused_before_anything_is_computed(
    tmp_path: Path, sensing: Nodes
) -> None:
    encoders = write_nodes(tmp_path / "enc", "vision", NodeType.ENCODER, (20,))
    cases = [
        (  # a model job: plain train.fit / evaluate.eval would return the update or metrics
            encoders,
            vit_job(privacy_level="dp+secure-agg", dp=NODE_DP, federation={"clients_per_round": 3}),
            [(protocol.FIT, Work.FIT), (protocol.EVALUATE, Work.EVALUATE)],
        ),
        (  # sensing: plain train.fit of a ranges/moments phase would return its statistics
            sensing,
            iot_job(privacy_level="secure-agg"),
            [(protocol.FIT, Work.RANGES), (protocol.FIT, Work.MOMENTS)],
        ),
    ]
    for nodes, job, messages in cases:
        app = make_client_app(nodes.configs)
        contexts = {100: context(100, 0)}
        before = snapshot(nodes, contexts)
        for message_type, work in messages:
            rnd = RoundConfig(server_round=1, work=work)
            extra = {protocol.WEIGHTS: weights_record(job)} if nodes is encoders else {}
            body = content(nodes.sign(job), rnd, **extra)
            reply, contexts[100] = over_the_wire(
                app, message(message_type, body, 100), contexts[100]
            )
            reason = error_reason(reply)
            assert "SecAggRefusedError" in reason, reason
            assert f"privacy level is {job.privacy_level}" in reason
            assert "never in the clear" in reason
        assert snapshot(nodes, contexts) == before  # nothing trained, charged or recorded


# ------------------------------------------------------------------------------ noise 0


def _payload_edited(envelope: bytes, **values: object) -> bytes:
    """``envelope`` with job fields changed after signing, the operator's signature kept."""
    document = json.loads(envelope)
    payload = json.loads(base64.b64decode(document["payload"]))
    payload["job"].update(values)
    document["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(document).encode()


def test_a_server_cannot_turn_the_noise_off_or_send_any_privacy_parameter(
    sensing: Nodes,
) -> None:
    app = make_client_app(sensing.configs)
    job = iot_job(privacy_level="dp+secure-agg", dp=IOT_DP)
    genuine = sensing.sign(job)
    session = honest_session(sensing, job, RANGES)
    request = session.advertise_keys()[sensing.secagg_id(0)]
    no_noise = job.model_copy(update={"dp": job.dp.model_copy(update={"noise_multiplier": 0.0})})
    unsigned = json.loads(genuine)
    unsigned["signatures"] = []
    attacks = {
        "the operator's signature on a job whose noise the server set to 0": (
            _payload_edited(genuine, **{"dp.noise_multiplier": 0.0}),
            RANGES.to_record(),
            "DSSE signature does not verify under trusted key",
        ),
        "the job with noise 0, signed by the server's own key": (
            sign_job(
                no_noise, SigningKey.generate(), federation=FEDERATION, issued_at=datetime.now(UTC)
            ),
            RANGES.to_record(),
            "is not in the trusted-keys file",
        ),
        "the job with noise 0, unsigned": (
            _payload_edited(json.dumps(unsigned).encode(), **{"dp.noise_multiplier": 0.0}),
            RANGES.to_record(),
            "envelope must carry exactly one signature",
        ),
        "the genuine job, with a round config that overrides the noise": (
            genuine,
            ConfigRecord({**RANGES.to_record(), "noise_multiplier": 0.0}),
            "unknown keys ['noise_multiplier']",
        ),
        "the genuine job, with a round config that overrides the clipping norm": (
            genuine,
            ConfigRecord({**RANGES.to_record(), "dp.clipping_norm": 1e-12}),
            "unknown keys ['dp.clipping_norm']",
        ),
    }
    contexts = contexts_of(sensing)
    node = 100
    before = snapshot(sensing, contexts)
    for case, (envelope, round_record, why) in attacks.items():
        body = content(envelope)
        body[protocol.ROUND] = round_record
        protocol.secagg_to_content(request.to_record(), body)
        reply, contexts[node] = over_the_wire(
            app, message(protocol.SECAGG_ADVERTISE, body, node), contexts[node]
        )
        reason = error_reason(reply)
        assert why in reason, (case, reason)
    assert snapshot(sensing, contexts) == before  # no session started, nothing charged
    reply = ask(app, contexts, node, RANGES, request, genuine)  # the genuine job still works
    assert isinstance(parsed(reply), AdvertiseKeysReply)


# --------------------------------------------------------------- per-node clipping norm


def test_nodes_given_different_jobs_in_one_session_refuse_each_others_keys(
    tmp_path: Path,
) -> None:
    """The server holds two operator-signed jobs, one with a tiny clipping norm, and gives the
    target one and everyone else the other in one SecAgg+ round (the sum would then be the
    target's input). Each node signs its keys for the job it holds, so they refuse each
    other's keys before deriving anything: no masked input is ever computed."""
    nodes = write_nodes(tmp_path, "vision", NodeType.ENCODER, (20, 20, 20))
    app = make_client_app(nodes.configs)
    fed = {"clients_per_round": 3}
    normal = vit_job(privacy_level="dp+secure-agg", dp=NODE_DP, federation=fed)
    tiny = vit_job(
        privacy_level="dp+secure-agg", dp={**NODE_DP, "clipping_norm": 1e-9}, federation=fed
    )
    rnd = RoundConfig(server_round=1, seed=1)
    contexts = contexts_of(nodes)
    target = 100
    envelopes = {n: nodes.sign(normal if n == target else tiny) for n in contexts}
    # The malicious server asks each node to advertise keys under its own job ...
    session = honest_session(nodes, tiny, rnd)
    ids = {nodes.secagg_id(p): 100 + p for p in nodes.configs}
    replies: dict[int, AdvertiseKeysReply] = {}
    for secagg_id, request in session.advertise_keys().items():
        reply = parsed(ask(app, contexts, ids[secagg_id], rnd, request, envelopes[ids[secagg_id]]))
        assert isinstance(reply, AdvertiseKeysReply)
        replies[secagg_id] = reply
    # ... and forwards every peer's keys and signature, as if they all held one job.
    before = snapshot(nodes, contexts)
    for secagg_id, node in ids.items():
        peers = tuple(sorted(set(replies) - {secagg_id}))
        forwarded = ShareKeysRequest(
            run_id=RUN_ID,
            server_round=rnd.secagg_round,
            node_id=secagg_id,
            peer_ids=peers,
            share_public_keys=tuple(replies[p].share_public_key for p in peers),
            mask_public_keys=tuple(replies[p].mask_public_key for p in peers),
            seed_commitments=tuple(replies[p].seed_commitment for p in peers),
            signatures=tuple(replies[p].signature for p in peers),
        )
        reason = error_reason(ask(app, contexts, node, rnd, forwarded, envelopes[node]))
        assert "refuses to share keys" in reason, reason
        assert "signature does not verify under its roster key" in reason
        assert "another session context (another job)" in reason
    assert snapshot(nodes, contexts) == before  # sessions still at share_keys, nothing charged
    # An honest server holding the tiny job refuses the target's advertised keys as well.
    with pytest.raises(Exception, match="bad identity signature"):
        session.receive(replies[nodes.secagg_id(0)])


def test_a_job_swapped_after_the_keys_were_advertised_is_refused_before_training(
    sensing: Nodes,
) -> None:
    """The same attack one stage later: everyone advertised and shared keys for one job, and
    the masked-input request comes with another operator-signed job (other DP parameters)."""
    app = make_client_app(sensing.configs)
    job = iot_job(privacy_level="dp+secure-agg", dp=IOT_DP)
    other = iot_job(privacy_level="dp+secure-agg", dp={**IOT_DP, "noise_multiplier": 0.3})
    contexts = contexts_of(sensing)
    captured: dict[str, Snapshot] = {}
    swapped, masked = sensing.sign(other), (Stage.MASKED_INPUT, 100)

    def swap(stage: Stage, node: int, request: SecAggMessage) -> SecAggMessage:
        if stage is Stage.MASKED_INPUT and node == 100:
            captured["before"] = snapshot(sensing, contexts)
        return request

    driven = drive_secure_collection(
        app,
        sensing,
        contexts,
        job,
        RANGES,
        until=Stage.MASKED_INPUT,
        envelope_for=lambda stage, node: swapped if (stage, node) == masked else None,
        tamper=swap,
    )
    # The session context is checked at every stage: the job of each stage is the one the
    # node advertised keys for. (The first two stages went through the nodes' own job.)
    assert set(driven.errors) == {Stage.MASKED_INPUT}
    reason = driven.errors[Stage.MASKED_INPUT][100]
    assert "refuses a request for another session context" in reason, reason
    assert "a session works for one job only" in reason
    before_state, before_files = captured["before"]
    after_state, after_files = snapshot(sensing, contexts)
    assert after_state[100] == before_state[100]  # still waiting for its masked-input request
    assert after_files[0] == before_files[0]  # the other job's epsilon was not charged


# ----------------------------------------------------------------------- key substitution


def test_peer_keys_substituted_by_the_server_are_refused(sensing: Nodes) -> None:
    app = make_client_app(sensing.configs)
    job = iot_job(privacy_level="secure-agg")
    contexts = contexts_of(sensing)
    server_identity = NodeIdentity.generate()
    params = secagg_params(secure_layout(job, Work.RANGES, 3).length, 3)
    captured: dict[int, Snapshot] = {}

    def substitute(stage: Stage, node: int, request: SecAggMessage) -> SecAggMessage:
        if stage is not Stage.SHARE_KEYS or node not in (100, 101):
            return request
        assert isinstance(request, ShareKeysRequest)
        captured[node] = snapshot(sensing, contexts)
        own = tuple(public_bytes(generate_private_key()) for _ in request.peer_ids)
        evil = replace(request, share_public_keys=own, mask_public_keys=own[::-1])
        if node == 101:  # and re-signed with a key of the server's own
            statements = [
                advertise_statement(
                    run_id=RUN_ID,
                    server_round=RANGES.secagg_round,
                    node_id=peer,
                    params=params,
                    share_public_key=own[i],
                    mask_public_key=own[::-1][i],
                    seed_commitment=request.seed_commitments[i],
                    context=job_context(sensing.sign(job)),
                )
                for i, peer in enumerate(request.peer_ids)
            ]
            evil = replace(evil, signatures=tuple(map(server_identity.sign, statements)))
        return evil

    driven = drive_secure_collection(
        app, sensing, contexts, job, RANGES, until=Stage.SHARE_KEYS, tamper=substitute
    )
    assert sorted(driven.errors[Stage.SHARE_KEYS]) == [100, 101]
    for node, reason in driven.errors[Stage.SHARE_KEYS].items():
        assert f"Node {sensing.secagg_id(node - 100)} refuses to share keys" in reason, reason
        assert "signature does not verify under its roster key" in reason
        assert "The keys were substituted" in reason and "Nothing was derived" in reason
        before_state, before_files = captured[node]
        after_state, after_files = snapshot(sensing, contexts)
        assert after_state[node] == before_state[node]
        assert after_files == before_files
    record = contexts[100].state.config_records[STATE_SECAGG]
    assert record["phase"] == "share_keys"  # it derived nothing and waits as before


# ----------------------------------------------------------- fabricated neighbour (Sybil)


def test_a_fabricated_neighbour_not_in_the_roster_is_refused(sensing: Nodes) -> None:
    app = make_client_app(sensing.configs)
    job = iot_job(privacy_level="secure-agg")
    envelope = sensing.sign(job)
    contexts = contexts_of(sensing)
    request = honest_session(sensing, job, RANGES).advertise_keys()[sensing.secagg_id(0)]
    assert isinstance(request, AdvertiseKeysRequest)
    sybil = NodeIdentity.generate().node_id  # a well-formed id the operator never enrolled
    one_fake = replace(request, neighbours=tuple(sorted({request.neighbours[0], sybil})))
    # The attack: a server-chosen N = 2, k = 1, t = 2 with one fabricated neighbour.
    two = SecAggParams(
        num_clients=2,
        num_neighbours=1,
        threshold=2,
        vector_length=request.params.vector_length,
        clipping_range=1.0,
    )
    alone_with_sybil = replace(request, params=two, neighbours=(sybil,))
    before = snapshot(sensing, contexts)
    for evil, whys in (
        (one_fake, [f"neighbours [{sybil}] are not in the roster"]),
        (
            alone_with_sybil,
            [
                f"neighbours [{sybil}] are not in the roster",
                "group size N = 2 is below the node's minimum 3",
            ],
        ),
    ):
        reason = error_reason(ask(app, contexts, 100, RANGES, evil, envelope))
        assert "SecAggRefusedError" in reason and "Nothing was sent" in reason
        for why in whys:
            assert why in reason, reason
    assert snapshot(sensing, contexts) == before  # no keys made, no round recorded


# ------------------------------------------------------------------- t below the floor


def test_a_threshold_below_the_nodes_floor_is_refused(tmp_path: Path) -> None:
    floor = OPEN_POLICY + "\n[secagg]\nmin_threshold = 3\n"
    nodes = write_nodes(tmp_path, "iot", NodeType.SENSING, (20, 20, 20), policy=floor)
    app = make_client_app(nodes.configs)
    job = iot_job(privacy_level="secure-agg")
    envelope = nodes.sign(job)
    contexts = contexts_of(nodes)
    session = honest_session(nodes, job, RANGES)  # N = 3, k = 2, t = 2: 2t > k + 1 holds
    request = session.advertise_keys()[nodes.secagg_id(0)]
    assert isinstance(request, AdvertiseKeysRequest) and request.params.threshold == 2
    before = snapshot(nodes, contexts)
    reason = error_reason(ask(app, contexts, 100, RANGES, request, envelope))
    assert "threshold t = 2 is below the node's floor 3" in reason, reason
    assert snapshot(nodes, contexts) == before
    # A job that asks for it is refused at admission too, by the same policy.
    low = iot_job(privacy_level="secure-agg", secagg={"reconstruction_threshold": 2})
    reason = error_reason(ask(app, contexts, 100, RANGES, request, nodes.sign(low)))
    assert "secagg.reconstruction_threshold = 2 is below this node's floor" in reason, reason
    assert snapshot(nodes, contexts) == before


# ------------------------------------------------------------------------ split views


def test_split_views_are_refused_up_front_and_split_survivor_sets_reveal_nothing(
    tmp_path: Path,
) -> None:
    nodes = write_nodes(tmp_path, "iot", NodeType.SENSING, (20, 20, 20, 20, 20))
    app = make_client_app(nodes.configs)
    job = iot_job(privacy_level="secure-agg")
    envelope = nodes.sign(job)
    contexts = contexts_of(nodes)

    # (1) The parameters: t = 2 of k + 1 = 5 share holders, so two disjoint pairs of
    # holders, each shown another survivor set, could rebuild both of a node's secrets.
    layout = secure_layout(job, Work.RANGES, 5)
    params = SecAggParams(
        num_clients=5,
        num_neighbours=4,
        threshold=2,
        vector_length=layout.length,
        clipping_range=1.0,
    )
    before = snapshot(nodes, contexts)
    for partition in range(5):
        node = 100 + partition
        me = nodes.secagg_id(partition)
        request = AdvertiseKeysRequest(
            run_id=RUN_ID,
            server_round=RANGES.secagg_round,
            node_id=me,
            params=params,
            neighbours=tuple(sorted(nodes.secagg_id(p) for p in range(5) if p != partition)),
        )
        reason = error_reason(ask(app, contexts, node, RANGES, request, envelope))
        assert "split view of its share holders" in reason, reason
    assert snapshot(nodes, contexts) == before
    # The job that asks for such a threshold is refused at admission.
    split = iot_job(
        privacy_level="secure-agg", secagg={"reconstruction_threshold": 2, "num_neighbours": 4}
    )
    reason = error_reason(ask(app, contexts, 100, RANGES, request, nodes.sign(split)))
    assert "does not satisfy 2t > k + 1" in reason, reason

    # (2) Within the policy (N = 4, k = 3, t = 3) the server shows the target a survivor set
    # without node 3 (to get node 3's mask-key share from it) and everyone else the full set
    # (to get node 3's self-mask seed share from them). The target signs only its set and
    # checks the forwarded signatures against it: it reveals nothing.
    four = {100 + p: contexts[100 + p] for p in range(4)}
    rnd = RoundConfig(server_round=2, work=Work.RANGES)
    driven = drive_secure_collection(app, nodes, four, job, rnd, until=Stage.MASKED_INPUT)
    assert driven.errors == {}
    ids = [nodes.secagg_id(p) for p in range(4)]
    target, dropped = ids[0], ids[3]
    everyone = tuple(sorted(ids))
    without = tuple(sorted(set(ids) - {dropped}))
    signatures = {}
    for partition, me in enumerate(ids):
        shown = without if me == target else everyone
        check = ConsistencyCheckRequest(
            run_id=RUN_ID, server_round=rnd.secagg_round, node_id=me, survivor_ids=shown
        )
        reply = parsed(ask(app, four, 100 + partition, rnd, check, envelope))
        assert isinstance(reply, ConsistencyCheckReply)
        signatures[me] = reply.signature
    signers = tuple(sorted({target, ids[1], ids[2]}))
    unmask = UnmaskRequest(
        run_id=RUN_ID,
        server_round=rnd.secagg_round,
        node_id=target,
        surviving_ids=without,
        dropped_ids=(dropped,),
        signer_ids=signers,
        signatures=tuple(signatures[s] for s in signers),
    )
    before = snapshot(nodes, four)
    reason = error_reason(ask(app, four, 100, rnd, unmask, envelope))
    assert "refuses to unmask" in reason, reason
    assert "It is not a signature on the survivor set this node signed" in reason
    assert "Nothing was revealed" in reason
    assert snapshot(nodes, four) == before
    assert four[100].state.config_records[STATE_SECAGG]["phase"] == "unmask"


# ------------------------------------------------------------------------ older rounds


def test_an_older_round_after_a_newer_one_is_refused_even_after_a_restart(
    sensing: Nodes,
) -> None:
    app = make_client_app(sensing.configs)
    job = iot_job(privacy_level="secure-agg")
    envelope = sensing.sign(job)
    contexts = contexts_of(sensing)
    newer = RoundConfig(server_round=3, work=Work.RANGES)
    request = honest_session(sensing, job, newer).advertise_keys()[sensing.secagg_id(0)]
    assert isinstance(parsed(ask(app, contexts, 100, newer, request, envelope)), AdvertiseKeysReply)
    before = snapshot(sensing, contexts)
    for stale in (RoundConfig(server_round=2, work=Work.RANGES), newer):
        old = honest_session(sensing, job, stale).advertise_keys()[sensing.secagg_id(0)]
        reason = error_reason(ask(app, contexts, 100, stale, old, envelope))
        assert f"Round {stale.secagg_round} of run {RUN_ID} is not newer than round" in reason
        assert f"round {newer.secagg_round}, which this node already took part in" in reason
    assert snapshot(sensing, contexts) == before
    # The participation log is the node's, not Flower's: a restarted node (fresh context)
    # refuses the older round just the same.
    contexts[100] = context(100, 0)
    stale = RoundConfig(server_round=1, work=Work.RANGES)
    old = honest_session(sensing, job, stale).advertise_keys()[sensing.secagg_id(0)]
    assert "is not newer than round" in error_reason(ask(app, contexts, 100, stale, old, envelope))
    assert snapshot(sensing, contexts)[1] == before[1]
