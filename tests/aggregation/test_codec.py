"""The summable vector and its ring encoding (numpy only)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.codec import (
    EXAMPLE_CAP,
    Contribution,
    Metric,
    MetricSpec,
    RingLayout,
    Summed,
    sum_contributions,
)
from aggregation.ddp import DdpConfig, DistributedMechanism

METRICS = (
    MetricSpec(Metric.EXAMPLES, 1.0),
    MetricSpec(Metric.EVAL_LOSS, 5.0),
    MetricSpec(Metric.EVAL_CORRECT, 1.0),
)
ROTATION = bytes(range(32))


def _contribution(rng: np.random.Generator, length: int, rows: int, stats: int) -> Contribution:
    update = (rng.normal(size=length) * 0.05).astype(np.float32)
    metric_rows = np.stack(
        [np.ones(rows), rng.uniform(0, 5, rows), rng.integers(0, 2, rows).astype(float)], 1
    )
    statistic_rows = rng.uniform(0, 1, (rows, stats)) / math.sqrt(stats)
    return Contribution(update, metric_rows, statistic_rows)


def _ring_sum(layout: RingLayout, parts: list[Contribution], **encode: object) -> Summed:
    total = np.zeros(layout.length, dtype=np.uint32)
    for part in parts:
        total += layout.encode(part, **encode)  # type: ignore[arg-type]
    return layout.decode(total, rotation_seed=ROTATION)


def test_plain_ring_sum_decodes_to_the_sum_of_the_clear_text_parts() -> None:
    rng = np.random.default_rng(0)
    layout = RingLayout(
        update_length=1000, update_range=2.0, metrics=METRICS, statistics_length=3, max_summands=10
    )
    parts = [_contribution(rng, 1000, 50, 3) for _ in range(7)]
    decoded = _ring_sum(layout, parts)
    expected = sum_contributions([p.summed(METRICS) for p in parts])
    assert np.abs(decoded.update - expected.update).max() <= 7 * layout.update_step
    assert decoded.metrics[Metric.EXAMPLES] == 350.0  # counts are exact
    assert decoded.metrics[Metric.EVAL_CORRECT] == expected.metrics[Metric.EVAL_CORRECT]
    assert decoded.metrics[Metric.EVAL_LOSS] == pytest.approx(
        expected.metrics[Metric.EVAL_LOSS], abs=350 * 5.0 / layout.metric_levels
    )
    assert decoded.statistics == pytest.approx(expected.statistics, abs=350 * 2.0**-12)


@settings(max_examples=30, deadline=None)
@given(
    length=st.integers(1, 300),
    nodes=st.integers(1, 12),
    scale=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_update_quantization_is_within_one_step_per_summand(
    length: int, nodes: int, scale: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    layout = RingLayout(update_length=length, update_range=1.0, max_summands=nodes)
    updates = [(rng.uniform(-1, 1, length) * scale).astype(np.float32) for _ in range(nodes)]
    total = np.zeros(layout.length, dtype=np.uint32)
    for update in updates:
        total += layout.encode(Contribution(update=update))
    decoded = layout.decode(total).update
    exact = np.sum([u.astype(np.float64) for u in updates], axis=0)
    assert np.all(np.abs(decoded - exact) <= nodes * layout.update_step * (1 + 1e-9))


def test_update_rounding_comes_from_the_nodes_own_randomness_unless_a_seed_is_given() -> None:
    # Halfway between two levels: the rounding direction is the random part. A node encodes
    # without a seed (its own os.urandom), so nothing the server sends decides it.
    layout = RingLayout(update_length=4096, update_range=1.0, max_summands=3)
    update = np.full(4096, 100.5 * layout.update_step, dtype=np.float32)
    first, second = (layout.encode(Contribution(update=update)) for _ in range(2))
    assert not np.array_equal(first, second)
    assert set(np.unique(first.view(np.int32))) <= {100, 101}
    seeded = [layout.encode(Contribution(update=update), seed=bytes(32)) for _ in range(2)]
    np.testing.assert_array_equal(seeded[0], seeded[1])  # tests may pin it


def test_bad_inputs_are_refused_before_anything_is_encoded() -> None:
    layout = RingLayout(update_length=4, metrics=METRICS, max_summands=3)
    with pytest.raises(ValueError, match="float32 of shape"):
        layout.encode(Contribution(update=np.zeros(5, dtype=np.float32)))
    with pytest.raises(ValueError, match="NaN or infinity"):
        layout.encode(
            Contribution(
                update=np.zeros(4, dtype=np.float32),
                metric_rows=np.array([[1.0, math.nan, 0.0]]),
            )
        )
    with pytest.raises(ValueError, match="NaN or infinity"):
        layout.encode(Contribution(update=np.array([0, 0, math.inf, 0], dtype=np.float32)))
    with pytest.raises(ValueError, match="the layout is empty"):
        RingLayout(update_length=0)
    with pytest.raises(ValueError, match="uint32 vector"):
        layout.decode(np.zeros(3, dtype=np.uint32))


def _rows_ddp(dim: int, z: float) -> DdpConfig:
    return DdpConfig(
        mechanism=DistributedMechanism.SKELLAM,
        dim=dim,
        l2_clip=1.0,
        noise_multiplier=z,
        min_survivors=2,
        max_summands=EXAMPLE_CAP * 16,
        max_noise_shares=16,
    )


def test_distributed_segments_decode_to_the_sum_plus_the_planned_noise() -> None:
    """Many trials: the server-visible sum carries at least the planned noise variance, and
    no more than the survivors' shares add (each node's share is sized for ``n_min``)."""
    z, nodes, n_min = 2.0, 5, 3
    update_ddp = DdpConfig(
        mechanism=DistributedMechanism.SKELLAM,
        dim=64,
        l2_clip=1.0,
        noise_multiplier=z,
        min_survivors=2,
        max_summands=nodes,
        max_noise_shares=nodes,
    )
    layout = RingLayout(
        update_length=64,
        metrics=METRICS,
        statistics_length=3,
        max_summands=nodes,
        update_ddp=update_ddp,
        metrics_ddp=_rows_ddp(3, z),
        statistics_ddp=_rows_ddp(3, z),
    )
    rng = np.random.default_rng(1)
    parts = []
    for _ in range(nodes):
        part = _contribution(rng, 64, 20, 3)
        norm = float(np.linalg.norm(part.update))
        parts.append(
            Contribution(part.update / max(1.0, norm), part.metric_rows, part.statistic_rows)
        )
    exact = sum_contributions([p.summed(METRICS) for p in parts])
    errors_update, errors_loss, errors_stats = [], [], []
    for trial in range(300):
        noise_rng = np.random.default_rng(1000 + trial)
        decoded = _ring_sum(
            layout, parts, rotation_seed=ROTATION, noise_shares=n_min, noise_rng=noise_rng
        )
        errors_update.append(decoded.update - exact.update)
        errors_loss.append(decoded.metrics[Metric.EVAL_LOSS] - exact.metrics[Metric.EVAL_LOSS])
        errors_stats.append(decoded.statistics - exact.statistics)
    # Planned: std z * C (real units) per coordinate from n_min shares; 5 survivors add 5/3.
    planned = z**2 * nodes / n_min
    update_var = float(np.var(np.asarray(errors_update)))
    assert planned * 0.85 < update_var < planned * 1.15
    stats_var = float(np.var(np.asarray(errors_stats)))
    assert planned * 0.8 < stats_var < planned * 1.2
    # Metric i's noise in its own units: z * bound_i * sqrt(K), for the eval loss 5 sqrt(3) z.
    loss_var = float(np.var(errors_loss))
    assert (
        (5 * math.sqrt(3)) ** 2 * planned * 0.75
        < loss_var
        < (5 * math.sqrt(3)) ** 2 * planned * 1.3
    )
    # And the noiseless part survives: the mean error is about 0.
    assert abs(float(np.mean(errors_update))) < 0.05


def test_distributed_rows_above_the_cap_are_refused() -> None:
    layout = RingLayout(
        update_length=0, metrics=METRICS, max_summands=3, metrics_ddp=_rows_ddp(3, 1.0)
    )
    rows = np.tile([[1.0, 0.0, 0.0]], (EXAMPLE_CAP + 1, 1))
    with pytest.raises(ValueError, match="exceed the distributed-DP cap"):
        layout.encode(Contribution(metric_rows=rows), rotation_seed=ROTATION)


def test_distributed_layout_needs_a_public_rotation_seed() -> None:
    layout = RingLayout(
        update_length=0, metrics=METRICS, max_summands=3, metrics_ddp=_rows_ddp(3, 1.0)
    )
    with pytest.raises(ValueError, match="rotation seed"):
        layout.encode(Contribution(metric_rows=np.ones((1, 3)) * 0.1))
    assert len(layout.events()) == 1 and layout.events()[0].sample_rate == 1.0
