"""An in-process SecAgg+ round: client and server sessions wired together, no network.

For tests, simulations and benchmarks. Every message goes through ``to_record`` /
``from_record`` as it would through a transport. A client that raises a SecAggError is
treated as dropped from then on (as a server adapter would treat an error reply); so is one
that refuses its input (TypeError/ValueError: wrong dtype or length, NaN/Inf).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

import numpy as np
from numpy.typing import NDArray

from aggregation.secagg.client import ClientSession
from aggregation.secagg.errors import SecAggError
from aggregation.secagg.messages import MaskedInputRequest, SecAggMessage, Stage
from aggregation.secagg.params import SecAggParams
from aggregation.secagg.quantization import dequantize_sum
from aggregation.secagg.server import MessageHook, SecAggResult, ServerSession

M = TypeVar("M", bound=SecAggMessage)


@dataclass(frozen=True, kw_only=True, eq=False)
class RoundOutcome:
    """The server's result plus what happened to each client in the driver."""

    result: SecAggResult
    client_errors: dict[int, Exception]

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
) -> RoundOutcome:
    """Run one round for the clients in ``inputs`` (node id -> float32 update, or an already
    quantized uint32 vector).

    ``dropouts[node] = stage`` makes ``node`` silent from that stage's request on (ADVERTISE_KEYS:
    never answers; SHARE_KEYS: dropped after advertising; MASKED_INPUT: after sharing keys;
    UNMASK: after sending its masked input). ``on_message`` sees every message the server
    handles; ``tamper`` may rewrite any request before a client sees it. ``rng`` drives the
    graph labelling and the stochastic rounding, never keys or masks. Raises
    SecAggAbortedError when the round cannot finish.
    """
    drops = dict(dropouts or {})
    unknown = sorted(set(drops) - set(inputs))
    if unknown:
        raise ValueError(f"`dropouts` names nodes {unknown} that have no input.")
    node_ids: Sequence[int] = sorted(inputs)
    server = ServerSession(
        params,
        run_id=run_id,
        server_round=server_round,
        node_ids=node_ids,
        rng=rng,
        on_message=on_message,
    )
    clients = {node: ClientSession(node) for node in node_ids}
    errors: dict[int, Exception] = {}
    rounding = dict(zip(node_ids, rng.spawn(len(node_ids)), strict=True))

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
                return client.masked_input(request, update, rounding[node])
            return client.handle(request)
        except (SecAggError, TypeError, ValueError) as error:
            errors[node] = error
            return None

    stages: list[tuple[Stage, Callable[[], Mapping[int, SecAggMessage]]]] = [
        (Stage.ADVERTISE_KEYS, server.advertise_keys),
        (Stage.SHARE_KEYS, server.share_keys),
        (Stage.MASKED_INPUT, server.masked_input),
        (Stage.UNMASK, server.unmask),
    ]
    for stage, open_stage in stages:
        requests = open_stage()
        for node, request in requests.items():
            if node in errors or _dropped(drops.get(node), stage):
                continue
            reply = answer(node, request)
            if reply is not None:
                server.receive(_transport(reply))
    return RoundOutcome(result=server.result(), client_errors=errors)


_ORDER = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)


def _dropped(drop_stage: Stage | None, stage: Stage) -> bool:
    return drop_stage is not None and _ORDER.index(stage) >= _ORDER.index(drop_stage)
