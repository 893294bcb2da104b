"""The ledger's records: run and round statuses, the errors it raises, and the frozen
dataclasses it takes and returns (:class:`RoundRecord`, :class:`Participant`,
:class:`RunSummary`, :class:`RefusedNode`). Validated at construction; no database here --
:mod:`server.ledger` stores them (import them from there).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final, TypeAlias

__all__ = [
    "MAX_NODE_ID",
    "DuplicateRoundError",
    "DuplicateRunError",
    "JSONValue",
    "LedgerError",
    "Participant",
    "ParticipantOutcome",
    "Phase",
    "RefusedNode",
    "RoundRecord",
    "RoundStatus",
    "RunFinishedError",
    "RunNotFoundError",
    "RunStatus",
    "RunSummary",
    "Scalar",
]

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
Scalar: TypeAlias = bool | int | float | str

MAX_NODE_ID: Final = 2**64 - 1


# --------------------------------------------------------------------------- enums


class RunStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    """Finished and passed the reliability threshold (a signed bundle was built)."""
    REJECTED = "rejected"
    """Finished but failed the reliability threshold: no bundle; see the verdict reasons."""
    FAILED = "failed"
    """Stopped by an error."""
    ABORTED = "aborted"
    """Stopped on purpose (operator, privacy budget exhausted)."""
    INTERRUPTED = "interrupted"
    """Its process died mid-run (a crash, kill -9, power loss): it did not end, it stopped.
    Resume it (``--resume``); see ``interruptions`` for what each interruption cost."""


class RoundStatus(StrEnum):
    COMPLETED = "completed"
    ABORTED = "aborted"
    SKIPPED = "skipped"


class ParticipantOutcome(StrEnum):
    CONTRIBUTED = "contributed"
    DROPPED = "dropped"


class Phase(StrEnum):
    """Phases of a round: keys of ``timings`` and ``metrics``, and a participant's phase.

    ``train`` and ``eval``: a model job's fit and evaluation collections (in the clear or
    through SecAgg+); ``ranges`` and ``moments``: the two collections of an analytics round;
    ``initial``: the evaluation of the initial model before round 1 (recorded with round 1);
    ``secagg``: written by earlier versions for secure fit collections.
    """

    TRAIN = "train"
    SECAGG = "secagg"
    EVAL = "eval"
    RANGES = "ranges"
    MOMENTS = "moments"
    INITIAL = "initial"


# --------------------------------------------------------------------------- errors


class LedgerError(RuntimeError):
    """The ledger refused an operation or could not be read or written."""


class RunNotFoundError(LedgerError, KeyError):
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        LedgerError.__init__(
            self, f"No run {run_id!r} in the ledger. List the runs with `fedbrain runs list`."
        )

    def __str__(self) -> str:
        return str(self.args[0])


class DuplicateRunError(LedgerError):
    """A run with this id is already recorded."""


class DuplicateRoundError(LedgerError):
    """This round of this run is already recorded (the ledger never overwrites a round)."""


class RunFinishedError(LedgerError):
    """The run is no longer running, so it takes no more rounds and cannot finish again."""


# --------------------------------------------------------------------------- records


def _check_count(name: str, value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return f"`{name}` must be an int >= 0. Found {value!r}."
    return None


def _check_optional_float(name: str, value: object, *, unit: bool = False) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"`{name}` must be a number or None. Found {value!r}."
    if unit and not 0 <= value <= 1:
        return f"`{name}` must be in [0, 1]. Found {value!r}."
    return None


def _aware_problem(name: str, value: datetime | None) -> str | None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        return (
            f"`{name}` must be a timezone-aware datetime. Found naive {value.isoformat()}; "
            "pass datetime.now(UTC) or attach a timezone."
        )
    return None


def _raise_problems(problems: Sequence[str | None]) -> None:
    found = [p for p in problems if p is not None]
    if found:
        raise ValueError(" ".join(found))


@dataclass(frozen=True)
class Participant:
    """One node in one phase of a round.

    ``stage``: for ``contributed``, the last stage it completed; for ``dropped``, the stage at
    which it dropped (e.g. ``"share_keys"``, ``"masked_input"``, ``"train"``); ``reason``: why
    it dropped, in words (a timeout, its error reply, what was malformed in its reply) -- or,
    for a node whose masked input was summed but that was refused at a later SecAgg+ stage
    (``stage`` ``"consistency_check"`` or ``"unmask"``), why it was refused. Nothing computed
    from a node's data is recorded per node.
    """

    node_id: int
    node_type: str
    outcome: ParticipantOutcome
    stage: str | None = None
    reason: str | None = None
    phase: Phase = Phase.TRAIN

    def __post_init__(self) -> None:
        problems: list[str | None] = []
        if isinstance(self.node_id, bool) or not isinstance(self.node_id, int):
            problems.append(f"`node_id` must be an int. Found {self.node_id!r}.")
        elif not 0 <= self.node_id <= MAX_NODE_ID:
            problems.append(f"`node_id` must be in [0, 2**64 - 1]. Found {self.node_id}.")
        if not isinstance(self.node_type, str) or not self.node_type:
            problems.append(f"`node_type` must be a non-empty string. Found {self.node_type!r}.")
        if self.reason is not None and not isinstance(self.reason, str):
            problems.append(f"`reason` must be text. Found {self.reason!r}.")
        try:
            object.__setattr__(self, "outcome", ParticipantOutcome(self.outcome))
            object.__setattr__(self, "phase", Phase(self.phase))
        except ValueError as exc:
            problems.append(f"{exc}.")
        _raise_problems(problems)


@dataclass(frozen=True)
class RoundRecord:
    """What one round did. ``timings`` are seconds per :class:`Phase`; ``metrics`` maps a phase
    (``train``, ``eval``) to its aggregated metrics; ``measurements`` is the flat mapping the
    aggregators returned. ``recorded_at`` is set by the ledger's clock when left ``None``."""

    round: int
    status: RoundStatus = RoundStatus.COMPLETED
    sampled: int = 0
    responded: int = 0
    dropped_by_stage: Mapping[str, int] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    metrics: Mapping[str, Mapping[str, Scalar]] = field(default_factory=dict)
    epsilon: float | None = None
    delta: float | None = None
    reliability: float | None = None
    reliability_reasons: tuple[str, ...] = ()
    update_norm: float | None = None
    noise_to_signal: float | None = None
    measurements: Mapping[str, Scalar] = field(default_factory=dict)
    participants: tuple[Participant, ...] = ()
    recorded_at: datetime | None = None

    def __post_init__(self) -> None:
        problems: list[str | None] = []
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 1:
            problems.append(f"`round` must be an int >= 1. Found {self.round!r}.")
        try:
            object.__setattr__(self, "status", RoundStatus(self.status))
        except ValueError:
            problems.append(
                f"`status` must be one of {[s.value for s in RoundStatus]}. Found {self.status!r}."
            )
        problems += [
            _check_count("sampled", self.sampled),
            _check_count("responded", self.responded),
        ]
        problems += [
            _check_count(f"dropped_by_stage[{k!r}]", v) for k, v in self.dropped_by_stage.items()
        ]
        for phase, seconds in self.timings.items():
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not (math.isfinite(seconds) and seconds >= 0)
            ):
                problems.append(f"`timings[{phase!r}]` must be seconds >= 0. Found {seconds!r}.")
        for phase, values in self.metrics.items():
            if not isinstance(values, Mapping) or not all(
                isinstance(v, bool | int | float | str) for v in values.values()
            ):
                problems.append(
                    f"`metrics[{phase!r}]` must map metric names to numbers or strings."
                )
        if not all(isinstance(v, bool | int | float | str) for v in self.measurements.values()):
            problems.append("`measurements` must be flat: values are numbers, bools or strings.")
        problems += [
            _check_optional_float("epsilon", self.epsilon),
            _check_optional_float("delta", self.delta),
            _check_optional_float("reliability", self.reliability, unit=True),
            _check_optional_float("update_norm", self.update_norm),
            _check_optional_float("noise_to_signal", self.noise_to_signal),
        ]
        if not all(isinstance(r, str) for r in self.reliability_reasons):
            problems.append("`reliability_reasons` must be strings.")
        if not all(isinstance(p, Participant) for p in self.participants):
            problems.append("`participants` must be Participant objects.")
        else:
            seen = Counter((p.phase.value, p.node_id) for p in self.participants)
            dupes = sorted(f"{ph}:{n}" for (ph, n), count in seen.items() if count > 1)
            if dupes:
                problems.append(f"`participants` lists a node twice in one phase: {dupes}.")
        problems.append(_aware_problem("recorded_at", self.recorded_at))
        _raise_problems(problems)
        object.__setattr__(self, "dropped_by_stage", dict(self.dropped_by_stage))
        object.__setattr__(self, "timings", dict(self.timings))
        object.__setattr__(self, "metrics", {k: dict(v) for k, v in self.metrics.items()})
        object.__setattr__(self, "measurements", dict(self.measurements))
        object.__setattr__(self, "reliability_reasons", tuple(self.reliability_reasons))
        object.__setattr__(self, "participants", tuple(self.participants))

    @property
    def dropped(self) -> int:
        """Nodes dropped in this round, over all stages."""
        return sum(self.dropped_by_stage.values())

    def metric(self, name: str) -> float | None:
        """``name`` from the evaluation metrics, else from the training metrics, else None."""
        for phase in (Phase.EVAL, Phase.TRAIN):
            value = self.metrics.get(phase, {}).get(name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return None

    def to_json(self) -> dict[str, JSONValue]:
        """Plain JSON values (non-finite floats kept as Python floats)."""
        return {
            "round": self.round,
            "status": self.status.value,
            "recorded_at": None if self.recorded_at is None else self.recorded_at.isoformat(),
            "sampled": self.sampled,
            "responded": self.responded,
            "dropped_by_stage": dict(self.dropped_by_stage),
            "timings": dict(self.timings),
            "metrics": {k: dict(v) for k, v in self.metrics.items()},
            "epsilon": self.epsilon,
            "delta": self.delta,
            "reliability": self.reliability,
            "reliability_reasons": list(self.reliability_reasons),
            "update_norm": self.update_norm,
            "noise_to_signal": self.noise_to_signal,
            "measurements": dict(self.measurements),
            "participants": [
                {
                    "node_id": p.node_id,
                    "node_type": p.node_type,
                    "phase": p.phase.value,
                    "outcome": p.outcome.value,
                    "stage": p.stage,
                    "reason": p.reason,
                }
                for p in self.participants
            ],
        }


@dataclass(frozen=True)
class RefusedNode:
    """A node that a run did not admit (not eligible, wrong node type or model, no answer)."""

    node_id: int
    reason: str
    recorded_at: datetime | None = None

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "node_id": str(self.node_id),
            "reason": self.reason,
            "recorded_at": None if self.recorded_at is None else self.recorded_at.isoformat(),
        }


