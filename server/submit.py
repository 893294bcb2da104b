"""``fedbrain run JOB --kit OPERATOR_KIT``: sign a job, submit it, follow it, say how it ended.

1. The operator's key signs the job for the kit's federation (refused outside the key's
   window, :meth:`manifests.keys.TrustedKeys.check_can_sign`). The signed job is kept in
   ``<kit>/runs/<run-id>/job.dsse.json``: ``--resume RUN_ID`` sends the *same* signed job
   again, so nodes see the job they already admitted and charged (one job id), never a new one.
2. ``flwr run`` submits fedbrain's Flower app with a run config that carries the signed job
   (``fedbrain.job-envelope``), fedbrain's run id and the resume flag -- never a path on the
   server, which takes its roster, keys and ledger from its own kit (:mod:`server.server_kit`).
3. The run's log (what ``flwr log`` shows, fedbrain's per-round progress included) is
   streamed until the run ends; then Flower's status decides the exit code: 0 only for
   ``finished:completed`` (the deployment ServerApp fails a run that does not pass, so Flower
   reports it ``finished:failed``), 1 otherwise -- unlike ``flwr run``, which exits 0 either
   way -- and 1 with the resume command when the SuperLink is lost mid-run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import tomli_w

from clients.credentials import CA_FILE
from manifests.atomic import write_atomically
from manifests.jobspec import JobSpec
from manifests.keys import SigningKey, TrustedKeys
from manifests.signed_job import sign_job, verify_signed_job
from server.control import ControlClient, ControlError, FlowerRun
from server.startup_kits import OPERATOR_CONFIG_FILE, SIGNING_KEY_FILE, TRUSTED_KEYS_FILE
from server.superlink import flower_executable

__all__ = [
    "CONNECTION",
    "OperatorKit",
    "PreparedRun",
    "SubmitError",
    "default_app_dir",
    "follow",
    "load_operator_kit",
    "prepare_run",
    "run_config",
    "submit",
]

CONNECTION: Final = "fedbrain"
_RUNS: Final = "runs"
_ENVELOPE: Final = "job.dsse.json"


class SubmitError(ValueError):
    """The job cannot be submitted (bad kit, key outside its window, unknown run, ...)."""


@dataclass(frozen=True)
class OperatorKit:
    folder: Path
    federation: str
    name: str
    superlink: str

    @property
    def ca(self) -> Path:
        return self.folder / CA_FILE

    @property
    def flwr_home(self) -> Path:
        return self.folder / "state" / "flwr-home"

    def run_folder(self, run_id: str) -> Path:
        return self.folder / _RUNS / run_id


@dataclass(frozen=True)
class PreparedRun:
    run_id: str
    envelope: bytes
    resume: bool


def load_operator_kit(folder: Path) -> OperatorKit:
    folder = Path(folder).expanduser().absolute()
    path = folder / OPERATOR_CONFIG_FILE
    try:
        config = tomllib.loads(path.read_text("utf-8"))
    except OSError:
        raise SubmitError(
            f"{folder}: not an operator kit (no {OPERATOR_CONFIG_FILE}); give the "
            "operators/<name>/ folder that `fedbrain provision` wrote"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise SubmitError(f"{path}: not valid TOML: {exc}") from None
    values = {k: config.get(k) for k in ("federation", "name", "superlink")}
    bad = [k for k, v in values.items() if not isinstance(v, str) or not v]
    if bad:
        raise SubmitError(f"{path}: {', '.join(bad)} must be non-empty text")
    for name in (SIGNING_KEY_FILE, TRUSTED_KEYS_FILE, CA_FILE):
        if not (folder / name).is_file():
            raise SubmitError(f"{folder / name}: missing from the operator kit")
    return OperatorKit(folder, *(str(values[k]) for k in ("federation", "name", "superlink")))


def prepare_run(
    kit: OperatorKit, job: JobSpec, *, resume: str | None, now: datetime | None = None
) -> PreparedRun:
    """A new signed run of ``job``, or the stored signed job of run ``resume``."""
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    trusted = TrustedKeys.load(kit.folder / TRUSTED_KEYS_FILE)
    if resume is not None:
        stored = kit.run_folder(resume) / _ENVELOPE
        try:
            envelope = stored.read_bytes()
        except OSError:
            raise SubmitError(
                f"no signed job for run {resume!r} in this kit ({stored}); resume from the "
                "operator kit that started it"
            ) from None
        signed = verify_signed_job(envelope, trusted, now=now, federation=kit.federation)
        if signed.job.to_run_config() != job.to_run_config():
            raise SubmitError(
                f"the job file is not the job run {resume!r} was started with; resume it with "
                f"the same job ({stored} holds it)"
            )
        return PreparedRun(resume, envelope, True)
    key = SigningKey.from_pem((kit.folder / SIGNING_KEY_FILE).read_bytes())
    trusted.check_can_sign(key.public_key(), now)
    envelope = sign_job(job, key, federation=kit.federation, issued_at=now)
    run_id = f"run-{now:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    folder = kit.run_folder(run_id)
    folder.mkdir(parents=True)
    write_atomically(folder / _ENVELOPE, envelope)
    return PreparedRun(run_id, envelope, False)


def run_config(prepared: PreparedRun, options: Mapping[str, object]) -> dict[str, object]:
    """The ``--run-config`` table: the signed job, the run's id, directory and resume flag,
    and any further ``fedbrain.*`` run options."""
    values: dict[str, object] = {
        "job-envelope": prepared.envelope.decode("utf-8"),
        "run-id": prepared.run_id,
        "run-dir": f"{_RUNS}/{prepared.run_id}",
        "resume": prepared.resume,
    }
    values.update(options)
    return {"fedbrain": values}


def default_app_dir() -> Path:
    """fedbrain's source folder (the Flower app ``flwr run`` builds): the parent of this
    package when it holds the ``pyproject.toml`` with ``[tool.flwr.app]``."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return root
    raise SubmitError(
        "fedbrain's source folder (with pyproject.toml) is not beside the installed package; "
        "give it with --app"
    )


