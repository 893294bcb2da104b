"""An API app on a fresh database (SQLite and a real PostgreSQL), keys for every role."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import ApiSettings, create_app

TEMPLATE = Path(__file__).with_name("scenario_template.toml")


@dataclass
class Api:
    client: TestClient
    keys: dict[str, str]
    database_url: str
    data_dir: Path

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


def make_api(database_url: str, data_dir: Path, *, start_worker: bool = False) -> Api:
    app = create_app(
        ApiSettings(
            database_url=database_url,
            data_dir=data_dir,
            start_worker=start_worker,
            worker={"scenario_template": TEMPLATE, "cancel_grace": 5.0},
        )
    )
    state = app.state.fedbrain
    keys = {
        role: state.keys.create(name=f"test {role}", role=role, created_by="test")[1]
        for role in ("viewer", "operator", "admin")
    }
    return Api(TestClient(app), keys, database_url, data_dir)


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    made = make_api(database_url, tmp_path / "data")
    with made.client:
        yield made
