"""Ed25519 signing keys, key ids and the pinned trusted-keys file.

Ed25519 (RFC 8032) via ``cryptography``. Private keys are PEM PKCS#8, public keys PEM
SubjectPublicKeyInfo; a key id is ``sha256:`` + hex SHA-256 of the DER SubjectPublicKeyInfo.

Trust model: a verifier trusts exactly the keys listed in its trusted-keys file, each within its
validity window and not revoked. A key id found in a signature envelope only *selects* a pinned
key; it never makes a key trusted, and the pinned key's id is recomputed from its PEM on load.

Keys over time (docs/deployment.md, "Keys over time"):

- **Signing** happens only inside the key's window: :meth:`TrustedKeys.check_can_sign` refuses a
  key that is not pinned, revoked, not yet valid or past its window, and ``fedbrain keys
  generate`` refuses a window that is already over. The window is the one pinned in the
  trusted-keys file, so the signer checks the same entry as every verifier.
- **Live authorizations** (a signed job, the roster) must be valid both when issued and *now*:
  a node stops accepting them once the key's window ends.
- **Artifacts** outlive their key: a bundle verifies when its key was valid at the manifest's
  ``created_at`` and is not revoked, whenever it is checked (``created_at`` in the future of the
  verification time is refused). The trade-off: ``created_at`` is the signer's own claim, so
  whoever steals a key can backdate a bundle into the window, even after it ended. The defence
  is revocation, which is total and works offline: ``revoked: true`` in the trusted-keys file
  (``fedbrain keys revoke``) rejects every bundle, job and roster of the key, whatever its date;
  the artifacts it signed legitimately are then re-signed with a new key. Short windows bound
  how long a stolen key can sign *current* jobs; they do not bound backdating.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from manifests.manifest import JSONFormatError, canonical_json, loads_strict

__all__ = [
    "ExpiredKeyError",
    "KeyVerificationError",
    "RevokedKeyError",
    "SignatureMismatchError",
    "SigningKey",
    "TrustedKey",
    "TrustedKeys",
    "UntrustedKeyError",
    "VerifyingKey",
    "format_timestamp",
    "parse_timestamp",
]

KEYID_PATTERN: Final = re.compile(r"^sha256:[0-9a-f]{64}$")
_TIMESTAMP: Final = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")


class KeyVerificationError(Exception):
    """A signature or a key failed verification (the one error family of this module)."""


class SignatureMismatchError(KeyVerificationError):
    """The signature does not verify under the public key."""


class UntrustedKeyError(KeyVerificationError):
    """The key id is not in the trusted-keys file."""


class RevokedKeyError(KeyVerificationError):
    """The pinned key is marked revoked."""


class ExpiredKeyError(KeyVerificationError):
    """The time checked lies outside the pinned key's validity window."""


