"""The federation file that ``fedbrain provision`` reads: who takes part, and where.

A small TOML file (every problem is reported at once, with where it is and how to fix it)::

    [federation]
    name = "clinic-net"                 # the roster's federation name
    superlink = "fl.example.org:9093"   # host:port that nodes and operators connect to
    server_names = ["10.0.0.5"]         # optional: more names/IPs for the TLS certificate
    listen = "0.0.0.0"                  # optional: the SuperLink's listen address (0.0.0.0)
    valid_days = 365                    # optional: certificates, roster entries, keys (365)

    [[operators]]                       # at least one; the first signs the roster
    name = "alice"

    [[nodes]]                           # at least one
    name = "ward-3"                     # unique: letters, digits, '.', '_', '-'
    node_type = "sensing"               # sensing | encoder | inference
    data = "/var/lib/fedbrain/data"     # the node's data folder, on the node's machine
    runtime_port = 9095                 # optional: the node's local ClientApp port (9094 + i)
    policy = "policies/ward-3.toml"     # optional: its policy (relative to this file);
                                        # default: the node's safe defaults

The SuperLink's certificate names the host of ``superlink``, every ``server_names`` entry, and
``localhost``/``127.0.0.1``/``::1`` (:mod:`server.pki`).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from manifests.catalog import NodeType

__all__ = [
    "DEFAULT_RUNTIME_PORT",
    "TRAINING_NODE_TYPES",
    "FederationFile",
    "FederationFileError",
    "NodeSpec",
    "OperatorSpec",
    "load_federation_file",
    "parse_address",
]

DEFAULT_RUNTIME_PORT: Final = 9094
TRAINING_NODE_TYPES: Final = ("sensing", "encoder", "inference")
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HOST: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_FEDERATION_KEYS: Final = frozenset({"name", "superlink", "server_names", "listen", "valid_days"})
_NODE_KEYS: Final = frozenset({"name", "node_type", "data", "runtime_port", "policy"})
_OPERATOR_KEYS: Final = frozenset({"name"})
_TOP_KEYS: Final = frozenset({"federation", "operators", "nodes"})


class FederationFileError(ValueError):
    """An unusable federation file; ``problems`` holds one line per problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True)
class NodeSpec:
    name: str
    node_type: str
    data: str
    runtime_port: int
    policy: Path | None = None


@dataclass(frozen=True)
class OperatorSpec:
    name: str


@dataclass(frozen=True)
class FederationFile:
    """A validated federation file."""

    name: str
    superlink: str
    host: str
    port: int
    server_names: tuple[str, ...]
    listen: str
    valid_days: int
    operators: tuple[OperatorSpec, ...]
    nodes: tuple[NodeSpec, ...]

    @property
    def certificate_names(self) -> tuple[str, ...]:
        """The names the SuperLink's certificate must carry (its host first)."""
        names = [self.host, *self.server_names]
        return tuple(dict.fromkeys(names))


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOST.match(host)) and ".." not in host
    return True


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) -> (host, port); ``ValueError`` otherwise."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"write an IPv6 address as [addr]:port. Found {text!r}.")
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise ValueError(f"must be host:port, e.g. fl.example.org:9093. Found {text!r}.")
    if not host or not _valid_host(host):
        raise ValueError(f"{host!r} is not a host name or IP address.")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535. Found {port_text!r}.")
    return host, int(port_text)


def _unknown(where: str, table: Mapping[str, object], known: frozenset[str]) -> list[str]:
    return [
        f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})"
        for key in sorted(set(table) - known)
    ]


def _text(where: str, table: Mapping[str, object], key: str, problems: list[str]) -> str:
    value = table.get(key)
    if value is None:
        problems.append(f"{where}: {key} is required")
        return ""
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where}: {key} must be non-empty text. Found {value!r}.")
        return ""
    return value.strip()


def _name(where: str, table: Mapping[str, object], problems: list[str]) -> str:
    name = _text(where, table, "name", problems)
    if name and not _NAME.match(name):
        problems.append(
            f"{where}: name {name!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '_' and '-' (at most 64 characters)"
        )
        return ""
    return name


def _integer(
    where: str, value: object, key: str, problems: list[str], *, low: int, high: int
) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        problems.append(
            f"{where}: {key} must be a whole number from {low} to {high}. Found {value!r}."
        )
        return None
    return value


@dataclass
class _FederationTable:
    name: str = ""
    superlink: str = ""
    host: str = ""
    port: int = 0
    server_names: tuple[str, ...] = ()
    listen: str = "0.0.0.0"  # noqa: S104 -- the SuperLink serves the network
    valid_days: int = 365


