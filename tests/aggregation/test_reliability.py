"""Tests for aggregation.reliability: score properties, deductions with reasons, run verdict."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from aggregation.reliability import (
    DEFAULT_POLICY,
    PenaltyRule,
    ReliabilityPolicy,
    RoundObservation,
    RoundReliability,
    RunVerdict,
    score_round,
)

NAN = float("nan")
INF = float("inf")


def healthy(**changes: object) -> RoundObservation:
    base = RoundObservation(
        round_number=2,
        sampled=10,
        responded=10,
        dropped_by_stage={},
        client_metrics=[
            {"loss": 0.50, "accuracy": 0.80, "num_examples": 100},
            {"loss": 0.52, "accuracy": 0.82, "num_examples": 100},
            {"loss": 0.48, "accuracy": 0.78, "num_examples": 100},
        ],
        update_norm=1.0,
        noise_to_signal=0.2,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


PREVIOUS = healthy(round_number=1, client_metrics=[{"loss": 0.55}], update_norm=1.2)


# ------------------------------------------------------------------ hypothesis strategies

maybe_float = st.one_of(
    st.none(),
    st.floats(min_value=0.0, max_value=1e6),
    st.sampled_from([NAN, INF, -INF, 0.0]),
)


@st.composite
def observations(draw: st.DrawFn) -> RoundObservation:
    sampled = draw(st.integers(0, 50))
    responded = draw(st.integers(0, sampled))
    dropped = draw(st.integers(0, sampled))
    n_eval = draw(st.integers(0, 5))
    metrics = [
        {
            "loss": draw(st.one_of(st.floats(0.0, 100.0), st.sampled_from([NAN, INF]))),
            "accuracy": draw(st.floats(0.0, 1.0)),
        }
        for _ in range(n_eval)
    ]
    accuracy = draw(st.one_of(st.none(), st.floats(0.0, 1.0), st.just(NAN)))
    return RoundObservation(
        round_number=draw(st.integers(0, 1000)),
        sampled=sampled,
        responded=responded,
        dropped_by_stage={"unmask": dropped},
        client_metrics=metrics,
        eval_loss=draw(st.one_of(st.none(), st.floats(-10.0, 1e6), st.just(NAN))),
        eval_accuracy=accuracy,
        update_norm=draw(maybe_float.filter(lambda v: v is None or v >= 0 or math.isnan(v))),
        noise_to_signal=draw(maybe_float.filter(lambda v: v is None or v >= 0 or math.isnan(v))),
    )


# ------------------------------------------------------------------ properties


@settings(max_examples=150, deadline=None)
@given(obs=observations(), prev=st.one_of(st.none(), observations()))
def test_score_is_always_in_unit_interval_and_every_deduction_has_a_reason(
    obs: RoundObservation, prev: RoundObservation | None
) -> None:
    result = score_round(obs, previous=prev)
    assert 0.0 <= result.score <= 1.0
    assert len(result.reasons) >= len(result.deductions)
    for name, amount in result.deductions.items():
        assert amount > 0
        assert any(reason.endswith(f"-{amount:.3f}") for reason in result.reasons), name
    if result.score < 1.0:
        assert result.reasons
    if not result.fatal:
        expected = max(0.0, 1.0 - sum(result.deductions.values()))
        assert math.isclose(result.score, expected, abs_tol=1e-12)


@settings(max_examples=100, deadline=None)
@given(obs=observations(), prev=st.one_of(st.none(), observations()), extra=st.integers(1, 50))
def test_more_participation_never_lowers_the_score(
    obs: RoundObservation, prev: RoundObservation | None, extra: int
) -> None:
    more = dataclasses.replace(obs, responded=min(obs.sampled, obs.responded + extra))
    assert score_round(more, previous=prev).score >= score_round(obs, previous=prev).score


@settings(max_examples=60, deadline=None)
@given(
    obs=observations(),
    field=st.sampled_from(["eval_loss", "eval_accuracy", "update_norm", "noise_to_signal"]),
    bad=st.sampled_from([NAN, INF]),
)
def test_any_non_finite_input_scores_zero(obs: RoundObservation, field: str, bad: float) -> None:
    assume(obs.sampled > 0)
    result = score_round(dataclasses.replace(obs, **{field: bad}))  # type: ignore[arg-type]
    assert result.score == 0.0
    assert result.fatal
    assert any("score 0" in r for r in result.reasons)


# ------------------------------------------------------------------ examples


def test_healthy_round_scores_one_without_reasons() -> None:
    result = score_round(healthy(), previous=PREVIOUS)
    assert result.score == 1.0
    assert result.reasons == ()
    assert not result.fatal
    assert result.components["participation"] == 1.0
    assert math.isclose(result.components["loss_change"], (0.5 - 0.55) / 0.55)


def test_low_participation_deducts_with_the_documented_reason() -> None:
    obs = healthy(sampled=20, responded=11)  # 0.55
    result = score_round(obs, previous=PREVIOUS)
    expected = 0.30 * (0.8 - 0.55) / 0.8
    assert math.isclose(result.deductions["participation"], expected)
    assert math.isclose(result.score, 1.0 - expected)
    assert result.reasons == (f"participation 0.55 < 0.8: -{expected:.3f}",)


def test_one_clients_nan_or_inf_metric_is_left_out_with_a_reason_not_a_veto() -> None:
    clean = score_round(healthy(client_metrics=[{"loss": 0.5}, {"loss": 0.52}]))
    for bad in (NAN, INF):
        obs = healthy(client_metrics=[{"loss": 0.5}, {"loss": 0.52}, {"loss": bad}])
        result = score_round(obs)
        assert not result.fatal
        assert result.score == clean.score > 0.5  # the other clients' round, as if it had not
        assert result.components["eval_loss"] == pytest.approx(0.51)
        assert result.reasons[0] == f"evaluating client 2 left out: non-finite loss {bad}"
    obs = healthy(client_metrics=[{"loss": 0.5, "accuracy": NAN}, {"loss": 0.5, "accuracy": 0.9}])
    result = score_round(obs)
    assert not result.fatal and "client 0 left out: non-finite accuracy nan" in result.reasons[0]
    assert result.components["eval_accuracy"] == pytest.approx(0.9)
    # Every client left out: no evaluation to score (a deduction, not a veto either).
    result = score_round(healthy(client_metrics=[{"loss": NAN}]))
    assert not result.fatal and "no federated evaluation reported" in result.reasons[-1]
    # A non-finite round-level aggregate is still fatal: it is not one client's.
    obs = healthy(eval_loss=NAN, client_metrics=[{"loss": 0.5}])
    assert score_round(obs).fatal


def test_loss_doubling_is_divergence_and_scores_zero() -> None:
    result = score_round(healthy(eval_loss=1.2), previous=PREVIOUS)
    assert result.score == 0.0
    assert result.fatal
    assert "divergence: eval loss 1.2 > 2 x previous 0.55" in result.reasons[-1]


def test_moderate_loss_increase_is_penalized_not_fatal() -> None:
    result = score_round(healthy(eval_loss=0.55 * 1.5), previous=PREVIOUS)
    assert not result.fatal
    assert math.isclose(result.deductions["loss_change"], 0.15 * (0.5 - 0.05) / 0.95)


def test_no_responses_or_no_samples_score_zero() -> None:
    assert score_round(healthy(responded=0)).reasons == (
        "no client responded (0 of 10 sampled): score 0",
    )
    assert score_round(healthy(sampled=0, responded=0)).score == 0.0


def test_dropout_spread_norm_jump_noise_and_missing_evaluation_each_deduct() -> None:
    obs = healthy(
        dropped_by_stage={"share_keys": 3, "unmask": 3},
        client_metrics=[{"loss": 0.5, "accuracy": 0.2}, {"loss": 0.5, "accuracy": 0.9}],
        update_norm=1.2 * 20,
        noise_to_signal=5.0,
    )
    result = score_round(obs, previous=PREVIOUS)
    assert set(result.deductions) == {
        "dropout",
        "accuracy_spread",
        "update_norm_ratio",
        "noise_to_signal",
    }
    assert math.isclose(result.deductions["dropout"], 0.10 * (0.6 - 0.2) / 0.8)
    assert result.deductions["accuracy_spread"] == pytest.approx(0.08)  # std 0.35: severity 0.8
    assert result.deductions["update_norm_ratio"] == pytest.approx(0.10)  # ratio 20 saturates
    assert result.deductions["noise_to_signal"] == pytest.approx(0.15 * 4 / 9)
    assert len(result.reasons) == 4
    missing = score_round(healthy(client_metrics=[]))
    assert missing.deductions == {"missing_evaluation": 0.10}
    assert missing.reasons == ("no federated evaluation reported: -0.100",)


def test_loss_spread_is_used_only_without_client_accuracy() -> None:
    obs = healthy(client_metrics=[{"loss": 0.1}, {"loss": 1.9}])  # cv = 0.9 / 1.0
    result = score_round(obs)
    assert "accuracy_spread" not in result.components
    assert result.components["loss_spread"] == pytest.approx(0.9)
    assert result.deductions["loss_spread"] == pytest.approx(0.10 * 0.4 / 1.5)


def test_aggregate_metrics_are_example_weighted_means_of_clients() -> None:
    obs = healthy(
        client_metrics=[
            {"loss": 1.0, "accuracy": 0.5, "num_examples": 1},
            {"loss": 4.0, "accuracy": 1.0, "num_examples": 3},
        ]
    )
    assert obs.aggregate_loss() == pytest.approx(3.25)
    assert obs.aggregate_accuracy() == pytest.approx(0.875)


def test_to_measurements_is_flat_and_prefixed() -> None:
    m = score_round(healthy(sampled=20, responded=11), previous=PREVIOUS).to_measurements()
    assert m["reliability_score"] == pytest.approx(1 - 0.30 * 0.25 / 0.8)
    assert m["reliability_participation"] == 0.55
    assert m["reliability_deduction_participation"] == pytest.approx(0.30 * 0.25 / 0.8)
    assert str(m["reliability_reasons"]).startswith("participation 0.55 < 0.8")
    assert m["reliability_fatal"] is False
    assert all(isinstance(v, float | int | str | bool) for v in m.values())


def test_observation_and_result_are_immutable() -> None:
    obs = healthy(dropped_by_stage={"unmask": 1})
    with pytest.raises(TypeError):
        obs.dropped_by_stage["unmask"] = 5  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        obs.responded = 3  # type: ignore[misc]
    result = score_round(obs)
    with pytest.raises(TypeError):
        result.components["participation"] = 0.0  # type: ignore[index]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"responded": 11}, r"`responded` \(11\) cannot exceed `sampled` \(10\)"),
        ({"sampled": -1}, "`sampled` must be a non-negative int"),
        ({"dropped_by_stage": {"unmask": 11}}, "11 clients dropped but only 10 were sampled"),
        ({"client_metrics": [{"accuracy": 0.5}]}, r"client_metrics\[0\] has no 'loss'"),
        ({"update_norm": -1.0}, "`update_norm` must not be negative"),
        ({"eval_accuracy": 80.0}, r"`eval_accuracy` is a fraction in \[0, 1\]"),
    ],
)
def test_impossible_observations_raise(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        healthy(**changes)


def test_policy_reports_every_problem_at_once() -> None:
    with pytest.raises(ValueError) as info:
        ReliabilityPolicy(
            participation=PenaltyRule(weight=0.3, threshold=0.8, saturation=1.0),
            divergence_factor=1.0,
            missing_evaluation_weight=2.0,
        )
    text = str(info.value)
    assert "`participation` must penalize values below its threshold" in text
    assert "`divergence_factor` must be a finite number > 1" in text
    assert "`missing_evaluation_weight` must be in [0, 1]" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight": 1.5, "threshold": 0.0, "saturation": 1.0}, r"weight must be in \[0, 1\]"),
        ({"weight": 0.1, "threshold": 1.0, "saturation": 1.0}, "must differ from threshold"),
        ({"weight": 0.1, "threshold": NAN, "saturation": 1.0}, "must be a finite number"),
    ],
)
def test_penalty_rule_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PenaltyRule(**kwargs)


def test_default_policy_weights_sum_to_one() -> None:
    p = DEFAULT_POLICY
    rules = [p.participation, p.dropout, p.loss_increase, p.update_norm_ratio, p.noise_to_signal]
    spread = max(p.accuracy_spread.weight, p.loss_spread.weight)  # only one of them applies
    total = sum(r.weight for r in rules) + spread + p.missing_evaluation_weight
    assert math.isclose(total, 1.0)


# ------------------------------------------------------------------ run verdict


def scored(*scores: float, fatal_at: int | None = None) -> list[RoundReliability]:
    return [
        RoundReliability(
            round_number=i + 1,
            score=s,
            reasons=("non-finite eval_loss (nan): score 0",) if i == fatal_at else (),
            components={},
            deductions={},
            fatal=i == fatal_at,
        )
        for i, s in enumerate(scores)
    ]


def test_run_passes_when_final_and_window_mean_reach_threshold() -> None:
    verdict = RunVerdict.from_rounds(scored(0.2, 0.9, 0.8, 0.85), threshold=0.8, window=3)
    assert verdict.passed
    assert verdict.reasons == ()
    assert verdict.final_score == 0.85
    assert verdict.window_mean == pytest.approx(0.85)


def test_run_fails_on_low_final_score_even_if_window_mean_passes() -> None:
    verdict = RunVerdict.from_rounds(scored(0.95, 0.95, 0.7), threshold=0.8, window=3)
    assert not verdict.passed
    assert verdict.reasons == ("final round 3 score 0.700 < threshold 0.800",)


def test_run_fails_on_low_window_mean_even_if_final_passes() -> None:
    verdict = RunVerdict.from_rounds(scored(0.5, 0.5, 0.9), threshold=0.8, window=3)
    assert not verdict.passed
    assert verdict.reasons == ("mean score of the last 3 round(s) 0.633 < threshold 0.800",)


def test_fatal_round_in_window_fails_the_run_but_an_earlier_one_does_not() -> None:
    in_window = RunVerdict.from_rounds(
        scored(1, 1, 0, 1, 1, 1, fatal_at=2), threshold=0.5, window=4
    )
    assert not in_window.passed
    assert any("round 3 in the last 4 failed: non-finite" in r for r in in_window.reasons)
    before = RunVerdict.from_rounds(scored(0, 1, 1, 1, 1, fatal_at=0), threshold=0.5, window=4)
    assert before.passed


def test_run_without_rounds_fails_and_bad_threshold_raises() -> None:
    assert RunVerdict.from_rounds([], threshold=0.5).reasons == ("no rounds were scored",)
    with pytest.raises(ValueError, match=r"`threshold` must be in \[0, 1\]"):
        RunVerdict.from_rounds(scored(1.0), threshold=1.5)
    with pytest.raises(ValueError, match="`window` must be an int >= 1"):
        RunVerdict.from_rounds(scored(1.0), threshold=0.5, window=0)
