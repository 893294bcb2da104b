"""The fedbrain ClientApp: Flower ``Message`` s in, :class:`clients.node.Node` calls, replies out.

One handler per message type of :mod:`clients.protocol` (``@app.query("node_info")``,
``@app.train("fit")``, ``@app.evaluate("eval")``, and the SecAgg+ stages in both categories:
``@app.train("secagg_advertise")`` ..., ``@app.evaluate("secagg_advertise")`` ...).
Each parses the records (a malformed record is an error), runs the node logic and answers
``Message(content, reply_to=message)``. Any exception -- malformed input, a refused SecAgg+
request, a failed training, an injected fault -- becomes an error reply
(``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``, the reason naming the exception), so the server
sees a dropout with a reason and the node stays ready for the next message.

State: :class:`~clients.node.NodeState` lives in ``context.state`` (Flower keeps it per node
and run, on the node) as three ConfigRecords: ``fedbrain.secagg`` (the SecAgg+ session of the
round in progress, ``ClientSession.to_state_record()`` with ints wrapped to int64 and empty
lists named in ``__empty_lists__``), ``fedbrain.secagg_round`` (``run_id``, ``round`` and
``category`` of the last session started) and ``fedbrain.dp_sgd`` (the node's DP-SGD steps
as parallel lists ``noise_multiplier``, ``sample_rate``, ``steps``). A failed message leaves
the session records as they were; DP-SGD steps are recorded even when a later step of the
message fails.

Simulation: ``context.node_config`` only holds ``partition-id``; :func:`make_client_app` gets
the :class:`~clients.node.NodeConfig` per partition. Flower's Ray backend pickles the ClientApp
with every message it sends to an actor, so the simulation's app pickles as a reference: the
node table's digest and its pickled bytes, made once; an actor decodes a table once and keeps
the app it built for it. Deployment (``flwr run`` loads ``clients.app:app``): each SuperNode's
``node_config`` holds ``node-type``, ``data-dir``, optional ``name`` and ``fail-on``.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Final, TypeAlias, cast

from flwr.app import (
    ConfigRecord,
    ConfigRecordValues,
    Context,
    Error,
    Message,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from aggregation.accountant import SubsampledGaussianEvent
from aggregation.secagg import Stage, message_from_record
from clients import protocol
from clients.config import NodeConfig
from clients.protocol import RoundConfig

if TYPE_CHECKING:  # clients.node imports torch and the models: on the first message
    from clients.node import Node, NodeState, Weights

__all__ = [
    "PARTITION",
    "PARTITION_KEY",
    "STATE_DP",
    "STATE_SECAGG",
    "STATE_SECAGG_ROUND",
    "app",
    "make_client_app",
]

_LOG = logging.getLogger(__name__)

STATE_SECAGG: Final = "fedbrain.secagg"
STATE_SECAGG_ROUND: Final = "fedbrain.secagg_round"
STATE_DP: Final = "fedbrain.dp_sgd"
_EMPTY: Final = "__empty_lists__"
PARTITION: Final = "query.partition"
"""Simulation only: which node of the scenario a Flower node is. The reply's ConfigRecord
:data:`PARTITION_KEY` holds the node's ``partition-id`` (the simulation runner gives each job
the nodes of its node type)."""
PARTITION_KEY: Final = "partition-id"

_Work: TypeAlias = "Callable[[Node, Message, NodeState], RecordDict]"


# --------------------------------------------------------------------------- parsing


def _config(content: RecordDict, name: str) -> ConfigRecord:
    record = content.config_records.get(name)
    if record is None:
        raise ValueError(f"The message carries no `{name}` ConfigRecord.")
    return record


def _envelope(content: RecordDict) -> bytes:
    return protocol.signed_job_from_content(content)


def _round(content: RecordDict, category: str) -> RoundConfig:
    rnd = RoundConfig.from_record(_config(content, protocol.ROUND))
    if rnd.work.category != category:
        raise ValueError(
            f"A {category} message cannot carry {rnd.work} work (it belongs to "
            f"{rnd.work.category} messages)."
        )
    return rnd


def _weights(content: RecordDict) -> Weights | None:
    record = content.array_records.get(protocol.WEIGHTS)
    if record is None:
        return None
    return list(zip(record.keys(), protocol.record_to_weights(record), strict=True))


# ----------------------------------------------------------------------------- state


def _encode_session(record: Mapping[str, object]) -> ConfigRecord:
    values: dict[str, ConfigRecordValues] = {}
    empty: list[str] = []
    for key, value in record.items():
        if isinstance(value, bool):
            raise TypeError(f"SecAgg+ session field `{key}` is a bool; not expected.")
        if isinstance(value, int):
            values[key] = protocol.to_wire_int(value)
        elif isinstance(value, list) and not value:
            empty.append(key)
        elif isinstance(value, list) and all(isinstance(v, int) for v in value):
            values[key] = [protocol.to_wire_int(int(v)) for v in value]
        elif isinstance(value, str | bytes) or (
            isinstance(value, list) and all(isinstance(v, bytes) for v in value)
        ):
            values[key] = cast(ConfigRecordValues, value)
        else:
            raise TypeError(f"SecAgg+ session field `{key}` has an unexpected type.")
    if empty:
        values[_EMPTY] = empty
    return ConfigRecord(values)


def _decode_session(record: ConfigRecord) -> dict[str, object]:
    out: dict[str, object] = {}
    empty = record.get(_EMPTY, [])
    if not isinstance(empty, list):
        raise ValueError(f"Malformed `{STATE_SECAGG}` state: `{_EMPTY}` must be a list.")
    for key in empty:
        out[str(key)] = []
    for key, value in record.items():
        if key == _EMPTY:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            out[key] = protocol.from_wire_int(value)
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            out[key] = [protocol.from_wire_int(int(v)) for v in value]
        else:
            out[key] = value
    return out


def _load_state(store: RecordDict) -> NodeState:
    from clients.node import NodeState

    state = NodeState()
    session = store.config_records.get(STATE_SECAGG)
    if session is not None:
        state.secagg_session = _decode_session(session)
    started = store.config_records.get(STATE_SECAGG_ROUND)
    if started is not None:
        run_id, server_round = started.get("run_id"), started.get("round")
        category = started.get("category", "train")
        if (
            not isinstance(run_id, int)
            or not isinstance(server_round, int)
            or not isinstance(category, str)
        ):
            raise ValueError(f"Malformed `{STATE_SECAGG_ROUND}` state: {started}.")
        state.secagg_round = (
            protocol.from_wire_int(run_id),
            protocol.from_wire_int(server_round),
            category,
        )
    dp = store.config_records.get(STATE_DP)
    if dp is not None:
        columns = [dp.get(k) for k in ("noise_multiplier", "sample_rate", "steps")]
        try:
            if not all(isinstance(c, list) for c in columns):
                raise TypeError("expected three lists")
            rows = zip(*cast(list[list[object]], columns), strict=True)
            state.dp_events = [
                SubsampledGaussianEvent(noise_multiplier=z, sample_rate=q, steps=n)
                for z, q, n in rows
            ]
        except (TypeError, ValueError) as error:
            raise ValueError(f"Malformed `{STATE_DP}` state ({error}): {dp}.") from None
    return state


def _store_state(state: NodeState, store: RecordDict) -> None:
    if state.secagg_session is None:
        if STATE_SECAGG in store:
            del store[STATE_SECAGG]
    else:
        store[STATE_SECAGG] = _encode_session(state.secagg_session)
    if state.secagg_round is not None:
        run_id, server_round, category = state.secagg_round
        store[STATE_SECAGG_ROUND] = ConfigRecord(
            {
                "run_id": protocol.to_wire_int(run_id),
                "round": protocol.to_wire_int(server_round),
                "category": category,
            }
        )
    if state.dp_events:
        store[STATE_DP] = ConfigRecord(
            {
                "noise_multiplier": [e.noise_multiplier for e in state.dp_events],
                "sample_rate": [e.sample_rate for e in state.dp_events],
                "steps": [e.steps for e in state.dp_events],
            }
        )


# -------------------------------------------------------------------------- handlers


def _node_info(node: Node, message: Message, state: NodeState) -> RecordDict:
    node.check_fault(protocol.NODE_INFO, None)
    info = node.node_info(_envelope(message.content))
    return RecordDict({protocol.NODE_INFO_RECORD: info.to_record()})


def _plain(category: str) -> _Work:
    message_type = protocol.FIT if category == "train" else protocol.EVALUATE

    def work(node: Node, message: Message, state: NodeState) -> RecordDict:
        content = message.content
        envelope, rnd = _envelope(content), _round(content, category)
        node.check_fault(message_type, rnd.server_round)
        summed = node.plain(envelope, rnd, _weights(content), state)
        out = RecordDict()
        protocol.summed_to_content(summed, out)
        return out

    return work


def _secagg(category: str, stage: Stage) -> _Work:
    message_type = protocol.secagg_message_type(category, stage)

    def work(node: Node, message: Message, state: NodeState) -> RecordDict:
        content = message.content
        envelope, rnd = _envelope(content), _round(content, category)
        node.check_fault(message_type, rnd.server_round)
        request = message_from_record(protocol.secagg_from_content(content))
        if request.stage is not stage or request.KIND != "request":
            raise ValueError(
                f"A {message_type} message must carry a {stage} request; it carries: "
                f"{request.stage} {request.KIND}."
            )
        weights = _weights(content) if stage is Stage.MASKED_INPUT else None
        reply = node.secagg(envelope, rnd, request, weights, state)
        out = RecordDict()
        protocol.secagg_to_content(reply.to_record(), out)
        return out

    return work


# ------------------------------------------------------------------------------- app


def _node_config(context: Context, nodes: Mapping[int, NodeConfig] | None) -> NodeConfig:
    if nodes is None:
        return NodeConfig.from_flower(context.node_config)
    partition = context.node_config.get(PARTITION_KEY)
    if not isinstance(partition, int) or isinstance(partition, bool):
        raise ValueError(
            "This ClientApp maps simulation partitions to nodes, but the context has no integer "
            f"`partition-id` (node config: {dict(context.node_config)})."
        )
    try:
        return nodes[partition]
    except KeyError:
        raise ValueError(
            f"No node is configured for partition {partition} (configured: {sorted(nodes)})."
        ) from None


def _serve(
    work: _Work, message: Message, context: Context, nodes: Mapping[int, NodeConfig] | None
) -> Message:
    """Run ``work`` and reply; every exception becomes an error reply (state kept sane)."""
    try:
        if not message.has_content():
            raise ValueError("The message carries no content.")
        from clients.node import Node

        node = Node(_node_config(context, nodes), node_id=context.node_id)
        state = _load_state(context.state)
        try:
            content = work(node, message, state)
        finally:
            _store_state(state, context.state)
        return Message(content, reply_to=message)
    except Exception as error:  # the network boundary: every failure becomes an error reply
        _LOG.warning(
            "Node %s failed on %s: %s",
            context.node_id,
            message.metadata.message_type,
            error,
            exc_info=_LOG.isEnabledFor(logging.DEBUG),
        )
        reason = f"{type(error).__name__}: {error}"
        return Message(
            Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message
        )


class _NodeTable(Mapping[int, NodeConfig]):
    """The simulation's partition -> node table; pickles as its digest and its pickled bytes
    (made once), and a process that has decoded a digest before reuses that table."""

    def __init__(self, nodes: Mapping[int, NodeConfig], payload: bytes | None = None) -> None:
        self._nodes = dict(nodes)
        if payload is None:
            payload = pickle.dumps(self._nodes, protocol=pickle.HIGHEST_PROTOCOL)
        self.payload = payload
        self.digest = hashlib.sha256(payload).hexdigest()

    def __getitem__(self, partition: int) -> NodeConfig:
        return self._nodes[partition]

    def __iter__(self) -> Iterator[int]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def __reduce__(self) -> tuple[Callable[[str, bytes], _NodeTable], tuple[str, bytes]]:
        return _decoded_table, (self.digest, self.payload)


_DECODED_LOCK: Final = threading.Lock()
_TABLES: dict[str, _NodeTable] = {}
_APPS: dict[str, ClientApp] = {}


def _decoded_table(digest: str, payload: bytes) -> _NodeTable:
    with _DECODED_LOCK:
        table = _TABLES.get(digest)
    if table is None:
        # Ray unpickles every message it delivers; these bytes come the same way.
        nodes = pickle.loads(payload)  # noqa: S301
        table = _NodeTable(nodes, payload)
        if table.digest != digest:
            raise ValueError("The node table does not match its digest.")
        with _DECODED_LOCK:
            table = _TABLES.setdefault(digest, table)
    return table


class _SimulationApp(ClientApp):
    """The simulation's ClientApp: pickles as its node table (see the module docstring) and
    answers :data:`PARTITION`."""

    def __init__(self, table: _NodeTable) -> None:
        super().__init__()
        self.table = table
        self.query(PARTITION.split(".", 1)[1])(_partition)

    def __reduce__(self) -> tuple[Callable[[_NodeTable], ClientApp], tuple[_NodeTable]]:
        return _app_for_table, (self.table,)


def _partition(message: Message, context: Context) -> Message:
    partition = context.node_config.get(PARTITION_KEY)
    if not isinstance(partition, int) or isinstance(partition, bool):
        return Message(
            Error(
                code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                reason=f"this node has no integer `{PARTITION_KEY}` in its node config",
            ),
            reply_to=message,
        )
    record = ConfigRecord({PARTITION_KEY: partition})
    return Message(RecordDict({PARTITION_KEY: record}), reply_to=message)


def _app_for_table(table: _NodeTable) -> ClientApp:
    with _DECODED_LOCK:
        app = _APPS.get(table.digest)
    if app is None:
        app = _register(_SimulationApp(table), table)
        with _DECODED_LOCK:
            app = _APPS.setdefault(table.digest, app)
    return app


def make_client_app(nodes: Mapping[int, NodeConfig] | None = None) -> ClientApp:
    """The fedbrain ClientApp.

    ``nodes``: in simulation, the node of each ``partition-id``; ``None`` (deployment) reads
    the node from each SuperNode's ``node_config`` (:meth:`NodeConfig.from_flower`).
    """
    if nodes is None:
        return _register(ClientApp(), None)
    table = _NodeTable(nodes)
    return _register(_SimulationApp(table), table)


def _register(client_app: ClientApp, table: Mapping[int, NodeConfig] | None) -> ClientApp:
    """``client_app`` with fedbrain's handlers registered."""
    decorators = {
        "query": client_app.query,
        "train": client_app.train,
        "evaluate": client_app.evaluate,
    }
    handlers: dict[str, _Work] = {
        protocol.NODE_INFO: _node_info,
        protocol.FIT: _plain("train"),
        protocol.EVALUATE: _plain("evaluate"),
        **{
            protocol.secagg_message_type(category, stage): _secagg(category, stage)
            for category in ("train", "evaluate")
            for stage in protocol.STAGE_MESSAGE_TYPE
        },
    }
    for message_type, work in handlers.items():
        category, action = message_type.split(".")
        decorators[category](action)(_handler(work, table))
    return client_app


def _handler(work: _Work, nodes: Mapping[int, NodeConfig] | None) -> ClientAppCallable:
    def handle(message: Message, context: Context) -> Message:
        return _serve(work, message, context, nodes)

    return handle


app = make_client_app()
"""The deployment ClientApp (``clients.app:app``)."""
