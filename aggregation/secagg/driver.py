"""An in-process SecAgg+ round: client and server sessions wired together, no network.

For tests, simulations and benchmarks. Every message goes through ``to_record`` /
``from_record`` as it would through a transport, and the driver behaves like a server adapter:
a reply that does not parse, names another node or that the server refuses
(:meth:`ServerSession.receive_record`) is reported with :meth:`ServerSession.reject` (the client
is a dropout with that reason). A
client that raises a SecAggError is treated as dropped from then on; so is one that refuses
its input (TypeError/ValueError: wrong dtype or length, NaN/Inf).

With ``identities`` the round is authenticated (roster, signatures, consistency check: five
stages); without, it is the semi-honest legacy protocol (four stages).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from aggregation.secagg.client import ClientSession
from aggregation.secagg.errors import SecAggError
from aggregation.secagg.identity import NodeIdentity, Roster
from aggregation.secagg.messages import MaskedInputRequest, Record, SecAggMessage, Stage
from aggregation.secagg.params import SecAggParams
from aggregation.secagg.policy import SecAggPolicy
from aggregation.secagg.quantization import dequantize_sum
from aggregation.secagg.server import MessageHook, SecAggResult, ServerSession

M = TypeVar("M", bound=SecAggMessage)
ReplyTamper = Callable[[int, Record], Mapping[str, object]]


@dataclass(frozen=True, kw_only=True, eq=False)
class RoundOutcome:
    """The server's result plus what happened to each client in the driver.

    ``client_errors``: the error each client raised (it refused a request or its input).
    ``dropout_reasons``: the server's record of why each node left the round.
    """

    result: SecAggResult
    client_errors: dict[int, Exception]
    dropout_reasons: dict[int, str]

    def dequantized_sum(self, params: SecAggParams) -> NDArray[np.float64]:
        """The sum of the contributors' (clipped) float updates."""
        return dequantize_sum(
            self.result.total, num_summands=len(self.result.contributors), params=params
        )


def _transport(message: M) -> M:
    return type(message).from_record(message.to_record())


def run_secagg_round(
    params: SecAggParams,
    inputs: Mapping[int, NDArray[np.float32] | NDArray[np.uint32]],
    *,
    rng: np.random.Generator,
    run_id: int = 0,
    server_round: int = 1,
    dropouts: Mapping[int, Stage] | None = None,
    on_message: MessageHook | None = None,
    tamper: Callable[[SecAggMessage], SecAggMessage] | None = None,
    tamper_reply: ReplyTamper | None = None,
    identities: Iterable[NodeIdentity] | None = None,
    policy: SecAggPolicy | None = None,
    keep_masked_inputs: bool = True,
    context: bytes = b"",
) -> RoundOutcome:
    """Run one round for the clients in ``inputs`` (node id -> float32 update, or an already
    quantized uint32 vector).

    ``dropouts[node] = stage`` makes ``node`` silent from that stage's request on (ADVERTISE_KEYS:
    never answers; SHARE_KEYS: dropped after advertising; MASKED_INPUT: after sharing keys;
    CONSISTENCY_CHECK: after sending its masked input; UNMASK: after signing the survivor set,
    or after its masked input in a legacy round). ``on_message`` sees every message the server
    handles; ``tamper`` may rewrite any request before a client sees it (a malicious server);
    ``tamper_reply(node, record)`` may rewrite any reply record before the server parses it (a
    malicious client). ``identities`` (one per input, ``inputs`` keyed by their node ids)
    makes the round authenticated; ``policy`` is every client's policy (default
    ``SecAggPolicy()``); ``keep_masked_inputs`` goes to the ServerSession; ``context`` is the
    session context of the server and every client (e.g. a signed job's id). ``rng`` drives the
    graph labelling only; stochastic rounding uses each client's CSPRNG. Raises
    SecAggAbortedError when the round cannot finish.
    """
    drops = dict(dropouts or {})
    unknown = sorted(set(drops) - set(inputs))
    if unknown:
        raise ValueError(f"`dropouts` names nodes {unknown} that have no input.")
    node_ids: Sequence[int] = sorted(inputs)
    roster: Roster | None = None
    clients: dict[int, ClientSession]
    if identities is not None:
        by_id = {identity.node_id: identity for identity in identities}
        if set(by_id) != set(inputs):
            raise ValueError(
                "`inputs` must be keyed by the node ids of `identities` "
                "(identity.node_id, derived from each identity key)."
            )
        roster = Roster.from_public_keys(i.public_key for i in by_id.values())
        clients = {
            node: ClientSession(identity=by_id[node], roster=roster, policy=policy, context=context)
            for node in node_ids
        }
    else:
        clients = {node: ClientSession(node, policy=policy, context=context) for node in node_ids}
    server = ServerSession(
        params,
        run_id=run_id,
        server_round=server_round,
        node_ids=node_ids,
        rng=rng,
        on_message=on_message,
        roster=roster,
        keep_masked_inputs=keep_masked_inputs,
        context=context,
    )
    errors: dict[int, Exception] = {}

    def answer(node: int, request: SecAggMessage) -> SecAggMessage | None:
        if tamper is not None:
            request = tamper(request)
        request = _transport(request)
        client = clients[node]
        try:
            if isinstance(request, MaskedInputRequest):
                value = inputs[node]
                if value.dtype == np.uint32:
                    return client.masked_input_quantized(request, value.astype(np.uint32))
                update = cast("NDArray[np.float32]", value)  # the client checks the dtype
                return client.masked_input(request, update)
            return client.handle(request)
        except (SecAggError, TypeError, ValueError) as error:
            errors[node] = error
            return None

    def deliver(node: int, reply: SecAggMessage) -> None:
        record: Mapping[str, object] = reply.to_record()
        if tamper_reply is not None:
            record = tamper_reply(node, reply.to_record())
        try:
            server.receive_record(node, record)
        except SecAggError as error:
            server.reject(node, str(error))

    for stage, open_stage in server.stages():
        requests = open_stage()
        for node, request in requests.items():
            if node in errors or _dropped(drops.get(node), stage):
                continue
            reply = answer(node, request)
            if reply is not None:
                deliver(node, reply)
    result = server.result()
    return RoundOutcome(
        result=result, client_errors=errors, dropout_reasons=dict(result.dropout_reasons)
    )


_ORDER = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY_CHECK,
    Stage.UNMASK,
)


def _dropped(drop_stage: Stage | None, stage: Stage) -> bool:
    return drop_stage is not None and _ORDER.index(stage) >= _ORDER.index(drop_stage)
