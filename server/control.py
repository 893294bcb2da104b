"""The SuperLink's Control API, as fedbrain uses it (Flower 1.42, over HTTPS).

What ``flwr supernode register|unregister|ls``, ``flwr log`` and ``flwr ls`` do, in process
(each ``flwr`` call is a new Python process of 1-2 CPU-seconds, which an edge server and CI
can spare less than a connection): node registration for Flower's node authentication
(:func:`sync_nodes`), a run's status and its log stream.

The Control API of Flower's open-source SuperLink does not authenticate its callers (account
authentication is a Flower Enterprise feature): whoever reaches the SuperLink's port can call
it. fedbrain does not rely on it for membership -- the operator-signed roster is what admits a
node to a round -- and :func:`sync_nodes` (run by every ``fedbrain server start``) removes any
registration that is not in the server kit's ``authorized-nodes.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Self

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.proto.control_pb2 import (
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StreamLogsRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

__all__ = [
    "AuthorizedNode",
    "ControlClient",
    "ControlError",
    "FlowerRun",
    "RegisteredNode",
    "SyncReport",
    "load_authorized_nodes",
    "sync_nodes",
]

_COMPONENT: Final = "flwr CLI"  # the Control API's clients identify as the Flower CLI


class ControlError(RuntimeError):
    """The SuperLink's Control API could not be reached or refused a request."""


@dataclass(frozen=True)
class RegisteredNode:
    node_id: int
    name: str
    status: str
    public_key_der: bytes


@dataclass(frozen=True)
class AuthorizedNode:
    """An entry of the server kit's ``authorized-nodes.json``."""

    name: str
    public_key_der: bytes
    revoked: bool


@dataclass(frozen=True)
class FlowerRun:
    run_id: int
    status: str
    sub_status: str
    details: str

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def label(self) -> str:
        """``finished:completed`` and the like, as ``flwr ls`` shows it."""
        return f"{self.status}:{self.sub_status}" if self.sub_status else self.status


@dataclass(frozen=True)
class SyncReport:
    registered: tuple[str, ...]
    unregistered: tuple[str, ...]
    kept: tuple[str, ...]


def _der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _der_from_pem(data: bytes) -> bytes:
    key = serialization.load_pem_public_key(data)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an EC public key")
    return _der(key)


def load_authorized_nodes(path: Path) -> list[AuthorizedNode]:
    """Read ``authorized-nodes.json`` (written by :mod:`server.startup_kits`)."""
    try:
        document = json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the authorized nodes: {exc}") from None
    if not isinstance(document, list):
        raise ValueError(f"{path}: must hold a JSON list")
    nodes: list[AuthorizedNode] = []
    for index, entry in enumerate(document):
        if not isinstance(entry, dict) or not isinstance(entry.get("public_key"), str):
            raise ValueError(f"{path}: entry #{index + 1} needs a name and a public_key")
        try:
            key = serialization.load_ssh_public_key(entry["public_key"].encode())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: entry #{index + 1}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError(f"{path}: entry #{index + 1}: not an EC key")
        nodes.append(
            AuthorizedNode(str(entry.get("name", "")), _der(key), bool(entry.get("revoked")))
        )
    return nodes


class ControlClient:
    """A connection to a SuperLink's Control API (``address`` is ``host:port``)."""

    def __init__(self, address: str, *, root_certificates: Path | None, insecure: bool) -> None:
        if insecure == (root_certificates is not None):
            raise ValueError("give root certificates (TLS) or insecure=True, not both or neither")
        self.address = address
        self._client = ControlHttpClient.from_server_address(
            address,
            insecure=insecure,
            root_certificates=None if root_certificates is None else str(root_certificates),
            interceptors=[RuntimeVersionHttpInterceptor(component_name=_COMPONENT)],
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, what: str, exc: Exception) -> ControlError:
        return ControlError(f"the SuperLink at {self.address} could not {what}: {exc}")

    def nodes(self) -> list[RegisteredNode]:
        try:
            response = self._client.ListNodes(ListNodesRequest())
        except Exception as exc:
            raise self._fail("list the nodes", exc) from None
        found = []
        for info in response.nodes_info:
            try:
                der = _der_from_pem(info.public_key) if info.public_key else b""
            except ValueError:
                der = b""
            found.append(RegisteredNode(int(info.node_id), info.name, info.status, der))
        return found

    def register(self, public_key_der: bytes, name: str) -> int:
        key = serialization.load_der_public_key(public_key_der)
        pem = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        try:
            response = self._client.RegisterNode(RegisterNodeRequest(public_key=pem, name=name))
        except Exception as exc:
            raise self._fail(f"register node {name!r}", exc) from None
        return int(response.node_id)

    def unregister(self, node_id: int) -> None:
        try:
            self._client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))
        except Exception as exc:
            raise self._fail(f"unregister node {node_id}", exc) from None

    def run(self, run_id: int) -> FlowerRun:
        """Flower's status of a run (``flwr ls --run-id``)."""
        try:
            response = self._client.ListRuns(ListRunsRequest(run_id=run_id))
        except Exception as exc:
            raise self._fail(f"report run {run_id}", exc) from None
        if run_id not in response.run_dict:
            raise ControlError(f"the SuperLink at {self.address} has no run {run_id}")
        status = response.run_dict[run_id].status
        return FlowerRun(run_id, status.status, status.sub_status, status.details)

    def logs(self, run_id: int, *, after: float = 0.0) -> Iterator[str]:
        """The run's log output as it arrives, until the run finishes (``flwr log``)."""
        try:
            for response in self._client.StreamLogs(
                StreamLogsRequest(run_id=run_id, after_timestamp=after)
            ):
                yield response.log_output
        except Exception as exc:
            raise self._fail(f"stream the logs of run {run_id}", exc) from None


def sync_nodes(client: ControlClient, authorized: Sequence[AuthorizedNode]) -> SyncReport:
    """Make the SuperLink's node registrations those of ``authorized``: register every
    unrevoked key that is missing, unregister every registration whose key is revoked or not
    listed (a key registered by someone else through the open Control API included)."""
    wanted = {n.public_key_der: n for n in authorized if not n.revoked}
    registered, unregistered, kept = [], [], []
    present: set[bytes] = set()
    for node in client.nodes():
        if node.status == "unregistered":
            continue
        if node.public_key_der in wanted:
            present.add(node.public_key_der)
            kept.append(wanted[node.public_key_der].name)
            continue
        client.unregister(node.node_id)
        unregistered.append(node.name or str(node.node_id))
    for key, entry in wanted.items():
        if key not in present:
            client.register(key, entry.name)
            registered.append(entry.name)
    return SyncReport(tuple(registered), tuple(unregistered), tuple(kept))
