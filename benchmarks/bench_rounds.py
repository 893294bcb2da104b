"""Round time in Flower's Simulation Engine with no-op training: SecAgg+ against a plain round.

Run from the repository root::

    .venv/bin/python benchmarks/bench_rounds.py                  # Flower and fedbrain
    .venv/bin/python benchmarks/bench_rounds.py --only flower    # Flower's two rows only
    .venv/bin/python benchmarks/bench_rounds.py --quick          # N = 5, P = 1e4: a sanity run
    .venv/bin/python benchmarks/bench_rounds.py --nodes 1000 --per-round 100 --params 1e5 \
        --rounds 3                                                # cross-device scale

Five ``flwr.simulation.run_simulation`` runs (seven with ``--same-dispatcher``), one after
the other in this process (Ray
backend, ``client_resources.num_cpus = 1``, Ray given every core), each with N virtual nodes
whose training is a no-op (the reply carries the received P float32 values unchanged), so
the round time is the protocol's: messages, serialization, masking, unmasking, aggregation.
Each round samples M of the N nodes (``--per-round``, default all): Flower's strategies with
``fraction = M / N`` and ``min_*_nodes = M``, fedbrain with ``clients_per_round = M``.

1. **Flower SecAgg+**: the legacy path, a ServerApp running ``DefaultWorkflow(fit_workflow=
   SecAggPlusWorkflow(...))`` on a ``LegacyContext`` with the legacy ``FedAvg``; a ClientApp
   from a ``NumPyClient`` whose ``fit`` returns its input, with ``mods=[secaggplus_mod]``.
2. **Flower plain**: the Message API ``flwr.serverapp.strategy.FedAvg`` and a Message API
   ClientApp replying its ``ArrayRecord`` unchanged; once training only, once with a
   federated evaluation of each round's aggregate on M nodes (``fraction_evaluate = M / N``,
   a ClientApp ``evaluate`` answering at once) -- the same work as a fedbrain round.
3. **fedbrain SecAgg+** and 4. **fedbrain plain**: fedbrain's own ServerApp and ClientApp
   (``server.app.make_server_app``, ``clients.app.make_client_app``) with ``privacy_level``
   ``secure-agg`` and ``none`` -- see :func:`fedbrain_run`. Every fedbrain round also
   evaluates its aggregate on the round's nodes (with SecAgg+: a second secure collection).

Flower's rows run in Flower's engine as shipped. fedbrain's run in the engine as ``fedbrain
simulate`` runs it: Flower's Simulation Engine with fedbrain's message dispatcher
(:mod:`simulations.dispatch`: one walk over the message store per 5 ms sweep instead of one
per node per 0.1 s) and its job grid's paced reply pulls. ``--same-dispatcher`` adds
Flower's training-only and SecAgg+ rows in that same engine, to separate the engine's gain
from the protocol's.

Parameters: k = min(N-1, 2*ceil(log2 N)) neighbours and threshold t = k//2 + 1 (fedbrain's
``SecAggParams``: t counts shares among the k+1 holders, the client itself and its k
neighbours). Flower's ``num_shares`` is the size of that same closed neighbourhood: its
workflow links each node to the ``num_shares >> 1`` nodes on either side of it in a shuffled
ring, *including itself* (offset 0), and every client keeps one share of its own secrets; its
``reconstruction_threshold`` counts among those ``num_shares`` shares, as fedbrain's t does.
So ``num_shares = k + 1`` (odd whenever k is even, as Flower wants) and
``reconstruction_threshold = t``: at N = 20, k = 10 -> num_shares = 11, t = 6.

Timing, from the ServerApp's side (its thread runs in this process): for each round the time
from the start of sampling to the aggregated parameters -- Flower SecAgg+: the whole
``fit_workflow`` call (configure_fit, the four stages, aggregate_fit); Flower plain: from
``configure_train`` to the end of ``aggregate_train`` (with evaluation: of
``aggregate_evaluate``); fedbrain: from its ``ROUND_STARTED`` to its ``ROUND_FINISHED``
progress event (which also spans the federator's evaluation and checkpoint, if the job has
them). "fit collection" is the training part alone: fedbrain's ``fit:`` stages, Flower
FedAvg's train step, Flower SecAgg+'s whole round (it does not evaluate). Round 1 carries
the actors' warm-up (imports, first ClientApp construction), so the mean is over rounds 2..R. Each
row also reports max |aggregate - input| (no-op training averages to the input).
"total" is the wall time of the whole ``run_simulation`` call (Ray start and stop included).
"before round 1" is the time from the ServerApp's start to its first round: for fedbrain the
node discovery (every node's ``query.node_info``) and the run's setup, for Flower the
strategy's start; for fedbrain, "of which to the first reply" is the part before any node
answered -- the engine's start (Ray, the actor processes) and the actors' first imports, which
Flower's rows pay inside their round 1 instead. "peak RSS" is the largest sum of the resident
memory of this process and all its descendants (Ray's GCS, raylet and workers), sampled every
0.25 s.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.server.superlink.fleet.vce.backend.backend import BackendConfig
    from flwr.serverapp import ServerApp

    from clients.config import NodeConfig
    from manifests.jobspec import JobSpec
    from tests.support.federation import Federation

FEDBRAIN_UNAVAILABLE = "fedbrain apps not available yet"
FEDBRAIN_DISPATCH = ", in an engine with fedbrain's dispatcher"


class FedbrainUnavailableError(RuntimeError):
    """fedbrain's ServerApp / ClientApp (or the no-op training hook) do not exist yet."""


