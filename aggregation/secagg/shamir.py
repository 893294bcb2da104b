"""Shamir secret sharing (Shamir, CACM 1979) of 32-byte secrets over GF(2^521 - 1).

The field is larger than every secret (2^256 < p), so a secret is an element of the field and
fewer than ``threshold`` shares are independent of it (information-theoretic). Coefficients come
from ``secrets`` (the OS CSPRNG). A share is the point (x, f(x)) with x = holder node id + 1,
so the holder is bound to its share and x is never 0.

Robust reconstruction (:func:`reconstruct`): the shares of one secret are the codeword of a
Reed-Solomon code of dimension t, so with n > t shares a wrong share shows (it is off the
polynomial through the others). Errors are corrected by Berlekamp-Welch decoding (Welch and
Berlekamp, US patent 4,633,470; up to floor((n - t) / 2) wrong shares, unique), and beyond that
radius only when the caller can recognise the secret (a commitment or a public key), by trying
the exclusion of ever larger sets of holders, at most ``max_subsets`` interpolations. A secret
that cannot be determined uniquely is an error, never a guess.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
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


MAX_SUBSETS: Final = 4096
"""Default bound on the interpolations of :func:`reconstruct`'s subset search (each costs
O(t^2) field operations; with t <= 20 the whole search stays well under a second)."""

_Point = tuple[int, int, int]  # holder, x, y


@dataclass(frozen=True)
class Reconstruction:
    """A rebuilt secret and the holders whose shares were not on its polynomial."""

    secret: bytes
    culprits: tuple[int, ...]


def reconstruct(
    shares: Mapping[int, bytes],
    *,
    threshold: int,
    matches: Callable[[bytes], bool] | None = None,
    max_subsets: int = MAX_SUBSETS,
) -> Reconstruction:
    """Rebuild a secret from ``shares`` (holder -> share), detecting and excluding wrong shares.

    ``matches`` (optional) recognises the right secret (e.g. it hashes to the node's
    commitment, or it is the private key of the node's public key). Steps: (1) if all shares
    lie on the polynomial through the first t, that is the secret; (2) otherwise
    Berlekamp-Welch decoding corrects up to floor((n - t) / 2) wrong shares; (3) otherwise, only
    with ``matches``, exclude ever larger sets of holders until the rest agree on a secret that
    ``matches`` accepts (at most ``max_subsets`` tries). Culprits are the holders whose shares
    are malformed or off the final polynomial.

    Raises ValueError when there are fewer than t well-formed shares or the secret cannot be
    determined uniquely (the message says which holders disagree).
    """
    if threshold < 1:
        raise ValueError(f"`threshold` must be at least 1. Found {threshold}.")
    t = threshold
    malformed = sorted(
        h
        for h, raw in shares.items()
        if len(raw) != SHARE_SIZE or int.from_bytes(raw, "big") >= PRIME
    )
    points: list[_Point] = [
        (h, share_x(h), int.from_bytes(shares[h], "big"))
        for h in sorted(shares)
        if h not in malformed
    ]
    if len(points) < t:
        raise ValueError(
            f"Need {t} well-formed shares to rebuild a secret. Found {len(points)}"
            + (f" (malformed: holders {malformed})." if malformed else ".")
        )

    def secret_of(coefficients: list[int]) -> bytes | None:
        value = coefficients[0]
        if value >= 2 ** (8 * SECRET_SIZE):
            return None
        secret = value.to_bytes(SECRET_SIZE, "big")
        return secret if matches is None or matches(secret) else None

    def result(coefficients: list[int], secret: bytes) -> Reconstruction:
        off = [h for h, x, y in points if _evaluate(coefficients, x) != y]
        return Reconstruction(secret=secret, culprits=tuple(sorted({*malformed, *off})))

    coefficients = _interpolate(points[:t])
    if all(_evaluate(coefficients, x) == y for _, x, y in points[t:]):
        secret = secret_of(coefficients)
        if secret is not None:
            return result(coefficients, secret)
        raise ValueError(
            f"All {len(points)} shares agree, but on a value that is not the expected secret "
            "(its owner dealt shares of another secret, or too many holders colluded)."
        )
    radius = (len(points) - t) // 2
    if radius >= 1:
        decoded = _berlekamp_welch(points, t, radius)
        if decoded is not None:
            secret = secret_of(decoded)
            if secret is not None:
                return result(decoded, secret)
    if matches is not None:
        tries = 0
        for size in range(1, len(points) - t + 1):
            for excluded in itertools.combinations(range(len(points)), size):
                tries += 1
                if tries > max_subsets:
                    break
                kept = [p for i, p in enumerate(points) if i not in excluded]
                candidate = _interpolate(kept[:t])
                if any(_evaluate(candidate, x) != y for _, x, y in kept[t:]):
                    continue
                secret = secret_of(candidate)
                if secret is not None:
                    return result(candidate, secret)
            if tries > max_subsets:
                break
    holders = [h for h, _, _ in points]
    raise ValueError(
        f"The {len(points)} shares from holders {holders} disagree and the secret cannot be "
        f"determined uniquely (threshold {t}"
        + (f", malformed: {malformed}" if malformed else "")
        + ")."
    )


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):  # Horner
        y = (y * x + c) % PRIME
    return y


def _batch_inverse(values: Sequence[int]) -> list[int]:
    """Inverses mod PRIME of non-zero ``values`` with one modular inversion (Montgomery)."""
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % PRIME)
    inverse = pow(prefix[-1], -1, PRIME)
    result = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        result[i] = inverse * prefix[i] % PRIME
        inverse = inverse * values[i] % PRIME
    return result


def _interpolate(points: Sequence[_Point]) -> list[int]:
    """Coefficients (constant first) of the polynomial of degree < len(points) through them.

    O(n^2) multiplications and one modular inversion.
    """
    n = len(points)
    xs = [x for _, x, _ in points]
    master = [1]  # prod (X - x_j), constant first
    for xj in xs:
        master = [(a - xj * b) % PRIME for a, b in zip([0, *master], [*master, 0], strict=True)]
    denominators = []
    for i, xi in enumerate(xs):
        d = 1
        for j, xj in enumerate(xs):
            if i != j:
                d = d * (xi - xj) % PRIME
        denominators.append(d)
    inverses = _batch_inverse(denominators)
    result = [0] * n
    for (_, xi, yi), inverse in zip(points, inverses, strict=True):
        # quotient = master / (X - xi) by synthetic division, highest coefficient first
        scale = yi * inverse % PRIME
        carry = 0
        for d in range(n, 0, -1):
            carry = (master[d] + carry * xi) % PRIME
            result[d - 1] = (result[d - 1] + scale * carry) % PRIME
    return result


def _solve(rows: list[list[int]]) -> list[int] | None:
    """One solution of the augmented system ``rows`` mod PRIME (free unknowns 0), or None."""
    width = len(rows[0]) - 1
    pivots: list[int] = []
    r = 0
    for col in range(width):
        pivot = next((i for i in range(r, len(rows)) if rows[i][col]), None)
        if pivot is None:
            continue
        rows[r], rows[pivot] = rows[pivot], rows[r]
        inverse = pow(rows[r][col], -1, PRIME)
        rows[r] = [v * inverse % PRIME for v in rows[r]]
        for i in range(len(rows)):
            if i != r and rows[i][col]:
                factor = rows[i][col]
                rows[i] = [(a - factor * b) % PRIME for a, b in zip(rows[i], rows[r], strict=True)]
        pivots.append(col)
        r += 1
    if any(row[width] for row in rows[r:]):
        return None  # inconsistent
    solution = [0] * width
    for i, col in enumerate(pivots):
        solution[col] = rows[i][width]
    return solution


def _berlekamp_welch(points: Sequence[_Point], t: int, errors: int) -> list[int] | None:
    """The polynomial of degree < t that agrees with all but at most ``errors`` points, or None.

    Solves Q(x_i) = y_i E(x_i) for Q of degree < t + e and monic E of degree e, then P = Q / E.
    Needs len(points) >= t + 2e; O(n (t + 2e)^2) field operations.
    """
    e = errors
    rows = []
    for _, x, y in points:
        powers = [pow(x, i, PRIME) for i in range(t + e + 1)]
        rows.append(
            [*powers[: t + e], *((-y * powers[i]) % PRIME for i in range(e)), y * powers[e] % PRIME]
        )
    solution = _solve(rows)
    if solution is None:
        return None
    q = solution[: t + e]
    divisor = [*solution[t + e :], 1]  # E, monic
    # long division of Q by E (constant-first lists)
    remainder = list(q)
    quotient = [0] * t
    for d in range(t - 1, -1, -1):
        coefficient = remainder[d + e]
        quotient[d] = coefficient
        if coefficient:
            for i, c in enumerate(divisor):
                remainder[d + i] = (remainder[d + i] - coefficient * c) % PRIME
    if any(remainder[:e]):
        return None
    wrong = sum(1 for _, x, y in points if _evaluate(quotient, x) != y)
    return quotient if wrong <= e else None
