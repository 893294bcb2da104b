"""A provisioned edge deployment on loopback, driven through fedbrain's own commands.

``fedbrain provision`` writes the kits; ``fedbrain server start`` runs the SuperLink (TLS,
node authentication, a persistent database); ``fedbrain node start`` runs each SuperNode;
``fedbrain run`` signs, submits and follows jobs. Every process runs in a session of its own
(so ``kill -9`` of its group is a crash of that component) and carries the harness's marker in
its environment, so teardown finds everything it started -- SuperExecs and app processes
included -- and kills it by pid (:func:`tests.integration.conftest._pids_with_marker`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from server.control import ControlClient, ControlError
from tests.integration.conftest import MARKER_ENV, _pids_with_marker, free_ports

FEDBRAIN = str(Path(sys.executable).with_name("fedbrain"))


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        with contextlib.suppress(OSError):
            self.log_file.flush()
        return self.log_path.read_text("utf-8", errors="replace")

    def kill9(self) -> None:
        """``kill -9`` of the process's whole group: the component crashes."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=30)


@dataclass
class EdgeDeployment:
    root: Path
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    processes: list[Process] = field(default_factory=list)
    port: int = 0
    t0: float = field(default_factory=time.monotonic)

    @property
    def kits(self) -> Path:
        return self.root / "kits"

    @property
    def server_kit(self) -> Path:
        return self.kits / "server"

    @property
    def operator_kit(self) -> Path:
        return self.kits / "operators" / "op"

    def note(self, what: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {what}", flush=True)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1",
                MARKER_ENV: self.marker,
            }
        )
        env.pop("FLWR_HOME", None)
        return env

    def fedbrain(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [FEDBRAIN, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.root,
        )

    def spawn(self, name: str, *args: str) -> Process:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        path = self.root / "logs" / f"{name}.log"
        handle = path.open("ab")
        popen = subprocess.Popen(
            [FEDBRAIN, *args],
            env=self.env(),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        process = Process(name, popen, path, handle)
        self.processes.append(process)
        return process

    # ------------------------------------------------------------------ provisioning

    def provision(self, nodes: Sequence[tuple[str, str]], *, policy: str) -> None:
        """``fedbrain provision`` of ``nodes`` (name, data folder), each with ``policy``."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "node-policy.toml").write_text(policy)
        self.port = free_ports(1)[0]
        lines = [
            "[federation]",
            'name = "edge-it"',
            f'superlink = "127.0.0.1:{self.port}"',
            "",
            "[[operators]]",
            'name = "op"',
        ]
        for (name, data), port in zip(nodes, free_ports(len(nodes)), strict=True):
            lines += [
                "",
                "[[nodes]]",
                f'name = "{name}"',
                'node_type = "sensing"',
                f'data = "{data}"',
                f"runtime_port = {port}",
                'policy = "node-policy.toml"',
            ]
        (self.root / "federation.toml").write_text("\n".join(lines) + "\n")
        done = self.fedbrain("provision", "federation.toml", "--out", str(self.kits))
        assert done.returncode == 0, done.stdout + done.stderr

    # ------------------------------------------------------------------ components

    def start_server(self, *, timeout: float = 180) -> Process:
        server = self.spawn("server", "server", "start", "--kit", str(self.server_kit))
        self.wait_for(lambda: "node authentication:" in server.log(), timeout, [server])
        self.note("server up, node keys registered")
        return server

    def start_node(self, name: str, kit: Path | None = None) -> Process:
        folder = kit or self.kits / "nodes" / name
        return self.spawn(f"node-{name}", "node", "start", "--kit", str(folder))

    def control(self) -> ControlClient:
        return ControlClient(
            f"127.0.0.1:{self.port}",
            root_certificates=self.server_kit / "ca.crt.pem",
            insecure=False,
        )

    def online(self) -> list[str]:
        try:
            with self.control() as client:
                return sorted(n.name for n in client.nodes() if n.status == "online")
        except ControlError:
            return []

    def wait_online(self, names: Sequence[str], *, timeout: float = 180) -> None:
        wanted = sorted(names)
        self.wait_for(lambda: self.online() == wanted, timeout, self.processes, poll=2.0)
        self.note(f"online: {wanted}")

    def wait_for(
        self,
        condition: Callable[[], bool],
        timeout: float,
        watched: Sequence[Process] = (),
        *,
        poll: float = 0.3,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [p.name for p in watched if not p.alive() and p.name.startswith("server")]
            if dead:
                raise AssertionError(f"{dead} exited\n{self.diagnostics()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s\n{self.diagnostics()}")
            time.sleep(poll)

    def run(self, job: Path, *args: str, name: str = "run") -> Process:
        return self.spawn(name, "run", str(job), "--kit", str(self.operator_kit), *args)

    def finish(self, process: Process, *, timeout: float) -> int:
        try:
            return process.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{process.name} still running\n{self.diagnostics()}") from None

    def serverapps(self) -> list[int]:
        """Our live ``flwr-serverapp`` processes."""
        found = []
        for pid in _pids_with_marker(self.marker):
            with contextlib.suppress(OSError):
                if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    # ------------------------------------------------------------------ diagnostics, teardown

    def diagnostics(self) -> str:
        parts = []
        for process in self.processes:
            state = "running" if process.alive() else f"exited rc={process.popen.returncode}"
            parts.append(f"----- {process.name} ({state}) -----\n{process.log()[-5000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for process in self.processes:
            if process.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes:
            try:
                process.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill9()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = _pids_with_marker(self.marker)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            end = time.monotonic() + 5
            while pids and time.monotonic() < end and _pids_with_marker(self.marker):
                time.sleep(0.1)
        for process in self.processes:
            with contextlib.suppress(OSError):
                process.log_file.close()
