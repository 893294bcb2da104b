"""The federator-agg ServerApp: Flower's entry point to :func:`server.federator.run_federation`.

Two ways in:

- :func:`make_server_app` -- for simulations: the job and the run options are given as
  objects; the app's main runs the job on the Grid Flower hands it and appends the
  :class:`~server.options.JobOutcome` to ``outcomes``.
- ``app`` -- for deployment (``flwr run .`` loads ``server.app:app``): the job and the options
  come from the run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, overridden with
  ``flwr run . --run-config ...``).

Run-config keys of ``app``:

==================================  ========  ==========================================
key                                 type      meaning (default)
==================================  ========  ==========================================
``job.<field>``                     various   the job: every :class:`~manifests.jobspec.JobSpec`
                                              field under ``job.``, tables dotted
                                              (``job.component``, ``job.dp.clipping_norm``,
                                              ``job.federation.num_rounds``, ...); ``""``
                                              leaves a field unset
``fedbrain.run-dir``                str       run directory (ledger, checkpoints, bundle);
                                              required
``fedbrain.signing-key``            str       PEM Ed25519 private key that signs the bundle
                                              ("" or absent: the artifact is not signed)
``fedbrain.trusted-keys``           str       trusted-keys file to verify the bundle with
                                              ("" or absent: not verified)
``fedbrain.database-url``           str       ledger URL (default: ``<run-dir>/ledger.sqlite``)
``fedbrain.seed``                   int       seed of sampling and round seeds (0)
``fedbrain.deterministic-noise``    bool      seed the DP noise too -- tests only (false)
``fedbrain.resume``                 bool      continue from the last checkpoint (false)
``fedbrain.run-id``                 str       the run's id (generated; with resume: the run
                                              to continue)
``fedbrain.round-timeout``          float     seconds to wait for one batch of replies (600)
``fedbrain.node-wait-timeout``      float     seconds to wait for enough nodes (120)
``fedbrain.min-nodes``              int       nodes to wait for (the job's clients per round)
``fedbrain.stop-on-aborted-round``  bool      stop the run when a round aborts (false)
``fedbrain.roster``                 str       the operator-signed federation roster
                                              (required: nodes take part only in
                                              authenticated rounds)
``fedbrain.signed-job``             str       the job's DSSE envelope as the operator signed
                                              it ("": the server signs the job with
                                              ``fedbrain.signing-key``)
``fedbrain.job-envelope``           str       the signed job itself (its JSON text; what
                                              ``fedbrain run`` sends): the job is the
                                              envelope's, ``job.*`` keys are ignored
==================================  ========  ==========================================

Paths are relative to the SuperLink's working directory. Invalid settings raise
:class:`ServerConfigError` listing every problem before anything runs.

Under ``fedbrain server start`` (:mod:`server.server_kit`) the server kit supplies the roster,
the trusted keys, the artifact signing key and the ledger when the run config leaves them
unset, and a relative run directory lies in the kit. The deployment app prints its progress to
its output, which Flower forwards to ``flwr log`` / ``fedbrain run``; it links fedbrain's run id
to Flower's in the ledger; and a run that does not pass (failed, rejected) raises
:class:`RunNotPassedError`, so Flower reports it ``finished:failed`` instead of completed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from manifests.jobspec import JobSpec, JobSpecError, RunConfigValue
from manifests.keys import KeyVerificationError, SigningKey, TrustedKeys
from manifests.signed_job import SignedJobError, verify_signed_job
from server.federator import run_federation
from server.options import JobOutcome, JobStatus, ProgressEvent, RunOptions
from server.server_kit import server_kit_defaults

__all__ = [
    "JOB_PREFIX",
    "OPTION_KEYS",
    "RunNotPassedError",
    "ServerConfigError",
    "app",
    "job_from_run_config",
    "make_server_app",
    "options_from_run_config",
]

logger = logging.getLogger(__name__)

JOB_PREFIX: Final = "job"
_PREFIX: Final = "fedbrain."
OPTION_KEYS: Final = (
    "run-dir",
    "signing-key",
    "trusted-keys",
    "database-url",
    "seed",
    "deterministic-noise",
    "resume",
    "run-id",
    "round-timeout",
    "node-wait-timeout",
    "min-nodes",
    "stop-on-aborted-round",
    "roster",
    "signed-job",
    "job-envelope",
)


class ServerConfigError(ValueError):
    """Invalid ServerApp run config; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__(
            "Invalid fedbrain ServerApp run config:\n" + "\n".join(f"- {p}" for p in problems)
        )


