"""auth-service: API keys and roles.

- A key is ``fbk_<key id>_<secret>``: the key id (public, 12 characters) names the key in
  listings and the audit log; the secret is ``secrets.token_urlsafe(32)`` (256 bits). The key
  is shown once, when created or rotated; the database keeps only its SHA-256 (a fast hash is
  enough for a high-entropy secret) and compares digests in constant time.
- Keys travel only in a header (``Authorization: Bearer <key>`` or ``X-API-Key: <key>``),
  never in a cookie or a URL, so there is no CSRF surface and keys stay out of access logs.
- Roles are ordered: viewer < operator < admin; each permission names the least role that
  holds it (:data:`PERMISSIONS`, the table in docs/operator-api.md).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final

from sqlalchemy import select

from server.api.store import ApiKeyRow, ApiStore

__all__ = [
    "PERMISSIONS",
    "ApiKey",
    "AuthError",
    "KeyStore",
    "Permission",
    "Role",
    "parse_key",
]

KEY_PREFIX: Final = "fbk_"


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return list(Role).index(self)

    def allows(self, permission: Permission) -> bool:
        return self.rank >= PERMISSIONS[permission].rank


class Permission(StrEnum):
    READ = "read"  # catalog, job resolve, runs, rounds, bundles, trusted keys, metrics
    SUBMIT = "submit"  # submit a job
    CANCEL = "cancel"  # cancel a job
    MANAGE_KEYS = "manage-keys"  # create, rotate, revoke, list API keys
    READ_AUDIT = "read-audit"  # read and verify the audit log


PERMISSIONS: Final[dict[Permission, Role]] = {
    Permission.READ: Role.VIEWER,
    Permission.SUBMIT: Role.OPERATOR,
    Permission.CANCEL: Role.OPERATOR,
    Permission.MANAGE_KEYS: Role.ADMIN,
    Permission.READ_AUDIT: Role.ADMIN,
}


class AuthError(Exception):
    """No usable key (HTTP 401)."""


@dataclass(frozen=True)
class ApiKey:
    """A key as listed (never the secret)."""

    key_id: str
    name: str
    role: Role
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    last_used_at: datetime | None

    @property
    def actor(self) -> str:
        """How the audit log names whoever holds this key."""
        return f"key:{self.key_id} ({self.name})"

    def to_json(self) -> dict[str, object]:
        return {
            "key_id": self.key_id,
            "name": self.name,
            "role": self.role.value,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
            "revoked": self.revoked_at is not None,
            "revoked_at": None if self.revoked_at is None else self.revoked_at.isoformat(),
            "last_used_at": None if self.last_used_at is None else self.last_used_at.isoformat(),
        }


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_key(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or len(key_id) != 12 or not key_id.isalnum() or len(secret) < 32:
        return None
    return key_id


def _new_key() -> tuple[str, str]:
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def _api_key(row: ApiKeyRow) -> ApiKey:
    return ApiKey(
        key_id=row.key_id,
        name=row.name,
        role=Role(row.role),
        created_at=row.created_at,
        created_by=row.created_by,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


class KeyStore:
    """Create, rotate, revoke, list and check API keys."""

    def __init__(self, store: ApiStore) -> None:
        self.store = store

    def create(self, *, name: str, role: Role | str, created_by: str) -> tuple[ApiKey, str]:
        """A new key; returns it and its secret form (shown once, never stored)."""
        name = name.strip()
        if not name or len(name) > 128 or not name.isprintable():
            raise ValueError(f"name: must be 1 to 128 printable characters. Found {name!r}.")
        try:
            role = Role(role)
        except ValueError:
            raise ValueError(
                f"role: must be one of {', '.join(r.value for r in Role)}. Found {role!r}."
            ) from None
        key_id, key = _new_key()
        row = ApiKeyRow(
            key_id=key_id,
            name=name,
            role=role.value,
            key_hash=_digest(key),
            created_at=datetime.now(UTC),
            created_by=created_by,
        )
        with self.store.session() as session:
            session.add(row)
        return _api_key(row), key

    def rotate(self, key_id: str, *, by: str) -> tuple[ApiKey, str]:
        """Revoke ``key_id`` and create a key with its name and role."""
        old = self.revoke(key_id)
        return self.create(name=old.name, role=old.role, created_by=by)

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key: it stops working at once (every request looks it up)."""
        with self.store.session() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                raise KeyError(key_id)
            if row.revoked_at is None:
                row.revoked_at = datetime.now(UTC)
            return _api_key(row)

    def get(self, key_id: str) -> ApiKey:
        with self.store.session() as session:
            row = session.get(ApiKeyRow, key_id)
            if row is None:
                raise KeyError(key_id)
            return _api_key(row)

    def list(self) -> list[ApiKey]:
        with self.store.session() as session:
            rows = session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at)).all()
            return [_api_key(r) for r in rows]

    def authenticate(self, key: str) -> ApiKey:
        """The active key ``key`` is, or :class:`AuthError` (never says which part failed)."""
        key_id = parse_key(key)
        if key_id is None:
            raise AuthError("invalid API key")
        with self.store.session() as session:
            row = session.get(ApiKeyRow, key_id)
            stored = row.key_hash if row is not None else "0" * 64
            matches = hmac.compare_digest(stored, _digest(key))
            if row is None or not matches or row.revoked_at is not None:
                raise AuthError("invalid or revoked API key")
            return _api_key(row)
