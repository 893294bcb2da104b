"""The job spec: the learning form's parameters plus the federation settings, validated.

Front doors (all raise :class:`JobSpecError` listing *every* problem, one
``"field: problem. Found X."`` line each, never pydantic's own format):

- :func:`load_job` -- a TOML or JSON file; form names at the top level, federation settings
  in the ``[federation]``, ``[dp]`` and ``[secagg]`` tables;
- :meth:`JobSpec.from_mapping` -- a (possibly dotted-key) mapping;
- :meth:`JobSpec.from_flags` -- CLI values over a base mapping (``None`` = not given);
- :meth:`JobSpec.from_run_config` / :meth:`JobSpec.to_run_config` -- a Flower run config
  (flat ``str -> bool | int | float | str``; tables flattened with dotted keys as
  ``flwr.common.config.flatten_dict`` does; lists as comma-separated strings).

Decisions:

- No silent coercion: whole-number fields take integers only (not ``true``, ``"3"`` or
  ``3.0``), number fields take integers or floats (not ``true`` or ``"0.1"``), and ``quantize``
  takes ``true``, ``false`` or ``"int8"`` only (not ``"yes"`` or ``1``). Flower run configs are
  typed (bools, ints, floats, text), so :meth:`JobSpec.to_run_config` and
  :meth:`JobSpec.from_run_config` round-trip; only the list fields travel as comma-separated
  text.
- A model too large for this machine is refused up front with its parameter and memory
  estimate (:mod:`manifests.modelsize`), before anything is built.
- ``quantize`` means post-training int8 quantization. ``quantize = "int8"`` is
  ``quantize = true`` + ``precision = "int8"``; ``quantize = true`` without a precision
  implies ``precision = "int8"``; ``quantize = true`` with ``fp32``/``fp16`` is an error (the
  result would be int8); ``precision = "int8"`` implies ``quantize = true``, and contradicting
  it with ``quantize = false`` is an error. Hence ``quantize`` is true exactly when
  ``precision`` is int8, and the name carries ``-int8``.
- ``artifact_name`` defaults to the catalog naming rule (:mod:`manifests.naming`), which is
  what the specification's mapping examples produce from a form without a name.
  ``artifact_naming = "run"`` asks for the generated run-scoped name
  ``{node_type}.{component}.{variant}.{run_name}.{timestamp}`` instead (``run_name`` defaults
  to ``"run"``).
- ``node_type`` defaults to the catalog entry's node type; a different one is an error.
- Fine-tuning from a pretrained base: ``base_checkpoint`` is the absolute path of a local
  Hugging Face folder (``config.json`` + safetensors) that the server and every node hold at
  that path, or ``demo`` (:data:`DEMO_BASE`: the project's deterministic demo base of the job's
  family, which ``fedbrain simulate`` generates and substitutes before signing the job; a
  server or node refuses a job still naming ``demo``). ``adaptation`` (``full`` / ``lora`` /
  ``head``) says what trains and travels; ``lora`` and ``head`` need a base (the frozen weights
  must be the same everywhere). ``lora_rank`` / ``lora_alpha`` (default 8 / 16) apply to
  ``lora`` only. ``bundle_weights``: ``merged`` (every weight, adapters folded in) or
  ``adapters`` (the trained tensors alone, with the base's digest in the manifest).
  :meth:`JobSpec.training_config` covers them all, the base by its content digest (not its
  path, which is machine-specific).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Self, TypeAlias, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from aggregation.privacy import DpUnit as DpUnit
from aggregation.privacy import PrivacyLevel as PrivacyLevel
from manifests import catalog
from manifests.catalog import CatalogEntry, Component, NodeType, NotTrainableError, Task
from manifests.confighash import JsonValue, training_config_hash
from manifests.naming import ArtifactName, Quantization, generated_name

RunConfigValue: TypeAlias = bool | int | float | str


class Precision(StrEnum):
    """Numeric precision of the artifact's weights."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Optimizer(StrEnum):
    """Client (local) optimizer."""

    SGD = "sgd"
    ADAM = "adam"
    ADAMW = "adamw"