def make_server_app(
    job: JobSpec,
    options: RunOptions,
    *,
    progress: Callable[[ProgressEvent], None] | None = None,
    outcomes: list[JobOutcome] | None = None,
) -> ServerApp:
    """A ServerApp that runs ``job`` with ``options`` (simulations); each run's outcome is
    appended to ``outcomes`` when given."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        outcome = run_federation(grid, job, options, progress=progress)
        if outcomes is not None:
            outcomes.append(outcome)

    return server_app


def _text(config: Mapping[str, RunConfigValue], key: str, problems: list[str]) -> str | None:
    value = config.get(_PREFIX + key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        problems.append(f"{_PREFIX}{key}: must be text. Found {value!r}.")
        return None
    return value


def _flag(config: Mapping[str, RunConfigValue], key: str, problems: list[str]) -> bool:
    value = config.get(_PREFIX + key, False)
    if not isinstance(value, bool):
        problems.append(f"{_PREFIX}{key}: must be true or false. Found {value!r}.")
        return False
    return value


def _number(
    config: Mapping[str, RunConfigValue],
    key: str,
    problems: list[str],
    *,
    default: float,
    integer: bool = False,
    minimum: float = 0.0,
) -> float:
    value = config.get(_PREFIX + key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        what = "a whole number" if integer else "a number"
        problems.append(f"{_PREFIX}{key}: must be {what}. Found {value!r}.")
        return default
    if not value >= minimum:
        problems.append(f"{_PREFIX}{key}: must be >= {minimum:g}. Found {value!r}.")
        return default
    return float(value)


def options_from_run_config(config: Mapping[str, RunConfigValue]) -> RunOptions:
    """The :class:`RunOptions` in a run config's ``fedbrain.*`` keys (see the module doc)."""
    problems: list[str] = []
    unknown = sorted(
        k for k in config if k.startswith(_PREFIX) and k.removeprefix(_PREFIX) not in OPTION_KEYS
    )
    for key in unknown:
        problems.append(f"{key}: is not a fedbrain setting (known: {', '.join(OPTION_KEYS)}).")
    run_dir = _text(config, "run-dir", problems)
    if run_dir is None and not any(p.startswith(f"{_PREFIX}run-dir") for p in problems):
        problems.append(f"{_PREFIX}run-dir: is required (where the ledger and bundle go).")
    signing_key = _text(config, "signing-key", problems)
    trusted_keys = _text(config, "trusted-keys", problems)
    roster = _text(config, "roster", problems)
    signed_job = _text(config, "signed-job", problems)
    paths = (
        ("signing-key", signing_key),
        ("trusted-keys", trusted_keys),
        ("roster", roster),
        ("signed-job", signed_job),
    )
    for key, path in paths:
        if path is not None and not Path(path).expanduser().is_file():
            problems.append(f"{_PREFIX}{key}: no such file {path!r}.")
    seed = _number(config, "seed", problems, default=0, integer=True)
    round_timeout = _number(config, "round-timeout", problems, default=600.0, minimum=1e-3)
    wait = _number(config, "node-wait-timeout", problems, default=120.0)
    min_nodes_value = config.get(_PREFIX + "min-nodes")
    min_nodes = None
    if min_nodes_value is not None:
        min_nodes = int(_number(config, "min-nodes", problems, default=1, integer=True, minimum=1))
    deterministic_noise = _flag(config, "deterministic-noise", problems)
    resume = _flag(config, "resume", problems)
    stop_on_aborted_round = _flag(config, "stop-on-aborted-round", problems)
    envelope = None
    if signed_job is not None and Path(signed_job).expanduser().is_file():
        envelope = Path(signed_job).expanduser().read_bytes()
    inline = _text(config, "job-envelope", problems)
    if inline is not None:
        if signed_job is not None:
            problems.append(f"{_PREFIX}job-envelope: give it or {_PREFIX}signed-job, not both.")
        envelope = inline.encode("utf-8")
    database_url = _text(config, "database-url", problems)
    run_id = _text(config, "run-id", problems)
    if problems or run_dir is None:
        raise ServerConfigError(problems)
    return RunOptions(
        run_dir=Path(run_dir).expanduser(),
        signing_key=None if signing_key is None else Path(signing_key).expanduser(),
        trusted_keys=None if trusted_keys is None else Path(trusted_keys).expanduser(),
        database_url=database_url,
        seed=int(seed),
        round_timeout=round_timeout,
        node_wait_timeout=wait,
        min_nodes=min_nodes,
        run_id=run_id,
        deterministic_noise=deterministic_noise,
        resume=resume,
        stop_on_aborted_round=stop_on_aborted_round,
        roster=None if roster is None else Path(roster).expanduser(),
        job_envelope=envelope,
    )


def _log_progress(event: ProgressEvent) -> None:
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in sorted(event.metrics.items()))
    where = f"round {event.server_round}/{event.num_rounds}" if event.server_round else ""
    logger.info(
        "[%s] %s %s %s %s",
        event.artifact_name,
        event.kind.value,
        " ".join(p for p in (where, event.stage) if p),
        metrics,
        event.message,
    )


