"""What a node accepts, decided by the node (never taken from the server).

:class:`SecAggPolicy` holds the node's SecAgg+ minimums; :class:`ClientSession` checks every
advertise-keys request against it before creating any key. :class:`ParticipationLog` records,
per run, the last round a node took part in, so that a replayed or older round is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from aggregation.secagg.errors import SecAggProtocolError, SecAggRefusedError
from aggregation.secagg.params import SecAggParams


@dataclass(frozen=True, kw_only=True)
class SecAggPolicy:
    """A node's SecAgg+ minimums (validated at construction).

    Attributes:
        min_clients: the smallest group N the node joins (>= 3: with N = 2 the sum is the
            other client's input plus one's own).
        min_neighbours: the fewest neighbours k (>= 1).
        min_threshold: the floor on the threshold t (>= 2).
        max_corrupt_neighbours: c, how many of a node's share holders the operator assumes may
            collude with the server (>= 0). The threshold must satisfy 2t > h + c, where h is
            the number of holders of the node's shares (itself and its neighbours, k + 1).

    Why 2t > h + c (Bell et al., CCS 2020, sec. 4-5; Bonawitz et al., CCS 2017, sec. 4): the
    server learns client v's input only if it rebuilds both v's self-mask seed (t shares) and
    v's mask key (t shares). An honest holder reveals at most one of the two shares of v (the
    one that matches the survivor set it signed); a corrupt holder reveals both. With c corrupt
    and h - c honest holders, the server needs two disjoint honest groups of t - c each:
    2(t - c) <= h - c, i.e. 2t <= h + c. So 2t > h + c makes a split view of v's holders
    unable to reach t twice, whatever each honest holder was told. With c = 0 this is
    t > (k+1)/2, the "honest majority of holders" bound; it also implies t > c, so the corrupt
    holders alone never reach t. Bell et al. pick k and t so that, with high probability over
    the random graph, every neighbourhood meets such a bound; ``max_corrupt_neighbours`` makes
    that assumption explicit, since here the server chooses the graph.
    """

    min_clients: int = 3
    min_neighbours: int = 2
    min_threshold: int = 2
    max_corrupt_neighbours: int = 0

    def __post_init__(self) -> None:
        bounds = {
            "min_clients": 3,
            "min_neighbours": 1,
            "min_threshold": 2,
            "max_corrupt_neighbours": 0,
        }
        problems: list[str] = []
        for name, low in bounds.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"`{name}` must be an int. Found {type(value).__name__}.")
            if value < low:
                problems.append(f"`{name}` must be at least {low}. Found {value}.")
        if problems:
            raise ValueError("Invalid SecAgg+ policy: " + " ".join(problems))

    def problems(
        self,
        params: SecAggParams,
        *,
        node_id: int,
        neighbours: Iterable[int],
        roster: Mapping[int, bytes] | None,
    ) -> list[str]:
        """Every way the round's parameters and this node's neighbour list break the policy.

        (``SecAggParams`` already guarantees 1 <= k < N and 2 <= t <= k + 1.)
        """
        n, k, t = params.num_clients, params.num_neighbours, params.threshold
        c = self.max_corrupt_neighbours
        peers = sorted(set(neighbours))
        holders = len(peers) + 1
        problems: list[str] = []
        if n < self.min_clients:
            problems.append(f"group size N = {n} is below the node's minimum {self.min_clients}")
        if k < self.min_neighbours:
            problems.append(f"k = {k} neighbours is below the node's minimum {self.min_neighbours}")
        if t < self.min_threshold:
            problems.append(f"threshold t = {t} is below the node's floor {self.min_threshold}")
        if 2 * t <= holders + c:
            problems.append(
                f"threshold t = {t} does not satisfy 2t > holders + c = {holders} + {c}: a "
                "split view of its share holders could rebuild both of its secrets"
            )
        odd = (n * k) % 2 == 1
        if len(peers) != k and not (odd and len(peers) == k + 1):
            allowed = f"{k} (or {k + 1}, once, since N*k is odd)" if odd else f"{k}"
            problems.append(f"it was given {len(peers)} neighbours; the round has k = {allowed}")
        if node_id in peers:
            problems.append("its neighbour list contains itself")
        if roster is not None:
            strangers = [p for p in peers if p not in roster]
            if strangers:
                problems.append(f"neighbours {strangers} are not in the roster")
            if node_id not in roster:
                problems.append("it is not in the roster itself")
        return problems

    def check(
        self,
        params: SecAggParams,
        *,
        node_id: int,
        neighbours: Iterable[int],
        roster: Mapping[int, bytes] | None,
    ) -> None:
        """Raise SecAggRefusedError listing every problem, or return None."""
        problems = self.problems(params, node_id=node_id, neighbours=neighbours, roster=roster)
        if problems:
            raise SecAggRefusedError(
                f"Node {node_id} refuses the round: " + "; ".join(problems) + ". Nothing was sent."
            )


@dataclass
class ParticipationLog:
    """Per run, the last round this node took part in: it never joins an older or the same
    round again (a replayed or rewound round could otherwise reuse its view).

    Keep it in the node's persistent state (:meth:`to_record` / :meth:`from_record`).
    """

    last_round: dict[int, int] = field(default_factory=dict)

    def check(self, run_id: int, server_round: int) -> None:
        """Raise SecAggRefusedError unless ``server_round`` is newer than ``run_id``'s last."""
        last = self.last_round.get(run_id)
        if last is not None and server_round <= last:
            raise SecAggRefusedError(
                f"Round {server_round} of run {run_id} is not newer than round {last}, which "
                "this node already took part in; a node joins each round once, in increasing "
                "order."
            )

    def admit(self, run_id: int, server_round: int) -> None:
        """Check, then record ``server_round`` as the last round of ``run_id``."""
        self.check(run_id, server_round)
        self.last_round[run_id] = server_round

    def to_record(self) -> dict[str, list[int]]:
        """Plain values for the node's persistent state."""
        runs = sorted(self.last_round)
        return {"run_ids": runs, "rounds": [self.last_round[r] for r in runs]}

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> ParticipationLog:
        """Inverse of :meth:`to_record`; raises SecAggProtocolError if it is malformed."""
        runs, rounds = record.get("run_ids"), record.get("rounds")
        if not isinstance(runs, list) or not isinstance(rounds, list) or len(runs) != len(rounds):
            raise SecAggProtocolError("Malformed participation log: needs equal-length lists.")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in runs + rounds):
            raise SecAggProtocolError("Malformed participation log: values must be ints.")
        return cls(last_round=dict(zip(runs, rounds, strict=True)))
