"""Distributed DP: integer noise that each node adds to its own vector before SecAgg+ masking.

The mechanism of Kairouz, Liu, Steinke (ICML 2021, "The Distributed Discrete Gaussian Mechanism
for Federated Learning with Secure Aggregation", arXiv:2102.06387, Algorithms 1-2) and Agarwal,
Kairouz, Liu (NeurIPS 2021, "The Skellam Mechanism for Differentially Private Federated
Learning", arXiv:2110.04995, Algorithm 1). A node

1. checks that its vector (or each example's vector) has L2 norm at most ``C`` (:func:`clip_l2`
   does the clipping; :func:`encode` only refuses what is too long),
2. pads it to a power of two and rotates it with a randomized Hadamard transform ``H D / sqrt(d)``
   whose signs ``D`` come from a *public* seed shared by all nodes of the round
   (:func:`rotate`), which flattens the vector so that few bits per coordinate suffice,
3. scales by ``1 / gamma`` and rounds each coordinate randomly up or down (unbiased), retrying
   until the rounded vector's L2 norm is within the bound of Kairouz et al. Theorem 1 / Eq. (2)
   ("conditional randomized rounding"; the smaller of the two bounds, Proposition 22), so the
   integer vector's sensitivity is known exactly,
4. adds its noise share: Skellam (difference of two Poissons) or discrete Gaussian, with variance
   ``aggregate variance / min_survivors`` (:func:`noise_share`),
5. reduces mod 2^32 (:func:`to_modular`) and masks with SecAgg+.

The server decodes the unmasked sum with :func:`decode_sum`: centred lift from Z_(2^b), times
``gamma``, inverse rotation, un-padding.

Units. *Real units* are those of the vectors (``l2_clip`` C, ``noise_multiplier`` z is unitless,
the aggregate noise standard deviation ``z * C`` is in real units). *Integer units* are those of
the rounded, scaled vectors: real = gamma * integer. Sensitivities and variances reported for the
accountant (:mod:`aggregation.ddp_accounting`) are in integer units.

Assumptions (threat model: a malicious server, see DESIGN.md): the noise is added by the nodes,
so neither an honest-but-curious nor a malicious server sees an un-noised sum -- *provided* the
sum it unmasks carries at least ``min_survivors`` noise shares from honest nodes. Shares of
nodes that collude with the server do not count (the server can subtract them), and for
node-level add/remove adjacency a removed node also removes its own share, so count the *other*
honest survivors. Rotation signs are public; rounding and noise randomness are the node's own
(``rng``, never derived from anything the server sends). The samplers use floating-point
arithmetic (numpy's Poisson, and a vectorized form of Canonne, Kamath, Steinke 2020 Algorithm 3
with float acceptance tests): exact up to floating-point rounding, like the reference code.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import numpy as np
from numpy.typing import NDArray

from aggregation.secagg.primitives import CHUNK_VALUES, Keystream, hkdf_sha256
from aggregation.validation import (
    JSONValue,
    as_int,
    as_real,
    positive_problem,
    raise_problems,
)

__all__ = [
    "DEFAULT_BETA",
    "MAX_LOCAL_STDDEV",
    "MAX_ROUNDING_ATTEMPTS",
    "WRAP_PROBABILITY",
    "DdpConfig",
    "DistributedMechanism",
    "clip_l2",
    "conditional_round",
    "decode_sum",
    "encode",
    "encode_and_noise",
    "fwht",
    "noise_share",
    "rotate",
    "rotation_signs",
    "sample_discrete_gaussian",
    "sample_skellam",
    "secure_rng",
    "to_modular",
    "unrotate",
]

DEFAULT_BETA: Final = math.exp(-0.5)
"""Conditional-rounding parameter recommended by Kairouz et al. 2021 (and TFF's DDP factory)."""

WRAP_PROBABILITY: Final = 1e-3
"""Target for the default headroom: per release, P(any coordinate of the sum wraps) <= this
(union bound over the padded dimension, sub-Gaussian aggregate; see ``DdpConfig.k_stddevs``)."""

MAX_ROUNDING_ATTEMPTS: Final = 100
"""Conditional rounding gives up after this many tries of one vector. Each try fails with
probability at most beta (Kairouz et al. Theorem 1), so 100 tries at beta = exp(-0.5) all fail
with probability below 1e-21: reaching the limit means the input broke the norm contract."""

MAX_LOCAL_STDDEV: Final = 2.0**15
"""Cap on a noise share's standard deviation in integer units: gamma is made coarser when the
headroom rule alone would make it finer. numpy's Poisson sampler (PTRS) tests
``-lam + k log(lam) - log(k!)`` in float64, which cancels catastrophically for huge lam (at
lam = 3.5e15, as 32 bits would otherwise give, the sample variance came out 7-30% high); at
the cap lam <= 2^29 and that expression keeps about 1e-6 absolute precision. Nothing useful is
lost: each share's variance is then 2^30 integer units, against at most 1/4 per summand from
rounding."""

NORM_SLACK: Final = 1e-9
"""Relative slack on ``||x|| <= C`` so that a vector clipped to exactly C by float arithmetic is
accepted. Privacy does not depend on it: the rounded integer vector is checked exactly."""

_ROTATION_SALT: Final = b"fedbrain/ddp/v1/hkdf-salt"
_ROTATION_INFO: Final = b"fedbrain/ddp/v1/rotation-signs"
_ROW_CHUNK_VALUES: Final = 1 << 22  # rows of a batch are rotated in blocks of ~32 MiB of float64
_MAX_SAMPLER_ROUNDS: Final = 10_000
_SECAGG_BITS: Final = 32


class DistributedMechanism(StrEnum):
    """Which integer noise the nodes add (wire and manifest value)."""

    SKELLAM = "skellam"
    """Skellam: Poisson(v/2) - Poisson(v/2), variance v; closed under summation (Agarwal et al.)."""
    DGAUSS = "ddgauss"
    """Distributed discrete Gaussian N_Z(0, sigma^2) per node (Kairouz et al.)."""


def secure_rng() -> np.random.Generator:
    """A node's own generator for rounding and noise, seeded with 256 bits from ``os.urandom``.

    Same construction as :func:`aggregation.dp.secure_generator` (PCG64: the seed is
    unpredictable; the stream itself is not a cryptographic generator).
    """
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "big")))


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, kw_only=True)
class DdpConfig:
    """Validated parameters of the distributed DP mechanism for one kind of release.

    Attributes:
        mechanism: :class:`DistributedMechanism` (or its string value).
        dim: P, the length of the real vector (>= 1); it is padded to :attr:`padded_dim`.
        l2_clip: C > 0, the L2 bound of ONE unit's contribution in real units (a node's clipped
            update for node-level DP; one example's vector for example-level DP).
        noise_multiplier: z > 0 (unitless). The sum of ``min_survivors`` noise shares has
            standard deviation ``z * C`` per coordinate in real units (decoded); each share has
            variance ``(z * C)^2 / min_survivors``, so more survivors only add noise.
        min_survivors: the fewest honest nodes whose shares are in any sum the server unmasks
            (see the module docstring for what to count).
        max_summands: the most vectors of norm <= C that can be in one sum (for headroom): nodes
            for node-level DP, examples over all nodes for example-level DP.
        max_noise_shares: the most noise shares in one sum (nodes); default ``max_summands``.
        modulus_bits: b in [2, 32]; the sum lives in Z_(2^b) (SecAgg+ sums mod 2^32, a multiple).
        beta: conditional-rounding parameter in [0, 1) (Kairouz et al. Theorem 1); 0 turns the
            condition off (plain randomized rounding, bound ``C/gamma + sqrt(d)``).
        k_stddevs: headroom, in standard deviations of the sum, between its expected spread and
            the modulus edge (Kairouz et al. Section 4.4; reference ``heuristic_scale_factor``).
            Default: ``sqrt(2 ln(2 d / WRAP_PROBABILITY))``, which by a union bound over the
            padded dimension d keeps P(any coordinate wraps) <= WRAP_PROBABILITY per release
            when the aggregate is sub-Gaussian (rotated signal and rounding by Hoeffding,
            discrete Gaussian by Canonne et al.; Skellam only approximately).
    """

    mechanism: DistributedMechanism
    dim: int
    l2_clip: float
    noise_multiplier: float
    min_survivors: int
    max_summands: int
    max_noise_shares: int | None = None
    modulus_bits: int = 32
    beta: float = DEFAULT_BETA
    k_stddevs: float | None = None

    def __post_init__(self) -> None:
        try:
            mechanism = DistributedMechanism(self.mechanism)
        except ValueError:
            raise ValueError(
                f"`mechanism` must be one of {[m.value for m in DistributedMechanism]}. "
                f"Found {self.mechanism!r}."
            ) from None
        dim = as_int("dim", self.dim)
        c = as_real("l2_clip", self.l2_clip)
        z = as_real("noise_multiplier", self.noise_multiplier)
        m = as_int("min_survivors", self.min_survivors)
        n = as_int("max_summands", self.max_summands)
        shares = (
            None
            if self.max_noise_shares is None
            else as_int("max_noise_shares", self.max_noise_shares)
        )
        bits = as_int("modulus_bits", self.modulus_bits)
        beta = as_real("beta", self.beta)
        k = None if self.k_stddevs is None else as_real("k_stddevs", self.k_stddevs)
        problems: list[str | None] = [
            None if dim >= 1 else f"`dim` must be at least 1. Found {dim}.",
            positive_problem("l2_clip", c),
            positive_problem("noise_multiplier", z),
            None if m >= 1 else f"`min_survivors` must be at least 1. Found {m}.",
            None if n >= 1 else f"`max_summands` must be at least 1. Found {n}.",
            None
            if 2 <= bits <= _SECAGG_BITS
            else (
                f"`modulus_bits` must be in [2, {_SECAGG_BITS}] (SecAgg+ sums mod 2^32). "
                f"Found {bits}."
            ),
            None
            if 0 <= beta < 1
            else f"`beta` must be in [0, 1); exp(-0.5) is usual. Found {beta!r}.",
            None if k is None else positive_problem("k_stddevs", k),
        ]
        resolved_shares = n if shares is None else shares
        if resolved_shares < m:
            source = " (defaulted to `max_summands`)" if shares is None else ""
            problems.append(
                f"`max_noise_shares`{source} must be at least `min_survivors` = {m}: at most that "
                f"many nodes add noise. Found {resolved_shares}."
            )
        raise_problems(problems)
        for name, value in [
            ("mechanism", mechanism),
            ("dim", dim),
            ("l2_clip", c),
            ("noise_multiplier", z),
            ("min_survivors", m),
            ("max_summands", n),
            ("max_noise_shares", shares),
            ("modulus_bits", bits),
            ("beta", beta),
            ("k_stddevs", k),
        ]:
            object.__setattr__(self, name, value)
        self._check_fits()

    def _check_fits(self) -> None:
        """Refuse a geometry whose sum cannot fit the modulus or whose shares are too coarse."""
        k, n, bits = self.headroom_stddevs, self.max_summands, self.modulus_bits
        if 2.0 ** (2 * bits) <= k * k * n:
            raise ValueError(
                f"`modulus_bits` = {bits} is too small for `max_summands` = {n} at "
                f"{k:.3g} standard deviations of headroom: even the rounding of {n} vectors "
                "would not fit. Raise `modulus_bits`, lower `max_summands` or `k_stddevs`."
            )
        if self.mechanism is DistributedMechanism.DGAUSS and self.local_variance < 1.0:
            sigma = math.sqrt(self.local_variance)
            raise ValueError(
                f"Each discrete Gaussian share would have sigma = {sigma:.3g} < 1 in integer "
                "units: its variance falls short of sigma^2 (Canonne et al. 2020) and the "
                "accounting's tau term grows. Raise `modulus_bits` or "
                "`noise_multiplier`, or lower `max_summands`/`max_noise_shares`."
            )

    # ------------------------------------------------------------------ derived geometry

    @property
    def padded_dim(self) -> int:
        """d: the smallest power of two >= ``dim`` (the Hadamard transform's length)."""
        return 1 << (self.dim - 1).bit_length()

    @property
    def noise_shares(self) -> int:
        """The most noise shares in one sum (``max_noise_shares``, default ``max_summands``)."""
        return self.max_summands if self.max_noise_shares is None else self.max_noise_shares

    @property
    def headroom_stddevs(self) -> float:
        """k: ``k_stddevs``, or the default ``sqrt(2 ln(2 d / WRAP_PROBABILITY))``."""
        if self.k_stddevs is not None:
            return self.k_stddevs
        return math.sqrt(2.0 * math.log(2.0 * self.padded_dim / WRAP_PROBABILITY))

    @property
    def local_stddev(self) -> float:
        """Standard deviation of one node's share in real units: ``z * C / sqrt(min_survivors)``."""
        return self.noise_multiplier * self.l2_clip / math.sqrt(self.min_survivors)

    @property
    def gamma(self) -> float:
        """Granularity (real units per integer unit).

        Chosen so that ``k`` standard deviations of the largest possible sum fit in
        [-2^(b-1), 2^(b-1)): with n = ``max_summands`` vectors and m = ``noise_shares``,
        ``2^(b-1) = k * sqrt((n C)^2 / (d gamma^2) + n / 4 + m sigma^2 / gamma^2)`` (rotated
        signal of n aligned vectors, rounding, noise), i.e.
        ``gamma = 2 k sqrt((n C)^2 / d + m sigma^2) / sqrt(2^(2b) - k^2 n)`` -- Kairouz et al.
        Section 4.4 / the reference ``heuristic_scale_factor`` (accounting_utils.py L121-168)
        with rho = 1 and separate counts for vectors and noise shares -- but never finer than
        ``local_stddev / MAX_LOCAL_STDDEV`` (see there), which only adds headroom.
        """
        k, n, m = self.headroom_stddevs, self.max_summands, self.noise_shares
        c, sigma, d = self.l2_clip, self.local_stddev, self.padded_dim
        spread = math.sqrt((n * c) ** 2 / d + m * sigma**2)
        fit = 2.0 * k * spread / math.sqrt(2.0 ** (2 * self.modulus_bits) - k * k * n)
        return max(fit, sigma / MAX_LOCAL_STDDEV)

    @property
    def local_variance(self) -> float:
        """Variance of one node's noise share in integer units: ``(local_stddev / gamma)^2``.

        Skellam: exactly this. Discrete Gaussian: this is sigma^2 of N_Z(0, sigma^2), whose
        variance is slightly below sigma^2 (by a relative ~e^(-2 pi^2 sigma^2); negligible for
        sigma >= 1, which the config enforces).
        """
        return (self.local_stddev / self.gamma) ** 2

    @property
    def aggregate_variance(self) -> float:
        """Variance of the sum of ``min_survivors`` shares in integer units (= (zC/gamma)^2)."""
        return self.min_survivors * self.local_variance

    @property
    def l2_sensitivity(self) -> float:
        """Delta_2 in integer units: the L2 bound that every rounded vector satisfies.

        ``min(C/gamma + sqrt(d), sqrt(C^2/gamma^2 + d/4 + sqrt(2 ln(1/beta)) (C/gamma +
        sqrt(d)/2)))`` (Kairouz et al. Theorem 1 / Eq. (2), Proposition 22; reference
        ``rounded_l2_norm_bound``, accounting_utils.py L80-112); the first bound always holds
        (each coordinate moves by less than 1), the second is enforced by retrying.
        """
        x, d = self.l2_clip / self.gamma, self.padded_dim
        bound = x + math.sqrt(d)
        if self.beta > 0:
            squared = (
                x * x + d / 4 + math.sqrt(2 * math.log(1 / self.beta)) * (x + math.sqrt(d) / 2)
            )
            bound = min(bound, math.sqrt(squared))
        return bound

    @property
    def l1_sensitivity(self) -> float:
        """Delta_1 in integer units: ``Delta_2 * min(sqrt(d), Delta_2)`` (an integer vector has
        L1 <= L2^2; any vector L1 <= sqrt(d) L2; reference ``rounded_l1_norm_bound``)."""
        l2 = self.l2_sensitivity
        return l2 * min(math.sqrt(self.padded_dim), l2)

    @property
    def effective_noise_multiplier(self) -> float:
        """``sqrt(aggregate_variance) / l2_sensitivity`` (<= z: rounding inflates the norm)."""
        return math.sqrt(self.aggregate_variance) / self.l2_sensitivity

    @property
    def occupied_bits(self) -> float:
        """log2 of the range the worst-case sum needs with its headroom:
        ``log2(2 k sqrt((n C / gamma)^2 / d + n / 4 + m local_variance))`` (<= ``modulus_bits``;
        below it when ``MAX_LOCAL_STDDEV`` sets gamma). A smaller modulus would do."""
        n, m = self.max_summands, self.noise_shares
        spread = (n * self.l2_clip / self.gamma) ** 2 / self.padded_dim
        spread += n / 4 + m * self.local_variance
        return math.log2(2 * self.headroom_stddevs * math.sqrt(spread))

    @property
    def bits_used_per_coordinate(self) -> float:
        """Bits sent per real coordinate: ``modulus_bits * padded_dim / dim`` (padding included;
        SecAgg+ here carries uint32 words, so the wire cost is 32 * padded_dim / dim)."""
        return self.modulus_bits * self.padded_dim / self.dim

    @property
    def wrap_probability_bound(self) -> float:
        """``min(1, 2 d exp(-k^2 / 2))``: the union bound on P(any coordinate of one release's
        worst-case sum wraps), under the sub-Gaussian assumption stated for ``k_stddevs``."""
        k = self.headroom_stddevs
        return min(1.0, 2.0 * self.padded_dim * math.exp(-k * k / 2))

    def to_json(self) -> dict[str, JSONValue]:
        """The parameters and the derived geometry (for the manifest and the ledger)."""
        return {
            "mechanism": self.mechanism.value,
            "dim": self.dim,
            "padded_dim": self.padded_dim,
            "l2_clip": self.l2_clip,
            "noise_multiplier": self.noise_multiplier,
            "min_survivors": self.min_survivors,
            "max_summands": self.max_summands,
            "max_noise_shares": self.noise_shares,
            "modulus_bits": self.modulus_bits,
            "beta": self.beta,
            "k_stddevs": self.headroom_stddevs,
            "gamma": self.gamma,
            "local_variance": self.local_variance,
            "l2_sensitivity": self.l2_sensitivity,
            "l1_sensitivity": self.l1_sensitivity,
        }


