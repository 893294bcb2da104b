"""The federator-agg round loop: one job, any Flower ``Grid`` (simulation, deployment, local).

:func:`run_federation` uses only the Grid API (``get_node_ids``, ``send_and_receive``) and the
wire contract of :mod:`clients.protocol`, so the same code runs on Flower's Simulation Engine,
on a SuperLink and on :class:`server.local_grid.LocalGrid`.

A run:

1. Waits (at most ``options.node_wait_timeout``) for enough nodes, asks every node
   ``query.node_info`` and keeps those that say they are eligible, have the job's node type and
   build the same model (``model_fingerprint``); refusals are logged and written to
   ``<run_dir>/nodes.json``. The eligible nodes are the run's fixed population.
2. Builds the initial global model (encoder jobs, seeded by ``options.seed``); sensing jobs
   have a statistics vector instead.
3. Each round: checks the privacy budget and composes the round's event *before* the round
   runs, samples the round's nodes (uniform ``clients_per_round`` / ``fraction`` of the
   population, or Poisson with rate ``fraction``), collects the nodes' contributions (plainly
   with ``train.fit``, or through the four SecAgg+ stages), aggregates, applies the server
   optimizer, evaluates (``evaluate.eval``), scores the round (result-aggregator), records it in
   the ledger and writes a checkpoint when due.
4. Judges the run (:class:`aggregation.reliability.RunVerdict`) and, when it passes, builds the
   artifact (:mod:`server.artifact`).

Privacy levels (``C``: clipping norm; ``sigma``: noise multiplier, noise std = sigma * C):

- ``none``: nodes send their updates (clipped to ``dp.clipping_norm`` when one is set);
  ``federation.robust_aggregation`` combines them (weighted by example count); no accounting.
- ``dp``, unit ``node`` (DP-FedAvg, McMahan et al. 2018): nodes clip their update to
  ``C = dp.clipping_norm``; the server re-clips (it sees the updates), sums, adds
  ``N(0, (sigma C)^2)`` and divides by the expected count ``m`` (``clients_per_round``, or
  ``fraction * population``). ``sigma`` is ``dp.noise_multiplier`` or calibrated for
  ``dp.target_epsilon`` at ``dp.delta`` over ``num_rounds`` rounds at ``q = m / population``.
  One ``SubsampledGaussianEvent(sigma, q)`` per round. Only ``mean`` aggregation.
- unit ``example`` (``dp`` or ``dp+secure-agg``; DP-SGD, Abadi et al. 2016): nodes run Opacus
  with ``dp_max_grad_norm = dp.clipping_norm`` and ``dp_noise_multiplier = sigma``, either given
  or calibrated for the target over every local step of the run of the *worst* eligible node
  (``rounds * epochs * ceil(n / batch_size)`` steps at rate ``1 / ceil(n / batch_size)``, the
  rate Opacus uses; the distinct example counts are tried and the largest epsilon wins). The
  server composes that worst node's round event every round, whether or not it was sampled
  (conservative), and refuses a round past the budget; the run's epsilon is the larger of that
  bound and the largest ``example_epsilon`` a node reported (a restarted node under-reports).
  Nodes still clip the whole update to ``C_update = secagg.quantization_range`` if set, else
  ``dp.clipping_norm`` (the update's scale is unrelated to the per-example gradient bound: set
  the range when updates are large); the server adds no noise.
- ``secure-agg`` / ``dp+secure-agg``: the SecAgg+ stages ``train.secagg_advertise``,
  ``train.secagg_share``, ``train.secagg_masked`` (with the weights; nodes train then mask),
  ``train.secagg_unmask``. Each node masks :func:`clients.protocol.summable_vector` (sensing:
  its statistics vector); the server only ever holds masked vectors and their sum. Missing
  and error replies are dropouts; :class:`aggregation.secagg.SecAggAbortedError` aborts the
  round (recorded with its reason; the run goes on unless ``options.stop_on_aborted_round``).
  Parameters: ``k = secagg.num_neighbours`` or ``min(n - 1, ceil(2 log2 n))``, ``t =
  secagg.reconstruction_threshold`` or ``max(2, (k + 1) // 2 + 1)``, quantization range
  ``c = max(C, 1)`` (so the 0/1 ``was_clipped`` coordinate survives) or
  ``secagg.quantization_range``. ``secure-agg`` without a clipping norm clips updates to
  ``secagg.quantization_range`` (default 10). Then the sum is split from its two trailing
  statistics; ``dp+secure-agg`` unit node noises it as above; the mean is taken over ``m``
  (node DP) or over the contributors (otherwise).
- Sensing jobs (federated analytics): the (secure) sum of the nodes' statistics vectors
  (:func:`clients.node.sensing_contribution`: per example a vector in [0, 1]^L, clipped to
  ``C``), plus ``N(0, (sigma C)^2)`` under DP -- unit ``example`` only: one example moves the
  sum by at most ``C``, while a node's whole sum grows with its data, so unit ``node`` is
  refused. One subsampled-Gaussian event ``(sigma, q)`` per round; SecAgg+ range
  ``c = n_max * min(1, C)`` (``n_max``: the largest node's example count); sums of several
  rounds add up, and the normalizer comes from the total at the end
  (:func:`clients.node.normalizer_from_sum`). No evaluation round.

Per-round seeds derive from ``options.seed`` (sampling, SecAgg+ labelling, nodes' round seeds);
DP noise comes from :func:`aggregation.dp.secure_generator` unless
``options.deterministic_noise``.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Final, TypeAlias

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from numpy.typing import NDArray

from aggregation.accountant import (
    PrivacyAccountant,
    PrivacyBudgetExceededError,
    SubsampledGaussianEvent,
    compute_epsilon,
)
from aggregation.dp import (
    CentralDP,
    ClipStats,
    DPMeasurement,
    DPState,
    FixedClipping,
    calibrate_noise_multiplier,
    clip_update,
    secure_generator,
)
from aggregation.reliability import RoundObservation, RoundReliability, RunVerdict, score_round
from aggregation.robust import make_aggregator
from aggregation.secagg import (
    SecAggAbortedError,
    SecAggError,
    SecAggMessage,
    SecAggParams,
    ServerSession,
    Stage,
    dequantize_sum,
    message_from_record,
)
from aggregation.secagg.server import MessageHook
from aggregation.server_opt import (
    FedAvg,
    ServerOptimizer,
    ServerOptState,
    make_server_optimizer,
)
from aggregation.types import Measurements
from clients import node as node_logic
from clients import protocol as wire
from clients.models import build_model, get_weights, model_fingerprint, weight_names
from manifests.catalog import Task
from manifests.confighash import training_config_hash
from manifests.jobspec import DpUnit, JobSpec, PrivacyLevel, RobustAggregation, Sampling
from manifests.manifest import DPParameters, Provenance, Reliability, SecAggParameters
from server.artifact import build_artifact, software_versions
from server.checkpoint import (
    Checkpoint,
    CheckpointPolicy,
    ResumePoint,
    discard_checkpoints_after,
    resume_point,
    write_accountant_state,
    write_checkpoint,
)
from server.ledger import (
    Ledger,
    Participant,
    ParticipantOutcome,
    Phase,
    RoundRecord,
    RoundStatus,
    RunStatus,
)
from server.options import EventKind, JobOutcome, JobStatus, ProgressEvent, RunOptions

__all__ = [
    "NODES_FILE",
    "PrivacyPlan",
    "SamplingPlan",
    "is_sensing",
    "plan_privacy",
    "run_federation",
    "secagg_params",
]

logger = logging.getLogger(__name__)

ProgressCallback: TypeAlias = Callable[[ProgressEvent], None]
F32: TypeAlias = NDArray[np.float32]
F64: TypeAlias = NDArray[np.float64]

NODES_FILE: Final = "nodes.json"
DEFAULT_SECURE_RANGE: Final = 10.0
"""Update bound of ``secure-agg`` jobs that set neither a clipping norm nor a range."""
_ACCOUNTANT_KIND: Final = "rdp"
_STATS_TAIL: Final = 2  # summable_vector's was_clipped and pre-clip norm
_SENSING_TASKS: Final = frozenset({Task.PREPROC, Task.NORMALIZER})
_STATS_HI: Final = "statistics.hi"
_STATS_LO: Final = "statistics.lo"


class _Seed(IntEnum):
    """Domain tags of the per-round random streams derived from ``options.seed``."""

    SAMPLING = 1
    SECAGG = 2
    NODE = 3
    NOISE = 4


def _stream(seed: int, round_number: int, tag: _Seed) -> np.random.Generator:
    """The round's random stream for one purpose (independent of every other stream)."""
    return np.random.default_rng(np.random.SeedSequence([seed, round_number, int(tag)]))


