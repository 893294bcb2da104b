"""Node identities, the roster, and the statements nodes sign (Bell et al., CCS 2020, sec. 5:
the malicious setting with a PKI).

- A node's long-term **identity key** is an Ed25519 key pair (RFC 8032). Its SecAgg+ **node
  id** is derived from the public key (:func:`node_id_for`), so ids are self-certifying: the
  server cannot invent one, and one key has one id.
- The **roster** (:class:`Roster`) maps node ids to identity public keys. The operator signs
  it out of band and every node holds it locally; this module only takes the mapping. It is
  the PKI: a signature is valid only under the roster key of the node it names.
- Signed statements are domain-separated byte strings of fixed-width fields (and one
  length-prefixed session context) (:func:`advertise_statement`, :func:`survivors_statement`),
  so a signature made for one purpose, run, round or context never verifies for another.
- The **session context** is what the caller binds every node of a session to besides run and
  round (fedbrain: the id of the operator-signed job, so that every honest node of a session
  verifiably holds the same job -- the same clipping norm and noise); nodes holding other
  contexts reject each other's signatures.

Ed25519 signing and verification come from ``cryptography`` (OpenSSL), which rejects
non-canonical signatures (S >= L).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from aggregation.secagg.errors import SecAggAuthenticationError
from aggregation.secagg.params import SecAggParams

IDENTITY_KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
MAX_CONTEXT_SIZE: Final = 1024
"""The longest session context (bytes) a statement binds."""
_ADVERTISE_DOMAIN: Final = b"fedbrain/secagg-plus/v2/advertise-keys\x00"
_SURVIVORS_DOMAIN: Final = b"fedbrain/secagg-plus/v2/consistency-check\x00"


def node_id_for(identity_public_key: bytes) -> int:
    """The SecAgg+ node id of an Ed25519 identity key: the first 8 bytes of SHA-256 of the raw
    32-byte public key, read as a big-endian unsigned 64-bit int."""
    if not isinstance(identity_public_key, bytes) or len(identity_public_key) != IDENTITY_KEY_SIZE:
        raise ValueError(
            f"An identity public key is the raw {IDENTITY_KEY_SIZE}-byte Ed25519 key. "
            f"Found {len(identity_public_key) if isinstance(identity_public_key, bytes) else 0}"
            " bytes."
        )
    return int.from_bytes(hashlib.sha256(identity_public_key).digest()[:8], "big")


class NodeIdentity:
    """A node's long-term Ed25519 identity key; it signs the node's SecAgg+ statements.

    Hold it on the node only (it never enters a session's state record).
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(
                f"`private_key` must be an Ed25519PrivateKey. Found {type(private_key).__name__}."
            )
        self._key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes_raw()
        self.node_id: int = node_id_for(self.public_key)

    @classmethod
    def generate(cls) -> NodeIdentity:
        """A fresh identity (from the OS CSPRNG)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> NodeIdentity:
        """Load a raw 32-byte Ed25519 private key."""
        if len(raw) != IDENTITY_KEY_SIZE:
            raise ValueError(
                f"An Ed25519 private key has {IDENTITY_KEY_SIZE} bytes. Found {len(raw)}."
            )
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def sign(self, statement: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``statement``."""
        return self._key.sign(statement)

    def __repr__(self) -> str:
        return f"NodeIdentity(node_id={self.node_id})"


class Roster(Mapping[int, bytes]):
    """The federation's members: node id -> raw Ed25519 identity public key (immutable).

    Every id must be :func:`node_id_for` of its key; a roster that breaks this is refused, so
    the mapping cannot bind an id to someone else's key.
    """

    def __init__(self, keys: Mapping[int, bytes]) -> None:
        problems: list[str] = []
        loaded: dict[int, Ed25519PublicKey] = {}
        raw: dict[int, bytes] = {}
        for node, key in keys.items():
            if not isinstance(key, bytes) or len(key) != IDENTITY_KEY_SIZE:
                problems.append(f"node {node}: the key is not {IDENTITY_KEY_SIZE} raw bytes")
                continue
            if node != node_id_for(key):
                problems.append(
                    f"node {node}: the id is not node_id_for(its key) = {node_id_for(key)}"
                )
                continue
            try:
                loaded[node] = Ed25519PublicKey.from_public_bytes(key)
            except ValueError as error:
                problems.append(f"node {node}: not an Ed25519 public key ({error})")
                continue
            raw[node] = key
        if problems:
            raise ValueError("Invalid roster: " + "; ".join(problems) + ".")
        self._raw = raw
        self._keys = loaded

    @classmethod
    def from_public_keys(cls, keys: Iterable[bytes]) -> Roster:
        """A roster of the given identity public keys, each under its derived node id."""
        mapping: dict[int, bytes] = {}
        for key in keys:
            node = node_id_for(key)
            if node in mapping:
                raise ValueError(f"Two roster keys map to node id {node} (a duplicate key).")
            mapping[node] = key
        return cls(mapping)

    def __getitem__(self, node: int) -> bytes:
        return self._raw[node]

    def __iter__(self) -> Iterator[int]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"Roster({len(self)} nodes)"

    def verify(self, node: int, signature: bytes, statement: bytes) -> None:
        """Check that ``node`` signed ``statement``; raises SecAggAuthenticationError if not."""
        key = self._keys.get(node)
        if key is None:
            raise SecAggAuthenticationError(f"Node {node} is not in the roster.")
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            raise SecAggAuthenticationError(
                f"Node {node}'s signature must be {SIGNATURE_SIZE} bytes (Ed25519)."
            )
        try:
            key.verify(signature, statement)
        except InvalidSignature:
            raise SecAggAuthenticationError(
                f"Node {node}'s signature does not verify under its roster key."
            ) from None


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def check_context(context: object) -> bytes:
    """``context`` if it is a valid session context (bytes, at most :data:`MAX_CONTEXT_SIZE`);
    TypeError / ValueError otherwise."""
    if not isinstance(context, bytes):
        raise TypeError(f"`context` must be bytes. Found {type(context).__name__}.")
    if len(context) > MAX_CONTEXT_SIZE:
        raise ValueError(
            f"`context` must be at most {MAX_CONTEXT_SIZE} bytes (bind a digest). "
            f"Found {len(context)}."
        )
    return context


def _context_field(context: bytes) -> bytes:
    return _u64(len(check_context(context))) + context


def advertise_statement(
    *,
    run_id: int,
    server_round: int,
    node_id: int,
    params: SecAggParams,
    share_public_key: bytes,
    mask_public_key: bytes,
    seed_commitment: bytes,
    context: bytes = b"",
) -> bytes:
    """What a node signs when it advertises keys: run, round, the session context, its id, the
    round's parameters (N, k, t, P, c, modulus), its two X25519 public keys and its self-mask
    seed commitment.

    Binding the parameters and the context means a peer that was told other parameters, or
    holds another context (another signed job), rejects the signature.
    """
    return b"".join(
        (
            _ADVERTISE_DOMAIN,
            _u64(run_id),
            _u64(server_round),
            _context_field(context),
            _u64(node_id),
            _u64(params.num_clients),
            _u64(params.num_neighbours),
            _u64(params.threshold),
            _u64(params.vector_length),
            struct.pack(">d", float(params.clipping_range)),
            _u64(params.modulus),
            share_public_key,
            mask_public_key,
            seed_commitment,
        )
    )


def survivors_statement(
    *, run_id: int, server_round: int, survivor_ids: Sequence[int], context: bytes = b""
) -> bytes:
    """What a survivor signs in the consistency check: run, round, the session context and the
    sorted survivor set."""
    ids = sorted(survivor_ids)
    return b"".join(
        (
            _SURVIVORS_DOMAIN,
            _u64(run_id),
            _u64(server_round),
            _context_field(context),
            _u64(len(ids)),
            *map(_u64, ids),
        )
    )
