"""The job worker: runs submitted jobs on Flower's Simulation Engine, outside the requests.

``server`` must not import ``simulations`` (the dependency goes the other way), so each job
is a subprocess of the ``fedbrain simulate`` CLI on a scenario file the worker writes: the
default scenario's settings and the node group of the job's node type (or those of
``scenario_template``), and the one job. The worker follows it through

- the JSON-lines events file (``simulate --events``): live progress for the SSE stream and
  the Prometheus metrics;
- the ledger: after every round (and at the end) the run's rows are gathered from the job's
  output folder into the API's database (:meth:`server.ledger.Ledger.sync_run_from`), with
  the refused nodes from ``nodes.json``, so one database lists every run.

Jobs run one at a time, in submission order (the queue is the ``api_jobs`` table, so queued
jobs survive a restart). Cancel = SIGTERM to the job's process group, SIGKILL after
``cancel_grace`` seconds; the run then ends ``aborted`` in the ledger, never ``running``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

import tomli_w
from sqlalchemy import select

from manifests.demo import write_keys
from manifests.jobspec import JobSpec
from manifests.keys import KeyVerificationError, SigningKey, TrustedKeys
from server.api.audit import Action, AuditLog
from server.api.metrics import Metrics
from server.api.store import ApiStore, JobRow
from server.ledger import LEDGER_FILENAME, Ledger, LedgerError, RunStatus

__all__ = ["JobState", "Worker", "WorkerSettings", "default_scenario_template", "read_events"]

logger = logging.getLogger(__name__)

EVENTS_FILE: Final = "events.jsonl"
LOG_FILE: Final = "simulate.log"
NODES_FILE: Final = "nodes.json"
WORKER_ACTOR: Final = "worker"


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # exit 0: passed, bundle verified
    REJECTED = "rejected"  # exit 3: below its reliability threshold, no bundle
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


def default_scenario_template() -> Path:
    """``simulations/default.toml``, read as a data file (not imported)."""
    return Path(__file__).resolve().parents[2] / "simulations" / "default.toml"


@dataclass(frozen=True)
class WorkerSettings:
    """``data_dir``: jobs' folders and the signing keys. ``command``: how to start the
    ``fedbrain`` CLI. ``pass_database_url``: also give ``simulate --database-url`` (once the
    runner honours it every job writes the API's database directly; the gathering from the
    output folder then finds nothing to copy)."""

    data_dir: Path
    database_url: str
    command: tuple[str, ...] = (sys.executable, "-m", "server.cli")
    scenario_template: Path = field(default_factory=default_scenario_template)
    cancel_grace: float = 10.0
    poll_interval: float = 0.25
    pass_database_url: bool = False

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def trusted_keys(self) -> Path:
        return self.keys_dir / "trusted_keys.json"


def read_events(path: Path, *, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON lines of ``path`` after byte ``offset``, and the new offset (a last
    line without its newline is still being written and is left for the next read)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            data = handle.read(1 << 22)
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events: list[dict[str, Any]] = []
    for line in data[:end].splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            events.append(value)
    return events, offset + end


def ensure_keys(folder: Path) -> None:
    """A signing key and its trusted-keys file in ``folder``, valid for at least a day."""
    now = datetime.now(UTC)
    private, trusted = folder / "signing_key.pem", folder / "trusted_keys.json"
    if private.is_file() and trusted.is_file():
        try:
            key = SigningKey.from_pem(private.read_bytes())
            TrustedKeys.load(trusted).lookup(key.keyid).check_usable_at(now + timedelta(days=1))
        except (ValueError, OSError, KeyVerificationError):
            pass
        else:
            return
    write_keys(
        folder,
        SigningKey.generate(),
        not_before=now - timedelta(minutes=5),
        not_after=now + timedelta(days=365),
    )


def scenario_document(template: Path, spec: JobSpec, *, out: Path, name: str) -> dict[str, Any]:
    """The scenario file of one job: the template's settings and the job's node group."""
    with template.open("rb") as handle:
        base = tomllib.load(handle)
    node_type = spec.resolved_node_type.value
    groups = [g for g in base.get("nodes", []) if g.get("type") == node_type]
    if not groups:
        raise ValueError(f"the scenario template {template} has no {node_type} nodes")
    simulation = dict(base.get("simulation", {}))
    simulation.update(name=name, out=str(out))
    job = spec.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
    for key in ("component", "base_model", "task"):
        job[key] = getattr(spec, key).__str__()
    return {"simulation": simulation, "nodes": groups, "jobs": [job]}


class Worker:
    """A thread that runs queued jobs one at a time."""

    def __init__(
        self,
        settings: WorkerSettings,
        store: ApiStore,
        ledger: Ledger,
        audit: AuditLog,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.ledger = ledger
        self.audit = audit
        self.metrics = metrics
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._current: str | None = None
        self._lock = threading.Lock()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        ensure_keys(settings.keys_dir)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._recover()
        self._thread = threading.Thread(target=self._loop, name="fedbrain-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs; a running job is cancelled (its run ends aborted)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            current = self._current
        if current is not None:
            self.request_cancel(current, by="server shutdown")
        if self._thread is not None:
            self._thread.join(timeout)

    def notify(self) -> None:
        """A job was queued."""
        self._wake.set()

    def _recover(self) -> None:
        """Jobs that were running when the server stopped end failed (their runs aborted)."""
        with self.store.session() as session:
            stale = session.scalars(
                select(JobRow).where(JobRow.status == JobState.RUNNING.value)
            ).all()
            ids = [(row.job_id, row.run_id) for row in stale]
        for job_id, run_id in ids:
            self._abort_run(run_id, "the API server stopped while the job ran")
            self._finish(job_id, JobState.FAILED, error="the API server stopped while it ran")

    # ------------------------------------------------------------------ queue

    def submit(self, spec: JobSpec, *, by: str) -> JobRow:
        """Queue a job; returns its row (status queued)."""
        job_id = f"job-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        row = JobRow(
            job_id=job_id,
            submitted_at=datetime.now(UTC),
            submitted_by=by,
            status=JobState.QUEUED.value,
            artifact_name=spec.resolve_artifact_name(created_at=datetime.now(UTC)),
            job=spec.model_dump(mode="json"),
            out_dir=str(self.settings.data_dir / "jobs" / job_id),
            cancel_requested=False,
        )
        with self.store.session() as session:
            session.add(row)
        self.notify()
        return row

    def request_cancel(self, job_id: str, *, by: str) -> JobState:
        """Cancel a queued or running job; returns its state after the request."""
        with self.store.session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                raise KeyError(job_id)
            state = JobState(row.status)
            if state.final:
                return state
            row.cancel_requested = True
            if state is JobState.QUEUED:
                row.status = JobState.CANCELLED.value
                row.finished_at = datetime.now(UTC)
                row.error = f"cancelled by {by} before it started"
                return JobState.CANCELLED
        with self._lock:
            process = self._process if self._current == job_id else None
        if process is not None:
            _signal_group(process, signal.SIGTERM)
        return JobState.RUNNING

    def _next_job(self) -> str | None:
        with self.store.session() as session:
            return session.scalar(
                select(JobRow.job_id)
                .where(JobRow.status == JobState.QUEUED.value)
                .order_by(JobRow.submitted_at, JobRow.job_id)
                .limit(1)
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job_id = self._next_job()
            except Exception:
                logger.exception("The worker could not read the job queue.")
                job_id = None
            if job_id is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self._run(job_id)
            except Exception as exc:
                logger.exception("Job %s failed in the worker.", job_id)
                self._finish(job_id, JobState.FAILED, error=f"worker error: {exc}")

    # ------------------------------------------------------------------ one job

    def _run(self, job_id: str) -> None:
        with self.store.session() as session:
            row = session.get(JobRow, job_id)
            if row is None or row.status != JobState.QUEUED.value:
                return
            row.status = JobState.RUNNING.value
            row.started_at = datetime.now(UTC)
            out = Path(row.out_dir)
            spec = JobSpec.from_mapping(row.job)
        self.metrics.jobs_running.inc()
        try:
            state, exit_code, error = self._execute(job_id, spec, out)
        finally:
            self.metrics.jobs_running.dec()
        self._finish(job_id, state, exit_code=exit_code, error=error)

    def _execute(
        self, job_id: str, spec: JobSpec, out: Path
    ) -> tuple[JobState, int | None, str | None]:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.settings.keys_dir, out / "keys", dirs_exist_ok=True)
        scenario = out / "scenario.toml"
        document = scenario_document(self.settings.scenario_template, spec, out=out, name=job_id)
        scenario.write_text(tomli_w.dumps(document), "utf-8")
        events = out / EVENTS_FILE
        command = [
            *self.settings.command,
            "simulate",
            str(scenario),
            "--out",
            str(out),
            "--events",
            str(events),
        ]
        if self.settings.pass_database_url:
            command += ["--database-url", self.settings.database_url]
        # the subprocess runs this very code, wherever it was imported from
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        with (out / LOG_FILE).open("wb") as log:
            process = subprocess.Popen(  # noqa: S603 (argv from settings, no shell)
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=out,
                env=env,
                start_new_session=True,  # its own process group: cancel reaches Ray too
            )
        with self._lock:
            self._process, self._current = process, job_id
        offset = 0
        cancel_sent: float | None = None
        try:
            while True:
                code = process.poll()
                new, offset = read_events(events, offset=offset)
                for event in new:
                    self.metrics.observe_event(event)
                if any(e.get("kind") in ("job_started", "round_finished") for e in new):
                    self._gather(job_id, out)
                if code is not None:
                    break
                if cancel_sent is None and self._cancel_requested(job_id):
                    _signal_group(process, signal.SIGTERM)
                    cancel_sent = time.monotonic()
                if cancel_sent is not None and time.monotonic() - cancel_sent > (
                    self.settings.cancel_grace
                ):
                    _signal_group(process, signal.SIGKILL)
                time.sleep(self.settings.poll_interval)
        finally:
            with self._lock:
                self._process, self._current = None, None
            _signal_group(process, signal.SIGKILL)  # leftovers (Ray workers) of the group
        new, offset = read_events(events, offset=offset)
        for event in new:
            self.metrics.observe_event(event)
        run_ids = self._gather(job_id, out)
        if self._cancel_requested(job_id):
            for run_id in run_ids:
                self._abort_run(run_id, "cancelled by the operator", out=out)
            return JobState.CANCELLED, code, "cancelled by the operator"
        for run_id in run_ids:
            self._abort_run(run_id, f"fedbrain simulate exited with code {code}", out=out)
        if code == 0:
            self._audit_bundles(run_ids)
            return JobState.SUCCEEDED, code, None
        if code == 3:
            return JobState.REJECTED, code, "rejected by its reliability threshold"
        return (
            JobState.FAILED,
            code,
            f"fedbrain simulate exited with code {code}" + _tail(out / LOG_FILE),
        )

    def _cancel_requested(self, job_id: str) -> bool:
        with self.store.session() as session:
            row = session.get(JobRow, job_id)
            return bool(row is not None and row.cancel_requested)

    def _sources(self, out: Path) -> list[Path]:
        found = sorted((out / "runs").glob(f"*/{LEDGER_FILENAME}"))
        if (out / LEDGER_FILENAME).is_file():
            found.append(out / LEDGER_FILENAME)
        return found

    def _gather(self, job_id: str, out: Path) -> list[str]:
        """Copy the job's runs from its output folder into the API's ledger."""
        run_ids: list[str] = []
        for path in self._sources(out):
            try:
                with Ledger(f"sqlite:///{path}", create=False) as source:
                    for run in source.list_runs():
                        if source.url != self.ledger.url:
                            self.ledger.sync_run_from(source, run.run_id)
                        run_ids.append(run.run_id)
            except LedgerError as exc:
                logger.warning("Could not read %s yet: %s", path, exc)
        for nodes in sorted((out / "runs").glob(f"*/{NODES_FILE}")):
            self._record_refused(nodes)
        if run_ids:
            with self.store.session() as session:
                row = session.get(JobRow, job_id)
                if row is not None and row.run_id is None:
                    row.run_id = run_ids[0]
        return run_ids

    def _record_refused(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text("utf-8"))
            run_id = str(document["run_id"])
            refused = {int(r["node_id"]): str(r["reason"]) for r in document.get("refused", [])}
        except (OSError, ValueError, KeyError, TypeError):
            return
        if refused:
            try:
                self.ledger.record_refused_nodes(run_id, refused)
            except LedgerError as exc:
                logger.warning("Could not record the refused nodes of %s: %s", run_id, exc)

    def _abort_run(self, run_id: str | None, reason: str, *, out: Path | None = None) -> None:
        """End a run that is still ``running`` as aborted, here and in the job's folder."""
        if run_id is None:
            return
        ledgers = [self.ledger]
        opened: list[Ledger] = []
        if out is not None:
            for path in self._sources(out):
                try:
                    opened.append(Ledger(f"sqlite:///{path}", create=False))
                except LedgerError:
                    continue
        try:
            for ledger in [*ledgers, *opened]:
                try:
                    if ledger.get_run(run_id).status is RunStatus.RUNNING:
                        ledger.finish_run(run_id, RunStatus.ABORTED, error=reason)
                except LedgerError:
                    continue
        finally:
            for ledger in opened:
                ledger.close()

    def _audit_bundles(self, run_ids: list[str]) -> None:
        for run_id in run_ids:
            try:
                run = self.ledger.get_run(run_id)
            except LedgerError:
                continue
            if run.bundle_path:
                self.audit.append(
                    actor=WORKER_ACTOR,
                    action=Action.BUNDLE_SIGNED,
                    target=run_id,
                    details={
                        "artifact_name": run.artifact_name,
                        "bundle_sha256": run.bundle_sha256,
                        "bundle": Path(run.bundle_path).name,
                    },
                )

    def _finish(
        self,
        job_id: str,
        state: JobState,
        *,
        exit_code: int | None = None,
        error: str | None = None,
    ) -> None:
        with self.store.session() as session:
            row = session.get(JobRow, job_id)
            if row is None:
                return
            row.status = state.value
            row.exit_code = exit_code
            row.error = error
            row.finished_at = datetime.now(UTC)
        self.metrics.jobs.labels(state.value).inc()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text("utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return (": " + " | ".join(line.strip() for line in text[-lines:])) if text else ""