@dataclass
class RunTiming:
    """One ``run_simulation`` call: per-round seconds (server side) and the whole call."""

    label: str
    family: str  # "Flower" or "fedbrain"
    secure: bool
    fast_dispatch: bool = False  # the engine ran with simulations.dispatch (fedbrain's rows)
    evaluates: bool = False  # each round also evaluates the aggregate on M nodes
    round_seconds: list[float] = field(default_factory=list)
    stage_seconds: dict[str, list[float]] = field(default_factory=dict)
    total_seconds: float = 0.0
    max_error: float = math.nan  # max |aggregate - input|: no-op training averages to the input
    before_first_round: float = math.nan  # ServerApp start -> first round (fedbrain: discovery)
    first_reply: float = math.nan  # ServerApp start -> first reply (engine and actors started)
    peak_rss_gib: float = math.nan  # this process and its descendants
    error: str = ""

    def stage_means(self) -> str:
        """``stage mean`` over rounds 2..R, for the protocol stages that were timed."""
        parts = []
        for stage, seconds in self.stage_seconds.items():
            steady = seconds[1:] or seconds
            parts.append(f"{stage} {sum(steady) / len(steady):.3f}")
        return ", ".join(parts)

    @property
    def fit_seconds(self) -> float:
        """Mean over rounds 2..R of the fit collection: the ``fit:`` stages when the run
        timed them (fedbrain, Flower FedAvg), else the whole round (Flower SecAgg+, which
        does not evaluate)."""
        fit = [seconds for stage, seconds in self.stage_seconds.items() if stage.startswith("fit:")]
        if not fit:
            return self.steady_seconds
        per_round = [sum(values) for values in zip(*fit, strict=False)]
        steady = per_round[1:] or per_round
        return sum(steady) / len(steady) if steady else math.nan

    @property
    def steady_seconds(self) -> float:
        """Mean of rounds 2..R (round 1 alone when R = 1)."""
        steady = self.round_seconds[1:] or self.round_seconds
        return sum(steady) / len(steady) if steady else math.nan


# Rounds are timed on the ServerApp thread, which runs in this process: module-level sinks.
_ROUND_SECONDS: list[float] = []
_STAGE_SECONDS: dict[str, list[float]] = {}
_MAX_ERROR: list[float] = []
_MAIN_STARTED: list[float] = []
_FIRST_ROUND: list[float] = []
_FIRST_REPLY: list[float] = []


class PeakMemory:
    """Samples the summed RSS of this process and its descendants every ``interval`` s."""

    def __init__(self, interval: float = 0.25) -> None:
        import psutil  # type: ignore[import-untyped]

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._process, *self._process.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return self.peak / 2**30


def mark_first_round() -> None:
    if not _FIRST_ROUND:
        _FIRST_ROUND.append(time.perf_counter())


def neighbours_and_threshold(n: int) -> tuple[int, int]:
    """fedbrain's defaults: k = min(N-1, 2*ceil(log2 N)), t = k//2 + 1."""
    k = min(n - 1, 2 * math.ceil(math.log2(n)))
    return k, k // 2 + 1


