"""The dependency rules of DESIGN.md, checked on the source (not on what happens to load).

- ``aggregation/`` and ``manifests/`` are the framework-free core: they import no ``flwr`` and
  nothing from ``server``, ``clients`` or ``simulations``;
- ``clients/`` (the node) never imports ``server`` or ``simulations``;
- ``server/`` never imports ``simulations`` (the simulation runner drives the ServerApp, not
  the other way round) and imports only the parts of ``clients`` that describe a job and the
  wire: never the node itself, its data or its training;
- no production module is longer than :data:`MAX_LINES` lines.

Every ``import`` and ``from ... import`` statement counts, including those inside functions
and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest

ROOT: Final = Path(__file__).resolve().parent.parent
PACKAGES: Final = ("aggregation", "manifests", "clients", "server", "simulations")
MAX_LINES: Final = 800

FORBIDDEN: Final[dict[str, tuple[str, ...]]] = {
    "aggregation": ("flwr", "server", "clients", "simulations"),
    "manifests": ("flwr", "server", "clients", "simulations"),
    "clients": ("server", "simulations"),
    "server": ("simulations",),
}
SHARED_CLIENT_MODULES: Final = frozenset(
    {
        "clients",
        "clients.protocol",
        "clients.jobs",
        "clients.models",
        "clients.adaptation",
        "clients.checkpoints",
        "clients.sensing",
        "clients.credentials",
    }
)
"""What the server may import from ``clients``: the job interpretation, the wire contract, the
model builders (the server builds the global model), which tensors of it train and travel and
how adapters fold into a bundle (``clients.adaptation``), the base checkpoint's digest that
every node must match (``clients.checkpoints``), the normalizer math, and the layout of a
node's kit (which provisioning writes)."""


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text("utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:  # `from clients import node` imports clients.node
                yield node.lineno, f"{node.module}.{alias.name}"


def _top(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_follow_the_dependency_direction(package: str) -> None:
    violations = [
        f"{path.relative_to(ROOT)}:{line}: imports {name}"
        for path in _modules(package)
        for line, name in _imports(path)
        if _top(name) in FORBIDDEN[package]
    ]
    assert violations == []


def test_server_imports_only_the_shared_parts_of_clients() -> None:
    violations = []
    for path in _modules("server"):
        for line, name in _imports(path):
            if _top(name) != "clients":
                continue
            module = ".".join(name.split(".")[:2])
            if module not in SHARED_CLIENT_MODULES and name not in SHARED_CLIENT_MODULES:
                violations.append(f"{path.relative_to(ROOT)}:{line}: imports {name}")
    assert violations == []


def test_the_rules_catch_a_forbidden_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import flwr\nfrom clients import node\n\ndef f():\n    from simulations import runner\n"
    )
    names = [name for _, name in _imports(sample)]
    assert "flwr" in names and "clients.node" in names and "simulations.runner" in names


@pytest.mark.parametrize("package", PACKAGES)
def test_no_production_module_is_longer_than_the_limit(package: str) -> None:
    long = {
        str(path.relative_to(ROOT)): count
        for path in _modules(package)
        if (count := len(path.read_text("utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}
