"""A message dispatcher for Flower's Simulation Engine whose cost does not grow with the
number of virtual nodes.

Flower 1.42's engine hands messages to its ClientApp workers from one thread
(``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``) that, every 0.1 s, asks
the in-memory LinkState for each of the N registered nodes in turn for one undelivered
message -- and each of those N questions walks the whole message store, checking every stored
message's expiry. A sweep therefore costs N x (stored messages) checks under the state's lock
and the GIL: measured on the 2-core benchmark machine, 0.36 s per sweep with 1,000 nodes and
a round's 100 messages stored, 2.2 s with discovery's 1,000, repeated every 0.1 s while the
messages wait for their replies -- most of a 1,000-node round and nearly all of the time
before round 1 (benchmarks/RESULTS.md, "Scale").

:func:`fast_dispatch` swaps in :func:`dispatch_messages` for the duration of one
``run_simulation``: one walk over the store per sweep, the same rules (a message goes to its
destination node once; at most one message per node per sweep, so a node's messages keep
their order; an expired message or one outside the run's federation is dropped by the state's
own check before it is handed out) and a 5 ms sweep interval instead of 0.1 s. On the
ServerApp's side, :func:`paced_send_and_receive` (what the engine's job grids use) pulls
replies every 10 ms instead of every 0.1 s, slower while a pull is expensive. The
dispatcher reads the ``InMemoryLinkState``'s message store and lock directly, since the
LinkState API has no "undelivered messages for any of these nodes"; with any other state it
falls back to Flower's own loop. flwr is pinned to 1.42.x for this
seam (and the node's SuperExec, :mod:`clients.superexec`); tests run every simulation
through it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Container, Iterable, Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Final

from flwr.app import Message
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkState
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.serverapp import Grid
from flwr.supercore.date import now

__all__ = [
    "MIN_PULL_INTERVAL",
    "PULL_PACE",
    "SWEEP_INTERVAL",
    "dispatch_messages",
    "fast_dispatch",
    "paced_send_and_receive",
    "take_undelivered",
]

SWEEP_INTERVAL: Final = 0.005
"""Seconds between two sweeps of the message store (Flower's own loop: 0.1)."""

MIN_PULL_INTERVAL: Final = 0.01
"""Seconds at least between two pulls of replies (Flower's in-memory Grid: always 0.1)."""

PULL_PACE: Final = 10.0
"""A pull waits this many times as long as the last pull took (at most ~10% of the
ServerApp's time goes to pulling)."""

_FLOWER_DISPATCH: Final = vce_api.add_messages_to_queue
_PATCH_LOCK: Final = threading.Lock()


def take_undelivered(state: InMemoryLinkState, nodes: Container[int]) -> list[Message]:
    """The undelivered messages for ``nodes``, at most one per node (the oldest), marked
    delivered; expired or out-of-federation messages are dropped by the state's own check."""
    with state.lock:
        candidates: dict[int, str] = {}
        for message_id, message in state.message_ins_store.items():
            metadata = message.metadata
            node = metadata.dst_node_id
            if metadata.delivered_at == "" and node in nodes and node not in candidates:
                candidates[node] = message_id
        if not candidates:
            return []
        # The check Flower's get_message_ins runs on each message before handing it out:
        # expired messages and those whose nodes left the run's federation are deleted.
        state._check_stored_messages(set(candidates.values()))
        store = state.message_ins_store
        taken = [store[message_id] for message_id in candidates.values() if message_id in store]
        delivered_at = now().isoformat()
        for message in taken:
            message.metadata.delivered_at = delivered_at
    return taken


def dispatch_messages(
    state: LinkState,
    queue: Queue[Message],
    nodes_mapping: dict[int, int],
    f_stop: threading.Event,
) -> None:
    """Flower's ``add_messages_to_queue`` with one walk over the store per sweep."""
    if not isinstance(state, InMemoryLinkState):
        _FLOWER_DISPATCH(state, queue, nodes_mapping, f_stop)
        return
    while not f_stop.is_set():
        for message in take_undelivered(state, nodes_mapping):
            queue.put(message)
        f_stop.wait(SWEEP_INTERVAL)


def paced_send_and_receive(
    grid: Grid, messages: Iterable[Message], *, timeout: float | None = None
) -> list[Message]:
    """``grid.send_and_receive`` that pulls replies as soon as they come without letting the
    pulls eat the ServerApp's process: the in-memory Grid checks every outstanding message on
    each pull (10 ms for 1,000 outstanding here), so the next pull waits
    :data:`PULL_PACE` times as long as the last one took, at least :data:`MIN_PULL_INTERVAL`
    s (Flower's in-memory Grid: a fixed 0.1 s)."""
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while pending:
        began = time.monotonic()
        pulled = list(grid.pull_messages(pending))
        spent = time.monotonic() - began
        replies.extend(pulled)
        pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
        if not pending:
            break
        pause = max(MIN_PULL_INTERVAL, PULL_PACE * spent)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            pause = min(pause, left)
        time.sleep(pause)
    return replies


@contextmanager
def fast_dispatch() -> Iterator[None]:
    """Run the Simulation Engine started inside this block with :func:`dispatch_messages`
    and batched actor calls (:mod:`simulations.batching`)."""
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from simulations import batching

    with _PATCH_LOCK:
        flower = raybackend.RayBackend
        vce_api.add_messages_to_queue = dispatch_messages
        vce_api.worker = batching.batch_worker
        raybackend.RayBackend = batching.BatchingRayBackend  # type: ignore[misc]
    try:
        yield
    finally:
        with _PATCH_LOCK:
            vce_api.add_messages_to_queue = _FLOWER_DISPATCH
            vce_api.worker = batching.FLOWER_WORKER
            raybackend.RayBackend = flower  # type: ignore[misc]
