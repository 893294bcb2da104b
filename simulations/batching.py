"""Hand a Simulation Engine actor several messages per Ray call.

In Flower 1.42's engine each worker thread sends one message at a time to its Ray actor
(``RayBackend.process_message``: one actor call per message, the reply awaited before the
next). A call costs about 4-5 ms on the 2-core benchmark machine before the ClientApp does
anything -- more than most of fedbrain's SecAgg+ handlers (1-3 ms) -- so a 1,000-node round
was mostly Ray round trips. Here each worker takes the messages waiting in the engine's queue
(up to :data:`MAX_BATCH`, and no more than its share when several workers wait) and sends
them in one call to :class:`BatchActor`, which runs the same ClientApp on each in turn.

What stays as in Flower's engine: each message is answered by the ClientApp with its node's
``Context``, the updated context is stored back, a reply gets a fresh message id, an
exception raised by the ClientApp becomes that message's error reply (the same code and
reason format), a failed call (a dead actor) makes an error reply for each of its messages
instead of stopping the engine, and each message arrives with its own copies of everything
(:class:`Batch`). Two messages for the same node in one batch see one context, in order.

:func:`simulations.dispatch.fast_dispatch` installs :class:`BatchingRayBackend` and
:func:`batch_worker` for one ``run_simulation``.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import ERROR
from queue import Empty, Queue
from threading import Event
from typing import Any, Final, cast
from uuid import uuid4

import ray
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.compat.client.run_info_store import DeprecatedRunInfoStore
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig
from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend
from flwr.server.superlink.fleet.vce.metrics import VceMetrics
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, VirtualClientEngineActor
from flwr.supercore import log

__all__ = [
    "FLOWER_WORKER",
    "MAX_BATCH",
    "Batch",
    "BatchActor",
    "BatchingRayBackend",
    "batch_size",
    "batch_worker",
    "run_batch",
]

MAX_BATCH: Final = 16
"""Messages per actor call at most."""

FLOWER_WORKER: Final = vce_api.worker

_Answer = tuple[Message | None, str | None]  # the reply, or the ClientApp's exception text


def _exception_reason(error: BaseException) -> str:
    """The reason text Flower's engine gives an exception (``vce_api.worker``)."""
    return str(type(error)) + ":<'" + str(error) + "'>"


@dataclass(frozen=True)
class Batch:
    """Messages and their nodes' contexts, each pickled on its own.

    One Ray call pickles its arguments together, and pickling keeps shared objects shared:
    two messages built from one record would arrive holding the same record, and a ClientApp
    that changes its message's content (Flower's ``secaggplus_mod`` pops the stage from its
    config record) would change the other's. Flower's engine pickles each message in its own
    call, so each arrives with its own copies; so does each message and each node's context
    here. ``slots[i]`` is the context of ``messages[i]``: a node with two messages in the
    batch has one context, which sees both in order."""

    messages: tuple[bytes, ...]
    contexts: tuple[bytes, ...]
    slots: tuple[int, ...]

    @classmethod
    def of(cls, messages: Sequence[Message], contexts: Sequence[Context]) -> Batch:
        if len(messages) != len(contexts):
            raise ValueError(f"{len(messages)} messages for {len(contexts)} contexts.")
        slot_of: dict[int, int] = {}
        pickled: list[bytes] = []
        slots: list[int] = []
        for context in contexts:
            if id(context) not in slot_of:
                slot_of[id(context)] = len(pickled)
                pickled.append(pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL))
            slots.append(slot_of[id(context)])
        return cls(
            tuple(pickle.dumps(m, protocol=pickle.HIGHEST_PROTOCOL) for m in messages),
            tuple(pickled),
            tuple(slots),
        )


def run_batch(app: ClientApp, batch: Batch) -> tuple[list[_Answer], list[Context]]:
    """Each message of ``batch`` through ``app`` with its node's context, in order; the
    answers, and the contexts (one per node) as the messages left them."""
    # The engine's own bytes, pickled by the driver a moment ago (what Ray would send).
    contexts: list[Context] = [pickle.loads(blob) for blob in batch.contexts]  # noqa: S301
    answers: list[_Answer] = []
    for blob, slot in zip(batch.messages, batch.slots, strict=True):
        message: Message = pickle.loads(blob)  # noqa: S301
        try:
            answers.append((app(message=message, context=contexts[slot]), None))
        except Exception as error:  # one message's failure is its own error reply
            answers.append((None, _exception_reason(error)))
    return answers, contexts


class _BatchActorBase(VirtualClientEngineActor):
    def run_batch(
        self, client_app_fn: Callable[[], ClientApp], batch: Batch
    ) -> tuple[str, list[_Answer], list[Context]]:
        """:func:`run_batch` with the engine's ClientApp."""
        answers, contexts = run_batch(client_app_fn(), batch)
        return "", answers, contexts


BatchActor = ray.remote(_BatchActorBase)
"""The engine's ClientApp actor: Flower's ``ClientAppActor`` plus :meth:`run_batch`."""


