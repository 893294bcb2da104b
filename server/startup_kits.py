"""Startup kits: one folder per role with only that role's secrets (``fedbrain provision``).

``provision_federation`` turns a federation file (:mod:`server.federation_file`) into::

    OUT/
      provisioning.json      what was provisioned (nodes, their Flower keys, revocations)
      roster.dsse.json       the signed roster (a copy is in the server kit and each node kit)
      operators.json         the operators' public keys (what nodes trust)
      ca/                    the federation CA: ca.key.pem (0600, keep offline), ca.crt.pem
      server/                the SuperLink's kit          -> fedbrain server start --kit
      nodes/<name>/          one kit per node             -> fedbrain node start --kit
      operators/<name>/      one kit per operator         -> fedbrain run JOB --kit

Secrets, each written once (mode 0600) into the one kit that uses it: the SuperLink's TLS key
and the server's artifact signing key (server kit), each node's identity key and Flower
authentication key (its node kit), each operator's signing key (its operator kit); the CA key
stays in ``ca/``. The operators sign rosters and jobs; the server signs artifacts with a key of
its own that nodes do *not* trust, so the server cannot sign a job (the threat model's
malicious server). Every kit has a three-line README and a systemd unit.

``add_node`` / ``revoke_node`` re-sign the roster (first operator's key) and update the server
kit's roster and ``authorized-nodes.json`` (what ``fedbrain server start`` / ``sync-nodes``
registers with the SuperLink), writing the new node's kit and touching no other kit: nodes get
the new roster with ``fedbrain node roster install``.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import tomli_w

from clients.credentials import (
    AUTH_KEY_FILE,
    AUTH_PUBLIC_KEY_FILE,
    CA_FILE,
    IDENTITY_FILE,
    NODE_CONFIG_FILE,
    OPERATORS_FILE,
    POLICY_FILE,
    ROSTER_FILE,
    write_identity,
)
from manifests.atomic import write_atomically
from manifests.catalog import NodeType
from manifests.keys import SigningKey, TrustedKey, TrustedKeys
from manifests.roster import Roster, RosterEntry, sign_roster, verify_roster
from server.federation_file import FederationFile, NodeSpec
from server.pki import (
    TlsIdentity,
    issue_ca,
    issue_server_certificate,
    new_node_auth_key,
    node_auth_public_key,
    write_private,
)
from server.provision import NodeToProvision, provision_nodes

__all__ = [
    "AUTHORIZED_NODES_FILE",
    "OPERATOR_CONFIG_FILE",
    "REGISTRY_FILE",
    "SERVER_CONFIG_FILE",
    "Provisioning",
    "ProvisioningError",
    "add_node",
    "provision_federation",
    "revoke_node",
]

REGISTRY_FILE: Final = "provisioning.json"
SERVER_DIR: Final = "server"
NODES_DIR: Final = "nodes"
OPERATORS_DIR: Final = "operators"
CA_DIR: Final = "ca"
CA_KEY_FILE: Final = "ca.key.pem"
SERVER_CONFIG_FILE: Final = "server.toml"
OPERATOR_CONFIG_FILE: Final = "operator.toml"
AUTHORIZED_NODES_FILE: Final = "authorized-nodes.json"
TLS_CERT_FILE: Final = "superlink.crt.pem"
TLS_KEY_FILE: Final = "superlink.key.pem"
ARTIFACT_KEY_FILE: Final = "artifact-signing-key.pem"
SIGNING_KEY_FILE: Final = "signing-key.pem"
TRUSTED_KEYS_FILE: Final = "trusted-keys.json"
README_FILE: Final = "README"
_SKEW: Final = timedelta(minutes=5)


class ProvisioningError(ValueError):
    """Provisioning cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class Provisioning:
    """Where the kits of a provisioned federation are."""

    root: Path
    server: Path
    nodes: dict[str, Path]
    operators: dict[str, Path]


# --------------------------------------------------------------------------- small writers


