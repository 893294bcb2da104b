"""The artifact manifest: what a signed bundle says about its model, and where it came from.

The manifest is the in-toto Statement's predicate (see :mod:`manifests.dsse`) and is also written
as ``artifact_manifest.json``. Its file form is RFC 8785 canonical JSON (JCS), so the same
manifest always has the same bytes.

``created_at`` is the end of the run (``Provenance.finished_at``) or, failing that,
``SOURCE_DATE_EPOCH`` (https://reproducible-builds.org/specs/source-date-epoch/); never the wall
clock at build time, so rebuilding a bundle from the same inputs gives the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Final, Literal, Protocol, Self

import rfc8785
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    PlainSerializer,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from aggregation.privacy import PrivacyLevel as PrivacyLevel
from manifests.confighash import training_config_hash

__all__ = [
    "RFC3339_UTC_PATTERN",
    "SCHEMA_PATH",
    "DPParameters",
    "JSONFormatError",
    "Manifest",
    "Precision",
    "PrivacyLevel",
    "Provenance",
    "Reliability",
    "SecAggParameters",
    "SupportsManifestFields",
    "Versions",
    "build_manifest",
    "canonical_json",
    "loads_strict",
    "manifest_schema",
    "write_schema",
]

SCHEMA_PATH: Final = Path(__file__).parent / "schema" / "artifact_manifest.schema.json"
RFC3339_UTC_PATTERN: Final = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"

Precision = Literal["fp32", "fp16", "int8"]


# --------------------------------------------------------------------------- strict JSON


class JSONFormatError(ValueError):
    """A JSON document that fedbrain refuses to read (duplicate keys, NaN, bad syntax)."""


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise JSONFormatError(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> object:
    raise JSONFormatError(f"non-finite number {name} is not allowed in JSON")


def loads_strict(data: bytes) -> object:
    """Parse UTF-8 JSON, rejecting duplicate object keys and NaN/Infinity.

    Raises :class:`JSONFormatError` (a ``ValueError``) for any document that is not strict JSON.
    """
    if not isinstance(data, bytes):
        raise TypeError(f"data must be bytes. Found {type(data).__name__}.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JSONFormatError(f"JSON is not valid UTF-8: {exc}") from exc
    try:
        return json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except JSONFormatError:
        raise
    except json.JSONDecodeError as exc:
        raise JSONFormatError(f"invalid JSON: {exc}") from exc
    except RecursionError as exc:
        raise JSONFormatError("JSON is nested too deeply") from exc


def canonical_json(value: object) -> bytes:
    """RFC 8785 (JCS) canonical JSON bytes of ``value``; ``ValueError`` if it has none."""
    try:
        return rfc8785.dumps(value)  # type: ignore[arg-type]  # rfc8785 checks types itself
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(f"value cannot be canonicalized (RFC 8785): {exc}") from exc


# --------------------------------------------------------------------------- timestamps


def _to_utc_seconds(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must carry a time zone (RFC 3339, e.g. 2025-01-31T12:00:00Z)")
    return value.astimezone(UTC).replace(microsecond=0)


def _format_utc(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


UtcTimestamp = Annotated[
    datetime,
    AfterValidator(_to_utc_seconds),
    PlainSerializer(_format_utc, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": RFC3339_UTC_PATTERN}),
]
"""RFC 3339 timestamp in UTC with whole seconds (fractions are truncated, offsets converted)."""

_NonEmpty = Annotated[str, Field(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        protected_namespaces=(),
        populate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )


# --------------------------------------------------------------------------- provenance


class DPParameters(_Strict):
    """Differential privacy of the run: the unit, the mechanism and the final guarantee.

    ``noise_multiplier`` is sigma (noise standard deviation divided by ``clipping_norm``); the
    guarantee is (``epsilon``, ``delta``)-DP for one ``unit`` (a node's whole data for
    DP-FedAvg, one example for DP-SGD), as reported by ``accountant``. ``mechanism`` says who
    adds the noise and how (central Gaussian, distributed Skellam, per-node DP-SGD);
    ``sampling`` whether amplification by sampling was credited and why;
    ``metrics_noise_multiplier`` is the noise of every released metric sum. A claim with
    ``deterministic_noise`` true was made with noise derived from a public seed (tests only):
    it protects nothing and must not be relied on.
    """

    unit: Literal["node", "example"]
    clipping_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)
    accountant: _NonEmpty
    epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    mechanism: _NonEmpty = "unspecified"
    sampling: _NonEmpty = "unspecified"
    metrics_noise_multiplier: float | None = Field(default=None, gt=0)
    deterministic_noise: bool = False


class SecAggParameters(_Strict):
    """SecAgg+ parameters: ``neighbours`` (k of the k-regular graph), Shamir ``threshold``,
    the modulus 2^``modulus_bits`` of the masked sums and the quantization ``clipping_range``."""

    neighbours: int = Field(ge=1)
    threshold: int = Field(ge=1)
    modulus_bits: int = Field(ge=1, le=64)
    clipping_range: float = Field(gt=0)

    @model_validator(mode="after")
    def _threshold_fits_neighbourhood(self) -> Self:
        if self.threshold > self.neighbours + 1:
            raise ValueError(
                f"threshold must be at most neighbours + 1 = {self.neighbours + 1}. "
                f"Found {self.threshold}."
            )
        return self


class Reliability(_Strict):
    """The result-aggregator's final score in [0, 1] and its verdict."""

    score: float = Field(ge=0, le=1)
    verdict: Literal["accepted", "rejected"]


