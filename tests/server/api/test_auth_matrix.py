"""The role matrix over every route: 401 without a usable key, 403 for a role below the
route's permission, through otherwise; a revoked key stops at once; keys stay secret."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from server.api.app import ROUTE_PERMISSIONS
from server.api.auth import PERMISSIONS, Role
from tests.server.api.conftest import Api

PARAMS = {"{job_id}": "job-unknown", "{run_id}": "run-unknown", "{key_id}": "000000000000"}


def _path(template: str) -> str:
    for name, value in PARAMS.items():
        template = template.replace(name, value)
    return template


def _call(api: Api, method: str, path: str, headers: dict[str, str]) -> int:
    body: dict[str, Any] = {"json": {}} if method == "POST" else {}
    return int(api.client.request(method, _path(path), headers=headers, **body).status_code)


def test_the_permission_table_covers_every_route_of_the_app(api: Api) -> None:
    routes = {
        (method, route.path)
        for route in api.client.app.routes  # type: ignore[attr-defined]
        for method in getattr(route, "methods", set()) - {"HEAD"}
        if route.path.startswith("/api/v1") or route.path == "/metrics"
    }
    assert routes == set(ROUTE_PERMISSIONS)


@pytest.mark.parametrize(("method", "path"), sorted(ROUTE_PERMISSIONS))
def test_role_matrix(api: Api, method: str, path: str) -> None:
    needed = PERMISSIONS[ROUTE_PERMISSIONS[(method, path)]]
    assert _call(api, method, path, {}) == 401
    assert _call(api, method, path, {"Authorization": "Bearer fbk_nope"}) == 401
    assert _call(api, method, path, {"X-API-Key": api.keys["admin"] + "x"}) == 401
    assert _call(api, method, path, {"Authorization": "Basic " + api.keys["admin"]}) == 401
    for role in Role:
        status = _call(api, method, path, api.headers(role.value))
        if role.rank >= needed.rank:
            assert status not in (401, 403), (role, status)
        else:
            assert status == 403, (role, status)


def test_a_revoked_key_stops_working_at_once(api: Api) -> None:
    created = api.client.post(
        "/api/v1/keys", headers=api.headers("admin"), json={"name": "ci", "role": "operator"}
    ).json()
    mine = {"X-API-Key": created["key"]}
    assert api.client.get("/api/v1/whoami", headers=mine).json()["role"] == "operator"
    revoked = api.client.delete(f"/api/v1/keys/{created['key_id']}", headers=api.headers("admin"))
    assert revoked.json()["revoked"] is True
    assert api.client.get("/api/v1/whoami", headers=mine).status_code == 401


def test_rotation_gives_a_new_key_and_kills_the_old_one(api: Api) -> None:
    created = api.client.post(
        "/api/v1/keys", headers=api.headers("admin"), json={"name": "bot", "role": "viewer"}
    ).json()
    rotated = api.client.post(
        f"/api/v1/keys/{created['key_id']}/rotate", headers=api.headers("admin")
    ).json()
    assert rotated["role"] == "viewer" and rotated["key"] != created["key"]
    assert (
        api.client.get("/api/v1/whoami", headers={"X-API-Key": created["key"]}).status_code == 401
    )
    assert (
        api.client.get("/api/v1/whoami", headers={"X-API-Key": rotated["key"]}).status_code == 200
    )


def test_keys_are_stored_hashed_never_listed_and_never_logged(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = api.client.post(
        "/api/v1/keys", headers=api.headers("admin"), json={"name": "x", "role": "viewer"}
    ).json()
    secret = created["key"]
    api.client.get("/api/v1/whoami", headers={"X-API-Key": secret})
    listing = api.client.get("/api/v1/keys", headers=api.headers("admin")).text
    assert secret not in listing
    engine = create_engine(api.database_url)
    with engine.connect() as conn:
        stored = conn.execute(
            text("SELECT key_hash FROM api_keys WHERE key_id = :k"), {"k": created["key_id"]}
        ).scalar_one()
        dump = " ".join(str(row) for row in conn.execute(text("SELECT * FROM api_keys")))
    engine.dispose()
    assert stored == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in dump
    assert all(secret not in record.getMessage() for record in caplog.records)
    response = api.client.get("/api/v1/whoami", headers={"X-API-Key": secret})
    assert "set-cookie" not in response.headers


def test_cors_is_closed_by_default(api: Api) -> None:
    response = api.client.options(
        "/api/v1/runs",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
    )
    assert "access-control-allow-origin" not in response.headers
    plain = api.client.get(
        "/api/v1/runs", headers={**api.headers("viewer"), "Origin": "https://evil.example"}
    )
    assert "access-control-allow-origin" not in plain.headers
