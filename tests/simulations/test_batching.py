"""Batched actor calls keep the engine's per-message rules: each message gets its own reply
or error, in order, with its node's context; two messages of one node in a batch see each
other's state; a worker takes only its share of the waiting messages."""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from simulations import batching


def _app() -> ClientApp:
    app = ClientApp()

    @app.query("count")
    def count(message: Message, context: Context) -> Message:
        ask = message.content.config_records["ask"]
        if ask.pop("fail"):  # changes the message's own record (as secaggplus_mod does)
            raise RuntimeError("this node refuses")
        seen = context.state.config_records.get("seen", ConfigRecord({"n": 0}))
        count = seen["n"]
        assert isinstance(count, int)
        n = count + 1
        context.state["seen"] = ConfigRecord({"n": n})
        return Message(RecordDict({"n": ConfigRecord({"n": n})}), reply_to=message)

    return app


def _message(node: int, *, fail: bool = False, content: RecordDict | None = None) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 5, SUPERLINK_NODE_ID
    content = content or RecordDict({"ask": ConfigRecord({"fail": fail})})
    message = Message(content, dst_node_id=node, message_type="query.count")
    message.metadata.__dict__["_message_id"] = f"m-{node}-{fail}-{id(message)}"
    return message


def _context(node: int) -> Context:
    return Context(run_id=5, node_id=node, node_config={}, state=RecordDict(), run_config={})


def test_each_message_gets_its_own_answer_copies_and_a_failure_stays_its_own() -> None:
    app = _app()
    shared = _context(10)
    one_record = RecordDict({"ask": ConfigRecord({"fail": False})})  # the server's, shared
    messages = [
        _message(10, content=one_record),
        _message(11, fail=True),
        _message(10, content=one_record),
        _message(12, content=one_record),
    ]
    contexts = [shared, _context(11), shared, _context(12)]
    batch = batching.Batch.of(messages, contexts)
    assert batch.slots == (0, 1, 0, 2)
    answers, per_node = batching.run_batch(app, batch)
    updated = [per_node[slot] for slot in batch.slots]
    replies = [reply for reply, _ in answers]
    reason = answers[1][1]
    assert answers[1][0] is None and reason is not None and "this node refuses" in reason
    assert reason.startswith("<class 'RuntimeError'>")  # Flower's reason format
    first, second, other = replies[0], replies[2], replies[3]
    assert first is not None and second is not None and other is not None
    assert [r.content.config_records["n"]["n"] for r in (first, second, other)] == [1, 2, 1]
    assert first.metadata.reply_to_message_id == messages[0].metadata.message_id
    assert updated[0] is updated[2]  # one context object for the node's two messages
    assert updated[0].state.config_records["seen"]["n"] == 2
    assert one_record["ask"]["fail"] is False  # each message changed only its own copy


def test_a_worker_takes_its_share_of_the_waiting_messages_at_most_a_full_batch() -> None:
    assert batching.batch_size(0, 2) == 0
    assert batching.batch_size(1, 2) == 1
    assert batching.batch_size(10, 2) == 5
    assert batching.batch_size(11, 2) == 6
    assert batching.batch_size(500, 2) == batching.MAX_BATCH - 1
    assert batching.batch_size(7, 0) == 7  # no worker count known: as if one
