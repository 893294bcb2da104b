"""DSSE envelopes over in-toto Statements (the bundle's signature).

- DSSE v1 (https://github.com/secure-systems-lab/dsse/blob/master/protocol.md): the signature
  covers ``PAE(payloadType, payload)`` =
  ``"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` with ASCII decimal lengths in bytes.
- in-toto Statement v1 (https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md):
  ``subject`` lists every other bundle member by name and SHA-256, ``predicate`` is the manifest.

Signatures are Ed25519 (see :mod:`manifests.keys`). ``Envelope.verify`` returns ``None`` or
raises; it never returns a bool. The envelope's ``keyid`` is only a hint for selecting a pinned
key; the caller decides which key to trust.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from manifests.keys import SignatureMismatchError, SigningKey, VerifyingKey
from manifests.manifest import canonical_json, loads_strict

__all__ = [
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "Envelope",
    "EnvelopeError",
    "PayloadTypeError",
    "PredicateTypeError",
    "Signature",
    "Statement",
    "StatementError",
    "Subject",
    "pae",
    "sign",
]

PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE: Final = "https://fedbrain.dev/artifact-manifest/v1"

_SHA256_HEX: Final = re.compile(r"^[0-9a-f]{64}$")


class EnvelopeError(ValueError):
    """The DSSE envelope is malformed."""


class PayloadTypeError(EnvelopeError):
    """The envelope's payloadType is not the in-toto one."""


class StatementError(ValueError):
    """The signed payload is not a well-formed in-toto Statement v1."""


