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
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Final, Never, Self, TypeAlias, cast

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
from manifests import catalog, modelsize
from manifests.catalog import CatalogEntry, Component, NodeType, NotTrainableError, Task
from manifests.confighash import JsonValue, training_config_hash
from manifests.naming import ArtifactName, Quantization, generated_name, name_problems

RunConfigValue: TypeAlias = bool | int | float | str
_Ok: TypeAlias = Callable[..., bool]


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

    def training_config(self) -> dict[str, JsonValue]:
        """The settings hashed into ``training_config_hash``."""
        return {
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "optimizer": self.optimizer.value,
            "epochs": self.epochs,
            "weight_decay": self.weight_decay,
        }

    def manifest_fields(
        self, *, created_at: datetime, run_name: str | None = None
    ) -> dict[str, object]:
        """The manifest fields that come from the learning form (plain JSON values)."""
        training_config = self.training_config()
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


# --------------------------------------------------------------------- cross-field checks


def _touches(name: str, broken: frozenset[str]) -> bool:
    return any(name == b or name.startswith(f"{b}.") or b.startswith(f"{name}.") for b in broken)


def _cross_field_problems(spec: JobSpec, broken: frozenset[str]) -> tuple[list[str], bool]:
    problems: list[str] = []
    not_trainable = False

    def ok(*names: str) -> bool:
        return not any(_touches(n, broken) for n in names)

    entry: CatalogEntry | None = None
    if ok("component", "base_model", "task"):
        try:
            entry = spec.catalog_entry
        except NotTrainableError as exc:
            problems.append(f"component, base_model, task: {exc}")
            not_trainable = True
    if entry is not None and ok("component") and spec.component != entry.component:
        problems.append(
            f"component: must be {entry.component} for a job on {entry.id}. Found {spec.component}."
        )
    if entry is not None and ok("node_type") and spec.node_type not in (None, entry.node_type):
        problems.append(
            f"node_type: must be {entry.node_type} for {entry.id} (its catalog node type), "
            f"or left out. Found {spec.node_type}."
        )
    if ok("task", "embedding_dim") and spec.task is Task.EMBED and spec.embedding_dim is None:
        example = (
            f" ({entry.id} uses {entry.embedding_dim})" if entry and entry.embedding_dim else ""
        )
        problems.append(f"embedding_dim: is required when task is embed{example}. Found none.")
    if (
        ok("hidden_size", "num_heads")
        and spec.hidden_size is not None
        and spec.num_heads is not None
        and spec.hidden_size % spec.num_heads
    ):
        problems.append(
            f"hidden_size: must be a multiple of num_heads ({spec.num_heads}). "
            f"Found {spec.hidden_size}."
        )
    if ok("quantize", "precision"):
        if spec.quantize and spec.precision is not Precision.INT8:
            problems.append(
                "quantize: true produces int8 weights, but precision is "
                f"{spec.precision}. Set precision = int8 or quantize = false. Found "
                f"precision {spec.precision}."
            )
        if not spec.quantize and spec.precision is Precision.INT8:
            problems.append(
                "precision: int8 means a post-training-quantized artifact; set quantize = true "
                "(or quantize = int8), or choose fp32/fp16. Found quantize = false."
            )
    if ok("artifact_name") and spec.artifact_name is not None:
        problems.extend(f"artifact_name: {p}" for p in name_problems(spec.artifact_name))
        if ok("artifact_naming") and spec.artifact_naming is ArtifactNaming.RUN:
            problems.append(
                "artifact_naming: run generates a name, but artifact_name is given. "
                "Drop one of them."
            )
    problems.extend(_privacy_problems(spec, ok))
    problems.extend(_federation_problems(spec, ok))
    if entry is not None and ok(*_SIZE_FIELDS, "privacy_level", "dp.unit"):
        problem = _size_problem(spec, entry)
        if problem is not None:
            problems.append(problem)
    return problems, not_trainable


_SIZE_FIELDS: Final = (
    "hidden_size",
    "num_layers",
    "embedding_dim",
    "input_size",
    "max_seq_length",
    "batch_size",
)


def _size_problem(spec: JobSpec, entry: CatalogEntry) -> str | None:
    """A model too large for this machine, named by its largest size setting."""
    model = modelsize.estimate(
        entry.base_model,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        embedding_dim=spec.embedding_dim,
        input_size=spec.input_size,
        max_seq_length=spec.max_seq_length,
        batch_size=spec.batch_size,
        per_example_gradients=spec.privacy_level.uses_dp and spec.dp.unit is DpUnit.EXAMPLE,
    )
    if model is None:
        return None
    problem = modelsize.memory_problem(model, available=modelsize.machine_memory_bytes())
    if problem is None:
        return None
    found = "none (the base model's full size)" if spec.hidden_size is None else spec.hidden_size
    return f"hidden_size: {problem} Found {found}."


