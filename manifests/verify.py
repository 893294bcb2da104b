"""Offline, strict verification of a signed artifact bundle.

The verifier reads the ZIP's end record and central directory first (names, types, declared
sizes, caps), then takes the members in name order: a member that is not stored
(compression method 0; canonical bundles never depend on a compressor, see
:mod:`manifests.bundle`) is rejected before any of its data is read, and a stored member is
streamed once, never past its declared size, hashed and CRC-checked. Size and ratio caps are
checked from the headers before the compression method, so a deflate bomb is reported as a zip
bomb; nothing is ever inflated. Nothing is extracted to disk; only the two JSON members and the
safetensors header are kept in memory.

Because bundles are reproducible, a valid bundle equals byte for byte the canonical ZIP rebuilt
from its verified members (headers, stored data, central directory and end record), so any
change anywhere in the file fails verification.

Trust comes only from the pinned :class:`manifests.keys.TrustedKeys`; the key must be unrevoked
and valid at the manifest's ``created_at`` (a bundle outlives its key's window; revocation is
what withdraws it, see "Keys over time" in :mod:`manifests.keys`), and ``created_at`` must not
lie after the verification time ``now`` when one is given.
"""

from __future__ import annotations

import functools
import hashlib
import json
import stat
import struct
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO, Final, Protocol, cast

import jsonschema  # type: ignore[import-untyped]  # no stubs; used through _SchemaValidator
from pydantic import JsonValue, ValidationError

from manifests import bundle as zipfmt
from manifests import keys
from manifests.confighash import training_config_hash
from manifests.dsse import (
    Envelope,
    EnvelopeError,
    PayloadTypeError,
    PredicateTypeError,
    Statement,
    StatementError,
    Subject,
)
from manifests.manifest import (
    SCHEMA_PATH,
    JSONFormatError,
    Manifest,
    canonical_json,
    loads_strict,
)

__all__ = [
    "CLOCK_SKEW",
    "BadSignatureError",
    "BundleVerificationError",
    "ConfigHashMismatchError",
    "CreatedInFutureError",
    "DigestMismatchError",
    "EnvelopeFormatError",
    "InvalidJSONError",
    "KeyExpiredError",
    "KeyNotTrustedError",
    "KeyRevokedError",
    "Limits",
    "MalformedBundleError",
    "ManifestMismatchError",
    "MemberSetError",
    "NonCanonicalBundleError",
    "PayloadTypeMismatchError",
    "PredicateTypeMismatchError",
    "SchemaViolationError",
    "UnsafeMemberError",
    "VerifiedBundle",
    "WeightsFormatError",
    "WeightsPickleError",
    "WeightsPrecisionError",
    "ZipBombError",
    "verify_bundle",
]


class BundleVerificationError(Exception):
    """The bundle failed verification; the message says why. Every failure is a subclass."""


class MalformedBundleError(BundleVerificationError):
    """Not a readable ZIP (bad records, CRC, truncated data, unsupported features)."""


class NonCanonicalBundleError(BundleVerificationError):
    """A readable ZIP that is not the canonical ZIP of its members (e.g. compressed members)."""


class UnsafeMemberError(BundleVerificationError):
    """Duplicate, case-colliding, absolute, ``..`` or backslash names; symlinks; non-files."""


class ZipBombError(BundleVerificationError):
    """Declared or actual sizes exceed the caps, or the compression ratio is implausible."""


class MemberSetError(BundleVerificationError):
    """Members and the signed ``subject`` list disagree, or a required member is missing."""


class DigestMismatchError(BundleVerificationError):
    """A member's SHA-256 differs from its signed subject digest."""


class InvalidJSONError(BundleVerificationError):
    """A JSON member or the payload has duplicate keys, NaN/Infinity or bad syntax."""


class CreatedInFutureError(BundleVerificationError):
    """The manifest claims a ``created_at`` after the verification time."""


class EnvelopeFormatError(BundleVerificationError):
    """The DSSE envelope or the in-toto Statement is malformed."""


class PayloadTypeMismatchError(EnvelopeFormatError):
    """payloadType is not ``application/vnd.in-toto+json``."""


class PredicateTypeMismatchError(EnvelopeFormatError):
    """predicateType is not fedbrain's artifact manifest."""


class BadSignatureError(BundleVerificationError):
    """The DSSE signature does not verify under the pinned key."""


class KeyNotTrustedError(BundleVerificationError):
    """The signing key is not in the trusted-keys file."""


class KeyRevokedError(BundleVerificationError):
    """The signing key is revoked in the trusted-keys file."""


