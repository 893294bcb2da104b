"""LoRA and head-only adaptation: what trains, what travels, merged and adapter states, and
example-level DP-SGD through Opacus on adapted models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import DataLoader

from aggregation.dp_sgd import make_private
from clients.adaptation import (
    adapt,
    adaptation_of,
    adapter_state,
    get_trainable_weights,
    merged_state,
    set_trainable_weights,
    trainable_names,
)
from clients.data import PAD_ID
from clients.demo_data import demo_dataset
from clients.models import (
    LORA_TARGETS,
    Adaptation,
    ModelFamily,
    ModelSpec,
    WeightsError,
    build_model,
    get_weights,
    model_fingerprint,
    save_base,
    set_weights,
    weight_names,
)
from clients.training import make_optimizer, train_local
from tests.support.tiny_models import TINY

LORA_PER_LAYER = {ModelFamily.VIT: 6, ModelFamily.WAV2VEC2: 6, ModelFamily.MPNET: 6,
                  ModelFamily.GPT2: 4}  # fmt: skip
HEADS = ["projection.weight", "projection.bias", "classifier.weight", "classifier.bias"]


def _inputs(family: ModelFamily, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if family is ModelFamily.VIT:
        return torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    if family is ModelFamily.WAV2VEC2:
        return torch.randn(batch, 4000, generator=g) * 0.1
    ids = torch.randint(0, 256, (batch, 32), generator=g)
    ids[:, 20:] = PAD_ID
    return ids


def _outputs(model: nn.Module, family: ModelFamily, x: torch.Tensor | None = None) -> torch.Tensor:
    x = _inputs(family) if x is None else x
    if family is ModelFamily.GPT2:
        positions = torch.arange(x.shape[1]).expand_as(x)
        return model(input_ids=x, position_ids=positions).logits  # type: ignore[no-any-return]
    out = model(x)
    return torch.cat([out.embedding, out.logits], 1)


def _perturb(model: nn.Module, seed: int = 0) -> None:
    """Move every trainable tensor (LoRA B starts at zero: the adapters would be inert)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in trainable_names(model):
            p = model.get_parameter(name)
            p.add_(0.2 * torch.randn(p.shape, generator=g))


