"""Node identities (RFC 8032 known answers), the roster, signed statements, the node policy and
the participation log."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from aggregation.secagg.errors import (
    SecAggAuthenticationError,
    SecAggProtocolError,
    SecAggRefusedError,
)
from aggregation.secagg.identity import (
    NodeIdentity,
    Roster,
    advertise_statement,
    node_id_for,
    survivors_statement,
)
from aggregation.secagg.params import SecAggParams
from aggregation.secagg.policy import ParticipationLog, SecAggPolicy

VECTORS = Path(__file__).parent / "vectors"
PARAMS = SecAggParams(
    num_clients=6, num_neighbours=4, threshold=3, vector_length=8, clipping_range=1.0
)


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


@pytest.mark.parametrize("case", load("rfc8032_ed25519.json")["cases"])
def test_identity_signs_as_rfc8032_section_7_1(case: dict[str, str]) -> None:
    identity = NodeIdentity.from_private_bytes(bytes.fromhex(case["secret_key"]))
    assert identity.public_key.hex() == case["public_key"]
    signature = identity.sign(bytes.fromhex(case["message"]))
    assert signature.hex() == case["signature"]
    roster = Roster.from_public_keys([identity.public_key])
    roster.verify(identity.node_id, signature, bytes.fromhex(case["message"]))


def test_node_id_is_the_first_8_bytes_of_sha256_of_the_public_key() -> None:
    public = bytes.fromhex(load("rfc8032_ed25519.json")["cases"][0]["public_key"])
    expected = int.from_bytes(hashlib.sha256(public).digest()[:8], "big")
    assert node_id_for(public) == expected
    with pytest.raises(ValueError, match="raw 32-byte Ed25519 key"):
        node_id_for(public[:31])


def test_roster_refuses_an_id_that_is_not_derived_from_its_key() -> None:
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    with pytest.raises(ValueError, match=f"node {a.node_id}: the id is not node_id_for"):
        Roster({a.node_id: b.public_key})
    with pytest.raises(ValueError, match="not 32 raw bytes"):
        Roster({a.node_id: a.public_key[:16]})
    with pytest.raises(ValueError, match="duplicate key"):
        Roster.from_public_keys([a.public_key, a.public_key])
    roster = Roster({a.node_id: a.public_key, b.node_id: b.public_key})
    assert set(roster) == {a.node_id, b.node_id} and roster[a.node_id] == a.public_key


def test_roster_verify_raises_for_a_wrong_signer_statement_or_unknown_node() -> None:
    a, b = NodeIdentity.generate(), NodeIdentity.generate()
    roster = Roster.from_public_keys([a.public_key, b.public_key])
    signature = a.sign(b"statement")
    roster.verify(a.node_id, signature, b"statement")
    with pytest.raises(SecAggAuthenticationError, match="does not verify under its roster key"):
        roster.verify(b.node_id, signature, b"statement")
    with pytest.raises(SecAggAuthenticationError, match="does not verify"):
        roster.verify(a.node_id, signature, b"statemenT")
    with pytest.raises(SecAggAuthenticationError, match="64 bytes"):
        roster.verify(a.node_id, signature[:63], b"statement")
    stranger = NodeIdentity.generate()
    with pytest.raises(SecAggAuthenticationError, match="not in the roster"):
        roster.verify(stranger.node_id, stranger.sign(b"statement"), b"statement")


def test_signed_statements_bind_purpose_run_round_node_parameters_and_context() -> None:
    keys = {"share_public_key": b"s" * 32, "mask_public_key": b"m" * 32}
    base = advertise_statement(
        run_id=1, server_round=2, node_id=3, params=PARAMS, seed_commitment=b"c" * 32, **keys
    )
    variants = [
        advertise_statement(
            run_id=9, server_round=2, node_id=3, params=PARAMS, seed_commitment=b"c" * 32, **keys
        ),
        advertise_statement(
            run_id=1, server_round=9, node_id=3, params=PARAMS, seed_commitment=b"c" * 32, **keys
        ),
        advertise_statement(
            run_id=1, server_round=2, node_id=9, params=PARAMS, seed_commitment=b"c" * 32, **keys
        ),
        advertise_statement(
            run_id=1,
            server_round=2,
            node_id=3,
            params=SecAggParams(
                num_clients=6, num_neighbours=4, threshold=4, vector_length=8, clipping_range=1.0
            ),
            seed_commitment=b"c" * 32,
            **keys,
        ),
        advertise_statement(
            run_id=1, server_round=2, node_id=3, params=PARAMS, seed_commitment=b"d" * 32, **keys
        ),
        advertise_statement(
            run_id=1,
            server_round=2,
            node_id=3,
            params=PARAMS,
            seed_commitment=b"c" * 32,
            context=b"another job",
            **keys,
        ),
        survivors_statement(run_id=1, server_round=2, survivor_ids=[3]),
        survivors_statement(run_id=1, server_round=2, survivor_ids=[3], context=b"another job"),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert survivors_statement(run_id=1, server_round=2, survivor_ids=[5, 3]) == (
        survivors_statement(run_id=1, server_round=2, survivor_ids=[3, 5])
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_clients": 2}, "`min_clients` must be at least 3"),
        ({"min_neighbours": 0}, "`min_neighbours` must be at least 1"),
        ({"min_threshold": 1}, "`min_threshold` must be at least 2"),
        ({"max_corrupt_neighbours": -1}, "`max_corrupt_neighbours` must be at least 0"),
    ],
)
def test_policy_refuses_minimums_below_the_safe_floor(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SecAggPolicy(**kwargs)
    with pytest.raises(TypeError, match="must be an int"):
        SecAggPolicy(min_clients=3.0)  # type: ignore[arg-type]


def test_policy_lists_every_problem_of_a_request_at_once() -> None:
    params = SecAggParams(
        num_clients=5, num_neighbours=4, threshold=2, vector_length=8, clipping_range=1.0
    )
    policy = SecAggPolicy(min_clients=6, min_neighbours=5, min_threshold=3)
    problems = policy.problems(params, node_id=1, neighbours=[1, 2, 3], roster=None)
    text = "; ".join(problems)
    for part in (
        "group size N = 5",
        "k = 4 neighbours",
        "below the node's floor 3",
        "2t > holders + c",
        "given 3 neighbours",
        "contains itself",
    ):
        assert part in text
    with pytest.raises(SecAggRefusedError, match="Node 1 refuses the round"):
        policy.check(params, node_id=1, neighbours=[1, 2, 3], roster=None)


def test_policy_accepts_the_extra_neighbour_only_when_n_times_k_is_odd() -> None:
    odd = SecAggParams(
        num_clients=5, num_neighbours=3, threshold=3, vector_length=8, clipping_range=1.0
    )
    policy = SecAggPolicy()
    assert policy.problems(odd, node_id=0, neighbours=[1, 2, 3, 4], roster=None) == []
    even = SecAggParams(
        num_clients=6, num_neighbours=3, threshold=3, vector_length=8, clipping_range=1.0
    )
    assert policy.problems(even, node_id=0, neighbours=[1, 2, 3, 4], roster=None) != []


def test_participation_log_admits_only_newer_rounds_per_run() -> None:
    log = ParticipationLog()
    log.admit(7, 3)
    log.admit(8, 1)  # another run keeps its own counter
    with pytest.raises(SecAggRefusedError, match="not newer than round 3"):
        log.admit(7, 3)
    with pytest.raises(SecAggRefusedError, match="not newer"):
        log.admit(7, 2)
    assert log.last_round == {7: 3, 8: 1}  # a refused round is not recorded
    log.admit(7, 4)
    assert ParticipationLog.from_record(log.to_record()).last_round == {7: 4, 8: 1}
    with pytest.raises(SecAggProtocolError, match="equal-length"):
        ParticipationLog.from_record({"run_ids": [1], "rounds": []})