def _federation(table: object, problems: list[str]) -> _FederationTable:
    where = "[federation]"
    out = _FederationTable()
    if not isinstance(table, dict):
        problems.append(f"{where}: the table is required (name, superlink)")
        return out
    problems.extend(_unknown(where, table, _FEDERATION_KEYS))
    out.name = _name(where, table, problems)
    out.superlink = _text(where, table, "superlink", problems)
    if out.superlink:
        try:
            out.host, out.port = parse_address(out.superlink)
        except ValueError as exc:
            problems.append(f"{where}: superlink {exc}")
    names = table.get("server_names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        problems.append(f"{where}: server_names must be a list of host names or IP addresses")
        names = []
    for name in names:
        if not _valid_host(name):
            problems.append(f"{where}: server_names: {name!r} is not a host name or IP address")
    out.server_names = tuple(names)
    listen = table.get("listen", out.listen)
    if not isinstance(listen, str) or not _valid_host(listen):
        problems.append(f"{where}: listen must be a host or IP address. Found {listen!r}.")
    else:
        out.listen = listen
    days = _integer(where, table.get("valid_days", 365), "valid_days", problems, low=1, high=3650)
    out.valid_days = days if days is not None else out.valid_days
    return out


def _list_of_tables(document: Mapping[str, object], key: str, problems: list[str]) -> list[object]:
    value = document.get(key)
    if value is None:
        problems.append(f"[[{key}]]: at least one is required")
        return []
    if not isinstance(value, list) or not value:
        problems.append(f"[[{key}]]: must be a non-empty array of tables")
        return []
    return value


def _nodes(items: list[object], base: Path, problems: list[str]) -> tuple[NodeSpec, ...]:
    nodes: list[NodeSpec] = []
    for index, item in enumerate(items):
        where = f"[[nodes]] #{index + 1}"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be a table")
            continue
        problems.extend(_unknown(where, item, _NODE_KEYS))
        name = _name(where, item, problems)
        where = f"[[nodes]] {name!r}" if name else where
        node_type = _text(where, item, "node_type", problems)
        if node_type and node_type not in TRAINING_NODE_TYPES:
            problems.append(
                f"{where}: node_type {node_type!r} has nothing to train; use one of "
                f"{', '.join(TRAINING_NODE_TYPES)}"
            )
        data = _text(where, item, "data", problems)
        port = _integer(
            where,
            item.get("runtime_port", DEFAULT_RUNTIME_PORT + index),
            "runtime_port",
            problems,
            low=1024,
            high=65535,
        )
        policy: Path | None = None
        if "policy" in item:
            text = _text(where, item, "policy", problems)
            if text:
                policy = (base / text).expanduser()
                if not policy.is_file():
                    problems.append(f"{where}: policy file {policy} does not exist")
        if name and node_type in TRAINING_NODE_TYPES and data and port is not None:
            nodes.append(NodeSpec(name, NodeType(node_type).value, data, port, policy))
    return tuple(nodes)


def _duplicates(what: str, values: list[str], problems: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            problems.append(f"{what} {value!r} appears more than once")
        seen.add(value)


def parse_federation(document: Mapping[str, object], *, source: str, base: Path) -> FederationFile:
    """A :class:`FederationFile` from parsed TOML (``base``: where relative paths start)."""
    problems = _unknown("the file", document, _TOP_KEYS)
    federation = _federation(document.get("federation"), problems)
    operators: list[OperatorSpec] = []
    for index, item in enumerate(_list_of_tables(document, "operators", problems)):
        where = f"[[operators]] #{index + 1}"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be a table")
            continue
        problems.extend(_unknown(where, item, _OPERATOR_KEYS))
        name = _name(where, item, problems)
        if name:
            operators.append(OperatorSpec(name))
    nodes = _nodes(_list_of_tables(document, "nodes", problems), base, problems)
    _duplicates("operator name", [o.name for o in operators], problems)
    _duplicates("node name", [n.name for n in nodes], problems)
    _duplicates("runtime_port", [str(n.runtime_port) for n in nodes], problems)
    if problems:
        raise FederationFileError(source, problems)
    return FederationFile(
        name=federation.name,
        superlink=federation.superlink,
        host=federation.host,
        port=federation.port,
        server_names=federation.server_names,
        listen=federation.listen,
        valid_days=federation.valid_days,
        operators=tuple(operators),
        nodes=nodes,
    )


def load_federation_file(path: Path) -> FederationFile:
    """Read and validate ``path``; :class:`FederationFileError` lists every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FederationFileError(str(path), [f"cannot read it: {exc.strerror}"]) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise FederationFileError(str(path), [f"not valid TOML: {exc}"]) from None
    return parse_federation(document, source=str(path), base=path.parent)
