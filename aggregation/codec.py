"""The summable vector: what a node contributes to a round, and its encoding for SecAgg+.

One codec for every level and workload. A node's :class:`Contribution` has three parts,
each possibly empty:

- ``update``: the flattened model update (float32, ``update_length`` values), already clipped
  by the node to its L2 bound;
- ``metric_rows``: one row per *unit* (one example for example-level sums, or one row of node
  means for node-level metrics) with a value per :class:`MetricSpec` of the layout, each
  clipped by the node to ``[0, bound]``;
- ``statistic_rows``: federated analytics, one row per example (``statistics_length`` values).

The server only ever needs the *sum* over contributors of each part (:class:`Summed`). In the
clear (levels ``none`` and ``dp``) a node sends its own :meth:`Contribution.summed`; under
secure aggregation it sends :func:`encode_ring` of it, masked, and the server decodes the sum
of the masked vectors with :func:`decode_ring`.

Ring encoding (values in Z_(2^32), read as two's-complement int32 so a sum decodes as long as
it stays in [-2^31, 2^31)):

- update: centred stochastic rounding ``q = floor(x / step + U)``, U uniform on [0, 1) from an
  AES-256-CTR keystream keyed by the node's own randomness (unbiased; error below one step).
  ``step = range / (floor((2^31 - 1) / max_summands) - 1)`` so the sum of ``max_summands``
  vectors with coordinates in [-range, range] never wraps;
- metrics and statistics: fixed point. Each *row* is rounded to the grid on its own
  (deterministically, to nearest) before the rows are summed, so removing one unit removes
  exactly one rounded row: the integer sensitivity is a property of the layout
  (:meth:`RingLayout.metric_sensitivity`), never of the data.

Metric scaling: a layout with ``K`` metrics maps metric ``i``'s range ``[0, bound_i]`` onto
``[0, levels]`` integer units with ``levels = floor(1 / (sqrt(K) step))`` the same for every
metric, so one unit's rounded metric row has L2 norm at most ``sqrt(K) levels <= 1 / step``
whatever its values -- one noise multiplier then protects every metric alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

import numpy as np
from numpy.typing import NDArray

from aggregation.ddp import DdpConfig, decode_sum, sample_skellam
from aggregation.ddp import encode as ddp_encode
from aggregation.ddp_accounting import DistributedDpEvent
from aggregation.secagg.primitives import CHUNK_VALUES, Keystream, hkdf_sha256

__all__ = [
    "EXAMPLE_CAP",
    "Contribution",
    "Metric",
    "MetricSpec",
    "RingLayout",
    "Summed",
    "decode_ring",
    "encode_ring",
    "sum_contributions",
]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]
U32 = NDArray[np.uint32]

_INT32_LIMIT: Final = 2**31 - 1
EXAMPLE_CAP: Final = 1 << 16
"""The most per-example rows a node puts in one distributed-DP segment (a public cap the
segment's granularity is sized for; a node with more examples samples this many)."""
_ROTATION_SALT: Final = b"fedbrain/codec/v1/rotation"
_METRIC_STEP: Final = 2.0**-10
"""Fixed-point resolution of the metric segment: one unit's row spans at most 1 / step levels."""


class Metric(StrEnum):
    """Named metric coordinates (each a sum over units; ratios are formed from the sums)."""

    EXAMPLES = "examples"
    """1 per example (the denominator of per-example sums)."""
    TRAIN_LOSS = "train_loss"
    EVAL_LOSS = "eval_loss"
    EVAL_CORRECT = "eval_correct"
    """Correct predictions (classifier top-1, or an LM's next-byte accuracy per sequence)."""
    BASELINE_LOSS = "baseline_loss"
    """An LM's loss under a unigram byte model fitted on the node's training bytes."""
    CLIPPED = "clipped"
    """1 per node whose update was scaled down by clipping."""


@dataclass(frozen=True)
class MetricSpec:
    """One metric coordinate: a unit contributes a value in ``[0, bound]``."""

    metric: Metric
    bound: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bound) and self.bound > 0):
            raise ValueError(
                f"MetricSpec {self.metric}: `bound` must be positive. Found {self.bound}."
            )


