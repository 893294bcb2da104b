"""Model builders: encoders (ViT, wav2vec2, MPNet) and the GPT-2 language model.

Models are built from ``transformers`` *config classes* (random initialisation) or from a local
pretrained checkpoint (a Hugging Face folder, :mod:`clients.checkpoints`); nothing is
downloaded. A :class:`ModelSpec` starts from the real base configuration of its family
(ViT-B/16, wav2vec2-base, mpnet-base, GPT-2 small) and the learning form's ``hidden_size`` /
``num_layers`` / ``num_heads`` / ``embedding_dim`` / input spec override it, so the same code
builds a tiny model for tests and the full-size one. A checkpoint must agree with those sizes.

What is trained is the spec's :class:`Adaptation`: every weight, LoRA adapters (``peft``) plus
the heads, or the heads alone (:mod:`clients.adaptation`: only the trainable tensors travel).

Text models use the byte-level vocabulary of :mod:`clients.data` (260 ids), not a downloaded
tokenizer. Encoders return an :class:`EncoderOutput`: the mean-pooled last hidden state through a
linear projection to ``embedding_dim``, plus classifier logits when ``num_classes`` is set.

Opacus (example-level DP-SGD): every family passes ``ModuleValidator.validate`` unchanged (no
BatchNorm; wav2vec2's feature extractor uses GroupNorm, which Opacus supports), so
``ModuleValidator.fix`` is not needed. Per-sample gradients need more care, and the builder
takes it: wav2vec2's SpecAugment masking (numpy RNG) and LayerDrop (skipped layers get no
per-sample gradient) are off; MPNet's relative-attention bias is looked up per example (see
:func:`_batch_relative_position_bias`). GPT-2 looks its position embeddings up with a batch
dimension of 1 unless ``position_ids`` of shape ``(B, L)`` are passed -- the training loop
always passes them.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MPNetConfig,
    MPNetModel,
    PretrainedConfig,
    PreTrainedModel,
    ViTConfig,
    ViTModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
)
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

from clients.checkpoints import (
    VOLATILE_CONFIG_KEYS,
    CheckpointError,
    checkpoint_digest,
    load_heads,
    load_pretrained,
    quiet_transformers,
    save_heads,
)
from clients.data import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID
from manifests.confighash import JsonValue, canonical_json
from manifests.jobspec import Adaptation

__all__ = [
    "BASE_MODEL_FAMILIES",
    "LORA_TARGETS",
    "Adaptation",
    "CheckpointError",
    "EncoderModel",
    "EncoderOutput",
    "ModelFamily",
    "ModelSpec",
    "WeightsError",
    "build_model",
    "copy_into",
    "family_for_base_model",
    "get_weights",
    "load_checkpoint",
    "model_config",
    "model_fingerprint",
    "save_base",
    "save_checkpoint",
    "set_weights",
    "spec_for_base_model",
    "unwrap",
    "weight_names",
]


class ModelFamily(StrEnum):
    """The model architectures fedbrain trains."""

    VIT = "vit"
    WAV2VEC2 = "wav2vec2"
    MPNET = "mpnet"
    GPT2 = "gpt2"

    @property
    def is_encoder(self) -> bool:
        """Whether the family is an embedding encoder (else: a language model)."""
        return self is not ModelFamily.GPT2


BASE_MODEL_FAMILIES: dict[str, ModelFamily] = {
    "vit-base16": ModelFamily.VIT,
    "vit-base16-embed-v1": ModelFamily.VIT,
    "wav2vec2-base": ModelFamily.WAV2VEC2,
    "wav2vec2-base-embed-v1": ModelFamily.WAV2VEC2,
    "sbert-all-mpnet": ModelFamily.MPNET,
    "sbert-all-mpnet-v1": ModelFamily.MPNET,
    "all-mpnet-base-v2": ModelFamily.MPNET,
    "mpnet-base": ModelFamily.MPNET,
    "gpt-small": ModelFamily.GPT2,
    "gpt-small-v1": ModelFamily.GPT2,
}
"""Catalog base models and artifact ids -> the family that builds them."""


@dataclass(frozen=True, slots=True)
class _Base:
    hidden_size: int
    num_layers: int
    num_heads: int
    input_size: int = 224
    patch_size: int = 16
    sample_rate: int = 16_000
    max_seq_length: int = 512


_BASES: dict[ModelFamily, _Base] = {
    ModelFamily.VIT: _Base(768, 12, 12),  # google/vit-base-patch16-224
    ModelFamily.WAV2VEC2: _Base(768, 12, 12),  # facebook/wav2vec2-base
    ModelFamily.MPNET: _Base(768, 12, 12, max_seq_length=512),  # microsoft/mpnet-base
    ModelFamily.GPT2: _Base(768, 12, 12, max_seq_length=1024),  # gpt2 (small)
}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What to build: a family's base config with the learning form's overrides.

    ``None`` keeps the base value. ``intermediate_size`` defaults to ``4 * hidden_size``,
    ``embedding_dim`` to ``hidden_size`` (encoders only), ``dropout`` (all dropout
    probabilities) to the base config's. ``num_classes`` adds a classifier over the embedding.

    ``checkpoint``: a local pretrained base, a Hugging Face folder (``config.json`` +
    safetensors, see :func:`build_model`), or a single safetensors file of the whole model
    (:func:`save_checkpoint`). ``adaptation`` with ``lora_rank`` / ``lora_alpha`` /
    ``lora_targets`` (module-name suffixes; ``None``: :data:`LORA_TARGETS` of the family) says
    what fine-tuning trains (``clients.adaptation``).
    """

    family: ModelFamily
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    intermediate_size: int | None = None
    embedding_dim: int | None = None
    num_classes: int | None = None
    input_size: int | None = None
    patch_size: int | None = None
    sample_rate: int | None = None
    max_seq_length: int | None = None
    dropout: float | None = None
    checkpoint: Path | None = field(default=None, compare=False)
    adaptation: Adaptation = Adaptation.FULL
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "family", ModelFamily(self.family))
        problems: list[str] = []
        try:
            object.__setattr__(self, "adaptation", Adaptation(self.adaptation))
        except ValueError:
            choices = ", ".join(a.value for a in Adaptation)
            problems.append(f"`adaptation` must be one of {choices}. Found {self.adaptation!r}.")
        for name in ("lora_rank", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"`{name}` must be a positive integer. Found {value!r}.")
        if self.lora_targets is not None:
            if not isinstance(self.lora_targets, str):
                object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
            if (
                isinstance(self.lora_targets, str)
                or not self.lora_targets
                or not all(isinstance(t, str) and t for t in self.lora_targets)
            ):
                problems.append(
                    f"`lora_targets` must be non-empty module names. Found {self.lora_targets!r}."
                )
        for name in (
            "hidden_size", "num_layers", "num_heads", "intermediate_size", "embedding_dim",
            "input_size", "patch_size", "sample_rate", "max_seq_length",
        ):  # fmt: skip
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"`{name}` must be a positive integer. Found {value!r}.")
        if self.num_classes is not None and self.num_classes < 2:
            problems.append(f"`num_classes` must be >= 2. Found {self.num_classes}.")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            problems.append(f"`dropout` must be in [0, 1). Found {self.dropout}.")
        if not problems:
            if self.resolved_hidden_size % self.resolved_num_heads:
                problems.append(
                    f"`hidden_size` ({self.resolved_hidden_size}) must be a multiple of "
                    f"`num_heads` ({self.resolved_num_heads})."
                )
            if self.family is ModelFamily.VIT and self.resolved_input_size % self.resolved_patch:
                problems.append(
                    f"`input_size` ({self.resolved_input_size}) must be a multiple of "
                    f"`patch_size` ({self.resolved_patch})."
                )
            if self.family is ModelFamily.GPT2 and (
                self.embedding_dim is not None or self.num_classes is not None
            ):
                problems.append(
                    "gpt2 is a language model: `embedding_dim` and `num_classes` do not apply."
                )
        if problems:
            raise ValueError("Invalid model spec: " + " ".join(problems))

    @property
    def base_folder(self) -> Path | None:
        """The pretrained base folder: ``checkpoint`` unless it names a ``.safetensors`` file
        (the whole model's weights)."""
        if self.checkpoint is None:
            return None
        path = Path(self.checkpoint)
        return path if path.is_dir() or path.suffix != ".safetensors" else None

    @property
    def _base(self) -> _Base:
        return _BASES[self.family]

    @property
    def resolved_hidden_size(self) -> int:
        """The hidden size after overrides."""
        return self.hidden_size or self._base.hidden_size

    @property
    def resolved_num_heads(self) -> int:
        """The number of attention heads after overrides."""
        return self.num_heads or self._base.num_heads

    @property
    def resolved_num_layers(self) -> int:
        """The number of transformer layers after overrides."""
        return self.num_layers or self._base.num_layers

    @property
    def resolved_embedding_dim(self) -> int:
        """The embedding size of an encoder."""
        return self.embedding_dim or self.resolved_hidden_size

    @property
    def resolved_input_size(self) -> int:
        """The image side (ViT)."""
        return self.input_size or self._base.input_size

    @property
    def resolved_patch(self) -> int:
        """The patch side (ViT)."""
        return self.patch_size or self._base.patch_size

    @property
    def resolved_sample_rate(self) -> int:
        """The audio sample rate (wav2vec2 input)."""
        return self.sample_rate or self._base.sample_rate

    @property
    def resolved_max_seq_length(self) -> int:
        """The maximum number of token ids (MPNet, GPT-2)."""
        return self.max_seq_length or self._base.max_seq_length


