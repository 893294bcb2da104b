"""Ledger additions for operators: refused nodes, Flower run ids, pages of runs, new rounds,
gathering per-run ledgers into one -- on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.ledger import (
    Ledger,
    LedgerError,
    RoundRecord,
    RunNotFoundError,
    RunStatus,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _start(ledger: Ledger, run_id: str, minutes: int = 0) -> None:
    ledger.start_run(
        run_id=run_id,
        artifact_name="sensing-iot-normalizer-v1",
        job={"component": "sensing"},
        privacy_level="dp+secure-agg",
        dp_unit="example",
        started_at=T0 + timedelta(minutes=minutes),
    )


def test_refused_nodes_are_stored_with_their_reasons(database_url: str) -> None:
    with Ledger(database_url) as ledger:
        _start(ledger, "run-1")
        big = 2**64 - 3
        added = ledger.record_refused_nodes(run_id="run-1", refused={big: "node type 'x'", 7: "no"})
        assert added == 2
        assert ledger.record_refused_nodes("run-1", {7: "another reason"}) == 0  # first kept
        refused = ledger.refused_nodes("run-1")
        assert [(n.node_id, n.reason) for n in refused] == [(7, "no"), (big, "node type 'x'")]
        with pytest.raises(RunNotFoundError):
            ledger.refused_nodes("nope")
        with pytest.raises(ValueError, match="non-empty"):
            ledger.record_refused_nodes("run-1", {8: ""})


def test_a_run_links_to_its_flower_run_id(database_url: str) -> None:
    with Ledger(database_url) as ledger:
        _start(ledger, "run-1")
        assert ledger.get_run("run-1").flower_run_id is None
        ledger.link_flower_run("run-1", 2**64 - 1)
        assert ledger.get_run("run-1").flower_run_id == 2**64 - 1
        assert ledger.get_run("run-1").to_json()["flower_run_id"] == str(2**64 - 1)
        with pytest.raises(ValueError, match="flower_run_id"):
            ledger.link_flower_run("run-1", -1)


def test_runs_come_in_pages_filtered_by_status_and_rounds_after_a_number(
    database_url: str,
) -> None:
    with Ledger(database_url) as ledger:
        for i in range(5):
            _start(ledger, f"run-{i}", minutes=i)
        ledger.finish_run("run-0", RunStatus.FAILED, error="boom")
        assert [r.run_id for r in ledger.list_runs(limit=2)] == ["run-4", "run-3"]
        assert [r.run_id for r in ledger.list_runs(limit=2, offset=2)] == ["run-2", "run-1"]
        assert [r.run_id for r in ledger.list_runs(status="failed")] == ["run-0"]
        assert ledger.count_runs() == 5 and ledger.count_runs(status=RunStatus.RUNNING) == 4
        for n in (1, 2, 3):
            ledger.record_round("run-4", RoundRecord(round=n, sampled=3, responded=3))
        assert [r.round for r in ledger.rounds("run-4", after=1)] == [2, 3]


def test_sync_gathers_a_per_run_ledger_into_one_without_duplicates(
    tmp_path: Path, database_url: str
) -> None:
    with Ledger.for_run_dir(tmp_path / "job") as source, Ledger(database_url) as target:
        _start(source, "run-a")
        source.record_round("run-a", RoundRecord(round=1, sampled=3, responded=3))
        source.record_refused_nodes("run-a", {5: "not eligible: no data"})
        assert target.sync_run_from(source, "run-a") == 1
        source.record_round("run-a", RoundRecord(round=2, sampled=3, responded=2))
        assert target.sync_run_from(source, "run-a") == 1
        assert target.sync_run_from(source, "run-a") == 0
        source.finish_run("run-a", RunStatus.COMPLETED, reliability=0.9, final_epsilon=2.0)
        target.sync_run_from(source, "run-a")
        run = target.get_run("run-a")
        assert (run.status, run.rounds_recorded, run.reliability) == (RunStatus.COMPLETED, 2, 0.9)
        assert [n.reason for n in target.refused_nodes("run-a")] == ["not eligible: no data"]


def test_an_older_ledger_without_the_new_column_is_upgraded_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with Ledger(f"sqlite:///{path}") as ledger:
        _start(ledger, "run-old")
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE runs DROP COLUMN flower_run_id")
    with Ledger(f"sqlite:///{path}", create=False) as ledger:
        assert ledger.get_run("run-old").flower_run_id is None


def test_a_garbage_file_is_one_line_error_not_a_sql_dump(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError) as info:
        Ledger(f"sqlite:///{path}", create=False)
    message = str(info.value)
    assert "\n" not in message and "[SQL" not in message
    assert "Is it a fedbrain ledger database?" in message
