"""The client side of SecAgg+ (Bell et al., CCS 2020; Bonawitz et al., CCS 2017).

A :class:`ClientSession` is a state machine with one method per stage: advertise keys -> share
keys -> masked input -> consistency check -> unmask. Each takes the server's request and
returns the reply; a refused request raises and reveals nothing, and the session's state is
unchanged by any rejected request.

Threat model (authenticated mode: constructed with ``identity`` and ``roster``): the server is
malicious -- it may drop, replay, reorder and rewrite messages, choose the round's parameters
and the masking graph, and collude with clients. The node protects itself:

- it joins only rounds that meet its own :class:`SecAggPolicy` (group size, neighbours,
  threshold with 2t > holders + c) and, with a :class:`ParticipationLog`, only newer rounds;
- it signs its keys, its self-mask seed commitment, the round's parameters and the session
  ``context`` (fedbrain: the signed job's id) with its identity key, and derives nothing from a
  peer's keys before their signature verifies under the roster for the same context (no key
  substitution, no invented members, no split parameters, no peers working for another job);
- it refuses malformed, non-canonical and small-order X25519 keys;
- a peer whose encrypted share it cannot open is left out (as if its share never arrived) and
  named in the reply, as long as the threshold still holds;
- it signs the survivor set once (consistency check) and reveals shares only for exactly that
  set, after t valid signatures on it from its neighbourhood; it never reveals both the
  self-mask seed share and the mask-key share of one peer.

What it cannot protect: the masked input carries no range proof (a malicious client can add
any vector mod 2^32 to the sum); the server chooses the graph (``max_corrupt_neighbours`` in
the policy is the operator's assumption about how many of a node's neighbours collude); traffic
analysis; a compromised node's own data.

Unauthenticated mode (``ClientSession(node_id)``, no identity or roster) is the semi-honest
protocol of the previous version, kept only so that adapters that do not yet pass an identity
keep working: it has no signatures and no consistency check and is NOT secure against a
malicious server. The node chooses the mode; no request can switch an authenticated session to
it.
"""

from __future__ import annotations

import hmac
import itertools
import os
from collections.abc import Mapping
from typing import NoReturn

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from numpy.typing import NDArray

from aggregation.secagg import primitives, shamir
from aggregation.secagg.client_state import ClientPhase as ClientPhase
from aggregation.secagg.client_state import ClientState as ClientState
from aggregation.secagg.client_state import session_from_record, state_record
from aggregation.secagg.errors import (
    SecAggAuthenticationError,
    SecAggDecryptionError,
    SecAggProtocolError,
    SecAggRefusedError,
)
from aggregation.secagg.identity import (
    NodeIdentity,
    Roster,
    advertise_statement,
    check_context,
    survivors_statement,
)
from aggregation.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    ConsistencyCheckReply,
    ConsistencyCheckRequest,
    MaskedInputReply,
    MaskedInputRequest,
    SecAggMessage,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from aggregation.secagg.params import SecAggParams
from aggregation.secagg.policy import ParticipationLog, SecAggPolicy
from aggregation.secagg.quantization import check_update, quantize


