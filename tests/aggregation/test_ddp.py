"""Tests for the distributed DP mechanism: rotation, conditional rounding, noise, decoding."""

from __future__ import annotations

import dataclasses
import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from scipy import stats
from scipy.linalg import hadamard

from aggregation.ddp import (
    MAX_LOCAL_STDDEV,
    MAX_ROUNDING_ATTEMPTS,
    WRAP_PROBABILITY,
    DdpConfig,
    DistributedMechanism,
    clip_l2,
    conditional_round,
    decode_sum,
    encode,
    encode_and_noise,
    fwht,
    noise_share,
    rotate,
    rotation_signs,
    sample_discrete_gaussian,
    sample_skellam,
    secure_rng,
    to_modular,
    unrotate,
)

SEED = 20250611
ROTATION_SEED = b"run-7/round-3/rotation"
MECHANISMS = [DistributedMechanism.SKELLAM, DistributedMechanism.DGAUSS]


def make_config(**overrides: object) -> DdpConfig:
    params: dict[str, object] = {
        "mechanism": DistributedMechanism.SKELLAM,
        "dim": 100,
        "l2_clip": 1.0,
        "noise_multiplier": 1.0,
        "min_survivors": 5,
        "max_summands": 10,
    }
    params.update(overrides)
    return DdpConfig(**params)  # type: ignore[arg-type]


def secagg_sum(contributions: list[NDArray[np.uint32]]) -> NDArray[np.uint32]:
    """What SecAgg+ reveals: the sum of the contributions mod 2^32."""
    total = np.zeros_like(contributions[0])
    for contribution in contributions:
        np.add(total, contribution, out=total)  # uint32 arithmetic wraps mod 2^32
    return total


def rounding_error_bound(cfg: DdpConfig, summands: int) -> float:
    """Every rounded coordinate moves by less than 1 integer unit, so the integer error vector of
    one summand has L2 norm < sqrt(d); the inverse rotation is orthonormal and un-padding only
    drops coordinates, so the decoded sum is off by less than summands * gamma * sqrt(d) in L2
    (plus float error, far below it)."""
    return summands * cfg.gamma * math.sqrt(cfg.padded_dim) * (1 + 1e-9) + 1e-12 * summands


