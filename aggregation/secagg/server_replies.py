"""The receiving half of the SecAgg+ server session (see :mod:`aggregation.secagg.server`):
:meth:`ServerReplies.receive` validates and stores each client reply, refusing a malformed one
with a :class:`SecAggProtocolError` naming the node and the reason (the state unchanged), and
:meth:`ServerReplies.reject` records a node's dropout from the current stage.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from aggregation.secagg import primitives, shamir
from aggregation.secagg.errors import SecAggAuthenticationError, SecAggProtocolError
from aggregation.secagg.identity import Roster, advertise_statement, survivors_statement
from aggregation.secagg.messages import (
    AdvertiseKeysReply,
    ConsistencyCheckReply,
    Kind,
    MaskedInputReply,
    SecAggMessage,
    ShareKeysReply,
    Stage,
    UnmaskReply,
    message_from_record,
)
from aggregation.secagg.params import SecAggParams
from aggregation.secagg.server_state import MessageHook, ServerPhase, ServerState

__all__ = ["ServerReplies"]


class ServerReplies:
    """The reply side of :class:`~aggregation.secagg.server.ServerSession` (its base class):
    validating, storing and rejecting client replies. The session sets these attributes."""

    params: SecAggParams
    run_id: int
    server_round: int
    roster: Roster | None
    context: bytes
    keep_masked_inputs: bool
    state: ServerState
    _on_message: MessageHook | None

    def _emit(self, message: SecAggMessage) -> None:
        if self._on_message is not None:
            self._on_message(message)

    # -- replies --------------------------------------------------------------------------
    def reject(self, node: int, reason: str) -> None:
        """Record that ``node`` dropped out of the current stage because of ``reason`` (an
        error reply, a reply :meth:`receive` refused, a timeout). Its later replies in this
        stage are refused; the reason is kept in ``state.dropout_reasons``."""
        state = self.state
        if state.phase not in _COLLECTING:
            raise SecAggProtocolError(f"No stage is collecting replies (phase {state.phase}).")
        stage = Stage(str(state.phase))
        if node not in state.expected:
            raise SecAggProtocolError(f"Node {node} was not asked in the {stage} stage.")
        if self._answered(node):
            raise SecAggProtocolError(
                f"Node {node}'s {stage} reply was already accepted; it cannot be rejected now."
            )
        state.rejected.add(node)
        state.dropout_reasons[node] = f"{stage}: {reason}"

    def _answered(self, node: int) -> bool:
        state = self.state
        collected: dict[ServerPhase, object] = {
            ServerPhase.ADVERTISE_KEYS: state.share_public_keys,
            ServerPhase.SHARE_KEYS: state.ciphertexts,
            ServerPhase.MASKED_INPUT: state.masked_inputs,
            ServerPhase.CONSISTENCY_CHECK: state.consistency_signatures,
            ServerPhase.UNMASK: state.unmask_replies,
        }
        seen = collected.get(state.phase)
        return isinstance(seen, dict) and node in seen

    def receive_record(self, sender: int, record: Mapping[str, object]) -> None:
        """Parse a reply record that arrived from ``sender`` (the transport's node id) and
        :meth:`receive` it. Every failure -- unparsable record, a reply naming another node, a
        refused reply -- raises SecAggProtocolError naming ``sender`` and the reason; call
        :meth:`reject` with it."""
        try:
            message = message_from_record(record)
        except (TypeError, ValueError) as error:  # SecAggProtocolError is a ValueError
            raise SecAggProtocolError(f"Node {sender}'s reply rejected: {error}") from None
        if message.node_id != sender:
            raise SecAggProtocolError(
                f"Node {sender}'s reply rejected: it names node {message.node_id}, not its sender."
            )
        self.receive(message)

    def receive(self, reply: SecAggMessage) -> None:
        """Validate and store one client reply.

        Raises SecAggProtocolError (the reply is discarded, the state unchanged) naming the node
        and the reason: a reply of another run, round or stage, from a node not asked in this
        stage or already rejected, a duplicate, or a malformed or unauthenticated body. The
        adapter then treats the sender as dropped (:meth:`reject`).
        """
        self._emit(reply)
        state = self.state
        if reply.KIND != Kind.REPLY:
            raise SecAggProtocolError("The server only receives replies.")
        node = reply.node_id
        if reply.run_id != self.run_id or reply.server_round != self.server_round:
            raise SecAggProtocolError(
                f"Node {node}: reply for run {reply.run_id} round {reply.server_round}; this "
                f"session is run {self.run_id} round {self.server_round}. Discard stale messages."
            )
        if state.phase not in _COLLECTING or str(state.phase) != str(reply.stage):
            raise SecAggProtocolError(
                f"Node {node}: a {reply.stage} reply arrived while the server is in phase "
                f"{state.phase}."
            )
        if node not in state.expected or node in state.rejected:
            raise SecAggProtocolError(
                f"Node {node} was not asked in the {reply.stage} stage (unknown or dropped)."
            )
        if self._answered(node):
            raise SecAggProtocolError(f"Duplicate {reply.stage} reply from node {node}; discarded.")
        if isinstance(reply, AdvertiseKeysReply):
            self._receive_keys(reply)
        elif isinstance(reply, ShareKeysReply):
            self._receive_shares(reply)
        elif isinstance(reply, MaskedInputReply):
            self._receive_masked_input(reply)
        elif isinstance(reply, ConsistencyCheckReply):
            self._receive_signature(reply)
        elif isinstance(reply, UnmaskReply):
            self._receive_unmask(reply)
        else:
            raise SecAggProtocolError(f"Unexpected message type {type(reply).__name__}.")

    def _refuse(self, reply: SecAggMessage, reason: str) -> SecAggProtocolError:
        return SecAggProtocolError(f"Node {reply.node_id}'s {reply.stage} reply rejected: {reason}")

    def _receive_keys(self, reply: AdvertiseKeysReply) -> None:
        state = self.state
        for name, key in (("share", reply.share_public_key), ("mask", reply.mask_public_key)):
            try:
                primitives.check_public_key(key)
            except SecAggAuthenticationError as error:
                raise self._refuse(reply, f"its {name} public key is unusable: {error}") from None
        if reply.share_public_key == reply.mask_public_key:
            raise self._refuse(reply, "a client's two public keys must differ.")
        known = set(state.share_public_keys.values()) | set(state.mask_public_keys.values())
        if reply.share_public_key in known or reply.mask_public_key in known:
            raise self._refuse(
                reply, "it advertised a public key another node already uses (replayed keys)."
            )
        if self.roster is not None:
            statement = advertise_statement(
                run_id=self.run_id,
                server_round=self.server_round,
                node_id=reply.node_id,
                params=self.params,
                share_public_key=reply.share_public_key,
                mask_public_key=reply.mask_public_key,
                seed_commitment=reply.seed_commitment,
                context=self.context,
            )
            try:
                self.roster.verify(reply.node_id, reply.signature, statement)
            except SecAggAuthenticationError as error:
                raise self._refuse(reply, f"bad identity signature: {error}") from None
        state.share_public_keys[reply.node_id] = reply.share_public_key
        state.mask_public_keys[reply.node_id] = reply.mask_public_key
        state.seed_commitments[reply.node_id] = reply.seed_commitment
        state.key_signatures[reply.node_id] = reply.signature

    def _receive_shares(self, reply: ShareKeysReply) -> None:
        state = self.state
        if reply.receiver_ids != state.peers[reply.node_id]:
            raise self._refuse(
                reply,
                f"it must send one share to each of {list(state.peers[reply.node_id])}; found "
                f"shares for {list(reply.receiver_ids)}.",
            )
        state.ciphertexts[reply.node_id] = dict(
            zip(reply.receiver_ids, reply.ciphertexts, strict=True)
        )

    def _receive_masked_input(self, reply: MaskedInputReply) -> None:
        state = self.state
        node = reply.node_id
        if reply.masked_input.shape != (self.params.vector_length,):
            raise self._refuse(
                reply,
                f"{reply.masked_input.shape[0]} values; the round expects `vector_length` = "
                f"{self.params.vector_length}.",
            )
        strangers = sorted(set(reply.peer_ids) - set(state.senders[node]))
        if strangers:
            raise self._refuse(reply, f"it claims to have masked with non-senders {strangers}.")
        if len(reply.peer_ids) + 1 < self.params.threshold:
            raise self._refuse(
                reply,
                f"it masked with {len(reply.peer_ids)} peers; at least threshold - 1 = "
                f"{self.params.threshold - 1} are needed.",
            )
        if state.masked_sum is None:
            raise self._refuse(reply, "no masked sum is being collected.")
        np.add(state.masked_sum, reply.masked_input, out=state.masked_sum)  # while in cache
        # kept in case it must be taken out again
        state.masked_inputs[node] = reply.masked_input if self.keep_masked_inputs else None
        state.masked_peers[node] = reply.peer_ids

    def _receive_signature(self, reply: ConsistencyCheckReply) -> None:
        if self.roster is None:
            raise self._refuse(reply, "unauthenticated rounds have no consistency check.")
        statement = survivors_statement(
            run_id=self.run_id,
            server_round=self.server_round,
            survivor_ids=sorted(self.state.survivors),
            context=self.context,
        )
        try:
            self.roster.verify(reply.node_id, reply.signature, statement)
        except SecAggAuthenticationError as error:
            raise self._refuse(reply, f"bad signature on the survivor set: {error}") from None
        self.state.consistency_signatures[reply.node_id] = reply.signature

    def _receive_unmask(self, reply: UnmaskReply) -> None:
        state = self.state
        request = state.unmask_requests[reply.node_id]
        if (
            reply.seed_share_ids != request.surviving_ids
            or reply.key_share_ids != request.dropped_ids
        ):
            raise self._refuse(reply, "it must answer with exactly the requested shares.")
        for share in (*reply.seed_shares, *reply.key_shares):
            if int.from_bytes(share, "big") >= shamir.PRIME:
                raise self._refuse(reply, "a share is not a field element (>= 2^521 - 1).")
        state.unmask_replies[reply.node_id] = reply


_COLLECTING = frozenset(
    {
        ServerPhase.ADVERTISE_KEYS,
        ServerPhase.SHARE_KEYS,
        ServerPhase.MASKED_INPUT,
        ServerPhase.CONSISTENCY_CHECK,
        ServerPhase.UNMASK,
    }
)
