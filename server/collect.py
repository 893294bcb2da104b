"""Collect one round's contributions: the only Flower I/O of a round.

Secure collections run SecAgg+ (:mod:`aggregation.secagg`) stage by stage as the session
lists them -- with a ``roster``, the malicious-server protocol (signed keys, consistency check)
between nodes addressed by their identity-derived SecAgg+ ids (``secagg_ids`` maps each
transport node id to its SecAgg+ id), bound to the signed job (the session context is its job
id: :func:`clients.protocol.session_context`); Flower only carries the messages.

:class:`Collector` sends one collection's messages over a Flower ``Grid`` and returns
:class:`Contributions`: the contributors, each dropout with its stage and reason, timings and
measurements, and either each node's clear-text sums (levels ``none``/``dp``) or the decoded
secure sum (``secure-agg``/``dp+secure-agg``). It never sees a model: it takes the weights
record to send and the length of the update segment.

One bad node is one dropout: a missing reply, an error reply, or a reply that does not parse,
has the wrong shape, dtype or length, or holds NaN/infinity removes that node from the
collection with the reason, and the collection goes on with the others. (A node refused after
its masked input was summed -- consistency check, unmask -- still counts; its stage and reason
are in ``Contributions.late``.) Only when too few
remain does a secure collection abort (:class:`aggregation.secagg.SecAggAbortedError` is
turned into ``Contributions.aborted``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.serverapp import Grid

from aggregation.codec import Summed
from aggregation.secagg import (
    Roster,
    SecAggAbortedError,
    SecAggError,
    SecAggMessage,
    SecAggParams,
    ServerSession,
    Stage,
)
from aggregation.secagg.server import MessageHook
from aggregation.types import Measurements
from clients import protocol as wire
from clients.jobs import analytics_statistics_length, metrics_for, min_survivors, ring_layout
from clients.protocol import RoundConfig, Work
from manifests.jobspec import JobSpec
from manifests.signed_job import envelope_job_id
from server.plan import secagg_params

__all__ = ["Collector", "Contributions", "Dropout", "StageCallback"]

logger = logging.getLogger(__name__)

StageCallback = Callable[[str, float, Mapping[str, float]], None]
"""Called after each stage with (stage name, seconds, stage metrics)."""


@dataclass(frozen=True)
class Dropout:
    """A node that left a collection: at which stage and why."""

    node: int
    stage: str
    reason: str


@dataclass
class Contributions:
    """What one collection produced (see the module docstring)."""

    work: Work
    sampled: tuple[int, ...]
    contributors: tuple[int, ...] = ()
    per_node: dict[int, Summed] | None = None
    secure_sum: Summed | None = None
    dropouts: list[Dropout] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    measurements: Measurements = field(default_factory=dict)
    aborted: str | None = None
    secagg: SecAggParams | None = None
    helped_unmask: frozenset[int] = frozenset()
    late: list[Dropout] = field(default_factory=list)
    """Contributors refused after their masked input was summed (consistency check, unmask):
    their input counts and they are not dropouts, but the stage and reason are recorded."""

    @property
    def dropped_by_stage(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for d in self.dropouts:
            counts[d.stage] = counts.get(d.stage, 0) + 1
        return counts


class Collector:
    """Sends a job's collections over ``grid`` (see the module docstring)."""

    def __init__(
        self,
        grid: Grid,
        job: JobSpec,
        *,
        envelope: bytes,
        round_timeout: float,
        run_id: int,
        seed: int = 0,
        secagg_hook: MessageHook | None = None,
        on_stage: StageCallback | None = None,
        roster: Roster | None = None,
        secagg_ids: Mapping[int, int] | None = None,
    ) -> None:
        self.grid = grid
        self.job = job
        self.job_record = wire.signed_job_record(envelope)
        self.context = wire.session_context(envelope_job_id(envelope))
        self.round_timeout = round_timeout
        self.run_id = run_id
        self.seed = seed
        self.secagg_hook = secagg_hook
        self.on_stage = on_stage
        self.roster = roster
        self.secagg_ids = dict(secagg_ids or {})

    # ------------------------------------------------------------------ transport

    def send(self, messages: Sequence[Message]) -> dict[int, Message]:
        """Send a batch; the replies by sender (error replies included, strangers dropped)."""
        if not messages:
            return {}
        expected = {m.metadata.dst_node_id for m in messages}
        replies: dict[int, Message] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout):
            sender = reply.metadata.src_node_id
            if sender not in expected or sender in replies:
                logger.warning("Ignoring an unexpected or duplicate reply from node %s.", sender)
                continue
            replies[sender] = reply
        return replies

    def message(
        self, node: int, message_type: str, rnd: RoundConfig, weights: ArrayRecord | None
    ) -> Message:
        content = RecordDict({wire.SIGNED_JOB: self.job_record, wire.ROUND: rnd.to_record()})
        if weights is not None:
            content[wire.WEIGHTS] = weights
        return Message(
            content, dst_node_id=node, message_type=message_type, group_id=str(rnd.server_round)
        )

    def _stage_done(self, out: Contributions, stage: str, began: float, **metrics: float) -> None:
        seconds = time.monotonic() - began
        out.timings[stage] = out.timings.get(stage, 0.0) + seconds
        if self.on_stage is not None:
            self.on_stage(stage, seconds, metrics)

    # ------------------------------------------------------------------ collections

    def collect(
        self,
        *,
        rnd: RoundConfig,
        nodes: Sequence[int],
        weights: ArrayRecord | None,
        update_length: int,
        secure: bool,
    ) -> Contributions:
        """One collection of ``rnd.work`` from ``nodes``."""
        out = Contributions(work=rnd.work, sampled=tuple(sorted(nodes)))
        if not nodes:
            out.aborted = "no node was sampled"
            return out
        if secure:
            self._secure(out, rnd, weights, update_length)
        else:
            self._plain(out, rnd, weights, update_length)
        if out.aborted is None and not out.contributors:
            out.aborted = "no node contributed"
        return out

    def _plain(
        self, out: Contributions, rnd: RoundConfig, weights: ArrayRecord | None, length: int
    ) -> None:
        stage = "train" if rnd.work.category == "train" else "eval"
        message_type = wire.FIT if stage == "train" else wire.EVALUATE
        began = time.monotonic()
        replies = self.send([self.message(n, message_type, rnd, weights) for n in out.sampled])
        specs = metrics_for(self.job, rnd.work)
        stats = 0
        if rnd.work in (Work.RANGES, Work.MOMENTS):
            stats = analytics_statistics_length(self.job, rnd.work)
        per_node: dict[int, Summed] = {}
        for node in out.sampled:
            reply = replies.get(node)
            if reply is None:
                out.dropouts.append(Dropout(node, stage, "no reply before the timeout"))
                continue
            if reply.has_error():
                out.dropouts.append(Dropout(node, stage, f"error reply: {reply.error.reason}"))
                continue
            try:
                per_node[node] = wire.summed_from_content(
                    reply.content,
                    update_length=length if rnd.work is Work.FIT else 0,
                    metrics=specs,
                    statistics_length=stats,
                )
            except Exception as error:  # a malformed reply: whatever it is, the node drops
                out.dropouts.append(Dropout(node, stage, f"unusable reply: {error}"))
        for d in out.dropouts:
            logger.warning(
                "Round %d: node %s dropped in %s: %s", rnd.server_round, d.node, d.stage, d.reason
            )
        out.per_node = per_node
        out.contributors = tuple(sorted(per_node))
        self._stage_done(out, stage, began, contributors=float(len(per_node)))

    def _secure(
        self, out: Contributions, rnd: RoundConfig, weights: ArrayRecord | None, length: int
    ) -> None:
        sampled = list(out.sampled)
        category = rnd.work.category
        try:
            layout = ring_layout(self.job, rnd.work, update_length=length, group_size=len(sampled))
            params = secagg_params(self.job, num_clients=len(sampled), vector_length=layout.length)
            ids = {node: self.secagg_ids.get(node, node) for node in sampled}
            if len(set(ids.values())) != len(ids):
                raise ValueError("two sampled nodes share one SecAgg+ identity")
        except ValueError as exc:
            out.aborted = f"SecAgg+ cannot start with {len(sampled)} node(s): {exc}"
            return
        out.secagg = params
        transport = {secagg_id: node for node, secagg_id in ids.items()}
        session = ServerSession(
            params,
            run_id=self.run_id,
            server_round=rnd.secagg_round,
            node_ids=sorted(transport),
            rng=np.random.default_rng(
                np.random.SeedSequence([self.seed, rnd.server_round, list(Work).index(rnd.work)])
            ),
            on_message=self.secagg_hook,
            roster=self.roster,
            context=self.context,
        )
        try:
            for stage, open_stage in session.stages():
                began = time.monotonic()
                requests = {transport[i]: request for i, request in open_stage().items()}
                answered = self._exchange(session, stage, category, rnd, requests, weights, ids)
                if stage is Stage.UNMASK:
                    out.helped_unmask = frozenset(answered)
                self._stage_done(out, stage.value, began, answered=float(len(answered)))
            result = session.result()
        except SecAggAbortedError as exc:
            out.aborted = str(exc)
            out.measurements.update(
                {f"secagg_{k}": v for k, v in session.state.measurements.items()}
            )
            out.dropouts.extend(_dropouts(session.state.dropout_reasons, transport))
            return
        contributors = {transport[i] for i in result.contributors}
        for dropout in _dropouts(result.dropout_reasons, transport):
            (out.late if dropout.node in contributors else out.dropouts).append(dropout)
        out.contributors = tuple(sorted(contributors))
        out.measurements.update({f"secagg_{k}": v for k, v in result.measurements.items()})
        if layout.uses_ddp:
            needed = min_survivors(self.job, len(sampled))
            out.measurements["ddp_min_survivors"] = needed
            if len(contributors) < needed:
                out.aborted = (
                    f"only {len(contributors)} node(s) contributed; the distributed noise "
                    f"is sized for at least {needed}, so this sum carries too little noise and "
                    "is discarded"
                )
                return
        out.secure_sum = layout.decode(
            result.total, rotation_seed=wire.rotation_seed(self.run_id, rnd.secagg_round)
        )

    def _exchange(
        self,
        session: ServerSession,
        stage: Stage,
        category: str,
        rnd: RoundConfig,
        requests: Mapping[int, SecAggMessage],
        weights: ArrayRecord | None,
        ids: Mapping[int, int],
    ) -> set[int]:
        """Send one stage's requests (keyed by transport node) and feed the replies to the
        session; a node whose reply is missing, an error or refused is rejected with the
        reason (one dropout, never a crashed round). Returns the nodes that answered."""
        message_type = wire.secagg_message_type(category, stage)
        messages = []
        for node, request in requests.items():
            message = self.message(
                node, message_type, rnd, weights if stage is Stage.MASKED_INPUT else None
            )
            wire.secagg_to_content(request.to_record(), message.content)
            messages.append(message)
        replies = self.send(messages)
        answered: set[int] = set()
        for node in sorted(requests):
            reply = replies.get(node)
            reason = None
            if reply is None:
                reason = "no reply before the timeout"
            elif reply.has_error():
                reason = f"error reply: {reply.error.reason}"
            else:
                try:
                    session.receive_record(ids[node], wire.secagg_from_content(reply.content))
                except Exception as exc:  # whatever a malformed reply raises, the node drops
                    reason = f"rejected reply: {type(exc).__name__}: {exc}"
            if reason is not None:
                logger.warning(
                    "Round %d: node %s dropped in %s: %s", rnd.server_round, node, stage, reason
                )
                with contextlib.suppress(SecAggError):  # unless the session counted it out
                    session.reject(ids[node], reason)
                continue
            answered.add(node)
        return answered


def _dropouts(reasons: Mapping[int, str], transport: Mapping[int, int]) -> list[Dropout]:
    """The session's dropout reasons (``"<stage>: <reason>"`` by SecAgg+ id) as Dropouts of
    transport nodes."""
    out = []
    for secagg_id in sorted(reasons):
        node = transport.get(secagg_id)
        if node is None:
            continue
        stage, _, reason = reasons[secagg_id].partition(": ")
        out.append(Dropout(node, stage, reason or reasons[secagg_id]))
    return out
