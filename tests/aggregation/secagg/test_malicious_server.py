"""A malicious server against an honest ClientSession: one test per attack.

Each attack is refused with a reason that names it, before anything secret is derived or
revealed; the session's state is unchanged, so the honest request still works afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest

from aggregation.secagg import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    ClientPhase,
    ClientSession,
    ConsistencyCheckRequest,
    MaskedInputRequest,
    NodeIdentity,
    ParticipationLog,
    SecAggAuthenticationError,
    SecAggMessage,
    SecAggParams,
    SecAggPolicy,
    SecAggProtocolError,
    SecAggRefusedError,
    ServerSession,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
    quantize,
)
from aggregation.secagg.identity import advertise_statement, survivors_statement
from aggregation.secagg.primitives import generate_private_key, public_bytes
from tests.aggregation.secagg.helpers import PARAMS, Federation, federation, freeze, plain_sum


def test_client_refuses_peer_keys_substituted_by_the_server() -> None:
    fed = federation()
    requests = fed.run(Stage.SHARE_KEYS)
    node, request = next(iter(requests.items()))
    assert isinstance(request, ShareKeysRequest)
    client = fed.clients[node]
    before = freeze(client.state)
    # The server puts its own keys in place of the neighbours' (man in the middle), keeping
    # their signatures -- or re-signing with a key of its own, which is not in the roster.
    own = [public_bytes(generate_private_key()) for _ in request.peer_ids]
    mitm = replace(request, share_public_keys=tuple(own), mask_public_keys=tuple(own[::-1]))
    with pytest.raises(SecAggRefusedError, match="signature does not verify under its roster key"):
        client.share_keys(mitm)
    server_identity = NodeIdentity.generate()
    resigned = replace(mitm, signatures=tuple(server_identity.sign(b"x") for _ in own))
    with pytest.raises(SecAggRefusedError, match="keys were substituted"):
        client.share_keys(resigned)
    assert freeze(client.state) == before  # nothing derived, no share made
    reply = client.share_keys(request)  # the honest request still works
    assert reply.receiver_ids == request.peer_ids


def test_client_refuses_unsigned_peer_keys_a_downgrade_to_the_legacy_protocol() -> None:
    fed = federation()
    node, request = next(iter(fed.run(Stage.SHARE_KEYS).items()))
    assert isinstance(request, ShareKeysRequest)
    with pytest.raises(SecAggRefusedError, match="refuses unsigned peer keys"):
        fed.clients[node].share_keys(replace(request, signatures=()))
    assert fed.clients[node].state.phase == ClientPhase.SHARE_KEYS


def test_client_refuses_a_fabricated_neighbour_not_in_the_roster() -> None:
    fed = federation()
    node, request = next(iter(fed.run(Stage.ADVERTISE_KEYS).items()))
    assert isinstance(request, AdvertiseKeysRequest)
    sybil = NodeIdentity.generate().node_id  # a well-formed id the operator never enrolled
    neighbours = tuple(sorted({*request.neighbours[1:], sybil}))
    client = fed.clients[node]
    with pytest.raises(SecAggRefusedError, match=rf"neighbours \[{sybil}\] are not in the roster"):
        client.advertise_keys(replace(request, neighbours=neighbours))
    assert client.state.phase == ClientPhase.ADVERTISE_KEYS and client.state.share_key is None


def test_client_refuses_a_server_chosen_group_of_two() -> None:
    fed = federation()
    node, request = next(iter(fed.run(Stage.ADVERTISE_KEYS).items()))
    assert isinstance(request, AdvertiseKeysRequest)
    tiny = SecAggParams(
        num_clients=2, num_neighbours=1, threshold=2, vector_length=8, clipping_range=1.0
    )
    evil = replace(request, params=tiny, neighbours=request.neighbours[:1])
    with pytest.raises(SecAggRefusedError) as refused:
        fed.clients[node].advertise_keys(evil)
    message = str(refused.value)
    assert "group size N = 2 is below the node's minimum 3" in message
    assert "k = 1 neighbours is below the node's minimum 2" in message
    assert "Nothing was sent" in message
    assert fed.clients[node].state.share_key is None


@pytest.mark.parametrize(
    ("k", "t", "policy", "match"),
    [
        (4, 2, SecAggPolicy(), r"2t > holders \+ c = 5 \+ 0"),  # t <= (k+1)/2
        (5, 3, SecAggPolicy(), r"2t > holders \+ c = 6 \+ 0"),  # t = (k+1)/2 exactly
        (4, 3, SecAggPolicy(min_threshold=4), "below the node's floor 4"),
        (4, 3, SecAggPolicy(max_corrupt_neighbours=1), r"5 \+ 1"),  # one colluder assumed
    ],
    ids=["t<=k/2", "t=(k+1)/2", "below-floor", "colluding-neighbour"],
)
def test_client_refuses_a_threshold_below_its_policy(
    k: int, t: int, policy: SecAggPolicy, match: str
) -> None:
    params = SecAggParams(
        num_clients=8, num_neighbours=k, threshold=t, vector_length=8, clipping_range=1.0
    )
    fed = federation(params, policy=policy)
    node, request = next(iter(fed.run(Stage.ADVERTISE_KEYS).items()))
    assert isinstance(request, AdvertiseKeysRequest)
    with pytest.raises(SecAggRefusedError, match=match):
        fed.clients[node].advertise_keys(request)
    assert fed.clients[node].state.share_key is None


def test_split_views_with_t_2_and_k_4_are_refused_up_front() -> None:
    # With t = 2 of k + 1 = 5 holders, two disjoint honest pairs could each rebuild one of a
    # node's two secrets. The node never joins such a round.
    params = SecAggParams(
        num_clients=6, num_neighbours=4, threshold=2, vector_length=8, clipping_range=1.0
    )
    fed = federation(params)
    for node, request in fed.run(Stage.ADVERTISE_KEYS).items():
        assert isinstance(request, AdvertiseKeysRequest)
        with pytest.raises(SecAggRefusedError, match="split view of its share holders"):
            fed.clients[node].advertise_keys(request)


def test_split_survivor_views_never_yield_both_secrets_of_a_node() -> None:
    # k = 4, t = 3 (2t > k + 1). The server tells the target and two of its neighbours that the
    # target survived, and everyone else that it dropped, hoping to collect t seed shares from
    # the first group and t mask-key shares from the second. Each node signs only the set it
    # was shown and checks the forwarded signatures against it.
    fed = federation()
    fed.run(Stage.CONSISTENCY_CHECK)
    graph = fed.server.state.graph
    target = fed.nodes[0]
    shown_alive = {target, *sorted(graph[target])[:2]}
    everyone = tuple(fed.nodes)
    without = tuple(n for n in everyone if n != target)
    shown = {n: everyone if n in shown_alive else without for n in fed.nodes}
    signatures = {}
    for node in fed.nodes:
        request = ConsistencyCheckRequest(
            run_id=1, server_round=1, node_id=node, survivor_ids=shown[node]
        )
        signatures[node] = fed.clients[node].consistency_check(request).signature
    seed_shares = key_shares = 0
    for node in fed.nodes:
        survivors = set(shown[node])
        held = set(fed.clients[node].state.seed_shares)
        # the signatures on this node's set from its neighbourhood (any others would not verify)
        signers = tuple(
            s for s in fed.nodes if s in graph[node] | {node} and shown[s] == shown[node]
        )
        unmask = UnmaskRequest(
            run_id=1,
            server_round=1,
            node_id=node,
            surviving_ids=tuple(sorted((survivors & held) | {node})),
            dropped_ids=tuple(sorted(held - survivors)),
            signer_ids=signers,
            signatures=tuple(signatures[s] for s in signers),
        )
        try:
            reply = fed.clients[node].unmask(unmask)
        except SecAggRefusedError as error:
            assert "fewer than threshold" in str(error)
            continue
        seed_shares += target in reply.seed_share_ids
        key_shares += target in reply.key_share_ids
    t = PARAMS.threshold
    assert key_shares < t  # the "dropped" view never gathers t mask-key shares of the target
    assert not (seed_shares >= t and key_shares >= t)


def test_client_refuses_an_older_or_replayed_round() -> None:
    log = ParticipationLog()
    fed = federation(server_round=5)
    node, request = next(iter(fed.run(Stage.ADVERTISE_KEYS).items()))
    assert isinstance(request, AdvertiseKeysRequest)
    identity, roster = fed.ids[node], fed.roster
    ClientSession(identity=identity, roster=roster, participation=log).advertise_keys(request)
    for stale in (5, 4):
        session = ClientSession(identity=identity, roster=roster, participation=log)
        with pytest.raises(SecAggRefusedError, match=f"Round {stale} of run 1 is not newer"):
            session.advertise_keys(replace(request, server_round=stale))
        assert session.state.share_key is None
    assert log.last_round == {1: 5}
    restored = ParticipationLog.from_record(log.to_record())
    session = ClientSession(identity=identity, roster=roster, participation=restored)
    session.advertise_keys(replace(request, server_round=6))
    assert restored.last_round == {1: 6}
    with pytest.raises(SecAggProtocolError, match="expects a share_keys request"):
        session.advertise_keys(replace(request, server_round=7))  # one round per session


def test_client_refuses_split_round_parameters_through_the_peers_signature() -> None:
    # The server gives one node a higher threshold than its neighbours: that node's signature
    # covers the parameters it saw, so an honest server refuses its reply and its neighbours
    # refuse its keys when a malicious server forwards them anyway.
    fed = federation()
    requests = fed.run(Stage.ADVERTISE_KEYS)
    odd = fed.nodes[0]
    replies = {}
    for node, request in requests.items():
        assert isinstance(request, AdvertiseKeysRequest)
        if node == odd:
            request = replace(request, params=replace(request.params, threshold=4))
        replies[node] = fed.clients[node].advertise_keys(request)
    with pytest.raises(SecAggProtocolError, match=f"Node {odd}'s .* bad identity signature"):
        fed.server.receive(replies[odd])
    neighbour = min(fed.server.state.graph[odd])
    peers = tuple(sorted(fed.server.state.graph[neighbour]))
    forwarded = ShareKeysRequest(
        run_id=1,
        server_round=1,
        node_id=neighbour,
        peer_ids=peers,
        share_public_keys=tuple(replies[p].share_public_key for p in peers),
        mask_public_keys=tuple(replies[p].mask_public_key for p in peers),
        seed_commitments=tuple(replies[p].seed_commitment for p in peers),
        signatures=tuple(replies[p].signature for p in peers),
    )
    with pytest.raises(SecAggRefusedError, match=f"Node {odd}'s signature.*other round parameters"):
        fed.clients[neighbour].share_keys(forwarded)


def test_client_refuses_a_small_order_key_even_when_its_owner_signed_it() -> None:
    fed = federation()
    node, request = next(iter(fed.run(Stage.SHARE_KEYS).items()))
    assert isinstance(request, ShareKeysRequest)
    colluder = request.peer_ids[0]
    zero = bytes(32)  # all-zero X25519 key: every shared secret with it is known
    statement = advertise_statement(
        run_id=1,
        server_round=1,
        node_id=colluder,
        params=PARAMS,
        share_public_key=zero,
        mask_public_key=request.mask_public_keys[0],
        seed_commitment=request.seed_commitments[0],
    )
    signed = fed.ids[colluder].sign(statement)
    evil = replace(
        request,
        share_public_keys=(zero, *request.share_public_keys[1:]),
        signatures=(signed, *request.signatures[1:]),
    )
    with pytest.raises(SecAggRefusedError, match=f"node {colluder}'s key is unusable.*small order"):
        fed.clients[node].share_keys(evil)
    assert fed.clients[node].state.share_encryption_keys == {}


def test_client_refuses_its_own_key_reflected_as_a_peers() -> None:
    fed = federation()
    node, request = next(iter(fed.run(Stage.SHARE_KEYS).items()))
    assert isinstance(request, ShareKeysRequest)
    client = fed.clients[node]
    assert client.state.share_key is not None
    own = public_bytes(client.state.share_key)
    colluder = request.peer_ids[0]
    signed = fed.ids[colluder].sign(
        advertise_statement(
            run_id=1,
            server_round=1,
            node_id=colluder,
            params=PARAMS,
            share_public_key=own,
            mask_public_key=request.mask_public_keys[0],
            seed_commitment=request.seed_commitments[0],
        )
    )
    evil = replace(
        request,
        share_public_keys=(own, *request.share_public_keys[1:]),
        signatures=(signed, *request.signatures[1:]),
    )
    with pytest.raises(SecAggRefusedError, match="reflected keys"):
        client.share_keys(evil)
    assert client.state.phase == ClientPhase.SHARE_KEYS


def _unmask_request(fed_stage: Mapping[int, SecAggMessage]) -> tuple[int, UnmaskRequest]:
    node, request = next(iter(fed_stage.items()))
    assert isinstance(request, UnmaskRequest)
    return node, request


def test_client_refuses_an_unmask_request_whose_survivors_differ_from_the_signed_set() -> None:
    fed = federation()
    node, request = _unmask_request(fed.run(Stage.UNMASK))
    client = fed.clients[node]
    peer = next(p for p in request.surviving_ids if p != node)
    # Claim a survivor dropped (to get its mask-key share next to its seed share elsewhere).
    moved = replace(
        request,
        surviving_ids=tuple(p for p in request.surviving_ids if p != peer),
        dropped_ids=tuple(sorted({*request.dropped_ids, peer})),
    )
    both = replace(request, dropped_ids=tuple(sorted({*request.dropped_ids, peer})))
    for evil in (moved, both):
        with pytest.raises(SecAggRefusedError, match="do not match the survivor set it signed"):
            client.unmask(evil)
        assert client.state.phase == ClientPhase.UNMASK  # nothing revealed, still waiting
    reply = client.unmask(request)
    assert peer in reply.seed_share_ids and peer not in reply.key_share_ids


def test_client_refuses_to_unmask_with_fewer_than_t_consistency_signatures() -> None:
    fed = federation()
    node, request = _unmask_request(fed.run(Stage.UNMASK))
    t = PARAMS.threshold
    short = replace(
        request, signer_ids=request.signer_ids[: t - 1], signatures=request.signatures[: t - 1]
    )
    with pytest.raises(SecAggRefusedError, match=f"{t - 1} consistency signatures"):
        fed.clients[node].unmask(short)
    assert fed.clients[node].state.phase == ClientPhase.UNMASK


def test_client_refuses_consistency_signatures_on_another_set_or_by_another_key() -> None:
    fed = federation()
    node, request = _unmask_request(fed.run(Stage.UNMASK))
    signer = request.signer_ids[0]
    other_set = fed.ids[signer].sign(
        survivors_statement(run_id=1, server_round=1, survivor_ids=fed.nodes[1:])
    )
    server_made = NodeIdentity.generate().sign(
        survivors_statement(run_id=1, server_round=1, survivor_ids=fed.nodes)
    )
    for forged in (other_set, server_made):
        evil = replace(request, signatures=(forged, *request.signatures[1:]))
        with pytest.raises(SecAggRefusedError, match=f"Node {signer}'s signature does not verify"):
            fed.clients[node].unmask(evil)
    outsider = next(n for n in fed.nodes if n not in fed.server.state.graph[node] | {node})
    padded = replace(
        request,
        signer_ids=tuple(sorted({*request.signer_ids, outsider})),
        signatures=(*request.signatures, request.signatures[0]),
    )
    with pytest.raises(SecAggRefusedError, match="not survivors in its neighbourhood"):
        fed.clients[node].unmask(padded)
    fed.clients[node].unmask(request)


@pytest.mark.parametrize("case", ["without-itself", "stranger", "too-small"])
def test_client_refuses_to_sign_a_survivor_set_that_could_leak(case: str) -> None:
    fed = federation()
    node, request = next(iter(fed.run(Stage.CONSISTENCY_CHECK).items()))
    assert isinstance(request, ConsistencyCheckRequest)
    survivors = set(request.survivor_ids)
    if case == "without-itself":
        survivors.discard(node)
        match = "it is not in the set"
    elif case == "stranger":
        survivors.add(NodeIdentity.generate().node_id)
        match = "not in the roster"
    else:
        survivors = {node, next(iter(survivors - {node}))}
        match = "below the node's minimum group size 3"
    evil = replace(request, survivor_ids=tuple(sorted(survivors)))
    with pytest.raises(SecAggRefusedError, match=match):
        fed.clients[node].consistency_check(evil)
    assert fed.clients[node].state.phase == ClientPhase.CONSISTENCY_CHECK
    assert fed.clients[node].state.survivor_ids == ()


def test_client_signs_the_survivor_set_once() -> None:
    fed = federation()
    node, request = next(iter(fed.run(Stage.CONSISTENCY_CHECK).items()))
    assert isinstance(request, ConsistencyCheckRequest)
    fed.clients[node].consistency_check(request)
    other = replace(request, survivor_ids=tuple(n for n in request.survivor_ids if n != node))
    with pytest.raises(SecAggProtocolError, match="expects a unmask request"):
        fed.clients[node].consistency_check(other)


def test_stochastic_rounding_comes_from_the_nodes_csprng_by_default() -> None:
    params = SecAggParams(
        num_clients=3, num_neighbours=2, threshold=2, vector_length=4096, clipping_range=1.0
    )
    x = np.full(4096, 0.123456, dtype=np.float32)  # halfway-ish between levels
    first, second = quantize(x, params), quantize(x, params)
    assert not np.array_equal(first, second)  # fresh os.urandom key per call
    seeded = [quantize(x, params, np.random.default_rng(3)) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0], seeded[1])  # tests may still pass a generator


def test_authenticated_session_survives_state_records_and_cannot_be_restored_unauthenticated() -> (
    None
):
    fed = federation()
    states = {n: c.to_state_record() for n, c in fed.clients.items()}

    def step(node: int, request: SecAggMessage) -> SecAggMessage:
        session = ClientSession.from_state_record(
            states[node], identity=fed.ids[node], roster=fed.roster
        )
        reply = (
            session.masked_input_quantized(request, fed.inputs[node])
            if isinstance(request, MaskedInputRequest)
            else session.handle(request)
        )
        states[node] = session.to_state_record()
        return reply

    for _, opener in fed.server.stages():
        for node, request in opener().items():
            fed.server.receive(step(node, request))
    result = fed.server.result()
    assert result.contributors == tuple(fed.nodes)
    np.testing.assert_array_equal(result.total, plain_sum(fed.inputs, fed.nodes))
    node = fed.nodes[0]
    assert states[node]["phase"] == "done" and states[node]["authenticated"] == 1
    with pytest.raises(SecAggProtocolError, match="saved by an authenticated session"):
        ClientSession.from_state_record(states[node])  # no downgrade to the legacy protocol
    with pytest.raises(SecAggProtocolError, match="Malformed client session state"):
        ClientSession.from_state_record(
            {**states[node], "node_id": fed.nodes[1]}, identity=fed.ids[node], roster=fed.roster
        )


JOB_A, JOB_B = b"fedbrain/job/sha256:" + b"a" * 64, b"fedbrain/job/sha256:" + b"b" * 64


def _forwarded(
    fed: Federation, node: int, replies: Mapping[int, AdvertiseKeysReply]
) -> ShareKeysRequest:
    """What a malicious server forwards to ``node``: every neighbour's keys and signature as
    they were advertised, whatever the neighbour signed them for."""
    peers = tuple(sorted(fed.server.state.graph[node]))
    return ShareKeysRequest(
        run_id=1,
        server_round=1,
        node_id=node,
        peer_ids=peers,
        share_public_keys=tuple(replies[p].share_public_key for p in peers),
        mask_public_keys=tuple(replies[p].mask_public_key for p in peers),
        seed_commitments=tuple(replies[p].seed_commitment for p in peers),
        signatures=tuple(replies[p].signature for p in peers),
    )


def test_clients_holding_different_contexts_refuse_each_others_keys() -> None:
    # The server gives the target one job (context A) and everyone else another (context B)
    # in one round, e.g. a tiny clipping norm for all but the target, so that the sum is the
    # target's input. Every node signs its keys for its own context: the honest server refuses
    # the target's reply, and a malicious one that forwards it anyway gets refusals.
    fed = federation(context=JOB_B)
    target = fed.nodes[0]
    fed.clients[target] = ClientSession(identity=fed.ids[target], roster=fed.roster, context=JOB_A)
    replies: dict[int, AdvertiseKeysReply] = {}
    for node, request in fed.server.advertise_keys().items():
        reply = fed.clients[node].handle(request)
        assert isinstance(reply, AdvertiseKeysReply)
        replies[node] = reply
    with pytest.raises(SecAggProtocolError, match=f"Node {target}'s .* bad identity signature"):
        fed.server.receive(replies[target])
    for node in fed.nodes[1:]:
        fed.server.receive(replies[node])
    neighbour = min(fed.server.state.graph[target])
    for node in (target, neighbour):  # each refuses the other's signature, deriving nothing
        before = freeze(fed.clients[node].state)
        with pytest.raises(SecAggRefusedError, match="another session context"):
            fed.clients[node].share_keys(_forwarded(fed, node, replies))
        assert freeze(fed.clients[node].state) == before
    # Nodes that hold the same context accept each other (the forwarded keys of others).
    others = [n for n in fed.nodes[1:] if target not in fed.server.state.graph[n]]
    for node in others:
        fed.clients[node].share_keys(_forwarded(fed, node, replies))


def test_a_session_is_bound_to_its_context_at_every_stage() -> None:
    fed = federation(context=JOB_A)
    node, request = next(iter(fed.run(Stage.CONSISTENCY_CHECK).items()))
    assert isinstance(request, ConsistencyCheckRequest)
    record = fed.clients[node].to_state_record()
    assert record["context"] == JOB_A
    # A later stage that comes with another job is refused before the session is used.
    with pytest.raises(SecAggRefusedError, match="refuses a request for another session context"):
        ClientSession.from_state_record(
            record, identity=fed.ids[node], roster=fed.roster, context=JOB_B
        )
    same = ClientSession.from_state_record(
        record, identity=fed.ids[node], roster=fed.roster, context=JOB_A
    )
    reply = same.consistency_check(request)
    # The survivor-set signature is bound to the context too.
    statement_a = survivors_statement(
        run_id=1, server_round=1, survivor_ids=request.survivor_ids, context=JOB_A
    )
    statement_b = survivors_statement(
        run_id=1, server_round=1, survivor_ids=request.survivor_ids, context=JOB_B
    )
    fed.roster.verify(node, reply.signature, statement_a)
    with pytest.raises(SecAggAuthenticationError):
        fed.roster.verify(node, reply.signature, statement_b)
    with pytest.raises(ValueError, match="at most 1024 bytes"):
        ClientSession(identity=fed.ids[node], roster=fed.roster, context=b"x" * 1025)
    with pytest.raises(TypeError, match="`context` must be bytes"):
        ServerSession(
            PARAMS,
            run_id=1,
            server_round=1,
            node_ids=fed.nodes,
            rng=np.random.default_rng(0),
            context="job",  # type: ignore[arg-type]
        )
