"""An in-process Flower ``Grid``: the federator talks to real ClientApps without a SuperLink.

For fast tests and benchmarks. Each node is a ``(node_id, ClientApp, Context)``; every message
the ServerApp pushes is serialized to Flower's protobuf form and back (as a transport would),
handed to the real ``client_app(message, context)``, and its reply is serialized back the same
way. What Flower's own engines do, this does too:

- node ids are random unsigned 64-bit integers (Flower's ``create_node``), never 0 or the
  SuperLink's id 1; a node keeps one ``Context`` for the whole run (its ``state`` persists);
- an instruction gets a fresh ``message_id`` when pushed; a reply must answer it
  (``reply_to_message_id``) and come from its destination, or it is replaced by an error reply;
- an exception raised by the ClientApp becomes an error reply with
  ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION`` and the reason ``"<class ...>:<'message'>"``;
- ``send_and_receive(timeout=...)``: nodes run one after another; a reply that is ready after
  the deadline is dropped (the node is a dropout for that batch).

Like Flower's ServerApp process, constructing a LocalGrid sets the process-wide
``TaskIdentity`` (run id, SuperLink node id, task id) that ``flwr.app.Message(...)`` reads.

Hooks for instrumented tests: ``on_message(message)`` sees every message delivered to a node and
every reply coming back (after serialization); ``drop(node_id, message_type, server_round)``
returning True makes that node silent for that message (no reply at all).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from flwr.app import Context, Error, Message, RecordDict
from flwr.app.user_config import UserConfig
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "DropRule",
    "LocalGrid",
    "LocalNode",
    "MessageHook",
    "random_node_ids",
]

logger = logging.getLogger(__name__)

MessageHook = Callable[[Message], None]
DropRule = Callable[[int, str, int], bool]
"""``drop(node_id, message_type, server_round)``: True makes the node silent for the message."""

_SERVER_TASK_ID: Final = 1
_RESERVED_IDS: Final = frozenset({0, SUPERLINK_NODE_ID})
_PARTITION_ID: Final = "partition-id"
_NUM_PARTITIONS: Final = "num-partitions"


def random_node_ids(count: int) -> list[int]:
    """``count`` distinct random uint64 node ids from ``os.urandom``, as Flower assigns them."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"`count` must be an int >= 0. Found {count!r}.")
    ids: list[int] = []
    while len(ids) < count:
        candidate = int.from_bytes(os.urandom(8), "little", signed=False)
        if candidate not in _RESERVED_IDS and candidate not in ids:
            ids.append(candidate)
    return ids


@dataclass
class LocalNode:
    """One node of a :class:`LocalGrid`: its id, its ClientApp and its run context."""

    node_id: int
    app: ClientApp
    node_config: UserConfig = field(default_factory=dict)


def _group_round(message: Message) -> int:
    group = message.metadata.group_id
    return int(group) if group.isdigit() else 0


def _copy(message: Message) -> Message:
    """The message as the other side receives it: through Flower's protobuf serialization."""
    return message_from_proto(message_to_proto(message))


