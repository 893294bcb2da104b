"""`fedbrain simulate --events FILE`: one flushed JSON line per progress event."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from server.options import EventKind, ProgressEvent
from simulations.events import EventWriter, tee


def _event(n: int, **metrics: float) -> ProgressEvent:
    return ProgressEvent(
        kind=EventKind.ROUND_FINISHED,
        artifact_name="sensing-iot-normalizer-v1",
        server_round=n,
        num_rounds=3,
        metrics=dict(metrics),
    )


def test_each_event_is_one_json_line_readable_before_close(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "events.jsonl"
    writer = EventWriter(path)
    writer(_event(1, eval_loss=0.5, epsilon=float("inf"), reliability=float("nan")))
    lines = path.read_text().splitlines()  # flushed: visible while the run goes on
    assert len(lines) == 1
    document = json.loads(lines[0])
    assert document["kind"] == "round_finished" and document["server_round"] == 1
    assert document["metrics"] == {"eval_loss": 0.5, "epsilon": "Infinity", "reliability": "NaN"}
    assert document["time"].endswith("+00:00")
    writer.close()


def test_concurrent_events_never_interleave_within_a_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as writer:

        def emit(k: int) -> None:
            for i in range(50):
                writer(_event(k * 100 + i))

        threads = [threading.Thread(target=emit, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    rounds = sorted(json.loads(line)["server_round"] for line in path.read_text().splitlines())
    assert rounds == sorted(k * 100 + i for k in range(4) for i in range(50))


def test_tee_calls_both_callbacks_in_order() -> None:
    calls: list[str] = []
    both = tee(lambda e: calls.append("file"), lambda e: calls.append("display"))
    both(_event(1))
    assert calls == ["file", "display"]
    only = tee(lambda e: calls.append("file"), None)
    only(_event(2))
    assert calls == ["file", "display", "file"]
