"""CLI groups driven by ``manifests``: catalog, job, keys, bundle, verify, demo."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach this package's commands to the root ``fedbrain`` app."""
