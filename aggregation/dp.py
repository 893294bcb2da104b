"""Node-level differential privacy for federated aggregation (DP-FedAvg).

DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning Differentially Private Recurrent
Language Models"): each node clips its whole update to global L2 norm ``C``
(:func:`clip_for_submission`); the server adds Gaussian noise ``N(0, (z * C)^2 I)`` to the
*sum* of the clipped updates and divides by the *expected* number of contributions
(:class:`CentralDP`). One round is one Poisson-subsampled Gaussian mechanism, composed by
:mod:`aggregation.accountant`.

Units: a *noise multiplier* ``z`` is unitless (noise standard deviation / L2 sensitivity); a
*noise standard deviation* is ``z * C``, in update units, on the sum.

Assumptions (threat model): node-level add/remove adjacency; the server that adds the noise is
trusted to add it (central DP) -- with secure aggregation it only ever sees the sum, clients
clip before masking and the noise goes onto the unmasked sum; clients clip honestly (with
secure aggregation the server cannot check it); nodes are sampled independently with rate
``q`` (see :func:`node_sample_rate`). Noise comes from an injected ``numpy.random.Generator``;
production uses :func:`secure_generator`. Floating-point Gaussian sampling is not exactly DP
(Mironov 2012, "On Significance of the Least Significant Bits for DP"); the distributed
discrete-Gaussian mode is the answer to that, not this module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

from aggregation.accountant import (
    AccountantKind,
    PrivacyEvent,
    SubsampledGaussianEvent,
    as_real,
    compute_epsilon,
    delta_problem,
    positive_problem,
    raise_problems,
    sample_rate_problem,
)
from aggregation.types import FloatArray, Measurements, Update


class DPMeasurement(StrEnum):
    """Keys of the measurements :meth:`CentralDP.aggregate` returns.

    Keys marked *diagnostic* are computed from noiseless statistics of the clients' updates;
    they are not covered by the DP guarantee (show them to the operator, don't publish them).
    """

    CLIPPING_NORM = "dp_clipping_norm"
    NOISE_MULTIPLIER = "dp_noise_multiplier"
    VALUE_NOISE_MULTIPLIER = "dp_value_noise_multiplier"
    NOISE_STDDEV = "dp_noise_stddev"
    NOISE_STDDEV_MEAN = "dp_noise_stddev_mean"
    N_CONTRIBUTIONS = "dp_n_contributions"
    """Diagnostic."""
    EXPECTED_COUNT = "dp_expected_count"
    NUM_CLIPPED = "dp_num_clipped"
    """Diagnostic."""
    MEAN_PRECLIP_NORM = "dp_mean_preclip_norm"
    """Diagnostic."""
    NOISE_TO_SIGNAL = "dp_noise_to_signal"
    """Diagnostic: noise std * sqrt(P) / ||noiseless sum|| (inf for a zero sum)."""
    UNCLIPPED_FRACTION_NOISED = "dp_unclipped_fraction_noised"
    """Adaptive clipping only; privatised (its noise is part of the accounted cost)."""
    NEXT_CLIPPING_NORM = "dp_next_clipping_norm"


# --------------------------------------------------------------------------- randomness


def secure_generator() -> np.random.Generator:
    """A noise generator seeded with 256 bits from ``os.urandom``.

    The seed is unpredictable; the stream itself is PCG64, not a cryptographic generator.
    """
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "big")))


# --------------------------------------------------------------------------- clipping


def _check_update(
    update: Sequence[FloatArray], name: str = "update", *, allow_float64: bool = False
) -> None:
    if not isinstance(update, Sequence) or isinstance(update, np.ndarray):
        raise TypeError(f"`{name}` must be a list of float32 arrays. Found {type(update)}.")
    for i, array in enumerate(update):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"`{name}[{i}]` must be a numpy array. Found {type(array)}.")
        if array.dtype != np.float32 and not (allow_float64 and array.dtype == np.float64):
            raise TypeError(
                f"`{name}[{i}]` must have dtype float32. Found {array.dtype}; "
                "convert with `.astype(np.float32)`."
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(
                f"`{name}[{i}]` contains NaN or Inf; the update cannot be clipped. "
                "Check the local training for divergence."
            )


def global_norm(update: Sequence[NDArray[np.float32]]) -> float:
    """L2 norm of all arrays together (as one flat vector), computed in float64."""
    _check_update(update)
    total = sum(
        float(np.dot(a.ravel().astype(np.float64), a.ravel().astype(np.float64))) for a in update
    )
    return math.sqrt(total)


@dataclass(frozen=True)
class ClippedUpdate:
    """A clipped update, with its pre-clip global L2 norm."""

    update: Update
    norm: float
    clipping_norm: float

    @property
    def was_clipped(self) -> bool:
        """Whether clipping scaled the update down (``norm > clipping_norm``)."""
        return self.norm > self.clipping_norm

    def summable(self) -> Update:
        """The update followed by two 0-d float32 arrays: ``was_clipped`` and ``norm``.

        Sum these (plainly or with secure aggregation) and split the result with
        :func:`split_clip_stats`; the server then learns only the sums.
        """
        return [
            *self.update,
            np.array(float(self.was_clipped), dtype=np.float32),
            np.array(self.norm, dtype=np.float32),
        ]


def clip_update(update: Sequence[NDArray[np.float32]], *, clipping_norm: float) -> ClippedUpdate:
    """Scale ``update`` so its global L2 norm is at most ``clipping_norm``; new arrays.

    Below the clipping norm the values are unchanged (copied). Raises ``ValueError`` on NaN
    or Inf, ``TypeError`` on non-float32 arrays.
    """
    c = as_real("clipping_norm", clipping_norm)
    raise_problems([positive_problem("clipping_norm", c)])
    norm = global_norm(update)
    if norm <= c:
        return ClippedUpdate([np.array(a, dtype=np.float32) for a in update], norm, c)
    scale = c / norm
    while True:
        # np.asarray: arithmetic on a 0-d array yields a numpy scalar, not an array.
        clipped = [np.asarray(a.astype(np.float64) * scale, dtype=np.float32) for a in update]
        # Rounding to float32 can leave the norm a few ulps above c (an update in a few
        # coordinates, each rounded up); a strict check downstream (the DDP encoder) would
        # then refuse the node. Shrink until the float32 vector itself is within c.
        if global_norm(clipped) <= c:
            return ClippedUpdate(clipped, norm, c)
        scale *= 1.0 - 2.0**-20


def clip_for_submission(
    update: Sequence[NDArray[np.float32]], *, clipping_norm: float
) -> ClippedUpdate:
    """Client side of DP-FedAvg: clip the update before it is sent (or masked).

    The clipping norm is the round's (``DPState.clipping_norm``, from the round config).
    """
    return clip_update(update, clipping_norm=clipping_norm)


@dataclass(frozen=True)
class ClipStats:
    """Sums over the contributing clients: how many were clipped and their pre-clip norms."""

    num_clipped: int
    norm_sum: float

    @classmethod
    def of(cls, clipped: Iterable[ClippedUpdate]) -> ClipStats:
        items = list(clipped)
        return cls(sum(c.was_clipped for c in items), sum(c.norm for c in items))


def split_clip_stats(summed: Sequence[NDArray[np.float32]]) -> tuple[Update, ClipStats]:
    """Undo :meth:`ClippedUpdate.summable` on a sum: (sum of updates, clip statistics)."""
    if len(summed) < 2 or summed[-1].shape != () or summed[-2].shape != ():
        raise ValueError(
            "`summed` must end with the two 0-d arrays that ClippedUpdate.summable() appends."
        )
    return list(summed[:-2]), ClipStats(round(float(summed[-2])), float(summed[-1]))


def sum_clipped(clipped: Sequence[ClippedUpdate]) -> tuple[Update, ClipStats]:
    """Plain (non-secure) summation of clipped updates, in float64, returned as float32."""
    if not clipped:
        raise ValueError("`clipped` is empty; with no contributions pass a zero sum instead.")
    shapes = [a.shape for a in clipped[0].update]
    for i, c in enumerate(clipped):
        if [a.shape for a in c.update] != shapes:
            raise ValueError(f"Update {i} has shapes that differ from update 0's {shapes}.")
    total = [
        np.asarray(
            np.sum([c.update[j].astype(np.float64) for c in clipped], axis=0), dtype=np.float32
        )
        for j in range(len(shapes))
    ]
    return total, ClipStats.of(clipped)


# --------------------------------------------------------------------------- calibration


def node_sample_rate(*, clients_per_round: int, population: int) -> float:
    """``q = clients_per_round / population``, the per-round sampling rate of a node.

    Exact for Poisson sampling with expected ``clients_per_round`` nodes; for fixed-size uniform
    sampling it is the customary approximation (see :mod:`aggregation.accountant`).
    """
    problems: list[str | None] = []
    if clients_per_round < 1:
        problems.append(f"`clients_per_round` must be >= 1. Found {clients_per_round}.")
    if population < 1:
        problems.append(f"`population` must be >= 1. Found {population}.")
    elif clients_per_round > population:
        problems.append(
            f"`clients_per_round` ({clients_per_round}) must not exceed `population` "
            f"({population})."
        )
    raise_problems(problems)
    return clients_per_round / population


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    rounds: int,
    accountant: AccountantKind | str = AccountantKind.RDP,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) with epsilon <= target after
    ``rounds`` rounds at sampling rate ``sample_rate``.

    Opacus's binary search (``get_noise_multiplier``) with the same accountant that will
    compose the rounds, so accounting the planned rounds never overshoots the target.
    """
    eps = as_real("target_epsilon", target_epsilon)
    delta = as_real("target_delta", target_delta)
    q = as_real("sample_rate", sample_rate)
    tol = as_real("epsilon_tolerance", epsilon_tolerance)
    raise_problems(
        [
            positive_problem("target_epsilon", eps),
            delta_problem("target_delta", delta),
            sample_rate_problem("sample_rate", q),
            None
            if isinstance(rounds, int) and rounds >= 1
            else f"`rounds` must be an int >= 1. Found {rounds!r}.",
            positive_problem("epsilon_tolerance", tol),
        ]
    )
    kind = AccountantKind(accountant)
    from opacus.accountants.utils import get_noise_multiplier  # Opacus imports torch: on use

    try:
        sigma = get_noise_multiplier(
            target_epsilon=eps,
            target_delta=delta,
            sample_rate=q,
            steps=int(rounds),
            accountant=kind.value,
            epsilon_tolerance=tol,
        )
    except ValueError as error:
        raise ValueError(
            f"No noise multiplier up to 1e6 reaches epsilon={eps} at delta={delta} over "
            f"{rounds} rounds with sample_rate={q} ({error}). Raise `target_epsilon`, lower "
            "`sample_rate` or plan fewer `rounds`."
        ) from error
    return float(sigma)


# --------------------------------------------------------------------------- clipping policies


@dataclass(frozen=True, kw_only=True)
class FixedClipping:
    """A constant clipping norm ``C`` (update units)."""

    clipping_norm: float

    def __post_init__(self) -> None:
        c = as_real("clipping_norm", self.clipping_norm)
        raise_problems([positive_problem("clipping_norm", c)])
        object.__setattr__(self, "clipping_norm", c)


@dataclass(frozen=True, kw_only=True)
class AdaptiveClipping:
    """Quantile-based adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021,
    "Differentially Private Learning with Adaptive Clipping").

    After each round ``C <- C * exp(-learning_rate * (b - target_quantile))`` where ``b`` is the
    noised fraction of contributions whose norm was at most ``C``: each client contributes
    ``b_i - 1/2`` (sensitivity 1/2), the server adds ``N(0, clipped_count_stddev^2)`` to their
    sum and divides by the expected count. ``clipped_count_stddev`` (sigma_b) is in counts; the
    paper suggests ``expected_count / 20``.

    Noise split: for a total (accounted) noise multiplier ``z``, the update sum gets
    ``z_value = (z^-2 - (2 sigma_b)^-2)^-1/2``, so the two Gaussian releases together cost
    exactly one Gaussian mechanism with multiplier ``z``. Requires ``2 sigma_b > z``.
    """

    initial_clipping_norm: float
    clipped_count_stddev: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2

    def __post_init__(self) -> None:
        c = as_real("initial_clipping_norm", self.initial_clipping_norm)
        sb = as_real("clipped_count_stddev", self.clipped_count_stddev)
        gamma = as_real("target_quantile", self.target_quantile)
        lr = as_real("learning_rate", self.learning_rate)
        raise_problems(
            [
                positive_problem("initial_clipping_norm", c),
                positive_problem("clipped_count_stddev", sb),
                None
                if 0 <= gamma <= 1
                else f"`target_quantile` must be in [0, 1]. Found {gamma!r}.",
                positive_problem("learning_rate", lr),
            ]
        )
        for name, value in [
            ("initial_clipping_norm", c),
            ("clipped_count_stddev", sb),
            ("target_quantile", gamma),
            ("learning_rate", lr),
        ]:
            object.__setattr__(self, name, value)


ClippingPolicy = FixedClipping | AdaptiveClipping


@dataclass(frozen=True, kw_only=True)
class DPState:
    """Server-side DP state between rounds: the clipping norm clients use next round."""

    clipping_norm: float
    rounds: int = 0


@dataclass(frozen=True)
class DPAggregate:
    """Result of one :meth:`CentralDP.aggregate`: next state, noised mean, measurements."""

    state: DPState
    update: Update
    measurements: Measurements


# --------------------------------------------------------------------------- server step


class CentralDP:
    """Server side of DP-FedAvg: Gaussian noise on the sum, fixed-denominator mean.

    ``noise_multiplier`` is the total, accounted multiplier ``z`` (unitless). With
    :class:`AdaptiveClipping` part of the budget goes to the clipped count and the sum gets
    :attr:`value_noise_multiplier` (>= ``z``); with :class:`FixedClipping` they are equal.
    """

    def __init__(self, *, noise_multiplier: float, clipping: ClippingPolicy) -> None:
        z = as_real("noise_multiplier", noise_multiplier)
        if not isinstance(clipping, FixedClipping | AdaptiveClipping):
            raise TypeError(
                "`clipping` must be FixedClipping or AdaptiveClipping. "
                f"Found {type(clipping).__name__}."
            )
        problems = [positive_problem("noise_multiplier", z)]
        if (
            problems[0] is None
            and isinstance(clipping, AdaptiveClipping)
            and not 2 * clipping.clipped_count_stddev > z
        ):
            problems.append(
                f"`clipped_count_stddev` must be greater than noise_multiplier / 2 = {z / 2:g} "
                "so that the update noise multiplier (z^-2 - (2 sigma_b)^-2)^-1/2 is finite. "
                f"Found {clipping.clipped_count_stddev!r}."
            )
        raise_problems(problems)
        self._z = z
        self._clipping = clipping
        if isinstance(clipping, AdaptiveClipping):
            self._z_value = 1.0 / math.sqrt(z**-2 - (2 * clipping.clipped_count_stddev) ** -2)
        else:
            self._z_value = z

    @classmethod
    def from_target(
        cls,
        *,
        target_epsilon: float,
        target_delta: float,
        sample_rate: float,
        rounds: int,
        clipping: ClippingPolicy,
        accountant: AccountantKind | str = AccountantKind.RDP,
    ) -> CentralDP:
        """Calibrate ``z`` so ``rounds`` rounds at ``sample_rate`` stay within the target."""
        z = calibrate_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            rounds=rounds,
            accountant=accountant,
        )
        return cls(noise_multiplier=z, clipping=clipping)

    @property
    def noise_multiplier(self) -> float:
        """Total noise multiplier ``z``: what the accountant composes each round."""
        return self._z

    @property
    def value_noise_multiplier(self) -> float:
        """Noise multiplier applied to the sum of updates (``z`` unless adaptive)."""
        return self._z_value

    @property
    def clipping(self) -> ClippingPolicy:
        return self._clipping

    def initial_state(self) -> DPState:
        c = self._clipping
        norm = c.clipping_norm if isinstance(c, FixedClipping) else c.initial_clipping_norm
        return DPState(clipping_norm=norm)

    def event(self, *, sample_rate: float) -> SubsampledGaussianEvent:
        """The accountant event of one round (check it against the budget before the round)."""
        return SubsampledGaussianEvent(noise_multiplier=self._z, sample_rate=sample_rate)

    def aggregate(
        self,
        state: DPState,
        sum_update: Sequence[FloatArray],
        *,
        n_contributions: int,
        expected_count: float,
        rng: np.random.Generator,
        clip_stats: ClipStats | None = None,
    ) -> DPAggregate:
        """Noise the sum of clipped updates and divide by ``expected_count``.

        ``sum_update`` is the sum of ``n_contributions`` updates clipped to
        ``state.clipping_norm`` (plain or secure sum; float32 or float64, e.g. straight from
        secure aggregation's dequantized sum); the mean comes back as float32.

        The denominator is fixed (the expected count, e.g. ``q * population``), not the
        realised ``n_contributions``: then one node moves the mean by at most
        ``C / expected_count`` and the released update carries no extra, un-noised signal
        about how many took part (McMahan et al. 2018, fixed-denominator estimator). Dropouts
        thus shrink the mean a little but never void the round: noise is still added to the
        sum of whoever contributed. ``clip_stats`` (sums over the contributors) is required
        for adaptive clipping.
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"`rng` must be a numpy.random.Generator. Found {type(rng)}.")
        _check_update(sum_update, "sum_update", allow_float64=True)
        m = as_real("expected_count", expected_count)
        problems = [positive_problem("expected_count", m)]
        if n_contributions < 0:
            problems.append(f"`n_contributions` must be >= 0. Found {n_contributions}.")
        adaptive = self._clipping if isinstance(self._clipping, AdaptiveClipping) else None
        if adaptive is not None and clip_stats is None:
            problems.append("`clip_stats` is required with adaptive clipping.")
        if clip_stats is not None and not 0 <= clip_stats.num_clipped <= n_contributions:
            problems.append(
                f"`clip_stats.num_clipped` must be in [0, n_contributions={n_contributions}]. "
                f"Found {clip_stats.num_clipped}."
            )
        raise_problems(problems)

        c = state.clipping_norm
        stddev = self._z_value * c
        noised = [
            np.asarray(
                (a.astype(np.float64) + stddev * rng.standard_normal(a.shape)) / m,
                dtype=np.float32,
            )
            for a in sum_update
        ]
        size = sum(a.size for a in sum_update)
        sum_norm = math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in sum_update))
        measurements: Measurements = {
            DPMeasurement.CLIPPING_NORM: c,
            DPMeasurement.NOISE_MULTIPLIER: self._z,
            DPMeasurement.VALUE_NOISE_MULTIPLIER: self._z_value,
            DPMeasurement.NOISE_STDDEV: stddev,
            DPMeasurement.NOISE_STDDEV_MEAN: stddev / m,
            DPMeasurement.N_CONTRIBUTIONS: n_contributions,
            DPMeasurement.EXPECTED_COUNT: m,
            DPMeasurement.NOISE_TO_SIGNAL: (
                stddev * math.sqrt(size) / sum_norm if sum_norm > 0 else math.inf
            ),
        }
        if clip_stats is not None:
            measurements[DPMeasurement.NUM_CLIPPED] = clip_stats.num_clipped
            if n_contributions > 0:
                measurements[DPMeasurement.MEAN_PRECLIP_NORM] = (
                    clip_stats.norm_sum / n_contributions
                )

        next_norm = c
        if adaptive is not None and clip_stats is not None:
            unclipped = n_contributions - clip_stats.num_clipped
            centred = unclipped - n_contributions / 2
            noised_count = centred + adaptive.clipped_count_stddev * float(rng.standard_normal())
            fraction = noised_count / m + 0.5
            next_norm = c * math.exp(
                -adaptive.learning_rate * (fraction - adaptive.target_quantile)
            )
            measurements[DPMeasurement.UNCLIPPED_FRACTION_NOISED] = fraction
        measurements[DPMeasurement.NEXT_CLIPPING_NORM] = next_norm
        next_state = DPState(clipping_norm=next_norm, rounds=state.rounds + 1)
        return DPAggregate(next_state, noised, measurements)


def calibrate_for_events(
    *,
    target_epsilon: float,
    target_delta: float,
    events_for: Callable[[float], Sequence[PrivacyEvent]],
    accountant: AccountantKind | str = AccountantKind.RDP,
    epsilon_tolerance: float = 0.01,
    lower: float = 0.05,
    upper: float = 1e4,
) -> float:
    """Smallest noise multiplier ``z`` (to ``epsilon_tolerance``) whose run of events
    ``events_for(z)`` stays within ``target_epsilon`` at ``target_delta``.

    For runs that mix releases with a fixed noise multiplier (e.g. metric sums) and releases
    calibrated here: ``events_for`` returns the whole run for a candidate ``z``. Epsilon falls
    as ``z`` grows, so the search doubles up from ``lower`` (a known lower bound makes it
    fast: accounting a huge ``z`` is slow in Opacus) to a bracket, then bisects; the result
    never overshoots the target. Raises ``ValueError`` when even ``upper`` does not reach it
    (the fixed releases alone exceed the target).
    """
    eps = as_real("target_epsilon", target_epsilon)
    delta = as_real("target_delta", target_delta)
    raise_problems(
        [
            positive_problem("target_epsilon", eps),
            delta_problem("target_delta", delta),
            positive_problem("lower", as_real("lower", lower)),
        ]
    )
    kind = AccountantKind(accountant)

    def epsilon(z: float) -> float:
        return compute_epsilon(list(events_for(z)), delta=delta, kind=kind)

    low, high = 0.0, max(lower, 1e-3)
    while epsilon(high) > eps:  # bracket: eps(low) > target >= eps(high)
        low, high = high, high * 2
        if high > upper:
            raise ValueError(
                f"No noise multiplier up to {upper:g} reaches epsilon={eps} at delta={delta}: "
                "the releases with a fixed noise multiplier (e.g. metrics) already spend more. "
                "Raise the target epsilon or the metrics noise multiplier, or plan fewer rounds."
            )
    while high - low > 1e-4 * high and epsilon(high) < eps - epsilon_tolerance:
        mid = (low + high) / 2
        if epsilon(mid) <= eps:
            high = mid
        else:
            low = mid
    return float(high)
