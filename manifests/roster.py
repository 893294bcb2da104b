"""The federation roster, signed by the operator: who may take part, under which identity key.

A node holds the roster locally (from its startup kit), with the operators' trusted-keys file;
the server never supplies it. So a malicious server can neither add a member nor swap a
member's key (Bell et al., CCS 2020, sec. 5: the malicious setting assumes a PKI -- this is it).

- :class:`RosterEntry`: a member's name, node type, raw 32-byte Ed25519 identity public key
  (RFC 8032) and validity window; its SecAgg+ node id is
  :func:`aggregation.secagg.node_id_for` of the key, so ids are self-certifying.
- :class:`Roster`: the federation name, when it was issued and its entries (unique names and
  keys). :meth:`Roster.members` is the mapping SecAgg+ checks signatures against;
  :meth:`Roster.secagg_roster` wraps it in :class:`aggregation.secagg.Roster`.
- :func:`sign_roster` / :func:`verify_roster`: a DSSE envelope (payloadType
  :data:`ROSTER_PAYLOAD_TYPE`) over the roster's RFC 8785 canonical JSON. Verification is as
  strict as :mod:`manifests.verify`: the key must be pinned, unrevoked and valid both at the
  roster's ``issued_at`` and at ``now``; the envelope's ``keyid`` only selects a pinned key.

Timestamps are whole seconds in UTC (microseconds are dropped, as in the manifest).
Revocation keeps the entry with a ``revoked_at`` (a member is valid strictly before it), so a
later roster still shows who was removed and when.

Cost at scale (a federation of 1,000 nodes, a roster of about 260 KB): a process verifies the
same envelope bytes under the same trusted keys once (the signature and the parse are cached
by their SHA-256; the key's window is checked again at every ``now``), looks entries up by
node id through an index, and builds the SecAgg+ roster once per stretch of time in which no
entry's validity changes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Final, cast

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregation.secagg.identity import IDENTITY_KEY_SIZE, node_id_for
from aggregation.secagg.identity import Roster as SecAggRoster
from manifests import dsse
from manifests.catalog import NodeType
from manifests.keys import (
    ExpiredKeyError,
    SignatureMismatchError,
    SigningKey,
    TrustedKey,
    TrustedKeys,
    UntrustedKeyError,
    format_timestamp,
    parse_timestamp,
)
from manifests.manifest import JSONFormatError, canonical_json, loads_strict

__all__ = [
    "ROSTER_PAYLOAD_TYPE",
    "ROSTER_VERSION",
    "EnvelopeErrors",
    "Roster",
    "RosterBadSignatureError",
    "RosterEntry",
    "RosterError",
    "RosterFormatError",
    "RosterKeyExpiredError",
    "RosterKeyRevokedError",
    "RosterKeyUntrustedError",
    "RosterPayloadTypeError",
    "RosterRollbackError",
    "open_envelope",
    "sign_roster",
    "verify_roster",
]

ROSTER_PAYLOAD_TYPE: Final = "application/vnd.fedbrain.roster+json"
ROSTER_VERSION: Final = 1
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_HEX: Final = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- errors


class RosterError(Exception):
    """A roster that a node must not use; every refusal is a subclass, the message says why."""


class RosterFormatError(RosterError, ValueError):
    """Not a well-formed roster: bad JSON (duplicate keys, NaN), unknown or missing fields,
    invalid entries, or an envelope that is not DSSE."""


class RosterPayloadTypeError(RosterError):
    """The envelope's payloadType is not :data:`ROSTER_PAYLOAD_TYPE`."""


class RosterBadSignatureError(RosterError):
    """The signature does not verify under the pinned operator key."""


class RosterKeyUntrustedError(RosterError):
    """The signing key is not in the operators' trusted-keys file."""


class RosterKeyRevokedError(RosterError):
    """The signing key is revoked in the operators' trusted-keys file."""


class RosterKeyExpiredError(RosterError):
    """``issued_at`` or ``now`` lies outside the signing key's validity window."""


class RosterRollbackError(RosterError):
    """The roster is older than the one the node already holds, or of another federation."""


# --------------------------------------------------------------------------- signed envelopes


@dataclass(frozen=True)
class EnvelopeErrors:
    """The exception classes :func:`open_envelope` raises, one per reason (so each signed
    document type reports its own errors)."""

    malformed: type[Exception]
    payload_type: type[Exception]
    untrusted: type[Exception]
    revoked: type[Exception]
    bad_signature: type[Exception]