def _privacy_problems(spec: JobSpec, ok: _Ok) -> list[str]:
    problems: list[str] = []
    if not ok("privacy_level"):
        return problems
    level = spec.privacy_level
    dp = spec.dp
    analytics = spec.task in (Task.PREPROC, Task.NORMALIZER)
    if level.uses_dp:
        if ok("dp.clipping_norm") and dp.clipping_norm is None and not analytics:
            problems.append(
                f"dp.clipping_norm: is required when privacy_level is {level} (the L2 bound C "
                "on each update). Found none."
            )
        if ok("dp.clipping_norm") and dp.clipping_norm is not None and analytics:
            problems.append(
                "dp.clipping_norm: sensing statistics bound each example's contribution "
                "themselves (every per-example row has L2 norm <= 1); remove it. Found "
                f"{dp.clipping_norm}."
            )
        if ok("dp.unit") and analytics and dp.unit is not DpUnit.EXAMPLE:
            problems.append(
                "dp.unit: a sensing node's statistics sum grows with its data, so sensing jobs "
                "protect one example: set dp.unit = example. Found node."
            )
        if (
            ok("dp.unit", "dp.noise_multiplier", "dp.target_epsilon")
            and not analytics
            and dp.unit is DpUnit.EXAMPLE
            and dp.target_epsilon is None
        ):
            problems.append(
                "dp.target_epsilon: example-level DP-SGD is calibrated by each node from its "
                "own example count (the server never learns it), so the job gives the target "
                "epsilon, not a noise multiplier. Found none."
            )
        if ok("dp.noise_multiplier", "dp.target_epsilon"):
            if dp.noise_multiplier is None and dp.target_epsilon is None:
                problems.append(
                    f"dp.noise_multiplier: privacy_level {level} needs dp.noise_multiplier "
                    "(sigma) or dp.target_epsilon to calibrate it. Found neither."
                )
            if dp.noise_multiplier is not None and dp.target_epsilon is not None:
                problems.append(
                    "dp.noise_multiplier: set either dp.noise_multiplier or dp.target_epsilon, "
                    f"not both. Found {dp.noise_multiplier} and {dp.target_epsilon}."
                )
        if ok("dp.delta") and dp.delta is None:
            problems.append(
                f"dp.delta: is required when privacy_level is {level} (epsilon is reported at "
                "delta; choose one below 1/number of records, e.g. 1e-5). Found none."
            )
        if (
            ok("dp.target_epsilon", "dp.epsilon_budget")
            and dp.target_epsilon is not None
            and dp.epsilon_budget is not None
            and dp.target_epsilon > dp.epsilon_budget
        ):
            problems.append(
                f"dp.target_epsilon: must not exceed dp.epsilon_budget ({dp.epsilon_budget}), "
                f"or training stops before reaching it. Found {dp.target_epsilon}."
            )
    else:
        for name in (
            "unit",
            "noise_multiplier",
            "target_epsilon",
            "delta",
            "epsilon_budget",
            "metrics_noise_multiplier",
            "planned_dropout",
        ):
            if ok(f"dp.{name}") and _differs_from_default(dp, name):
                problems.append(
                    f"dp.{name}: is set but privacy_level is {level}, which applies no "
                    "differential privacy. Set privacy_level to dp or dp+secure-agg, or remove "
                    f"it. Found {getattr(dp, name)}."
                )
    robust = spec.federation.robust_aggregation
    if level.uses_secure_agg:
        if ok("federation.robust_aggregation") and robust is not RobustAggregation.MEAN:
            problems.append(
                f"federation.robust_aggregation: {robust} needs individual updates, but "
                f"privacy_level {level} reveals only their sum. Use mean, or privacy_level "
                f"none or dp. Found {robust}."
            )
    else:
        for name in SecAggSettings.model_fields:
            if ok(f"secagg.{name}") and _differs_from_default(spec.secagg, name):
                problems.append(
                    f"secagg.{name}: is set but privacy_level is {level}, which uses no secure "
                    "aggregation. Set privacy_level to secure-agg or dp+secure-agg, or remove "
                    f"it. Found {getattr(spec.secagg, name)}."
                )
    return problems


def _differs_from_default(settings: BaseModel, name: str) -> bool:
    default = type(settings).model_fields[name].get_default(call_default_factory=True)
    return bool(getattr(settings, name) != default)


