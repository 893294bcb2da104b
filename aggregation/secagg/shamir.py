"""Shamir secret sharing (Shamir, CACM 1979) of 32-byte secrets over GF(2^521 - 1).

The field is larger than every secret (2^256 < p), so a secret is an element of the field and
fewer than ``threshold`` shares are independent of it (information-theoretic). Coefficients come
from ``secrets`` (the OS CSPRNG). A share is the point (x, f(x)) with x = holder node id + 1,
so the holder is bound to its share and x is never 0.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Final

PRIME: Final = 2**521 - 1
"""The Mersenne prime M521."""

SHARE_SIZE: Final = 66  # ceil(521 / 8) bytes, big-endian
SECRET_SIZE: Final = 32


def share_x(node_id: int) -> int:
    """The evaluation point of ``node_id``'s share."""
    return node_id + 1


def split(secret: bytes, *, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Split a 32-byte ``secret`` into one share per holder; any ``threshold`` rebuild it."""
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"Secrets have {SECRET_SIZE} bytes. Found {len(secret)}.")
    if len(set(holders)) != len(holders):
        raise ValueError("Share holders must be distinct node ids.")
    if not 1 <= threshold <= len(holders):
        raise ValueError(
            f"`threshold` must be in [1, number of holders] = [1, {len(holders)}]. "
            f"Found {threshold}."
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for holder in holders:
        x = share_x(holder)
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares[holder] = y.to_bytes(SHARE_SIZE, "big")
    return shares


def combine(shares: Mapping[int, bytes], *, threshold: int) -> bytes:
    """Rebuild the secret from at least ``threshold`` shares (Lagrange interpolation at 0).

    Uses the ``threshold`` shares of the smallest node ids. Raises ValueError when there are too
    few shares or a share is malformed.
    """
    if len(shares) < threshold:
        raise ValueError(f"Need {threshold} shares to rebuild a secret. Found {len(shares)}.")
    points: list[tuple[int, int]] = []
    for holder in sorted(shares)[:threshold]:
        raw = shares[holder]
        if len(raw) != SHARE_SIZE:
            raise ValueError(f"A share has {SHARE_SIZE} bytes. Found {len(raw)}.")
        y = int.from_bytes(raw, "big")
        if y >= PRIME:
            raise ValueError("A share is not a field element (>= p).")
        points.append((share_x(holder), y))
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_SIZE):
        raise ValueError("The shares are inconsistent: the rebuilt value is not a 32-byte secret.")
    return secret.to_bytes(SECRET_SIZE, "big")
