"""What ``fedbrain simulate`` prints: per-round progress lines and the summary table.

:class:`ProgressDisplay` receives the ServerApp's :class:`~server.options.ProgressEvent` s (from
the ServerApp thread) and prints one line per finished round; a spinner shows the stage in
progress. :func:`summary_table` and :func:`print_summary` show every job's outcome and the
verification of its bundle.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from server.options import EventKind, JobStatus, ProgressEvent
from simulations.bases import BaseEvent
from simulations.runner import ExitCode, JobResult, SimulationResult, Verification
from simulations.scenario import Scenario, ScenarioJob

__all__ = ["ProgressDisplay", "dp_text", "print_summary", "round_line", "summary_table"]

_UNIT_TEXT: Mapping[str, str] = {
    "example": "protects one example",
    "node": "protects a node's whole data",
}
_STATUS_STYLE: Mapping[JobStatus, str] = {
    JobStatus.PASSED: "green",
    JobStatus.REJECTED: "yellow",
    JobStatus.FAILED: "red",
}


def _num(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}g}"


def round_line(event: ProgressEvent) -> str:
    """One finished round: loss, evaluation, epsilon, reliability, participation, time."""
    m = event.metrics
    parts = [f"round {event.server_round}/{event.num_rounds}"]
    for key, label in (
        ("train_loss", "loss"),
        ("eval_loss", "eval loss"),
        ("eval_accuracy", "eval acc"),
    ):
        if key in m:
            parts.append(f"{label} {_num(m[key])}")
    if "epsilon" in m:
        parts.append(f"ε {_num(m['epsilon'])}")
    if "reliability" in m:
        parts.append(f"reliability {_num(m['reliability'], 2)}")
    if "participants" in m:
        parts.append(f"participants {int(m['participants'])}")
    if "dropouts" in m:
        parts.append(f"dropouts {int(m['dropouts'])}")
    if "seconds" in m:
        parts.append(f"{m['seconds']:.1f} s")
    line = "  ".join(parts)
    return f"{line}  {event.message}" if event.message else line


def dp_text(epsilon: float | None, delta: float | None, unit: str | None) -> str:
    """``ε 6.7 @ δ 1e-05 (protects one example)``, or ``no DP``."""
    if epsilon is None:
        return "no DP"
    text = f"ε {_num(epsilon)}"
    if delta is not None:
        text += f" @ δ {delta:g}"
    if unit:
        text += f" ({_UNIT_TEXT.get(unit, unit)})"
    return text


class ProgressDisplay(AbstractContextManager["ProgressDisplay"]):
    """Prints the progress of a scenario's jobs; pass it as the runner's ``progress``."""

    def __init__(self, console: Console, scenario: Scenario, *, spinner: bool = True) -> None:
        self.console = console
        self.scenario = scenario
        self._lock = threading.Lock()
        self._status: Status | None = (
            console.status("starting", spinner="dots") if spinner and console.is_terminal else None
        )
        self._job = ""

    def __enter__(self) -> ProgressDisplay:
        if self._status is not None:
            self._status.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._status is not None:
            self._status.stop()

    def _spin(self, text: str) -> None:
        if self._status is not None:
            self._status.update(escape(text))

    def base_progress(self, event: BaseEvent) -> None:
        """A demo base starts (one line: generating it can take a minute) or is ready."""
        with self._lock:
            if event.seconds is None:
                if event.generated:
                    self.console.print(
                        f"generating the demo base {escape(event.family)} (pretrained on public "
                        f"demo data) into {escape(str(event.folder))}"
                    )
                self._spin(f"demo base {event.family}")
                return
            done = "generated" if event.generated else "verified"
            self.console.print(
                f"  demo base {escape(event.family)} {done} in {event.seconds:.1f} s"
                + ("" if event.generated else f": {escape(str(event.folder))}")
            )

    def job_started(self, job: ScenarioJob, number: int, total: int) -> None:
        nodes = len(self.scenario.nodes_of(job.node_type))
        spec = job.spec
        self._job = job.artifact_name
        self.console.rule(
            f"[bold]{escape(job.artifact_name)}[/]  job {number}/{total}: {nodes} "
            f"{job.node_type} nodes, {spec.federation.num_rounds} round(s), "
            f"{spec.privacy_level}",
            align="left",
        )
        self._spin(f"{job.artifact_name}: starting Ray and the nodes")

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            name = event.artifact_name or self._job
            if event.kind is EventKind.JOB_STARTED:
                if event.message:
                    self.console.print(f"  {escape(event.message)}")
                self._spin(f"{name}: started")
            elif event.kind is EventKind.ROUND_STARTED:
                self._spin(f"{name}: round {event.server_round}/{event.num_rounds}")
            elif event.kind is EventKind.STAGE:
                self._spin(
                    f"{name}: round {event.server_round}/{event.num_rounds} -- {event.stage}"
                )
            elif event.kind is EventKind.ROUND_FINISHED:
                self.console.print(f"  {escape(round_line(event))}")
                self._spin(f"{name}: round {event.server_round} done")
            elif event.kind is EventKind.JOB_FINISHED:
                if event.message:
                    self.console.print(f"  {escape(event.message)}")
                self._spin(f"{name}: finishing")

    def job_finished(self, result: JobResult) -> None:
        style = _STATUS_STYLE[result.status]
        text = f"  [{style}]{result.status}[/]"
        if result.skipped:
            text += " (done in a previous run, skipped)"
        outcome = result.outcome
        if outcome is not None:
            text += f" after {outcome.rounds_completed} round(s)"
            if outcome.reasons:
                text += ": " + escape("; ".join(outcome.reasons))
        if result.error:
            text += f" -- {escape(result.error)}"
        text += f"  ({result.seconds:.1f} s)"
        self.console.print(text)
        if result.verification is Verification.VERIFIED and outcome and outcome.bundle:
            self.console.print(f"  bundle {escape(str(outcome.bundle))} [green]verified[/]")
        elif result.verification is Verification.FAILED:
            self.console.print(
                f"  [red]bundle does not verify[/]: {escape(result.verification_detail)}"
            )


def _bundle_cell(result: JobResult) -> str:
    """The bundle's file name (the full paths follow the table)."""
    outcome = result.outcome
    if outcome is None or outcome.bundle is None:
        return "-"
    return outcome.bundle.name


