"""What a run decides before its first round: who is sampled, how, and what it costs.

- :class:`SamplingPlan`: each round's nodes from the run's fixed population. ``uniform`` /
  ``poisson`` are drawn by the server (public: the ledger records them); ``secret`` draws a
  cohort the same way and lets each cohort node include its data with probability
  ``federation.fraction`` from its own CSPRNG (:mod:`clients.node`).
- :class:`RunPlan`: the job's privacy parameters (:func:`clients.jobs.job_privacy`, the same
  values the nodes derive), one :class:`aggregation.pipeline.AggregationPlan` per kind of
  collection, and the accountant's events per round.

Accounting (``dp`` and ``dp+secure-agg``): a release the server can attribute to a sampled node
is accounted at sampling rate 1 -- no amplification unless sampling is secret, and never for
an example-level guarantee. Node-level DP composes, per round, the update release and the
metric releases; analytics compose their two releases per round; example-level DP-SGD runs
on the nodes, each calibrated to ``dp.target_epsilon`` with the metric releases included
(:func:`clients.jobs.dp_sgd_noise_multiplier`), so the run's guarantee is that target.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from aggregation.accountant import PrivacyEvent
from aggregation.codec import Metric
from aggregation.pipeline import AggregationPlan
from aggregation.privacy import DpUnit, PrivacyLevel, WorkloadKind
from aggregation.secagg import SecAggParams
from clients.jobs import JobPrivacy, initial_events, job_privacy, metrics_for, round_events
from clients.protocol import Work
from manifests.jobspec import JobSpec, RobustAggregation, Sampling

__all__ = [
    "ACCOUNTANT_KIND",
    "MIN_SECURE_GROUP",
    "RunPlan",
    "SamplingPlan",
    "secagg_params",
]

ACCOUNTANT_KIND: Final = "rdp"
MIN_SECURE_GROUP: Final = 3
"""The smallest group secure aggregation runs with: with 2, each node could subtract its own
input from the sum and learn the other's."""


@dataclass(frozen=True)
class SamplingPlan:
    """How each round's nodes are drawn from the run's fixed ``population``.

    Uniform (and secret's cohort): ``count`` distinct nodes (``clients_per_round``, else
    ``ceil(fraction * N)``, else all). Poisson: each node independently with probability
    ``rate``. ``include_rate``: the probability that a cohort node includes its data (secret
    sampling; 1 otherwise).
    """

    population: tuple[int, ...]
    method: Sampling
    count: int
    rate: float
    include_rate: float = 1.0

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
        elif fed.fraction is not None and fed.sampling is not Sampling.SECRET:
            count = max(1, math.ceil(fed.fraction * size))
        else:
            count = size
        if count > size:
            raise ValueError(
                f"federation.clients_per_round is {count} but only {size} eligible nodes "
                "joined; lower it or add nodes."
            )
        include = float(fed.fraction or 1.0) if fed.sampling is Sampling.SECRET else 1.0
        return cls(nodes, fed.sampling, count, count / size, include)

    @property
    def expected_count(self) -> float:
        """The expected number of nodes whose data a round includes (the DP-FedAvg
        denominator)."""
        if self.method is Sampling.POISSON:
            return self.rate * len(self.population)
        return self.count * self.include_rate

    def sample(self, rng: np.random.Generator) -> list[int]:
        """One round's nodes (sorted)."""
        if self.method is Sampling.POISSON:
            keep = rng.random(len(self.population)) < self.rate
            return [n for n, k in zip(self.population, keep, strict=True) if k]
        chosen = rng.choice(len(self.population), size=self.count, replace=False)
        return sorted(self.population[int(i)] for i in chosen)


def secagg_params(
    job: JobSpec, *, num_clients: int, vector_length: int, clipping_range: float = 1.0
) -> SecAggParams:
    """SecAgg+ parameters of one collection of ``num_clients`` nodes.

    ``k = secagg.num_neighbours`` or ``min(n - 1, ceil(2 log2 n))``; ``t =
    secagg.reconstruction_threshold`` or ``floor((k + 1) / 2) + 1`` (more than half of a
    node's ``k + 1`` share holders, so split views cannot rebuild both of its secrets), at
    least 2. Fewer than :data:`MIN_SECURE_GROUP` nodes, or a
    threshold that does not fit, is a ``ValueError``. ``clipping_range`` is informational: the
    ring encoding (:class:`aggregation.codec.RingLayout`) bounds every value.
    """
    if job.secagg.quantization_bits != 32:
        raise ValueError(
            "secagg.quantization_bits: fedbrain's SecAgg+ sums in Z_(2^32), so values are "
            f"quantized with 32 bits; leave it at 32. Found {job.secagg.quantization_bits}."
        )
    if num_clients < MIN_SECURE_GROUP:
        raise ValueError(
            f"secure aggregation needs at least {MIN_SECURE_GROUP} nodes in a round (with "
            f"{num_clients}, a node could subtract its own input from the sum)"
        )
    k = job.secagg.num_neighbours
    if k is None:
        k = max(1, math.ceil(2 * math.log2(max(num_clients, 2))))
    k = max(1, min(k, num_clients - 1))
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


