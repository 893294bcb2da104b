"""Typed, transport-agnostic SecAgg+ messages.

Each message is a frozen dataclass that validates itself on construction and converts to and
from a flat record of plain values (``int``, ``str``, ``bytes``, lists of ints or bytes, one
uint32 numpy array), so a Flower adapter can put it in a ``ConfigRecord``/``ArrayRecord``.
Every record carries ``run_id``, ``round``, ``stage``, ``kind`` and ``node_id`` (the client
the request goes to or the reply comes from). Node ids are uint64; id lists are strictly
increasing (canonical, so duplicates are impossible). Signatures are 64-byte Ed25519; the
signature fields are empty only in the unauthenticated (semi-honest, legacy) mode, which an
authenticated client never accepts.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Final, Self, TypeAlias

import numpy as np
from numpy.typing import NDArray

from aggregation.secagg.errors import SecAggProtocolError
from aggregation.secagg.identity import SIGNATURE_SIZE
from aggregation.secagg.params import MAX_NODE_ID, SecAggParams
from aggregation.secagg.primitives import KEY_SIZE, NONCE_SIZE
from aggregation.secagg.shamir import SHARE_SIZE

RecordValue: TypeAlias = bytes | int | str | list[int] | list[bytes] | NDArray[np.uint32]
Record: TypeAlias = dict[str, RecordValue]

SHARE_PLAINTEXT_SIZE: Final = 2 * SHARE_SIZE
CIPHERTEXT_SIZE: Final = NONCE_SIZE + SHARE_PLAINTEXT_SIZE + 16


class Stage(StrEnum):
    """The SecAgg+ stages, in order. CONSISTENCY_CHECK (Bell et al., CCS 2020, malicious
    setting; Bonawitz et al., CCS 2017, sec. 6) runs only in authenticated rounds."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"


class Kind(StrEnum):
    """Direction of a message."""

    REQUEST = "request"  # server -> client
    REPLY = "reply"  # client -> server


class Key(StrEnum):
    """Wire keys of the records."""

    RUN_ID = "run_id"
    ROUND = "round"
    STAGE = "stage"
    KIND = "kind"
    NODE_ID = "node_id"
    NUM_CLIENTS = "num_clients"
    NUM_NEIGHBOURS = "num_neighbours"
    THRESHOLD = "threshold"
    VECTOR_LENGTH = "vector_length"
    CLIPPING_RANGE = "clipping_range"  # float.hex(), exact
    MODULUS = "modulus"
    NEIGHBOURS = "neighbours"
    SHARE_PUBLIC_KEY = "share_public_key"
    MASK_PUBLIC_KEY = "mask_public_key"
    SEED_COMMITMENT = "seed_commitment"
    SIGNATURE = "signature"
    SEED_COMMITMENTS = "seed_commitments"
    SIGNATURES = "signatures"
    SURVIVOR_IDS = "survivor_ids"
    SIGNER_IDS = "signer_ids"
    PEER_IDS = "peer_ids"
    SHARE_PUBLIC_KEYS = "share_public_keys"
    MASK_PUBLIC_KEYS = "mask_public_keys"
    RECEIVER_IDS = "receiver_ids"
    SENDER_IDS = "sender_ids"
    CIPHERTEXTS = "ciphertexts"
    MASKED_INPUT = "masked_input"
    SURVIVING_IDS = "surviving_ids"
    DROPPED_IDS = "dropped_ids"
    SEED_SHARE_IDS = "seed_share_ids"
    SEED_SHARES = "seed_shares"
    KEY_SHARE_IDS = "key_share_ids"
    KEY_SHARES = "key_shares"


def _bad(message: str) -> SecAggProtocolError:
    return SecAggProtocolError(message)


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"`{name}` must be an int. Found {type(value).__name__}.")
    if not low <= value <= high:
        raise _bad(f"`{name}` must be in [{low}, {high}]. Found {value}.")
    return value


