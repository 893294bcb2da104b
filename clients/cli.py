"""Node commands: ``fedbrain node policy check FILE [--job JOB.toml]``, ``fedbrain node start
--kit DIR`` (the node's daemon, :mod:`clients.daemon`) and ``fedbrain node roster install``.

Exit status: 0 the policy is valid (and, with a job, the node would accept it); 1 the node
would refuse the job (the reasons are printed); 2 the policy or job file is invalid (every
problem is printed on stderr).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["node_app", "register"]

node_app = typer.Typer(
    help="A node: its daemon, its privacy policy, its roster.", no_args_is_help=True
)
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
    from clients.policy import PolicyError, load_policy  # torch/Opacus: only when needed
    from manifests.jobspec import JobSpecError, load_job

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


roster_app = typer.Typer(help="The federation roster a node holds.", no_args_is_help=True)
node_app.add_typer(roster_app, name="roster")


@node_app.command("start")
def node_start(
    kit: Annotated[Path, typer.Option("--kit", help="The node kit folder.")],
    insecure: Annotated[
        bool, typer.Option("--insecure", help="No TLS, no node authentication: a demo only.")
    ] = False,
) -> None:
    """Run this node's SuperNode (TLS, its Flower auth key, its policy) until it stops."""
    from clients.daemon import NodeDeploymentError, load_deployment, run_node

    try:
        node = load_deployment(kit, insecure=insecure)
    except NodeDeploymentError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    try:
        code = run_node(node, insecure=insecure, echo=typer.echo)
    except (OSError, NodeDeploymentError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    raise typer.Exit(code)


@roster_app.command("install")
def roster_install(
    roster: Annotated[Path, typer.Argument(help="The new roster (roster.dsse.json).")],
    kit: Annotated[Path, typer.Option("--kit", help="The node kit folder.")],
) -> None:
    """Install a newer roster signed by a trusted operator (after add-node / revoke-node)."""
    from datetime import UTC, datetime

    from clients.credentials import CredentialsError, install_roster

    try:
        installed = install_roster(kit, roster.read_bytes(), now=datetime.now(UTC))
    except (CredentialsError, OSError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_INVALID) from None
    typer.echo(
        f"roster of {installed.federation!r} issued {installed.issued_at:%Y-%m-%dT%H:%M:%SZ} "
        f"installed in {kit} ({len(installed.entries)} member(s))"
    )


def register(app: typer.Typer) -> None:
    """Attach the ``node`` command group to the root ``fedbrain`` app."""
    app.add_typer(node_app, name="node")
