"""The artifact catalog: completeness, trainability and lookups."""

from __future__ import annotations

import pytest

from manifests import catalog
from manifests.catalog import (
    ArtifactKind,
    Component,
    NodeType,
    NotTrainableError,
    Task,
    UnknownArtifactError,
)

SPEC_IDS = {
    NodeType.SENSING: [
        "sensing-camera-preproc-v1",
        "sensing-audio-preproc-v1",
        "sensing-iot-normalizer-v1",
    ],
    NodeType.ENCODER: [
        "vit-base16-embed-v1",
        "resnet50-proj-v1",
        "wav2vec2-base-embed-v1",
        "hubert-large-embed-v1",
        "sbert-all-mpnet-v1",
        "snn-dvs-embed-v1",
    ],
    NodeType.INFERENCE: [
        "gpt-small-v1",
        "gpt-medium-v1",
        "gpt-large-v1",
        "yolox-s-intel-v1",
        "fasterrcnn-res50-v1",
        "spiking-lm-core-v1",
        "multimodal-ensemble-v1",
        "rag-lite-v1",
    ],
    NodeType.DECISION: ["planner-rl-ppo-v1", "motor-controller-dnn-v1"],
    NodeType.MEMORY: ["milvus-schema-v1", "minio-log-schema-v1"],
    NodeType.TRAINER: ["trainer-ddp-manager-v1"],
    NodeType.AGGREGATOR: ["federator-agg-v1", "result-aggregator-v1"],
    NodeType.MANAGEMENT: ["auth-service-v1", "monitoring-stack-v1"],
}
TRAINABLE = {
    "sensing-camera-preproc-v1",
    "sensing-audio-preproc-v1",
    "sensing-iot-normalizer-v1",
    "vit-base16-embed-v1",
    "wav2vec2-base-embed-v1",
    "sbert-all-mpnet-v1",
    "gpt-small-v1",
}


def test_catalog_holds_exactly_the_spec_artifacts_with_their_node_types() -> None:
    expected = {aid: node for node, ids in SPEC_IDS.items() for aid in ids}
    assert {e.id: e.node_type for e in catalog.entries()} == expected


def test_catalog_marks_exactly_the_first_pipeline_artifacts_trainable() -> None:
    assert {e.id for e in catalog.entries() if e.trainable} == TRAINABLE
    assert {e.id for e in catalog.trainable_entries()} == TRAINABLE


@pytest.mark.parametrize(
    ("artifact_id", "dim"),
    [
        ("vit-base16-embed-v1", 768),
        ("resnet50-proj-v1", 512),
        ("wav2vec2-base-embed-v1", 512),
        ("hubert-large-embed-v1", 1024),
        ("sbert-all-mpnet-v1", 768),
        ("snn-dvs-embed-v1", None),
    ],
)
def test_encoder_entries_carry_the_spec_embedding_size(artifact_id: str, dim: int | None) -> None:
    assert catalog.get(artifact_id).embedding_dim == dim


def test_memory_entries_are_templates_and_services_are_not_models() -> None:
    assert catalog.get("milvus-schema-v1").kind is ArtifactKind.TEMPLATE
    assert catalog.get("minio-log-schema-v1").kind is ArtifactKind.TEMPLATE
    for aid in ("federator-agg-v1", "auth-service-v1", "trainer-ddp-manager-v1"):
        assert catalog.get(aid).kind is ArtifactKind.SERVICE
    assert not any(e.trainable for e in catalog.entries() if e.kind is not ArtifactKind.MODEL)


def test_gpt_sizes_are_recorded() -> None:
    sizes = {
        a: catalog.get(a).parameters for a in ("gpt-small-v1", "gpt-medium-v1", "gpt-large-v1")
    }
    assert sizes == {"gpt-small-v1": "~300M", "gpt-medium-v1": "~1.5B", "gpt-large-v1": "~6B"}


