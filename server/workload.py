"""The workload seam: what a run's rounds update -- a model, or analytics statistics.

Chosen once at setup (:func:`workload_for`), so the round loop never asks "is this a sensing
job". Both kinds tell the loop which collections make a round, what to send with them, how
to use an aggregate, how to checkpoint, and what the artifact's tensors are.

- :class:`ModelWorkload`: the global model (built from the job's config, seeded, on the job's
  base checkpoint when it names one, adapted as the job says). Only its trainable tensors
  travel, are averaged, checkpointed and restored (the frozen base is the same on every node:
  discovery refuses a node whose base digest differs); a fit's averaged update goes through
  the server optimizer (FedAvg / FedAdam); an evaluation's metric sums become the round's
  loss, accuracy, perplexity and unigram baseline. The artifact holds every weight with the
  adapters folded in, or the trained tensors alone (``bundle_weights``).
- :class:`AnalyticsWorkload`: the sensing normalizers. Each round is two collections: the
  ranges phase releases per-feature histograms over the public ranges, from which the server
  takes each feature's clipping range (the histogram's significant support, widened to mean
  +- 4 std: :func:`clipping_ranges`);
  the moments phase then sums per-example ``[1, mean u, mean u^2]`` rows clipped to those
  ranges, and the normalizer (mean, std) comes from the sums.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np
from flwr.app import ArrayRecord
from numpy.typing import NDArray

from aggregation.codec import Metric
from aggregation.pipeline import AggregateOutput
from aggregation.privacy import WorkloadKind
from aggregation.server_opt import ServerOptimizer, ServerOptState, make_server_optimizer
from aggregation.types import Measurements
from clients import protocol as wire
from clients.adaptation import (
    get_trainable_weights,
    merged_state,
    set_trainable_weights,
    trainable_names,
)
from clients.checkpoints import checkpoint_digest
from clients.jobs import (
    HISTOGRAM_BINS,
    analytics_row_bound,
    collections_per_round,
    model_spec_for_job,
    sensing_ranges,
    workload_for_job,
)
from clients.models import build_model, model_fingerprint
from clients.protocol import RoundConfig, Work
from clients.sensing import FeatureRanges, normalizer_from_centred_sum
from manifests.confighash import training_config_hash
from manifests.jobspec import Adaptation, BundleWeights, JobSpec

__all__ = [
    "RANGE_SIGNIFICANCE",
    "RANGE_SPREAD",
    "AnalyticsWorkload",
    "ModelWorkload",
    "Workload",
    "base_digest_for",
    "config_hash_for",
    "round_metrics",
    "workload_for",
]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

RANGE_SIGNIFICANCE: Final = 5.0
"""Noise standard deviations a histogram tail's mass must exceed to count as data."""
RANGE_SPREAD: Final = 4.0
"""A clipping range reaches this many standard deviations either side of the mean."""
_STATS_HI: Final = "statistics.hi"
_STATS_LO: Final = "statistics.lo"
_RANGE_LOW: Final = "ranges.low"
_RANGE_HIGH: Final = "ranges.high"


class Workload(Protocol):
    """What the round loop needs from a workload."""

    kind: WorkloadKind
    fingerprint: str
    base_digest: str | None
    update_length: int
    works: tuple[Work, ...]

    def weights_record(self, work: Work) -> ArrayRecord | None: ...

    def round_config(self, number: int, work: Work, seed: int) -> RoundConfig: ...

    def apply(self, work: Work, output: AggregateOutput) -> Measurements: ...

    def optimizer_state(self) -> ServerOptState: ...

    def checkpoint_tensors(self) -> dict[str, F32]: ...

    def restore(self, tensors: Mapping[str, F32], optimizer: ServerOptState | None) -> None: ...

    def final_tensors(self) -> dict[str, NDArray[np.generic]]: ...