class Versions(_Strict):
    """Versions of the software that produced the artifact."""

    fedbrain: _NonEmpty
    flwr: _NonEmpty
    torch: _NonEmpty


class Provenance(_Strict):
    """Where the weights came from: the run, its rounds, its privacy and its reliability."""

    run_id: _NonEmpty
    run_name: _NonEmpty | None = None
    finished_at: UtcTimestamp | None = None
    rounds: int = Field(ge=0)
    participants_per_round: list[Annotated[int, Field(ge=0)]]
    dp: DPParameters | None = None
    secagg: SecAggParameters | None = None
    reliability: Reliability
    versions: Versions

    @model_validator(mode="after")
    def _one_participant_count_per_round(self) -> Self:
        if len(self.participants_per_round) != self.rounds:
            raise ValueError(
                f"participants_per_round must have one entry per round ({self.rounds}). "
                f"Found {len(self.participants_per_round)}."
            )
        return self

    @classmethod
    def load(cls, path: Path) -> Provenance:
        """Read a provenance JSON file (strict JSON; ``ValueError`` on any problem)."""
        if not isinstance(path, Path):
            raise TypeError(f"path must be a pathlib.Path. Found {type(path).__name__}.")
        data = loads_strict(path.read_bytes())
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"invalid provenance file {path}: {exc}") from exc


# --------------------------------------------------------------------------- manifest


