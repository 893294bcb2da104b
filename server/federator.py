"""The federator-agg round loop: one job, any Flower ``Grid`` (simulation, deployment, tests).

:func:`run_federation` wires the round pipeline's seams and nothing else:

1. **open** -- start the run in the ledger, or reopen it at its last checkpoint (resume);
2. **discover** (:mod:`server.discovery`) -- the eligible nodes are the run's population;
3. **plan** (:mod:`server.plan`) -- sampling, the privacy parameters the nodes derive too, one
   aggregator per kind of collection (:func:`aggregation.pipeline.build_aggregator`, the only
   place the privacy matrix is coded), the accountant's events;
4. each round: the accountant composes the round's events *before* it runs (a round past the
   budget never starts), the round's nodes are sampled, and for each of the workload's
   collections (:mod:`server.workload`): **collect** (:mod:`server.collect`, the only Flower
   I/O) -> **aggregate** -> **apply**; then **record** (:mod:`server.record`: ledger row,
   reliability, progress) and a checkpoint when due;
5. **finish** -- the run verdict, and for a passing run the signed artifact
   (:mod:`server.artifact`) with its provenance.

Model jobs evaluate the initial model once before round 1 (recorded with round 1), so every
run shows what training added. Per-collection seeds derive from ``options.seed`` (sampling,
SecAgg+ labelling, the nodes' non-private shuffling); privacy noise never does (central noise
comes from the OS CSPRNG unless ``options.deterministic_noise``, which the manifest records).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Final, TypeAlias

import numpy as np
from flwr.serverapp import Grid

from aggregation.accountant import PrivacyAccountant, PrivacyBudgetExceededError, PrivacyEvent
from aggregation.dp import secure_generator
from aggregation.pipeline import Aggregator, RoundInput, build_aggregator
from aggregation.privacy import DpUnit, WorkloadKind
from aggregation.reliability import RoundObservation, RoundReliability, RunVerdict
from aggregation.secagg import Roster as SecAggRoster
from aggregation.secagg import SecAggParams
from aggregation.secagg.server import MessageHook
from clients.protocol import Work
from manifests.jobspec import JobSpec
from manifests.keys import SigningKey, TrustedKeys
from manifests.manifest import DPParameters, Provenance, Reliability, SecAggParameters
from manifests.roster import Roster, RosterError, verify_roster
from manifests.signed_job import SignedJobError, sign_job, verify_signed_job
from server import restart
from server.artifact import build_artifact, software_versions
from server.checkpoint import (
    Checkpoint,
    CheckpointPolicy,
    ResumePoint,
    discard_checkpoints_after,
    mark_released,
    resume_point,
    write_accountant_state,
    write_checkpoint,
)
from server.collect import Collector, Contributions
from server.discovery import NODES_FILE, NotEnoughNodesError, discover_nodes
from server.ledger import Ledger, ParticipantOutcome, Phase, RoundRecord, RoundStatus, RunStatus
from server.options import EventKind, JobOutcome, JobStatus, ProgressEvent, RunOptions
from server.plan import ACCOUNTANT_KIND, MIN_SECURE_GROUP, RunPlan, SamplingPlan
from server.record import Collected, RoundResult, record_round
from server.workload import AnalyticsWorkload, ModelWorkload, config_hash_for, workload_for

__all__ = ["NODES_FILE", "run_federation"]

logger = logging.getLogger(__name__)

ProgressCallback: TypeAlias = Callable[[ProgressEvent], None]
Workload: TypeAlias = ModelWorkload | AnalyticsWorkload
_INITIAL_ROUND: Final = 0


class _Seed(IntEnum):
    """Domain tags of the per-round random streams derived from ``options.seed``."""

    SAMPLING = 1
    SECAGG = 2
    NODE = 3
    NOISE = 4


def _stream(seed: int, round_number: int, tag: _Seed) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, round_number, int(tag)]))


def _derived_seed(seed: int, round_number: int, tag: _Seed) -> int:
    return int(np.random.SeedSequence([seed, round_number, int(tag)]).generate_state(1)[0])


class _Stop(Exception):  # noqa: N818 -- control flow, not an error
    """End the round loop early (budget exhausted, aborted round with stop_on_aborted_round)."""

    def __init__(self, reason: str, *, failed: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failed = failed


@dataclass
class _Setup:
    """What a run decided before its first round."""

    workload: Workload
    plan: RunPlan
    aggregators: Mapping[Work, Aggregator]
    accountant: PrivacyAccountant | None
    node_types: Mapping[int, str]
    envelope: bytes
    roster: SecAggRoster
    secagg_ids: Mapping[int, int]


class _Run:
    def __init__(
        self,
        grid: Grid,
        job: JobSpec,
        options: RunOptions,
        progress: ProgressCallback | None,
        secagg_hook: MessageHook | None,
    ) -> None:
        self.grid = grid
        self.job = job
        self.options = options
        self.progress = progress
        self.secagg_hook = secagg_hook
        self.level = job.privacy_level
        self.config_hash = config_hash_for(job)  # the base checkpoint by its digest
        self.run_dir = Path(options.run_dir)
        self.started_at = datetime.now(UTC)
        self.artifact_name = job.resolve_artifact_name(created_at=self.started_at)
        self.run_id = ""
        self.resume_from: ResumePoint | None = None
        self.reliabilities: list[RoundReliability] = []
        self.previous: RoundObservation | None = None
        self.participants_per_round: list[int] = []
        self.rounds_completed = 0
        self.aborted_rounds = 0
        self.epsilon: float | None = None
        self.notes: list[str] = []
        self.last_metrics: dict[str, float] = {}
        self.initial_metrics: dict[str, float] = {}  # the untrained model's evaluation
        self.final_eval: dict[str, float] = {}
        self.secagg_used: SecAggParams | None = None

    # ------------------------------------------------------------------ helpers

    def emit(
        self,
        kind: EventKind,
        *,
        server_round: int = 0,
        stage: str = "",
        metrics: Mapping[str, float] | None = None,
        message: str = "",
    ) -> None:
        if self.progress is None:
            return
        self.progress(
            ProgressEvent(
                kind=kind,
                artifact_name=self.artifact_name,
                server_round=server_round,
                num_rounds=self.job.federation.num_rounds,
                stage=stage,
                metrics=dict(metrics or {}),
                message=message,
            )
        )

    # ------------------------------------------------------------------ entry point

    def run(self) -> JobOutcome:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ledger = (
            Ledger(self.options.database_url)
            if self.options.database_url
            else Ledger.for_run_dir(self.run_dir)
        )
        try:
            start = self._open_run(ledger)
            restart.link_flower_run(ledger, self.run_id, self.options.flower_run_id)
            try:
                return self._train(ledger, start)
            except _Stop as stop:
                return self._finish_failed(ledger, stop.reason, aborted=not stop.failed)
            except Exception as exc:
                logger.exception("Run %s failed.", self.run_id)
                self._finish_failed(
                    ledger, f"{type(exc).__name__}: {exc}", aborted=False, emit=False
                )
                raise
        finally:
            ledger.close()

    def _open_run(self, ledger: Ledger) -> int:
        """Start the run in the ledger, or reopen it at its last checkpoint (resume);
        returns the first round to run."""
        options, job = self.options, self.job
        if options.resume:
            run_id = options.run_id or self._unfinished_run_id(ledger)
            if run_id is not None and run_id in {r.run_id for r in ledger.list_runs()}:
                self.run_id = run_id
                restart.take_over(ledger, run_id)
                point = resume_point(self.run_dir, training_config_hash=self.config_hash)
                self.resume_from = point
                done = 0 if point is None or point.checkpoint is None else point.checkpoint.round
                discard_checkpoints_after(self.run_dir, done)
                deleted = ledger.resume_run(run_id, from_round=done, owner=restart.this_process())
                for record in ledger.rounds(run_id):
                    self._replay(record)
                self.notes.append(
                    f"run {run_id}: {restart.record_resume(ledger, run_id, point, done)}"
                    + (f" ({deleted} later round(s) are run again)" if deleted else "")
                )
                logger.info(self.notes[-1])
                return done + 1
            self.notes.append("resume: nothing to resume in this run directory; new run")
        self.run_id = options.run_id or (
            f"run-{self.started_at:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
        )
        ledger.start_run(
            run_id=self.run_id,
            artifact_name=self.artifact_name,
            job=dict(job.to_run_config()),
            privacy_level=self.level.value,
            run_name=job.run_name,
            dp_unit=job.dp.unit.value if self.level.uses_dp else None,
            started_at=self.started_at,
            owner=restart.this_process(),
        )
        return 1

    def _unfinished_run_id(self, ledger: Ledger) -> str | None:
        """The newest run of this job in the ledger that did not complete, if any."""
        config = dict(self.job.to_run_config())
        for run in ledger.list_runs():  # newest first
            if dict(run.job) == config:
                return None if run.status is RunStatus.COMPLETED else run.run_id
        return None

    def _replay(self, record: RoundRecord) -> None:
        """Rebuild the verdict inputs of a round recorded before a restart."""
        contributed = {
            p.node_id
            for p in record.participants
            if p.phase in (Phase.TRAIN, Phase.MOMENTS, Phase.SECAGG)
            and p.outcome is ParticipantOutcome.CONTRIBUTED
        }
        self.participants_per_round.append(len(contributed))
        if record.epsilon is not None:
            self.epsilon = max(self.epsilon or 0.0, record.epsilon)
        if record.status is not RoundStatus.COMPLETED:
            self.aborted_rounds += 1
            return
        self.rounds_completed += 1
        self.reliabilities.append(
            RoundReliability(
                round_number=record.round,
                score=record.reliability or 0.0,
                reasons=record.reliability_reasons,
                components={},
                deductions={},
                fatal=bool(record.measurements.get("reliability_fatal", False)),
            )
        )
        self.previous = RoundObservation(
            round_number=record.round,
            sampled=record.sampled,
            responded=min(record.responded, record.sampled),
            eval_loss=record.metric("eval_loss"),
            update_norm=record.update_norm,
            eval_loss_stderr=record.metric("eval_loss_stderr"),
        )

    # ------------------------------------------------------------------ setup

    def _needed_nodes(self) -> int:
        fed = self.job.federation
        floor = MIN_SECURE_GROUP if self.level.uses_secure_agg else 1
        return max(floor, self.options.min_nodes or fed.clients_per_round or floor)

    def _federation(self) -> tuple[Roster, bytes]:
        """The verified roster and the operator-signed job the nodes will check."""
        options, now = self.options, datetime.now(UTC)
        if options.roster is None or options.trusted_keys is None:
            raise _Stop(
                "the run has no federation roster or no trusted operator keys: nodes take part "
                "only in authenticated rounds of a signed job (provision the federation; "
                "RunOptions.roster and trusted_keys, or fedbrain.roster / fedbrain.trusted-keys)",
                failed=True,
            )
        try:
            trusted = TrustedKeys.load(options.trusted_keys)
            roster = verify_roster(options.roster.read_bytes(), trusted, now=now)
        except (OSError, ValueError, RosterError) as exc:
            raise _Stop(f"the federation roster cannot be used: {exc}", failed=True) from None
        envelope = options.job_envelope
        if envelope is None:
            if options.signing_key is None:
                raise _Stop(
                    "the job is not signed and the server holds no signing key to sign it",
                    failed=True,
                )
            key = SigningKey.from_pem(options.signing_key.read_bytes())
            envelope = sign_job(self.job, key, federation=roster.federation, issued_at=now)
        try:
            signed = verify_signed_job(envelope, trusted, now=now, federation=roster.federation)
        except SignedJobError as exc:
            raise _Stop(f"the signed job cannot be used: {exc}", failed=True) from None
        if signed.job.to_run_config() != self.job.to_run_config():
            raise _Stop("the signed job is not the job this run was asked to run", failed=True)
        self.notes.append(f"job {signed.job_id[:19]}... signed by {signed.keyid[:19]}...")
        return roster, envelope

    def _setup(self, ledger: Ledger) -> _Setup:
        job = self.job
        try:
            workload = workload_for(job, seed=self.options.seed)
        except ValueError as exc:
            raise _Stop(f"the job cannot run: {exc}", failed=True) from None
        roster, envelope = self._federation()
        members = roster.members(datetime.now(UTC))
        try:
            found = discover_nodes(
                self.grid,
                job,
                envelope=envelope,
                members=members,
                fingerprint=workload.fingerprint,
                base_digest=workload.base_digest,
                needed=self._needed_nodes(),
                wait_timeout=self.options.node_wait_timeout,
                reply_timeout=self.options.round_timeout,
                run_dir=self.run_dir,
                run_id=self.run_id,
                on_refused=lambda refused: ledger.record_refused_nodes(self.run_id, refused),
            )
        except NotEnoughNodesError as exc:
            raise _Stop(str(exc), failed=True) from None
        try:
            sampling = SamplingPlan.for_job(job, found.eligible)
            plan = RunPlan.for_job(job, sampling, update_length=workload.update_length)
            if self.level.uses_secure_agg and sampling.count < MIN_SECURE_GROUP:
                raise ValueError(
                    f"secure aggregation needs at least {MIN_SECURE_GROUP} nodes per round; "
                    f"this job samples {sampling.count}"
                )
            aggregators = {work: build_aggregator(p) for work, p in plan.aggregation.items()}
        except ValueError as exc:
            raise _Stop(str(exc), failed=True) from None
        self.notes.extend(plan.notes)
        accountant = None
        if plan.accounts and plan.privacy.delta is not None:
            accountant = PrivacyAccountant(
                ACCOUNTANT_KIND,
                delta=plan.privacy.delta,
                epsilon_budget=plan.privacy.epsilon_budget,
            )
        return _Setup(
            workload,
            plan,
            aggregators,
            accountant,
            found.node_types,
            envelope,
            SecAggRoster(members),
            dict(found.secagg_ids),
        )

    # ------------------------------------------------------------------ the loop

    def _train(self, ledger: Ledger, start_round: int) -> JobOutcome:
        setup = self._setup(ledger)
        workload, plan = setup.workload, setup.plan
        if self.resume_from is not None:
            self._restore(self.resume_from, setup)
        self.emit(
            EventKind.JOB_STARTED,
            message=(
                f"run {self.run_id}: {len(plan.sampling.population)} eligible node(s), "
                f"privacy {self.level.value}"
                + (f" ({plan.privacy.unit.value}-level)" if plan.privacy.unit else "")
                + "".join(f"; {n}" for n in self.notes)
            ),
            metrics={"nodes": float(len(plan.sampling.population))},
        )
        policy = CheckpointPolicy(interval=self.job.checkpoint_interval)
        initial: list[Collected] = []
        if start_round == 1 and workload.kind is WorkloadKind.MODEL:
            self._compose(setup, list(plan.initial_events), 1)
            initial = [self._initial_evaluation(setup)]
        stop_reason: str | None = None
        for number in range(start_round, self.job.federation.num_rounds + 1):
            try:
                self._compose(setup, list(plan.events_per_round), number)
            except PrivacyBudgetExceededError as exc:
                stop_reason = f"privacy budget exhausted before round {number}: {exc}"
                logger.warning(stop_reason)
                break
            result = self._round(ledger, number, setup, initial)
            initial = []
            if policy.is_due(number):
                write_checkpoint(
                    self.run_dir,
                    Checkpoint(
                        round=number,
                        training_config_hash=self.config_hash,
                        weights=workload.checkpoint_tensors(),
                        optimizer=workload.optimizer_state(),
                        dp_state=None,
                        accountant=None
                        if setup.accountant is None
                        else setup.accountant.state_dict(),
                        rng={"seed": self.options.seed},
                    ),
                )
            self.emit(
                EventKind.ROUND_FINISHED,
                server_round=number,
                metrics=result.progress,
                message=result.message,
            )
            if result.record.status is RoundStatus.ABORTED and self.options.stop_on_aborted_round:
                raise _Stop(
                    f"round {number} aborted and stop_on_aborted_round is set "
                    f"({'; '.join(result.record.reliability_reasons)})",
                    failed=True,
                )
        if workload.kind is WorkloadKind.MODEL and self.rounds_completed:
            self.final_eval = self.last_metrics
        return self._finish(ledger, setup, stop_reason)

    def _compose(self, setup: _Setup, events: list[PrivacyEvent], number: int) -> None:
        """Compose a round's events before it runs (refused past the budget)."""
        accountant = setup.accountant
        if accountant is None or not events:
            return
        before = accountant.state_dict()
        for event in events:
            accountant.compose(event)
        write_accountant_state(
            self.run_dir,
            round_number=number,
            accountant=accountant.state_dict(),
            training_config_hash=self.config_hash,
            before=before,
        )

    def _epsilon(self, setup: _Setup) -> float | None:
        """The run's epsilon so far: the accountant's (node-level DP, analytics), or for
        example-level DP-SGD the target every node calibrated its own run to."""
        plan = setup.plan
        if not plan.accounts:
            return None
        accounted = setup.accountant.get_epsilon() if setup.accountant is not None else 0.0
        if plan.privacy.uses_dp_sgd and plan.privacy.target_epsilon is not None:
            return max(accounted, plan.privacy.target_epsilon)
        return accounted

    def _restore(self, point: ResumePoint, setup: _Setup) -> None:
        checkpoint = point.checkpoint
        if checkpoint is not None:
            setup.workload.restore(checkpoint.weights, checkpoint.optimizer)
        if setup.accountant is not None and point.accountant is not None:
            setup.accountant.load_state_dict(point.accountant)

    def _collector(self, setup: _Setup) -> Collector:
        return Collector(
            self.grid,
            self.job,
            envelope=setup.envelope,
            roster=setup.roster,
            secagg_ids=setup.secagg_ids,
            round_timeout=self.options.round_timeout,
            run_id=int(self.grid.run.run_id),
            seed=_derived_seed(self.options.seed, 0, _Seed.SECAGG),
            secagg_hook=self.secagg_hook,
            on_stage=None,
        )

    def _collect(
        self, setup: _Setup, number: int, work: Work, nodes: list[int], emit_round: int
    ) -> Collected:
        workload = setup.workload
        collector = self._collector(setup)

        def on_stage(stage: str, seconds: float, metrics: Mapping[str, float]) -> None:
            if stage in restart.RELEASING_STAGES and setup.accountant is not None:
                mark_released(self.run_dir, emit_round)  # server.checkpoint: resume charges
            self.emit(
                EventKind.STAGE,
                server_round=emit_round,
                stage=f"{work.value}:{stage}",
                metrics={"seconds": seconds, **metrics},
            )

        collector.on_stage = on_stage
        rnd = workload.round_config(
            number, work, _derived_seed(self.options.seed, number, _Seed.NODE)
        )
        contributions = collector.collect(
            rnd=rnd,
            nodes=nodes,
            weights=workload.weights_record(work),
            update_length=workload.update_length,
            secure=self.level.uses_secure_agg,
        )
        if contributions.secagg is not None and work in (Work.FIT, Work.MOMENTS):
            self.secagg_used = contributions.secagg
        item = Collected(contributions)
        if contributions.aborted is not None:
            return item
        began = time.monotonic()
        item.output = setup.aggregators[work].aggregate(
            _round_input(contributions), rng=self._noise_rng(number)
        )
        item.applied = workload.apply(work, item.output)
        contributions.timings[f"aggregate_{work.value}"] = time.monotonic() - began
        return item

    def _noise_rng(self, number: int) -> np.random.Generator:
        if self.options.deterministic_noise:
            return _stream(self.options.seed, number, _Seed.NOISE)
        return secure_generator()

    def _initial_evaluation(self, setup: _Setup) -> Collected:
        nodes = setup.plan.sampling.sample(_stream(self.options.seed, 0, _Seed.SAMPLING))
        item = self._collect(setup, _INITIAL_ROUND, Work.EVALUATE, nodes, 1)
        item.initial = True
        return item

    def _round(
        self, ledger: Ledger, number: int, setup: _Setup, initial: list[Collected]
    ) -> RoundResult:
        began = time.monotonic()
        sampled = setup.plan.sampling.sample(_stream(self.options.seed, number, _Seed.SAMPLING))
        self.emit(
            EventKind.ROUND_STARTED,
            server_round=number,
            metrics={"sampled": float(len(sampled))},
            message=f"round {number}: {len(sampled)} node(s) sampled",
        )
        collected: list[Collected] = list(initial)
        for work in setup.workload.works:
            item = self._collect(setup, number, work, sampled, number)
            collected.append(item)
            if item.contributions.aborted is not None and work is not Work.EVALUATE:
                break  # nothing to evaluate or to clip to
        timings: dict[str, float] = {}
        for item in collected:
            for key, value in item.contributions.timings.items():
                timings[key] = timings.get(key, 0.0) + value
        timings["total"] = time.monotonic() - began
        epsilon = self._epsilon(setup)
        self.epsilon = epsilon if epsilon is not None else self.epsilon
        result = record_round(
            number=number,
            level=self.level,
            node_type=self.job.resolved_node_type.value,
            sampled=sampled,
            collected=collected,
            epsilon=epsilon,
            delta=setup.plan.privacy.delta,
            previous=self.previous,
            measurements=setup.accountant.measurements() if setup.accountant else {},
            timings=timings,
        )
        ledger.record_round(self.run_id, result.record)
        if result.reliability is not None and result.observation is not None:
            self.reliabilities.append(result.reliability)
            self.previous = result.observation
            self.rounds_completed += 1
            self.participants_per_round.append(result.record.responded)
        else:
            self.aborted_rounds += 1
            self.participants_per_round.append(0)
        self.last_metrics = {**self.initial_metrics, **result.progress}
        self.initial_metrics.update(
            {k: v for k, v in result.progress.items() if k.startswith("initial_")}
        )
        return result

    # ------------------------------------------------------------------ the end

    def _outcome(
        self,
        ledger: Ledger,
        status: JobStatus,
        reasons: list[str],
        *,
        reliability: float | None = None,
        bundle: Path | None = None,
        manifest: Path | None = None,
    ) -> JobOutcome:
        metrics = dict(self.last_metrics)
        metrics["aborted_rounds"] = float(self.aborted_rounds)
        if reliability is not None:
            metrics["reliability"] = reliability
        return JobOutcome(
            run_id=self.run_id,
            artifact_name=self.artifact_name,
            status=status,
            rounds_completed=self.rounds_completed,
            reliability=reliability,
            reasons=tuple(reasons),
            dp_unit=self._dp_unit(),
            epsilon=self.epsilon,
            delta=self.job.dp.delta if self.level.uses_dp else None,
            bundle=bundle,
            manifest=manifest,
            ledger_url=ledger.url,
            metrics=metrics,
        )

    def _dp_unit(self) -> str | None:
        if not self.level.uses_dp:
            return None
        if self.job.task.value in ("preproc", "normalizer"):
            return DpUnit.EXAMPLE.value
        return self.job.dp.unit.value

    def _finish_failed(
        self, ledger: Ledger, reason: str, *, aborted: bool, emit: bool = True
    ) -> JobOutcome:
        logger.error("Run %s stopped: %s", self.run_id, reason)
        try:
            ledger.finish_run(
                self.run_id,
                RunStatus.ABORTED if aborted else RunStatus.FAILED,
                verdict_reasons=[reason],
                final_epsilon=self.epsilon,
                delta=self.job.dp.delta if self.level.uses_dp else None,
                error=reason,
            )
        except Exception:
            logger.exception("Could not record the end of run %s in the ledger.", self.run_id)
        if emit:
            self.emit(EventKind.JOB_FINISHED, message=f"failed: {reason}")
        return self._outcome(ledger, JobStatus.FAILED, [reason])

    def _finish(self, ledger: Ledger, setup: _Setup, stop_reason: str | None) -> JobOutcome:
        job = self.job
        if self.rounds_completed == 0:
            reason = stop_reason or f"all {self.aborted_rounds} round(s) aborted"
            return self._finish_failed(ledger, reason, aborted=stop_reason is not None)
        verdict = RunVerdict.from_rounds(
            self.reliabilities, threshold=job.federation.reliability_threshold
        )
        score = min(verdict.final_score, verdict.window_mean)
        delta = job.dp.delta if self.level.uses_dp else None
        info = [r for r in (stop_reason,) if r]
        if self.aborted_rounds:
            info.append(f"{self.aborted_rounds} round(s) aborted")
        if not verdict.passed:
            reasons = [*verdict.reasons, *info]
            ledger.finish_run(
                self.run_id,
                RunStatus.REJECTED,
                verdict_reasons=reasons,
                final_epsilon=self.epsilon,
                delta=delta,
                reliability=score,
            )
            self.emit(EventKind.JOB_FINISHED, message="rejected: " + "; ".join(reasons))
            return self._outcome(ledger, JobStatus.REJECTED, reasons, reliability=score)
        finished_at = datetime.now(UTC).replace(microsecond=0)
        try:
            result = build_artifact(
                job,
                setup.workload.final_tensors(),
                self._provenance(setup, score, finished_at),
                run_dir=self.run_dir,
                signing_key=self.options.signing_key,
                trusted_keys=self.options.trusted_keys,
                verify_at=finished_at,
                base_digest=setup.workload.base_digest,
            )
        except Exception as exc:
            logger.exception("Building the artifact of run %s failed.", self.run_id)
            return self._finish_failed(
                ledger, f"building the artifact failed: {type(exc).__name__}: {exc}", aborted=False
            )
        reasons = [*info, *result.notes]
        self.artifact_name = result.manifest.artifact_name
        ledger.finish_run(
            self.run_id,
            RunStatus.COMPLETED,
            verdict_reasons=reasons,
            final_epsilon=self.epsilon,
            delta=delta,
            reliability=score,
            bundle_path=result.bundle,
            bundle_sha256=result.bundle_sha256,
            finished_at=finished_at,
        )
        self.emit(
            EventKind.JOB_FINISHED,
            metrics={"reliability": score},
            message=f"passed: {result.bundle or result.manifest_path}",
        )
        return self._outcome(
            ledger,
            JobStatus.PASSED,
            reasons,
            reliability=score,
            bundle=result.bundle,
            manifest=result.manifest_path,
        )

    def _provenance(self, setup: _Setup, score: float, finished_at: datetime) -> Provenance:
        plan = setup.plan
        privacy = plan.privacy
        dp = None
        if self.level.uses_dp and privacy.delta is not None:
            example_sgd = privacy.uses_dp_sgd
            sampling = (
                f"secret self-selection at rate {privacy.sample_rate:g}, amplification credited"
                if privacy.sample_rate < 1
                else "server-chosen sample: no amplification credited"
            )
            mechanism = plan.mechanism
            if example_sgd:
                mechanism = (
                    "DP-SGD (Opacus) on each node, its noise calibrated by the node from its "
                    f"own example count; metric sums: {plan.mechanism.split(':')[0]}"
                )
            dp = DPParameters(
                unit=self._dp_unit() or "example",
                clipping_norm=(
                    privacy.dp_sgd_max_grad_norm
                    if example_sgd
                    else (privacy.update_bound if privacy.update_bound > 0 else 1.0)
                ),
                noise_multiplier=privacy.noise_multiplier,
                accountant=f"opacus-{ACCOUNTANT_KIND}",
                epsilon=self.epsilon or privacy.target_epsilon or 1e-9,
                delta=privacy.delta,
                mechanism=mechanism,
                sampling=sampling,
                metrics_noise_multiplier=privacy.metrics_noise_multiplier,
                deterministic_noise=bool(self.options.deterministic_noise)
                and self.level.value == "dp",
            )
        secagg = None
        if self.secagg_used is not None:
            secagg = SecAggParameters(
                neighbours=self.secagg_used.num_neighbours,
                threshold=self.secagg_used.threshold,
                modulus_bits=32,
                clipping_range=privacy.update_bound if privacy.update_bound > 0 else 1.0,
            )
        return Provenance(
            run_id=self.run_id,
            run_name=self.job.run_name,
            finished_at=finished_at,
            rounds=len(self.participants_per_round),
            participants_per_round=list(self.participants_per_round),
            dp=dp,
            secagg=secagg,
            reliability=Reliability(score=score, verdict="accepted"),
            versions=software_versions(),
        )


def _round_input(contributions: Contributions) -> RoundInput:
    if contributions.secure_sum is not None:
        return RoundInput(contributions.contributors, secure_sum=contributions.secure_sum)
    return RoundInput(contributions.contributors, per_node=dict(contributions.per_node or {}))


def run_federation(
    grid: Grid,
    job: JobSpec,
    options: RunOptions,
    *,
    progress: ProgressCallback | None = None,
    secagg_hook: MessageHook | None = None,
) -> JobOutcome:
    """Run ``job`` to its end on ``grid`` (see the module docstring) and report the outcome.

    ``progress`` receives every :class:`server.options.ProgressEvent`; an exception it raises
    stops the run as a crash would (the ledger keeps the run as ``failed`` and the next run
    with ``options.resume`` continues from the last checkpoint). ``secagg_hook`` sees every
    SecAgg+ message the server handles (instrumented tests). Expected failures (too few nodes,
    every round aborted, an artifact that cannot be built) are a ``failed`` outcome.
    """
    return _Run(grid, job, options, progress, secagg_hook).run()
