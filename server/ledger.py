"""The run ledger: what each run and each of its rounds did, in a SQL database.

By default a SQLite file in the run directory (``sqlite:///<run_dir>/ledger.sqlite``,
:meth:`Ledger.for_run_dir`); any SQLAlchemy URL works (PostgreSQL in production). The schema
keeps to portable types:

- JSON documents in ``sqlalchemy.JSON`` columns. JSON has no NaN or infinity (PostgreSQL
  refuses them), so non-finite floats inside a document are stored as ``{"$float": "NaN"}``
  (``"Infinity"``, ``"-Infinity"``) and read back as floats.
- Float columns keep infinities; NaN is stored as NULL (SQLite has no NaN) -- the exact value
  stays in the round's ``measurements`` document.
- Times are timezone-aware UTC datetimes in the API, stored as naive UTC timestamps (the same
  on SQLite and PostgreSQL); a naive datetime is refused.
- Flower node ids are random unsigned 64-bit integers, past ``BIGINT``'s range: stored as
  decimal strings, returned as ``int``.

Tables: ``runs`` (one row per run; ``flower_run_id`` links it to Flower's own run id when
known), ``rounds`` (one per recorded round, unique per run and round number), ``participants``
(one per node and phase of a round), ``refused_nodes`` (the nodes a run did not admit, with the
reason). Each public method runs in its own session and transaction: a write either lands whole
or not at all. Schema changes are additive; opening an older ledger adds the missing columns
(and :meth:`LedgerBase.metadata.create_all` the missing tables when ``create``).

Order of writes in a round (with :mod:`server.checkpoint`): compose the accountant, write
``accountant.json``, :meth:`Ledger.record_round`, then the checkpoint when one is due. On
resume from the checkpoint of round ``r``, :meth:`Ledger.resume_run` deletes the rounds after
``r`` (they are trained again); the privacy they spent stays in the accountant.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final, Self, TypeAlias, cast

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKeyConstraint,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    selectinload,
    sessionmaker,
)
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

__all__ = [
    "LEDGER_FILENAME",
    "DuplicateRoundError",
    "DuplicateRunError",
    "Ledger",
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
    "utc_now",
]

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
Scalar: TypeAlias = bool | int | float | str
Clock: TypeAlias = Callable[[], datetime]

LEDGER_FILENAME: Final = "ledger.sqlite"
MAX_NODE_ID: Final = 2**64 - 1
_NONFINITE_KEY: Final = "$float"


def utc_now() -> datetime:
    """The default clock: now, timezone-aware UTC."""
    return datetime.now(UTC)


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


# --------------------------------------------------------------------------- column types


def _encode_json(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        text = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return {_NONFINITE_KEY: text}
    if isinstance(value, Mapping):
        return {str(k): _encode_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode_json(v) for v in value]
    return value


def _decode_json(value: object) -> object:
    if isinstance(value, dict):
        if set(value) == {_NONFINITE_KEY} and value[_NONFINITE_KEY] in (
            "NaN",
            "Infinity",
            "-Infinity",
        ):
            return float(value[_NONFINITE_KEY].lower().replace("infinity", "inf"))
        return {k: _decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_json(v) for v in value]
    return value


class PortableJSON(TypeDecorator[object]):
    """``sqlalchemy.JSON`` that stores non-finite floats as ``{"$float": ...}`` objects."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: object | None, dialect: Dialect) -> object | None:
        return None if value is None else _encode_json(value)

    def process_result_value(self, value: object | None, dialect: Dialect) -> object | None:
        return None if value is None else _decode_json(value)


class PortableFloat(TypeDecorator[float]):
    """A double that stores NaN as NULL (SQLite has no NaN); infinities are kept."""

    impl = Float(precision=53)
    cache_ok = True

    def process_bind_param(self, value: float | None, dialect: Dialect) -> float | None:
        if value is None or math.isnan(value):
            return None
        return float(value)

    def process_result_value(self, value: float | None, dialect: Dialect) -> float | None:
        return None if value is None else float(value)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes, stored as naive UTC (portable); naive input is refused."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(
                f"the ledger stores timezone-aware datetimes only. Found naive {value!r}; "
                "pass datetime.now(UTC) or attach a timezone."
            )
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


