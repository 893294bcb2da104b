"""CLI groups driven by ``manifests``.

``cli_form`` holds the learning-form commands (``catalog``, ``job``); ``cli_bundle`` holds the
signing commands (``keys``, ``bundle``, ``verify``, ``demo``).
"""

from __future__ import annotations

import typer

from manifests import cli_bundle, cli_form


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root ``fedbrain`` app."""
    cli_form.register(app)
    cli_bundle.register(app)
