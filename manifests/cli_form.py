"""Learning-form commands: ``fedbrain catalog`` and ``fedbrain job resolve``.

Invalid input exits with code 2 and prints every problem on stderr (no traceback).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from manifests import catalog
from manifests.jobspec import JobSpec, JobSpecError, read_job_file

EXIT_INVALID = 2

job_app = typer.Typer(no_args_is_help=True, help="Learning-form jobs.")

_Opt = typer.Option
_FORM = "Learning form"
_FED = "Federation"
_DP = "Differential privacy"
_SEC = "Secure aggregation"


def catalog_command(
    as_json: Annotated[bool, _Opt("--json", help="Machine-readable output.")] = False,
) -> None:
    """List every artifact of the catalog and whether fedbrain can train it."""
    if as_json:
        rows = [
            {
                "id": e.id,
                "node_type": e.node_type.value,
                "component": e.component.value,
                "base_model": e.base_model,
                "task": e.task,
                "embedding_dim": e.embedding_dim,
                "parameters": e.parameters,
                "kind": e.kind.value,
                "trainable": e.trainable,
                "training_forms": [
                    {"component": f.component.value, "base_model": f.base_model, "task": f.task}
                    for f in e.training_forms()
                ],
                "description": e.description,
            }
            for e in catalog.entries()
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="fedbrain artifact catalog")
    for column in ("id", "node type", "component", "base model", "task", "dim", "kind"):
        table.add_column(column)
    table.add_column("trainable", justify="center")
    table.add_column("description")
    for e in catalog.entries():
        table.add_row(
            e.id,
            e.node_type,
            e.component,
            e.base_model,
            e.task,
            "" if e.embedding_dim is None else str(e.embedding_dim),
            e.kind,
            "yes" if e.trainable else "",
            e.description,
        )
    Console(width=200).print(table)


def _created_at() -> datetime:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return datetime.fromtimestamp(int(epoch), tz=UTC)
        except ValueError:
            _fail([f"SOURCE_DATE_EPOCH: must be whole seconds since 1970. Found {epoch!r}."])
    return datetime.now(UTC)


def _fail(problems: list[str] | tuple[str, ...]) -> None:
    err = Console(stderr=True, soft_wrap=True, highlight=False)
    err.print("Invalid job:", markup=False)
    for problem in problems:
        err.print(f"- {problem}", markup=False)
    raise typer.Exit(code=EXIT_INVALID)


@job_app.command("resolve")
def resolve_command(
    job: Annotated[
        Path | None, _Opt("--job", help="Job file (.toml or .json); flags override it.")
    ] = None,
    component: Annotated[str | None, _Opt(rich_help_panel=_FORM)] = None,
    base_model: Annotated[str | None, _Opt(rich_help_panel=_FORM)] = None,
    task: Annotated[str | None, _Opt(rich_help_panel=_FORM)] = None,
    embedding_dim: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    hidden_size: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    num_layers: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    num_heads: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    max_seq_length: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    sample_rate: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    input_size: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    batch_size: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    learning_rate: Annotated[float | None, _Opt(rich_help_panel=_FORM)] = None,
    optimizer: Annotated[str | None, _Opt(rich_help_panel=_FORM)] = None,
    epochs: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    weight_decay: Annotated[float | None, _Opt(rich_help_panel=_FORM)] = None,
    precision: Annotated[str | None, _Opt(rich_help_panel=_FORM)] = None,
    quantize: Annotated[
        bool, _Opt("--quantize", help="Post-training int8 quantization.", rich_help_panel=_FORM)
    ] = False,
    checkpoint_interval: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    augmentations: Annotated[
        str | None, _Opt(help="Comma-separated.", rich_help_panel=_FORM)
    ] = None,
    preprocessing_profile: Annotated[str | None, _Opt(rich_help_panel=_FORM)] = None,
    train_data_tags: Annotated[
        str | None, _Opt(help="Comma-separated.", rich_help_panel=_FORM)
    ] = None,
    privacy_level: Annotated[str | None, _Opt(rich_help_panel=_FORM)] = None,
    artifact_name: Annotated[str | None, _Opt(rich_help_panel=_FORM)] = None,
    artifact_naming: Annotated[
        str | None, _Opt(help="catalog (default) or run.", rich_help_panel=_FORM)
    ] = None,
    node_type: Annotated[str | None, _Opt(rich_help_panel=_FORM)] = None,
    model_version: Annotated[int | None, _Opt(rich_help_panel=_FORM)] = None,
    license_: Annotated[str | None, _Opt("--license", rich_help_panel=_FORM)] = None,
    run_name: Annotated[str | None, _Opt(rich_help_panel=_FORM)] = None,
    num_rounds: Annotated[int | None, _Opt(rich_help_panel=_FED)] = None,
    clients_per_round: Annotated[int | None, _Opt(rich_help_panel=_FED)] = None,
    fraction: Annotated[float | None, _Opt(rich_help_panel=_FED)] = None,
    sampling: Annotated[str | None, _Opt(rich_help_panel=_FED)] = None,
    reliability_threshold: Annotated[float | None, _Opt(rich_help_panel=_FED)] = None,
    server_optimizer: Annotated[str | None, _Opt(rich_help_panel=_FED)] = None,
    server_learning_rate: Annotated[float | None, _Opt(rich_help_panel=_FED)] = None,
    robust_aggregation: Annotated[str | None, _Opt(rich_help_panel=_FED)] = None,
    dp_unit: Annotated[str | None, _Opt(rich_help_panel=_DP)] = None,
    clipping_norm: Annotated[float | None, _Opt(rich_help_panel=_DP)] = None,
    noise_multiplier: Annotated[float | None, _Opt(rich_help_panel=_DP)] = None,
    target_epsilon: Annotated[float | None, _Opt(rich_help_panel=_DP)] = None,
    delta: Annotated[float | None, _Opt(rich_help_panel=_DP)] = None,
    epsilon_budget: Annotated[float | None, _Opt(rich_help_panel=_DP)] = None,
    num_neighbours: Annotated[int | None, _Opt(rich_help_panel=_SEC)] = None,
    reconstruction_threshold: Annotated[int | None, _Opt(rich_help_panel=_SEC)] = None,
    quantization_bits: Annotated[int | None, _Opt(rich_help_panel=_SEC)] = None,
    quantization_range: Annotated[float | None, _Opt(rich_help_panel=_SEC)] = None,
) -> None:
    """Print the resolved job as JSON: the manifest fields that come from the form."""
    flags: dict[str, object] = {
        "component": component,
        "base_model": base_model,
        "task": task,
        "embedding_dim": embedding_dim,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "max_seq_length": max_seq_length,
        "sample_rate": sample_rate,
        "input_size": input_size,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": optimizer,
        "epochs": epochs,
        "weight_decay": weight_decay,
        "precision": precision,
        "quantize": True if quantize else None,
        "checkpoint_interval": checkpoint_interval,
        "augmentations": augmentations,
        "preprocessing_profile": preprocessing_profile,
        "train_data_tags": train_data_tags,
        "privacy_level": privacy_level,
        "artifact_name": artifact_name,
        "artifact_naming": artifact_naming,
        "node_type": node_type,
        "model_version": model_version,
        "license": license_,
        "run_name": run_name,
        "federation.num_rounds": num_rounds,
        "federation.clients_per_round": clients_per_round,
        "federation.fraction": fraction,
        "federation.sampling": sampling,
        "federation.reliability_threshold": reliability_threshold,
        "federation.server_optimizer": server_optimizer,
        "federation.server_learning_rate": server_learning_rate,
        "federation.robust_aggregation": robust_aggregation,
        "dp.unit": dp_unit,
        "dp.clipping_norm": clipping_norm,
        "dp.noise_multiplier": noise_multiplier,
        "dp.target_epsilon": target_epsilon,
        "dp.delta": delta,
        "dp.epsilon_budget": epsilon_budget,
        "secagg.num_neighbours": num_neighbours,
        "secagg.reconstruction_threshold": reconstruction_threshold,
        "secagg.quantization_bits": quantization_bits,
        "secagg.quantization_range": quantization_range,
    }
    try:
        base = read_job_file(job) if job is not None else {}
        spec = JobSpec.from_flags(flags, base=base)
        resolved: dict[str, object] = dict(spec.manifest_fields(created_at=_created_at()))
    except JobSpecError as exc:
        _fail(exc.problems)
        return
    except ValueError as exc:
        _fail([str(exc)])
        return
    resolved["federation"] = spec.federation.model_dump(mode="json")
    resolved["dp"] = spec.dp.model_dump(mode="json")
    resolved["secagg"] = spec.secagg.model_dump(mode="json")
    typer.echo(json.dumps(resolved, indent=2, allow_nan=False))


def register(app: typer.Typer) -> None:
    """Attach ``catalog`` and ``job`` to the root ``fedbrain`` app."""
    app.command("catalog")(catalog_command)
    app.add_typer(job_app, name="job")