def job_from_run_config(config: Mapping[str, RunConfigValue]) -> JobSpec:
    """The job in a run config's ``job.*`` keys; a key set to ``""`` is declared (so that
    ``flwr run --run-config`` may set it) but unset. Raises ``JobSpecError``."""
    declared = {
        key: value
        for key, value in config.items()
        if not (key.startswith(f"{JOB_PREFIX}.") and value == "")
    }
    return JobSpec.from_run_config(declared, prefix=JOB_PREFIX)


class RunNotPassedError(RuntimeError):
    """The deployment run ended without a signed bundle (failed or rejected)."""


def _with_kit_defaults(config: Mapping[str, RunConfigValue]) -> dict[str, RunConfigValue]:
    """``config`` with the server kit's values for the ``fedbrain.*`` keys it leaves unset."""
    merged = dict(config)
    defaults = server_kit_defaults()
    for key, value in defaults.items():
        if key != "runs" and merged.get(_PREFIX + key) in (None, ""):
            merged[_PREFIX + key] = value
    run_dir = merged.get(_PREFIX + "run-dir")
    if defaults and isinstance(run_dir, str) and run_dir and not Path(run_dir).is_absolute():
        merged[_PREFIX + "run-dir"] = str(Path(defaults["runs"]).parent / run_dir)
    return merged


def _signed_job(options: RunOptions) -> JobSpec:
    """The job inside ``options.job_envelope``, verified with the run's trusted keys."""
    if options.trusted_keys is None or options.job_envelope is None:
        raise ServerConfigError(
            [f"{_PREFIX}trusted-keys: is needed to verify {_PREFIX}job-envelope."]
        )
    try:
        trusted = TrustedKeys.load(options.trusted_keys)
        return verify_signed_job(options.job_envelope, trusted, now=datetime.now(UTC)).job
    except (OSError, ValueError, SignedJobError) as exc:
        raise ServerConfigError([f"{_PREFIX}job-envelope: refused: {exc}"]) from None


def _check_signing_key(options: RunOptions) -> list[str]:
    """The artifact signing key must be able to sign now (checked before training, not after:
    a key past its window would only fail the run at its end)."""
    if options.signing_key is None or options.trusted_keys is None:
        return []
    try:
        key = SigningKey.from_pem(options.signing_key.read_bytes())
        TrustedKeys.load(options.trusted_keys).check_can_sign(key.public_key(), datetime.now(UTC))
    except (OSError, ValueError, KeyVerificationError) as exc:
        return [f"{_PREFIX}signing-key: cannot sign the artifact: {exc}"]
    return []


def _from_context(context: Context) -> tuple[JobSpec, RunOptions]:
    config = _with_kit_defaults(context.run_config)
    option_problems: list[str] = []
    options: RunOptions | None = None
    try:
        options = options_from_run_config(config)
        option_problems.extend(_check_signing_key(options))
    except ServerConfigError as exc:
        option_problems.extend(exc.problems)
    if config.get(_PREFIX + "job-envelope") not in (None, ""):
        if option_problems or options is None:
            raise ServerConfigError(option_problems)
        return _signed_job(options), replace(options, flower_run_id=int(context.run_id))
    problems: list[str] = []
    job: JobSpec | None = None
    try:
        job = job_from_run_config(config)
    except JobSpecError as exc:
        problems.extend(f"{JOB_PREFIX}.{p}" for p in exc.problems)
    problems.extend(option_problems)
    if problems or job is None or options is None:
        raise ServerConfigError(problems)
    return job, replace(options, flower_run_id=int(context.run_id))


@contextmanager
def _progress_to_output() -> Iterator[None]:
    """Send fedbrain's INFO log lines to stdout, which Flower forwards to ``flwr log``."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname)s fedbrain: %(message)s"))
    package = logging.getLogger("server")
    level, propagate = package.level, package.propagate
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False  # once: not again through a handler Flower put on the root
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(level)
        package.propagate = propagate


app = ServerApp()
"""The deployment ServerApp (``server.app:app``); configured by the run config."""


@app.main()
def _main(grid: Grid, context: Context) -> None:
    with _progress_to_output():
        job, options = _from_context(context)
        logger.info("Flower run %s: fedbrain run %s", context.run_id, options.run_id or "(new)")
        outcome = run_federation(grid, job, options, progress=_log_progress)
        logger.info(
            "Run %s of %s: %s after %d round(s)%s",
            outcome.run_id,
            outcome.artifact_name,
            outcome.status.value,
            outcome.rounds_completed,
            "".join(f"; {r}" for r in outcome.reasons),
        )
    if outcome.status is not JobStatus.PASSED:
        raise RunNotPassedError(
            f"fedbrain run {outcome.run_id} {outcome.status.value}: "
            + ("; ".join(outcome.reasons) or "no reason recorded")
        )