# --------------------------------------------------------------------------- ORM


class LedgerBase(DeclarativeBase):
    """Declarative base of the ledger's tables (its own metadata)."""


def _enum_check(table: str, column: str, enum: type[StrEnum]) -> CheckConstraint:
    values = ", ".join(f"'{member.value}'" for member in enum)
    return CheckConstraint(f"{column} IN ({values})", name=f"ck_{table}_{column}")


class RunRow(LedgerBase):
    __tablename__ = "runs"
    __table_args__ = (_enum_check("runs", "status", RunStatus),)

    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    run_name: Mapped[str | None] = mapped_column(String(128))
    artifact_name: Mapped[str] = mapped_column(String(255))
    job: Mapped[Any] = mapped_column(PortableJSON)
    privacy_level: Mapped[str] = mapped_column(String(32))
    dp_unit: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    verdict_reasons: Mapped[Any] = mapped_column(PortableJSON)
    final_epsilon: Mapped[float | None] = mapped_column(PortableFloat)
    delta: Mapped[float | None] = mapped_column(PortableFloat)
    reliability: Mapped[float | None] = mapped_column(PortableFloat)
    bundle_path: Mapped[str | None] = mapped_column(Text)
    bundle_sha256: Mapped[str | None] = mapped_column(String(71))
    error: Mapped[str | None] = mapped_column(Text)
    flower_run_id: Mapped[str | None] = mapped_column(String(20))

    rounds: Mapped[list[RoundRow]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )


class RoundRow(LedgerBase):
    __tablename__ = "rounds"
    __table_args__ = (
        ForeignKeyConstraint(["run_id"], ["runs.run_id"], ondelete="CASCADE"),
        _enum_check("rounds", "status", RoundStatus),
        CheckConstraint("round >= 1", name="ck_rounds_round"),
    )

    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sampled: Mapped[int] = mapped_column(Integer)
    responded: Mapped[int] = mapped_column(Integer)
    dropped_by_stage: Mapped[Any] = mapped_column(PortableJSON)
    timings: Mapped[Any] = mapped_column(PortableJSON)
    metrics: Mapped[Any] = mapped_column(PortableJSON)
    epsilon: Mapped[float | None] = mapped_column(PortableFloat)
    delta: Mapped[float | None] = mapped_column(PortableFloat)
    reliability: Mapped[float | None] = mapped_column(PortableFloat)
    reliability_reasons: Mapped[Any] = mapped_column(PortableJSON)
    update_norm: Mapped[float | None] = mapped_column(PortableFloat)
    noise_to_signal: Mapped[float | None] = mapped_column(PortableFloat)
    measurements: Mapped[Any] = mapped_column(PortableJSON)

    run: Mapped[RunRow] = relationship(back_populates="rounds")
    participants: Mapped[list[ParticipantRow]] = relationship(
        back_populates="round_row", cascade="all, delete-orphan", passive_deletes=True
    )


class ParticipantRow(LedgerBase):
    __tablename__ = "participants"
    __table_args__ = (
        ForeignKeyConstraint(
            ["run_id", "round"], ["rounds.run_id", "rounds.round"], ondelete="CASCADE"
        ),
        _enum_check("participants", "outcome", ParticipantOutcome),
        _enum_check("participants", "phase", Phase),
    )

    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    round: Mapped[int] = mapped_column(Integer, primary_key=True)
    phase: Mapped[str] = mapped_column(String(16), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(20), primary_key=True)
    node_type: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    stage: Mapped[str | None] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)

    round_row: Mapped[RoundRow] = relationship(back_populates="participants")


class RefusedNodeRow(LedgerBase):
    __tablename__ = "refused_nodes"
    __table_args__ = (ForeignKeyConstraint(["run_id"], ["runs.run_id"], ondelete="CASCADE"),)

    run_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(20), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)


