"""Fixtures shared by the server tests: a real PostgreSQL server (one per session)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.postgres import PostgresServer, postgres_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh, empty database: a SQLite file, or a new database on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('db') / 'ledger.sqlite'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()
