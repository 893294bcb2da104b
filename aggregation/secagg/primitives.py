"""Cryptographic primitives of SecAgg+ on ``cryptography`` (one primitive per function).

Threat model: a malicious server that routes, sees, drops, replays and rewrites every message
(see ``aggregation.secagg``); clients may drop out at any stage. Keys and masks come from
``os.urandom`` and AES; never from a seeded non-cryptographic generator.

- Key agreement: X25519 (RFC 7748), two key pairs per client and round: one to encrypt the
  Shamir shares routed through the server, one to derive pairwise masks. Public keys are
  checked before use (:func:`check_public_key`): ``cryptography`` loads any 32 bytes and only
  refuses an all-zero shared secret in ``exchange``; fedbrain also refuses non-canonical
  encodings (u >= p or the top bit set: two encodings of one key would defeat the replay
  check) and the small-order points themselves, so the server can refuse them on receipt.
- Self-mask seed commitment: SHA-256 over a domain tag, run, round, node id and the seed
  (:func:`seed_commitment`); the server checks a rebuilt seed against it.
- Key derivation: HKDF-SHA256 (RFC 5869) with an explicit salt and an ``info`` that binds the
  purpose, run id, round and both node ids (ordered), so no key is used in two contexts.
- Share encryption: AES-256-GCM; the associated data binds sender, receiver, run and round, so
  a share replayed from another round or rerouted to another node fails authentication.
- Masks: the AES-256-CTR keystream (NIST SP 800-38A) of a 256-bit key, read as little-endian
  uint32 and added mod 2^32 (Bonawitz et al., CCS 2017, section 4).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

from aggregation.secagg.errors import SecAggAuthenticationError, SecAggDecryptionError

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
HKDF_SALT: Final = b"fedbrain/secagg-plus/v1/hkdf-salt"
"""Fixed, public, protocol-specific HKDF salt (RFC 5869 section 3.1 allows a non-secret salt)."""

PURPOSE_SHARE_KEY: Final = b"share-encryption-key"
PURPOSE_PAIRWISE_MASK: Final = b"pairwise-mask-key"

_P25519: Final = 2**255 - 19
SMALL_ORDER_POINTS: Final = frozenset(
    {
        0,
        1,
        # the two points of order 8 (RFC 7748 sec. 7; libsodium's blocklist), and p - 1
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        _P25519 - 1,
    }
)
"""Canonical u-coordinates of the points of order 1, 2, 4 and 8 on Curve25519 and its twist."""
_ZERO_SECRET: Final = bytes(32)

CHUNK_VALUES: Final = 1 << 16  # 256 KiB chunks: vector chunk and keystream stay in L2
_ZEROS: Final = bytes(CHUNK_VALUES * 4)
_CTR_NONCE: Final = bytes(16)  # every mask key is fresh and used for one stream only


def generate_private_key() -> X25519PrivateKey:
    """A fresh X25519 private key (from the OS CSPRNG)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``key``."""
    return key.public_key().public_bytes_raw()


def private_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (the secret that is Shamir-shared)."""
    return key.private_bytes_raw()


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """Load a raw 32-byte X25519 private key."""
    if len(raw) != KEY_SIZE:
        raise ValueError(f"An X25519 private key has {KEY_SIZE} bytes. Found {len(raw)}.")
    return X25519PrivateKey.from_private_bytes(raw)


def check_public_key(raw: bytes) -> None:
    """Refuse a raw X25519 public key that is not 32 bytes, not canonical (u >= 2^255 - 19 or
    the top bit set) or of small order (its shared secret would be all-zero, known to anyone).

    Raises SecAggAuthenticationError (a ValueError) naming the problem.
    """
    if not isinstance(raw, bytes) or len(raw) != KEY_SIZE:
        raise SecAggAuthenticationError(f"An X25519 public key has {KEY_SIZE} bytes.")
    if raw[31] & 0x80:
        raise SecAggAuthenticationError(
            "Non-canonical X25519 public key: the top bit is set (RFC 7748 masks it)."
        )
    u = int.from_bytes(raw, "little")
    if u >= _P25519:
        raise SecAggAuthenticationError("Non-canonical X25519 public key: u >= 2^255 - 19.")
    if u in SMALL_ORDER_POINTS:
        raise SecAggAuthenticationError(
            "X25519 public key of small order (all-zero or low-order point): its shared secret "
            "would not depend on the private key."
        )


