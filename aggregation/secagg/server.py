"""The server side of SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017).

A :class:`ServerSession` is a state machine: one method per stage builds that stage's requests
(closing the previous stage: clients that did not answer are dropped), and :meth:`receive`
validates and stores each reply. The server never needs to be trusted for privacy (the
clients protect themselves, see ``client``); what this side guarantees is that one bad client
costs one dropout and never a silently wrong sum:

- every malformed reply (wrong type or length, invalid or small-order key, bad signature,
  replayed key, duplicate, shares it was not asked for, a share that is not a field element)
  is refused by :meth:`receive` with a :class:`SecAggProtocolError` naming the node and the
  reason, and leaves the state unchanged; the adapter reports it with :meth:`reject` (or just
  does not retry), and the reasons of every dropout are in ``state.dropout_reasons``;
- a client that could not open a peer's share leaves that peer out of its masks and says so
  (``MaskedInputReply.peer_ids``); at the close of the masked-input stage the server removes
  from the sum the fewest clients that make every pair's masks agree (a greedy vertex cover of
  the disagreeing pairs, the accused first), so a client that sent garbage shares is a
  dropout. Masked inputs are therefore kept individually (besides the running sum) until that
  stage closes, to take an evicted one back out (memory O(N * P) uint32 for that moment, the
  size of the replies the transport already holds);
- secrets are rebuilt robustly (``shamir.reconstruct``): inconsistent shares are found
  (Berlekamp-Welch, then a bounded search), excluded and their holders named; every rebuilt
  mask key must match the node's advertised public key and every rebuilt self-mask seed the
  node's signed seed commitment, so a forged share (e.g. one shifted by delta / its Lagrange
  coefficient) never changes the sum. A secret that cannot be determined uniquely aborts the
  round.

Authenticated mode (constructed with ``roster``): advertise-keys replies must carry a valid
identity signature (over the round and the session ``context``: a node signing for another
context -- another job -- is refused), survivors sign the survivor set in the
consistency-check stage, and each unmask request carries the survivors' signatures from the
client's neighbourhood. Without a roster the session runs the semi-honest legacy protocol
(four stages, no signatures); only unauthenticated clients take part in it.

Pruning: before the share-keys and masked-input stages the server keeps only the clients whose
closed neighbourhood (itself and its neighbours) among the live clients has at least
``threshold`` members (iterated to a fixed point); the others could never be unmasked, so they
are dropped before their input is requested. When the masked-input stage closes, besides the
disagreeing clients (above), the server removes from the sum, to a fixed point, each input
whose owner has fewer than ``threshold`` survivors it masked with in its closed neighbourhood,
or that masked with a dropped client whose mask key fewer than ``threshold`` survivors can
rebuild. If fewer than ``threshold`` inputs remain, or some secret gets fewer than
``threshold`` shares during unmasking, the round aborts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from aggregation.secagg import primitives, shamir
from aggregation.secagg.client import pairwise_mask_key, pairwise_sign
from aggregation.secagg.errors import SecAggAbortedError, SecAggProtocolError
from aggregation.secagg.graph import harary_graph
from aggregation.secagg.identity import Roster, check_context
from aggregation.secagg.messages import (
    AdvertiseKeysRequest,
    ConsistencyCheckRequest,
    MaskedInputRequest,
    SecAggMessage,
    ShareKeysRequest,
    Stage,
    UnmaskRequest,
)
from aggregation.secagg.params import MAX_NODE_ID, SecAggParams
from aggregation.secagg.server_replies import ServerReplies
from aggregation.secagg.server_state import MessageHook as MessageHook
from aggregation.secagg.server_state import SecAggResult as SecAggResult
from aggregation.secagg.server_state import ServerPhase as ServerPhase
from aggregation.secagg.server_state import ServerState as ServerState


class ServerSession(ServerReplies):
    """The server's side of one SecAgg+ round.

    Drive it as: ``advertise_keys()`` -> send, ``receive()`` replies -> ``share_keys()`` ->
    send, ``receive()`` -> ``masked_input()`` -> send, ``receive()`` ->
    ``consistency_check()`` -> send, ``receive()`` (authenticated only) -> ``unmask()`` -> send,
    ``receive()`` -> ``result()``. :meth:`stages` lists the stage openers in order. When
    ``receive`` raises for a reply (or a client sends an error or nothing), call
    ``reject(node, reason)``. ``on_message`` (optional) sees every message the server handles,
    outgoing and incoming (rejected ones included).

    ``roster`` (node id -> identity key) makes the round authenticated; ``context`` is the
    session context the clients bind their signatures to (fedbrain: the signed job's id; it
    must be the one the clients were given). ``keep_masked_inputs``
    (default True) keeps each masked input, besides the running sum, until the masked-input
    stage closes, so that a client whose masks disagree with its neighbours' (garbage shares)
    or that can no longer be unmasked is taken out of the sum and is one dropout; it costs
    N * P * 4 bytes of memory for that time (measured: ~10% of an in-process round's CPU at
    N = 20, P = 1e6, first-touching that memory). With False such a round aborts instead, with
    the reasons; it never returns a wrong sum either way.
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
        roster: Roster | None = None,
        keep_masked_inputs: bool = True,
        context: bytes = b"",
    ) -> None:
        check_context(context)
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
        if roster is not None:
            strangers = sorted(set(ids) - set(roster))
            if strangers:
                raise ValueError(
                    f"`node_ids` {strangers} are not in the roster; sample roster members only "
                    "(their ids are identity.node_id_for(their identity key))."
                )
        self.params = params
        self.run_id = run_id
        self.server_round = server_round
        self.node_ids = tuple(sorted(ids))
        self.roster = roster
        self.context = context
        self.keep_masked_inputs = keep_masked_inputs
        self._rng = rng
        self._on_message = on_message
        self.state = ServerState()
        self.state.measurements["n_sampled"] = len(ids)
        self.state.measurements["authenticated"] = roster is not None

    @property
    def authenticated(self) -> bool:
        """Whether the round is the malicious-server protocol (signatures, consistency check)."""
        return self.roster is not None

    def stages(self) -> list[tuple[Stage, Callable[[], Mapping[int, SecAggMessage]]]]:
        """The stages of this round in order, each with the method that opens it."""
        openers: list[tuple[Stage, Callable[[], Mapping[int, SecAggMessage]]]] = [
            (Stage.ADVERTISE_KEYS, self.advertise_keys),
            (Stage.SHARE_KEYS, self.share_keys),
            (Stage.MASKED_INPUT, self.masked_input),
        ]
        if self.authenticated:
            openers.append((Stage.CONSISTENCY_CHECK, self.consistency_check))
        openers.append((Stage.UNMASK, self.unmask))
        return openers

    # -- helpers --------------------------------------------------------------------------
    def _send(self, requests: Iterable[SecAggMessage]) -> None:
        for request in requests:
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
        state.masked_inputs.clear()
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

    def _drop(self, nodes: Iterable[int], reason: str) -> None:
        for node in nodes:
            self.state.dropout_reasons.setdefault(node, reason)

    def _close(self, stage: Stage, answered: Iterable[int]) -> None:
        """Record a reason for every node asked in ``stage`` that did not answer validly."""
        state = self.state
        self._drop(sorted(state.expected - set(answered)), f"{stage}: no valid reply")

    def _open(self, phase: ServerPhase, requests: dict[int, SecAggMessage]) -> None:
        state = self.state
        state.expected = frozenset(requests)
        state.rejected = set()
        state.phase = phase
        self._send(requests.values())

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
        self._open(ServerPhase.ADVERTISE_KEYS, dict(requests))
        return requests

    # -- stage 1 --------------------------------------------------------------------------
    def share_keys(self) -> dict[int, ShareKeysRequest]:
        """Close key advertising; send each live client its live neighbours' public keys (with
        their commitments and signatures)."""
        self._require(ServerPhase.ADVERTISE_KEYS, "start sharing keys")
        state = self.state
        advertised = set(state.share_public_keys)
        self._close(Stage.ADVERTISE_KEYS, advertised)
        state.measurements["n_dropped_advertise_keys"] = len(state.expected) - len(advertised)
        state.keys_core = self._core(advertised)
        self._drop(
            sorted(advertised - state.keys_core),
            "share_keys: excluded, fewer than threshold live neighbours",
        )
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
                seed_commitments=tuple(state.seed_commitments[p] for p in peers),
                signatures=(
                    tuple(state.key_signatures[p] for p in peers) if self.authenticated else ()
                ),
            )
        self._open(ServerPhase.SHARE_KEYS, dict(requests))
        return requests

    # -- stage 2 --------------------------------------------------------------------------
    def masked_input(self) -> dict[int, MaskedInputRequest]:
        """Close key sharing; forward to each live client the shares addressed to it."""
        self._require(ServerPhase.SHARE_KEYS, "request masked inputs")
        state = self.state
        shared = set(state.ciphertexts)
        self._close(Stage.SHARE_KEYS, shared)
        state.measurements["n_dropped_share_keys"] = len(state.expected) - len(shared)
        state.shared_core = self._core(shared)
        self._drop(
            sorted(shared - state.shared_core),
            "masked_input: excluded, fewer than threshold neighbours shared keys",
        )
        state.measurements["n_excluded_masked_input"] = len(shared) - len(state.shared_core)
        if len(state.shared_core) < self.params.threshold:
            raise self._abort(
                f"only {len(state.shared_core)} clients shared keys with enough live neighbours;"
                f" at least threshold = {self.params.threshold} are needed."
            )
        requests: dict[int, MaskedInputRequest] = {}
        for node in sorted(state.shared_core):
            senders = tuple(sorted(state.graph[node] & state.shared_core))
            state.senders[node] = senders
            requests[node] = MaskedInputRequest(
                **self._header(node),
                sender_ids=senders,
                ciphertexts=tuple(state.ciphertexts[s][node] for s in senders),
            )
        state.masked_sum = np.zeros(self.params.vector_length, dtype=np.uint32)
        self._open(ServerPhase.MASKED_INPUT, dict(requests))
        return requests

    def _evict_disagreeing(self, arrived: set[int]) -> set[int]:
        """The clients to remove so that every pair of arrived neighbours agrees on whether it
        masked with each other (greedy vertex cover of the disagreeing pairs: most disagreements
        first, then the most accused, then the smallest id)."""
        state = self.state
        masked = {u: set(state.masked_peers[u]) for u in arrived}
        accusations: list[tuple[int, int]] = []  # (accuser, accused): accuser left accused out
        for u in sorted(arrived):
            for v in state.senders[u]:
                if v in arrived and u < v and (v in masked[u]) != (u in masked[v]):
                    accusations.append((u, v) if v not in masked[u] else (v, u))
        evicted: set[int] = set()
        open_pairs = list(accusations)
        while open_pairs:
            degree: dict[int, int] = {}
            accused: dict[int, int] = {}
            for accuser, target in open_pairs:
                degree[accuser] = degree.get(accuser, 0) + 1
                degree[target] = degree.get(target, 0) + 1
                accused[target] = accused.get(target, 0) + 1
            worst = max(degree, key=lambda n: (degree[n], accused.get(n, 0), -n))
            evicted.add(worst)
            partners = sorted(
                {a for a, b in open_pairs if b == worst} | {b for a, b in open_pairs if a == worst}
            )
            accusers = sorted(a for a, b in open_pairs if b == worst)
            detail = (
                f"{accusers} could not open its encrypted shares"
                if accusers
                else "it could not open their encrypted shares"
            )
            self._drop(
                [worst],
                f"masked_input: its pairwise masks disagree with {partners} ({detail}); its "
                "masked input was removed from the sum",
            )
            open_pairs = [(a, b) for a, b in open_pairs if worst not in (a, b)]
        return evicted

    def _close_masked_input(self) -> None:
        """Settle who is in the sum: evict disagreeing clients, then (to a fixed point) every
        client with fewer than t survivors it masked with in its neighbourhood and every client
        that masked with a dropped node whose mask key fewer than t survivors can rebuild; sum
        the survivors' masked inputs. An evicted client is treated as dropped after sharing
        keys: its seed is never asked for, its mask key is."""
        state = self.state
        t = self.params.threshold
        arrived = set(state.masked_inputs)
        state.arrived = set(arrived)
        self._close(Stage.MASKED_INPUT, arrived)
        state.measurements["n_dropped_masked_input"] = len(state.expected) - len(arrived)
        if len(arrived) < t:
            raise self._abort(
                f"only {len(arrived)} masked inputs arrived; at least threshold = {t} are needed."
            )
        evicted = self._evict_disagreeing(arrived)
        survivors = set(arrived - evicted)
        masked = {u: set(state.masked_peers[u]) for u in arrived}
        while True:  # remove inputs that could not be unmasked, to a fixed point
            thin = {u for u in survivors if len(masked[u] & survivors) + 1 < t}
            self._drop(
                sorted(thin),
                f"masked_input: fewer than threshold = {t} survivors it masked with in its "
                "neighbourhood; its masked input was removed from the sum",
            )
            stuck: set[int] = set()
            for v in sorted({v for u in survivors for v in masked[u]} - survivors):
                holders = {u for u in survivors if v in masked[u]}
                if len(holders) < t:
                    stuck |= holders
                    self._drop(
                        sorted(holders),
                        f"masked_input: it masked with node {v}, which left the sum, and fewer "
                        f"than threshold = {t} survivors hold shares of node {v}'s mask key; its "
                        "masked input was removed from the sum",
                    )
            if not thin and not stuck:
                break
            evicted |= thin | stuck
            survivors -= thin | stuck
        state.measurements["n_evicted_masked_input"] = len(evicted)
        state.measurements["n_masked_inputs"] = len(survivors)
        if len(survivors) < t:
            raise self._abort(
                f"only {len(survivors)} masked inputs can be unmasked (of {len(arrived)} that "
                f"arrived); at least threshold = {t} are needed."
            )
        total = state.masked_sum
        if total is None:
            raise self._abort("no masked sum.")
        for u in sorted(arrived - survivors):  # the running sum has every arrived input
            kept = state.masked_inputs[u]
            if kept is None:
                raise self._abort(
                    f"clients {sorted(arrived - survivors)} must leave the sum (see the dropout "
                    "reasons), but their masked inputs were not kept (keep_masked_inputs=False)."
                )
            np.subtract(total, kept, out=total)
        state.masked_inputs.clear()
        state.survivors = frozenset(survivors)

    # -- stage 3 --------------------------------------------------------------------------
    def consistency_check(self) -> dict[int, ConsistencyCheckRequest]:
        """Close masked input (settle the survivors); ask each survivor to sign the survivor
        set (authenticated rounds only)."""
        self._require(ServerPhase.MASKED_INPUT, "start the consistency check")
        if not self.authenticated:
            raise SecAggProtocolError(
                "An unauthenticated (legacy) round has no consistency check; call unmask()."
            )
        self._close_masked_input()
        survivors = tuple(sorted(self.state.survivors))
        requests = {
            node: ConsistencyCheckRequest(**self._header(node), survivor_ids=survivors)
            for node in survivors
        }
        self._open(ServerPhase.CONSISTENCY_CHECK, dict(requests))
        return requests

    # -- stage 4 --------------------------------------------------------------------------
    def unmask(self) -> dict[int, UnmaskRequest]:
        """Close the previous stage; ask each survivor for the shares that unmask the sum: seed
        shares of the survivors it masked with, key shares of the dropped ones (authenticated:
        with the consistency signatures of the survivors in its neighbourhood)."""
        state = self.state
        t = self.params.threshold
        signatures: dict[int, bytes] = {}
        if self.authenticated:
            self._require(ServerPhase.CONSISTENCY_CHECK, "request unmasking")
            signatures = dict(state.consistency_signatures)
            self._close(Stage.CONSISTENCY_CHECK, signatures)
            state.measurements["n_dropped_consistency_check"] = len(state.expected) - len(
                signatures
            )
            asked = set(signatures)
        else:
            self._require(ServerPhase.MASKED_INPUT, "request unmasking")
            self._close_masked_input()
            asked = set(state.survivors)
        requests: dict[int, UnmaskRequest] = {}
        for node in sorted(asked):
            masked = set(state.masked_peers[node])
            signers: tuple[int, ...] = ()
            if self.authenticated:
                signers = tuple(sorted((state.graph[node] | {node}) & set(signatures)))
                if len(signers) < t:
                    self._drop(
                        [node],
                        f"unmask: not asked, only {len(signers)} consistency signatures in its "
                        f"neighbourhood (threshold {t}); it would refuse",
                    )
                    continue
            requests[node] = UnmaskRequest(
                **self._header(node),
                surviving_ids=tuple(sorted((masked & state.survivors) | {node})),
                dropped_ids=tuple(sorted(masked - state.survivors)),
                signer_ids=signers,
                signatures=tuple(signatures[s] for s in signers),
            )
        state.unmask_requests = requests
        self._open(ServerPhase.UNMASK, dict(requests))
        return requests

    # -- end ------------------------------------------------------------------------------
    def _rebuild(
        self, kind: str, owner: int, shares: dict[int, bytes], matches: Callable[[bytes], bool]
    ) -> tuple[bytes, tuple[int, ...]]:
        t = self.params.threshold
        try:
            rebuilt = shamir.reconstruct(shares, threshold=t, matches=matches)
        except ValueError as error:
            raise self._abort(f"the {kind} of client {owner} cannot be rebuilt: {error}") from None
        return rebuilt.secret, rebuilt.culprits

    def result(self) -> SecAggResult:
        """Close unmasking; rebuild the needed secrets robustly, remove every mask, return the
        sum of exactly the survivors' inputs."""
        self._require(ServerPhase.UNMASK, "compute the result")
        state = self.state
        t = self.params.threshold
        survivors = state.survivors
        replies = state.unmask_replies
        self._close(Stage.UNMASK, replies)
        state.measurements["n_dropped_unmask"] = len(state.expected) - len(replies)
        state.measurements["n_survivors"] = len(replies)
        seed_shares: dict[int, dict[int, bytes]] = {n: {} for n in survivors}
        key_shares: dict[int, dict[int, bytes]] = {}
        for holder, reply in replies.items():
            for node, share in zip(reply.seed_share_ids, reply.seed_shares, strict=True):
                seed_shares[node][holder] = share
            for node, share in zip(reply.key_share_ids, reply.key_shares, strict=True):
                key_shares.setdefault(node, {})[holder] = share
        masked_with = {u: set(state.masked_peers[u]) for u in survivors}
        dropped = sorted({v for u in survivors for v in masked_with[u]} - survivors)
        short = sorted(n for n in survivors if len(seed_shares[n]) < t)
        short += sorted(n for n in dropped if len(key_shares.get(n, {})) < t)
        if short:
            raise self._abort(
                f"fewer than threshold = {t} shares arrived for the secrets of clients {short}; "
                "too many clients dropped during unmasking."
            )
        culprits: dict[int, list[str]] = {}
        seeds: dict[int, bytes] = {}
        for node in sorted(survivors):
            commitment = state.seed_commitments[node]

            def seed_matches(seed: bytes, node: int = node, commitment: bytes = commitment) -> bool:
                return (
                    primitives.seed_commitment(
                        seed, run_id=self.run_id, round_=self.server_round, node_id=node
                    )
                    == commitment
                )

            seeds[node], bad = self._rebuild(
                "self-mask seed", node, seed_shares[node], seed_matches
            )
            for holder in bad:
                culprits.setdefault(holder, []).append(f"node {node}'s self-mask seed")
        private_keys = {}
        for node in dropped:
            public = state.mask_public_keys[node]

            def key_matches(raw: bytes, public: bytes = public) -> bool:
                return primitives.public_bytes(primitives.load_private_key(raw)) == public

            raw, bad = self._rebuild("mask key", node, key_shares[node], key_matches)
            private_keys[node] = primitives.load_private_key(raw)
            for holder in bad:
                culprits.setdefault(holder, []).append(f"node {node}'s mask key")
        for holder, what in sorted(culprits.items()):
            state.dropout_reasons[holder] = (
                f"unmask: sent shares of {', '.join(what)} inconsistent with the other holders' "
                "(excluded; its own input, already masked, stays in the sum)"
            )
        total = state.masked_sum
        if total is None:
            raise self._abort("no masked sum.")
        keys = [(seed, -1) for seed in seeds.values()]
        for node, key in private_keys.items():
            for peer in sorted(u for u in survivors if node in masked_with[u]):
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
        state.measurements["n_inconsistent_share_holders"] = len(culprits)
        state.masked_sum = None
        state.phase = ServerPhase.FINISHED
        return SecAggResult(
            total=total,
            contributors=tuple(sorted(survivors)),
            measurements=dict(state.measurements),
            dropout_reasons=dict(state.dropout_reasons),
        )
