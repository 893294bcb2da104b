"""A SQLite ledger keeps the paths of its own folder relative: the folder can move."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from server.ledger import Ledger, RunStatus

JOB = {"component": "sensing"}


def _finish_with_bundle(ledger: Ledger, run_id: str, bundle: Path) -> None:
    ledger.start_run(run_id=run_id, artifact_name="a", job=JOB, privacy_level="none")
    ledger.finish_run(run_id, RunStatus.COMPLETED, bundle_path=bundle)


def _stored(database: Path, run_id: str) -> str:
    with sqlite3.connect(database) as connection:
        (value,) = connection.execute(
            "SELECT bundle_path FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
    return str(value)


def test_bundle_path_in_the_ledgers_folder_is_stored_relative_and_read_where_it_is_now(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    bundle = out / "runs" / "a" / "a.zip"
    outside = tmp_path / "elsewhere" / "b.zip"
    with Ledger.for_run_dir(out) as ledger:
        _finish_with_bundle(ledger, "inside", bundle)
        _finish_with_bundle(ledger, "outside", outside)
        assert ledger.get_run("inside").bundle_path == str(bundle.resolve())
    assert _stored(out / "ledger.sqlite", "inside") == "runs/a/a.zip"
    assert _stored(out / "ledger.sqlite", "outside") == str(outside.resolve())

    moved = tmp_path / "moved"
    out.rename(moved)
    with Ledger.for_run_dir(moved, create=False) as ledger:
        by_id = {run.run_id: run.bundle_path for run in ledger.list_runs()}
        assert ledger.get_run("inside").bundle_path == by_id["inside"]
    assert by_id == {
        "inside": str((moved / "runs" / "a" / "a.zip").resolve()),
        "outside": str(outside.resolve()),
    }


def test_a_copied_run_names_its_bundle_absolute_in_a_ledger_elsewhere(tmp_path: Path) -> None:
    bundle = tmp_path / "out" / "runs" / "a" / "a.zip"
    with (
        Ledger.for_run_dir(tmp_path / "out") as source,
        Ledger.for_run_dir(tmp_path / "api" / "db") as target,
    ):
        _finish_with_bundle(source, "r1", bundle)
        target.sync_run_from(source, "r1")
        assert target.get_run("r1").bundle_path == str(bundle.resolve())
    assert _stored(tmp_path / "api" / "db" / "ledger.sqlite", "r1") == str(bundle.resolve())
    with Ledger("sqlite://") as memory:  # no folder of its own: absolute
        _finish_with_bundle(memory, "r2", Path("relative.zip"))
        assert memory.get_run("r2").bundle_path == str(Path("relative.zip").resolve())