def initial_vector(p: int) -> NDArray[np.float32]:
    """P float32 values well inside Flower's default clipping range [-8, 8]."""
    return np.random.default_rng(0).normal(0.0, 0.1, p).astype(np.float32)


def backend_config() -> BackendConfig:
    cores = os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "address": "local",  # a fresh Ray here, as fedbrain's engine starts it
            "num_cpus": cores,
            "num_gpus": 0,
            "logging_level": "ERROR",
            "log_to_driver": False,
        },
    }


class _DropDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED" not in record.getMessage()


@contextmanager
def quiet(verbose: bool) -> Iterator[None]:
    """Flower's console at ERROR minus deprecation notices; no Python warnings."""
    if verbose:
        yield
        return
    flwr_logger = logging.getLogger("flwr")
    handlers = list(flwr_logger.handlers)
    levels = [h.level for h in handlers]
    flt = _DropDeprecation()
    for handler in handlers:
        handler.setLevel(max(handler.level, logging.ERROR))
        handler.addFilter(flt)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)
            handler.removeFilter(flt)


@contextmanager
def stage_timer(stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        _STAGE_SECONDS.setdefault(stage, []).append(time.perf_counter() - start)


def simulate(
    timing: RunTiming,
    server_app: ServerApp,
    client_app: ClientApp,
    n: int,
    expected_rounds: int,
    verbose: bool,
) -> RunTiming:
    """One ``run_simulation``; fills ``timing`` from the sinks and the wall clock. With
    ``timing.fast_dispatch`` the engine hands out messages with fedbrain's dispatcher
    (:mod:`simulations.dispatch`, as ``fedbrain simulate`` does); otherwise with Flower's."""
    from contextlib import nullcontext

    from flwr.simulation import run_simulation

    from simulations.dispatch import fast_dispatch

    _ROUND_SECONDS.clear()
    _STAGE_SECONDS.clear()
    _MAX_ERROR.clear()
    _MAIN_STARTED.clear()
    _FIRST_ROUND.clear()
    _FIRST_REPLY.clear()
    start = time.perf_counter()
    try:
        dispatch = fast_dispatch() if timing.fast_dispatch else nullcontext()
        with quiet(verbose), dispatch, PeakMemory() as memory:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=n,
                backend_config=backend_config(),
                verbose_logging=verbose,
            )
    except Exception as error:  # report and go on with the other runs
        timing.error = f"{type(error).__name__}: {error}"
    timing.total_seconds = time.perf_counter() - start
    timing.peak_rss_gib = memory.gib
    if _MAIN_STARTED and _FIRST_ROUND:
        timing.before_first_round = _FIRST_ROUND[0] - _MAIN_STARTED[0]
    if _MAIN_STARTED and _FIRST_REPLY:
        timing.first_reply = _FIRST_REPLY[0] - _MAIN_STARTED[0]
    timing.round_seconds = list(_ROUND_SECONDS)
    timing.stage_seconds = {stage: list(s) for stage, s in _STAGE_SECONDS.items()}
    timing.max_error = _MAX_ERROR[-1] if _MAX_ERROR else timing.max_error
    if not timing.error and len(timing.round_seconds) < expected_rounds:
        timing.error = f"only {len(timing.round_seconds)} of {expected_rounds} rounds completed"
    return timing


