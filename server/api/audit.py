"""The audit log: append-only and hash-chained.

Every write through the API (job submitted or cancelled, key created, rotated or revoked,
bundle signed) appends one row. Row ``n`` stores ``prev_hash`` (row ``n-1``'s hash; 64 zeros
for the first) and ``hash = SHA-256(prev_hash || canonical JSON of its at, actor, action,
target and details)`` (RFC 8785). The sequence number is not hashed, so :func:`verify` can
tell the three ways the table can be tampered with apart and name the row:

- **edited**: a row's contents no longer give its stored hash;
- **deleted**: the sequence has a gap, or a row's ``prev_hash`` is the hash of no row;
- **reordered**: a row's ``prev_hash`` is the hash of another row than the one before it.

Deleting the *last* rows leaves a valid shorter chain; compare the head (the last row's
number and hash, printed by ``fedbrain audit verify``) with a copy kept elsewhere
(``--expect-head``) to catch that.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import rfc8785
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from server.api.store import ApiStore, AuditRow, StoreError

__all__ = ["GENESIS", "AuditEntry", "AuditLog", "Verification", "entry_hash"]

GENESIS: Final = "0" * 64
_RETRIES: Final = 20


class Action:
    JOB_SUBMITTED: Final = "job.submitted"
    JOB_CANCELLED: Final = "job.cancelled"
    KEY_CREATED: Final = "key.created"
    KEY_ROTATED: Final = "key.rotated"
    KEY_REVOKED: Final = "key.revoked"
    BUNDLE_SIGNED: Final = "bundle.signed"


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: str
    actor: str
    action: str
    target: str
    details: dict[str, object]
    prev_hash: str
    hash: str

    def to_json(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "details": self.details,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def entry_hash(
    prev_hash: str, *, at: str, actor: str, action: str, target: str, details: object
) -> str:
    """The chain hash of one row."""
    document: dict[str, Any] = {
        "at": at,
        "actor": actor,
        "action": action,
        "target": target,
        "details": details,
    }
    body = rfc8785.dumps(document)
    return hashlib.sha256(prev_hash.encode("ascii") + body).hexdigest()


@dataclass(frozen=True)
class Verification:
    """What :func:`AuditLog.verify` found: ``problems`` name rows; empty means intact."""

    rows: int
    head_seq: int
    head_hash: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        seq=int(row.seq),
        at=row.at,
        actor=row.actor,
        action=row.action,
        target=row.target,
        details=dict(row.details or {}),
        prev_hash=row.prev_hash,
        hash=row.hash,
    )


class AuditLog:
    """Append and read the chain (the only writer is :meth:`append`)."""

    def __init__(self, store: ApiStore) -> None:
        self.store = store

    def append(
        self, *, actor: str, action: str, target: str, details: dict[str, object] | None = None
    ) -> AuditEntry:
        """Append one row at the end of the chain (concurrent appends retry on conflict)."""
        details = dict(details or {})
        for _ in range(_RETRIES):
            at = datetime.now(UTC).isoformat()
            try:
                with self.store.session() as session:
                    last = session.execute(
                        select(AuditRow.seq, AuditRow.hash).order_by(AuditRow.seq.desc()).limit(1)
                    ).first()
                    seq = 1 if last is None else int(last[0]) + 1
                    prev = GENESIS if last is None else str(last[1])
                    row = AuditRow(
                        seq=seq,
                        at=at,
                        actor=actor,
                        action=action,
                        target=target,
                        details=details,
                        prev_hash=prev,
                        hash=entry_hash(
                            prev, at=at, actor=actor, action=action, target=target, details=details
                        ),
                    )
                    session.add(row)
                return _entry(row)
            except StoreError as exc:
                if not isinstance(exc.__cause__, IntegrityError):
                    raise
        raise StoreError("The audit log is too busy: could not append after 20 tries.")

    def entries(self, *, after: int = 0, limit: int = 100) -> list[AuditEntry]:
        with self.store.session() as session:
            rows = session.scalars(
                select(AuditRow).where(AuditRow.seq > after).order_by(AuditRow.seq).limit(limit)
            ).all()
            return [_entry(r) for r in rows]

    def count(self) -> int:
        with self.store.session() as session:
            return int(session.scalar(select(func.count()).select_from(AuditRow)) or 0)

    def verify(self) -> Verification:
        """Walk the whole chain and name every edited, deleted or reordered row."""
        with self.store.session() as session:
            rows = [_entry(r) for r in session.scalars(select(AuditRow).order_by(AuditRow.seq))]
        problems: list[str] = []
        by_hash = {r.hash: r.seq for r in rows}
        expected_prev, expected_seq = GENESIS, 1
        for row in rows:
            computed = entry_hash(
                row.prev_hash,
                at=row.at,
                actor=row.actor,
                action=row.action,
                target=row.target,
                details=row.details,
            )
            if computed != row.hash:
                problems.append(
                    f"row {row.seq} ({row.action} {row.target}): edited -- its contents do not "
                    "give its stored hash"
                )
            if row.seq != expected_seq:
                missing = (
                    f"row {expected_seq}"
                    if row.seq == expected_seq + 1
                    else f"rows {expected_seq} to {row.seq - 1}"
                )
                problems.append(f"{missing}: deleted -- the sequence jumps to {row.seq}")
            elif row.prev_hash != expected_prev:
                follows = by_hash.get(row.prev_hash)
                if follows is not None:
                    problems.append(
                        f"row {row.seq} ({row.action} {row.target}): reordered -- it was "
                        f"appended after the row now numbered {follows}, not after row "
                        f"{row.seq - 1}"
                    )
                elif row.prev_hash == GENESIS:
                    problems.append(
                        f"row {row.seq} ({row.action} {row.target}): reordered -- it was the "
                        "first row of the chain"
                    )
                else:
                    problems.append(
                        f"row {row.seq} ({row.action} {row.target}): the row before it was "
                        "deleted or edited -- its prev_hash matches no row"
                    )
            expected_prev, expected_seq = row.hash, row.seq + 1
        head = rows[-1] if rows else None
        return Verification(
            rows=len(rows),
            head_seq=0 if head is None else head.seq,
            head_hash=GENESIS if head is None else head.hash,
            problems=tuple(problems),
        )
