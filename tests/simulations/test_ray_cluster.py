"""`fedbrain simulate --ray-address`: a scenario on an existing Ray cluster -- a head and one
worker process started here on loopback, each with one CPU, so the two ClientApp actors (one
CPU each) run one on each Ray node."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from simulations.runner import ExitCode

TINY = """\
[simulation]
name = "cluster"
seed = 3
round_timeout = 120.0
node_wait_timeout = 60.0

[[nodes]]
type = "sensing"
count = 3
modalities = ["iot"]
examples = 48
partition = "iid"

[[jobs]]
component = "sensing"
base_model = "iot"
task = "normalizer"
privacy_level = "secure-agg"
federation = { num_rounds = 1, reliability_threshold = 0.1 }
"""


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(*args: str, log: Path) -> subprocess.Popen[bytes]:
    """``ray start ... --block`` in its own process group: stopping it stops its Ray processes
    (never ``ray stop``, which would end every Ray process of this user on the machine)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [_ray(), "start", "--block", "--disable-usage-stats", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _wait_for_nodes(address: str, count: int, timeout: float) -> None:
    """Until the cluster at ``address`` has ``count`` alive nodes (checked in a subprocess, so
    this test process never connects to Ray itself)."""
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout
    alive = 0
    while time.monotonic() < deadline:
        done = subprocess.run(
            [sys.executable, "-c", probe, address], capture_output=True, text=True, timeout=60
        )
        alive = int(done.stdout.strip() or 0) if done.returncode == 0 else 0
        if alive >= count:
            return
        time.sleep(1.0)
    raise TimeoutError(f"the Ray cluster at {address} has {alive} of {count} nodes")


@contextmanager
def ray_cluster(folder: Path) -> Iterator[str]:
    """A head (one CPU) and one worker (one CPU) on 127.0.0.1; yields the head's address."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    folder.mkdir(parents=True, exist_ok=True)
    common = ("--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1")
    head = _start(
        "--head", "--port", str(port), "--include-dashboard", "false", *common,
        log=folder / "head.log",
    )  # fmt: skip
    worker = None
    try:
        _wait_for_nodes(address, 1, timeout=120)
        worker = _start("--address", address, *common, log=folder / "worker.log")
        _wait_for_nodes(address, 2, timeout=120)
        yield address
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)


@pytest.mark.slow
def test_a_scenario_runs_on_an_existing_two_node_ray_cluster(tmp_path: Path) -> None:
    scenario = tmp_path / "cluster.toml"
    scenario.write_text(TINY, "utf-8")
    out = tmp_path / "out"
    with ray_cluster(tmp_path / "ray") as address:
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("fedbrain")),
                "simulate", str(scenario), "--out", str(out), "--ray-address", address,
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )  # fmt: skip
    assert run.returncode == ExitCode.OK, run.stdout[-3000:] + run.stderr[-3000:]
    (job,) = json.loads((out / "summary.json").read_text())["jobs"]
    assert job["status"] == "passed" and job["verification"] == "verified"
    assert job["metrics"]["participants"] == 3