# --------------------------------------------------------------------------- rotation


def fwht(values: NDArray[np.float64]) -> NDArray[np.float64]:
    """Normalized Walsh-Hadamard transform ``H x / sqrt(d)`` along the last axis (a new array).

    ``H`` is the Sylvester-ordered Hadamard matrix of order d (a power of two): symmetric, and
    ``H H = d I``, so the normalized transform is orthonormal and its own inverse. O(d log d):
    log2(d) butterfly passes ping-ponging between two buffers.
    """
    d = values.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"The transform length must be a power of two. Found {d}.")
    rows = values.size // d
    source = np.array(values, dtype=np.float64).reshape(rows, d)
    target = np.empty_like(source)
    h = 1
    while h < d:
        a = source.reshape(rows, d // (2 * h), 2, h)
        b = target.reshape(rows, d // (2 * h), 2, h)
        np.add(a[:, :, 0, :], a[:, :, 1, :], out=b[:, :, 0, :])
        np.subtract(a[:, :, 0, :], a[:, :, 1, :], out=b[:, :, 1, :])
        source, target = target, source
        h *= 2
    source *= 1.0 / math.sqrt(d)
    return source.reshape(values.shape)


def rotation_signs(rotation_seed: bytes, padded_dim: int) -> NDArray[np.float64]:
    """The public +-1 diagonal D of the rotation: bits of the AES-256-CTR keystream of
    ``HKDF-SHA256(rotation_seed)`` (explicit salt and info), bit 1 -> -1."""
    if not isinstance(rotation_seed, bytes):
        raise TypeError(f"`rotation_seed` must be bytes. Found {type(rotation_seed).__name__}.")
    if len(rotation_seed) < 16:
        raise ValueError(
            "`rotation_seed` must have at least 16 bytes (derive it from the run id and round "
            f"so that every node of the round uses the same one). Found {len(rotation_seed)}."
        )
    key = hkdf_sha256(rotation_seed, salt=_ROTATION_SALT, info=_ROTATION_INFO)
    words = np.empty((padded_dim + 31) // 32, dtype=np.uint32)
    stream = Keystream(key)
    for start in range(0, words.shape[0], CHUNK_VALUES):
        stream.fill(words[start : start + CHUNK_VALUES])
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:padded_dim]
    return 1.0 - 2.0 * bits.astype(np.float64)


def rotate(x: NDArray[np.float64], *, rotation_seed: bytes, padded_dim: int) -> NDArray[np.float64]:
    """Pad the last axis with zeros to ``padded_dim`` and apply ``H D / sqrt(d)`` (new array)."""
    if x.shape[-1] > padded_dim:
        raise ValueError(f"Cannot pad a vector of {x.shape[-1]} values to {padded_dim}.")
    padded = np.zeros((*x.shape[:-1], padded_dim), dtype=np.float64)
    padded[..., : x.shape[-1]] = x
    padded *= rotation_signs(rotation_seed, padded_dim)
    return fwht(padded)


def unrotate(y: NDArray[np.float64], *, rotation_seed: bytes, dim: int) -> NDArray[np.float64]:
    """Inverse of :func:`rotate`: ``D H y / sqrt(d)``, then drop the padding (new array)."""
    x = fwht(y)
    x *= rotation_signs(rotation_seed, y.shape[-1])
    return np.ascontiguousarray(x[..., :dim])


# --------------------------------------------------------------------------- node side


def clip_l2(x: NDArray[np.floating], *, l2_clip: float) -> NDArray[np.float64]:
    """Scale ``x`` (a vector, or each row of a batch) to L2 norm at most ``l2_clip`` (a new float64
    array; shorter vectors are copied unchanged). Raises ``ValueError`` on NaN/Inf."""
    c = as_real("l2_clip", l2_clip)
    raise_problems([positive_problem("l2_clip", c)])
    values = _as_vectors(x, None)
    norms = np.sqrt(np.einsum("ij,ij->i", values, values))
    factors = np.ones_like(norms)
    over = norms > c
    factors[over] = c / norms[over]
    clipped: NDArray[np.float64] = values * factors[:, None]
    return clipped.reshape(x.shape)


def encode(
    x: NDArray[np.floating],
    cfg: DdpConfig,
    *,
    rotation_seed: bytes,
    rng: np.random.Generator,
) -> NDArray[np.int64]:
    """Rotate, scale and conditionally round ``x``: an int64 vector of ``cfg.padded_dim`` values.

    ``x`` is one vector of shape ``(dim,)`` or a batch ``(n, dim)`` (example-level DP: each row
    is encoded on its own, with its own conditional rounding, and the rows are summed as
    integers; an empty batch gives zeros). Every row must be finite with L2 norm <= ``l2_clip``
    (clip with :func:`clip_l2` first); a row's rounded integer vector always has L2 norm <=
    ``cfg.l2_sensitivity``. No noise is added here (see :func:`noise_share`).
    """
    _check_rng(rng)
    values = _as_vectors(x, cfg.dim)
    norms = np.sqrt(np.einsum("ij,ij->i", values, values))
    too_long = np.flatnonzero(norms > cfg.l2_clip * (1 + NORM_SLACK))
    if too_long.size:
        i = int(too_long[0])
        raise ValueError(
            f"{too_long.size} vector(s) exceed l2_clip = {cfg.l2_clip:g} (row {i} has L2 norm "
            f"{norms[i]:.6g}). Clip each unit's contribution first, e.g. with clip_l2()."
        )
    d = cfg.padded_dim
    total = np.zeros(d, dtype=np.int64)
    rows_per_block = max(1, _ROW_CHUNK_VALUES // d)
    bound = cfg.l2_sensitivity
    for start in range(0, values.shape[0], rows_per_block):
        block = rotate(
            values[start : start + rows_per_block], rotation_seed=rotation_seed, padded_dim=d
        )
        block *= 1.0 / cfg.gamma
        total += conditional_round(block, bound, rng).sum(axis=0)
    return total


def conditional_round(
    scaled: NDArray[np.float64], bound: float, rng: np.random.Generator
) -> NDArray[np.int64]:
    """Round each row of a 2-D array up with probability equal to its fractional part (else
    down), retrying a row until its L2 norm is <= ``bound`` (Kairouz et al. 2021, conditional
    randomized rounding); raises ``RuntimeError`` after ``MAX_ROUNDING_ATTEMPTS`` tries."""
    floors = np.floor(scaled)
    fractions = scaled - floors
    result = np.empty(scaled.shape, dtype=np.int64)
    pending = np.arange(scaled.shape[0])
    for _ in range(MAX_ROUNDING_ATTEMPTS):
        rounded = floors[pending] + (
            rng.random((pending.size, scaled.shape[1])) < fractions[pending]
        )
        norms = np.sqrt(np.einsum("ij,ij->i", rounded, rounded))
        accepted = norms <= bound
        result[pending[accepted]] = rounded[accepted]
        pending = pending[~accepted]
        if pending.size == 0:
            return result
    raise RuntimeError(
        f"Conditional rounding failed {MAX_ROUNDING_ATTEMPTS} times for {pending.size} vector(s): "
        f"their rounded L2 norm stays above {bound:.6g}. This only happens if a vector is "
        "longer than l2_clip; clip it first."
    )


def noise_share(cfg: DdpConfig, rng: np.random.Generator) -> NDArray[np.int64]:
    """One node's noise share: ``cfg.padded_dim`` i.i.d. integers with variance
    ``cfg.local_variance`` (Skellam or discrete Gaussian per ``cfg.mechanism``)."""
    _check_rng(rng)
    if cfg.mechanism is DistributedMechanism.SKELLAM:
        return sample_skellam(cfg.local_variance, cfg.padded_dim, rng)
    return sample_discrete_gaussian(cfg.local_variance, cfg.padded_dim, rng)


def sample_skellam(variance: float, size: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """``size`` draws of Poisson(v/2) - Poisson(v/2): symmetric Skellam with variance ``v``
    (Agarwal et al. 2021, Section 3; the reference draws two Poissons with lambda =
    local_stddev^2 / 2, distributed_skellam_query.py ``add_noise_to_sample``)."""
    v = as_real("variance", variance)
    raise_problems([positive_problem("variance", v)])
    lam = v / 2.0
    return rng.poisson(lam, size).astype(np.int64) - rng.poisson(lam, size).astype(np.int64)


def sample_discrete_gaussian(
    sigma_squared: float, size: int, rng: np.random.Generator
) -> NDArray[np.int64]:
    """``size`` draws of the discrete Gaussian N_Z(0, sigma^2): P(x) proportional to
    exp(-x^2 / (2 sigma^2)) on the integers.

    Canonne, Kamath, Steinke (NeurIPS 2020, "The Discrete Gaussian for Differential Privacy",
    Algorithm 3), vectorized: with t = floor(sigma) + 1, draw Y from the discrete Laplace of scale
    t (difference of two geometric variables of success probability 1 - e^(-1/t)) and accept it
    with probability exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)); redraw the rejected positions.
    """
    s2 = as_real("sigma_squared", sigma_squared)
    raise_problems([positive_problem("sigma_squared", s2)])
    t = math.floor(math.sqrt(s2)) + 1
    p = -math.expm1(-1.0 / t)
    result = np.empty(size, dtype=np.int64)
    pending = np.arange(size)
    for _ in range(_MAX_SAMPLER_ROUNDS):
        if pending.size == 0:
            return result
        count = pending.size
        y = rng.geometric(p, count).astype(np.int64) - rng.geometric(p, count).astype(np.int64)
        excess = np.abs(y) - s2 / t
        accept = rng.random(count) < np.exp(-(excess * excess) / (2.0 * s2))
        result[pending[accept]] = y[accept]
        pending = pending[~accept]
    if pending.size == 0:
        return result
    raise RuntimeError("The discrete Gaussian sampler did not converge; this is a bug.")


def to_modular(values: NDArray[np.int64]) -> NDArray[np.uint32]:
    """``values mod 2^32`` as uint32 (two's complement), ready for SecAgg+ masking."""
    if not isinstance(values, np.ndarray) or values.dtype != np.int64:
        dtype = getattr(values, "dtype", type(values).__name__)
        raise TypeError(f"`values` must be an int64 numpy array. Found {dtype}.")
    return np.bitwise_and(values, np.int64(0xFFFFFFFF)).astype(np.uint32)


def encode_and_noise(
    x: NDArray[np.floating],
    cfg: DdpConfig,
    *,
    rotation_seed: bytes,
    rng: np.random.Generator,
) -> NDArray[np.uint32]:
    """A node's whole contribution: ``to_modular(encode(x) + noise_share())`` (uint32, padded)."""
    return to_modular(encode(x, cfg, rotation_seed=rotation_seed, rng=rng) + noise_share(cfg, rng))


# --------------------------------------------------------------------------- server side


def decode_sum(
    total: NDArray[np.uint32], cfg: DdpConfig, *, rotation_seed: bytes
) -> NDArray[np.float64]:
    """The real-valued sum (shape ``(dim,)``) from the unmasked uint32 sum of node contributions.

    Reduces mod 2^b, lifts to the centred range [-2^(b-1), 2^(b-1)), multiplies by ``gamma``,
    applies the inverse rotation and drops the padding. No count of summands is needed: the
    encoding is centred. Coordinates whose true sum left that range come back wrapped (see
    ``DdpConfig.wrap_probability_bound``).
    """
    if not isinstance(total, np.ndarray) or total.dtype != np.uint32:
        dtype = getattr(total, "dtype", type(total).__name__)
        raise TypeError(f"`total` must be a uint32 numpy array. Found {dtype}.")
    if total.shape != (cfg.padded_dim,):
        raise ValueError(
            f"`total` must have shape ({cfg.padded_dim},) (the padded dimension). "
            f"Found {total.shape}."
        )
    bits = cfg.modulus_bits
    residues = np.bitwise_and(total.astype(np.int64), np.int64((1 << bits) - 1))
    centred = np.where(residues >= 1 << (bits - 1), residues - (1 << bits), residues)
    return unrotate(
        centred.astype(np.float64) * cfg.gamma, rotation_seed=rotation_seed, dim=cfg.dim
    )


# --------------------------------------------------------------------------- helpers


def _check_rng(rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"`rng` must be a numpy.random.Generator (the node's own, e.g. secure_rng()). "
            f"Found {type(rng).__name__}."
        )


def _as_vectors(x: object, dim: int | None) -> NDArray[np.float64]:
    """``x`` as a finite float64 2-D array of rows (a copy); checks the dtype and shape."""
    if not isinstance(x, np.ndarray) or not np.issubdtype(x.dtype, np.floating):
        dtype = getattr(x, "dtype", type(x).__name__)
        raise TypeError(f"`x` must be a float numpy array (float64 or float32). Found {dtype}.")
    if x.ndim not in (1, 2) or (dim is not None and x.shape[-1] != dim):
        expected = "(dim,) or (n, dim)" if dim is None else f"({dim},) or (n, {dim})"
        raise ValueError(f"`x` must have shape {expected}. Found {x.shape}.")
    if x.shape[-1] == 0:
        raise ValueError(f"`x` must have at least one coordinate. Found shape {x.shape}.")
    values = np.array(x, dtype=np.float64).reshape(-1, x.shape[-1])
    if not np.isfinite(values).all():
        raise ValueError(
            "`x` contains NaN or Inf; refusing to encode it. Fix the local training (diverged?)."
        )
    return values
