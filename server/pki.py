"""The transport's keys: a federation CA, the SuperLink's TLS certificate, Flower node-auth keys.

What Flower 1.42 expects (read from its installed source):

- ``flower-superlink --ssl-certfile/--ssl-keyfile/--ssl-ca-certfile``: PEM certificate, PEM
  private key, PEM CA certificate. One port serves the Fleet, Control and Runtime APIs over
  HTTPS, and the SuperLink's own ``flower-superexec`` connects to it on 127.0.0.1, so the
  certificate names the server's public names *and* ``localhost``/``127.0.0.1``/``::1``.
- ``flower-supernode --root-certificates``: the CA certificate (PEM) that verifies the SuperLink.
- ``flower-supernode --auth-supernode-private-key``: an **EC private key in OpenSSH format**
  (``load_ssh_private_key``; it must be an ``EllipticCurvePrivateKey``), and
  ``flwr supernode register PUBLIC_KEY``: its public key in OpenSSH format on a NIST curve. The
  SuperLink (``--enable-supernode-auth``) admits only registered keys; registration lives in
  its ``--database`` (``--auth-list-public-keys`` is refused by 1.42).

Keys are generated from the OS CSPRNG (``cryptography``); private keys are written with mode
0600 from the start (:func:`write_private`), never readable by others, not even briefly.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "LOOPBACK_NAMES",
    "NodeAuthKey",
    "TlsIdentity",
    "issue_ca",
    "issue_server_certificate",
    "new_node_auth_key",
    "node_auth_public_key",
    "write_private",
]

LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")
"""Always in the SuperLink's certificate: its own SuperExec connects on loopback."""
_PRIVATE_MODE: Final = 0o600
_TLS_CURVE: Final = ec.SECP256R1()
_NODE_AUTH_CURVE: Final = ec.SECP384R1()  # Flower's docs use P-384 for node auth keys


@dataclass(frozen=True, eq=False, repr=False)
class TlsIdentity:
    """A private key and its certificate (PEM both)."""

    key_pem: bytes
    certificate_pem: bytes

    def __repr__(self) -> str:
        return f"TlsIdentity(subject={self.certificate.subject.rfc4514_string()!r})"

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"expected an EC private key. Found {type(key).__name__}.")
        return key


@dataclass(frozen=True, eq=False, repr=False)
class NodeAuthKey:
    """A SuperNode's Flower authentication key pair, OpenSSH encodings."""

    private_openssh: bytes
    public_openssh: bytes

    def __repr__(self) -> str:
        return f"NodeAuthKey(public={self.public_openssh[:40]!r}...)"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _window(now: datetime, valid: timedelta) -> tuple[datetime, datetime]:
    if now.tzinfo is None:
        raise ValueError("`now` must be timezone-aware (UTC).")
    if valid <= timedelta(0):
        raise ValueError(f"the validity must be positive. Found {valid}.")
    start = now.replace(microsecond=0) - timedelta(minutes=5)  # clock skew between hosts
    return start, now.replace(microsecond=0) + valid


def issue_ca(common_name: str, *, now: datetime, valid: timedelta) -> TlsIdentity:
    """A self-signed CA (EC P-256) that only signs certificates (path length 0)."""
    key = ec.generate_private_key(_TLS_CURVE)
    start, end = _window(now, valid)
    name = _name(common_name)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return TlsIdentity(_key_pem(key), certificate.public_bytes(serialization.Encoding.PEM))


def _san(names: Sequence[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in (*names, *LOOPBACK_NAMES):
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def issue_server_certificate(
    ca: TlsIdentity, names: Sequence[str], *, now: datetime, valid: timedelta
) -> TlsIdentity:
    """The SuperLink's TLS certificate, signed by ``ca``, for ``names`` (host names or IP
    addresses) plus :data:`LOOPBACK_NAMES`, as subject alternative names."""
    if not names:
        raise ValueError("the server certificate needs at least one name (the server's host).")
    key = ec.generate_private_key(_TLS_CURVE)
    start, end = _window(now, valid)
    ca_certificate = ca.certificate
    ca_key = ca.private_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(start, ca_certificate.not_valid_before_utc))
        .not_valid_after(min(end, ca_certificate.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(_san(names)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return TlsIdentity(_key_pem(key), certificate.public_bytes(serialization.Encoding.PEM))


def new_node_auth_key() -> NodeAuthKey:
    """A fresh SuperNode authentication key (EC P-384) in the encodings Flower reads."""
    key = ec.generate_private_key(_NODE_AUTH_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return NodeAuthKey(private, public + b"\n")


def node_auth_public_key(text: bytes) -> bytes:
    """The OpenSSH public key in ``text`` (checked: an EC key on a NIST curve, as Flower
    requires), normalized to one line; ``ValueError`` otherwise."""
    try:
        key = serialization.load_ssh_public_key(text.strip())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not an OpenSSH public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"a node auth key must be an EC key. Found {type(key).__name__}.")
    if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise ValueError(f"a node auth key must be on a NIST curve. Found {key.curve.name}.")
    return (
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )


def write_private(path: Path, data: bytes) -> Path:
    """Write a secret with mode 0600 from the start, atomically; never overwrites: raises
    ``FileExistsError`` if ``path`` exists (a kit's keys are generated once)."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _PRIVATE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path
