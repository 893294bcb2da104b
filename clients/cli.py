"""Node commands: ``fedbrain node policy check FILE [--job JOB.toml]``.

Exit status: 0 the policy is valid (and, with a job, the node would accept it); 1 the node
would refuse the job (the reasons are printed); 2 the policy or job file is invalid (every
problem is printed on stderr).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from clients.policy import PolicyError, load_policy
from manifests.jobspec import JobSpecError, load_job

__all__ = ["node_app", "register"]

node_app = typer.Typer(help="A node's own files: its privacy policy.", no_args_is_help=True)
policy_app = typer.Typer(help="The node's privacy policy (a TOML file).", no_args_is_help=True)
node_app.add_typer(policy_app, name="policy")

EXIT_REFUSED = 1
EXIT_INVALID = 2


@policy_app.command("check")
def policy_check(
    file: Annotated[Path, typer.Argument(help="The node's policy file (TOML).")],
    job: Annotated[
        Path | None,
        typer.Option("--job", help="A job file (.toml or .json): would this node accept it?"),
    ] = None,
) -> None:
    """Print the effective policy (defaults filled in) and, with --job, the node's decision."""
    try:
        policy = load_policy(file)
    except PolicyError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    typer.echo(policy.to_toml(), nl=False)
    if job is None:
        return
    try:
        spec = load_job(job)
    except JobSpecError as error:
        typer.echo(f"error: {job}: {error}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    decision = policy.check(spec)
    typer.echo("")
    if decision.epsilon is None:
        cost = "epsilon: cannot be derived"
    elif math.isinf(decision.epsilon):
        cost = "epsilon: unbounded (no differential privacy)"
    else:
        at = f" at delta {decision.delta:g}" if decision.delta is not None else ""
        cost = f"epsilon: {decision.epsilon:.4g}{at} (worst case)"
    typer.echo(f"job {job} under rule {decision.rule}: {cost}")
    if decision.accepted:
        typer.echo(
            "accepted: within the policy (the node still charges it to the dataset's lifetime "
            f"budget of {decision.lifetime_epsilon:g} when it trains)"
        )
        return
    typer.echo("refused:")
    for reason in decision.reasons:
        typer.echo(f"- {reason}")
    raise typer.Exit(EXIT_REFUSED)


def register(app: typer.Typer) -> None:
    """Attach the ``node`` command group to the root ``fedbrain`` app."""
    app.add_typer(node_app, name="node")
