"""Progress events as JSON lines: ``fedbrain simulate --events FILE``.

Each :class:`server.options.ProgressEvent` becomes one line, appended and flushed at once, so
another process (the operator API's worker) can follow a run by reading the file as it grows::

    {"kind": "round_finished", "artifact_name": "...", "server_round": 2, "num_rounds": 3,
     "stage": "", "metrics": {"eval_loss": 0.41, ...}, "message": "", "time": "2025-...Z"}

Non-finite metric values are written as the strings ``"NaN"``, ``"Infinity"``,
``"-Infinity"`` (JSON has no such numbers). A reader should ignore a last line without its
newline: it is still being written.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from server.options import ProgressEvent

__all__ = ["EventWriter", "event_to_json", "tee"]


def _finite(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def event_to_json(event: ProgressEvent, *, now: datetime | None = None) -> dict[str, object]:
    """The JSON object of one event (with the time it was written)."""
    document = asdict(event)
    document["kind"] = event.kind.value
    document["metrics"] = {k: _finite(float(v)) for k, v in event.metrics.items()}
    document["time"] = (now or datetime.now(UTC)).isoformat()
    return document


class EventWriter:
    """Appends events to ``path`` (created with its folder), one flushed JSON line each."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: IO[str] = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()  # the ServerApp runs in a thread of its own

    def __call__(self, event: ProgressEvent) -> None:
        line = json.dumps(event_to_json(event), allow_nan=False, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def tee(
    first: Callable[[ProgressEvent], None], second: Callable[[ProgressEvent], None] | None
) -> Callable[[ProgressEvent], None]:
    """One progress callback that calls ``first`` then ``second`` (when given)."""
    if second is None:
        return first
    then = second

    def both(event: ProgressEvent) -> None:
        first(event)
        then(event)

    return both
