"""Find the run's nodes: wait for enough to connect, ask each for its node info, keep the
eligible ones (right node type, same model fingerprint, willing to work for the job).

The eligible nodes are the run's fixed population; refused nodes and their reasons are
logged, written to ``<run_dir>/nodes.json``, handed to ``on_refused`` (the federator records
them in the ledger) and returned. A node never reports how many examples it holds.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from aggregation.secagg import node_id_for
from clients import protocol as wire
from manifests.jobspec import JobSpec

__all__ = ["NODES_FILE", "Discovery", "NotEnoughNodesError", "discover_nodes"]

logger = logging.getLogger(__name__)

NODES_FILE: Final = "nodes.json"


class NotEnoughNodesError(RuntimeError):
    """Fewer nodes connected, or fewer were eligible, than the job needs."""


@dataclass(frozen=True)
class Discovery:
    """The eligible nodes (with their node types and SecAgg+ ids) and the refused ones with
    reasons."""

    eligible: tuple[int, ...]
    node_types: Mapping[int, str]
    refused: Mapping[int, str]
    secagg_ids: Mapping[int, int]


def _wait_for_nodes(grid: Grid, needed: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(set(grid.get_node_ids()))
        now = time.monotonic()
        if len(ids) >= needed or now >= deadline:
            return ids
        time.sleep(min(1.0, deadline - now))


def discover_nodes(
    grid: Grid,
    job: JobSpec,
    *,
    envelope: bytes,
    members: Mapping[int, bytes],
    fingerprint: str,
    needed: int,
    wait_timeout: float,
    reply_timeout: float,
    run_dir: Path,
    run_id: str,
    on_refused: Callable[[Mapping[int, str]], object] | None = None,
    base_digest: str | None = None,
) -> Discovery:
    """Ask every connected node for its node info (see the module docstring).

    ``envelope``: the operator-signed job the nodes check; ``members``: the roster's members
    (SecAgg+ id -> identity key): a node whose identity is not among them is refused, and each
    eligible node's SecAgg+ id is the one its identity key derives. ``base_digest``: the digest
    of the base checkpoint the server holds; a node holding another base is refused naming
    both digests (before the fingerprint, which covers the base too). ``on_refused`` receives
    the refused nodes and their reasons (when there are any), before too few eligible nodes
    raise.

    Raises :class:`NotEnoughNodesError` when fewer than ``needed`` nodes connect within
    ``wait_timeout`` seconds or fewer than ``needed`` are eligible.
    """
    connected = _wait_for_nodes(grid, needed, wait_timeout)
    if len(connected) < needed:
        raise NotEnoughNodesError(
            f"only {len(connected)} node(s) connected within {wait_timeout:g} s; the job needs "
            f"at least {needed}"
        )
    content = RecordDict({wire.SIGNED_JOB: wire.signed_job_record(envelope)})
    messages = [
        Message(content, dst_node_id=n, message_type=wire.NODE_INFO, group_id="0")
        for n in connected
    ]
    replies: dict[int, Message] = {}
    for answer in grid.send_and_receive(messages, timeout=reply_timeout):
        sender = answer.metadata.src_node_id
        if sender in connected and sender not in replies:
            replies[sender] = answer
    wanted_type = job.resolved_node_type.value
    eligible: list[int] = []
    node_types: dict[int, str] = {}
    refused: dict[int, str] = {}
    secagg_ids: dict[int, int] = {}
    taken: set[int] = set()
    for node in connected:
        reply = replies.get(node)
        reason = None
        if reply is None:
            reason = "did not answer query.node_info in time"
        elif reply.has_error():
            reason = f"query.node_info failed: {reply.error.reason}"
        else:
            try:
                info = wire.NodeInfo.from_record(
                    reply.content.config_records[wire.NODE_INFO_RECORD]
                )
            except (KeyError, ValueError) as exc:
                reason = f"malformed node_info: {exc}"
            else:
                if not info.eligible:
                    reason = f"not eligible: {info.reason or 'no reason given'}"
                elif info.node_type != wanted_type:
                    reason = f"node type {info.node_type!r}, the job needs {wanted_type!r}"
                elif base_digest is not None and info.base_digest != base_digest:
                    reason = (
                        f"base checkpoint digest {info.base_digest or '(none)'} differs from the "
                        f"server's {base_digest}: the node holds another base at "
                        f"{job.base_checkpoint}"
                    )
                elif info.model_fingerprint != fingerprint:
                    reason = (
                        f"model fingerprint {info.model_fingerprint or '(none)'} differs from "
                        f"the server's {fingerprint or '(none)'}"
                    )
                else:
                    reason = _identity_problem(info.identity_public_key, members, taken)
                if reason is None and info.identity_public_key is not None:
                    secagg_id = node_id_for(info.identity_public_key)
                    taken.add(secagg_id)
                    secagg_ids[node] = secagg_id
                    node_types[node] = info.node_type
        if reason is not None:
            refused[node] = reason
            logger.warning("Node %s refused: %s", node, reason)
            continue
        eligible.append(node)
    _write_nodes_file(run_dir, run_id, eligible, refused)
    if refused and on_refused is not None:
        on_refused(refused)
    if len(eligible) < needed:
        detail = "; ".join(f"node {n}: {r}" for n, r in sorted(refused.items()))
        raise NotEnoughNodesError(
            f"only {len(eligible)} eligible node(s) of {len(connected)} connected; the job "
            f"needs {needed}" + (f" (refused: {detail})" if detail else "")
        )
    return Discovery(tuple(eligible), node_types, refused, secagg_ids)


def _identity_problem(
    key: bytes | None, members: Mapping[int, bytes], taken: set[int]
) -> str | None:
    if key is None:
        return "it reported no identity key (not provisioned)"
    secagg_id = node_id_for(key)
    if members.get(secagg_id) != key:
        return f"its identity key {key.hex()[:16]}... is not a member of the federation roster"
    if secagg_id in taken:
        return "another connected node already presented the same identity"
    return None


def _write_nodes_file(
    run_dir: Path, run_id: str, eligible: Sequence[int], refused: Mapping[int, str]
) -> None:
    document = {
        "run_id": run_id,
        "eligible": [{"node_id": n} for n in eligible],
        "refused": [{"node_id": n, "reason": r} for n, r in sorted(refused.items())],
    }
    (run_dir / NODES_FILE).write_text(json.dumps(document, indent=2) + "\n", "utf-8")
