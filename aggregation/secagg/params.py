"""Parameters of one SecAgg+ round (Bell et al., CCS 2020)."""

from __future__ import annotations

import math
from dataclasses import dataclass

MODULUS = 2**32
"""Masked values live in Z_(2^32): uint32 arithmetic that wraps."""

MAX_NODE_ID = 2**64 - 1


@dataclass(frozen=True, kw_only=True)
class SecAggParams:
    """Validated parameters of one SecAgg+ round.

    Attributes:
        num_clients: N, the number of clients sampled for the round (2 <= N).
        num_neighbours: k, each client's number of neighbours in the masking graph (1 <= k < N).
            When N*k is odd no k-regular graph exists: one client then gets k+1 neighbours.
        threshold: t, the number of shares needed to rebuild a client's secret, counted in its
            neighbourhood of k+1 share holders (itself and its neighbours); 2 <= t <= k+1.
            Fewer than t colluding holders learn nothing about the secret. Clients also require
            2t > k + 1 (+ the colluders they assume) before they join: see ``SecAggPolicy``.
        vector_length: P, the number of float32 values each client contributes (>= 1).
        clipping_range: c > 0; values are clipped to [-c, c] before quantization.
        modulus: must be 2^32.
    """

    num_clients: int
    num_neighbours: int
    threshold: int
    vector_length: int
    clipping_range: float
    modulus: int = MODULUS

    def __post_init__(self) -> None:
        problems: list[str] = []
        ints = ("num_clients", "num_neighbours", "threshold", "vector_length", "modulus")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"`{name}` must be an int. Found {type(value).__name__}.")
        if not isinstance(self.clipping_range, float | int) or isinstance(
            self.clipping_range, bool
        ):
            raise TypeError(
                f"`clipping_range` must be a float. Found {type(self.clipping_range).__name__}."
            )
        n, k, t = self.num_clients, self.num_neighbours, self.threshold
        if n < 2:
            problems.append(f"`num_clients` must be at least 2. Found {n}.")
        if not 1 <= k < max(n, 2):
            problems.append(
                f"`num_neighbours` must be in [1, num_clients - 1] = [1, {n - 1}]. Found {k}."
            )
        if not 2 <= t <= k + 1:
            problems.append(
                f"`threshold` must be in [2, k+1] = [2, {k + 1}] (k = `num_neighbours`). Found {t}."
            )
        if self.vector_length < 1:
            problems.append(f"`vector_length` must be at least 1. Found {self.vector_length}.")
        c = float(self.clipping_range)
        if not (math.isfinite(c) and c > 0):
            problems.append(f"`clipping_range` must be positive and finite. Found {c}.")
        if self.modulus != MODULUS:
            problems.append(f"`modulus` must be 2^32 = {MODULUS}. Found {self.modulus}.")
        if problems:
            raise ValueError("Invalid SecAgg+ parameters: " + " ".join(problems))

    @property
    def quantization_levels(self) -> int:
        """L = floor((2^32 - 1) / N): each client quantizes into [0, L], so N values never wrap."""
        return (MODULUS - 1) // self.num_clients

    @property
    def quantization_step(self) -> float:
        """The width of one quantization level, 2c / L."""
        return 2.0 * float(self.clipping_range) / self.quantization_levels
