"""DSSE PAE, envelopes and in-toto Statements."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from manifests.dsse import (
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    Envelope,
    EnvelopeError,
    PayloadTypeError,
    PredicateTypeError,
    Statement,
    StatementError,
    Subject,
    pae,
    sign,
)
from manifests.keys import SignatureMismatchError, SigningKey
from manifests.manifest import JSONFormatError

VECTORS = Path(__file__).parent / "vectors"
PAE_VECTORS = json.loads((VECTORS / "dsse_pae.json").read_text())["vectors"]
KEY = SigningKey.from_seed(bytes(range(32)))
DIGEST = "ab" * 32


@pytest.mark.parametrize("vector", PAE_VECTORS)
def test_pae_matches_the_dsse_specification_example(vector: dict[str, str]) -> None:
    encoded = pae(vector["payload_type"], vector["payload"].encode())
    assert encoded == vector["pae"].encode()


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t", "é".encode()) == b"DSSEv1 1 t 2 \xc3\xa9"


def test_envelope_round_trips_and_verifies() -> None:
    envelope = sign(PAYLOAD_TYPE, b'{"x":1}', KEY)
    parsed = Envelope.from_json(envelope.to_json())
    assert parsed == envelope
    parsed.verify(KEY.public_key())  # returns None; raises on failure
    assert parsed.signatures[0].keyid == KEY.keyid


def test_signing_is_deterministic() -> None:
    assert sign(PAYLOAD_TYPE, b"p", KEY).to_json() == sign(PAYLOAD_TYPE, b"p", KEY).to_json()


def test_verify_raises_for_another_key_and_for_a_changed_payload() -> None:
    envelope = sign(PAYLOAD_TYPE, b"payload", KEY)
    with pytest.raises(SignatureMismatchError):
        envelope.verify(SigningKey.generate().public_key())
    tampered = Envelope(b"payloaD", envelope.payload_type, envelope.signatures)
    with pytest.raises(SignatureMismatchError):
        tampered.verify(KEY.public_key())


def test_signature_binds_the_payload_type() -> None:
    envelope = sign("application/json", b"payload", KEY)
    moved = Envelope(envelope.payload, PAYLOAD_TYPE, envelope.signatures)
    with pytest.raises(SignatureMismatchError):
        moved.verify(KEY.public_key())


def _envelope_json(**overrides: object) -> bytes:
    document: dict[str, object] = {
        "payload": base64.b64encode(b"{}").decode(),
        "payloadType": PAYLOAD_TYPE,
        "signatures": [{"keyid": KEY.keyid, "sig": base64.b64encode(b"s" * 64).decode()}],
    }
    document.update(overrides)
    return json.dumps(document).encode()


def test_envelope_parse_rejects_a_foreign_payload_type() -> None:
    with pytest.raises(PayloadTypeError, match="payloadType must be"):
        Envelope.from_json(_envelope_json(payloadType="application/json"))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"payload": "not base64!"}, "not valid base64"),
        ({"payload": "e30"}, "not valid base64"),
        ({"signatures": []}, "non-empty"),
        ({"extra": 1}, "exactly payload"),
    ],
)
def test_envelope_parse_rejects_malformed_envelopes(
    override: dict[str, object], message: str
) -> None:
    with pytest.raises(EnvelopeError, match=message):
        Envelope.from_json(_envelope_json(**override))


def test_envelope_parse_rejects_duplicate_keys() -> None:
    raw = _envelope_json().replace(b'"payloadType"', b'"payload": "e30=", "payloadType"', 1)
    with pytest.raises(JSONFormatError, match="duplicate"):
        Envelope.from_json(raw)


def test_statement_round_trips_with_sorted_subjects() -> None:
    statement = Statement.of([Subject("b.bin", DIGEST), Subject("a.bin", DIGEST)], {"k": 1})
    document = json.loads(statement.to_payload())
    assert document["_type"] == STATEMENT_TYPE
    assert document["predicateType"] == PREDICATE_TYPE
    assert [s["name"] for s in document["subject"]] == ["a.bin", "b.bin"]
    assert document["subject"][0]["digest"] == {"sha256": DIGEST}
    assert Statement.from_payload(statement.to_payload()) == statement


def test_statement_rejects_a_foreign_predicate_type_and_bad_subjects() -> None:
    statement = Statement((Subject("a", DIGEST),), {}, "https://example.com/other")
    with pytest.raises(PredicateTypeError, match="predicateType must be"):
        Statement.from_payload(statement.to_payload())
    bad = json.loads(Statement.of([Subject("a", DIGEST)], {}).to_payload())
    bad["subject"][0]["digest"] = {"sha256": DIGEST, "md5": "00"}
    with pytest.raises(StatementError, match="nothing else"):
        Statement.from_payload(json.dumps(bad).encode())
    with pytest.raises(ValueError, match="unique"):
        Statement.of([Subject("a", DIGEST), Subject("a", DIGEST)], {})


def test_subject_requires_a_lowercase_hex_sha256() -> None:
    with pytest.raises(ValueError, match="64 lowercase hex"):
        Subject("a", DIGEST.upper())
