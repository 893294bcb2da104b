"""Known-answer tests (RFC 7748, RFC 5869, NIST SP 800-38A) and mask arithmetic."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from aggregation.secagg import primitives
from aggregation.secagg.errors import SecAggDecryptionError

VECTORS = Path(__file__).parent / "vectors"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text())


def x25519(scalar: bytes, u: bytes) -> bytes:
    private = X25519PrivateKey.from_private_bytes(scalar)
    return private.exchange(X25519PublicKey.from_public_bytes(u))


@pytest.mark.parametrize("case", load("rfc7748_x25519.json")["scalar_mult"])
def test_x25519_matches_rfc7748_section_5_2(case: dict[str, str]) -> None:
    out = x25519(bytes.fromhex(case["scalar"]), bytes.fromhex(case["u"]))
    assert out.hex() == case["output"]


def test_x25519_iterated_matches_rfc7748_section_5_2() -> None:
    expected = {c["iterations"]: c["output"] for c in load("rfc7748_x25519.json")["iterated"]}
    k = u = (9).to_bytes(32, "little")
    for i in range(1, max(expected) + 1):
        k, u = x25519(k, u), k
        if i in expected:
            assert k.hex() == expected[i]


def test_x25519_diffie_hellman_matches_rfc7748_section_6_1() -> None:
    v = load("rfc7748_x25519.json")["diffie_hellman"]
    alice = primitives.load_private_key(bytes.fromhex(v["alice_private"]))
    bob = primitives.load_private_key(bytes.fromhex(v["bob_private"]))
    assert primitives.public_bytes(alice).hex() == v["alice_public"]
    assert primitives.public_bytes(bob).hex() == v["bob_public"]
    shared = alice.exchange(primitives.load_public_key(bytes.fromhex(v["bob_public"])))
    assert shared.hex() == v["shared_secret"]
    assert bob.exchange(alice.public_key()).hex() == v["shared_secret"]


@pytest.mark.parametrize("case", load("rfc5869_hkdf_sha256.json")["cases"], ids=lambda c: c["name"])
def test_hkdf_sha256_matches_rfc5869(case: dict[str, Any]) -> None:
    ikm, salt, info = (bytes.fromhex(case[k]) for k in ("ikm", "salt", "info"))
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    assert prk.hex() == case["prk"]
    okm = primitives.hkdf_sha256(ikm, salt=salt, info=info, length=case["length"])
    assert okm.hex() == case["okm"]


def test_aes256_ctr_keystream_matches_sp800_38a_f55() -> None:
    v = load("sp800_38a_f55_ctr_aes256.json")
    plaintext = bytes.fromhex(v["plaintext"])
    stream = primitives.aes_ctr_keystream(
        bytes.fromhex(v["key"]), len(plaintext), initial_counter=bytes.fromhex(v["initial_counter"])
    )
    ciphertext = bytes(a ^ b for a, b in zip(plaintext, stream, strict=True))
    assert ciphertext.hex() == v["ciphertext"]


def test_mask_is_the_ctr_keystream_read_as_little_endian_uint32_across_chunks() -> None:
    key = bytes(range(32))
    size = 3 * 65536 + 17  # crosses the expander's chunk boundaries
    vector = np.zeros(size, dtype=np.uint32)
    primitives.add_mask_inplace(vector, key)
    expected = np.frombuffer(primitives.aes_ctr_keystream(key, 4 * size), dtype="<u4")
    np.testing.assert_array_equal(vector, expected)


def test_add_then_subtract_mask_restores_vector_mod_2_32() -> None:
    rng = np.random.default_rng(0)
    vector = rng.integers(0, 2**32, size=1000, dtype=np.uint32)
    original = vector.copy()
    primitives.add_mask_inplace(vector, b"k" * 32, sign=1)
    assert not np.array_equal(vector, original)
    primitives.add_mask_inplace(vector, b"k" * 32, sign=-1)
    np.testing.assert_array_equal(vector, original)


def test_add_mask_inplace_handles_all_zero_and_empty_vectors() -> None:
    zeros = np.zeros(5, dtype=np.uint32)
    primitives.add_mask_inplace(zeros, b"z" * 32)
    expected = np.frombuffer(primitives.aes_ctr_keystream(b"z" * 32, 20), dtype="<u4")
    np.testing.assert_array_equal(zeros, expected)
    empty = np.zeros(0, dtype=np.uint32)
    primitives.add_mask_inplace(empty, b"z" * 32)
    assert empty.shape == (0,)


def test_add_mask_inplace_rejects_wrong_dtype_shape_key_and_sign() -> None:
    with pytest.raises(TypeError, match="uint32"):
        primitives.add_mask_inplace(np.zeros(4, dtype=np.int64), bytes(32))
    with pytest.raises(TypeError, match="1-D"):
        primitives.add_mask_inplace(np.zeros((2, 2), dtype=np.uint32), bytes(32))
    with pytest.raises(TypeError, match="1-D"):
        primitives.add_mask_inplace(np.zeros((), dtype=np.uint32), bytes(32))
    with pytest.raises(ValueError, match="32 bytes"):
        primitives.add_mask_inplace(np.zeros(4, dtype=np.uint32), bytes(16))
    with pytest.raises(ValueError, match="sign"):
        primitives.add_mask_inplace(np.zeros(4, dtype=np.uint32), bytes(32), sign=2)


def test_hkdf_info_binds_run_round_and_ordered_node_ids() -> None:
    base = primitives.key_info(b"p", run_id=1, round_=2, node_a=3, node_b=4)
    assert base == primitives.key_info(b"p", run_id=1, round_=2, node_a=4, node_b=3)
    others = [
        primitives.key_info(b"p", run_id=9, round_=2, node_a=3, node_b=4),
        primitives.key_info(b"p", run_id=1, round_=9, node_a=3, node_b=4),
        primitives.key_info(b"p", run_id=1, round_=2, node_a=3, node_b=5),
        primitives.key_info(b"q", run_id=1, round_=2, node_a=3, node_b=4),
    ]
    assert base not in others


def test_tampered_or_rebound_share_raises_one_decryption_error() -> None:
    key = bytes(32)
    ad = primitives.share_associated_data(run_id=1, round_=1, sender=1, receiver=2)
    ciphertext = primitives.encrypt_share(key, b"secret", ad)
    assert primitives.decrypt_share(key, ciphertext, ad) == b"secret"
    flipped = ciphertext[:-1] + bytes([ciphertext[-1] ^ 1])
    other_round = primitives.share_associated_data(run_id=1, round_=2, sender=1, receiver=2)
    other_receiver = primitives.share_associated_data(run_id=1, round_=1, sender=1, receiver=3)
    for bad_ct, bad_ad in [(flipped, ad), (ciphertext, other_round), (ciphertext, other_receiver)]:
        with pytest.raises(SecAggDecryptionError):
            primitives.decrypt_share(key, bad_ct, bad_ad)
    with pytest.raises(SecAggDecryptionError):
        primitives.decrypt_share(b"\x01" * 32, ciphertext, ad)
    with pytest.raises(SecAggDecryptionError):
        primitives.decrypt_share(key, b"short", ad)


_P = 2**255 - 19
SMALL_ORDER_AND_NON_CANONICAL = {
    "all-zero": bytes(32),
    "one": (1).to_bytes(32, "little"),
    "order-8-a": bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    "order-8-b": bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    "p-1": (_P - 1).to_bytes(32, "little"),
    "p (non-canonical 0)": _P.to_bytes(32, "little"),
    "p+1 (non-canonical 1)": (_P + 1).to_bytes(32, "little"),
    "p+5 (non-canonical 5)": (_P + 5).to_bytes(32, "little"),
    "top bit set": (9).to_bytes(32, "little")[:31] + b"\x80",
}


@pytest.mark.parametrize(
    "raw", SMALL_ORDER_AND_NON_CANONICAL.values(), ids=SMALL_ORDER_AND_NON_CANONICAL.keys()
)
def test_small_order_and_non_canonical_x25519_keys_are_refused_before_use(raw: bytes) -> None:
    # cryptography loads all of these; its exchange() refuses only those whose secret is zero.
    X25519PublicKey.from_public_bytes(raw)
    with pytest.raises(ValueError, match=r"small order|Non-canonical"):
        primitives.check_public_key(raw)
    with pytest.raises(ValueError, match=r"small order|Non-canonical"):
        primitives.agree(
            primitives.generate_private_key(),
            raw,
            primitives.PURPOSE_SHARE_KEY,
            run_id=1,
            round_=1,
            node_a=1,
            node_b=2,
        )


def test_honest_public_keys_pass_the_check() -> None:
    for _ in range(20):
        primitives.check_public_key(primitives.public_bytes(primitives.generate_private_key()))
    primitives.check_public_key((9).to_bytes(32, "little"))  # the base point


def test_seed_commitment_binds_seed_run_round_and_node() -> None:
    seed = bytes(range(32))
    base = primitives.seed_commitment(seed, run_id=1, round_=2, node_id=3)
    assert len(base) == 32
    others = {
        primitives.seed_commitment(bytes(32), run_id=1, round_=2, node_id=3),
        primitives.seed_commitment(seed, run_id=9, round_=2, node_id=3),
        primitives.seed_commitment(seed, run_id=1, round_=9, node_id=3),
        primitives.seed_commitment(seed, run_id=1, round_=2, node_id=9),
    }
    assert base not in others and len(others) == 4
    with pytest.raises(ValueError, match="32 bytes"):
        primitives.seed_commitment(seed[:31], run_id=1, round_=2, node_id=3)
