"""The server side of SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017).

A :class:`ServerSession` is a state machine: one method per stage builds that stage's requests
(closing the previous stage: clients that did not answer are dropped), and :meth:`receive`
validates and stores each reply. Threat model: the server is semi-honest; it routes encrypted
shares it cannot read and only ever holds masked uint32 vectors, whose running sum it keeps.
At the end it rebuilds, from at least ``threshold`` Shamir shares each, the self-mask seeds of
the clients whose masked input arrived and the mask keys of the clients that dropped after
sharing keys, removes those masks and returns the sum of exactly the arrived inputs.

Pruning: before the share-keys and masked-input stages the server keeps only the clients whose
closed neighbourhood (itself and its neighbours) among the live clients has at least
``threshold`` members (iterated to a fixed point); the others could never be unmasked, so they
are dropped before their input is requested. After the masked-input stage no client is removed:
if some arrived client has fewer than ``threshold`` arrived clients in its closed
neighbourhood, or some secret has fewer than ``threshold`` shares, the round aborts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from aggregation.secagg import primitives, shamir
from aggregation.secagg.client import pairwise_mask_key, pairwise_sign
from aggregation.secagg.errors import SecAggAbortedError, SecAggProtocolError
from aggregation.secagg.graph import harary_graph
from aggregation.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    Kind,
    MaskedInputReply,
    MaskedInputRequest,
    SecAggMessage,
    ShareKeysReply,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
)
from aggregation.secagg.params import MAX_NODE_ID, SecAggParams
from aggregation.types import Measurements

MessageHook = Callable[[SecAggMessage], None]


class ServerPhase(StrEnum):
    """What the server session is doing."""

    NOT_STARTED = "not_started"
    ADVERTISE_KEYS = "advertise_keys"  # collecting AdvertiseKeysReply
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASK = "unmask"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(frozen=True, kw_only=True, eq=False)
class SecAggResult:
    """The outcome of a round: the uint32 sum (mod 2^32) of exactly ``contributors``' inputs."""

    total: NDArray[np.uint32]
    contributors: tuple[int, ...]
    measurements: Measurements


@dataclass
class ServerState:
    """Everything the server remembers during one round (no client input, only masked sums)."""

    phase: ServerPhase = ServerPhase.NOT_STARTED
    graph: dict[int, frozenset[int]] = field(default_factory=dict)
    expected: frozenset[int] = frozenset()  # who was asked in the current stage
    share_public_keys: dict[int, bytes] = field(default_factory=dict)
    mask_public_keys: dict[int, bytes] = field(default_factory=dict)
    keys_core: frozenset[int] = frozenset()  # U1 after pruning
    peers: dict[int, tuple[int, ...]] = field(default_factory=dict)  # peers given in share keys
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> receiver
    shared_core: frozenset[int] = frozenset()  # U2 after pruning
    masked_sum: NDArray[np.uint32] | None = None
    arrived: set[int] = field(default_factory=set)  # U3
    unmask_requests: dict[int, UnmaskRequest] = field(default_factory=dict)
    unmask_replies: dict[int, UnmaskReply] = field(default_factory=dict)  # U4
    measurements: Measurements = field(default_factory=dict)


