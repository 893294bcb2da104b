"""Shared test fixtures: an authenticated federation driven stage by stage."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from aggregation.secagg import (
    ClientSession,
    MaskedInputRequest,
    NodeIdentity,
    Roster,
    SecAggMessage,
    SecAggParams,
    SecAggPolicy,
    ServerSession,
    Stage,
)

PARAMS = SecAggParams(
    num_clients=6, num_neighbours=4, threshold=3, vector_length=8, clipping_range=1.0
)


def identities(n: int) -> list[NodeIdentity]:
    """``n`` fresh identities, sorted by node id."""
    return sorted((NodeIdentity.generate() for _ in range(n)), key=lambda i: i.node_id)


def uint_inputs(nodes: Iterable[int], length: int, seed: int = 0) -> dict[int, NDArray[np.uint32]]:
    rng = np.random.default_rng(seed)
    return {n: rng.integers(0, 2**32, length, dtype=np.uint32) for n in sorted(nodes)}


def plain_sum(inputs: Mapping[int, NDArray[np.uint32]], nodes: Iterable[int]) -> NDArray[np.uint32]:
    total = np.zeros(next(iter(inputs.values())).shape, dtype=np.uint32)
    for node in nodes:
        total += inputs[node]
    return total


@dataclass
class Federation:
    """An authenticated round: roster, server session and one client session per node."""

    params: SecAggParams
    ids: dict[int, NodeIdentity]
    roster: Roster
    server: ServerSession
    clients: dict[int, ClientSession]
    inputs: dict[int, NDArray[np.uint32]]
    requests: dict[Stage, dict[int, SecAggMessage]] = field(default_factory=dict)

    @property
    def nodes(self) -> list[int]:
        return sorted(self.ids)

    def answer(self, node: int, request: SecAggMessage) -> SecAggMessage:
        client = self.clients[node]
        if isinstance(request, MaskedInputRequest):
            return client.masked_input_quantized(request, self.inputs[node])
        return client.handle(request)

    def run(
        self,
        until: Stage | None = None,
        *,
        reply_hook: Callable[[Stage, int, SecAggMessage], SecAggMessage | None] | None = None,
    ) -> dict[int, SecAggMessage]:
        """Open and answer every stage before ``until``; open ``until`` and return its requests
        (``until=None``: run every stage and return {}). ``reply_hook(stage, node, reply)`` may
        replace a reply (None: the node stays silent)."""
        for stage, opener in self.server.stages():
            if stage in self.requests:
                continue
            requests = dict(opener())
            self.requests[stage] = requests
            if stage == until:
                return requests
            for node, request in requests.items():
                reply: SecAggMessage | None = self.answer(node, request)
                if reply_hook is not None and reply is not None:
                    reply = reply_hook(stage, node, reply)
                if reply is not None:
                    self.server.receive(reply)
        return {}


def federation(
    params: SecAggParams = PARAMS,
    *,
    run_id: int = 1,
    server_round: int = 1,
    seed: int = 0,
    policy: SecAggPolicy | None = None,
    people: list[NodeIdentity] | None = None,
    keep_masked_inputs: bool = True,
    context: bytes = b"",
) -> Federation:
    ids = {i.node_id: i for i in (people or identities(params.num_clients))}
    roster = Roster.from_public_keys(i.public_key for i in ids.values())
    server = ServerSession(
        params,
        run_id=run_id,
        server_round=server_round,
        node_ids=sorted(ids),
        rng=np.random.default_rng(seed),
        roster=roster,
        keep_masked_inputs=keep_masked_inputs,
        context=context,
    )
    clients = {
        n: ClientSession(identity=i, roster=roster, policy=policy, context=context)
        for n, i in ids.items()
    }
    return Federation(
        params=params,
        ids=ids,
        roster=roster,
        server=server,
        clients=clients,
        inputs=uint_inputs(ids, params.vector_length, seed),
    )


def freeze(value: Any) -> Any:
    """A comparable snapshot of a (nested) state value: arrays by bytes, sets sorted."""
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, dict):
        return tuple(sorted((repr(k), freeze(v)) for k, v in value.items()))
    if isinstance(value, set | frozenset):
        return tuple(sorted(map(repr, value)))
    if isinstance(value, list | tuple):
        return tuple(freeze(v) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return (type(value).__name__, freeze(vars(value)))
    return repr(value)
