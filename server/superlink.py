"""``fedbrain server start``: the SuperLink of a server kit, with TLS and node authentication.

:func:`serve` runs ``flower-superlink`` as a child process (in the kit folder, with
:data:`server.server_kit.SERVER_KIT_ENV` set for the ServerApps it starts) and stays its parent:
it marks the runs of a previous SuperLink that died mid-run ``interrupted`` (before anything
else can touch them; a ServerApp that outlives its SuperLink for a while is noticed when it
ends, for some minutes after the start), waits until the SuperLink answers, makes its node
registrations those of the kit's ``authorized-nodes.json`` (:func:`server.control.sync_nodes`),
then waits for it and forwards SIGTERM/SIGINT/SIGHUP to it. Its exit status is the
SuperLink's.

``--insecure`` (no TLS, hence no node authentication: Flower requires TLS for it) exists for a
laptop demo only and says so loudly; fedbrain's roster still decides who takes part.
"""

from __future__ import annotations

import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Final

from server.control import ControlClient, load_authorized_nodes, sync_nodes
from server.ledger import Ledger
from server.restart import mark_interrupted_runs
from server.server_kit import SERVER_KIT_ENV, ServerKit
from server.startup_kits import TLS_CERT_FILE, TLS_KEY_FILE

__all__ = ["INSECURE_WARNING", "flower_executable", "serve", "superlink_command"]

INSECURE_WARNING: Final = (
    "WARNING: --insecure: the SuperLink runs WITHOUT TLS and WITHOUT node authentication.\n"
    "WARNING: every message, the signed job included, crosses the network in clear text, and\n"
    "WARNING: any SuperNode that can reach this port can connect. Use it on a laptop demo only."
)
_LOCAL_HOSTS: Final = frozenset({"0.0.0.0", "::", "127.0.0.1", "localhost", "::1"})  # noqa: S104


def flower_executable(name: str) -> str:
    """A Flower console script: next to this Python first (the same environment), else PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed (pip install flwr, in this environment)")
    return found


def _local_address(kit: ServerKit) -> str:
    host = "127.0.0.1" if kit.listen in _LOCAL_HOSTS else kit.listen
    return f"[{host}]:{kit.port}" if ":" in host else f"{host}:{kit.port}"


def superlink_command(kit: ServerKit, *, insecure: bool) -> list[str]:
    """The ``flower-superlink`` command line for ``kit``."""
    command = [
        flower_executable("flower-superlink"),
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--host",
        kit.listen,
        "--port",
        str(kit.port),
        "--database",
        str(kit.database),
    ]
    if insecure:
        return [*command, "--insecure"]
    return [
        *command,
        "--ssl-certfile",
        str(kit.file(TLS_CERT_FILE)),
        "--ssl-keyfile",
        str(kit.file(TLS_KEY_FILE)),
        "--ssl-ca-certfile",
        str(kit.ca),
        "--enable-supernode-auth",
    ]


def _environment(kit: ServerKit) -> dict[str, str]:
    env = dict(os.environ)
    env[SERVER_KIT_ENV] = str(kit.folder)
    env["FLWR_HOME"] = str(kit.folder / "state" / "flwr-home")  # the kit's own, never shared
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _wait_healthy(
    kit: ServerKit, process: subprocess.Popen[bytes], *, insecure: bool, timeout: float
) -> None:
    scheme = "http" if insecure else "https"
    url = f"{scheme}://{_local_address(kit)}/health"
    context = None if insecure else ssl.create_default_context(cafile=str(kit.ca))
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:  # noqa: S310
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the SuperLink did not answer at {url} within {timeout:.0f}s")
        time.sleep(0.5)


def _mark_interrupted(kit: ServerKit, echo: Callable[[str], None]) -> None:
    if not kit.ledger.is_file():
        return
    with Ledger(kit.ledger_url) as ledger:
        for run_id in mark_interrupted_runs(ledger):
            echo(f"run {run_id} was interrupted (its ServerApp died): resume it with --resume")


def _watch_orphans(
    kit: ServerKit, echo: Callable[[str], None], *, period: float, every: float
) -> threading.Thread:
    """Mark runs interrupted whose ServerApp outlived the SuperLink it lost for a while (Flower's
    exit handler of a ServerApp whose SuperLink died may wait for the next one to push its
    last logs) once that process ends."""

    def watch() -> None:
        deadline = time.monotonic() + period
        while time.monotonic() < deadline:
            time.sleep(every)
            try:
                _mark_interrupted(kit, echo)
            except Exception as exc:  # the ledger is busy or gone: say so, never crash serving
                echo(f"could not check for interrupted runs: {exc}")
                return

    thread = threading.Thread(target=watch, name="fedbrain-interrupted-runs", daemon=True)
    thread.start()
    return thread


def serve(
    kit: ServerKit,
    *,
    insecure: bool,
    echo: Callable[[str], None],
    health_timeout: float = 120.0,
    orphan_watch: float = 300.0,
) -> int:
    """Run the SuperLink of ``kit`` until it exits (see the module docstring); for
    ``orphan_watch`` seconds after it is up, keep marking runs interrupted whose ServerApp
    from before the restart ends late."""
    _mark_interrupted(kit, echo)
    kit.database.parent.mkdir(parents=True, exist_ok=True)
    kit.runs.mkdir(parents=True, exist_ok=True)
    if insecure:
        echo(INSECURE_WARNING)
    process = subprocess.Popen(  # noqa: S603 -- our own argument list
        superlink_command(kit, insecure=insecure), cwd=kit.folder, env=_environment(kit)
    )

    def forward(signum: int, _frame: FrameType | None) -> None:
        if process.poll() is None:
            process.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        _wait_healthy(kit, process, insecure=insecure, timeout=health_timeout)
        echo(f"SuperLink of federation {kit.federation!r} is up on {kit.listen}:{kit.port}")
        if not insecure:
            with ControlClient(_local_address(kit), root_certificates=kit.ca, insecure=False) as c:
                report = sync_nodes(c, load_authorized_nodes(kit.authorized_nodes))
            echo(
                "node authentication: "
                f"{len(report.kept) + len(report.registered)} node key(s) registered"
                + (f" (new: {', '.join(report.registered)})" if report.registered else "")
                + (
                    f"; unregistered: {', '.join(report.unregistered)}"
                    if report.unregistered
                    else ""
                )
            )
        _watch_orphans(kit, echo, period=orphan_watch, every=5.0)
        return process.wait()
    except BaseException:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_FORWARDED: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
