"""Provision a federation's nodes: identities, the signed roster, and one kit per node.

The operator's side of :mod:`clients.credentials`: for each node an Ed25519 identity key
(written into the node's own kit folder, mode 0600, never copied elsewhere), one roster listing
every node's identity public key and node type, signed with the operator key, and in each kit
the roster, the operators' trusted-keys file and the node's policy. ``fedbrain simulate``
provisions its virtual nodes with :func:`provision_nodes`; deployment startup kits build on it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from clients.credentials import (
    IDENTITY_FILE,
    OPERATORS_FILE,
    POLICY_FILE,
    ROSTER_FILE,
    STATE_DIR,
    load_identity,
    write_identity,
)
from manifests.atomic import write_atomically
from manifests.catalog import NodeType
from manifests.keys import SigningKey, TrustedKeys
from manifests.roster import Roster, RosterEntry, sign_roster

__all__ = [
    "OPEN_POLICY",
    "ROSTER_NAME",
    "NodeToProvision",
    "Provisioned",
    "provision_nodes",
]

ROSTER_NAME: Final = "roster.dsse.json"
OPEN_POLICY: Final = """\
# A node policy that accepts every privacy level and epsilon: for simulations and tests whose
# jobs deliberately run without DP. A deployed node keeps the safe defaults (no such file).
[default]
min_privacy_level = "none"
dp_units = ["example", "node"]
max_epsilon = inf
lifetime_epsilon = inf
max_delta = 0.01
"""


@dataclass(frozen=True)
class NodeToProvision:
    """One node of the federation: a unique name and its node type."""

    name: str
    node_type: str


@dataclass(frozen=True)
class Provisioned:
    """Where the roster and each node's kit were written."""

    roster: Path
    kits: dict[str, Path]


def provision_nodes(
    folder: Path,
    nodes: Sequence[NodeToProvision],
    *,
    operator_key: Path,
    trusted_keys: Path,
    federation: str,
    policy: str | None = None,
    validity: timedelta = timedelta(days=365),
    now: datetime | None = None,
    reset_state: bool = False,
    link_roster: bool = False,
) -> Provisioned:
    """Write ``<folder>/roster.dsse.json`` and ``<folder>/nodes/<name>/`` for every node.

    A node that already has an identity keeps it (its key is re-listed); ``policy`` (TOML
    text; None: the safe defaults) is written into every kit; ``reset_state`` empties each
    kit's ``state/`` (budgets and participation logs), which a fresh simulation wants and a
    deployment never does. ``link_roster`` (simulations, whose kits share one disk): each
    kit's roster is a hard link to the federation's roster file instead of a copy -- the
    roster grows with the federation, so copies would take disk quadratic in its size (a
    1,000-node roster is about 260 KB). A kit that installs a newer roster replaces its link
    with a file of its own.
    """
    stamp = (now or datetime.now(UTC)).replace(microsecond=0)
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be unique. Found {names}.")
    key = SigningKey.from_pem(operator_key.read_bytes())
    operators = TrustedKeys.load(trusted_keys)
    if key.public_key().keyid not in {k.keyid for k in operators.keys}:
        raise ValueError("the operator key is not in the trusted-keys file given to the nodes")
    kits: dict[str, Path] = {}
    entries = []
    for node in nodes:
        kit = folder / "nodes" / node.name
        kit.mkdir(parents=True, exist_ok=True)
        identity_path = kit / IDENTITY_FILE
        identity = load_identity(identity_path) if identity_path.exists() else None
        if identity is None:
            identity = write_identity(identity_path)
        entries.append(
            RosterEntry(
                name=node.name,
                node_type=NodeType(node.node_type),
                identity_key=identity.public_key,
                not_before=stamp - timedelta(minutes=5),
                not_after=stamp + validity,
            )
        )
        write_atomically(kit / OPERATORS_FILE, operators.to_json())
        if policy is not None:
            write_atomically(kit / POLICY_FILE, policy.encode())
        elif (kit / POLICY_FILE).exists():
            (kit / POLICY_FILE).unlink()
        if reset_state and (kit / STATE_DIR).exists():
            shutil.rmtree(kit / STATE_DIR)
        kits[node.name] = kit
    roster = Roster.of(federation, stamp, entries)
    envelope = sign_roster(roster, key)
    roster_path = folder / ROSTER_NAME
    write_atomically(roster_path, envelope)
    for kit in kits.values():
        if not link_roster or not _link(roster_path, kit / ROSTER_FILE):
            write_atomically(kit / ROSTER_FILE, envelope)
    return Provisioned(roster_path, kits)


def _link(source: Path, target: Path) -> bool:
    """Make ``target`` a hard link to ``source``, atomically; False if links are not possible
    here (another file system), so the caller copies."""
    temporary = target.with_name(f".{target.name}.link")
    try:
        temporary.unlink(missing_ok=True)
        os.link(source, temporary)
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        return False
    return True
