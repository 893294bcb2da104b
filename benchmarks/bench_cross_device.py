"""Round time and peak memory of ``fedbrain simulate`` on the cross-device scenario.

Run from the repository root::

    .venv/bin/python benchmarks/bench_cross_device.py                      # N = 100, 300, 1000
    .venv/bin/python benchmarks/bench_cross_device.py --nodes 300 --rounds 2

For each N, one ``fedbrain simulate simulations/cross_device.toml --nodes N --rounds R --out
DIR --events DIR/events.jsonl`` child process (a fresh output folder, so demo data and kits are
written too). ``clients_per_round`` is the scenario's (125, about 100 of them with data under
secret sampling), lowered to N where N is smaller (a copy of the scenario with that one value
changed; the scenario refuses clients_per_round > N).

Measured, from outside the run:

- **peak RSS**: the largest sum of the resident memory of the ``fedbrain`` process and all its
  descendants (Ray's GCS, raylet, the ClientApp actors), sampled every 0.25 s with psutil
  (``/usr/bin/time -v`` would only see the ``fedbrain`` process itself);
- **rounds**: from the progress events (``--events``, one JSON line each with the time it was
  written): ``round_started`` to ``round_finished`` of each round, so a round includes its
  secure fit collection, its secure evaluation and its checkpoint (if due); the median is
  over rounds 2..R (round 1 carries the actors' first model build) and all rounds are listed;
- **before round 1**: from the child's start to the job's ``job_started`` event (demo data,
  kits, Ray start, node discovery and the run's setup), and from ``job_started`` to the first
  ``round_started``;
- **total**: the child's wall time, and its exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "simulations" / "cross_device.toml"


class TreeMemory:
    """Samples the summed RSS of ``pid`` and its descendants every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        import psutil  # type: ignore[import-untyped]

        self._root = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self.peak_processes = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> tuple[int, int]:
        import psutil

        try:
            processes = [self._root, *self._root.children(recursive=True)]
        except psutil.Error:
            return 0, 0
        total = 0
        for proc in processes:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                continue
        return total, len(processes)

    def _run(self) -> None:
        while not self._stop.is_set():
            total, count = self._sample()
            if total > self.peak:
                self.peak, self.peak_processes = total, count
            self._stop.wait(self._interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Result:
    nodes: int
    per_round: int
    rounds: list[float] = field(default_factory=list)
    to_job_started: float = float("nan")
    job_to_round1: float = float("nan")
    total: float = float("nan")
    peak_gib: float = float("nan")
    peak_processes: int = 0
    status: int = -1
    note: str = ""

    @property
    def median_steady(self) -> float:
        steady = self.rounds[1:] or self.rounds
        return statistics.median(steady) if steady else float("nan")


def scenario_for(nodes: int, workdir: Path) -> tuple[Path, int]:
    """The scenario file to run (a copy with clients_per_round = N where N < the scenario's)."""
    text = SCENARIO.read_text("utf-8")
    match = re.search(r"clients_per_round = (\d+)", text)
    if match is None:
        raise SystemExit(f"{SCENARIO}: no clients_per_round")
    per_round = int(match.group(1))
    if nodes >= per_round:
        return SCENARIO, per_round
    copy = workdir / f"cross_device-{nodes}.toml"
    copy.write_text(text.replace(match.group(0), f"clients_per_round = {nodes}"), "utf-8")
    return copy, nodes


def _time(document: dict[str, object]) -> float:
    return datetime.fromisoformat(str(document["time"])).timestamp()


def run_one(nodes: int, rounds: int, workdir: Path, keep: Path | None) -> Result:
    scenario, per_round = scenario_for(nodes, workdir)
    out = (keep or workdir) / f"cd-{nodes}"
    events = workdir / f"events-{nodes}.jsonl"
    command = [
        str(REPO / ".venv" / "bin" / "fedbrain"),
        "simulate",
        str(scenario),
        "--nodes",
        str(nodes),
        "--rounds",
        str(rounds),
        "--out",
        str(out),
        "--events",
        str(events),
    ]
    print(f"$ {shlex.join(command)}", flush=True)
    result = Result(nodes, per_round)
    wall_start = time.time()
    start = time.perf_counter()
    log = (workdir / f"log-{nodes}.txt").open("w", encoding="utf-8")
    child = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    memory = TreeMemory(child.pid)
    memory.start()
    result.status = child.wait()
    result.total = time.perf_counter() - start
    memory.stop()
    log.close()
    result.peak_gib = memory.peak / 2**30
    result.peak_processes = memory.peak_processes
    started: dict[int, float] = {}
    first_round = job_started = float("nan")
    if events.exists():
        for line in events.read_text("utf-8").splitlines():
            document = json.loads(line)
            kind, number = document["kind"], int(document.get("server_round", 0))
            if kind == "job_started":
                job_started = _time(document)
                result.to_job_started = job_started - wall_start
            elif kind == "round_started":
                started[number] = _time(document)
                if number == 1:
                    first_round = started[number]
            elif kind == "round_finished" and number in started:
                result.rounds.append(_time(document) - started.pop(number))
        result.job_to_round1 = first_round - job_started  # nan when either is missing
    if result.status != 0:
        tail = (workdir / f"log-{nodes}.txt").read_text("utf-8").strip().splitlines()[-3:]
        result.note = " / ".join(tail)
    return result


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--rounds", type=int, default=3, help="R; the median is over 2..R")
    parser.add_argument("--keep", type=Path, default=None, help="keep the output folders here")
    args = parser.parse_args()
    # A fresh local Ray (a stale /tmp/ray/ray_current_cluster would otherwise be joined).
    os.environ.setdefault("RAY_ADDRESS", "local")
    print(f"Command: `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}`")
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.machine()}")
    print("Load average before: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_cross_device_") as tmp:
        for nodes in args.nodes:
            results.append(run_one(nodes, args.rounds, Path(tmp), args.keep))
            r = results[-1]
            print(
                f"N = {nodes}: exit {r.status}, rounds {[round(s, 2) for s in r.rounds]}, "
                f"peak {r.peak_gib:.2f} GiB, total {r.total:.1f} s; load "
                + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
                flush=True,
            )
    print(
        "\n| N | per round | exit | start -> job_started (s) | job_started -> round 1 (s) "
        "| median round 2..R (s) | per round (s) | total (s) | peak RSS (GiB) | processes |"
    )
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in results:
        per = ", ".join(f"{s:.2f}" for s in r.rounds)
        print(
            f"| {r.nodes} | {r.per_round} | {r.status} | {r.to_job_started:.1f} | "
            f"{r.job_to_round1:.1f} | {r.median_steady:.2f} | {per} | {r.total:.1f} | "
            f"{r.peak_gib:.2f} | {r.peak_processes} |"
        )
        if r.note:
            print(f"\nN = {r.nodes}: {r.note}")
    print("\nLoad average after: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
