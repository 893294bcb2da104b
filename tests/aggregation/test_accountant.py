"""Tests for the privacy accountant (events, budget, checkpoints)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from aggregation.accountant import (
    AccountantKind,
    PrivacyAccountant,
    PrivacyBudgetExceededError,
    SubsampledGaussianEvent,
    compute_epsilon,
)

DELTA = 1e-5


@settings(max_examples=12, deadline=None)
@given(z=st.floats(0.5, 5.0), q=st.floats(1e-3, 1.0))
def test_epsilon_grows_monotonically_with_rounds(z: float, q: float) -> None:
    accountant = PrivacyAccountant("rdp", delta=DELTA)
    epsilons = [accountant.get_epsilon()]
    for _ in range(6):
        accountant.compose(SubsampledGaussianEvent(z, q))
        epsilons.append(accountant.get_epsilon())
    assert epsilons[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(epsilons))
    assert epsilons[-1] > epsilons[1]


def test_epsilon_grows_monotonically_with_rounds_with_prv() -> None:
    accountant = PrivacyAccountant("prv", delta=DELTA)
    epsilons = []
    for _ in range(4):
        accountant.compose(SubsampledGaussianEvent(1.1, 0.05))
        epsilons.append(accountant.get_epsilon())
    assert all(b > a for a, b in itertools.pairwise(epsilons))


@pytest.mark.parametrize(
    ("kind", "opacus_accountant"), [("rdp", RDPAccountant), ("prv", PRVAccountant)]
)
def test_epsilon_matches_opacus_accountant_called_directly(
    kind: str, opacus_accountant: type
) -> None:
    ours = PrivacyAccountant(kind, delta=DELTA)
    theirs = opacus_accountant()
    for _ in range(30):
        ours.compose(SubsampledGaussianEvent(noise_multiplier=1.1, sample_rate=0.02))
        theirs.step(noise_multiplier=1.1, sample_rate=0.02)
    for _ in range(10):
        ours.compose(SubsampledGaussianEvent(noise_multiplier=0.9, sample_rate=0.05))
        theirs.step(noise_multiplier=0.9, sample_rate=0.05)
    assert ours.get_epsilon() == pytest.approx(theirs.get_epsilon(delta=DELTA), rel=1e-12)
    assert ours.get_epsilon(1e-3) == pytest.approx(theirs.get_epsilon(delta=1e-3), rel=1e-12)
    assert ours.steps == 40


def test_event_with_steps_equals_that_many_single_step_events() -> None:
    many = compute_epsilon([SubsampledGaussianEvent(1.0, 0.1)] * 25, delta=DELTA)
    one = compute_epsilon([SubsampledGaussianEvent(1.0, 0.1, steps=25)], delta=DELTA)
    assert many == one


def test_smaller_delta_gives_larger_epsilon() -> None:
    accountant = PrivacyAccountant(delta=DELTA)
    accountant.compose(SubsampledGaussianEvent(1.0, 0.1, steps=10))
    assert accountant.get_epsilon(1e-8) > accountant.get_epsilon(1e-3)


def _budget_for_three_rounds(event: SubsampledGaussianEvent) -> float:
    three = compute_epsilon([event] * 3, delta=DELTA)
    four = compute_epsilon([event] * 4, delta=DELTA)
    return (three + four) / 2


def test_round_that_would_exceed_budget_is_refused_before_it_runs_and_state_is_unchanged() -> None:
    event = SubsampledGaussianEvent(noise_multiplier=1.0, sample_rate=0.1)
    accountant = PrivacyAccountant(
        "rdp", delta=DELTA, epsilon_budget=_budget_for_three_rounds(event)
    )
    rounds_run = 0
    with pytest.raises(PrivacyBudgetExceededError) as info:
        for _ in range(10):
            accountant.compose(event)  # the server composes *before* running the round
            rounds_run += 1
    assert rounds_run == 3
    assert accountant.steps == 3
    before = accountant.state_dict()
    epsilon_before = accountant.get_epsilon()
    with pytest.raises(PrivacyBudgetExceededError):
        accountant.compose(event)
    assert accountant.state_dict() == before
    budget = accountant.epsilon_budget
    assert budget is not None
    assert accountant.get_epsilon() == epsilon_before <= budget
    assert info.value.epsilon > info.value.epsilon_budget
    assert "Stop training here" in str(info.value)


def test_would_exceed_and_check_do_not_change_state() -> None:
    event = SubsampledGaussianEvent(noise_multiplier=1.0, sample_rate=0.1)
    accountant = PrivacyAccountant(delta=DELTA, epsilon_budget=_budget_for_three_rounds(event))
    for _ in range(3):
        assert not accountant.would_exceed(event)
        accountant.check(event)
        accountant.compose(event)
    assert accountant.would_exceed(event)
    with pytest.raises(PrivacyBudgetExceededError):
        accountant.check(event)
    assert accountant.steps == 3


def test_accountant_without_budget_never_refuses() -> None:
    accountant = PrivacyAccountant(delta=DELTA)
    event = SubsampledGaussianEvent(0.5, 1.0, steps=100)
    assert not accountant.would_exceed(event)
    accountant.compose(event)
    assert accountant.steps == 100


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_state_dict_round_trips_through_json(kind: str) -> None:
    accountant = PrivacyAccountant(kind, delta=DELTA, epsilon_budget=8.0)
    accountant.compose(SubsampledGaussianEvent(1.2, 0.01, steps=5))
    accountant.compose(SubsampledGaussianEvent(0.8, 0.02))
    restored = PrivacyAccountant.from_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.history == accountant.history
    assert restored.kind == accountant.kind
    assert restored.epsilon_budget == 8.0
    assert restored.get_epsilon() == accountant.get_epsilon()

    fresh = PrivacyAccountant(kind, delta=DELTA, epsilon_budget=8.0)
    fresh.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert fresh.get_epsilon() == accountant.get_epsilon()


def test_loading_checkpoint_of_another_kind_or_delta_is_rejected_and_keeps_state() -> None:
    source = PrivacyAccountant("prv", delta=DELTA)
    source.compose(SubsampledGaussianEvent(1.0, 0.1))
    target = PrivacyAccountant("rdp", delta=DELTA)
    target.compose(SubsampledGaussianEvent(2.0, 0.5, steps=3))
    before = target.state_dict()
    with pytest.raises(ValueError, match="original accountant kind"):
        target.load_state_dict(source.state_dict())
    other_delta = PrivacyAccountant("rdp", delta=1e-6).state_dict()
    with pytest.raises(ValueError, match="original delta"):
        target.load_state_dict(other_delta)
    corrupt = {**before, "history": [{"noise_multiplier": 0.0, "sample_rate": 0.1, "steps": 1}]}
    with pytest.raises(ValueError, match="`noise_multiplier` must be positive"):
        target.load_state_dict(corrupt)
    assert target.state_dict() == before


def test_measurements_report_epsilon_at_delta() -> None:
    accountant = PrivacyAccountant(delta=DELTA, epsilon_budget=10.0)
    accountant.compose(SubsampledGaussianEvent(1.0, 0.1))
    measurements = accountant.measurements()
    assert measurements["epsilon"] == accountant.get_epsilon()
    assert measurements["delta"] == DELTA
    assert measurements["accounted_steps"] == 1
    assert measurements["epsilon_budget"] == 10.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": 0.0, "sample_rate": 0.1}, "`noise_multiplier` must be positive"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0}, r"`sample_rate` must be in \(0, 1\]"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5}, r"`sample_rate` must be in \(0, 1\]"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 0}, "`steps` must be >= 1"),
    ],
)
def test_event_rejects_invalid_parameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SubsampledGaussianEvent(**kwargs)  # type: ignore[arg-type]


def test_event_rejects_wrong_types() -> None:
    with pytest.raises(TypeError, match="`noise_multiplier` must be a real number"):
        SubsampledGaussianEvent("1.0", 0.1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`steps` must be an int"):
        SubsampledGaussianEvent(1.0, 0.1, steps=1.5)  # type: ignore[arg-type]


def test_accountant_reports_every_invalid_parameter_at_once() -> None:
    with pytest.raises(ValueError) as info:
        PrivacyAccountant(delta=0.0, epsilon_budget=-1.0)
    assert "`delta` must be in (0, 1)" in str(info.value)
    assert "`epsilon_budget` must be positive. Found -1.0." in str(info.value)


def test_accountant_rejects_unknown_kind_and_positional_delta() -> None:
    with pytest.raises(ValueError, match="`kind` must be one of"):
        PrivacyAccountant("moments", delta=DELTA)
    with pytest.raises(TypeError):
        PrivacyAccountant("rdp", DELTA)  # type: ignore[call-arg]


def test_compute_epsilon_of_no_events_is_zero() -> None:
    assert compute_epsilon([], delta=DELTA, kind=AccountantKind.PRV) == 0.0