class KeyExpiredError(BundleVerificationError):
    """created_at (or the verification time) lies outside the key's validity window."""


class ManifestMismatchError(BundleVerificationError):
    """``artifact_manifest.json`` differs from the signed predicate."""


class SchemaViolationError(BundleVerificationError):
    """The manifest violates the JSON Schema or the manifest's invariants."""


class ConfigHashMismatchError(BundleVerificationError):
    """training_config_hash is not the hash of training_config."""


class WeightsPickleError(BundleVerificationError):
    """The weights member is a pickle."""


class WeightsFormatError(BundleVerificationError):
    """The weights member is not a well-formed safetensors file."""


class WeightsPrecisionError(BundleVerificationError):
    """The safetensors dtypes disagree with the manifest's precision."""


CLOCK_SKEW: Final = timedelta(minutes=5)
"""How far a manifest's ``created_at`` may lie after the verification time (clock skew)."""


@dataclass(frozen=True)
class Limits:
    """Caps applied from the headers and again while streaming."""

    max_bundle_bytes: int = 4 * 1024**3
    max_total_uncompressed: int = 4 * 1024**3
    max_compression_ratio: int = 100
    max_members: int = 64
    max_json_member: int = 16 * 1024**2


@dataclass(frozen=True)
class VerifiedBundle:
    """Summary of a bundle that passed every check."""

    path: Path
    artifact_name: str
    keyid: str
    subjects: tuple[Subject, ...]
    manifest: Manifest = field(repr=False)


@dataclass(frozen=True)
class _Entry:
    name: str
    raw_name: bytes
    method: int
    crc: int
    csize: int
    usize: int
    offset: int


@dataclass
class _Streamed:
    sha256: str
    size: int
    content: bytes | None  # JSON members only
    head: bytes  # first bytes, for the safetensors header


class _SchemaError(Protocol):
    message: str
    absolute_path: Iterable[object]


class _SchemaValidator(Protocol):
    def iter_errors(self, instance: object) -> Iterator[_SchemaError]: ...


