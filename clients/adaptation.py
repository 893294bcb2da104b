"""Parameter-efficient fine-tuning: LoRA adapters (``peft``) or the heads alone.

:func:`adapt` freezes a built model's weights except those its :class:`Adaptation` trains:

- ``lora`` -- LoRA (Hu et al. 2021, arXiv:2106.09685): each target linear ``W`` becomes
  ``W + (alpha / r) B A`` with ``A`` (``r x in``) drawn from the seed and ``B`` (``out x r``)
  zero, so the adapted model starts as the base model. Default targets
  (:data:`clients.models.LORA_TARGETS`): every attention projection and both MLP linears of
  each transformer layer. An encoder's heads (projection, classifier) train too: a new task's
  heads are not in the base. GPT-2's byte embedding / LM head (tied) stays frozen.
- ``head`` -- only the heads: an encoder's projection and classifier; GPT-2's final layer
  norm and its tied byte embedding / LM head.
- ``full`` -- every weight.

Only the trainable tensors travel (:func:`get_trainable_weights` / :func:`set_trainable_weights`,
in :func:`trainable_names` order) and so only they are clipped, masked and noised: DP noise
grows with the square root of the number of coordinates, the signal does not. For a bundle,
:func:`merged_state` folds the adapters into the base weights (the state of the model built
without adaptation) and :func:`adapter_state` keeps the trainable tensors alone, to ship with
the base checkpoint's digest.

Opacus: peft's LoRA layer holds its adapters as plain ``nn.Linear`` modules (``lora_A``,
``lora_B``) next to the frozen base layer, so Opacus's hooks compute their per-sample
gradients as for any linear layer (3-D inputs included) and skip the frozen modules; no
workaround is needed (per-sample gradients checked against one-example backward passes in
the tests). LoRA dropout is 0. PyTorch warns that the "full backward hook is firing when gradients
are computed with respect to module outputs since no inputs require gradients" when the first
layers are frozen: expected, the per-sample gradients are still exact (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from transformers import GPT2LMHeadModel

from clients.models import (
    LORA_TARGETS,
    Adaptation,
    EncoderModel,
    ModelFamily,
    copy_into,
    get_weights,
    unwrap,
    weight_names,
)

if TYPE_CHECKING:
    from peft.tuners.lora import Linear as LoraLinear

__all__ = [
    "adapt",
    "adaptation_of",
    "adapter_state",
    "get_trainable_weights",
    "merged_state",
    "set_trainable_weights",
    "trainable_names",
]

F32 = npt.NDArray[np.float32]


def _family(model: nn.Module) -> ModelFamily:
    if isinstance(model, EncoderModel):
        return model.family
    if isinstance(model, GPT2LMHeadModel):
        return ModelFamily.GPT2
    raise TypeError(
        f"adapt needs a model from clients.models.build_model. Found {type(model).__name__}."
    )


def _heads(model: nn.Module, kind: Adaptation) -> list[nn.Module]:
    if isinstance(model, EncoderModel):
        heads: list[nn.Module] = [model.projection]
        return heads + ([model.classifier] if model.classifier is not None else [])
    if isinstance(model, GPT2LMHeadModel) and kind is Adaptation.HEAD:
        return [model.transformer.ln_f, model.lm_head]
    return []


def _linear_suffixes(model: nn.Module) -> list[str]:
    return sorted({
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"
    })  # fmt: skip


def adapt(
    model: nn.Module,
    adaptation: Adaptation | str,
    *,
    lora_rank: int = 8,
    lora_alpha: int = 16,
    target_modules: Sequence[str] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Set what ``model`` trains, *in place* (peft injects the LoRA layers into it); returns it.

    ``target_modules``: module-name suffixes to put LoRA on (default: the family's
    :data:`~clients.models.LORA_TARGETS`). Adapt before ``make_private`` and before building
    the optimizer. Raises ``ValueError`` for bad values, targets that match no linear layer, a
    model that already has adapters or is wrapped by Opacus; ``TypeError`` for a model
    ``build_model`` did not make.
    """
    try:
        kind = Adaptation(adaptation)
    except ValueError:
        choices = ", ".join(a.value for a in Adaptation)
        raise ValueError(f"`adaptation` must be one of {choices}. Found {adaptation!r}.") from None
    problems = [
        f"`{name}` must be a positive integer. Found {value!r}."
        for name, value in (("lora_rank", lora_rank), ("lora_alpha", lora_alpha))
        if not isinstance(value, int) or isinstance(value, bool) or value < 1
    ]
    if unwrap(model) is not model:
        problems.append("adapt the plain model before `make_private` wraps it.")
    if problems:
        raise ValueError(" ".join(problems))
    family = _family(model)
    if _lora_modules(model):
        raise ValueError("The model already has LoRA adapters: adapt a freshly built model.")
    if kind is Adaptation.FULL:
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if kind is Adaptation.LORA:
        from peft import LoraConfig, inject_adapter_in_model  # here: peft loads only if used

        targets = list(target_modules) if target_modules is not None else list(LORA_TARGETS[family])
        config = LoraConfig(
            r=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules=targets,
            fan_in_fan_out=family is ModelFamily.GPT2,  # GPT-2's Conv1D stores W transposed
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                inject_adapter_in_model(config, model)
            except ValueError as exc:
                raise ValueError(
                    f"LoRA targets {targets} match no linear layer of this {family} model "
                    f"({exc}). Its linear layers end in: {', '.join(_linear_suffixes(model))}."
                ) from exc
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.requires_grad_(True)
    for head in _heads(model, kind):
        head.requires_grad_(True)
    return model


def _lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Module path -> peft LoRA layer (peft is imported only when the model has adapters)."""
    inner = unwrap(model)
    if not any(".lora_A." in name for name, _ in inner.named_parameters()):
        return {}
    from peft.tuners.lora import Linear as LoraLinear  # GPT-2's Conv1D targets use it too

    return {name: m for name, m in inner.named_modules() if isinstance(m, LoraLinear)}


def adaptation_of(model: nn.Module) -> Adaptation:
    """How ``model`` is adapted: ``lora`` with adapters, ``head`` with frozen weights, else
    ``full``."""
    if _lora_modules(model):
        return Adaptation.LORA
    frozen = any(not p.requires_grad for p in unwrap(model).parameters())
    return Adaptation.HEAD if frozen else Adaptation.FULL


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]


def trainable_names(model: nn.Module) -> list[str]:
    """The names of the trainable parameters, in the fixed order the arrays travel in (tied
    parameters once, under their first name)."""
    return [name for name, _ in _trainable(model)]


def get_trainable_weights(model: nn.Module) -> list[F32]:
    """The trainable parameters as float32 numpy arrays (new arrays), in
    :func:`trainable_names` order."""
    return [p.detach().to("cpu", torch.float32).numpy().copy() for _, p in _trainable(model)]


def set_trainable_weights(model: nn.Module, arrays: Sequence[F32]) -> None:
    """Copy ``arrays`` (in :func:`trainable_names` order) into the trainable parameters, in
    place. Raises :class:`~clients.models.WeightsError` naming every mismatch before changing
    anything."""
    copy_into(_trainable(model), arrays, kind="trainable weight arrays", made="adapt")


def merged_state(model: nn.Module) -> dict[str, F32]:
    """Every weight with the LoRA adapters folded in (``W + (alpha / r) B A``), under the
    names and in the order of :func:`~clients.models.weight_names` of the same spec built
    without adaptation; new arrays, the model is unchanged. Without adapters: its weights."""
    layers = _lora_modules(model)
    out: dict[str, F32] = {}
    for name, array in zip(weight_names(model), get_weights(model), strict=True):
        if ".lora_" in name:
            continue
        path, _, leaf = name.rpartition(".")
        if path.endswith(".base_layer") and path.removesuffix(".base_layer") in layers:
            owner = path.removesuffix(".base_layer")
            layer = layers[owner]
            if leaf == "weight" and not layer.merged:
                with torch.no_grad():
                    for adapter in layer.active_adapters:
                        delta = layer.get_delta_weight(adapter).detach().to("cpu", torch.float32)
                        array = array + delta.numpy()
            name = f"{owner}.{leaf}"
        out[name] = array.astype(np.float32, copy=False)
    return out


def adapter_state(model: nn.Module) -> dict[str, F32]:
    """The trainable tensors alone (LoRA ``A``/``B`` and the heads; ``head``: the heads), by
    :func:`trainable_names`: with the base checkpoint they rebuild the model. Raises
    ``ValueError`` for a fully fine-tuned model, which has no frozen base to add them to."""
    if adaptation_of(model) is Adaptation.FULL:
        raise ValueError(
            "A fully fine-tuned model has no adapters: bundle every weight (merged_state)."
        )
    return dict(zip(trainable_names(model), get_trainable_weights(model), strict=True))
