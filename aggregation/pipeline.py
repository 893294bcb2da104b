"""The aggregator of a run: composable steps, built once from the run's plan.

:func:`build_aggregator` is the only place where fedbrain's privacy matrix is coded (TFF's
aggregation factories and Flower's DP wrappers are the models): which steps turn what a round
collected into what the server may use, for each privacy level, DP unit and workload.

=================  =========  ================================================================
level              DP unit    steps (per-node values -> released values)
=================  =========  ================================================================
``none``           --         re-clip (when a bound is set) -> robust rule (weighted mean by
                              example count, median, trimmed mean, Krum) -> metric sums
``secure-agg``     --         (secure sum) -> mean over contributors
``dp``             node       re-clip to C -> sum -> Gaussian noise N(0, (zC)^2) on the update
                              sum and N(0, z_m^2) on every scaled metric -> fixed-denominator
                              mean (expected count, McMahan et al. 2018)
``dp``             example    (DP-SGD on the nodes) -> re-clip to the update bound -> robust
                              rule or sum -> Gaussian noise on the metrics -> mean over
                              contributors
``dp+secure-agg``  node       (nodes add distributed noise before masking; secure sum) ->
                              fixed-denominator mean
``dp+secure-agg``  example    (DP-SGD on the nodes; distributed noise on metrics and
                              statistics; secure sum) -> mean over contributors
=================  =========  ================================================================

Analytics workloads (sensing normalizers) follow the same rows with unit ``example`` and keep
the statistics *sum* (no mean). Each step returns measurements; :class:`AggregateOutput` carries
them to the ledger and the reliability score. Everything here is numpy: the matrix is testable
without Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from aggregation.codec import Metric, Summed, sum_contributions
from aggregation.dp import clip_update
from aggregation.privacy import DpUnit, PrivacyLevel, WorkloadKind
from aggregation.robust import make_aggregator
from aggregation.types import Measurements

__all__ = [
    "AggregateOutput",
    "AggregationPlan",
    "Aggregator",
    "RoundInput",
    "build_aggregator",
]

F64 = NDArray[np.float64]

NOISE_ONLY = 1e6
"""The noise-to-signal ratio reported when the released update is all noise (estimate)."""


@dataclass(frozen=True)
class RoundInput:
    """What one collection produced, decoded.

    ``per_node``: each contributor's own sums (plain collection: levels ``none``/``dp``);
    ``secure_sum``: the sum over contributors (secure collection). Exactly one is set.
    """

    contributors: tuple[int, ...]
    per_node: Mapping[int, Summed] | None = None
    secure_sum: Summed | None = None

    def __post_init__(self) -> None:
        if (self.per_node is None) == (self.secure_sum is None):
            raise ValueError("A RoundInput holds either per-node sums or a secure sum.")
        if self.per_node is not None and set(self.per_node) != set(self.contributors):
            raise ValueError("per_node must hold exactly the contributors.")


@dataclass(frozen=True)
class AggregateOutput:
    """What the server may use: the averaged update (model workloads, else None), the metric
    and statistics sums (noised under DP) and the measurements of every step."""

    update: F64 | None
    metrics: Mapping[Metric, float]
    statistics: F64
    contributors: int
    measurements: Measurements = field(default_factory=dict)
    metric_noise: Mapping[Metric, float] = field(default_factory=dict)
    """Standard deviation of the DP noise on each released metric sum (original units)."""

    def ratio(self, numerator: Metric, denominator: Metric) -> float | None:
        top, bottom = self.metrics.get(numerator), self.metrics.get(denominator)
        if top is None or bottom is None or not bottom > 0:
            return None
        return top / bottom


@dataclass(frozen=True, kw_only=True)
class AggregationPlan:
    """Everything :func:`build_aggregator` needs to know about a run.

    ``update_clip``: the update's L2 bound the server re-clips individual updates to (0: none);
    ``noise_stddev``: the noise std on the update sum (node-level DP: added here at ``dp``,
    by the nodes at ``dp+secure-agg``); ``metric_noise_stddevs``: the noise std per metric sum,
    in the metric's own units (likewise); ``statistics_noise_stddev``: the noise std on
    analytics sums -- added here at level ``dp``, already in the sum (added by the nodes) at
    ``dp+secure-agg``;
    ``expected_count``: the fixed denominator of node-level DP; ``robust_rule``: one of
    :func:`aggregation.robust.make_aggregator`'s methods.
    """

    level: PrivacyLevel
    unit: DpUnit | None
    workload: WorkloadKind
    update_clip: float = 0.0
    noise_stddev: float = 0.0
    metric_noise_stddevs: Mapping[Metric, float] = field(default_factory=dict)
    statistics_noise_stddev: float = 0.0
    expected_count: float = 1.0
    robust_rule: str = "mean"

    def __post_init__(self) -> None:
        problems = []
        if self.level.uses_dp and self.unit is None:
            problems.append(f"privacy level {self.level} needs a DP unit")
        if not self.level.uses_dp and self.unit is not None:
            problems.append(f"privacy level {self.level} has no DP unit")
        if self.robust_rule != "mean" and self.level.uses_secure_agg:
            problems.append(f"{self.robust_rule} needs individual updates; {self.level} hides them")
        if self.robust_rule != "mean" and self.unit is DpUnit.NODE:
            problems.append(
                f"{self.robust_rule} cannot be combined with node-level DP (the noise is "
                "calibrated to a sum of clipped updates)"
            )
        if self.workload is WorkloadKind.ANALYTICS and self.unit is DpUnit.NODE:
            problems.append("analytics sums have no per-node bound: node-level DP is refused")
        for name in ("update_clip", "noise_stddev", "statistics_noise_stddev"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                problems.append(f"`{name}` must be a finite number >= 0. Found {value}.")
        if not (math.isfinite(self.expected_count) and self.expected_count > 0):
            problems.append(f"`expected_count` must be positive. Found {self.expected_count}.")
        if problems:
            raise ValueError("Invalid aggregation plan: " + "; ".join(problems) + ".")


# --------------------------------------------------------------------------- steps


@dataclass
class _Work:
    """The value a round's steps pass along."""

    per_node: dict[int, Summed] | None
    total: Summed | None
    contributors: int
    update: F64 | None = None
    measurements: Measurements = field(default_factory=dict)


