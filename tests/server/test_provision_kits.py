"""``fedbrain provision``: the federation file, the startup kits and their secrets, add/revoke."""

from __future__ import annotations

import hashlib
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from typer.testing import CliRunner

from clients.credentials import CredentialsError, load_credentials
from manifests.keys import TrustedKeys
from server.cli import app
from server.control import load_authorized_nodes
from server.federation_file import (
    FederationFileError,
    NodeSpec,
    load_federation_file,
    parse_federation,
)
from server.startup_kits import add_node, provision_federation, revoke_node

runner = CliRunner()

FEDERATION = """\
[federation]
name = "clinic-net"
superlink = "fl.example.org:9093"
server_names = ["10.0.0.5"]

[[operators]]
name = "alice"

[[operators]]
name = "bob"

[[nodes]]
name = "ward-1"
node_type = "sensing"
data = "/srv/data/ward-1"

[[nodes]]
name = "ward-2"
node_type = "sensing"
data = "/srv/data/ward-2"
"""


def _write(tmp_path: Path, text: str = FEDERATION) -> Path:
    path = tmp_path / "federation.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("provision")
    spec = load_federation_file(_write(root))
    provision_federation(spec, root / "out")
    return root / "out"


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _digests(folder: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(b).hexdigest() for p, b in _files(folder).items()}


# ------------------------------------------------------------------ the federation file


def test_federation_file_reads_defaults_and_names_for_the_certificate(tmp_path: Path) -> None:
    spec = load_federation_file(_write(tmp_path))
    assert (spec.name, spec.host, spec.port, spec.valid_days) == (
        "clinic-net",
        "fl.example.org",
        9093,
        365,
    )
    assert spec.certificate_names == ("fl.example.org", "10.0.0.5")
    assert [n.runtime_port for n in spec.nodes] == [9094, 9095]
    assert [o.name for o in spec.operators] == ["alice", "bob"]


def test_federation_file_reports_every_problem_at_once(tmp_path: Path) -> None:
    bad = """\
colour = "blue"
[federation]
name = "bad name"
superlink = "no-port"
valid_days = 0

[[nodes]]
name = "n1"
node_type = "decision"
data = "/d"

[[nodes]]
name = "n1"
node_type = "sensing"
data = ""
runtime_port = 80
"""
    with pytest.raises(FederationFileError) as caught:
        load_federation_file(_write(tmp_path, bad))
    text = "\n".join(caught.value.problems)
    for expected in (
        "unknown key 'colour'",
        "name 'bad name' must start with a letter",
        "superlink must be host:port",
        "valid_days must be a whole number from 1 to 3650. Found 0.",
        "[[operators]]: at least one is required",
        "node_type 'decision' has nothing to train",
        "data must be non-empty text",
        "runtime_port must be a whole number from 1024 to 65535. Found 80.",
    ):
        assert expected in text, text


def test_duplicate_names_and_ports_are_refused() -> None:
    document = {
        "federation": {"name": "f", "superlink": "127.0.0.1:9093"},
        "operators": [{"name": "a"}],
        "nodes": [
            {"name": "n", "node_type": "sensing", "data": "/d", "runtime_port": 9100},
            {"name": "n", "node_type": "sensing", "data": "/d", "runtime_port": 9100},
        ],
    }
    with pytest.raises(FederationFileError, match="node name 'n' appears more than once"):
        parse_federation(document, source="x", base=Path("."))


