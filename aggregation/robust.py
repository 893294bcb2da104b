"""Robust aggregation of individual client updates: weighted mean, median, trimmed mean, Krum.

Every aggregator here has one method, ``aggregate(updates, weights) -> AggregateResult``, and is
stateless. They need to see *individual* updates, which is possible only at privacy levels
``none`` and ``dp`` (central DP adds noise to the aggregate after this step). Under secure
aggregation (``secure-agg``, ``dp+secure-agg``) the server learns only the sum of the updates,
so the only statistic it can form is the (weighted) mean; ``make_aggregator`` refuses anything
else with an error that says so.

Conventions shared by all aggregators:

- ``weights`` are the clients' example counts. They must be finite and positive. Only the
  weighted mean uses them: median, trimmed mean and (Multi-)Krum are unweighted, as in their
  papers, because a Byzantine client can claim any example count.
- **Non-finite updates are rejected, not raised**: a client whose update holds NaN or Inf is
  left out of the round and reported in the measurements (``n_rejected``, ``rejected_clients``,
  ``rejection_reasons``), so one broken device cannot stop a round, and the reliability score
  sees the rejection. If every client is rejected (or too few remain for Krum), ``aggregate``
  raises ``ValueError``.
- Structural problems (no clients, different numbers of tensors or shapes across clients,
  non-floating dtypes, a weight per client missing) raise: they are protocol errors, not data.
- Clients are identified by their position in ``updates``.
- The result is a new list of new float32 arrays; inputs are never modified.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

import numpy as np
from numpy.typing import NDArray
from threadpoolctl import ThreadpoolController

from aggregation.privacy import PrivacyLevel as PrivacyLevel
from aggregation.types import Measurements, Update

try:  # scipy comes with opacus; BLAS axpy makes the weighted mean one pass per client block.
    from scipy.linalg.blas import saxpy as _saxpy
except ImportError:  # pragma: no cover - scipy is a declared dependency
    _saxpy = None

_BLAS_THREADS: Final = 1
"""BLAS threads of the weighted mean's pass. Its BLAS calls are many and small (one saxpy and
one sdot per client block of ``chunk_size`` values, from cache): OpenBLAS's threads cost more
to wake and join than they save there, and on a busy machine (other processes, Ray workers)
a multithreaded call waits for a core -- measured 1-39 % of memcpy speed with OpenBLAS's own
threading against 24-104 % with one thread (benchmarks/bench_averaging.py)."""
_controller: ThreadpoolController | None = None


def _one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """Limit numpy's and scipy's OpenBLAS to :data:`_BLAS_THREADS` for a block of code."""
    global _controller
    if _controller is None:  # finds the loaded BLAS libraries: once per process
        _controller = ThreadpoolController()
    limited: contextlib.AbstractContextManager[object] = _controller.limit(
        limits=_BLAS_THREADS, user_api="blas"
    )
    return limited


__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "AggregateResult",
    "AggregationMethod",
    "Aggregator",
    "CoordinateWiseMedian",
    "Krum",
    "PrivacyLevel",
    "TrimmedMean",
    "WeightedMean",
    "make_aggregator",
]

DEFAULT_CHUNK_SIZE = 1 << 17
"""Elements per block in the weighted mean (512 KiB of float32: stays in L2 while a block of
every client is folded in). Measured best on the benchmark machine, see
``benchmarks/bench_averaging.py``."""


class AggregationMethod(StrEnum):
    """Names accepted by :func:`make_aggregator`."""

    MEAN = "mean"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmed_mean"
    KRUM = "krum"
    MULTI_KRUM = "multi_krum"


@dataclass(frozen=True)
class AggregateResult:
    """The aggregated update and what the aggregator measured while computing it.

    Measurements always hold ``method``, ``n_clients`` (received), ``n_accepted``,
    ``n_rejected``, ``rejected_clients`` (comma-separated positions, ``""`` when none),
    ``rejection_reasons``, ``mean_update_norm`` and ``max_update_norm`` (L2 norm over all tensors,
    over accepted clients) and ``aggregate_norm``; Krum adds ``selected_clients``, the trimmed
    mean ``trimmed_per_side``.
    """

    update: Update
    measurements: Measurements


class Aggregator(Protocol):
    """Combines individual client updates into one update."""

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> AggregateResult:
        """Aggregate ``updates`` (one per client) given each client's example count."""
        ...


# --------------------------------------------------------------------------------------------
# Validation shared by all aggregators


