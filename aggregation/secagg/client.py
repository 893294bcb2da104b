"""The client side of SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017).

A :class:`ClientSession` is a state machine with one method per stage. Threat model: the
server is semi-honest and sees every message; an honest client refuses any request that could
make it reveal both the self-mask seed share and the mask-key share of the same peer, or that
would unmask a sum of fewer than ``threshold`` clients of its neighbourhood. A refused request
raises and reveals nothing; the session's state is unchanged by any rejected request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NoReturn, TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from aggregation.secagg import primitives, shamir
from aggregation.secagg.errors import SecAggProtocolError, SecAggRefusedError
from aggregation.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    MaskedInputReply,
    MaskedInputRequest,
    SecAggMessage,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from aggregation.secagg.params import SecAggParams
from aggregation.secagg.quantization import check_update, quantize

T = TypeVar("T")


class ClientPhase(StrEnum):
    """The request a client session expects next."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    DONE = "done"


@dataclass
class ClientState:
    """Everything a client remembers during one round (its secrets included)."""

    node_id: int
    phase: ClientPhase = ClientPhase.ADVERTISE_KEYS
    run_id: int = -1
    server_round: int = -1
    params: SecAggParams | None = None
    neighbours: frozenset[int] = frozenset()
    share_key: X25519PrivateKey | None = None
    mask_key: X25519PrivateKey | None = None
    self_seed: bytes = b""
    peer_mask_public_keys: dict[int, bytes] = field(default_factory=dict)
    peer_share_public_keys: dict[int, bytes] = field(default_factory=dict)
    share_encryption_keys: dict[int, bytes] = field(default_factory=dict)
    own_seed_share: bytes = b""
    seed_shares: dict[int, bytes] = field(default_factory=dict)
    key_shares: dict[int, bytes] = field(default_factory=dict)