def _require_utc(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime. Found {type(value).__name__}.")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (UTC). Found naive {value.isoformat()}.")
    return value.astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    """RFC 3339 UTC with whole seconds, e.g. ``2025-01-31T12:00:00Z``."""
    return _require_utc(value, "timestamp").strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str) -> datetime:
    """Parse the form written by :func:`format_timestamp`; ``ValueError`` otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"timestamp must be a string. Found {type(text).__name__}.")
    if not _TIMESTAMP.match(text):
        raise ValueError(f"timestamp must look like 2025-01-31T12:00:00Z. Found {text!r}.")
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


@dataclass(frozen=True, eq=False)
class VerifyingKey:
    """An Ed25519 public key."""

    _key: Ed25519PublicKey

    def __post_init__(self) -> None:
        if not isinstance(self._key, Ed25519PublicKey):
            raise TypeError(f"expected an Ed25519PublicKey. Found {type(self._key).__name__}.")

    @classmethod
    def from_pem(cls, data: bytes) -> VerifyingKey:
        """Load a PEM SubjectPublicKeyInfo; ``ValueError`` unless it is an Ed25519 key."""
        if not isinstance(data, bytes):
            raise TypeError(f"PEM data must be bytes. Found {type(data).__name__}.")
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not a PEM public key: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError(f"public key must be Ed25519. Found {type(key).__name__}.")
        return cls(key)

    @classmethod
    def from_raw(cls, data: bytes) -> VerifyingKey:
        """Load the 32-byte raw encoding of RFC 8032."""
        if not isinstance(data, bytes):
            raise TypeError(f"raw key must be bytes. Found {type(data).__name__}.")
        if len(data) != 32:
            raise ValueError(f"raw Ed25519 public key must be 32 bytes. Found {len(data)}.")
        return cls(Ed25519PublicKey.from_public_bytes(data))

    def public_pem(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def raw(self) -> bytes:
        return self._key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def keyid(self) -> str:
        """``sha256:`` + hex SHA-256 of the DER SubjectPublicKeyInfo."""
        der = self._key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return "sha256:" + hashlib.sha256(der).hexdigest()

    def verify(self, signature: bytes, message: bytes) -> None:
        """Return ``None`` if ``signature`` is valid for ``message``; raise otherwise.

        Raises :class:`SignatureMismatchError`.
        """
        if not isinstance(signature, bytes) or not isinstance(message, bytes):
            raise TypeError("signature and message must be bytes")
        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            raise SignatureMismatchError(
                f"signature does not verify under key {self.keyid}"
            ) from None


@dataclass(frozen=True, eq=False, repr=False)
class SigningKey:
    """An Ed25519 private key (deterministic signatures, RFC 8032 section 5.1.6)."""

    _key: Ed25519PrivateKey

    def __post_init__(self) -> None:
        if not isinstance(self._key, Ed25519PrivateKey):
            raise TypeError(f"expected an Ed25519PrivateKey. Found {type(self._key).__name__}.")

    def __repr__(self) -> str:
        return f"SigningKey(keyid={self.keyid!r})"

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key from the operating system's CSPRNG."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """The key whose RFC 8032 32-byte secret is ``seed`` (test vectors, fixtures)."""
        if not isinstance(seed, bytes):
            raise TypeError(f"seed must be bytes. Found {type(seed).__name__}.")
        if len(seed) != 32:
            raise ValueError(f"Ed25519 seed must be 32 bytes. Found {len(seed)}.")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        """Load an unencrypted PEM PKCS#8 Ed25519 private key."""
        if not isinstance(data, bytes):
            raise TypeError(f"PEM data must be bytes. Found {type(data).__name__}.")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"not an unencrypted PEM private key: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"private key must be Ed25519. Found {type(key).__name__}.")
        return cls(key)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def public_key(self) -> VerifyingKey:
        return VerifyingKey(self._key.public_key())

    @property
    def keyid(self) -> str:
        return self.public_key().keyid

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        if not isinstance(message, bytes):
            raise TypeError(f"message must be bytes. Found {type(message).__name__}.")
        return self._key.sign(message)


@dataclass(frozen=True, eq=False)
class TrustedKey:
    """A pinned public key with its validity window ``[not_before, not_after]``."""

    public_key: VerifyingKey
    not_before: datetime
    not_after: datetime
    revoked: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.public_key, VerifyingKey):
            raise TypeError(
                f"public_key must be a VerifyingKey. Found {type(self.public_key).__name__}."
            )
        object.__setattr__(self, "not_before", _require_utc(self.not_before, "not_before"))
        object.__setattr__(self, "not_after", _require_utc(self.not_after, "not_after"))
        if not isinstance(self.revoked, bool):
            raise TypeError(f"revoked must be a bool. Found {type(self.revoked).__name__}.")
        if self.not_after <= self.not_before:
            start, end = format_timestamp(self.not_before), format_timestamp(self.not_after)
            raise ValueError(
                f"not_after must be later than not_before. Found not_before={start}, "
                f"not_after={end}."
            )

    @property
    def keyid(self) -> str:
        return self.public_key.keyid

    def check_usable_at(self, when: datetime, *, what: str = "time") -> None:
        """Return ``None`` if the key is not revoked and ``when`` lies in its window.

        Raises :class:`RevokedKeyError` or :class:`ExpiredKeyError`.
        """
        when = _require_utc(when, what)
        if self.revoked:
            raise RevokedKeyError(f"key {self.keyid} is revoked in the trusted-keys file")
        if not self.not_before <= when <= self.not_after:
            raise ExpiredKeyError(
                f"key {self.keyid} is valid from {format_timestamp(self.not_before)} to "
                f"{format_timestamp(self.not_after)}; {what} {format_timestamp(when)} is outside"
            )

    def to_json_object(self) -> dict[str, object]:
        return {
            "keyid": self.keyid,
            "public_key_pem": self.public_key.public_pem().decode("ascii"),
            "not_before": format_timestamp(self.not_before),
            "not_after": format_timestamp(self.not_after),
            "revoked": self.revoked,
        }


_ENTRY_FIELDS: Final = frozenset({"keyid", "public_key_pem", "not_before", "not_after", "revoked"})


