"""The operator API's own tables, in the ledger's database: API keys, the audit log, jobs.

They live beside the ledger's tables (same SQLAlchemy URL, their own metadata), so one
database holds what ran and who asked for it. :class:`ApiStore` is the only code that touches
them; every method is one transaction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool

from server.ledger import LedgerError, UTCDateTime

__all__ = ["ApiBase", "ApiKeyRow", "ApiStore", "AuditRow", "JobRow", "StoreError"]


class StoreError(LedgerError):
    """The API's tables could not be read or written."""


class ApiBase(DeclarativeBase):
    """Declarative base of the API's tables (separate from the ledger's)."""


class ApiKeyRow(ApiBase):
    __tablename__ = "api_keys"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_by: Mapped[str] = mapped_column(String(128))
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditRow(ApiBase):
    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[str] = mapped_column(String(40))  # ISO 8601 UTC, exactly as hashed
    actor: Mapped[str] = mapped_column(String(160))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(255))
    details: Mapped[Any] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class JobRow(ApiBase):
    __tablename__ = "api_jobs"
    __table_args__ = (Index("ix_api_jobs_submitted_at", "submitted_at"),)

    job_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    submitted_by: Mapped[str] = mapped_column(String(160))
    status: Mapped[str] = mapped_column(String(16), index=True)
    artifact_name: Mapped[str] = mapped_column(String(255))
    job: Mapped[Any] = mapped_column(JSON)
    out_dir: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(String(128), index=True)
    exit_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiStore:
    """Sessions on the API's tables (created when missing)."""

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            if parsed.database in (None, "", ":memory:"):
                kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
            else:
                kwargs.update(connect_args={"check_same_thread": False, "timeout": 30})
        else:
            kwargs.update(pool_size=10, max_overflow=5, pool_pre_ping=True)
        self.engine: Engine = create_engine(parsed, **kwargs)
        if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
            # WAL: the API's readers do not block the run that writes rounds, nor it them.
            # The mode is stored in the database file, so the ledger's own connections (and a
            # run writing to this database) use it too.
            event.listen(self.engine, "connect", _wal)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            ApiBase.metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"Cannot create the API tables: {_line(exc)}") from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise StoreError(f"The API database failed: {_line(exc)}") from exc

    def close(self) -> None:
        self.engine.dispose()


def _wal(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
