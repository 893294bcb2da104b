"""`fedbrain runs list` and `fedbrain runs show` through the root app."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.cli import app
from server.ledger import (
    LEDGER_FILENAME,
    Ledger,
    Participant,
    ParticipantOutcome,
    RoundRecord,
    RunStatus,
)

runner = CliRunner()
FIXED = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "run"
    with Ledger.for_run_dir(directory, clock=lambda: FIXED) as ledger:
        ledger.start_run(
            run_id="run-a",
            artifact_name="vision-vit-base16-embed-v1",
            job={"component": "vision"},
            privacy_level="dp",
            dp_unit="node",
        )
        for number, loss in ((1, 0.9), (2, 0.7)):
            ledger.record_round(
                "run-a",
                RoundRecord(
                    round=number,
                    sampled=5,
                    responded=4,
                    dropped_by_stage={"train": 1},
                    metrics={
                        "train": {"train_loss": 2.0},
                        "eval": {"eval_loss": loss, "eval_accuracy": 0.61},
                    },
                    epsilon=0.5 * number,
                    reliability=0.75,
                    reliability_reasons=("[low] participation 80%",),
                    noise_to_signal=math.inf,
                    participants=(Participant(3, "vision", ParticipantOutcome.CONTRIBUTED),),
                ),
            )
        ledger.finish_run(
            "run-a", RunStatus.COMPLETED, final_epsilon=1.0, delta=1e-5, reliability=0.75
        )
        ledger.start_run(
            run_id="run-b", artifact_name="audio-x-v1", job={}, privacy_level="secure-agg"
        )
    return directory


def test_runs_list_prints_one_row_per_run(run_dir: Path) -> None:
    result = runner.invoke(app, ["runs", "list", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "vision-vit-base16-embed-v1" in result.stdout
    assert "run-a" in result.stdout
    assert "run-b" in result.stdout
    assert "completed" in result.stdout
    assert "dp (node)" in result.stdout
    assert "2025-03-01 12:00:00Z" in result.stdout


def test_runs_list_json_reports_status_rounds_and_epsilon(run_dir: Path) -> None:
    result = runner.invoke(app, ["runs", "list", "--run-dir", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["run_id"]: row for row in json.loads(result.stdout)}
    assert rows["run-a"]["status"] == "completed"
    assert rows["run-a"]["rounds_recorded"] == 2
    assert rows["run-a"]["final_epsilon"] == 1.0
    assert rows["run-b"]["status"] == "running"


def test_runs_list_reads_a_database_url(run_dir: Path) -> None:
    url = f"sqlite:///{run_dir / LEDGER_FILENAME}"
    result = runner.invoke(app, ["runs", "list", "--db", url, "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 2


def test_runs_show_prints_the_rounds_table(run_dir: Path) -> None:
    result = runner.invoke(app, ["runs", "show", "run-a", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    round_two = next(line for line in lines if "0.7" in line and "5/4/1" in line)
    assert "0.610" in round_two  # accuracy from the eval metrics
    assert "[low] participation 80%" in result.stdout  # reasons are not read as markup


def test_runs_show_json_has_the_run_and_strict_json_rounds(run_dir: Path) -> None:
    result = runner.invoke(app, ["runs", "show", "run-a", "--run-dir", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert document["run"]["run_id"] == "run-a"
    assert [r["round"] for r in document["rounds"]] == [1, 2]
    assert document["rounds"][1]["metrics"]["eval"]["eval_loss"] == 0.7
    assert document["rounds"][0]["noise_to_signal"] == "Infinity"
    assert document["rounds"][0]["participants"][0]["node_id"] == 3


def test_runs_show_an_unknown_run_exits_2_with_a_hint(run_dir: Path) -> None:
    result = runner.invoke(app, ["runs", "show", "nope", "--run-dir", str(run_dir)])
    assert result.exit_code == 2
    assert "No run 'nope'" in result.stderr
    assert "fedbrain runs list" in result.stderr


def test_runs_list_without_a_ledger_exits_2_and_creates_nothing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["runs", "list", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "No ledger at" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_runs_list_needs_exactly_one_ledger_source(run_dir: Path) -> None:
    neither = runner.invoke(app, ["runs", "list"], env={"FEDBRAIN_LEDGER_URL": ""})
    assert neither.exit_code == 2
    assert "--run-dir DIR or --db URL" in neither.stderr
    both = runner.invoke(app, ["runs", "list", "--run-dir", str(run_dir), "--db", "sqlite://"])
    assert both.exit_code == 2
    assert "not both" in both.stderr


def test_runs_show_names_its_columns_and_lists_refused_nodes(run_dir: Path) -> None:
    with Ledger.for_run_dir(run_dir) as ledger:
        ledger.record_refused_nodes("run-a", {9: "not eligible: no local data"})
    result = runner.invoke(app, ["runs", "show", "run-a", "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    for column in ("eval loss", "eval accuracy", "train loss", "epsilon spent"):
        assert column in result.stdout
    assert "refused node 9: not eligible: no local data" in result.stdout
    shown = runner.invoke(app, ["runs", "show", "run-a", "--run-dir", str(run_dir), "--json"])
    assert json.loads(shown.stdout)["refused_nodes"][0]["reason"] == "not eligible: no local data"


def test_a_file_that_is_not_a_ledger_is_one_line_exit_two(tmp_path: Path) -> None:
    (tmp_path / "ledger.sqlite").write_bytes(b"garbage" * 100)
    result = runner.invoke(app, ["runs", "list", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Is it a fedbrain ledger database?" in result.stderr and "[SQL" not in result.stderr
