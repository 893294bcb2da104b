"""The server kit at run time: ``fedbrain server start`` and what the ServerApp takes from it.

``fedbrain server start --kit DIR`` runs ``flower-superlink`` in the kit folder with TLS (the
kit's certificate, key and CA), node authentication and a persistent ``--database``; Flower
starts the ServerApp of each run as a child of the SuperLink, in the same folder and with
:data:`SERVER_KIT_ENV` set, so the ServerApp fills the settings a run config leaves unset from
the kit (:func:`server_kit_defaults`): the roster, the trusted keys, the artifact signing key and
the ledger. An operator's run config therefore carries the signed job and never a server path.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from clients.credentials import CA_FILE, ROSTER_FILE
from server.startup_kits import (
    ARTIFACT_KEY_FILE,
    AUTHORIZED_NODES_FILE,
    SERVER_CONFIG_FILE,
    TLS_CERT_FILE,
    TLS_KEY_FILE,
    TRUSTED_KEYS_FILE,
)

__all__ = [
    "SERVER_KIT_ENV",
    "ServerKit",
    "ServerKitError",
    "load_server_kit",
    "server_kit_defaults",
]

SERVER_KIT_ENV: Final = "FEDBRAIN_SERVER_KIT"
LEDGER_FILE: Final = "state/ledger.sqlite"


class ServerKitError(ValueError):
    """A server kit that the SuperLink must not start with; the message lists why."""


@dataclass(frozen=True)
class ServerKit:
    """A loaded server kit (paths absolute)."""

    folder: Path
    federation: str
    superlink: str
    listen: str
    port: int
    database: Path
    runs: Path

    def file(self, name: str) -> Path:
        return self.folder / name

    @property
    def ca(self) -> Path:
        return self.folder / CA_FILE

    @property
    def ledger(self) -> Path:
        return self.folder / LEDGER_FILE

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{self.ledger}"

    @property
    def authorized_nodes(self) -> Path:
        return self.folder / AUTHORIZED_NODES_FILE

    @property
    def local_address(self) -> str:
        """Where this host reaches the SuperLink (its certificate names 127.0.0.1)."""
        return f"127.0.0.1:{self.port}"


def _private(path: Path, problems: list[str]) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        problems.append(f"{path}: missing")
        return
    if mode & 0o077:
        problems.append(
            f"{path}: a private key readable by group or others (mode "
            f"{stat.S_IMODE(mode):04o}); run chmod 600 on it"
        )


def load_server_kit(folder: Path, *, insecure: bool = False) -> ServerKit:
    """Read ``server.toml`` and check the kit's files (:class:`ServerKitError` lists every
    problem). ``insecure`` skips the TLS files."""
    folder = Path(folder).expanduser().absolute()
    problems: list[str] = []
    config_path = folder / SERVER_CONFIG_FILE
    try:
        config = tomllib.loads(config_path.read_text("utf-8"))
    except OSError:
        raise ServerKitError(
            f"{folder}: not a server kit (no {SERVER_CONFIG_FILE}); give the server/ folder "
            "that `fedbrain provision` wrote"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ServerKitError(f"{config_path}: not valid TOML: {exc}") from None
    values: dict[str, str] = {}
    for key in ("federation", "superlink", "listen", "database", "runs"):
        value = config.get(key)
        if not isinstance(value, str) or not value:
            problems.append(f"{config_path}: {key} must be non-empty text")
        values[key] = str(value)
    port = config.get("port")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        problems.append(f"{config_path}: port must be a number from 1 to 65535")
        port = 0
    for name in (ROSTER_FILE, TRUSTED_KEYS_FILE, AUTHORIZED_NODES_FILE):
        if not (folder / name).is_file():
            problems.append(f"{folder / name}: missing")
    _private(folder / ARTIFACT_KEY_FILE, problems)
    if not insecure:
        for name in (TLS_CERT_FILE, CA_FILE):
            if not (folder / name).is_file():
                problems.append(f"{folder / name}: missing")
        _private(folder / TLS_KEY_FILE, problems)
    if problems:
        raise ServerKitError("the server kit cannot be used:\n" + "\n".join(problems))
    return ServerKit(
        folder=folder,
        federation=values["federation"],
        superlink=values["superlink"],
        listen=values["listen"],
        port=int(port),
        database=folder / values["database"],
        runs=folder / values["runs"],
    )


def server_kit_defaults(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``fedbrain.*`` run-config values the server kit named by :data:`SERVER_KIT_ENV`
    supplies ({} when the variable is unset): roster, trusted keys, artifact signing key,
    the kit's ledger, and ``runs/`` as where relative run directories go."""
    folder = (environ if environ is not None else os.environ).get(SERVER_KIT_ENV)
    if not folder:
        return {}
    kit = Path(folder)
    return {
        "roster": str(kit / ROSTER_FILE),
        "trusted-keys": str(kit / TRUSTED_KEYS_FILE),
        "signing-key": str(kit / ARTIFACT_KEY_FILE),
        "database-url": f"sqlite:///{kit / LEDGER_FILE}",
        "runs": str(kit / "runs"),
    }