def test_bad_federation_file_exits_two_with_every_problem_and_writes_nothing(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, '[federation]\nname = "x"\n')
    result = runner.invoke(app, ["provision", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "superlink is required" in result.stderr
    assert "[[nodes]]: at least one is required" in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ kits and their secrets


def test_every_private_key_is_0600_and_lives_in_exactly_one_kit(kits: Path) -> None:
    private = [
        kits / "ca" / "ca.key.pem",
        kits / "server" / "superlink.key.pem",
        kits / "server" / "artifact-signing-key.pem",
        kits / "operators" / "alice" / "signing-key.pem",
        kits / "operators" / "bob" / "signing-key.pem",
        *(
            kits / "nodes" / n / f
            for n in ("ward-1", "ward-2")
            for f in ("identity.pem", "flower-auth.key")
        ),
    ]
    everything = _files(kits)
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        secret = everything[path]
        holders = [p for p, content in everything.items() if secret in content]
        assert holders == [path], f"{path} also in {holders}"


def test_each_kit_has_a_three_line_readme_and_a_systemd_unit(kits: Path) -> None:
    for kit, unit in (
        (kits / "server", "fedbrain-server.service"),
        (kits / "nodes" / "ward-1", "fedbrain-node-ward-1.service"),
        (kits / "operators" / "alice", "fedbrain-run@.service"),
    ):
        assert len((kit / "README").read_text().splitlines()) == 3
        text = (kit / unit).read_text()
        assert f"WorkingDirectory={kit}" in text
        assert "ExecStart=" in text and "[Install]" in text


def test_the_superlink_certificate_is_issued_by_the_ca_for_its_names_and_loopback(
    kits: Path,
) -> None:
    ca = x509.load_pem_x509_certificate((kits / "ca" / "ca.crt.pem").read_bytes())
    cert = x509.load_pem_x509_certificate((kits / "server" / "superlink.crt.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    addresses = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert names == {"fl.example.org", "localhost"}
    assert addresses == {"10.0.0.5", "127.0.0.1", "::1"}
    for kit in ("server", "nodes/ward-1", "operators/alice"):
        assert (kits / kit / "ca.crt.pem").read_bytes() == (kits / "ca" / "ca.crt.pem").read_bytes()


def test_node_kits_hold_flower_auth_keys_in_the_format_flower_loads(kits: Path) -> None:
    key = load_ssh_private_key((kits / "nodes" / "ward-1" / "flower-auth.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    authorized = load_authorized_nodes(kits / "server" / "authorized-nodes.json")
    assert [(a.name, a.revoked) for a in authorized] == [("ward-1", False), ("ward-2", False)]


def test_nodes_trust_the_operators_only_and_the_server_signs_artifacts_with_its_own_key(
    kits: Path,
) -> None:
    node = TrustedKeys.load(kits / "nodes" / "ward-1" / "operators.json")
    server = TrustedKeys.load(kits / "server" / "trusted-keys.json")
    operator = TrustedKeys.load(kits / "operators" / "alice" / "trusted-keys.json")
    assert len(node) == 2  # alice and bob
    artifact = {k.keyid for k in server} - {k.keyid for k in node}
    assert len(artifact) == 1  # the server's artifact key: verifiers trust it, nodes do not
    assert {k.keyid for k in operator} == {k.keyid for k in server}
    credentials = load_credentials(kits / "nodes" / "ward-1", now=datetime.now(UTC))
    assert credentials.roster.federation == "clinic-net"
    assert credentials.entry.name == "ward-1"


def test_provisioning_never_writes_into_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["provision", str(_write(tmp_path)), "--out", str(out)])
    assert result.exit_code == 2
    assert "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------ add-node, revoke-node


def _provisioned(tmp_path: Path) -> Path:
    provision_federation(load_federation_file(_write(tmp_path)), tmp_path / "out")
    return tmp_path / "out"


def test_add_node_writes_its_kit_and_the_roster_and_touches_no_other_kit(tmp_path: Path) -> None:
    root = _provisioned(tmp_path)
    others = {kit: _digests(root / kit) for kit in ("nodes/ward-1", "nodes/ward-2", "operators")}
    result = runner.invoke(
        app,
        [
            "provision", "add-node", str(root), "--name", "ward-3",
            "--node-type", "sensing", "--data", "/srv/data/ward-3",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for kit, digests in others.items():
        assert _digests(root / kit) == digests, kit
    now = datetime.now(UTC)
    new = load_credentials(root / "nodes" / "ward-3", now=now)
    assert [e.name for e in new.roster.entries] == ["ward-1", "ward-2", "ward-3"]
    assert (root / "server" / "roster.dsse.json").read_bytes() == (
        root / "roster.dsse.json"
    ).read_bytes()
    node_toml = (root / "nodes" / "ward-3" / "node.toml").read_text()
    assert "runtime_port = 9096" in node_toml
    authorized = load_authorized_nodes(root / "server" / "authorized-nodes.json")
    assert [a.name for a in authorized] == ["ward-1", "ward-2", "ward-3"]
    # an old node installs the new roster (signed by the operator, newer or as new)
    install = runner.invoke(
        app,
        [
            "node",
            "roster",
            "install",
            str(root / "roster.dsse.json"),
            "--kit",
            str(root / "nodes" / "ward-1"),
        ],
    )
    assert install.exit_code == 0, install.output
    assert "3 member(s)" in install.stdout


def test_add_node_refuses_a_name_already_provisioned(tmp_path: Path) -> None:
    root = _provisioned(tmp_path)
    before = _digests(root)
    spec = NodeSpec("ward-1", "sensing", "/d", 9200)
    with pytest.raises(ValueError, match="already provisioned"):
        add_node(root, spec)
    assert _digests(root) == before


def test_revoke_node_revokes_it_in_the_roster_and_for_the_superlink(tmp_path: Path) -> None:
    root = _provisioned(tmp_path)
    kits_before = _digests(root / "nodes")
    result = runner.invoke(app, ["provision", "revoke-node", str(root), "ward-2"])
    assert result.exit_code == 0, result.output
    assert _digests(root / "nodes") == kits_before  # no kit touched
    authorized = load_authorized_nodes(root / "server" / "authorized-nodes.json")
    assert [(a.name, a.revoked) for a in authorized] == [("ward-1", False), ("ward-2", True)]
    # with the new roster installed, the revoked node's kit no longer loads
    revoked = root / "nodes" / "ward-2"
    (revoked / "roster.dsse.json").write_bytes((root / "roster.dsse.json").read_bytes())
    later = datetime.now(UTC) + timedelta(seconds=2)
    with pytest.raises(CredentialsError, match="not a member now"):
        load_credentials(revoked, now=later)
    again = runner.invoke(app, ["provision", "revoke-node", str(root), "ward-2"])
    assert again.exit_code == 2 and "already revoked" in again.stderr
    unknown = runner.invoke(app, ["provision", "revoke-node", str(root), "ward-9"])
    assert unknown.exit_code == 2 and "no node called 'ward-9'" in unknown.stderr


def test_revoke_node_in_a_folder_that_was_not_provisioned_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a provisioned federation"):
        revoke_node(tmp_path, "x")


def test_the_registry_records_what_was_provisioned(kits: Path) -> None:
    registry = json.loads((kits / "provisioning.json").read_text())
    assert registry["federation"] == "clinic-net"
    assert [n["name"] for n in registry["nodes"]] == ["ward-1", "ward-2"]
    assert all(n["auth_public_key"].startswith("ecdsa-sha2-nistp384 ") for n in registry["nodes"])
