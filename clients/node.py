"""What a fedbrain node does with each message of :mod:`clients.protocol` (no Flower here).

:class:`Node` answers one message at a time with plain objects -- a validated
:class:`~manifests.jobspec.JobSpec`, a :class:`~clients.protocol.RoundConfig`, named float32
weights, a parsed SecAgg+ request -- and :mod:`clients.app` translates Flower ``Message`` s to
and from them. What a node remembers between messages (its SecAgg+ session, the DP-SGD steps
it has taken, the last round it worked for) lives in a :class:`NodeState` that the adapter
keeps in Flower's ``Context.state``.

Every collection is one :func:`Node.contribution` (:class:`aggregation.codec.Contribution`):

- ``fit``: set the global weights (the job's trainable tensors, on the base checkpoint the
  node holds), train ``job.epochs`` epochs (example-level DP: Opacus DP-SGD with a noise
  multiplier this node calibrates from its own example count,
  :func:`clients.jobs.dp_sgd_noise_multiplier`), clip the update ``local - global`` of the
  trainable tensors to the job's update bound; metrics: counts (and, without DP, the
  training loss);
- ``evaluate``: per held-out example, the global model's loss and correctness (the trained
  classifier's top-1, or an LM's next-byte accuracy and a public unigram baseline), clipped
  to the job's bounds (node-level DP: this node's means, one row);
- ``ranges`` / ``moments``: federated analytics of the sensing normalizers, one normalised row
  per example (:mod:`clients.datasets`).

How it leaves the node: in the clear (:meth:`Node.plain`, levels ``none`` and ``dp`` only), or
encoded into the ring vector, with this node's share of distributed noise under
``dp+secure-agg``, and masked by SecAgg+ (:meth:`Node.secagg`). Under a secure-agg level a
node never answers a clear-text request. Privacy parameters come from the job, never from the
server; randomness that protects privacy (DP-SGD sampling and noise, stochastic rounding,
distributed noise, secret sampling) comes from ``os.urandom``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, Dataset

from aggregation.accountant import SubsampledGaussianEvent
from aggregation.codec import EXAMPLE_CAP, Contribution, Metric, RingLayout, Summed
from aggregation.dp import clip_update
from aggregation.dp_sgd import PrivateTraining, make_private
from aggregation.privacy import DpUnit, PrivacyLevel, WorkloadKind
from aggregation.secagg import (
    AdvertiseKeysRequest,
    ClientPhase,
    ClientSession,
    ConsistencyCheckRequest,
    MaskedInputRequest,
    SecAggMessage,
    SecAggProtocolError,
    SecAggRefusedError,
)
from clients import protocol
from clients.adaptation import get_trainable_weights, set_trainable_weights, trainable_names
from clients.checkpoints import check_checkpoint, checkpoint_digest
from clients.config import FaultInjectedError, NodeConfig
from clients.data import DataError, EmptyDataError
from clients.datasets import (
    ModelData,
    StepBudget,
    data_path,
    histogram_rows,
    model_data,
    moment_rows,
    sensing_values,
)
from clients.jobs import (
    HISTOGRAM_BINS,
    analytics_row_bound,
    clip_statistic_rows,
    dp_sgd_noise_multiplier,
    dp_sgd_steps,
    job_privacy,
    loss_bound,
    metrics_for,
    min_survivors,
    modality_for_job,
    model_spec_for_job,
    ring_layout,
    sensing_ranges,
    update_length_for,
    workload_for_job,
)
from clients.kit import AdmittedJob, JobRefusedError, NodeKit, load_kit
from clients.model_cache import cached_model, check_builds, fingerprint
from clients.models import build_model, model_config
from clients.protocol import NodeInfo, RoundConfig, Work
from clients.training import EmbedLoss, evaluation_rows, make_optimizer, train_local
from manifests.catalog import Task
from manifests.jobspec import JobSpec, Sampling

__all__ = ["Node", "NodeState", "Weights", "public_unigram_log_probs"]

Weights = Sequence[tuple[str, npt.NDArray[np.float32]]]
"""Named arrays in model order, as the ``weights`` record carries them (None: no record)."""

_PURPOSE_TRAIN: Final = 1
_PURPOSE_EVAL: Final = 2


@dataclass
class NodeState:
    """What a node keeps between messages of one run (in Flower's ``Context.state``).

    ``secagg_session``: ``ClientSession.to_state_record()`` of the collection in progress (it
    holds this round's secrets; it never leaves the node). ``secagg_round``: ``(run_id,
    round, category)`` of the last SecAgg+ session started, so that a node never advertises
    keys twice for one collection. ``dp_events``: every DP-SGD step this node has taken.
    """

    secagg_session: dict[str, object] | None = None
    secagg_round: tuple[int, int, str] | None = None
    dp_events: list[SubsampledGaussianEvent] = field(default_factory=list)


@cache
def public_unigram_log_probs() -> torch.Tensor:
    """Byte log-probabilities of the public unigram baseline (ids 0-255; PAD/BOS/EOS ids are
    given the probability of one sequence end in 64 bytes). From the byte counts of CPython's
    ``pydoc_data.topics`` (public documentation text) shipped in ``public_unigram.json``."""
    counts = json.loads(resources.files("clients").joinpath("public_unigram.json").read_text())
    table = np.asarray(counts["counts"], dtype=np.float64)
    probs = np.concatenate([table / table.sum() * (1 - 1 / 64), [1e-6, 1e-6, 1 / 64, 1e-6]])
    return torch.as_tensor(np.log(probs / probs.sum()), dtype=torch.float32)


def _secret_seed() -> int:
    """A seed from the OS's CSPRNG (for randomness the server must not know)."""
    return int.from_bytes(os.urandom(8), "big") >> 1


def _secret_rng() -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "big")))