def is_sensing(job: JobSpec) -> bool:
    """Whether the job is federated analytics (a statistics vector, no model)."""
    return job.task in _SENSING_TASKS


# =========================================================================== plans


@dataclass(frozen=True)
class SamplingPlan:
    """How each round's nodes are drawn from the run's fixed ``population``.

    Uniform: ``count`` distinct nodes (``clients_per_round``, else ``ceil(fraction * N)``, else
    all). Poisson: each node independently with probability ``rate``. ``rate`` is the
    per-round probability of a node taking part (``count / N`` for uniform: the customary
    approximation the accountant uses)."""

    population: tuple[int, ...]
    method: Sampling
    count: int
    rate: float

    @classmethod
    def for_job(cls, job: JobSpec, population: Sequence[int]) -> SamplingPlan:
        fed = job.federation
        nodes = tuple(sorted(population))
        size = len(nodes)
        if size == 0:
            raise ValueError("The population is empty: no eligible node to sample from.")
        if fed.sampling is Sampling.POISSON:
            rate = float(fed.fraction or 1.0)
            return cls(nodes, Sampling.POISSON, max(1, round(rate * size)), rate)
        if fed.clients_per_round is not None:
            count = fed.clients_per_round
        elif fed.fraction is not None:
            count = max(1, math.ceil(fed.fraction * size))
        else:
            count = size
        if count > size:
            raise ValueError(
                f"federation.clients_per_round is {count} but only {size} eligible nodes "
                "joined; lower it or add nodes."
            )
        return cls(nodes, Sampling.UNIFORM, count, count / size)

    @property
    def expected_count(self) -> float:
        """The expected number of sampled nodes (the DP-FedAvg denominator)."""
        if self.method is Sampling.POISSON:
            return self.rate * len(self.population)
        return float(self.count)

    def sample(self, rng: np.random.Generator) -> list[int]:
        """One round's nodes (sorted)."""
        if self.method is Sampling.POISSON:
            keep = rng.random(len(self.population)) < self.rate
            return [n for n, k in zip(self.population, keep, strict=True) if k]
        chosen = rng.choice(len(self.population), size=self.count, replace=False)
        return sorted(self.population[int(i)] for i in chosen)


@dataclass(frozen=True)
class PrivacyPlan:
    """The privacy mechanics of a run (see the module docstring for each level).

    ``update_clipping_norm``: the bound nodes clip their update (or statistics) to, sent as
    ``RoundConfig.clipping_norm`` (0: no clipping). ``central_noise_multiplier``: sigma of the
    server's Gaussian noise on the sum (0: none). ``dp_sgd_noise_multiplier`` and
    ``dp_max_grad_norm``: the nodes' Opacus parameters (0: no DP-SGD). ``event``: what the
    accountant composes before every round (None: no DP). ``quantization_range``: SecAgg+'s
    per-coordinate range c.
    """

    level: PrivacyLevel
    unit: DpUnit | None
    update_clipping_norm: float
    central_noise_multiplier: float = 0.0
    dp_sgd_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 0.0
    delta: float | None = None
    epsilon_budget: float | None = None
    event: SubsampledGaussianEvent | None = None
    quantization_range: float = 1.0
    notes: tuple[str, ...] = ()

    @property
    def dp_clipping_norm(self) -> float:
        """The C of the DP guarantee (per node for unit node, per example for unit example)."""
        return self.dp_max_grad_norm if self.dp_sgd_noise_multiplier else self.update_clipping_norm

    @property
    def dp_noise_multiplier(self) -> float:
        """The sigma of the DP guarantee."""
        return self.dp_sgd_noise_multiplier or self.central_noise_multiplier


def _steps_per_round(job: JobSpec, num_examples: int) -> tuple[float, int]:
    """(Opacus sample rate, optimizer steps) of one round of DP-SGD on ``num_examples``."""
    batches = max(1, math.ceil(num_examples / job.batch_size))
    return 1.0 / batches, job.epochs * batches


def _target(job: JobSpec) -> float:
    if job.dp.target_epsilon is None:
        raise ValueError("dp: give dp.noise_multiplier or dp.target_epsilon to calibrate it.")
    return job.dp.target_epsilon


def _central_sigma(job: JobSpec, sample_rate: float) -> tuple[float, tuple[str, ...]]:
    """The server's noise multiplier: ``dp.noise_multiplier``, or calibrated for
    ``dp.target_epsilon`` at ``dp.delta`` over the planned rounds at ``sample_rate``."""
    dp = job.dp
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier, ()
    if dp.delta is None:
        raise ValueError("dp.delta: is required to calibrate the noise multiplier.")
    rounds, target = job.federation.num_rounds, _target(job)
    sigma = calibrate_noise_multiplier(
        target_epsilon=target,
        target_delta=dp.delta,
        sample_rate=sample_rate,
        rounds=rounds,
        accountant=_ACCOUNTANT_KIND,
    )
    return sigma, (
        f"noise multiplier {sigma:.4g} calibrated for epsilon {target:g} at delta "
        f"{dp.delta:g} over {rounds} rounds at sample rate {sample_rate:.4g}",
    )


def _budget(job: JobSpec) -> float | None:
    """The epsilon the run must not pass: ``dp.epsilon_budget``, else ``dp.target_epsilon``."""
    dp = job.dp
    return dp.epsilon_budget if dp.epsilon_budget is not None else dp.target_epsilon


def _plan_sensing(
    job: JobSpec, sampling: SamplingPlan, *, num_examples: Sequence[int]
) -> PrivacyPlan:
    """Sensing: each example adds a vector in [0, 1]^L clipped to C, so a node's sum has
    coordinates in [0, n * min(1, C)]: the SecAgg+ range is the largest node's."""
    level, dp = job.privacy_level, job.dp
    largest = max([1, *num_examples])
    secure_range = job.secagg.quantization_range
    if not level.uses_dp:
        c = dp.clipping_norm or 0.0
        per_example = min(1.0, c) if c > 0 else 1.0
        return PrivacyPlan(
            level, None, c, quantization_range=secure_range or max(1.0, largest * per_example)
        )
    if dp.unit is not DpUnit.EXAMPLE:
        raise ValueError(
            "dp.unit: a sensing node bounds each example's contribution (by dp.clipping_norm), "
            "not its whole statistics sum, so sensing jobs protect one example: set "
            "dp.unit = example. Found node."
        )
    if dp.clipping_norm is None or dp.delta is None:
        raise ValueError(f"privacy_level {level} needs dp.clipping_norm and dp.delta.")
    c = dp.clipping_norm
    sigma, notes = _central_sigma(job, sampling.rate)
    return PrivacyPlan(
        level,
        DpUnit.EXAMPLE,
        c,
        central_noise_multiplier=sigma,
        delta=dp.delta,
        epsilon_budget=_budget(job),
        event=SubsampledGaussianEvent(noise_multiplier=sigma, sample_rate=sampling.rate),
        quantization_range=secure_range or max(1.0, largest * min(1.0, c)),
        notes=notes,
    )