class Sampling(StrEnum):
    """How a round's nodes are chosen.

    ``uniform`` / ``poisson``: the server draws them (it knows who took part, so the
    accountant credits no amplification by sampling). ``secret``: the server draws a cohort
    (``clients_per_round``, or every eligible node) and each cohort node includes its data with
    probability ``fraction`` from its own CSPRNG -- a node that does not include it contributes
    zeros and its noise share, so the server cannot tell who did (secure aggregation levels
    only); the accountant then credits Poisson amplification at rate ``fraction``.
    """

    UNIFORM = "uniform"
    POISSON = "poisson"
    SECRET = "secret"  # noqa: S105 -- a sampling method, not a password


class ServerOptimizer(StrEnum):
    """How the server applies the aggregated update."""

    FEDAVG = "fedavg"
    FEDADAM = "fedadam"


class RobustAggregation(StrEnum):
    """Aggregation rule over individual updates (only ``mean`` works on a secure sum)."""

    MEAN = "mean"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed-mean"
    KRUM = "krum"


class Adaptation(StrEnum):
    """Which weights fine-tuning trains -- and so which the nodes send, clip, mask and noise.

    ``full``: every weight. ``lora``: low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank
    Adaptation of Large Language Models", arXiv:2106.09685) on the attention and MLP linears,
    plus an encoder's heads; the backbone stays frozen. ``head``: only the heads (encoders:
    projection and classifier; GPT-2: the final layer norm and the tied byte embedding / LM
    head).
    """

    FULL = "full"
    LORA = "lora"
    HEAD = "head"


class BundleWeights(StrEnum):
    """What the bundle's ``model.safetensors`` holds: every weight with any adapters folded in
    (``merged``), or only the trained tensors (``adapters``), which rebuild the model on the
    base checkpoint whose digest the manifest records."""

    MERGED = "merged"
    ADAPTERS = "adapters"


DEMO_BASE = "demo"
"""``base_checkpoint`` value naming the project's deterministic demo base of the job's family
(``clients.pretrain``); ``fedbrain simulate`` replaces it by the generated folder."""
DEFAULT_LORA_RANK = 8
DEFAULT_LORA_ALPHA = 16


class ArtifactNaming(StrEnum):
    """Which name a job without ``artifact_name`` gets."""

    CATALOG = "catalog"
    RUN = "run"


class JobSpecError(ValueError):
    """An invalid job spec; ``problems`` holds one actionable line per problem."""

    def __init__(self, problems: list[str] | tuple[str, ...]) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        header = f"Invalid job spec ({count} problem{'s' if count != 1 else ''}):"
        ValueError.__init__(self, "\n".join([header, *(f"- {p}" for p in self.problems)]))


class NotTrainableJobError(JobSpecError, NotTrainableError):
    """An invalid job spec one of whose problems is an artifact fedbrain cannot train."""


class _CrossFieldProblemsError(ValueError):
    def __init__(self, problems: list[str], *, not_trainable: bool) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems
        self.not_trainable = not_trainable


_FROZEN = ConfigDict(
    extra="forbid", frozen=True, allow_inf_nan=False, protected_namespaces=(), strict=False
)


class FederationSettings(BaseModel):
    """Rounds, sampling, server optimizer, robust aggregation, reliability threshold."""

    model_config = _FROZEN

    num_rounds: StrictInt = Field(3, ge=1)
    clients_per_round: StrictInt | None = Field(None, ge=1)
    fraction: StrictFloat | None = Field(None, gt=0, le=1)
    sampling: Sampling = Sampling.UNIFORM
    reliability_threshold: StrictFloat = Field(0.5, ge=0, le=1)
    server_optimizer: ServerOptimizer = ServerOptimizer.FEDAVG
    server_learning_rate: StrictFloat = Field(1.0, gt=0)
    robust_aggregation: RobustAggregation = RobustAggregation.MEAN