# -- (1) Flower SecAgg+ (legacy path) ----------------------------------------------------------
def flower_secagg_run(
    n: int, m: int, p: int, rounds: int, verbose: bool, fast: bool = False
) -> RunTiming:
    from flwr.app import Context
    from flwr.client import Client, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import NDArrays, Scalar, ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
    from flwr.serverapp import Grid, ServerApp

    from simulations.engine import JobGrid

    k, t = neighbours_and_threshold(m)

    class NoOpClient(NumPyClient):
        def fit(
            self, parameters: NDArrays, config: dict[str, Scalar]
        ) -> tuple[NDArrays, int, dict[str, Scalar]]:
            return parameters, 1, {}

    def client_fn(context: Context) -> Client:
        return NoOpClient().to_client()

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])

    class TimedSecAggPlus(SecAggPlusWorkflow):
        """Flower's workflow with each of its four stages timed."""

        def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
            with stage_timer("setup"):
                return super().setup_stage(grid, context, state)

        def share_keys_stage(
            self, grid: Grid, context: LegacyContext, state: WorkflowState
        ) -> bool:
            with stage_timer("share keys"):
                return super().share_keys_stage(grid, context, state)

        def collect_masked_vectors_stage(
            self, grid: Grid, context: LegacyContext, state: WorkflowState
        ) -> bool:
            with stage_timer("masked vectors"):
                return super().collect_masked_vectors_stage(grid, context, state)

        def unmask_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
            with stage_timer("unmask"):
                return super().unmask_stage(grid, context, state)

    secagg = TimedSecAggPlus(num_shares=k + 1, reconstruction_threshold=t)

    def timed_fit(grid: Grid, context: Context) -> None:
        before = context.state.array_records[MAIN_PARAMS_RECORD]
        start = time.perf_counter()
        mark_first_round()
        secagg(grid, context)
        seconds = time.perf_counter() - start
        # The workflow replaces the parameters record only when it aggregated; a halted
        # round is not counted (simulate() then reports the missing rounds).
        if context.state.array_records[MAIN_PARAMS_RECORD] is not before:
            _ROUND_SECONDS.append(seconds)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _MAIN_STARTED.append(time.perf_counter())
        if fast:  # the engine's job grid: replies pulled by simulations.dispatch
            grid = JobGrid(grid, None, run_id=grid.run.run_id)
        strategy = LegacyFedAvg(
            fraction_fit=m / n,
            fraction_evaluate=0.0,
            min_fit_clients=m,
            min_available_clients=n,
            initial_parameters=ndarrays_to_parameters([initial_vector(p)]),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)
        final = legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays()
        _MAX_ERROR.append(float(np.max(np.abs(final[0] - initial_vector(p)))))

    label = f"Flower 1.42 SecAgg+ (`SecAggPlusWorkflow`, num_shares = {k + 1}, t = {t})"
    label += FEDBRAIN_DISPATCH if fast else ""
    timing = RunTiming(label, "Flower", True, fast_dispatch=fast)
    return simulate(timing, server_app, client_app, n, rounds, verbose)


