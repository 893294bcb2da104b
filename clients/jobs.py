"""How a job reads -- for the nodes and for the server alike (no Flower, no node state here).

The server imports this module (never :mod:`clients.node`): which model a job trains, which
data folder it reads, what a node contributes in each kind of collection, and every privacy
parameter a node applies. A node derives all of them from the job itself, so it never takes a
clipping norm or a noise multiplier on the server's word; the server derives the same values
to decode, aggregate and account.

Privacy parameters (:func:`job_privacy`):

- the *update bound* a node clips its whole update to: ``dp.clipping_norm`` under node-level
  DP; at secure-aggregation levels otherwise ``secagg.quantization_range`` or
  :data:`DEFAULT_SECURE_RANGE` (the masked ring's range); at level ``none``
  ``dp.clipping_norm`` if given; else 0 (no clipping: an example-level DP-SGD update is
  private as it is, and ``dp.clipping_norm`` there bounds each example's gradient);
- node-level DP: the update's noise multiplier ``z`` (``dp.noise_multiplier`` or calibrated for
  ``dp.target_epsilon`` over the planned rounds with every metric release included);
- example-level DP-SGD: each node calibrates its own noise multiplier for
  ``dp.target_epsilon`` from its own example count (:func:`dp_sgd_noise_multiplier`) -- the
  count never leaves the node;
- every released metric sum gets ``dp.metrics_noise_multiplier`` (rows of L2 norm <= 1);
- analytics (sensing) releases get ``dp.noise_multiplier`` or one calibrated for the target.

Sampling: a server-chosen sample is public, so releases are accounted at sampling rate 1; only
``federation.sampling = secret`` (cohort nodes self-select with probability ``fraction``) is
accounted as Poisson subsampling, and never for example-level guarantees.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch

from aggregation.accountant import PrivacyEvent, SubsampledGaussianEvent
from aggregation.codec import EXAMPLE_CAP, Metric, MetricSpec, RingLayout
from aggregation.ddp import DdpConfig, DistributedMechanism
from aggregation.ddp_accounting import DistributedDpEvent
from aggregation.dp import calibrate_for_events, calibrate_noise_multiplier
from aggregation.privacy import DpUnit, PrivacyLevel, WorkloadKind
from clients.checkpoints import read_config
from clients.demo_data import AUDIO_CLASSES, TEXT_TOPICS, VISION_CLASSES, Modality
from clients.models import (
    ModelFamily,
    ModelSpec,
    build_model,
    family_for_base_model,
    spec_for_base_model,
)
from clients.protocol import Work
from clients.sensing import (
    CAMERA_RANGES,
    IOT_RANGES,
    FeatureRanges,
    audio_ranges,
    contribution_length,
)
from manifests.catalog import NodeType, NotTrainableError, Task
from manifests.jobspec import DEMO_BASE, JobSpec, Sampling

__all__ = [
    "DEFAULT_CAMERA_INPUT_SIZE",
    "DEFAULT_SECURE_RANGE",
    "HISTOGRAM_BINS",
    "LABEL_CLASSES",
    "NOMINAL_GROUP",
    "SENSING_N_MELS",
    "JobPrivacy",
    "analytics_row_bound",
    "analytics_statistics_length",
    "clip_statistic_rows",
    "collection_events",
    "collections_per_round",
    "dp_sgd_noise_multiplier",
    "dp_sgd_steps",
    "initial_events",
    "job_privacy",
    "loss_bound",
    "metrics_ddp",
    "metrics_for",
    "min_survivors",
    "modality_for_job",
    "model_spec_for_job",
    "release_events",
    "ring_layout",
    "round_events",
    "sensing_ranges",
    "statistics_ddp",
    "update_ddp",
    "update_length_for",
    "workload_for_job",
]

DEFAULT_CAMERA_INPUT_SIZE: Final = 224
"""Image side the camera statistics are computed at when the job sets no ``input_size``."""
SENSING_N_MELS: Final = 40
HISTOGRAM_BINS: Final = 64
"""Bins per feature of the analytics ranges phase (over the feature's public range)."""
NOMINAL_GROUP: Final = 1024
"""The largest secure collection: the granularity of distributed-DP metric and statistics
segments is sized for this many nodes, so node and server agree on it without knowing the
group in advance."""
DEFAULT_SECURE_RANGE: Final = 10.0
"""Update bound of ``secure-agg`` jobs that set neither a clipping norm nor a range."""
LABEL_CLASSES: Final[Mapping[Modality, int]] = {
    Modality.VISION: len(VISION_CLASSES),
    Modality.AUDIO: len(AUDIO_CLASSES),
    Modality.TEXT: len(TEXT_TOPICS),
}
"""Classifier size of supervised embed models, per modality (the demo data's label spaces)."""
LM_LOSS_BOUND: Final = 6.0
"""Per-sequence mean next-byte loss is clipped here (a uniform byte model scores ln 256 = 5.55)."""
_ACCOUNTANT: Final = "rdp"

_SENSING_MODALITY: Final[Mapping[str, Modality]] = {
    "sensing-camera-preproc-v1": Modality.VISION,
    "sensing-audio-preproc-v1": Modality.AUDIO,
    "sensing-iot-normalizer-v1": Modality.IOT,
}
_FAMILY_MODALITY: Final[Mapping[ModelFamily, Modality]] = {
    ModelFamily.VIT: Modality.VISION,
    ModelFamily.WAV2VEC2: Modality.AUDIO,
    ModelFamily.MPNET: Modality.TEXT,
    ModelFamily.GPT2: Modality.LM,
}


# --------------------------------------------------------------------------- job -> work


def modality_for_job(job: JobSpec) -> Modality:
    """The data folder a job reads (``ValueError`` for jobs fedbrain cannot train)."""
    if job.task is Task.DETECTION:
        raise ValueError(f"task 'detection' is not supported yet (job on {job.base_model}).")
    try:
        entry = job.catalog_entry
    except NotTrainableError as error:
        raise ValueError(str(error)) from None
    if entry.node_type is NodeType.SENSING:
        try:
            return _SENSING_MODALITY[entry.id]
        except KeyError:
            raise ValueError(f"Sensing artifact {entry.id} is not supported yet.") from None
    family = family_for_base_model(job.base_model)
    modality = _FAMILY_MODALITY[family]
    if (modality is Modality.LM) != (job.task is Task.LM_FINETUNE):
        raise ValueError(
            f"task {job.task} on {job.base_model} is not supported yet: {family} models train "
            f"{'lm-finetune' if modality is Modality.LM else 'embed'}."
        )
    return modality


def workload_for_job(job: JobSpec) -> WorkloadKind:
    """Model training, or federated analytics (the sensing normalizers)."""
    modality_for_job(job)  # refuses jobs fedbrain cannot train
    if job.catalog_entry.node_type is NodeType.SENSING:
        return WorkloadKind.ANALYTICS
    return WorkloadKind.MODEL


def _supervised(job: JobSpec) -> bool:
    """Embed jobs train a classifier head when labels exist, unless they ask for contrastive
    training (``augmentations``) without example-level DP (NT-Xent mixes a batch's examples,
    so one example's influence is unbounded)."""
    example_dp = job.privacy_level.uses_dp and job.dp.unit is DpUnit.EXAMPLE
    return job.task is Task.EMBED and (not job.augmentations or example_dp)


def model_spec_for_job(job: JobSpec) -> ModelSpec:
    """The model a model job trains; server and nodes build it alike: from the job's base
    checkpoint when it names one, adapted as the job says (only the trainable tensors travel:
    :mod:`clients.adaptation`)."""
    modality = modality_for_job(job)
    if workload_for_job(job) is not WorkloadKind.MODEL:
        raise ValueError(f"{job.catalog_entry.id} is a sensing job: it trains no model.")
    if job.base_checkpoint == DEMO_BASE:
        raise ValueError(
            "base_checkpoint = demo names the demo base that `fedbrain simulate` generates and "
            "puts in the job before signing it; outside a simulation, give the absolute path "
            "of a local checkpoint folder."
        )
    spec = spec_for_base_model(
        job.base_model,
        hidden_size=job.hidden_size,
        num_layers=job.num_layers,
        num_heads=job.num_heads,
        embedding_dim=job.embedding_dim if modality is not Modality.LM else None,
        num_classes=LABEL_CLASSES[modality] if _supervised(job) else None,
        input_size=job.input_size,
        sample_rate=job.sample_rate,
        max_seq_length=job.max_seq_length,
        checkpoint=None if job.base_checkpoint is None else Path(job.base_checkpoint),
        adaptation=job.adaptation,
        lora_rank=job.resolved_lora_rank,
        lora_alpha=job.resolved_lora_alpha,
    )
    if spec.family is ModelFamily.VIT and spec.base_folder is not None:
        # The learning form has no patch size: a ViT base brings its own.
        patch = read_config(spec.base_folder).get("patch_size")
        if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0:
            spec = replace(spec, patch_size=patch)
    return spec


def sensing_ranges(job: JobSpec) -> FeatureRanges:
    """The features and public (wide) value ranges of a sensing job."""
    if workload_for_job(job) is not WorkloadKind.ANALYTICS:
        raise ValueError(f"{job.catalog_entry.id} is not a sensing job.")
    modality = modality_for_job(job)
    if modality is Modality.VISION:
        return CAMERA_RANGES
    if modality is Modality.AUDIO:
        return audio_ranges(SENSING_N_MELS)
    return IOT_RANGES


def collections_per_round(job: JobSpec) -> tuple[Work, ...]:
    """The collections of one round: analytics ranges then moments; a model's fit then its
    evaluation."""
    if workload_for_job(job) is WorkloadKind.ANALYTICS:
        return (Work.RANGES, Work.MOMENTS)
    return (Work.FIT, Work.EVALUATE)


def analytics_statistics_length(job: JobSpec, work: Work) -> int:
    """Values in a node's statistics for an analytics collection: ``F x bins`` histogram
    counts (ranges) or ``1 + 2F`` moments."""
    features = len(sensing_ranges(job).features)
    if work is Work.RANGES:
        return features * HISTOGRAM_BINS
    if work is Work.MOMENTS:
        return contribution_length(features)
    raise ValueError(f"{work} is not an analytics collection.")


def analytics_row_bound(job: JobSpec, work: Work) -> float:
    """The L2 clipping norm of one example's statistics row: ``sqrt(F) / 2`` for the ranges
    histogram (F per-feature distributions, each of norm <= 1), ``sqrt(1 + F / 2)`` for the
    ``1 + 2F`` centred moments (each moment in [-1, 1]).

    Nodes scale each row down to this norm when it is longer and divide it by the norm, so
    every released row has norm <= 1 (the sensitivity the noise is calibrated for). The
    worst-case norms ``sqrt(F)`` and ``sqrt(1 + 2F)`` are far above a typical row's (values
    spread over several bins; centred moments well inside [-1, 1]), and a row scaled down as a
    whole keeps its own ratios -- mean, variance and histogram shape are only *weighted*
    differently -- so the tighter norms cost little bias and cut the noise by 2-3x.
    """
    features = len(sensing_ranges(job).features)
    if not job.privacy_level.uses_dp:  # no noise to save: the worst-case norms, nothing clipped
        return math.sqrt(features if work is Work.RANGES else contribution_length(features))
    if work is Work.RANGES:
        return math.sqrt(features) / 2.0
    return math.sqrt(1.0 + features / 2.0)


def clip_statistic_rows(rows: npt.NDArray[np.float64], bound: float) -> npt.NDArray[np.float64]:
    """Rows scaled down to L2 norm ``bound`` where longer, then divided by it (norm <= 1)."""
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
    clipped: npt.NDArray[np.float64] = rows * (scale / bound)
    return clipped


# --------------------------------------------------------------------------- metrics


def loss_bound(job: JobSpec) -> float:
    """The per-unit loss clip of released loss sums (public, from the job)."""
    if job.task is Task.LM_FINETUNE:
        return LM_LOSS_BOUND
    modality = modality_for_job(job)
    if _supervised(job):
        return max(1.0, 2.0 * math.log(LABEL_CLASSES[modality]))
    return math.log(2 * job.batch_size) + 1.0  # NT-Xent over 2B views, plus margin


def _node_unit(job: JobSpec) -> bool:
    return job.privacy_level.uses_dp and job.dp.unit is DpUnit.NODE


def metrics_for(job: JobSpec, work: Work) -> tuple[MetricSpec, ...]:
    """The metric coordinates of a collection (empty for analytics).

    Per-example sums with a count of examples, except under node-level DP, where a node
    contributes one row of its own means (its whole row stays bounded) and the denominator is
    the number of contributors, which the server knows anyway. Under DP a fit releases only
    the example count (node-level: whether the update was clipped): a training loss would be
    computed with the node's private local model, whose per-example losses have no bounded
    sensitivity; evaluation losses use the released global model.
    """
    if work in (Work.RANGES, Work.MOMENTS):
        return ()
    bound = loss_bound(job)
    node = _node_unit(job)
    count = () if node else (MetricSpec(Metric.EXAMPLES, 1.0),)
    if work is Work.FIT:
        if not job.privacy_level.uses_dp:
            return (*count, MetricSpec(Metric.TRAIN_LOSS, bound))
        if node:
            return (MetricSpec(Metric.CLIPPED, 1.0),)
        return count
    specs = [*count, MetricSpec(Metric.EVAL_LOSS, bound)]
    if job.task is Task.LM_FINETUNE or _supervised(job):
        specs.append(MetricSpec(Metric.EVAL_CORRECT, 1.0))
    if job.task is Task.LM_FINETUNE:
        specs.append(MetricSpec(Metric.BASELINE_LOSS, bound))
    return tuple(specs)


# --------------------------------------------------------------------------- privacy


@dataclass(frozen=True, kw_only=True)
class JobPrivacy:
    """The privacy parameters a job implies (see the module docstring).

    ``update_bound``: L2 bound of a node's update (0: not clipped). ``noise_multiplier``: node
    DP's update noise, or the analytics releases' (0 without). ``metrics_noise_multiplier``:
    every released metric sum's (0 without DP). ``dp_sgd_max_grad_norm``: per-example gradient
    bound of DP-SGD (0: no DP-SGD). ``sample_rate``: the rate the accountant may credit (1
    unless sampling is secret and the guarantee is node-level).
    """

    level: PrivacyLevel
    unit: DpUnit | None
    workload: WorkloadKind
    update_bound: float
    noise_multiplier: float = 0.0
    metrics_noise_multiplier: float = 0.0
    dp_sgd_max_grad_norm: float = 0.0
    sample_rate: float = 1.0
    delta: float | None = None
    target_epsilon: float | None = None
    epsilon_budget: float | None = None
    notes: tuple[str, ...] = ()

    @property
    def uses_dp_sgd(self) -> bool:
        return self.dp_sgd_max_grad_norm > 0


def _update_bound(job: JobSpec) -> float:
    level, dp, secagg = job.privacy_level, job.dp, job.secagg
    if level.uses_dp and dp.unit is DpUnit.NODE:
        return float(dp.clipping_norm or 0.0)
    if level.uses_secure_agg:
        return float(secagg.quantization_range or DEFAULT_SECURE_RANGE)
    if level is PrivacyLevel.NONE:  # an optional bound on plain updates (robustness)
        return float(dp.clipping_norm or 0.0)
    # Example-level DP in the clear: the DP-SGD update is private as it is; dp.clipping_norm
    # bounds each example's gradient there, not the update.
    return 0.0


def update_length_for(job: JobSpec) -> int:
    """Values in a model job's flattened update: its *trainable* tensors (all weights for
    ``adaptation = full``; LoRA adapters and heads, or heads alone, otherwise) -- 0 for
    analytics. Counted once per process on a model without storage (``meta`` device; the
    base checkpoint's values do not change the count)."""
    if workload_for_job(job) is WorkloadKind.ANALYTICS:
        return 0
    return _layout_size(replace(model_spec_for_job(job), checkpoint=None))


@functools.cache
def _layout_size(spec: ModelSpec) -> int:
    with torch.device("meta"):
        model = build_model(spec)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _distributed(job: JobSpec) -> bool:
    return job.privacy_level is PrivacyLevel.DP_SECURE_AGG


def update_ddp(job: JobSpec, noise_multiplier: float, update_length: int) -> DdpConfig:
    """The distributed DP of a node-level update: ``C = dp.clipping_norm``, noise ``z C`` in
    real units on the sum, granularity sized for ``federation.clients_per_round`` nodes."""
    group = job.federation.clients_per_round
    if group is None:
        raise ValueError(
            "federation.clients_per_round: node-level DP under dp+secure-agg sizes each node's "
            "noise share and the ring's granularity for a fixed group; set it."
        )
    return DdpConfig(
        mechanism=DistributedMechanism.SKELLAM,
        dim=update_length,
        l2_clip=float(job.dp.clipping_norm or 1.0),
        noise_multiplier=noise_multiplier,
        min_survivors=2,
        max_summands=group,
        max_noise_shares=group,
    )


def _rows_ddp(dim: int, noise_multiplier: float, *, per_node_rows: int) -> DdpConfig:
    """The distributed DP of a segment of rows with L2 norm <= 1 (metrics, statistics), sized
    for :data:`NOMINAL_GROUP` nodes of at most ``per_node_rows`` rows each."""
    return DdpConfig(
        mechanism=DistributedMechanism.SKELLAM,
        dim=dim,
        l2_clip=1.0,
        noise_multiplier=noise_multiplier,
        min_survivors=2,
        max_summands=per_node_rows * NOMINAL_GROUP,
        max_noise_shares=NOMINAL_GROUP,
    )


def metrics_ddp(job: JobSpec, work: Work) -> DdpConfig | None:
    """The distributed DP of a collection's metric rows (None without metrics)."""
    specs = metrics_for(job, work)
    if not specs:
        return None
    rows = 1 if _node_unit(job) else EXAMPLE_CAP
    return _rows_ddp(len(specs), job.dp.metrics_noise_multiplier, per_node_rows=rows)


def statistics_ddp(job: JobSpec, work: Work, noise_multiplier: float) -> DdpConfig:
    """The distributed DP of an analytics collection's per-example rows."""
    return _rows_ddp(
        analytics_statistics_length(job, work), noise_multiplier, per_node_rows=EXAMPLE_CAP
    )


def collection_events(
    job: JobSpec, work: Work, *, noise_multiplier: float, update_length: int
) -> list[PrivacyEvent]:
    """The privacy events of one collection (DP levels; a candidate ``noise_multiplier`` for
    node-level updates and analytics): central Gaussian releases at ``dp``, the distributed
    segments' exact events at ``dp+secure-agg``. Example-level DP-SGD steps are the nodes'
    own (:func:`dp_sgd_noise_multiplier`)."""
    if not job.privacy_level.uses_dp:
        return []
    rate = _accounted_rate(job)
    distributed = _distributed(job)
    events: list[PrivacyEvent] = []
    if work in (Work.RANGES, Work.MOMENTS):
        if distributed:
            config = statistics_ddp(job, work, noise_multiplier)
            return [DistributedDpEvent.from_config(config)]
        return [SubsampledGaussianEvent(noise_multiplier, 1.0)]
    if work is Work.FIT and _node_unit(job):
        if distributed:
            config = update_ddp(job, noise_multiplier, update_length)
            events.append(DistributedDpEvent.from_config(config, sample_rate=rate))
        else:
            events.append(SubsampledGaussianEvent(noise_multiplier, rate))
    metric_config = metrics_ddp(job, work)
    if metric_config is not None:
        # Every sampled node evaluates (no secret selection): evaluations are not amplified.
        metric_rate = rate if work is Work.FIT else 1.0
        if distributed:
            events.append(DistributedDpEvent.from_config(metric_config, sample_rate=metric_rate))
        else:
            events.append(SubsampledGaussianEvent(job.dp.metrics_noise_multiplier, metric_rate))
    return events


def round_events(
    job: JobSpec, *, noise_multiplier: float, update_length: int
) -> list[PrivacyEvent]:
    """Every release of one round (:func:`collection_events` of each collection)."""
    return [
        event
        for work in collections_per_round(job)
        for event in collection_events(
            job, work, noise_multiplier=noise_multiplier, update_length=update_length
        )
    ]


def initial_events(job: JobSpec, *, update_length: int = 0) -> list[PrivacyEvent]:
    """Releases before the first round: a model job evaluates its initial model."""
    if workload_for_job(job) is WorkloadKind.ANALYTICS:
        return []
    return collection_events(job, Work.EVALUATE, noise_multiplier=1.0, update_length=update_length)


def release_events(
    job: JobSpec, *, noise_multiplier: float, update_length: int
) -> list[PrivacyEvent]:
    """Every release of a planned run (:func:`initial_events`, then ``num_rounds`` times
    :func:`round_events`)."""
    per_round = round_events(job, noise_multiplier=noise_multiplier, update_length=update_length)
    return [
        *initial_events(job, update_length=update_length),
        *[e for _ in range(job.federation.num_rounds) for e in per_round],
    ]


def _accounted_rate(job: JobSpec) -> float:
    fed = job.federation
    if fed.sampling is Sampling.SECRET and _node_unit(job) and fed.fraction is not None:
        return float(fed.fraction)
    return 1.0


def job_privacy(job: JobSpec) -> JobPrivacy:
    """The privacy parameters of ``job`` (``ValueError`` when its DP cannot be met)."""
    level, dp = job.privacy_level, job.dp
    workload = workload_for_job(job)
    bound = _update_bound(job)
    notes: tuple[str, ...] = ()
    if not level.uses_dp:
        if level.uses_secure_agg and not (job.secagg.quantization_range or dp.clipping_norm):
            notes = (f"updates are clipped to {DEFAULT_SECURE_RANGE:g} (no bound was given)",)
        return JobPrivacy(
            level=level, unit=None, workload=workload, update_bound=bound, notes=notes
        )
    if dp.delta is None:
        raise ValueError(f"privacy_level {level} needs dp.delta.")
    unit = DpUnit.EXAMPLE if workload is WorkloadKind.ANALYTICS else dp.unit
    z = dp.noise_multiplier
    if (unit is DpUnit.NODE or workload is WorkloadKind.ANALYTICS) and z is None:
        if dp.target_epsilon is None:
            raise ValueError("dp: give dp.noise_multiplier or dp.target_epsilon to calibrate it.")
        z = _calibrated(job)
        notes = (
            f"noise multiplier {z:.4g} calibrated for epsilon {dp.target_epsilon:g} at delta "
            f"{dp.delta:g} over {job.federation.num_rounds} round(s)",
        )
    return JobPrivacy(
        level=level,
        unit=unit,
        workload=workload,
        update_bound=bound,
        noise_multiplier=float(z or 0.0),
        metrics_noise_multiplier=dp.metrics_noise_multiplier,
        dp_sgd_max_grad_norm=(
            float(dp.clipping_norm or 0.0)
            if unit is DpUnit.EXAMPLE and workload is WorkloadKind.MODEL
            else 0.0
        ),
        sample_rate=_accounted_rate(job),
        delta=dp.delta,
        target_epsilon=dp.target_epsilon,
        epsilon_budget=dp.epsilon_budget if dp.epsilon_budget is not None else dp.target_epsilon,
        notes=notes,
    )


def _calibrated(job: JobSpec) -> float:
    return _calibrate_cached(job.model_dump_json())


@functools.lru_cache(maxsize=64)
def _calibrate_cached(job_json: str) -> float:
    job = JobSpec.model_validate_json(job_json)
    if job.dp.target_epsilon is None or job.dp.delta is None:
        raise ValueError("dp.target_epsilon and dp.delta are needed to calibrate.")
    return calibrate_for_events(
        target_epsilon=job.dp.target_epsilon,
        target_delta=job.dp.delta,
        events_for=lambda z: release_events(
            job, noise_multiplier=z, update_length=update_length_for(job)
        ),
        accountant=_ACCOUNTANT,
    )


def dp_sgd_steps(job: JobSpec, num_examples: int) -> tuple[float, int]:
    """(Poisson sampling rate, optimizer steps) of one round of DP-SGD on ``num_examples``."""
    batches = max(1, math.ceil(num_examples / job.batch_size))
    return 1.0 / batches, job.epochs * batches


def dp_sgd_noise_multiplier(job: JobSpec, num_examples: int) -> float:
    """A node's DP-SGD noise multiplier: the smallest that keeps its run (every DP-SGD step of
    ``num_rounds`` rounds plus every metric release) within ``dp.target_epsilon``.

    Computed on the node from its own example count, which never leaves it.
    """
    return _dp_sgd_cached(job.model_dump_json(), int(num_examples))


@functools.lru_cache(maxsize=64)
def _dp_sgd_cached(job_json: str, num_examples: int) -> float:
    job = JobSpec.model_validate_json(job_json)
    dp = job.dp
    if dp.target_epsilon is None or dp.delta is None:
        raise ValueError("example-level DP-SGD needs dp.target_epsilon and dp.delta.")
    if num_examples < 1:
        raise ValueError("DP-SGD needs at least one training example.")
    rate, steps = dp_sgd_steps(job, num_examples)
    rounds = job.federation.num_rounds
    fixed = release_events(job, noise_multiplier=1.0, update_length=0)

    def events(z: float) -> list[PrivacyEvent]:
        return [*fixed, SubsampledGaussianEvent(z, rate, steps * rounds)]

    # DP-SGD alone at the target is a lower bound (the metric releases only add epsilon).
    alone = calibrate_noise_multiplier(
        target_epsilon=dp.target_epsilon,
        target_delta=dp.delta,
        sample_rate=rate,
        rounds=steps * rounds,
        accountant=_ACCOUNTANT,
    )
    return calibrate_for_events(
        target_epsilon=dp.target_epsilon,
        target_delta=dp.delta,
        events_for=events,
        lower=alone,
        accountant=_ACCOUNTANT,
    )


# --------------------------------------------------------------------------- the ring


def min_survivors(job: JobSpec, group_size: int) -> int:
    """The survivors a collection's distributed noise is sized for: ``floor(N (1 - p))`` with
    ``p = dp.planned_dropout`` (at least 2). A node refuses to unmask a sum of fewer."""
    return max(2, math.floor(group_size * (1.0 - job.dp.planned_dropout)))


def ring_layout(job: JobSpec, work: Work, *, update_length: int, group_size: int) -> RingLayout:
    """The ring vector of one secure collection (node and server build the same).

    At ``dp+secure-agg`` every released segment goes through distributed DP
    (:mod:`aggregation.ddp`); the update only under node-level DP (example-level DP-SGD
    updates are already noised on the node).
    """
    privacy = job_privacy(job)
    if group_size > NOMINAL_GROUP:
        raise ValueError(
            f"A secure collection holds at most {NOMINAL_GROUP} nodes (the ring's granularity "
            f"is sized for that many). Found {group_size}."
        )
    stats = 0
    if privacy.workload is WorkloadKind.ANALYTICS:
        stats = analytics_statistics_length(job, work)
    length = update_length if work is Work.FIT else 0
    if length and not privacy.update_bound > 0:
        raise ValueError("A secure collection needs a positive update bound.")
    distributed = _distributed(job)
    node_update = distributed and length > 0 and privacy.unit is DpUnit.NODE
    planned = job.federation.clients_per_round
    if node_update and planned is not None and group_size > planned:
        raise ValueError(
            f"The collection has {group_size} nodes; node-level distributed DP is sized for "
            f"federation.clients_per_round = {planned}."
        )
    return RingLayout(
        update_length=length,
        update_range=privacy.update_bound if length else 1.0,
        metrics=metrics_for(job, work),
        statistics_length=stats,
        max_summands=group_size,
        update_ddp=update_ddp(job, privacy.noise_multiplier, length) if node_update else None,
        metrics_ddp=metrics_ddp(job, work) if distributed else None,
        statistics_ddp=(
            statistics_ddp(job, work, privacy.noise_multiplier) if distributed and stats else None
        ),
    )
