"""A provisioned node at run time: its credentials, policy and stores, and job admission.

A node works only with a kit (the folder :mod:`clients.credentials` describes): without one it
has no identity to take part in authenticated SecAgg+, no operator key to check a job with and
no policy, so it refuses every job. :meth:`NodeKit.admit` is the one door a job comes through:

1. the job arrives as a DSSE envelope signed by an operator (:mod:`manifests.signed_job`); it
   must verify against the node's operators file (and the accepted key ids of its policy) and
   name the federation of the node's roster;
2. the node's policy must accept it (:meth:`clients.policy.NodePolicy.check`: level, DP unit,
   the job's worst-case epsilon and delta, the SecAgg+ minimums);
3. before anything computed from its data is released for the job, the job's whole epsilon is
   reserved against the dataset's lifetime budget (:meth:`NodeKit.charge`, persistent; the same
   job is charged once).

Every privacy parameter the node then applies comes from the signed job itself
(:mod:`clients.jobs`), never from the server's round messages.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from aggregation.secagg import ParticipationLog, SecAggPolicy
from aggregation.secagg import Roster as SecAggRoster
from clients.budget import BudgetExceededError, BudgetStore, ParticipationStore, dataset_key
from clients.credentials import POLICY_FILE, NodeCredentials, load_credentials
from clients.policy import NodePolicy, PolicyDecision, load_policy
from manifests.jobspec import JobSpec
from manifests.signed_job import (
    SignedJob,
    SignedJobError,
    SignedJobExpiredError,
    SignedJobFederationError,
    SignedJobInvalidError,
    verify_signed_job,
)

__all__ = ["AdmittedJob", "JobRefusedError", "NodeKit", "load_kit"]

_CACHE_LOCK: Final = threading.Lock()
_Stamp = tuple[tuple[str, int, int], ...]
_KITS: dict[Path, tuple[_Stamp, NodeKit]] = {}
_RESOLVED: dict[Path, Path] = {}


class JobRefusedError(ValueError):
    """The node refuses the job (unsigned, untrusted, outside its policy, over its budget)."""


@dataclass(frozen=True)
class AdmittedJob:
    """A job the node verified and accepted, with the decision that accepted it."""

    signed: SignedJob
    decision: PolicyDecision

    @property
    def job(self) -> JobSpec:
        return self.signed.job

    @property
    def job_id(self) -> str:
        return self.signed.job_id


@dataclass(frozen=True)
class NodeKit:
    """What a provisioned node holds (see the module docstring)."""

    credentials: NodeCredentials
    policy: NodePolicy
    budget: BudgetStore
    participation: ParticipationStore
    # Verified envelopes, per loaded kit: a kit reloaded after its policy or credentials
    # change starts with an empty cache, so a tightened policy applies to running jobs too.
    _admitted: dict[str, AdmittedJob] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def federation(self) -> str:
        return self.credentials.roster.federation

    @property
    def identity_key(self) -> bytes:
        return self.credentials.identity.public_key

    @property
    def secagg_policy(self) -> SecAggPolicy:
        return self.policy.secagg

    def secagg_roster(self, at: datetime | None = None) -> SecAggRoster:
        """The roster members valid now (or at ``at``), for SecAgg+ sessions."""
        return self.credentials.secagg_roster(at or datetime.now(UTC))

    def participation_log(self) -> ParticipationLog:
        """The persisted log of SecAgg+ sessions taken part in (newest per run)."""
        return self.participation.log()

    def admit(self, envelope: bytes) -> AdmittedJob:
        """Verify and accept a signed job (see the module docstring), or raise
        :class:`JobRefusedError` with the reason. Verified envelopes are cached."""
        key = hashlib.sha256(envelope).hexdigest()
        with _CACHE_LOCK:
            cached = self._admitted.get(key)
        if cached is not None and _still_valid(cached.signed):
            return cached
        try:
            signed = verify_signed_job(
                envelope,
                self.credentials.operators,
                now=datetime.now(UTC),
                federation=self.federation,
            )
        except SignedJobError as error:
            raise JobRefusedError(_signature_refusal(error)) from None
        if self.policy.operators is not None and signed.keyid not in self.policy.operators:
            raise JobRefusedError(
                f"the job is signed by {signed.keyid}, which this node's policy does not accept"
            )
        decision = self.policy.check(signed.job)
        if not decision.accepted:
            raise JobRefusedError(
                "this node's policy refuses the job: " + "; ".join(decision.reasons)
            )
        admitted = AdmittedJob(signed, decision)
        with _CACHE_LOCK:
            self._admitted[key] = admitted
        return admitted

    def charge(self, admitted: AdmittedJob, data_dir: Path, modality: str) -> None:
        """Reserve the job's whole epsilon against the dataset's lifetime budget before
        anything computed from it is released (once per job; raises
        :class:`JobRefusedError` when the budget would be exceeded)."""
        decision = admitted.decision
        if decision.epsilon is None or not math.isfinite(decision.epsilon):
            return  # a job without DP: the policy accepted it explicitly (infinite limits)
        try:
            self.budget.reserve(
                dataset_key(Path(data_dir) / modality, modality),
                admitted.job_id,
                epsilon=decision.epsilon,
                delta=decision.delta or 0.0,
                lifetime=decision.lifetime_epsilon,
            )
        except BudgetExceededError as error:
            raise JobRefusedError(
                f"this node's lifetime privacy budget refuses it: {error}"
            ) from None


def _signature_refusal(error: SignedJobError) -> str:
    """Why a signed job is refused: a trusted operator did sign a job that is invalid, expired
    or for another federation; otherwise it is not signed by an operator this node trusts."""
    if isinstance(error, SignedJobInvalidError | SignedJobExpiredError | SignedJobFederationError):
        return f"the signed job is refused: {error}"
    return f"the job is not signed by an operator this node trusts: {error}"


def _still_valid(signed: SignedJob) -> bool:
    return signed.not_after is None or datetime.now(UTC) <= signed.not_after


def _resolved(folder: Path) -> Path:
    """``folder`` made absolute, resolved once per process (a node reads its kit for every
    message)."""
    given = Path(folder)
    known = _RESOLVED.get(given)
    if known is None:
        known = _RESOLVED[given] = given.expanduser().resolve()
    return known


def _stamp(folder: Path) -> _Stamp:
    """Name, size and modification time of every file in the kit folder: one ``scandir`` (the
    node checks its kit for changes at every message, so that a new policy applies at once)."""
    with os.scandir(folder) as entries:
        files = [entry for entry in entries if entry.is_file()]
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def load_kit(folder: Path) -> NodeKit:
    """The kit in ``folder`` (cached per process; reloaded when a file in it changes: added,
    removed, or written with another size or modification time).

    Raises :class:`clients.credentials.CredentialsError` or
    :class:`clients.policy.PolicyError` naming the file and the problem.
    """
    folder = _resolved(folder)
    stamp = _stamp(folder)
    with _CACHE_LOCK:
        cached = _KITS.get(folder)
        if cached is not None and cached[0] == stamp:
            return cached[1]
    credentials = load_credentials(folder, now=datetime.now(UTC))
    policy = load_policy(folder / POLICY_FILE, missing_ok=True)
    state = credentials.state_dir
    kit = NodeKit(credentials, policy, BudgetStore(state), ParticipationStore(state))
    with _CACHE_LOCK:
        _KITS[folder] = (stamp, kit)
    return kit