def _readme(kit: Path, lines: Sequence[str]) -> None:
    if len(lines) != 3:
        raise ValueError("a kit README has three lines")
    write_atomically(kit / README_FILE, ("\n".join(lines) + "\n").encode())


def _unit(
    kit: Path, name: str, description: str, command: str, kit_path: Path, *, daemon: bool = True
) -> None:
    """A systemd unit: a daemon restarted on failure, or a one-shot job (never re-submitted
    by systemd: a failed run is resumed on purpose, ``fedbrain run --resume``)."""
    service = "Type=simple\nRestart=on-failure\nRestartSec=5\n" if daemon else "Type=oneshot\n"
    text = (
        "# Install: copy this kit to the path below on its machine, then\n"
        f"#   sudo cp {name} /etc/systemd/system/ && sudo systemctl enable --now {name}\n"
        "[Unit]\n"
        f"Description={description}\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n\n"
        "[Service]\n"
        f"{service}"
        f"WorkingDirectory={kit_path}\n"
        f"ExecStart={command}\n"
        "# Run as an unprivileged user that owns the kit (its keys are mode 0600):\n"
        "# User=fedbrain\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )
    write_atomically(kit / name, text.encode())


def _toml(path: Path, header: str, values: dict[str, object]) -> None:
    write_atomically(path, (header + tomli_w.dumps(values)).encode())


def _fedbrain_command() -> str:
    found = Path(sys.executable).with_name("fedbrain")
    return str(found) if found.exists() else "fedbrain"


def _window(now: datetime, days: int) -> tuple[datetime, datetime]:
    start = now.replace(microsecond=0)
    return start - _SKEW, start + timedelta(days=days)


# --------------------------------------------------------------------------- the registry


def _registry(root: Path) -> dict[str, object]:
    path = root / REGISTRY_FILE
    try:
        document = json.loads(path.read_text("utf-8"))
    except OSError:
        raise ProvisioningError(
            f"{root} is not a provisioned federation (no {REGISTRY_FILE}); run "
            "`fedbrain provision FEDERATION.toml --out DIR` first"
        ) from None
    if not isinstance(document, dict):
        raise ProvisioningError(f"{path}: not a provisioning registry")
    return document


def _save_registry(root: Path, document: dict[str, object]) -> None:
    write_atomically(root / REGISTRY_FILE, (json.dumps(document, indent=2) + "\n").encode())


def _registry_nodes(document: dict[str, object]) -> list[dict[str, object]]:
    nodes = document.get("nodes")
    if not isinstance(nodes, list):
        raise ProvisioningError(f"{REGISTRY_FILE}: no node list")
    return [n for n in nodes if isinstance(n, dict)]


def _authorized(document: dict[str, object]) -> bytes:
    """``authorized-nodes.json``: the Flower keys the SuperLink admits (revoked ones are
    listed with ``revoked: true`` so a sync unregisters them)."""
    entries = [
        {
            "name": node["name"],
            "public_key": node["auth_public_key"],
            "revoked": node.get("revoked_at") is not None,
        }
        for node in _registry_nodes(document)
    ]
    return (json.dumps(entries, indent=2) + "\n").encode()


# --------------------------------------------------------------------------- kits


def _node_kit(
    root: Path,
    spec: NodeSpec,
    *,
    federation: str,
    superlink: str,
    kit_root: Path,
) -> dict[str, object]:
    """The Flower and deployment half of a node's kit (its fedbrain half is written by
    :func:`server.provision.provision_nodes`); returns its registry entry."""
    kit = root / NODES_DIR / spec.name
    auth = new_node_auth_key()
    write_private(kit / AUTH_KEY_FILE, auth.private_openssh)
    write_atomically(kit / AUTH_PUBLIC_KEY_FILE, auth.public_openssh)
    shutil.copyfile(root / CA_DIR / CA_FILE, kit / CA_FILE)
    if spec.policy is not None:
        write_atomically(kit / POLICY_FILE, spec.policy.read_bytes())
    _toml(
        kit / NODE_CONFIG_FILE,
        "# This node's deployment settings (fedbrain provision); fedbrain node start reads them.\n",
        {
            "federation": federation,
            "name": spec.name,
            "node_type": spec.node_type,
            "superlink": superlink,
            "data": spec.data,
            "runtime_port": spec.runtime_port,
        },
    )
    installed = kit_root / NODES_DIR / spec.name
    _readme(
        kit,
        [
            f"fedbrain node kit of {spec.name!r} ({spec.node_type}) in federation {federation!r}.",
            "Secrets: identity.pem and flower-auth.key (mode 0600); never copy them elsewhere.",
            f"Start: fedbrain node start --kit {installed}  (or the systemd unit in this folder)",
        ],
    )
    _unit(
        kit,
        f"fedbrain-node-{spec.name}.service",
        f"fedbrain node {spec.name} (federation {federation})",
        f"{_fedbrain_command()} node start --kit {installed}",
        installed,
    )
    return {
        "name": spec.name,
        "node_type": spec.node_type,
        "data": spec.data,
        "runtime_port": spec.runtime_port,
        "auth_public_key": node_auth_public_key(auth.public_openssh).decode().strip(),
        "revoked_at": None,
    }


def _server_kit(
    root: Path, spec: FederationFile, *, now: datetime, kit_root: Path, operators: TrustedKeys
) -> Path:
    kit = root / SERVER_DIR
    kit.mkdir(parents=True)
    ca_key = (root / CA_DIR / CA_KEY_FILE).read_bytes()
    ca_cert = (root / CA_DIR / CA_FILE).read_bytes()
    tls = issue_server_certificate(
        TlsIdentity(ca_key, ca_cert),
        spec.certificate_names,
        now=now,
        valid=timedelta(days=spec.valid_days),
    )
    write_private(kit / TLS_KEY_FILE, tls.key_pem)
    write_atomically(kit / TLS_CERT_FILE, tls.certificate_pem)
    write_atomically(kit / CA_FILE, ca_cert)
    artifact_key = SigningKey.generate()
    write_private(kit / ARTIFACT_KEY_FILE, artifact_key.private_pem())
    pinned = TrustedKey(artifact_key.public_key(), *_window(now, spec.valid_days))
    write_atomically(kit / TRUSTED_KEYS_FILE, TrustedKeys((*operators.keys, pinned)).to_json())
    _toml(
        kit / SERVER_CONFIG_FILE,
        "# The SuperLink's settings (fedbrain provision); fedbrain server start reads them.\n"
        "# Paths are relative to this kit.\n",
        {
            "federation": spec.name,
            "superlink": spec.superlink,
            "listen": spec.listen,
            "port": spec.port,
            "database": "state/superlink.db",
            "runs": "runs",
        },
    )
    installed = kit_root / SERVER_DIR
    _readme(
        kit,
        [
            f"fedbrain server kit (SuperLink) of federation {spec.name!r}, at {spec.superlink}.",
            f"Secrets: {TLS_KEY_FILE} and {ARTIFACT_KEY_FILE} (mode 0600); never copy them.",
            f"Start: fedbrain server start --kit {installed}  (or the systemd unit in this folder)",
        ],
    )
    _unit(
        kit,
        "fedbrain-server.service",
        f"fedbrain SuperLink (federation {spec.name})",
        f"{_fedbrain_command()} server start --kit {installed}",
        installed,
    )
    return kit


def _operator_kit(
    root: Path,
    name: str,
    key: SigningKey,
    spec: FederationFile,
    *,
    kit_root: Path,
    trusted: TrustedKeys,
) -> Path:
    kit = root / OPERATORS_DIR / name
    kit.mkdir(parents=True)
    write_private(kit / SIGNING_KEY_FILE, key.private_pem())
    write_atomically(kit / CA_FILE, (root / CA_DIR / CA_FILE).read_bytes())
    write_atomically(kit / TRUSTED_KEYS_FILE, trusted.to_json())
    _toml(
        kit / OPERATOR_CONFIG_FILE,
        "# This operator's settings (fedbrain provision); fedbrain run reads them.\n",
        {"federation": spec.name, "name": name, "superlink": spec.superlink},
    )
    installed = kit_root / OPERATORS_DIR / name
    _readme(
        kit,
        [
            f"fedbrain operator kit of {name!r} in federation {spec.name!r}.",
            f"Secret: {SIGNING_KEY_FILE} (mode 0600) signs jobs; never copy it.",
            f"Run a job: fedbrain run JOB.toml --kit {installed}",
        ],
    )
    _unit(
        kit,
        "fedbrain-run@.service",
        f"fedbrain job %i (federation {spec.name}, operator {name})",
        f"{_fedbrain_command()} run {installed}/jobs/%i.toml --kit {installed}",
        installed,
        daemon=False,
    )
    return kit


def provision_federation(
    spec: FederationFile, out: Path, *, now: datetime | None = None, kit_root: Path | None = None
) -> Provisioning:
    """Write every kit of ``spec`` under ``out`` (which must not exist or be empty).

    ``kit_root``: where the kits will live on their machines (the systemd units and READMEs
    name it; default: ``out`` itself, for a federation on one machine).
    """
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()):
        raise ProvisioningError(
            f"{out} is not empty; provisioning never overwrites keys. Choose a new folder, or "
            "use `fedbrain provision add-node` to extend this federation"
        )
    kit_root = Path(kit_root).absolute() if kit_root is not None else out
    (out / CA_DIR).mkdir(parents=True)
    ca = issue_ca(f"{spec.name} fedbrain CA", now=now, valid=timedelta(days=spec.valid_days))
    write_private(out / CA_DIR / CA_KEY_FILE, ca.key_pem)
    write_atomically(out / CA_DIR / CA_FILE, ca.certificate_pem)

    window = _window(now, spec.valid_days)
    keys = {op.name: SigningKey.generate() for op in spec.operators}
    operators = TrustedKeys(tuple(TrustedKey(k.public_key(), *window) for k in keys.values()))
    write_atomically(out / OPERATORS_FILE, operators.to_json())
    server = _server_kit(out, spec, now=now, kit_root=kit_root, operators=operators)
    trusted = TrustedKeys.load(server / TRUSTED_KEYS_FILE)
    operator_kits = {
        name: _operator_kit(out, name, key, spec, kit_root=kit_root, trusted=trusted)
        for name, key in keys.items()
    }
    first = operator_kits[spec.operators[0].name] / SIGNING_KEY_FILE
    done = provision_nodes(
        out,
        [NodeToProvision(n.name, n.node_type) for n in spec.nodes],
        operator_key=first,
        trusted_keys=out / OPERATORS_FILE,
        federation=spec.name,
        validity=timedelta(days=spec.valid_days),
        now=now,
    )
    registry_nodes = [
        _node_kit(out, node, federation=spec.name, superlink=spec.superlink, kit_root=kit_root)
        for node in spec.nodes
    ]
    write_atomically(server / ROSTER_FILE, done.roster.read_bytes())
    document: dict[str, object] = {
        "federation": spec.name,
        "superlink": spec.superlink,
        "valid_days": spec.valid_days,
        "kit_root": str(kit_root),
        "operators": [op.name for op in spec.operators],
        "nodes": registry_nodes,
    }
    _save_registry(out, document)
    write_atomically(server / AUTHORIZED_NODES_FILE, _authorized(document))
    return Provisioning(out, server, dict(done.kits), operator_kits)