def _check_ids(name: str, value: object) -> tuple[int, ...]:
    if not isinstance(value, tuple | list):
        raise _bad(f"`{name}` must be a list of node ids. Found {type(value).__name__}.")
    ids = tuple(_check_int(name, v, 0, MAX_NODE_ID) for v in value)
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise _bad(f"`{name}` must be strictly increasing (sorted, no duplicate node ids).")
    return ids


def _check_blobs(name: str, value: object, size: int, count: int) -> tuple[bytes, ...]:
    if not isinstance(value, tuple | list):
        raise _bad(f"`{name}` must be a list of bytes. Found {type(value).__name__}.")
    if len(value) != count:
        raise _bad(f"`{name}` must have one entry per node id ({count}). Found {len(value)}.")
    for blob in value:
        if not isinstance(blob, bytes) or len(blob) != size:
            raise _bad(f"Every entry of `{name}` must be {size} bytes.")
    return tuple(value)


def _check_signatures(name: str, value: object, count: int) -> tuple[bytes, ...]:
    """``count`` Ed25519 signatures, or none at all (unauthenticated mode)."""
    if isinstance(value, tuple | list) and len(value) == 0:
        return ()
    return _check_blobs(name, value, SIGNATURE_SIZE, count)


def _check_signature(name: str, value: object) -> bytes:
    """One Ed25519 signature, or ``b""`` (unauthenticated mode)."""
    if not isinstance(value, bytes) or len(value) not in (0, SIGNATURE_SIZE):
        raise _bad(f"`{name}` must be a {SIGNATURE_SIZE}-byte Ed25519 signature.")
    return value


