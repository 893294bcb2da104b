"""One Flower Simulation Engine for every job of a scenario.

``fedbrain simulate`` starts Flower's Simulation Engine once (one ``run_simulation``: one Ray
start, one pool of ClientApp actors that import the ClientApp once and keep their caches) and
runs the scenario's jobs one after the other inside its ServerApp. Every virtual node of the
scenario is a SuperNode of that engine (partition id ``i`` = the scenario's ``i``-th node).

Each job sees the engine through a :class:`JobGrid`: only the nodes of its node type (so a
job's discovery asks, and its ledger and ``nodes.json`` list, exactly the nodes it asked
before, when every job had an engine of its own) and a run id of its own. SecAgg+ binds every
session to the run id and a node's participation log refuses a round of a run it has already
taken part in, so two jobs must never share one; their messages still travel in the engine's
single Flower run. The partition id of each Flower node comes from one
:data:`clients.app.PARTITION` query at the start (only when the scenario has nodes of more
than one type).

With ``ray_address`` the engine joins an existing Ray cluster (``ray start --head`` on one
machine, ``ray start --address`` on the others) instead of starting Ray here: Flower's Ray
backend places its ClientApp actors on the cluster's nodes. Every machine must see the
scenario's output folder (node data, kits) at the same path, and run the same fedbrain.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, ConfigRecordValues, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from clients.app import PARTITION, PARTITION_KEY, make_client_app
from simulations.dispatch import fast_dispatch, paced_send_and_receive

if TYPE_CHECKING:
    from flwr.proto.node_pb2 import NodeInfo
    from flwr.server.superlink.fleet.vce.backend.backend import BackendConfig
    from flwr.supercore.run import Run

    from clients.config import NodeConfig
    from simulations.scenario import Scenario

__all__ = ["EngineError", "JobGrid", "JobGrids", "backend_config", "quiet", "run_engine"]

logger = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """The Simulation Engine could not give every job its nodes."""


def backend_config(scenario: Scenario, *, ray_address: str | None = None) -> BackendConfig:
    """Ray backend settings: ``cpus_per_node`` CPUs per ClientApp, quiet logs; Ray started
    here with every CPU (``num_cpus``), or the cluster at ``ray_address`` joined as it is."""
    settings = scenario.settings
    init_args: dict[str, ConfigRecordValues] = {
        "logging_level": "ERROR",
        "log_to_driver": False,
    }
    if ray_address is None:
        # "local": always a fresh Ray here. Without an address Ray joins whatever cluster
        # /tmp/ray/ray_current_cluster names (left by another Ray process or a killed run)
        # and then refuses num_cpus.
        init_args.update(
            address="local", num_cpus=settings.num_cpus or os.cpu_count() or 1, num_gpus=0
        )
    else:  # a cluster has its resources already; Ray refuses num_cpus when joining one
        init_args["address"] = ray_address
    return {
        "client_resources": {"num_cpus": settings.cpus_per_node, "num_gpus": 0.0},
        "init_args": init_args,
    }


class _QuietFlower(logging.Filter):
    """Drop Flower's deprecation notice for ``run_simulation`` (we call it on purpose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()


@contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Keep the console readable: Flower at WARNING (minus the deprecation), no Ray tips."""
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    flwr_logger = logging.getLogger("flwr")
    flt = _QuietFlower()
    handlers = [h for h in flwr_logger.handlers if isinstance(h, logging.StreamHandler)]
    levels = [h.level for h in handlers]
    propagate = flwr_logger.propagate
    if not verbose:
        for handler in handlers:
            handler.setLevel(max(handler.level, logging.WARNING))
            handler.addFilter(flt)
        # Flower logs at DEBUG and has its own handler; a root handler (Opacus installs one
        # with logging.basicConfig on import) would print every record a second time.
        flwr_logger.propagate = False
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                # Opacus's RDP accountant notes that a larger alpha range could tighten the
                # bound; the reported epsilon is a valid upper bound either way.
                warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            yield
    finally:
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)
            handler.removeFilter(flt)
        flwr_logger.propagate = propagate


class JobGrid(Grid):
    """One job's view of the engine's Grid: its own run id, and only ``node_ids`` (every
    node when None). Messages travel through the engine's Grid unchanged."""

    def __init__(self, grid: Grid, node_ids: Iterable[int] | None, *, run_id: int) -> None:
        self._grid = grid
        self._nodes = None if node_ids is None else frozenset(node_ids)
        self._run_id = run_id

    def set_run(self, run: Run) -> None:
        raise NotImplementedError("A job's grid keeps the engine's run.")

    @property
    def run(self) -> Run:
        return replace(self._grid.run, run_id=self._run_id)

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        ids = self._grid.get_node_ids()
        return list(ids) if self._nodes is None else [n for n in ids if n in self._nodes]

    def get_nodes(self) -> Iterable[NodeInfo]:
        mine = set(self.get_node_ids())
        return [info for info in self._grid.get_nodes() if info.node_id in mine]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return paced_send_and_receive(self._grid, messages, timeout=timeout)


