"""The audit log's hash chain: tampering directly in the database (edit, delete, reorder) is
found by `fedbrain audit verify`, which names each row -- on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from server.api.audit import Action, AuditLog
from server.api.store import ApiStore
from server.cli import app

runner = CliRunner()


def _log(database_url: str, rows: int = 6) -> None:
    store = ApiStore(database_url)
    log = AuditLog(store)
    for i in range(1, rows + 1):
        log.append(
            actor=f"key:{i:012d} (ci)",
            action=Action.JOB_SUBMITTED,
            target=f"job-{i}",
            details={"n": i},
        )
    store.close()


def _sql(database_url: str, *statements: str) -> None:
    engine = create_engine(database_url)
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))
    engine.dispose()


def _verify(database_url: str, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["audit", "verify", "--db", database_url, *args])
    return result.exit_code, result.output


def test_an_intact_log_verifies_and_prints_its_head(database_url: str) -> None:
    _log(database_url)
    code, output = _verify(database_url)
    assert code == 0, output
    assert "audit log intact: 6 rows, head 6:" in output


def test_an_edited_row_is_named(database_url: str) -> None:
    _log(database_url)
    _sql(database_url, "UPDATE audit_log SET target = 'job-evil' WHERE seq = 3")
    code, output = _verify(database_url)
    assert code == 1
    assert "row 3 (job.submitted job-evil): edited" in output
    assert output.count("edited") == 1


def test_an_edited_row_with_a_recomputed_hash_breaks_the_next_link(database_url: str) -> None:
    _log(database_url)
    _sql(database_url, "UPDATE audit_log SET hash = '" + "a" * 64 + "' WHERE seq = 2")
    code, output = _verify(database_url)
    assert code == 1
    assert "row 2 (job.submitted job-2): edited" in output
    assert "row 3 (job.submitted job-3): the row before it was deleted or edited" in output


def test_a_deleted_row_is_named(database_url: str) -> None:
    _log(database_url)
    _sql(database_url, "DELETE FROM audit_log WHERE seq = 4")
    code, output = _verify(database_url)
    assert code == 1
    assert "row 4: deleted -- the sequence jumps to 5" in output


def test_a_deleted_and_renumbered_row_is_found(database_url: str) -> None:
    _log(database_url)
    _sql(
        database_url,
        "DELETE FROM audit_log WHERE seq = 2",
        "UPDATE audit_log SET seq = seq - 1 WHERE seq > 2",
    )
    code, output = _verify(database_url)
    assert code == 1
    assert "row 2 (job.submitted job-3): the row before it was deleted or edited" in output


def test_reordered_rows_are_named(database_url: str) -> None:
    _log(database_url)
    _sql(
        database_url,
        "UPDATE audit_log SET seq = 100 WHERE seq = 3",
        "UPDATE audit_log SET seq = 3 WHERE seq = 4",
        "UPDATE audit_log SET seq = 4 WHERE seq = 100",
    )
    code, output = _verify(database_url)
    assert code == 1
    assert "row 3 (job.submitted job-4): reordered -- it was appended after the row now " in output
    assert "row 4 (job.submitted job-3): reordered" in output
    assert "edited" not in output


def test_rows_deleted_from_the_end_are_found_against_a_recorded_head(database_url: str) -> None:
    _log(database_url)
    code, output = _verify(database_url)
    head = output.strip().rsplit("head ", 1)[1]
    _sql(database_url, "DELETE FROM audit_log WHERE seq >= 5")
    assert _verify(database_url)[0] == 0  # a shorter chain is still a valid chain ...
    code, output = _verify(database_url, "--expect-head", head)
    assert code == 1 and "rows 5 to 6: deleted from the end" in output  # ... but not that head


def test_audit_verify_on_a_garbage_database_is_a_one_line_usage_error(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "garbage.sqlite"
    path.write_bytes(b"not a database" * 200)
    result = runner.invoke(app, ["audit", "verify", "--db", f"sqlite:///{path}"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_the_first_admin_key_from_the_cli_works_on_a_fresh_folder(tmp_path: object) -> None:
    from pathlib import Path

    from fastapi.testclient import TestClient

    from server.api.app import ApiSettings, create_app

    folder = Path(str(tmp_path)) / "fresh" / "api"
    db = f"sqlite:///{folder / 'fedbrain.sqlite'}"
    result = runner.invoke(
        app, ["api-keys", "create", "--name", "me", "--role", "admin", "--db", db]
    )
    assert result.exit_code == 0, result.output
    key = result.stdout.strip().splitlines()[-1]
    assert key.startswith("fbk_")
    with TestClient(create_app(ApiSettings(db, folder, start_worker=False))) as client:
        me = client.get("/api/v1/whoami", headers={"Authorization": f"Bearer {key}"}).json()
        assert (me["name"], me["role"]) == ("me", "admin")
        (row,) = client.get("/api/v1/audit", headers={"Authorization": f"Bearer {key}"}).json()
        assert (row["actor"], row["action"]) == ("cli", "key.created")