class Manifest(_Strict):
    """``artifact_manifest.json``: the specification's metadata plus the run's provenance.

    ``base_checkpoint_digest``: the content digest (``clients.checkpoints.checkpoint_digest``)
    of the pretrained checkpoint the run fine-tuned, absent for a model trained from scratch;
    ``training_config`` then names the same digest (and its hash covers it). A bundle of
    adapters (``training_config.bundle_weights = "adapters"``) holds only the trained tensors
    and needs it: they rebuild the model on that base.
    """

    artifact_name: str = Field(
        min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
    )
    model_version: str = Field(pattern=r"^v[0-9]+$")
    base_model: _NonEmpty
    task: _NonEmpty
    embedding_dim: Annotated[int, Field(ge=1)] | None
    quantized: bool
    precision: Precision
    training_config_hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    train_data_tags: list[_NonEmpty]
    license: _NonEmpty
    created_at: UtcTimestamp
    node_type: _NonEmpty
    privacy_level: PrivacyLevel
    model_configuration: dict[str, JsonValue] = Field(alias="model_config")
    input_spec: dict[str, JsonValue]
    training_config: dict[str, JsonValue]
    base_checkpoint_digest: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    checkpoint_policy: dict[str, JsonValue]
    data_prep_profile: dict[str, JsonValue]
    provenance: Provenance

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems: list[str] = []
        expected = training_config_hash(self.training_config)
        if self.training_config_hash != expected:
            problems.append(
                f"training_config_hash is {self.training_config_hash} but training_config "
                f"hashes to {expected}"
            )
        recorded = self.training_config.get("base_checkpoint_digest")
        if recorded != self.base_checkpoint_digest:
            problems.append(
                f"base_checkpoint_digest is {self.base_checkpoint_digest} but training_config "
                f"names {recorded}"
            )
        if (
            self.training_config.get("bundle_weights") == "adapters"
            and self.base_checkpoint_digest is None
        ):
            problems.append("a bundle of adapters needs the base_checkpoint_digest of its base")
        for part, levels, present in (
            ("dp", ("dp", "dp+secure-agg"), self.provenance.dp is not None),
            ("secagg", ("secure-agg", "dp+secure-agg"), self.provenance.secagg is not None),
        ):
            wanted = self.privacy_level in levels
            if wanted != present:
                verb = "needs" if wanted else "must not carry"
                problems.append(f"privacy_level {self.privacy_level!r} {verb} provenance.{part}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_json_object(self) -> dict[str, JsonValue]:
        """The manifest as a JSON object (field names as in the file)."""
        data: dict[str, JsonValue] = self.model_dump(mode="json", by_alias=True)
        if data.get("base_checkpoint_digest") is None:  # from scratch: the manifest as before
            data.pop("base_checkpoint_digest", None)
        return data

    def canonical_bytes(self) -> bytes:
        """The file form: RFC 8785 canonical JSON, byte-stable."""
        return canonical_json(self.to_json_object())


def manifest_schema() -> dict[str, JsonValue]:
    """The JSON Schema of :class:`Manifest` (``additionalProperties: false`` on every model)."""
    schema: dict[str, JsonValue] = Manifest.model_json_schema(by_alias=True)
    return schema


class SupportsManifestFields(Protocol):
    """What :func:`build_manifest` needs from a job (``manifests.jobspec.JobSpec``)."""

    def manifest_fields(
        self, *, created_at: datetime, run_name: str | None = None
    ) -> dict[str, object]: ...


_JOB_FIELDS: Final = frozenset(
    {
        "artifact_name",
        "model_version",
        "base_model",
        "task",
        "embedding_dim",
        "quantized",
        "precision",
        "training_config_hash",
        "train_data_tags",
        "license",
        "node_type",
        "privacy_level",
        "model_config",
        "input_spec",
        "training_config",
        "base_checkpoint_digest",
        "checkpoint_policy",
        "data_prep_profile",
    }
)


def _created_at(provenance: Provenance, environ: Mapping[str, str]) -> datetime:
    if provenance.finished_at is not None:
        return provenance.finished_at
    raw = environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        raise ValueError(
            "created_at is unknown: set finished_at in the provenance file or SOURCE_DATE_EPOCH "
            "in the environment (the build never reads the wall clock)"
        )
    try:
        seconds = int(raw)
    except ValueError:
        raise ValueError(
            f"SOURCE_DATE_EPOCH must be whole seconds since 1970. Found {raw!r}."
        ) from None
    if seconds < 0:
        raise ValueError(f"SOURCE_DATE_EPOCH must not be negative. Found {seconds}.")
    return datetime.fromtimestamp(seconds, tz=UTC)


def build_manifest(
    job: SupportsManifestFields,
    provenance: Provenance,
    *,
    environ: Mapping[str, str] | None = None,
) -> Manifest:
    """Combine a job's manifest fields with the run's provenance.

    ``created_at`` is ``provenance.finished_at`` or ``SOURCE_DATE_EPOCH`` read from ``environ``
    (``os.environ`` when omitted). A run the result-aggregator rejected gets no manifest.
    """
    if not isinstance(provenance, Provenance):
        raise TypeError(f"provenance must be a Provenance. Found {type(provenance).__name__}.")
    if provenance.reliability.verdict != "accepted":
        raise ValueError(
            f"run {provenance.run_id} was rejected by the result-aggregator "
            f"(score {provenance.reliability.score}); no artifact is produced"
        )
    created_at = _created_at(provenance, os.environ if environ is None else environ)
    fields = job.manifest_fields(created_at=created_at, run_name=provenance.run_name)
    missing = sorted(_JOB_FIELDS - fields.keys())
    unexpected = sorted(fields.keys() - _JOB_FIELDS)
    if missing or unexpected:
        raise ValueError(
            f"job manifest fields do not match the manifest: missing {missing}, "
            f"unexpected {unexpected}"
        )
    try:
        return Manifest.model_validate(
            {**fields, "created_at": created_at, "provenance": provenance}
        )
    except ValidationError as exc:
        raise ValueError(f"invalid manifest: {exc}") from exc


def write_schema(path: Path = SCHEMA_PATH) -> None:
    """Export :func:`manifest_schema` (sorted keys, 2-space indent) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest_schema(), indent=2, sort_keys=True) + "\n", "utf-8")


if __name__ == "__main__":  # pragma: no cover - `python -m manifests.manifest` refreshes the schema
    write_schema()
