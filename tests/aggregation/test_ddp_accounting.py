"""Tests for the accounting of distributed DP (closed forms, subsampling, mixed histories)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from aggregation.accountant import (
    RDP_ORDERS,
    PrivacyAccountant,
    PrivacyBudgetExceededError,
    PrivacyEvent,
    SubsampledGaussianEvent,
    compute_epsilon,
    rdp_curve,
    rdp_epsilon,
)
from aggregation.ddp import DdpConfig, DistributedMechanism
from aggregation.ddp_accounting import (
    DistributedDpEvent,
    calibrate_noise_multiplier,
    ddgauss_rdp,
    ddgauss_tau,
    poisson_subsampled_rdp,
    skellam_rdp,
)
from aggregation.dp import calibrate_noise_multiplier as calibrate_central_noise_multiplier
from aggregation.validation import JSONValue

DELTA = 1e-5
BETA = math.exp(-0.5)
MECHANISMS = [DistributedMechanism.SKELLAM, DistributedMechanism.DGAUSS]


def make_event(**overrides: object) -> DistributedDpEvent:
    params: dict[str, object] = {
        "mechanism": DistributedMechanism.SKELLAM,
        "dim": 1024,
        "l1_sensitivity": 3.0e5,
        "l2_sensitivity": 1.0e4,
        "local_variance": 2.0e7,
        "noise_shares": 10,
    }
    params.update(overrides)
    return DistributedDpEvent(**params)  # type: ignore[arg-type]


def make_config(**overrides: object) -> DdpConfig:
    params: dict[str, object] = {
        "mechanism": DistributedMechanism.SKELLAM,
        "dim": 10_000,
        "l2_clip": 1.0,
        "noise_multiplier": 1.0,
        "min_survivors": 20,
        "max_summands": 50,
    }
    params.update(overrides)
    return DdpConfig(**params)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("alpha", [2, 3, 10, 64, 256])
def test_skellam_rdp_is_the_closed_form(alpha: int) -> None:
    d1, d2, mu = 3.0e5, 1.0e4, 2.0e8
    # Agarwal et al. 2021 (in the reference's parametrization, mu = variance of the noise sum).
    expected = alpha * d2**2 / (2 * mu) + min(
        ((2 * alpha - 1) * d2**2 + 6 * d1) / (4 * mu**2), 3 * d1 / (2 * mu)
    )
    result = skellam_rdp([alpha], l1_sensitivity=d1, l2_sensitivity=d2, variance=mu)
    assert float(result[0]) == pytest.approx(expected, rel=1e-14)


def test_ddgauss_tau_is_the_sum_of_theorem_1() -> None:
    sigma2, n = 0.3, 7
    expected = 10 * sum(math.exp(-2 * math.pi**2 * sigma2 * k / (k + 1)) for k in range(1, n))
    assert ddgauss_tau(sigma2, n) == pytest.approx(expected, rel=1e-14)
    assert ddgauss_tau(sigma2, 1) == 0.0


@pytest.mark.parametrize("alpha", [2, 5, 33, 256])
def test_ddgauss_rdp_is_the_minimum_of_proposition_14(alpha: int) -> None:
    d1, d2, sigma2, n, d = 50.0, 12.0, 0.35, 40, 64  # small sigma: tau matters here
    tau = 10 * sum(math.exp(-2 * math.pi**2 * sigma2 * k / (k + 1)) for k in range(1, n))
    s2 = d2 / math.sqrt(n * sigma2)
    s1 = d1 / math.sqrt(n * sigma2)
    expected = min(
        alpha / 2 * s2**2 + tau * d,
        alpha / 2 * (s2**2 + 2 * s1 * tau + tau**2 * d),
        alpha / 2 * (s2 + math.sqrt(d) * tau) ** 2,
    )
    result = ddgauss_rdp(
        [alpha],
        l1_sensitivity=d1,
        l2_sensitivity=d2,
        local_variance=sigma2,
        noise_shares=n,
        dim=d,
    )
    assert float(result[0]) == pytest.approx(expected, rel=1e-13)


def test_a_single_discrete_gaussian_share_is_the_gaussian_rdp() -> None:
    # tau = 0 for one share: the discrete Gaussian's RDP is alpha D^2 / (2 sigma^2)
    # (Canonne, Kamath, Steinke 2020), the same as the continuous one.
    orders = np.array([2.0, 8.0, 100.0])
    result = ddgauss_rdp(
        orders, l1_sensitivity=9.0, l2_sensitivity=3.0, local_variance=4.0, noise_shares=1, dim=9
    )
    np.testing.assert_allclose(result, orders * 9.0 / 8.0, rtol=1e-15)


@pytest.mark.parametrize(("alpha", "q"), [(2, 0.1), (3, 0.01), (7, 0.3), (20, 0.05)])
def test_subsampled_rdp_is_zhu_wang_general_bound(alpha: int, q: float) -> None:
    event = make_event()

    def eps(order: int) -> float:
        return float(event.base_rdp(np.array([float(order)]))[0])

    # Zhu & Wang 2019, general upper bound, straight from the formula in plain floats.
    total = (1 - q) ** (alpha - 1) * (alpha * q - q + 1)
    total += math.comb(alpha, 2) * q**2 * (1 - q) ** (alpha - 2) * math.exp(eps(2))
    total += sum(
        3
        * math.comb(alpha, ell)
        * q**ell
        * (1 - q) ** (alpha - ell)
        * math.exp((ell - 1) * eps(ell))
        for ell in range(3, alpha + 1)
    )
    expected = min(math.log(total) / (alpha - 1), eps(alpha))
    result = poisson_subsampled_rdp(event.base_rdp, sample_rate=q, orders=[alpha])
    assert float(result[0]) == pytest.approx(expected, rel=1e-12)


def test_fractional_orders_are_evaluated_at_their_ceiling() -> None:
    event = make_event(sample_rate=0.05)
    np.testing.assert_array_equal(event.rdp([1.5, 2.0, 2.25]), event.rdp([2.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="orders > 1"):
        event.rdp([1.0])


# --------------------------------------------------------------------------- known values


def _reference_event(
    mechanism: DistributedMechanism, *, sample_rate: float, steps: int
) -> DistributedDpEvent:
    """The inputs of the reference runs below, in integer units: scale s = 1/gamma = 7500,
    l2 clip 1.0, beta = exp(-0.5), d = 2^16, 100 shares of local std 0.1 (real units)."""
    s, d = 7500.0, 2**16
    x = 1.0 * s
    l2 = min(
        x + math.sqrt(d),
        math.sqrt(x * x + d / 4 + math.sqrt(2 * math.log(1 / BETA)) * (x + math.sqrt(d) / 2)),
    )
    return DistributedDpEvent(
        mechanism=mechanism,
        dim=d,
        l1_sensitivity=l2 * min(math.sqrt(d), l2),
        l2_sensitivity=l2,
        local_variance=(0.1 * s) ** 2,
        noise_shares=100,
        sample_rate=sample_rate,
        steps=steps,
    )


# Values computed by the reference implementation, google-research/federated
# distributed_dp/accounting_utils.py at commit 5e27a86 ("Add Skellam mechanism"), with
# tensorflow_privacy's get_privacy_spent (same conversion as Opacus's) and its RDP_ORDERS
# (2..128 and 256):
#   skellam_epsilon(scale=7500, central_stddev=1.0, l2_sens=1.0, beta=exp(-0.5), dim=2**16,
#                   q, steps, delta=1e-5)
#   ddgauss_epsilon(gamma=1/7500, local_stddev=0.1, num_clients=100, l2_sens=1.0,
#                   beta=exp(-0.5), dim=2**16, q, steps, delta=1e-5)
# The repository has no unit test of its accounting; these runs are the cross-check.
REFERENCE_ORDERS = (*range(2, 129), 256)
REFERENCE_EPSILONS = [
    (DistributedMechanism.SKELLAM, 1.0, 10, 19.80809491146415),
    (DistributedMechanism.SKELLAM, 0.01, 2000, 3.3015422096308313),
    (DistributedMechanism.DGAUSS, 1.0, 10, 19.8080946800429),
    (DistributedMechanism.DGAUSS, 0.01, 2000, 3.3015421554068283),
]


@pytest.mark.parametrize(("mechanism", "q", "steps", "expected"), REFERENCE_EPSILONS)
def test_epsilon_matches_the_reference_implementation(
    mechanism: DistributedMechanism, q: float, steps: int, expected: float
) -> None:
    event = _reference_event(mechanism, sample_rate=q, steps=steps)
    epsilon = rdp_epsilon([event], delta=DELTA, orders=REFERENCE_ORDERS)
    assert epsilon == pytest.approx(expected, rel=1e-9)


def test_opacus_published_value_is_reproduced_by_the_common_order_composition() -> None:
    # Opacus tests/accountants_test.py `test_rdp_accountant`: noise 1.5, sample rate 0.04,
    # 90 / 0.04 steps, delta 1e-5 -> epsilon 7.32911117143 (assertAlmostEqual, 7 places).
    # The mixed-history path (RDP over RDP_ORDERS) must give the same number.
    event = SubsampledGaussianEvent(noise_multiplier=1.5, sample_rate=0.04, steps=2250)
    assert rdp_epsilon([event], delta=DELTA) == pytest.approx(7.32911117143, abs=5e-8)


# --------------------------------------------------------------------------- behaviour


@settings(max_examples=15, deadline=None)
@given(
    mechanism=st.sampled_from(MECHANISMS),
    z=st.floats(0.5, 4.0),
    q=st.floats(1e-3, 1.0),
)
def test_epsilon_grows_with_steps(mechanism: DistributedMechanism, z: float, q: float) -> None:
    cfg = make_config(mechanism=mechanism, noise_multiplier=z)
    epsilons = [
        rdp_epsilon([DistributedDpEvent.from_config(cfg, sample_rate=q, steps=t)], delta=DELTA)
        for t in (1, 2, 5, 20, 100)
    ]
    assert all(b > a for a, b in itertools.pairwise(epsilons))


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_subsampling_gives_less_epsilon_than_full_participation(
    mechanism: DistributedMechanism,
) -> None:
    cfg = make_config(mechanism=mechanism)
    by_rate = [
        rdp_epsilon([DistributedDpEvent.from_config(cfg, sample_rate=q, steps=50)], delta=DELTA)
        for q in (1.0, 0.5, 0.1, 0.01)
    ]
    assert all(b < a for a, b in itertools.pairwise(by_rate))
    # Never more than without amplification, at every order.
    full = DistributedDpEvent.from_config(cfg).rdp(RDP_ORDERS)
    sampled = DistributedDpEvent.from_config(cfg, sample_rate=0.3).rdp(RDP_ORDERS)
    assert np.all(sampled <= full)


@pytest.mark.parametrize("alpha", [2, 10, 100])
def test_skellam_approaches_the_gaussian_rdp_for_large_variance(alpha: int) -> None:
    d2 = 100.0
    d1 = d2 * d2  # the largest L1 an integer vector of L2 norm d2 can have
    ratios = []
    for mu in (1e4, 1e6, 1e8, 1e10):  # noise multiplier sqrt(mu) / d2 = 1, 10, 100, 1000
        gaussian = alpha * d2**2 / (2 * mu)
        skellam = float(skellam_rdp([alpha], l1_sensitivity=d1, l2_sensitivity=d2, variance=mu)[0])
        assert skellam >= gaussian
        ratios.append(skellam / gaussian)
    assert all(b < a for a, b in itertools.pairwise(ratios))
    assert ratios[-1] == pytest.approx(1.0, rel=1e-6)


def test_skellam_epsilon_is_near_the_gaussian_with_the_effective_noise_multiplier() -> None:
    # At 32 bits the Skellam correction and the rounding inflation are tiny: the distributed
    # mechanism costs what a Gaussian with z_eff = sqrt(aggregate variance) / Delta_2 costs.
    cfg = make_config(noise_multiplier=2.0)
    orders = range(2, 257)  # integer orders, where both curves are evaluated exactly
    ddp = rdp_epsilon([DistributedDpEvent.from_config(cfg, steps=10)], delta=DELTA, orders=orders)
    z_eff = cfg.effective_noise_multiplier
    gaussian = rdp_epsilon(
        [SubsampledGaussianEvent(z_eff, 1.0, steps=10)], delta=DELTA, orders=orders
    )
    nominal = rdp_epsilon([SubsampledGaussianEvent(2.0, 1.0, steps=10)], delta=DELTA, orders=orders)
    assert nominal <= gaussian <= ddp <= gaussian * (1 + 1e-6)
    assert gaussian <= nominal * (1 + 1e-3)


def test_mixed_histories_compose_additively_in_rdp() -> None:
    gaussian = SubsampledGaussianEvent(noise_multiplier=1.1, sample_rate=0.02, steps=30)
    skellam = DistributedDpEvent.from_config(make_config(), sample_rate=0.05, steps=7)
    dgauss = DistributedDpEvent.from_config(
        make_config(mechanism=DistributedMechanism.DGAUSS), steps=3
    )
    history: list[PrivacyEvent] = [gaussian, skellam, dgauss, skellam]
    expected = (
        np.asarray(
            compute_rdp(q=0.02, noise_multiplier=1.1, steps=30, orders=list(RDP_ORDERS)),
            dtype=np.float64,
        )
        + 2 * skellam.rdp(RDP_ORDERS)
        + dgauss.rdp(RDP_ORDERS)
    )
    np.testing.assert_allclose(rdp_curve(history), expected, rtol=1e-12)
    epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=expected, delta=DELTA)
    assert compute_epsilon(history, delta=DELTA) == pytest.approx(float(epsilon), rel=1e-12)
    accountant = PrivacyAccountant("rdp", delta=DELTA)
    for event in history:
        accountant.compose(event)
    assert accountant.get_epsilon() == pytest.approx(float(epsilon), rel=1e-12)
    assert accountant.steps == 30 + 7 + 3 + 7


def test_gaussian_only_histories_keep_opacus_epsilon() -> None:
    events = [SubsampledGaussianEvent(1.0, 0.1, steps=10), SubsampledGaussianEvent(0.8, 0.2)]
    accountant = PrivacyAccountant("rdp", delta=DELTA)
    for event in events:
        accountant.compose(event)
    assert accountant.get_epsilon() == compute_epsilon(events, delta=DELTA)


def test_budget_is_checked_before_a_distributed_event_is_composed() -> None:
    event = DistributedDpEvent.from_config(make_config(), sample_rate=0.1, steps=10)
    three = rdp_epsilon([event] * 3, delta=DELTA)
    four = rdp_epsilon([event] * 4, delta=DELTA)
    accountant = PrivacyAccountant("rdp", delta=DELTA, epsilon_budget=(three + four) / 2)
    for _ in range(3):
        accountant.compose(event)
    before = accountant.state_dict()
    with pytest.raises(PrivacyBudgetExceededError, match="Stop training here"):
        accountant.compose(event)
    assert accountant.state_dict() == before
    assert accountant.get_epsilon() == pytest.approx(three, rel=1e-12)


def test_prv_accountant_refuses_distributed_events() -> None:
    event = make_event()
    accountant = PrivacyAccountant("prv", delta=DELTA)
    with pytest.raises(ValueError, match="PRV accountant cannot compose distributed DP events"):
        accountant.compose(event)
    assert accountant.history == ()
    with pytest.raises(ValueError, match="Use an accountant of kind 'rdp'"):
        compute_epsilon([SubsampledGaussianEvent(1.0, 0.1), event], delta=DELTA, kind="prv")
    state = PrivacyAccountant("rdp", delta=DELTA).state_dict()
    state = {**state, "kind": "prv", "history": [{"type": "distributed_dp", **event.to_json()}]}
    with pytest.raises(ValueError, match="distributed DP events"):
        accountant.load_state_dict(state)
    assert accountant.history == ()


# --------------------------------------------------------------------------- checkpoints


def test_state_dict_round_trips_a_mixed_history_through_json() -> None:
    accountant = PrivacyAccountant("rdp", delta=DELTA, epsilon_budget=50.0)
    accountant.compose(SubsampledGaussianEvent(1.2, 0.01, steps=5))
    accountant.compose(DistributedDpEvent.from_config(make_config(), sample_rate=0.2, steps=4))
    accountant.compose(
        DistributedDpEvent.from_config(make_config(mechanism=DistributedMechanism.DGAUSS))
    )
    state = json.loads(json.dumps(accountant.state_dict()))
    assert state["version"] == 2
    assert [entry["type"] for entry in state["history"]] == [
        "subsampled_gaussian",
        "distributed_dp",
        "distributed_dp",
    ]
    restored = PrivacyAccountant.from_state_dict(state)
    assert restored.history == accountant.history
    assert restored.get_epsilon() == accountant.get_epsilon()


def test_version_1_checkpoints_of_gaussian_events_are_still_read() -> None:
    state = {
        "version": 1,
        "kind": "rdp",
        "delta": DELTA,
        "epsilon_budget": None,
        "history": [{"noise_multiplier": 1.1, "sample_rate": 0.02, "steps": 12}],
    }
    accountant = PrivacyAccountant.from_state_dict(state)
    assert accountant.history == (SubsampledGaussianEvent(1.1, 0.02, steps=12),)
    assert accountant.get_epsilon() == compute_epsilon(
        [SubsampledGaussianEvent(1.1, 0.02, steps=12)], delta=DELTA
    )


def test_malformed_distributed_entries_are_rejected_and_state_is_kept() -> None:
    accountant = PrivacyAccountant("rdp", delta=DELTA)
    accountant.compose(make_event())
    before = accountant.state_dict()
    good: dict[str, JSONValue] = {"type": "distributed_dp", **make_event().to_json()}
    assert before["history"] == [good]
    for bad, message in [
        ({**good, "type": "laplace"}, "`type` must be one of"),
        ({**good, "noise_shares": 0}, "`noise_shares` must be at least 1"),
        ({**good, "mechanism": "gauss"}, "`mechanism` must be one of"),
        ({**good, "dim": "1024"}, "`dim` must be a number"),
        ({key: value for key, value in good.items() if key != "dim"}, "exactly the keys"),
    ]:
        with pytest.raises(ValueError, match=message):
            accountant.load_state_dict({**before, "history": [bad]})
        assert accountant.state_dict() == before


# --------------------------------------------------------------------------- events


def test_event_from_config_carries_the_integer_geometry() -> None:
    cfg = make_config(mechanism=DistributedMechanism.DGAUSS)
    event = DistributedDpEvent.from_config(cfg, sample_rate=0.5, steps=3)
    assert event.dim == cfg.padded_dim
    assert event.l2_sensitivity == cfg.l2_sensitivity
    assert event.l1_sensitivity == cfg.l1_sensitivity
    assert event.noise_shares == cfg.min_survivors
    assert event.noise_variance == pytest.approx(cfg.aggregate_variance, rel=1e-15)
    assert DistributedDpEvent.from_json(json.loads(json.dumps(event.to_json()))) == event


def test_event_reports_every_invalid_parameter_at_once() -> None:
    with pytest.raises(ValueError) as info:
        make_event(
            dim=0,
            l1_sensitivity=-1.0,
            l2_sensitivity=0.0,
            local_variance=math.inf,
            noise_shares=0,
            sample_rate=1.5,
            steps=0,
        )
    message = str(info.value)
    for expected in [
        "`dim` must be at least 1",
        "`l1_sensitivity` must be positive",
        "`l2_sensitivity` must be positive",
        "`local_variance` must be positive",
        "`noise_shares` must be at least 1",
        "`sample_rate` must be in (0, 1]",
        "`steps` must be >= 1",
    ]:
        assert expected in message
    with pytest.raises(TypeError, match="`steps` must be an int"):
        make_event(steps=2.0)
    with pytest.raises(TypeError, match="`config` must be a DdpConfig"):
        DistributedDpEvent.from_config({"dim": 3})  # type: ignore[arg-type]


def test_accountant_describes_what_it_accounts() -> None:
    accountant = PrivacyAccountant("rdp", delta=DELTA)
    assert "no releases yet" in accountant.describe()
    accountant.compose(make_event(sample_rate=0.1))
    accountant.compose(make_event(mechanism="ddgauss"))
    description = accountant.describe()
    assert "distributed Skellam (Agarwal, Kairouz, Liu 2021)" in description
    assert "Poisson subsampling bound of Zhu & Wang 2019" in description
    assert "distributed discrete Gaussian (Kairouz, Liu, Steinke 2021)" in description
    assert "RDP" in description


# --------------------------------------------------------------------------- calibration


@settings(max_examples=8, deadline=None)
@given(
    mechanism=st.sampled_from(MECHANISMS),
    target=st.floats(0.5, 10.0),
    q=st.sampled_from([1.0, 0.1, 0.01]),
    releases=st.sampled_from([1, 10, 200]),
)
def test_calibrated_noise_multiplier_never_overshoots_the_target(
    mechanism: DistributedMechanism, target: float, q: float, releases: int
) -> None:
    cfg = make_config(mechanism=mechanism)
    z = calibrate_noise_multiplier(
        cfg, target_epsilon=target, target_delta=DELTA, releases=releases, sample_rate=q
    )
    calibrated = dataclasses.replace(cfg, noise_multiplier=z)
    event = DistributedDpEvent.from_config(calibrated, sample_rate=q, steps=releases)
    epsilon = rdp_epsilon([event], delta=DELTA)
    assert target - 0.01 <= epsilon <= target


def test_calibration_is_close_to_the_central_gaussian_at_full_participation() -> None:
    cfg = make_config()
    ddp = calibrate_noise_multiplier(
        cfg, target_epsilon=2.0, target_delta=DELTA, releases=20, epsilon_tolerance=1e-4
    )
    central = calibrate_central_noise_multiplier(
        target_epsilon=2.0, target_delta=DELTA, sample_rate=1.0, rounds=20, epsilon_tolerance=1e-4
    )
    assert central <= ddp <= central * 1.01


def test_unreachable_targets_and_bad_arguments_are_refused() -> None:
    coarse = make_config(dim=1 << 16, modulus_bits=8, max_summands=2, min_survivors=2)
    with pytest.raises(ValueError, match="Raise `target_epsilon` or `modulus_bits`"):
        calibrate_noise_multiplier(coarse, target_epsilon=0.1, target_delta=DELTA, releases=100)
    with pytest.raises(ValueError) as info:
        calibrate_noise_multiplier(
            make_config(), target_epsilon=0.0, target_delta=1.0, releases=0, sample_rate=2.0
        )
    for expected in [
        "`target_epsilon` must be positive",
        "`target_delta` must be in (0, 1)",
        "`sample_rate` must be in (0, 1]",
        "`releases` must be at least 1",
    ]:
        assert expected in str(info.value)


def test_the_written_out_orders_are_opacus_default_orders() -> None:
    from opacus.accountants import RDPAccountant

    from aggregation.ddp_accounting import OPACUS_ORDERS, RDP_ORDERS

    assert tuple(RDPAccountant.DEFAULT_ALPHAS) == OPACUS_ORDERS
    assert RDP_ORDERS[: len(OPACUS_ORDERS)] == OPACUS_ORDERS
