"""A SecAgg+ client's round state (:class:`ClientState`, :class:`ClientPhase`) and its
persistence as plain values between stage messages (``ClientSession.to_state_record`` and
``ClientSession.from_state_record`` in :mod:`aggregation.secagg.client` call the functions
here). The record holds the round's secrets: it stays on the node.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from aggregation.secagg import primitives
from aggregation.secagg.errors import SecAggProtocolError
from aggregation.secagg.identity import NodeIdentity, Roster
from aggregation.secagg.params import SecAggParams
from aggregation.secagg.policy import ParticipationLog, SecAggPolicy

if TYPE_CHECKING:
    from aggregation.secagg.client import ClientSession

__all__ = ["ClientPhase", "ClientState", "session_from_record", "state_record"]

T = TypeVar("T")


class ClientPhase(StrEnum):
    """The request a client session expects next."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"
    DONE = "done"


@dataclass
class ClientState:
    """Everything a client remembers during one round (its secrets included).

    ``seed_shares`` / ``key_shares`` hold the shares of the peers it masked with (those whose
    shares it opened); ``excluded`` the senders it left out, with the reason;
    ``survivor_ids`` the survivor set it signed in the consistency check, and
    ``survivor_signature`` its own signature on it; ``context`` the session context it signs
    and verifies every statement with.
    """

    node_id: int
    context: bytes = b""
    phase: ClientPhase = ClientPhase.ADVERTISE_KEYS
    run_id: int = -1
    server_round: int = -1
    params: SecAggParams | None = None
    neighbours: frozenset[int] = frozenset()
    share_key: X25519PrivateKey | None = None
    mask_key: X25519PrivateKey | None = None
    self_seed: bytes = b""
    peer_mask_public_keys: dict[int, bytes] = field(default_factory=dict)
    peer_share_public_keys: dict[int, bytes] = field(default_factory=dict)
    share_encryption_keys: dict[int, bytes] = field(default_factory=dict)
    own_seed_share: bytes = b""
    seed_shares: dict[int, bytes] = field(default_factory=dict)
    key_shares: dict[int, bytes] = field(default_factory=dict)
    excluded: dict[int, str] = field(default_factory=dict)
    survivor_ids: tuple[int, ...] = ()
    survivor_signature: bytes = b""


def state_record(session: ClientSession) -> dict[str, bytes | int | str | list[int] | list[bytes]]:
    """:meth:`ClientSession.to_state_record`: the session as plain values."""
    st = session.state
    record: dict[str, bytes | int | str | list[int] | list[bytes]] = {
        "node_id": st.node_id,
        "phase": str(st.phase),
        "authenticated": int(session.authenticated),
        "context": st.context,
    }
    if st.params is None or st.share_key is None or st.mask_key is None:
        return record
    p = st.params
    peers = sorted(st.peer_share_public_keys)
    holders = sorted(st.seed_shares)
    excluded = sorted(st.excluded)
    record.update(
        {
            "run_id": st.run_id,
            "round": st.server_round,
            "params": [p.num_clients, p.num_neighbours, p.threshold, p.vector_length],
            "clipping_range": float(p.clipping_range).hex(),
            "neighbours": sorted(st.neighbours),
            "share_key": primitives.private_bytes(st.share_key),
            "mask_key": primitives.private_bytes(st.mask_key),
            "self_seed": st.self_seed,
            "peer_ids": peers,
            "peer_share_public_keys": [st.peer_share_public_keys[i] for i in peers],
            "peer_mask_public_keys": [st.peer_mask_public_keys[i] for i in peers],
            "share_encryption_keys": [st.share_encryption_keys[i] for i in peers],
            "own_seed_share": st.own_seed_share,
            "holder_ids": holders,
            "seed_shares": [st.seed_shares[i] for i in holders],
            "key_shares": [st.key_shares[i] for i in holders],
            "excluded_ids": excluded,
            "excluded_reasons": [st.excluded[i].encode() for i in excluded],
            "survivor_ids": list(st.survivor_ids),
            "survivor_signature": st.survivor_signature,
        }
    )
    return record


def session_from_record(
    session_type: type[ClientSession],
    record: Mapping[str, object],
    *,
    identity: NodeIdentity | None,
    roster: Roster | None,
    policy: SecAggPolicy | None,
    participation: ParticipationLog | None,
) -> ClientSession:
    """:meth:`ClientSession.from_state_record`: a ``session_type`` restored from ``record``."""
    try:
        node_id = _as(int, record["node_id"])
        authenticated = bool(_as(int, record.get("authenticated", 0)))
        if authenticated != (identity is not None):
            raise ValueError(
                "the record was saved by an "
                + ("authenticated" if authenticated else "unauthenticated")
                + " session; restore it with the same identity and roster"
            )
        session = session_type(
            node_id,
            identity=identity,
            roster=roster,
            policy=policy,
            participation=participation,
            context=_as(bytes, record.get("context", b"")),
        )
        st = session.state
        st.phase = ClientPhase(_as(str, record["phase"]))
        if "run_id" not in record:
            if st.phase != ClientPhase.ADVERTISE_KEYS:
                raise ValueError("a session past its first stage must hold its keys")
            return session
        n, k, t, length = (_as(int, v) for v in _as(list, record["params"]))
        st.params = SecAggParams(
            num_clients=n,
            num_neighbours=k,
            threshold=t,
            vector_length=length,
            clipping_range=float.fromhex(_as(str, record["clipping_range"])),
        )
        st.run_id, st.server_round = _as(int, record["run_id"]), _as(int, record["round"])
        st.neighbours = frozenset(_as(int, v) for v in _as(list, record["neighbours"]))
        st.share_key = primitives.load_private_key(_as(bytes, record["share_key"]))
        st.mask_key = primitives.load_private_key(_as(bytes, record["mask_key"]))
        st.self_seed = _as(bytes, record["self_seed"])
        peers = [_as(int, v) for v in _as(list, record["peer_ids"])]

        def by_peer(key: str, ids: list[int]) -> dict[int, bytes]:
            return dict(zip(ids, (_as(bytes, v) for v in _as(list, record[key])), strict=True))

        st.peer_share_public_keys = by_peer("peer_share_public_keys", peers)
        st.peer_mask_public_keys = by_peer("peer_mask_public_keys", peers)
        st.share_encryption_keys = by_peer("share_encryption_keys", peers)
        st.own_seed_share = _as(bytes, record["own_seed_share"])
        holders = [_as(int, v) for v in _as(list, record["holder_ids"])]
        st.seed_shares = by_peer("seed_shares", holders)
        st.key_shares = by_peer("key_shares", holders)
        excluded = [_as(int, v) for v in _as(list, record.get("excluded_ids", []))]
        reasons = by_peer("excluded_reasons", excluded) if excluded else {}
        st.excluded = {node: reason.decode() for node, reason in reasons.items()}
        st.survivor_ids = tuple(_as(int, v) for v in _as(list, record.get("survivor_ids", [])))
    except (KeyError, TypeError, ValueError) as error:
        raise SecAggProtocolError(f"Malformed client session state: {error}") from None
    return session


def _as(kind: type[T], value: object) -> T:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"expected {kind.__name__}, found {type(value).__name__}")
    return value