class ClientSession:
    """One client's side of one SecAgg+ round.

    Args:
        node_id: the node's SecAgg+ id; derived from ``identity`` when one is given (pass it
            or leave it out; a mismatch is a ValueError).
        identity: the node's long-term Ed25519 identity key (authenticated mode).
        roster: node id -> identity public key of every federation member, as signed by the
            operator (authenticated mode; required with ``identity``).
        policy: the node's minimums (default ``SecAggPolicy()``), enforced in both modes.
        participation: optional log of the rounds taken part in; advertise-keys requests of
            an older or the same round are refused, and accepted ones are recorded in it.
        context: what the node binds the session to besides run and round (at most 1 KiB),
            inside every statement it signs or verifies (authenticated mode): peers holding
            another context are refused. fedbrain passes the signed job's id, so every honest
            node of a session verifiably works for the same job.
    """

    def __init__(
        self,
        node_id: int | None = None,
        *,
        identity: NodeIdentity | None = None,
        roster: Roster | None = None,
        policy: SecAggPolicy | None = None,
        participation: ParticipationLog | None = None,
        context: bytes = b"",
    ) -> None:
        check_context(context)
        if (identity is None) != (roster is None):
            raise ValueError(
                "Pass both `identity` and `roster` (authenticated SecAgg+, secure against a "
                "malicious server) or neither (the semi-honest legacy protocol)."
            )
        if identity is not None and roster is not None:
            if node_id is not None and node_id != identity.node_id:
                raise ValueError(
                    f"`node_id` {node_id} is not the id of `identity` ({identity.node_id}); "
                    "ids are derived from identity keys (identity.node_id_for)."
                )
            if roster.get(identity.node_id) != identity.public_key:
                raise ValueError(
                    f"The roster does not list this node's identity key under id "
                    f"{identity.node_id}; use the operator's current roster."
                )
            node_id = identity.node_id
        if node_id is None:
            raise TypeError("`node_id` is required without an identity.")
        if policy is not None and not isinstance(policy, SecAggPolicy):
            raise TypeError(f"`policy` must be a SecAggPolicy. Found {type(policy).__name__}.")
        self.state = ClientState(node_id=node_id, context=context)
        self.identity = identity
        self.roster = roster
        self.policy = policy or SecAggPolicy()
        self.participation = participation

    @property
    def authenticated(self) -> bool:
        """Whether the session runs the malicious-server protocol (signatures, consistency)."""
        return self.identity is not None

    # -- persistence ----------------------------------------------------------------------
    def to_state_record(self) -> dict[str, bytes | int | str | list[int] | list[bytes]]:
        """The session as plain values, for the node's local state between stage messages
        (e.g. Flower's ``Context.state``). It holds this round's secrets: keep it on the node.
        The identity, roster, policy and participation log are not in it; pass them again to
        :meth:`from_state_record`. The session context is in it."""
        return state_record(self)

    @classmethod
    def from_state_record(
        cls,
        record: Mapping[str, object],
        *,
        identity: NodeIdentity | None = None,
        roster: Roster | None = None,
        policy: SecAggPolicy | None = None,
        participation: ParticipationLog | None = None,
        context: bytes | None = None,
    ) -> ClientSession:
        """Inverse of :meth:`to_state_record`; raises SecAggProtocolError if it is malformed
        or was saved by a session of the other mode (authenticated vs unauthenticated), and
        SecAggRefusedError if ``context`` is given and is not the context the session was
        started with (a later stage sent for another job)."""
        session = session_from_record(
            cls,
            record,
            identity=identity,
            roster=roster,
            policy=policy,
            participation=participation,
        )
        if context is not None and not hmac.compare_digest(context, session.state.context):
            raise SecAggRefusedError(
                f"Node {session.state.node_id} refuses a request for another session context "
                f"than the one it advertised keys for ({context[:80]!r} is not "
                f"{session.state.context[:80]!r}): a session works for one job only."
            )
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

    def _roster(self) -> Roster:
        if self.roster is None:
            _unreachable()
        return self.roster

    # -- stage 0 --------------------------------------------------------------------------
    def advertise_keys(self, request: AdvertiseKeysRequest) -> AdvertiseKeysReply:
        """Check the round against the node's policy (and participation log), then create this
        round's two X25519 key pairs and the self-mask seed; publish the keys, the seed
        commitment and (authenticated) the identity signature over them and the parameters."""
        state = self.state
        self._check_header(request, ClientPhase.ADVERTISE_KEYS)
        self.policy.check(
            request.params,
            node_id=state.node_id,
            neighbours=request.neighbours,
            roster=self.roster,
        )
        if self.participation is not None:
            self.participation.admit(request.run_id, request.server_round)
        state.run_id, state.server_round = request.run_id, request.server_round
        state.params = request.params
        state.neighbours = frozenset(request.neighbours)
        state.share_key = primitives.generate_private_key()
        state.mask_key = primitives.generate_private_key()
        state.self_seed = os.urandom(primitives.KEY_SIZE)
        state.phase = ClientPhase.SHARE_KEYS
        share_public = primitives.public_bytes(state.share_key)
        mask_public = primitives.public_bytes(state.mask_key)
        commitment = primitives.seed_commitment(
            state.self_seed, run_id=state.run_id, round_=state.server_round, node_id=state.node_id
        )
        signature = b""
        if self.identity is not None:
            signature = self.identity.sign(
                advertise_statement(
                    run_id=state.run_id,
                    server_round=state.server_round,
                    node_id=state.node_id,
                    params=request.params,
                    share_public_key=share_public,
                    mask_public_key=mask_public,
                    seed_commitment=commitment,
                    context=state.context,
                )
            )
        return AdvertiseKeysReply(
            run_id=state.run_id,
            server_round=state.server_round,
            node_id=state.node_id,
            share_public_key=share_public,
            mask_public_key=mask_public,
            seed_commitment=commitment,
            signature=signature,
        )

    # -- stage 1 --------------------------------------------------------------------------
    def _check_peer_keys(self, request: ShareKeysRequest, params: SecAggParams) -> None:
        """Authenticate every peer's keys (roster signature) and refuse unusable keys, before
        anything is derived from them."""
        state = self.state
        me = state.node_id
        if self.authenticated:
            roster = self._roster()
            if len(request.signatures) != len(request.peer_ids):
                raise SecAggRefusedError(
                    f"Node {me} refuses unsigned peer keys: an authenticated node derives "
                    "nothing from keys without their owner's identity signature."
                )
            for i, peer in enumerate(request.peer_ids):
                statement = advertise_statement(
                    run_id=state.run_id,
                    server_round=state.server_round,
                    node_id=peer,
                    params=params,
                    share_public_key=request.share_public_keys[i],
                    mask_public_key=request.mask_public_keys[i],
                    seed_commitment=request.seed_commitments[i],
                    context=state.context,
                )
                try:
                    roster.verify(peer, request.signatures[i], statement)
                except SecAggAuthenticationError as error:
                    raise SecAggRefusedError(
                        f"Node {me} refuses to share keys: {error} The keys were substituted, "
                        "or signed for other round parameters or another session context "
                        "(another job). Nothing was derived."
                    ) from None
        own = {primitives.public_bytes(k) for k in (state.share_key, state.mask_key) if k}
        for i, peer in enumerate(request.peer_ids):
            for key in (request.share_public_keys[i], request.mask_public_keys[i]):
                try:
                    primitives.check_public_key(key)
                except SecAggAuthenticationError as error:
                    raise SecAggRefusedError(
                        f"Node {me} refuses to share keys: node {peer}'s key is unusable "
                        f"({error}). Nothing was derived."
                    ) from None
                if key in own:
                    raise SecAggRefusedError(
                        f"Node {me} refuses to share keys: node {peer} is given one of "
                        f"node {me}'s own public keys (reflected keys)."
                    )

    def share_keys(self, request: ShareKeysRequest) -> ShareKeysReply:
        """Authenticate the neighbours' keys, then Shamir-share the self-mask seed and the mask
        private key among them and itself, encrypting each neighbour's pair with AES-256-GCM."""
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
        self._check_peer_keys(request, params)
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
                raise SecAggRefusedError(
                    f"Node {me} refuses to share keys: node {peer}'s public key is invalid "
                    f"({error})."
                ) from None
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
        self,
        request: MaskedInputRequest,
        update: NDArray[np.float32],
        rng: np.random.Generator | None = None,
    ) -> MaskedInputReply:
        """Quantize ``update`` (clip, stochastic rounding) and mask it.

        The rounding randomness comes from the node's CSPRNG (``os.urandom``); ``rng`` exists
        for tests only -- an adapter must not pass a generator seeded by the server. Refuses
        NaN/Inf, a wrong dtype or length before anything else happens.
        """
        params = self._check(request, ClientPhase.MASKED_INPUT)
        check_update(update, params, finite=False)  # quantize scans for NaN/Inf in cache
        shares, excluded = self._open_shares(request, params)
        streams = primitives.MaskStreams(self._mask_keys(shares))
        masked = quantize(update, params, rng, on_chunk=streams.add_inplace)
        return self._reply(masked, shares, excluded)

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
        shares, excluded = self._open_shares(request, params)
        masked = np.array(quantized, dtype=np.uint32, copy=True)
        primitives.MaskStreams(self._mask_keys(shares)).add_inplace(masked)
        return self._reply(masked, shares, excluded)

    def _open_shares(
        self, request: MaskedInputRequest, params: SecAggParams
    ) -> tuple[dict[int, tuple[bytes, bytes]], dict[int, str]]:
        """Decrypt the shares addressed to this node. A share that fails authentication or is
        malformed leaves its sender out (``excluded``) instead of failing the request, as long
        as threshold - 1 peers remain. No side effects."""
        state = self.state
        me = state.node_id
        unknown = sorted(set(request.sender_ids) - set(state.peer_share_public_keys))
        if unknown:
            raise SecAggRefusedError(
                f"Node {me} got shares from {unknown}, which are not neighbours it shared keys "
                "with."
            )
        shares: dict[int, tuple[bytes, bytes]] = {}
        excluded: dict[int, str] = {}
        size = shamir.SHARE_SIZE
        for sender, ciphertext in zip(request.sender_ids, request.ciphertexts, strict=True):
            key = state.share_encryption_keys[sender]
            ad = primitives.share_associated_data(
                run_id=state.run_id, round_=state.server_round, sender=sender, receiver=me
            )
            try:
                plaintext = primitives.decrypt_share(key, ciphertext, ad)
            except SecAggDecryptionError as error:
                excluded[sender] = str(error)
                continue
            pair = (plaintext[:size], plaintext[size:])
            if len(plaintext) != 2 * size or any(
                int.from_bytes(s, "big") >= shamir.PRIME for s in pair
            ):
                excluded[sender] = "the decrypted share pair is not two field elements"
                continue
            shares[sender] = pair
        if len(shares) + 1 < params.threshold:
            left_out = f" ({sorted(excluded)} left out: unreadable shares)" if excluded else ""
            raise SecAggRefusedError(
                f"Node {me} has {len(shares)} neighbours with shares left{left_out}; it needs at"
                f" least threshold - 1 = {params.threshold - 1}."
            )
        return shares, excluded

    def _mask_keys(self, shares: dict[int, tuple[bytes, bytes]]) -> list[tuple[bytes, int]]:
        """The self-mask seed (+1) and one pairwise key per peer whose shares it opened."""
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
        self,
        vector: NDArray[np.uint32],
        shares: dict[int, tuple[bytes, bytes]],
        excluded: dict[int, str],
    ) -> MaskedInputReply:
        state = self.state
        me = state.node_id
        state.seed_shares = {peer: pair[0] for peer, pair in shares.items()}
        state.key_shares = {peer: pair[1] for peer, pair in shares.items()}
        state.excluded = dict(excluded)
        state.phase = ClientPhase.CONSISTENCY_CHECK if self.authenticated else ClientPhase.UNMASK
        return MaskedInputReply(
            run_id=state.run_id,
            server_round=state.server_round,
            node_id=me,
            masked_input=vector,
            peer_ids=tuple(sorted(shares)),
        )

    # -- stage 3 --------------------------------------------------------------------------
    def consistency_check(self, request: ConsistencyCheckRequest) -> ConsistencyCheckReply:
        """Sign the survivor set the server claims, once (authenticated mode only).

        Refused (nothing signed) when the node itself is not in the set, the set names nodes
        outside the roster, it has fewer than the policy's ``min_clients`` members, or fewer
        than ``threshold`` of them are in the node's neighbourhood (itself included).
        """
        params = self._check(request, ClientPhase.CONSISTENCY_CHECK)
        state = self.state
        me = state.node_id
        roster = self._roster()
        survivors = set(request.survivor_ids)
        problems: list[str] = []
        if me not in survivors:
            problems.append("it is not in the set, yet its masked input was sent")
        strangers = sorted(survivors - set(roster))
        if strangers:
            problems.append(f"{strangers} are not in the roster")
        if len(survivors) < self.policy.min_clients:
            problems.append(
                f"{len(survivors)} survivors is below the node's minimum group size "
                f"{self.policy.min_clients}"
            )
        near = (survivors & set(state.seed_shares)) | {me}
        if len(near) < params.threshold:
            problems.append(
                f"only {len(near)} survivors in its neighbourhood, fewer than threshold = "
                f"{params.threshold}"
            )
        if problems:
            raise SecAggRefusedError(
                f"Node {me} refuses to sign the survivor set: " + "; ".join(problems) + "."
            )
        if self.identity is None:
            _unreachable()
        signature = self.identity.sign(
            survivors_statement(
                run_id=state.run_id,
                server_round=state.server_round,
                survivor_ids=request.survivor_ids,
                context=state.context,
            )
        )
        state.survivor_ids = request.survivor_ids
        state.survivor_signature = signature
        state.phase = ClientPhase.UNMASK
        return ConsistencyCheckReply(
            run_id=state.run_id, server_round=state.server_round, node_id=me, signature=signature
        )

    # -- stage 4 --------------------------------------------------------------------------
    def _check_unmask_authenticated(self, request: UnmaskRequest, params: SecAggParams) -> None:
        state = self.state
        me = state.node_id
        roster = self._roster()
        survivors = set(state.survivor_ids)
        held = set(state.seed_shares)
        surviving = tuple(sorted((survivors & held) | {me}))
        dropped = tuple(sorted(held - survivors))
        if request.surviving_ids != surviving or request.dropped_ids != dropped:
            raise SecAggRefusedError(
                f"Node {me} refuses to unmask: the request's surviving/dropped lists do not "
                f"match the survivor set it signed (expected surviving {list(surviving)}, "
                f"dropped {list(dropped)}). Nothing was revealed."
            )
        neighbourhood = (state.neighbours | {me}) & survivors
        outsiders = sorted(set(request.signer_ids) - neighbourhood)
        if outsiders:
            raise SecAggRefusedError(
                f"Node {me} refuses to unmask: signatures from {outsiders}, which are not "
                "survivors in its neighbourhood. Nothing was revealed."
            )
        if len(request.signer_ids) < params.threshold:
            raise SecAggRefusedError(
                f"Node {me} refuses to unmask: {len(request.signer_ids)} consistency "
                f"signatures on its survivor set, fewer than threshold = {params.threshold}. "
                "Nothing was revealed."
            )
        statement = survivors_statement(
            run_id=state.run_id,
            server_round=state.server_round,
            survivor_ids=state.survivor_ids,
            context=state.context,
        )
        # t valid signatures are what it needs: it checks them in order and stops there (an
        # invalid one met on the way is the server's forgery: refuse)
        pairs = sorted(
            zip(request.signer_ids, request.signatures, strict=True), key=lambda p: p[0] != me
        )  # its own first: recognised without a verification
        for signer, signature in itertools.islice(pairs, params.threshold):
            if signer == me and hmac.compare_digest(signature, state.survivor_signature):
                continue  # its own signature (Ed25519 is deterministic): nothing to verify
            try:
                roster.verify(signer, signature, statement)
            except SecAggAuthenticationError as error:
                raise SecAggRefusedError(
                    f"Node {me} refuses to unmask: {error} It is not a signature on the "
                    "survivor set this node signed. Nothing was revealed."
                ) from None

    def _check_unmask_unauthenticated(self, request: UnmaskRequest, params: SecAggParams) -> None:
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

    def unmask(self, request: UnmaskRequest) -> UnmaskReply:
        """Reveal self-mask seed shares of surviving peers and mask-key shares of dropped ones.

        Authenticated: only when the lists are exactly those implied by the survivor set it
        signed, and the request carries at least ``threshold`` valid signatures on that set from
        survivors in its neighbourhood. Unauthenticated: refused when a node is listed as both
        surviving and dropped, a listed node is not a neighbour it holds shares of, the client
        itself is not listed as surviving, or fewer than ``threshold`` survivors are listed.
        A refusal raises SecAggRefusedError and reveals nothing.
        """
        params = self._check(request, ClientPhase.UNMASK)
        if self.authenticated:
            self._check_unmask_authenticated(request, params)
        else:
            self._check_unmask_unauthenticated(request, params)
        state = self.state
        me = state.node_id
        seed_ids = tuple(sorted(request.surviving_ids))
        key_ids = tuple(sorted(request.dropped_ids))
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
        """Dispatch ``request`` to the method of its stage (for adapters). The masked-input
        stage needs ``update``; ``rng`` is for tests only (see :meth:`masked_input`)."""
        if isinstance(request, AdvertiseKeysRequest):
            return self.advertise_keys(request)
        if isinstance(request, ShareKeysRequest):
            return self.share_keys(request)
        if isinstance(request, MaskedInputRequest):
            if update is None:
                raise ValueError("The masked-input stage needs the update.")
            return self.masked_input(request, update, rng)
        if isinstance(request, ConsistencyCheckRequest):
            return self.consistency_check(request)
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


def _unreachable() -> NoReturn:
    raise SecAggProtocolError("The client session is in an inconsistent state.")