@dataclass(frozen=True)
class _Screened:
    """Positions of the clients kept, their update norms, and the rejected ones with reasons."""

    accepted: list[int]
    rejected: dict[int, str]
    norms: dict[int, float]


def _check_structure(updates: Sequence[Update], weights: Sequence[float]) -> None:
    if len(updates) == 0:
        raise ValueError("`updates` is empty: aggregation needs at least one client update.")
    if len(weights) != len(updates):
        raise ValueError(
            f"`weights` must hold one example count per update. Found {len(weights)} weights "
            f"for {len(updates)} updates."
        )
    for i, w in enumerate(weights):
        wf = float(w)
        if not math.isfinite(wf) or wf <= 0.0:
            raise ValueError(
                f"weight of client {i} must be a finite positive example count. Found {w!r}; "
                "drop clients that trained on no examples before aggregating."
            )
    reference = updates[0]
    for i, update in enumerate(updates):
        if len(update) != len(reference):
            raise ValueError(
                f"client {i} sent {len(update)} tensors, client 0 sent {len(reference)}: every "
                "client must send one tensor per model parameter, in the same order."
            )
        for t, (array, ref) in enumerate(zip(update, reference, strict=True)):
            if not isinstance(array, np.ndarray):
                raise TypeError(
                    f"client {i} tensor {t} must be a numpy array. Found {type(array).__name__}."
                )
            if not np.issubdtype(array.dtype, np.floating):
                raise TypeError(
                    f"client {i} tensor {t} must have a floating dtype (float32). "
                    f"Found {array.dtype}."
                )
            if array.shape != ref.shape:
                raise ValueError(
                    f"client {i} tensor {t} has shape {array.shape}, client 0 sent "
                    f"{ref.shape}: every client must train the same architecture."
                )


def _nonfinite_reason(update: Update) -> str | None:
    for t, array in enumerate(update):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            return f"{bad} non-finite value(s) in tensor {t}"
    return None


