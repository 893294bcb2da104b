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
- A bundle path inside a SQLite ledger file's folder is stored relative to it and returned
  absolute, so the folder can move (``fedbrain simulate``'s output folder); others absolute.

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

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Self, TypeAlias

from sqlalchemy import create_engine, delete, event, func, inspect, select, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, selectinload, sessionmaker
from sqlalchemy.pool import StaticPool

from server.ledger_records import MAX_NODE_ID as MAX_NODE_ID
from server.ledger_records import DuplicateRoundError as DuplicateRoundError
from server.ledger_records import DuplicateRunError as DuplicateRunError
from server.ledger_records import JSONValue as JSONValue
from server.ledger_records import LedgerError as LedgerError
from server.ledger_records import Participant as Participant
from server.ledger_records import ParticipantOutcome as ParticipantOutcome
from server.ledger_records import Phase as Phase
from server.ledger_records import RefusedNode as RefusedNode
from server.ledger_records import RoundRecord as RoundRecord
from server.ledger_records import RoundStatus as RoundStatus
from server.ledger_records import RunFinishedError as RunFinishedError
from server.ledger_records import RunNotFoundError as RunNotFoundError
from server.ledger_records import RunStatus as RunStatus
from server.ledger_records import RunSummary as RunSummary
from server.ledger_records import Scalar as Scalar
from server.ledger_records import _aware_problem, _check_optional_float, _raise_problems
from server.ledger_schema import (
    _ADDED_COLUMNS,
    _round_record,
    _summary,
    _widen_run_status_check,
)
from server.ledger_schema import LedgerBase as LedgerBase
from server.ledger_schema import ParticipantRow as ParticipantRow
from server.ledger_schema import PortableFloat as PortableFloat
from server.ledger_schema import PortableJSON as PortableJSON
from server.ledger_schema import RefusedNodeRow as RefusedNodeRow
from server.ledger_schema import RoundRow as RoundRow
from server.ledger_schema import RunRow as RunRow
from server.ledger_schema import UTCDateTime as UTCDateTime
from server.ledger_schema import _participant_row as _participant_row  # patched in tests

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

Clock: TypeAlias = Callable[[], datetime]

LEDGER_FILENAME: Final = "ledger.sqlite"


def utc_now() -> datetime:
    """The default clock: now, timezone-aware UTC."""
    return datetime.now(UTC)


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
        # paths under a SQLite ledger's folder are kept relative to it: they move together
        self._home = None if file is None else file.expanduser().resolve().parent
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
            if "runs" in tables:
                _widen_run_status_check(self._engine)
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

    def _stored_path(self, path: str | Path | None) -> str | None:
        """``path`` as the ledger keeps it: relative (POSIX) when it lies in a SQLite ledger's
        folder, so that the folder can move; otherwise absolute."""
        if path is None:
            return None
        resolved = Path(path).expanduser().resolve()
        if self._home is not None and resolved.is_relative_to(self._home):
            return resolved.relative_to(self._home).as_posix()
        return str(resolved)

    def _resolved(self, run: RunSummary) -> RunSummary:
        """``run`` with its bundle path absolute again (where the ledger's folder is now)."""
        path = run.bundle_path
        if path is None or self._home is None or Path(path).is_absolute():
            return run
        return replace(run, bundle_path=str(self._home / path))

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
        owner: str | None = None,
    ) -> RunSummary:
        """Record a new run, status ``running``. ``job`` is the job's run config (JSON);
        ``owner`` names the process running it (:mod:`server.restart`)."""
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
            owner=owner,
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

    def resume_run(self, run_id: str, *, from_round: int, owner: str | None = None) -> int:
        """Reopen a run at the checkpoint of ``from_round``: delete the later rounds, set the
        status back to ``running`` (run by ``owner``) and clear the finish fields. Returns the
        rounds deleted."""
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
            run.owner = owner
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
            run.bundle_path = self._stored_path(bundle_path)
            run.bundle_sha256 = bundle_sha256
            run.error = error
        return self.get_run(run_id)

    def mark_interrupted(self, run_id: str, *, owner: str | None, reason: str) -> bool:
        """Mark a ``running`` run ``interrupted`` if ``owner`` still runs it (its process is
        known to be gone, :mod:`server.restart`); False when it changed hands or ended."""
        with self._transaction() as session:
            run = self._run(session, run_id)
            if run.status != RunStatus.RUNNING or run.owner != owner:
                return False
            run.status = RunStatus.INTERRUPTED.value
            run.finished_at = self._now()
            run.error = reason
            return True

    def record_interruption(self, run_id: str, entry: Mapping[str, JSONValue]) -> None:
        """Append ``entry`` (round, at, charged, reason) to the run's interruptions."""
        with self._transaction() as session:
            run = self._run(session, run_id)
            run.interruptions = [*(run.interruptions or []), dict(entry)]

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
            return self._resolved(_summary(row, int(count), int(last or 0)))

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
                self._resolved(_summary(row, int(n or 0), int(last or 0)))
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
