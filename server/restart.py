"""Restart safety: which process runs a run, runs whose process died, and resuming them.

A running run records its **owner** in the ledger: ``host:pid:start-time`` of the process that
runs it (the ServerApp's; the start time tells a reused pid apart). A run whose owner is gone
(kill -9, a crash, a power loss: nothing had a chance to write its end) is ``interrupted``, never
left ``running``: :func:`mark_interrupted_runs` finds them -- ``fedbrain server start`` calls it
before the SuperLink starts, ``fedbrain runs`` before it lists -- and a resume of such a run
(:func:`take_over`) marks it first. Whether a process is alive can only be told on its own
host; a run owned on another host is left as it is.

Each resume records the interruption it continues from in the ledger (:func:`record_resume`):
the round that was under way and whether its privacy cost stays spent (the rule is in
:mod:`server.checkpoint`: charged once anything computed from private data had reached the
server in that round, refunded otherwise).
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from aggregation.secagg import Stage
from server.checkpoint import ResumePoint
from server.ledger import Ledger, LedgerError, RunStatus

__all__ = [
    "RELEASING_STAGES",
    "RunStillRunningError",
    "link_flower_run",
    "mark_interrupted_runs",
    "owner_alive",
    "record_resume",
    "take_over",
    "this_process",
]

RELEASING_STAGES: Final = frozenset({"train", "eval", Stage.MASKED_INPUT.value})
"""Collection stages after which the server holds what it needs to compute a round's noised
result: the plain replies of a round, or its masked inputs under secure aggregation."""


class RunStillRunningError(LedgerError):
    """The run is still being run by a live process: it cannot be resumed here."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of stat(5)


def this_process() -> str:
    """This process as a run's owner: ``host:pid:start-time``."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_time(pid) or '-'}"


def owner_alive(owner: str | None) -> bool | None:
    """Whether the owning process still runs: True/False on its host, None when this
    process cannot tell (another host; no owner recorded -- a run from an older fedbrain, or
    one a gathering ledger copies from another, whose owner is recorded there)."""
    if not owner:
        return None
    host, _, rest = owner.partition(":")
    pid_text, _, started = rest.partition(":")
    if not pid_text.isdigit():
        return None
    if host != socket.gethostname():
        return None
    pid = int(pid_text)
    if started != "-":
        return _start_time(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_interrupted_runs(ledger: Ledger) -> list[str]:
    """Mark ``interrupted`` every ``running`` run whose owner died on this host; their ids."""
    marked = []
    for run in ledger.list_runs(status=RunStatus.RUNNING):
        if owner_alive(run.owner) is False and ledger.mark_interrupted(
            run.run_id,
            owner=run.owner,
            reason=f"interrupted: the process running it ({run.owner or 'unknown'}) is gone",
        ):
            marked.append(run.run_id)
    return marked


def take_over(ledger: Ledger, run_id: str) -> None:
    """Before resuming ``run_id``: refuse while a live process runs it
    (:class:`RunStillRunningError`); mark it ``interrupted`` when its process died."""
    run = ledger.get_run(run_id)
    if run.status is not RunStatus.RUNNING:
        return
    alive = owner_alive(run.owner)
    if alive is False:
        ledger.mark_interrupted(
            run_id, owner=run.owner, reason="interrupted: resumed after its process died"
        )
        return
    where = run.owner or "an unknown process"
    raise RunStillRunningError(
        f"run {run_id} is still running ({where}"
        + (")" if alive else "; on another host, so this one cannot tell if it is alive)")
        + ": stop it before resuming it, or wait for it to end"
    )


def record_resume(ledger: Ledger, run_id: str, point: ResumePoint | None, done: int) -> str:
    """Record in the ledger the interruption a resume continues from; a note for the run."""
    interrupted = None if point is None else point.interrupted
    if interrupted is None:
        return f"resumed after round {done}"
    if interrupted.charged:
        effect = "its privacy cost stays spent (private data had reached the server)"
    else:
        effect = "its privacy cost was refunded (no private data had reached the server)"
    ledger.record_interruption(
        run_id,
        {
            "round": interrupted.round,
            "at": datetime.now(UTC).replace(microsecond=0).isoformat(),
            "charged": interrupted.charged,
            "resumed_after_round": done,
        },
    )
    return f"resumed after round {done}; round {interrupted.round} was interrupted: {effect}"


def link_flower_run(ledger: Ledger, run_id: str, flower_run_id: int | None) -> None:
    """Record Flower's run id for the run (the latest one, after a resume)."""
    if flower_run_id is not None:
        ledger.link_flower_run(run_id, flower_run_id)