class JobGrids:
    """Hands each job a :class:`JobGrid` over the engine's Grid."""

    def __init__(self, grid: Grid, partitions: Mapping[int, int] | None) -> None:
        self.grid = grid
        self._nodes_of = None
        if partitions is not None:
            self._nodes_of = {partition: node for node, partition in partitions.items()}

    def for_partitions(self, partitions: Sequence[int] | None) -> JobGrid:
        """A grid of the nodes of these partitions (None: every node), with a fresh run id."""
        run_id = int.from_bytes(os.urandom(8), "big") >> 1 or 1
        if partitions is None or self._nodes_of is None:
            return JobGrid(self.grid, None, run_id=run_id)
        return JobGrid(self.grid, [self._nodes_of[p] for p in partitions], run_id=run_id)


def _connected(grid: Grid, count: int, deadline: float) -> list[int]:
    """The engine's nodes once all ``count`` have registered (or at the deadline): the engine
    registers them while its ServerApp starts."""
    nodes = sorted(set(grid.get_node_ids()))
    while len(nodes) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        nodes = sorted(set(grid.get_node_ids()))
    return nodes


def _partitions(grid: Grid, nodes: Sequence[int], deadline: float) -> dict[int, int]:
    """Flower node id -> partition id of every node of the engine (one query each)."""
    count = len(nodes)
    messages = [
        Message(RecordDict(), dst_node_id=n, message_type=PARTITION, group_id="0") for n in nodes
    ]
    found: dict[int, int] = {}
    for reply in grid.send_and_receive(messages, timeout=max(deadline - time.monotonic(), 1.0)):
        if reply.has_error():
            continue
        record = reply.content.config_records.get(PARTITION_KEY, ConfigRecord())
        partition = record.get(PARTITION_KEY)
        if isinstance(partition, int) and not isinstance(partition, bool):
            found[reply.metadata.src_node_id] = partition
    if sorted(found.values()) != list(range(count)):
        raise EngineError(
            f"only {len(found)} of the scenario's {count} nodes said which node they are"
        )
    return found


def run_engine(
    scenario: Scenario,
    nodes: Mapping[int, NodeConfig],
    body: Callable[[JobGrids], None],
    *,
    verbose: bool = False,
    ray_address: str | None = None,
    need_partitions: bool = True,
) -> None:
    """Start the Simulation Engine with ``nodes`` (partition id -> node) as its SuperNodes and
    run ``body`` in its ServerApp; returns when ``body`` has returned and the engine stopped.
    An exception ``body`` raises is raised here. ``need_partitions``: ask every node its
    partition id first (when jobs use only some of the nodes)."""
    from flwr.simulation import run_simulation

    timeout = scenario.settings.node_wait_timeout
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + timeout
        connected = _connected(grid, len(nodes), deadline)
        partitions = None
        if need_partitions:
            if len(connected) < len(nodes):
                raise EngineError(
                    f"only {len(connected)} of the scenario's {len(nodes)} nodes joined the "
                    f"Simulation Engine within {timeout:g} s"
                )
            partitions = _partitions(grid, connected, deadline)
        body(JobGrids(grid, partitions))

    with quiet(verbose), fast_dispatch():
        run_simulation(
            server_app=server_app,
            client_app=make_client_app(nodes),
            num_supernodes=len(nodes),
            backend_config=backend_config(scenario, ray_address=ray_address),
            verbose_logging=verbose,
        )