class Node:
    """One node's answers to the protocol messages (:mod:`clients.protocol`).

    ``node_id`` is the node's id in the federation (SecAgg+ addresses the node by it).
    Methods that take a :class:`NodeState` update it in place, and only when they succeed --
    except DP-SGD steps, which are recorded as soon as they are taken (a failure after
    training has still spent privacy).
    """

    def __init__(self, config: NodeConfig, *, node_id: int, device: str | None = None) -> None:
        self.config = config
        self.node_id = node_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def kit(self) -> NodeKit:
        """This node's kit (credentials, policy, stores); a node without one refuses every
        job, since it could neither check who signed it nor authenticate itself."""
        if self.config.kit is None:
            raise JobRefusedError(
                "this node is not provisioned: it holds no kit (identity key, signed roster, "
                "operators' keys, policy); set the node config's `kit` folder"
            )
        return load_kit(self.config.kit)

    def admit(self, envelope: bytes) -> AdmittedJob:
        """The signed job in ``envelope``, verified and accepted by this node's policy (see
        :mod:`clients.kit`), or :class:`clients.kit.JobRefusedError` with the reason."""
        admitted = self.kit.admit(envelope)
        self._require_node_type(admitted.job)
        return admitted

    def _release(self, admitted: AdmittedJob, rnd: RoundConfig) -> None:
        """Before anything computed from the data leaves for ``rnd``: the round is within the
        signed job's plan (a server cannot buy more releases than the job's epsilon covers)
        and the job's epsilon is reserved against the dataset's lifetime budget."""
        job = admitted.job
        if rnd.server_round > job.federation.num_rounds:
            raise JobRefusedError(
                f"round {rnd.server_round} is past the signed job's {job.federation.num_rounds} "
                "rounds; its privacy guarantee covers no more"
            )
        self.kit.charge(admitted, self.config.data_dir, modality_for_job(job).value)

    # -- helpers ------------------------------------------------------------------------
    def check_fault(self, message_type: str, server_round: int | None) -> None:
        """Raise :class:`FaultInjectedError` if a configured fault matches this message."""
        for fault in self.config.faults:
            if fault.matches(message_type, server_round):
                raise FaultInjectedError(
                    f"Node {self.config.name or self.node_id}: injected fault {fault}."
                )

    def _torch_seed(self, rnd: RoundConfig, purpose: int) -> int:
        """Seed of non-private randomness (shuffling, augmentations without DP)."""
        state = np.random.SeedSequence([rnd.seed % 2**64, self.node_id % 2**64, purpose])
        return int(state.generate_state(1, np.uint64)[0]) >> 1

    def _require_node_type(self, job: JobSpec) -> None:
        wanted = job.resolved_node_type
        if wanted is not self.config.node_type:
            raise ValueError(
                f"Job {job.catalog_entry.id} is for {wanted} nodes; this is a "
                f"{self.config.node_type} node."
            )

    # -- query.node_info ----------------------------------------------------------------
    def node_info(self, envelope: bytes) -> NodeInfo:
        """Whether this node can work for the signed job in ``envelope`` (never raises for
        "not eligible": the reason is in words), and its identity key. It never says how many
        examples it holds."""
        node_type = str(self.config.node_type)
        identity = ""

        def refuse(reason: str) -> NodeInfo:
            return NodeInfo(
                node_type=node_type, eligible=False, reason=reason, identity_key=identity
            )

        try:
            identity = self.kit.identity_key.hex()
            job = self.kit.admit(envelope).job
        except (JobRefusedError, ValueError) as error:
            return refuse(str(error))
        try:
            wanted = job.resolved_node_type
            modality = modality_for_job(job)
            workload = workload_for_job(job)
            job_privacy(job)
        except ValueError as error:
            return refuse(f"fedbrain cannot work for this job: {error}")
        if wanted is not self.config.node_type:
            return refuse(f"the job is for {wanted} nodes; this is a {node_type} node.")
        folder = data_path(self.config.data_dir) / modality.value
        if workload is WorkloadKind.ANALYTICS:
            try:
                sensing_values(job, self.config.data_dir)
            except (DataError, OSError) as error:
                return refuse(f"the node's {modality} data cannot be used: {error}")
            return NodeInfo(node_type=node_type, eligible=True, identity_key=identity)
        base_digest = ""
        try:
            spec = model_spec_for_job(job)
            if spec.base_folder is not None:  # the base this node holds at the job's path
                check_checkpoint(spec.base_folder, model_config(spec))
                base_digest = checkpoint_digest(spec.base_folder)
            check_builds(spec)
        except (ValueError, TypeError, RuntimeError, OSError) as error:
            return refuse(f"the job's model does not build: {error}")
        try:
            data = model_data(job, spec, self.config.data_dir)
        except (DataError, OSError) as error:
            return refuse(f"the node's {modality} data in {str(folder)!r} cannot be used: {error}")
        if len(data.train) == 0:
            return refuse(f"the node holds no {modality} training examples.")
        if spec.num_classes is not None:
            labels = data.labels
            if bool((labels < 0).any()) or int(labels.max()) >= spec.num_classes:
                return refuse(
                    f"the embed task trains a classifier over {spec.num_classes} classes; the "
                    f"node's {modality} data must sit in class folders 00-... to "
                    f"{spec.num_classes - 1:02d}-... ."
                )
        return NodeInfo(
            node_type=node_type,
            eligible=True,
            model_fingerprint=fingerprint(spec),
            identity_key=identity,
            base_digest=base_digest,
        )

    # -- the work of one collection -----------------------------------------------------
    def contribution(
        self, job: JobSpec, rnd: RoundConfig, weights: Weights | None, state: NodeState
    ) -> Contribution:
        """This node's contribution to the collection ``rnd.work`` (see the module doc)."""
        self._require_node_type(job)
        workload = workload_for_job(job)
        analytics = rnd.work in (Work.RANGES, Work.MOMENTS)
        if analytics != (workload is WorkloadKind.ANALYTICS):
            raise ValueError(f"A {workload} job has no {rnd.work} collections.")
        if analytics:
            return self._analytics(job, rnd)
        if rnd.work is Work.FIT:
            return self._fit(job, rnd, weights, state)
        return self._evaluate(job, rnd, weights)

    def update_length(self, job: JobSpec) -> int:
        """Values of this node's update for ``job`` (0 for analytics)."""
        return update_length_for(job)

    def _included(self, job: JobSpec) -> bool:
        """Secret sampling: whether this node includes its data this round (own CSPRNG)."""
        fed = job.federation
        if fed.sampling is not Sampling.SECRET or fed.fraction is None:
            return True
        draw = int.from_bytes(os.urandom(8), "big") / 2**64
        return draw < fed.fraction

    def _fit(
        self, job: JobSpec, rnd: RoundConfig, weights: Weights | None, state: NodeState
    ) -> Contribution:
        privacy = job_privacy(job)
        spec = model_spec_for_job(job)
        data = model_data(job, spec, self.config.data_dir)
        # Opacus hooks a DP-SGD model's modules: that one is built for this message alone.
        model = build_model(spec) if privacy.uses_dp_sgd else cached_model(spec)
        _, global_arrays = _check_weights(trainable_names(model), weights)
        length = sum(int(a.size) for a in global_arrays)
        specs = metrics_for(job, Work.FIT)
        if self.config.noop_training or not self._included(job):
            return Contribution(
                update=np.zeros(length, dtype=np.float32),
                metric_rows=np.zeros((0, len(specs))),
            )
        set_trainable_weights(model, global_arrays)
        n = len(data.train)
        if n == 0:
            raise EmptyDataError(self.config.data_dir, f"{modality_for_job(job)} training examples")
        steps = job.epochs * math.ceil(n / job.batch_size)
        generator = torch.Generator().manual_seed(self._torch_seed(rnd, _PURPOSE_TRAIN))
        embed_loss = EmbedLoss.SUPERVISED if spec.num_classes else EmbedLoss.NT_XENT
        private: PrivateTraining[tuple[torch.Tensor, torch.Tensor]] | None = None
        if privacy.uses_dp_sgd:
            loader, private = self._private(job, model, data, embed_loss)
        else:
            loader = DataLoader(
                data.train, batch_sampler=StepBudget(n, job.batch_size, steps, generator)
            )
        try:
            result = train_local(
                model,
                loader,
                task=job.task,
                epochs=1,
                optimizer=job.optimizer,
                learning_rate=job.learning_rate,
                weight_decay=job.weight_decay,
                device=self.device,
                generator=generator,
                dp=private,
                embed_loss=embed_loss,
            )
        finally:
            if private is not None:
                state.dp_events.extend(private.events())
        model.to("cpu")
        delta = np.concatenate(
            [
                (local - glob).astype(np.float32).ravel()
                for local, glob in zip(get_trainable_weights(model), global_arrays, strict=True)
            ]
        )
        clipped = False
        if privacy.update_bound > 0:
            result_clip = clip_update([delta], clipping_norm=privacy.update_bound)
            delta, clipped = result_clip.update[0], result_clip.was_clipped
        metrics = [s.metric for s in specs]
        if metrics == [Metric.EXAMPLES]:  # example-level DP: one row per example
            rows = np.ones((result.num_examples, 1), dtype=np.float64)
        elif metrics == [Metric.CLIPPED]:  # node-level DP: this node's one bounded row
            rows = np.array([[float(clipped)]], dtype=np.float64)
        else:  # no DP: the node's sums (count, and the loss summed over its examples)
            mean = result.mean_loss if math.isfinite(result.mean_loss) else 0.0
            loss = min(specs[1].bound, max(0.0, mean))
            rows = np.array([[result.num_examples, result.num_examples * loss]], np.float64)
        return Contribution(update=delta, metric_rows=rows)

    def _private(
        self,
        job: JobSpec,
        model: torch.nn.Module,
        data: ModelData,
        embed_loss: EmbedLoss,
    ) -> tuple[
        DataLoader[tuple[torch.Tensor, torch.Tensor]],
        PrivateTraining[tuple[torch.Tensor, torch.Tensor]],
    ]:
        """DP-SGD for one round, Poisson-sampled and noised from ``os.urandom``, with the noise
        multiplier this node calibrates for ``dp.target_epsilon`` from its own count."""
        if job.task is Task.EMBED and embed_loss is EmbedLoss.NT_XENT:
            raise ValueError(
                "Example-level DP needs a supervised embed job (NT-Xent mixes the examples of a "
                "batch); this node's data has no labels for the classifier head."
            )
        n = len(data.train)
        sigma = dp_sgd_noise_multiplier(job, n)
        _, steps = dp_sgd_steps(job, n)
        loader = DataLoader(
            data.train,
            batch_size=job.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(_secret_seed()),
        )
        optimizer = make_optimizer(
            model, job.optimizer, learning_rate=job.learning_rate, weight_decay=job.weight_decay
        )
        private = make_private(
            model,
            optimizer,
            loader,
            max_grad_norm=job_privacy(job).dp_sgd_max_grad_norm,
            noise_multiplier=sigma,
            noise_generator=torch.Generator().manual_seed(_secret_seed()),
        )
        sampler = private.data_loader.batch_sampler
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler

        if not isinstance(sampler, UniformWithReplacementSampler):
            raise RuntimeError("Opacus did not build a Poisson sampler; refusing to train.")
        # One pass of `steps` Poisson batches at rate 1 / len(loader) (the accounted rate).
        setattr(sampler, "steps", steps)  # noqa: B010 -- Opacus's sampler is untyped
        return loader, private

    def _evaluate(self, job: JobSpec, rnd: RoundConfig, weights: Weights | None) -> Contribution:
        spec = model_spec_for_job(job)
        data = model_data(job, spec, self.config.data_dir)
        model = cached_model(spec)
        set_trainable_weights(model, _check_weights(trainable_names(model), weights)[1])
        specs = metrics_for(job, Work.EVALUATE)
        if self.config.noop_training:
            return Contribution(metric_rows=np.zeros((0, len(specs))))
        if len(data.held_out) == 0:
            raise ValueError(
                f"The node holds out no evaluation examples ({len(data.train)} in all; it "
                "needs at least 2)."
            )
        held: Dataset[tuple[torch.Tensor, torch.Tensor]] = data.held_out
        loader = DataLoader(held, batch_size=job.batch_size)
        table = evaluation_rows(
            model,
            loader,
            task=job.task,
            loss_bound=loss_bound(job),
            baseline_log_probs=(
                public_unigram_log_probs() if job.task is Task.LM_FINETUNE else None
            ),
            device=self.device,
            seed=self._torch_seed(rnd, _PURPOSE_EVAL),
        )
        columns = {
            Metric.EXAMPLES: np.ones(table.shape[0]),
            Metric.EVAL_LOSS: table[:, 0],
            Metric.EVAL_CORRECT: table[:, 1],
            Metric.BASELINE_LOSS: table[:, 2],
        }
        rows = np.stack([columns[s.metric] for s in specs], axis=1)
        if job_privacy(job).unit is DpUnit.NODE:
            rows = rows.mean(axis=0, keepdims=True)  # this node's means, one bounded row
        return Contribution(metric_rows=rows)

    def _analytics(self, job: JobSpec, rnd: RoundConfig) -> Contribution:
        values = sensing_values(job, self.config.data_dir)
        ranges = sensing_ranges(job)
        bound = analytics_row_bound(job, rnd.work)
        if rnd.work is Work.RANGES:
            rows = histogram_rows(values, ranges.low, ranges.high, HISTOGRAM_BINS)
        else:
            if len(rnd.range_low) != len(ranges.features):
                raise ValueError(
                    f"The moments phase needs a clipping range per feature "
                    f"({len(ranges.features)}); the round gives {len(rnd.range_low)}."
                )
            low, high = np.asarray(rnd.range_low), np.asarray(rnd.range_high)
            # A range the server sends can only hurt accuracy, never privacy: every moment is
            # clipped into [-1, 1] and every row to norm <= 1 whatever the range.
            rows = moment_rows(values, low, high)
        return Contribution(statistic_rows=clip_statistic_rows(rows, bound))

    # -- in the clear (train.fit, evaluate.eval) ----------------------------------------
    def plain(
        self, envelope: bytes, rnd: RoundConfig, weights: Weights | None, state: NodeState
    ) -> Summed:
        """This node's own sums, sent in the clear -- refused under a secure-agg level."""
        admitted = self.admit(envelope)
        job = admitted.job
        if job.privacy_level.uses_secure_agg:
            raise SecAggRefusedError(
                f"The job's privacy level is {job.privacy_level}: this node sends what it "
                "computed only masked, through secure aggregation, never in the clear."
            )
        self._release(admitted, rnd)
        contribution = self.contribution(job, rnd, weights, state)
        return contribution.summed(metrics_for(job, rnd.work))

    # -- train.secagg_* / evaluate.secagg_* ----------------------------------------------
    def secagg(
        self,
        envelope: bytes,
        rnd: RoundConfig,
        request: SecAggMessage,
        weights: Weights | None,
        state: NodeState,
    ) -> SecAggMessage:
        """Answer one SecAgg+ request of the authenticated, malicious-server protocol
        (:mod:`aggregation.secagg`: signed keys checked against the roster, the node's own
        SecAgg+ minimums, the consistency check), bound to the signed job: the session context
        is the job's id, so the node's peers must hold the same job, and every later stage must
        come with the job it advertised keys for; the masked-input stage computes the
        contribution first, encodes it into the ring with this node's noise share, and masks
        it. Before signing the survivor set of a distributed-DP collection the node checks
        that enough survivors carry noise."""
        admitted = self.admit(envelope)
        job = admitted.job
        kit = self.kit
        if not job.privacy_level.uses_secure_agg:
            raise SecAggRefusedError(
                f"The job's privacy level is {job.privacy_level}; it uses no secure aggregation."
            )
        category = rnd.work.category
        if request.server_round != rnd.secagg_round:
            raise SecAggRefusedError(
                f"The SecAgg+ request is for session {request.server_round}, but the round "
                f"config describes {rnd.work} of round {rnd.server_round} (session "
                f"{rnd.secagg_round})."
            )
        if isinstance(request, AdvertiseKeysRequest):
            length = self._ring_layout(job, rnd, request.params.num_clients).length
            if request.params.vector_length != length:
                raise ValueError(
                    f"SecAgg+ vector_length is {request.params.vector_length}, but this node "
                    f"contributes {length} values to a {rnd.work} collection of job "
                    f"{job.catalog_entry.id}."
                )
            key = (request.run_id, request.server_round, category)
            session = ClientSession(
                identity=kit.credentials.identity,
                roster=kit.secagg_roster(),
                policy=kit.secagg_policy,
                participation=kit.participation_log(),
                context=protocol.session_context(admitted.job_id),
            )
            reply: SecAggMessage = session.advertise_keys(request)
            kit.participation.admit(request.run_id, request.server_round)  # durable, first
            state.secagg_session = dict(session.to_state_record())
            state.secagg_round = key
            return reply
        if state.secagg_session is None:
            raise SecAggProtocolError(
                f"Node {self.node_id} has no SecAgg+ session: it did not advertise keys for "
                f"this collection (request for round {request.server_round})."
            )
        session = ClientSession.from_state_record(
            state.secagg_session,
            identity=kit.credentials.identity,
            roster=kit.secagg_roster(),
            policy=kit.secagg_policy,
            context=protocol.session_context(admitted.job_id),  # the job it advertised for
        )
        params = session.state.params
        if params is None:
            raise SecAggProtocolError("The SecAgg+ session has no parameters.")
        if isinstance(request, MaskedInputRequest):
            _check_masked_request(session, request)
            self._release(admitted, rnd)
            layout = self._ring_layout(job, rnd, params.num_clients)
            contribution = _capped(self.contribution(job, rnd, weights, state))
            ring = layout.encode(
                contribution,
                rotation_seed=protocol.rotation_seed(request.run_id, request.server_round),
                noise_shares=min_survivors(job, params.num_clients),
                noise_rng=_secret_rng(),
            )
            reply = session.masked_input_quantized(request, ring)
        else:
            if isinstance(request, ConsistencyCheckRequest):
                self._check_survivors(job, request, params.num_clients)
            reply = session.handle(request)
        done = session.state.phase is ClientPhase.DONE
        state.secagg_session = None if done else dict(session.to_state_record())
        return reply

    def _check_survivors(
        self, job: JobSpec, request: ConsistencyCheckRequest, group_size: int
    ) -> None:
        """Under distributed DP, refuse to sign (and so to unmask) a survivor set too small
        to carry the noise this node's share was sized for, counting out the neighbours the
        policy assumes may collude with the server (their shares can be subtracted)."""
        if job.privacy_level is not PrivacyLevel.DP_SECURE_AGG:
            return
        needed = min_survivors(job, group_size) + self.kit.secagg_policy.max_corrupt_neighbours
        if len(request.survivor_ids) < needed:
            raise SecAggRefusedError(
                f"Node {self.node_id} refuses to sign a survivor set of "
                f"{len(request.survivor_ids)}: its distributed noise share is sized for at "
                f"least {needed} honest survivors, so a smaller sum would be under-noised."
            )

    def _ring_layout(self, job: JobSpec, rnd: RoundConfig, group_size: int) -> RingLayout:
        return ring_layout(
            job, rnd.work, update_length=self.update_length(job), group_size=group_size
        )


