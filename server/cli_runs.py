"""``fedbrain runs``: the run ledger for operators (tables of runs and of a run's rounds).

The ledger is read from ``--db URL`` (any SQLAlchemy URL; also ``$FEDBRAIN_LEDGER_URL``), from
``--run-dir DIR`` (``DIR/ledger.sqlite``) or from a server kit, ``--kit DIR`` (its ledger of
deployment runs). Nothing is created. A ``running`` run whose process died on this host is
marked ``interrupted`` first (:mod:`server.restart`); ``interrupted`` counts the interruptions
a run went through, and ``runs show`` says for each whether its round's privacy cost stays
spent. Errors (no ledger, a file
that is not a ledger, unknown run) exit with code 2 (invalid input, :mod:`manifests.cli_errors`)
and one line on stderr, no traceback.

Column names say what they are: ``eval loss`` and ``eval accuracy`` are the federated
evaluation's, ``train loss`` the clients' training loss, ``epsilon spent`` the privacy spent
so far (at the run's delta).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.ledger import JSONValue, Ledger, LedgerError, Phase, RoundRecord
from server.restart import mark_interrupted_runs

__all__ = ["register", "runs_app"]

EXIT_INVALID = 2
LEDGER_URL_ENV = "FEDBRAIN_LEDGER_URL"

runs_app = typer.Typer(no_args_is_help=True, help="Runs and rounds recorded in the run ledger.")

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar=LEDGER_URL_ENV,
        help="Ledger database URL, e.g. sqlite:///runs/x/ledger.sqlite or postgresql+psycopg://...",
    ),
]
RunDirOption = Annotated[
    Path | None,
    typer.Option("--run-dir", help="Run directory holding ledger.sqlite.", file_okay=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
KitOption = Annotated[
    Path | None,
    typer.Option("--kit", help="A server kit: its ledger of deployment runs.", file_okay=False),
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(EXIT_INVALID)


def _open(db: str | None, run_dir: Path | None, kit: Path | None = None) -> Ledger:
    if sum(x is not None for x in (db, run_dir, kit)) > 1:
        raise _fail("give one ledger: --db, --run-dir or --kit, not both.")
    try:
        if kit is not None:
            from server.server_kit import LEDGER_FILE

            db = f"sqlite:///{kit.absolute() / LEDGER_FILE}"
        if run_dir is not None:
            ledger = Ledger.for_run_dir(run_dir, create=False)
        elif db is not None:
            ledger = Ledger(db, create=False)
        else:
            raise _fail(
                f"say which ledger to read: --run-dir DIR or --db URL (or set "
                f"${LEDGER_URL_ENV}), or --kit DIR."
            )
        mark_interrupted_runs(ledger)
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    return ledger


def _num(value: float | None, fmt: str = ".3g") -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return format(value, fmt)


def _time(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%SZ")


def _json_safe(value: JSONValue) -> JSONValue:
    """Non-finite floats as strings ("NaN", "Infinity"), so the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _echo_json(value: JSONValue) -> None:
    typer.echo(json.dumps(_json_safe(value), indent=2, allow_nan=False))


@runs_app.command("list")
def list_command(
    db: DbOption = None,
    run_dir: RunDirOption = None,
    as_json: JsonOption = False,
    kit: KitOption = None,
) -> None:
    """List the runs in the ledger, newest first."""
    ledger = _open(db, run_dir, kit)
    try:
        runs = ledger.list_runs()
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    finally:
        ledger.close()
    if as_json:
        _echo_json([run.to_json() for run in runs])
        return
    table = Table(title=f"fedbrain runs ({len(runs)})")
    right = ("rounds recorded", "interrupted", "epsilon spent", "reliability")
    for column in ("run", "artifact", "privacy (DP unit)", "status", *right):
        table.add_column(column, justify="right" if column in right else "left")
    table.add_column("finished")
    for run in runs:
        table.add_row(
            escape(run.run_id),
            escape(run.artifact_name),
            run.privacy_level + (f" ({run.dp_unit})" if run.dp_unit else ""),
            run.status.value,
            str(run.rounds_recorded),
            _interrupted(run.interruptions),
            _num(run.final_epsilon),
            _num(run.reliability, ".2f"),
            _time(run.finished_at),
        )
    Console(width=200).print(table)


