"""The ledger's SQL schema: portable column types, the ORM rows, and the conversions between
rows and records. See :mod:`server.ledger` for the storage rules (non-finite floats, UTC
times, node ids as decimal strings) and the tables.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, cast

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKeyConstraint,
    Integer,
    String,
    Text,
)
from sqlalchemy import text as sql_text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from server.ledger_records import (
    JSONValue,
    Participant,
    ParticipantOutcome,
    Phase,
    RoundRecord,
    RoundStatus,
    RunStatus,
    RunSummary,
)

__all__ = [
    "LedgerBase",
    "ParticipantRow",
    "PortableFloat",
    "PortableJSON",
    "RefusedNodeRow",
    "RoundRow",
    "RunRow",
    "UTCDateTime",
]

_NONFINITE_KEY: Final = "$float"


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
    owner: Mapped[str | None] = mapped_column(String(255))
    interruptions: Mapped[Any] = mapped_column(PortableJSON, nullable=True)

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


_ADDED_COLUMNS: Final = (
    ("runs", "flower_run_id", "VARCHAR(20)"),
    ("runs", "owner", "VARCHAR(255)"),
    ("runs", "interruptions", "JSON"),
)
"""Columns added after a table was first released: (table, column, SQL type)."""


def _status_check_sql() -> str:
    values = ", ".join(f"'{member.value}'" for member in RunStatus)
    return f"status IN ({values})"


def _widen_run_status_check(engine: Engine) -> None:
    """Upgrade a ledger whose ``runs.status`` CHECK predates a status (``interrupted``).

    PostgreSQL: drop and re-add the named constraint. SQLite, which cannot alter a
    constraint: rewrite the table's definition in ``sqlite_master`` -- the procedure SQLite's
    documentation gives for changing CHECK constraints (a widened CHECK holds for every row
    already stored; nothing on disk changes), then ``integrity_check``.
    """
    newest = RunStatus.INTERRUPTED.value
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            sql = connection.execute(
                sql_text("SELECT sql FROM sqlite_master WHERE type='table' AND name='runs'")
            ).scalar()
            if not sql or "ck_runs_status" not in sql or f"'{newest}'" in sql:
                return
            start = sql.index("status IN (", sql.index("ck_runs_status"))
            end = sql.index(")", start) + 1
            widened = sql[:start] + _status_check_sql() + sql[end:]
            version = int(connection.execute(sql_text("PRAGMA schema_version")).scalar() or 0)
            connection.execute(sql_text("PRAGMA writable_schema=ON"))
            connection.execute(
                sql_text("UPDATE sqlite_master SET sql=:sql WHERE type='table' AND name='runs'"),
                {"sql": widened},
            )
            connection.execute(sql_text(f"PRAGMA schema_version={version + 1}"))
            connection.execute(sql_text("PRAGMA writable_schema=OFF"))
        elif engine.dialect.name == "postgresql":
            found = connection.execute(
                sql_text(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
                    "WHERE conname = 'ck_runs_status'"
                )
            ).scalar()
            if found is None or f"'{newest}'" in found:
                return
            connection.execute(sql_text("ALTER TABLE runs DROP CONSTRAINT ck_runs_status"))
            connection.execute(
                sql_text(
                    f"ALTER TABLE runs ADD CONSTRAINT ck_runs_status CHECK ({_status_check_sql()})"
                )
            )
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            result = connection.execute(sql_text("PRAGMA integrity_check")).scalar()
        if result != "ok":
            raise RuntimeError(f"the ledger failed its integrity check after the upgrade: {result}")


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
        owner=row.owner,
        interruptions=tuple(row.interruptions or ()),
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
