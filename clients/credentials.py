"""What a node holds on disk to defend itself: its identity, the roster, the operators' keys.

One folder per node (the *startup kit* that ``fedbrain provision`` writes; the node adds
``state/`` itself)::

    <node>/
      identity.pem       the node's long-term Ed25519 identity key, PEM PKCS#8, mode 0600;
                         it never leaves the node (its public key is in the roster)
      roster.dsse.json   the federation roster, a DSSE envelope signed by an operator key
                         (manifests.roster)
      operators.json     the operators' trusted keys (manifests.keys.TrustedKeys format)
      policy.toml        the node's own privacy policy (clients.policy; optional: absent
                         means the safe defaults)
      state/             node-local state: the privacy budget and the SecAgg+ participation
                         log (clients.policy.BudgetStore / ParticipationStore)

    and, in a deployment kit (``fedbrain provision``; ``fedbrain node start`` reads them):

      node.toml          the node's name and type, its data folder, the SuperLink's address
                         and the local port of its ClientApp API
      ca.crt.pem         the federation CA that verifies the SuperLink's TLS certificate
      flower-auth.key    the SuperNode's Flower authentication key (EC, OpenSSH), mode 0600;
      flower-auth.pub    its public half, registered with the SuperLink

Nothing here comes from the server. :func:`load_credentials` refuses a kit whose roster is not
signed by a trusted operator key or does not list this node (valid now), with a message that
names the file and the reason.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregation.secagg import NodeIdentity
from aggregation.secagg import Roster as SecAggRoster
from manifests.atomic import write_atomically
from manifests.keys import TrustedKeys, format_timestamp
from manifests.roster import Roster, RosterEntry, RosterError, verify_roster

__all__ = [
    "AUTH_KEY_FILE",
    "AUTH_PUBLIC_KEY_FILE",
    "CA_FILE",
    "IDENTITY_FILE",
    "NODE_CONFIG_FILE",
    "OPERATORS_FILE",
    "POLICY_FILE",
    "ROSTER_FILE",
    "STATE_DIR",
    "CredentialsError",
    "NodeCredentials",
    "install_roster",
    "load_credentials",
    "load_identity",
    "load_operators",
    "write_identity",
]

IDENTITY_FILE: Final = "identity.pem"
NODE_CONFIG_FILE: Final = "node.toml"
CA_FILE: Final = "ca.crt.pem"
AUTH_KEY_FILE: Final = "flower-auth.key"
AUTH_PUBLIC_KEY_FILE: Final = "flower-auth.pub"
ROSTER_FILE: Final = "roster.dsse.json"
OPERATORS_FILE: Final = "operators.json"
POLICY_FILE: Final = "policy.toml"
STATE_DIR: Final = "state"
_PRIVATE_MODE: Final = 0o600


class CredentialsError(ValueError):
    """A node folder that the node must not run with; the message names the file and why."""


# --------------------------------------------------------------------------- the identity key


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_identity(path: Path) -> NodeIdentity:
    """Generate a node identity (OS CSPRNG) and write its private key to ``path``.

    PEM PKCS#8, unencrypted, mode 0600 from the start (never readable by others, not even
    briefly), written atomically: a temporary file in the same folder, fsynced, then linked to
    ``path`` -- which fails with ``FileExistsError`` if ``path`` exists, so an identity is never
    overwritten (its node id is in the roster).
    """
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _PRIVATE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return NodeIdentity(key)


def load_identity(path: Path) -> NodeIdentity:
    """The identity in ``path``; :class:`CredentialsError` if it is missing, readable by group
    or others (``chmod 600`` it), or not an unencrypted PEM Ed25519 private key."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the identity key: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CredentialsError(f"{path}: the identity key must be a regular file")
    if mode & 0o077:
        raise CredentialsError(
            f"{path}: the identity key is accessible to group or others (mode "
            f"{stat.S_IMODE(mode):04o}); run chmod 600 on it"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CredentialsError(
            f"{path}: not an unencrypted PEM PKCS#8 private key ({exc})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CredentialsError(
            f"{path}: the identity key must be Ed25519. Found {type(key).__name__}."
        )
    return NodeIdentity(key)


# --------------------------------------------------------------------------- operators, roster


def load_operators(path: Path, *, accepted: Iterable[str] | None = None) -> TrustedKeys:
    """The operators' trusted keys in ``path``; with ``accepted`` (key ids, e.g. from the
    node's policy) only those, each of which must be in the file."""
    path = Path(path)
    try:
        operators = TrustedKeys.load(path)
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the operators' keys: {exc.strerror}") from None
    except ValueError as exc:
        raise CredentialsError(f"{path}: {exc}") from None
    if accepted is None:
        return operators
    wanted = set(accepted)
    unknown = sorted(wanted - {k.keyid for k in operators})
    if unknown:
        raise CredentialsError(
            f"{path}: the node's policy accepts operator keys that are not in this file: "
            f"{', '.join(unknown)}"
        )
    return TrustedKeys(tuple(k for k in operators if k.keyid in wanted))


def _read_roster(path: Path, operators: TrustedKeys, *, now: datetime) -> Roster:
    try:
        envelope = path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the roster: {exc.strerror}") from None
    try:
        return verify_roster(envelope, operators, now=now)
    except RosterError as exc:
        raise CredentialsError(
            f"{path}: refused ({type(exc).__name__}): {exc}. The roster must be signed by an "
            "operator key in operators.json."
        ) from exc


def install_roster(folder: Path, envelope: bytes, *, now: datetime) -> Roster:
    """Install ``envelope`` as the kit's roster after verifying it against the kit's operators
    and the roster it holds, if any (same federation, not older); atomic."""
    folder = Path(folder)
    operators = load_operators(folder / OPERATORS_FILE)
    current = folder / ROSTER_FILE
    previous = _read_roster(current, operators, now=now) if current.exists() else None
    try:
        roster = verify_roster(envelope, operators, now=now, previous=previous)
    except RosterError as exc:
        raise CredentialsError(f"new roster refused ({type(exc).__name__}): {exc}") from exc
    write_atomically(folder / ROSTER_FILE, envelope)
    return roster


# --------------------------------------------------------------------------- the whole kit


@dataclass(frozen=True)
class NodeCredentials:
    """A node's identity, the verified roster that lists it, and the operators it trusts."""

    identity: NodeIdentity
    roster: Roster
    operators: TrustedKeys
    folder: Path | None = None

    @property
    def node_id(self) -> int:
        return self.identity.node_id

    @property
    def entry(self) -> RosterEntry:
        """This node's roster entry."""
        return self.roster.entry(self.identity.node_id)

    def secagg_roster(self, at: datetime) -> SecAggRoster:
        """The members valid at ``at``, for SecAgg+ sessions."""
        return self.roster.secagg_roster(at)

    @property
    def state_dir(self) -> Path:
        """``<folder>/state`` (created on first use by the stores)."""
        if self.folder is None:
            raise ValueError("these credentials were not loaded from a folder")
        return self.folder / STATE_DIR


def load_credentials(
    folder: Path, *, now: datetime, accepted_operators: Iterable[str] | None = None
) -> NodeCredentials:
    """Load and check a node folder (layout in the module docstring).

    Refuses (:class:`CredentialsError`): a missing folder or file, an identity key readable by
    others, a malformed operators file, a roster not signed by an (accepted) operator key or
    not valid at ``now``, and a roster that does not list this node's identity as a member
    valid at ``now``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CredentialsError(f"{folder}: no such node folder")
    identity = load_identity(folder / IDENTITY_FILE)
    operators = load_operators(folder / OPERATORS_FILE, accepted=accepted_operators)
    roster_path = folder / ROSTER_FILE
    roster = _read_roster(roster_path, operators, now=now)
    try:
        entry = roster.entry(identity.node_id)
    except KeyError:
        raise CredentialsError(
            f"{roster_path}: this node's identity (node id {identity.node_id}, key "
            f"{identity.public_key.hex()}) is not in the roster of federation "
            f"{roster.federation!r}"
        ) from None
    if entry.identity_key != identity.public_key:
        raise CredentialsError(f"{roster_path}: the roster binds this node id to another key")
    if not entry.valid_at(now):
        window = f"{format_timestamp(entry.not_before)} to {format_timestamp(entry.not_after)}"
        revoked = (
            f", revoked at {format_timestamp(entry.revoked_at)}"
            if entry.revoked_at is not None
            else ""
        )
        raise CredentialsError(
            f"{roster_path}: this node ({entry.name}) is not a member now "
            f"({format_timestamp(now)}): valid {window}{revoked}"
        )
    return NodeCredentials(identity, roster, operators, folder)
