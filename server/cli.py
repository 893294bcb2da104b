"""The ``fedbrain`` console script.

The root command only assembles groups; each group lives in the package it drives
(``manifests.cli`` for catalog/job/keys/bundle/verify, ``server.cli_runs`` for runs,
``simulations.cli`` for simulate, ...). Every such module exposes ``register(app)`` and is
listed under the ``fedbrain.commands`` entry-point group in ``pyproject.toml``: the root finds
them there, so ``server`` never imports ``simulations`` (which runs the ServerApp, so the
dependency goes the other way).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Final, cast

import typer

__all__ = ["COMMAND_GROUP", "app", "main"]

COMMAND_GROUP: Final = "fedbrain.commands"

app = typer.Typer(
    name="fedbrain",
    no_args_is_help=True,
    add_completion=False,
    help="Federated learning with secure aggregation, differential privacy and signed artifacts.",
)


def _register_commands(root: typer.Typer) -> None:
    found = sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name)
    if not found:
        raise RuntimeError(
            f"No `{COMMAND_GROUP}` entry points: fedbrain is not installed (pip install -e .)."
        )
    for entry in found:
        register = cast(Callable[[typer.Typer], None], entry.load())
        register(root)


_register_commands(app)


def main() -> None:
    """Entry point of the ``fedbrain`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
