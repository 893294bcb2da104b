"""Shamir sharing, stochastic quantization and parameter validation."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.secagg import SecAggParams, dequantize_sum, quantize, shamir
from aggregation.secagg.graph import harary_graph


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), data=st.data())
def test_any_threshold_shares_rebuild_the_secret(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    holders = data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=t, holders=holders)
    subset = data.draw(st.lists(st.sampled_from(holders), min_size=t, max_size=n, unique=True))
    assert shamir.combine({h: shares[h] for h in subset}, threshold=t) == secret


def test_fewer_than_threshold_shares_are_refused() -> None:
    shares = shamir.split(b"s" * 32, threshold=3, holders=[1, 2, 3])
    with pytest.raises(ValueError, match="Need 3 shares"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3)


def test_threshold_minus_one_shares_are_consistent_with_every_secret() -> None:
    # Information-theoretic hiding: for t=2, one share fits a line through any secret.
    shares = shamir.split(b"\x01" * 32, threshold=2, holders=[5, 6])
    y = int.from_bytes(shares[5], "big")
    for candidate in (0, 1, 2**255):
        slope = (y - candidate) * pow(shamir.share_x(5), -1, shamir.PRIME) % shamir.PRIME
        assert (candidate + slope * shamir.share_x(5)) % shamir.PRIME == y


def test_shamir_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        shamir.split(b"short", threshold=2, holders=[1, 2])
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(b"s" * 32, threshold=2, holders=[1, 1])
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(b"s" * 32, threshold=3, holders=[1, 2])


PARAMS = SecAggParams(
    num_clients=50, num_neighbours=4, threshold=3, vector_length=20_000, clipping_range=2.0
)


def test_sum_of_n_maximal_quantized_values_does_not_wrap() -> None:
    top = quantize(np.full(20_000, 5.0, dtype=np.float32), PARAMS, np.random.default_rng(0))
    assert int(top.max()) == PARAMS.quantization_levels
    assert PARAMS.num_clients * PARAMS.quantization_levels <= 2**32 - 1
    bottom = quantize(np.full(20_000, -5.0, dtype=np.float32), PARAMS, np.random.default_rng(0))
    assert int(bottom.max()) == 0


def test_stochastic_rounding_is_unbiased() -> None:
    x = np.full(20_000, 0.123456, dtype=np.float32)
    q = quantize(x, PARAMS, np.random.default_rng(1))
    decoded = dequantize_sum(q, num_summands=1, params=PARAMS)
    assert np.all(np.abs(decoded - float(x[0])) <= PARAMS.quantization_step)
    # mean error over 20k values: well within 5 standard errors of 0 (std <= step/2)
    assert abs(decoded.mean() - float(x[0])) < 5 * PARAMS.quantization_step / 2 / np.sqrt(20_000)


def test_dequantized_sum_is_within_n_steps_of_the_float_sum() -> None:
    rng = np.random.default_rng(2)
    xs = [rng.uniform(-2, 2, 20_000).astype(np.float32) for _ in range(50)]
    total = np.zeros(20_000, dtype=np.uint32)
    for x in xs:
        total += quantize(x, PARAMS, rng)
    error = np.abs(
        dequantize_sum(total, num_summands=50, params=PARAMS)
        - sum(x.astype(np.float64) for x in xs)
    )
    assert error.max() <= 50 * PARAMS.quantization_step


def test_quantize_all_zero_update_maps_to_the_middle() -> None:
    q = quantize(np.zeros(20_000, dtype=np.float32), PARAMS, np.random.default_rng(3))
    mid = PARAMS.quantization_levels / 2
    assert np.all(np.abs(q.astype(np.float64) - mid) <= 1)


def test_params_report_every_problem_with_how_to_fix_it() -> None:
    with pytest.raises(ValueError) as info:
        SecAggParams(
            num_clients=5,
            num_neighbours=5,
            threshold=1,
            vector_length=0,
            clipping_range=-1.0,
            modulus=2**31,
        )
    message = str(info.value)
    for text in (
        "`num_neighbours` must be in [1, num_clients - 1] = [1, 4]. Found 5.",
        "`threshold` must be in [2, k+1] = [2, 6]",
        "Found 1.",
        "`vector_length` must be at least 1",
        "`clipping_range` must be positive",
        "`modulus` must be 2^32",
    ):
        assert text in message
    with pytest.raises(TypeError, match="int"):
        SecAggParams(
            num_clients=5.0,  # type: ignore[arg-type]
            num_neighbours=2,
            threshold=2,
            vector_length=1,
            clipping_range=1.0,
        )
    with pytest.raises(ValueError, match="positive and finite"):
        SecAggParams(
            num_clients=5,
            num_neighbours=2,
            threshold=2,
            vector_length=1,
            clipping_range=float("nan"),
        )


@pytest.mark.parametrize(("n", "k"), [(n, k) for n in range(2, 14) for k in range(1, n)])
def test_masking_graph_is_k_regular_or_has_one_extra_edge_when_nk_is_odd(n: int, k: int) -> None:
    graph = harary_graph(list(range(n)), k, np.random.default_rng(n * k))
    degrees = sorted(len(p) for p in graph.values())
    assert all(a in graph[b] for a, b in itertools.permutations(graph, 2) if b in graph[a])
    assert all(node not in peers for node, peers in graph.items())
    assert degrees == ([k] * n if n * k % 2 == 0 else [k] * (n - 1) + [k + 1])


def test_two_clients_use_the_whole_int31_range_without_overflow() -> None:
    params = SecAggParams(
        num_clients=2, num_neighbours=1, threshold=2, vector_length=3, clipping_range=1.0
    )
    x = np.array([-9.0, 1.0, 9.0], dtype=np.float32)
    q = quantize(x, params, np.random.default_rng(0))
    assert params.quantization_levels == 2**31 - 1
    assert q.tolist() == [0, 2**31 - 1, 2**31 - 1]
    assert int(q.astype(np.uint64).sum()) <= 2**32 - 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_update_and_quantize_refuse_nan_and_inf(bad: float) -> None:
    from aggregation.secagg.quantization import check_update

    params = SecAggParams(
        num_clients=2, num_neighbours=1, threshold=2, vector_length=70_000, clipping_range=1.0
    )
    x = np.zeros(70_000, dtype=np.float32)
    x[69_999] = bad  # in the second chunk
    with pytest.raises(ValueError, match="NaN or Inf"):
        check_update(x, params)
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(x, params, np.random.default_rng(0))
