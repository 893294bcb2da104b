"""``fedbrain simulate [SCENARIO]``: run a scenario on Flower's Simulation Engine.

Exit codes (:class:`simulations.runner.ExitCode`): 0 every job passed and its bundle verified;
1 a job failed or a bundle did not verify, or the run could not start (the output folder is in
use by another run, the ledger cannot be opened); 2 invalid scenario or options (every problem
listed); 3 no failure, but a job was rejected by its reliability threshold (no bundle).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from simulations.scenario import Scenario

__all__ = ["register", "simulate"]

# Every `fedbrain` command imports this module: the scenario and runner modules (torch, Flower,
# datasets) are imported when `simulate` runs, not here.


def _plan(scenario: Scenario) -> Table:
    table = Table(
        title=f"scenario {scenario.name} ({scenario.source}), seed {scenario.seed}, "
        f"out {scenario.out}",
        title_justify="left",
    )
    table.add_column("artifact", no_wrap=True)
    table.add_column("nodes")
    table.add_column("data")
    table.add_column("rounds", justify="right")
    table.add_column("privacy", no_wrap=True)
    for job in scenario.jobs:
        spec = job.spec
        nodes = scenario.nodes_of(job.node_type)
        privacy = str(spec.privacy_level)
        if spec.privacy_level.uses_dp:
            privacy += f", unit {spec.dp.unit}"
        table.add_row(
            job.artifact_name,
            f"{len(nodes)} {job.node_type}",
            str(job.modality),
            str(spec.federation.num_rounds),
            privacy,
        )
    return table


def simulate(
    scenario: Annotated[
        Path | None,
        typer.Argument(
            help="Scenario file (TOML). Default: the embedded default scenario.",
            show_default=False,
        ),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(min=1, help="Rounds of every model-training job (not the sensing jobs)."),
    ] = None,
    nodes: Annotated[int | None, typer.Option(min=1, help="Nodes in every node group.")] = None,
    privacy_level: Annotated[
        str | None,
        typer.Option(help="Privacy level of every job: none, dp, secure-agg or dp+secure-agg."),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(min=0, help="Seed of the demo data and the runs.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Output folder (data, keys, runs, ledger, summary.json). One run at a time: "
            "a run into a folder that another run is using is refused."
        ),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only this job (artifact name or catalog id); repeat or comma-separate."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Skip jobs that passed in an earlier run (their bundle still verifies) and "
            "resume the others from their checkpoints. Without it, each job's run folder "
            "starts afresh."
        ),
    ] = False,
    check: Annotated[
        bool, typer.Option(help="Validate the scenario and show the plan; run nothing.")
    ] = False,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's own logs.")] = False,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="Ledger database URL every job of the run writes to (SQLAlchemy URL). "
            "Default: ledger.sqlite in the output folder."
        ),
    ] = None,
    events: Annotated[
        Path | None,
        typer.Option(
            help="Append every progress event to this file as one JSON line (flushed), for "
            "other processes to follow the run.",
            dir_okay=False,
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Run on this existing Ray cluster (HOST:PORT of its head, as `ray start "
            "--head` printed it) instead of starting Ray here. Every Ray node must see the "
            "output folder at the same path.",
        ),
    ] = None,
) -> None:
    """Run a simulation: demo data on sensing/encoder/inference nodes, one Flower run per job,
    per-round progress, signed and verified bundles. Exit 0 = all passed; 1 = a job failed or
    a bundle did not verify; 2 = invalid scenario; 3 = a job was rejected by reliability."""
    from simulations.runner import ExitCode
    from simulations.scenario import Overrides, ScenarioError, load_scenario

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and pipes: keep table rows on one line
    names = tuple(n.strip() for item in only or () for n in item.split(",") if n.strip())
    overrides = Overrides(
        rounds=rounds, nodes=nodes, privacy_level=privacy_level, seed=seed, out=out, only=names
    )
    try:
        loaded = load_scenario(scenario, overrides)
    except ScenarioError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(ExitCode.INVALID) from None
    console.print(_plan(loaded))
    if check:
        console.print("scenario is valid (--check: nothing was run)")
        return

    from server.ledger import LedgerError
    from simulations.events import EventWriter, tee
    from simulations.outfolder import OutputFolderInUseError
    from simulations.report import ProgressDisplay, print_summary
    from simulations.runner import run_scenario

    try:
        writer = None if events is None else EventWriter(events)
        with ProgressDisplay(console, loaded) as display:
            result = run_scenario(
                loaded,
                resume=resume,
                verbose=verbose,
                progress=display if writer is None else tee(writer, display),
                on_job_start=display.job_started,
                on_job_end=display.job_finished,
                on_base=display.base_progress,
                database_url=database_url,
                ray_address=ray_address,
            )
        if writer is not None:
            writer.close()
    except OutputFolderInUseError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.FAILED) from None
    except (OSError, ValueError, LedgerError) as exc:
        console.print(f"[red]error[/]: {escape(str(exc))}")
        raise typer.Exit(ExitCode.FAILED) from None
    print_summary(console, result)
    raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    """Attach ``simulate`` to the root ``fedbrain`` app."""
    app.command("simulate")(simulate)