@functools.cache
def _schema_validator() -> _SchemaValidator:
    schema = json.loads(SCHEMA_PATH.read_text("utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator: _SchemaValidator = validator_class(schema)
    return validator


def _read_exact(handle: BinaryIO, offset: int, size: int, what: str) -> bytes:
    handle.seek(offset)
    data = handle.read(size)
    if len(data) != size:
        raise MalformedBundleError(f"bundle is truncated: {what} runs past the end of the file")
    return data


def _read_directory(handle: BinaryIO, size: int, limits: Limits) -> tuple[list[_Entry], int, bytes]:
    if size < zipfmt.EOCD_SIZE:
        raise MalformedBundleError("bundle is not a ZIP file (too short)")
    if size > limits.max_bundle_bytes:
        raise ZipBombError(f"bundle is {size} bytes; the limit is {limits.max_bundle_bytes}")
    eocd = _read_exact(handle, size - zipfmt.EOCD_SIZE, zipfmt.EOCD_SIZE, "end record")
    sig, disk, cd_disk, on_disk, count, cd_size, cd_offset, comment = struct.unpack(
        zipfmt.EOCD_FMT, eocd
    )
    if sig != zipfmt.EOCD_SIG or comment != 0:
        raise MalformedBundleError(
            "bundle is not a ZIP file ending in an end-of-central-directory record "
            "(archive comments are not allowed)"
        )
    if disk != 0 or cd_disk != 0 or on_disk != count:
        raise MalformedBundleError("multi-disk ZIP archives are not supported")
    if count == 0 or count > limits.max_members:
        raise MalformedBundleError(
            f"bundle has {count} members; it must have between 1 and {limits.max_members}"
        )
    if cd_offset + cd_size != size - zipfmt.EOCD_SIZE:
        raise MalformedBundleError("central directory does not end where the end record begins")
    directory = _read_exact(handle, cd_offset, cd_size, "central directory")
    entries: list[_Entry] = []
    position = 0
    for _ in range(count):
        if position + zipfmt.CENTRAL_SIZE > len(directory):
            raise MalformedBundleError("central directory is truncated")
        fields = struct.unpack_from(zipfmt.CENTRAL_FMT, directory, position)
        (csig, made_by, _, flags, method, _, _, crc, csize, usize, nlen, xlen, clen) = fields[:13]
        external, offset = fields[15], fields[16]
        if csig != zipfmt.CENTRAL_SIG:
            raise MalformedBundleError("central directory record has a bad signature")
        start = position + zipfmt.CENTRAL_SIZE
        raw_name = directory[start : start + nlen]
        position = start + nlen + xlen + clen
        if position > len(directory):
            raise MalformedBundleError("central directory is truncated")
        try:
            name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            raise UnsafeMemberError(f"member name {raw_name!r} is not valid UTF-8") from None
        if flags & 0x1:
            raise MalformedBundleError(f"member {name!r} is encrypted")
        mode = external >> 16
        if made_by >> 8 == 3 and stat.S_ISLNK(mode):
            raise UnsafeMemberError(f"member {name!r} is a symbolic link")
        kind = stat.S_IFMT(mode) if made_by >> 8 == 3 else 0
        if (kind and kind != stat.S_IFREG) or name.endswith("/"):
            raise UnsafeMemberError(f"member {name!r} is not a regular file")
        entries.append(_Entry(name, raw_name, method, crc, csize, usize, offset))
    if position != len(directory):
        raise MalformedBundleError("central directory has trailing bytes")
    return entries, cd_offset, directory


def _check_names_and_sizes(entries: list[_Entry], cd_offset: int, limits: Limits) -> None:
    seen: dict[str, str] = {}
    for entry in entries:
        if entry.name in seen.values():
            raise UnsafeMemberError(f"member name {entry.name!r} appears more than once")
        folded = entry.name.casefold()
        if folded in seen:
            raise UnsafeMemberError(
                f"member names {seen[folded]!r} and {entry.name!r} collide when letter case "
                "is ignored"
            )
        seen[folded] = entry.name
        try:
            zipfmt.check_member_name(entry.name)
        except ValueError as exc:
            raise UnsafeMemberError(str(exc)) from None
    total = sum(e.usize for e in entries)
    if total > limits.max_total_uncompressed:
        raise ZipBombError(
            f"members declare {total} bytes uncompressed; the limit is "
            f"{limits.max_total_uncompressed}"
        )
    for entry in entries:
        if entry.usize > limits.max_compression_ratio * max(entry.csize, 1):
            raise ZipBombError(
                f"member {entry.name!r} declares a compression ratio above "
                f"{limits.max_compression_ratio}:1 ({entry.usize} from {entry.csize} bytes)"
            )
        if entry.offset + zipfmt.LOCAL_SIZE + entry.csize > cd_offset:
            raise MalformedBundleError(f"member {entry.name!r} runs into the central directory")


def _stream_member(
    handle: BinaryIO, entry: _Entry, keep: bool, budget: int, limits: Limits
) -> _Streamed:
    """Read one stored member, never more than its declared size; hash it; check its CRC-32."""
    header = _read_exact(handle, entry.offset, zipfmt.LOCAL_SIZE + len(entry.raw_name), "header")
    if header != zipfmt.local_header(entry.raw_name, entry.crc, entry.csize, entry.usize):
        raise NonCanonicalBundleError(
            f"local header of member {entry.name!r} is not canonical (or disagrees with the "
            "central directory)"
        )
    digest = hashlib.sha256()
    crc, produced = 0, 0
    content = bytearray()
    head = bytearray()
    head_cap = 8 + zipfmt.MAX_SAFETENSORS_HEADER
    cap = min(entry.usize, budget)

    remaining = entry.csize
    while remaining:
        # Stored data is the member itself: read at most one byte past the cap, so a member
        # whose data outruns its declared size is caught without reading the rest of it.
        chunk = handle.read(min(zipfmt.CHUNK, remaining, cap - produced + 1))
        if not chunk:
            raise MalformedBundleError(f"member {entry.name!r} is truncated")
        remaining -= len(chunk)
        produced += len(chunk)
        if produced > cap:
            raise ZipBombError(
                f"member {entry.name!r} holds more than its declared size of {entry.usize} bytes"
                if produced > entry.usize
                else "members hold more than the total uncompressed-size limit"
            )
        crc = zlib.crc32(chunk, crc)
        digest.update(chunk)
        if keep:
            content.extend(chunk)
        if len(head) < head_cap:
            head.extend(chunk[: head_cap - len(head)])
    if produced != entry.usize:
        raise MalformedBundleError(
            f"member {entry.name!r} holds {produced} bytes, not the declared {entry.usize}"
        )
    if crc != entry.crc:
        raise MalformedBundleError(f"member {entry.name!r} fails its CRC-32 check")
    return _Streamed(digest.hexdigest(), produced, bytes(content) if keep else None, bytes(head))


def _read_members(handle: BinaryIO, size: int, limits: Limits) -> dict[str, _Streamed]:
    entries, cd_offset, directory = _read_directory(handle, size, limits)
    _check_names_and_sizes(entries, cd_offset, limits)
    names = {e.name for e in entries}
    for required in (zipfmt.WEIGHTS_MEMBER, zipfmt.MANIFEST_MEMBER, zipfmt.ENVELOPE_MEMBER):
        if required not in names:
            raise MemberSetError(f"bundle has no {required!r} member")
    ordered = sorted(entries, key=lambda e: e.name)
    streamed: dict[str, _Streamed] = {}
    offset, budget = 0, limits.max_total_uncompressed
    for entry in ordered:
        if entry.offset != offset:
            raise NonCanonicalBundleError(
                "members are not stored contiguously in name order (canonical layout)"
            )
        keep = entry.name in (zipfmt.MANIFEST_MEMBER, zipfmt.ENVELOPE_MEMBER)
        if keep and entry.usize > limits.max_json_member:
            raise ZipBombError(
                f"member {entry.name!r} is {entry.usize} bytes; JSON members are limited to "
                f"{limits.max_json_member}"
            )
        if entry.method != zipfmt.METHOD_STORED:
            raise NonCanonicalBundleError(
                f"member {entry.name!r} uses compression method {entry.method}; fedbrain "
                "bundles store members uncompressed"
            )
        streamed[entry.name] = _stream_member(handle, entry, keep, budget, limits)
        budget -= entry.usize
        offset += zipfmt.LOCAL_SIZE + len(entry.raw_name) + entry.csize
    if cd_offset != offset:
        raise NonCanonicalBundleError("bytes between the last member and the central directory")
    canonical_directory = b"".join(
        zipfmt.central_header(e.raw_name, e.crc, e.csize, e.usize, e.offset) for e in ordered
    )
    if directory != canonical_directory:
        raise NonCanonicalBundleError(
            "central directory is not canonical (order, attributes, extra fields or comments)"
        )
    eocd = _read_exact(handle, size - zipfmt.EOCD_SIZE, zipfmt.EOCD_SIZE, "end record")
    if eocd != zipfmt.end_of_central_directory(len(ordered), len(directory), cd_offset):
        raise NonCanonicalBundleError("end-of-central-directory record is not canonical")
    return streamed


def _json_error(what: str, exc: JSONFormatError) -> InvalidJSONError:
    return InvalidJSONError(f"{what}: {exc}")


def _check_manifest(manifest_bytes: bytes, predicate: dict[str, object]) -> Manifest:
    try:
        on_file = loads_strict(manifest_bytes)
    except JSONFormatError as exc:
        raise _json_error(zipfmt.MANIFEST_MEMBER, exc) from None
    try:
        signed = canonical_json(predicate)
    except ValueError as exc:
        raise SchemaViolationError(f"signed predicate is not canonical JSON: {exc}") from None
    if manifest_bytes != signed:
        detail = "content" if on_file != predicate else "bytes"
        raise ManifestMismatchError(
            f"{zipfmt.MANIFEST_MEMBER} differs from the signed predicate ({detail})"
        )
    errors = sorted(
        _schema_validator().iter_errors(predicate), key=lambda e: [str(p) for p in e.absolute_path]
    )
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(root)"
        raise SchemaViolationError(f"manifest violates the schema at {where}: {first.message}")
    training_config = predicate["training_config"]
    declared = predicate["training_config_hash"]
    if not isinstance(training_config, dict):  # guaranteed by the schema; keeps mypy exact
        raise SchemaViolationError("manifest training_config must be an object")
    actual = training_config_hash(cast(dict[str, JsonValue], training_config))
    if declared != actual:
        raise ConfigHashMismatchError(
            f"training_config_hash is {declared} but training_config hashes to {actual}"
        )
    try:
        manifest = Manifest.model_validate(predicate)
    except ValidationError as exc:
        raise SchemaViolationError(f"manifest is invalid: {exc}") from None
    if manifest.canonical_bytes() != manifest_bytes:
        raise SchemaViolationError("manifest is not in canonical form (normalized fields differ)")
    return manifest


def verify_bundle(
    path: Path,
    trusted_keys: keys.TrustedKeys,
    *,
    now: datetime | None = None,
    limits: Limits | None = None,
) -> VerifiedBundle:
    """Verify a bundle against pinned keys; return its summary or raise.

    Raises a :class:`BundleVerificationError` subclass naming the first problem found.
    The key must be pinned, not revoked, and valid at the manifest's ``created_at``; its window
    may have ended since (see "Keys over time" in :mod:`manifests.keys`). ``now``
    (timezone-aware), the verification time, refuses a manifest created after it (beyond
    :data:`CLOCK_SKEW`).
    """
    if not isinstance(path, Path):
        raise TypeError(f"path must be a pathlib.Path. Found {type(path).__name__}.")
    if not isinstance(trusted_keys, keys.TrustedKeys):
        raise TypeError(f"trusted_keys must be TrustedKeys. Found {type(trusted_keys).__name__}.")
    if now is not None and (not isinstance(now, datetime) or now.tzinfo is None):
        raise TypeError("now must be a timezone-aware datetime")
    limits = limits or Limits()
    try:
        with path.open("rb") as handle:
            streamed = _read_members(handle, path.stat().st_size, limits)
    except OSError as exc:
        raise MalformedBundleError(f"cannot read bundle {path}: {exc.strerror or exc}") from None

    envelope_bytes = streamed[zipfmt.ENVELOPE_MEMBER].content or b""
    try:
        envelope = Envelope.from_json(envelope_bytes)
    except JSONFormatError as exc:
        raise _json_error(zipfmt.ENVELOPE_MEMBER, exc) from None
    except PayloadTypeError as exc:
        raise PayloadTypeMismatchError(str(exc)) from None
    except EnvelopeError as exc:
        raise EnvelopeFormatError(f"{zipfmt.ENVELOPE_MEMBER}: {exc}") from None
    if len(envelope.signatures) != 1:
        raise EnvelopeFormatError(
            f"envelope must carry exactly one signature. Found {len(envelope.signatures)}."
        )
    keyid = envelope.signatures[0].keyid
    try:
        pinned = trusted_keys.lookup(keyid)
    except keys.UntrustedKeyError as exc:
        raise KeyNotTrustedError(str(exc)) from None
    if pinned.revoked:
        raise KeyRevokedError(f"key {keyid} is revoked in the trusted-keys file")
    try:
        envelope.verify(pinned.public_key)
    except keys.SignatureMismatchError as exc:
        raise BadSignatureError(str(exc)) from None

    try:
        statement = Statement.from_payload(envelope.payload)
    except JSONFormatError as exc:
        raise _json_error("signed payload", exc) from None
    except PredicateTypeError as exc:
        raise PredicateTypeMismatchError(str(exc)) from None
    except StatementError as exc:
        raise EnvelopeFormatError(f"signed payload: {exc}") from None

    covered = set(streamed) - {zipfmt.MANIFEST_MEMBER, zipfmt.ENVELOPE_MEMBER}
    signed_names = {s.name for s in statement.subjects}
    for name in sorted(covered - signed_names):
        raise MemberSetError(f"member {name!r} is in the bundle but not in the signed subject")
    for name in sorted(signed_names - covered):
        raise MemberSetError(f"signed subject {name!r} is not a covered member of the bundle")
    for subject in statement.subjects:
        actual = streamed[subject.name].sha256
        if actual != subject.sha256:
            raise DigestMismatchError(
                f"member {subject.name!r} has sha256 {actual} but the signature says "
                f"{subject.sha256}"
            )

    manifest = _check_manifest(
        streamed[zipfmt.MANIFEST_MEMBER].content or b"", dict(statement.predicate)
    )
    try:
        pinned.check_usable_at(manifest.created_at, what="created_at")
    except keys.ExpiredKeyError as exc:
        raise KeyExpiredError(str(exc)) from None
    if now is not None and manifest.created_at > now + CLOCK_SKEW:
        raise CreatedInFutureError(
            f"the manifest's created_at {keys.format_timestamp(manifest.created_at)} is after "
            f"the verification time {keys.format_timestamp(now)}"
        )

    weights = streamed[zipfmt.WEIGHTS_MEMBER]
    try:
        tensors = zipfmt.parse_safetensors_header(weights.head, weights.size)
        zipfmt.check_precision(tensors, manifest.precision)
    except zipfmt.PickledWeightsError as exc:
        raise WeightsPickleError(f"{zipfmt.WEIGHTS_MEMBER}: {exc}") from None
    except zipfmt.PrecisionMismatchError as exc:
        raise WeightsPrecisionError(f"{zipfmt.WEIGHTS_MEMBER}: {exc}") from None
    except zipfmt.WeightsError as exc:
        raise WeightsFormatError(f"{zipfmt.WEIGHTS_MEMBER}: {exc}") from None
    return VerifiedBundle(path, manifest.artifact_name, keyid, statement.subjects, manifest)