@dataclass(frozen=True)
class Summed:
    """Sums over contributors (or one node's own values): update, metrics, statistics."""

    update: F64
    metrics: Mapping[Metric, float]
    statistics: F64

    def metric(self, metric: Metric) -> float | None:
        return self.metrics.get(metric)

    def ratio(self, numerator: Metric, denominator: Metric) -> float | None:
        """``numerator / denominator`` of the sums; None when either is missing or the
        denominator is not positive (a noised count can be)."""
        top, bottom = self.metrics.get(numerator), self.metrics.get(denominator)
        if top is None or bottom is None or not bottom > 0:
            return None
        return top / bottom


@dataclass(frozen=True)
class Contribution:
    """One node's contribution (see the module docstring); arrays are not copied."""

    update: F32 = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    metric_rows: F64 = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float64))
    statistic_rows: F64 = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float64))

    def summed(self, metrics: Sequence[MetricSpec]) -> Summed:
        """This node's own sums (what it sends in the clear)."""
        _check_rows("metric_rows", self.metric_rows, len(metrics))
        sums = self.metric_rows.sum(axis=0) if self.metric_rows.shape[0] else None
        values = {
            spec.metric: (0.0 if sums is None else float(sums[i])) for i, spec in enumerate(metrics)
        }
        stats = (
            self.statistic_rows.sum(axis=0)
            if self.statistic_rows.shape[0]
            else np.zeros(self.statistic_rows.shape[1], dtype=np.float64)
        )
        return Summed(self.update.astype(np.float64), values, stats.astype(np.float64))


def sum_contributions(parts: Sequence[Summed]) -> Summed:
    """The element-wise sum of several nodes' sums (plain aggregation)."""
    if not parts:
        raise ValueError("sum_contributions needs at least one part.")
    update = np.sum([p.update for p in parts], axis=0)
    stats = np.sum([p.statistics for p in parts], axis=0)
    keys = list(parts[0].metrics)
    metrics = {k: float(sum(p.metrics.get(k, 0.0) for p in parts)) for k in keys}
    return Summed(np.asarray(update, dtype=np.float64), metrics, np.asarray(stats, np.float64))


def _check_rows(name: str, rows: F64, width: int) -> None:
    if rows.ndim != 2 or (rows.shape[0] and rows.shape[1] != width):
        raise ValueError(f"`{name}` must have shape (units, {width}). Found {rows.shape}.")
    if rows.size and not np.all(np.isfinite(rows)):
        raise ValueError(f"`{name}` contains NaN or infinity.")


