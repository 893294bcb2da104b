"""Record a round: the ledger row, the reliability observation and the progress event.

Only aggregates reach the record: who took part (public to the server by construction),
who dropped and why, stage timings, and metrics computed from the (noised, under DP) sums.
No per-node value computed from private data is recorded; per-node evaluation spreads are
scored only at level ``none``, where the server sees every node's values anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from aggregation.codec import Metric
from aggregation.pipeline import AggregateOutput
from aggregation.privacy import PrivacyLevel
from aggregation.reliability import RoundObservation, RoundReliability, score_round
from aggregation.types import Measurements
from clients.protocol import Work
from server.collect import Contributions
from server.ledger import Participant, ParticipantOutcome, Phase, RoundRecord, RoundStatus
from server.workload import round_metrics

__all__ = ["Collected", "RoundResult", "phase_of", "record_round"]

_PHASE: dict[Work, Phase] = {
    Work.FIT: Phase.TRAIN,
    Work.EVALUATE: Phase.EVAL,
    Work.RANGES: Phase.RANGES,
    Work.MOMENTS: Phase.MOMENTS,
}


def phase_of(work: Work) -> Phase:
    return _PHASE[work]


@dataclass
class Collected:
    """One collection of a round, with what the aggregator and the workload made of it."""

    contributions: Contributions
    output: AggregateOutput | None = None
    applied: Measurements = field(default_factory=dict)
    initial: bool = False

    @property
    def metrics(self) -> dict[str, float]:
        if self.output is None:
            return {}
        return round_metrics(self.output, self.contributions.work)


@dataclass(frozen=True)
class RoundResult:
    """What :func:`record_round` built: the ledger row, the score, and the progress fields."""

    record: RoundRecord
    reliability: RoundReliability | None
    observation: RoundObservation | None
    progress: dict[str, float]
    message: str


def _participants(collected: Sequence[Collected], node_type: str) -> list[Participant]:
    out: list[Participant] = []
    for item in collected:
        c = item.contributions
        phase = Phase.INITIAL if item.initial else phase_of(c.work)
        last = "unmask" if c.secagg is not None else phase.value
        late = {d.node: d for d in c.late}  # refused after its input was summed: counted
        for node in c.contributors:
            note = late.get(node)
            out.append(
                Participant(
                    node_id=node,
                    node_type=node_type,
                    outcome=ParticipantOutcome.CONTRIBUTED,
                    stage=last if note is None else note.stage,
                    reason=None if note is None else note.reason,
                    phase=phase,
                )
            )
        for d in c.dropouts:
            out.append(
                Participant(
                    node_id=d.node,
                    node_type=node_type,
                    outcome=ParticipantOutcome.DROPPED,
                    stage=d.stage,
                    reason=d.reason,
                    phase=phase,
                )
            )
        if c.aborted is not None:
            listed = set(c.contributors) | {d.node for d in c.dropouts}
            for node in sorted(set(c.sampled) - listed):
                out.append(
                    Participant(
                        node_id=node,
                        node_type=node_type,
                        outcome=ParticipantOutcome.DROPPED,
                        stage=f"aborted:{phase.value}",
                        reason=c.aborted,
                        phase=phase,
                    )
                )
    return out


def _client_metrics(item: Collected | None) -> list[dict[str, float]]:
    """Per-node evaluation metrics, only where the server sees them in the clear (none)."""
    if item is None or item.contributions.per_node is None:
        return []
    rows = []
    for summed in item.contributions.per_node.values():
        examples = summed.metrics.get(Metric.EXAMPLES, 0.0)
        if not examples > 0:
            continue
        row = {
            "loss": summed.metrics.get(Metric.EVAL_LOSS, 0.0) / examples,
            "num_examples": examples,
        }
        if Metric.EVAL_CORRECT in summed.metrics:
            row["accuracy"] = min(1.0, summed.metrics[Metric.EVAL_CORRECT] / examples)
        rows.append(row)
    return rows


def record_round(
    *,
    number: int,
    level: PrivacyLevel,
    node_type: str,
    sampled: Sequence[int],
    collected: Sequence[Collected],
    epsilon: float | None,
    delta: float | None,
    previous: RoundObservation | None,
    measurements: Measurements,
    timings: Mapping[str, float],
) -> RoundResult:
    """Build the round's ledger row, score it, and the progress fields (see module doc)."""
    main = [
        c for c in collected if not c.initial and c.contributions.work in (Work.FIT, Work.MOMENTS)
    ]
    evaluation = next(
        (c for c in collected if not c.initial and c.contributions.work is Work.EVALUATE), None
    )
    aborted = next((c.contributions.aborted for c in main if c.contributions.aborted), None)
    training = main[-1] if main else None
    contributors = training.contributions.contributors if training else ()
    dropped: dict[str, int] = {}
    seen: set[int] = set()
    for item in collected:  # each node counted once, at the first stage it dropped in
        if item.initial or item.contributions.work is Work.EVALUATE:
            continue
        for dropout in item.contributions.dropouts:
            if dropout.node not in seen:
                seen.add(dropout.node)
                dropped[dropout.stage] = dropped.get(dropout.stage, 0) + 1
    metrics: dict[str, dict[str, float | str]] = {}
    measured: dict[str, float | int | str | bool] = dict(measurements)
    for item in collected:
        phase = Phase.INITIAL if item.initial else phase_of(item.contributions.work)
        values = item.metrics
        if values:
            metrics[phase.value] = dict(values)
        if item.output is not None:
            for key, value in item.output.measurements.items():
                measured[f"{phase.value}_{key}"] = value
        for key, value in item.contributions.measurements.items():
            measured[f"{phase.value}_{key}"] = value
        for key, value in item.applied.items():
            measured[key] = value
        if item.contributions.aborted is not None:
            measured[f"{phase.value}_aborted"] = item.contributions.aborted
    update_norm = measured.get("update_norm")
    noise_to_signal = measured.get(f"{Phase.TRAIN.value}_noise_to_signal")
    eval_metrics = evaluation.metrics if evaluation is not None else {}
    reliability: RoundReliability | None = None
    observation: RoundObservation | None = None
    status = RoundStatus.COMPLETED
    if aborted is not None:
        status = RoundStatus.ABORTED
        reasons: tuple[str, ...] = (f"round aborted: {aborted}",)
    else:
        observation = RoundObservation(
            round_number=number,
            sampled=len(sampled),
            responded=min(len(contributors), len(sampled)),
            dropped_by_stage=dropped,
            client_metrics=_client_metrics(evaluation) if level is PrivacyLevel.NONE else (),
            eval_loss=eval_metrics.get("eval_loss"),
            eval_accuracy=eval_metrics.get("eval_accuracy"),
            eval_loss_stderr=eval_metrics.get("eval_loss_stderr"),
            update_norm=float(update_norm) if isinstance(update_norm, int | float) else None,
            noise_to_signal=(
                float(noise_to_signal)
                if isinstance(noise_to_signal, int | float) and math.isfinite(noise_to_signal)
                else None
            ),
        )
        reliability = score_round(observation, previous=previous)
        measured.update(reliability.to_measurements())
        reasons = reliability.reasons
    if epsilon is not None:
        measured["epsilon"] = epsilon
    record = RoundRecord(
        round=number,
        status=status,
        sampled=len(sampled),
        responded=len(contributors),
        dropped_by_stage=dropped,
        timings=dict(timings),
        metrics=metrics,
        epsilon=epsilon,
        delta=delta,
        reliability=None if reliability is None else reliability.score,
        reliability_reasons=reasons,
        update_norm=float(update_norm) if isinstance(update_norm, int | float) else None,
        noise_to_signal=observation.noise_to_signal if observation is not None else None,
        measurements=measured,
        participants=tuple(_participants(collected, node_type)),
    )
    participants = len(contributors) if status is RoundStatus.COMPLETED else 0
    progress: dict[str, float] = {
        "participants": float(participants),
        "dropouts": float(sum(dropped.values())),
        "seconds": float(timings.get("total", 0.0)),
    }
    for phase_name, phase_metrics in metrics.items():
        prefix = "initial_" if phase_name == Phase.INITIAL.value else ""
        for key, value in phase_metrics.items():
            if isinstance(value, float):
                progress[prefix + key] = value
    if epsilon is not None:
        progress["epsilon"] = epsilon
    if reliability is not None:
        progress["reliability"] = reliability.score
    message = (
        f"round {number} aborted: {aborted}"
        if aborted is not None
        else f"round {number}: {participants} of {len(sampled)} contributed"
    )
    return RoundResult(record, reliability, observation, progress, message)
