"""The run ledger (SQLAlchemy): runs, rounds, participants."""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

import server.ledger as ledger_module
from server.ledger import (
    LEDGER_FILENAME,
    DuplicateRoundError,
    DuplicateRunError,
    Ledger,
    LedgerError,
    Participant,
    ParticipantOutcome,
    Phase,
    RoundRecord,
    RoundStatus,
    RunFinishedError,
    RunNotFoundError,
    RunStatus,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
BIG_NODE_ID = 2**64 - 5  # Flower node ids are random uint64: past int64


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


@pytest.fixture
def ledger() -> Iterator[Ledger]:
    with Ledger("sqlite://", clock=FakeClock()) as led:
        yield led


def _start(ledger: Ledger, run_id: str = "run-1") -> None:
    ledger.start_run(
        run_id=run_id,
        run_name="demo",
        artifact_name="vision-vit-base16-embed-v1",
        job={"component": "vision", "federation.num_rounds": 3, "dp.delta": 1e-5},
        privacy_level="dp+secure-agg",
        dp_unit="node",
    )


def _round(number: int, **overrides: object) -> RoundRecord:
    fields: dict[str, object] = {
        "round": number,
        "sampled": 4,
        "responded": 3,
        "dropped_by_stage": {"masked_input": 1},
        "timings": {Phase.TRAIN: 2.5, Phase.SECAGG: 0.75, Phase.EVAL: 0.5},
        "metrics": {"train": {"loss": 1.5 / number}, "eval": {"loss": 1.2, "accuracy": 0.5}},
        "epsilon": 0.4 * number,
        "delta": 1e-5,
        "reliability": 0.8,
        "reliability_reasons": ("one node dropped after masking",),
        "update_norm": 0.3,
        "noise_to_signal": math.inf,
        "measurements": {"dp.noise_stddev": 0.1, "accountant": "rdp", "nan_metric": math.nan},
        "participants": (
            Participant(BIG_NODE_ID, "vision", ParticipantOutcome.CONTRIBUTED, "unmask"),
            Participant(
                7,
                "vision",
                ParticipantOutcome.DROPPED,
                "masked_input",
                "no reply before the timeout",
            ),
            Participant(7, "vision", ParticipantOutcome.CONTRIBUTED, "eval", None, Phase.EVAL),
        ),
    }
    fields.update(overrides)
    return RoundRecord(**fields)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field_of_a_round(ledger: Ledger) -> None:
    _start(ledger)
    written = _round(1)
    ledger.record_round("run-1", written)
    (read,) = ledger.rounds("run-1")
    assert read.round == 1
    assert read.status is RoundStatus.COMPLETED
    assert (read.sampled, read.responded, read.dropped) == (4, 3, 1)
    assert read.timings == {"train": 2.5, "secagg": 0.75, "eval": 0.5}
    assert read.metrics == written.metrics
    assert read.epsilon == pytest.approx(0.4)
    assert read.reliability_reasons == ("one node dropped after masking",)
    assert read.noise_to_signal == math.inf
    assert read.measurements["accountant"] == "rdp"
    assert math.isnan(float(read.measurements["nan_metric"]))
    assert read.recorded_at == T0 + timedelta(seconds=2)
    assert read.recorded_at.tzinfo is not None
    assert sorted(read.participants, key=lambda p: (p.phase, p.node_id)) == sorted(
        written.participants, key=lambda p: (p.phase, p.node_id)
    )
    assert any(p.node_id == BIG_NODE_ID for p in read.participants)


def test_a_nan_float_column_reads_back_as_none_while_measurements_keep_it(
    ledger: Ledger,
) -> None:
    _start(ledger)
    ledger.record_round("run-1", _round(1, update_norm=math.nan, measurements={"norm": math.nan}))
    (read,) = ledger.rounds("run-1")
    assert read.update_norm is None
    assert math.isnan(float(read.measurements["norm"]))


def test_start_run_records_a_running_run_with_its_job(ledger: Ledger) -> None:
    _start(ledger)
    run = ledger.get_run("run-1")
    assert run.status is RunStatus.RUNNING
    assert run.started_at == T0 + timedelta(seconds=1)
    assert run.job["federation.num_rounds"] == 3
    assert (run.privacy_level, run.dp_unit) == ("dp+secure-agg", "node")
    assert (run.rounds_recorded, run.last_round) == (0, 0)


def test_starting_the_same_run_twice_is_refused(ledger: Ledger) -> None:
    _start(ledger)
    with pytest.raises(DuplicateRunError, match="already in the ledger"):
        _start(ledger)


def test_recording_a_round_twice_is_refused_and_keeps_the_first(ledger: Ledger) -> None:
    _start(ledger)
    ledger.record_round("run-1", _round(1, sampled=4))
    with pytest.raises(DuplicateRoundError, match="Round 1 of run 'run-1' is already recorded"):
        ledger.record_round("run-1", _round(1, sampled=9))
    (read,) = ledger.rounds("run-1")
    assert read.sampled == 4


def test_the_same_round_number_in_two_runs_is_fine(ledger: Ledger) -> None:
    _start(ledger, "a")
    _start(ledger, "b")
    ledger.record_round("a", _round(1))
    ledger.record_round("b", _round(1))
    assert ledger.last_round("a") == ledger.last_round("b") == 1


def test_last_round_is_zero_without_rounds_and_the_highest_after(ledger: Ledger) -> None:
    _start(ledger)
    assert ledger.last_round("run-1") == 0
    for number in (1, 2, 3):
        ledger.record_round("run-1", _round(number))
    assert ledger.last_round("run-1") == 3


def test_rollback_deletes_later_rounds_and_their_participants(ledger: Ledger) -> None:
    _start(ledger)
    for number in (1, 2, 3, 4):
        ledger.record_round("run-1", _round(number))
    assert ledger.rollback_to("run-1", 2) == 2
    assert [r.round for r in ledger.rounds("run-1")] == [1, 2]
    assert ledger.last_round("run-1") == 2
    ledger.record_round("run-1", _round(3, sampled=2))  # the round can be recorded again
    assert ledger.rounds("run-1")[-1].sampled == 2
    with ledger._sessions() as session:
        rows = session.query(ledger_module.ParticipantRow).filter_by(round=4).count()
    assert rows == 0


def test_rollback_to_zero_deletes_every_round(ledger: Ledger) -> None:
    _start(ledger)
    ledger.record_round("run-1", _round(1))
    assert ledger.rollback_to("run-1", 0) == 1
    assert ledger.rounds("run-1") == []


def test_a_failing_write_loses_nothing_already_recorded(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    _start(ledger)
    ledger.record_round("run-1", _round(1))
    calls = {"n": 0}
    real = ledger_module._participant_row

    def crash_on_second(run_id: str, number: int, p: Participant) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(run_id, number, p)

    monkeypatch.setattr(ledger_module, "_participant_row", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        ledger.record_round("run-1", _round(2))
    monkeypatch.undo()
    assert [r.round for r in ledger.rounds("run-1")] == [1]
    assert len(ledger.rounds("run-1")[0].participants) == 3
    ledger.record_round("run-1", _round(2))  # nothing half-written blocks the retry
    assert ledger.last_round("run-1") == 2


def test_finish_run_records_the_verdict(ledger: Ledger) -> None:
    _start(ledger)
    ledger.record_round("run-1", _round(1))
    run = ledger.finish_run(
        "run-1",
        RunStatus.REJECTED,
        verdict_reasons=["reliability 0.31 below threshold 0.5"],
        final_epsilon=2.5,
        delta=1e-5,
        reliability=0.31,
    )
    assert run.status is RunStatus.REJECTED
    assert run.finished_at == T0 + timedelta(seconds=3)
    assert run.verdict_reasons == ("reliability 0.31 below threshold 0.5",)
    assert (run.final_epsilon, run.reliability, run.bundle_path) == (2.5, 0.31, None)
    assert (run.rounds_recorded, run.last_round) == (1, 1)


def test_a_finished_run_takes_no_rounds_and_cannot_finish_again(ledger: Ledger) -> None:
    _start(ledger)
    ledger.finish_run("run-1", "failed", error="boom")
    with pytest.raises(RunFinishedError, match="is failed; it takes no more rounds"):
        ledger.record_round("run-1", _round(1))
    with pytest.raises(RunFinishedError, match="already finished"):
        ledger.finish_run("run-1", RunStatus.COMPLETED)
    assert ledger.get_run("run-1").error == "boom"


def test_finish_run_refuses_running_and_unknown_statuses(ledger: Ledger) -> None:
    _start(ledger)
    with pytest.raises(ValueError, match="final status"):
        ledger.finish_run("run-1", RunStatus.RUNNING)
    with pytest.raises(ValueError, match="must be one of"):
        ledger.finish_run("run-1", "done")
    assert ledger.get_run("run-1").status is RunStatus.RUNNING


def test_resume_run_reopens_a_failed_run_at_its_checkpoint(ledger: Ledger) -> None:
    _start(ledger)
    for number in (1, 2, 3):
        ledger.record_round("run-1", _round(number))
    ledger.finish_run("run-1", RunStatus.FAILED, error="server crashed")
    assert ledger.resume_run("run-1", from_round=2) == 1
    run = ledger.get_run("run-1")
    assert (run.status, run.finished_at, run.error, run.last_round) == (
        RunStatus.RUNNING,
        None,
        None,
        2,
    )


def test_a_completed_run_cannot_be_resumed(ledger: Ledger) -> None:
    _start(ledger)
    ledger.finish_run("run-1", RunStatus.COMPLETED, bundle_sha256="sha256:" + "0" * 64)
    with pytest.raises(RunFinishedError, match="cannot be resumed"):
        ledger.resume_run("run-1", from_round=0)


def test_unknown_runs_raise_run_not_found(ledger: Ledger) -> None:
    with pytest.raises(RunNotFoundError, match="No run 'nope'"):
        ledger.get_run("nope")
    with pytest.raises(RunNotFoundError):
        ledger.record_round("nope", _round(1))
    with pytest.raises(RunNotFoundError):
        ledger.rollback_to("nope", 0)


def test_list_runs_is_newest_first_with_round_counts(ledger: Ledger) -> None:
    _start(ledger, "old")
    _start(ledger, "new")
    ledger.record_round("old", _round(1))
    ledger.record_round("old", _round(2))
    runs = ledger.list_runs()
    assert [(r.run_id, r.rounds_recorded) for r in runs] == [("new", 0), ("old", 2)]


def test_naive_datetimes_are_refused_and_offsets_are_stored_as_utc(ledger: Ledger) -> None:
    with pytest.raises(ValueError, match="`started_at` must be a timezone-aware datetime"):
        ledger.start_run(
            run_id="naive",
            artifact_name="a",
            job={},
            privacy_level="none",
            started_at=datetime(2025, 1, 1, 12, 0),
        )
    assert ledger.list_runs() == []
    paris = timezone(timedelta(hours=1))
    ledger.start_run(
        run_id="aware",
        artifact_name="a",
        job={},
        privacy_level="none",
        started_at=datetime(2025, 1, 1, 13, 0, tzinfo=paris),
    )
    assert ledger.get_run("aware").started_at == datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def test_invalid_round_records_are_refused_with_every_problem() -> None:
    with pytest.raises(ValueError, match=r"`round` must be an int >= 1.*`sampled`.*reliability"):
        RoundRecord(round=0, sampled=-1, reliability=1.5)
    with pytest.raises(ValueError, match="lists a node twice"):
        RoundRecord(
            round=1,
            participants=(
                Participant(1, "vision", ParticipantOutcome.CONTRIBUTED),
                Participant(1, "vision", ParticipantOutcome.DROPPED),
            ),
        )
    with pytest.raises(ValueError, match=r"node_id` must be in \[0, 2\*\*64 - 1\]"):
        Participant(2**64, "vision", ParticipantOutcome.CONTRIBUTED)


def test_a_run_dir_ledger_is_a_sqlite_file_that_persists(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "run-1"
    with Ledger.for_run_dir(run_dir, clock=FakeClock()) as first:
        _start(first)
        first.record_round("run-1", _round(1))
    assert (run_dir / LEDGER_FILENAME).is_file()
    with sqlite3.connect(run_dir / LEDGER_FILENAME) as raw:
        node_ids = {row[0] for row in raw.execute("SELECT node_id FROM participants")}
    assert str(BIG_NODE_ID) in node_ids
    with Ledger(f"sqlite:///{run_dir / LEDGER_FILENAME}") as reopened:
        assert reopened.last_round("run-1") == 1
        assert reopened.rounds("run-1")[0].participants[0].node_id in {7, BIG_NODE_ID}


def test_opening_a_missing_ledger_without_create_does_not_create_it(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="No ledger at"):
        Ledger.for_run_dir(tmp_path, create=False)
    assert list(tmp_path.iterdir()) == []


def test_an_invalid_url_says_what_a_valid_one_looks_like() -> None:
    with pytest.raises(LedgerError, match=r"sqlite:///path/ledger\.sqlite"):
        Ledger("not a url")
