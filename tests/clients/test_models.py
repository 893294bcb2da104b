"""Model builders: overrides, full-size configs, weights, fingerprints, checkpoints, Opacus."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from transformers import GPT2LMHeadModel
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

from aggregation.dp_sgd import model_problems
from clients.data import BYTE_VOCAB_SIZE, PAD_ID
from clients.models import (
    CheckpointError,
    EncoderModel,
    ModelFamily,
    ModelSpec,
    WeightsError,
    build_model,
    family_for_base_model,
    get_weights,
    load_checkpoint,
    model_config,
    model_fingerprint,
    save_checkpoint,
    set_weights,
    spec_for_base_model,
    weight_names,
)
from tests.support.tiny_models import TINY


def _inputs(family: ModelFamily, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if family is ModelFamily.VIT:
        return torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    if family is ModelFamily.WAV2VEC2:
        return torch.randn(batch, 4000, generator=g) * 0.1
    ids = torch.randint(0, 256, (batch, 32), generator=g)
    ids[:, 20:] = PAD_ID
    return ids


def _forward(model: torch.nn.Module, family: ModelFamily, x: torch.Tensor) -> torch.Tensor:
    if family is ModelFamily.GPT2:
        return model(input_ids=x).logits  # type: ignore[no-any-return]
    return model(x).embedding  # type: ignore[no-any-return]


@pytest.mark.parametrize("family", list(ModelFamily))
def test_tiny_model_output_shapes_follow_the_overrides(family: ModelFamily) -> None:
    model = build_model(TINY[family]).eval()
    x = _inputs(family)
    with torch.no_grad():
        if family is ModelFamily.GPT2:
            assert isinstance(model, GPT2LMHeadModel)
            assert model(input_ids=x).logits.shape == (3, 32, BYTE_VOCAB_SIZE)
        else:
            out = model(x)
            assert out.embedding.shape == (3, 16)
            assert out.logits is not None and out.logits.shape[0] == 3


def test_vit_config_overrides_take_effect() -> None:
    config = model_config(TINY[ModelFamily.VIT])
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 2, 2)
    assert (config.image_size, config.patch_size, config.intermediate_size) == (32, 8, 128)
    model = build_model(TINY[ModelFamily.VIT])
    assert isinstance(model, EncoderModel)
    assert model.projection.out_features == 16
    assert len(cast(torch.nn.ModuleList, model.backbone.layers)) == 2


def test_full_size_defaults_are_the_base_configs() -> None:
    vit = model_config(ModelSpec(ModelFamily.VIT))
    assert (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads) == (768, 12, 12)
    assert (vit.image_size, vit.patch_size, vit.intermediate_size) == (224, 16, 3072)
    w2v = model_config(ModelSpec(ModelFamily.WAV2VEC2))
    assert (w2v.hidden_size, w2v.num_hidden_layers, tuple(w2v.conv_dim)) == (768, 12, (512,) * 7)
    assert w2v.mask_time_prob == 0.0 and w2v.layerdrop == 0.0
    mpnet = model_config(ModelSpec(ModelFamily.MPNET))
    assert (mpnet.hidden_size, mpnet.num_hidden_layers, mpnet.max_position_embeddings) == (
        768, 12, 514,
    )  # fmt: skip
    gpt = model_config(ModelSpec(ModelFamily.GPT2))
    assert (gpt.n_embd, gpt.n_layer, gpt.n_head, gpt.n_positions) == (768, 12, 12, 1024)


def test_full_size_vit_builds_on_the_meta_device_without_allocating() -> None:
    with torch.device("meta"):
        model = build_model(ModelSpec(ModelFamily.VIT, embedding_dim=768))
    params = sum(p.numel() for p in model.parameters())
    assert next(model.parameters()).device.type == "meta"
    assert params == 85_798_656 + 768 * 768 + 768  # ViT-B/16 backbone + projection


def test_spec_validation_reports_every_problem() -> None:
    with pytest.raises(ValueError, match="num_layers") as info:
        ModelSpec(ModelFamily.VIT, num_layers=0, dropout=1.5)
    assert "dropout" in str(info.value)
    with pytest.raises(ValueError, match="multiple of `num_heads`"):
        ModelSpec(ModelFamily.VIT, hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of `patch_size`"):
        ModelSpec(ModelFamily.VIT, input_size=30, patch_size=8)
    with pytest.raises(ValueError, match="language model"):
        ModelSpec(ModelFamily.GPT2, embedding_dim=8)


def test_catalog_base_models_map_to_families() -> None:
    assert family_for_base_model("vit-base16") is ModelFamily.VIT
    assert family_for_base_model("wav2vec2-base") is ModelFamily.WAV2VEC2
    assert family_for_base_model("sbert-all-mpnet") is ModelFamily.MPNET
    assert family_for_base_model("mpnet-base") is ModelFamily.MPNET
    assert family_for_base_model("gpt-small-v1") is ModelFamily.GPT2
    with pytest.raises(ValueError, match="No model builder for base model 'resnet50'"):
        family_for_base_model("resnet50")
    spec = spec_for_base_model("vit-base16", hidden_size=64, num_heads=4, embedding_dim=32)
    assert spec.family is ModelFamily.VIT and spec.resolved_num_layers == 12


@pytest.mark.parametrize("family", list(ModelFamily))
def test_weights_round_trip_into_a_differently_seeded_model(family: ModelFamily) -> None:
    source = build_model(TINY[family], seed=1).eval()
    target = build_model(TINY[family], seed=2).eval()
    arrays = get_weights(source)
    assert all(a.dtype == np.float32 for a in arrays)
    set_weights(target, arrays)
    x = _inputs(family)
    with torch.no_grad():
        assert torch.equal(_forward(source, family, x), _forward(target, family, x))


def test_tied_gpt2_embeddings_are_sent_once() -> None:
    model = build_model(TINY[ModelFamily.GPT2])
    names = weight_names(model)
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    assert len(get_weights(model)) == len(names)


def test_set_weights_rejects_wrong_count_and_shape_without_changing_the_model() -> None:
    model = build_model(TINY[ModelFamily.VIT])
    before = get_weights(model)
    with pytest.raises(WeightsError, match=f"Expected {len(before)} weight arrays"):
        set_weights(model, before[:-1])
    bad = [np.zeros_like(a) for a in before]
    bad[0] = np.zeros((1, 2), np.float32)
    with pytest.raises(WeightsError, match=r"model expects \(1, 1, 32\)"):
        set_weights(model, bad)
    after = get_weights(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_fingerprint_is_stable_and_changes_with_any_config_field() -> None:
    spec = TINY[ModelFamily.VIT]
    assert model_fingerprint(spec) == model_fingerprint(replace(spec))
    assert model_fingerprint(spec).startswith("sha256:")
    variants = [
        replace(spec, hidden_size=64),
        replace(spec, num_layers=3),
        replace(spec, embedding_dim=8),
        replace(spec, num_classes=5),
        replace(spec, patch_size=4),
        replace(spec, dropout=0.1),
    ]
    prints = {model_fingerprint(v) for v in variants} | {model_fingerprint(spec)}
    assert len(prints) == len(variants) + 1
    with_ckpt = replace(spec, checkpoint=Path("/nowhere.safetensors"))
    assert model_fingerprint(with_ckpt) == model_fingerprint(spec)


def test_checkpoint_round_trip_and_strict_shape_errors(tmp_path: Path) -> None:
    source = build_model(TINY[ModelFamily.GPT2], seed=3)
    path = tmp_path / "model.safetensors"
    save_checkpoint(source, path)
    spec = replace(TINY[ModelFamily.GPT2], checkpoint=path)
    loaded = build_model(spec, seed=4)
    for a, b in zip(get_weights(source), get_weights(loaded), strict=True):
        np.testing.assert_array_equal(a, b)

    bigger = build_model(ModelSpec(ModelFamily.GPT2, hidden_size=64, num_layers=2, num_heads=2,
                                   max_seq_length=32))  # fmt: skip
    before = get_weights(bigger)
    with pytest.raises(CheckpointError, match=(
        r"checkpoint tensor transformer.wte.weight has shape \(260, 32\), model expects "
        r"\(260, 64\)")):  # fmt: skip
        load_checkpoint(bigger, path)
    assert all(np.array_equal(a, b) for a, b in zip(before, get_weights(bigger), strict=True))
    deeper = build_model(ModelSpec(ModelFamily.GPT2, hidden_size=32, num_layers=3, num_heads=2,
                                   max_seq_length=32))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"missing tensor transformer.h.2.ln_1.weight"):
        load_checkpoint(deeper, path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(source, tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(source, tmp_path / "absent.safetensors")


@pytest.mark.parametrize("family", list(ModelFamily))
def test_every_family_is_opacus_compatible_with_per_sample_gradients(
    family: ModelFamily,
) -> None:
    model = build_model(TINY[family]).train()
    assert ModuleValidator.validate(model, strict=False) == []
    gsm = GradSampleModule(model)
    x = _inputs(family, batch=2)
    if family is ModelFamily.GPT2:
        positions = torch.arange(x.shape[1]).expand_as(x)
        loss = gsm(input_ids=x, position_ids=positions).logits.square().mean()
    else:
        out = gsm(x)
        loss = out.embedding.square().mean() + out.logits.square().mean()
    torch.autograd.backward(loss)
    missing = [n for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is None]
    assert missing == []
    wrong = [
        name
        for name, p in model.named_parameters()
        if tuple(getattr(p, "grad_sample").shape) != (2, *p.shape)  # noqa: B009
    ]
    assert wrong == []  # batch dimension first for every parameter
    gsm._close()


def test_batched_mpnet_position_bias_equals_the_library_computation() -> None:
    model = build_model(TINY[ModelFamily.MPNET])
    assert isinstance(model, EncoderModel)
    encoder = model.backbone.encoder
    assert isinstance(encoder, MPNetEncoder)
    hidden = torch.randn(3, 7, 32)
    library = cast(Callable[..., torch.Tensor], MPNetEncoder.compute_position_bias)
    patched = cast(Callable[..., torch.Tensor], encoder.compute_position_bias)
    assert torch.equal(patched(hidden), library(encoder, hidden))


def test_dp_sgd_helper_accepts_every_family() -> None:
    for family in ModelFamily:
        assert model_problems(build_model(TINY[family]).train()) == []