def round_metrics(output: AggregateOutput, work: Work) -> dict[str, float]:
    """The named metrics of a collection's aggregate (what the ledger and progress show).

    Evaluation: ``eval_loss`` (mean per example; per node under node-level DP, whose
    denominator is the public number of contributors), ``eval_accuracy`` (the classifier's
    top-1, or an LM's next-byte accuracy), for LMs ``eval_perplexity`` and the public unigram
    baseline ``baseline_loss`` / ``baseline_perplexity``, and the (noised) ``eval_examples``.
    Fit: ``train_loss`` (without DP), ``train_examples``, ``clipped_fraction`` (node-level).
    """
    out: dict[str, float] = {}

    def put(name: str, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            out[name] = value

    examples = output.metrics.get(Metric.EXAMPLES)
    denominator = examples if examples is not None else float(output.contributors)

    def mean(metric: Metric) -> float | None:
        value = output.metrics.get(metric)
        if value is None or not denominator > 0:
            return None
        return value / denominator

    if work is Work.EVALUATE:
        loss = mean(Metric.EVAL_LOSS)
        put("eval_loss", loss)
        loss_noise = output.metric_noise.get(Metric.EVAL_LOSS, 0.0)
        count_noise = output.metric_noise.get(Metric.EXAMPLES, 0.0)
        if loss is not None and loss_noise and denominator > 0:
            put("eval_loss_stderr", math.hypot(loss_noise, loss * count_noise) / denominator)
        correct = mean(Metric.EVAL_CORRECT)
        put("eval_accuracy", None if correct is None else min(1.0, max(0.0, correct)))
        if Metric.BASELINE_LOSS in output.metrics:
            baseline = mean(Metric.BASELINE_LOSS)
            put("eval_perplexity", None if loss is None else math.exp(min(loss, 50.0)))
            put("baseline_loss", baseline)
            put("baseline_perplexity", None if baseline is None else math.exp(min(baseline, 50.0)))
        put("eval_examples", examples)
    elif work is Work.FIT:
        put("train_loss", mean(Metric.TRAIN_LOSS))
        put("train_examples", examples)
        if Metric.CLIPPED in output.metrics:
            put("clipped_fraction", min(1.0, max(0.0, mean(Metric.CLIPPED) or 0.0)))
    return out


# --------------------------------------------------------------------------- model


def base_digest_for(job: JobSpec) -> str | None:
    """The content digest of the job's base checkpoint as this machine holds it (None
    without a base); :class:`clients.checkpoints.CheckpointError` if it cannot be read."""
    if workload_for_job(job) is not WorkloadKind.MODEL:
        return None
    folder = model_spec_for_job(job).base_folder
    return None if folder is None else checkpoint_digest(folder)


def config_hash_for(job: JobSpec) -> str:
    """``training_config_hash`` of the job, its base checkpoint by content digest; a base
    this machine cannot read hashes as unknown (the run then fails at setup, saying why)."""
    try:
        digest = base_digest_for(job)
    except ValueError:
        digest = None
    return training_config_hash(job.training_config(base_digest=digest))


@dataclass
class ModelWorkload:
    """The global model of a model job (see the module docstring): ``names`` / ``weights``
    are its trainable tensors, in the order they travel."""

    job: JobSpec
    names: list[str]
    shapes: list[tuple[int, ...]]
    weights: list[F32]
    fingerprint: str
    optimizer: ServerOptimizer
    opt_state: ServerOptState
    base_digest: str | None = None
    kind: WorkloadKind = WorkloadKind.MODEL

    @classmethod
    def for_job(cls, job: JobSpec, *, seed: int) -> ModelWorkload:
        spec = model_spec_for_job(job)
        model = build_model(spec, seed=seed)
        weights = get_trainable_weights(model)
        optimizer = make_server_optimizer(
            job.federation.server_optimizer.value, eta=job.federation.server_learning_rate
        )
        return cls(
            job,
            trainable_names(model),
            [tuple(w.shape) for w in weights],
            weights,
            model_fingerprint(spec),
            optimizer,
            optimizer.init(weights),
            base_digest=base_digest_for(job),
        )

    @property
    def update_length(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)

    @property
    def works(self) -> tuple[Work, ...]:
        return collections_per_round(self.job)

    def weights_record(self, work: Work) -> ArrayRecord | None:
        return wire.weights_to_record(self.names, self.weights)

    def round_config(self, number: int, work: Work, seed: int) -> RoundConfig:
        return RoundConfig(server_round=number, work=work, seed=seed)

    def apply(self, work: Work, output: AggregateOutput) -> Measurements:
        if work is not Work.FIT or output.update is None:
            return {}
        mean = output.update.astype(np.float32)
        deltas = wire.unflatten(mean, self.shapes)
        step = self.optimizer.step(self.weights, deltas, self.opt_state)
        self.weights = step.weights
        self.opt_state = step.state
        measurements = dict(step.measurements)
        measurements["update_norm"] = float(np.linalg.norm(mean.astype(np.float64)))
        return measurements

    def optimizer_state(self) -> ServerOptState:
        return self.opt_state

    def checkpoint_tensors(self) -> dict[str, F32]:
        return dict(zip(self.names, self.weights, strict=True))

    def restore(self, tensors: Mapping[str, F32], optimizer: ServerOptState | None) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"The checkpoint lacks weights {missing[:3]}: another model?")
        self.weights = [np.asarray(tensors[n], dtype=np.float32) for n in self.names]
        if optimizer is not None:
            self.opt_state = optimizer

    def final_tensors(self) -> dict[str, NDArray[np.generic]]:
        """The bundle's tensors: the trainable ones alone (``bundle_weights = adapters``, or a
        full fine-tune, where they are every weight), else every weight of the model rebuilt
        on its base with the adapters folded in (:func:`clients.adaptation.merged_state`)."""
        trained: dict[str, NDArray[np.generic]] = dict(zip(self.names, self.weights, strict=True))
        if (
            self.job.bundle_weights is BundleWeights.ADAPTERS
            or self.job.adaptation is Adaptation.FULL
        ):
            return trained
        model = build_model(model_spec_for_job(self.job))
        set_trainable_weights(model, self.weights)
        return dict(merged_state(model))


