"""Jobs signed by the operator: what a node agrees to train, bound to one federation.

A node trains only for a job an operator signed (never for one the server merely sends), and
every round's config must match it. The file is a DSSE envelope (payloadType
:data:`JOB_PAYLOAD_TYPE`) whose payload is the RFC 8785 canonical JSON of::

    {"federation": str, "issued_at": "2025-01-31T12:00:00Z", "not_after": str | null,
     "job": JobSpec.to_run_config()}

The job id is ``sha256:`` + hex SHA-256 of that payload: one id per signed job, so a node's
budget charges a resumed job once. Verification is as strict as :mod:`manifests.verify`: the
key must be pinned, unrevoked and valid at ``issued_at`` and at ``now``; the job must still
validate through :meth:`manifests.jobspec.JobSpec.from_run_config`.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from manifests import dsse
from manifests.jobspec import JobSpec, JobSpecError, RunConfigValue
from manifests.keys import ExpiredKeyError, SigningKey, TrustedKeys, format_timestamp
from manifests.keys import parse_timestamp as _parse_timestamp
from manifests.manifest import JSONFormatError, canonical_json, loads_strict
from manifests.roster import EnvelopeErrors, open_envelope

__all__ = [
    "JOB_PAYLOAD_TYPE",
    "SignedJob",
    "SignedJobBadSignatureError",
    "SignedJobError",
    "SignedJobExpiredError",
    "SignedJobFederationError",
    "SignedJobFormatError",
    "SignedJobInvalidError",
    "SignedJobKeyExpiredError",
    "SignedJobKeyRevokedError",
    "SignedJobKeyUntrustedError",
    "SignedJobPayloadTypeError",
    "envelope_job_id",
    "job_id_of",
    "sign_job",
    "verify_signed_job",
]

JOB_PAYLOAD_TYPE: Final = "application/vnd.fedbrain.job+json"
_FIELDS: Final = frozenset({"federation", "issued_at", "not_after", "job"})


class SignedJobError(Exception):
    """A signed job that a node must refuse; every refusal is a subclass, the message says
    why."""


class SignedJobFormatError(SignedJobError, ValueError):
    """Not a well-formed signed job: bad JSON (duplicate keys, NaN), not a DSSE envelope,
    unknown or missing payload fields."""


class SignedJobInvalidError(SignedJobFormatError):
    """The signed job does not validate as a job spec; ``problems`` lists why."""

    def __init__(self, problems: tuple[str, ...]) -> None:
        self.problems = problems
        super().__init__("the signed job is not a valid job spec: " + "; ".join(problems))


class SignedJobPayloadTypeError(SignedJobError):
    """The envelope's payloadType is not :data:`JOB_PAYLOAD_TYPE`."""


class SignedJobBadSignatureError(SignedJobError):
    """The signature does not verify under the pinned operator key (the job was tampered
    with, or signed by another key under this key id)."""


class SignedJobKeyUntrustedError(SignedJobError):
    """The signing key is not an operator key this node trusts."""


class SignedJobKeyRevokedError(SignedJobError):
    """The signing key is revoked in the trusted-keys file."""


class SignedJobKeyExpiredError(SignedJobError):
    """``issued_at`` or ``now`` lies outside the signing key's validity window."""


class SignedJobExpiredError(SignedJobError):
    """``now`` is after the job's ``not_after``."""


class SignedJobFederationError(SignedJobError):
    """The job is signed for another federation."""


_ERRORS: Final = EnvelopeErrors(
    malformed=SignedJobFormatError,
    payload_type=SignedJobPayloadTypeError,
    untrusted=SignedJobKeyUntrustedError,
    revoked=SignedJobKeyRevokedError,
    bad_signature=SignedJobBadSignatureError,
)


@dataclass(frozen=True)
class SignedJob:
    """A verified job: the spec, its id (``sha256:`` of the signed payload), the federation it
    is for, when it was issued, until when it may start (None: no limit) and who signed it."""

    job: JobSpec
    job_id: str
    federation: str
    issued_at: datetime
    keyid: str
    not_after: datetime | None = None


def _utc(value: object, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"`{name}` must be a datetime. Found {type(value).__name__}.")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"`{name}` must be timezone-aware (UTC). Found {value.isoformat()}.")
    return value.astimezone(UTC).replace(microsecond=0)


def job_id_of(payload: bytes) -> str:
    """``sha256:`` + hex SHA-256 of a signed job's payload."""
    return "sha256:" + hashlib.sha256(payload).hexdigest()


