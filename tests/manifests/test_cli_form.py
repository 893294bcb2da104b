"""`fedbrain catalog` and `fedbrain job resolve` through the root app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from manifests.confighash import training_config_hash
from server.cli import app

runner = CliRunner()
VISION_FLAGS = [
    "--component", "vision", "--base-model", "vit-base16", "--task", "embed",
    "--embedding-dim", "768", "--precision", "fp16", "--batch-size", "256", "--epochs", "10",
]  # fmt: skip


def _resolve(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    result = runner.invoke(app, ["job", "resolve", *args], env=env)
    assert result.exit_code == 0, result.output
    loaded: dict[str, object] = json.loads(result.stdout)
    return loaded


def test_catalog_json_lists_every_artifact_with_its_trainable_flag() -> None:
    result = runner.invoke(app, ["catalog", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert len(rows) == 26
    flags = {row["id"]: row["trainable"] for row in rows}
    assert flags["vit-base16-embed-v1"] is True
    assert flags["gpt-medium-v1"] is False
    assert sum(flags.values()) == 7


def test_catalog_prints_a_table_with_every_id() -> None:
    result = runner.invoke(app, ["catalog"])
    assert result.exit_code == 0
    for artifact_id in ("sensing-iot-normalizer-v1", "monitoring-stack-v1", "gpt-small-v1"):
        assert artifact_id in result.stdout


def test_job_resolve_spec_vision_example_from_flags() -> None:
    resolved = _resolve(*VISION_FLAGS)
    assert resolved["artifact_name"] == "vision-vit-base16-embed-v1"
    assert resolved["base_model"] == "vit-base16"
    assert resolved["embedding_dim"] == 768
    assert resolved["precision"] == "fp16"
    assert resolved["quantized"] is False
    assert resolved["training_config_hash"] == training_config_hash(resolved["training_config"])  # type: ignore[arg-type]


def test_job_resolve_spec_gpt_example_from_flags_with_quantize() -> None:
    resolved = _resolve(
        "--component", "inference", "--base-model", "gpt-small-v1", "--task", "lm-finetune",
        "--max-seq-length", "1024", "--learning-rate", "2e-5", "--epochs", "3", "--quantize",
    )  # fmt: skip
    assert resolved["artifact_name"] == "gpt-small-v1-lm-finetune-int8-v1"
    assert (resolved["quantized"], resolved["precision"]) == (True, "int8")
    assert resolved["input_spec"] == {"max_seq_length": 1024}


def _gpt_toml(tmp_path: Path) -> Path:
    path = tmp_path / "gpt.toml"
    path.write_text(
        'component = "inference"\nbase_model = "gpt-small-v1"\ntask = "lm-finetune"\n'
        'max_seq_length = 1024\nlearning_rate = 2e-5\nepochs = 3\nquantize = "int8"\n',
        encoding="utf-8",
    )
    return path


def test_job_resolve_spec_gpt_example_from_a_toml_file(tmp_path: Path) -> None:
    resolved = _resolve("--job", str(_gpt_toml(tmp_path)))
    assert resolved["artifact_name"] == "gpt-small-v1-lm-finetune-int8-v1"
    assert (resolved["quantized"], resolved["precision"]) == (True, "int8")
    flags = _resolve(
        "--component", "inference", "--base-model", "gpt-small-v1", "--task", "lm-finetune",
        "--max-seq-length", "1024", "--learning-rate", "2e-5", "--epochs", "3", "--quantize",
    )  # fmt: skip
    assert resolved == flags


def test_job_resolve_flags_override_file_values(tmp_path: Path) -> None:
    resolved = _resolve("--job", str(_gpt_toml(tmp_path)), "--epochs", "5", "--model-version", "2")
    assert resolved["training_config"]["epochs"] == 5  # type: ignore[index]
    assert resolved["artifact_name"] == "gpt-small-v1-lm-finetune-int8-v2"


def test_job_resolve_federation_flags_reach_the_job() -> None:
    resolved = _resolve(
        *VISION_FLAGS, "--privacy-level", "dp", "--clipping-norm", "1.0",
        "--noise-multiplier", "1.1", "--delta", "1e-5", "--num-rounds", "7",
    )  # fmt: skip
    assert resolved["privacy_level"] == "dp"
    assert resolved["dp"]["noise_multiplier"] == 1.1  # type: ignore[index]
    assert resolved["federation"]["num_rounds"] == 7  # type: ignore[index]


def test_job_resolve_generated_name_uses_source_date_epoch() -> None:
    resolved = _resolve(
        *VISION_FLAGS, "--artifact-naming", "run", "--run-name", "ci",
        env={"SOURCE_DATE_EPOCH": "1766318400"},
    )  # fmt: skip
    assert resolved["artifact_name"] == "encoder.vision.vit-base16-embed-v1.ci.20251221T120000Z"


def test_job_resolve_invalid_input_exits_2_with_every_problem_on_stderr() -> None:
    result = runner.invoke(
        app,
        ["job", "resolve", *VISION_FLAGS, "--batch-size", "0", "--optimizer", "lion",
         "--privacy-level", "secure-agg", "--robust-aggregation", "krum"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "batch_size: must be >= 1. Found 0." in result.stderr
    assert "optimizer: must be one of" in result.stderr
    assert "federation.robust_aggregation:" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("base_model", ["resnet50", "hubert-large"])
def test_job_resolve_non_trainable_artifact_exits_2_listing_trainable_ones(base_model: str) -> None:
    component = "audio" if base_model == "hubert-large" else "vision"
    result = runner.invoke(
        app, ["job", "resolve", "--component", component, "--base-model", base_model,
              "--task", "embed", "--embedding-dim", "512"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "is not trainable by fedbrain yet; trainable artifacts:" in result.stderr


def test_job_resolve_unreadable_file_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["job", "resolve", "--job", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2
    assert "cannot read" in result.stderr


def test_job_resolve_invalid_source_date_epoch_exits_2() -> None:
    result = runner.invoke(
        app, ["job", "resolve", *VISION_FLAGS], env={"SOURCE_DATE_EPOCH": "yesterday"}
    )
    assert result.exit_code == 2
    assert "SOURCE_DATE_EPOCH" in result.stderr