def _parse_entry(index: int, entry: object) -> TrustedKey:
    where = f"trusted key #{index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a JSON object")
    unknown = sorted(entry.keys() - _ENTRY_FIELDS)
    missing = sorted((_ENTRY_FIELDS - {"revoked"}) - entry.keys())
    if unknown or missing:
        raise ValueError(f"{where}: unknown fields {unknown}, missing fields {missing}")
    keyid, pem = entry["keyid"], entry["public_key_pem"]
    not_before, not_after = entry["not_before"], entry["not_after"]
    revoked = entry.get("revoked", False)
    if not all(isinstance(v, str) for v in (keyid, pem, not_before, not_after)):
        raise ValueError(f"{where}: keyid, public_key_pem, not_before, not_after must be strings")
    if not isinstance(revoked, bool):
        raise ValueError(f"{where}: revoked must be true or false")
    try:
        key = TrustedKey(
            VerifyingKey.from_pem(pem.encode("ascii")),
            parse_timestamp(not_before),
            parse_timestamp(not_after),
            revoked,
        )
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    if key.keyid != keyid:
        raise ValueError(
            f"{where}: keyid {keyid} does not match its public key, whose id is {key.keyid}"
        )
    return key


@dataclass(frozen=True)
class TrustedKeys:
    """The pinned trusted-keys file: a JSON list of
    ``{keyid, public_key_pem, not_before, not_after, revoked?}``."""

    keys: tuple[TrustedKey, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.keys, tuple) or not all(
            isinstance(k, TrustedKey) for k in self.keys
        ):
            raise TypeError("keys must be a tuple of TrustedKey")
        ids = [k.keyid for k in self.keys]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"trusted keys list a key more than once: {duplicates}")

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def of(cls, keys: Sequence[TrustedKey]) -> TrustedKeys:
        return cls(tuple(keys))

    @classmethod
    def from_json(cls, data: bytes) -> TrustedKeys:
        """Parse the file's bytes (strict JSON); ``ValueError`` with every problem found."""
        try:
            document = loads_strict(data)
        except JSONFormatError as exc:
            raise ValueError(f"trusted-keys file: {exc}") from exc
        if not isinstance(document, list):
            raise ValueError("trusted-keys file must hold a JSON list of keys")
        problems: list[str] = []
        keys: list[TrustedKey] = []
        for index, entry in enumerate(document):
            try:
                keys.append(_parse_entry(index, entry))
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("trusted-keys file: " + "; ".join(problems))
        return cls(tuple(keys))

    @classmethod
    def load(cls, path: Path) -> TrustedKeys:
        if not isinstance(path, Path):
            raise TypeError(f"path must be a pathlib.Path. Found {type(path).__name__}.")
        return cls.from_json(path.read_bytes())

    def to_json(self) -> bytes:
        """Canonical JSON (RFC 8785) of the list, newline-terminated."""
        return canonical_json([k.to_json_object() for k in self.keys]) + b"\n"

    def check_can_sign(self, key: VerifyingKey, at: datetime) -> TrustedKey:
        """The pinned entry of ``key`` if it may sign at ``at``; raise otherwise.

        Raises :class:`UntrustedKeyError` (not in this file: its window cannot be checked),
        :class:`RevokedKeyError`, or :class:`ExpiredKeyError` (``at`` is before the window or
        after its end), each with what to do about it.
        """
        if not isinstance(key, VerifyingKey):
            raise TypeError(f"key must be a VerifyingKey. Found {type(key).__name__}.")
        at = _require_utc(at, "at")
        try:
            pinned = self.lookup(key.keyid)
        except UntrustedKeyError:
            raise UntrustedKeyError(
                f"key {key.keyid} is not in the trusted-keys file, so its validity window is "
                "unknown: give the trusted-keys file that lists it"
            ) from None
        if pinned.revoked:
            raise RevokedKeyError(
                f"key {key.keyid} is revoked in the trusted-keys file; it must not sign anything"
            )
        if at > pinned.not_after:
            raise ExpiredKeyError(
                f"key {key.keyid}'s validity window ended at {format_timestamp(pinned.not_after)}"
                f" (now {format_timestamp(at)}); it can no longer sign. Generate a new key "
                "(fedbrain keys generate) and add it to the trusted-keys files"
            )
        if at < pinned.not_before:
            raise ExpiredKeyError(
                f"key {key.keyid}'s validity window starts at "
                f"{format_timestamp(pinned.not_before)} (now {format_timestamp(at)}); it cannot "
                "sign yet"
            )
        return pinned

    def revoke(self, keyid: str) -> TrustedKeys:
        """These keys with ``keyid`` marked revoked (:class:`UntrustedKeyError` if absent)."""
        self.lookup(keyid)
        return TrustedKeys(
            tuple(
                TrustedKey(k.public_key, k.not_before, k.not_after, True) if k.keyid == keyid else k
                for k in self.keys
            )
        )

    def lookup(self, keyid: str) -> TrustedKey:
        """The pinned key with this id; :class:`UntrustedKeyError` if none."""
        if not isinstance(keyid, str):
            raise TypeError(f"keyid must be a string. Found {type(keyid).__name__}.")
        for key in self.keys:
            if key.keyid == keyid:
                return key
        raise UntrustedKeyError(f"key {keyid} is not in the trusted-keys file")