# -- (2) Flower plain FedAvg (Message API) -----------------------------------------------------
def flower_plain_run(
    n: int,
    m: int,
    p: int,
    rounds: int,
    verbose: bool,
    fast: bool = False,
    evaluate: bool = False,
) -> RunTiming:
    """Flower's FedAvg, training only or (``evaluate``) with a federated evaluation of the
    round's aggregate on M nodes after each training step, as fedbrain's rounds do: its round
    then runs from ``configure_train`` to the end of ``aggregate_evaluate``."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from simulations.engine import JobGrid

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        content = RecordDict(
            {"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})}
        )
        return Message(content=content, reply_to=msg)

    @client_app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        metrics = MetricRecord({"num-examples": 1, "loss": 0.0})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    class TimedFedAvg(FedAvg):
        _start = 0.0
        _trained = 0.0

        def configure_train(
            self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
        ) -> list[Message]:
            self._start = time.perf_counter()
            mark_first_round()
            return list(super().configure_train(server_round, arrays, config, grid))

        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            result = super().aggregate_train(server_round, replies)
            self._trained = time.perf_counter()
            _STAGE_SECONDS.setdefault("fit:train", []).append(self._trained - self._start)
            if result[0] is not None and not evaluate:  # count only rounds that aggregated
                _ROUND_SECONDS.append(time.perf_counter() - self._start)
            return result

        def aggregate_evaluate(
            self, server_round: int, replies: Iterable[Message]
        ) -> MetricRecord | None:
            result = super().aggregate_evaluate(server_round, replies)
            now = time.perf_counter()
            if evaluate:
                _STAGE_SECONDS.setdefault("evaluate:evaluate", []).append(now - self._trained)
                if result is not None:
                    _ROUND_SECONDS.append(now - self._start)
            return result

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _MAIN_STARTED.append(time.perf_counter())
        if fast:  # the engine's job grid: replies pulled by simulations.dispatch
            grid = JobGrid(grid, None, run_id=grid.run.run_id)
        strategy = TimedFedAvg(
            fraction_train=m / n,
            fraction_evaluate=m / n if evaluate else 0.0,
            min_train_nodes=m,
            min_evaluate_nodes=m if evaluate else 0,
            min_available_nodes=n,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord([initial_vector(p)]),
            num_rounds=rounds,
        )
        final = result.arrays.to_numpy_ndarrays()
        _MAX_ERROR.append(float(np.max(np.abs(final[0] - initial_vector(p)))))

    label = "Flower 1.42 plain FedAvg (Message API `flwr.serverapp.strategy.FedAvg`)"
    label += ", with federated evaluation" if evaluate else ""
    label += FEDBRAIN_DISPATCH if fast else ""
    timing = RunTiming(label, "Flower", False, fast_dispatch=fast, evaluates=evaluate)
    return simulate(timing, server_app, client_app, n, rounds, verbose)


# -- (3) fedbrain ----------------------------------------------------------------------------
def fedbrain_noop_nodes(
    n: int, p: int, workdir: Path
) -> tuple[Mapping[int, NodeConfig], Federation]:
    """Partition id -> ``clients.node.NodeConfig`` for N provisioned LM nodes with
    ``noop_training``: each answers every message (node info, the SecAgg+ stages, evaluation)
    but trains nothing and contributes a zero update of the model's P values. Each node holds
    a small demo corpus (``node_info`` checks that the data loads) and a kit (identity key,
    signed roster, operator keys; open policy, since the benchmark also runs without SecAgg+)."""
    from clients.demo_data import write_demo_dataset
    from manifests.catalog import NodeType
    from tests.support.federation import provision

    folders: list[Path] = []
    for i in range(n):
        folder = workdir / "data" / f"node-{i}"
        if not (folder / "lm").exists():
            write_demo_dataset("lm", folder / "lm", 40, seed=i)
        folders.append(folder)
    federation = provision(workdir / f"federation-{n}", n, NodeType.INFERENCE)
    configs = {
        pid: replace(config, noop_training=True)
        for pid, config in federation.node_configs(folders).items()
    }
    return configs, federation


def _lm_job(mapping: dict[str, object], hidden: int) -> JobSpec:
    from manifests.jobspec import JobSpec

    return JobSpec.from_mapping({**mapping, "hidden_size": hidden})


def _parameter_count(job: JobSpec) -> int:
    from clients.jobs import model_spec_for_job
    from clients.models import build_model

    model = build_model(model_spec_for_job(job))
    return sum(int(t.numel()) for t in model.parameters())


def fedbrain_job(*, secure: bool, n: int, p: int, rounds: int) -> JobSpec:
    """The job: ``n`` clients per round, ``privacy_level`` ``secure-agg`` with the
    same k and t as Flower's run, or ``none``; a byte-level GPT-2 (gpt-small-v1, 2 layers)
    whose hidden size is chosen so the model has the multiple of 2 heads closest to P values.
    fedbrain always evaluates (the no-op nodes answer at once); checkpoints are off."""
    k, t = neighbours_and_threshold(n)
    mapping: dict[str, object] = {
        "component": "inference",
        "base_model": "gpt-small-v1",
        "task": "lm-finetune",
        "num_layers": 2,
        "num_heads": 2,
        "max_seq_length": 32,
        "checkpoint_interval": rounds + 1,
        "privacy_level": "secure-agg" if secure else "none",
        "federation": {"num_rounds": rounds, "clients_per_round": n},
    }
    if secure:
        mapping["secagg"] = {"num_neighbours": k, "reconstruction_threshold": t}
    low, high = 2, 2048  # hidden sizes (even: 2 heads); the count grows with the size
    while high - low > 2:
        mid = (low + high) // 4 * 2
        if _parameter_count(_lm_job(mapping, mid)) < p:
            low = mid
        else:
            high = mid
    best = min((low, high), key=lambda h: abs(_parameter_count(_lm_job(mapping, h)) - p))
    return _lm_job(mapping, best)


def fedbrain_run(
    *, secure: bool, n: int, m: int, p: int, rounds: int, workdir: Path, verbose: bool
) -> RunTiming:
    """fedbrain's secure-agg (``secure``) or plain round with no-op training.

    Raises :class:`FedbrainUnavailableError` while ``clients.app.make_client_app`` or the
    no-op training hook are missing. The ServerApp runs ``server.federator.run_federation``
    as ``server.app.make_server_app`` does, its start timed. A round is timed
    from the federator's ``ROUND_STARTED`` to its ``ROUND_FINISHED`` progress event (which
    includes its evaluation and checkpoint, if the job has them); stages from the ``STAGE``
    events' own ``seconds``.
    """
    try:
        from clients.app import make_client_app
    except ImportError as error:
        raise FedbrainUnavailableError(str(error)) from error
    from flwr.app import Context, Message
    from flwr.serverapp import Grid, ServerApp

    from server.federator import run_federation
    from server.options import EventKind, JobOutcome, JobStatus, ProgressEvent
    from simulations.engine import JobGrid

    nodes, federation = fedbrain_noop_nodes(n, p, workdir)
    job = fedbrain_job(secure=secure, n=m, p=p, rounds=rounds)
    run_dir = workdir / ("secure" if secure else "plain")
    options = federation.run_options(run_dir, seed=0, min_nodes=n)
    started: dict[int, float] = {}

    def progress(event: ProgressEvent) -> None:
        now = time.perf_counter()
        if event.kind == EventKind.JOB_STARTED:
            mark_first_round()  # discovery and setup are done
        elif event.kind == EventKind.ROUND_STARTED:
            started[event.server_round] = now
        elif event.kind == EventKind.STAGE and "seconds" in event.metrics:
            _STAGE_SECONDS.setdefault(event.stage, []).append(event.metrics["seconds"])
        elif event.kind == EventKind.ROUND_FINISHED and event.server_round in started:
            _ROUND_SECONDS.append(now - started.pop(event.server_round))

    outcomes: list[JobOutcome] = []
    server_app = ServerApp()  # what make_server_app builds, with the start of main() timed

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _MAIN_STARTED.append(time.perf_counter())
        pull = grid.pull_messages

        def timed_pull(message_ids: Iterable[str]) -> Iterable[Message]:
            replies = list(pull(message_ids))
            if replies and not _FIRST_REPLY:
                _FIRST_REPLY.append(time.perf_counter())
            return replies

        grid.pull_messages = timed_pull  # type: ignore[method-assign]
        grid = JobGrid(grid, None, run_id=grid.run.run_id)  # as in simulations.engine
        outcomes.append(run_federation(grid, job, options, progress=progress))

    client_app = make_client_app(nodes)
    k, t = neighbours_and_threshold(m)
    label = f"fedbrain SecAgg+ (k = {k}, t = {t})" if secure else "fedbrain plain (no SecAgg)"
    timing = simulate(  # with fedbrain's engine's message dispatcher (simulations.dispatch)
        RunTiming(label, "fedbrain", secure, fast_dispatch=True, evaluates=True),
        server_app,
        client_app,
        n,
        rounds,
        verbose,
    )
    if not timing.error and outcomes and outcomes[-1].status == JobStatus.FAILED:
        timing.error = "job failed: " + "; ".join(outcomes[-1].reasons)
    return timing


# -- report -----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> str:
    import cryptography
    import flwr
    import ray

    return (
        f"Python {platform.python_version()}, numpy {np.__version__}, flwr {flwr.__version__}, "
        f"ray {ray.__version__}, cryptography {cryptography.__version__}"
    )


def command_line() -> str:
    python = sys.executable
    relative = os.path.relpath(python)
    return shlex.join([python if relative.startswith("..") else relative, *sys.argv])


def print_table(runs: list[RunTiming]) -> None:
    print(
        "| implementation | rounds | mean round 2..R (s) | per round (s) "
        "| fit collection, mean 2..R (s) | total run_simulation (s) "
        "| vs same framework's plain round | before round 1 (s) | of which to the first reply "
        "(s) | peak RSS (GiB) | max abs(aggregate - input) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    ok = [r for r in runs if not r.error]
    plain = {
        (r.family, r.fast_dispatch): r.steady_seconds
        for r in ok
        if not r.secure and (r.family == "fedbrain" or not r.evaluates)
    }
    for r in runs:
        if r.error:
            print(f"| {r.label} | | | error: {r.error} | | {r.total_seconds:.1f} | | | | | |")
            continue
        per = ", ".join(f"{s:.2f}" for s in r.round_seconds)
        own_plain = plain.get((r.family, r.fast_dispatch))
        vs_plain = f"{r.steady_seconds / own_plain:.2f}x" if own_plain else ""
        print(
            f"| {r.label} | {len(r.round_seconds)} | {r.steady_seconds:.3f} | {per} | "
            f"{r.fit_seconds:.3f} | {r.total_seconds:.1f} | {vs_plain} | "
            f"{r.before_first_round:.1f} | {r.first_reply:.1f} | {r.peak_rss_gib:.2f} | "
            f"{r.max_error:.1e} |"
        )
    print(
        "\nfedbrain against each Flower row of the same kind (secure / plain): the whole round, "
        "and the fit collection alone (Flower's training round; fedbrain's fit stages)\n"
    )
    print("| fedbrain row | Flower row | round ratio | fit-collection ratio |")
    print("|---|---|---:|---:|")
    for mine in (r for r in ok if r.family == "fedbrain"):
        for theirs in (r for r in ok if r.family == "Flower" and r.secure == mine.secure):
            print(
                f"| {mine.label} | {theirs.label} | "
                f"{mine.steady_seconds / theirs.steady_seconds:.2f}x | "
                f"{mine.fit_seconds / theirs.fit_seconds:.2f}x |"
            )
    for r in runs:
        if r.stage_seconds and not r.error:
            print(f"\n{r.label}, stages (s, mean of rounds 2..R): {r.stage_means()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("all", "flower", "fedbrain"), default="all")
    parser.add_argument("--nodes", type=int, default=20, help="N, virtual nodes")
    parser.add_argument("--per-round", type=int, default=None, help="M, nodes per round (N)")
    parser.add_argument("--params", type=float, default=1e6, help="P, float32 values")
    parser.add_argument("--rounds", type=int, default=4, help="R; the mean is over 2..R")
    parser.add_argument("--quick", action="store_true", help="N = 5, P = 1e4, 2 rounds")
    parser.add_argument("--verbose", action="store_true", help="Flower's and Ray's logs")
    parser.add_argument(
        "--same-dispatcher",
        action="store_true",
        help="also run Flower's two rows in an engine with fedbrain's message dispatcher",
    )
    args = parser.parse_args()
    n, p, rounds = args.nodes, int(args.params), args.rounds
    if args.quick:
        n, p, rounds = 5, 10_000, 2
    m = min(args.per_round or n, n)
    k, t = neighbours_and_threshold(m)

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # A fresh local Ray for every run: without an address, ray.init() joins the cluster named
    # in /tmp/ray/ray_current_cluster (left by any earlier `ray start --head`, even a dead
    # one), which refuses the num_cpus the backend config passes.
    os.environ.setdefault("RAY_ADDRESS", "local")

    print("# Round time in the Simulation Engine, no-op training\n")
    print(f"Command: `{command_line()}`\n")
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.machine()}; {versions()}\n")
    print(
        f"N = {n} nodes, M = {m} per round, P = {p:.0e} float32 values, R = {rounds} rounds, "
        f"k = {k}, t = {t} "
        f"(Flower num_shares = {k + 1}); Ray: client_resources num_cpus = 1, "
        f"{os.cpu_count()} CPUs\n",
        flush=True,
    )

    load_before = os.getloadavg()
    runs: list[RunTiming] = []
    if args.only in ("all", "flower"):
        runs.append(flower_plain_run(n, m, p, rounds, args.verbose))
        runs.append(flower_plain_run(n, m, p, rounds, args.verbose, evaluate=True))
        runs.append(flower_secagg_run(n, m, p, rounds, args.verbose))
        if args.same_dispatcher:
            runs.append(flower_plain_run(n, m, p, rounds, args.verbose, fast=True))
            runs.append(flower_secagg_run(n, m, p, rounds, args.verbose, fast=True))
    if args.only in ("all", "fedbrain"):
        with tempfile.TemporaryDirectory(prefix="bench_rounds_") as tmp:
            try:
                for secure in (False, True):
                    runs.append(
                        fedbrain_run(
                            secure=secure,
                            n=n,
                            m=m,
                            p=p,
                            rounds=rounds,
                            workdir=Path(tmp),
                            verbose=args.verbose,
                        )
                    )
            except FedbrainUnavailableError as error:
                print(f"{FEDBRAIN_UNAVAILABLE} ({error})\n")
    print_table(runs)
    load_after = os.getloadavg()
    print(
        f"\nLoad average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in load_after)}"
    )


if __name__ == "__main__":
    main()