def learning_text(metrics: Mapping[str, float]) -> str:
    """What the job learned, against its baseline: an LM's perplexity against the public
    unigram baseline, a classifier's held-out accuracy against the untrained model, or (in a
    simulation) a normalizer's worst std error against the pooled data."""
    if "simulation_std_error" in metrics:
        return f"std within {metrics['simulation_std_error']:.1%} of pooled data*"
    if "eval_perplexity" in metrics:
        text = f"perplexity {metrics['eval_perplexity']:.2f}"
        if "baseline_perplexity" in metrics:
            text += f" (unigram {metrics['baseline_perplexity']:.2f})"
        return text
    if "eval_accuracy" in metrics:
        text = f"accuracy {metrics['eval_accuracy']:.3f}"
        if "initial_eval_accuracy" in metrics:
            text += f" (untrained {metrics['initial_eval_accuracy']:.3f})"
        return text
    return "-"


def summary_table(result: SimulationResult) -> Table:
    """One row per job: status, rounds, epsilon@delta and DP unit, reliability, bundle."""
    table = Table(title=f"fedbrain simulate: {result.scenario.name}", title_justify="left")
    table.add_column("artifact", no_wrap=True)
    table.add_column("status")
    table.add_column("rounds", justify="right")
    table.add_column("privacy: ε @ δ (DP unit)", no_wrap=True)
    table.add_column("reliability", justify="right")
    table.add_column("learning vs baseline", overflow="fold")
    table.add_column("bundle", overflow="fold")  # the file name; full paths below
    table.add_column("verification", overflow="fold")
    for job_result in result.results:
        outcome = job_result.outcome
        style = _STATUS_STYLE[job_result.status]
        if outcome is None:
            rounds, privacy, reliability, learning = "-", "-", "-", "-"
        else:
            learning = learning_text(outcome.metrics)
            rounds = str(outcome.rounds_completed)
            privacy = dp_text(outcome.epsilon, outcome.delta, outcome.dp_unit)
            reliability = "-" if outcome.reliability is None else f"{outcome.reliability:.2f}"
        if job_result.verification is Verification.VERIFIED:
            verdict = "[green]verified[/]"
        elif job_result.verification is Verification.FAILED:
            verdict = f"[red]FAILED[/]: {escape(job_result.verification_detail)}"
        else:
            verdict = "-"
        table.add_row(
            escape(job_result.job.artifact_name),
            f"[{style}]{job_result.status}[/]" + (" (earlier run)" if job_result.skipped else ""),
            rounds,
            escape(privacy),
            reliability,
            escape(learning),
            escape(_bundle_cell(job_result)),
            verdict,
        )
    return table


def print_summary(console: Console, result: SimulationResult) -> None:
    """The summary table, the bundles and how to verify them, and the overall verdict."""
    console.print()
    console.print(summary_table(result))
    for job_result in result.results:
        outcome = job_result.outcome
        if job_result.status is JobStatus.REJECTED and outcome is not None:
            reasons = "; ".join(outcome.reasons) or "below the reliability threshold"
            console.print(
                f"[yellow]rejected[/] {escape(job_result.job.artifact_name)}: "
                f"{escape(reasons)} (no bundle signed)"
            )
        elif job_result.status is JobStatus.FAILED:
            reason = job_result.error or "; ".join(outcome.reasons if outcome else ()) or "failed"
            console.print(
                f"[red]failed[/] {escape(job_result.job.artifact_name)}: {escape(reason)}"
            )
    if any(r.outcome and "simulation_std_error" in r.outcome.metrics for r in result.results):
        console.print(
            "* the released normalizer's worst per-feature std error against every node's "
            "pooled data: a check only a simulation can make (not part of any bundle)"
        )
    bundles = [
        r.outcome.bundle for r in result.results if r.outcome and r.outcome.bundle is not None
    ]
    if bundles:
        console.print("bundles:")
        for bundle in bundles:
            console.print(f"  {escape(str(bundle))}")
        console.print(
            "verify offline with: fedbrain verify BUNDLE --trusted-keys "
            f"{escape(str(result.keys.trusted_keys))}"
        )
    console.print(f"summary: {escape(str(result.out / 'summary.json'))}")
    code = result.exit_code
    verdict = {
        ExitCode.OK: "[green]all jobs passed and every bundle verified[/]",
        ExitCode.REJECTED: "[yellow]some jobs were rejected by their reliability threshold[/]",
        ExitCode.FAILED: "[red]some jobs failed or a bundle did not verify[/]",
    }[code]
    console.print(f"{verdict} in {result.seconds:.0f} s (exit code {code})")
