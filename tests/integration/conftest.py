"""A real Flower deployment on loopback for integration tests: one ``flower-superlink``, N
``flower-supernode`` processes and the ``flwr`` CLI, all insecure (no TLS), all from the
already-installed environment (no ``uv sync``, no downloads).

Flower 1.42 facts this harness relies on (read from the installed ``flwr``):

- The SuperLink serves the Control, Fleet and Runtime ("ServerAppIo") APIs over HTTP on *one*
  port (``--host``/``--port``, default 8000). Each SuperNode serves its own Runtime API for its
  ClientApps on another port (``--port``, default 9094). So a deployment needs 1 + N free ports;
  they are picked here by binding port 0, so tests can run concurrently.
- ``flwr`` finds SuperLinks in the Flower configuration file ``$FLWR_HOME/config.toml``
  (``[superlink.<name>] address/insecure``), *not* in pyproject.toml: a
  ``[tool.flwr.federations]`` table there is a legacy form that ``flwr run`` migrates into the
  user's config file and then comments out in the pyproject (it rewrites the file). Every
  process here gets its own ``FLWR_HOME`` under the test's tmp dir, so nothing touches
  ``~/.flwr`` (config, installed FABs, credentials, update-check cache).
- ``flower-superlink`` installs app dependencies with ``uv sync`` by default;
  ``--disable-runtime-dependency-installation`` turns that off (``flower-supernode`` has it off
  by default; it only has ``--allow-runtime-dependency-installation``). Processes started by
  the SuperLink/SuperNodes (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) are
  looked up on ``PATH``, so the environment's ``bin`` folder is put first.
- ``flwr run --format json`` exits 0 even when it fails (``"success": false``), and a ServerApp
  that raises still ends as a finished run (``finished:failed``): the outcome is read from
  ``flwr ls --run-id ... --format json`` and, above all, from the files the run wrote.
- ``flower-superexec`` is started in its own session (``start_new_session``), so killing the
  SuperLink's or a SuperNode's process group does not reach it or the app processes it spawns.
  Every process started here carries a marker environment variable; teardown kills the process
  groups it started and then every process that carries the marker, by pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

MARKER_ENV = "FEDBRAIN_IT_DEPLOYMENT"
CONNECTION = "fedbrain-it"
HOST = "127.0.0.1"


def _bin_dir() -> Path:
    return Path(sys.executable).parent


def _executable(name: str) -> str:
    candidate = _bin_dir() / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed next to {sys.executable} nor on PATH")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on loopback (held together while picking)."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def toml_string(value: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(value)


def node_config_arg(values: Mapping[str, str | int | float | bool]) -> str:
    """``--node-config`` text: space-separated ``key=<TOML value>`` pairs.

    Flower splits on whitespace outside quotes, so string values must not contain a quote of
    the kind used here (paths with spaces are fine).
    """
    parts: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, int | float):
            parts.append(f"{key}={value}")
        else:
            if '"' in value or "\\" in value:
                raise ValueError(f"node-config value for {key!r} must not contain '\"' or '\\'")
            parts.append(f'{key}="{value}"')
    return " ".join(parts)


def write_run_config_toml(path: Path, values: Mapping[str, str | int | float | bool]) -> Path:
    """A ``--run-config`` file of flat dotted keys (``flwr`` flattens it back)."""
    lines: list[str] = []
    for key, value in values.items():
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, int | float):
            rendered = repr(value)
        else:
            rendered = toml_string(value)
        quoted_key = ".".join(toml_string(part) for part in key.split("."))
        lines.append(f"{quoted_key} = {rendered}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _pids_with_marker(marker: str) -> list[int]:
    """Pids of live processes whose environment has ``MARKER_ENV=marker`` (Linux /proc)."""
    needle = f"{MARKER_ENV}={marker}".encode()
    found: list[int] = []
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # zombie: nothing left to kill
            continue
        if needle in environ.split(b"\0"):
            found.append(pid)
    return found


@dataclass
class ManagedProcess:
    name: str
    args: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, limit: int = 6000) -> str:
        with contextlib.suppress(OSError):
            self.log_file.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "<no log>"
        return text[-limit:]


@dataclass
class CliResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, Any]:
        """The JSON document ``--format json`` printed (anything before it is skipped)."""
        start = self.stdout.find("{")
        if start < 0:
            raise AssertionError(f"no JSON in output of {self.args}:\n{self}")
        doc = json.loads(self.stdout[start:])
        if not isinstance(doc, dict):
            raise AssertionError(f"unexpected JSON from {self.args}: {doc!r}")
        return doc

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.args)}\n(rc={self.returncode})\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )


@dataclass
class FlowerDeployment:
    """SuperLink + SuperNodes on loopback; ``flwr`` CLI calls against them."""

    root: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: list[ManagedProcess] = field(default_factory=list)
    superlink_port: int = 0
    supernode_ports: list[int] = field(default_factory=list)
    cli_home: Path = field(init=False)
    commands: list[list[str]] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "logs").mkdir(exist_ok=True)
        self.cli_home = self.root / "flwr-home-cli"

    # ------------------------------------------------------------------ environment

    def env(self, flwr_home: Path) -> dict[str, str]:
        flwr_home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            {
                "PATH": os.pathsep.join([str(_bin_dir()), env.get("PATH", "")]),
                "FLWR_HOME": str(flwr_home),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PYTHONUNBUFFERED": "1",
                MARKER_ENV: self.marker,
            }
        )
        return env

    def note(self, what: str) -> None:
        """Timestamped progress line (shown by pytest with the captured output)."""
        print(f"[{time.monotonic() - self.t0:7.2f}s] {what}", flush=True)

    def _spawn(self, name: str, args: list[str], flwr_home: Path) -> ManagedProcess:
        log_path = self.root / "logs" / f"{name}.log"
        log_file = log_path.open("wb")
        self.commands.append(args)
        popen = subprocess.Popen(
            args,
            cwd=self.root,
            env=self.env(flwr_home),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: killed as a whole in teardown
        )
        process = ManagedProcess(name, args, popen, log_path, log_file)
        self.processes.append(process)
        return process

    # ------------------------------------------------------------------ start

    def start(
        self, node_configs: Sequence[Mapping[str, str | int | float | bool]], *, timeout: float
    ) -> None:
        """Start the SuperLink and one SuperNode per node config; wait until the SuperLink is
        healthy and every SuperNode is online. (SuperNodes retry until the SuperLink answers, so
        all start at once.)"""
        ports = free_ports(1 + len(node_configs))
        self.superlink_port, self.supernode_ports = ports[0], ports[1:]
        self._write_cli_config()
        deadline = time.monotonic() + timeout

        self._spawn(
            "superlink",
            [
                _executable("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--isolation",
                "subprocess",
                "--host",
                HOST,
                "--port",
                str(self.superlink_port),
            ],
            self.root / "flwr-home-superlink",
        )
        for index, (config, port) in enumerate(
            zip(node_configs, self.supernode_ports, strict=True)
        ):
            self._spawn(
                f"supernode-{index}",
                [
                    _executable("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"{HOST}:{self.superlink_port}",
                    "--isolation",
                    "subprocess",
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                    "--node-config",
                    node_config_arg(config),
                ],
                self.root / f"flwr-home-supernode-{index}",
            )
        self._wait_for_health(deadline)
        self.note(f"SuperLink healthy on {HOST}:{self.superlink_port}")
        self._wait_for_nodes(len(node_configs), deadline)
        self.note(f"{len(node_configs)} SuperNodes online (runtime ports {self.supernode_ports})")

    def _write_cli_config(self) -> None:
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "{HOST}:{self.superlink_port}"\n'
            "insecure = true\n",
            encoding="utf-8",
        )

    def _check_alive(self) -> None:
        dead = [p for p in self.processes if not p.alive()]
        if dead:
            raise AssertionError(
                "exited early: "
                + ", ".join(f"{p.name} (rc={p.popen.returncode})" for p in dead)
                + "\n"
                + self.diagnostics()
            )

    def _wait_for_health(self, deadline: float) -> None:
        url = f"http://{HOST}:{self.superlink_port}/health"
        while True:
            self._check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"SuperLink not healthy at {url}\n{self.diagnostics()}")
            time.sleep(0.3)

    def online_nodes(self) -> list[dict[str, Any]]:
        result = self.flwr(["supernode", "ls", CONNECTION, "--format", "json"], timeout=60)
        try:
            doc = result.json()
        except (AssertionError, json.JSONDecodeError):
            return []
        nodes = doc.get("nodes", [])
        return [n for n in nodes if isinstance(n, dict) and n.get("status") == "online"]

    def _wait_for_nodes(self, count: int, deadline: float) -> None:
        while True:
            self._check_alive()
            if len(self.online_nodes()) >= count:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} SuperNodes online\n{self.diagnostics()}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ the flwr CLI

    def flwr(self, args: list[str], *, timeout: float = 120) -> CliResult:
        full = [_executable("flwr"), *args]
        self.commands.append(full)
        completed = subprocess.run(
            full,
            cwd=self.root,
            env=self.env(self.cli_home),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        return CliResult(
            full,
            completed.returncode,
            completed.stdout.decode("utf-8", errors="replace"),
            completed.stderr.decode("utf-8", errors="replace"),
        )

    def run(self, app_dir: Path, run_config_file: Path | None = None) -> int:
        """``flwr run APP CONNECTION [--run-config FILE] --format json``; the run id."""
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        if run_config_file is not None:
            args += ["--run-config", str(run_config_file)]
        result = self.flwr(args, timeout=180)
        self.note(f"flwr run: {result.stdout.strip()}")
        doc = result.json()
        if doc.get("success") is not True or doc.get("run-id") is None:
            raise AssertionError(f"flwr run did not start a run:\n{result}\n{self.diagnostics()}")
        return int(doc["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any]:
        result = self.flwr(
            ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], timeout=60
        )
        doc = result.json()
        runs = doc.get("runs") or []
        if doc.get("success") is not True or not runs:
            raise AssertionError(f"flwr ls failed:\n{result}")
        run = runs[0]
        assert isinstance(run, dict)
        return run

    def wait_for_run(
        self,
        run_id: int,
        *,
        timeout: float,
        outcome_written: Callable[[], bool] | None = None,
        poll_interval: float = 10.0,
    ) -> dict[str, Any]:
        """Wait until ``flwr ls`` shows the run ``finished:*``; its last ``flwr ls`` row.

        Each ``flwr`` call is a new process costing 1-2 CPU-seconds, which the run itself needs
        on a 2-core machine: ``flwr ls`` is asked every ``poll_interval`` seconds (to notice a
        run that fails without writing anything), and every second once ``outcome_written()``
        -- a cheap check of the files the run writes last -- says the end is near.
        """
        deadline = time.monotonic() + timeout
        next_poll = time.monotonic() + 2.0
        while True:
            near_end = outcome_written is not None and outcome_written()
            if near_end or time.monotonic() >= next_poll:
                run = self.run_status(run_id)
                if str(run.get("status", "")).startswith("finished"):
                    self.note(f"run {run_id}: {run.get('status')} ({run.get('status-details')})")
                    return run
                next_poll = time.monotonic() + (1.0 if near_end else poll_interval)
            self._check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"run {run_id} not finished after {timeout:.0f}s: "
                    f"{self.run_status(run_id)}\n{self.diagnostics(run_id)}"
                )
            time.sleep(0.5)

    def run_log(self, run_id: int) -> str:
        try:
            result = self.flwr(["log", str(run_id), CONNECTION, "--show"], timeout=60)
        except subprocess.TimeoutExpired:
            return "<flwr log timed out>"
        return (result.stdout + result.stderr)[-12000:]

    # ------------------------------------------------------------------ diagnostics, teardown

    def diagnostics(self, run_id: int | None = None) -> str:
        daemons = [process.args for process in self.processes]
        cli = [c for c in self.commands if c not in daemons][-6:]
        parts = ["commands (daemons, then the last flwr calls):"]
        parts += ["  $ " + " ".join(c) for c in [*daemons, *cli]]
        for process in self.processes:
            state = "running" if process.alive() else f"exited rc={process.popen.returncode}"
            parts.append(f"----- {process.name} ({state}) log tail -----")
            parts.append(process.log_tail())
        if run_id is not None:
            parts.append(f"----- flwr log {run_id} --show -----")
            parts.append(self.run_log(run_id))
        return "\n".join(parts)

    def stop(self, grace: float = 5.0) -> None:
        """Stop everything started here: our process groups, then every marked process."""
        for process in self.processes:
            if process.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                process.popen.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.popen.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(timeout=5)
        # SuperExecs and app processes run in sessions of their own: find them by marker.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _pids_with_marker(self.marker)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            end = time.monotonic() + grace
            while time.monotonic() < end and _pids_with_marker(self.marker):
                time.sleep(0.1)
        for process in self.processes:
            with contextlib.suppress(OSError):
                process.log_file.close()

    def leftover_pids(self) -> list[int]:
        return _pids_with_marker(self.marker)


@pytest.fixture
def flower_deployment(tmp_path: Path) -> Iterator[FlowerDeployment]:
    """A not-yet-started :class:`FlowerDeployment`; always torn down, no process left."""
    deployment = FlowerDeployment(tmp_path / "deployment")
    try:
        yield deployment
    finally:
        deployment.stop()
        leftovers = deployment.leftover_pids()
        assert not leftovers, f"processes left running after teardown: {leftovers}"
