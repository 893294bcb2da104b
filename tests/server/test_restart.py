"""Restart safety: owners, runs whose process died, what an interrupted round costs."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.checkpoint import (
    JSONValue,
    mark_released,
    read_accountant_state,
    resume_point,
    write_accountant_state,
)
from server.cli import app
from server.ledger import Ledger, RunStatus
from server.restart import (
    RunStillRunningError,
    _start_time,
    mark_interrupted_runs,
    owner_alive,
    record_resume,
    take_over,
    this_process,
)

HASH = "sha256:" + "ab" * 32
runner = CliRunner()


def _dead_owner() -> str:
    """The owner string of a process that has exited (recorded while it ran)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = f"{socket.gethostname()}:{child.pid}:{_start_time(child.pid)}"
    finally:
        child.kill()
        child.wait()
    return owner


def _start(ledger: Ledger, run_id: str, owner: str | None) -> None:
    ledger.start_run(
        run_id=run_id,
        artifact_name="sensing-iot-normalizer-v1",
        job={"component": "sensing"},
        privacy_level="dp",
        owner=owner,
    )


def test_this_process_is_alive_and_an_exited_one_is_not() -> None:
    assert owner_alive(this_process()) is True
    assert owner_alive(_dead_owner()) is False


def test_an_owner_on_another_host_or_no_owner_cannot_be_judged() -> None:
    assert owner_alive(f"not-{socket.gethostname()}:1:1") is None
    assert owner_alive(None) is None
    assert owner_alive("garbage") is None


def test_runs_whose_process_died_are_marked_interrupted_and_live_ones_are_left(
    tmp_path: Path,
) -> None:
    with Ledger.for_run_dir(tmp_path) as ledger:
        _start(ledger, "dead", _dead_owner())
        _start(ledger, "alive", this_process())
        _start(ledger, "elsewhere", "other-host:12:34")
        _start(ledger, "legacy", None)
        assert mark_interrupted_runs(ledger) == ["dead"]
        statuses = {r.run_id: r.status for r in ledger.list_runs()}
        run = ledger.get_run("dead")
    assert statuses == {
        "dead": RunStatus.INTERRUPTED,
        "alive": RunStatus.RUNNING,
        "elsewhere": RunStatus.RUNNING,
        "legacy": RunStatus.RUNNING,
    }
    assert run.finished_at is not None and "is gone" in (run.error or "")


def test_a_run_still_running_cannot_be_taken_over(tmp_path: Path) -> None:
    with Ledger.for_run_dir(tmp_path) as ledger:
        _start(ledger, "alive", this_process())
        with pytest.raises(RunStillRunningError, match="still running"):
            take_over(ledger, "alive")
        _start(ledger, "dead", _dead_owner())
        take_over(ledger, "dead")
        assert ledger.get_run("dead").status is RunStatus.INTERRUPTED
        ledger.resume_run("dead", from_round=0, owner=this_process())
        resumed = ledger.get_run("dead")
    assert resumed.status is RunStatus.RUNNING and resumed.owner == this_process()


def test_runs_list_marks_a_dead_run_interrupted_and_counts_charged_interruptions(
    tmp_path: Path,
) -> None:
    with Ledger.for_run_dir(tmp_path) as ledger:
        _start(ledger, "dead", _dead_owner())
        ledger.record_interruption("dead", {"round": 2, "at": "x", "charged": True})
        ledger.record_interruption("dead", {"round": 3, "at": "y", "charged": False})
    listed = runner.invoke(app, ["runs", "list", "--run-dir", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    assert "interrupted" in listed.stdout and "2 (1 charged)" in listed.stdout
    shown = runner.invoke(app, ["runs", "show", "dead", "--run-dir", str(tmp_path)])
    assert "interrupted in round 2" in shown.stdout and "charged: its privacy cost" in shown.stdout
    assert "interrupted in round 3" in shown.stdout and "not charged" in shown.stdout


def test_an_older_ledger_learns_the_interrupted_status(tmp_path: Path) -> None:
    """A ledger created before ``interrupted`` existed has a narrower CHECK on runs.status."""
    with Ledger.for_run_dir(tmp_path) as ledger:
        _start(ledger, "old", _dead_owner())
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name='runs'").fetchone()[0]
        narrow = sql.replace(", 'interrupted'", "")
        assert narrow != sql
        version = db.execute("PRAGMA schema_version").fetchone()[0]
        db.execute("PRAGMA writable_schema=ON")
        db.execute("UPDATE sqlite_master SET sql=? WHERE name='runs'", (narrow,))
        db.execute(f"PRAGMA schema_version={version + 1}")
    with Ledger.for_run_dir(tmp_path) as ledger:
        assert mark_interrupted_runs(ledger) == ["old"]
        assert ledger.get_run("old").status is RunStatus.INTERRUPTED


# ------------------------------------------------------------------ interrupted rounds and epsilon


def _state(epsilon: float) -> dict[str, JSONValue]:
    return {"history": [[epsilon]]}


def test_an_interrupted_round_that_released_nothing_is_refunded(tmp_path: Path) -> None:
    write_accountant_state(
        tmp_path,
        round_number=2,
        accountant=_state(2.0),
        training_config_hash=HASH,
        before=_state(1.0),
    )
    point = resume_point(tmp_path, training_config_hash=HASH)
    assert point is not None and point.interrupted is not None
    assert point.interrupted.round == 2 and not point.interrupted.charged
    assert point.accountant == _state(1.0) and point.accountant_round == 1


def test_an_interrupted_round_that_released_something_stays_charged(tmp_path: Path) -> None:
    write_accountant_state(
        tmp_path,
        round_number=2,
        accountant=_state(2.0),
        training_config_hash=HASH,
        before=_state(1.0),
    )
    assert mark_released(tmp_path, 2) is True
    assert mark_released(tmp_path, 2) is False  # idempotent
    assert mark_released(tmp_path, 3) is False  # not the round under way
    point = resume_point(tmp_path, training_config_hash=HASH)
    assert point is not None and point.interrupted is not None and point.interrupted.charged
    assert point.accountant == _state(2.0)


def test_an_accountant_file_without_a_before_state_is_charged(tmp_path: Path) -> None:
    write_accountant_state(
        tmp_path, round_number=1, accountant=_state(1.0), training_config_hash=HASH
    )
    snapshot = read_accountant_state(tmp_path, training_config_hash=HASH)
    assert snapshot is not None and snapshot.released and snapshot.before is None
    point = resume_point(tmp_path, training_config_hash=HASH)
    assert point is not None and point.interrupted is not None and point.interrupted.charged


def test_a_resume_records_the_interruption_in_the_ledger(tmp_path: Path) -> None:
    write_accountant_state(
        tmp_path,
        round_number=1,
        accountant=_state(2.0),
        training_config_hash=HASH,
        before=_state(0.0),
    )
    point = resume_point(tmp_path, training_config_hash=HASH)
    with Ledger.for_run_dir(tmp_path) as ledger:
        _start(ledger, "r", this_process())
        note = record_resume(ledger, "r", point, 0)
        entries = ledger.get_run("r").interruptions
    assert "round 1 was interrupted" in note and "refunded" in note
    assert len(entries) == 1 and entries[0]["round"] == 1 and entries[0]["charged"] is False
    assert datetime.fromisoformat(str(entries[0]["at"])).tzinfo == UTC
