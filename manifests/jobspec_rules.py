"""The job spec's cross-field rules: the checks that read more than one setting (catalog
entry, quantization, naming, privacy, federation, model size), as one-line problems.

:class:`~manifests.jobspec.JobSpec` runs them after its fields validate; ``ok(*names)`` is
false for a setting that already failed on its own, so it is not reported twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, TypeAlias

from pydantic import BaseModel

from aggregation.privacy import DpUnit
from manifests import modelsize
from manifests.catalog import CatalogEntry, NotTrainableError, Task
from manifests.jobspec import (
    Adaptation,
    ArtifactNaming,
    BundleWeights,
    JobSpec,
    Precision,
    RobustAggregation,
    Sampling,
    SecAggSettings,
)
from manifests.naming import name_problems

_Ok: TypeAlias = Callable[..., bool]


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
    problems.extend(_fine_tuning_problems(spec, ok))
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


def _fine_tuning_problems(spec: JobSpec, ok: _Ok) -> list[str]:
    """Base checkpoint, adaptation, LoRA settings and bundle contents (see the job spec)."""
    problems: list[str] = []
    kind = spec.adaptation
    if ok("task") and spec.task in (Task.PREPROC, Task.NORMALIZER):
        set_here = [
            f"{name} = {value}"
            for name, value, default in (
                ("base_checkpoint", spec.base_checkpoint, None),
                ("adaptation", kind, Adaptation.FULL),
                ("lora_rank", spec.lora_rank, None),
                ("lora_alpha", spec.lora_alpha, None),
                ("bundle_weights", spec.bundle_weights, BundleWeights.MERGED),
            )
            if value != default
        ]
        if set_here:
            problems.append(
                f"{set_here[0].split(' =')[0]}: a {spec.task} job computes statistics and "
                f"trains no model; remove it. Found {', '.join(set_here)}."
            )
        return problems
    if (
        ok("adaptation", "base_checkpoint")
        and kind is not Adaptation.FULL
        and spec.base_checkpoint is None
    ):
        problems.append(
            f"adaptation: {kind} trains on top of a frozen pretrained base, which the server "
            "and every node must hold alike: set base_checkpoint (the absolute path of a local "
            "checkpoint folder, or demo in a simulation), or use adaptation = full. Found no "
            "base_checkpoint."
        )
    if ok("adaptation"):
        for name in ("lora_rank", "lora_alpha"):
            value = getattr(spec, name)
            if ok(name) and value is not None and kind is not Adaptation.LORA:
                problems.append(
                    f"{name}: applies to adaptation = lora only; remove it or set adaptation "
                    f"= lora. Found {name} = {value} with adaptation = {kind}."
                )
    if (
        ok("bundle_weights", "adaptation")
        and spec.bundle_weights is BundleWeights.ADAPTERS
        and kind is Adaptation.FULL
    ):
        problems.append(
            "bundle_weights: adapters ships only the trained tensors, to add to the frozen "
            "base; a full fine-tune trains every weight, so it has none to add them to. Use "
            "bundle_weights = merged, or adaptation = lora or head. Found adaptation = full."
        )
    return problems
