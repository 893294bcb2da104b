"""The output folder of `fedbrain simulate`: one run at a time, one ledger, relative paths.

The slow tests run the real CLI as subprocesses (or in-process) on a tiny sensing scenario.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from manifests.keys import TrustedKeys
from manifests.verify import verify_bundle
from server.ledger import Ledger, RunStatus
from server.options import JobOutcome, JobStatus, RunOptions
from simulations.outfolder import (
    LOCK_FILE,
    RUN_MARKER,
    LockHolder,
    OutputFolderInUseError,
    default_ledger_url,
    locked_output_folder,
    previous_outcomes,
    resumable_run_id,
    write_run_marker,
)
from simulations.runner import ExitCode

TINY = """\
[simulation]
name = "tiny-folder"
seed = 3
round_timeout = 120.0
node_wait_timeout = 60.0

[[nodes]]
type = "sensing"
count = 3
modalities = ["iot"]
examples = 64
partition = "iid"

[[jobs]]
component = "sensing"
base_model = "iot"
task = "normalizer"
privacy_level = "secure-agg"
federation = { num_rounds = 1, reliability_threshold = 0.1 }
"""
ARTIFACT = "sensing-iot-normalizer-v1"
BUNDLE = f"runs/{ARTIFACT}/{ARTIFACT}.zip"


def _fedbrain(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("fedbrain")), *args]


def _scenario(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY, "utf-8")
    return path


def _holder(out: Path) -> LockHolder | None:
    try:
        return LockHolder.from_bytes((out / LOCK_FILE).read_bytes())
    except OSError:
        return None


def _files_naming(folder: Path, text: str) -> list[str]:
    """The files under ``folder`` whose bytes contain ``text``."""
    needle = text.encode()
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and needle in p.read_bytes()
    )


# ======================================================================= the lock itself


_HOLD = """
import sys, time
from pathlib import Path
from simulations.outfolder import locked_output_folder
with locked_output_folder(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_lock_of_a_killed_process_does_not_block_the_next_run(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(OutputFolderInUseError) as refused, locked_output_folder(tmp_path):
            pass  # held while it lives
        assert refused.value.holder is not None and refused.value.holder.pid == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (tmp_path / LOCK_FILE).is_file()  # the dead run's lock file is still there ...
    with locked_output_folder(tmp_path) as mine:  # ... and does not block
        assert mine.pid == os.getpid()
        assert _holder(tmp_path) == mine
    with locked_output_folder(tmp_path):  # released at the end of the block
        pass


def test_run_into_a_folder_in_use_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    from server.cli import app

    out = tmp_path / "out"
    out.mkdir()
    with locked_output_folder(out) as holder:
        result = CliRunner().invoke(app, ["simulate", str(_scenario(tmp_path)), "--out", str(out)])
    assert result.exit_code == ExitCode.FAILED, result.output
    message = " ".join(result.output.split())
    assert f"The output folder {out.resolve()} is in use by another `fedbrain simulate`" in message
    assert f"(pid {os.getpid()} on host {socket.gethostname()}, started {holder.started_at})" in (
        message
    )
    assert "choose another --out" in message
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no keys, data, ledger, runs


# ======================================================================= ledger, run ids


def test_database_url_reaches_every_job_with_the_run_id_its_folder_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.federator
    from server.cli import app

    seen: list[RunOptions] = []

    def record(grid: object, job: object, options: RunOptions, **kwargs: object) -> object:
        seen.append(options)
        raise RuntimeError("stop before the federation")

    # the runner calls server.federator.run_federation on the engine's grid, once per job
    monkeypatch.setattr(server.federator, "run_federation", record)
    out, database = tmp_path / "out", tmp_path / "fleet.sqlite"
    url = f"sqlite:///{database}"
    command = ["simulate", str(_scenario(tmp_path)), "--out", str(out), "--database-url", url]
    result = CliRunner().invoke(app, command)

    assert result.exit_code == ExitCode.FAILED, result.output
    (options,) = seen
    assert options.database_url == url and database.is_file()
    assert not (out / "ledger.sqlite").exists()
    marker = json.loads((out / "runs" / ARTIFACT / RUN_MARKER).read_text())
    assert options.run_id is not None and marker["run_id"] == options.run_id
    # without --database-url: the ledger in the output folder
    seen.clear()
    CliRunner().invoke(app, command[:4])
    assert seen[0].database_url == default_ledger_url(out)
    assert seen[0].run_id != options.run_id


def test_resume_reopens_only_the_run_its_folder_records(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.sqlite'}"
    job = {"component": "sensing"}
    with Ledger(url) as ledger:
        for run_id in ("mine", "other-folder"):  # same job, both unfinished
            ledger.start_run(run_id=run_id, artifact_name=ARTIFACT, job=job, privacy_level="none")
    run_dir = tmp_path / "out" / "runs" / ARTIFACT
    run_dir.mkdir(parents=True)
    assert resumable_run_id(run_dir, url) is None  # nothing recorded: never a guess
    write_run_marker(run_dir, "mine")
    assert resumable_run_id(run_dir, url) == "mine"
    with Ledger(url) as ledger:
        ledger.finish_run("mine", RunStatus.COMPLETED)
    assert resumable_run_id(run_dir, url) is None  # completed: a new run
    # an older folder: the run id in nodes.json, the run in the run folder's own ledger
    (run_dir / RUN_MARKER).write_text("written by fedbrain simulate\n")
    (run_dir / "nodes.json").write_text(json.dumps({"run_id": "old", "refused": []}))
    with Ledger.for_run_dir(run_dir) as own:
        own.start_run(run_id="old", artifact_name=ARTIFACT, job=job, privacy_level="none")
    assert resumable_run_id(run_dir, url) == "old"
    with Ledger(url) as ledger:
        assert ledger.get_run("old").status is RunStatus.RUNNING  # copied over


def test_older_summary_with_absolute_paths_is_read_in_the_moved_folder(tmp_path: Path) -> None:
    old, moved = "/somewhere/else/out", tmp_path / "moved"
    moved.mkdir()
    entry = {
        "artifact_name": ARTIFACT,
        "status": "passed",
        "run_id": "r1",
        "rounds_completed": 1,
        "bundle": f"{old}/{BUNDLE}",
        "manifest": f"{old}/runs/{ARTIFACT}/artifact_manifest.json",
        "ledger_url": f"sqlite:///{old}/runs/{ARTIFACT}/ledger.sqlite",
    }
    failed = {**entry, "artifact_name": "other", "status": "failed"}
    document = {"out": old, "jobs": [entry, failed]}
    (moved / "summary.json").write_text(json.dumps(document))
    (done,) = previous_outcomes(moved).values()
    assert isinstance(done, JobOutcome) and done.status is JobStatus.PASSED
    assert done.bundle == moved / BUNDLE
    assert done.manifest == moved / "runs" / ARTIFACT / "artifact_manifest.json"


# ============================================================================ end to end


@pytest.mark.slow
def test_second_simulate_into_a_folder_in_use_is_refused_and_the_first_run_stays_intact(
    tmp_path: Path,
) -> None:
    scenario, out = _scenario(tmp_path), tmp_path / "out"
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(
        _fedbrain("simulate", str(scenario), "--out", str(out)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while (held := _holder(out)) is None or held.pid != first.pid:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run did not take the folder in 120 s"
            time.sleep(0.1)
        second = subprocess.run(
            _fedbrain("simulate", str(scenario), "--out", str(out)),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert first.poll() is None  # refused while the first was running
        assert second.returncode == ExitCode.FAILED, second.stdout + second.stderr
        message = " ".join(second.stderr.split())
        assert f"The output folder {out.resolve()} is in use by another `fedbrain simulate` " in (
            message
        )
        assert f"(pid {first.pid} on host {socket.gethostname()}, started {held.started_at})" in (
            message
        )
        assert first.wait(timeout=300) == ExitCode.OK, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        log.close()

    summary = json.loads((out / "summary.json").read_text())
    (job,) = summary["jobs"]
    assert (job["status"], job["verification"], job["bundle"]) == ("passed", "verified", BUNDLE)
    with Ledger.for_run_dir(out, create=False) as ledger:  # every job's runs, one ledger
        (run,) = ledger.list_runs()  # the first run's, and nothing of the refused one
        rounds = ledger.rounds(run.run_id)
    assert run.run_id == job["run_id"] and run.status is RunStatus.COMPLETED
    assert [r.round for r in rounds] == [1]
    assert run.bundle_path is not None and Path(run.bundle_path).samefile(out / BUNDLE)
    trusted = TrustedKeys.load(out / "keys" / "trusted_keys.json")
    assert verify_bundle(out / BUNDLE, trusted).manifest.provenance.run_id == run.run_id


@pytest.mark.slow
def test_moved_output_folder_resumes_and_names_no_file_by_its_old_place(tmp_path: Path) -> None:
    from server.cli import app

    scenario, out = _scenario(tmp_path), tmp_path / "out"
    first = CliRunner().invoke(app, ["simulate", str(scenario), "--out", str(out)])
    assert first.exit_code == ExitCode.OK, first.output
    run_id = json.loads((out / "summary.json").read_text())["jobs"][0]["run_id"]
    moved = tmp_path / "moved"
    out.rename(moved)
    assert _files_naming(moved, str(out)) == []  # summary, ledger, markers, kits: relative

    again = CliRunner().invoke(app, ["simulate", str(scenario), "--out", str(moved), "--resume"])
    assert again.exit_code == ExitCode.OK, again.output
    (job,) = json.loads((moved / "summary.json").read_text())["jobs"]
    assert job["skipped"] is True and job["verification"] == "verified"  # found where it is now
    assert (job["run_id"], job["bundle"], job["ledger"]) == (run_id, BUNDLE, "ledger.sqlite")
    with Ledger.for_run_dir(moved, create=False) as ledger:
        (run,) = ledger.list_runs()
    assert run.bundle_path is not None and Path(run.bundle_path).samefile(moved / BUNDLE)
    assert not out.exists() and _files_naming(moved, str(out)) == []