def load_public_key(raw: bytes) -> X25519PublicKey:
    """Load a raw 32-byte X25519 public key after :func:`check_public_key`."""
    check_public_key(raw)
    return X25519PublicKey.from_public_bytes(raw)


def hkdf_sha256(ikm: bytes, *, salt: bytes, info: bytes, length: int = KEY_SIZE) -> bytes:
    """HKDF-SHA256 (RFC 5869) with an explicit salt and info."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def key_info(purpose: bytes, *, run_id: int, round_: int, node_a: int, node_b: int) -> bytes:
    """HKDF ``info``: purpose, run id, round and the two node ids in increasing order."""
    low, high = sorted((node_a, node_b))
    return b"".join(
        (
            b"fedbrain/secagg-plus/v1/",
            purpose,
            run_id.to_bytes(8, "big"),
            round_.to_bytes(8, "big"),
            low.to_bytes(8, "big"),
            high.to_bytes(8, "big"),
        )
    )


def agree(
    private_key: X25519PrivateKey,
    peer_public: bytes,
    purpose: bytes,
    *,
    run_id: int,
    round_: int,
    node_a: int,
    node_b: int,
) -> bytes:
    """X25519 then HKDF-SHA256: a 32-byte key for ``purpose`` shared by nodes a and b.

    Raises ValueError (SecAggAuthenticationError) if the peer's public key is malformed,
    non-canonical or of small order; an all-zero shared secret is never used.
    """
    shared = private_key.exchange(load_public_key(peer_public))
    if shared == _ZERO_SECRET:  # cryptography refuses it already; never rely on that alone
        raise SecAggAuthenticationError("The X25519 shared secret is all-zero.")
    info = key_info(purpose, run_id=run_id, round_=round_, node_a=node_a, node_b=node_b)
    return hkdf_sha256(shared, salt=HKDF_SALT, info=info)


def seed_commitment(seed: bytes, *, run_id: int, round_: int, node_id: int) -> bytes:
    """SHA-256 commitment to a self-mask seed, bound to run, round and node.

    Binding: SHA-256 is collision resistant, so a node cannot open it to two seeds. Hiding: the
    seed is 256 uniformly random bits used only as an AES key, so the digest (a different
    function of it) reveals nothing usable about the mask (random-oracle argument).
    """
    if len(seed) != KEY_SIZE:
        raise ValueError(f"A self-mask seed has {KEY_SIZE} bytes. Found {len(seed)}.")
    digest = hashes.Hash(hashes.SHA256())
    for part in (
        b"fedbrain/secagg-plus/v1/seed-commitment\x00",
        run_id.to_bytes(8, "big"),
        round_.to_bytes(8, "big"),
        node_id.to_bytes(8, "big"),
        seed,
    ):
        digest.update(part)
    return digest.finalize()


def share_associated_data(*, run_id: int, round_: int, sender: int, receiver: int) -> bytes:
    """AES-GCM associated data of a share: binds sender, receiver, run and round."""
    return b"".join(
        (
            b"fedbrain/secagg-plus/v1/share",
            run_id.to_bytes(8, "big"),
            round_.to_bytes(8, "big"),
            sender.to_bytes(8, "big"),
            receiver.to_bytes(8, "big"),
        )
    )


def encrypt_share(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM: a random 96-bit nonce followed by ciphertext and tag."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt_share(key: bytes, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt_share`; every failure raises SecAggDecryptionError."""
    if len(ciphertext) < NONCE_SIZE + 16:
        raise SecAggDecryptionError("The encrypted share is too short to be authentic.")
    try:
        return AESGCM(key).decrypt(
            ciphertext[:NONCE_SIZE], ciphertext[NONCE_SIZE:], associated_data
        )
    except InvalidTag:
        raise SecAggDecryptionError(
            "An encrypted share failed AES-GCM authentication: it was tampered with, replayed "
            "from another round or sent to the wrong node. Treat its sender as dropped."
        ) from None


