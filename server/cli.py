"""The ``fedbrain`` console script.

The root command only assembles groups; each group lives in the package it drives
(``manifests.cli`` for catalog/job/keys/bundle/verify, ``simulations.cli`` for simulate, ...).
Every package's ``cli`` module exposes ``register(app)``.
"""

from __future__ import annotations

import typer

from manifests import cli as manifests_cli
from server import cli_runs
from server.api import cli as api_cli
from simulations import cli as simulations_cli

app = typer.Typer(
    name="fedbrain",
    no_args_is_help=True,
    add_completion=False,
    help="Federated learning with secure aggregation, differential privacy and signed artifacts.",
)

manifests_cli.register(app)
cli_runs.register(app)
simulations_cli.register(app)
api_cli.register(app)


def main() -> None:
    """Entry point of the ``fedbrain`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
