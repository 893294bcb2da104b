"""The manifest model, provenance, strict JSON and the exported schema."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from manifests.jobspec import JobSpec
from manifests.manifest import (
    SCHEMA_PATH,
    JSONFormatError,
    Manifest,
    Provenance,
    build_manifest,
    canonical_json,
    loads_strict,
    manifest_schema,
)

FINISHED_AT = "2025-06-01T12:00:00Z"


def provenance_data(**overrides: object) -> dict[str, object]:
    """A valid provenance document (privacy_level none: no dp, no secagg)."""
    data: dict[str, object] = {
        "run_id": "run-0001",
        "run_name": "nightly",
        "finished_at": FINISHED_AT,
        "rounds": 3,
        "participants_per_round": [8, 7, 8],
        "reliability": {"score": 0.91, "verdict": "accepted"},
        "versions": {"fedbrain": "0.1.0", "flwr": "1.42.0", "torch": "2.13.0"},
    }
    data.update(overrides)
    return data


def make_provenance(**overrides: object) -> Provenance:
    return Provenance.model_validate(provenance_data(**overrides))


def vision_job(**overrides: object) -> JobSpec:
    """The specification's vision example (fp16)."""
    data: dict[str, object] = {
        "component": "vision",
        "base_model": "vit-base16",
        "task": "embed",
        "embedding_dim": 768,
        "precision": "fp16",
        "batch_size": 256,
        "epochs": 10,
    }
    data.update(overrides)
    return JobSpec.from_mapping(data)


DP = {
    "unit": "node",
    "clipping_norm": 1.0,
    "noise_multiplier": 1.1,
    "accountant": "rdp",
    "epsilon": 3.2,
    "delta": 1e-5,
}
SECAGG = {"neighbours": 4, "threshold": 3, "modulus_bits": 32, "clipping_range": 8.0}


def test_build_manifest_takes_created_at_from_the_run_end() -> None:
    manifest = build_manifest(vision_job(), make_provenance(), environ={})
    assert manifest.created_at == datetime(2025, 6, 1, 12, tzinfo=UTC)
    assert manifest.to_json_object()["created_at"] == FINISHED_AT
    assert manifest.artifact_name == "vision-vit-base16-embed-v1"
    assert manifest.precision == "fp16"


def test_build_manifest_falls_back_to_source_date_epoch_never_the_clock() -> None:
    provenance = make_provenance(finished_at=None)
    manifest = build_manifest(vision_job(), provenance, environ={"SOURCE_DATE_EPOCH": "86400"})
    assert manifest.to_json_object()["created_at"] == "1970-01-02T00:00:00Z"
    with pytest.raises(ValueError, match="SOURCE_DATE_EPOCH"):
        build_manifest(vision_job(), provenance, environ={})


def test_build_manifest_refuses_a_run_the_result_aggregator_rejected() -> None:
    provenance = make_provenance(reliability={"score": 0.2, "verdict": "rejected"})
    with pytest.raises(ValueError, match="rejected"):
        build_manifest(vision_job(), provenance, environ={})


def test_build_manifest_requires_dp_provenance_for_a_dp_job() -> None:
    job = vision_job(
        privacy_level="dp+secure-agg",
        dp={"clipping_norm": 1.0, "noise_multiplier": 1.1, "delta": 1e-5},
    )
    with pytest.raises(ValueError, match=r"needs provenance\.dp"):
        build_manifest(job, make_provenance(), environ={})
    manifest = build_manifest(job, make_provenance(dp=DP, secagg=SECAGG), environ={})
    assert manifest.provenance.dp is not None
    assert manifest.provenance.dp.unit == "node"


def test_provenance_rejects_a_participant_count_per_round_mismatch() -> None:
    with pytest.raises(ValueError, match="one entry per round"):
        make_provenance(participants_per_round=[1, 2])


def test_provenance_rejects_a_secagg_threshold_above_the_neighbourhood() -> None:
    with pytest.raises(ValueError, match="threshold"):
        make_provenance(secagg={**SECAGG, "threshold": 9})


def test_provenance_load_rejects_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "provenance.json"
    path.write_text('{"run_id": "a", "run_id": "b"}')
    with pytest.raises(JSONFormatError, match="duplicate JSON key 'run_id'"):
        Provenance.load(path)


def test_manifest_rejects_a_training_config_hash_that_does_not_match() -> None:
    data = build_manifest(vision_job(), make_provenance(), environ={}).to_json_object()
    data["training_config_hash"] = "sha256:" + "0" * 64
    with pytest.raises(ValueError, match="training_config hashes to"):
        Manifest.model_validate(data)


def test_manifest_forbids_unknown_fields() -> None:
    data = build_manifest(vision_job(), make_provenance(), environ={}).to_json_object()
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        Manifest.model_validate({**data, "surprise": 1})


def test_manifest_canonical_bytes_are_rfc8785_and_round_trip() -> None:
    manifest = build_manifest(vision_job(), make_provenance(), environ={})
    raw = manifest.canonical_bytes()
    assert raw == canonical_json(json.loads(raw))
    assert Manifest.model_validate(loads_strict(raw)).canonical_bytes() == raw
    assert b"model_config" in raw


def test_loads_strict_rejects_nan_infinity_and_duplicates() -> None:
    for text in (b'{"a": NaN}', b'{"a": Infinity}', b'{"a": -Infinity}', b'{"a":1,"a":2}'):
        with pytest.raises(JSONFormatError):
            loads_strict(text)


def test_exported_schema_file_is_up_to_date() -> None:
    on_disk = json.loads(SCHEMA_PATH.read_text("utf-8"))
    assert on_disk == manifest_schema(), (
        "manifests/schema/artifact_manifest.schema.json is stale; regenerate it with "
        "python -m manifests.manifest"
    )


def test_schema_forbids_additional_properties_on_every_object_model() -> None:
    schema = manifest_schema()
    models = [schema, *schema["$defs"].values()]  # type: ignore[union-attr]
    for model in models:
        if isinstance(model, dict) and "properties" in model:
            assert model.get("additionalProperties") is False, model.get("title")
