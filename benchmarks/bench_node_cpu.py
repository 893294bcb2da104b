"""CPU-seconds per message and idle memory of a deployed node (Flower's deployment engine).

Run from the repository root of the tree to measure (the same venv serves other trees)::

    .venv/bin/python benchmarks/bench_node_cpu.py
    cd /work/wt-before && PYTHONPATH=/work/wt-before /work/main/.venv/bin/python \\
        /work/main/benchmarks/bench_node_cpu.py --tree /work/wt-before

Runs that tree's deployment integration test,
``tests/integration/test_flwr_run.py::test_fedbrain_job_runs_on_local_superlink_with_three_supernodes``
(a real ``flower-superlink`` and three ``flower-supernode`` s in subprocess isolation on
loopback, the default sensing job of ``pyproject.toml`` submitted with ``flwr run``), and
watches its process tree with psutil every ``--interval`` seconds:

- **per message**: each SuperNode's ``flower-superexec`` starts one ``flwr-clientapp``
  process per message (Flower 1.42); the CPU time of those processes is read from the
  superexec's reaped-children times (``cpu_times().children_user + children_system``, which
  also counts a process that lived between two samples) plus its live children's own times,
  the largest value seen; divided by the number of distinct ``flwr-clientapp`` processes seen
  (a process shorter than the interval can be missed: the count is then low and the
  per-message figure high, so the count is printed next to it);
- **idle RSS of a node**: ``flower-supernode`` + its ``flower-superexec`` while neither has a
  ``flwr-clientapp`` child (median over those samples); **busy**: the largest RSS of a node
  with its ``flwr-clientapp`` child;
- the test's wall time and outcome.

The job's messages differ between trees (the number of SecAgg+ stages, node info, evaluation):
compare the per-message figures, not the totals.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TEST = (
    "tests/integration/test_flwr_run.py::"
    "test_fedbrain_job_runs_on_local_superlink_with_three_supernodes"
)


@dataclass
class NodeWatch:
    children_cpu: float = 0.0  # reaped flwr-clientapp processes (cumulative)
    live_cpu: dict[int, float] = field(default_factory=dict)
    idle_rss: list[int] = field(default_factory=list)
    busy_rss: int = 0


class Watcher:
    def __init__(self, root: int, interval: float) -> None:
        import psutil  # type: ignore[import-untyped]

        self._root = psutil.Process(root)
        self._interval = interval
        self._stop = threading.Event()
        self.nodes: dict[int, NodeWatch] = {}  # by superexec pid
        self.clientapps: set[int] = set()
        self.best_cpu: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cmd(proc: object) -> str:
        import psutil

        try:
            return " ".join(proc.cmdline())  # type: ignore[attr-defined]
        except psutil.Error:
            return ""

    def _sample(self) -> None:
        import psutil

        try:
            procs = self._root.children(recursive=True)
        except psutil.Error:
            return
        for proc in procs:
            cmd = self._cmd(proc)
            if "flower-supernode" not in cmd:
                continue
            try:
                node_rss = proc.memory_info().rss
                for execu in proc.children():
                    if "flower-superexec" not in self._cmd(execu):
                        continue
                    watch = self.nodes.setdefault(execu.pid, NodeWatch())
                    times = execu.cpu_times()
                    reaped = times.children_user + times.children_system
                    apps = [c for c in execu.children() if "flwr-clientapp" in self._cmd(c)]
                    live = 0.0
                    app_rss = 0
                    for app in apps:
                        self.clientapps.add(app.pid)
                        t = app.cpu_times()
                        live += t.user + t.system
                        app_rss += app.memory_info().rss
                    total = node_rss + execu.memory_info().rss
                    if apps:
                        watch.busy_rss = max(watch.busy_rss, total + app_rss)
                    else:
                        watch.idle_rss.append(total)
                    self.best_cpu[execu.pid] = max(self.best_cpu.get(execu.pid, 0.0), reaped + live)
            except psutil.Error:
                continue

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, default=Path.cwd(), help="repository to test")
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--basetemp", type=Path, default=None, help="pytest's --basetemp (kept)")
    args = parser.parse_args()
    tree = args.tree.resolve()
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-x",
        TEST,
    ]
    if args.basetemp is not None:
        command[-1:-1] = ["--basetemp", str(args.basetemp)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    print(f"Command: `{shlex.join([os.path.relpath(sys.executable), *sys.argv])}`")
    print(f"Tree: {tree} ({_head(tree)}); {os.cpu_count()} cores, {platform.machine()}")
    print("Load average before: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watcher = Watcher(child.pid, args.interval)
    watcher.start()
    output, _ = child.communicate()
    wall = time.perf_counter() - start
    watcher.stop()
    print(output.strip().splitlines()[-1] if output.strip() else "(no output)")
    if child.returncode != 0:
        print(output[-3000:])
    cpu = sum(watcher.best_cpu.values())
    count = len(watcher.clientapps)
    idle = [statistics.median(w.idle_rss) for w in watcher.nodes.values() if w.idle_rss]
    busy = [w.busy_rss for w in watcher.nodes.values() if w.busy_rss]
    print(f"\ntest exit {child.returncode}, wall {wall:.1f} s")
    print(f"nodes watched: {len(watcher.nodes)}; flwr-clientapp processes seen: {count}")
    print(f"CPU of the flwr-clientapp processes, all nodes: {cpu:.2f} s")
    if count:
        print(f"CPU per message (per flwr-clientapp process): {cpu / count:.2f} s")
    if idle:
        print("idle RSS per node (supernode + superexec), MiB: " + _mib(idle))
    if busy:
        print("busy RSS per node (+ its flwr-clientapp), peak MiB: " + _mib(busy))
    print("Load average after: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.basetemp is not None:
        print_rounds(args.basetemp)


def print_rounds(basetemp: Path) -> None:
    """Each round's ``timings`` from the run's ledger (this tree's ``server.ledger``)."""
    from server.ledger import Ledger

    for ledger_file in sorted(basetemp.glob("**/run/ledger.sqlite")):
        with Ledger.for_run_dir(ledger_file.parent, create=False) as ledger:
            for run in ledger.list_runs():
                print(f"\n{run.artifact_name} ({run.privacy_level}), {ledger_file}:")
                for record in ledger.rounds(run.run_id):
                    timings = ", ".join(f"{k} {float(v):.2f}" for k, v in record.timings.items())
                    print(f"  round {record.round}: {timings}")


def _mib(values: list[float] | list[int]) -> str:
    return ", ".join(f"{v / 2**20:.0f}" for v in values)


def _head(tree: Path) -> str:
    result = subprocess.run(
        ["git", "-C", str(tree), "log", "-1", "--format=%h"], capture_output=True, text=True
    )
    return result.stdout.strip()


if __name__ == "__main__":
    main()
