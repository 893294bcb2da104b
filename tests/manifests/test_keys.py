"""Ed25519 keys, key ids and the pinned trusted-keys file."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from manifests.keys import (
    ExpiredKeyError,
    KeyVerificationError,
    RevokedKeyError,
    SignatureMismatchError,
    SigningKey,
    TrustedKey,
    TrustedKeys,
    UntrustedKeyError,
    VerifyingKey,
)

VECTORS = Path(__file__).parent / "vectors"
RFC8032 = json.loads((VECTORS / "ed25519_rfc8032.json").read_text())["vectors"]
T0 = datetime(2025, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("vector", RFC8032, ids=[v["name"] for v in RFC8032])
def test_ed25519_matches_rfc8032_vectors(vector: dict[str, str]) -> None:
    key = SigningKey.from_seed(bytes.fromhex(vector["secret_key"]))
    message = bytes.fromhex(vector["message"])
    assert key.public_key().raw().hex() == vector["public_key"]
    assert key.sign(message).hex() == vector["signature"]
    VerifyingKey.from_raw(bytes.fromhex(vector["public_key"])).verify(
        bytes.fromhex(vector["signature"]), message
    )


@pytest.mark.parametrize("vector", RFC8032, ids=[v["name"] for v in RFC8032])
def test_verify_raises_for_a_signature_with_one_flipped_bit(vector: dict[str, str]) -> None:
    signature = bytearray.fromhex(vector["signature"])
    signature[0] ^= 1
    key = VerifyingKey.from_raw(bytes.fromhex(vector["public_key"]))
    with pytest.raises(SignatureMismatchError):
        key.verify(bytes(signature), bytes.fromhex(vector["message"]))


def test_keyid_is_sha256_of_the_der_subject_public_key_info() -> None:
    key = SigningKey.generate().public_key()
    der = serialization.load_pem_public_key(key.public_pem()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert key.keyid == "sha256:" + hashlib.sha256(der).hexdigest()


def test_pem_round_trip_keeps_the_key() -> None:
    key = SigningKey.generate()
    assert b"BEGIN PRIVATE KEY" in key.private_pem()
    assert SigningKey.from_pem(key.private_pem()).keyid == key.keyid
    assert VerifyingKey.from_pem(key.public_key().public_pem()).keyid == key.keyid


def test_non_ed25519_keys_are_a_value_error_and_wrong_types_a_type_error() -> None:
    ec_pem = (
        generate_private_key(SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="must be Ed25519"):
        VerifyingKey.from_pem(ec_pem)
    with pytest.raises(TypeError):
        VerifyingKey.from_pem("not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="32 bytes"):
        SigningKey.from_seed(b"short")


def test_signing_key_repr_does_not_leak_the_secret() -> None:
    key = SigningKey.generate()
    assert "PRIVATE" not in repr(key)
    assert key.keyid in repr(key)


def _pinned(key: SigningKey, *, revoked: bool = False) -> TrustedKey:
    return TrustedKey(key.public_key(), T0, T0 + timedelta(days=365), revoked)


def test_trusted_keys_file_round_trips_and_looks_up_by_id() -> None:
    key = SigningKey.generate()
    trusted = TrustedKeys.from_json(TrustedKeys.of([_pinned(key)]).to_json())
    assert trusted.lookup(key.keyid).public_key.keyid == key.keyid
    with pytest.raises(UntrustedKeyError, match="not in the trusted-keys file"):
        trusted.lookup(SigningKey.generate().keyid)


def test_trusted_keys_file_rejects_a_keyid_that_does_not_match_its_pem() -> None:
    entry = _pinned(SigningKey.generate()).to_json_object()
    entry["keyid"] = SigningKey.generate().keyid
    with pytest.raises(ValueError, match="does not match its public key"):
        TrustedKeys.from_json(json.dumps([entry]).encode())


def test_trusted_keys_file_reports_every_bad_entry() -> None:
    good = _pinned(SigningKey.generate()).to_json_object()
    document = [{**good, "not_before": "yesterday"}, {"keyid": "x"}]
    with pytest.raises(ValueError, match=r"#0.*#1"):
        TrustedKeys.from_json(json.dumps(document).encode())


def test_key_window_and_revocation_are_checked_against_the_given_time() -> None:
    key = SigningKey.generate()
    pinned = _pinned(key)
    pinned.check_usable_at(T0 + timedelta(days=1))
    with pytest.raises(ExpiredKeyError, match="outside"):
        pinned.check_usable_at(T0 - timedelta(seconds=1))
    with pytest.raises(ExpiredKeyError):
        pinned.check_usable_at(T0 + timedelta(days=366))
    with pytest.raises(RevokedKeyError, match="revoked"):
        _pinned(key, revoked=True).check_usable_at(T0 + timedelta(days=1))
    with pytest.raises(TypeError):
        pinned.check_usable_at("2025-01-02")  # type: ignore[arg-type]
    assert issubclass(RevokedKeyError, KeyVerificationError)


def test_trusted_key_rejects_an_empty_window_and_naive_times() -> None:
    public = SigningKey.generate().public_key()
    with pytest.raises(ValueError, match="later than"):
        TrustedKey(public, T0, T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        TrustedKey(public, datetime(2025, 1, 1), T0 + timedelta(days=1))


# ------------------------------------------------------------------ keys over time: signing


def _signer_pinned(key: SigningKey, *, revoked: bool = False) -> TrustedKeys:
    return TrustedKeys.of([TrustedKey(key.public_key(), T0, T0 + timedelta(days=30), revoked)])


def test_a_key_signs_inside_its_window() -> None:
    key = SigningKey.from_seed(b"\x01" * 32)
    pinned = _signer_pinned(key).check_can_sign(key.public_key(), T0 + timedelta(days=1))
    assert pinned.keyid == key.keyid


def test_a_key_whose_window_ended_refuses_to_sign_and_says_what_to_do() -> None:
    key = SigningKey.from_seed(b"\x01" * 32)
    with pytest.raises(ExpiredKeyError, match=r"ended at 2025-01-31T00:00:00Z.*keys generate"):
        _signer_pinned(key).check_can_sign(key.public_key(), T0 + timedelta(days=31))


def test_a_key_refuses_to_sign_before_its_window() -> None:
    key = SigningKey.from_seed(b"\x01" * 32)
    with pytest.raises(ExpiredKeyError, match="cannot sign yet"):
        _signer_pinned(key).check_can_sign(key.public_key(), T0 - timedelta(seconds=1))


def test_a_revoked_or_unpinned_key_refuses_to_sign() -> None:
    key = SigningKey.from_seed(b"\x01" * 32)
    with pytest.raises(RevokedKeyError, match="must not sign"):
        _signer_pinned(key, revoked=True).check_can_sign(key.public_key(), T0)
    stranger = SigningKey.from_seed(b"\x02" * 32)
    with pytest.raises(UntrustedKeyError, match="validity window is unknown"):
        _signer_pinned(key).check_can_sign(stranger.public_key(), T0)


def test_revoke_marks_only_that_key_and_keeps_the_file_round_tripping() -> None:
    first, second = SigningKey.from_seed(b"\x01" * 32), SigningKey.from_seed(b"\x02" * 32)
    window = (T0, T0 + timedelta(days=30))
    keys = TrustedKeys.of(
        [TrustedKey(first.public_key(), *window), TrustedKey(second.public_key(), *window)]
    )
    revoked = TrustedKeys.from_json(keys.revoke(first.keyid).to_json())
    assert revoked.lookup(first.keyid).revoked and not revoked.lookup(second.keyid).revoked
    assert not keys.lookup(first.keyid).revoked  # a new object; the original is unchanged
    with pytest.raises(UntrustedKeyError):
        keys.revoke("sha256:" + "0" * 64)