def plan_privacy(
    job: JobSpec, sampling: SamplingPlan, *, num_examples: Sequence[int]
) -> PrivacyPlan:
    """Work out C, sigma, the accountant's event and the SecAgg+ range for ``job``.

    ``num_examples``: the eligible nodes' example counts (example-level DP and sensing).
    Raises ``ValueError`` for a job the server cannot run (robust aggregation with node DP,
    sensing with node DP, a missing DP parameter).
    """
    if is_sensing(job):
        return _plan_sensing(job, sampling, num_examples=num_examples)
    level, dp = job.privacy_level, job.dp
    secure_range = job.secagg.quantization_range
    if not level.uses_dp:
        if not level.uses_secure_agg:
            return PrivacyPlan(level, None, dp.clipping_norm or 0.0)
        bound = dp.clipping_norm or secure_range or DEFAULT_SECURE_RANGE
        notes: tuple[str, ...] = ()
        if not (dp.clipping_norm or secure_range):
            notes = (
                "no dp.clipping_norm or secagg.quantization_range given: updates are clipped "
                f"to {DEFAULT_SECURE_RANGE:g}",
            )
        return PrivacyPlan(
            level, None, bound, quantization_range=secure_range or max(bound, 1.0), notes=notes
        )
    if dp.clipping_norm is None or dp.delta is None:
        raise ValueError(f"privacy_level {level} needs dp.clipping_norm and dp.delta.")
    c, delta = dp.clipping_norm, dp.delta
    if dp.unit is DpUnit.NODE:
        if job.federation.robust_aggregation is not RobustAggregation.MEAN:
            raise ValueError(
                f"federation.robust_aggregation: {job.federation.robust_aggregation} cannot be "
                "combined with node-level DP (the noise is calibrated to a sum of clipped "
                "updates). Use mean, or dp.unit = example."
            )
        sigma, notes = _central_sigma(job, sampling.rate)
        return PrivacyPlan(
            level,
            DpUnit.NODE,
            c,
            central_noise_multiplier=sigma,
            delta=delta,
            epsilon_budget=_budget(job),
            event=SubsampledGaussianEvent(noise_multiplier=sigma, sample_rate=sampling.rate),
            quantization_range=secure_range or max(c, 1.0),
            notes=notes,
        )
    counts = sorted({n for n in num_examples if n > 0})
    if not counts:
        raise ValueError(
            "example-level DP needs every node's number of examples (node_info.num_examples); "
            "no eligible node reported any."
        )
    rounds = job.federation.num_rounds
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
        notes = ()
    else:
        target = _target(job)
        sigma = max(
            calibrate_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=_steps_per_round(job, n)[0],
                rounds=rounds * _steps_per_round(job, n)[1],
                accountant=_ACCOUNTANT_KIND,
            )
            for n in counts
        )
        notes = (
            f"DP-SGD noise multiplier {sigma:.4g} calibrated for epsilon {target:g} at delta "
            f"{delta:g} over {rounds} rounds for the worst of the example counts {counts}",
        )

    def event_for(n: int) -> SubsampledGaussianEvent:
        rate, steps = _steps_per_round(job, n)
        return SubsampledGaussianEvent(noise_multiplier=sigma, sample_rate=rate, steps=steps)

    worst = max(counts, key=lambda n: compute_epsilon([event_for(n)] * rounds, delta=delta))
    update_bound = secure_range or c
    return PrivacyPlan(
        level,
        DpUnit.EXAMPLE,
        update_bound,
        dp_sgd_noise_multiplier=sigma,
        dp_max_grad_norm=c,
        delta=delta,
        epsilon_budget=_budget(job),
        event=event_for(worst),
        quantization_range=secure_range or max(update_bound, 1.0),
        notes=(*notes, f"accounted for the worst node ({worst} examples) every round"),
    )


