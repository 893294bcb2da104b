"""Renyi-DP accounting of the distributed DP mechanism (:mod:`aggregation.ddp`).

One release of the sum of rounded vectors plus ``noise_shares`` integer noise shares is a
:class:`DistributedDpEvent`; its RDP curve comes from the papers' closed forms, in *integer
units* (the sensitivities and variances of :class:`aggregation.ddp.DdpConfig`):

- Skellam (Agarwal, Kairouz, Liu, NeurIPS 2021, RDP of the multi-dimensional Skellam mechanism),
  with mu the variance of the summed noise (the reference's ``central_var``; the paper's
  Sk_(0,mu') = Poisson(mu') - Poisson(mu') has variance mu = 2 mu')::

      eps(a) = a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))

  (google-research/federated distributed_dp/accounting_utils.py at commit 5e27a86, L491-497
  ``_skellam_rdp``, there in real units; dividing sensitivities by gamma and mu by gamma^2
  gives this form).
- Distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021, Proposition 14 with tau from
  Theorem 1): n shares of N_Z(0, sigma^2), s2 = D2 / sqrt(n sigma^2), s1 = D1 / sqrt(n sigma^2),
  tau = 10 sum_(k=1)^(n-1) exp(-2 pi^2 sigma^2 k / (k + 1))::

      eps(a) = min(a/2 s2^2 + tau d,  a/2 (s2^2 + 2 s1 tau + tau^2 d),  a/2 (s2 + sqrt(d) tau)^2)

  (accounting_utils.py L313-356 ``compute_rdp_dgaussian`` and L378-381 for tau).
- Poisson subsampling with rate q < 1: the general upper bound of Zhu & Wang (ICML 2019,
  "Poisson Subsampled Renyi Differential Privacy"; optimal up to log(3)/(a-1)), valid for any
  mechanism at integer orders a >= 2::

      eps_q(a) = 1/(a-1) log[(1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^eps(2)
                             + 3 sum_(l=3)^a C(a,l) q^l (1-q)^(a-l) e^((l-1) eps(l))]

  and never more than the unamplified eps(a) (accounting_utils.py L37-77
  ``_compute_rdp_subsampled(upper_bound=True)``, and its min with ``eps`` in L350-354).

A fractional order a is evaluated at ceil(a): Renyi divergence does not decrease with the
order, so this is a valid (slightly loose) bound and the closed forms are only used at
integer orders, where the papers and the reference code use them.

Assumptions: as in :mod:`aggregation.ddp` -- every release sums at least ``noise_shares``
honest shares; adjacency changes one unit's vector (norm <= C) while the shares stay.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray
from scipy import special

from aggregation.ddp import DdpConfig, DistributedMechanism
from aggregation.validation import (
    JSONValue,
    as_int,
    as_real,
    delta_problem,
    positive_problem,
    raise_problems,
    sample_rate_problem,
)

__all__ = [
    "OPACUS_ORDERS",
    "RDP_ORDERS",
    "DistributedDpEvent",
    "calibrate_noise_multiplier",
    "ddgauss_rdp",
    "ddgauss_tau",
    "poisson_subsampled_rdp",
    "skellam_rdp",
]

OPACUS_ORDERS: Final[tuple[float, ...]] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
)
"""Opacus's ``RDPAccountant.DEFAULT_ALPHAS``, written out so that importing the accountant does
not import Opacus (and with it torch); a test checks that they are equal."""

RDP_ORDERS: Final[tuple[float, ...]] = (
    *OPACUS_ORDERS,
    *(64, 80, 96, 112, 128, 160, 192, 224, 256),
)
"""The orders over which the accountant composes mixed histories: Opacus's default orders
(which give Gaussian-only histories their usual epsilon) plus larger integer orders, at which
strongly private distributed-DP histories are often optimal."""

_EVENT_FIELDS: Final = (
    "mechanism",
    "dim",
    "l1_sensitivity",
    "l2_sensitivity",
    "local_variance",
    "noise_shares",
    "sample_rate",
    "steps",
)

_DESCRIPTIONS: Final = {
    DistributedMechanism.SKELLAM: "distributed Skellam (Agarwal, Kairouz, Liu 2021)",
    DistributedMechanism.DGAUSS: "distributed discrete Gaussian (Kairouz, Liu, Steinke 2021)",
}

RdpFunction = Callable[[NDArray[np.float64]], NDArray[np.float64]]


def _integer_orders(orders: Sequence[float] | NDArray[np.float64]) -> NDArray[np.float64]:
    """``ceil(orders)`` as float64, after checking every order is > 1 and finite."""
    values = np.asarray(orders, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.all(np.isfinite(values) & (values > 1)):
        raise ValueError(f"`orders` must be a non-empty list of finite orders > 1. Found {orders}.")
    return np.ceil(values)


def skellam_rdp(
    orders: Sequence[float] | NDArray[np.float64],
    *,
    l1_sensitivity: float,
    l2_sensitivity: float,
    variance: float,
) -> NDArray[np.float64]:
    """RDP of one release of the multi-dimensional Skellam mechanism at ``ceil(orders)``.

    ``variance`` is mu, the variance per coordinate of the summed noise; all in integer units.
    """
    a = _integer_orders(orders)
    d1, d2, mu = l1_sensitivity, l2_sensitivity, variance
    gaussian = a * d2 * d2 / (2 * mu)
    correction = np.minimum(((2 * a - 1) * d2 * d2 + 6 * d1) / (4 * mu * mu), 3 * d1 / (2 * mu))
    result: NDArray[np.float64] = gaussian + correction
    return result


def ddgauss_tau(local_variance: float, noise_shares: int) -> float:
    """tau = 10 sum_(k=1)^(n-1) exp(-2 pi^2 sigma^2 k / (k+1)) (Kairouz et al. Theorem 1).

    Measures how far the sum of n discrete Gaussians N_Z(0, sigma^2) is from one discrete
    Gaussian N_Z(0, n sigma^2); 0 for a single share.
    """
    k = np.arange(1, noise_shares, dtype=np.float64)
    return 10.0 * float(np.sum(np.exp(-2 * math.pi**2 * local_variance * k / (k + 1))))


def ddgauss_rdp(
    orders: Sequence[float] | NDArray[np.float64],
    *,
    l1_sensitivity: float,
    l2_sensitivity: float,
    local_variance: float,
    noise_shares: int,
    dim: int,
) -> NDArray[np.float64]:
    """RDP of one release of the distributed discrete Gaussian at ``ceil(orders)``
    (Kairouz et al. Proposition 14); integer units, ``dim`` the (padded) dimension."""
    a = _integer_orders(orders)
    tau = ddgauss_tau(local_variance, noise_shares)
    scale = math.sqrt(noise_shares * local_variance)
    s1, s2 = l1_sensitivity / scale, l2_sensitivity / scale
    term_1 = a / 2 * s2 * s2 + tau * dim
    term_2 = a / 2 * (s2 * s2 + 2 * s1 * tau + tau * tau * dim)
    term_3 = a / 2 * (s2 + math.sqrt(dim) * tau) ** 2
    result: NDArray[np.float64] = np.minimum(np.minimum(term_1, term_2), term_3)
    return result


def poisson_subsampled_rdp(
    rdp: RdpFunction,
    *,
    sample_rate: float,
    orders: Sequence[float] | NDArray[np.float64],
) -> NDArray[np.float64]:
    """RDP at ``orders`` of the mechanism with RDP curve ``rdp`` run on a Poisson sample of rate
    q: Zhu & Wang's general upper bound at ``ceil(order)``, capped by the unamplified curve.

    ``rdp`` maps an array of integer orders (as float64) to the mechanism's RDP there.
    """
    q = as_real("sample_rate", sample_rate)
    raise_problems([sample_rate_problem("sample_rate", q)])
    ceiled = _integer_orders(orders)
    unamplified = rdp(ceiled)
    if q == 1.0:
        return unamplified
    top = int(ceiled.max())
    ell = np.arange(top + 1, dtype=np.float64)  # l = 0..top; l = 0, 1 are masked out below
    base = np.zeros(top + 1)
    base[2:] = rdp(ell[2:])
    alphas = np.unique(ceiled)
    a = alphas[:, None]
    log_q, log_1mq = math.log(q), math.log1p(-q)
    log_comb = special.gammaln(a + 1) - special.gammaln(ell + 1) - special.gammaln(a - ell + 1)
    terms = log_comb + ell * log_q + (a - ell) * log_1mq + (ell - 1) * base
    terms[:, 3:] += math.log(3)
    terms = np.where((ell >= 2) & (ell <= a), terms, -np.inf)
    first = (alphas - 1) * log_1mq + np.log1p((alphas - 1) * q)  # (1-q)^(a-1) (a q - q + 1)
    total = special.logsumexp(np.column_stack([first, terms]), axis=1)
    amplified = dict(zip(alphas.tolist(), (total / (alphas - 1)).tolist(), strict=True))
    result: NDArray[np.float64] = np.minimum(
        np.array([amplified[value] for value in ceiled.tolist()]), unamplified
    )
    return result


@dataclass(frozen=True, kw_only=True)
class DistributedDpEvent:
    """``steps`` releases of a distributed DP sum (:mod:`aggregation.ddp`), in integer units.

    ``l1_sensitivity`` / ``l2_sensitivity``: the bounds on one unit's rounded vector;
    ``local_variance``: one noise share's variance; ``noise_shares``: the number of honest
    shares every released sum carries (``min_survivors``); ``dim``: the padded dimension;
    ``sample_rate``: the Poisson rate at which a unit takes part (1.0: no amplification).
    Build it from the mechanism's configuration with :meth:`from_config`.
    """

    mechanism: DistributedMechanism
    dim: int
    l1_sensitivity: float
    l2_sensitivity: float
    local_variance: float
    noise_shares: int
    sample_rate: float = 1.0
    steps: int = 1

    def __post_init__(self) -> None:
        try:
            mechanism = DistributedMechanism(self.mechanism)
        except ValueError:
            raise ValueError(
                f"`mechanism` must be one of {[m.value for m in DistributedMechanism]}. "
                f"Found {self.mechanism!r}."
            ) from None
        dim = as_int("dim", self.dim)
        l1 = as_real("l1_sensitivity", self.l1_sensitivity)
        l2 = as_real("l2_sensitivity", self.l2_sensitivity)
        variance = as_real("local_variance", self.local_variance)
        shares = as_int("noise_shares", self.noise_shares)
        q = as_real("sample_rate", self.sample_rate)
        steps = as_int("steps", self.steps)
        raise_problems(
            [
                None if dim >= 1 else f"`dim` must be at least 1. Found {dim}.",
                positive_problem("l1_sensitivity", l1),
                positive_problem("l2_sensitivity", l2),
                positive_problem("local_variance", variance),
                None if shares >= 1 else f"`noise_shares` must be at least 1. Found {shares}.",
                sample_rate_problem("sample_rate", q),
                None if steps >= 1 else f"`steps` must be >= 1. Found {steps}.",
            ]
        )
        for name, value in [
            ("mechanism", mechanism),
            ("dim", dim),
            ("l1_sensitivity", l1),
            ("l2_sensitivity", l2),
            ("local_variance", variance),
            ("noise_shares", shares),
            ("sample_rate", q),
            ("steps", steps),
        ]:
            object.__setattr__(self, name, value)

    @classmethod
    def from_config(
        cls, config: DdpConfig, *, sample_rate: float = 1.0, steps: int = 1
    ) -> DistributedDpEvent:
        """The event of ``steps`` releases under ``config`` (its ``min_survivors`` shares)."""
        if not isinstance(config, DdpConfig):
            raise TypeError(f"`config` must be a DdpConfig. Found {type(config).__name__}.")
        return cls(
            mechanism=config.mechanism,
            dim=config.padded_dim,
            l1_sensitivity=config.l1_sensitivity,
            l2_sensitivity=config.l2_sensitivity,
            local_variance=config.local_variance,
            noise_shares=config.min_survivors,
            sample_rate=sample_rate,
            steps=steps,
        )

    @property
    def noise_variance(self) -> float:
        """Variance of the summed noise per coordinate: ``noise_shares * local_variance``."""
        return self.noise_shares * self.local_variance

    def describe(self) -> str:
        """What is accounted, for the manifest (e.g. 'distributed Skellam (...), RDP, ...')."""
        sampling = (
            "no subsampling"
            if self.sample_rate == 1.0
            else "Poisson subsampling bound of Zhu & Wang 2019"
        )
        return f"{_DESCRIPTIONS[self.mechanism]}, RDP closed form, {sampling}"

    def rdp(self, orders: Sequence[float] | NDArray[np.float64]) -> NDArray[np.float64]:
        """RDP of all ``steps`` releases at ``orders`` (fractional orders at their ceiling)."""
        return _per_step_rdp(dataclasses.replace(self, steps=1), tuple(map(float, orders))) * (
            self.steps
        )

    def base_rdp(self, orders: NDArray[np.float64]) -> NDArray[np.float64]:
        """RDP of one release without subsampling, at ``ceil(orders)``."""
        if self.mechanism is DistributedMechanism.SKELLAM:
            return skellam_rdp(
                orders,
                l1_sensitivity=self.l1_sensitivity,
                l2_sensitivity=self.l2_sensitivity,
                variance=self.noise_variance,
            )
        return ddgauss_rdp(
            orders,
            l1_sensitivity=self.l1_sensitivity,
            l2_sensitivity=self.l2_sensitivity,
            local_variance=self.local_variance,
            noise_shares=self.noise_shares,
            dim=self.dim,
        )

    def to_json(self) -> dict[str, JSONValue]:
        """A JSON-serialisable dict (for checkpoints)."""
        return {
            "mechanism": self.mechanism.value,
            "dim": self.dim,
            "l1_sensitivity": self.l1_sensitivity,
            "l2_sensitivity": self.l2_sensitivity,
            "local_variance": self.local_variance,
            "noise_shares": self.noise_shares,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    @classmethod
    def from_json(cls, data: object) -> DistributedDpEvent:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on a malformed entry."""
        if not isinstance(data, Mapping) or set(data) != set(_EVENT_FIELDS):
            raise ValueError(
                f"A distributed DP event must be an object with exactly the keys "
                f"{', '.join(_EVENT_FIELDS)}. Found {data!r}."
            )
        for name in _EVENT_FIELDS[1:]:
            if isinstance(data[name], bool) or not isinstance(data[name], numbers.Real):
                raise ValueError(f"Malformed event {data!r}: `{name}` must be a number.")
        try:
            return cls(
                mechanism=data["mechanism"],
                dim=data["dim"],
                l1_sensitivity=data["l1_sensitivity"],
                l2_sensitivity=data["l2_sensitivity"],
                local_variance=data["local_variance"],
                noise_shares=data["noise_shares"],
                sample_rate=data["sample_rate"],
                steps=data["steps"],
            )
        except TypeError as error:
            raise ValueError(f"Malformed event {data!r}: {error}") from error