_ADDED_COLUMNS: Final = (("runs", "flower_run_id", "VARCHAR(20)"),)
"""Columns added after a table was first released: (table, column, SQL type)."""


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
    it dropped, in words (a timeout, its error reply, what was malformed in its reply). Nothing
    computed from a node's data is recorded per node.
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
        }


def _summary(row: RunRow, count: int, last: int) -> RunSummary:
    return RunSummary(
        run_id=row.run_id,
        run_name=row.run_name,
        artifact_name=row.artifact_name,
        job=cast(dict[str, JSONValue], row.job or {}),
        privacy_level=row.privacy_level,
        dp_unit=row.dp_unit,
        status=RunStatus(row.status),
        started_at=row.started_at,
        finished_at=row.finished_at,
        verdict_reasons=tuple(row.verdict_reasons or ()),
        final_epsilon=row.final_epsilon,
        delta=row.delta,
        reliability=row.reliability,
        bundle_path=row.bundle_path,
        bundle_sha256=row.bundle_sha256,
        error=row.error,
        rounds_recorded=count,
        last_round=last,
        flower_run_id=None if row.flower_run_id is None else int(row.flower_run_id),
    )


def _round_record(row: RoundRow) -> RoundRecord:
    participants = sorted(row.participants, key=lambda p: (p.phase, int(p.node_id)))
    return RoundRecord(
        round=row.round,
        status=RoundStatus(row.status),
        sampled=row.sampled,
        responded=row.responded,
        dropped_by_stage=row.dropped_by_stage or {},
        timings=row.timings or {},
        metrics=row.metrics or {},
        epsilon=row.epsilon,
        delta=row.delta,
        reliability=row.reliability,
        reliability_reasons=tuple(row.reliability_reasons or ()),
        update_norm=row.update_norm,
        noise_to_signal=row.noise_to_signal,
        measurements=row.measurements or {},
        participants=tuple(
            Participant(
                node_id=int(p.node_id),
                node_type=p.node_type,
                outcome=ParticipantOutcome(p.outcome),
                stage=p.stage,
                reason=p.reason,
                phase=Phase(p.phase),
            )
            for p in participants
        ),
        recorded_at=row.recorded_at,
    )


def _participant_row(run_id: str, round_number: int, p: Participant) -> ParticipantRow:
    return ParticipantRow(
        run_id=run_id,
        round=round_number,
        phase=p.phase.value,
        node_id=str(p.node_id),
        node_type=p.node_type,
        outcome=p.outcome.value,
        stage=p.stage,
        reason=p.reason,
    )


# --------------------------------------------------------------------------- ledger


def _is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or _is_memory_sqlite(url):
        return None
    database = url.database or ""
    if database.startswith("file:"):
        return None
    return Path(database)