@dataclass(frozen=True)
class RunSummary:
    """A run as recorded, plus how many rounds it has and the last one."""

    run_id: str
    run_name: str | None
    artifact_name: str
    job: Mapping[str, JSONValue]
    privacy_level: str
    dp_unit: str | None
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None
    verdict_reasons: tuple[str, ...]
    final_epsilon: float | None
    delta: float | None
    reliability: float | None
    bundle_path: str | None
    bundle_sha256: str | None
    error: str | None
    rounds_recorded: int
    last_round: int
    flower_run_id: int | None = None
    owner: str | None = None
    """``host:pid:start-time`` of the process running it (``server.restart``)."""
    interruptions: tuple[Mapping[str, JSONValue], ...] = ()
    """One entry per interruption: ``round`` (the round that was under way), ``at``,
    ``charged`` (whether that round's privacy cost stays spent) and ``reason``."""

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "artifact_name": self.artifact_name,
            "job": dict(self.job),
            "privacy_level": self.privacy_level,
            "dp_unit": self.dp_unit,
            "status": self.status.value,
            "started_at": self.started_at.isoformat(),
            "finished_at": None if self.finished_at is None else self.finished_at.isoformat(),
            "verdict_reasons": list(self.verdict_reasons),
            "final_epsilon": self.final_epsilon,
            "delta": self.delta,
            "reliability": self.reliability,
            "bundle_path": self.bundle_path,
            "bundle_sha256": self.bundle_sha256,
            "error": self.error,
            "rounds_recorded": self.rounds_recorded,
            "last_round": self.last_round,
            "flower_run_id": None if self.flower_run_id is None else str(self.flower_run_id),
            "owner": self.owner,
            "interruptions": [dict(i) for i in self.interruptions],
        }