@dataclass(frozen=True, kw_only=True)
class RingLayout:
    """How a :class:`Contribution` becomes a uint32 vector for SecAgg+ (and back).

    ``update_range``: the largest absolute coordinate of an update (its L2 bound is one);
    ``max_summands``: the most vectors summed (the SecAgg+ group size), for headroom;
    ``statistics_step``: fixed-point step of the statistics rows (original units).
    ``update_ddp`` / ``metrics_ddp`` / ``statistics_ddp``: when set, that segment goes through
    the distributed DP mechanism of :mod:`aggregation.ddp` (rotation, conditional rounding,
    the node's Skellam noise share) instead of plain fixed point; metric rows are first scaled
    by :attr:`metric_units` and statistics rows must already have L2 norm <= 1.
    """

    update_length: int
    update_range: float = 1.0
    metrics: tuple[MetricSpec, ...] = ()
    statistics_length: int = 0
    statistics_step: float = 2.0**-12
    max_summands: int = 2
    update_ddp: DdpConfig | None = None
    metrics_ddp: DdpConfig | None = None
    statistics_ddp: DdpConfig | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.update_length < 0 or self.statistics_length < 0:
            problems.append("segment lengths must be >= 0")
        if not (math.isfinite(self.update_range) and self.update_range > 0):
            problems.append(f"`update_range` must be positive. Found {self.update_range}.")
        if not (math.isfinite(self.statistics_step) and self.statistics_step > 0):
            problems.append(f"`statistics_step` must be positive. Found {self.statistics_step}.")
        if not 1 <= self.max_summands <= 2**16:
            problems.append(f"`max_summands` must be in [1, 65536]. Found {self.max_summands}.")
        if len({s.metric for s in self.metrics}) != len(self.metrics):
            problems.append("a metric appears twice")
        if self.length == 0:
            problems.append("the layout is empty")
        for name, cfg, dim in (
            ("update_ddp", self.update_ddp, self.update_length),
            ("metrics_ddp", self.metrics_ddp, len(self.metrics)),
            ("statistics_ddp", self.statistics_ddp, self.statistics_length),
        ):
            if cfg is not None and cfg.dim != dim:
                problems.append(f"`{name}.dim` must be the segment's length {dim}; found {cfg.dim}")
        if self.metrics_ddp is not None and self.metrics_ddp.l2_clip != 1.0:
            problems.append("`metrics_ddp.l2_clip` must be 1 (metric rows are scaled to norm 1)")
        if problems:
            raise ValueError("Invalid ring layout: " + "; ".join(problems) + ".")

    @property
    def length(self) -> int:
        """Values in the ring vector (what SecAgg+ masks)."""
        return self.update_segment + self.metrics_segment + self.statistics_segment

    @property
    def per_summand_limit(self) -> int:
        """The largest absolute integer one summand may hold in any coordinate."""
        return _INT32_LIMIT // self.max_summands

    @property
    def update_step(self) -> float:
        """Width of one quantization level of the update segment."""
        return self.update_range / (self.per_summand_limit - 1)

    @property
    def metric_levels(self) -> int:
        """Integer levels of a metric at its bound: ``floor(1 / (sqrt(K) step))``, so one
        unit's row has L2 norm at most ``1 / step`` in integer units."""
        k = len(self.metrics)
        return math.floor(1.0 / (math.sqrt(k) * _METRIC_STEP)) if k else 0

    @property
    def metric_scales(self) -> F64:
        """Per metric, integer units per unit of value (``levels / bound``): a metric at its
        bound is exactly ``levels``, and a count of 1 is exact when its bound is 1."""
        return np.array([self.metric_levels / s.bound for s in self.metrics], dtype=np.float64)

    def metric_sensitivity(self) -> float:
        """L2 norm bound (integer units) of one unit's rounded metric row."""
        return math.sqrt(len(self.metrics)) * self.metric_levels

    # ------------------------------------------------------------------ encode / decode

    def encode(
        self,
        contribution: Contribution,
        *,
        seed: bytes | None = None,
        rotation_seed: bytes = b"",
        noise_shares: int = 1,
        noise_rng: np.random.Generator | None = None,
    ) -> U32:
        """The node's ring vector (a new uint32 array, not yet masked).

        ``seed``: 32 bytes keying the stochastic rounding of a plain update segment; default
        fresh bytes from ``os.urandom`` (the node's own randomness, never the server's).
        Distributed-DP segments (``*_ddp``) are rotated with signs from the public
        ``rotation_seed``, conditionally rounded, and get this node's noise share: the
        segment's aggregate variance divided by ``noise_shares`` (the survivors the round's
        noise is sized for), drawn from ``noise_rng`` (default: 256 bits of ``os.urandom``).
        """
        update = np.asarray(contribution.update)
        if update.dtype != np.float32 or update.shape != (self.update_length,):
            raise ValueError(
                f"The update must be float32 of shape ({self.update_length},). "
                f"Found {update.dtype} {update.shape}."
            )
        if noise_shares < 1:
            raise ValueError(f"`noise_shares` must be >= 1. Found {noise_shares}.")
        rng = noise_rng
        if rng is None and self.uses_ddp:
            rng = np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "big")))
        out = np.zeros(self.length, dtype=np.uint32)
        start = 0
        if self.update_length:
            head = out[: self.update_segment]
            if self.update_ddp is not None and rng is not None:
                ints = ddp_encode(
                    update.astype(np.float64),
                    self.update_ddp,
                    rotation_seed=self._rotation(rotation_seed, "update"),
                    rng=rng,
                )
                head[:] = _to_ring(ints + self._share(self.update_ddp, noise_shares, rng))
            else:
                self._quantize_update(update, head, seed or os.urandom(32))
            start = self.update_segment
        if self.metrics:
            _check_rows("metric_rows", contribution.metric_rows, len(self.metrics))
            width = self.metrics_segment
            if self.metrics_ddp is not None and rng is not None:
                ints = self._ddp_rows(
                    contribution.metric_rows * self.metric_units,
                    self.metrics_ddp,
                    self._rotation(rotation_seed, "metrics"),
                    noise_shares,
                    rng,
                )
            else:
                ints = self._rows_to_ints(
                    contribution.metric_rows, self.metric_scales, "metric_rows"
                )
            out[start : start + width] = _to_ring(ints)
            start += width
        if self.statistics_length:
            if self.statistics_ddp is not None and rng is not None:
                _check_rows("statistic_rows", contribution.statistic_rows, self.statistics_length)
                ints = self._ddp_rows(
                    contribution.statistic_rows,
                    self.statistics_ddp,
                    self._rotation(rotation_seed, "statistics"),
                    noise_shares,
                    rng,
                )
            else:
                scale = np.full(self.statistics_length, 1.0 / self.statistics_step)
                ints = self._rows_to_ints(contribution.statistic_rows, scale, "statistic_rows")
            out[start:] = _to_ring(ints)
        elif contribution.statistic_rows.size:
            raise ValueError("This layout has no statistics segment.")
        return out

    @property
    def uses_ddp(self) -> bool:
        """Whether any segment carries distributed DP noise."""
        return any(c is not None for c in (self.update_ddp, self.metrics_ddp, self.statistics_ddp))

    @property
    def update_segment(self) -> int:
        """Ring values of the update (padded under distributed DP)."""
        if self.update_ddp is not None:
            return self.update_ddp.padded_dim
        return self.update_length

    @property
    def metrics_segment(self) -> int:
        if self.metrics_ddp is not None:
            return self.metrics_ddp.padded_dim
        return len(self.metrics)

    @property
    def statistics_segment(self) -> int:
        if self.statistics_ddp is not None:
            return self.statistics_ddp.padded_dim
        return self.statistics_length

    @property
    def metric_units(self) -> F64:
        """Per metric, the factor ``1 / (bound sqrt(K))`` that maps a unit's metric row to L2
        norm <= 1 (the distributed-DP metric segment's rows)."""
        k = len(self.metrics)
        return np.array([1.0 / (s.bound * math.sqrt(k)) for s in self.metrics], dtype=np.float64)

    def events(self, *, sample_rate: float = 1.0) -> list[DistributedDpEvent]:
        """One release of each distributed-DP segment, for the accountant."""
        return [
            DistributedDpEvent.from_config(cfg, sample_rate=sample_rate)
            for cfg in (self.update_ddp, self.metrics_ddp, self.statistics_ddp)
            if cfg is not None
        ]

    @staticmethod
    def _rotation(rotation_seed: bytes, segment: str) -> bytes:
        if len(rotation_seed) < 16:
            raise ValueError(
                "Distributed DP needs a public rotation seed of at least 16 bytes shared by every "
                "node of the collection (derive it from the run id and the SecAgg+ session)."
            )
        return hkdf_sha256(rotation_seed, salt=_ROTATION_SALT, info=segment.encode())

    @staticmethod
    def _share(cfg: DdpConfig, shares: int, rng: np.random.Generator) -> NDArray[np.int64]:
        """This node's noise share: ``aggregate variance / shares`` per coordinate."""
        return sample_skellam(cfg.aggregate_variance / shares, cfg.padded_dim, rng)

    def _ddp_rows(
        self,
        rows: F64,
        cfg: DdpConfig,
        rotation_seed: bytes,
        shares: int,
        rng: np.random.Generator,
    ) -> NDArray[np.int64]:
        if rows.shape[0] > EXAMPLE_CAP:
            raise ValueError(
                f"{rows.shape[0]} rows exceed the distributed-DP cap of {EXAMPLE_CAP} per node; "
                "sample that many first."
            )
        ints = ddp_encode(rows, cfg, rotation_seed=rotation_seed, rng=rng)
        result: NDArray[np.int64] = ints + self._share(cfg, shares, rng)
        return result

    def statistics_sensitivity(self) -> float:
        """L2 norm bound (integer units) of one unit's rounded statistics row, for rows of
        L2 norm <= 1 in original units (nearest rounding adds at most 1/2 per coordinate)."""
        return 1.0 / self.statistics_step + 0.5 * math.sqrt(self.statistics_length)

    def decode(self, total: U32, *, rotation_seed: bytes = b"") -> Summed:
        """The sums encoded in a (sum of) ring vector(s)."""
        if total.dtype != np.uint32 or total.shape != (self.length,):
            raise ValueError(
                f"Expected a uint32 vector of {self.length} values. Found {total.shape}."
            )
        start = 0
        if self.update_ddp is not None:
            head = total[: self.update_segment]
            update = decode_sum(
                head, self.update_ddp, rotation_seed=self._rotation(rotation_seed, "update")
            )
        else:
            update = total[: self.update_length].view(np.int32).astype(np.float64)
            update *= self.update_step
        start = self.update_segment
        k = len(self.metrics)
        part = total[start : start + self.metrics_segment]
        if self.metrics_ddp is not None:
            scaled = decode_sum(
                part, self.metrics_ddp, rotation_seed=self._rotation(rotation_seed, "metrics")
            )
            values = scaled / self.metric_units
        else:
            values = part.view(np.int32).astype(np.float64)
            if k:
                values = values / self.metric_scales
        metrics = {spec.metric: float(values[i]) for i, spec in enumerate(self.metrics)}
        start += self.metrics_segment
        part = total[start:]
        if self.statistics_ddp is not None:
            stats = decode_sum(
                part,
                self.statistics_ddp,
                rotation_seed=self._rotation(rotation_seed, "statistics"),
            )
        else:
            stats = part.view(np.int32).astype(np.float64) * self.statistics_step
        return Summed(update.astype(np.float64), metrics, stats.astype(np.float64))

    def _rows_to_ints(self, rows: F64, scale: F64, name: str) -> NDArray[np.int64]:
        _check_rows(name, rows, scale.shape[0])
        if rows.shape[0] == 0:
            return np.zeros(scale.shape[0], dtype=np.int64)
        ints = np.floor(rows * scale + 0.5).sum(axis=0)
        if np.any(np.abs(ints) > self.per_summand_limit):
            raise ValueError(
                f"`{name}` sums past the ring's per-node limit ({self.per_summand_limit} units): "
                "too many units on this node for the layout; lower the rows or the group size."
            )
        result: NDArray[np.int64] = ints.astype(np.int64)
        return result

    def _quantize_update(self, update: F32, out: U32, seed: bytes) -> None:
        """Centred stochastic rounding of ``update`` into ``out`` (chunked, in cache)."""
        c = self.update_range
        inverse = 1.0 / self.update_step
        limit = float(self.per_summand_limit)
        stream = Keystream(seed)
        raw = np.empty(CHUNK_VALUES, dtype=np.uint32)
        scaled = np.empty(CHUNK_VALUES, dtype=np.float64)
        noise = np.empty(CHUNK_VALUES, dtype=np.float64)
        as_int = out.view(np.int32)
        for begin in range(0, update.shape[0], CHUNK_VALUES):
            end = min(update.shape[0], begin + CHUNK_VALUES)
            count = end - begin
            s, u, r = scaled[:count], noise[:count], raw[:count]
            stream.fill(r)
            np.multiply(update[begin:end], 1.0, out=s, dtype=np.float64)
            if not math.isfinite(float(np.add.reduce(s))):  # before clipping: inf would clip
                raise ValueError("The update contains NaN or infinity; refusing to encode it.")
            np.clip(s, -c, c, out=s)
            np.multiply(s, inverse, out=s)
            np.multiply(r, 2.0**-32, out=u, dtype=np.float64)
            np.add(s, u, out=s)
            np.floor(s, out=s)
            np.clip(s, -limit, limit, out=s)
            as_int[begin:end] = s


def _to_ring(ints: NDArray[np.int64]) -> U32:
    """Integers as two's-complement uint32 (a sum decodes while it stays in int32's range)."""
    encoded: U32 = ints.astype(np.int32).view(np.uint32)
    return encoded


def encode_ring(
    layout: RingLayout, contribution: Contribution, *, seed: bytes | None = None
) -> U32:
    """Module-level alias of :meth:`RingLayout.encode`."""
    return layout.encode(contribution, seed=seed)


def decode_ring(layout: RingLayout, total: U32) -> Summed:
    """Module-level alias of :meth:`RingLayout.decode`."""
    return layout.decode(total)
