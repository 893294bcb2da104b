"""The SecAgg+ server session's types: its phase, what it remembers during a round, its result
and the hook that sees its messages (see :mod:`aggregation.secagg.server`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from aggregation.secagg.messages import SecAggMessage, UnmaskReply, UnmaskRequest
from aggregation.types import Measurements

__all__ = ["MessageHook", "SecAggResult", "ServerPhase", "ServerState"]

MessageHook = Callable[[SecAggMessage], None]


class ServerPhase(StrEnum):
    """What the server session is doing."""

    NOT_STARTED = "not_started"
    ADVERTISE_KEYS = "advertise_keys"  # collecting AdvertiseKeysReply
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(frozen=True, kw_only=True, eq=False)
class SecAggResult:
    """The outcome of a round: the uint32 sum (mod 2^32) of exactly ``contributors``' inputs,
    and why each other sampled client (or each client whose shares were excluded) dropped."""

    total: NDArray[np.uint32]
    contributors: tuple[int, ...]
    measurements: Measurements
    dropout_reasons: dict[int, str] = field(default_factory=dict)


@dataclass
class ServerState:
    """Everything the server remembers during one round (no client input, only masked ones).

    ``dropout_reasons`` maps each node that left the round (or whose shares were excluded at
    the end) to why: "<stage>: <reason>".
    """

    phase: ServerPhase = ServerPhase.NOT_STARTED
    graph: dict[int, frozenset[int]] = field(default_factory=dict)
    expected: frozenset[int] = frozenset()  # who was asked in the current stage
    rejected: set[int] = field(default_factory=set)  # reported by the adapter in this stage
    share_public_keys: dict[int, bytes] = field(default_factory=dict)
    mask_public_keys: dict[int, bytes] = field(default_factory=dict)
    seed_commitments: dict[int, bytes] = field(default_factory=dict)
    key_signatures: dict[int, bytes] = field(default_factory=dict)
    keys_core: frozenset[int] = frozenset()  # U1 after pruning
    peers: dict[int, tuple[int, ...]] = field(default_factory=dict)  # peers given in share keys
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender -> receiver
    shared_core: frozenset[int] = frozenset()  # U2 after pruning
    senders: dict[int, tuple[int, ...]] = field(default_factory=dict)  # given in masked input
    masked_inputs: dict[int, NDArray[np.uint32] | None] = field(default_factory=dict)  # to close
    # masked_sum: the running sum of every masked input received, then of the survivors' only
    masked_peers: dict[int, tuple[int, ...]] = field(default_factory=dict)  # who each masked with
    masked_sum: NDArray[np.uint32] | None = None
    arrived: set[int] = field(default_factory=set)  # U3: masked inputs received
    survivors: frozenset[int] = frozenset()  # inputs in the sum (U3 minus evicted)
    consistency_signatures: dict[int, bytes] = field(default_factory=dict)
    unmask_requests: dict[int, UnmaskRequest] = field(default_factory=dict)
    unmask_replies: dict[int, UnmaskReply] = field(default_factory=dict)  # U4
    dropout_reasons: dict[int, str] = field(default_factory=dict)
    measurements: Measurements = field(default_factory=dict)
