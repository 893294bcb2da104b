"""A node's own configuration: its type, its data folder, faults to inject (no Flower here).

A SuperNode's ``node_config`` (deployment) or the simulation runner (one per partition) gives
each node a :class:`NodeConfig`; :mod:`clients.app` reads it per message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

from clients import protocol
from manifests.catalog import NodeType

__all__ = [
    "SUPPORTED_NODE_TYPES",
    "Fault",
    "FaultInjectedError",
    "NodeConfig",
    "NodeConfigError",
]

SUPPORTED_NODE_TYPES: Final = (NodeType.SENSING, NodeType.ENCODER, NodeType.INFERENCE)
"""Node types that have something to train (inference nodes fine-tune the language model)."""


class NodeConfigError(ValueError):
    """A node configuration that cannot be used; the message says which key and why."""


class FaultInjectedError(RuntimeError):
    """Raised on purpose by a configured :class:`Fault` (tests and simulations)."""


# --------------------------------------------------------------------------- config

_MESSAGE_TYPES: Final = protocol.MESSAGE_TYPES


@dataclass(frozen=True, slots=True)
class Fault:
    """Fail on purpose when handling ``message_type`` in ``server_round`` (None: every round).

    Written ``"<message type>@<round>"`` or ``"<message type>"``, e.g.
    ``"train.secagg_masked@2"``. ``query.node_info`` carries no round: only a round-less
    fault applies to it.
    """

    message_type: str
    server_round: int | None = None

    def __post_init__(self) -> None:
        if self.message_type not in _MESSAGE_TYPES:
            raise NodeConfigError(
                f"fail-on: unknown message type {self.message_type!r}; choose one of "
                f"{', '.join(_MESSAGE_TYPES)}."
            )
        if self.server_round is not None and self.server_round < 0:
            raise NodeConfigError(f"fail-on: the round must be >= 0. Found {self.server_round}.")

    @classmethod
    def parse(cls, text: str) -> Fault:
        """A fault from ``"<message type>[@<round>]"``."""
        kind, at, round_text = text.strip().partition("@")
        if not at:
            return cls(kind)
        try:
            server_round = int(round_text)
        except ValueError:
            raise NodeConfigError(
                f"fail-on: {text.strip()!r} must be <message type>@<round number>."
            ) from None
        return cls(kind, server_round)

    def matches(self, message_type: str, server_round: int | None) -> bool:
        """Whether this fault fires for the message."""
        return self.message_type == message_type and self.server_round in (None, server_round)

    def __str__(self) -> str:
        if self.server_round is None:
            return self.message_type
        return f"{self.message_type}@{self.server_round}"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node: its type, its data folder, a display name and faults to inject.

    ``noop_training``: a protocol drill -- the node answers every message as usual (node info,
    the SecAgg+ stages, evaluation) but skips local training: its update is all zeros and its
    evaluation reports only the example count. For benchmarks of the protocol and for checking
    a deployment end to end without spending compute.

    ``kit``: the node's folder (identity key, signed roster, operators' keys, policy, state;
    :mod:`clients.credentials`); a node without one refuses every job.
    """

    node_type: NodeType
    data_dir: Path
    name: str = ""
    faults: tuple[Fault, ...] = ()
    noop_training: bool = False
    kit: Path | None = None

    def __post_init__(self) -> None:
        try:
            node_type = NodeType(self.node_type)
        except ValueError:
            raise NodeConfigError(
                f"node-type: unknown node type {self.node_type!r}; a training node is one of "
                f"{', '.join(SUPPORTED_NODE_TYPES)}."
            ) from None
        if node_type not in SUPPORTED_NODE_TYPES:
            raise NodeConfigError(
                f"node-type: {node_type} nodes have nothing to train in fedbrain; a training "
                f"node is one of {', '.join(SUPPORTED_NODE_TYPES)}."
            )
        object.__setattr__(self, "node_type", node_type)
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "faults", tuple(self.faults))
        if self.kit is not None:
            object.__setattr__(self, "kit", Path(self.kit))

    @classmethod
    def from_flower(cls, node_config: Mapping[str, str | int | float | bool]) -> NodeConfig:
        """Read a SuperNode's ``node_config``: ``node-type``, ``data-dir``, optional ``name``,
        ``fail-on`` (comma-separated faults, e.g. ``"train.secagg_masked@2"``),
        ``noop-training`` (bool) and ``kit`` (the node's folder, see :class:`NodeConfig`)."""
        problems: list[str] = []

        def text(key: str, *, required: bool) -> str:
            value = node_config.get(key)
            if value is None:
                if required:
                    problems.append(f"{key}: is required (set it in the SuperNode's node config).")
                return ""
            if not isinstance(value, str) or (required and not value.strip()):
                problems.append(f"{key}: must be non-empty text. Found {value!r}.")
                return ""
            return value.strip()

        node_type = text("node-type", required=True)
        data_dir = text("data-dir", required=True)
        name = text("name", required=False)
        kit = text("kit", required=False)
        faults: list[Fault] = []
        for item in text("fail-on", required=False).split(","):
            if item.strip():
                try:
                    faults.append(Fault.parse(item))
                except NodeConfigError as error:
                    problems.append(str(error))
        noop = node_config.get("noop-training", False)
        if not isinstance(noop, bool):
            problems.append(f"noop-training: must be true or false. Found {noop!r}.")
        if not problems:
            try:
                return cls(
                    cast(NodeType, node_type),
                    Path(data_dir).expanduser(),
                    name,
                    tuple(faults),
                    noop_training=bool(noop),
                    kit=Path(kit).expanduser() if kit else None,
                )
            except NodeConfigError as error:
                problems.append(str(error))
        raise NodeConfigError("Invalid node config: " + " ".join(problems))
