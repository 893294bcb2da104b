"""A real PostgreSQL server for tests: a throwaway cluster (``initdb``) on a free port.

Debian's ``postgresql`` package provides the binaries (``.ci/system-packages`` installs it).
PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` OS user
the package creates and its commands run through ``runuser``. Each test gets its own database
(:meth:`PostgresServer.new_database`). Without the binaries the tests skip -- except under
``CI=true``, where they fail: CI must run them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

USER = "fedbrain"


def _bin_dir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing(what: str) -> None:
    """Skip, or fail under CI (where every system package must be installed)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is not installed; run .ci/system-packages")
    pytest.skip(f"{what} is not installed (run .ci/system-packages)")


class PostgresServer:
    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="fedbrain-pg-", dir="/tmp"))
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.as_root = os.geteuid() == 0

    def _command(self, *args: str) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if self.as_root else list(args)

    def start(self) -> None:
        data = self.root / "data"
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        subprocess.run(
            self._command(
                str(self.bin_dir / "initdb"), "-D", str(data), "-U", USER, "-A", "trust",
                "--no-sync", "-E", "UTF8",
            ),
            check=True,
            capture_output=True,
        )  # fmt: skip
        log = self.root / "postgres.log"
        self.process = subprocess.Popen(
            self._command(
                str(self.bin_dir / "postgres"), "-D", str(data), "-p", str(self.port),
                "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                "-c", "max_connections=200",
            ),
            stdout=subprocess.DEVNULL,
            stderr=log.open("wb"),
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with self.connect("postgres"):
                    return
            except Exception:
                if self.process.poll() is not None:
                    raise RuntimeError(log.read_text(errors="replace")) from None
                time.sleep(0.2)
        raise RuntimeError("PostgreSQL did not accept connections within 30 s")

    def connect(self, database: str) -> contextlib.AbstractContextManager[object]:
        import psycopg

        return psycopg.connect(
            host="127.0.0.1", port=self.port, user=USER, dbname=database, autocommit=True
        )

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.connect("postgres") as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[attr-defined]
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: PostgreSQL's "smart" shutdown
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        missing("PostgreSQL (Debian package postgresql)")
        raise AssertionError("unreachable")
    server = PostgresServer(bin_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
