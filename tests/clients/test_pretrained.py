"""Pretrained bases: Hugging Face folders load into every family, their digest names their
content, a folder that does not fit the spec is refused with the reason, and the demo bases
are generated deterministically and cached."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

from clients.checkpoints import HEADS_FILE, CheckpointError, checkpoint_digest
from clients.data import PAD_ID
from clients.demo_data import demo_dataset
from clients.models import (
    EncoderModel,
    ModelFamily,
    build_model,
    get_weights,
    model_config,
    model_fingerprint,
    save_base,
)
from clients.pretrain import (
    BASE_MARKER,
    DEMO_BASES,
    PretrainRecipe,
    pretrained_base,
    public_data,
)
from tests.support.tiny_models import TINY

TINY_RECIPE = PretrainRecipe(examples=24, epochs=1, batch_size=12, learning_rate=1e-3)


def _inputs(family: ModelFamily, batch: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if family is ModelFamily.VIT:
        return torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    if family is ModelFamily.WAV2VEC2:
        return torch.randn(batch, 4000, generator=g) * 0.1
    ids = torch.randint(0, 256, (batch, 32), generator=g)
    ids[:, 20:] = PAD_ID
    return ids


@torch.no_grad()
def _outputs(model: torch.nn.Module, family: ModelFamily) -> torch.Tensor:
    model.eval()
    x = _inputs(family)
    if family is ModelFamily.GPT2:
        return model(input_ids=x).logits  # type: ignore[no-any-return]
    return model(x).embedding  # type: ignore[no-any-return]


def _saved(tmp_path: Path, family: ModelFamily, seed: int = 3, name: str = "base") -> Path:
    return save_base(build_model(TINY[family], seed=seed), tmp_path / name)


@pytest.mark.parametrize("family", list(ModelFamily))
def test_a_saved_base_builds_the_same_model_with_fresh_heads(
    family: ModelFamily, tmp_path: Path
) -> None:
    source = build_model(TINY[family], seed=3)
    folder = save_base(source, tmp_path / "base")
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    loaded = build_model(replace(TINY[family], checkpoint=folder), seed=5)
    assert torch.equal(_outputs(source, family), _outputs(loaded, family))  # projection too
    again = build_model(replace(TINY[family], checkpoint=folder), seed=5)
    assert all(
        np.array_equal(a, b) for a, b in zip(get_weights(loaded), get_weights(again), strict=True)
    )
    if isinstance(source, EncoderModel):
        assert isinstance(loaded, EncoderModel) and loaded.classifier is not None
        assert source.classifier is not None
        assert not torch.equal(loaded.classifier.weight, source.classifier.weight)  # fresh


@pytest.mark.parametrize("family", list(ModelFamily))
def test_a_model_built_on_a_base_is_in_training_mode_like_a_fresh_one(
    family: ModelFamily, tmp_path: Path
) -> None:
    # from_pretrained returns eval mode: dropout would be off and Opacus refuses to train it.
    folder = _saved(tmp_path, family)
    for spec in (TINY[family], replace(TINY[family], checkpoint=folder)):
        model = build_model(spec)
        assert all(module.training for module in model.modules())


def test_a_saved_classifier_is_loaded_when_the_folder_holds_it(tmp_path: Path) -> None:
    source = build_model(TINY[ModelFamily.VIT], seed=3)
    folder = save_base(source, tmp_path / "base", classifier=True)
    loaded = build_model(replace(TINY[ModelFamily.VIT], checkpoint=folder), seed=5)
    assert isinstance(source, EncoderModel) and isinstance(loaded, EncoderModel)
    assert source.classifier is not None and loaded.classifier is not None
    assert torch.equal(loaded.classifier.weight, source.classifier.weight)


def test_plain_hugging_face_folders_load_with_or_without_the_task_prefix(tmp_path: Path) -> None:
    vit_spec = TINY[ModelFamily.VIT]
    task_model = ViTForImageClassification(cast(ViTConfig, model_config(vit_spec)))
    task_model.save_pretrained(tmp_path / "vit")  # tensors under "vit.", plus a classifier
    vit = build_model(replace(vit_spec, checkpoint=tmp_path / "vit"))
    assert isinstance(vit, EncoderModel)
    loaded = dict(vit.backbone.named_parameters())
    saved = dict(task_model.vit.named_parameters())
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[n], saved[n]) for n in saved)
    gpt_spec = TINY[ModelFamily.GPT2]
    bare = GPT2Model(cast(GPT2Config, model_config(gpt_spec)))
    bare.save_pretrained(tmp_path / "gpt")  # no "transformer." prefix, no LM head
    lm = build_model(replace(gpt_spec, checkpoint=tmp_path / "gpt"))
    assert isinstance(lm, GPT2LMHeadModel)
    assert torch.equal(lm.transformer.wte.weight, bare.wte.weight)
    assert lm.lm_head.weight is lm.transformer.wte.weight


def test_digest_is_stable_across_resaves_and_shardings(tmp_path: Path) -> None:
    folder = _saved(tmp_path, ModelFamily.GPT2)
    digest = checkpoint_digest(folder)
    assert digest.startswith("sha256:") and len(digest) == len("sha256:") + 64
    resaved = save_base(
        build_model(replace(TINY[ModelFamily.GPT2], checkpoint=folder)), tmp_path / "again"
    )
    assert checkpoint_digest(resaved) == digest
    lm = build_model(replace(TINY[ModelFamily.GPT2], checkpoint=folder))
    assert isinstance(lm, PreTrainedModel)
    lm.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert checkpoint_digest(tmp_path / "sharded") == digest
    config = json.loads((resaved / "config.json").read_text())
    config["transformers_version"] = "0.0.1"  # library bookkeeping is not content
    (resaved / "config.json").write_text(json.dumps(config, indent=4))
    assert checkpoint_digest(resaved) == digest


def test_digest_changes_with_any_weight_head_or_config_value(tmp_path: Path) -> None:
    folder = _saved(tmp_path, ModelFamily.VIT)
    digest = checkpoint_digest(folder)
    assert checkpoint_digest(_saved(tmp_path, ModelFamily.VIT, seed=4, name="other")) != digest
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    tensors = load_file(str(copy / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    assert checkpoint_digest(copy) != digest
    heads = Path(shutil.copytree(folder, tmp_path / "heads"))
    (heads / HEADS_FILE).unlink()
    assert checkpoint_digest(heads) != digest
    config_copy = Path(shutil.copytree(folder, tmp_path / "config"))
    config = json.loads((config_copy / "config.json").read_text())
    config["layer_norm_eps"] = 1e-5
    (config_copy / "config.json").write_text(json.dumps(config))
    assert checkpoint_digest(config_copy) != digest


def test_fingerprint_carries_the_base_digest_not_its_path(tmp_path: Path) -> None:
    spec = TINY[ModelFamily.VIT]
    folder = _saved(tmp_path, ModelFamily.VIT)
    copy = shutil.copytree(folder, tmp_path / "elsewhere")
    other = _saved(tmp_path, ModelFamily.VIT, seed=4, name="other")
    with_base = model_fingerprint(replace(spec, checkpoint=folder))
    assert with_base != model_fingerprint(spec)
    assert model_fingerprint(replace(spec, checkpoint=copy)) == with_base
    assert model_fingerprint(replace(spec, checkpoint=other)) != with_base
    with pytest.raises(CheckpointError, match="does not exist"):
        model_fingerprint(replace(spec, checkpoint=tmp_path / "missing"))


def test_a_base_of_another_family_is_refused_with_the_reason(tmp_path: Path) -> None:
    folder = _saved(tmp_path, ModelFamily.GPT2)
    with pytest.raises(CheckpointError, match="is a 'gpt2' model; the spec builds a 'vit' model"):
        build_model(replace(TINY[ModelFamily.VIT], checkpoint=folder))


def test_a_base_of_other_sizes_is_refused_naming_every_difference(tmp_path: Path) -> None:
    folder = _saved(tmp_path, ModelFamily.VIT)
    bigger = replace(TINY[ModelFamily.VIT], hidden_size=64, num_layers=3, checkpoint=folder)
    with pytest.raises(CheckpointError) as info:
        build_model(bigger)
    message = str(info.value)
    assert "hidden_size is 32 in the checkpoint, the spec wants 64" in message
    assert "num_hidden_layers is 2 in the checkpoint, the spec wants 3" in message
    other_heads = replace(TINY[ModelFamily.VIT], embedding_dim=8, checkpoint=folder)
    with pytest.raises(CheckpointError, match=r"head tensor projection.weight has shape"):
        build_model(other_heads)


def test_pickled_or_incomplete_folders_are_refused(tmp_path: Path) -> None:
    folder = _saved(tmp_path, ModelFamily.VIT)
    pickled = Path(shutil.copytree(folder, tmp_path / "pickled"))
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    spec = TINY[ModelFamily.VIT]
    with pytest.raises(CheckpointError, match="pickled weights"):
        build_model(replace(spec, checkpoint=pickled))
    partial = Path(shutil.copytree(folder, tmp_path / "partial"))
    tensors = load_file(str(partial / "model.safetensors"))
    del tensors["embeddings.cls_token"]
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor embeddings\.cls_token"):
        build_model(replace(spec, checkpoint=partial))
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        build_model(replace(spec, checkpoint=tmp_path))


@pytest.mark.parametrize("family", list(ModelFamily))
def test_demo_bases_are_deterministic_per_seed(family: ModelFamily, tmp_path: Path) -> None:
    first = pretrained_base(family, tmp_path / "a", seed=0, recipe=TINY_RECIPE)
    second = pretrained_base(family, tmp_path / "b", seed=0, recipe=TINY_RECIPE)
    other = pretrained_base(family, tmp_path / "c", seed=1, recipe=TINY_RECIPE)
    assert checkpoint_digest(first) == checkpoint_digest(second) != checkpoint_digest(other)
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    marker = json.loads((first / BASE_MARKER).read_text())
    assert marker["digest"] == checkpoint_digest(first) and marker["seed"] == 0
    model = build_model(replace(DEMO_BASES[family], checkpoint=first))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert [p.name for p in tmp_path.iterdir()] != [] and not any(
        p.name.startswith(".") for p in tmp_path.iterdir()
    )  # no staging folder left behind


def test_an_existing_base_is_only_verified_and_a_wrong_one_refused(tmp_path: Path) -> None:
    folder = pretrained_base(ModelFamily.VIT, tmp_path / "vit", seed=0, recipe=TINY_RECIPE)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert pretrained_base(ModelFamily.VIT, folder, seed=0, recipe=TINY_RECIPE) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp  # not regenerated
    with pytest.raises(CheckpointError, match="holds another base"):
        pretrained_base(ModelFamily.VIT, folder, seed=1, recipe=TINY_RECIPE)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["embeddings.cls_token"] = tensors["embeddings.cls_token"] + 1
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="was modified"):
        pretrained_base(ModelFamily.VIT, folder, seed=0, recipe=TINY_RECIPE)
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a generated demo base"):
        pretrained_base(ModelFamily.VIT, tmp_path / "stranger", seed=0, recipe=TINY_RECIPE)
    assert (tmp_path / "stranger" / "notes.txt").read_text() == "mine"


def test_public_pretraining_data_differ_from_node_data_of_the_same_seed() -> None:
    public = public_data(ModelFamily.VIT, 8, seed=0)
    node = demo_dataset("vision", 8, np.random.default_rng(0))
    assert not torch.equal(public[0][0], node[0][0])
    audio = public_data(ModelFamily.WAV2VEC2, 2, seed=0)
    assert audio[0][0].shape == (16_000,)  # 0.5 s clips padded to the encoder's 1 s