# --------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("d", [1, 2, 8, 64])
def test_fwht_is_the_normalized_sylvester_hadamard_matrix(d: int) -> None:
    np.testing.assert_allclose(fwht(np.eye(d)), hadamard(d) / math.sqrt(d), atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(
    data=st.integers(0, 10).flatmap(
        lambda log_d: hnp.arrays(
            np.float64, (3, 2**log_d), elements=st.floats(-1e3, 1e3, allow_nan=False)
        )
    )
)
def test_fwht_is_orthonormal_and_its_own_inverse(data: NDArray[np.float64]) -> None:
    before = data.copy()
    transformed = fwht(data)
    np.testing.assert_array_equal(data, before)  # a new array; the input is untouched
    np.testing.assert_allclose(
        np.linalg.norm(transformed, axis=1), np.linalg.norm(data, axis=1), rtol=1e-12, atol=1e-9
    )
    np.testing.assert_allclose(fwht(transformed), data, rtol=1e-12, atol=1e-9)


def test_fwht_refuses_a_length_that_is_not_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        fwht(np.zeros(12))


@settings(max_examples=40, deadline=None)
@given(
    dim=st.integers(1, 300),
    rows=st.integers(1, 3),
    seed=st.binary(min_size=16, max_size=40),
    values=st.data(),
)
def test_rotation_pads_preserves_norm_and_unrotate_inverts_it(
    dim: int, rows: int, seed: bytes, values: st.DataObject
) -> None:
    x = values.draw(
        hnp.arrays(np.float64, (rows, dim), elements=st.floats(-100, 100, allow_nan=False))
    )
    padded_dim = 1 << (dim - 1).bit_length()
    y = rotate(x, rotation_seed=seed, padded_dim=padded_dim)
    assert y.shape == (rows, padded_dim)
    np.testing.assert_allclose(
        np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12, atol=1e-9
    )
    back = unrotate(y, rotation_seed=seed, dim=dim)
    assert back.shape == (rows, dim)
    np.testing.assert_allclose(back, x, rtol=1e-12, atol=1e-9)


def test_rotation_signs_are_public_deterministic_and_balanced() -> None:
    d = 1 << 16
    signs = rotation_signs(ROTATION_SEED, d)
    np.testing.assert_array_equal(signs, rotation_signs(ROTATION_SEED, d))
    assert set(np.unique(signs)) == {-1.0, 1.0}
    # The mean of d fair signs has standard deviation 1/sqrt(d): allow 5 of them.
    assert abs(signs.mean()) < 5 / math.sqrt(d)
    other = rotation_signs(b"run-7/round-4/rotation", d)
    assert 0.45 < np.mean(signs != other) < 0.55
    # A prefix of a longer stream: the signs of a smaller dimension are the first ones.
    np.testing.assert_array_equal(rotation_signs(ROTATION_SEED, 64), signs[:64])


def test_rotation_seed_must_be_bytes_of_at_least_16() -> None:
    with pytest.raises(TypeError, match="`rotation_seed` must be bytes"):
        rotation_signs("a string seed of some length", 8)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 16 bytes"):
        rotation_signs(b"short", 8)


# --------------------------------------------------------------------------- round trip


@settings(max_examples=50, deadline=None)
@given(
    dim=st.integers(1, 200),
    bits=st.sampled_from([16, 24, 32]),
    data=st.data(),
)
def test_decoded_sum_of_encodings_is_within_the_rounding_bound(
    dim: int, bits: int, data: st.DataObject
) -> None:
    summands = data.draw(st.integers(1, 6))
    cfg = make_config(dim=dim, modulus_bits=bits, max_summands=6, l2_clip=3.0)
    raw = data.draw(
        hnp.arrays(np.float64, (summands, dim), elements=st.floats(-10, 10, allow_nan=False))
    )
    raw[data.draw(st.integers(0, summands - 1))] = 0.0  # always one zero vector among them
    vectors = clip_l2(raw, l2_clip=cfg.l2_clip)
    before = vectors.copy()
    rng = np.random.default_rng(SEED)
    contributions = [
        to_modular(encode(v, cfg, rotation_seed=ROTATION_SEED, rng=rng)) for v in vectors
    ]
    np.testing.assert_array_equal(vectors, before)
    decoded = decode_sum(secagg_sum(contributions), cfg, rotation_seed=ROTATION_SEED)
    assert decoded.shape == (dim,)
    error = float(np.linalg.norm(decoded - vectors.sum(axis=0)))
    assert error <= rounding_error_bound(cfg, summands)


def test_zero_vector_encodes_to_exact_zeros_and_dim_one_round_trips() -> None:
    cfg = make_config(dim=1)
    rng = np.random.default_rng(SEED)
    assert cfg.padded_dim == 1
    zeros = encode(np.zeros(1), cfg, rotation_seed=ROTATION_SEED, rng=rng)
    np.testing.assert_array_equal(zeros, np.zeros(1, dtype=np.int64))
    total = secagg_sum(
        [
            to_modular(encode(np.array([v]), cfg, rotation_seed=ROTATION_SEED, rng=rng))
            for v in (0.75, -0.25)
        ]
    )
    decoded = decode_sum(total, cfg, rotation_seed=ROTATION_SEED)
    assert abs(float(decoded[0]) - 0.5) <= rounding_error_bound(cfg, 2)


def test_batch_is_encoded_row_by_row_and_summed() -> None:
    cfg = make_config(dim=300, modulus_bits=20, max_summands=50)
    rng = np.random.default_rng(SEED)
    batch = clip_l2(rng.normal(size=(7, 300)), l2_clip=cfg.l2_clip)
    encoded = encode(batch, cfg, rotation_seed=ROTATION_SEED, rng=rng)
    assert encoded.shape == (cfg.padded_dim,)
    assert encoded.dtype == np.int64
    decoded = decode_sum(to_modular(encoded), cfg, rotation_seed=ROTATION_SEED)
    assert np.linalg.norm(decoded - batch.sum(axis=0)) <= rounding_error_bound(cfg, 7)
    empty = encode(np.zeros((0, 300)), cfg, rotation_seed=ROTATION_SEED, rng=rng)
    np.testing.assert_array_equal(empty, np.zeros(cfg.padded_dim, dtype=np.int64))


def test_float32_input_is_accepted_and_rounding_is_unbiased() -> None:
    cfg = make_config(dim=64, modulus_bits=12, max_summands=2, min_survivors=2)
    rng = np.random.default_rng(SEED)
    x = clip_l2(rng.normal(size=64), l2_clip=1.0).astype(np.float32)
    trials = 2000
    total = np.zeros(cfg.padded_dim, dtype=np.int64)
    for _ in range(trials):
        total += encode(x, cfg, rotation_seed=ROTATION_SEED, rng=rng)
    scaled = total.astype(np.float64) * (cfg.gamma / trials)
    mean = unrotate(scaled, rotation_seed=ROTATION_SEED, dim=64)
    # Each coordinate's rounding has variance <= 1/4 integer units, so the mean of `trials`
    # encodings is off by a vector with per-coordinate std <= gamma / (2 sqrt(trials)); allow
    # 6 of them (conditional rounding adds a bias of the order of beta's tail, far smaller).
    assert np.max(np.abs(mean - x)) < 6 * cfg.gamma / (2 * math.sqrt(trials))


# --------------------------------------------------------------------------- conditional rounding


def test_conditional_rounding_never_exceeds_the_bound_where_plain_rounding_would() -> None:
    rng = np.random.default_rng(SEED)
    d = 1024
    halves = np.full((200, d), 0.5)
    bound = math.sqrt(d / 2)  # the plain rounding's squared norm is Binomial(d, 1/2): half exceed
    plain = np.floor(halves) + (rng.random(halves.shape) < 0.5)
    assert np.mean(np.linalg.norm(plain, axis=1) > bound) > 0.3
    rounded = conditional_round(halves, bound, rng)
    assert rounded.dtype == np.int64
    assert np.all(np.linalg.norm(rounded.astype(np.float64), axis=1) <= bound)
    assert set(np.unique(rounded)) <= {0, 1}


def test_encoded_vectors_never_exceed_the_l2_sensitivity() -> None:
    # A coarse grid (12 bits) where the conditional bound is below C/gamma + sqrt(d).
    cfg = make_config(dim=1000, modulus_bits=12, max_summands=4, min_survivors=2)
    x_over_gamma = cfg.l2_clip / cfg.gamma
    assert cfg.l2_sensitivity < x_over_gamma + math.sqrt(cfg.padded_dim)
    rng = np.random.default_rng(SEED)
    for _ in range(200):
        x = clip_l2(rng.normal(size=1000), l2_clip=cfg.l2_clip)
        encoded = encode(x, cfg, rotation_seed=ROTATION_SEED, rng=rng).astype(np.float64)
        assert np.linalg.norm(encoded) <= cfg.l2_sensitivity
        assert np.sum(np.abs(encoded)) <= cfg.l1_sensitivity


def test_conditional_rounding_gives_up_with_a_clear_error() -> None:
    rng = np.random.default_rng(SEED)
    with pytest.raises(RuntimeError, match=f"failed {MAX_ROUNDING_ATTEMPTS} times.*clip it first"):
        conditional_round(np.full((1, 16), 0.5), 0.5, rng)


# --------------------------------------------------------------------------- noise


def _variance_tolerance(samples: int) -> float:
    """Relative tolerance on a sample variance: 5 standard errors, sqrt(2/N) each for a
    near-Gaussian variable (the noise sums here have excess kurtosis ~1/variance ~ 0)."""
    return 5 * math.sqrt(2 / samples)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_sum_of_min_survivors_shares_has_the_planned_variance(
    mechanism: DistributedMechanism,
) -> None:
    cfg = make_config(mechanism=mechanism, dim=4096, min_survivors=8, max_summands=20)
    rng = np.random.default_rng(SEED)
    trials = 25
    sums = np.stack(
        [sum(noise_share(cfg, rng) for _ in range(cfg.min_survivors)) for _ in range(trials)]
    )
    assert sums.dtype == np.int64
    samples = sums.size  # 102,400
    assert abs(float(sums.mean())) < 5 * math.sqrt(cfg.aggregate_variance / samples)
    assert float(sums.var()) == pytest.approx(
        cfg.aggregate_variance, rel=_variance_tolerance(samples)
    )


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_decoded_aggregate_noise_has_std_at_least_z_times_clip(
    mechanism: DistributedMechanism,
) -> None:
    z, c = 0.7, 2.5
    cfg = make_config(
        mechanism=mechanism,
        dim=3000,
        l2_clip=c,
        noise_multiplier=z,
        min_survivors=6,
        max_summands=12,
    )
    # Planned: the sum of min_survivors shares is exactly (z C)^2 in real units.
    assert cfg.gamma * math.sqrt(cfg.aggregate_variance) == pytest.approx(z * c, rel=1e-12)
    rng = np.random.default_rng(SEED)
    decoded = np.concatenate(
        [
            decode_sum(
                secagg_sum([to_modular(noise_share(cfg, rng)) for _ in range(cfg.min_survivors)]),
                cfg,
                rotation_seed=bytes([trial]) * 16,
            )
            for trial in range(20)
        ]
    )
    tolerance = _variance_tolerance(decoded.size)  # 60,000 values
    assert float(decoded.std()) == pytest.approx(z * c, rel=tolerance)
    # More survivors only add noise: twice the shares, twice the variance.
    doubled = decode_sum(
        secagg_sum([to_modular(noise_share(cfg, rng)) for _ in range(2 * cfg.min_survivors)]),
        cfg,
        rotation_seed=ROTATION_SEED,
    )
    assert float(doubled.var()) == pytest.approx(2 * (z * c) ** 2, rel=5 * math.sqrt(2 / 3000))


def test_skellam_sampler_matches_the_skellam_distribution() -> None:
    rng = np.random.default_rng(SEED)
    variance, n = 3.0, 200_000
    samples = sample_skellam(variance, n, rng)
    values = np.arange(-12, 13)
    expected = stats.skellam.pmf(values, variance / 2, variance / 2) * n
    observed = np.array([np.sum(samples == v) for v in values])
    # Chi-square goodness of fit on the 25 central values (the rest has mass < 1e-5).
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    assert chi2 < stats.chi2.ppf(1 - 1e-4, df=len(values) - 1)


def _discrete_gaussian_moments(sigma_squared: float) -> tuple[float, float]:
    """Exact variance and fourth moment of N_Z(0, sigma^2) by direct summation."""
    k = np.arange(-200, 201, dtype=np.float64)
    weights = np.exp(-k * k / (2 * sigma_squared))
    weights /= weights.sum()
    return float(np.sum(weights * k**2)), float(np.sum(weights * k**4))


@pytest.mark.parametrize(("num_samples", "kl_tolerance"), [(1000, 5e-2), (10000, 5e-3)])
def test_discrete_gaussian_sampler_passes_the_reference_kl_test(
    num_samples: int, kl_tolerance: float
) -> None:
    # google-research/federated distributed_dp/discrete_gaussian_utils_test.py
    # `test_kl_divergence`: scale 10, KL(empirical || N_Z(0, 100)) below 5e-2 with 1000
    # samples and below 5e-3 with 10000.
    rng = np.random.default_rng(SEED)
    sigma_squared = 100.0
    samples = sample_discrete_gaussian(sigma_squared, num_samples, rng)
    k = np.arange(-400, 401, dtype=np.float64)
    log_normalizer = math.log(float(np.sum(np.exp(-k * k / (2 * sigma_squared)))))
    values, counts = np.unique(samples, return_counts=True)
    kl = float(
        np.sum(
            counts
            * (np.log(counts / num_samples) + log_normalizer + values**2 / (2 * sigma_squared))
        )
        / num_samples
    )
    assert kl < kl_tolerance


@pytest.mark.parametrize("sigma_squared", [1.0, 2.5, 1e6])
def test_discrete_gaussian_sampler_has_the_exact_variance(sigma_squared: float) -> None:
    rng = np.random.default_rng(SEED)
    n = 400_000
    samples = sample_discrete_gaussian(sigma_squared, n, rng).astype(np.float64)
    if sigma_squared < 100:
        variance, fourth = _discrete_gaussian_moments(sigma_squared)
        assert variance <= sigma_squared  # Canonne et al. 2020: Var[N_Z(0, s^2)] < s^2
    else:
        variance, fourth = sigma_squared, 3 * sigma_squared**2
    # Standard error of the sample variance: sqrt((mu4 - var^2) / n); allow 5 of them.
    assert float(np.mean(samples**2)) == pytest.approx(
        variance, abs=5 * math.sqrt((fourth - variance**2) / n)
    )
    assert abs(float(samples.mean())) < 5 * math.sqrt(variance / n)


# --------------------------------------------------------------------------- modular headroom


def _worst_case_sums(cfg: DdpConfig, trials: int) -> list[NDArray[np.int64]]:
    """Integer (not yet modular) sums of max_summands identical dense vectors of norm C plus
    max_noise_shares noise shares, with a fresh rotation each trial."""
    rng = np.random.default_rng(SEED)
    signs = 1.0 - 2.0 * rng.integers(0, 2, cfg.dim)
    batch = np.tile(cfg.l2_clip * signs / math.sqrt(cfg.dim), (cfg.max_summands, 1))
    sums = []
    for trial in range(trials):
        total = encode(batch, cfg, rotation_seed=trial.to_bytes(16, "big"), rng=rng)
        for _ in range(cfg.noise_shares):
            total += noise_share(cfg, rng)
        sums.append(total)
    return sums


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_worst_case_sum_with_noise_never_wraps_with_the_default_headroom(
    mechanism: DistributedMechanism,
) -> None:
    cfg = make_config(
        mechanism=mechanism,
        dim=1000,
        l2_clip=2.0,
        noise_multiplier=0.5,
        min_survivors=10,
        max_summands=40,
        modulus_bits=16,
    )
    assert cfg.wrap_probability_bound == pytest.approx(WRAP_PROBABILITY)
    limit = 1 << (cfg.modulus_bits - 1)
    sums = _worst_case_sums(cfg, trials=100)  # 102,400 coordinates
    assert all(int(s.min()) >= -limit and int(s.max()) < limit for s in sums)
    # The headroom is used, not wasted: the largest coordinate reaches past half the range.
    assert max(int(np.abs(s).max()) for s in sums) > limit / 2


def test_too_little_headroom_wraps_and_the_config_reports_it() -> None:
    cfg = make_config(
        dim=1000,
        l2_clip=2.0,
        noise_multiplier=0.5,
        min_survivors=10,
        max_summands=40,
        modulus_bits=16,
        k_stddevs=1.0,
    )
    assert cfg.wrap_probability_bound == 1.0
    limit = 1 << (cfg.modulus_bits - 1)
    sums = _worst_case_sums(cfg, trials=5)
    assert any(int(s.min()) < -limit or int(s.max()) >= limit for s in sums)


def test_a_modulus_too_small_for_the_summands_is_refused() -> None:
    with pytest.raises(ValueError, match="`modulus_bits` = 4 is too small for `max_summands` = 20"):
        make_config(modulus_bits=4, max_summands=20)


def test_centred_lift_recovers_negative_and_positive_sums_below_32_bits() -> None:
    cfg = make_config(dim=8, modulus_bits=20, max_summands=3, min_survivors=1)
    limit = 1 << 19
    integers = np.array([-limit, -limit + 1, -5, -1, 0, 1, 7, limit - 1], dtype=np.int64)
    parts = [integers // 3, integers // 3, integers - 2 * (integers // 3)]
    total = secagg_sum([to_modular(p) for p in parts])
    decoded = decode_sum(total, cfg, rotation_seed=ROTATION_SEED)
    expected = unrotate(integers.astype(np.float64) * cfg.gamma, rotation_seed=ROTATION_SEED, dim=8)
    np.testing.assert_allclose(decoded, expected, rtol=1e-12, atol=1e-15)


def test_to_modular_is_twos_complement_mod_2_32() -> None:
    values = np.array([-1, -(2**31), 0, 2**31 - 1, 2**32 + 5], dtype=np.int64)
    np.testing.assert_array_equal(
        to_modular(values), np.array([2**32 - 1, 2**31, 0, 2**31 - 1, 5], dtype=np.uint32)
    )
    with pytest.raises(TypeError, match="int64"):
        to_modular(np.array([1, 2], dtype=np.int32))


def test_encode_and_noise_is_the_encoding_plus_one_noise_share() -> None:
    cfg = make_config(mechanism=DistributedMechanism.DGAUSS, dim=50)
    x = clip_l2(np.linspace(-1, 1, 50), l2_clip=1.0)
    together = encode_and_noise(
        x, cfg, rotation_seed=ROTATION_SEED, rng=np.random.default_rng(SEED)
    )
    rng = np.random.default_rng(SEED)
    encoded = encode(x, cfg, rotation_seed=ROTATION_SEED, rng=rng)
    np.testing.assert_array_equal(together, to_modular(encoded + noise_share(cfg, rng)))


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("bits", [16, 32])
def test_derived_geometry_follows_the_stated_formulas(bits: int) -> None:
    cfg = make_config(
        dim=100,
        l2_clip=2.0,
        noise_multiplier=1.5,
        min_survivors=4,
        max_summands=9,
        modulus_bits=bits,
    )
    d, k, n, m = 128, cfg.headroom_stddevs, 9, 9
    assert cfg.padded_dim == d
    assert k == pytest.approx(math.sqrt(2 * math.log(2 * d / WRAP_PROBABILITY)), rel=1e-15)
    sigma = 1.5 * 2.0 / math.sqrt(4)
    fit = (
        2
        * k
        * math.sqrt((n * 2.0) ** 2 / d + m * sigma**2)
        / math.sqrt(2 ** (2 * bits) - k * k * n)
    )
    # 16 bits: the headroom rule sets gamma; 32 bits: the cap on a share's integer std does.
    gamma = fit if bits == 16 else sigma / MAX_LOCAL_STDDEV
    assert fit > sigma / MAX_LOCAL_STDDEV if bits == 16 else fit < sigma / MAX_LOCAL_STDDEV
    assert cfg.gamma == pytest.approx(gamma, rel=1e-14)
    assert cfg.local_variance == pytest.approx((sigma / gamma) ** 2, rel=1e-13)
    assert cfg.aggregate_variance == pytest.approx(4 * (sigma / gamma) ** 2, rel=1e-13)
    x = 2.0 / gamma
    conditional = math.sqrt(x * x + d / 4 + math.sqrt(2 * 0.5) * (x + math.sqrt(d) / 2))
    assert cfg.l2_sensitivity == pytest.approx(min(x + math.sqrt(d), conditional), rel=1e-14)
    assert cfg.l1_sensitivity == pytest.approx(
        cfg.l2_sensitivity * min(math.sqrt(d), cfg.l2_sensitivity), rel=1e-14
    )
    assert cfg.bits_used_per_coordinate == bits * 128 / 100
    spread = (n * x) ** 2 / d + n / 4 + m * (sigma / gamma) ** 2
    assert cfg.occupied_bits == pytest.approx(math.log2(2 * k * math.sqrt(spread)), rel=1e-14)
    assert cfg.occupied_bits <= bits + 1e-12
    assert cfg.effective_noise_multiplier < 1.5
    # Without the condition the bound is C/gamma + sqrt(d).
    plain = dataclasses.replace(cfg, beta=0.0)
    assert plain.l2_sensitivity == pytest.approx(2.0 / plain.gamma + math.sqrt(d), rel=1e-14)
    assert cfg.to_json()["padded_dim"] == 128


@pytest.mark.parametrize(("dim", "padded"), [(1, 1), (2, 2), (3, 4), (128, 128), (129, 256)])
def test_padded_dim_is_the_next_power_of_two(dim: int, padded: int) -> None:
    assert make_config(dim=dim).padded_dim == padded


def test_config_reports_every_invalid_parameter_at_once() -> None:
    with pytest.raises(ValueError) as info:
        make_config(
            dim=0,
            l2_clip=-1.0,
            noise_multiplier=0.0,
            min_survivors=0,
            max_summands=0,
            modulus_bits=33,
            beta=1.0,
            k_stddevs=-2.0,
        )
    message = str(info.value)
    for expected in [
        "`dim` must be at least 1. Found 0.",
        "`l2_clip` must be positive. Found -1.0.",
        "`noise_multiplier` must be positive. Found 0.0.",
        "`min_survivors` must be at least 1. Found 0.",
        "`max_summands` must be at least 1. Found 0.",
        "`modulus_bits` must be in [2, 32]",
        "`beta` must be in [0, 1)",
        "`k_stddevs` must be positive. Found -2.0.",
    ]:
        assert expected in message


def test_config_rejects_wrong_types_unknown_mechanisms_and_too_few_noise_shares() -> None:
    with pytest.raises(TypeError, match="`dim` must be an int"):
        make_config(dim=10.0)
    with pytest.raises(TypeError, match="`l2_clip` must be a real number"):
        make_config(l2_clip="1.0")
    with pytest.raises(TypeError, match="`modulus_bits` must be an int"):
        make_config(modulus_bits=True)
    with pytest.raises(ValueError, match=r"`mechanism` must be one of \['skellam', 'ddgauss'\]"):
        make_config(mechanism="gaussian")
    with pytest.raises(ValueError, match="`max_noise_shares` must be at least `min_survivors` = 8"):
        make_config(min_survivors=8, max_noise_shares=4)
    assert make_config(mechanism="ddgauss").mechanism is DistributedMechanism.DGAUSS
    with pytest.raises(dataclasses.FrozenInstanceError):
        make_config().dim = 3  # type: ignore[misc]


def test_discrete_gaussian_shares_coarser_than_one_unit_are_refused() -> None:
    with pytest.raises(ValueError, match=r"sigma = .* < 1 in integer units"):
        make_config(mechanism="ddgauss", modulus_bits=3, max_summands=2, min_survivors=2)
    make_config(mechanism="skellam", modulus_bits=3, max_summands=2, min_survivors=2)


# --------------------------------------------------------------------------- bad input


def test_encode_refuses_bad_vectors_and_leaves_them_untouched() -> None:
    cfg = make_config(dim=4)
    rng = np.random.default_rng(SEED)
    long = np.array([1.0, 1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"exceed l2_clip = 1.*clip_l2"):
        encode(long, cfg, rotation_seed=ROTATION_SEED, rng=rng)
    np.testing.assert_array_equal(long, [1.0, 1.0, 0.0, 0.0])
    for bad in (np.array([np.nan, 0, 0, 0]), np.array([0, np.inf, 0, 0])):
        with pytest.raises(ValueError, match="NaN or Inf"):
            encode(bad, cfg, rotation_seed=ROTATION_SEED, rng=rng)
    with pytest.raises(TypeError, match="float numpy array"):
        encode(np.zeros(4, dtype=np.int64), cfg, rotation_seed=ROTATION_SEED, rng=rng)
    with pytest.raises(ValueError, match=r"shape \(4,\) or \(n, 4\)"):
        encode(np.zeros(5), cfg, rotation_seed=ROTATION_SEED, rng=rng)
    with pytest.raises(ValueError, match=r"shape \(4,\) or \(n, 4\)"):
        encode(np.zeros((1, 1, 4)), cfg, rotation_seed=ROTATION_SEED, rng=rng)
    with pytest.raises(TypeError, match=r"numpy\.random\.Generator"):
        encode(np.zeros(4), cfg, rotation_seed=ROTATION_SEED, rng=np.random.RandomState(0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"numpy\.random\.Generator"):
        noise_share(cfg, rng=0)  # type: ignore[arg-type]


def test_decode_refuses_wrong_dtype_and_shape() -> None:
    cfg = make_config(dim=100)
    with pytest.raises(TypeError, match="uint32"):
        decode_sum(np.zeros(128, dtype=np.int64), cfg, rotation_seed=ROTATION_SEED)
    with pytest.raises(ValueError, match=r"shape \(128,\)"):
        decode_sum(np.zeros(100, dtype=np.uint32), cfg, rotation_seed=ROTATION_SEED)


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=20),
        elements=st.floats(-1e6, 1e6, allow_nan=False),
    ),
    c=st.floats(1e-3, 1e3),
)
def test_clip_l2_bounds_every_row_and_keeps_short_ones(x: NDArray[np.float64], c: float) -> None:
    clipped = clip_l2(x, l2_clip=c)
    assert clipped.shape == x.shape
    rows = x.reshape(-1, x.shape[-1])
    out = clipped.reshape(-1, x.shape[-1])
    norms = np.linalg.norm(rows, axis=1)
    assert np.all(np.linalg.norm(out, axis=1) <= c * (1 + 1e-12))
    np.testing.assert_array_equal(out[norms <= c], rows[norms <= c])


def test_secure_rng_gives_independent_generators() -> None:
    a, b = secure_rng(), secure_rng()
    assert isinstance(a, np.random.Generator)
    assert not np.array_equal(a.integers(0, 2**63, 4), b.integers(0, 2**63, 4))
