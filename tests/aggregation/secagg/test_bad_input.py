"""Honest-client refusals and bad input: each is rejected with a clear error, nothing leaks."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from aggregation.secagg import (
    ClientPhase,
    ClientSession,
    MaskedInputRequest,
    SecAggMessage,
    SecAggParams,
    SecAggProtocolError,
    SecAggRefusedError,
    ServerPhase,
    ServerSession,
    ShareKeysReply,
    UnmaskRequest,
    dequantize_sum,
    run_secagg_round,
)

PARAMS = SecAggParams(
    num_clients=6, num_neighbours=4, threshold=3, vector_length=8, clipping_range=1.0
)
NODES = [10, 11, 12, 13, 14, 15]


def inputs(seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.uniform(-1, 1, 8).astype(np.float32) for n in NODES}


def drive_to_unmask(
    *, run_id: int = 1, server_round: int = 1
) -> tuple[ServerSession, dict[int, ClientSession], dict[int, UnmaskRequest]]:
    server = ServerSession(
        PARAMS,
        run_id=run_id,
        server_round=server_round,
        node_ids=NODES,
        rng=np.random.default_rng(0),
    )
    clients = {n: ClientSession(n) for n in NODES}
    for n, a_req in server.advertise_keys().items():
        server.receive(clients[n].advertise_keys(a_req))
    for n, s_req in server.share_keys().items():
        server.receive(clients[n].share_keys(s_req))
    updates = inputs()
    for n, m_req in server.masked_input().items():
        server.receive(clients[n].masked_input(m_req, updates[n], np.random.default_rng(n)))
    return server, clients, server.unmask()


def test_client_refuses_unmask_listing_a_peer_as_both_dropped_and_surviving() -> None:
    _, clients, requests = drive_to_unmask()
    node, request = next(iter(requests.items()))
    peer = next(p for p in request.surviving_ids if p != node)
    evil = replace(request, dropped_ids=tuple(sorted({*request.dropped_ids, peer})))
    client = clients[node]
    with pytest.raises(SecAggRefusedError, match="both surviving and dropped"):
        client.unmask(evil)
    assert client.state.phase == ClientPhase.UNMASK  # nothing revealed, still waiting
    honest = client.unmask(request)
    assert peer in honest.seed_share_ids and peer not in honest.key_share_ids


@pytest.mark.parametrize("case", ["stranger", "itself-dropped", "itself-missing", "too-few"])
def test_client_refuses_unmask_requests_that_could_leak(case: str) -> None:
    _, clients, requests = drive_to_unmask()
    node, request = next(iter(requests.items()))
    neighbours = set(clients[node].state.seed_shares)
    stranger = next(n for n in NODES if n not in neighbours and n != node)
    surviving, dropped = set(request.surviving_ids), set(request.dropped_ids)
    if case == "stranger":
        dropped.add(stranger)
    elif case == "itself-dropped":
        surviving.discard(node)
        dropped.add(node)
    elif case == "itself-missing":
        surviving.discard(node)
    else:
        surviving = {node}
        dropped = neighbours
    evil = replace(
        request, surviving_ids=tuple(sorted(surviving)), dropped_ids=tuple(sorted(dropped))
    )
    with pytest.raises(SecAggRefusedError, match="refuses to unmask"):
        clients[node].unmask(evil)
    assert clients[node].state.phase == ClientPhase.UNMASK


def test_client_answers_unmask_only_once() -> None:
    _, clients, requests = drive_to_unmask()
    node, request = next(iter(requests.items()))
    clients[node].unmask(request)
    flipped = replace(request, surviving_ids=(node,), dropped_ids=())
    with pytest.raises(SecAggProtocolError, match="already answered every stage"):
        clients[node].unmask(flipped)


@pytest.mark.parametrize(
    ("update", "error", "match"),
    [
        (np.zeros(7, dtype=np.float32), ValueError, "vector_length"),
        (np.zeros((2, 4), dtype=np.float32), ValueError, "1-D"),
        (np.zeros(8, dtype=np.float64), TypeError, "float32"),
        (np.array([0, 1, 2, np.nan, 0, 0, 0, 0], dtype=np.float32), ValueError, "NaN or Inf"),
        (np.array([0, 1, 2, np.inf, 0, 0, 0, 0], dtype=np.float32), ValueError, "NaN or Inf"),
    ],
    ids=["short", "2-d", "float64", "nan", "inf"],
)
def test_client_refuses_a_bad_update_and_keeps_its_state(
    update: np.ndarray, error: type[Exception], match: str
) -> None:
    server = ServerSession(
        PARAMS, run_id=1, server_round=1, node_ids=NODES, rng=np.random.default_rng(0)
    )
    clients = {n: ClientSession(n) for n in NODES}
    for n, a_req in server.advertise_keys().items():
        server.receive(clients[n].advertise_keys(a_req))
    for n, s_req in server.share_keys().items():
        server.receive(clients[n].share_keys(s_req))
    requests = server.masked_input()
    node = NODES[0]
    with pytest.raises(error, match=match):
        clients[node].masked_input(requests[node], update, np.random.default_rng(0))
    assert clients[node].state.phase == ClientPhase.MASKED_INPUT
    reply = clients[node].masked_input(requests[node], inputs()[node], np.random.default_rng(0))
    assert reply.masked_input.dtype == np.uint32 and reply.masked_input.shape == (8,)


def test_round_continues_without_a_client_whose_update_contains_nan() -> None:
    updates = inputs()
    updates[12] = np.full(8, np.nan, dtype=np.float32)
    outcome = run_secagg_round(PARAMS, updates, rng=np.random.default_rng(1))
    assert isinstance(outcome.client_errors[12], ValueError)
    assert 12 not in outcome.result.contributors and len(outcome.result.contributors) == 5
    expected = sum(
        np.clip(updates[n], -1, 1).astype(np.float64) for n in outcome.result.contributors
    )
    assert np.abs(outcome.dequantized_sum(PARAMS) - expected).max() <= 5 * PARAMS.quantization_step


def test_server_rejects_replies_for_the_wrong_stage_round_run_or_node() -> None:
    server = ServerSession(
        PARAMS, run_id=1, server_round=3, node_ids=NODES, rng=np.random.default_rng(0)
    )
    clients = {n: ClientSession(n) for n in NODES}
    replies = {n: clients[n].advertise_keys(r) for n, r in server.advertise_keys().items()}
    good = replies[10]
    with pytest.raises(SecAggProtocolError, match="round 4"):
        server.receive(replace(good, server_round=4))
    with pytest.raises(SecAggProtocolError, match="run 2"):
        server.receive(replace(good, run_id=2))
    with pytest.raises(SecAggProtocolError, match="not asked"):
        server.receive(replace(good, node_id=99))
    fake = ShareKeysReply(run_id=1, server_round=3, node_id=10, receiver_ids=(), ciphertexts=())
    with pytest.raises(SecAggProtocolError, match="share_keys reply arrived while"):
        server.receive(fake)
    server.receive(good)
    with pytest.raises(SecAggProtocolError, match="Duplicate"):
        server.receive(good)
    with pytest.raises(SecAggProtocolError, match="replayed keys"):
        server.receive(replace(replies[11], share_public_key=good.share_public_key))
    assert set(server.state.share_public_keys) == {10}  # rejected replies left no trace
    with pytest.raises(SecAggProtocolError, match="must be in phase"):
        server.unmask()


def test_client_rejects_a_request_for_the_wrong_stage_or_round() -> None:
    server, clients, requests = drive_to_unmask(server_round=5)
    node, request = next(iter(requests.items()))
    with pytest.raises(SecAggProtocolError, match="run 1 round 6"):
        clients[node].unmask(replace(request, server_round=6))
    fresh = ClientSession(node)
    with pytest.raises(SecAggProtocolError, match="expects a advertise_keys request"):
        fresh.unmask(request)
    assert clients[node].state.phase == ClientPhase.UNMASK
    assert server.state.phase == ServerPhase.UNMASK


def test_server_rejects_duplicated_node_ids() -> None:
    with pytest.raises(ValueError, match="duplicates"):
        ServerSession(
            PARAMS,
            run_id=1,
            server_round=1,
            node_ids=[1, 1, 2, 3, 4, 5],
            rng=np.random.default_rng(0),
        )


def test_tampered_share_leaves_its_sender_out_and_the_round_continues() -> None:
    # Node 13 cannot open one share: it leaves that sender out (no error, the threshold still
    # holds) and says so; the server removes the sender's input, whose masks now disagree.
    flipped: dict[str, int] = {}

    def flip_one_share(message: SecAggMessage) -> SecAggMessage:
        if isinstance(message, MaskedInputRequest) and message.node_id == 13 and not flipped:
            flipped["sender"] = message.sender_ids[0]
            first = message.ciphertexts[0]
            bad = first[:-1] + bytes([first[-1] ^ 0x80])
            return replace(message, ciphertexts=(bad, *message.ciphertexts[1:]))
        return message

    updates = inputs()
    outcome = run_secagg_round(PARAMS, updates, rng=np.random.default_rng(2), tamper=flip_one_share)
    sender = flipped["sender"]
    assert outcome.client_errors == {}
    assert 13 in outcome.result.contributors and sender not in outcome.result.contributors
    assert "[13] could not open its encrypted shares" in outcome.dropout_reasons[sender]
    contributors = outcome.result.contributors
    expected = sum(np.clip(updates[n], -1, 1).astype(np.float64) for n in contributors)
    bound = len(contributors) * PARAMS.quantization_step
    assert np.abs(outcome.dequantized_sum(PARAMS) - expected).max() <= bound


def test_share_replayed_from_another_round_or_sender_fails_authentication() -> None:
    captured: dict[int, MaskedInputRequest] = {}

    def capture(message: SecAggMessage) -> None:
        if isinstance(message, MaskedInputRequest):
            captured[message.node_id] = message

    run_secagg_round(
        PARAMS, inputs(), rng=np.random.default_rng(3), server_round=1, on_message=capture
    )
    old = captured[14]

    def replay(message: SecAggMessage) -> SecAggMessage:
        if isinstance(message, MaskedInputRequest) and message.node_id == 14:
            return replace(message, ciphertexts=old.ciphertexts[:1] + message.ciphertexts[1:])
        return message

    outcome = run_secagg_round(
        PARAMS, inputs(), rng=np.random.default_rng(3), server_round=2, tamper=replay
    )
    replayed_sender = old.sender_ids[0]
    assert outcome.client_errors == {}
    assert replayed_sender not in outcome.result.contributors  # 14 left it out
    assert "could not open" in outcome.dropout_reasons[replayed_sender]

    def swap_senders(message: SecAggMessage) -> SecAggMessage:
        if isinstance(message, MaskedInputRequest) and message.node_id == 14:
            c = message.ciphertexts
            return replace(message, ciphertexts=(c[1], c[0], *c[2:]))
        return message

    outcome = run_secagg_round(PARAMS, inputs(), rng=np.random.default_rng(4), tamper=swap_senders)
    # 14 opens neither swapped share; disagreeing with two peers, it is the one removed.
    assert 14 not in outcome.result.contributors
    assert "it could not open their encrypted shares" in outcome.dropout_reasons[14]


def test_client_refuses_shares_from_a_node_it_never_shared_keys_with() -> None:
    server = ServerSession(
        PARAMS, run_id=1, server_round=1, node_ids=NODES, rng=np.random.default_rng(0)
    )
    clients = {n: ClientSession(n) for n in NODES}
    for n, a_req in server.advertise_keys().items():
        server.receive(clients[n].advertise_keys(a_req))
    share_requests = server.share_keys()
    for n, s_req in share_requests.items():
        server.receive(clients[n].share_keys(s_req))
    requests = server.masked_input()
    node = NODES[0]
    stranger = next(n for n in NODES if n not in share_requests[node].peer_ids and n != node)
    req = requests[node]
    evil = replace(req, sender_ids=tuple(sorted({*req.sender_ids[1:], stranger})))
    with pytest.raises(SecAggRefusedError, match="not neighbours"):
        clients[node].masked_input(evil, inputs()[node], np.random.default_rng(0))


def test_server_rejects_unmask_reply_with_unrequested_shares() -> None:
    server, clients, requests = drive_to_unmask()
    node, request = next(iter(requests.items()))
    reply = clients[node].unmask(request)
    with pytest.raises(SecAggProtocolError, match="exactly the requested"):
        server.receive(
            replace(
                reply, seed_share_ids=reply.seed_share_ids[1:], seed_shares=reply.seed_shares[1:]
            )
        )
    server.receive(reply)
    assert server.state.phase == ServerPhase.UNMASK


def test_client_session_survives_a_state_record_round_trip_between_every_stage() -> None:
    server = ServerSession(
        PARAMS, run_id=1, server_round=1, node_ids=NODES, rng=np.random.default_rng(0)
    )
    states = {n: ClientSession(n).to_state_record() for n in NODES}
    updates = inputs()

    def step(node: int, request: SecAggMessage) -> SecAggMessage:
        session = ClientSession.from_state_record(states[node])
        reply = session.handle(request, updates[node], np.random.default_rng(node))
        states[node] = session.to_state_record()
        return reply

    for opener in (server.advertise_keys, server.share_keys, server.masked_input, server.unmask):
        for node, request in opener().items():
            server.receive(step(node, request))
    result = server.result()
    assert result.contributors == tuple(NODES)
    expected = sum(np.clip(updates[n], -1, 1).astype(np.float64) for n in NODES)
    decoded = dequantize_sum(result.total, num_summands=6, params=PARAMS)
    assert np.abs(decoded - expected).max() <= 6 * PARAMS.quantization_step
    assert states[NODES[0]]["phase"] == "done"
    with pytest.raises(SecAggProtocolError, match="Malformed client session state"):
        ClientSession.from_state_record({**states[NODES[0]], "share_key": b"short"})