class DpSettings(BaseModel):
    """Differential privacy: unit, clipping norm C, noise multiplier sigma (std = sigma * C)
    or a target (epsilon, delta) to calibrate sigma for, and the epsilon budget.

    ``metrics_noise_multiplier``: the noise multiplier of every released metric sum (loss,
    accuracy, counts; each unit's metric row has L2 norm <= 1). ``planned_dropout``: the
    fraction of a round's nodes that may drop while the survivors' distributed noise still
    meets the target (``dp+secure-agg``): each node adds the share of ``floor(N (1 - p))``
    survivors, and refuses to unmask a sum of fewer."""

    model_config = _FROZEN

    unit: DpUnit = DpUnit.NODE
    clipping_norm: StrictFloat | None = Field(None, gt=0)
    noise_multiplier: StrictFloat | None = Field(None, gt=0)
    target_epsilon: StrictFloat | None = Field(None, gt=0)
    delta: StrictFloat | None = Field(None, gt=0, lt=1)
    epsilon_budget: StrictFloat | None = Field(None, gt=0)
    metrics_noise_multiplier: StrictFloat = Field(5.0, gt=0)
    planned_dropout: StrictFloat = Field(0.2, ge=0, le=0.5)


class SecAggSettings(BaseModel):
    """SecAgg+: neighbours per client (k; None = all), Shamir threshold, quantization."""

    model_config = _FROZEN

    num_neighbours: StrictInt | None = Field(None, ge=1)
    reconstruction_threshold: StrictInt | None = Field(None, ge=2)
    quantization_bits: StrictInt = Field(32, ge=1, le=32)
    quantization_range: StrictFloat | None = Field(None, gt=0)


_LIST_FIELDS = ("augmentations", "train_data_tags")
_SECTIONS: dict[str, type[BaseModel]] = {
    "federation": FederationSettings,
    "dp": DpSettings,
    "secagg": SecAggSettings,
}