# --------------------------------------------------------------------------- changes


def _roster_update(
    root: Path, document: dict[str, object], *, now: datetime
) -> tuple[Roster, SigningKey]:
    operators = document.get("operators")
    if not isinstance(operators, list) or not operators:
        raise ProvisioningError(f"{REGISTRY_FILE}: no operator")
    key_path = root / OPERATORS_DIR / str(operators[0]) / SIGNING_KEY_FILE
    try:
        key = SigningKey.from_pem(key_path.read_bytes())
    except OSError:
        raise ProvisioningError(
            f"{key_path}: the first operator's signing key is needed to re-sign the roster"
        ) from None
    trusted = TrustedKeys.load(root / OPERATORS_FILE)
    trusted.check_can_sign(key.public_key(), now)
    roster = verify_roster((root / ROSTER_FILE).read_bytes(), trusted, now=now)
    return roster, key


def _publish(root: Path, roster: Roster, key: SigningKey, document: dict[str, object]) -> bytes:
    envelope = sign_roster(roster, key)
    write_atomically(root / ROSTER_FILE, envelope)
    write_atomically(root / SERVER_DIR / ROSTER_FILE, envelope)
    _save_registry(root, document)
    write_atomically(root / SERVER_DIR / AUTHORIZED_NODES_FILE, _authorized(document))
    return envelope