class _Step(Protocol):
    def apply(self, work: _Work, rng: np.random.Generator) -> None: ...


@dataclass(frozen=True)
class ReClip:
    """Clip each node's update to ``norm`` (the server sees individual updates)."""

    norm: float

    def apply(self, work: _Work, rng: np.random.Generator) -> None:
        if work.per_node is None:
            return
        clipped = 0
        for node, summed in list(work.per_node.items()):
            if not summed.update.size:
                continue
            result = clip_update([summed.update.astype(np.float32)], clipping_norm=self.norm)
            clipped += int(result.was_clipped)
            work.per_node[node] = Summed(
                result.update[0].astype(np.float64), summed.metrics, summed.statistics
            )
        work.measurements["server_reclipped"] = clipped


@dataclass(frozen=True)
class RobustRule:
    """Combine individual updates with a robust rule (weighted by example count for mean)."""

    rule: str
    level: PrivacyLevel

    def apply(self, work: _Work, rng: np.random.Generator) -> None:
        if work.per_node is None:
            return
        nodes = sorted(work.per_node)
        parts = [work.per_node[n] for n in nodes]
        work.total = sum_contributions(parts)
        if not parts[0].update.size:
            return
        kwargs: dict[str, int] = {}
        if self.rule == "krum":
            kwargs["f"] = max(0, (len(nodes) - 3) // 2)
        aggregator = make_aggregator(self.rule, privacy_level=self.level.value, **kwargs)
        weights = [max(1.0, p.metrics.get(Metric.EXAMPLES, 1.0)) for p in parts]
        result = aggregator.aggregate([[p.update.astype(np.float32)] for p in parts], weights)
        work.update = result.update[0].astype(np.float64)
        for key, value in result.measurements.items():
            work.measurements[f"robust_{key}"] = value


class Sum:
    """Sum the individual contributions (a secure sum is already one)."""

    def apply(self, work: _Work, rng: np.random.Generator) -> None:
        if work.per_node is not None:
            work.total = sum_contributions([work.per_node[n] for n in sorted(work.per_node)])


@dataclass(frozen=True)
class CentralNoise:
    """Gaussian noise on the sums (central DP: the server adds it, after seeing the sum)."""

    update_stddev: float
    metric_stddevs: Mapping[Metric, float]
    statistics_stddev: float

    def apply(self, work: _Work, rng: np.random.Generator) -> None:
        total = work.total
        if total is None:
            raise ValueError("CentralNoise needs the sum first.")
        update = total.update
        if self.update_stddev and update.size:
            update = update + self.update_stddev * rng.standard_normal(update.shape)
            work.measurements["dp_noise_stddev"] = self.update_stddev
        metrics = dict(total.metrics)
        for metric, std in self.metric_stddevs.items():
            if metric in metrics and std > 0:
                metrics[metric] += std * float(rng.standard_normal())
        stats = total.statistics
        if self.statistics_stddev and stats.size:
            stats = stats + self.statistics_stddev * rng.standard_normal(stats.shape)
            work.measurements["dp_statistics_noise_stddev"] = self.statistics_stddev
        work.total = Summed(update, metrics, stats)


@dataclass(frozen=True)
class FixedMean:
    """Divide the update sum by the expected count (DP-FedAvg's fixed denominator)."""

    expected_count: float

    def apply(self, work: _Work, rng: np.random.Generator) -> None:
        if work.total is not None and work.update is None and work.total.update.size:
            work.update = work.total.update / self.expected_count
        work.measurements["expected_count"] = self.expected_count


class ContributorMean:
    """Divide the update sum by the number of contributors (public under SecAgg+)."""

    def apply(self, work: _Work, rng: np.random.Generator) -> None:
        if work.total is not None and work.update is None and work.total.update.size:
            work.update = work.total.update / max(1, work.contributors)


# --------------------------------------------------------------------------- the aggregator


@dataclass(frozen=True)
class Aggregator:
    """A fixed sequence of steps (see :func:`build_aggregator`)."""

    plan: AggregationPlan
    steps: tuple[_Step, ...]

    @property
    def step_names(self) -> tuple[str, ...]:
        return tuple(type(s).__name__ for s in self.steps)

    def aggregate(self, round_input: RoundInput, *, rng: np.random.Generator) -> AggregateOutput:
        """Run the steps on one collection's input (``rng``: central noise only)."""
        per_node = dict(round_input.per_node) if round_input.per_node is not None else None
        work = _Work(per_node, round_input.secure_sum, len(round_input.contributors))
        for step in self.steps:
            step.apply(work, rng)
        total = work.total
        if total is None:
            raise ValueError("The aggregator's steps produced no sum.")
        update = work.update if self.plan.workload is WorkloadKind.MODEL else None
        measurements = dict(work.measurements)
        measurements["contributors"] = len(round_input.contributors)
        if self.plan.statistics_noise_stddev:
            measurements["statistics_noise_stddev"] = self.plan.statistics_noise_stddev
        noise = self.plan.noise_stddev
        if update is not None and update.size and noise:
            # Estimated from the released (noised) mean only -- post-processing, safe to
            # publish: E||signal + noise||^2 = ||signal||^2 + ||noise||^2, so the signal's
            # norm is estimated as sqrt(||released||^2 - E||noise||^2); when the release is no
            # larger than its expected noise the ratio is reported as NOISE_ONLY.
            released = float(np.dot(update, update))
            expected = (noise / self.plan.expected_count) ** 2 * update.size
            signal = released - expected
            measurements["noise_to_signal"] = (
                min(NOISE_ONLY, math.sqrt(expected / signal)) if signal > 0 else NOISE_ONLY
            )
        return AggregateOutput(
            update=update,
            metrics=dict(total.metrics),
            statistics=total.statistics,
            contributors=len(round_input.contributors),
            measurements=measurements,
            metric_noise=dict(self.plan.metric_noise_stddevs),
        )


def build_aggregator(plan: AggregationPlan) -> Aggregator:
    """The steps of ``plan``'s row of the privacy matrix (module docstring)."""
    level, unit = plan.level, plan.unit
    steps: list[_Step] = []
    if not level.uses_secure_agg and plan.update_clip > 0:
        steps.append(ReClip(plan.update_clip))
    if level.uses_secure_agg or (plan.robust_rule == "mean" and level is not PrivacyLevel.NONE):
        steps.append(Sum())
    else:
        steps.append(RobustRule(plan.robust_rule, level))
    if level is PrivacyLevel.DP:
        steps.append(
            CentralNoise(
                update_stddev=plan.noise_stddev if unit is DpUnit.NODE else 0.0,
                metric_stddevs=dict(plan.metric_noise_stddevs),
                statistics_stddev=plan.statistics_noise_stddev,
            )
        )
    if plan.workload is WorkloadKind.MODEL:
        if unit is DpUnit.NODE:
            steps.append(FixedMean(plan.expected_count))
        else:
            steps.append(ContributorMean())
    return Aggregator(plan, tuple(steps))