class JobSpec(BaseModel):
    """Every learning-form parameter plus the federation settings (frozen, validated)."""

    model_config = _FROZEN

    component: Component
    base_model: str
    task: Task
    embedding_dim: StrictInt | None = Field(None, ge=1)
    hidden_size: StrictInt | None = Field(None, ge=1)
    num_layers: StrictInt | None = Field(None, ge=1)
    num_heads: StrictInt | None = Field(None, ge=1)
    max_seq_length: StrictInt | None = Field(None, ge=1)
    sample_rate: StrictInt | None = Field(None, ge=1)
    input_size: StrictInt | None = Field(None, ge=1)
    batch_size: StrictInt = Field(32, ge=1)
    learning_rate: StrictFloat = Field(1e-3, gt=0)
    optimizer: Optimizer = Optimizer.ADAMW
    epochs: StrictInt = Field(1, ge=1)
    weight_decay: StrictFloat = Field(0.0, ge=0)
    precision: Precision = Precision.FP32
    quantize: StrictBool = False
    checkpoint_interval: StrictInt = Field(1, ge=1)
    base_checkpoint: str | None = Field(None, min_length=1, max_length=4096)
    adaptation: Adaptation = Adaptation.FULL
    lora_rank: StrictInt | None = Field(None, ge=1, le=4096)
    lora_alpha: StrictInt | None = Field(None, ge=1, le=65536)
    bundle_weights: BundleWeights = BundleWeights.MERGED
    augmentations: tuple[str, ...] = ()
    preprocessing_profile: str | None = Field(None, min_length=1)
    train_data_tags: tuple[str, ...] = ()
    privacy_level: PrivacyLevel = PrivacyLevel.NONE
    artifact_name: str | None = None
    artifact_naming: ArtifactNaming = ArtifactNaming.CATALOG
    node_type: NodeType | None = None
    model_version: StrictInt = Field(1, ge=1)
    license: str = Field("Apache-2.0", min_length=1, max_length=64)
    run_name: str | None = Field(None, min_length=1, max_length=64)
    federation: FederationSettings = Field(default_factory=FederationSettings)
    dp: DpSettings = Field(default_factory=DpSettings)
    secagg: SecAggSettings = Field(default_factory=SecAggSettings)

    # ----------------------------------------------------------------- validation

    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: object) -> object:
        if not isinstance(data, Mapping):
            return data
        values = dict(data)
        quantize = values.get("quantize")
        if isinstance(quantize, str) and quantize.strip().lower() in set(Quantization):
            values["quantize"] = True
            values.setdefault("precision", quantize.strip().lower())
        elif quantize is True:
            values.setdefault("precision", Precision.INT8.value)
        if "quantize" not in values and values.get("precision") == Precision.INT8:
            values["quantize"] = True
        if values.get("node_type") is None:
            try:
                entry = catalog.resolve_training_target(
                    str(values.get("component")),
                    str(values.get("base_model")),
                    str(values.get("task")),
                )
            except NotTrainableError:
                pass
            else:
                values["node_type"] = entry.node_type.value
        return values

    @field_validator(*_LIST_FIELDS, mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator(*_LIST_FIELDS)
    @classmethod
    def _check_list_items(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            if not item.strip() or "," in item or item != item.strip():
                raise ValueError(
                    "items must be non-empty, without commas or surrounding spaces. "
                    f"Found {item!r}."
                )
        return value

    @field_validator("base_model")
    @classmethod
    def _check_base_model(cls, value: str) -> str:
        if not catalog_base_model_ok(value):
            raise ValueError(
                "must be lowercase letters and digits in words joined by single hyphens "
                f"(e.g. vit-base16). Found {value!r}."
            )
        return value

    @field_validator("base_checkpoint")
    @classmethod
    def _check_base_checkpoint(cls, value: str | None) -> str | None:
        if value is None or value == DEMO_BASE:
            return value
        if (
            value != value.strip()
            or not value.isprintable()
            or "://" in value
            or not Path(value).is_absolute()
            or value.endswith(".safetensors")
        ):
            raise ValueError(
                "must be the absolute path of a local Hugging Face folder (config.json + "
                "safetensors) that the server and every node hold, or demo (the demo base "
                f"`fedbrain simulate` generates); nothing is downloaded. Found {value!r}."
            )
        return value

    @field_validator("license")
    @classmethod
    def _check_license(cls, value: str) -> str:
        if value != value.strip() or not value.isprintable():
            raise ValueError(f"must be an SPDX identifier such as Apache-2.0. Found {value!r}.")
        return value

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, value: str | None) -> str | None:
        if value is not None and not any(c.isascii() and c.isalnum() for c in value):
            raise ValueError(f"must contain a letter or digit. Found {value!r}.")
        return value

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Self:
        # imported here, not at the top: the rules import JobSpec
        from manifests.jobspec_rules import _cross_field_problems

        context = info.context if isinstance(info.context, Mapping) else {}
        broken = frozenset(cast(frozenset[str], context.get("broken", frozenset())))
        problems, not_trainable = _cross_field_problems(self, broken)
        if problems:
            raise _CrossFieldProblemsError(problems, not_trainable=not_trainable)
        return self

    # ----------------------------------------------------------------- constructors

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> JobSpec:
        """Validate a job given as a mapping (nested tables or dotted keys)."""
        # imported here, not at the top: the error translation imports JobSpec
        from manifests.jobspec_errors import _describe, _loc_key, _raise, _split_errors

        values = _unflatten(data)
        try:
            return cls.model_validate(values, context={"broken": frozenset()})
        except ValidationError as exc:
            field_errors, cross = _split_errors(exc)
        if not field_errors and cross is not None:
            _raise(cross.problems, not_trainable=cross.not_trainable)
        broken = frozenset(_loc_key(err["loc"]) for err in field_errors)
        lines = [_describe(err) for err in field_errors]
        not_trainable = False
        partial = _partial(values, field_errors)
        if partial is not None:
            try:
                cls.model_validate(partial, context={"broken": broken})
            except ValidationError as exc2:
                _, cross2 = _split_errors(exc2)
                if cross2 is not None:
                    lines.extend(cross2.problems)
                    not_trainable = cross2.not_trainable
        _raise(lines, not_trainable=not_trainable)

    @classmethod
    def from_flags(
        cls, flags: Mapping[str, object], *, base: Mapping[str, object] | None = None
    ) -> JobSpec:
        """Validate CLI values (``None`` = not given; dotted keys allowed) over ``base``."""
        merged = _deep_merge(
            _unflatten(base or {}), _unflatten({k: v for k, v in flags.items() if v is not None})
        )
        return cls.from_mapping(merged)

    @classmethod
    def from_run_config(
        cls, run_config: Mapping[str, RunConfigValue], *, prefix: str | None = None
    ) -> JobSpec:
        """Validate a Flower run config (flat, dotted keys, lists as comma strings).

        With ``prefix`` (e.g. ``"job"``) only keys under ``"<prefix>."`` are read, so the
        job can share a run config with other settings.
        """
        if prefix is None:
            selected = dict(run_config)
        else:
            head = f"{prefix}."
            selected = {
                k.removeprefix(head): v for k, v in run_config.items() if k.startswith(head)
            }
        return cls.from_mapping(selected)

    def to_run_config(self, *, prefix: str | None = None) -> dict[str, RunConfigValue]:
        """This job as a Flower run config; :meth:`from_run_config` reads it back."""
        flat: dict[str, RunConfigValue] = {}
        head = f"{prefix}." if prefix else ""

        def walk(values: Mapping[str, object], path: str) -> None:
            for key, value in values.items():
                if value is None:
                    continue
                if isinstance(value, Mapping):
                    walk(cast(Mapping[str, object], value), f"{path}{key}.")
                elif isinstance(value, list | tuple):
                    flat[f"{head}{path}{key}"] = ",".join(str(v) for v in value)
                else:
                    flat[f"{head}{path}{key}"] = cast(RunConfigValue, value)

        walk(self.model_dump(mode="json"), "")
        return flat

    # ----------------------------------------------------------------- derived values

    @property
    def catalog_entry(self) -> CatalogEntry:
        """The catalog artifact this job trains (or derives from)."""
        return catalog.resolve_training_target(self.component, self.base_model, self.task)

    @property
    def resolved_node_type(self) -> NodeType:
        """``node_type``, defaulting to the catalog entry's."""
        return self.node_type or self.catalog_entry.node_type

    @property
    def rule_name(self) -> ArtifactName:
        """The catalog-rule name of this job's artifact."""
        return ArtifactName.for_form(
            component=self.component,
            base_model=self.base_model,
            purpose=self.task,
            quantization=Quantization.INT8 if self.quantize else None,
            version=self.model_version,
        )

    def resolve_artifact_name(self, *, created_at: datetime, run_name: str | None = None) -> str:
        """``artifact_name`` if given; else the rule name, or the run-scoped generated name."""
        if self.artifact_name is not None:
            return self.artifact_name
        if self.artifact_naming is ArtifactNaming.CATALOG:
            return str(self.rule_name)
        return generated_name(
            node_type=self.resolved_node_type,
            model_category=self.component,
            model_variant=self.rule_name.variant,
            run_name=run_name or self.run_name or "run",
            created_at=created_at,
        )

    @property
    def resolved_lora_rank(self) -> int:
        """``lora_rank``, or :data:`DEFAULT_LORA_RANK`."""
        return self.lora_rank or DEFAULT_LORA_RANK

    @property
    def resolved_lora_alpha(self) -> int:
        """``lora_alpha``, or :data:`DEFAULT_LORA_ALPHA`."""
        return self.lora_alpha or DEFAULT_LORA_ALPHA

    def training_config(self, *, base_digest: str | None = None) -> dict[str, JsonValue]:
        """The settings hashed into ``training_config_hash``.

        Fine-tuning settings appear when they differ from a from-scratch full training (so a
        job without them hashes as before): ``base_checkpoint_digest`` -- the base's content
        digest ``base_digest``, which whoever reads the folder computes (the server, at the
        start of a run; ``None`` in a preview that has not read it) --, ``adaptation``, the
        LoRA rank and alpha, and ``bundle_weights``.
        """
        if base_digest is not None and self.base_checkpoint is None:
            raise ValueError("base_digest is given, but the job names no base_checkpoint.")
        config: dict[str, JsonValue] = {
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "optimizer": self.optimizer.value,
            "epochs": self.epochs,
            "weight_decay": self.weight_decay,
        }
        if self.base_checkpoint is not None:
            config["base_checkpoint_digest"] = base_digest
        if self.adaptation is not Adaptation.FULL:
            config["adaptation"] = self.adaptation.value
        if self.adaptation is Adaptation.LORA:
            config["lora_rank"] = self.resolved_lora_rank
            config["lora_alpha"] = self.resolved_lora_alpha
        if self.bundle_weights is not BundleWeights.MERGED:
            config["bundle_weights"] = self.bundle_weights.value
        return config

    def manifest_fields(
        self,
        *,
        created_at: datetime,
        run_name: str | None = None,
        base_digest: str | None = None,
    ) -> dict[str, object]:
        """The manifest fields that come from the learning form (plain JSON values);
        ``base_digest``: the content digest of the job's base checkpoint (see
        :meth:`training_config`)."""
        training_config = self.training_config(base_digest=base_digest)
        model_config = {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
        }
        input_spec = {
            "max_seq_length": self.max_seq_length,
            "sample_rate": self.sample_rate,
            "input_size": self.input_size,
        }
        return {
            "artifact_name": self.resolve_artifact_name(created_at=created_at, run_name=run_name),
            "model_version": f"v{self.model_version}",
            "base_model": self.base_model,
            "task": self.task.value,
            "embedding_dim": self.embedding_dim,
            "quantized": self.quantize,
            "precision": self.precision.value,
            "training_config_hash": training_config_hash(training_config),
            "train_data_tags": list(self.train_data_tags),
            "license": self.license,
            "node_type": self.resolved_node_type.value,
            "privacy_level": self.privacy_level.value,
            "model_config": {k: v for k, v in model_config.items() if v is not None},
            "input_spec": {k: v for k, v in input_spec.items() if v is not None},
            "training_config": training_config,
            "base_checkpoint_digest": base_digest,
            "checkpoint_policy": {"interval_rounds": self.checkpoint_interval},
            "data_prep_profile": {
                "augmentations": list(self.augmentations),
                "preprocessing_profile": self.preprocessing_profile,
            },
        }


def catalog_base_model_ok(value: str) -> bool:
    """Whether ``value`` is a valid base-model token string (``[a-z0-9]+`` joined by ``-``)."""
    parts = value.split("-")
    return all(p and p.isascii() and p.isalnum() and p == p.lower() for p in parts)


# --------------------------------------------------------------------- mapping helpers


_PLACEHOLDERS: dict[str, object] = {
    "component": Component.VISION.value,
    "base_model": "vit-base16",
    "task": Task.EMBED.value,
}


def _partial(values: dict[str, object], errors: list[ErrorDetails]) -> dict[str, object] | None:
    """``values`` without the broken entries (placeholders for required ones), or None."""
    partial: dict[str, object] = {k: v for k, v in values.items()}
    for err in errors:
        path = [p for p in err["loc"] if isinstance(p, str)]
        if not path:
            return None
        top = path[0]
        if len(path) >= 2 and top in _SECTIONS and isinstance(partial.get(top), Mapping):
            section = dict(cast(Mapping[str, object], partial[top]))
            section.pop(path[1], None)
            partial[top] = section
        else:
            partial.pop(top, None)
    for name, placeholder in _PLACEHOLDERS.items():
        partial.setdefault(name, placeholder)
    return partial


def _unflatten(data: Mapping[str, object]) -> dict[str, object]:
    """Dotted keys (``dp.clipping_norm``) into nested tables, merged with given tables."""
    nested: dict[str, object] = {}
    for key, value in data.items():
        head, dot, rest = key.partition(".")
        if dot and head in _SECTIONS:
            section = nested.setdefault(head, {})
            if isinstance(section, dict):
                section[rest] = value
            continue
        if isinstance(value, Mapping) and isinstance(nested.get(key), dict):
            cast(dict[str, object], nested[key]).update(value)
        else:
            nested[key] = dict(value) if isinstance(value, Mapping) else value
    return nested


def _deep_merge(base: dict[str, object], override: dict[str, object]) -> dict[str, object]:
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = {**current, **value}
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------- files


def read_job_file(path: Path) -> dict[str, object]:
    """The raw settings of a ``.toml``/``.json`` job file; :class:`JobSpecError` if unreadable."""
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise JobSpecError([f"job file: must end in .toml or .json. Found {path.name!r}."])
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise JobSpecError([f"job file: cannot read {path}: {exc.strerror or exc}."]) from exc
    if suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise JobSpecError([f"job file: {path} is not valid TOML: {exc}."]) from exc
    try:
        loaded = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except ValueError as exc:
        raise JobSpecError([f"job file: {path} is not valid JSON: {exc}."]) from exc
    if not isinstance(loaded, dict):
        raise JobSpecError(
            [f"job file: {path} must hold a JSON object. Found {type(loaded).__name__}."]
        )
    return cast(dict[str, object], loaded)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not allowed (JSON numbers must be finite)")


def load_job(path: Path) -> JobSpec:
    """Load and validate a job file (TOML or JSON)."""
    return JobSpec.from_mapping(read_job_file(path))