def add_node(root: Path, spec: NodeSpec, *, now: datetime | None = None) -> Path:
    """Provision one more node: its kit, the re-signed roster (in the root and the server
    kit) and its Flower key in ``authorized-nodes.json``. Other kits are not touched."""
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    root = Path(root).absolute()
    document = _registry(root)
    nodes = _registry_nodes(document)
    if spec.name in {n.get("name") for n in nodes}:
        raise ProvisioningError(f"a node called {spec.name!r} is already provisioned")
    if spec.runtime_port in {n.get("runtime_port") for n in nodes}:
        raise ProvisioningError(
            f"runtime_port {spec.runtime_port} is taken by another node; give --runtime-port"
        )
    roster, key = _roster_update(root, document, now=now)
    kit = root / NODES_DIR / spec.name
    kit.mkdir(parents=True)
    identity = write_identity(kit / IDENTITY_FILE)
    days = int(str(document.get("valid_days", 365)))
    entry = RosterEntry(
        spec.name, NodeType(spec.node_type), identity.public_key, *_window(now, days)
    )
    roster = roster.add(entry, issued_at=max(now, roster.issued_at))
    write_atomically(kit / OPERATORS_FILE, (root / OPERATORS_FILE).read_bytes())
    nodes.append(
        _node_kit(
            root,
            spec,
            federation=roster.federation,
            superlink=str(document.get("superlink", "")),
            kit_root=Path(str(document.get("kit_root", root))),
        )
    )
    document["nodes"] = nodes
    write_atomically(kit / ROSTER_FILE, _publish(root, roster, key, document))
    return kit


def revoke_node(root: Path, name: str, *, now: datetime | None = None) -> None:
    """Revoke a node: the roster marks it revoked from ``now`` (re-signed; in the root and the
    server kit) and its Flower key is marked revoked in ``authorized-nodes.json`` (the next
    ``sync-nodes`` unregisters it from the SuperLink). Its kit and the others are untouched."""
    now = (now or datetime.now(UTC)).replace(microsecond=0)
    root = Path(root).absolute()
    document = _registry(root)
    nodes = _registry_nodes(document)
    match = [n for n in nodes if n.get("name") == name]
    if not match:
        known = ", ".join(str(n.get("name")) for n in nodes)
        raise ProvisioningError(f"no node called {name!r} in this federation (nodes: {known})")
    if match[0].get("revoked_at") is not None:
        raise ProvisioningError(f"node {name!r} was already revoked at {match[0]['revoked_at']}")
    roster, key = _roster_update(root, document, now=now)
    entry = roster.by_name(name)
    roster = roster.revoke(entry.node_id, at=now, issued_at=max(now, roster.issued_at))
    match[0]["revoked_at"] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    document["nodes"] = nodes
    _publish(root, roster, key, document)