def secagg_params(
    job: JobSpec, *, num_clients: int, vector_length: int, clipping_range: float
) -> SecAggParams:
    """SecAgg+ parameters of one round (defaults in the module docstring).

    ``k`` never exceeds ``num_clients - 1`` (a round smaller than planned masks with everyone);
    a threshold that does not fit (``t > k + 1``) or fewer than 2 clients is a ValueError.
    """
    if job.secagg.quantization_bits != 32:
        raise ValueError(
            "secagg.quantization_bits: fedbrain's SecAgg+ sums in Z_(2^32), so values are "
            f"quantized with 32 bits; leave it at 32. Found {job.secagg.quantization_bits}."
        )
    k = job.secagg.num_neighbours
    if k is None:
        k = max(1, math.ceil(2 * math.log2(max(num_clients, 2))))
    k = max(1, min(k, num_clients - 1))  # a small (Poisson) round: everyone is a neighbour
    t = job.secagg.reconstruction_threshold
    if t is None:
        t = max(2, (k + 1) // 2 + 1)
    return SecAggParams(
        num_clients=num_clients,
        num_neighbours=k,
        threshold=t,
        vector_length=vector_length,
        clipping_range=float(clipping_range),
    )


# =========================================================================== model state


@dataclass
class _Model:
    """The global state the rounds update: model weights, or a sensing statistics sum."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    weights: list[F32]
    fingerprint: str
    statistics: F64 | None = None  # sensing: the running (noised) sum of statistics vectors

    @property
    def size(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)

    def tensors(self) -> dict[str, F32]:
        return dict(zip(self.names, self.weights, strict=True))

    def checkpoint_tensors(self) -> dict[str, F32]:
        if self.statistics is None:
            return self.tensors()
        hi = self.statistics.astype(np.float32)
        lo = (self.statistics - hi.astype(np.float64)).astype(np.float32)
        return {_STATS_HI: hi, _STATS_LO: lo}

    def restore(self, tensors: Mapping[str, F32]) -> None:
        if self.statistics is not None:
            self.statistics = tensors[_STATS_HI].astype(np.float64) + tensors[_STATS_LO].astype(
                np.float64
            )
            return
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"The checkpoint lacks weights {missing[:3]}: another model?")
        self.weights = [np.asarray(tensors[n], dtype=np.float32) for n in self.names]


def _initial_model(job: JobSpec, seed: int) -> _Model:
    """The model the nodes start from (random init seeded by ``seed``), or for a sensing job
    an all-zero statistics sum."""
    if is_sensing(job):
        length = node_logic.sensing_vector_length(job)
        return _Model([], [], [], "", statistics=np.zeros(length, dtype=np.float64))
    spec = node_logic.model_spec_for_job(job)
    model = build_model(spec, seed=seed)
    weights = get_weights(model)
    return _Model(
        weight_names(model), [tuple(w.shape) for w in weights], weights, model_fingerprint(spec)
    )


# =========================================================================== a round


@dataclass
class _RoundState:
    number: int
    sampled: list[int]
    started: float
    participants: dict[tuple[Phase, int], Participant] = field(default_factory=dict)
    dropped_by_stage: Counter[str] = field(default_factory=Counter)
    contributors: list[int] = field(default_factory=list)
    train_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    eval_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    measurements: Measurements = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    abort_reason: str | None = None
    update_norm: float | None = None
    noise_to_signal: float | None = None


def _metrics_of(content: RecordDict) -> dict[str, float]:
    record = content.metric_records.get(wire.METRICS, MetricRecord())
    out: dict[str, float] = {}
    for key in wire.METRIC_KEYS:
        value = record.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = float(value)
    return out


def _weighted(rows: Iterable[Mapping[str, float]], key: str) -> tuple[float | None, float | None]:
    """(mean weighted by num_examples, population std) of ``key`` over rows that have it."""
    pairs = [(r[key], r.get(wire.NUM_EXAMPLES, 0.0)) for r in rows if key in r]
    if not pairs:
        return None, None
    values = np.array([v for v, _ in pairs], dtype=np.float64)
    weights = np.array([w for _, w in pairs], dtype=np.float64)
    mean = float(np.average(values, weights=weights)) if weights.sum() > 0 else float(values.mean())
    return mean, float(values.std())


# =========================================================================== the federation


@dataclass(frozen=True)
class _Setup:
    """What a run decided before its first round."""

    sampling: SamplingPlan
    plan: PrivacyPlan
    optimizer: ServerOptimizer
    central: CentralDP | None  # server-side Gaussian noise (node DP, sensing DP)
    accountant: PrivacyAccountant | None
    secagg: SecAggParams | None  # SecAgg+ parameters of a full-size round


class _Stop(Exception):  # noqa: N818 -- control flow, not an error
    """End the round loop early (budget exhausted, aborted round with stop_on_aborted_round)."""

    def __init__(self, reason: str, *, failed: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failed = failed


class _Federation:
    def __init__(
        self,
        grid: Grid,
        job: JobSpec,
        options: RunOptions,
        progress: ProgressCallback | None,
        secagg_hook: MessageHook | None,
    ) -> None:
        self.grid = grid
        self.job = job
        self.options = options
        self.progress = progress
        self.secagg_hook = secagg_hook
        self.sensing = is_sensing(job)
        self.level = job.privacy_level
        self.config_hash = training_config_hash(job.training_config())
        self.run_dir = Path(options.run_dir)
        self.started_at = datetime.now(UTC)
        self.artifact_name = job.resolve_artifact_name(created_at=self.started_at)
        self.job_record = ConfigRecord(dict(job.to_run_config()))
        self.node_types: dict[int, str] = {}
        self.reliabilities: list[RoundReliability] = []
        self.previous: RoundObservation | None = None
        self.participants_per_round: list[int] = []
        self.rounds_completed = 0
        self.aborted_rounds = 0
        self.epsilon: float | None = None
        self.notes: list[str] = []
        self.last_metrics: dict[str, float] = {}
        self.secagg_used: SecAggParams | None = None
        self.dp_state: DPState | None = None
        self.run_id = ""
        self.resume_from: ResumePoint | None = None
        self.last_message = ""

    # ------------------------------------------------------------------ helpers

    def emit(
        self,
        kind: EventKind,
        *,
        server_round: int = 0,
        stage: str = "",
        metrics: Mapping[str, float] | None = None,
        message: str = "",
    ) -> None:
        if self.progress is None:
            return
        self.progress(
            ProgressEvent(
                kind=kind,
                artifact_name=self.artifact_name,
                server_round=server_round,
                num_rounds=self.job.federation.num_rounds,
                stage=stage,
                metrics=dict(metrics or {}),
                message=message,
            )
        )

    def send(
        self, messages: Sequence[Message], *, timeout: float | None = None
    ) -> dict[int, Message]:
        """Send a batch; the valid replies by sender (error replies included)."""
        if not messages:
            return {}
        expected = {m.metadata.dst_node_id for m in messages}
        wait = self.options.round_timeout if timeout is None else timeout
        replies: dict[int, Message] = {}
        for reply in self.grid.send_and_receive(messages, timeout=wait):
            sender = reply.metadata.src_node_id
            if sender not in expected or sender in replies:
                logger.warning("Ignoring an unexpected or duplicate reply from node %s.", sender)
                continue
            replies[sender] = reply
        return replies

    def message(
        self, node: int, message_type: str, content: RecordDict, server_round: int
    ) -> Message:
        return Message(
            content, dst_node_id=node, message_type=message_type, group_id=str(server_round)
        )

    # ------------------------------------------------------------------ entry point

    def run(self) -> JobOutcome:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ledger = (
            Ledger(self.options.database_url)
            if self.options.database_url
            else Ledger.for_run_dir(self.run_dir)
        )
        try:
            return self._run(ledger)
        finally:
            ledger.close()

    def _run(self, ledger: Ledger) -> JobOutcome:
        start_round = self._open_run(ledger)
        try:
            return self._train(ledger, start_round)
        except _Stop as stop:
            return self._finish_failed(ledger, stop.reason, aborted=not stop.failed)
        except Exception as exc:
            logger.exception("Run %s failed.", self.run_id)
            self._finish_failed(ledger, f"{type(exc).__name__}: {exc}", aborted=False, emit=False)
            raise

    # ------------------------------------------------------------------ opening

    def _open_run(self, ledger: Ledger) -> int:
        """Start the run in the ledger, or reopen it at its last checkpoint (resume).

        Returns the first round to run. A resume with nothing to resume (no unfinished run of
        this job in the ledger) starts a new run.
        """
        options, job = self.options, self.job
        if options.resume:
            run_id = options.run_id or self._unfinished_run_id(ledger)
            if run_id is not None and run_id in {r.run_id for r in ledger.list_runs()}:
                self.run_id = run_id
                point = resume_point(self.run_dir, training_config_hash=self.config_hash)
                self.resume_from = point
                done = 0 if point is None or point.checkpoint is None else point.checkpoint.round
                discard_checkpoints_after(self.run_dir, done)
                deleted = ledger.resume_run(run_id, from_round=done)
                for record in ledger.rounds(run_id):
                    self._replay(record)
                self.notes.append(
                    f"resumed run {run_id} after round {done}"
                    + (f" ({deleted} later round(s) are run again)" if deleted else "")
                )
                logger.info(self.notes[-1])
                return done + 1
            self.notes.append("resume: nothing to resume in this run directory; new run")
        self.run_id = options.run_id or (
            f"run-{self.started_at:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        )
        ledger.start_run(
            run_id=self.run_id,
            artifact_name=self.artifact_name,
            job=dict(job.to_run_config()),
            privacy_level=self.level.value,
            run_name=job.run_name,
            dp_unit=job.dp.unit.value if self.level.uses_dp else None,
            started_at=self.started_at,
        )
        return 1

    def _unfinished_run_id(self, ledger: Ledger) -> str | None:
        """The newest run of this job in the ledger that did not complete, if any."""
        config = dict(self.job.to_run_config())
        for run in ledger.list_runs():  # newest first
            if dict(run.job) == config:
                return None if run.status is RunStatus.COMPLETED else run.run_id
        return None

    # ------------------------------------------------------------------ nodes

    def _needed_nodes(self) -> int:
        fed = self.job.federation
        floor = 2 if self.level.uses_secure_agg else 1
        return max(floor, self.options.min_nodes or fed.clients_per_round or floor)

    def _wait_for_nodes(self, needed: int) -> list[int]:
        deadline = time.monotonic() + self.options.node_wait_timeout
        while True:
            ids = sorted(set(self.grid.get_node_ids()))
            now = time.monotonic()
            if len(ids) >= needed or now >= deadline:
                return ids
            time.sleep(min(1.0, deadline - now))

    def _eligible_nodes(self, model: _Model) -> tuple[list[int], dict[int, int]]:
        needed = self._needed_nodes()
        connected = self._wait_for_nodes(needed)
        if len(connected) < needed:
            raise _Stop(
                f"only {len(connected)} node(s) connected within "
                f"{self.options.node_wait_timeout:g} s; the job needs at least {needed}",
                failed=True,
            )
        content = RecordDict({wire.JOB: self.job_record})
        replies = self.send([self.message(n, wire.NODE_INFO, content, 0) for n in connected])
        wanted_type = self.job.resolved_node_type.value
        eligible: list[int] = []
        examples: dict[int, int] = {}
        refused: dict[int, str] = {}
        for node in connected:
            reply = replies.get(node)
            reason = None
            info = None
            if reply is None:
                reason = "did not answer query.node_info in time"
            elif reply.has_error():
                reason = f"query.node_info failed: {reply.error.reason}"
            else:
                try:
                    info = wire.NodeInfo.from_record(
                        reply.content.config_records[wire.NODE_INFO_RECORD]
                    )
                except (KeyError, ValueError) as exc:
                    reason = f"malformed node_info: {exc}"
            if info is not None:
                if not info.eligible:
                    reason = f"not eligible: {info.reason or 'no reason given'}"
                elif info.node_type != wanted_type:
                    reason = f"node type {info.node_type!r}, the job needs {wanted_type!r}"
                elif info.model_fingerprint != model.fingerprint:
                    reason = (
                        f"model fingerprint {info.model_fingerprint or '(none)'} differs from "
                        f"the server's {model.fingerprint or '(none)'}"
                    )
                elif (
                    self.level.uses_dp
                    and self.job.dp.unit is DpUnit.EXAMPLE
                    and not self.sensing
                    and info.num_examples < 1
                ):
                    reason = "reported no training examples (example-level DP needs the count)"
            if reason is not None:
                refused[node] = reason
                logger.warning("Node %s refused: %s", node, reason)
                continue
            if info is None:  # unreachable: no reason means the reply parsed
                continue
            eligible.append(node)
            examples[node] = info.num_examples
            self.node_types[node] = info.node_type
        self._write_nodes_file(eligible, examples, refused)
        minimum = max(
            2 if self.level.uses_secure_agg else 1,
            self.job.federation.clients_per_round or 1,
        )
        if len(eligible) < minimum:
            detail = "; ".join(f"node {n}: {r}" for n, r in sorted(refused.items()))
            raise _Stop(
                f"only {len(eligible)} eligible node(s) of {len(connected)} connected; the job "
                f"needs {minimum}" + (f" (refused: {detail})" if detail else ""),
                failed=True,
            )
        return eligible, examples

    def _write_nodes_file(
        self, eligible: Sequence[int], examples: Mapping[int, int], refused: Mapping[int, str]
    ) -> None:
        document = {
            "run_id": self.run_id,
            "eligible": [{"node_id": n, "num_examples": examples[n]} for n in eligible],
            "refused": [{"node_id": n, "reason": r} for n, r in sorted(refused.items())],
        }
        (self.run_dir / NODES_FILE).write_text(json.dumps(document, indent=2) + "\n", "utf-8")

    # ------------------------------------------------------------------ training

    def _setup(self, model: _Model) -> _Setup:
        """Population, sampling, privacy plan, optimizer and accountant of the run."""
        job = self.job
        population, examples = self._eligible_nodes(model)
        sampling = SamplingPlan.for_job(job, population)
        try:
            plan = plan_privacy(job, sampling, num_examples=list(examples.values()))
            planned = (
                secagg_params(
                    job,
                    num_clients=sampling.count,
                    vector_length=self._vector_length(model),
                    clipping_range=plan.quantization_range,
                )
                if self.level.uses_secure_agg
                else None
            )
        except ValueError as exc:
            raise _Stop(str(exc), failed=True) from None
        self.notes.extend(plan.notes)
        accountant = None
        if plan.event is not None and plan.delta is not None:
            accountant = PrivacyAccountant(
                _ACCOUNTANT_KIND, delta=plan.delta, epsilon_budget=plan.epsilon_budget
            )
        central = None
        if plan.central_noise_multiplier > 0:
            central = CentralDP(
                noise_multiplier=plan.central_noise_multiplier,
                clipping=FixedClipping(clipping_norm=plan.update_clipping_norm),
            )
        optimizer: ServerOptimizer = (
            FedAvg()
            if self.sensing
            else make_server_optimizer(
                job.federation.server_optimizer.value, eta=job.federation.server_learning_rate
            )
        )
        return _Setup(sampling, plan, optimizer, central, accountant, planned)

    def _train(self, ledger: Ledger, start_round: int) -> JobOutcome:
        job = self.job
        model = _initial_model(job, self.options.seed)
        setup = self._setup(model)
        opt_state = setup.optimizer.init(list(model.checkpoint_tensors().values()))
        self.dp_state = None if setup.central is None else setup.central.initial_state()
        if self.resume_from is not None:
            opt_state = self._restore(self.resume_from, model, opt_state, setup.accountant)
        plan = setup.plan
        self.emit(
            EventKind.JOB_STARTED,
            message=(
                f"run {self.run_id}: {len(setup.sampling.population)} eligible node(s), "
                f"privacy {self.level.value}"
                + (f" ({plan.unit.value}-level)" if plan.unit else "")
                + "".join(f"; {n}" for n in self.notes)
            ),
            metrics={"nodes": float(len(setup.sampling.population))},
        )
        policy = CheckpointPolicy(interval=job.checkpoint_interval)
        stop_reason: str | None = None
        for number in range(start_round, job.federation.num_rounds + 1):
            if setup.accountant is not None and plan.event is not None:
                try:
                    setup.accountant.compose(plan.event)
                except PrivacyBudgetExceededError as exc:
                    stop_reason = f"privacy budget exhausted before round {number}: {exc}"
                    logger.warning(stop_reason)
                    break
                write_accountant_state(
                    self.run_dir,
                    round_number=number,
                    accountant=setup.accountant.state_dict(),
                    training_config_hash=self.config_hash,
                )
            opt_state = self._round(ledger, number, model, opt_state, setup)
            if policy.is_due(number):
                write_checkpoint(
                    self.run_dir,
                    Checkpoint(
                        round=number,
                        training_config_hash=self.config_hash,
                        weights=model.checkpoint_tensors(),
                        optimizer=opt_state,
                        dp_state=self.dp_state,
                        accountant=None
                        if setup.accountant is None
                        else setup.accountant.state_dict(),
                        rng={"seed": self.options.seed},
                    ),
                )
            self.emit(
                EventKind.ROUND_FINISHED,
                server_round=number,
                metrics=self.last_metrics,
                message=self.last_message,
            )
        return self._finish(ledger, model, setup, stop_reason)

    def _restore(
        self,
        point: ResumePoint,
        model: _Model,
        opt_state: ServerOptState,
        accountant: PrivacyAccountant | None,
    ) -> ServerOptState:
        """Model, optimizer and DP state from the checkpoint; the accountant from the latest
        state (``accountant.json``, see :mod:`server.checkpoint`)."""
        checkpoint = point.checkpoint
        if checkpoint is not None:
            model.restore(checkpoint.weights)
            opt_state = checkpoint.optimizer
            if checkpoint.dp_state is not None:
                self.dp_state = checkpoint.dp_state
        if accountant is not None and point.accountant is not None:
            accountant.load_state_dict(point.accountant)
        return opt_state

    def _replay(self, record: RoundRecord) -> None:
        """Rebuild the verdict inputs of a round recorded before a restart."""
        contributed = {
            p.node_id
            for p in record.participants
            if p.phase is not Phase.EVAL and p.outcome is ParticipantOutcome.CONTRIBUTED
        }
        self.participants_per_round.append(len(contributed))
        if record.epsilon is not None:
            self.epsilon = max(self.epsilon or 0.0, record.epsilon)
        if record.status is not RoundStatus.COMPLETED:
            self.aborted_rounds += 1
            return
        self.rounds_completed += 1
        self.reliabilities.append(
            RoundReliability(
                round_number=record.round,
                score=record.reliability or 0.0,
                reasons=record.reliability_reasons,
                components={},
                deductions={},
                fatal=bool(record.measurements.get("reliability_fatal", False)),
            )
        )
        self.previous = RoundObservation(
            round_number=record.round,
            sampled=record.sampled,
            responded=min(record.responded, record.sampled),
            eval_loss=record.metric(wire.EVAL_LOSS),
            update_norm=record.update_norm,
        )

    # ------------------------------------------------------------------ one round

    def _round_config(self, number: int, node: int, plan: PrivacyPlan) -> ConfigRecord:
        seed = int(
            np.random.SeedSequence(
                [self.options.seed, number, int(_Seed.NODE), node]
            ).generate_state(1)[0]
        )
        return wire.RoundConfig(
            server_round=number,
            seed=seed,
            clipping_norm=plan.update_clipping_norm,
            dp_noise_multiplier=plan.dp_sgd_noise_multiplier,
            dp_max_grad_norm=plan.dp_max_grad_norm,
            dp_delta=plan.delta or 0.0,
        ).to_record()

    def _content(
        self, number: int, node: int, plan: PrivacyPlan, weights: ArrayRecord | None
    ) -> RecordDict:
        content = RecordDict(
            {wire.JOB: self.job_record, wire.ROUND: self._round_config(number, node, plan)}
        )
        if weights is not None:
            content[wire.WEIGHTS] = weights
        return content

    def _weights_record(self, model: _Model) -> ArrayRecord:
        if self.sensing:
            return ArrayRecord()
        return wire.weights_to_record(model.names, model.weights)

    def _round(
        self, ledger: Ledger, number: int, model: _Model, opt_state: ServerOptState, setup: _Setup
    ) -> ServerOptState:
        plan = setup.plan
        sampled = setup.sampling.sample(_stream(self.options.seed, number, _Seed.SAMPLING))
        state = _RoundState(number, sampled, time.monotonic())
        self.emit(
            EventKind.ROUND_STARTED,
            server_round=number,
            metrics={"sampled": float(len(sampled))},
            message=f"round {number}: {len(sampled)} node(s) sampled",
        )
        weights = self._weights_record(model)
        total: F64 | None = None
        try:
            if self.level.uses_secure_agg:
                total = self._secure_sum(state, model, plan, weights)
            else:
                total = self._plain_sum(state, model, plan, weights)
        except SecAggAbortedError as exc:
            state.abort_reason = str(exc)
        if total is None and state.abort_reason is None:
            state.abort_reason = "no node contributed"
        if total is not None:
            opt_state = self._apply(state, model, opt_state, setup, total)
            if not self.sensing:
                self._evaluate(state, model, plan)
        self._account(state, setup.accountant)
        self._record(ledger, state)
        if state.abort_reason is not None and self.options.stop_on_aborted_round:
            raise _Stop(
                f"round {number} aborted ({state.abort_reason}) and stop_on_aborted_round is set",
                failed=True,
            )
        return opt_state

    # ------------------------------------------------------------------ contributions

    def _stage_done(self, state: _RoundState, stage: str, began: float, **metrics: float) -> None:
        seconds = time.monotonic() - began
        state.timings[stage] = state.timings.get(stage, 0.0) + seconds
        self.emit(
            EventKind.STAGE,
            server_round=state.number,
            stage=stage,
            metrics={"seconds": seconds, **metrics},
        )

    def _participant(
        self,
        state: _RoundState,
        node: int,
        outcome: ParticipantOutcome,
        stage: str,
        phase: Phase,
        *,
        dropout: bool = True,
    ) -> None:
        """Record a node's part in a phase; ``dropout=False`` for a node that did not drop
        but did not contribute either (the round aborted around it)."""
        examples = state.train_metrics.get(node, {}).get(wire.NUM_EXAMPLES)
        if phase is Phase.EVAL:
            examples = state.eval_metrics.get(node, {}).get(wire.NUM_EXAMPLES)
        state.participants[(phase, node)] = Participant(
            node_id=node,
            node_type=self.node_types.get(node, self.job.resolved_node_type.value),
            outcome=outcome,
            stage=stage,
            num_examples=None if examples is None else int(examples),
            phase=phase,
        )
        if dropout and outcome is ParticipantOutcome.DROPPED and phase is not Phase.EVAL:
            state.dropped_by_stage[stage] += 1

    def _vector_length(self, model: _Model) -> int:
        if model.statistics is not None:
            return int(model.statistics.size)
        return model.size + _STATS_TAIL

    def _plain_sum(
        self, state: _RoundState, model: _Model, plan: PrivacyPlan, weights: ArrayRecord
    ) -> F64 | None:
        """``train.fit`` on the sampled nodes; returns the aggregated vector (see _apply)."""
        began = time.monotonic()
        replies = self.send(
            [
                self.message(
                    n, wire.FIT, self._content(state.number, n, plan, weights), state.number
                )
                for n in state.sampled
            ]
        )
        vectors: dict[int, F64] = {}
        length = self._vector_length(model)
        for node in state.sampled:
            reply = replies.get(node)
            problem = None
            if reply is None:
                problem = "no reply before the timeout"
            elif reply.has_error():
                problem = reply.error.reason
            else:
                try:
                    vectors[node] = self._read_update(reply.content, model, length)
                    state.train_metrics[node] = _metrics_of(reply.content)
                except (KeyError, ValueError, TypeError) as exc:
                    problem = f"unusable update: {exc}"
            if problem is not None:
                logger.warning(
                    "Round %d: node %s dropped in train: %s", state.number, node, problem
                )
                self._participant(state, node, ParticipantOutcome.DROPPED, "train", Phase.TRAIN)
            else:
                self._participant(state, node, ParticipantOutcome.CONTRIBUTED, "train", Phase.TRAIN)
        state.contributors = sorted(vectors)
        self._stage_done(state, "train", began, contributors=float(len(vectors)))
        if not vectors:
            return None
        return self._combine_plain(state, model, plan, vectors)

    def _read_update(self, content: RecordDict, model: _Model, length: int) -> F64:
        """A node's ``update`` record as its summable vector (float64, ``length`` values).

        Sensing: the one statistics array. Models: the clipped delta's tensors (model order)
        followed by ``was_clipped`` and the pre-clip norm from its metrics (the server's own
        measurement of the received update when the node sent none).
        """
        arrays = wire.record_to_weights(content.array_records[wire.UPDATE])
        if model.statistics is not None:
            if len(arrays) != 1 or arrays[0].size != length:
                raise ValueError(f"expected one statistics array of {length} values")
            vector = arrays[0].astype(np.float64).ravel()
        else:
            if [tuple(a.shape) for a in arrays] != model.shapes:
                raise ValueError("the update's tensors do not match the model's shapes")
            flat = wire.flatten(arrays).astype(np.float64)
            metrics = content.metric_records.get(wire.METRICS, MetricRecord())
            norm = metrics.get(node_logic.PRECLIP_NORM, float(np.linalg.norm(flat)))
            clipped = metrics.get(node_logic.WAS_CLIPPED, 0.0)
            if not isinstance(norm, int | float) or not isinstance(clipped, int | float):
                raise ValueError("was_clipped and preclip_norm must be numbers")
            vector = np.concatenate([flat, [float(clipped), float(norm)]])
        if not np.all(np.isfinite(vector)):
            raise ValueError("the update contains NaN or infinity")
        return vector

    def _combine_plain(
        self, state: _RoundState, model: _Model, plan: PrivacyPlan, vectors: Mapping[int, F64]
    ) -> F64:
        """The statistics sum (sensing), the sum of re-clipped updates (node DP) or the robust
        aggregate (otherwise), as one vector; node DP and sensing are summed, not averaged."""
        if model.statistics is not None:
            total: F64 = np.sum(list(vectors.values()), axis=0)
            return total
        size = model.size
        if plan.central_noise_multiplier > 0:
            total = np.zeros(size + _STATS_TAIL, dtype=np.float64)
            for vector in vectors.values():
                clipped = clip_update(
                    [vector[:size].astype(np.float32)], clipping_norm=plan.update_clipping_norm
                )
                total[:size] += clipped.update[0].astype(np.float64)
                total[size:] += vector[size:]
            return total
        method = self.job.federation.robust_aggregation.value.replace("-", "_")
        n = len(vectors)
        aggregator = (
            make_aggregator(method, privacy_level=self.level.value, f=max(0, (n - 3) // 2))
            if method == "krum"
            else make_aggregator(method, privacy_level=self.level.value)
        )
        nodes = sorted(vectors)
        counts = [state.train_metrics[n].get(wire.NUM_EXAMPLES, 1.0) or 1.0 for n in nodes]
        result = aggregator.aggregate(
            [[vectors[n][:size].astype(np.float32)] for n in nodes], counts
        )
        for key, value in result.measurements.items():
            state.measurements[f"robust_{key}"] = value
        mean = result.update[0].astype(np.float64)
        tail = np.sum([vectors[n][size:] for n in nodes], axis=0)
        return np.concatenate([mean, tail])

    def _secure_sum(
        self, state: _RoundState, model: _Model, plan: PrivacyPlan, weights: ArrayRecord
    ) -> F64:
        """The four SecAgg+ stages; the dequantized sum of the contributors' vectors."""
        number, sampled = state.number, state.sampled
        try:
            params = secagg_params(
                self.job,
                num_clients=len(sampled),
                vector_length=self._vector_length(model),
                clipping_range=plan.quantization_range,
            )
        except ValueError as exc:
            raise SecAggAbortedError(
                f"SecAgg+ round {number} cannot start with {len(sampled)} sampled node(s): {exc}"
            ) from None
        session = ServerSession(
            params,
            run_id=int(self.grid.run.run_id),
            server_round=number,
            node_ids=sampled,
            rng=_stream(self.options.seed, number, _Seed.SECAGG),
            on_message=self.secagg_hook,
        )
        alive = set(sampled)  # still in the protocol
        helped_unmask: set[int] = set()
        stages: list[tuple[Stage, Callable[[], Mapping[int, SecAggMessage]]]] = [
            (Stage.ADVERTISE_KEYS, session.advertise_keys),
            (Stage.SHARE_KEYS, session.share_keys),
            (Stage.MASKED_INPUT, session.masked_input),
            (Stage.UNMASK, session.unmask),
        ]
        stage = Stage.ADVERTISE_KEYS
        try:
            for stage, open_stage in stages:
                began = time.monotonic()
                requests = open_stage()
                for node in sorted(alive - set(requests)):  # pruned: could never be unmasked
                    self._participant(
                        state, node, ParticipantOutcome.DROPPED, stage.value, Phase.SECAGG
                    )
                asked = set(requests)
                answered = self._secagg_exchange(state, session, stage, requests, plan, weights)
                if stage is Stage.UNMASK:  # every asked node's input is in the sum already
                    helped_unmask = answered
                    if asked - answered:
                        state.dropped_by_stage[stage.value] += len(asked - answered)
                else:
                    for node in sorted(asked - answered):
                        self._participant(
                            state, node, ParticipantOutcome.DROPPED, stage.value, Phase.SECAGG
                        )
                    alive = answered
                self._stage_done(state, stage.value, began, answered=float(len(answered)))
            result = session.result()
        except SecAggAbortedError:
            for node in sorted(alive):  # neither dropped nor counted: the round failed
                if (Phase.SECAGG, node) not in state.participants:
                    self._participant(
                        state,
                        node,
                        ParticipantOutcome.DROPPED,
                        f"aborted:{stage.value}",
                        Phase.SECAGG,
                        dropout=False,
                    )
            state.measurements.update(
                {f"secagg_{k}": v for k, v in session.state.measurements.items()}
            )
            raise
        for node in result.contributors:
            last = Stage.UNMASK if node in helped_unmask else Stage.MASKED_INPUT
            self._participant(state, node, ParticipantOutcome.CONTRIBUTED, last.value, Phase.SECAGG)
        state.contributors = list(result.contributors)
        state.measurements.update({f"secagg_{k}": v for k, v in result.measurements.items()})
        self.secagg_used = params
        return dequantize_sum(result.total, num_summands=len(result.contributors), params=params)

    def _secagg_exchange(
        self,
        state: _RoundState,
        session: ServerSession,
        stage: Stage,
        requests: Mapping[int, SecAggMessage],
        plan: PrivacyPlan,
        weights: ArrayRecord,
    ) -> set[int]:
        messages = []
        for node, request in requests.items():
            content = self._content(
                state.number, node, plan, weights if stage is Stage.MASKED_INPUT else None
            )
            wire.secagg_to_content(request.to_record(), content)
            messages.append(
                self.message(node, wire.STAGE_MESSAGE_TYPE[stage], content, state.number)
            )
        replies = self.send(messages)
        answered: set[int] = set()
        for node in sorted(requests):
            reply = replies.get(node)
            if reply is None:
                logger.warning("Round %d: node %s silent in %s.", state.number, node, stage)
                continue
            if reply.has_error():
                logger.warning(
                    "Round %d: node %s failed in %s: %s",
                    state.number,
                    node,
                    stage,
                    reply.error.reason,
                )
                continue
            try:
                message = message_from_record(wire.secagg_from_content(reply.content))
                if message.node_id != node:
                    raise ValueError(f"the reply names node {message.node_id}, not its sender")
                session.receive(message)
            except (SecAggError, ValueError, TypeError, KeyError) as exc:
                logger.warning(
                    "Round %d: node %s's %s reply rejected: %s", state.number, node, stage, exc
                )
                continue
            answered.add(node)
            if stage is Stage.MASKED_INPUT:
                state.train_metrics[node] = _metrics_of(reply.content)
        return answered

    # ------------------------------------------------------------------ aggregation

    def _apply(
        self,
        state: _RoundState,
        model: _Model,
        opt_state: ServerOptState,
        setup: _Setup,
        total: F64,
    ) -> ServerOptState:
        """Noise (node DP / sensing DP), average and apply the round's aggregate."""
        central = setup.central
        began = time.monotonic()
        n = len(state.contributors)
        noise_rng = (
            _stream(self.options.seed, state.number, _Seed.NOISE)
            if self.options.deterministic_noise
            else secure_generator()
        )
        if model.statistics is not None:
            released = total
            if central is not None and self.dp_state is not None:
                aggregate = central.aggregate(
                    self.dp_state, [total], n_contributions=n, expected_count=1.0, rng=noise_rng
                )
                released = aggregate.update[0].astype(np.float64)
                self._dp_measurements(state, aggregate.measurements)
            model.statistics = model.statistics + released
            state.update_norm = float(np.linalg.norm(released))
            self._stage_done(state, "aggregate", began)
            return opt_state
        size = model.size
        delta_sum, tail = total[:size], total[size:]
        stats = ClipStats(num_clipped=max(0, round(float(tail[0]))), norm_sum=float(tail[1]))
        state.measurements["num_clipped"] = stats.num_clipped
        if n:
            state.measurements["mean_preclip_norm"] = stats.norm_sum / n
        if central is not None and self.dp_state is not None:
            aggregate = central.aggregate(
                self.dp_state,
                [delta_sum],
                n_contributions=n,
                expected_count=setup.sampling.expected_count,
                rng=noise_rng,
                clip_stats=ClipStats(min(stats.num_clipped, n), stats.norm_sum),
            )
            self.dp_state = aggregate.state
            mean = aggregate.update[0]
            self._dp_measurements(state, aggregate.measurements)
        elif self.level.uses_secure_agg:
            mean = (delta_sum / max(n, 1)).astype(np.float32)
        else:
            mean = delta_sum.astype(np.float32)  # already the robust aggregate
        deltas = wire.unflatten(mean, model.shapes)
        step = setup.optimizer.step(model.weights, deltas, opt_state)
        model.weights = step.weights
        state.update_norm = float(np.linalg.norm(mean.astype(np.float64)))
        state.measurements.update(step.measurements)
        self._stage_done(state, "aggregate", began)
        return step.state

    def _dp_measurements(self, state: _RoundState, measurements: Measurements) -> None:
        for key, value in measurements.items():
            state.measurements[str(key)] = value
        ratio = measurements.get(DPMeasurement.NOISE_TO_SIGNAL)
        if isinstance(ratio, float) and math.isfinite(ratio):
            state.noise_to_signal = ratio

    # ------------------------------------------------------------------ evaluation

    def _evaluate(self, state: _RoundState, model: _Model, plan: PrivacyPlan) -> None:
        began = time.monotonic()
        weights = wire.weights_to_record(model.names, model.weights)
        replies = self.send(
            [
                self.message(
                    n, wire.EVALUATE, self._content(state.number, n, plan, weights), state.number
                )
                for n in state.sampled
            ]
        )
        for node in state.sampled:
            reply = replies.get(node)
            metrics = None if reply is None or reply.has_error() else _metrics_of(reply.content)
            if metrics is None or wire.EVAL_LOSS not in metrics:
                why = (
                    "no reply"
                    if reply is None
                    else (reply.error.reason if reply.has_error() else "no eval_loss")
                )
                logger.warning("Round %d: node %s dropped in eval: %s", state.number, node, why)
                self._participant(state, node, ParticipantOutcome.DROPPED, "eval", Phase.EVAL)
                continue
            state.eval_metrics[node] = metrics
            self._participant(state, node, ParticipantOutcome.CONTRIBUTED, "eval", Phase.EVAL)
        self._stage_done(state, "eval", began, evaluated=float(len(state.eval_metrics)))

    # ------------------------------------------------------------------ accounting, scoring

    def _account(self, state: _RoundState, accountant: PrivacyAccountant | None) -> None:
        """The run's epsilon after this round: the accountant's (node DP, sensing); for
        example-level DP the larger of the server's bound (the worst node's DP-SGD steps
        composed every round) and the largest ``example_epsilon`` a node reported. A node's
        report alone is not enough: a node restarted mid-run (or a resumed simulation) has lost
        its DP history and reports only the steps since, while the bound covers the run."""
        if accountant is None:
            return
        state.measurements.update(accountant.measurements())
        candidate = accountant.get_epsilon()
        if self.job.dp.unit is DpUnit.EXAMPLE and not self.sensing:
            state.measurements["example_epsilon_bound"] = candidate
            reported = [
                m[wire.EXAMPLE_EPSILON]
                for m in state.train_metrics.values()
                if wire.EXAMPLE_EPSILON in m
            ]
            if reported:
                state.measurements["example_epsilon_max_reported"] = max(reported)
                candidate = max(candidate, max(reported))
        self.epsilon = max(self.epsilon or 0.0, candidate)
        state.measurements["epsilon"] = self.epsilon

    def _observation(self, state: _RoundState) -> RoundObservation:
        client_metrics = []
        for metrics in state.eval_metrics.values():
            row = {"loss": metrics[wire.EVAL_LOSS]}
            if wire.EVAL_ACCURACY in metrics:
                row["accuracy"] = metrics[wire.EVAL_ACCURACY]
            if wire.NUM_EXAMPLES in metrics:
                row["num_examples"] = metrics[wire.NUM_EXAMPLES]
            client_metrics.append(row)
        return RoundObservation(
            round_number=state.number,
            sampled=len(state.sampled),
            responded=len(state.contributors),
            dropped_by_stage=dict(state.dropped_by_stage),
            client_metrics=client_metrics,
            update_norm=state.update_norm,
            noise_to_signal=state.noise_to_signal,
        )

    def _record(self, ledger: Ledger, state: _RoundState) -> None:
        train_loss, _ = _weighted(state.train_metrics.values(), wire.TRAIN_LOSS)
        eval_loss, loss_spread = _weighted(state.eval_metrics.values(), wire.EVAL_LOSS)
        eval_acc, acc_spread = _weighted(state.eval_metrics.values(), wire.EVAL_ACCURACY)
        train: dict[str, float] = {"contributors": float(len(state.contributors))}
        if train_loss is not None:
            train[wire.TRAIN_LOSS] = train_loss
        seconds = [m[wire.TRAIN_SECONDS] for m in state.train_metrics.values()
                   if wire.TRAIN_SECONDS in m]  # fmt: skip
        if seconds:
            train["max_train_seconds"] = max(seconds)
        evaluation: dict[str, float] = {}
        for key, value in (
            (wire.EVAL_LOSS, eval_loss),
            ("eval_loss_std", loss_spread),
            (wire.EVAL_ACCURACY, eval_acc),
            ("eval_accuracy_std", acc_spread),
        ):
            if value is not None:
                evaluation[key] = value
        reliability: RoundReliability | None = None
        status = RoundStatus.COMPLETED
        if state.abort_reason is not None:
            status = RoundStatus.ABORTED
            state.measurements["abort_reason"] = state.abort_reason
            self.aborted_rounds += 1
            reasons: tuple[str, ...] = (f"round aborted: {state.abort_reason}",)
        else:
            observation = self._observation(state)
            reliability = score_round(observation, previous=self.previous)
            self.previous = observation
            self.reliabilities.append(reliability)
            self.rounds_completed += 1
            state.measurements.update(reliability.to_measurements())
            reasons = reliability.reasons
        seconds_total = time.monotonic() - state.started
        state.timings["total"] = seconds_total
        contributed = len(state.contributors) if status is RoundStatus.COMPLETED else 0
        self.participants_per_round.append(contributed)
        epsilon = state.measurements.get("epsilon")
        ledger.record_round(
            self.run_id,
            RoundRecord(
                round=state.number,
                status=status,
                sampled=len(state.sampled),
                responded=len(state.contributors),
                dropped_by_stage=dict(state.dropped_by_stage),
                timings=state.timings,
                metrics={Phase.TRAIN.value: train, Phase.EVAL.value: evaluation},
                epsilon=float(epsilon) if isinstance(epsilon, int | float) else None,
                delta=self.job.dp.delta if self.level.uses_dp else None,
                reliability=None if reliability is None else reliability.score,
                reliability_reasons=reasons,
                update_norm=state.update_norm,
                noise_to_signal=state.noise_to_signal,
                measurements=state.measurements,
                participants=tuple(state.participants.values()),
            ),
        )
        metrics: dict[str, float] = {
            "participants": float(contributed),
            "dropouts": float(sum(state.dropped_by_stage.values())),
            "seconds": seconds_total,
        }
        for key, value in (
            (wire.TRAIN_LOSS, train_loss),
            (wire.EVAL_LOSS, eval_loss),
            (wire.EVAL_ACCURACY, eval_acc),
            ("epsilon", self.epsilon if self.level.uses_dp else None),
            ("reliability", None if reliability is None else reliability.score),
        ):
            if value is not None:
                metrics[key] = float(value)
        self.last_metrics = metrics
        self.last_message = (
            f"round {state.number} aborted: {state.abort_reason}"
            if state.abort_reason is not None
            else f"round {state.number}: {contributed} of {len(state.sampled)} contributed"
        )

    # ------------------------------------------------------------------ the end

    def _outcome(
        self,
        ledger: Ledger,
        status: JobStatus,
        reasons: Sequence[str],
        *,
        reliability: float | None = None,
        bundle: Path | None = None,
        manifest: Path | None = None,
    ) -> JobOutcome:
        metrics = dict(self.last_metrics)
        metrics["aborted_rounds"] = float(self.aborted_rounds)
        if reliability is not None:
            metrics["reliability"] = reliability
        return JobOutcome(
            run_id=self.run_id,
            artifact_name=self.artifact_name,
            status=status,
            rounds_completed=self.rounds_completed,
            reliability=reliability,
            reasons=tuple(reasons),
            dp_unit=self.job.dp.unit.value if self.level.uses_dp else None,
            epsilon=self.epsilon,
            delta=self.job.dp.delta if self.level.uses_dp else None,
            bundle=bundle,
            manifest=manifest,
            ledger_url=ledger.url,
            metrics=metrics,
        )

    def _finish_failed(
        self, ledger: Ledger, reason: str, *, aborted: bool, emit: bool = True
    ) -> JobOutcome:
        """Close the run as failed (``aborted``: stopped on purpose, e.g. by the budget)."""
        logger.error("Run %s stopped: %s", self.run_id, reason)
        try:
            ledger.finish_run(
                self.run_id,
                RunStatus.ABORTED if aborted else RunStatus.FAILED,
                verdict_reasons=[reason],
                final_epsilon=self.epsilon,
                delta=self.job.dp.delta if self.level.uses_dp else None,
                error=reason,
            )
        except Exception:
            logger.exception("Could not record the end of run %s in the ledger.", self.run_id)
        if emit:
            self.emit(EventKind.JOB_FINISHED, message=f"failed: {reason}")
        return self._outcome(ledger, JobStatus.FAILED, [reason])

    def _finish(
        self, ledger: Ledger, model: _Model, setup: _Setup, stop_reason: str | None
    ) -> JobOutcome:
        """Judge the run; sign and verify the artifact when it passes."""
        job = self.job
        if self.rounds_completed == 0:
            reason = stop_reason or f"all {self.aborted_rounds} round(s) aborted"
            return self._finish_failed(ledger, reason, aborted=stop_reason is not None)
        verdict = RunVerdict.from_rounds(
            self.reliabilities, threshold=job.federation.reliability_threshold
        )
        score = min(verdict.final_score, verdict.window_mean)
        delta = job.dp.delta if self.level.uses_dp else None
        info = [r for r in (stop_reason,) if r]
        if self.aborted_rounds:
            info.append(f"{self.aborted_rounds} round(s) aborted")
        if not verdict.passed:
            reasons = [*verdict.reasons, *info]
            ledger.finish_run(
                self.run_id,
                RunStatus.REJECTED,
                verdict_reasons=reasons,
                final_epsilon=self.epsilon,
                delta=delta,
                reliability=score,
            )
            self.emit(EventKind.JOB_FINISHED, message="rejected: " + "; ".join(reasons))
            return self._outcome(ledger, JobStatus.REJECTED, reasons, reliability=score)
        finished_at = datetime.now(UTC).replace(microsecond=0)
        try:
            result = build_artifact(
                job,
                self._final_tensors(model),
                self._provenance(setup, score, finished_at),
                run_dir=self.run_dir,
                signing_key=self.options.signing_key,
                trusted_keys=self.options.trusted_keys,
                verify_at=finished_at,
            )
        except Exception as exc:
            logger.exception("Building the artifact of run %s failed.", self.run_id)
            return self._finish_failed(
                ledger, f"building the artifact failed: {type(exc).__name__}: {exc}", aborted=False
            )
        reasons = [*info, *result.notes]
        self.artifact_name = result.manifest.artifact_name
        ledger.finish_run(
            self.run_id,
            RunStatus.COMPLETED,
            verdict_reasons=reasons,
            final_epsilon=self.epsilon,
            delta=delta,
            reliability=score,
            bundle_path=result.bundle,
            bundle_sha256=result.bundle_sha256,
            finished_at=finished_at,
        )
        self.emit(
            EventKind.JOB_FINISHED,
            metrics={"reliability": score},
            message=f"passed: {result.bundle or result.manifest_path}",
        )
        return self._outcome(
            ledger,
            JobStatus.PASSED,
            reasons,
            reliability=score,
            bundle=result.bundle,
            manifest=result.manifest_path,
        )

    def _final_tensors(self, model: _Model) -> dict[str, NDArray[np.generic]]:
        if model.statistics is None:
            return dict(model.tensors())
        normalizer = node_logic.normalizer_from_sum(self.job, model.statistics)
        return dict(node_logic.normalizer_tensors(normalizer))

    def _provenance(self, setup: _Setup, score: float, finished_at: datetime) -> Provenance:
        plan = setup.plan
        dp = None
        if self.level.uses_dp and plan.delta is not None:
            dp = DPParameters(
                unit="example" if plan.unit is DpUnit.EXAMPLE else "node",
                clipping_norm=plan.dp_clipping_norm,
                noise_multiplier=plan.dp_noise_multiplier,
                accountant=f"opacus-{_ACCOUNTANT_KIND}",
                epsilon=self.epsilon or 0.0,
                delta=plan.delta,
            )
        secagg = None
        params = self.secagg_used or setup.secagg
        if params is not None:
            secagg = SecAggParameters(
                neighbours=params.num_neighbours,
                threshold=params.threshold,
                modulus_bits=32,
                clipping_range=params.clipping_range,
            )
        return Provenance(
            run_id=self.run_id,
            run_name=self.job.run_name,
            finished_at=finished_at,
            rounds=len(self.participants_per_round),
            participants_per_round=list(self.participants_per_round),
            dp=dp,
            secagg=secagg,
            reliability=Reliability(score=score, verdict="accepted"),
            versions=software_versions(),
        )


def run_federation(
    grid: Grid,
    job: JobSpec,
    options: RunOptions,
    *,
    progress: ProgressCallback | None = None,
    secagg_hook: MessageHook | None = None,
) -> JobOutcome:
    """Run ``job`` to its end on ``grid`` (see the module docstring) and report the outcome.

    ``progress`` receives every :class:`server.options.ProgressEvent`; an exception it raises
    stops the run as a crash would (the ledger keeps the run open as ``failed`` and the next
    run with ``options.resume`` continues from the last checkpoint). ``secagg_hook`` sees every
    SecAgg+ message the server handles (instrumented tests). Expected failures (too few
    nodes, every round aborted, an artifact that cannot be built) are a ``failed`` outcome,
    not an exception.
    """
    return _Federation(grid, job, options, progress, secagg_hook).run()