def _b64(text: object, what: str, error: type[Exception]) -> bytes:
    if not isinstance(text, str):
        raise error(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise error(f"{what} is not valid base64: {exc}") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise error(f"{what} is not in canonical base64 form")
    return raw


def open_envelope(
    data: bytes, *, payload_type: str, trusted: TrustedKeys, errors: EnvelopeErrors
) -> tuple[bytes, TrustedKey]:
    """The payload of a single-signature DSSE envelope whose signature verifies under a pinned,
    unrevoked key, and that key. The caller checks the key's window at the document's times.

    :class:`manifests.dsse.Envelope.from_json` accepts only in-toto payloads, so the envelope
    is parsed here, as strictly (exact fields, canonical base64, one signature).
    """
    if not isinstance(data, bytes):
        raise TypeError(f"envelope must be bytes. Found {type(data).__name__}.")
    if not isinstance(trusted, TrustedKeys):
        raise TypeError(f"trusted must be TrustedKeys. Found {type(trusted).__name__}.")
    try:
        document = loads_strict(data)
    except JSONFormatError as exc:
        raise errors.malformed(f"envelope: {exc}") from None
    if not isinstance(document, dict):
        raise errors.malformed("envelope must be a JSON object")
    if set(document) != {"payload", "payloadType", "signatures"}:
        raise errors.malformed(
            "envelope must have exactly payload, payloadType and signatures. "
            f"Found {sorted(document)}."
        )
    if document["payloadType"] != payload_type:
        raise errors.payload_type(
            f"payloadType must be {payload_type!r}. Found {document['payloadType']!r}."
        )
    payload = _b64(document["payload"], "payload", errors.malformed)
    signatures = document["signatures"]
    if not isinstance(signatures, list) or len(signatures) != 1:
        count = len(signatures) if isinstance(signatures, list) else "no list"
        raise errors.malformed(f"envelope must carry exactly one signature. Found {count}.")
    entry = signatures[0]
    if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}:
        raise errors.malformed("the signature must be an object with exactly keyid and sig")
    keyid = entry["keyid"]
    if not isinstance(keyid, str):
        raise errors.malformed("signature keyid must be a string")
    signature = _b64(entry["sig"], "sig", errors.malformed)
    try:
        pinned = trusted.lookup(keyid)
    except UntrustedKeyError as exc:
        raise errors.untrusted(str(exc)) from None
    if pinned.revoked:
        raise errors.revoked(f"key {keyid} is revoked in the trusted-keys file")
    envelope = dsse.Envelope(payload, payload_type, (dsse.Signature(keyid, signature),))
    try:
        envelope.verify(pinned.public_key)
    except SignatureMismatchError as exc:
        raise errors.bad_signature(str(exc)) from None
    return payload, pinned


# --------------------------------------------------------------------------- the roster


def _utc_seconds(value: object, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"`{name}` must be a datetime. Found {type(value).__name__}.")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"`{name}` must be timezone-aware (UTC). Found {value.isoformat()}.")
    return value.astimezone(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class RosterEntry:
    """One member: ``name`` (letters, digits, ``.``, ``_``, ``-``; up to 64), ``node_type``,
    ``identity_key`` (raw 32-byte Ed25519 public key), valid from ``not_before`` to
    ``not_after`` (inclusive) and strictly before ``revoked_at`` when set."""

    name: str
    node_type: NodeType
    identity_key: bytes
    not_before: datetime
    not_after: datetime
    revoked_at: datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"`name` must be a str. Found {type(self.name).__name__}.")
        if not _NAME.match(self.name):
            raise ValueError(
                "`name` must be 1-64 letters, digits, '.', '_' or '-', starting with a letter "
                f"or digit. Found {self.name!r}."
            )
        try:
            object.__setattr__(self, "node_type", NodeType(self.node_type))
        except ValueError:
            raise ValueError(
                f"`node_type` must be one of {', '.join(NodeType)}. Found {self.node_type!r}."
            ) from None
        if not isinstance(self.identity_key, bytes):
            raise TypeError(
                f"`identity_key` must be bytes. Found {type(self.identity_key).__name__}."
            )
        if len(self.identity_key) != IDENTITY_KEY_SIZE:
            raise ValueError(
                f"`identity_key` must be the raw {IDENTITY_KEY_SIZE}-byte Ed25519 public key. "
                f"Found {len(self.identity_key)} bytes."
            )
        try:
            Ed25519PublicKey.from_public_bytes(self.identity_key)
        except ValueError as exc:
            raise ValueError(f"`identity_key` is not an Ed25519 public key: {exc}") from None
        start = _utc_seconds(self.not_before, "not_before")
        end = _utc_seconds(self.not_after, "not_after")
        object.__setattr__(self, "not_before", start)
        object.__setattr__(self, "not_after", end)
        if end <= start:
            raise ValueError(
                f"`not_after` must be later than `not_before`. Found {format_timestamp(start)} "
                f"to {format_timestamp(end)} for {self.name}."
            )
        if self.revoked_at is not None:
            object.__setattr__(self, "revoked_at", _utc_seconds(self.revoked_at, "revoked_at"))

    @property
    def node_id(self) -> int:
        """The SecAgg+ node id: :func:`aggregation.secagg.node_id_for` of the identity key."""
        return node_id_for(self.identity_key)

    def valid_at(self, at: datetime) -> bool:
        """Whether the member may take part at ``at``."""
        at = _utc_seconds(at, "at")
        if self.revoked_at is not None and at >= self.revoked_at:
            return False
        return self.not_before <= at <= self.not_after

    def to_json_object(self) -> dict[str, object]:
        record: dict[str, object] = {
            "name": self.name,
            "node_type": self.node_type.value,
            "identity_key": self.identity_key.hex(),
            "not_before": format_timestamp(self.not_before),
            "not_after": format_timestamp(self.not_after),
        }
        if self.revoked_at is not None:
            record["revoked_at"] = format_timestamp(self.revoked_at)
        return record