def _federation_problems(spec: JobSpec, ok: _Ok) -> list[str]:
    problems: list[str] = []
    fed, sec = spec.federation, spec.secagg
    if ok("federation.sampling", "privacy_level") and fed.sampling is Sampling.SECRET:
        if not spec.privacy_level.uses_secure_agg:
            problems.append(
                "federation.sampling: secret sampling hides who included data inside the "
                "secure sum, so it needs privacy_level secure-agg or dp+secure-agg. Found "
                f"{spec.privacy_level}."
            )
        if ok("federation.fraction") and fed.fraction is None:
            problems.append(
                "federation.fraction: secret sampling includes each cohort node's data with "
                "probability q; set federation.fraction (0 < q <= 1). Found none."
            )
    if ok("federation.clients_per_round", "federation.fraction"):
        if (
            fed.clients_per_round is not None
            and fed.fraction is not None
            and fed.sampling is not Sampling.SECRET
        ):
            problems.append(
                "federation.clients_per_round: set either clients_per_round or fraction, not "
                f"both. Found {fed.clients_per_round} and {fed.fraction}."
            )
        if ok("federation.sampling") and fed.sampling is Sampling.POISSON and fed.fraction is None:
            problems.append(
                "federation.fraction: poisson sampling includes each node with rate q; set "
                "federation.fraction (q, 0 < q <= 1). Found none."
            )
    n = fed.clients_per_round
    if n is not None and ok("federation.clients_per_round"):
        if (
            ok("secagg.num_neighbours")
            and sec.num_neighbours is not None
            and sec.num_neighbours >= n
        ):
            problems.append(
                f"secagg.num_neighbours: must be below federation.clients_per_round ({n}). "
                f"Found {sec.num_neighbours}."
            )
        threshold = sec.reconstruction_threshold
        if ok("secagg.reconstruction_threshold") and threshold is not None and threshold > n:
            problems.append(
                "secagg.reconstruction_threshold: must not exceed federation.clients_per_round "
                f"({n}). Found {threshold}."
            )
    return problems


# --------------------------------------------------------------------- error translation


def _raise(problems: list[str], *, not_trainable: bool) -> Never:
    if not_trainable:
        raise NotTrainableJobError(problems)
    raise JobSpecError(problems)


def _split_errors(
    exc: ValidationError,
) -> tuple[list[ErrorDetails], _CrossFieldProblemsError | None]:
    field_errors: list[ErrorDetails] = []
    cross: _CrossFieldProblemsError | None = None
    for err in exc.errors():
        original = err.get("ctx", {}).get("error")
        if isinstance(original, _CrossFieldProblemsError):
            cross = original
        else:
            field_errors.append(err)
    return field_errors, cross


def _loc_key(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc if isinstance(part, str))


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as TOML and JSON spell it
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    return json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bound(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _all_keys() -> list[str]:
    keys = [k for k in JobSpec.model_fields if k not in _SECTIONS]
    for section, model in _SECTIONS.items():
        keys.extend(f"{section}.{k}" for k in model.model_fields)
    return keys


def _describe(err: ErrorDetails) -> str:
    loc = _loc_key(err["loc"]) or "job"
    kind = err["type"]
    ctx = err.get("ctx", {})
    found = f" Found {_show(err['input'])}."
    if kind == "missing":
        choices = {"component": Component, "task": Task}.get(loc)
        hint = f" Choose one of {', '.join(choices)}." if choices else ""
        return f"{loc}: is required.{hint}"
    if kind == "extra_forbidden":
        keys = _all_keys()
        close = (
            catalog.suggest(loc, keys, n=1)
            or tuple(k for k in keys if k.rsplit(".", 1)[-1] == loc.rsplit(".", 1)[-1])[:1]
        )
        hint = f" Did you mean {close[0]}?" if close else ""
        return f"{loc}: is not a job setting.{hint}"
    if loc == "quantize" and kind.startswith("bool"):
        return f"quantize: must be true, false or int8.{found}"
    messages = {
        "enum": f"must be one of {ctx.get('expected')}.",
        "greater_than_equal": f"must be >= {_bound(ctx.get('ge'))}.",
        "greater_than": f"must be > {_bound(ctx.get('gt'))}.",
        "less_than_equal": f"must be <= {_bound(ctx.get('le'))}.",
        "less_than": f"must be < {_bound(ctx.get('lt'))}.",
        "finite_number": "must be a finite number.",
        "int_parsing": "must be a whole number.",
        "int_type": "must be a whole number.",
        "int_from_float": "must be a whole number.",
        "float_parsing": "must be a number.",
        "float_type": "must be a number.",
        "bool_parsing": "must be true or false.",
        "bool_type": "must be true or false.",
        "string_type": "must be text.",
        "string_too_short": f"must have at least {ctx.get('min_length')} character(s).",
        "string_too_long": f"must have at most {ctx.get('max_length')} characters.",
        "tuple_type": "must be a list of text or a comma-separated string.",
        "model_type": "must be a table of settings.",
        "model_attributes_type": "must be a table of settings.",
        "dict_type": "must be a table of settings.",
    }
    if kind == "value_error":
        return f"{loc}: {str(err['msg']).removeprefix('Value error, ')}"
    message = messages.get(kind, str(err["msg"]) + ".")
    if kind in ("int_type", "float_type", "bool_type"):
        given = err["input"]
        if isinstance(given, str) and _numeric(given):
            message = message.removesuffix(".") + ", not text (no quotes)."
        elif isinstance(given, bool):
            message = message.removesuffix(".") + ", not true/false."
    return f"{loc}: {message}{found}"


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
