"""A node's folder: its identity key file, the signed roster, the operators' keys."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from aggregation.secagg import NodeIdentity
from clients.credentials import (
    IDENTITY_FILE,
    OPERATORS_FILE,
    ROSTER_FILE,
    CredentialsError,
    install_roster,
    load_credentials,
    load_identity,
    write_identity,
)
from manifests.catalog import NodeType
from manifests.keys import SigningKey
from manifests.roster import Roster, RosterEntry, RosterKeyUntrustedError, sign_roster
from tests.manifests.test_roster import NOW, OPERATOR, STRANGER, T0, make_roster, trusted


def member(node: NodeIdentity, name: str = "me") -> RosterEntry:
    return RosterEntry(name, NodeType.ENCODER, node.public_key, T0, T0 + timedelta(days=730))


def make_kit(
    folder: Path,
    *,
    listed: bool = True,
    signer: SigningKey = OPERATOR,
    revoked: bool = False,
) -> NodeIdentity:
    """A node folder as `fedbrain provision` would write it; returns the node's identity."""
    folder.mkdir(parents=True, exist_ok=True)
    node = write_identity(folder / IDENTITY_FILE)
    roster = make_roster(11, 12)
    if listed:
        roster = roster.add(member(node), issued_at=NOW)
    if revoked:
        roster = roster.revoke(node.node_id, at=NOW - timedelta(days=1), issued_at=NOW)
    (folder / ROSTER_FILE).write_bytes(sign_roster(roster, signer))
    (folder / OPERATORS_FILE).write_bytes(trusted().to_json())
    return node


# --------------------------------------------------------------------------- identity key


def test_write_identity_creates_a_0600_pem_that_loads_back(tmp_path: Path) -> None:
    path = tmp_path / IDENTITY_FILE
    written = write_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_identity(path)
    assert (loaded.public_key, loaded.node_id) == (written.public_key, written.node_id)
    assert loaded.sign(b"m") == written.sign(b"m")  # Ed25519 is deterministic: the same key
    assert [p.name for p in tmp_path.iterdir()] == [IDENTITY_FILE]  # no temporary left


def test_write_identity_never_overwrites_an_identity(tmp_path: Path) -> None:
    path = tmp_path / IDENTITY_FILE
    write_identity(path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_identity(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [IDENTITY_FILE]


def test_an_identity_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / IDENTITY_FILE
    write_identity(path)
    path.chmod(0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        load_identity(path)


@pytest.mark.parametrize("kind", ["garbage", "ecdsa"])
def test_an_identity_file_that_is_not_an_ed25519_key_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / IDENTITY_FILE
    if kind == "garbage":
        data = b"not a key"
    else:
        data = generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    path.write_bytes(data)
    path.chmod(0o600)
    with pytest.raises(CredentialsError, match=r"PEM|Ed25519"):
        load_identity(path)


def test_a_missing_identity_is_refused_with_its_path(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match=IDENTITY_FILE):
        load_identity(tmp_path / IDENTITY_FILE)


# --------------------------------------------------------------------------- the node folder


def test_a_provisioned_folder_loads_with_this_nodes_entry(tmp_path: Path) -> None:
    node = make_kit(tmp_path / "kit")
    credentials = load_credentials(tmp_path / "kit", now=NOW)
    assert credentials.node_id == node.node_id
    assert credentials.entry.name == "me" and credentials.entry.node_type is NodeType.ENCODER
    assert node.node_id in credentials.secagg_roster(NOW)
    assert credentials.roster.federation == "lab"
    assert credentials.state_dir == tmp_path / "kit" / "state"


def test_a_roster_not_signed_by_an_operator_is_refused(tmp_path: Path) -> None:
    make_kit(tmp_path, signer=STRANGER)
    with pytest.raises(CredentialsError, match="RosterKeyUntrustedError") as caught:
        load_credentials(tmp_path, now=NOW)
    assert isinstance(caught.value.__cause__, RosterKeyUntrustedError)
    assert ROSTER_FILE in str(caught.value)


def test_a_roster_that_does_not_list_this_node_is_refused(tmp_path: Path) -> None:
    node = make_kit(tmp_path, listed=False)
    with pytest.raises(CredentialsError, match=f"node id {node.node_id}.* is not in the roster"):
        load_credentials(tmp_path, now=NOW)


def test_a_node_revoked_from_the_roster_is_refused(tmp_path: Path) -> None:
    make_kit(tmp_path, revoked=True)
    with pytest.raises(CredentialsError, match=r"not a member now.*revoked at"):
        load_credentials(tmp_path, now=NOW)


def test_the_policys_accepted_operators_restrict_who_may_sign_the_roster(tmp_path: Path) -> None:
    make_kit(tmp_path)
    assert load_credentials(tmp_path, now=NOW, accepted_operators=[OPERATOR.keyid])
    with pytest.raises(CredentialsError, match="not in this file"):
        load_credentials(tmp_path, now=NOW, accepted_operators=[STRANGER.keyid])


@pytest.mark.parametrize("broken", [ROSTER_FILE, OPERATORS_FILE])
def test_a_missing_or_malformed_kit_file_is_refused_with_its_name(
    tmp_path: Path, broken: str
) -> None:
    make_kit(tmp_path)
    (tmp_path / broken).write_bytes(b"{")
    with pytest.raises(CredentialsError, match=broken):
        load_credentials(tmp_path, now=NOW)
    (tmp_path / broken).unlink()
    with pytest.raises(CredentialsError, match=broken):
        load_credentials(tmp_path, now=NOW)


def test_a_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="no such node folder"):
        load_credentials(tmp_path / "absent", now=NOW)


def test_install_roster_accepts_a_newer_roster_and_refuses_an_older_one(tmp_path: Path) -> None:
    node = make_kit(tmp_path)
    held = load_credentials(tmp_path, now=NOW).roster
    newer = held.add(
        RosterEntry("late", NodeType.SENSING, bytes(range(32)), T0, T0 + timedelta(days=9)),
        issued_at=NOW + timedelta(hours=1),
    )
    install_roster(tmp_path, sign_roster(newer, OPERATOR), now=NOW + timedelta(hours=2))
    assert load_credentials(tmp_path, now=NOW + timedelta(hours=2)).roster == newer
    before = (tmp_path / ROSTER_FILE).read_bytes()
    older = Roster.of("lab", NOW - timedelta(days=1), [member(node)])
    with pytest.raises(CredentialsError, match="before the one this node holds"):
        install_roster(tmp_path, sign_roster(older, OPERATOR), now=NOW + timedelta(hours=2))
    with pytest.raises(CredentialsError, match="RosterKeyUntrustedError"):
        install_roster(tmp_path, sign_roster(newer, STRANGER), now=NOW + timedelta(hours=2))
    assert (tmp_path / ROSTER_FILE).read_bytes() == before
