"""The model-size estimate against the real models (clients.models builds them on `meta`)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from clients.models import build_model, spec_for_base_model
from manifests import modelsize
from manifests.jobspec import JobSpec, JobSpecError

CASES = [
    ("vit-base16", {"hidden_size": 32, "num_layers": 1, "input_size": 32, "embedding_dim": 32}),
    ("vit-base16", {}),
    ("wav2vec2-base", {"hidden_size": 32, "num_layers": 1, "embedding_dim": 32}),
    ("wav2vec2-base", {}),
    ("gpt-small-v1", {"hidden_size": 64, "num_layers": 2, "max_seq_length": 64}),
    ("gpt-small-v1", {}),
    ("sbert-all-mpnet", {"hidden_size": 64, "num_layers": 2, "max_seq_length": 64}),
    ("sbert-all-mpnet", {}),
]


@pytest.mark.parametrize(("base_model", "sizes"), CASES)
def test_estimate_is_within_ten_percent_of_the_built_model(
    base_model: str, sizes: dict[str, Any]
) -> None:
    with torch.device("meta"):
        model = build_model(spec_for_base_model(base_model, num_heads=2, **sizes))
    actual = sum(p.numel() for p in model.parameters())
    estimate = modelsize.estimate(base_model, **sizes)
    assert estimate is not None
    assert abs(estimate.parameters - actual) <= 0.1 * actual, (estimate.parameters, actual)


def test_sensing_jobs_have_no_model_to_estimate() -> None:
    assert modelsize.estimate("iot") is None
    assert modelsize.estimate("camera") is None


def test_per_example_gradients_multiply_memory_by_the_batch() -> None:
    plain = modelsize.estimate("vit-base16", batch_size=32)
    dp = modelsize.estimate("vit-base16", batch_size=32, per_example_gradients=True)
    assert plain is not None and dp is not None
    assert plain.training_bytes == plain.parameters * 16
    assert dp.training_bytes == dp.parameters * (4 + 32) * 4


def test_a_model_too_large_for_the_machine_is_refused_with_its_estimate() -> None:
    job = {"component": "vision", "base_model": "vit-base16", "task": "embed"}
    with pytest.raises(JobSpecError) as info:
        JobSpec.from_mapping({**job, "embedding_dim": 32, "hidden_size": 100_000_000})
    (problem,) = info.value.problems
    assert problem.startswith("hidden_size: the vit model would have about 1.44e+18 parameters")
    assert "parameters" in problem and "this machine has" in problem
    assert problem.endswith("Found 100000000.")


def test_the_memory_limit_can_be_lowered_for_small_machines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job = {"component": "vision", "base_model": "vit-base16", "task": "embed"}
    monkeypatch.setenv(modelsize.MEMORY_ENV, str(2**30))  # 1 GiB: ViT-base needs ~1.4 GB
    with pytest.raises(JobSpecError, match="hidden_size: the vit model would have about 86"):
        JobSpec.from_mapping({**job, "embedding_dim": 768})
    tiny = JobSpec.from_mapping({**job, "embedding_dim": 32, "hidden_size": 32, "num_layers": 1})
    assert tiny.hidden_size == 32
