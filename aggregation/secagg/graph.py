"""The SecAgg+ masking graph: a randomly labelled Harary graph (Bell et al., CCS 2020, sec. 3).

The graph is public (the server chooses it and tells each client its neighbours), so the
labelling randomness is an ordinary ``numpy.random.Generator``; it never touches keys or masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def harary_graph(
    node_ids: Sequence[int], num_neighbours: int, rng: np.random.Generator
) -> dict[int, frozenset[int]]:
    """A k-regular graph on ``node_ids`` with a random labelling.

    The nodes sit on a ring in random order; each is joined to the floor(k/2) nearest on each
    side and, when k is odd, to the node opposite. When N*k is odd (no k-regular graph exists)
    one node gets k+1 neighbours. k = N-1 gives the complete graph (the original SecAgg).
    """
    n = len(node_ids)
    k = num_neighbours
    if len(set(node_ids)) != n:
        raise ValueError("Node ids must be distinct.")
    if not 1 <= k < n:
        raise ValueError(f"`num_neighbours` must be in [1, {n - 1}] for {n} nodes. Found {k}.")
    order = [node_ids[int(i)] for i in rng.permutation(n)]
    adjacency: dict[int, set[int]] = {node: set() for node in node_ids}

    def join(i: int, j: int) -> None:
        a, b = order[i % n], order[j % n]
        if a != b:
            adjacency[a].add(b)
            adjacency[b].add(a)

    for i in range(n):
        for step in range(1, k // 2 + 1):
            join(i, i + step)
    if k % 2 == 1:
        if n % 2 == 0:
            for i in range(n // 2):
                join(i, i + n // 2)
        else:
            for i in range((n + 1) // 2):
                join(i, i + (n + 1) // 2)
    return {node: frozenset(peers) for node, peers in adjacency.items()}
