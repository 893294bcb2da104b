"""Provision a scenario's virtual nodes as a real federation would be.

``fedbrain simulate`` plays the operator: its signing key signs the roster and every job, and
each virtual node gets a kit (identity key, the signed roster, the operators' keys, its policy,
its persistent state) under ``<out>/federation/nodes/<node name>/`` -- the same files and
checks as a deployed node (:mod:`clients.credentials`, :mod:`clients.kit`).

Policy: the nodes keep the safe defaults (:class:`clients.policy.NodePolicy`) when those
accept every job of the scenario; a scenario with a job outside them (e.g. no DP, on purpose)
gets an open policy, and says so. A fresh run empties each kit's ``state/`` (budgets,
participation logs); ``--resume`` keeps it, so a resumed job is not charged twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from clients.policy import NodePolicy
from server.provision import OPEN_POLICY, NodeToProvision, provision_nodes
from simulations.scenario import Scenario

__all__ = ["FEDERATION_DIR", "SimulatedFederation", "provision_scenario"]

FEDERATION_DIR: Final = "federation"


@dataclass(frozen=True)
class SimulatedFederation:
    """The signed roster and each virtual node's kit (by node name)."""

    roster: Path
    kits: dict[str, Path]
    open_policy: bool


def provision_scenario(
    scenario: Scenario,
    out: Path,
    *,
    operator_key: Path,
    trusted_keys: Path,
    resume: bool,
) -> SimulatedFederation:
    """Identities, roster and kits for every node of ``scenario`` (see the module doc)."""
    defaults = NodePolicy()
    refused = [job for job in scenario.jobs if not defaults.check(job.spec).accepted]
    policy = OPEN_POLICY if refused else None
    done = provision_nodes(
        out / FEDERATION_DIR,
        [NodeToProvision(node.name, node.node_type.value) for node in scenario.nodes],
        operator_key=operator_key,
        trusted_keys=trusted_keys,
        federation=f"simulation-{scenario.name}",
        policy=policy,
        reset_state=not resume,
        link_roster=True,
    )
    return SimulatedFederation(done.roster, done.kits, open_policy=policy is not None)