# --------------------------------------------------------------------------- analytics


def _split(values: F64) -> tuple[F32, F32]:
    hi = values.astype(np.float32)
    lo = (values - hi.astype(np.float64)).astype(np.float32)
    return hi, lo


def clipping_ranges(
    public: FeatureRanges,
    histogram: F64,
    *,
    noise_stddev: float = 0.0,
    significance: float = RANGE_SIGNIFICANCE,
    spread: float = RANGE_SPREAD,
) -> FeatureRanges:
    """Per feature, the clipping range for the moments phase, from a (noised) histogram over
    the public range; the public range where no part of the histogram stands out.

    1. The *support*: the bins from the lowest to the highest edge beyond which the noised
       mass is still significant -- the mass of the ``m`` outermost bins above
       ``significance x noise_stddev x sqrt(m)`` (their noise's standard deviation is
       ``noise_stddev sqrt(m)``, in counts). Summing over the tail lets a long thin tail count
       (each of its bins is lost in the noise, together they are not), while the noise on the
       many empty bins of a wide public range passes only with probability ~1e-7 per test.
    2. The mean and standard deviation of the noised counts over the support.
    3. The range: the support, widened to ``mean +- spread x std`` where that is wider,
       within the public range. Wider ranges cost noise in the moments (the noise is relative
       to the range), narrower ones clip the data's tails.
    """
    features = len(public.features)
    raw = histogram.reshape(features, HISTOGRAM_BINS)
    low, high = public.low.copy(), public.high.copy()
    width = (public.high - public.low) / HISTOGRAM_BINS
    threshold = significance * noise_stddev * np.sqrt(np.arange(1.0, HISTOGRAM_BINS + 1))
    for f in range(features):
        counts = raw[f]
        above = np.flatnonzero(np.cumsum(counts[::-1])[::-1] > threshold[::-1])
        below = np.flatnonzero(np.cumsum(counts) > threshold)
        if above.size == 0 or below.size == 0:
            continue
        first, last = sorted((int(below.min()), int(above.max())))
        inside = counts[first : last + 1]
        centres = public.low[f] + (np.arange(first, last + 1) + 0.5) * width[f]
        lo = public.low[f] + first * width[f]
        hi = public.low[f] + (last + 1) * width[f]
        mass = float(inside.sum())
        if mass > 0:
            mean = float((inside * centres).sum()) / mass
            var = max(float((inside * np.square(centres - mean)).sum()) / mass, 0.0)
            std = math.sqrt(var + width[f] ** 2 / 12.0)
            lo, hi = min(lo, mean - spread * std), max(hi, mean + spread * std)
        low[f], high[f] = max(public.low[f], lo), min(public.high[f], hi)
    return FeatureRanges(public.features, low, high)