class ServerSession:
    """The server's side of one SecAgg+ round.

    Drive it as: ``advertise_keys()`` -> send, ``receive()`` replies -> ``share_keys()`` ->
    send, ``receive()`` -> ``masked_input()`` -> send, ``receive()`` -> ``unmask()`` -> send,
    ``receive()`` -> ``result()``. ``on_message`` (optional) sees every message the server
    handles, outgoing and incoming (rejected ones included).
    """

    def __init__(
        self,
        params: SecAggParams,
        *,
        run_id: int,
        server_round: int,
        node_ids: Sequence[int],
        rng: np.random.Generator,
        on_message: MessageHook | None = None,
    ) -> None:
        ids = list(node_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("`node_ids` contains duplicates; sample each node once.")
        if any(not isinstance(i, int) or not 0 <= i <= MAX_NODE_ID for i in ids):
            raise ValueError("Node ids must be ints in [0, 2^64 - 1].")
        if len(ids) != params.num_clients:
            raise ValueError(
                f"`node_ids` must list `num_clients` = {params.num_clients} nodes. "
                f"Found {len(ids)}."
            )
        self.params = params
        self.run_id = run_id
        self.server_round = server_round
        self.node_ids = tuple(sorted(ids))
        self._rng = rng
        self._on_message = on_message
        self.state = ServerState()
        self.state.measurements["n_sampled"] = len(ids)

    # -- helpers --------------------------------------------------------------------------
    def _emit(self, message: SecAggMessage) -> None:
        if self._on_message is not None:
            self._on_message(message)

    def _send(self, requests: dict[int, SecAggMessage]) -> None:
        for request in requests.values():
            self._emit(request)

    def _require(self, phase: ServerPhase, action: str) -> None:
        if self.state.phase != phase:
            raise SecAggProtocolError(
                f"Cannot {action} while the session is in phase {self.state.phase}; "
                f"it must be in phase {phase}."
            )

    def _abort(self, reason: str) -> SecAggAbortedError:
        state = self.state
        state.phase = ServerPhase.ABORTED
        if state.masked_sum is not None:
            state.masked_sum.fill(0)
        state.masked_sum = None
        state.measurements["aborted"] = True
        return SecAggAbortedError(f"SecAgg+ round {self.server_round} aborted: {reason}")

    def _core(self, alive: set[int]) -> frozenset[int]:
        """Largest subset where every node has >= t members in its closed neighbourhood."""
        t = self.params.threshold
        core = set(alive)
        changed = True
        while changed:
            changed = False
            for node in sorted(core):
                if len(self.state.graph[node] & core) + 1 < t:
                    core.discard(node)
                    changed = True
        return frozenset(core)

    def _header(self, node_id: int) -> dict[str, int]:
        return {"run_id": self.run_id, "server_round": self.server_round, "node_id": node_id}

    # -- stage 0 --------------------------------------------------------------------------
    def advertise_keys(self) -> dict[int, AdvertiseKeysRequest]:
        """Choose the masking graph and ask every sampled node for its public keys."""
        self._require(ServerPhase.NOT_STARTED, "start the round")
        state = self.state
        state.graph = harary_graph(self.node_ids, self.params.num_neighbours, self._rng)
        requests = {
            node: AdvertiseKeysRequest(
                **self._header(node),
                params=self.params,
                neighbours=tuple(sorted(state.graph[node])),
            )
            for node in self.node_ids
        }
        state.expected = frozenset(requests)
        state.phase = ServerPhase.ADVERTISE_KEYS
        self._send(dict(requests))
        return requests

    # -- stage 1 --------------------------------------------------------------------------
    def share_keys(self) -> dict[int, ShareKeysRequest]:
        """Close key advertising; send each live client its live neighbours' public keys."""
        self._require(ServerPhase.ADVERTISE_KEYS, "start sharing keys")
        state = self.state
        advertised = set(state.share_public_keys)
        state.measurements["n_dropped_advertise_keys"] = len(state.expected) - len(advertised)
        state.keys_core = self._core(advertised)
        state.measurements["n_excluded_share_keys"] = len(advertised) - len(state.keys_core)
        if len(state.keys_core) < self.params.threshold:
            raise self._abort(
                f"only {len(state.keys_core)} clients advertised keys with enough live "
                f"neighbours; at least threshold = {self.params.threshold} are needed."
            )
        requests: dict[int, ShareKeysRequest] = {}
        for node in sorted(state.keys_core):
            peers = tuple(sorted(state.graph[node] & state.keys_core))
            state.peers[node] = peers
            requests[node] = ShareKeysRequest(
                **self._header(node),
                peer_ids=peers,
                share_public_keys=tuple(state.share_public_keys[p] for p in peers),
                mask_public_keys=tuple(state.mask_public_keys[p] for p in peers),
            )
        state.expected = frozenset(requests)
        state.phase = ServerPhase.SHARE_KEYS
        self._send(dict(requests))
        return requests

    # -- stage 2 --------------------------------------------------------------------------
    def masked_input(self) -> dict[int, MaskedInputRequest]:
        """Close key sharing; forward to each live client the shares addressed to it."""
        self._require(ServerPhase.SHARE_KEYS, "request masked inputs")
        state = self.state
        shared = set(state.ciphertexts)
        state.measurements["n_dropped_share_keys"] = len(state.expected) - len(shared)
        state.shared_core = self._core(shared)
        state.measurements["n_excluded_masked_input"] = len(shared) - len(state.shared_core)
        if len(state.shared_core) < self.params.threshold:
            raise self._abort(
                f"only {len(state.shared_core)} clients shared keys with enough live neighbours;"
                f" at least threshold = {self.params.threshold} are needed."
            )
        requests: dict[int, MaskedInputRequest] = {}
        for node in sorted(state.shared_core):
            senders = tuple(sorted(state.graph[node] & state.shared_core))
            requests[node] = MaskedInputRequest(
                **self._header(node),
                sender_ids=senders,
                ciphertexts=tuple(state.ciphertexts[s][node] for s in senders),
            )
        state.masked_sum = np.zeros(self.params.vector_length, dtype=np.uint32)
        state.expected = frozenset(requests)
        state.phase = ServerPhase.MASKED_INPUT
        self._send(dict(requests))
        return requests

    # -- stage 3 --------------------------------------------------------------------------
    def unmask(self) -> dict[int, UnmaskRequest]:
        """Close masked input; ask each client whose input arrived for the shares to unmask."""
        self._require(ServerPhase.MASKED_INPUT, "request unmasking")
        state = self.state
        arrived = frozenset(state.arrived)
        t = self.params.threshold
        state.measurements["n_dropped_masked_input"] = len(state.expected) - len(arrived)
        state.measurements["n_masked_inputs"] = len(arrived)
        if len(arrived) < t:
            raise self._abort(
                f"only {len(arrived)} masked inputs arrived; at least threshold = {t} are needed."
            )
        thin = sorted(n for n in arrived if len(state.graph[n] & arrived) + 1 < t)
        if thin:
            raise self._abort(
                f"clients {thin} have fewer than threshold = {t} arrived clients in their "
                "neighbourhood; unmasking would aggregate too few inputs."
            )
        requests: dict[int, UnmaskRequest] = {}
        for node in sorted(arrived):
            neighbours = state.graph[node] & state.shared_core
            requests[node] = UnmaskRequest(
                **self._header(node),
                surviving_ids=tuple(sorted((neighbours & arrived) | {node})),
                dropped_ids=tuple(sorted(neighbours - arrived)),
            )
        state.unmask_requests = requests
        state.expected = frozenset(requests)
        state.phase = ServerPhase.UNMASK
        self._send(dict(requests))
        return requests

    # -- end ------------------------------------------------------------------------------
    def result(self) -> SecAggResult:
        """Close unmasking; rebuild the needed secrets, remove every mask, return the sum."""
        self._require(ServerPhase.UNMASK, "compute the result")
        state = self.state
        t = self.params.threshold
        arrived = frozenset(state.arrived)
        replies = state.unmask_replies
        state.measurements["n_dropped_unmask"] = len(state.expected) - len(replies)
        state.measurements["n_survivors"] = len(replies)
        seed_shares: dict[int, dict[int, bytes]] = {n: {} for n in arrived}
        key_shares: dict[int, dict[int, bytes]] = {}
        for holder, reply in replies.items():
            for node, share in zip(reply.seed_share_ids, reply.seed_shares, strict=True):
                seed_shares[node][holder] = share
            for node, share in zip(reply.key_share_ids, reply.key_shares, strict=True):
                key_shares.setdefault(node, {})[holder] = share
        dropped = sorted(n for n in state.shared_core - arrived if state.graph[n] & arrived)
        short = sorted(n for n in arrived if len(seed_shares[n]) < t)
        short += sorted(n for n in dropped if len(key_shares.get(n, {})) < t)
        if short:
            raise self._abort(
                f"fewer than threshold = {t} shares arrived for the secrets of clients {short}; "
                "too many clients dropped during unmasking."
            )
        try:
            seeds = {n: shamir.combine(seed_shares[n], threshold=t) for n in sorted(arrived)}
            mask_keys = {n: shamir.combine(key_shares[n], threshold=t) for n in dropped}
            private_keys = {n: primitives.load_private_key(k) for n, k in mask_keys.items()}
        except ValueError as error:
            raise self._abort(f"inconsistent shares ({error}).") from None
        for node, key in private_keys.items():
            if primitives.public_bytes(key) != state.mask_public_keys[node]:
                raise self._abort(
                    f"the rebuilt mask key of client {node} does not match its public key "
                    "(corrupted shares)."
                )
        total = state.masked_sum
        if total is None:
            raise self._abort("no masked sum.")
        keys = [(seed, -1) for seed in seeds.values()]
        for node, key in private_keys.items():
            for peer in sorted(state.graph[node] & arrived):
                pair_key = pairwise_mask_key(
                    key,
                    state.mask_public_keys[peer],
                    run_id=self.run_id,
                    server_round=self.server_round,
                    me=node,
                    peer=peer,
                )
                # ``peer`` added pairwise_sign(peer, node) * mask; take it back out.
                keys.append((pair_key, -pairwise_sign(peer, node)))
        primitives.MaskExpander().add_masks_inplace(total, keys)
        state.measurements["n_seeds_rebuilt"] = len(seeds)
        state.measurements["n_mask_keys_rebuilt"] = len(private_keys)
        state.masked_sum = None
        state.phase = ServerPhase.FINISHED
        return SecAggResult(
            total=total,
            contributors=tuple(sorted(arrived)),
            measurements=dict(state.measurements),
        )

    # -- replies --------------------------------------------------------------------------
    def receive(self, reply: SecAggMessage) -> None:
        """Validate and store one client reply.

        Raises SecAggProtocolError (the reply is discarded, the state unchanged) for a reply of
        another run, round or stage, from a node not asked in this stage, a duplicate, or a
        malformed body. An adapter treats the sender as dropped.
        """
        self._emit(reply)
        state = self.state
        if reply.KIND != Kind.REPLY:
            raise SecAggProtocolError("The server only receives replies.")
        if reply.run_id != self.run_id or reply.server_round != self.server_round:
            raise SecAggProtocolError(
                f"Reply for run {reply.run_id} round {reply.server_round}; this session is run "
                f"{self.run_id} round {self.server_round}. Discard stale messages."
            )
        if state.phase not in _COLLECTING or str(state.phase) != str(reply.stage):
            raise SecAggProtocolError(
                f"A {reply.stage} reply arrived while the server is in phase {state.phase}."
            )
        node = reply.node_id
        if node not in state.expected:
            raise SecAggProtocolError(
                f"Node {node} was not asked in the {reply.stage} stage (unknown or dropped)."
            )
        if isinstance(reply, AdvertiseKeysReply):
            self._receive_keys(reply)
        elif isinstance(reply, ShareKeysReply):
            self._receive_shares(reply)
        elif isinstance(reply, MaskedInputReply):
            self._receive_masked_input(reply)
        elif isinstance(reply, UnmaskReply):
            self._receive_unmask(reply)
        else:
            raise SecAggProtocolError(f"Unexpected message type {type(reply).__name__}.")

    def _duplicate(self, node: int, seen: Mapping[int, object] | set[int], stage: Stage) -> None:
        if node in seen:
            raise SecAggProtocolError(f"Duplicate {stage} reply from node {node}; discarded.")

    def _receive_keys(self, reply: AdvertiseKeysReply) -> None:
        state = self.state
        self._duplicate(reply.node_id, state.share_public_keys, Stage.ADVERTISE_KEYS)
        if reply.share_public_key == reply.mask_public_key:
            raise SecAggProtocolError("A client's two public keys must differ.")
        known = set(state.share_public_keys.values()) | set(state.mask_public_keys.values())
        if reply.share_public_key in known or reply.mask_public_key in known:
            raise SecAggProtocolError(
                f"Node {reply.node_id} advertised a public key another node already uses "
                "(replayed keys); discarded."
            )
        state.share_public_keys[reply.node_id] = reply.share_public_key
        state.mask_public_keys[reply.node_id] = reply.mask_public_key

    def _receive_shares(self, reply: ShareKeysReply) -> None:
        state = self.state
        self._duplicate(reply.node_id, state.ciphertexts, Stage.SHARE_KEYS)
        if reply.receiver_ids != state.peers[reply.node_id]:
            raise SecAggProtocolError(
                f"Node {reply.node_id} must send one share to each of {state.peers[reply.node_id]}"
                f"; found shares for {reply.receiver_ids}."
            )
        state.ciphertexts[reply.node_id] = dict(
            zip(reply.receiver_ids, reply.ciphertexts, strict=True)
        )

    def _receive_masked_input(self, reply: MaskedInputReply) -> None:
        state = self.state
        self._duplicate(reply.node_id, state.arrived, Stage.MASKED_INPUT)
        if reply.masked_input.shape != (self.params.vector_length,):
            raise SecAggProtocolError(
                f"Node {reply.node_id} sent {reply.masked_input.shape[0]} values; the round "
                f"expects `vector_length` = {self.params.vector_length}."
            )
        if state.masked_sum is None:
            raise SecAggProtocolError("No masked sum is being collected.")
        np.add(state.masked_sum, reply.masked_input, out=state.masked_sum)
        state.arrived.add(reply.node_id)

    def _receive_unmask(self, reply: UnmaskReply) -> None:
        state = self.state
        self._duplicate(reply.node_id, state.unmask_replies, Stage.UNMASK)
        request = state.unmask_requests[reply.node_id]
        if (
            reply.seed_share_ids != request.surviving_ids
            or reply.key_share_ids != request.dropped_ids
        ):
            raise SecAggProtocolError(
                f"Node {reply.node_id} must answer with exactly the requested shares."
            )
        state.unmask_replies[reply.node_id] = reply


_COLLECTING = frozenset(
    {
        ServerPhase.ADVERTISE_KEYS,
        ServerPhase.SHARE_KEYS,
        ServerPhase.MASKED_INPUT,
        ServerPhase.UNMASK,
    }
)