_ROSTER_FIELDS: Final = frozenset({"version", "federation", "issued_at", "members"})
_ENTRY_FIELDS: Final = frozenset(
    {"name", "node_type", "identity_key", "not_before", "not_after", "revoked_at"}
)


def _entry_from_json(index: int, record: object) -> RosterEntry:
    where = f"members[{index}]"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: must be a JSON object")
    unknown = sorted(record.keys() - _ENTRY_FIELDS)
    missing = sorted((_ENTRY_FIELDS - {"revoked_at"}) - record.keys())
    if unknown or missing:
        raise ValueError(f"{where}: unknown fields {unknown}, missing fields {missing}")
    texts: dict[str, str] = {}
    for name, value in record.items():
        if not isinstance(value, str):
            raise ValueError(f"{where}: {name} must be a string. Found {value!r}.")
        texts[name] = value
    if not _KEY_HEX.match(texts["identity_key"]):
        raise ValueError(f"{where}: identity_key must be 64 lowercase hex digits")
    revoked = texts.get("revoked_at")
    try:
        return RosterEntry(
            name=texts["name"],
            node_type=cast(NodeType, texts["node_type"]),
            identity_key=bytes.fromhex(texts["identity_key"]),
            not_before=parse_timestamp(texts["not_before"]),
            not_after=parse_timestamp(texts["not_after"]),
            revoked_at=parse_timestamp(revoked) if revoked is not None else None,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class Roster:
    """The federation's members, as the operator signed them (immutable; entries by name).

    Raises ``ValueError`` listing every problem: an empty federation name, duplicate names,
    duplicate identity keys (hence node ids).
    """

    federation: str
    issued_at: datetime
    entries: tuple[RosterEntry, ...]
    # Derived once per roster (it is immutable): node id -> entry, and the SecAgg+ roster of
    # the last stretch of time in which no entry's validity changes.
    _by_id: dict[int, RosterEntry] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _secagg: list[tuple[datetime, datetime | None, SecAggRoster]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.federation, str):
            raise TypeError(f"`federation` must be a str. Found {type(self.federation).__name__}.")
        if not _NAME.match(self.federation):
            raise ValueError(
                "`federation` must be 1-64 letters, digits, '.', '_' or '-'. "
                f"Found {self.federation!r}."
            )
        object.__setattr__(self, "issued_at", _utc_seconds(self.issued_at, "issued_at"))
        entries = tuple(self.entries)
        if not all(isinstance(e, RosterEntry) for e in entries):
            raise TypeError("`entries` must hold RosterEntry values")
        problems: list[str] = []
        counts = Counter(e.name for e in entries)
        twice = sorted(n for n, c in counts.items() if c > 1)
        if twice:
            problems.append(f"names listed more than once: {twice}")
        owners: dict[int, str] = {}
        for entry in entries:
            other = owners.setdefault(entry.node_id, entry.name)
            if other != entry.name:
                problems.append(f"{other} and {entry.name} have the same identity key")
        if problems:
            raise ValueError("Invalid roster: " + "; ".join(problems) + ".")
        object.__setattr__(self, "entries", tuple(sorted(entries, key=lambda e: e.name)))
        self._by_id.update((e.node_id, e) for e in self.entries)

    def members(self, at: datetime) -> dict[int, bytes]:
        """Node id -> identity public key of every entry valid at ``at``."""
        return {e.node_id: e.identity_key for e in self.entries if e.valid_at(at)}

    def secagg_roster(self, at: datetime) -> SecAggRoster:
        """:meth:`members` as the :class:`aggregation.secagg.Roster` SecAgg+ sessions take.

        Built once per stretch of time in which no entry's validity changes (the members at
        ``at`` are those of the whole stretch), so that a node does not rebuild -- and parse
        every member's key of -- a large roster for every message.
        """
        at = _utc_seconds(at, "at")
        cached = self._secagg[0] if self._secagg else None
        if cached is not None and cached[0] <= at and (cached[1] is None or at < cached[1]):
            return cached[2]
        start, end = self._stretch(at)
        roster = SecAggRoster(self.members(at))
        self._secagg[:] = [(start, end, roster)]
        return roster

    def _stretch(self, at: datetime) -> tuple[datetime, datetime | None]:
        """The times around ``at`` at which some entry's validity changes: ``[start, end)``
        holds ``at`` and no change (``end`` None: none after ``at``)."""
        one = timedelta(seconds=1)
        changes = {e.not_before for e in self.entries} | {e.not_after + one for e in self.entries}
        changes |= {e.revoked_at for e in self.entries if e.revoked_at is not None}
        start = max((c for c in changes if c <= at), default=datetime.min.replace(tzinfo=UTC))
        end = min((c for c in changes if c > at), default=None)
        return start, end

    def entry(self, node_id: int) -> RosterEntry:
        """The entry of ``node_id`` (valid or not); ``KeyError`` if the roster has none."""
        try:
            return self._by_id[node_id]
        except KeyError:
            raise KeyError(f"node {node_id} is not in the roster of {self.federation}") from None

    def by_name(self, name: str) -> RosterEntry:
        """The entry called ``name``; ``KeyError`` if none."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"{name!r} is not in the roster of {self.federation}")

    def add(self, entry: RosterEntry, *, issued_at: datetime) -> Roster:
        """A new roster with ``entry`` added (``ValueError`` for a duplicate name or key)."""
        return Roster(self.federation, issued_at, (*self.entries, entry))

    def revoke(self, node_id: int, *, at: datetime, issued_at: datetime | None = None) -> Roster:
        """A new roster in which ``node_id`` is valid only before ``at`` (``issued_at``
        defaults to ``at``). The entry stays, so the roster records the revocation."""
        target = self.entry(node_id)
        revoked = replace(target, revoked_at=at)
        entries = tuple(revoked if e is target else e for e in self.entries)
        return Roster(self.federation, issued_at if issued_at is not None else at, entries)

    def remove(self, node_id: int, *, issued_at: datetime) -> Roster:
        """A new roster without ``node_id``'s entry."""
        target = self.entry(node_id)
        return Roster(self.federation, issued_at, tuple(e for e in self.entries if e is not target))

    def to_json(self) -> bytes:
        """RFC 8785 canonical JSON (the signed payload)."""
        return canonical_json(
            {
                "version": ROSTER_VERSION,
                "federation": self.federation,
                "issued_at": format_timestamp(self.issued_at),
                "members": [e.to_json_object() for e in self.entries],
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> Roster:
        """Parse a roster strictly; :class:`RosterFormatError` with every problem found."""
        try:
            document = loads_strict(data)
        except JSONFormatError as exc:
            raise RosterFormatError(f"roster: {exc}") from None
        if not isinstance(document, dict):
            raise RosterFormatError("roster must be a JSON object")
        unknown = sorted(document.keys() - _ROSTER_FIELDS)
        missing = sorted(_ROSTER_FIELDS - document.keys())
        if unknown or missing:
            raise RosterFormatError(f"roster: unknown fields {unknown}, missing fields {missing}")
        problems: list[str] = []
        version = document["version"]
        if type(version) is not int or version != ROSTER_VERSION:
            problems.append(f"version must be {ROSTER_VERSION}. Found {version!r}.")
        federation, issued = document["federation"], document["issued_at"]
        if not isinstance(federation, str):
            problems.append("federation must be a string")
        issued_at: datetime | None = None
        try:
            issued_at = parse_timestamp(issued) if isinstance(issued, str) else None
        except ValueError as exc:
            problems.append(f"issued_at: {exc}")
        if not isinstance(issued, str):
            problems.append("issued_at must be a string")
        members = document["members"]
        entries: list[RosterEntry] = []
        if not isinstance(members, list):
            problems.append("members must be a list")
        else:
            for index, record in enumerate(members):
                try:
                    entries.append(_entry_from_json(index, record))
                except ValueError as exc:
                    problems.append(str(exc))
        if problems or issued_at is None or not isinstance(federation, str):
            raise RosterFormatError("roster: " + "; ".join(problems))
        try:
            return cls(federation, issued_at, tuple(entries))
        except (TypeError, ValueError) as exc:
            raise RosterFormatError(f"roster: {exc}") from None

    @classmethod
    def of(cls, federation: str, issued_at: datetime, entries: Iterable[RosterEntry]) -> Roster:
        return cls(federation, issued_at, tuple(entries))


# --------------------------------------------------------------------------- sign / verify

_ROSTER_ERRORS: Final = EnvelopeErrors(
    malformed=RosterFormatError,
    payload_type=RosterPayloadTypeError,
    untrusted=RosterKeyUntrustedError,
    revoked=RosterKeyRevokedError,
    bad_signature=RosterBadSignatureError,
)


def sign_roster(roster: Roster, key: SigningKey) -> bytes:
    """The roster file: a DSSE envelope (canonical JSON) over :meth:`Roster.to_json`."""
    if not isinstance(roster, Roster):
        raise TypeError(f"roster must be a Roster. Found {type(roster).__name__}.")
    return dsse.sign(ROSTER_PAYLOAD_TYPE, roster.to_json(), key).to_json()


_OPENED_LIMIT: Final = 16
_opened_rosters: OrderedDict[tuple[bytes, bytes], tuple[Roster, TrustedKey]] = OrderedDict()
_opened_lock = threading.Lock()


def _opened(envelope: bytes, trusted: TrustedKeys) -> tuple[Roster, TrustedKey]:
    """The roster in ``envelope`` and the pinned key whose signature on it verifies: checked
    once per process for the same envelope bytes and the same trusted keys (a failure is not
    remembered; the caller checks the key's window at its own ``now``)."""
    if not isinstance(envelope, bytes):
        raise TypeError(f"envelope must be bytes. Found {type(envelope).__name__}.")
    if not isinstance(trusted, TrustedKeys):
        raise TypeError(f"trusted must be TrustedKeys. Found {type(trusted).__name__}.")
    key = (hashlib.sha256(envelope).digest(), hashlib.sha256(trusted.to_json()).digest())
    with _opened_lock:
        hit = _opened_rosters.get(key)
        if hit is not None:
            _opened_rosters.move_to_end(key)
            return hit
    payload, pinned = open_envelope(
        envelope, payload_type=ROSTER_PAYLOAD_TYPE, trusted=trusted, errors=_ROSTER_ERRORS
    )
    opened = (Roster.from_json(payload), pinned)
    with _opened_lock:
        _opened_rosters[key] = opened
        while len(_opened_rosters) > _OPENED_LIMIT:
            _opened_rosters.popitem(last=False)
    return opened


def verify_roster(
    envelope: bytes,
    trusted: TrustedKeys,
    *,
    now: datetime,
    previous: Roster | None = None,
) -> Roster:
    """The roster in ``envelope`` if an operator key in ``trusted`` signed it; raise otherwise.

    The key must be pinned, unrevoked and valid at the roster's ``issued_at`` and at ``now``.
    With ``previous`` (the roster the node holds), a roster of another federation or issued
    before it is refused (:class:`RosterRollbackError`): an old roster could bring back a
    revoked member. Raises a :class:`RosterError` subclass naming the reason.
    """
    now = _utc_seconds(now, "now")
    roster, pinned = _opened(envelope, trusted)
    try:
        pinned.check_usable_at(roster.issued_at, what="the roster's issued_at")
        pinned.check_usable_at(now, what="now")
    except ExpiredKeyError as exc:
        raise RosterKeyExpiredError(str(exc)) from None
    if previous is not None:
        if previous.federation != roster.federation:
            raise RosterRollbackError(
                f"the roster is for federation {roster.federation!r}; this node belongs to "
                f"{previous.federation!r}"
            )
        if roster.issued_at < previous.issued_at:
            raise RosterRollbackError(
                f"the roster was issued at {format_timestamp(roster.issued_at)}, before the one "
                f"this node holds ({format_timestamp(previous.issued_at)})"
            )
    return roster
