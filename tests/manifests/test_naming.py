"""Artifact naming: the spec examples, parsing, round trips, generated and user names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from manifests.catalog import CATALOG, Component, Task
from manifests.naming import (
    ArtifactName,
    Quantization,
    format_timestamp,
    generated_name,
    name_problems,
    sanitize_part,
    validate_artifact_name,
)

_I8 = Quantization.INT8


def test_spec_example_vision_vit_base16_embed() -> None:
    name = ArtifactName.for_form(component="vision", base_model="vit-base16", purpose="embed")
    assert str(name) == "vision-vit-base16-embed-v1"


def test_spec_example_gpt_small_lm_finetune_int8_drops_component_of_derived_artifact() -> None:
    name = ArtifactName.for_form(
        component="inference", base_model="gpt-small-v1", purpose="lm-finetune", quantization="int8"
    )
    assert str(name) == "gpt-small-v1-lm-finetune-int8-v1"
    assert name.derived
    assert name.implied_component is Component.INFERENCE


@pytest.mark.parametrize(
    ("base_model", "purpose", "expected"),
    [
        ("camera", "preproc", "sensing-camera-preproc-v1"),
        ("audio", "preproc", "sensing-audio-preproc-v1"),
        ("iot", "normalizer", "sensing-iot-normalizer-v1"),
    ],
)
def test_sensing_forms_produce_the_sensing_catalog_ids(
    base_model: str, purpose: str, expected: str
) -> None:
    name = ArtifactName.for_form(component="sensing", base_model=base_model, purpose=purpose)
    assert str(name) == expected
    assert expected in CATALOG


def test_third_party_versioned_base_keeps_its_component_prefix() -> None:
    name = ArtifactName.for_form(component="text", base_model="all-mpnet-base-v2", purpose="embed")
    assert str(name) == "text-all-mpnet-base-v2-embed-v1"
    assert ArtifactName.parse(str(name)) == name


def test_model_version_is_the_major_suffix() -> None:
    name = ArtifactName.for_form(
        component="audio", base_model="wav2vec2-base", purpose="embed", version=3
    )
    assert str(name) == "audio-wav2vec2-base-embed-v3"


@pytest.mark.parametrize(
    ("text", "component", "base_model", "purpose", "quantization", "version"),
    [
        ("vision-vit-base16-embed-v1", Component.VISION, "vit-base16", Task.EMBED, None, 1),
        ("gpt-small-v1-lm-finetune-int8-v1", None, "gpt-small-v1", Task.LM_FINETUNE, _I8, 1),
        ("sensing-iot-normalizer-v1", Component.SENSING, "iot", Task.NORMALIZER, None, 1),
        ("audio-wav2vec2-base-embed-int8-v12", Component.AUDIO, "wav2vec2-base", Task.EMBED, _I8, 12),  # noqa: E501
        ("vision-foo-embed-embed-v1", Component.VISION, "foo-embed", Task.EMBED, None, 1),
    ],
)  # fmt: skip
def test_parse_reads_the_parts(
    text: str,
    component: Component | None,
    base_model: str,
    purpose: Task,
    quantization: Quantization | None,
    version: int,
) -> None:
    assert ArtifactName.parse(text) == ArtifactName(
        component, base_model, purpose, quantization, version
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("vision-vit-base16-embed", "must end with -v<major>"),
        ("vision-vit-base16-embed-v0", "must end with -v<major>"),
        ("vision-vit-base16-v1", "no known purpose"),
        ("robot-vit-base16-embed-v1", "neither a catalog artifact"),
        ("vision-embed-v1", "neither a catalog artifact"),
        ("Vision-vit-base16-embed-v1", "neither a catalog artifact"),
        ("vision-vit--base16-embed-v1", "base_model"),
        ("", "must end with -v<major>"),
    ],
)
def test_parse_rejects_unparsable_names_saying_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="Cannot parse artifact name") as info:
        ArtifactName.parse(text)
    assert reason in str(info.value)


def test_component_plus_base_spelling_a_catalog_id_is_rejected_as_ambiguous() -> None:
    with pytest.raises(ValueError, match="spells the catalog id sensing-camera-preproc-v1"):
        ArtifactName(Component.SENSING, "camera-preproc-v1", Task.EMBED)


def test_derived_name_with_explicit_component_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be None"):
        ArtifactName(Component.VISION, "gpt-small-v1", Task.LM_FINETUNE)


def test_non_derived_name_without_component_is_rejected() -> None:
    with pytest.raises(ValueError, match="`component` is required"):
        ArtifactName(None, "vit-base16", Task.EMBED)


@pytest.mark.parametrize("version", [0, -1])
def test_version_below_one_is_rejected(version: int) -> None:
    with pytest.raises(ValueError, match="`version` must be >= 1"):
        ArtifactName(Component.VISION, "vit-base16", Task.EMBED, None, version)


_token = st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True)
_base_models = st.lists(_token, min_size=1, max_size=4).map("-".join)


@st.composite
def _names(draw: st.DrawFn) -> ArtifactName:
    purpose = draw(st.sampled_from(list(Task)))
    quantization = draw(st.sampled_from([None, Quantization.INT8]))
    version = draw(st.integers(min_value=1, max_value=10_000))
    if draw(st.booleans()):
        base = draw(st.sampled_from(sorted(CATALOG)))
        return ArtifactName(None, base, purpose, quantization, version)
    component = draw(st.sampled_from(list(Component)))
    base = draw(_base_models.filter(lambda b: b not in CATALOG))
    name = f"{component}-{base}"
    if name in CATALOG:  # pragma: no cover - rejected as ambiguous, see the dedicated test
        base = f"x{base}"
    return ArtifactName(component, base, purpose, quantization, version)


@given(_names())
def test_every_name_round_trips_through_parse(name: ArtifactName) -> None:
    assert ArtifactName.parse(str(name)) == name


@given(_names())
def test_rule_names_are_valid_user_artifact_names(name: ArtifactName) -> None:
    assert validate_artifact_name(str(name)) == str(name)


def test_generated_name_follows_node_type_category_variant_run_timestamp() -> None:
    at = datetime(2025, 12, 21, 9, 5, 3, tzinfo=UTC)
    name = generated_name(
        node_type="encoder",
        model_category="vision",
        model_variant="vit-base16-embed-v1",
        run_name="Nightly Run #3",
        created_at=at,
    )
    assert name == "encoder.vision.vit-base16-embed-v1.nightly-run-3.20251221T090503Z"


def test_format_timestamp_converts_to_utc() -> None:
    at = datetime(2025, 1, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    assert format_timestamp(at) == "20241231T230000Z"


def test_format_timestamp_refuses_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        format_timestamp(datetime(2025, 1, 1))


@pytest.mark.parametrize(
    ("raw", "clean"),
    [("My.Run", "my-run"), ("  a__b  ", "a-b"), ("ÄÖ-x", "x"), ("r" * 100, "r" * 48)],
)
def test_sanitize_part_keeps_only_lowercase_letters_digits_and_hyphens(
    raw: str, clean: str
) -> None:
    assert sanitize_part(raw) == clean


def test_sanitize_part_refuses_parts_without_letters_or_digits() -> None:
    with pytest.raises(ValueError, match="must contain a letter or digit"):
        sanitize_part("...")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("Vision-X", "must be lowercase"),
        ("vision x", "may contain only"),
        ("vision/x", "may contain only"),
        ("-vision", "must start and end"),
        ("vision..x", "must not contain '..'"),
        ("a" * 129, "at most 128"),
        ("", "must not be empty"),
    ],
)
def test_user_names_are_validated(name: str, problem: str) -> None:
    assert any(problem in p for p in name_problems(name))
    with pytest.raises(ValueError, match="`artifact_name`"):
        validate_artifact_name(name)


def test_user_name_problems_are_all_reported_at_once() -> None:
    problems = name_problems("-Bad Name..")
    assert len(problems) >= 4


@pytest.mark.parametrize("name", ["my-model_v2", "encoder.vision.x.run.20250101T000000Z", "a"])
def test_acceptable_user_names_pass(name: str) -> None:
    assert name_problems(name) == []