def envelope_job_id(envelope: bytes) -> str:
    """The job id of a signed job file, read without verifying its signature: for the server,
    which signed or verified the file itself (nodes always verify, :func:`verify_signed_job`).
    Raises :class:`SignedJobFormatError` when ``envelope`` is not a DSSE envelope."""
    try:
        document = loads_strict(envelope)
    except JSONFormatError as exc:
        raise SignedJobFormatError(f"envelope: {exc}") from None
    payload = document.get("payload") if isinstance(document, dict) else None
    if not isinstance(payload, str):
        raise SignedJobFormatError("envelope must be a JSON object with a base64 payload")
    try:
        raw = base64.b64decode(payload, validate=True)
    except ValueError:
        raise SignedJobFormatError("envelope payload is not base64") from None
    return job_id_of(raw)


def sign_job(
    job: JobSpec,
    key: SigningKey,
    *,
    federation: str,
    issued_at: datetime,
    not_after: datetime | None = None,
) -> bytes:
    """The signed job file: a DSSE envelope (canonical JSON) over the payload described in the
    module docstring. Times are whole seconds in UTC."""
    if not isinstance(job, JobSpec):
        raise TypeError(f"job must be a JobSpec. Found {type(job).__name__}.")
    if not isinstance(federation, str) or not federation:
        raise ValueError(f"`federation` must be a non-empty string. Found {federation!r}.")
    issued = _utc(issued_at, "issued_at")
    end = _utc(not_after, "not_after") if not_after is not None else None
    if end is not None and end <= issued:
        raise ValueError(
            f"`not_after` must be later than `issued_at`. Found {format_timestamp(issued)} to "
            f"{format_timestamp(end)}."
        )
    payload = canonical_json(
        {
            "federation": federation,
            "issued_at": format_timestamp(issued),
            "not_after": format_timestamp(end) if end is not None else None,
            "job": job.to_run_config(),
        }
    )
    return dsse.sign(JOB_PAYLOAD_TYPE, payload, key).to_json()


def _timestamp(value: object, name: str) -> datetime:
    if not isinstance(value, str):
        raise SignedJobFormatError(f"signed job: {name} must be a timestamp string")
    try:
        return _parse_timestamp(value)
    except ValueError as exc:
        raise SignedJobFormatError(f"signed job: {name}: {exc}") from None


def _run_config(value: object) -> dict[str, RunConfigValue]:
    if not isinstance(value, dict):
        raise SignedJobFormatError("signed job: job must be a JSON object (a flat run config)")
    config: dict[str, RunConfigValue] = {}
    for key, item in value.items():
        if not isinstance(item, bool | int | float | str):
            raise SignedJobFormatError(
                f"signed job: job.{key} must be a boolean, number or string. Found {item!r}."
            )
        config[key] = item
    return config


def verify_signed_job(
    envelope: bytes,
    trusted: TrustedKeys,
    *,
    now: datetime,
    federation: str | None = None,
) -> SignedJob:
    """The job in ``envelope`` if a pinned operator key signed it and it may run at ``now``.

    With ``federation``, a job signed for another federation is refused. Raises a
    :class:`SignedJobError` subclass naming the reason.
    """
    now = _utc(now, "now")
    payload, pinned = open_envelope(
        envelope, payload_type=JOB_PAYLOAD_TYPE, trusted=trusted, errors=_ERRORS
    )
    try:
        document = loads_strict(payload)
    except JSONFormatError as exc:
        raise SignedJobFormatError(f"signed job: {exc}") from None
    if not isinstance(document, dict):
        raise SignedJobFormatError("signed job must be a JSON object")
    if set(document) != _FIELDS:
        raise SignedJobFormatError(
            f"signed job must have exactly {sorted(_FIELDS)}. Found {sorted(document)}."
        )
    signed_for = document["federation"]
    if not isinstance(signed_for, str) or not signed_for:
        raise SignedJobFormatError("signed job: federation must be a non-empty string")
    issued_at = _timestamp(document["issued_at"], "issued_at")
    raw_end = document["not_after"]
    not_after = None if raw_end is None else _timestamp(raw_end, "not_after")
    try:
        job = JobSpec.from_run_config(_run_config(document["job"]))
    except JobSpecError as exc:
        raise SignedJobInvalidError(exc.problems) from None
    try:
        pinned.check_usable_at(issued_at, what="the job's issued_at")
        pinned.check_usable_at(now, what="now")
    except ExpiredKeyError as exc:
        raise SignedJobKeyExpiredError(str(exc)) from None
    if federation is not None and signed_for != federation:
        raise SignedJobFederationError(
            f"the job is signed for federation {signed_for!r}; this node belongs to {federation!r}"
        )
    if not_after is not None and now > not_after:
        raise SignedJobExpiredError(
            f"the job expired at {format_timestamp(not_after)}; now is {format_timestamp(now)}"
        )
    return SignedJob(
        job=job,
        job_id=job_id_of(payload),
        federation=signed_for,
        issued_at=issued_at,
        keyid=pinned.keyid,
        not_after=not_after,
    )