def _norm(update: Update) -> float:
    """L2 norm over all tensors: float32 BLAS dot, redone in float64 only if squares overflow."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = math.fsum(float(np.dot(flat, flat)) for flat in map(np.ravel, update))
    if not math.isfinite(total):
        total = math.fsum(
            float(np.dot(flat, flat)) for a in update for flat in [np.ravel(a).astype(np.float64)]
        )
    return math.sqrt(total)


def _screen(updates: Sequence[Update], weights: Sequence[float]) -> _Screened:
    """Validate structure (raises) and reject non-finite clients (reported)."""
    _check_structure(updates, weights)
    accepted: list[int] = []
    rejected: dict[int, str] = {}
    norms: dict[int, float] = {}
    for i, update in enumerate(updates):
        reason = _nonfinite_reason(update)
        if reason is None:
            accepted.append(i)
            norms[i] = _norm(update)
        else:
            rejected[i] = reason
    _require_some_accepted(len(updates), rejected)
    return _Screened(accepted=accepted, rejected=rejected, norms=norms)


def _require_some_accepted(n_clients: int, rejected: dict[int, str]) -> None:
    if len(rejected) == n_clients:
        raise ValueError(
            f"all {n_clients} client updates were rejected ({_reasons_text(rejected)}); "
            "nothing to aggregate. Check the clients' training (learning rate, clipping)."
        )


def _reasons_text(rejected: dict[int, str]) -> str:
    return "; ".join(f"client {i}: {reason}" for i, reason in sorted(rejected.items()))


def _base_measurements(
    method: AggregationMethod,
    n_clients: int,
    rejected: dict[int, str],
    norms: Sequence[float],
    aggregate_norm: float,
) -> Measurements:
    return {
        "method": method.value,
        "n_clients": n_clients,
        "n_accepted": n_clients - len(rejected),
        "n_rejected": len(rejected),
        "rejected_clients": ",".join(str(i) for i in sorted(rejected)),
        "rejection_reasons": _reasons_text(rejected),
        "mean_update_norm": float(np.mean(norms)) if norms else 0.0,
        "max_update_norm": float(np.max(norms)) if norms else 0.0,
        "aggregate_norm": aggregate_norm,
    }


def _as_float32_array(value: object) -> NDArray[np.float32]:
    """A new float32 ndarray (reductions over a stack of 0-d tensors return numpy scalars)."""
    return np.array(value, dtype=np.float32)


def _stack(updates: Sequence[Update], clients: Sequence[int], t: int) -> NDArray[np.float32]:
    """Tensor ``t`` of the given clients stacked along a new axis 0, as float32."""
    return np.stack([updates[i][t] for i in clients]).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Weighted mean (the fast path; also what secure aggregation computes)


@dataclass(frozen=True)
class WeightedMean:
    """Mean of the updates weighted by example count (FedAvg, McMahan et al. 2017).

    Fast path: one streaming pass over the clients' bytes. Each tensor is processed in blocks
    of ``chunk_size`` elements; for a block, every client's slice is scaled by its normalized
    weight and added into the output block while it is hot in cache (``np.multiply``/``np.add``
    with ``out=``, one scratch block per call, no per-client allocation). The same pass takes
    every client's squared norm (BLAS dot on the cached block), which also detects NaN/Inf: a
    non-finite client is rejected and the pass is redone without it.

    Accumulation is float32 with weights normalized to sum to 1, so every partial sum stays on
    the scale of one update (error ~ n_clients * 2^-24 relative; float64 accumulation measured
    3x slower because of the per-block casts). The pass runs with one BLAS thread
    (:data:`_BLAS_THREADS`).
    """

    chunk_size: int = DEFAULT_CHUNK_SIZE

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int):
            raise TypeError(f"`chunk_size` must be an int. Found {type(self.chunk_size).__name__}.")
        if self.chunk_size < 1:
            raise ValueError(f"`chunk_size` must be at least 1. Found {self.chunk_size}.")

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> AggregateResult:
        """Return sum_i w_i * x_i / sum_i w_i over the clients whose updates are finite."""
        _check_structure(updates, weights)
        rejected: dict[int, str] = {}
        clients = list(range(len(updates)))
        while True:
            # Squares of NaN/Inf/huge values are expected here; they are handled just below.
            with np.errstate(over="ignore", invalid="ignore"), _one_blas_thread():
                result, sumsq, aggregate_sumsq = self._weighted_mean_pass(updates, weights, clients)
            newly_bad: dict[int, str] = {}
            for i in clients:
                # A non-finite sum of squares flags NaN/Inf (or float32 overflow: checked exactly).
                reason = None if math.isfinite(sumsq[i]) else _nonfinite_reason(updates[i])
                if reason is not None:
                    newly_bad[i] = reason
            if not newly_bad:
                break
            rejected.update(newly_bad)
            _require_some_accepted(len(updates), rejected)
            clients = [i for i in clients if i not in rejected]
        norms = [
            math.sqrt(sumsq[i]) if math.isfinite(sumsq[i]) else _norm(updates[i]) for i in clients
        ]
        aggregate_norm = (
            math.sqrt(aggregate_sumsq) if math.isfinite(aggregate_sumsq) else _norm(result)
        )
        measurements = _base_measurements(
            AggregationMethod.MEAN, len(updates), rejected, norms, aggregate_norm
        )
        return AggregateResult(update=result, measurements=measurements)

    def _weighted_mean_pass(
        self, updates: Sequence[Update], weights: Sequence[float], clients: Sequence[int]
    ) -> tuple[Update, dict[int, float], float]:
        total = math.fsum(float(weights[i]) for i in clients)
        scale = [float(weights[i]) / total for i in clients]
        sumsq = dict.fromkeys(clients, 0.0)
        aggregate_sumsq = 0.0
        scratch = np.empty(self.chunk_size, dtype=np.float32)
        result: Update = []
        for t, ref in enumerate(updates[clients[0]]):
            out = np.empty(ref.shape, dtype=np.float32)
            out_flat = out.reshape(-1)
            flats = [np.ravel(updates[i][t]) for i in clients]
            for start in range(0, out_flat.size, self.chunk_size):
                stop = min(start + self.chunk_size, out_flat.size)
                block = out_flat[start:stop]
                tmp = scratch[: stop - start]
                for k, (i, flat) in enumerate(zip(clients, flats, strict=True)):
                    piece = flat[start:stop]
                    if k == 0:
                        np.multiply(piece, scale[k], out=block, casting="same_kind")
                    elif (
                        _saxpy is not None
                        and piece.dtype == np.float32
                        and piece.flags.c_contiguous
                    ):
                        # BLAS axpy: block += scale * piece in one pass, no scratch round-trip.
                        _saxpy(piece, block, a=scale[k])
                    else:
                        np.multiply(piece, scale[k], out=tmp, casting="same_kind")
                        np.add(block, tmp, out=block)
                    sumsq[i] += float(np.dot(piece, piece))
                aggregate_sumsq += float(np.dot(block, block))
            result.append(out)
        return result, sumsq, aggregate_sumsq


# --------------------------------------------------------------------------------------------
# Coordinate-wise statistics


@dataclass(frozen=True)
class CoordinateWiseMedian:
    """Coordinate-wise median of the updates (Yin et al., ICML 2018); unweighted.

    Tolerates up to half of the clients sending arbitrary values in any coordinate. With an
    even number of clients a coordinate is the mean of its two middle values (``np.median``).
    """

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> AggregateResult:
        """Return the coordinate-wise median over the clients whose updates are finite."""
        screened = _screen(updates, weights)
        result: Update = [
            _as_float32_array(np.median(_stack(updates, screened.accepted, t), axis=0))
            for t in range(len(updates[0]))
        ]
        measurements = _base_measurements(
            AggregationMethod.MEDIAN,
            len(updates),
            screened.rejected,
            list(screened.norms.values()),
            _norm(result),
        )
        return AggregateResult(update=result, measurements=measurements)


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018); unweighted.

    In every coordinate the ``floor(beta * n)`` smallest and largest values are dropped and the
    rest averaged (the same cut as ``scipy.stats.trim_mean``). ``beta`` is the fraction cut
    from *each* side, 0 <= beta < 0.5.
    """

    beta: float = 0.1

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, int | float) and 0.0 <= float(self.beta) < 0.5):
            raise ValueError(
                f"`beta` (fraction trimmed from each side) must be in [0, 0.5). "
                f"Found {self.beta!r}."
            )

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> AggregateResult:
        """Return the coordinate-wise beta-trimmed mean over the finite updates."""
        screened = _screen(updates, weights)
        n = len(screened.accepted)
        cut = int(self.beta * n)
        result: Update = []
        for t in range(len(updates[0])):
            stacked = np.sort(_stack(updates, screened.accepted, t), axis=0)
            kept = stacked[cut : n - cut]
            result.append(_as_float32_array(np.mean(kept, axis=0, dtype=np.float64)))
        measurements = _base_measurements(
            AggregationMethod.TRIMMED_MEAN,
            len(updates),
            screened.rejected,
            list(screened.norms.values()),
            _norm(result),
        )
        measurements["trimmed_per_side"] = cut
        return AggregateResult(update=result, measurements=measurements)