@dataclass(frozen=True, kw_only=True)
class SecAggMessage:
    """Fields common to every message."""

    STAGE: ClassVar[Stage]
    KIND: ClassVar[Kind]
    _BODY: ClassVar[tuple[Key, ...]]

    run_id: int
    server_round: int
    node_id: int

    def __post_init__(self) -> None:
        _check_int("run_id", self.run_id, 0, MAX_NODE_ID)
        _check_int("server_round", self.server_round, 0, MAX_NODE_ID)
        _check_int("node_id", self.node_id, 0, MAX_NODE_ID)

    @property
    def stage(self) -> Stage:
        """The stage this message belongs to."""
        return self.STAGE

    def _header(self) -> Record:
        return {
            Key.RUN_ID: self.run_id,
            Key.ROUND: self.server_round,
            Key.STAGE: str(self.STAGE),
            Key.KIND: str(self.KIND),
            Key.NODE_ID: self.node_id,
        }

    def to_record(self) -> Record:
        """The message as a flat record of plain values."""
        record = self._header()
        record.update(self._body())
        return record

    def _body(self) -> Record:
        raise NotImplementedError

    @classmethod
    def _open(cls, record: Mapping[str, object]) -> dict[str, object]:
        """Check the record's keys, stage and kind; return the header as constructor kwargs."""
        if not isinstance(record, Mapping):
            raise _bad(f"A record must be a mapping. Found {type(record).__name__}.")
        if record.get(Key.STAGE) != cls.STAGE or record.get(Key.KIND) != cls.KIND:
            raise _bad(
                f"Expected a {cls.STAGE} {cls.KIND}, found a {record.get(Key.STAGE)!s} "
                f"{record.get(Key.KIND)!s}. The message belongs to another stage."
            )
        expected = {Key.RUN_ID, Key.ROUND, Key.STAGE, Key.KIND, Key.NODE_ID, *cls._BODY}
        keys = set(record)
        if keys != {str(k) for k in expected}:
            missing = sorted(str(k) for k in expected if k not in keys)
            extra = sorted(str(k) for k in keys - {str(k) for k in expected})
            raise _bad(
                f"Malformed {cls.__name__} record: missing keys {missing}, unexpected {extra}."
            )
        return {
            "run_id": record[Key.RUN_ID],
            "server_round": record[Key.ROUND],
            "node_id": record[Key.NODE_ID],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> Self:
        """Parse and validate a record; raises SecAggProtocolError on any deviation."""
        kwargs = cls._open(record)
        for name in cls._BODY:
            kwargs[str(name)] = record[name]
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except (TypeError, ValueError) as error:
            if isinstance(error, SecAggProtocolError):
                raise
            raise _bad(f"Malformed {cls.__name__} record: {error}") from error


@dataclass(frozen=True, kw_only=True)
class AdvertiseKeysRequest(SecAggMessage):
    """Server -> client: the round's parameters and the client's neighbours."""

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    KIND: ClassVar[Kind] = Kind.REQUEST
    _BODY: ClassVar[tuple[Key, ...]] = (
        Key.NUM_CLIENTS,
        Key.NUM_NEIGHBOURS,
        Key.THRESHOLD,
        Key.VECTOR_LENGTH,
        Key.CLIPPING_RANGE,
        Key.MODULUS,
        Key.NEIGHBOURS,
    )

    params: SecAggParams
    neighbours: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.params, SecAggParams):
            raise _bad("`params` must be SecAggParams.")
        ids = _check_ids("neighbours", self.neighbours)
        object.__setattr__(self, "neighbours", ids)
        k = self.params.num_neighbours
        if self.node_id in ids or len(ids) not in (k, k + 1):
            raise _bad(
                f"A client needs `num_neighbours` = {k} (k+1 once when N*k is odd) distinct "
                f"neighbours other than itself. Found {len(ids)}."
            )

    def _body(self) -> Record:
        p = self.params
        return {
            Key.NUM_CLIENTS: p.num_clients,
            Key.NUM_NEIGHBOURS: p.num_neighbours,
            Key.THRESHOLD: p.threshold,
            Key.VECTOR_LENGTH: p.vector_length,
            Key.CLIPPING_RANGE: float(p.clipping_range).hex(),
            Key.MODULUS: p.modulus,
            Key.NEIGHBOURS: list(self.neighbours),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> Self:
        """Parse and validate a record; raises SecAggProtocolError on any deviation."""
        kwargs = cls._open(record)
        clipping = record[Key.CLIPPING_RANGE]
        if not isinstance(clipping, str):
            raise _bad("`clipping_range` must be a float in hex notation (float.hex()).")
        try:
            clipping_range = float.fromhex(clipping)
            params = SecAggParams(
                num_clients=record[Key.NUM_CLIENTS],  # type: ignore[arg-type]
                num_neighbours=record[Key.NUM_NEIGHBOURS],  # type: ignore[arg-type]
                threshold=record[Key.THRESHOLD],  # type: ignore[arg-type]
                vector_length=record[Key.VECTOR_LENGTH],  # type: ignore[arg-type]
                clipping_range=clipping_range,
                modulus=record[Key.MODULUS],  # type: ignore[arg-type]
            )
        except (TypeError, ValueError) as error:
            raise _bad(f"Malformed AdvertiseKeysRequest record: {error}") from error
        if not math.isfinite(clipping_range):
            raise _bad("`clipping_range` must be finite.")
        return cls(params=params, neighbours=record[Key.NEIGHBOURS], **kwargs)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class AdvertiseKeysReply(SecAggMessage):
    """Client -> server: the client's two X25519 public keys for this round, the commitment to
    its self-mask seed, and its identity signature over them and the round's parameters
    (``identity.advertise_statement``; empty in unauthenticated mode)."""

    STAGE: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    KIND: ClassVar[Kind] = Kind.REPLY
    _BODY: ClassVar[tuple[Key, ...]] = (
        Key.SHARE_PUBLIC_KEY,
        Key.MASK_PUBLIC_KEY,
        Key.SEED_COMMITMENT,
        Key.SIGNATURE,
    )

    share_public_key: bytes
    mask_public_key: bytes
    seed_commitment: bytes
    signature: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("share_public_key", "mask_public_key", "seed_commitment"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != KEY_SIZE:
                raise _bad(f"`{name}` must be {KEY_SIZE} bytes.")
        _check_signature("signature", self.signature)

    def _body(self) -> Record:
        return {
            Key.SHARE_PUBLIC_KEY: self.share_public_key,
            Key.MASK_PUBLIC_KEY: self.mask_public_key,
            Key.SEED_COMMITMENT: self.seed_commitment,
            Key.SIGNATURE: self.signature,
        }


@dataclass(frozen=True, kw_only=True)
class ShareKeysRequest(SecAggMessage):
    """Server -> client: its neighbours that advertised keys, each with its public keys, seed
    commitment and signature (exactly as the neighbour sent them)."""

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    KIND: ClassVar[Kind] = Kind.REQUEST
    _BODY: ClassVar[tuple[Key, ...]] = (
        Key.PEER_IDS,
        Key.SHARE_PUBLIC_KEYS,
        Key.MASK_PUBLIC_KEYS,
        Key.SEED_COMMITMENTS,
        Key.SIGNATURES,
    )

    peer_ids: tuple[int, ...]
    share_public_keys: tuple[bytes, ...]
    mask_public_keys: tuple[bytes, ...]
    seed_commitments: tuple[bytes, ...]
    signatures: tuple[bytes, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        ids = _check_ids("peer_ids", self.peer_ids)
        if self.node_id in ids:
            raise _bad("`peer_ids` must not contain the receiving node itself.")
        object.__setattr__(self, "peer_ids", ids)
        for name in ("share_public_keys", "mask_public_keys", "seed_commitments"):
            blobs = _check_blobs(name, getattr(self, name), KEY_SIZE, len(ids))
            object.__setattr__(self, name, blobs)
        signatures = _check_signatures("signatures", self.signatures, len(ids))
        object.__setattr__(self, "signatures", signatures)

    def _body(self) -> Record:
        return {
            Key.PEER_IDS: list(self.peer_ids),
            Key.SHARE_PUBLIC_KEYS: list(self.share_public_keys),
            Key.MASK_PUBLIC_KEYS: list(self.mask_public_keys),
            Key.SEED_COMMITMENTS: list(self.seed_commitments),
            Key.SIGNATURES: list(self.signatures),
        }


@dataclass(frozen=True, kw_only=True)
class ShareKeysReply(SecAggMessage):
    """Client -> server: one AES-GCM encrypted pair of Shamir shares per neighbour."""

    STAGE: ClassVar[Stage] = Stage.SHARE_KEYS
    KIND: ClassVar[Kind] = Kind.REPLY
    _BODY: ClassVar[tuple[Key, ...]] = (Key.RECEIVER_IDS, Key.CIPHERTEXTS)

    receiver_ids: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        ids = _check_ids("receiver_ids", self.receiver_ids)
        if self.node_id in ids:
            raise _bad("`receiver_ids` must not contain the sender itself.")
        object.__setattr__(self, "receiver_ids", ids)
        blobs = _check_blobs("ciphertexts", self.ciphertexts, CIPHERTEXT_SIZE, len(ids))
        object.__setattr__(self, "ciphertexts", blobs)

    def _body(self) -> Record:
        return {Key.RECEIVER_IDS: list(self.receiver_ids), Key.CIPHERTEXTS: list(self.ciphertexts)}


@dataclass(frozen=True, kw_only=True)
class MaskedInputRequest(SecAggMessage):
    """Server -> client: the encrypted shares its neighbours addressed to it."""

    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    KIND: ClassVar[Kind] = Kind.REQUEST
    _BODY: ClassVar[tuple[Key, ...]] = (Key.SENDER_IDS, Key.CIPHERTEXTS)

    sender_ids: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        ids = _check_ids("sender_ids", self.sender_ids)
        if self.node_id in ids:
            raise _bad("`sender_ids` must not contain the receiving node itself.")
        object.__setattr__(self, "sender_ids", ids)
        blobs = _check_blobs("ciphertexts", self.ciphertexts, CIPHERTEXT_SIZE, len(ids))
        object.__setattr__(self, "ciphertexts", blobs)

    def _body(self) -> Record:
        return {Key.SENDER_IDS: list(self.sender_ids), Key.CIPHERTEXTS: list(self.ciphertexts)}


@dataclass(frozen=True, kw_only=True, eq=False)
class MaskedInputReply(SecAggMessage):
    """Client -> server: the masked, quantized update (uint32, as large as the float32 one) and
    ``peer_ids``, the senders whose shares it opened and whose pairwise masks it added (a
    sender whose share it could not open is left out, as if that share never arrived)."""

    STAGE: ClassVar[Stage] = Stage.MASKED_INPUT
    KIND: ClassVar[Kind] = Kind.REPLY
    _BODY: ClassVar[tuple[Key, ...]] = (Key.MASKED_INPUT, Key.PEER_IDS)

    masked_input: NDArray[np.uint32]
    peer_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.masked_input
        if not isinstance(value, np.ndarray) or value.dtype != np.uint32 or value.ndim != 1:
            dtype = getattr(value, "dtype", type(value).__name__)
            raise _bad(f"`masked_input` must be a 1-D uint32 numpy array. Found {dtype}.")
        ids = _check_ids("peer_ids", self.peer_ids)
        if self.node_id in ids:
            raise _bad("`peer_ids` must not contain the sender itself.")
        object.__setattr__(self, "peer_ids", ids)

    def _body(self) -> Record:
        return {Key.MASKED_INPUT: self.masked_input, Key.PEER_IDS: list(self.peer_ids)}


@dataclass(frozen=True, kw_only=True)
class ConsistencyCheckRequest(SecAggMessage):
    """Server -> survivor: the survivor set the server claims (the nodes whose masked input is
    in the sum), for the survivor to sign."""

    STAGE: ClassVar[Stage] = Stage.CONSISTENCY_CHECK
    KIND: ClassVar[Kind] = Kind.REQUEST
    _BODY: ClassVar[tuple[Key, ...]] = (Key.SURVIVOR_IDS,)

    survivor_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "survivor_ids", _check_ids("survivor_ids", self.survivor_ids))

    def _body(self) -> Record:
        return {Key.SURVIVOR_IDS: list(self.survivor_ids)}


@dataclass(frozen=True, kw_only=True)
class ConsistencyCheckReply(SecAggMessage):
    """Survivor -> server: its identity signature over (run, round, sorted survivor set)
    (``identity.survivors_statement``)."""

    STAGE: ClassVar[Stage] = Stage.CONSISTENCY_CHECK
    KIND: ClassVar[Kind] = Kind.REPLY
    _BODY: ClassVar[tuple[Key, ...]] = (Key.SIGNATURE,)

    signature: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_SIZE:
            raise _bad(f"`signature` must be a {SIGNATURE_SIZE}-byte Ed25519 signature.")

    def _body(self) -> Record:
        return {Key.SIGNATURE: self.signature}


@dataclass(frozen=True, kw_only=True)
class UnmaskRequest(SecAggMessage):
    """Server -> client: which neighbours' masked inputs are in the sum (surviving) and which
    not, with the consistency-check signatures of the survivors in its neighbourhood (signer
    ids and signatures; both empty in unauthenticated mode)."""

    STAGE: ClassVar[Stage] = Stage.UNMASK
    KIND: ClassVar[Kind] = Kind.REQUEST
    _BODY: ClassVar[tuple[Key, ...]] = (
        Key.SURVIVING_IDS,
        Key.DROPPED_IDS,
        Key.SIGNER_IDS,
        Key.SIGNATURES,
    )

    surviving_ids: tuple[int, ...]
    dropped_ids: tuple[int, ...]
    signer_ids: tuple[int, ...]
    signatures: tuple[bytes, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "surviving_ids", _check_ids("surviving_ids", self.surviving_ids))
        object.__setattr__(self, "dropped_ids", _check_ids("dropped_ids", self.dropped_ids))
        signers = _check_ids("signer_ids", self.signer_ids)
        object.__setattr__(self, "signer_ids", signers)
        blobs = _check_blobs("signatures", self.signatures, SIGNATURE_SIZE, len(signers))
        object.__setattr__(self, "signatures", blobs)

    def _body(self) -> Record:
        return {
            Key.SURVIVING_IDS: list(self.surviving_ids),
            Key.DROPPED_IDS: list(self.dropped_ids),
            Key.SIGNER_IDS: list(self.signer_ids),
            Key.SIGNATURES: list(self.signatures),
        }


@dataclass(frozen=True, kw_only=True)
class UnmaskReply(SecAggMessage):
    """Client -> server: self-mask seed shares of survivors, mask-key shares of dropped peers."""

    STAGE: ClassVar[Stage] = Stage.UNMASK
    KIND: ClassVar[Kind] = Kind.REPLY
    _BODY: ClassVar[tuple[Key, ...]] = (
        Key.SEED_SHARE_IDS,
        Key.SEED_SHARES,
        Key.KEY_SHARE_IDS,
        Key.KEY_SHARES,
    )

    seed_share_ids: tuple[int, ...]
    seed_shares: tuple[bytes, ...]
    key_share_ids: tuple[int, ...]
    key_shares: tuple[bytes, ...]

    def __post_init__(self) -> None:
        super().__post_init__()
        seed_ids = _check_ids("seed_share_ids", self.seed_share_ids)
        key_ids = _check_ids("key_share_ids", self.key_share_ids)
        if set(seed_ids) & set(key_ids):
            raise _bad("A reply must never carry both shares of the same node.")
        object.__setattr__(self, "seed_share_ids", seed_ids)
        object.__setattr__(self, "key_share_ids", key_ids)
        seeds = _check_blobs("seed_shares", self.seed_shares, SHARE_SIZE, len(seed_ids))
        keys = _check_blobs("key_shares", self.key_shares, SHARE_SIZE, len(key_ids))
        object.__setattr__(self, "seed_shares", seeds)
        object.__setattr__(self, "key_shares", keys)

    def _body(self) -> Record:
        return {
            Key.SEED_SHARE_IDS: list(self.seed_share_ids),
            Key.SEED_SHARES: list(self.seed_shares),
            Key.KEY_SHARE_IDS: list(self.key_share_ids),
            Key.KEY_SHARES: list(self.key_shares),
        }


MESSAGE_TYPES: Final[tuple[type[SecAggMessage], ...]] = (
    AdvertiseKeysRequest,
    AdvertiseKeysReply,
    ShareKeysRequest,
    ShareKeysReply,
    MaskedInputRequest,
    MaskedInputReply,
    ConsistencyCheckRequest,
    ConsistencyCheckReply,
    UnmaskRequest,
    UnmaskReply,
)


def message_from_record(record: Mapping[str, object]) -> SecAggMessage:
    """Parse any SecAgg+ record, dispatching on its ``stage`` and ``kind``."""
    if not isinstance(record, Mapping):
        raise _bad(f"A record must be a mapping. Found {type(record).__name__}.")
    for message_type in MESSAGE_TYPES:
        if (
            record.get(Key.STAGE) == message_type.STAGE
            and record.get(Key.KIND) == message_type.KIND
        ):
            return message_type.from_record(record)
    raise _bad(
        f"Unknown SecAgg+ message: stage {record.get(Key.STAGE)!r}, kind {record.get(Key.KIND)!r}."
    )


def sorted_pairs(pairs: Mapping[int, bytes]) -> tuple[tuple[int, ...], tuple[bytes, ...]]:
    """Split ``{node_id: blob}`` into (increasing ids, blobs in the same order)."""
    ids = tuple(sorted(pairs))
    return ids, tuple(pairs[i] for i in ids)


def as_mapping(ids: Sequence[int], blobs: Sequence[bytes]) -> dict[int, bytes]:
    """Inverse of :func:`sorted_pairs`."""
    return dict(zip(ids, blobs, strict=True))