class BatchingRayBackend(RayBackend):
    """Flower's Ray backend whose actors also take batches (:meth:`process_batch`), and that
    starts a local Ray without a runtime environment (:meth:`init_ray`)."""

    def init_ray(self, backend_config: BackendConfig) -> None:
        """Start Ray here as Flower does, minus the ``runtime_env``, when Ray is started on
        this machine (``address = "local"``).

        Flower passes the driver's ``sys.path`` to the workers as a runtime environment's
        ``PYTHONPATH``; a worker with a runtime environment cannot be one of the workers Ray
        prestarts, so each actor waited for a fresh process and the runtime-env agent (1.6 s
        more before the first message, measured). A local Ray's workers inherit the driver's
        environment, so setting ``PYTHONPATH`` before starting Ray gives them the same path.
        Joining a cluster (another address) keeps Flower's way: remote workers need it."""
        settings: dict[str, Any] = dict(backend_config.get(self.init_args_key) or {})
        if ray.is_initialized() or settings.get("address") != "local":
            super().init_ray(backend_config)
            return
        path = os.pathsep.join(sys.path)
        if os.environ.get("PYTHONPATH"):
            path = f"{path}{os.pathsep}{os.environ['PYTHONPATH']}"
        os.environ["PYTHONPATH"] = path
        settings.setdefault("include_dashboard", False)
        ray.init(**settings)

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.pool = BasicActorPool(
            actor_type=BatchActor,  # type: ignore[arg-type]
            client_resources=self.client_resources,
            actor_kwargs=self.actor_kwargs,
        )
        self.pool.add_actors_to_pool(self.pool.actors_capacity)
        self.app_fn = app_fn

    def process_batch(
        self, messages: Sequence[Message], contexts: Sequence[Context]
    ) -> tuple[list[_Answer], Sequence[Context]]:
        """Run ``messages`` on one idle actor; the answers and the updated contexts."""
        if self.pool is None or self.app_fn is None:
            raise ValueError("The backend is not built: call build() first.")
        batch = Batch.of(messages, contexts)
        future: Any = None
        try:
            future = self.pool.submit(
                lambda actor, fn, work, _cid, _context: actor.run_batch.remote(fn, work),
                (self.app_fn, batch, "", None),  # type: ignore[arg-type]
            )
            answers, updated = self.pool.fetch_result_and_return_actor_to_pool(future)
        except Exception:
            if future is not None:
                self.pool.add_actor_back_to_pool(future)
            raise
        per_node = cast(list[Context], updated)
        return cast(list[_Answer], answers), [per_node[slot] for slot in batch.slots]


def batch_size(waiting: int, workers: int) -> int:
    """How many more messages a worker takes with the one it has, when ``waiting`` more wait
    and ``workers`` workers share them: its share, at most :data:`MAX_BATCH` in all."""
    share = -(-waiting // max(workers, 1))  # ceil
    return max(0, min(MAX_BATCH - 1, share))


def _take_batch(queue: Queue[Message], first: Message, workers: int) -> list[Message]:
    batch = [first]
    for _ in range(batch_size(queue.qsize(), workers)):
        try:
            batch.append(queue.get_nowait())
        except Empty:
            break
    return batch


def _error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=message)


def batch_worker(
    messageins_queue: Queue[Message],
    messageres_queue: Queue[Message],
    node_info_store: dict[int, DeprecatedRunInfoStore],
    backend: Backend,
    f_stop: Event,
    metrics: VceMetrics,
) -> None:
    """Flower's ``vce_api.worker``, a batch of waiting messages per actor call."""
    if not isinstance(backend, BatchingRayBackend):
        FLOWER_WORKER(messageins_queue, messageres_queue, node_info_store, backend, f_stop, metrics)
        return
    while not f_stop.is_set():
        try:
            first = messageins_queue.get(timeout=1.0)
        except Empty:
            continue
        batch = _take_batch(messageins_queue, first, backend.num_workers)
        replies = _process(batch, node_info_store, backend, metrics)
        for reply in replies:
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            messageres_queue.put(reply)


def _process(
    batch: Sequence[Message],
    node_info_store: dict[int, DeprecatedRunInfoStore],
    backend: BatchingRayBackend,
    metrics: VceMetrics,
) -> list[Message]:
    started = time.perf_counter()
    try:
        # A node's store hands out the same Context object each time: two messages of one
        # node in the batch carry one context (Batch.of keeps it one), and the state stored
        # back for it is the one its last message left.
        contexts = [
            node_info_store[m.metadata.dst_node_id].retrieve_context(run_id=m.metadata.run_id)
            for m in batch
        ]
        answers, updated = backend.process_batch(batch, contexts)
        for message, context in zip(batch, updated, strict=True):
            store = node_info_store[message.metadata.dst_node_id]
            store.update_context(message.metadata.run_id, context=context)
        replies = []
        for message, (reply, reason) in zip(batch, answers, strict=True):
            if reply is None:
                reply = _error_reply(message, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, str(reason))
            replies.append(reply)
        return replies
    except Exception as error:  # the call failed (e.g. the actor died): every message errs
        log(ERROR, "A batch of %d message(s) failed: %s", len(batch), error)
        reason = _exception_reason(error)
        return [_error_reply(message, ErrorCode.UNKNOWN, reason) for message in batch]
    finally:
        metrics.add_clientapp_runtime(time.perf_counter() - started)