@dataclass(frozen=True)
class RunPlan:
    """The privacy mechanics of a run (see the module docstring)."""

    privacy: JobPrivacy
    sampling: SamplingPlan
    aggregation: Mapping[Work, AggregationPlan]
    events_per_round: tuple[PrivacyEvent, ...]
    initial_events: tuple[PrivacyEvent, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def level(self) -> PrivacyLevel:
        return self.privacy.level

    @property
    def accounts(self) -> bool:
        """Whether the server composes privacy events (every DP level)."""
        return self.privacy.level.uses_dp

    @property
    def mechanism(self) -> str:
        """How the noise is made, in words (the manifest records it)."""
        if not self.privacy.level.uses_dp:
            return "none"
        if self.privacy.level is PrivacyLevel.DP:
            return "central Gaussian (the server adds the noise to the sums it sees)"
        return (
            "distributed Skellam: node noise shares before SecAgg+ masking, rotation and "
            "conditional rounding (Agarwal et al. 2021; Kairouz et al. 2021)"
        )

    @classmethod
    def for_job(cls, job: JobSpec, sampling: SamplingPlan, *, update_length: int) -> RunPlan:
        """The plan of ``job`` over ``sampling`` (``ValueError`` for a job that cannot run)."""
        privacy = job_privacy(job)
        notes = list(privacy.notes)
        level, unit = privacy.level, privacy.unit
        robust = job.federation.robust_aggregation
        if unit is DpUnit.NODE and robust is not RobustAggregation.MEAN:
            raise ValueError(
                f"federation.robust_aggregation: {robust} cannot be combined with node-level "
                "DP (the noise is calibrated to a sum of clipped updates). Use mean, or "
                "dp.unit = example."
            )
        if sampling.method is Sampling.SECRET and not level.uses_secure_agg:
            raise ValueError("secret sampling needs secure aggregation.")
        plans: dict[Work, AggregationPlan] = {}
        works = (
            (Work.RANGES, Work.MOMENTS)
            if privacy.workload is WorkloadKind.ANALYTICS
            else (Work.FIT, Work.EVALUATE)
        )
        for work in works:
            plans[work] = _aggregation_plan(job, privacy, sampling, work)
        events: list[PrivacyEvent] = []
        initial: list[PrivacyEvent] = []
        if level.uses_dp:
            events = round_events(
                job, noise_multiplier=privacy.noise_multiplier or 1.0, update_length=update_length
            )
            initial = initial_events(job, update_length=update_length)
            if sampling.method is Sampling.SECRET and unit is DpUnit.NODE:
                notes.append(
                    f"secret sampling: amplification at rate {privacy.sample_rate:g} credited"
                )
            elif unit is DpUnit.NODE:
                notes.append("server-chosen sampling: no amplification credited")
        return cls(privacy, sampling, plans, tuple(events), tuple(initial), tuple(notes))


def _aggregation_plan(
    job: JobSpec, privacy: JobPrivacy, sampling: SamplingPlan, work: Work
) -> AggregationPlan:
    level, unit = privacy.level, privacy.unit
    metric_stds: dict[Metric, float] = {}
    specs = metrics_for(job, work)
    if level.uses_dp and specs:
        z_m = privacy.metrics_noise_multiplier
        k = len(specs)
        for spec in specs:  # a unit's row has norm <= 1 once metric i is scaled by 1/(b_i sqrt(K))
            metric_stds[spec.metric] = z_m * spec.bound * math.sqrt(k)
    stats_std = 0.0
    if level.uses_dp and privacy.workload is WorkloadKind.ANALYTICS:
        stats_std = privacy.noise_multiplier  # rows are normalised to norm <= 1
    update_noise = 0.0
    if unit is DpUnit.NODE and work is Work.FIT:
        update_noise = privacy.noise_multiplier * privacy.update_bound
    clip = privacy.update_bound if work is Work.FIT and not level.uses_secure_agg else 0.0
    return AggregationPlan(
        level=level,
        unit=unit,
        workload=privacy.workload,
        update_clip=clip,
        noise_stddev=update_noise,
        metric_noise_stddevs=metric_stds,
        statistics_noise_stddev=stats_std,
        expected_count=max(sampling.expected_count, 1e-9),
        robust_rule=job.federation.robust_aggregation.value.replace("-", "_"),
    )