def test_every_entry_has_a_one_line_description() -> None:
    for entry in catalog.entries():
        assert entry.description and "\n" not in entry.description


def test_get_suggests_close_ids_for_a_near_miss() -> None:
    with pytest.raises(UnknownArtifactError) as info:
        catalog.get("vit-base16-embed-v2")
    assert "vit-base16-embed-v1" in info.value.suggestions
    assert "Did you mean vit-base16-embed-v1" in str(info.value)


def test_get_unknown_id_without_near_miss_has_no_suggestion() -> None:
    with pytest.raises(UnknownArtifactError) as info:
        catalog.get("zzzzzz")
    assert info.value.suggestions == ()
    assert "fedbrain catalog" in str(info.value)


def test_require_trainable_rejects_gpt_medium_listing_trainable_artifacts() -> None:
    with pytest.raises(NotTrainableError) as info:
        catalog.require_trainable("gpt-medium-v1")
    message = str(info.value)
    assert message.startswith(
        "gpt-medium-v1 is not trainable by fedbrain yet; trainable artifacts:"
    )
    for aid in TRAINABLE:
        assert aid in message


def test_not_trainable_error_is_a_value_error() -> None:
    assert issubclass(NotTrainableError, ValueError)


@pytest.mark.parametrize(
    ("component", "base_model", "task", "expected"),
    [
        ("vision", "vit-base16", "embed", "vit-base16-embed-v1"),
        ("audio", "wav2vec2-base", "embed", "wav2vec2-base-embed-v1"),
        ("text", "all-mpnet-base-v2", "embed", "sbert-all-mpnet-v1"),
        ("inference", "gpt-small-v1", "lm-finetune", "gpt-small-v1"),
        ("sensing", "camera", "preproc", "sensing-camera-preproc-v1"),
        ("sensing", "audio", "preproc", "sensing-audio-preproc-v1"),
        ("sensing", "iot", "normalizer", "sensing-iot-normalizer-v1"),
    ],
)
def test_resolve_training_target_finds_each_trainable_form(
    component: str, base_model: str, task: str, expected: str
) -> None:
    assert catalog.resolve_training_target(component, base_model, task).id == expected


@pytest.mark.parametrize(
    ("component", "base_model", "task", "named"),
    [
        ("vision", "resnet50", "embed", "resnet50-proj-v1"),
        ("inference", "gpt-medium-v1", "lm-finetune", "gpt-medium-v1"),
        ("audio", "hubert-large", "embed", "hubert-large-embed-v1"),
    ],
)
def test_resolve_training_target_refuses_catalog_artifacts_that_are_not_trainable(
    component: str, base_model: str, task: str, named: str
) -> None:
    with pytest.raises(NotTrainableError, match=f"^{named} .*is not trainable by fedbrain yet"):
        catalog.resolve_training_target(component, base_model, task)


def test_resolve_training_target_suggests_the_closest_trainable_base_model() -> None:
    with pytest.raises(
        NotTrainableError, match="Did you mean component=vision base_model=vit-base16"
    ):
        catalog.resolve_training_target("vision", "vit-base-16", "embed")


def test_resolve_training_target_names_the_task_a_base_artifact_trains_with() -> None:
    with pytest.raises(NotTrainableError, match="gpt-small-v1 trains with task lm-finetune"):
        catalog.resolve_training_target("inference", "gpt-small-v1", "classification")


def test_training_forms_of_gpt_small_derive_from_the_artifact_itself() -> None:
    (form,) = catalog.get("gpt-small-v1").training_forms()
    assert (form.component, form.base_model, form.task) == (
        Component.INFERENCE,
        "gpt-small-v1",
        Task.LM_FINETUNE,
    )


def test_catalog_mapping_is_read_only() -> None:
    with pytest.raises(TypeError):
        catalog.CATALOG["x"] = catalog.get("gpt-small-v1")  # type: ignore[index]
