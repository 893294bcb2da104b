"""The output folder of ``fedbrain simulate``: one run at a time, and paths that move with it.

**One run at a time.** A run holds an exclusive ``flock`` on ``<out>/.fedbrain-simulate.lock``
from before it writes anything until it ends (:func:`locked_output_folder`). A second run into
the folder is refused at once with :class:`OutputFolderInUseError`, which names the folder and
the holder (pid, host, start time, written into the lock file); it never waits and deletes
nothing. The operating system drops the lock when the holder's process ends, however it ends,
so a killed run leaves no stale lock: the file stays (removing it would let two runs lock two
different files) and the next run takes it over. Keep the folder on a filesystem with working
file locks (a local disk).

**Paths that move with the folder.** What a run records in the folder names the folder's files
relative to it: ``summary.json`` (bundles, manifests, the trusted keys, the ledger), the run
ledger ``<out>/ledger.sqlite`` (:class:`server.ledger.Ledger` keeps paths under a SQLite
ledger's folder relative) and each run folder's marker (the run id to resume). After
``mv out out2``, ``fedbrain simulate --out out2 --resume`` goes on where the run stopped. Older
folders still read: absolute paths of a ``summary.json`` that lie under the ``out`` it recorded
are rebased onto the folder, and a run recorded only in a run folder's own ``ledger.sqlite``
(one ledger per job, before all jobs shared one) is copied into the run's ledger on resume.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from server.discovery import NODES_FILE
from server.ledger import LEDGER_FILENAME, Ledger, RunNotFoundError, RunStatus
from server.options import JobOutcome, JobStatus

__all__ = [
    "LOCK_FILE",
    "RUN_MARKER",
    "LockHolder",
    "OutputFolderInUseError",
    "default_ledger_url",
    "from_folder",
    "in_folder",
    "locked_output_folder",
    "new_run_id",
    "outcome_from_json",
    "outcome_json",
    "previous_outcomes",
    "resumable_run_id",
    "write_run_marker",
]

LOCK_FILE: Final = ".fedbrain-simulate.lock"
RUN_MARKER: Final = ".fedbrain-simulate"
SUMMARY_FILE: Final = "summary.json"
_HOLDER_BYTES: Final = 4096


# ==================================================================================== lock


@dataclass(frozen=True)
class LockHolder:
    """The run that holds an output folder."""

    pid: int
    host: str
    started_at: str  # ISO 8601, UTC

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started_at}"

    def to_json(self) -> dict[str, object]:
        return {"pid": self.pid, "host": self.host, "started_at": self.started_at}

    @classmethod
    def from_bytes(cls, data: bytes) -> LockHolder | None:
        """The holder written in a lock file, or None (empty, being written, not ours)."""
        try:
            document = json.loads(data)
            pid, host, started = document["pid"], document["host"], document["started_at"]
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(pid, int) or not isinstance(host, str) or not isinstance(started, str):
            return None
        return cls(pid, host, started)


class OutputFolderInUseError(RuntimeError):
    """Another run holds the output folder. ``holder`` is None when the lock file does not say
    who (the holder is still writing it)."""

    def __init__(self, folder: Path, holder: LockHolder | None) -> None:
        self.folder, self.holder = folder, holder
        who = str(holder) if holder is not None else "it has not written who it is yet"
        super().__init__(
            f"The output folder {folder} is in use by another `fedbrain simulate` ({who}). "
            "Two runs in one folder would overwrite each other's runs, so this one did not "
            "start and changed nothing. Wait for that run to end, or choose another --out."
        )


@contextmanager
def locked_output_folder(folder: Path, *, now: datetime | None = None) -> Iterator[LockHolder]:
    """Hold ``folder`` (which must exist) for this process until the block ends (see the
    module docstring); raises :class:`OutputFolderInUseError` at once when another run holds
    it, :class:`OSError` when the filesystem cannot lock."""
    path = folder / LOCK_FILE
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = LockHolder.from_bytes(os.pread(descriptor, _HOLDER_BYTES, 0))
            raise OutputFolderInUseError(folder, holder) from None
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot lock the output folder {folder} ({exc.strerror}); `fedbrain simulate` "
                "needs a filesystem with file locks (a local disk)",
            ) from None
        stamp = (now or datetime.now(UTC)).isoformat(timespec="seconds")
        holder = LockHolder(os.getpid(), socket.gethostname(), stamp)
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder.to_json()).encode() + b"\n", 0)
        yield holder
    finally:
        os.close(descriptor)  # releases the lock


# =================================================================================== paths


def in_folder(path: Path, out: Path) -> str:
    """``path`` as the folder's files record it: relative (POSIX) when it lies in ``out``,
    else absolute."""
    resolved = path.expanduser().resolve()
    base = out.expanduser().resolve()
    return resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else str(resolved)


def from_folder(recorded: str, out: Path, *, recorded_out: str | None = None) -> Path:
    """A path read from the folder's files: a relative one lies in ``out``; an absolute one
    under ``recorded_out`` (the folder's old place, in older summaries) is rebased onto
    ``out``."""
    path = Path(recorded)
    if not path.is_absolute():
        return out / path
    if recorded_out and path.is_relative_to(recorded_out):
        return out / path.relative_to(recorded_out)
    return path


def default_ledger_url(out: Path) -> str:
    """The URL of the run's default ledger, ``<out>/ledger.sqlite``."""
    path = out.expanduser().resolve() / LEDGER_FILENAME
    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def _ledger_reference(url: str, out: Path) -> str:
    """A ledger in ``out`` by its relative path, any other by its URL (password hidden)."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return url
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and database and Path(database).is_absolute():
        return in_folder(Path(database), out)
    return parsed.render_as_string(hide_password=True)


def _ledger_url(reference: str, out: Path) -> str:
    if not reference or "://" in reference:
        return reference
    return URL.create("sqlite", database=str(out / reference)).render_as_string()


# ========================================================================== summary.json


def outcome_json(outcome: JobOutcome, out: Path) -> dict[str, object]:
    """A job's outcome as ``summary.json`` records it (paths relative to ``out``)."""
    return {
        "run_id": outcome.run_id,
        "rounds_completed": outcome.rounds_completed,
        "reliability": outcome.reliability,
        "reasons": list(outcome.reasons),
        "dp_unit": outcome.dp_unit,
        "epsilon": outcome.epsilon,
        "delta": outcome.delta,
        "bundle": None if outcome.bundle is None else in_folder(outcome.bundle, out),
        "manifest": None if outcome.manifest is None else in_folder(outcome.manifest, out),
        "ledger": _ledger_reference(outcome.ledger_url, out) if outcome.ledger_url else "",
        "metrics": dict(outcome.metrics),
    }


def outcome_from_json(
    entry: Mapping[str, object], out: Path, *, recorded_out: str | None = None
) -> JobOutcome | None:
    """A PASSED outcome recorded in a previous ``summary.json`` of ``out`` (for ``--resume``),
    else None. ``recorded_out``: the folder's path an older summary recorded."""
    if entry.get("status") != JobStatus.PASSED.value or not isinstance(entry.get("bundle"), str):
        return None
    try:
        reliability = entry.get("reliability")
        epsilon, delta = entry.get("epsilon"), entry.get("delta")
        rounds = entry.get("rounds_completed")
        metrics = entry.get("metrics", {})
        reasons = entry.get("reasons", [])
        manifest = entry.get("manifest")
        ledger = entry.get("ledger", entry.get("ledger_url", ""))  # ledger_url: older summaries
        return JobOutcome(
            run_id=str(entry.get("run_id", "")),
            artifact_name=str(entry["artifact_name"]),
            status=JobStatus.PASSED,
            rounds_completed=int(rounds) if isinstance(rounds, int) else 0,
            reliability=float(reliability) if isinstance(reliability, int | float) else None,
            reasons=tuple(str(r) for r in reasons) if isinstance(reasons, list) else (),
            dp_unit=str(entry["dp_unit"]) if entry.get("dp_unit") else None,
            epsilon=float(epsilon) if isinstance(epsilon, int | float) else None,
            delta=float(delta) if isinstance(delta, int | float) else None,
            bundle=from_folder(str(entry["bundle"]), out, recorded_out=recorded_out),
            manifest=(
                from_folder(manifest, out, recorded_out=recorded_out)
                if isinstance(manifest, str) and manifest
                else None
            ),
            ledger_url=_ledger_url(str(ledger or ""), out),
            metrics=(
                {str(k): float(v) for k, v in metrics.items()} if isinstance(metrics, dict) else {}
            ),
        )
    except (KeyError, TypeError, ValueError):
        return None


def previous_outcomes(out: Path) -> dict[str, JobOutcome]:
    """The PASSED outcomes of ``out``'s ``summary.json`` by artifact name (none if unreadable)."""
    try:
        document = json.loads((out / SUMMARY_FILE).read_text("utf-8"))
        jobs, recorded_out = document.get("jobs", []), document.get("out")
    except (OSError, ValueError, AttributeError):
        return {}
    found: dict[str, JobOutcome] = {}
    for entry in jobs if isinstance(jobs, list) else []:
        if not isinstance(entry, dict):
            continue
        done = outcome_from_json(
            entry, out, recorded_out=recorded_out if isinstance(recorded_out, str) else None
        )
        if done is not None:
            found[done.artifact_name] = done
    return found


# ================================================================================ run ids


def new_run_id(now: datetime | None = None) -> str:
    """A fresh run id, in the federator's format."""
    return f"run-{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def write_run_marker(run_dir: Path, run_id: str) -> None:
    """Mark ``run_dir`` as written by ``fedbrain simulate``, for the run ``run_id``."""
    document = {"written_by": "fedbrain simulate", "run_id": run_id}
    (run_dir / RUN_MARKER).write_text(json.dumps(document) + "\n", "utf-8")


def _recorded_run_id(run_dir: Path) -> str | None:
    """The run id of ``run_dir``: its marker's, or (older folders) its ``nodes.json``'s."""
    for name in (RUN_MARKER, NODES_FILE):
        try:
            run_id = json.loads((run_dir / name).read_text("utf-8")).get("run_id")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(run_id, str) and run_id:
            return run_id
    return None


def _import_job_ledger(run_dir: Path, run_id: str, ledger: Ledger) -> None:
    """Copy ``run_id`` from ``run_dir``'s own ledger (older folders), if it is there."""
    path = run_dir / LEDGER_FILENAME
    if not path.is_file():
        return
    with Ledger(URL.create("sqlite", database=str(path.resolve())), create=False) as old:
        if old.url != ledger.url and run_id in {r.run_id for r in old.list_runs()}:
            ledger.sync_run_from(old, run_id)


def resumable_run_id(run_dir: Path, ledger_url: str) -> str | None:
    """The run that ``run_dir`` records, if the ledger holds it unfinished -- the one run a
    resumed job may reopen (never a run of another folder that shares the database)."""
    run_id = _recorded_run_id(run_dir)
    if run_id is None:
        return None
    with Ledger(ledger_url) as ledger:
        try:
            status = ledger.get_run(run_id).status
        except RunNotFoundError:
            _import_job_ledger(run_dir, run_id, ledger)
            try:
                status = ledger.get_run(run_id).status
            except RunNotFoundError:
                return None
    return None if status is RunStatus.COMPLETED else run_id