def _flwr_config(kit: OperatorKit, *, insecure: bool) -> Path:
    home = kit.flwr_home
    home.mkdir(parents=True, exist_ok=True)
    connection: dict[str, object] = {"address": kit.superlink}
    if insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(kit.ca)
    document = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
    write_atomically(home / "config.toml", tomli_w.dumps(document).encode())
    return home


def submit(
    kit: OperatorKit,
    prepared: PreparedRun,
    options: Mapping[str, object],
    *,
    app: Path,
    insecure: bool,
    timeout: float = 300.0,
) -> int:
    """``flwr run`` the app with the prepared run config; Flower's run id."""
    home = _flwr_config(kit, insecure=insecure)
    folder = kit.run_folder(prepared.run_id)
    folder.mkdir(parents=True, exist_ok=True)
    overrides = folder / "run-config.toml"
    write_atomically(overrides, tomli_w.dumps(run_config(prepared, options)).encode())
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    command = [
        flower_executable("flwr"),
        "run",
        str(app),
        CONNECTION,
        "--run-config",
        str(overrides),
        "--format",
        "json",
    ]
    try:
        done = subprocess.run(  # noqa: S603 -- our own argument list
            command, env=env, capture_output=True, timeout=timeout, check=False, cwd=folder
        )
    except subprocess.TimeoutExpired:
        raise ControlError(f"flwr run did not answer within {timeout:.0f}s") from None
    out = done.stdout.decode("utf-8", "replace")
    start = out.find("{")
    try:
        document = json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        document = {}
    if not isinstance(document, dict) or document.get("success") is not True:
        message = document.get("error-message") if isinstance(document, dict) else None
        detail = message or (out + done.stderr.decode("utf-8", "replace")).strip()[-2000:]
        raise ControlError(f"flwr run did not start the run: {detail}")
    return int(document["run-id"])


def follow(
    kit: OperatorKit, flower_run_id: int, *, insecure: bool, echo: Callable[[str], None]
) -> FlowerRun:
    """Stream the run's log to ``echo`` until the run ends; Flower's final status."""
    with ControlClient(
        kit.superlink, root_certificates=None if insecure else kit.ca, insecure=insecure
    ) as client:
        pending = ""
        for chunk in client.logs(flower_run_id):
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                echo(line)
        if pending:
            echo(pending)
        return client.run(flower_run_id)