class LocalGrid(Grid):
    """A Grid whose nodes are ClientApps called in this process (see the module docstring)."""

    def __init__(
        self,
        nodes: Sequence[LocalNode],
        *,
        run_id: int | None = None,
        run_config: UserConfig | None = None,
        on_message: MessageHook | None = None,
        drop: DropRule | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        ids = [n.node_id for n in nodes]
        problems: list[str] = []
        if len(set(ids)) != len(ids):
            problems.append("node ids must be distinct.")
        bad = sorted(
            i
            for i in ids
            if isinstance(i, bool)
            or not isinstance(i, int)
            or not 0 <= i < 2**64
            or i in _RESERVED_IDS
        )
        if bad:
            problems.append(f"node ids must be uint64 other than 0 and 1. Found {bad}.")
        if problems:
            raise ValueError(" ".join(problems))
        rid = run_id if run_id is not None else random_node_ids(1)[0]
        self._run = Run.create_empty(rid)
        self._run.override_config = dict(run_config or {})
        self._nodes: dict[int, LocalNode] = {n.node_id: n for n in nodes}
        self._contexts: dict[int, Context] = {
            n.node_id: Context(
                run_id=rid,
                node_id=n.node_id,
                node_config=dict(n.node_config),
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for n in nodes
        }
        self._pending: dict[str, Message | None] = {}  # instruction id -> reply (None: silent)
        self.on_message = on_message
        self.drop = drop
        self._clock = clock
        self.bytes_sent = 0
        self.bytes_received = 0
        self.activate()

    @classmethod
    def with_app(
        cls,
        app: ClientApp,
        num_nodes: int,
        *,
        node_ids: Sequence[int] | None = None,
        node_configs: Sequence[UserConfig] | None = None,
        run_config: UserConfig | None = None,
        on_message: MessageHook | None = None,
        drop: DropRule | None = None,
    ) -> LocalGrid:
        """``num_nodes`` nodes running the same ClientApp (as in Flower's simulation).

        Each node's ``node_config`` gets ``partition-id`` (0, 1, ...) and ``num-partitions``
        as Flower's simulation sets them, plus ``node_configs[i]`` when given.
        """
        ids = list(node_ids) if node_ids is not None else random_node_ids(num_nodes)
        if len(ids) != num_nodes:
            raise ValueError(f"{len(ids)} node ids given for {num_nodes} nodes.")
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError(f"{len(node_configs)} node configs given for {num_nodes} nodes.")
        nodes = []
        for index, node_id in enumerate(ids):
            config: UserConfig = {_PARTITION_ID: index, _NUM_PARTITIONS: num_nodes}
            if node_configs is not None:
                config.update(node_configs[index])
            nodes.append(LocalNode(node_id, app, config))
        return cls(nodes, run_config=run_config, on_message=on_message, drop=drop)

    def activate(self) -> None:
        """Set the process-wide ``TaskIdentity`` to this grid's run (what ``Message`` reads)."""
        TaskIdentity.task_id = _SERVER_TASK_ID
        TaskIdentity.run_id = self._run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    # ------------------------------------------------------------------ Grid API

    def set_run(self, run: Run) -> None:
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be a flwr Run. Found {type(run).__name__}.")
        self._run = run
        for context in self._contexts.values():
            context.run_id = run.run_id
        self.activate()

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Deprecated in Flower; kept because the Grid interface requires it."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    @property
    def contexts(self) -> Mapping[int, Context]:
        """Each node's context (its ``state`` is what the ClientApp kept between messages)."""
        return dict(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node now; return the ids to pull the replies with."""
        return self._deliver(messages, deadline=None)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that are ready (each is returned once)."""
        replies: list[Message] = []
        for message_id in message_ids:
            reply = self._pending.get(message_id)
            if reply is not None:
                del self._pending[message_id]
                replies.append(reply)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        deadline = None if timeout is None else self._clock() + timeout
        ids = self._deliver(messages, deadline=deadline)
        replies = list(self.pull_messages(ids))
        for message_id in ids:  # silent nodes: forget the instruction, as its TTL would
            self._pending.pop(message_id, None)
        return replies

    # ------------------------------------------------------------------ delivery

    def _deliver(self, messages: Iterable[Message], *, deadline: float | None) -> list[str]:
        ids: list[str] = []
        for message in messages:
            if not isinstance(message, Message):
                raise TypeError(f"Grid messages must be flwr Messages. Found {type(message)}.")
            meta = message.metadata
            if meta.reply_to_message_id or meta.message_id:
                raise ValueError(
                    "Push instruction messages only: this one already has a message id or is "
                    "a reply. Build a new Message(content, dst_node_id=..., message_type=...)."
                )
            if meta.dst_node_id not in self._nodes:
                logger.error("Message to unknown node %s discarded.", meta.dst_node_id)
                continue
            message_id = uuid.uuid4().hex
            meta.__dict__["_message_id"] = message_id
            ids.append(message_id)
            reply = self._call_node(message)
            late = deadline is not None and self._clock() > deadline
            if late and reply is not None:
                logger.warning(
                    "Node %s answered %s after the timeout; reply dropped.",
                    meta.dst_node_id,
                    meta.message_type,
                )
            self._pending[message_id] = None if late else reply
        return ids

    def _call_node(self, instruction: Message) -> Message | None:
        meta = instruction.metadata
        node_id = meta.dst_node_id
        if self.drop is not None and self.drop(
            node_id, meta.message_type, _group_round(instruction)
        ):
            return None
        delivered = _copy(instruction)
        self.bytes_sent += message_to_proto(instruction).ByteSize()
        if self.on_message is not None:
            self.on_message(delivered)
        node = self._nodes[node_id]
        try:
            reply = node.app(delivered, self._contexts[node_id])
            problem = self._reply_problem(reply, delivered)
            if problem is not None:
                raise TypeError(problem)
        except Exception as exc:
            logger.warning("ClientApp on node %s raised %r", node_id, exc)
            reason = str(type(exc)) + ":<'" + str(exc) + "'>"
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                reply_to=delivered,
            )
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        received = _copy(reply)
        self.bytes_received += message_to_proto(reply).ByteSize()
        if self.on_message is not None:
            self.on_message(received)
        return received

    @staticmethod
    def _reply_problem(reply: object, instruction: Message) -> str | None:
        if not isinstance(reply, Message):
            return f"The ClientApp returned {type(reply).__name__}, not a reply Message."
        meta = reply.metadata
        if meta.reply_to_message_id != instruction.metadata.message_id:
            return "The ClientApp's reply does not answer the message it was given."
        if meta.src_node_id != instruction.metadata.dst_node_id:
            return "The ClientApp's reply claims to come from another node."
        return None