def family_for_base_model(base_model: str) -> ModelFamily:
    """The family of a catalog base model or artifact id (``vit-base16`` -> vit, ...)."""
    try:
        return BASE_MODEL_FAMILIES[base_model]
    except KeyError:
        known = ", ".join(sorted(BASE_MODEL_FAMILIES))
        raise ValueError(
            f"No model builder for base model {base_model!r}. Known: {known}."
        ) from None


def spec_for_base_model(
    base_model: str,
    *,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    embedding_dim: int | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
    sample_rate: int | None = None,
    max_seq_length: int | None = None,
    checkpoint: Path | None = None,
    adaptation: Adaptation | str = Adaptation.FULL,
    lora_rank: int = 8,
    lora_alpha: int = 16,
) -> ModelSpec:
    """The spec of a learning-form selection (the form's fields, ``None`` when not set)."""
    return ModelSpec(
        family=family_for_base_model(base_model),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        embedding_dim=embedding_dim,
        num_classes=num_classes,
        input_size=input_size,
        sample_rate=sample_rate,
        max_seq_length=max_seq_length,
        checkpoint=checkpoint,
        adaptation=Adaptation(adaptation),
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
    )


def model_config(spec: ModelSpec) -> PretrainedConfig:
    """The ``transformers`` config of the backbone (cheap: nothing is instantiated)."""
    hidden = spec.resolved_hidden_size
    layers, heads = spec.resolved_num_layers, spec.resolved_num_heads
    inner = spec.intermediate_size or 4 * hidden
    p = spec.dropout
    if spec.family is ModelFamily.VIT:
        return ViTConfig(
            hidden_size=hidden,
            image_size=spec.resolved_input_size,
            patch_size=spec.resolved_patch,
            hidden_dropout_prob=p or 0.0,
            attention_probs_dropout_prob=p or 0.0,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inner,
        )
    if spec.family is ModelFamily.WAV2VEC2:
        conv = min(512, hidden)
        drop = 0.1 if p is None else p
        return Wav2Vec2Config(
            hidden_size=hidden,
            conv_dim=(conv,) * 7,
            num_conv_pos_embedding_groups=math.gcd(16, hidden),
            feat_extract_norm="group",
            do_stable_layer_norm=False,
            apply_spec_augment=False,
            mask_time_prob=0.0,
            mask_feature_prob=0.0,
            layerdrop=0.0,
            hidden_dropout=drop,
            attention_dropout=drop,
            activation_dropout=0.0 if p is None else p,
            feat_proj_dropout=drop,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inner,
        )
    if spec.family is ModelFamily.MPNET:
        drop = 0.1 if p is None else p
        return MPNetConfig(
            vocab_size=BYTE_VOCAB_SIZE,
            hidden_size=hidden,
            max_position_embeddings=spec.resolved_max_seq_length + 2,
            hidden_dropout_prob=drop,
            attention_probs_dropout_prob=drop,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inner,
        )
    drop = 0.1 if p is None else p
    return GPT2Config(
        vocab_size=BYTE_VOCAB_SIZE,
        n_positions=spec.resolved_max_seq_length,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_inner=inner,
        resid_pdrop=drop,
        embd_pdrop=drop,
        attn_pdrop=drop,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


@dataclass(frozen=True, slots=True, eq=False)
class EncoderOutput:
    """An encoder's output: embeddings ``(B, embedding_dim)``; logits ``(B, C)`` or None."""

    embedding: Tensor
    logits: Tensor | None


class EncoderModel(nn.Module):
    """A ``transformers`` backbone, mean pooling, a projection and an optional classifier.

    Inputs: ViT pixel values ``(B, 3, S, S)``; wav2vec2 waveforms ``(B, T)``; MPNet byte ids
    ``(B, L)`` (``PAD_ID`` positions are masked out of attention and pooling).
    """

    def __init__(
        self,
        family: ModelFamily,
        backbone: PreTrainedModel,
        *,
        hidden_size: int,
        embedding_dim: int,
        num_classes: int | None,
    ) -> None:
        super().__init__()
        self.family: ModelFamily = family
        self.backbone = backbone
        self.projection = nn.Linear(hidden_size, embedding_dim)
        self.classifier = nn.Linear(embedding_dim, num_classes) if num_classes else None

    @property
    def head_names(self) -> tuple[str, ...]:
        """The state-dict keys of fedbrain's heads (projection, classifier)."""
        heads = ("projection",) if self.classifier is None else ("projection", "classifier")
        return tuple(f"{h}.{p}" for h in heads for p in ("weight", "bias"))

    def forward(self, inputs: Tensor) -> EncoderOutput:
        if self.family is ModelFamily.MPNET:
            mask = inputs.ne(PAD_ID)
            length = inputs.shape[1]
            positions = torch.arange(2, length + 2, device=inputs.device).expand_as(inputs)
            hidden = self.backbone(
                input_ids=inputs, attention_mask=mask.long(), position_ids=positions
            ).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        elif self.family is ModelFamily.VIT:
            pooled = self.backbone(pixel_values=inputs).last_hidden_state.mean(1)
        else:
            pooled = self.backbone(input_values=inputs).last_hidden_state.mean(1)
        embedding = self.projection(pooled)
        logits = self.classifier(embedding) if self.classifier is not None else None
        return EncoderOutput(embedding=embedding, logits=logits)


def _batched_position_bias(
    encoder: nn.Module, x: Tensor, position_ids: Tensor | None = None, num_buckets: int = 32
) -> Tensor:
    """MPNet's relative-position bias ``(B, heads, L, L)``, looked up once per example."""
    if position_ids is not None:
        raise NotImplementedError("fedbrain's MPNet position bias takes no position_ids.")
    bsz, length = x.size(0), x.size(1)
    positions = torch.arange(length, dtype=torch.long, device=x.device)
    relative = positions[None, :] - positions[:, None]
    bucketize = cast(Callable[..., Tensor], MPNetEncoder.relative_position_bucket)
    bucket = bucketize(relative, num_buckets=num_buckets)
    table = cast(nn.Embedding, encoder.relative_attention_bias)
    values: Tensor = table(bucket.expand(bsz, length, length))
    return values.permute(0, 3, 1, 2).contiguous()


def _batch_relative_position_bias(backbone: MPNetModel) -> None:
    """Make MPNet's relative-attention-bias lookup per example (same values).

    ``MPNetEncoder.compute_position_bias`` embeds one ``(L, L)`` bucket table for the whole
    batch, so Opacus would record a per-sample gradient with batch dimension ``L`` for
    ``relative_attention_bias`` (wrong, or a crash when clipping). Looking it up with a batch
    dimension gives every example its own gradient.
    """
    encoder = backbone.encoder
    setattr(encoder, "compute_position_bias", types.MethodType(_batched_position_bias, encoder))  # noqa: B010


def _backbone(
    cls: type[PreTrainedModel], config: PretrainedConfig, folder: Path | None, **kwargs: bool
) -> PreTrainedModel:
    if folder is None:
        return cls(config, **kwargs)
    # from_pretrained returns the model in eval mode; a built model trains like a fresh one
    # (dropout on; Opacus refuses a model in eval mode).
    model: PreTrainedModel = load_pretrained(cls, folder, config, **kwargs).train()
    return model


def build_model(spec: ModelSpec, *, seed: int = 0) -> nn.Module:
    """The model of ``spec`` on CPU: random init from ``seed``, or the spec's checkpoint,
    adapted for the spec's :class:`Adaptation`.

    Encoders are :class:`EncoderModel`; gpt2 is ``GPT2LMHeadModel``. Build under
    ``with torch.device("meta"):`` to inspect a full-size model without allocating it.

    A checkpoint folder supplies the Hugging Face model (an encoder's backbone -- tensors
    under its ``vit.`` / ``wav2vec2.`` / ``mpnet.`` prefix or none; GPT-2's LM, head tied);
    its config must agree with the spec's sizes and its tensors must cover the model
    (:class:`CheckpointError` naming each problem). fedbrain's encoder heads come from the
    folder's ``fedbrain_heads.safetensors`` when it holds them (:func:`save_base`) and are
    freshly initialised from ``seed`` otherwise -- a plain Hugging Face checkpoint has none.
    LoRA adapters start as the identity (B = 0), drawn from ``seed``.
    """
    config = model_config(spec)
    folder = spec.base_folder
    path = None if spec.checkpoint is None else Path(spec.checkpoint)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: nn.Module
        if isinstance(config, GPT2Config):
            model = _backbone(GPT2LMHeadModel, config, folder)
        else:
            backbone: PreTrainedModel
            if isinstance(config, ViTConfig):
                backbone = _backbone(ViTModel, config, folder, add_pooling_layer=False)
            elif isinstance(config, Wav2Vec2Config):
                backbone = _backbone(Wav2Vec2Model, config, folder)
            else:
                backbone = _backbone(MPNetModel, config, folder, add_pooling_layer=False)
                _batch_relative_position_bias(cast(MPNetModel, backbone))
            encoder = EncoderModel(
                spec.family,
                backbone,
                hidden_size=spec.resolved_hidden_size,
                embedding_dim=spec.resolved_embedding_dim,
                num_classes=spec.num_classes,
            )
            if folder is not None:
                heads = {n: t for n, t in encoder.state_dict().items() if n in encoder.head_names}
                loaded = load_heads(folder, {n: tuple(t.shape) for n, t in heads.items()})
                with torch.no_grad():
                    for name, tensor in loaded.items():
                        heads[name].copy_(tensor)
            model = encoder
    if path is not None and folder is None:
        load_checkpoint(model, path)
    if spec.adaptation is not Adaptation.FULL:
        from clients.adaptation import adapt  # here: imports peft only when a spec adapts

        model = adapt(
            model,
            spec.adaptation,
            lora_rank=spec.lora_rank,
            lora_alpha=spec.lora_alpha,
            target_modules=spec.lora_targets,
            seed=seed,
        )
    return model


def save_base(model: nn.Module, folder: Path, *, classifier: bool = False) -> Path:
    """Write ``model`` as a pretrained base that :func:`build_model` loads: the Hugging Face
    model with ``save_pretrained`` (an encoder's backbone; GPT-2's LM) and an encoder's
    projection -- plus its classifier when ``classifier`` -- in ``fedbrain_heads.safetensors``.

    The model must be plain (not LoRA-adapted: save ``clients.adaptation.merged_state`` into
    a fresh model first). Returns ``folder``.
    """
    inner = unwrap(model)
    if any("lora_" in name for name, _ in inner.named_parameters()):
        raise ValueError(
            "save_base needs a plain model: merge the LoRA adapters first "
            "(clients.adaptation.merged_state, loaded into a model built without adaptation)."
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(inner, EncoderModel):
        backbone: nn.Module = inner.backbone
        if not isinstance(backbone, PreTrainedModel):
            raise TypeError(f"Cannot save a {type(backbone).__name__} backbone.")
        with quiet_transformers():
            backbone.save_pretrained(folder)
        keep = ("projection.", "classifier.") if classifier else ("projection.",)
        save_heads(folder, {n: t for n, t in inner.state_dict().items() if n.startswith(keep)})
    elif isinstance(inner, PreTrainedModel):
        with quiet_transformers():
            inner.save_pretrained(folder)
    else:
        raise TypeError(f"Cannot save a {type(inner).__name__} as a pretrained base.")
    return folder


LORA_TARGETS: dict[ModelFamily, tuple[str, ...]] = {
    ModelFamily.VIT: ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    ModelFamily.WAV2VEC2: (
        "q_proj", "k_proj", "v_proj", "out_proj", "intermediate_dense", "output_dense",
    ),
    ModelFamily.MPNET: ("q", "k", "v", "o", "dense"),
    ModelFamily.GPT2: ("c_attn", "c_proj", "c_fc"),
}  # fmt: skip
"""Default LoRA targets (module-name suffixes): every attention projection and both MLP linears
of each transformer layer (``transformers`` 5 module names); not the embeddings, the
convolutional feature extractor or the heads."""


def model_fingerprint(spec: ModelSpec) -> str:
    """``sha256:`` + hex SHA-256 of the RFC 8785 canonical JSON of the resolved model config.

    Covers the backbone config (minus library bookkeeping such as ``transformers_version``),
    the family, the heads and the input spec; with a base folder, its content digest
    (``clients.checkpoints.checkpoint_digest``, not its path -- a ``.safetensors`` file of the
    whole model's weights is not part of it: every weight travels); with an adaptation other than
    ``full``, the adaptation, rank, alpha and targets. A server and a node with different
    fingerprints would exchange incompatible weights.
    """
    config = json.loads(model_config(spec).to_json_string(use_diff=False))
    described: dict[str, JsonValue] = {
        "format": "fedbrain-model/1",
        "family": str(spec.family),
        "backbone": {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS},
        "embedding_dim": spec.resolved_embedding_dim if spec.family.is_encoder else None,
        "num_classes": spec.num_classes,
        "sample_rate": spec.resolved_sample_rate if spec.family is ModelFamily.WAV2VEC2 else None,
    }
    if spec.base_folder is not None:
        described["base"] = checkpoint_digest(spec.base_folder)
    if spec.adaptation is not Adaptation.FULL:
        described["adaptation"] = {
            "kind": str(spec.adaptation),
            "lora_rank": spec.lora_rank if spec.adaptation is Adaptation.LORA else None,
            "lora_alpha": spec.lora_alpha if spec.adaptation is Adaptation.LORA else None,
            "lora_targets": list(spec.lora_targets or LORA_TARGETS[spec.family])
            if spec.adaptation is Adaptation.LORA
            else None,
        }
    return "sha256:" + hashlib.sha256(canonical_json(described)).hexdigest()


# ----------------------------------------------------------------------------- weights


class WeightsError(ValueError):
    """Arrays that do not fit the model (count, shape)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside an Opacus ``GradSampleModule`` (or ``model`` itself)."""
    if "opacus" not in sys.modules:  # nothing can be wrapped before Opacus is loaded
        return model
    from opacus import GradSampleModule

    while isinstance(model, GradSampleModule):
        model = cast(nn.Module, model._module)
    return model


def _named_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """State-dict entries in state-dict order, without aliases of earlier entries (tied)."""
    seen: set[tuple[int, int]] = set()
    out: list[tuple[str, Tensor]] = []
    for name, tensor in unwrap(model).state_dict(keep_vars=True).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        out.append((name, tensor))
    return out


def weight_names(model: nn.Module) -> list[str]:
    """The state-dict keys that :func:`get_weights` returns, in order (tied weights once)."""
    return [name for name, _ in _named_tensors(model)]


def get_weights(model: nn.Module) -> list[npt.NDArray[np.float32]]:
    """Every weight as a float32 numpy array (new arrays), in :func:`weight_names` order."""
    return [t.detach().to("cpu", torch.float32).numpy().copy() for _, t in _named_tensors(model)]


def set_weights(model: nn.Module, arrays: list[npt.NDArray[np.float32]]) -> None:
    """Copy ``arrays`` (in :func:`weight_names` order) into ``model``'s tensors, in place.

    Raises :class:`WeightsError` naming every mismatch before changing anything.
    """
    copy_into(_named_tensors(model), arrays, kind="weight arrays", made="build")


def copy_into(
    named: Sequence[tuple[str, Tensor]],
    arrays: Sequence[npt.NDArray[np.float32]],
    *,
    kind: str,
    made: str,
) -> None:
    """Copy ``arrays`` into the ``named`` tensors, in place, after checking count and shapes
    (:class:`WeightsError` naming every mismatch, nothing changed). ``kind`` names the arrays
    and ``made`` how server and node make the model, in the error."""
    if len(arrays) != len(named):
        raise WeightsError(
            f"Expected {len(named)} {kind} for this model, got {len(arrays)}. "
            f"Do the server and the node {made} the same model (compare model_fingerprint)?"
        )
    problems = [
        f"{name}: got shape {tuple(np.shape(a))}, model expects {tuple(t.shape)}"
        for (name, t), a in zip(named, arrays, strict=True)
        if tuple(np.shape(a)) != tuple(t.shape)
    ]
    if problems:
        raise WeightsError("Weight arrays do not fit the model: " + "; ".join(problems) + ".")
    with torch.no_grad():
        for (_, tensor), array in zip(named, arrays, strict=True):
            tensor.copy_(torch.as_tensor(np.asarray(array), dtype=tensor.dtype))


def save_checkpoint(model: nn.Module, path: Path) -> None:
    """Write the model's weights (tied weights once) as a safetensors file."""
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in _named_tensors(model)}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a local safetensors checkpoint into ``model`` strictly, in place.

    Raises :class:`CheckpointError` listing missing and unexpected tensors and every shape
    mismatch ("checkpoint tensor X has shape A, model expects B"); nothing is loaded then.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist or is not a file.")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
    all_entries = unwrap(model).state_dict(keep_vars=True)
    named = dict(_named_tensors(model))
    problems = [f"missing tensor {name}" for name in named if name not in tensors]
    problems += [f"unexpected tensor {name}" for name in tensors if name not in all_entries]
    problems += [
        f"checkpoint tensor {name} has shape {tuple(t.shape)}, model expects "
        f"{tuple(all_entries[name].shape)}"
        for name, t in tensors.items()
        if name in all_entries and tuple(t.shape) != tuple(all_entries[name].shape)
    ]
    if problems:
        raise CheckpointError(
            f"Checkpoint {str(path)!r} does not fit the model: " + "; ".join(problems) + "."
        )
    with torch.no_grad():
        for name, tensor in named.items():
            tensor.copy_(tensors[name].to(tensor.dtype))