class PredicateTypeError(StatementError):
    """The Statement's predicateType is not fedbrain's artifact manifest."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding; lengths are byte counts of the UTF-8 type and body."""
    if not isinstance(payload_type, str):
        raise TypeError(f"payload_type must be a str. Found {type(payload_type).__name__}.")
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes. Found {type(payload).__name__}.")
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def _b64decode(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise EnvelopeError(f"{what} must be a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise EnvelopeError(f"{what} is not valid base64: {exc}") from exc
    if base64.b64encode(raw).decode("ascii") != text:
        raise EnvelopeError(f"{what} is not in canonical base64 form")
    return raw


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope: ``payload`` (raw bytes), ``payload_type`` and its signatures."""

    payload: bytes
    payload_type: str
    signatures: tuple[Signature, ...]

    def to_json(self) -> bytes:
        """The envelope file: RFC 8785 canonical JSON, deterministic."""
        return canonical_json(
            {
                "payload": base64.b64encode(self.payload).decode("ascii"),
                "payloadType": self.payload_type,
                "signatures": [
                    {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")}
                    for s in self.signatures
                ],
            }
        )

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        """Parse an envelope strictly (JSON errors propagate as ``JSONFormatError``).

        Raises :class:`EnvelopeError` for a malformed envelope and :class:`PayloadTypeError`
        if its payloadType is not ``application/vnd.in-toto+json``.
        """
        document = loads_strict(data)
        if not isinstance(document, dict):
            raise EnvelopeError("envelope must be a JSON object")
        if set(document) != {"payload", "payloadType", "signatures"}:
            raise EnvelopeError(
                "envelope must have exactly payload, payloadType and signatures. "
                f"Found {sorted(document)}."
            )
        payload_type = document["payloadType"]
        if payload_type != PAYLOAD_TYPE:
            raise PayloadTypeError(f"payloadType must be {PAYLOAD_TYPE!r}. Found {payload_type!r}.")
        payload = _b64decode(document["payload"], "payload")
        raw_signatures = document["signatures"]
        if not isinstance(raw_signatures, list) or not raw_signatures:
            raise EnvelopeError("signatures must be a non-empty list")
        signatures: list[Signature] = []
        for entry in raw_signatures:
            if not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}:
                raise EnvelopeError("each signature must be an object with exactly keyid and sig")
            keyid = entry["keyid"]
            if not isinstance(keyid, str):
                raise EnvelopeError("signature keyid must be a string")
            signatures.append(Signature(keyid, _b64decode(entry["sig"], "sig")))
        return cls(payload, PAYLOAD_TYPE, tuple(signatures))

    def verify(self, key: VerifyingKey) -> None:
        """Return ``None`` if the envelope's single signature verifies under ``key``.

        fedbrain envelopes carry exactly one signature. Raises :class:`EnvelopeError` for any
        other count and :class:`manifests.keys.SignatureMismatchError` for a bad signature.
        """
        if not isinstance(key, VerifyingKey):
            raise TypeError(f"key must be a VerifyingKey. Found {type(key).__name__}.")
        if len(self.signatures) != 1:
            raise EnvelopeError(
                f"envelope must carry exactly one signature. Found {len(self.signatures)}."
            )
        try:
            key.verify(self.signatures[0].sig, pae(self.payload_type, self.payload))
        except SignatureMismatchError:
            raise SignatureMismatchError(
                f"DSSE signature does not verify under trusted key {key.keyid}"
            ) from None


def sign(payload_type: str, payload: bytes, key: SigningKey) -> Envelope:
    """Sign ``PAE(payload_type, payload)`` with ``key``; deterministic (Ed25519)."""
    if not isinstance(key, SigningKey):
        raise TypeError(f"key must be a SigningKey. Found {type(key).__name__}.")
    signature = key.sign(pae(payload_type, payload))
    return Envelope(payload, payload_type, (Signature(key.keyid, signature),))


@dataclass(frozen=True)
class Subject:
    """A bundle member named in the Statement: its name and lowercase hex SHA-256."""

    name: str
    sha256: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.sha256, str):
            raise TypeError("subject name and sha256 must be strings")
        if not self.name:
            raise ValueError("subject name must not be empty")
        if not _SHA256_HEX.match(self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits. Found {self.sha256!r}.")


@dataclass(frozen=True)
class Statement:
    """in-toto Statement v1 with fedbrain's artifact-manifest predicate."""

    subjects: tuple[Subject, ...]
    predicate: Mapping[str, object]
    predicate_type: str = PREDICATE_TYPE

    @classmethod
    def of(cls, subjects: Sequence[Subject], predicate: Mapping[str, object]) -> Statement:
        """Subjects are sorted by name; names must be unique."""
        ordered = tuple(sorted(subjects, key=lambda s: s.name))
        names = [s.name for s in ordered]
        if len(set(names)) != len(names):
            raise ValueError(f"subject names must be unique. Found {names}.")
        return cls(ordered, dict(predicate))

    def to_payload(self) -> bytes:
        """The payload bytes: RFC 8785 canonical JSON of the Statement."""
        return canonical_json(
            {
                "_type": STATEMENT_TYPE,
                "subject": [
                    {"name": s.name, "digest": {"sha256": s.sha256}} for s in self.subjects
                ],
                "predicateType": self.predicate_type,
                "predicate": dict(self.predicate),
            }
        )

    @classmethod
    def from_payload(cls, payload: bytes) -> Statement:
        """Parse a signed payload strictly.

        Raises ``JSONFormatError`` (duplicate keys, NaN), :class:`StatementError`, or
        :class:`PredicateTypeError`.
        """
        document = loads_strict(payload)
        if not isinstance(document, dict):
            raise StatementError("statement must be a JSON object")
        expected = {"_type", "subject", "predicateType", "predicate"}
        if set(document) != expected:
            raise StatementError(
                f"statement must have exactly {sorted(expected)}. Found {sorted(document)}."
            )
        if document["_type"] != STATEMENT_TYPE:
            raise StatementError(f"_type must be {STATEMENT_TYPE!r}. Found {document['_type']!r}.")
        if document["predicateType"] != PREDICATE_TYPE:
            raise PredicateTypeError(
                f"predicateType must be {PREDICATE_TYPE!r}. Found {document['predicateType']!r}."
            )
        predicate = document["predicate"]
        if not isinstance(predicate, dict):
            raise StatementError("predicate must be a JSON object")
        raw_subjects = document["subject"]
        if not isinstance(raw_subjects, list) or not raw_subjects:
            raise StatementError("subject must be a non-empty list")
        subjects: list[Subject] = []
        for entry in raw_subjects:
            if (
                not isinstance(entry, dict)
                or set(entry) != {"name", "digest"}
                or not isinstance(entry["digest"], dict)
                or set(entry["digest"]) != {"sha256"}
            ):
                raise StatementError(
                    'each subject must be {"name": ..., "digest": {"sha256": ...}} and nothing else'
                )
            try:
                subjects.append(Subject(entry["name"], entry["digest"]["sha256"]))
            except (TypeError, ValueError) as exc:
                raise StatementError(f"invalid subject: {exc}") from exc
        names = [s.name for s in subjects]
        if len(set(names)) != len(names):
            raise StatementError(f"subject names must be unique. Found {names}.")
        return cls(tuple(subjects), predicate, PREDICATE_TYPE)