@dataclass
class AnalyticsWorkload:
    """The statistics of a sensing job (see the module docstring)."""

    job: JobSpec
    public: FeatureRanges
    clip: FeatureRanges | None = None
    statistics: F64 = field(default_factory=lambda: np.zeros(0))
    kind: WorkloadKind = WorkloadKind.ANALYTICS
    fingerprint: str = ""
    base_digest: str | None = None
    update_length: int = 0

    @classmethod
    def for_job(cls, job: JobSpec) -> AnalyticsWorkload:
        public = sensing_ranges(job)
        return cls(job, public, statistics=np.zeros(1 + 2 * len(public.features)))

    @property
    def works(self) -> tuple[Work, ...]:
        return collections_per_round(self.job)

    def weights_record(self, work: Work) -> ArrayRecord | None:
        return ArrayRecord()

    def round_config(self, number: int, work: Work, seed: int) -> RoundConfig:
        if work is Work.MOMENTS:
            if self.clip is None:
                raise ValueError("The moments phase needs the ranges phase's clipping ranges.")
            return RoundConfig(
                server_round=number,
                work=work,
                seed=seed,
                range_low=tuple(float(v) for v in self.clip.low),
                range_high=tuple(float(v) for v in self.clip.high),
            )
        return RoundConfig(server_round=number, work=work, seed=seed)

    def apply(self, work: Work, output: AggregateOutput) -> Measurements:
        bound = analytics_row_bound(self.job, work)
        scaled = output.statistics * bound
        if work is Work.RANGES:
            noise = float(output.measurements.get("statistics_noise_stddev", 0.0))
            clip = clipping_ranges(self.public, scaled, noise_stddev=noise * bound)
            if self.clip is not None:  # later rounds: keep the union of the ranges
                clip = FeatureRanges(
                    clip.features,
                    np.minimum(clip.low, self.clip.low),
                    np.maximum(clip.high, self.clip.high),
                )
            self.clip = clip
            return {"range_examples": float(scaled[:HISTOGRAM_BINS].sum())}
        self.statistics = self.statistics + scaled
        return {"examples": float(scaled[0])}

    def optimizer_state(self) -> ServerOptState:
        return ServerOptState(algorithm="fedavg", step=0, slots={})

    def checkpoint_tensors(self) -> dict[str, F32]:
        hi, lo = _split(self.statistics)
        out = {_STATS_HI: hi, _STATS_LO: lo}
        if self.clip is not None:
            out[_RANGE_LOW] = self.clip.low.astype(np.float32)
            out[_RANGE_HIGH] = self.clip.high.astype(np.float32)
        return out

    def restore(self, tensors: Mapping[str, F32], optimizer: ServerOptState | None) -> None:
        self.statistics = tensors[_STATS_HI].astype(np.float64) + tensors[_STATS_LO].astype(
            np.float64
        )
        if _RANGE_LOW in tensors:
            self.clip = FeatureRanges(
                self.public.features,
                tensors[_RANGE_LOW].astype(np.float64),
                tensors[_RANGE_HIGH].astype(np.float64),
            )

    def final_tensors(self) -> dict[str, NDArray[np.generic]]:
        if self.clip is None:
            raise ValueError("No ranges were released: the normalizer cannot be built.")
        normalizer = normalizer_from_centred_sum(self.clip, self.statistics)
        return {
            "mean": np.asarray(normalizer.mean, dtype=np.float32),
            "std": np.asarray(normalizer.std, dtype=np.float32),
            "count": np.asarray(normalizer.count, dtype=np.float32),
        }


def workload_for(job: JobSpec, *, seed: int) -> ModelWorkload | AnalyticsWorkload:
    """The job's workload, chosen once."""
    if workload_for_job(job) is WorkloadKind.ANALYTICS:
        return AnalyticsWorkload.for_job(job)
    return ModelWorkload.for_job(job, seed=seed)