@functools.lru_cache(maxsize=256)
def _per_step_rdp(event: DistributedDpEvent, orders: tuple[float, ...]) -> NDArray[np.float64]:
    """One release's RDP curve (cached: an accountant re-evaluates its history on every step)."""
    curve = poisson_subsampled_rdp(event.base_rdp, sample_rate=event.sample_rate, orders=orders)
    curve.setflags(write=False)
    return curve


def calibrate_noise_multiplier(
    config: DdpConfig,
    *,
    target_epsilon: float,
    target_delta: float,
    releases: int,
    sample_rate: float = 1.0,
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier z (to ``epsilon_tolerance``) such that ``releases`` releases
    under ``config`` with z (its own ``noise_multiplier`` is ignored) stay within
    ``target_epsilon`` at ``target_delta``, accounted as the RDP accountant will.

    Binary search as in Opacus's ``get_noise_multiplier``: the returned z is the upper end of
    the bracket, whose epsilon was computed and is <= the target, so it never overshoots. z
    moves gamma and hence the rounding inflation of the sensitivity, so with a fixed
    ``modulus_bits`` epsilon cannot fall below a floor; a target under it is refused.
    """
    eps = as_real("target_epsilon", target_epsilon)
    delta = as_real("target_delta", target_delta)
    q = as_real("sample_rate", sample_rate)
    tol = as_real("epsilon_tolerance", epsilon_tolerance)
    count = as_int("releases", releases)
    if not isinstance(config, DdpConfig):
        raise TypeError(f"`config` must be a DdpConfig. Found {type(config).__name__}.")
    raise_problems(
        [
            positive_problem("target_epsilon", eps),
            delta_problem("target_delta", delta),
            sample_rate_problem("sample_rate", q),
            None if count >= 1 else f"`releases` must be at least 1. Found {count}.",
            positive_problem("epsilon_tolerance", tol),
        ]
    )

    def epsilon(z: float) -> float:
        try:
            candidate = dataclasses.replace(config, noise_multiplier=z)
        except ValueError:  # e.g. discrete Gaussian shares coarser than one integer unit
            return math.inf
        event = DistributedDpEvent.from_config(candidate, sample_rate=q, steps=count)
        from opacus.accountants.analysis.rdp import get_privacy_spent  # on use: imports torch

        value, _ = get_privacy_spent(
            orders=list(RDP_ORDERS), rdp=event.rdp(RDP_ORDERS), delta=delta
        )
        return float(value)

    high, eps_high = 1.0, epsilon(1.0)
    while eps_high > eps:
        if high >= _MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"No noise multiplier up to {_MAX_NOISE_MULTIPLIER:g} reaches epsilon={eps} at "
                f"delta={delta} over {count} releases with sample_rate={q}: the rounding of "
                f"{config.padded_dim} coordinates at {config.modulus_bits} bits leaves too "
                "little room. Raise `target_epsilon` or `modulus_bits`, or plan fewer releases."
            )
        high *= 2.0
        eps_high = epsilon(high)
    low = high / 2.0
    while low > _MIN_NOISE_MULTIPLIER and epsilon(low) <= eps:
        high, low = low, low / 2.0
        eps_high = epsilon(high)
    while eps - eps_high > tol and high - low > 1e-9 * high:
        middle = (low + high) / 2.0
        eps_middle = epsilon(middle)
        if eps_middle <= eps:
            high, eps_high = middle, eps_middle
        else:
            low = middle
    return high


_MAX_NOISE_MULTIPLIER: Final = 1e6
_MIN_NOISE_MULTIPLIER: Final = 1e-6
