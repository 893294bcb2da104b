"""The engine's message dispatcher keeps Flower's delivery rules on a real in-memory LinkState:
each message is handed out once, at most one per node per sweep (the oldest first, so a node's
messages keep their order), only to the engine's own nodes, and an expired message is dropped
by the state's own check instead of delivered. The paced pull returns every reply and honours
its timeout."""

from __future__ import annotations

import threading
import time
from queue import Queue
from typing import cast

import pytest
from flwr.app import Message, RecordDict
from flwr.common.constant import NOOP_ACCOUNT_NAME, NOOP_FLWR_AID, SUPERLINK_NODE_ID
from flwr.proto.task_pb2 import Task
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState, RunRecord
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from simulations import dispatch


class _Link:
    """A run on Flower's in-memory LinkState with ``count`` registered nodes, and its Grid."""

    def __init__(self, count: int) -> None:
        factory = LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        self.state = cast(InMemoryLinkState, factory.state())
        # As flwr.simulation.run_simulation registers its run.
        self.run = Run.create_empty(run_id=7)
        self.run.primary_task_id = 11
        self.run.federation_id = NOOP_FEDERATION_ID
        self.state.run_ids[self.run.run_id] = RunRecord(run=self.run)
        self.state.task_store[11] = Task(task_id=11, run_id=self.run.run_id)
        TaskIdentity.task_id, TaskIdentity.run_id = 1, self.run.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.nodes = [
            self.state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, bytes([i]) * 32, 1e9)
            for i in range(count)
        ]
        for node in self.nodes:
            self.state.acknowledge_node_heartbeat(node, 1e9)
        self.grid = InMemoryGrid(state_factory=factory)
        self.grid.set_run(self.run)

    def push(self, node: int, kind: str = "query.a", ttl: float | None = None) -> str:
        message = Message(RecordDict(), dst_node_id=node, message_type=kind, ttl=ttl)
        return next(iter(self.grid.push_messages([message])))


def test_one_message_per_node_per_sweep_oldest_first_only_the_engines_nodes() -> None:
    link = _Link(3)
    a, b, c = link.nodes
    first, second = link.push(a, "query.first"), link.push(a, "query.second")
    other = link.push(b)
    foreign = link.push(c)  # not one of this engine's nodes
    mapping = {a: 0, b: 1}

    taken = dispatch.take_undelivered(link.state, mapping)
    assert sorted(m.metadata.message_id for m in taken) == sorted([first, other])
    assert all(m.metadata.delivered_at for m in taken)
    again = dispatch.take_undelivered(link.state, mapping)
    assert [m.metadata.message_id for m in again] == [second]
    assert dispatch.take_undelivered(link.state, mapping) == []
    assert link.state.message_ins_store[foreign].metadata.delivered_at == ""


def test_an_expired_message_is_dropped_not_delivered() -> None:
    link = _Link(1)
    node = link.nodes[0]
    expired = link.push(node, ttl=0.05)
    time.sleep(0.1)
    assert dispatch.take_undelivered(link.state, {node: 0}) == []
    assert expired not in link.state.message_ins_store
    fresh = link.push(node)
    assert [m.metadata.message_id for m in dispatch.take_undelivered(link.state, {node: 0})] == [
        fresh
    ]


def _answer(link: _Link, message: Message, delay: float = 0.0) -> None:
    time.sleep(delay)
    reply = Message(RecordDict(), reply_to=message)
    reply.metadata.__dict__["_message_id"] = f"reply-{message.metadata.message_id}"
    assert link.state.store_message_res(reply) is not None


def test_the_engine_loop_delivers_and_the_paced_pull_collects_every_reply() -> None:
    link = _Link(4)
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    mapping = {node: i for i, node in enumerate(link.nodes)}
    with dispatch.fast_dispatch():  # the engine picks its loop when it starts its thread
        assert vce_api.add_messages_to_queue is dispatch.dispatch_messages
        loop = threading.Thread(
            target=vce_api.add_messages_to_queue, args=(link.state, queue, mapping, stop)
        )
    assert vce_api.add_messages_to_queue is not dispatch.dispatch_messages  # restored
    loop.start()

    def nodes() -> None:
        for _ in range(2 * len(link.nodes)):
            _answer(link, queue.get(timeout=5))

    answering = threading.Thread(target=nodes)
    answering.start()
    try:
        for _ in range(2):  # two batches, one message per node each
            messages = [
                Message(RecordDict(), dst_node_id=n, message_type="query.a") for n in link.nodes
            ]
            replies = dispatch.paced_send_and_receive(link.grid, messages, timeout=10)
            assert sorted(r.metadata.src_node_id for r in replies) == sorted(link.nodes)
    finally:
        answering.join(timeout=10)
        stop.set()
        loop.join(timeout=5)


def test_the_paced_pull_stops_at_its_timeout_with_the_replies_it_has() -> None:
    link = _Link(2)
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.a") for n in link.nodes]
    began = time.monotonic()
    assert dispatch.paced_send_and_receive(link.grid, messages, timeout=0.3) == []
    assert 0.25 <= time.monotonic() - began < 2.0


@pytest.mark.parametrize("count", [1, 50])
def test_a_sweep_walks_the_store_once(count: int) -> None:
    """The dispatcher reads each stored message once per sweep (Flower's loop: once per node)."""
    link = _Link(count)
    for node in link.nodes:
        link.push(node)
    reads = 0
    store = link.state.message_ins_store
    original = type(store).items

    class Counting(dict[str, Message]):
        def items(self):  # type: ignore[no-untyped-def]
            nonlocal reads
            reads += 1
            return original(self)

    link.state.message_ins_store = Counting(store)
    taken = dispatch.take_undelivered(link.state, {n: i for i, n in enumerate(link.nodes)})
    assert len(taken) == count and reads == 1
