"""One bad client is one dropout, never a silently wrong sum.

Each malformed reply is refused by ServerSession.receive with the node and the reason, leaves
the server's state unchanged, and after ``reject`` the round completes with the exact sum of
the remaining clients. Garbage or forged shares are found later (eviction at the close of the
masked-input stage, robust reconstruction at the end) and their senders named.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from aggregation.secagg import (
    AdvertiseKeysReply,
    ConsistencyCheckReply,
    MaskedInputReply,
    NodeIdentity,
    SecAggAbortedError,
    SecAggMessage,
    SecAggProtocolError,
    SecAggResult,
    ShareKeysReply,
    Stage,
    UnmaskReply,
    run_secagg_round,
    shamir,
)
from aggregation.secagg.identity import advertise_statement, survivors_statement
from aggregation.secagg.params import SecAggParams
from aggregation.secagg.primitives import generate_private_key, public_bytes
from tests.aggregation.secagg.helpers import PARAMS, Federation, federation, freeze, plain_sum

Mutation = Callable[[Any, Federation], SecAggMessage]  # Any: each case knows its reply type
_P = 2**255 - 19
ORDER_8 = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def refuse_then_finish(
    fed: Federation, stage: Stage, bad: int, mutate: Mutation, match: str
) -> SecAggResult:
    """Drive the round; ``bad``'s reply in ``stage`` is mutated and must be refused with
    ``match`` and no state change; it is rejected and the round must still finish."""
    requests = fed.run(stage)
    for node, request in requests.items():
        reply = fed.answer(node, request)
        if node != bad:
            fed.server.receive(reply)
            continue
        evil = mutate(reply, fed)
        before = freeze(fed.server.state)
        with pytest.raises(SecAggProtocolError, match=match) as refused:
            fed.server.receive(evil)
        assert f"Node {bad}" in str(refused.value)
        assert freeze(fed.server.state) == before
        fed.server.reject(bad, str(refused.value))
        with pytest.raises(SecAggProtocolError, match="not asked"):
            fed.server.receive(reply)  # a rejected node stays out of this stage
    fed.run()
    result = fed.server.result()
    assert result.dropout_reasons[bad].startswith(f"{stage}: Node {bad}")
    late = stage in (Stage.CONSISTENCY_CHECK, Stage.UNMASK)
    assert (bad in result.contributors) == late  # its masked input is in the sum only if sent
    np.testing.assert_array_equal(result.total, plain_sum(fed.inputs, result.contributors))
    return result


def signed_keys(reply: SecAggMessage, fed: Federation, **keys: bytes) -> SecAggMessage:
    """``reply`` with other keys, correctly signed by its sender (a malicious client)."""
    assert isinstance(reply, AdvertiseKeysReply)
    evil = replace(reply, **keys)  # type: ignore[arg-type]
    statement = advertise_statement(
        run_id=reply.run_id,
        server_round=reply.server_round,
        node_id=reply.node_id,
        params=fed.params,
        share_public_key=evil.share_public_key,
        mask_public_key=evil.mask_public_key,
        seed_commitment=evil.seed_commitment,
    )
    return replace(evil, signature=fed.ids[reply.node_id].sign(statement))


def other_params_signature(reply: SecAggMessage, fed: Federation) -> SecAggMessage:
    assert isinstance(reply, AdvertiseKeysReply)
    statement = advertise_statement(
        run_id=reply.run_id,
        server_round=reply.server_round,
        node_id=reply.node_id,
        params=replace(fed.params, threshold=4),
        share_public_key=reply.share_public_key,
        mask_public_key=reply.mask_public_key,
        seed_commitment=reply.seed_commitment,
    )
    return replace(reply, signature=fed.ids[reply.node_id].sign(statement))


def replayed_key(reply: SecAggMessage, fed: Federation) -> SecAggMessage:
    taken = next(iter(fed.server.state.mask_public_keys.values()))
    return signed_keys(reply, fed, share_public_key=taken)


ADVERTISE_CASES: dict[str, tuple[Mutation, str]] = {
    "all-zero-key": (
        lambda r, f: signed_keys(r, f, share_public_key=bytes(32)),
        "share public key is unusable.*small order",
    ),
    "low-order-key": (
        lambda r, f: signed_keys(r, f, mask_public_key=ORDER_8),
        "mask public key is unusable.*small order",
    ),
    "non-canonical-key": (
        lambda r, f: signed_keys(r, f, share_public_key=(_P + 5).to_bytes(32, "little")),
        "Non-canonical",
    ),
    "same-two-keys": (
        lambda r, f: signed_keys(r, f, mask_public_key=r.share_public_key),
        "two public keys must differ",
    ),
    "replayed-key": (replayed_key, r"replayed keys"),
    "unsigned": (lambda r, f: replace(r, signature=b""), "bad identity signature.*64 bytes"),
    "signed-by-another": (
        lambda r, f: replace(r, signature=NodeIdentity.generate().sign(b"x")),
        "bad identity signature.*does not verify",
    ),
    "signed-other-params": (other_params_signature, "bad identity signature"),
    "substituted-key": (
        lambda r, f: replace(r, mask_public_key=public_bytes(generate_private_key())),
        "bad identity signature",
    ),
}


@pytest.mark.parametrize("case", ADVERTISE_CASES, ids=list(ADVERTISE_CASES))
def test_bad_advertise_keys_reply_is_one_dropout(case: str) -> None:
    fed = federation()
    mutate, match = ADVERTISE_CASES[case]
    refuse_then_finish(fed, Stage.ADVERTISE_KEYS, fed.nodes[-1], mutate, match)


def _masked(reply: SecAggMessage, **changes: object) -> SecAggMessage:
    assert isinstance(reply, MaskedInputReply)
    return replace(reply, **changes)  # type: ignore[arg-type]


def _unmask(reply: SecAggMessage, **changes: object) -> SecAggMessage:
    assert isinstance(reply, UnmaskReply)
    return replace(reply, **changes)  # type: ignore[arg-type]


def _stranger_peers(reply: SecAggMessage, fed: Federation) -> SecAggMessage:
    node = reply.node_id
    stranger = next(n for n in fed.nodes if n != node and n not in fed.server.state.graph[node])
    assert isinstance(reply, MaskedInputReply)
    return _masked(reply, peer_ids=tuple(sorted({*reply.peer_ids, stranger})))


LATER_CASES: dict[str, tuple[Stage, Mutation, str]] = {
    "share-keys-wrong-receivers": (
        Stage.SHARE_KEYS,
        lambda r, f: replace(
            r,
            receiver_ids=r.receiver_ids[1:],
            ciphertexts=r.ciphertexts[1:],
        ),
        "must send one share to each of",
    ),
    "masked-input-empty": (
        Stage.MASKED_INPUT,
        lambda r, f: _masked(r, masked_input=np.zeros(0, dtype=np.uint32)),
        "0 values; the round expects `vector_length` = 8",
    ),
    "masked-input-huge": (
        Stage.MASKED_INPUT,
        lambda r, f: _masked(r, masked_input=np.zeros(1 << 20, dtype=np.uint32)),
        "1048576 values",
    ),
    "masked-input-stranger-peers": (Stage.MASKED_INPUT, _stranger_peers, "non-senders"),
    "masked-input-too-few-peers": (
        Stage.MASKED_INPUT,
        lambda r, f: _masked(r, peer_ids=()),
        "at least threshold - 1 = 2",
    ),
    "consistency-signature-on-another-set": (
        Stage.CONSISTENCY_CHECK,
        lambda r, f: replace(
            r,
            signature=f.ids[r.node_id].sign(
                survivors_statement(run_id=1, server_round=1, survivor_ids=f.nodes[1:])
            ),
        ),
        "bad signature on the survivor set",
    ),
    "unmask-unrequested-shares": (
        Stage.UNMASK,
        lambda r, f: _unmask(
            r,
            seed_share_ids=r.seed_share_ids[1:],
            seed_shares=r.seed_shares[1:],
        ),
        "exactly the requested shares",
    ),
    "unmask-share-not-a-field-element": (
        Stage.UNMASK,
        lambda r, f: _unmask(
            r,
            seed_shares=(b"\xff" * shamir.SHARE_SIZE, *r.seed_shares[1:]),
        ),
        "not a field element",
    ),
    "wrong-stage": (
        Stage.SHARE_KEYS,
        lambda r, f: ConsistencyCheckReply(
            run_id=1, server_round=1, node_id=r.node_id, signature=b"s" * 64
        ),
        "a consistency_check reply arrived while the server is in phase share_keys",
    ),
    "other-round": (
        Stage.MASKED_INPUT,
        lambda r, f: replace(r, server_round=2),
        "reply for run 1 round 2",
    ),
}


@pytest.mark.parametrize("case", LATER_CASES, ids=list(LATER_CASES))
def test_bad_reply_in_a_later_stage_is_one_dropout(case: str) -> None:
    fed = federation()
    stage, mutate, match = LATER_CASES[case]
    refuse_then_finish(fed, stage, fed.nodes[2], mutate, match)


def test_duplicate_reply_is_refused_and_the_first_one_counts() -> None:
    fed = federation()
    requests = fed.run(Stage.SHARE_KEYS)
    node = fed.nodes[0]
    reply = fed.answer(node, requests[node])
    fed.server.receive(reply)
    before = freeze(fed.server.state)
    with pytest.raises(SecAggProtocolError, match=f"Duplicate share_keys reply from node {node}"):
        fed.server.receive(reply)
    assert freeze(fed.server.state) == before
    with pytest.raises(SecAggProtocolError, match="already accepted"):
        fed.server.reject(node, "late complaint")


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"stage": "masked_input", "kind": "reply"}, "Malformed MaskedInputReply record"),
        ({"bogus": b"\x00" * 9}, "Unknown SecAgg"),
    ],
)
def test_unparsable_reply_record_is_refused_naming_its_sender(
    record: dict[str, object], match: str
) -> None:
    fed = federation()
    fed.run(Stage.MASKED_INPUT)
    with pytest.raises(SecAggProtocolError, match=f"Node {fed.nodes[0]}'s reply rejected.*{match}"):
        fed.server.receive_record(fed.nodes[0], record)


def test_nan_float_array_and_wrong_node_in_a_record_are_dropouts_and_the_sum_is_exact() -> None:
    people = sorted((NodeIdentity.generate() for _ in range(6)), key=lambda i: i.node_id)
    ids = [i.node_id for i in people]
    rng = np.random.default_rng(5)
    inputs = {n: rng.integers(0, 2**32, 8, dtype=np.uint32) for n in ids}

    def misbehave(node: int, record: dict[str, Any]) -> dict[str, Any]:
        if node == ids[1] and record["stage"] == "masked_input":
            return {**record, "masked_input": np.full(8, np.nan)}  # a float64 "update"
        if node == ids[4] and record["stage"] == "consistency_check":
            return {**record, "node_id": ids[0]}  # pretends to be another node
        return record

    outcome = run_secagg_round(
        PARAMS, inputs, rng=np.random.default_rng(1), identities=people, tamper_reply=misbehave
    )
    assert "1-D uint32 numpy array" in outcome.dropout_reasons[ids[1]]
    assert f"names node {ids[0]}, not its sender" in outcome.dropout_reasons[ids[4]]
    assert set(outcome.result.contributors) == set(ids) - {ids[1]}  # ids[4]'s input was sent
    np.testing.assert_array_equal(
        outcome.result.total, plain_sum(inputs, outcome.result.contributors)
    )


# -- shares: found after the fact ----------------------------------------------------------


def _garbage(reply: SecAggMessage, which: slice) -> SecAggMessage:
    assert isinstance(reply, ShareKeysReply)
    rng = np.random.default_rng(9)
    cts = list(reply.ciphertexts)
    for i in range(len(cts))[which]:
        cts[i] = rng.bytes(len(cts[i]))
    return replace(reply, ciphertexts=tuple(cts))


@pytest.mark.parametrize("which", [slice(None), slice(0, 1)], ids=["all", "one"])
def test_garbage_share_ciphertexts_make_their_sender_a_dropout(which: slice) -> None:
    fed = federation()
    bad = fed.nodes[3]

    def hook(stage: Stage, node: int, reply: SecAggMessage) -> SecAggMessage:
        return _garbage(reply, which) if stage == Stage.SHARE_KEYS and node == bad else reply

    fed.run(reply_hook=hook)  # the server cannot read shares: it accepts them
    result = fed.server.result()
    assert bad not in result.contributors
    assert set(result.contributors) == set(fed.nodes) - {bad}
    assert "could not open its encrypted shares" in result.dropout_reasons[bad]
    assert result.measurements["n_evicted_masked_input"] == 1
    np.testing.assert_array_equal(result.total, plain_sum(fed.inputs, result.contributors))
    receivers = [n for n in fed.nodes if n != bad and bad in fed.server.state.graph[n]]
    left_out = [n for n in receivers if bad in fed.clients[n].state.excluded]
    assert len(left_out) == (len(receivers) if which == slice(None) else 1)


def _shift(share: bytes, delta: int) -> bytes:
    return ((int.from_bytes(share, "big") + delta) % shamir.PRIME).to_bytes(
        shamir.SHARE_SIZE, "big"
    )


def _forge_first_seed_share(reply: SecAggMessage, delta_of: Callable[[int], int]) -> SecAggMessage:
    assert isinstance(reply, UnmaskReply)
    target = reply.seed_share_ids[0]
    forged = _shift(reply.seed_shares[0], delta_of(target))
    return replace(reply, seed_shares=(forged, *reply.seed_shares[1:]))


def _lagrange(holder: int, holders: list[int]) -> int:
    xi, num, den = shamir.share_x(holder), 1, 1
    for other in holders:
        if other != holder:
            xj = shamir.share_x(other)
            num, den = num * xj % shamir.PRIME, den * (xj - xi) % shamir.PRIME
    return num * pow(den, -1, shamir.PRIME) % shamir.PRIME


@pytest.mark.parametrize("forgery", ["bit-flip", "lagrange-delta"])
def test_forged_unmask_share_is_excluded_its_holder_named_and_the_sum_exact(forgery: str) -> None:
    fed = federation()
    bad = fed.nodes[1]
    t = fed.params.threshold

    def delta_of(target: int) -> int:
        if forgery == "bit-flip":
            return 1 << 300
        # shift the target's seed by 1 when the server interpolates the first t holders
        holders = sorted(fed.server.state.graph[target] | {target})[:t]
        if bad not in holders:
            holders = [*holders[: t - 1], bad]
        return pow(_lagrange(bad, holders), -1, shamir.PRIME)

    def hook(stage: Stage, node: int, reply: SecAggMessage) -> SecAggMessage:
        if stage == Stage.UNMASK and node == bad:
            return _forge_first_seed_share(reply, delta_of)
        return reply

    fed.run(reply_hook=hook)
    result = fed.server.result()
    assert set(result.contributors) == set(fed.nodes)  # its input was sent honestly
    assert "inconsistent with the other holders'" in result.dropout_reasons[bad]
    assert result.measurements["n_inconsistent_share_holders"] == 1
    np.testing.assert_array_equal(result.total, plain_sum(fed.inputs, result.contributors))


def test_a_forged_share_without_redundancy_aborts_the_round_rather_than_shift_the_sum() -> None:
    # N = 4, k = 3, t = 3: two clients drop after masking, so each secret gets exactly t
    # shares and the forgery cannot be located; the commitment shows it, the round aborts.
    params = SecAggParams(
        num_clients=5, num_neighbours=4, threshold=3, vector_length=8, clipping_range=1.0
    )
    fed = federation(params)
    bad = fed.nodes[0]

    def hook(stage: Stage, node: int, reply: SecAggMessage) -> SecAggMessage | None:
        if stage == Stage.UNMASK and node in fed.nodes[3:]:
            return None  # silent
        if stage == Stage.UNMASK and node == bad:
            return _forge_first_seed_share(reply, lambda _: 1)
        return reply

    fed.run(reply_hook=hook)
    with pytest.raises(SecAggAbortedError, match=r"self-mask seed of client \d+ cannot be rebuilt"):
        fed.server.result()
    assert fed.server.state.masked_sum is None  # nothing left to leak


def test_a_client_sharing_another_seed_than_it_committed_to_aborts_naming_it() -> None:
    # Its shares agree with each other, but not with its signed commitment: the server cannot
    # tell this from colluding holders, so it aborts rather than trust either.
    fed = federation()
    cheat = fed.nodes[2]
    requests = fed.run(Stage.SHARE_KEYS)
    fed.clients[cheat].state.self_seed = bytes(32)  # not the seed it committed to
    for node, request in requests.items():
        fed.server.receive(fed.answer(node, request))
    fed.run()
    with pytest.raises(
        SecAggAbortedError,
        match=f"self-mask seed of client {cheat} cannot be rebuilt.*not the expected secret",
    ):
        fed.server.result()


def test_garbage_shares_that_leave_too_few_readable_holders_abort_rather_than_corrupt() -> None:
    # k = 4, t = 4: the bad client garbles one of its four shares. Removing it needs its mask
    # key from the three neighbours that masked with it, one short of t; they must leave the
    # sum too, and so on: nothing can be unmasked, so the round aborts with the reasons.
    params = SecAggParams(
        num_clients=5, num_neighbours=4, threshold=4, vector_length=8, clipping_range=1.0
    )
    fed = federation(params)
    bad = fed.nodes[0]

    def hook(stage: Stage, node: int, reply: SecAggMessage) -> SecAggMessage:
        return _garbage(reply, slice(0, 1)) if stage == Stage.SHARE_KEYS and node == bad else reply

    with pytest.raises(SecAggAbortedError, match="only 0 masked inputs can be unmasked"):
        fed.run(reply_hook=hook)
    reasons = fed.server.state.dropout_reasons
    assert "could not open its encrypted shares" in reasons[bad]
    assert any(f"masked with node {bad}" in reason for reason in reasons.values())


def test_without_kept_masked_inputs_the_sum_is_exact_and_garbage_shares_abort_instead() -> None:
    honest = federation(keep_masked_inputs=False)
    honest.run()
    result = honest.server.result()
    np.testing.assert_array_equal(result.total, plain_sum(honest.inputs, honest.nodes))
    assert honest.server.state.masked_inputs == {}

    fed = federation(keep_masked_inputs=False)
    bad = fed.nodes[3]

    def hook(stage: Stage, node: int, reply: SecAggMessage) -> SecAggMessage:
        return _garbage(reply, slice(None)) if stage == Stage.SHARE_KEYS and node == bad else reply

    with pytest.raises(SecAggAbortedError, match=rf"clients \[{bad}\] must leave the sum"):
        fed.run(reply_hook=hook)
    assert "could not open its encrypted shares" in fed.server.state.dropout_reasons[bad]