class Ledger:
    """The run ledger over a SQLAlchemy URL (``sqlite://`` is an in-memory ledger).

    ``clock`` stamps ``started_at``, ``finished_at`` and ``recorded_at`` when not given.
    ``create=False`` opens an existing ledger only (for read-only tools): a missing SQLite file
    raises :class:`LedgerError` instead of being created.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        clock: Clock = utc_now,
        create: bool = True,
        echo: bool = False,
    ) -> None:
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            # the message would echo the URL, password included: say what is expected instead
            raise LedgerError(
                "Invalid database URL: it could not be parsed. Use e.g. "
                "sqlite:///path/ledger.sqlite or postgresql+psycopg://user@host/db."
            ) from None
        file = _sqlite_file(parsed)
        if file is not None and not create and not file.is_file():
            raise LedgerError(f"No ledger at {file}. Check the path (or --run-dir).")
        if file is not None and create:
            file.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"echo": echo}
        if _is_memory_sqlite(parsed):
            # one shared connection, or every connection would see a new, empty database
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        elif parsed.get_backend_name() != "sqlite":
            # many concurrent readers (the operator API's request threads) and one writer
            kwargs.update(pool_size=20, max_overflow=5, pool_pre_ping=True)
        self._url = parsed
        self._clock = clock
        try:
            self._engine: Engine = create_engine(parsed, **kwargs)
        except (ArgumentError, ImportError) as exc:
            raise LedgerError(
                f"Cannot open {self.url}: {exc}. Install the database driver the URL names "
                "(e.g. psycopg for postgresql+psycopg)."
            ) from exc
        if parsed.get_backend_name() == "sqlite":
            event.listen(self._engine, "connect", _sqlite_on_connect)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        if create:
            try:
                LedgerBase.metadata.create_all(self._engine)
            except SQLAlchemyError as exc:
                raise LedgerError(f"Cannot create the ledger tables at {self.url}: {exc}") from exc
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Upgrade a ledger written by an older fedbrain: add the columns it lacks."""
        try:
            tables = set(inspect(self._engine).get_table_names())
            for table, column, sql_type in _ADDED_COLUMNS:
                if table not in tables:
                    continue
                present = {c["name"] for c in inspect(self._engine).get_columns(table)}
                if column not in present:
                    with self._engine.begin() as connection:
                        connection.execute(
                            text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")
                        )
        except SQLAlchemyError as exc:
            raise LedgerError(
                f"Cannot read the ledger at {self.url}: {_first_line(exc)}. Is it a fedbrain "
                "ledger database?"
            ) from exc

    @classmethod
    def for_run_dir(cls, run_dir: Path, *, clock: Clock = utc_now, create: bool = True) -> Self:
        """The ledger file ``<run_dir>/ledger.sqlite`` (the directory is created if needed)."""
        path = Path(run_dir).resolve() / LEDGER_FILENAME
        return cls(URL.create("sqlite", database=str(path)), clock=clock, create=create)

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return self._url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Release the database connections."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except LedgerError:
            raise
        except SQLAlchemyError as exc:
            raise LedgerError(f"Ledger at {self.url} failed: {_first_line(exc)}") from exc

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the ledger's clock must return timezone-aware datetimes (UTC).")
        return now

    @staticmethod
    def _run(session: Session, run_id: str) -> RunRow:
        row = session.get(RunRow, run_id)
        if row is None:
            raise RunNotFoundError(run_id)
        return row

    @staticmethod
    def _last_round(session: Session, run_id: str) -> int:
        last = session.scalar(select(func.max(RoundRow.round)).where(RoundRow.run_id == run_id))
        return int(last or 0)

    # ------------------------------------------------------------------- writes

    def start_run(
        self,
        *,
        run_id: str,
        artifact_name: str,
        job: Mapping[str, JSONValue],
        privacy_level: str,
        run_name: str | None = None,
        dp_unit: str | None = None,
        started_at: datetime | None = None,
    ) -> RunSummary:
        """Record a new run, status ``running``. ``job`` is the job's run config (JSON)."""
        _raise_problems(
            [
                None
                if isinstance(run_id, str) and 0 < len(run_id) <= 128
                else f"`run_id` must be a string of 1 to 128 characters. Found {run_id!r}.",
                None
                if isinstance(artifact_name, str) and artifact_name
                else f"`artifact_name` must be a non-empty string. Found {artifact_name!r}.",
                None if isinstance(job, Mapping) else "`job` must be a mapping (the run config).",
                _aware_problem("started_at", started_at),
            ]
        )
        row = RunRow(
            run_id=run_id,
            run_name=run_name,
            artifact_name=artifact_name,
            job=dict(job),
            privacy_level=str(privacy_level),
            dp_unit=None if dp_unit is None else str(dp_unit),
            status=RunStatus.RUNNING.value,
            started_at=started_at or self._now(),
            verdict_reasons=[],
        )
        try:
            with self._transaction() as session:
                if session.get(RunRow, run_id) is not None:
                    raise DuplicateRunError(
                        f"Run {run_id!r} is already in the ledger. Resume it with "
                        "`resume_run`, or start the new run with another run id."
                    )
                session.add(row)
        except LedgerError as exc:
            if isinstance(exc.__cause__, IntegrityError):
                raise DuplicateRunError(f"Run {run_id!r} is already in the ledger.") from exc
            raise
        return self.get_run(run_id)

    def record_round(self, run_id: str, record: RoundRecord) -> None:
        """Record one round and its participants, in one transaction.

        Raises :class:`DuplicateRoundError` if the round is already recorded (never
        overwrites), :class:`RunFinishedError` if the run is not running.
        """
        if not isinstance(record, RoundRecord):
            raise TypeError(f"`record` must be a RoundRecord. Found {type(record).__name__}.")
        recorded_at = record.recorded_at or self._now()
        duplicate = DuplicateRoundError(
            f"Round {record.round} of run {run_id!r} is already recorded; the ledger never "
            "overwrites a round. To redo rounds after a resume, call `resume_run` (or "
            "`rollback_to`) first."
        )
        try:
            with self._transaction() as session:
                run = self._run(session, run_id)
                if run.status != RunStatus.RUNNING:
                    raise RunFinishedError(
                        f"Run {run_id!r} is {run.status}; it takes no more rounds. "
                        "Resume it with `resume_run` first."
                    )
                if session.get(RoundRow, (run_id, record.round)) is not None:
                    raise duplicate
                session.add(
                    RoundRow(
                        run_id=run_id,
                        round=record.round,
                        status=record.status.value,
                        recorded_at=recorded_at,
                        sampled=record.sampled,
                        responded=record.responded,
                        dropped_by_stage=dict(record.dropped_by_stage),
                        timings=dict(record.timings),
                        metrics={k: dict(v) for k, v in record.metrics.items()},
                        epsilon=record.epsilon,
                        delta=record.delta,
                        reliability=record.reliability,
                        reliability_reasons=list(record.reliability_reasons),
                        update_norm=record.update_norm,
                        noise_to_signal=record.noise_to_signal,
                        measurements=dict(record.measurements),
                    )
                )
                session.flush()
                session.add_all(
                    _participant_row(run_id, record.round, p) for p in record.participants
                )
        except LedgerError as exc:
            # a concurrent writer recorded the same round between our check and our insert
            if isinstance(exc.__cause__, IntegrityError) and self._has_round(run_id, record.round):
                raise duplicate from exc
            raise

    def _has_round(self, run_id: str, round_number: int) -> bool:
        with self._sessions() as session:
            return session.get(RoundRow, (run_id, round_number)) is not None

    def rollback_to(self, run_id: str, round_number: int) -> int:
        """Delete the rounds (and their participants) after ``round_number``; return how many.

        Used on resume from the checkpoint of ``round_number`` (0 deletes every round).
        """
        if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
            raise ValueError(f"`round_number` must be an int >= 0. Found {round_number!r}.")
        with self._transaction() as session:
            self._run(session, run_id)
            return self._delete_after(session, run_id, round_number)

    @staticmethod
    def _delete_after(session: Session, run_id: str, round_number: int) -> int:
        after = (ParticipantRow.run_id == run_id) & (ParticipantRow.round > round_number)
        session.execute(delete(ParticipantRow).where(after))
        result = session.execute(
            delete(RoundRow).where((RoundRow.run_id == run_id) & (RoundRow.round > round_number))
        )
        return int(getattr(result, "rowcount", 0) or 0)

    def resume_run(self, run_id: str, *, from_round: int) -> int:
        """Reopen a run at the checkpoint of ``from_round``: delete the later rounds, set the
        status back to ``running`` and clear the finish fields. Returns the rounds deleted."""
        if isinstance(from_round, bool) or not isinstance(from_round, int) or from_round < 0:
            raise ValueError(f"`from_round` must be an int >= 0. Found {from_round!r}.")
        with self._transaction() as session:
            run = self._run(session, run_id)
            if run.status == RunStatus.COMPLETED:
                raise RunFinishedError(
                    f"Run {run_id!r} completed and produced its bundle; it cannot be resumed. "
                    "Start a new run."
                )
            deleted = self._delete_after(session, run_id, from_round)
            run.status = RunStatus.RUNNING.value
            run.finished_at = None
            run.error = None
            run.verdict_reasons = []
            return deleted

    def finish_run(
        self,
        run_id: str,
        status: RunStatus | str,
        *,
        verdict_reasons: Sequence[str] = (),
        final_epsilon: float | None = None,
        delta: float | None = None,
        reliability: float | None = None,
        bundle_path: str | Path | None = None,
        bundle_sha256: str | None = None,
        error: str | None = None,
        finished_at: datetime | None = None,
    ) -> RunSummary:
        """Close a running run with its final status and verdict."""
        try:
            final = RunStatus(status)
        except ValueError:
            raise ValueError(
                f"`status` must be one of {[s.value for s in RunStatus]}. Found {status!r}."
            ) from None
        _raise_problems(
            [
                "`status` must be a final status, not 'running'."
                if final is RunStatus.RUNNING
                else None,
                _check_optional_float("final_epsilon", final_epsilon),
                _check_optional_float("delta", delta),
                _check_optional_float("reliability", reliability, unit=True),
                None
                if bundle_sha256 is None or bundle_sha256.startswith("sha256:")
                else f"`bundle_sha256` must be 'sha256:<hex>'. Found {bundle_sha256!r}.",
                "`verdict_reasons` must be strings."
                if isinstance(verdict_reasons, str)
                or not all(isinstance(r, str) for r in verdict_reasons)
                else None,
                _aware_problem("finished_at", finished_at),
            ]
        )
        with self._transaction() as session:
            run = self._run(session, run_id)
            if run.status != RunStatus.RUNNING:
                raise RunFinishedError(
                    f"Run {run_id!r} already finished as {run.status}; it cannot finish again."
                )
            run.status = final.value
            run.finished_at = finished_at or self._now()
            run.verdict_reasons = list(verdict_reasons)
            run.final_epsilon = final_epsilon
            run.delta = delta
            run.reliability = reliability
            run.bundle_path = None if bundle_path is None else str(bundle_path)
            run.bundle_sha256 = bundle_sha256
            run.error = error
        return self.get_run(run_id)

    def link_flower_run(self, run_id: str, flower_run_id: int) -> None:
        """Record Flower's own run id (``flwr ls``) for this run."""
        if (
            isinstance(flower_run_id, bool)
            or not isinstance(flower_run_id, int)
            or not 0 <= flower_run_id <= MAX_NODE_ID
        ):
            raise ValueError(
                f"`flower_run_id` must be an int in [0, 2**64 - 1]. Found {flower_run_id!r}."
            )
        with self._transaction() as session:
            self._run(session, run_id).flower_run_id = str(flower_run_id)

    def record_refused_nodes(self, run_id: str, refused: Mapping[int, str]) -> int:
        """Record the nodes the run did not admit and why; a node already recorded for the
        run keeps its first reason. Returns how many were added."""
        problems: list[str | None] = []
        for node, reason in refused.items():
            if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node <= MAX_NODE_ID:
                problems.append(f"node ids must be ints in [0, 2**64 - 1]. Found {node!r}.")
            if not isinstance(reason, str) or not reason:
                problems.append(f"the reason for node {node} must be a non-empty string.")
        _raise_problems(problems)
        now = self._now()
        with self._transaction() as session:
            self._run(session, run_id)
            known = set(
                session.scalars(
                    select(RefusedNodeRow.node_id).where(RefusedNodeRow.run_id == run_id)
                )
            )
            rows = [
                RefusedNodeRow(run_id=run_id, node_id=str(n), reason=r, recorded_at=now)
                for n, r in sorted(refused.items())
                if str(n) not in known
            ]
            session.add_all(rows)
            return len(rows)

    def refused_nodes(self, run_id: str) -> list[RefusedNode]:
        """The nodes the run did not admit, by node id."""
        with self._transaction() as session:
            self._run(session, run_id)
            rows = session.scalars(
                select(RefusedNodeRow).where(RefusedNodeRow.run_id == run_id)
            ).all()
            return sorted(
                (RefusedNode(int(r.node_id), r.reason, r.recorded_at) for r in rows),
                key=lambda node: node.node_id,
            )

    def sync_run_from(self, source: Ledger, run_id: str) -> int:
        """Copy what ``source`` knows of ``run_id`` that this ledger lacks: the run, its new
        rounds, refused nodes, the Flower run id, and its end once it finished. Returns the
        rounds copied. Used to gather runs recorded in per-run ledgers into one ledger."""
        run = source.get_run(run_id)
        try:
            mine = self.get_run(run_id)
        except RunNotFoundError:
            mine = self.start_run(
                run_id=run.run_id,
                artifact_name=run.artifact_name,
                job=run.job,
                privacy_level=run.privacy_level,
                run_name=run.run_name,
                dp_unit=run.dp_unit,
                started_at=run.started_at,
            )
        copied = 0
        if mine.status is RunStatus.RUNNING:
            for record in source.rounds(run_id, after=mine.last_round):
                self.record_round(run_id, record)
                copied += 1
        refused = source.refused_nodes(run_id)
        if refused:
            self.record_refused_nodes(run_id, {n.node_id: n.reason for n in refused})
        if run.flower_run_id is not None and mine.flower_run_id is None:
            self.link_flower_run(run_id, run.flower_run_id)
        if run.status is not RunStatus.RUNNING and mine.status is RunStatus.RUNNING:
            self.finish_run(
                run_id,
                run.status,
                verdict_reasons=run.verdict_reasons,
                final_epsilon=run.final_epsilon,
                delta=run.delta,
                reliability=run.reliability,
                bundle_path=run.bundle_path,
                bundle_sha256=run.bundle_sha256,
                error=run.error,
                finished_at=run.finished_at,
            )
        return copied

    # ------------------------------------------------------------------- reads

    def last_round(self, run_id: str) -> int:
        """The highest recorded round of the run (0 if none)."""
        with self._transaction() as session:
            self._run(session, run_id)
            return self._last_round(session, run_id)

    def get_run(self, run_id: str) -> RunSummary:
        with self._transaction() as session:
            row = self._run(session, run_id)
            count, last = session.execute(
                select(func.count(RoundRow.round), func.max(RoundRow.round)).where(
                    RoundRow.run_id == run_id
                )
            ).one()
            return _summary(row, int(count), int(last or 0))

    def list_runs(
        self,
        *,
        limit: int | None = None,
        offset: int = 0,
        status: RunStatus | str | None = None,
        artifact_name: str | None = None,
    ) -> list[RunSummary]:
        """Every run, newest first (a page of them with ``limit``/``offset``; only those of
        ``status`` / ``artifact_name`` when given)."""
        counts = (
            select(
                RoundRow.run_id,
                func.count(RoundRow.round).label("n"),
                func.max(RoundRow.round).label("last"),
            )
            .group_by(RoundRow.run_id)
            .subquery()
        )
        query = (
            select(RunRow, counts.c.n, counts.c.last)
            .outerjoin(counts, counts.c.run_id == RunRow.run_id)
            .order_by(RunRow.started_at.desc(), RunRow.run_id)
        )
        if status is not None:
            query = query.where(RunRow.status == RunStatus(status).value)
        if artifact_name is not None:
            query = query.where(RunRow.artifact_name == artifact_name)
        if offset:
            query = query.offset(offset)
        if limit is not None:
            query = query.limit(limit)
        with self._transaction() as session:
            return [
                _summary(row, int(n or 0), int(last or 0))
                for row, n, last in session.execute(query).all()
            ]

    def count_runs(self, *, status: RunStatus | str | None = None) -> int:
        """How many runs the ledger holds (of ``status`` when given)."""
        query = select(func.count()).select_from(RunRow)
        if status is not None:
            query = query.where(RunRow.status == RunStatus(status).value)
        with self._transaction() as session:
            return int(session.scalar(query) or 0)

    def rounds(self, run_id: str, *, after: int = 0) -> list[RoundRecord]:
        """The run's rounds, in round order, with their participants (only the rounds after
        ``after`` when given: a reader that follows a live run asks for the new ones)."""
        with self._transaction() as session:
            self._run(session, run_id)
            rows = session.scalars(
                select(RoundRow)
                .where((RoundRow.run_id == run_id) & (RoundRow.round > after))
                .order_by(RoundRow.round)
                .options(selectinload(RoundRow.participants))
            ).all()
            return [_round_record(row) for row in rows]


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