# --------------------------------------------------------------------------------------------
# Krum / Multi-Krum


@dataclass(frozen=True)
class Krum:
    """Krum and Multi-Krum (Blanchard et al., NeurIPS 2017); unweighted.

    Each client i gets the score sum of squared L2 distances to its ``n - f - 2`` nearest other
    updates; Krum returns the update with the lowest score (``m = 1``), Multi-Krum the plain
    mean of the ``m`` lowest-scoring updates. Assumes at most ``f`` Byzantine clients and
    requires ``n > 2f + 2`` (counted after non-finite updates are rejected), and
    ``1 <= m <= n - f``. Ties are broken by client position.

    Distances come from a float64 Gram matrix accumulated tensor by tensor, so memory is
    bounded by ``n`` copies of the largest tensor in float64.
    """

    f: int
    m: int = 1

    def __post_init__(self) -> None:
        for name, value, low in (("f", self.f, 0), ("m", self.m, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"`{name}` must be an int. Found {type(value).__name__}.")
            if value < low:
                raise ValueError(f"`{name}` must be at least {low}. Found {value}.")

    def aggregate(self, updates: Sequence[Update], weights: Sequence[float]) -> AggregateResult:
        """Return the (Multi-)Krum selection's mean over the finite updates."""
        screened = _screen(updates, weights)
        clients = screened.accepted
        n = len(clients)
        if n <= 2 * self.f + 2:
            raise ValueError(
                f"Krum with f={self.f} Byzantine clients needs n > 2f + 2 = {2 * self.f + 2} "
                f"clients, got {n} usable update(s) ({len(screened.rejected)} rejected). "
                "Sample more clients per round or lower `f`."
            )
        if self.m > n - self.f:
            raise ValueError(
                f"Multi-Krum selects m <= n - f = {n - self.f} updates, got m={self.m}. Lower `m`."
            )
        distances = self._squared_distances(updates, clients)
        n_neighbours = n - self.f - 2
        scores = np.empty(n, dtype=np.float64)
        for row in range(n):
            others = np.delete(distances[row], row)
            scores[row] = float(np.sum(np.partition(others, n_neighbours - 1)[:n_neighbours]))
        order = np.argsort(scores, kind="stable")[: self.m]
        selected = [clients[int(k)] for k in order]
        result: Update = [
            _as_float32_array(np.mean(_stack(updates, selected, t), axis=0, dtype=np.float64))
            for t in range(len(updates[0]))
        ]
        method = AggregationMethod.KRUM if self.m == 1 else AggregationMethod.MULTI_KRUM
        measurements = _base_measurements(
            method, len(updates), screened.rejected, list(screened.norms.values()), _norm(result)
        )
        measurements["selected_clients"] = ",".join(str(i) for i in selected)
        measurements["krum_f"] = self.f
        measurements["krum_m"] = self.m
        return AggregateResult(update=result, measurements=measurements)

    @staticmethod
    def _squared_distances(
        updates: Sequence[Update], clients: Sequence[int]
    ) -> NDArray[np.float64]:
        n = len(clients)
        gram = np.zeros((n, n), dtype=np.float64)
        for t in range(len(updates[clients[0]])):
            rows = np.stack([np.ravel(updates[i][t]).astype(np.float64) for i in clients])
            gram += rows @ rows.T
        diag = np.diag(gram)
        distances = diag[:, None] + diag[None, :] - 2.0 * gram
        np.maximum(distances, 0.0, out=distances)
        return distances


# --------------------------------------------------------------------------------------------
# Factory


_NEEDS_INDIVIDUAL_UPDATES = {
    AggregationMethod.MEDIAN: "coordinate-wise median",
    AggregationMethod.TRIMMED_MEAN: "trimmed mean",
    AggregationMethod.KRUM: "Krum",
    AggregationMethod.MULTI_KRUM: "Multi-Krum",
}


def make_aggregator(
    method: str,
    *,
    privacy_level: str,
    beta: float | None = None,
    f: int | None = None,
    m: int | None = None,
    chunk_size: int | None = None,
) -> Aggregator:
    """Build the aggregator named ``method`` for a job at ``privacy_level``.

    Parameters per method: ``trimmed_mean`` takes ``beta`` (default 0.1); ``krum`` takes ``f``
    (required); ``multi_krum`` takes ``f`` (required) and ``m`` (required); ``mean`` takes
    ``chunk_size``. A parameter the method does not use is an error, so a typo in a job spec
    is not silently ignored.

    Under ``secure-agg`` / ``dp+secure-agg`` only ``mean`` is allowed: secure aggregation shows
    the server the sum alone, by design.
    """
    try:
        level = PrivacyLevel(privacy_level)
    except ValueError:
        allowed = ", ".join(repr(p.value) for p in PrivacyLevel)
        raise ValueError(
            f"unknown privacy_level {privacy_level!r}; use one of {allowed}."
        ) from None
    try:
        kind = AggregationMethod(method)
    except ValueError:
        allowed = ", ".join(repr(a.value) for a in AggregationMethod)
        raise ValueError(f"unknown aggregation method {method!r}; use one of {allowed}.") from None

    if level.hides_individual_updates and kind in _NEEDS_INDIVIDUAL_UPDATES:
        raise ValueError(
            f"{_NEEDS_INDIVIDUAL_UPDATES[kind]} needs individual updates, which secure "
            "aggregation hides by design; use method='mean' or privacy_level='dp'."
        )

    given = {"beta": beta, "f": f, "m": m, "chunk_size": chunk_size}
    accepted_params = {
        AggregationMethod.MEAN: {"chunk_size"},
        AggregationMethod.MEDIAN: set(),
        AggregationMethod.TRIMMED_MEAN: {"beta"},
        AggregationMethod.KRUM: {"f"},
        AggregationMethod.MULTI_KRUM: {"f", "m"},
    }[kind]
    unused = sorted(
        name for name, value in given.items() if value is not None and name not in accepted_params
    )
    if unused:
        raise ValueError(
            f"method {kind.value!r} takes no parameter(s) {', '.join(unused)}; "
            f"it accepts: {', '.join(sorted(accepted_params)) or 'none'}."
        )

    if kind is AggregationMethod.MEAN:
        return WeightedMean() if chunk_size is None else WeightedMean(chunk_size=chunk_size)
    if kind is AggregationMethod.MEDIAN:
        return CoordinateWiseMedian()
    if kind is AggregationMethod.TRIMMED_MEAN:
        return TrimmedMean() if beta is None else TrimmedMean(beta=beta)
    if f is None:
        raise ValueError(f"method {kind.value!r} needs `f`, the number of Byzantine clients.")
    if kind is AggregationMethod.KRUM:
        return Krum(f=f)
    if m is None:
        raise ValueError("method 'multi_krum' needs `m`, the number of updates to select.")
    return Krum(f=f, m=m)