class ClientSession:
    """One client's side of one SecAgg+ round: advertise keys -> share keys -> masked input ->
    unmask. Each method takes the server's request and returns the reply to send back."""

    def __init__(self, node_id: int) -> None:
        self.state = ClientState(node_id=node_id)

    # -- persistence ----------------------------------------------------------------------
    def to_state_record(self) -> dict[str, bytes | int | str | list[int] | list[bytes]]:
        """The session as plain values, for the node's local state between stage messages
        (e.g. Flower's ``Context.state``). It holds this round's secrets: keep it on the node."""
        st = self.state
        record: dict[str, bytes | int | str | list[int] | list[bytes]] = {
            "node_id": st.node_id,
            "phase": str(st.phase),
        }
        if st.params is None or st.share_key is None or st.mask_key is None:
            return record
        p = st.params
        peers = sorted(st.peer_share_public_keys)
        holders = sorted(st.seed_shares)
        record.update(
            {
                "run_id": st.run_id,
                "round": st.server_round,
                "params": [p.num_clients, p.num_neighbours, p.threshold, p.vector_length],
                "clipping_range": float(p.clipping_range).hex(),
                "neighbours": sorted(st.neighbours),
                "share_key": primitives.private_bytes(st.share_key),
                "mask_key": primitives.private_bytes(st.mask_key),
                "self_seed": st.self_seed,
                "peer_ids": peers,
                "peer_share_public_keys": [st.peer_share_public_keys[i] for i in peers],
                "peer_mask_public_keys": [st.peer_mask_public_keys[i] for i in peers],
                "share_encryption_keys": [st.share_encryption_keys[i] for i in peers],
                "own_seed_share": st.own_seed_share,
                "holder_ids": holders,
                "seed_shares": [st.seed_shares[i] for i in holders],
                "key_shares": [st.key_shares[i] for i in holders],
            }
        )
        return record

    @classmethod
    def from_state_record(cls, record: Mapping[str, object]) -> ClientSession:
        """Inverse of :meth:`to_state_record`; raises SecAggProtocolError if it is malformed."""
        try:
            session = cls(_as(int, record["node_id"]))
            st = session.state
            st.phase = ClientPhase(_as(str, record["phase"]))
            if "run_id" not in record:
                if st.phase != ClientPhase.ADVERTISE_KEYS:
                    raise ValueError("a session past its first stage must hold its keys")
                return session
            n, k, t, length = (_as(int, v) for v in _as(list, record["params"]))
            st.params = SecAggParams(
                num_clients=n,
                num_neighbours=k,
                threshold=t,
                vector_length=length,
                clipping_range=float.fromhex(_as(str, record["clipping_range"])),
            )
            st.run_id, st.server_round = _as(int, record["run_id"]), _as(int, record["round"])
            st.neighbours = frozenset(_as(int, v) for v in _as(list, record["neighbours"]))
            st.share_key = primitives.load_private_key(_as(bytes, record["share_key"]))
            st.mask_key = primitives.load_private_key(_as(bytes, record["mask_key"]))
            st.self_seed = _as(bytes, record["self_seed"])
            peers = [_as(int, v) for v in _as(list, record["peer_ids"])]

            def by_peer(key: str, ids: list[int]) -> dict[int, bytes]:
                return dict(zip(ids, (_as(bytes, v) for v in _as(list, record[key])), strict=True))

            st.peer_share_public_keys = by_peer("peer_share_public_keys", peers)
            st.peer_mask_public_keys = by_peer("peer_mask_public_keys", peers)
            st.share_encryption_keys = by_peer("share_encryption_keys", peers)
            st.own_seed_share = _as(bytes, record["own_seed_share"])
            holders = [_as(int, v) for v in _as(list, record["holder_ids"])]
            st.seed_shares = by_peer("seed_shares", holders)
            st.key_shares = by_peer("key_shares", holders)
        except (KeyError, TypeError, ValueError) as error:
            raise SecAggProtocolError(f"Malformed client session state: {error}") from None
        return session

    # -- checks ---------------------------------------------------------------------------
    def _check(self, request: SecAggMessage, phase: ClientPhase) -> SecAggParams:
        self._check_header(request, phase)
        if self.state.params is None:
            _unreachable()
        return self.state.params

    def _check_header(self, request: SecAggMessage, phase: ClientPhase) -> None:
        state = self.state
        if state.phase == ClientPhase.DONE:
            raise SecAggProtocolError(
                f"Node {state.node_id} has already answered every stage of this round and "
                "reveals nothing more. Use a new ClientSession for the next round."
            )
        if state.phase != phase:
            raise SecAggProtocolError(
                f"Node {state.node_id} expects a {state.phase} request, got a {request.stage} "
                "request. Send the stages in order, once each."
            )
        if request.node_id != state.node_id:
            raise SecAggProtocolError(
                f"Request addressed to node {request.node_id}, not to node {state.node_id}."
            )
        if phase != ClientPhase.ADVERTISE_KEYS and (
            request.run_id != state.run_id or request.server_round != state.server_round
        ):
            raise SecAggProtocolError(
                f"Request for run {request.run_id} round {request.server_round}; this session "
                f"is run {state.run_id} round {state.server_round}."
            )

    # -- stage 0 --------------------------------------------------------------------------
    def advertise_keys(self, request: AdvertiseKeysRequest) -> AdvertiseKeysReply:
        """Create this round's two X25519 key pairs and the self-mask seed; publish the keys."""
        state = self.state
        self._check_header(request, ClientPhase.ADVERTISE_KEYS)
        state.run_id, state.server_round = request.run_id, request.server_round
        state.params = request.params
        state.neighbours = frozenset(request.neighbours)
        state.share_key = primitives.generate_private_key()
        state.mask_key = primitives.generate_private_key()
        state.self_seed = os.urandom(primitives.KEY_SIZE)
        state.phase = ClientPhase.SHARE_KEYS
        return AdvertiseKeysReply(
            run_id=state.run_id,
            server_round=state.server_round,
            node_id=state.node_id,
            share_public_key=primitives.public_bytes(state.share_key),
            mask_public_key=primitives.public_bytes(state.mask_key),
        )

    # -- stage 1 --------------------------------------------------------------------------
    def share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        """Shamir-share the self-mask seed and the mask private key among the neighbours that
        advertised keys (and itself), encrypting each neighbour's pair with AES-256-GCM."""
        params = self._check(request, ClientPhase.SHARE_KEYS)
        state = self.state
        me = state.node_id
        strangers = sorted(set(request.peer_ids) - state.neighbours)
        if strangers:
            raise SecAggRefusedError(
                f"Node {me} refuses to share keys with {strangers}: not its neighbours."
            )
        if len(request.peer_ids) + 1 < params.threshold:
            raise SecAggRefusedError(
                f"Node {me} has {len(request.peer_ids)} neighbours with keys; it needs at least "
                f"threshold - 1 = {params.threshold - 1} so that its secrets can be rebuilt."
            )
        if state.share_key is None or state.mask_key is None:
            _unreachable()
        holders = [*request.peer_ids, me]
        t = params.threshold
        seed_shares = shamir.split(state.self_seed, threshold=t, holders=holders)
        key_shares = shamir.split(
            primitives.private_bytes(state.mask_key), threshold=t, holders=holders
        )
        ciphertexts: list[bytes] = []
        encryption_keys: dict[int, bytes] = {}
        for peer, share_pk in zip(request.peer_ids, request.share_public_keys, strict=True):
            try:
                key = primitives.agree(
                    state.share_key,
                    share_pk,
                    primitives.PURPOSE_SHARE_KEY,
                    run_id=state.run_id,
                    round_=state.server_round,
                    node_a=me,
                    node_b=peer,
                )
            except ValueError as error:
                raise SecAggProtocolError(f"Node {peer}'s public key is invalid: {error}") from None
            ad = primitives.share_associated_data(
                run_id=state.run_id, round_=state.server_round, sender=me, receiver=peer
            )
            plaintext = seed_shares[peer] + key_shares[peer]
            ciphertexts.append(primitives.encrypt_share(key, plaintext, ad))
            encryption_keys[peer] = key
        state.share_encryption_keys = encryption_keys
        state.peer_share_public_keys = dict(
            zip(request.peer_ids, request.share_public_keys, strict=True)
        )
        state.peer_mask_public_keys = dict(
            zip(request.peer_ids, request.mask_public_keys, strict=True)
        )
        state.own_seed_share = seed_shares[me]
        state.phase = ClientPhase.MASKED_INPUT
        return ShareKeysReply(
            run_id=state.run_id,
            server_round=state.server_round,
            node_id=me,
            receiver_ids=request.peer_ids,
            ciphertexts=tuple(ciphertexts),
        )

    # -- stage 2 --------------------------------------------------------------------------
    def masked_input(
        self, request: MaskedInputRequest, update: NDArray[np.float32], rng: np.random.Generator
    ) -> MaskedInputReply:
        """Quantize ``update`` (clip, stochastic rounding with ``rng``) and mask it.

        Refuses NaN/Inf, a wrong dtype or length before anything else happens.
        """
        params = self._check(request, ClientPhase.MASKED_INPUT)
        check_update(update, params, finite=False)  # quantize scans for NaN/Inf in cache
        shares = self._open_shares(request, params)
        streams = primitives.MaskStreams(self._mask_keys(shares))
        masked = quantize(update, params, rng, on_chunk=streams.add_inplace)
        return self._reply(masked, shares)

    def masked_input_quantized(
        self, request: MaskedInputRequest, quantized: NDArray[np.uint32]
    ) -> MaskedInputReply:
        """Mask an already-quantized uint32 vector (e.g. federated-analytics counts).

        The caller owns the headroom: the server gets the sum mod 2^32.
        """
        params = self._check(request, ClientPhase.MASKED_INPUT)
        if not isinstance(quantized, np.ndarray) or quantized.dtype != np.uint32:
            dtype = getattr(quantized, "dtype", type(quantized).__name__)
            raise TypeError(f"A quantized input must be a uint32 numpy array. Found {dtype}.")
        if quantized.shape != (params.vector_length,):
            raise ValueError(
                f"A quantized input must have shape ({params.vector_length},). "
                f"Found {quantized.shape}."
            )
        shares = self._open_shares(request, params)
        masked = np.array(quantized, dtype=np.uint32, copy=True)
        primitives.MaskStreams(self._mask_keys(shares)).add_inplace(masked)
        return self._reply(masked, shares)

    def _open_shares(
        self, request: MaskedInputRequest, params: SecAggParams
    ) -> dict[int, tuple[bytes, bytes]]:
        state = self.state
        me = state.node_id
        unknown = sorted(set(request.sender_ids) - set(state.peer_share_public_keys))
        if unknown:
            raise SecAggRefusedError(
                f"Node {me} got shares from {unknown}, which are not neighbours it shared keys "
                "with."
            )
        if len(request.sender_ids) + 1 < params.threshold:
            raise SecAggRefusedError(
                f"Node {me} has {len(request.sender_ids)} neighbours left; it needs at least "
                f"threshold - 1 = {params.threshold - 1}."
            )
        shares: dict[int, tuple[bytes, bytes]] = {}
        for sender, ciphertext in zip(request.sender_ids, request.ciphertexts, strict=True):
            key = state.share_encryption_keys[sender]
            ad = primitives.share_associated_data(
                run_id=state.run_id, round_=state.server_round, sender=sender, receiver=me
            )
            plaintext = primitives.decrypt_share(key, ciphertext, ad)
            size = shamir.SHARE_SIZE
            shares[sender] = (plaintext[:size], plaintext[size:])
        return shares

    def _mask_keys(self, shares: dict[int, tuple[bytes, bytes]]) -> list[tuple[bytes, int]]:
        """The self-mask seed (+1) and one pairwise key per peer whose shares arrived."""
        state = self.state
        me = state.node_id
        if state.mask_key is None:
            _unreachable()
        keys = [(state.self_seed, 1)]
        for peer in shares:
            key = pairwise_mask_key(
                state.mask_key,
                state.peer_mask_public_keys[peer],
                run_id=state.run_id,
                server_round=state.server_round,
                me=me,
                peer=peer,
            )
            keys.append((key, pairwise_sign(me, peer)))
        return keys

    def _reply(
        self, vector: NDArray[np.uint32], shares: dict[int, tuple[bytes, bytes]]
    ) -> MaskedInputReply:
        state = self.state
        me = state.node_id
        state.seed_shares = {peer: pair[0] for peer, pair in shares.items()}
        state.key_shares = {peer: pair[1] for peer, pair in shares.items()}
        state.phase = ClientPhase.UNMASK
        return MaskedInputReply(
            run_id=state.run_id, server_round=state.server_round, node_id=me, masked_input=vector
        )

    # -- stage 3 --------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Reveal self-mask seed shares of surviving peers and mask-key shares of dropped ones.

        Refused (SecAggRefusedError, nothing revealed) when a node is listed as both surviving
        and dropped, a listed node is not a neighbour it holds shares of, the client itself is
        not listed as surviving, or fewer than ``threshold`` survivors are listed.
        """
        params = self._check(request, ClientPhase.UNMASK)
        state = self.state
        me = state.node_id
        surviving, dropped = set(request.surviving_ids), set(request.dropped_ids)
        both = sorted(surviving & dropped)
        if both:
            raise SecAggRefusedError(
                f"Node {me} refuses to unmask: {both} listed as both surviving and dropped, "
                "which would reveal both secrets of the same peer. Nothing was revealed."
            )
        if me not in surviving:
            raise SecAggRefusedError(
                f"Node {me} refuses to unmask: it is answering, so it must be listed as "
                "surviving and never as dropped."
            )
        strangers = sorted((surviving | dropped) - set(state.seed_shares) - {me})
        if strangers:
            raise SecAggRefusedError(
                f"Node {me} refuses to unmask: {strangers} are not neighbours whose shares it "
                "holds. Nothing was revealed."
            )
        if len(surviving) < params.threshold:
            raise SecAggRefusedError(
                f"Node {me} refuses to unmask: only {len(surviving)} survivors in its "
                f"neighbourhood, fewer than threshold = {params.threshold}."
            )
        seed_ids = tuple(sorted(surviving))
        key_ids = tuple(sorted(dropped))
        seeds = tuple(state.own_seed_share if i == me else state.seed_shares[i] for i in seed_ids)
        keys = tuple(state.key_shares[i] for i in key_ids)
        state.phase = ClientPhase.DONE
        return UnmaskReply(
            run_id=state.run_id,
            server_round=state.server_round,
            node_id=me,
            seed_share_ids=seed_ids,
            seed_shares=seeds,
            key_share_ids=key_ids,
            key_shares=keys,
        )

    def handle(
        self,
        request: SecAggMessage,
        update: NDArray[np.float32] | None = None,
        rng: np.random.Generator | None = None,
    ) -> SecAggMessage:
        """Dispatch ``request`` to the method of its stage (for adapters)."""
        if isinstance(request, AdvertiseKeysRequest):
            return self.advertise_keys(request)
        if isinstance(request, ShareKeysRequest):
            return self.share_keys(request)
        if isinstance(request, MaskedInputRequest):
            if update is None or rng is None:
                raise ValueError("The masked-input stage needs the update and a rounding rng.")
            return self.masked_input(request, update, rng)
        if isinstance(request, UnmaskRequest):
            return self.unmask(request)
        raise SecAggProtocolError(
            f"Clients answer requests only; got a {request.stage} {request.KIND}."
        )


def pairwise_sign(me: int, peer: int) -> int:
    """+1 for the smaller node id, -1 for the larger: the pair's masks cancel in the sum."""
    return 1 if me < peer else -1


def pairwise_mask_key(
    private_key: X25519PrivateKey,
    peer_public: bytes,
    *,
    run_id: int,
    server_round: int,
    me: int,
    peer: int,
) -> bytes:
    """The AES-256 key of the mask shared by ``me`` and ``peer`` (X25519 + HKDF-SHA256)."""
    return primitives.agree(
        private_key,
        peer_public,
        primitives.PURPOSE_PAIRWISE_MASK,
        run_id=run_id,
        round_=server_round,
        node_a=me,
        node_b=peer,
    )


def _as(kind: type[T], value: object) -> T:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, found {type(value).__name__}")
    return value


def _unreachable() -> NoReturn:
    raise SecAggProtocolError("The client session is in an inconsistent state.")