def aes_ctr_keystream(key: bytes, nbytes: int, *, initial_counter: bytes = _CTR_NONCE) -> bytes:
    """The first ``nbytes`` of the AES-256-CTR keystream of ``key`` (masks use counter 0)."""
    if len(key) != KEY_SIZE:
        raise ValueError(f"A mask key has {KEY_SIZE} bytes (AES-256). Found {len(key)}.")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(initial_counter)).encryptor()
    return encryptor.update(bytes(nbytes)) + encryptor.finalize()


class Keystream:
    """The AES-256-CTR keystream of one 256-bit key, written into caller buffers in order."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"A stream key has {KEY_SIZE} bytes (AES-256). Found {len(key)}.")
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(_CTR_NONCE)).encryptor()

    def fill(self, buffer: NDArray[np.uint32]) -> None:
        """Overwrite ``buffer`` (contiguous, at most CHUNK_VALUES values) with the next values."""
        count = buffer.shape[0]
        if count > CHUNK_VALUES or not buffer.flags.c_contiguous:
            raise ValueError(f"`buffer` must be contiguous with at most {CHUNK_VALUES} values.")
        self._encryptor.update_into(_ZEROS[: count * 4], memoryview(buffer.view(np.uint8).data))


class MaskStreams:
    """The mask keystreams of several (key, sign) pairs, consumed chunk by chunk.

    ``add_inplace(chunk)`` adds ``sum(sign * next len(chunk) mask values)`` to a contiguous
    uint32 chunk, mod 2^32; successive calls continue the streams, so a vector can be masked
    piecewise while each piece is still in cache (e.g. right after it is quantized). One
    preallocated 256 KiB scratch buffer receives the keystream (``update_into``); no mask-sized
    temporary is ever allocated. Not thread-safe.
    """

    def __init__(self, keys: Sequence[tuple[bytes, int]]) -> None:
        for key, sign in keys:
            if len(key) != KEY_SIZE:
                raise ValueError(f"A mask key has {KEY_SIZE} bytes (AES-256). Found {len(key)}.")
            if sign not in (1, -1):
                raise ValueError(f"`sign` must be +1 or -1. Found {sign}.")
        self._streams = [
            (
                Cipher(algorithms.AES(key), modes.CTR(_CTR_NONCE)).encryptor(),
                np.add if sign == 1 else np.subtract,
            )
            for key, sign in keys
        ]
        self._scratch = np.empty(CHUNK_VALUES, dtype="<u4")
        self._scratch_bytes = memoryview(self._scratch.view(np.uint8).data)

    def add_inplace(self, vector: NDArray[np.uint32]) -> None:
        """Add the next ``len(vector)`` values of every stream to ``vector``, in place."""
        if vector.dtype != np.uint32 or vector.ndim != 1 or not vector.flags.c_contiguous:
            raise TypeError(
                "Masks are added to a contiguous 1-D uint32 vector. "
                f"Found dtype {vector.dtype}, shape {vector.shape}."
            )
        size = vector.shape[0]
        for start in range(0, size, CHUNK_VALUES):
            stop = min(size, start + CHUNK_VALUES)
            count = stop - start
            target = vector[start:stop]
            mask = self._scratch[:count]
            zeros, buffer = _ZEROS[: count * 4], self._scratch_bytes[: count * 4]
            for encryptor, op in self._streams:
                encryptor.update_into(zeros, buffer)
                op(target, mask, out=target)


class MaskExpander:
    """Adds whole masks to whole vectors, in place (see :class:`MaskStreams`)."""

    def add_mask_inplace(self, vector: NDArray[np.uint32], key: bytes, *, sign: int = 1) -> None:
        """``vector += sign * mask(key)`` mod 2^32, in place; ``sign`` is +1 or -1."""
        MaskStreams([(key, sign)]).add_inplace(vector)

    def add_masks_inplace(
        self, vector: NDArray[np.uint32], keys: Sequence[tuple[bytes, int]]
    ) -> None:
        """``vector += sum(sign * mask(key) for key, sign in keys)`` mod 2^32, in place."""
        MaskStreams(keys).add_inplace(vector)


def add_mask_inplace(vector: NDArray[np.uint32], key: bytes, *, sign: int = 1) -> None:
    """``vector += sign * AES-256-CTR(key)`` read as little-endian uint32, mod 2^32, in place."""
    MaskExpander().add_mask_inplace(vector, key, sign=sign)
