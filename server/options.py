"""What a federation run is given (RunOptions) and what it reports (progress events, outcome).

Shared by the federator (``server.federator``), the ServerApp (``server.app``) and the
simulation runner (``simulations``), so the runner can show progress and a summary without
reaching into the server's internals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """How to run one job (one Flower run, one artifact).

    ``run_dir``: where the ledger (``ledger.sqlite`` unless ``database_url``), checkpoints,
    ``artifact_manifest.json`` and the bundle go. ``signing_key``: PEM Ed25519 private key that
    signs the bundle; ``trusted_keys``: the trusted-keys file the run verifies its own bundle
    with (skipped when None). ``seed``: seeds node sampling, secure-aggregation labelling,
    clients' round seeds and the DP noise generator *only* when ``deterministic_noise`` is set
    (tests and benchmarks; production noise comes from the OS's CSPRNG). ``resume``: continue
    from the last checkpoint in ``run_dir``. ``round_timeout``: seconds to wait for replies to
    one message batch; nodes that do not answer in time are dropouts. ``node_wait_timeout``:
    seconds to wait for enough nodes to connect. ``min_nodes``: nodes the run waits for
    (default: the job's clients per round). ``stop_on_aborted_round``: when a round aborts
    (too few survivors), stop the run (True) or go on with the next round (False).
    ``roster``: the operator-signed federation roster (``manifests.roster``), verified with
    ``trusted_keys``; only its members take part. ``job_envelope``: the job as an operator
    signed it (``manifests.signed_job``); without one, the server signs the job with
    ``signing_key`` itself (simulations, where the operator runs the server). Nodes work only
    for a signed job that their own policy accepts. ``flower_run_id``: Flower's id of the run
    (deployment), recorded in the ledger next to fedbrain's.
    """

    run_dir: Path
    signing_key: Path | None = None
    trusted_keys: Path | None = None
    database_url: str | None = None
    seed: int = 0
    deterministic_noise: bool = False
    resume: bool = False
    round_timeout: float = 600.0
    node_wait_timeout: float = 120.0
    min_nodes: int | None = None
    stop_on_aborted_round: bool = False
    run_id: str | None = None
    roster: Path | None = None
    job_envelope: bytes | None = None
    flower_run_id: int | None = None


class EventKind(StrEnum):
    JOB_STARTED = "job_started"
    ROUND_STARTED = "round_started"
    STAGE = "stage"  # a protocol stage finished within a round
    ROUND_FINISHED = "round_finished"
    JOB_FINISHED = "job_finished"


@dataclass(frozen=True, kw_only=True)
class ProgressEvent:
    """One step of a run, for progress displays. ``metrics`` holds what the round measured
    (``train_loss``, ``eval_loss``, ``eval_accuracy``, ``epsilon``, ``reliability``,
    ``participants``, ``dropouts``, ``seconds``, ...) -- only what the server legitimately
    knows."""

    kind: EventKind
    artifact_name: str
    server_round: int = 0
    num_rounds: int = 0
    stage: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


class JobStatus(StrEnum):
    PASSED = "passed"  # verdict passed, bundle signed
    REJECTED = "rejected"  # verdict failed, no bundle
    FAILED = "failed"  # the run could not complete (no nodes, every round aborted, ...)


@dataclass(frozen=True, kw_only=True)
class JobOutcome:
    """The end of one job's run: what the summary table and the CLI show."""

    run_id: str
    artifact_name: str
    status: JobStatus
    rounds_completed: int
    reliability: float | None
    reasons: tuple[str, ...] = ()
    dp_unit: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    bundle: Path | None = None
    manifest: Path | None = None
    ledger_url: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
