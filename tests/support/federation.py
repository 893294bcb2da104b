"""A provisioned federation for tests: operator keys, a signed roster, one kit per node.

Every node of a fedbrain federation holds a kit (identity, roster, operators' keys, policy);
tests build the same thing as ``fedbrain simulate`` does, with :func:`provision`, and get the
node configs and the run options that go with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from clients.config import Fault, NodeConfig
from manifests.catalog import NodeType
from manifests.demo import write_keys
from manifests.jobspec import JobSpec
from manifests.keys import SigningKey
from manifests.signed_job import sign_job
from server.options import RunOptions
from server.provision import OPEN_POLICY, NodeToProvision, provision_nodes

FEDERATION = "test-federation"


@dataclass(frozen=True)
class Federation:
    """What :func:`provision` wrote."""

    signing_key: Path
    trusted_keys: Path
    roster: Path
    kits: tuple[Path, ...]
    node_type: NodeType

    def node_configs(
        self,
        data_dirs: Sequence[Path],
        *,
        faults: Mapping[int, tuple[Fault, ...]] | None = None,
        node_type: NodeType | None = None,
    ) -> dict[int, NodeConfig]:
        """Partition id -> the node's config, with its kit."""
        return {
            i: NodeConfig(
                node_type or self.node_type,
                folder,
                name=f"node-{i}",
                faults=(faults or {}).get(i, ()),
                kit=self.kits[i],
            )
            for i, folder in enumerate(data_dirs)
        }

    def run_options(self, run_dir: Path, **values: Any) -> RunOptions:
        """Run options for the server of this federation: its roster, the operator's keys
        (the server signs the job itself), and ``values``."""
        return RunOptions(
            run_dir=run_dir,
            roster=self.roster,
            signing_key=self.signing_key,
            trusted_keys=self.trusted_keys,
            **values,
        )

    def sign(self, job: JobSpec) -> bytes:
        """The job as the operator signs it."""
        key = SigningKey.from_pem(self.signing_key.read_bytes())
        return sign_job(job, key, federation=FEDERATION, issued_at=datetime.now(UTC))


def provision(
    root: Path,
    count: int,
    node_type: NodeType,
    *,
    policy: str | None = OPEN_POLICY,
) -> Federation:
    """Keys in ``root/keys``, the roster and ``count`` kits under ``root/federation``.

    ``policy``: the nodes' policy (default: one that accepts every level, so tests can run
    jobs without DP; None: the safe defaults).
    """
    now = datetime.now(UTC)
    signing, _, trusted = write_keys(
        root / "keys",
        SigningKey.generate(),
        not_before=now - timedelta(hours=1),
        not_after=now + timedelta(days=1),
    )
    done = provision_nodes(
        root / "federation",
        [NodeToProvision(f"node-{i}", node_type.value) for i in range(count)],
        operator_key=signing,
        trusted_keys=trusted,
        federation=FEDERATION,
        policy=policy,
    )
    kits = tuple(done.kits[f"node-{i}"] for i in range(count))
    return Federation(signing, trusted, done.roster, kits, node_type)