def _check_masked_request(session: ClientSession, request: MaskedInputRequest) -> None:
    """Refuse a masked-input request that the session would refuse, before training."""
    st = session.state
    if st.phase is not ClientPhase.MASKED_INPUT:
        raise SecAggProtocolError(
            f"Node {st.node_id} expects a {st.phase} request, got a masked-input request."
        )
    if (request.node_id, request.run_id, request.server_round) != (
        st.node_id,
        st.run_id,
        st.server_round,
    ):
        raise SecAggProtocolError(
            f"Masked-input request for node {request.node_id}, run {request.run_id}, round "
            f"{request.server_round}; this session is node {st.node_id}, run {st.run_id}, "
            f"round {st.server_round}."
        )


def _check_weights(
    names: list[str], weights: Weights | None
) -> tuple[tuple[str, ...], list[npt.NDArray[np.float32]]]:
    """The names and arrays of ``weights`` if it holds exactly the model's weights, in order.

    Shapes are checked by ``set_weights``.
    """
    if weights is None:
        raise ValueError("This job trains a model: the message must carry the `weights` record.")
    given = [name for name, _ in weights]
    if given == names:
        return tuple(names), [np.asarray(a) for _, a in weights]
    missing = [n for n in names if n not in set(given)]
    unexpected = [n for n in given if n not in set(names)]
    detail = []
    if missing:
        detail.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        detail.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if not detail:
        detail.append("in another order")
    raise ValueError(
        f"The `weights` record does not fit the job's model ({len(names)} arrays expected, "
        f"{len(given)} given): {'; '.join(detail)}. Do the server and the node build the same "
        "model (compare the model fingerprint)?"
    )


def _capped(contribution: Contribution) -> Contribution:
    """At most :data:`aggregation.codec.EXAMPLE_CAP` per-example rows (a uniform sample from
    the node's CSPRNG beyond it): the distributed-DP segments are sized for that many."""
    rng = None
    metric_rows, statistic_rows = contribution.metric_rows, contribution.statistic_rows
    for name in ("metric_rows", "statistic_rows"):
        rows = getattr(contribution, name)
        if rows.shape[0] > EXAMPLE_CAP:
            rng = rng or _secret_rng()
            keep = np.sort(rng.choice(rows.shape[0], size=EXAMPLE_CAP, replace=False))
            if name == "metric_rows":
                metric_rows = rows[keep]
            else:
                statistic_rows = rows[keep]
    return Contribution(contribution.update, metric_rows, statistic_rows)
