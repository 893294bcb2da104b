"""``fedbrain node start``: a node's daemon, the SuperNode of its deployment kit.

:func:`load_deployment` reads the kit's ``node.toml`` and checks, before anything connects,
that the node can defend itself: its Flower authentication key and identity key are private
(0600), the roster is signed by a trusted operator and lists it, and its policy is valid
(:func:`clients.kit.load_kit`). :func:`run_node` then runs ``flower-supernode`` with TLS (the
kit's CA verifies the SuperLink), the kit's authentication key and a node config that names
the node, its type, its data folder and its kit (:class:`clients.config.NodeConfig`), and stays
its parent: it forwards SIGTERM/SIGINT/SIGHUP and exits with its status. The SuperNode retries
until the SuperLink answers and reconnects after a SuperLink restart; the ClientApp task of
each message loads the kit and applies the node's policy to every job.

Light on the device: the SuperNode runs with ``--isolation process`` and the daemon starts the
node's SuperExec itself, :mod:`clients.superexec` (:func:`superexec_command`), which forks each
message's ClientApp task from a process that has imported Flower, torch and fedbrain once,
instead of Flower's default of a fresh interpreter per message.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Final

from clients.credentials import (
    AUTH_KEY_FILE,
    CA_FILE,
    NODE_CONFIG_FILE,
    CredentialsError,
)
from clients.kit import load_kit
from clients.policy import PolicyError

__all__ = [
    "NodeDeployment",
    "NodeDeploymentError",
    "load_deployment",
    "run_node",
    "superexec_command",
    "supernode_command",
]

_FORWARDED: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_WATCH_INTERVAL: Final = 0.5
"""Seconds between the daemon's checks that its SuperNode and SuperExec are both alive."""
INSECURE_WARNING: Final = (
    "WARNING: --insecure: this SuperNode talks to the SuperLink WITHOUT TLS and WITHOUT node\n"
    "WARNING: authentication: it cannot tell the SuperLink from an impostor on the network.\n"
    "WARNING: Use it on a laptop demo only."
)


class NodeDeploymentError(ValueError):
    """A node kit that must not start; the message lists every problem."""


@dataclass(frozen=True)
class NodeDeployment:
    """A node kit ready to start (paths absolute)."""

    folder: Path
    federation: str
    name: str
    node_type: str
    superlink: str
    data: Path
    runtime_port: int

    def node_config(self) -> str:
        """``--node-config`` text for Flower (space-separated ``key="value"`` pairs)."""
        values = {
            "node-type": self.node_type,
            "data-dir": str(self.data),
            "kit": str(self.folder),
            "name": self.name,
        }
        for key, value in values.items():
            if any(c in value for c in '"\\\t\n\r'):
                raise NodeDeploymentError(
                    f"{key} {value!r}: Flower's node config cannot carry quotes, backslashes, "
                    "tabs or line breaks; move the folder"
                )
        return " ".join(f'{key}="{value}"' for key, value in values.items())


def _private(path: Path, problems: list[str]) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        problems.append(f"{path}: missing")
        return
    if mode & 0o077:
        problems.append(
            f"{path}: readable by group or others (mode {stat.S_IMODE(mode):04o}); "
            "run chmod 600 on it"
        )


