"""The node's own privacy policy: safe defaults, parsing, and every refusal of a job."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from aggregation.accountant import compute_epsilon
from aggregation.privacy import DpUnit, PrivacyLevel
from aggregation.secagg import SecAggPolicy
from clients.jobs import job_privacy, release_events, update_length_for
from clients.policy import (
    NodePolicy,
    PolicyError,
    PrivacyRule,
    level_admits,
    load_policy,
    parse_policy,
    worst_case_privacy,
)
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "batch_size": 8}


def sensing(level: str = "dp+secure-agg", **dp: object) -> JobSpec:
    """The IoT normalizer job (analytics: example-level DP by construction)."""
    values: dict[str, object] = {
        "component": "sensing",
        "base_model": "iot",
        "task": "normalizer",
        "privacy_level": level,
    }
    if level in ("dp", "dp+secure-agg"):
        values["dp"] = {"unit": "example", "target_epsilon": 4.0, "delta": 1e-5, **dp}
    return JobSpec.from_mapping(values)


def vit(level: str = "dp+secure-agg", **extra: object) -> JobSpec:
    return JobSpec.from_mapping(
        {
            "component": "vision",
            "base_model": "vit-base16",
            "task": "embed",
            "embedding_dim": 16,
            "input_size": 32,
            **TINY,
            "privacy_level": level,
            **extra,
        }
    )


def policy(text: str) -> NodePolicy:
    return parse_policy(tomllib.loads(text))


# --------------------------------------------------------------------------- defaults, parsing


def test_an_empty_policy_file_gives_the_safe_defaults(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text("")
    loaded = load_policy(tmp_path / "policy.toml")
    assert loaded == NodePolicy()
    rule = loaded.default
    assert rule.min_privacy_level is PrivacyLevel.DP_SECURE_AGG
    assert (rule.max_epsilon, rule.lifetime_epsilon, rule.max_delta) == (10.0, 30.0, 1e-5)
    assert rule.dp_units == {DpUnit.NODE, DpUnit.EXAMPLE}
    assert loaded.secagg == SecAggPolicy(min_clients=3)
    assert loaded.operators is None  # every key of the operators file
    assert load_policy(tmp_path / "absent.toml", missing_ok=True) == NodePolicy()


def test_rules_merge_artifact_over_node_type_over_default() -> None:
    loaded = policy(
        """
        [default]
        max_delta = 1e-6
        [node_types.sensing]
        max_epsilon = 4.0
        dp_units = ["example"]
        [artifacts.sensing-iot-normalizer-v1]
        max_epsilon = 2.0
        """
    )
    rule = loaded.artifacts["sensing-iot-normalizer-v1"]
    assert (rule.max_epsilon, rule.dp_units, rule.max_delta) == (
        2.0,
        frozenset({DpUnit.EXAMPLE}),
        1e-6,
    )
    assert loaded.node_types[NodeType.SENSING].max_epsilon == 4.0
    assert loaded.rule_for(sensing())[0] == "artifacts.sensing-iot-normalizer-v1"
    camera = JobSpec.from_mapping(
        {"component": "sensing", "base_model": "camera", "task": "preproc"}
    )
    assert loaded.rule_for(camera)[0] == "node_types.sensing"
    assert loaded.rule_for(vit("none"))[0] == "default"


def test_the_effective_policy_prints_as_toml_that_loads_back_equal() -> None:
    loaded = policy(
        """
        operators = ["sha256:%s"]
        [secagg]
        min_clients = 5
        [node_types.encoder]
        min_privacy_level = "dp"
        [artifacts.sensing-iot-normalizer-v1]
        max_epsilon = inf
        lifetime_epsilon = inf
        """
        % ("ab" * 32)
    )
    text = loaded.to_toml()
    assert "max_epsilon = inf" in text and "[node_types.encoder]" in text
    assert parse_policy(tomllib.loads(text)) == loaded
    assert parse_policy(tomllib.loads(NodePolicy().to_toml())) == NodePolicy()


def test_every_problem_of_a_policy_file_is_reported_at_once_with_its_field(
    tmp_path: Path,
) -> None:
    (tmp_path / "policy.toml").write_text(
        """
        operators = "everyone"
        colour = "blue"
        [default]
        max_epsilon = true
        lifetime_epsilon = "30"
        max_delta = 0.5e1
        dp_units = ["node", "person"]
        min_privacy_level = "strong"
        max_epsilom = 3.0
        [secagg]
        min_clients = "3"
        min_threshold = 1
        [node_types.encodr]
        [artifacts.no-such-artifact]
        [node_types.encoder]
        max_epsilon = 50.0
        """
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "policy.toml")
    problems = caught.value.problems
    expected = [
        'operators: must be "file"',
        "colour: is not a policy setting",
        "default.max_epsilon: must be a number. Found true.",
        'default.lifetime_epsilon: must be a number. Found "30".',
        "default.max_delta: must be > 0 and < 1",
        'default.dp_units: items must be node or example. Found "person".',
        "default.min_privacy_level: must be one of",
        "default.max_epsilom: is not a policy setting. Did you mean max_epsilon?",
        'secagg.min_clients: must be a whole number. Found "3".',
        "secagg.min_threshold: must be >= 2. Found 1.",
        "node_types.encodr: is not a node type. Did you mean encoder?",
        "artifacts.no-such-artifact: is not a catalog artifact id",
        "node_types.encoder.lifetime_epsilon: must be at least max_epsilon (50)",
    ]
    for text in expected:
        assert any(p.startswith(text) for p in problems), (text, problems)
    assert len(problems) == len(expected)
    assert str(tmp_path / "policy.toml") in str(caught.value)


@pytest.mark.parametrize("text", ["[default\n", "max_epsilon = 1\nmax_epsilon = 2\n"])
def test_a_policy_file_that_is_not_toml_is_refused(tmp_path: Path, text: str) -> None:
    (tmp_path / "policy.toml").write_text(text)
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(tmp_path / "policy.toml")


def test_a_privacy_rule_validates_itself() -> None:
    with pytest.raises(ValueError, match="lifetime_epsilon: must be at least"):
        PrivacyRule(max_epsilon=40.0)
    with pytest.raises(ValueError, match="max_delta"):
        PrivacyRule(max_delta=0.0)
    with pytest.raises(ValueError, match="dp_units"):
        PrivacyRule(dp_units=frozenset())


# --------------------------------------------------------------------------- levels, epsilon


def test_levels_are_ordered_by_the_protections_they_have() -> None:
    none, dp, sa, both = (
        PrivacyLevel.NONE,
        PrivacyLevel.DP,
        PrivacyLevel.SECURE_AGG,
        PrivacyLevel.DP_SECURE_AGG,
    )
    admitted = {
        minimum: {level for level in PrivacyLevel if level_admits(minimum, level)}
        for minimum in PrivacyLevel
    }
    assert admitted == {
        none: {none, dp, sa, both},
        dp: {dp, both},
        sa: {sa, both},
        both: {both},
    }


def test_worst_case_epsilon_of_a_sensing_job_composes_all_its_releases() -> None:
    job = sensing(target_epsilon=None, noise_multiplier=1.0)
    privacy = job_privacy(job)
    events = release_events(job, noise_multiplier=1.0, update_length=update_length_for(job))
    expected = compute_epsilon(events, delta=1e-5)
    assert worst_case_privacy(job) == (expected, 1e-5)
    assert privacy.noise_multiplier == 1.0 and expected > 10.0


def test_a_calibrated_job_costs_at_most_its_target_epsilon() -> None:
    epsilon, delta = worst_case_privacy(sensing(target_epsilon=4.0))
    assert 3.5 < epsilon <= 4.0 and delta == 1e-5


def test_an_example_level_model_job_costs_its_dp_sgd_target_epsilon() -> None:
    job = vit(dp={"unit": "example", "clipping_norm": 1.0, "target_epsilon": 3.0, "delta": 1e-6})
    assert worst_case_privacy(job) == (3.0, 1e-6)


def test_a_node_level_model_job_costs_its_composed_releases() -> None:
    job = vit(
        dp={"unit": "node", "clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5},
        federation={"clients_per_round": 5, "num_rounds": 2},
    )
    events = release_events(job, noise_multiplier=1.0, update_length=update_length_for(job))
    assert worst_case_privacy(job) == (compute_epsilon(events, delta=1e-5), 1e-5)


def test_a_job_without_dp_has_unbounded_epsilon() -> None:
    assert worst_case_privacy(sensing("secure-agg")) == (math.inf, None)


# --------------------------------------------------------------------------- decisions


def test_the_default_policy_accepts_a_calibrated_dp_secure_agg_job() -> None:
    decision = NodePolicy().check(sensing())
    assert decision.accepted and decision.reasons == ()
    assert decision.epsilon is not None and decision.epsilon <= 4.0
    assert (decision.delta, decision.rule, decision.lifetime_epsilon) == (1e-5, "default", 30.0)


def test_a_job_below_the_minimum_level_is_refused() -> None:
    decision = NodePolicy().check(sensing("dp"))
    assert not decision.accepted
    assert decision.reasons == (
        "privacy level dp is below the minimum dp+secure-agg of rule default: this node "
        "requires secure aggregation",
    )


def test_a_job_without_dp_is_refused_for_its_level_and_its_unbounded_epsilon() -> None:
    decision = NodePolicy().check(sensing("secure-agg"))
    assert not decision.accepted and decision.epsilon == math.inf
    assert "requires differential privacy" in decision.reasons[0]
    assert "applies no differential privacy" in decision.reasons[1]


def test_a_node_can_opt_in_to_jobs_without_dp_explicitly() -> None:
    relaxed = policy(
        """
        [default]
        min_privacy_level = "secure-agg"
        max_epsilon = inf
        lifetime_epsilon = inf
        """
    )
    assert relaxed.check(sensing("secure-agg")).accepted
    assert not relaxed.check(sensing("none")).accepted


def test_a_dp_unit_the_rule_does_not_allow_is_refused() -> None:
    decision = policy('[default]\ndp_units = ["node"]\n').check(sensing())
    assert decision.reasons == ("DP unit example is not allowed by rule default (allowed: node)",)


def test_a_job_whose_epsilon_is_too_large_is_refused_with_the_numbers() -> None:
    decision = NodePolicy().check(sensing(target_epsilon=None, noise_multiplier=1.0))
    assert not decision.accepted and len(decision.reasons) == 1
    assert decision.reasons[0].startswith("the job's worst-case epsilon 14.")
    assert "at delta 1e-05 exceeds max_epsilon 10 of rule default" in decision.reasons[0]


def test_a_job_whose_delta_is_too_large_is_refused() -> None:
    decision = NodePolicy().check(sensing(delta=1e-4))
    assert decision.reasons == ("delta 0.0001 exceeds max_delta 1e-05 of rule default",)


def test_a_job_larger_than_a_whole_lifetime_budget_is_refused() -> None:
    rule = policy("[default]\nmax_epsilon = 3.0\nlifetime_epsilon = 3.0\n")
    reasons = rule.check(sensing(target_epsilon=3.9)).reasons
    assert len(reasons) == 2
    assert "exceeds max_epsilon 3" in reasons[0]
    assert "alone exceeds lifetime_epsilon 3" in reasons[1]


def test_the_artifact_rule_decides_over_the_default() -> None:
    strict = policy("[artifacts.sensing-iot-normalizer-v1]\nmax_epsilon = 2.0\n")
    decision = strict.check(sensing())
    assert decision.rule == "artifacts.sensing-iot-normalizer-v1"
    assert (
        "exceeds max_epsilon 2 of rule artifacts.sensing-iot-normalizer-v1" in (decision.reasons[0])
    )


def test_secagg_settings_below_the_nodes_minimums_are_refused() -> None:
    job = JobSpec.from_mapping(
        {
            "component": "sensing",
            "base_model": "iot",
            "task": "normalizer",
            "privacy_level": "dp+secure-agg",
            "dp": {"unit": "example", "target_epsilon": 4.0, "delta": 1e-5},
            "federation": {"clients_per_round": 2},
            "secagg": {"num_neighbours": 1, "reconstruction_threshold": 2},
        }
    )
    reasons = policy("[secagg]\nmin_threshold = 3\n").check(job).reasons
    assert len(reasons) == 3
    assert reasons[0].startswith("federation.clients_per_round = 2 is below")
    assert reasons[1].startswith("secagg.num_neighbours = 1 is below")
    assert reasons[2].startswith("secagg.reconstruction_threshold = 2 is below")
    split = JobSpec.from_mapping(
        {
            **job.model_dump(mode="json", exclude_none=True),
            "federation": {"clients_per_round": 10},
            "secagg": {"num_neighbours": 4, "reconstruction_threshold": 2},
        }
    )
    assert NodePolicy().check(split).reasons == (
        "secagg.reconstruction_threshold = 2 does not satisfy 2t > k + 1 + c = 4 + 1 + 0: a "
        "split view of a node's share holders could rebuild both of its secrets",
    )


def test_a_job_whose_privacy_cannot_be_derived_is_refused_with_the_reason() -> None:
    job = vit(dp={"unit": "node", "clipping_norm": 1.0, "target_epsilon": 2.0, "delta": 1e-5})
    decision = NodePolicy().check(job)  # node-level distributed DP needs clients_per_round
    assert not decision.accepted and decision.epsilon is None
    assert decision.reasons[0].startswith("cannot derive the job's privacy parameters:")
    assert "clients_per_round" in decision.reasons[0]
