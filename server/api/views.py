"""The JSON shapes of the operator API's responses: runs, rounds, jobs, resolved forms.

Names say what values are (``eval_loss``, ``epsilon_spent``, ``nodes_sampled``); node ids are
strings (uint64 does not fit a JavaScript number) and non-finite floats are ``"NaN"``,
``"Infinity"``, ``"-Infinity"`` (JSON has no such numbers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from manifests import modelsize
from manifests.jobspec import DpUnit, JobSpec
from server.api.store import JobRow
from server.ledger import JSONValue, RoundRecord

__all__ = [
    "epsilon_budget",
    "form_errors",
    "job_json",
    "json_safe",
    "num_rounds",
    "resolved",
    "round_view",
    "run_row",
]


def json_safe(value: object) -> JSONValue:
    """Non-finite floats as strings; uint64 node ids as strings (JavaScript loses them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {
            str(k): (str(v) if k == "node_id" and isinstance(v, int) else json_safe(v))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def form_errors(problems: tuple[str, ...] | list[str]) -> list[dict[str, str]]:
    errors = []
    for problem in problems:
        name, sep, message = problem.partition(": ")
        errors.append(
            {"field": name, "message": message} if sep else {"field": "job", "message": problem}
        )
    return errors


def job_json(row: JobRow) -> dict[str, JSONValue]:
    return {
        "job_id": row.job_id,
        "status": row.status,
        "artifact_name": row.artifact_name,
        "submitted_at": row.submitted_at.isoformat(),
        "submitted_by": row.submitted_by,
        "started_at": None if row.started_at is None else row.started_at.isoformat(),
        "finished_at": None if row.finished_at is None else row.finished_at.isoformat(),
        "run_id": row.run_id,
        "exit_code": row.exit_code,
        "error": row.error,
        "cancel_requested": row.cancel_requested,
        "job": json_safe(row.job),
    }


def round_view(record: RoundRecord) -> dict[str, JSONValue]:
    """One round with names that say what they are (eval_loss, not loss)."""
    train = record.metrics.get("train", {})
    evaluation = record.metrics.get("eval", {})

    def metric(values: Mapping[str, object], name: str) -> float | None:
        value = values.get(name)
        return (
            float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    contributed = [p for p in record.participants if p.outcome.value == "contributed"]
    dropped = [p for p in record.participants if p.outcome.value == "dropped"]
    view = {
        "round": record.round,
        "status": record.status.value,
        "recorded_at": None if record.recorded_at is None else record.recorded_at.isoformat(),
        "nodes_sampled": record.sampled,
        "nodes_responded": record.responded,
        "nodes_dropped": record.dropped,
        "dropped_by_stage": dict(record.dropped_by_stage),
        "eval_loss": metric(evaluation, "eval_loss"),
        "eval_accuracy": metric(evaluation, "eval_accuracy"),
        "train_loss": metric(train, "train_loss"),
        "epsilon_spent": record.epsilon,
        "delta": record.delta,
        "reliability": record.reliability,
        "reliability_reasons": list(record.reliability_reasons),
        "update_norm": record.update_norm,
        "noise_to_signal": record.noise_to_signal,
        "stage_seconds": dict(record.timings),
        "metrics": {k: dict(v) for k, v in record.metrics.items()},
        "participants": [
            {
                "node_id": str(p.node_id),
                "node_type": p.node_type,
                "phase": p.phase.value,
                "outcome": p.outcome.value,
                "stage": p.stage,
            }
            for p in record.participants
        ],
        "contributors": len({p.node_id for p in contributed}),
        "dropouts": [
            {"node_id": str(p.node_id), "phase": p.phase.value, "stage": p.stage} for p in dropped
        ],
    }
    return {k: json_safe(v) for k, v in view.items()}


def resolved(spec: JobSpec) -> dict[str, Any]:
    fields = spec.manifest_fields(created_at=datetime.now(UTC))
    entry = spec.catalog_entry
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
    resolved: dict[str, object] = {
        **fields,
        "catalog_id": entry.id,
        "federation": spec.federation.model_dump(mode="json"),
        "dp": spec.dp.model_dump(mode="json") if spec.privacy_level.uses_dp else None,
        "secagg": spec.secagg.model_dump(mode="json")
        if spec.privacy_level.uses_secure_agg
        else None,
        "model_estimate": None
        if model is None
        else {
            "family": model.family.value,
            "parameters": model.parameters,
            "training_bytes": model.training_bytes,
        },
    }
    return json_safe(resolved)  # type: ignore[return-value]


def run_row(document: dict[str, JSONValue]) -> dict[str, Any]:
    """A run with clear names: ``epsilon_spent`` and ``rounds_recorded``, no job blob."""
    job = document.pop("job", {})
    document["epsilon_spent"] = document.pop("final_epsilon", None)
    document["num_rounds"] = num_rounds(job if isinstance(job, dict) else {})
    return document


def num_rounds(job: Mapping[str, object]) -> int | None:
    value = job.get("federation.num_rounds")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def epsilon_budget(job: Mapping[str, object]) -> float | None:
    value = job.get("dp.epsilon_budget")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
