"""Tests for aggregation.robust: reference implementations, Byzantine behaviour, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from aggregation.robust import (
    AggregateResult,
    Aggregator,
    CoordinateWiseMedian,
    Krum,
    PrivacyLevel,
    TrimmedMean,
    WeightedMean,
    make_aggregator,
)
from aggregation.types import Update

SHAPES: list[tuple[int, ...]] = [(3, 4), (5,), ()]


def make_updates(
    n_clients: int, *, seed: int = 0, shapes: list[tuple[int, ...]] = SHAPES
) -> list[Update]:
    rng = np.random.default_rng(seed)
    return [
        [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
        for _ in range(n_clients)
    ]


def stacked(updates: list[Update], t: int) -> NDArray[np.float32]:
    return np.stack([u[t] for u in updates])


def copies(updates: list[Update]) -> list[Update]:
    return [[a.copy() for a in u] for u in updates]


def assert_inputs_unchanged(before: list[Update], after: list[Update]) -> None:
    for u_before, u_after in zip(before, after, strict=True):
        for a, b in zip(u_before, u_after, strict=True):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ weighted mean


@settings(max_examples=25, deadline=None)
@given(
    n_clients=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    chunk_size=st.sampled_from([1, 3, 7, 1 << 17]),
)
def test_weighted_mean_matches_np_average(n_clients: int, seed: int, chunk_size: int) -> None:
    updates = make_updates(n_clients, seed=seed)
    weights = list(np.random.default_rng(seed + 1).integers(1, 1000, size=n_clients).astype(float))
    result = WeightedMean(chunk_size=chunk_size).aggregate(updates, weights)
    for t, shape in enumerate(SHAPES):
        expected = np.average(stacked(updates, t).astype(np.float64), axis=0, weights=weights)
        assert result.update[t].dtype == np.float32
        assert result.update[t].shape == shape
        np.testing.assert_allclose(result.update[t], expected, rtol=1e-5, atol=1e-6)


def test_weighted_mean_matches_one_client_at_a_time_loop() -> None:
    updates = make_updates(5, seed=3, shapes=[(1000,)])
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    expected = np.zeros(1000, dtype=np.float64)
    for update, weight in zip(updates, weights, strict=True):
        expected += weight * update[0].astype(np.float64)
    expected /= sum(weights)
    result = WeightedMean(chunk_size=64).aggregate(updates, weights)
    np.testing.assert_allclose(result.update[0], expected, rtol=1e-5, atol=1e-6)


def test_weighted_mean_does_not_modify_inputs_and_returns_new_arrays() -> None:
    updates = make_updates(3)
    before = copies(updates)
    result = WeightedMean().aggregate(updates, [1.0, 1.0, 1.0])
    assert_inputs_unchanged(before, updates)
    for out in result.update:
        assert all(not np.shares_memory(out, u[0]) for u in updates)


def test_weighted_mean_of_one_client_is_that_client() -> None:
    updates = make_updates(1)
    result = WeightedMean().aggregate(updates, [7])
    for out, expected in zip(result.update, updates[0], strict=True):
        np.testing.assert_array_equal(out, expected)


def test_weighted_mean_handles_zero_d_all_zero_and_empty_tensors() -> None:
    shapes: list[tuple[int, ...]] = [(), (0,), (2, 0)]
    updates = [[np.zeros(s, dtype=np.float32) for s in shapes] for _ in range(3)]
    result = WeightedMean().aggregate(updates, [1, 2, 3])
    assert [a.shape for a in result.update] == shapes
    assert all(isinstance(a, np.ndarray) for a in result.update)
    assert float(result.update[0]) == 0.0
    assert result.measurements["aggregate_norm"] == 0.0


def test_weighted_mean_accepts_non_contiguous_input() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    updates: list[Update] = [[base.T], [base.T * 3]]
    result = WeightedMean(chunk_size=5).aggregate(updates, [1.0, 1.0])
    np.testing.assert_allclose(result.update[0], base.T * 2)


def test_weighted_mean_rejects_nan_client_and_reports_it() -> None:
    updates = make_updates(4)
    updates[2][1][3] = np.nan
    updates[3][0][0, 0] = np.inf
    result = WeightedMean(chunk_size=4).aggregate(updates, [1.0, 2.0, 3.0, 4.0])
    m = result.measurements
    assert (m["n_clients"], m["n_accepted"], m["n_rejected"]) == (4, 2, 2)
    assert m["rejected_clients"] == "2,3"
    assert "client 2: 1 non-finite value(s) in tensor 1" in str(m["rejection_reasons"])
    assert "client 3" in str(m["rejection_reasons"])
    expected = WeightedMean().aggregate(updates[:2], [1.0, 2.0])
    for a, b in zip(result.update, expected.update, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
        assert np.all(np.isfinite(a))


def test_weighted_mean_keeps_huge_but_finite_client() -> None:
    # float32 squares overflow to inf here; the client must not be mistaken for non-finite.
    updates: list[Update] = [[np.full(4, 1e30, dtype=np.float32)], [np.zeros(4, np.float32)]]
    result = WeightedMean().aggregate(updates, [1.0, 1.0])
    assert result.measurements["n_rejected"] == 0
    np.testing.assert_allclose(result.update[0], np.full(4, 5e29), rtol=1e-6)
    assert math.isclose(float(result.measurements["max_update_norm"]), 2e30, rel_tol=1e-6)


def test_weighted_mean_raises_when_every_client_is_non_finite() -> None:
    updates: list[Update] = [[np.array([np.nan], np.float32)], [np.array([np.inf], np.float32)]]
    with pytest.raises(ValueError, match="all 2 client updates were rejected"):
        WeightedMean().aggregate(updates, [1.0, 1.0])


def test_measurements_report_update_norms() -> None:
    updates: list[Update] = [[np.array([3.0, 4.0], np.float32)], [np.array([0.0, 1.0], np.float32)]]
    m = WeightedMean().aggregate(updates, [1.0, 1.0]).measurements
    assert m["method"] == "mean"
    assert math.isclose(float(m["mean_update_norm"]), 3.0, rel_tol=1e-6)
    assert math.isclose(float(m["max_update_norm"]), 5.0, rel_tol=1e-6)
    assert math.isclose(float(m["aggregate_norm"]), math.hypot(1.5, 2.5), rel_tol=1e-6)


# ------------------------------------------------------------------ median / trimmed mean


@settings(max_examples=20, deadline=None)
@given(n_clients=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_median_matches_np_median(n_clients: int, seed: int) -> None:
    updates = make_updates(n_clients, seed=seed)
    result = CoordinateWiseMedian().aggregate(updates, [1.0] * n_clients)
    for t, shape in enumerate(SHAPES):
        assert result.update[t].shape == shape
        assert isinstance(result.update[t], np.ndarray)
        np.testing.assert_allclose(
            result.update[t], np.median(stacked(updates, t), axis=0), rtol=1e-6
        )


@settings(max_examples=20, deadline=None)
@given(
    n_clients=st.integers(1, 12),
    beta=st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.4, 0.49]),
    seed=st.integers(0, 2**16),
)
def test_trimmed_mean_matches_scipy_trim_mean(n_clients: int, beta: float, seed: int) -> None:
    updates = make_updates(n_clients, seed=seed)
    result = TrimmedMean(beta=beta).aggregate(updates, [1.0] * n_clients)
    assert result.measurements["trimmed_per_side"] == int(beta * n_clients)
    for t, shape in enumerate(SHAPES):
        expected = scipy.stats.trim_mean(stacked(updates, t).astype(np.float64), beta, axis=0)
        assert result.update[t].shape == shape
        np.testing.assert_allclose(result.update[t], expected, rtol=1e-5, atol=1e-6)


def test_median_ignores_a_minority_of_huge_updates() -> None:
    honest = [[np.full(3, 1.0 + 0.01 * i, np.float32)] for i in range(5)]
    attackers = [[np.full(3, 1e6, np.float32)] for _ in range(2)]
    result = CoordinateWiseMedian().aggregate(honest + attackers, [1.0] * 7)
    assert np.all(result.update[0] < 1.1)


def test_median_and_trimmed_mean_reject_non_finite_clients() -> None:
    updates = make_updates(5)
    updates[0][2][...] = np.nan
    for aggregator in (CoordinateWiseMedian(), TrimmedMean(beta=0.2)):
        result = aggregator.aggregate(updates, [1.0] * 5)
        assert result.measurements["rejected_clients"] == "0"
        assert all(np.all(np.isfinite(a)) for a in result.update)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, float("nan")])
def test_trimmed_mean_rejects_beta_outside_zero_to_half(beta: float) -> None:
    with pytest.raises(ValueError, match=r"`beta` .* must be in \[0, 0.5\)"):
        TrimmedMean(beta=beta)


# ------------------------------------------------------------------ Krum


def byzantine_round(
    n_honest: int, n_attackers: int, *, seed: int = 0
) -> tuple[list[Update], set[int]]:
    rng = np.random.default_rng(seed)
    honest = [
        [(1.0 + 0.01 * rng.standard_normal((4, 3))).astype(np.float32)] for _ in range(n_honest)
    ]
    attackers = [[np.full((4, 3), 1e4, np.float32)] for _ in range(n_attackers)]
    # interleave attackers among honest clients
    updates = honest + attackers
    order = rng.permutation(len(updates))
    shuffled = [updates[int(k)] for k in order]
    attacker_positions = {pos for pos, k in enumerate(order) if k >= n_honest}
    return shuffled, attacker_positions


def test_krum_picks_an_honest_update_when_f_attackers_send_huge_updates() -> None:
    updates, attackers = byzantine_round(7, 2)
    result = Krum(f=2).aggregate(updates, [1.0] * 9)
    selected = int(result.measurements["selected_clients"])
    assert selected not in attackers
    np.testing.assert_array_equal(result.update[0], updates[selected][0])
    assert result.measurements["method"] == "krum"


def test_multi_krum_averages_only_honest_updates() -> None:
    updates, attackers = byzantine_round(8, 3, seed=5)
    result = Krum(f=3, m=5).aggregate(updates, [1.0] * 11)
    selected = [int(s) for s in str(result.measurements["selected_clients"]).split(",")]
    assert len(selected) == 5
    assert not set(selected) & attackers
    expected = np.mean(np.stack([updates[i][0] for i in selected]), axis=0)
    np.testing.assert_allclose(result.update[0], expected, rtol=1e-6)
    assert np.all(np.abs(result.update[0] - 1.0) < 0.1)


def test_krum_score_matches_brute_force_definition() -> None:
    updates = make_updates(7, seed=11, shapes=[(6,), (2, 2)])
    flat = [np.concatenate([a.ravel() for a in u]).astype(np.float64) for u in updates]
    f = 2
    scores = []
    for i, x in enumerate(flat):
        dists = sorted(float(np.sum((x - y) ** 2)) for j, y in enumerate(flat) if j != i)
        scores.append(sum(dists[: len(flat) - f - 2]))
    result = Krum(f=f).aggregate(updates, [1.0] * 7)
    assert int(result.measurements["selected_clients"]) == int(np.argmin(scores))


@pytest.mark.parametrize(("n", "f"), [(4, 1), (6, 2), (2, 0)])
def test_krum_requires_more_than_2f_plus_2_clients(n: int, f: int) -> None:
    with pytest.raises(ValueError, match=r"needs n > 2f \+ 2"):
        Krum(f=f).aggregate(make_updates(n), [1.0] * n)


def test_krum_counts_only_finite_updates_towards_n() -> None:
    updates = make_updates(5)
    updates[4][0][...] = np.inf
    with pytest.raises(ValueError, match=r"got 4 usable update\(s\) \(1 rejected\)"):
        Krum(f=1).aggregate(updates, [1.0] * 5)


def test_multi_krum_rejects_m_above_n_minus_f() -> None:
    with pytest.raises(ValueError, match="m <= n - f = 5"):
        Krum(f=2, m=6).aggregate(make_updates(7), [1.0] * 7)


@pytest.mark.parametrize(("f", "m"), [(-1, 1), (0, 0)])
def test_krum_rejects_negative_f_and_zero_m(f: int, m: int) -> None:
    with pytest.raises(ValueError, match="must be at least"):
        Krum(f=f, m=m)


# ------------------------------------------------------------------ structural validation

ALL_AGGREGATORS = [WeightedMean(), CoordinateWiseMedian(), TrimmedMean(beta=0.1), Krum(f=0)]


@pytest.mark.parametrize("aggregator", ALL_AGGREGATORS, ids=lambda a: type(a).__name__)
def test_mismatched_shapes_raise_naming_the_client_and_tensor(aggregator: Aggregator) -> None:
    updates = make_updates(4)
    updates[2][0] = np.zeros((3, 5), np.float32)
    before = copies(updates)
    with pytest.raises(ValueError, match=r"client 2 tensor 0 has shape \(3, 5\), client 0 sent"):
        aggregator.aggregate(updates, [1.0] * 4)
    assert_inputs_unchanged(before, updates)


@pytest.mark.parametrize("aggregator", ALL_AGGREGATORS, ids=lambda a: type(a).__name__)
def test_different_tensor_counts_raise(aggregator: Aggregator) -> None:
    updates = make_updates(4)
    updates[1] = updates[1][:2]
    with pytest.raises(ValueError, match="client 1 sent 2 tensors, client 0 sent 3"):
        aggregator.aggregate(updates, [1.0] * 4)


@pytest.mark.parametrize("aggregator", ALL_AGGREGATORS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("bad_weight", [0.0, -3.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_weights_raise(
    aggregator: Aggregator, bad_weight: float
) -> None:
    with pytest.raises(ValueError, match="weight of client 1 must be a finite positive"):
        aggregator.aggregate(make_updates(4), [1.0, bad_weight, 1.0, 1.0])


@pytest.mark.parametrize("aggregator", ALL_AGGREGATORS, ids=lambda a: type(a).__name__)
def test_weight_count_must_match_update_count(aggregator: Aggregator) -> None:
    with pytest.raises(ValueError, match="Found 3 weights for 4 updates"):
        aggregator.aggregate(make_updates(4), [1.0, 1.0, 1.0])


@pytest.mark.parametrize("aggregator", ALL_AGGREGATORS, ids=lambda a: type(a).__name__)
def test_no_updates_raise(aggregator: Aggregator) -> None:
    with pytest.raises(ValueError, match="`updates` is empty"):
        aggregator.aggregate([], [])


def test_integer_tensors_raise_type_error() -> None:
    updates: list[Update] = [[np.zeros(3, np.int32)]]
    with pytest.raises(TypeError, match="floating dtype"):
        WeightedMean().aggregate(updates, [1.0])


# ------------------------------------------------------------------ factory


@pytest.mark.parametrize("level", ["none", "dp"])
@pytest.mark.parametrize(
    ("method", "params", "expected"),
    [
        ("mean", {}, WeightedMean()),
        ("median", {}, CoordinateWiseMedian()),
        ("trimmed_mean", {"beta": 0.2}, TrimmedMean(beta=0.2)),
        ("krum", {"f": 1}, Krum(f=1)),
        ("multi_krum", {"f": 1, "m": 3}, Krum(f=1, m=3)),
    ],
)
def test_factory_builds_each_method_when_updates_are_visible(
    level: str, method: str, params: dict[str, float], expected: object
) -> None:
    assert make_aggregator(method, privacy_level=level, **params) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("level", ["secure-agg", "dp+secure-agg"])
def test_factory_allows_mean_under_secure_aggregation(level: str) -> None:
    aggregator = make_aggregator("mean", privacy_level=level)
    result = aggregator.aggregate(make_updates(2), [1.0, 3.0])
    assert isinstance(result, AggregateResult)


@pytest.mark.parametrize("level", ["secure-agg", "dp+secure-agg"])
@pytest.mark.parametrize(
    ("method", "name", "params"),
    [
        ("median", "coordinate-wise median", {}),
        ("trimmed_mean", "trimmed mean", {"beta": 0.1}),
        ("krum", "Krum", {"f": 1}),
        ("multi_krum", "Multi-Krum", {"f": 1, "m": 2}),
    ],
)
def test_factory_refuses_robust_methods_under_secure_aggregation(
    level: str, method: str, name: str, params: dict[str, float]
) -> None:
    with pytest.raises(ValueError) as info:
        make_aggregator(method, privacy_level=level, **params)  # type: ignore[arg-type]
    assert str(info.value) == (
        f"{name} needs individual updates, which secure aggregation hides by design; "
        "use method='mean' or privacy_level='dp'."
    )


def test_factory_rejects_unknown_names_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown aggregation method 'avg'; use one of 'mean'"):
        make_aggregator("avg", privacy_level="none")
    with pytest.raises(ValueError, match="unknown privacy_level 'secagg'; use one of 'none'"):
        make_aggregator("mean", privacy_level="secagg")


def test_factory_rejects_parameters_the_method_does_not_take() -> None:
    with pytest.raises(ValueError, match="method 'median' takes no parameter"):
        make_aggregator("median", privacy_level="none", beta=0.1)
    with pytest.raises(ValueError, match="needs `f`"):
        make_aggregator("krum", privacy_level="dp")
    with pytest.raises(ValueError, match="needs `m`"):
        make_aggregator("multi_krum", privacy_level="dp", f=1)


def test_privacy_level_knows_which_levels_hide_individual_updates() -> None:
    hidden = {level for level in PrivacyLevel if level.hides_individual_updates}
    assert hidden == {PrivacyLevel.SECURE_AGG, PrivacyLevel.DP_SECURE_AGG}


def test_the_weighted_mean_pass_runs_with_one_blas_thread_and_restores_the_setting() -> None:
    from threadpoolctl import threadpool_info

    from aggregation.robust import _one_blas_thread

    def blas_threads() -> list[int]:
        return [int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    assert before  # numpy's (and scipy's) OpenBLAS are loaded
    with _one_blas_thread():
        assert blas_threads() == [1] * len(before)
    assert blas_threads() == before