def load_deployment(folder: Path, *, insecure: bool = False) -> NodeDeployment:
    """Read and check a node kit (see the module docstring); :class:`NodeDeploymentError`
    lists every problem. ``insecure`` skips the TLS and authentication files."""
    folder = Path(folder).expanduser().absolute()
    path = folder / NODE_CONFIG_FILE
    try:
        config = tomllib.loads(path.read_text("utf-8"))
    except OSError:
        raise NodeDeploymentError(
            f"{folder}: not a node kit (no {NODE_CONFIG_FILE}); give the nodes/<name>/ folder "
            "that `fedbrain provision` wrote"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise NodeDeploymentError(f"{path}: not valid TOML: {exc}") from None
    problems: list[str] = []
    values: dict[str, str] = {}
    for key in ("federation", "name", "node_type", "superlink", "data"):
        value = config.get(key)
        if not isinstance(value, str) or not value:
            problems.append(f"{path}: {key} must be non-empty text")
        values[key] = str(value)
    port = config.get("runtime_port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        problems.append(f"{path}: runtime_port must be a number from 1 to 65535")
        port = 0
    if not insecure:
        _private(folder / AUTH_KEY_FILE, problems)
        if not (folder / CA_FILE).is_file():
            problems.append(f"{folder / CA_FILE}: missing")
    try:
        load_kit(folder)
    except (CredentialsError, PolicyError) as exc:
        problems.append(str(exc))
    data = Path(values["data"]).expanduser()
    if not data.is_dir():
        problems.append(f"{path}: data folder {data} does not exist on this machine")
    if problems:
        raise NodeDeploymentError("the node kit cannot be used:\n" + "\n".join(problems))
    return NodeDeployment(
        folder=folder,
        federation=values["federation"],
        name=values["name"],
        node_type=values["node_type"],
        superlink=values["superlink"],
        data=data.absolute(),
        runtime_port=int(port),
    )


def _executable(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (pip install flwr, in this environment)")
    return found


def supernode_command(node: NodeDeployment, *, insecure: bool) -> list[str]:
    """The ``flower-supernode`` command line."""
    command = [
        _executable("flower-supernode"),
        "--superlink",
        node.superlink,
        "--isolation",
        "process",  # the daemon runs the SuperExec: superexec_command
        "--host",
        "127.0.0.1",  # the ClientApp API stays on this machine
        "--port",
        str(node.runtime_port),
        "--node-config",
        node.node_config(),
    ]
    if insecure:
        return [*command, "--insecure"]
    return [
        *command,
        "--root-certificates",
        str(node.folder / CA_FILE),
        "--auth-supernode-private-key",
        str(node.folder / AUTH_KEY_FILE),
    ]


def superexec_command(node: NodeDeployment, *, supernode_pid: int) -> list[str]:
    """The node's SuperExec (:mod:`clients.superexec`) for its SuperNode's Runtime API on
    loopback (plain HTTP on 127.0.0.1, as Flower's own SuperExec uses it); it exits with the
    SuperNode."""
    return [
        sys.executable,
        "-m",
        "clients.superexec",
        "--runtime-api-address",
        f"127.0.0.1:{node.runtime_port}",
        "--insecure",
        "--parent-pid",
        str(supernode_pid),
    ]


def run_node(
    node: NodeDeployment,
    *,
    insecure: bool,
    echo: Callable[[str], None],
) -> int:
    """Run the node's SuperNode until it exits (see the module docstring)."""
    if insecure:
        echo(INSECURE_WARNING)
    env = dict(os.environ)
    env["FLWR_HOME"] = str(node.folder / "state" / "flwr-home")  # one per node, never shared
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    process = subprocess.Popen(  # noqa: S603 -- our own argument list
        supernode_command(node, insecure=insecure),
        cwd=node.folder,
        env=env,
    )
    executor = subprocess.Popen(  # noqa: S603 -- our own argument list
        superexec_command(node, supernode_pid=process.pid), cwd=node.folder, env=env
    )
    echo(
        f"node {node.name!r} ({node.node_type}) of federation {node.federation!r}: "
        f"connecting to {node.superlink}"
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        while (code := process.poll()) is None:
            if executor.poll() is not None:  # no SuperExec: messages would wait forever
                echo(
                    f"node {node.name!r}: its SuperExec exited (status {executor.returncode}); "
                    "stopping the SuperNode"
                )
                process.terminate()
                process.wait()
                return 1
            time.sleep(_WATCH_INTERVAL)
        return code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for child in (process, executor):
            if child.poll() is None:
                child.terminate()
        try:
            executor.wait(timeout=10)
        except subprocess.TimeoutExpired:
            executor.kill()
