"""Fuzz: one random client sends an arbitrary malformed reply at a random stage.

Whatever it sends -- random records, fields of the wrong type, missing fields, another stage,
another node or round, NaN float arrays, wrong lengths, small-order or replayed keys, bad
signatures, garbage share ciphertexts, forged or out-of-field unmask shares -- the round
completes, that client is a recorded dropout with a reason, and the sum is exactly the sum
(mod 2^32) of the quantized inputs of the clients whose masked input is in it: everyone
else, plus the bad client itself only when it misbehaved after sending its masked input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from aggregation.secagg import (
    AdvertiseKeysReply,
    NodeIdentity,
    SecAggMessage,
    SecAggParams,
    Stage,
    run_secagg_round,
    shamir,
)
from aggregation.secagg.identity import advertise_statement

ORDER = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY_CHECK,
    Stage.UNMASK,
)
GENERIC = ("random-record", "wrong-type-field", "missing-field", "other-stage", "other-node")
SPECIFIC = {
    Stage.ADVERTISE_KEYS: ("zero-key", "low-order-key", "bad-signature", "replayed-key"),
    Stage.SHARE_KEYS: ("garbage-all", "garbage-one", "wrong-length-ciphertext"),
    Stage.MASKED_INPUT: ("nan-array", "wrong-length", "wrong-dtype", "stranger-peers"),
    Stage.CONSISTENCY_CHECK: ("bad-signature", "other-round"),
    Stage.UNMASK: ("forged-share", "random-shares", "not-field-element", "missing-share"),
}
ORDER_8 = bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157")
RUN_ID = 7


def _other_type(value: object) -> object:
    """A value of another type than ``value``, so the field can never parse."""
    if isinstance(value, bytes):
        return 12345
    if isinstance(value, int):
        return b"\x01" * 8
    if isinstance(value, np.ndarray):
        return [1, 2, 3]
    return b"not-" + str(value).encode()


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(5, 8))
    k = draw(st.integers(4, n - 1))
    # t <= k - 1: a client that garbles one share can be removed while its other k - 1 holders
    # still rebuild its mask key (test_bad_client covers the cascade when they cannot)
    t = draw(st.integers((k + 1) // 2 + 1, k - 1))
    params = SecAggParams(
        num_clients=n,
        num_neighbours=k,
        threshold=t,
        vector_length=draw(st.integers(1, 16)),
        clipping_range=1.0,
    )
    stage = draw(st.sampled_from(ORDER))
    return {
        "params": params,
        "bad": draw(st.integers(0, n - 1)),
        "stage": stage,
        "attack": draw(st.sampled_from(GENERIC + SPECIFIC[stage])),
        "pick": draw(st.integers(0, 2**16)),  # which field / share / peer
        "junk": draw(st.binary(min_size=0, max_size=80)),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def make_attack(
    case: dict[str, Any], bad: int, ids: list[int], identity: NodeIdentity, seen: list[Any]
) -> Callable[[int, dict[str, Any]], dict[str, Any]]:
    attack, pick, junk = case["attack"], case["pick"], case["junk"]
    params: SecAggParams = case["params"]
    rng = np.random.default_rng(case["seed"])

    def signed(record: dict[str, Any], **keys: bytes) -> dict[str, Any]:
        record = {**record, **keys}
        statement = advertise_statement(
            run_id=RUN_ID,
            server_round=1,
            node_id=bad,
            params=params,
            share_public_key=record["share_public_key"],
            mask_public_key=record["mask_public_key"],
            seed_commitment=record["seed_commitment"],
        )
        return {**record, "signature": identity.sign(statement)}

    def tamper(node: int, record: dict[str, Any]) -> dict[str, Any]:
        if node != bad or record["stage"] != case["stage"]:
            return record
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
            others = [i for i in ids if i != bad]
            return {**record, "node_id": others[pick % len(others)]}
        if attack == "other-round":
            return {**record, "round": record["round"] + 1}
        if attack == "zero-key":
            return signed(record, share_public_key=bytes(32))
        if attack == "low-order-key":
            return signed(record, mask_public_key=ORDER_8)
        if attack == "bad-signature":
            return {**record, "signature": (junk * 64 + bytes(64))[:64]}
        if attack == "replayed-key":
            earlier = [m for m in seen if isinstance(m, AdvertiseKeysReply) and m.node_id != bad]
            taken = earlier[pick % len(earlier)].mask_public_key if earlier else bytes(32)
            return signed(record, share_public_key=taken)
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
        if attack == "nan-array":
            return {**record, "masked_input": np.full(params.vector_length, np.nan)}
        if attack == "wrong-length":
            size = params.vector_length + 1 if pick % 2 else 0
            return {**record, "masked_input": np.zeros(size, dtype=np.uint32)}
        if attack == "wrong-dtype":
            return {**record, "masked_input": record["masked_input"].astype(np.uint64)}
        if attack == "stranger-peers":
            strangers = [i for i in ids if i != bad and i not in record["peer_ids"]]
            peers = sorted({*record["peer_ids"], *(strangers[:1] or [2**64 - 1])})
            return {**record, "peer_ids": peers}
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
            return {
                **record,
                "seed_shares": shares[:i] + shares[i + 1 :],
                "seed_share_ids": record["seed_share_ids"][:i] + record["seed_share_ids"][i + 1 :],
            }
        return {**record, "seed_shares": shares}

    return tamper


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_one_malicious_client_is_one_dropout_and_the_sum_is_exact(case: dict[str, Any]) -> None:
    params: SecAggParams = case["params"]
    people = sorted(
        (NodeIdentity.generate() for _ in range(params.num_clients)), key=lambda i: i.node_id
    )
    ids = [i.node_id for i in people]
    bad = ids[case["bad"]]
    rng = np.random.default_rng(case["seed"])
    inputs = {n: rng.integers(0, 2**32, params.vector_length, dtype=np.uint32) for n in ids}
    seen: list[SecAggMessage] = []
    tamper = make_attack(case, bad, ids, people[case["bad"]], seen)
    outcome = run_secagg_round(
        params,
        inputs,
        rng=rng,
        run_id=RUN_ID,
        identities=people,
        on_message=seen.append,
        tamper_reply=tamper,
    )
    reasons = outcome.dropout_reasons
    note(f"attack {case['attack']} at {case['stage']}: {reasons}")
    event(f"{case['stage']}/{case['attack']}")
    assert outcome.client_errors == {}  # no honest client had to refuse anything
    assert reasons.get(bad)
    assert set(reasons) == {bad}  # nobody else is blamed
    late = ORDER.index(case["stage"]) > ORDER.index(Stage.MASKED_INPUT)
    expected = set(ids) if late else set(ids) - {bad}
    assert set(outcome.result.contributors) == expected
    total = np.zeros(params.vector_length, dtype=np.uint32)
    for node in expected:
        total += inputs[node]
    np.testing.assert_array_equal(outcome.result.total, total)
