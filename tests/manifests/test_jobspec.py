"""The job spec (learning form): validation, loaders, run config, manifest mapping."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manifests.catalog import NotTrainableError
from manifests.confighash import training_config_hash
from manifests.jobspec import (
    JobSpec,
    JobSpecError,
    NotTrainableJobError,
    Precision,
    PrivacyLevel,
    load_job,
    read_job_file,
)

CREATED = datetime(2025, 12, 21, 12, 0, 0, tzinfo=UTC)
VISION = {
    "component": "vision",
    "base_model": "vit-base16",
    "task": "embed",
    "embedding_dim": 768,
    "precision": "fp16",
    "quantize": False,
    "batch_size": 256,
    "epochs": 10,
}
GPT = {
    "component": "inference",
    "base_model": "gpt-small-v1",
    "task": "lm-finetune",
    "max_seq_length": 1024,
    "learning_rate": 2e-5,
    "epochs": 3,
    "quantize": "int8",
}
MANIFEST_KEYS = {
    "artifact_name",
    "model_version",
    "base_model",
    "task",
    "embedding_dim",
    "quantized",
    "precision",
    "training_config_hash",
    "train_data_tags",
    "license",
    "node_type",
    "privacy_level",
    "base_checkpoint_digest",
    "model_config",
    "input_spec",
    "training_config",
    "checkpoint_policy",
    "data_prep_profile",
}
DP = {"privacy_level": "dp", "dp": {"clipping_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5}}


def _problems(data: Mapping[str, object]) -> tuple[str, ...]:
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_mapping(data)
    return info.value.problems


# ------------------------------------------------------------------ the spec's mapping examples


def test_spec_vision_example_maps_to_its_manifest_fields() -> None:
    fields = JobSpec.from_mapping(VISION).manifest_fields(created_at=CREATED)
    assert fields["artifact_name"] == "vision-vit-base16-embed-v1"
    assert {k: fields[k] for k in ("base_model", "task", "embedding_dim", "precision")} == {
        "base_model": "vit-base16",
        "task": "embed",
        "embedding_dim": 768,
        "precision": "fp16",
    }
    assert fields["quantized"] is False
    assert fields["node_type"] == "encoder"
    assert fields["training_config_hash"] == training_config_hash(fields["training_config"])  # type: ignore[arg-type]


def test_spec_gpt_example_maps_quantize_int8_to_quantized_precision_and_name() -> None:
    fields = JobSpec.from_mapping(GPT).manifest_fields(created_at=CREATED)
    assert fields["artifact_name"] == "gpt-small-v1-lm-finetune-int8-v1"
    assert fields["quantized"] is True
    assert fields["precision"] == "int8"
    assert fields["input_spec"] == {"max_seq_length": 1024}
    assert fields["node_type"] == "inference"


def test_manifest_fields_have_exactly_the_agreed_keys_and_are_plain_json() -> None:
    fields = JobSpec.from_mapping(GPT).manifest_fields(created_at=CREATED)
    assert set(fields) == MANIFEST_KEYS
    assert json.loads(json.dumps(fields, allow_nan=False)) == fields


def test_manifest_fields_group_form_values_into_their_sections() -> None:
    spec = JobSpec.from_mapping(
        {
            **VISION,
            "hidden_size": 384,
            "num_heads": 6,
            "input_size": 224,
            "checkpoint_interval": 5,
            "augmentations": "flip,crop",
            "preprocessing_profile": "imagenet",
            "train_data_tags": ["cam-a", "cam-b"],
            "model_version": 2,
            "weight_decay": 0.01,
            "optimizer": "sgd",
        }
    )
    fields = spec.manifest_fields(created_at=CREATED)
    assert fields["model_config"] == {"hidden_size": 384, "num_heads": 6}
    assert fields["input_spec"] == {"input_size": 224}
    assert fields["training_config"] == {
        "batch_size": 256,
        "learning_rate": 1e-3,
        "optimizer": "sgd",
        "epochs": 10,
        "weight_decay": 0.01,
    }
    assert fields["checkpoint_policy"] == {"interval_rounds": 5}
    assert fields["data_prep_profile"] == {
        "augmentations": ["flip", "crop"],
        "preprocessing_profile": "imagenet",
    }
    assert fields["train_data_tags"] == ["cam-a", "cam-b"]
    assert fields["model_version"] == "v2"
    assert fields["artifact_name"] == "vision-vit-base16-embed-v2"


def test_training_config_hash_changes_with_learning_rate_but_not_with_tags() -> None:
    a = JobSpec.from_mapping(VISION).manifest_fields(created_at=CREATED)
    b = JobSpec.from_mapping({**VISION, "learning_rate": 2e-3}).manifest_fields(created_at=CREATED)
    c = JobSpec.from_mapping({**VISION, "train_data_tags": "x"}).manifest_fields(created_at=CREATED)
    assert a["training_config_hash"] != b["training_config_hash"]
    assert a["training_config_hash"] == c["training_config_hash"]


def test_given_artifact_name_wins_over_the_rule_name() -> None:
    spec = JobSpec.from_mapping({**VISION, "artifact_name": "my-vit"})
    assert spec.manifest_fields(created_at=CREATED)["artifact_name"] == "my-vit"


def test_run_naming_generates_the_timestamped_name_with_the_given_run_name() -> None:
    spec = JobSpec.from_mapping({**VISION, "artifact_naming": "run", "run_name": "nightly"})
    assert spec.manifest_fields(created_at=CREATED)["artifact_name"] == (
        "encoder.vision.vit-base16-embed-v1.nightly.20251221T120000Z"
    )
    overridden = spec.manifest_fields(created_at=CREATED, run_name="Run 7")
    assert (
        overridden["artifact_name"] == "encoder.vision.vit-base16-embed-v1.run-7.20251221T120000Z"
    )


def test_manifest_fields_refuse_a_naive_created_at_for_generated_names() -> None:
    spec = JobSpec.from_mapping({**VISION, "artifact_naming": "run"})
    with pytest.raises(ValueError, match="timezone-aware"):
        spec.manifest_fields(created_at=datetime(2025, 1, 1))


# ------------------------------------------------------------------ quantize / precision


@pytest.mark.parametrize(
    ("given", "quantize", "precision"),
    [
        ({"quantize": "int8"}, True, Precision.INT8),
        ({"quantize": True}, True, Precision.INT8),
        ({"precision": "int8"}, True, Precision.INT8),
        ({"quantize": "int8", "precision": "int8"}, True, Precision.INT8),
        ({"precision": "fp16"}, False, Precision.FP16),
        ({}, False, Precision.FP32),
    ],
)
def test_quantize_and_precision_normalize_to_one_meaning(
    given: dict[str, object], quantize: bool, precision: Precision
) -> None:
    base = {k: v for k, v in VISION.items() if k not in ("quantize", "precision")}
    spec = JobSpec.from_mapping({**base, **given})
    assert (spec.quantize, spec.precision) == (quantize, precision)


def test_quantize_true_with_fp16_precision_is_an_error() -> None:
    problems = _problems({**VISION, "quantize": True, "precision": "fp16"})
    assert any(p.startswith("quantize: true produces int8 weights") for p in problems)


def test_precision_int8_with_quantize_false_is_an_error() -> None:
    problems = _problems({**VISION, "precision": "int8", "quantize": False})
    assert any(p.startswith("precision: int8 means a post-training-quantized") for p in problems)


def test_quantize_to_an_unknown_target_is_reported() -> None:
    assert "quantize: must be true, false or int8. Found 'int4'." in _problems(
        {**VISION, "quantize": "int4"}
    )


# ------------------------------------------------------------------ ranges and single fields


@pytest.mark.parametrize(
    ("field", "value", "line"),
    [
        ("batch_size", 0, "batch_size: must be >= 1. Found 0."),
        ("learning_rate", 0, "learning_rate: must be > 0. Found 0."),
        ("learning_rate", -1e-3, "learning_rate: must be > 0. Found -0.001."),
        ("learning_rate", math.inf, "learning_rate: must be a finite number. Found inf."),
        ("epochs", 0, "epochs: must be >= 1. Found 0."),
        ("weight_decay", -0.1, "weight_decay: must be >= 0. Found -0.1."),
        ("embedding_dim", 0, "embedding_dim: must be >= 1. Found 0."),
        ("model_version", 0, "model_version: must be >= 1. Found 0."),
        ("checkpoint_interval", 0, "checkpoint_interval: must be >= 1. Found 0."),
        ("batch_size", "many", "batch_size: must be a whole number. Found 'many'."),
        ("optimizer", "lion", "optimizer: must be one of 'sgd', 'adam' or 'adamw'. Found 'lion'."),
    ],
)
def test_out_of_range_values_are_reported_in_actionable_words(
    field: str, value: object, line: str
) -> None:
    assert line in _problems({**VISION, field: value})


@pytest.mark.parametrize(
    ("section", "field", "value", "line"),
    [
        ("dp", "delta", 1.0, "dp.delta: must be < 1. Found 1.0."),
        ("dp", "delta", 0.0, "dp.delta: must be > 0. Found 0.0."),
        ("dp", "target_epsilon", 0.0, "dp.target_epsilon: must be > 0. Found 0.0."),
        ("dp", "clipping_norm", 0.0, "dp.clipping_norm: must be > 0. Found 0.0."),
        ("federation", "reliability_threshold", 1.5,
         "federation.reliability_threshold: must be <= 1. Found 1.5."),
        ("federation", "fraction", 0.0, "federation.fraction: must be > 0. Found 0.0."),
        ("federation", "num_rounds", 0, "federation.num_rounds: must be >= 1. Found 0."),
    ],
)  # fmt: skip
def test_federation_ranges_are_validated(
    section: str, field: str, value: object, line: str
) -> None:
    assert line in _problems({**VISION, **DP, section: {field: value}})


def test_unknown_keys_are_rejected_with_a_suggestion() -> None:
    problems = _problems({**VISION, "batchsize": 3, "clipping_norm": 1.0})
    assert "batchsize: is not a job setting. Did you mean batch_size?" in problems
    assert "clipping_norm: is not a job setting. Did you mean dp.clipping_norm?" in problems


def test_missing_required_fields_list_the_choices() -> None:
    problems = _problems({"base_model": "vit-base16"})
    assert any(
        p.startswith("component: is required. Choose one of sensing, vision") for p in problems
    )
    assert any(p.startswith("task: is required. Choose one of embed") for p in problems)


def test_base_model_with_invalid_characters_is_rejected() -> None:
    problems = _problems({**VISION, "base_model": "ViT_Base16"})
    assert any(p.startswith("base_model: must be lowercase letters and digits") for p in problems)


def test_list_items_with_commas_are_rejected_because_run_configs_join_on_commas() -> None:
    problems = _problems({**VISION, "train_data_tags": ["a,b"]})
    assert any(
        p.startswith("train_data_tags: items must be non-empty, without commas") for p in problems
    )


def test_user_given_artifact_name_is_validated() -> None:
    problems = _problems({**VISION, "artifact_name": "My Model"})
    assert any(p.startswith("artifact_name: must be lowercase") for p in problems)
    assert any(p.startswith("artifact_name: may contain only") for p in problems)


# ------------------------------------------------------------------ cross-field rules


def test_embed_task_needs_embedding_dim_and_names_the_catalog_size() -> None:
    data = {k: v for k, v in VISION.items() if k != "embedding_dim"}
    assert (
        "embedding_dim: is required when task is embed (vit-base16-embed-v1 uses 768). Found none."
        in _problems(data)
    )


def test_hidden_size_must_divide_by_num_heads() -> None:
    assert "hidden_size: must be a multiple of num_heads (5). Found 768." in _problems(
        {**VISION, "hidden_size": 768, "num_heads": 5}
    )


def test_dp_needs_clipping_norm_a_noise_source_and_delta_all_reported_together() -> None:
    problems = _problems({**VISION, "privacy_level": "dp"})
    assert [p.split(":")[0] for p in problems] == [
        "dp.clipping_norm",
        "dp.noise_multiplier",
        "dp.delta",
    ]


def test_dp_accepts_a_target_epsilon_instead_of_a_noise_multiplier() -> None:
    spec = JobSpec.from_mapping(
        {
            **VISION,
            "privacy_level": "dp",
            "dp": {"clipping_norm": 1.0, "target_epsilon": 3.0, "delta": 1e-5},
        }
    )
    assert spec.dp.target_epsilon == 3.0
    assert spec.privacy_level.uses_dp and not spec.privacy_level.uses_secure_agg


def test_dp_rejects_both_noise_multiplier_and_target_epsilon() -> None:
    data = {**VISION, **DP, "dp": {**DP["dp"], "target_epsilon": 2.0}}  # type: ignore[dict-item]
    assert any(p.startswith("dp.noise_multiplier: set either") for p in _problems(data))


def test_target_epsilon_above_the_budget_is_rejected() -> None:
    dp = {"clipping_norm": 1.0, "target_epsilon": 8.0, "delta": 1e-5, "epsilon_budget": 4.0}
    problems = _problems({**VISION, "privacy_level": "dp", "dp": dp})
    assert any(
        p.startswith("dp.target_epsilon: must not exceed dp.epsilon_budget") for p in problems
    )


def test_dp_settings_without_dp_privacy_level_are_flagged() -> None:
    problems = _problems({**VISION, "dp": {"noise_multiplier": 1.0}})
    assert any(
        p.startswith("dp.noise_multiplier: is set but privacy_level is none") for p in problems
    )


@pytest.mark.parametrize("level", ["secure-agg", "dp+secure-agg"])
@pytest.mark.parametrize("method", ["median", "trimmed-mean", "krum"])
def test_robust_aggregation_is_impossible_under_secure_aggregation(level: str, method: str) -> None:
    data = {**VISION, **DP, "privacy_level": level, "federation": {"robust_aggregation": method}}
    assert any(p.startswith("federation.robust_aggregation:") for p in _problems(data))


def test_robust_aggregation_is_allowed_with_plain_dp() -> None:
    spec = JobSpec.from_mapping({**VISION, **DP, "federation": {"robust_aggregation": "median"}})
    assert spec.federation.robust_aggregation == "median"


def test_secagg_settings_without_secure_agg_are_flagged() -> None:
    problems = _problems({**VISION, "secagg": {"num_neighbours": 4}})
    assert any(
        p.startswith("secagg.num_neighbours: is set but privacy_level is none") for p in problems
    )


def test_secagg_neighbours_and_threshold_must_fit_the_round_size() -> None:
    data = {
        **VISION,
        "privacy_level": "secure-agg",
        "federation": {"clients_per_round": 5},
        "secagg": {"num_neighbours": 5, "reconstruction_threshold": 6},
    }
    problems = _problems(data)
    assert any(p.startswith("secagg.num_neighbours: must be below") for p in problems)
    assert any(p.startswith("secagg.reconstruction_threshold: must not exceed") for p in problems)


def test_poisson_sampling_needs_a_fraction_not_a_count() -> None:
    data = {**VISION, "federation": {"sampling": "poisson", "clients_per_round": 4}}
    assert any(p.startswith("federation.fraction: poisson sampling") for p in _problems(data))


def test_clients_per_round_and_fraction_are_exclusive() -> None:
    data = {**VISION, "federation": {"clients_per_round": 4, "fraction": 0.5}}
    assert any(p.startswith("federation.clients_per_round: set either") for p in _problems(data))


def test_node_type_must_match_the_catalog_entry() -> None:
    problems = _problems({**VISION, "node_type": "sensing"})
    assert (
        "node_type: must be encoder for vit-base16-embed-v1 (its catalog node type), "
        "or left out. Found sensing." in problems
    )


def test_node_type_defaults_to_the_catalog_entry() -> None:
    assert JobSpec.from_mapping(VISION).node_type == "encoder"


def test_derived_job_needs_the_base_artifacts_component() -> None:
    problems = _problems({**GPT, "component": "text"})
    assert "component: must be inference for a job on gpt-small-v1. Found text." in problems


def test_non_trainable_artifact_raises_not_trainable_error_among_other_problems() -> None:
    with pytest.raises(NotTrainableJobError) as info:
        JobSpec.from_mapping({**VISION, "base_model": "resnet50", "batch_size": 0})
    assert isinstance(info.value, NotTrainableError)
    assert isinstance(info.value, JobSpecError)
    assert "batch_size: must be >= 1. Found 0." in info.value.problems
    assert any(
        "resnet50-proj-v1 (component=vision" in p and "is not trainable by fedbrain yet" in p
        for p in info.value.problems
    )


def test_gpt_medium_is_not_trainable() -> None:
    with pytest.raises(
        NotTrainableError, match=r"gpt-medium-v1 .*is not trainable by fedbrain yet"
    ):
        JobSpec.from_mapping({**GPT, "base_model": "gpt-medium-v1"})


def test_every_problem_is_reported_at_once_field_and_cross_field() -> None:
    data = {
        **VISION,
        "batch_size": 0,
        "learning_rate": "fast",
        "precision": "fp8",
        "privacy_level": "dp+secure-agg",
        "federation": {"robust_aggregation": "krum", "num_rounds": 0},
        "dp": {"clipping_norm": -1.0},
        "surprise": 1,
    }
    problems = _problems(data)
    fields = {p.split(":")[0] for p in problems}
    assert {
        "batch_size",
        "learning_rate",
        "precision",
        "federation.num_rounds",
        "dp.clipping_norm",
        "surprise",
        "dp.noise_multiplier",
        "dp.delta",
        "federation.robust_aggregation",
    } <= fields
    assert not any("dp.clipping_norm: is required" in p for p in problems)  # broken, not missing


def test_job_spec_error_message_lists_each_problem_on_its_own_line() -> None:
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_mapping({**VISION, "batch_size": 0, "epochs": 0})
    assert str(info.value).splitlines() == [
        "Invalid job spec (2 problems):",
        "- batch_size: must be >= 1. Found 0.",
        "- epochs: must be >= 1. Found 0.",
    ]
    assert "pydantic" not in str(info.value) and "errors.pydantic.dev" not in str(info.value)


def test_job_spec_is_frozen() -> None:
    spec = JobSpec.from_mapping(VISION)
    with pytest.raises(ValueError, match="frozen"):
        spec.batch_size = 1


# ------------------------------------------------------------------ loaders


def test_load_job_reads_toml_with_federation_tables(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        'component = "inference"\nbase_model = "gpt-small-v1"\ntask = "lm-finetune"\n'
        'max_seq_length = 1024\nlearning_rate = 2e-5\nepochs = 3\nquantize = "int8"\n'
        'privacy_level = "dp+secure-agg"\n'
        "[federation]\nnum_rounds = 5\nclients_per_round = 8\n"
        "[dp]\nclipping_norm = 1.0\nnoise_multiplier = 0.8\ndelta = 1e-5\n"
        "[secagg]\nnum_neighbours = 4\nreconstruction_threshold = 3\n",
        encoding="utf-8",
    )
    spec = load_job(path)
    assert (
        spec.manifest_fields(created_at=CREATED)["artifact_name"]
        == "gpt-small-v1-lm-finetune-int8-v1"
    )
    assert spec.privacy_level is PrivacyLevel.DP_SECURE_AGG
    assert (spec.federation.num_rounds, spec.secagg.num_neighbours) == (5, 4)


def test_load_job_reads_json(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({**VISION, "federation": {"num_rounds": 2}}), encoding="utf-8")
    assert load_job(path) == JobSpec.from_mapping({**VISION, "federation": {"num_rounds": 2}})


def test_load_job_rejects_duplicate_json_keys(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text('{"batch_size": 1, "batch_size": 2}', encoding="utf-8")
    with pytest.raises(JobSpecError, match="duplicate key 'batch_size'"):
        load_job(path)


def test_load_job_rejects_nan_in_json(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text('{"learning_rate": NaN}', encoding="utf-8")
    with pytest.raises(JobSpecError, match="NaN is not allowed"):
        load_job(path)


def test_load_job_reports_invalid_toml_and_unknown_extensions(tmp_path: Path) -> None:
    bad = tmp_path / "job.toml"
    bad.write_text("component = ", encoding="utf-8")
    with pytest.raises(JobSpecError, match="is not valid TOML"):
        load_job(bad)
    with pytest.raises(JobSpecError, match=r"must end in \.toml or \.json"):
        load_job(tmp_path / "job.yaml")


def test_load_job_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="cannot read"):
        load_job(tmp_path / "absent.toml")


def test_from_flags_override_base_values_and_ignore_none() -> None:
    spec = JobSpec.from_flags(
        {"batch_size": 64, "epochs": None, "federation.num_rounds": 9},
        base={**VISION, "federation": {"num_rounds": 2, "clients_per_round": 3}},
    )
    assert (spec.batch_size, spec.epochs) == (64, 10)
    assert (spec.federation.num_rounds, spec.federation.clients_per_round) == (9, 3)


def test_from_run_config_reads_flwr_flattened_keys_and_comma_lists() -> None:
    run_config: dict[str, bool | int | float | str] = {
        **{k: v for k, v in VISION.items() if isinstance(v, bool | int | float | str)},
        "train_data_tags": "cam-a, cam-b",
        "privacy_level": "dp",
        "dp.clipping_norm": 1.0,
        "dp.noise_multiplier": 1.0,
        "dp.delta": 1e-5,
        "federation.num_rounds": 4,
    }
    spec = JobSpec.from_run_config(run_config)
    assert spec.train_data_tags == ("cam-a", "cam-b")
    assert (spec.dp.clipping_norm, spec.federation.num_rounds) == (1.0, 4)


def test_from_run_config_with_prefix_reads_only_the_job_keys() -> None:
    run_config = {f"job.{k}": v for k, v in JobSpec.from_mapping(VISION).to_run_config().items()}
    run_config["num-server-rounds"] = 3
    assert JobSpec.from_run_config(run_config, prefix="job") == JobSpec.from_mapping(VISION)


def test_to_run_config_is_flat_with_flwr_value_types() -> None:
    flat = JobSpec.from_mapping({**GPT, "augmentations": ["a", "b"]}).to_run_config()
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert flat["augmentations"] == "a,b"
    assert flat["federation.num_rounds"] == 3
    assert "embedding_dim" not in flat  # None values are left out


_jobs = st.fixed_dictionaries(
    {
        "batch_size": st.integers(1, 4096),
        "learning_rate": st.floats(1e-8, 10.0),
        "optimizer": st.sampled_from(["sgd", "adam", "adamw"]),
        "epochs": st.integers(1, 100),
        "weight_decay": st.floats(0.0, 1.0),
        "precision": st.sampled_from(["fp32", "fp16", "int8"]),
        "train_data_tags": st.lists(
            st.from_regex(r"[a-z0-9][a-z0-9 _-]{0,8}[a-z0-9]", fullmatch=True), max_size=3
        ),
        "checkpoint_interval": st.integers(1, 50),
    },
    optional={
        "hidden_size": st.sampled_from([64, 128, 768]),
        "num_heads": st.sampled_from([1, 2, 4]),
        "input_size": st.integers(1, 1024),
        "run_name": st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True),
    },
)


@settings(max_examples=60, deadline=None)
@given(_jobs, st.sampled_from(["none", "dp", "secure-agg", "dp+secure-agg"]))
def test_run_config_round_trips(extra: dict[str, object], level: str) -> None:
    data: dict[str, object] = {**VISION, **extra, "quantize": extra["precision"] == "int8"}
    if "dp" in level:
        data["dp"] = DP["dp"]
    data["privacy_level"] = level
    spec = JobSpec.from_mapping(data)
    assert JobSpec.from_run_config(spec.to_run_config()) == spec


# ------------------------------------------------------------------- no silent coercion


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("embedding_dim", True, "must be a whole number, not true/false. Found true."),
        ("epochs", "3", "must be a whole number, not text (no quotes). Found '3'."),
        ("epochs", 3.0, "must be a whole number. Found 3.0."),
        ("quantize", "yes", "must be true, false or int8. Found 'yes'."),
        ("quantize", 1, "must be true, false or int8. Found 1."),
        ("learning_rate", "0.1", "must be a number, not text (no quotes). Found '0.1'."),
        ("learning_rate", True, "must be a number, not true/false. Found true."),
        ("federation.num_rounds", "2", "must be a whole number, not text (no quotes). Found '2'."),
        ("dp.clipping_norm", "1.0", "must be a number, not text (no quotes). Found '1.0'."),
    ],
)
def test_values_of_the_wrong_type_are_errors_not_coerced(
    field: str, value: object, expected: str
) -> None:
    assert f"{field}: {expected}" in _problems({**VISION, **DP, field: value})


def test_wrong_types_are_errors_in_toml_json_and_run_config(tmp_path: Path) -> None:
    toml = tmp_path / "job.toml"
    toml.write_text(
        'component = "vision"\nbase_model = "vit-base16"\ntask = "embed"\n'
        'embedding_dim = true\nepochs = "3"\nquantize = "yes"\n',
        "utf-8",
    )
    as_json = tmp_path / "job.json"
    as_json.write_text(json.dumps(read_job_file(toml)), "utf-8")
    for path in (toml, as_json):
        with pytest.raises(JobSpecError) as info:
            load_job(path)
        assert {p.split(":")[0] for p in info.value.problems} == {
            "embedding_dim",
            "epochs",
            "quantize",
        }
    run_config = {**JobSpec.from_mapping(VISION).to_run_config(), "epochs": "3"}
    with pytest.raises(JobSpecError, match="epochs: must be a whole number"):
        JobSpec.from_run_config(run_config)


def test_whole_numbers_are_accepted_where_a_float_is_expected() -> None:
    spec = JobSpec.from_mapping({**VISION, "learning_rate": 1, "weight_decay": 0})
    assert spec.learning_rate == 1.0 and isinstance(spec.learning_rate, float)
    assert JobSpec.from_run_config(spec.to_run_config()) == spec
