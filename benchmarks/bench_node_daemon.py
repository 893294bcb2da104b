"""CPU-seconds per message and idle memory of nodes started by ``fedbrain node start``.

Run from the repository root::

    .venv/bin/python benchmarks/bench_node_daemon.py [--nodes 3] [--rounds 1]

Provisions a federation (``fedbrain provision``), starts the SuperLink (``fedbrain server
start``: TLS, node authentication) and the nodes (``fedbrain node start``: each a SuperNode in
process isolation and the node's SuperExec, :mod:`clients.superexec`, which forks every
message's ClientApp task from a warm forkserver), waits until the nodes are idle, then runs
the IoT normalizer job at ``dp+secure-agg`` with ``fedbrain run`` (the job of
``tests/integration/test_edge_deployment.py``) and watches every node's process tree with
psutil every 0.05 s:

- **CPU per message**: a node's CPU during the job (its processes' own times plus the reaped
  children's, the largest total seen) minus its idle CPU rate over the same time (the
  SuperNode and SuperExec poll), divided by the number of task processes forked for it
  (distinct children of its forkserver seen; a task shorter than the sampling interval could
  be missed, which would make the per-message figure high, not low);
- **per task**, as each task process logs its own CPU time (``clientapp task: ... CPU-s``):
  the cheapest tasks bound the fixed cost of a message;
- **idle RSS of a node**: the sum over its process tree before the job (the daemon, the
  SuperNode, the SuperExec and its forkserver with torch imported).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.edge import EdgeDeployment
from tests.integration.test_edge_deployment import POLICY, SECURE_JOB


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _rss(processes: list[psutil.Process]) -> int:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


def _is_forkserver(p: psutil.Process) -> bool:
    """The forkserver itself (its forked tasks share its command line, not its parent's)."""
    try:
        parent = p.parent()
        return "forkserver" in " ".join(p.cmdline()) and (
            parent is None or "forkserver" not in " ".join(parent.cmdline())
        )
    except psutil.Error:
        return False


class Watch:
    """Per node: the largest CPU total seen, and the task processes seen."""

    def __init__(self, pids: dict[str, int], interval: float) -> None:
        self.pids, self.interval = pids, interval
        self.cpu = dict.fromkeys(pids, 0.0)
        self.tasks: dict[str, set[int]] = {name: set() for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                tree = _tree(pid)
                self.cpu[name] = max(self.cpu[name], _cpu(tree))
                servers = {p.pid for p in tree if _is_forkserver(p)}
                for p in tree:
                    try:
                        if p.ppid() in servers:  # forked by the forkserver: one task
                            self.tasks[name].add(p.pid)
                    except psutil.Error:
                        continue
            time.sleep(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle baseline")
    args = parser.parse_args()

    from clients.demo_data import write_demo_dataset

    root = Path(tempfile.mkdtemp(prefix="fedbrain-bench-daemon-"))
    edge = EdgeDeployment(root)
    names = [f"node-{i}" for i in range(args.nodes)]
    for index, name in enumerate(names):
        write_demo_dataset("iot", root / "data" / name / "iot", 200, seed=11 + index)
    job = root / "secure-job.toml"
    job.write_text(SECURE_JOB)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}")
    try:
        edge.provision([(n, str(root / "data" / n)) for n in names], policy=POLICY)
        edge.start_server()
        nodes = {n: edge.start_node(n) for n in names}
        edge.wait_online(names)
        time.sleep(20)  # the forkservers finish importing
        pids = {n: p.popen.pid for n, p in nodes.items()}
        idle_rss = {n: _rss(_tree(pid)) for n, pid in pids.items()}
        before = {n: _cpu(_tree(pid)) for n, pid in pids.items()}
        time.sleep(args.idle)
        idle_rate = {n: (_cpu(_tree(pid)) - before[n]) / args.idle for n, pid in pids.items()}
        watch = Watch(pids, 0.05)
        start_cpu = {n: _cpu(_tree(pid)) for n, pid in pids.items()}
        watch.start()
        started = time.monotonic()
        run = edge.run(job, "--option", f"min-nodes={args.nodes}", name="bench-run")
        code = edge.finish(run, timeout=1800)
        seconds = time.monotonic() - started
        watch.stop()
        print(f"job exit {code} in {seconds:.1f} s, load average {os.getloadavg()}")
        per_message = []
        for n in names:
            used = watch.cpu[n] - start_cpu[n] - idle_rate[n] * seconds
            tasks = len(watch.tasks[n])
            value = used / tasks if tasks else float("nan")
            per_message.append(value)
            print(
                f"{n}: idle RSS {idle_rss[n] / 2**20:.0f} MiB, "
                f"idle CPU {idle_rate[n]:.3f} CPU-s/s, "
                f"job CPU {used:.2f} CPU-s over {tasks} task processes = {value:.3f} CPU-s/message"
            )
        print(f"tree-level estimate, median over nodes: {statistics.median(per_message):.3f}")
        # Each task logs its own CPU time (clients/superexec.py): the spread separates the
        # fixed cost (the cheapest messages, e.g. node_info) from the stages' work.
        logged: list[float] = []
        for n in names:
            cpu = sorted(
                float(v) for v in re.findall(r"clientapp task: ([0-9.]+) CPU-s", nodes[n].log())
            )
            if cpu:
                print(f"{n}: per task (logged) {' '.join(f'{v:.3f}' for v in cpu)}")
                logged.extend(cpu)
        if logged:
            print(
                f"CPU-s per message (each task's own CPU, {len(logged)} tasks): median "
                f"{statistics.median(logged):.3f}, max {max(logged):.3f}"
            )
    finally:
        edge.stop()


if __name__ == "__main__":
    main()