def _interrupted(entries: tuple[Mapping[str, JSONValue], ...]) -> str:
    """How many interruptions, and how many of them were charged to the privacy budget."""
    if not entries:
        return "-"
    charged = sum(1 for e in entries if e.get("charged"))
    return f"{len(entries)} ({charged} charged)"


def _phase_metric(record: RoundRecord, phase: Phase, name: str) -> float | None:
    """``name`` as recorded for ``phase`` (never a value of another phase)."""
    value = record.metrics.get(phase.value, {}).get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _round_row(record: RoundRecord) -> list[str]:
    reasons = "; ".join(record.reliability_reasons)
    return [
        str(record.round),
        record.status.value,
        f"{record.sampled}/{record.responded}/{record.dropped}",
        _num(_phase_metric(record, Phase.EVAL, "eval_loss"), ".4g"),
        _num(_phase_metric(record, Phase.EVAL, "eval_accuracy"), ".3f"),
        _num(_phase_metric(record, Phase.TRAIN, "train_loss"), ".4g"),
        _num(record.epsilon),
        _num(record.reliability, ".2f"),
        escape(reasons) or "-",
    ]


@runs_app.command("show")
def show_command(
    run_id: Annotated[str, typer.Argument(help="The run to show.")],
    db: DbOption = None,
    run_dir: RunDirOption = None,
    as_json: JsonOption = False,
    kit: KitOption = None,
) -> None:
    """Show a run and the table of its rounds."""
    ledger = _open(db, run_dir, kit)
    try:
        run = ledger.get_run(run_id)
        rounds = ledger.rounds(run_id)
        refused = ledger.refused_nodes(run_id)
    except LedgerError as exc:  # RunNotFoundError included
        raise _fail(str(exc)) from None
    finally:
        ledger.close()
    if as_json:
        _echo_json(
            {
                "run": run.to_json(),
                "rounds": [r.to_json() for r in rounds],
                "refused_nodes": [n.to_json() for n in refused],
            }
        )
        return
    console = Console(width=200)
    console.print(
        f"[bold]{escape(run.run_id)}[/bold]  {escape(run.artifact_name)}"
        f"  privacy={escape(run.privacy_level)}"
        f"  status={run.status.value}  epsilon spent={_num(run.final_epsilon)}"
        f"  delta={_num(run.delta)}  reliability={_num(run.reliability, '.2f')}",
        highlight=False,
    )
    for reason in run.verdict_reasons:
        console.print(f"  verdict: {reason}", highlight=False, markup=False)
    if run.error:
        console.print(f"  error: {run.error}", highlight=False, markup=False)
    if run.flower_run_id is not None:
        console.print(f"  Flower run: {run.flower_run_id}", highlight=False, markup=False)
    for entry in run.interruptions:
        charged = (
            "charged: its privacy cost stays spent (private data had reached the server)"
            if entry.get("charged")
            else "not charged: no private data had reached the server"
        )
        console.print(
            f"  interrupted in round {entry.get('round')} (resumed {entry.get('at')}): {charged}",
            highlight=False,
            markup=False,
        )
    for node in refused:
        console.print(
            f"  refused node {node.node_id}: {node.reason}", highlight=False, markup=False
        )
    table = Table(title=f"rounds of {escape(run.run_id)}")
    for column in (
        "round",
        "status",
        "nodes sampled/responded/dropped",
        "eval loss",
        "eval accuracy",
        "train loss",
        "epsilon spent",
        "reliability",
    ):
        table.add_column(column, justify="left" if column == "status" else "right")
    table.add_column("reasons")
    for record in rounds:
        table.add_row(*_round_row(record))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Attach the ``runs`` group to the root ``fedbrain`` app."""
    app.add_typer(runs_app, name="runs")