def _lora(family: ModelFamily, **kwargs: object) -> ModelSpec:
    return replace(TINY[family], adaptation=Adaptation.LORA, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", list(ModelFamily))
def test_lora_targets_every_attention_and_mlp_linear_of_each_layer(family: ModelFamily) -> None:
    model = build_model(_lora(family))
    names = trainable_names(model)
    adapters = [n for n in names if ".lora_" in n]
    assert len(adapters) == 2 * 2 * LORA_PER_LAYER[family]  # A and B, 2 layers
    assert all(any(f".{t}.lora_" in n for n in adapters) for t in LORA_TARGETS[family])
    heads = [n for n in names if ".lora_" not in n]
    assert heads == ([] if family is ModelFamily.GPT2 else HEADS)
    assert adaptation_of(model) is Adaptation.LORA
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not any(".lora_" in n for n in frozen)
    lora_count = sum(model.get_parameter(n).numel() for n in adapters)
    a_in = 32 * 8  # rank 8 over hidden 32 for a square projection's A
    assert lora_count > a_in


@pytest.mark.parametrize("family", list(ModelFamily))
def test_head_adaptation_trains_only_the_heads(family: ModelFamily) -> None:
    model = build_model(replace(TINY[family], adaptation=Adaptation.HEAD))
    expected = (
        ["transformer.wte.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
        if family is ModelFamily.GPT2
        else HEADS
    )
    assert trainable_names(model) == expected
    assert adaptation_of(model) is Adaptation.HEAD


def test_a_fresh_lora_model_computes_exactly_what_the_base_does() -> None:
    base = build_model(TINY[ModelFamily.VIT], seed=1).eval()
    adapted = build_model(_lora(ModelFamily.VIT), seed=1).eval()
    with torch.no_grad():
        assert torch.equal(_outputs(base, ModelFamily.VIT), _outputs(adapted, ModelFamily.VIT))


@pytest.mark.parametrize(
    ("family", "kind"),
    [(ModelFamily.VIT, Adaptation.LORA), (ModelFamily.VIT, Adaptation.HEAD),
     (ModelFamily.GPT2, Adaptation.LORA), (ModelFamily.GPT2, Adaptation.HEAD)],
)  # fmt: skip
def test_only_the_trainable_tensors_change_when_training(
    family: ModelFamily, kind: Adaptation
) -> None:
    model = build_model(replace(TINY[family], adaptation=kind))
    before = dict(zip(weight_names(model), get_weights(model), strict=True))
    if family is ModelFamily.GPT2:
        data = demo_dataset("lm", 20, np.random.default_rng(0), max_seq_length=32)
        task = "lm-finetune"
    else:
        data = demo_dataset("vision", 48, np.random.default_rng(0))
        task = "classification"
    train_local(model, DataLoader(data, batch_size=16), task=task, epochs=2, optimizer="adam",
                learning_rate=1e-2, generator=torch.Generator().manual_seed(0))  # fmt: skip
    after = dict(zip(weight_names(model), get_weights(model), strict=True))
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == set(trainable_names(model))


def test_trainable_weights_round_trip_and_misfits_change_nothing() -> None:
    source = build_model(_lora(ModelFamily.VIT), seed=1)
    _perturb(source)
    target = build_model(_lora(ModelFamily.VIT), seed=2)
    arrays = get_trainable_weights(source)
    assert len(arrays) == len(trainable_names(source))
    assert all(a.dtype == np.float32 for a in arrays)
    set_trainable_weights(target, arrays)
    assert all(
        np.array_equal(a, b) for a, b in zip(get_trainable_weights(target), arrays, strict=True)
    )
    before = get_weights(target)
    with pytest.raises(WeightsError, match="Expected 28 trainable weight arrays"):
        set_trainable_weights(target, arrays[:-1])
    wrong = [*arrays[:-1], np.zeros((3,), np.float32)]
    with pytest.raises(WeightsError, match=r"classifier\.bias: got shape \(3,\)"):
        set_trainable_weights(target, wrong)
    assert all(np.array_equal(a, b) for a, b in zip(before, get_weights(target), strict=True))


@pytest.mark.parametrize("family", list(ModelFamily))
def test_merged_state_computes_what_the_adapted_model_does(family: ModelFamily) -> None:
    adapted = build_model(_lora(family), seed=1)
    _perturb(adapted)
    state = merged_state(adapted)
    plain = build_model(TINY[family], seed=9)
    assert list(state) == weight_names(plain)
    set_weights(plain, list(state.values()))
    with torch.no_grad():
        expected = _outputs(adapted.eval(), family)
        assert torch.allclose(_outputs(plain.eval(), family), expected, atol=1e-5)
    assert merged_state(adapted).keys() == state.keys()  # the adapted model is unchanged


def test_adapter_state_with_the_base_rebuilds_the_model(tmp_path: Path) -> None:
    base = save_base(build_model(TINY[ModelFamily.VIT], seed=3), tmp_path / "base")
    spec = _lora(ModelFamily.VIT, checkpoint=base)
    trained = build_model(spec, seed=1)
    _perturb(trained)
    adapters = adapter_state(trained)
    assert list(adapters) == trainable_names(trained)
    assert not any(".base_layer." in n for n in adapters)
    rebuilt = build_model(spec, seed=7)
    set_trainable_weights(rebuilt, [adapters[n] for n in trainable_names(rebuilt)])
    with torch.no_grad():
        assert torch.equal(
            _outputs(rebuilt.eval(), ModelFamily.VIT), _outputs(trained.eval(), ModelFamily.VIT)
        )
    with pytest.raises(ValueError, match="no adapters"):
        adapter_state(build_model(TINY[ModelFamily.VIT]))


@pytest.mark.parametrize("family", [ModelFamily.VIT, ModelFamily.GPT2])
def test_opacus_per_sample_gradients_of_lora_layers_are_exact(family: ModelFamily) -> None:
    model = build_model(_lora(family, dropout=0.0), seed=1).train()  # same graph every pass
    _perturb(model)
    x = _inputs(family, batch=3)
    gsm = GradSampleModule(model, loss_reduction="sum")
    torch.autograd.backward(_outputs(gsm, family).square().sum())
    names = trainable_names(model)
    samples = {n: getattr(model.get_parameter(n), "grad_sample").clone() for n in names}  # noqa: B009
    gsm._close()
    for i in range(3):
        model.zero_grad()
        torch.autograd.backward(_outputs(model, family, x[i : i + 1]).square().sum())
        for n in names:
            grad = model.get_parameter(n).grad
            assert grad is not None
            assert torch.allclose(samples[n][i], grad, atol=1e-5, rtol=1e-4), n


@pytest.mark.parametrize(
    ("family", "kind"),
    [(ModelFamily.VIT, Adaptation.LORA), (ModelFamily.GPT2, Adaptation.LORA),
     (ModelFamily.VIT, Adaptation.HEAD)],
)  # fmt: skip
def test_dp_sgd_step_through_make_private_moves_only_the_trainable_tensors(
    family: ModelFamily, kind: Adaptation
) -> None:
    model = build_model(replace(TINY[family], adaptation=kind), seed=1)
    before = dict(zip(weight_names(model), get_weights(model), strict=True))
    if family is ModelFamily.GPT2:
        data = demo_dataset("lm", 24, np.random.default_rng(0), max_seq_length=32)
        task = "lm-finetune"
    else:
        data = demo_dataset("vision", 64, np.random.default_rng(0))
        task = "classification"
    loader = DataLoader(data, batch_size=16)
    optimizer = make_optimizer(model, "sgd", learning_rate=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable_names(model))
    private = make_private(model, optimizer, loader, noise_multiplier=0.5, max_grad_norm=1.0,
                           noise_generator=torch.Generator().manual_seed(0))  # fmt: skip
    result = train_local(private.module, loader, task=task, epochs=1, optimizer="sgd",
                         learning_rate=0.1, generator=torch.Generator().manual_seed(0),
                         dp=private)  # fmt: skip
    assert result.steps >= 1 and np.isfinite(result.mean_loss)
    assert sum(e.steps for e in private.events()) == len(loader)
    after = dict(zip(weight_names(model), get_weights(model), strict=True))
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed == set(trainable_names(model))  # noise reaches every trainable tensor


def test_fingerprint_covers_the_adaptation() -> None:
    spec = TINY[ModelFamily.VIT]
    prints = {
        model_fingerprint(s)
        for s in (
            spec,
            replace(spec, adaptation=Adaptation.HEAD),
            replace(spec, adaptation=Adaptation.LORA),
            replace(spec, adaptation=Adaptation.LORA, lora_rank=4),
            replace(spec, adaptation=Adaptation.LORA, lora_alpha=8),
            replace(spec, adaptation=Adaptation.LORA, lora_targets=("q_proj", "v_proj")),
        )
    }
    assert len(prints) == 6
    assert model_fingerprint(replace(spec, adaptation=Adaptation.FULL)) == model_fingerprint(spec)


def test_explicit_targets_and_bad_adaptations_are_refused_with_the_reason() -> None:
    model = build_model(_lora(ModelFamily.VIT, lora_targets=("q_proj", "v_proj")))
    assert len([n for n in trainable_names(model) if ".lora_" in n]) == 2 * 2 * 2
    with pytest.raises(ValueError, match=r"match no linear layer.*end in: .*q_proj"):
        adapt(build_model(TINY[ModelFamily.VIT]), "lora", target_modules=["query"])
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        adapt(model, "lora")
    with pytest.raises(ValueError, match="`adaptation` must be one of full, lora, head"):
        adapt(build_model(TINY[ModelFamily.VIT]), "prefix")
    with pytest.raises(ValueError, match="before `make_private`"):
        adapt(GradSampleModule(build_model(TINY[ModelFamily.VIT])), "head")
    with pytest.raises(ValueError, match="`lora_rank` must be a positive integer"):
        replace(TINY[ModelFamily.VIT], lora_rank=0)
    with pytest.raises(TypeError, match=r"needs a model from clients\.models\.build_model"):
        adapt(nn.Linear(2, 2), "head")
