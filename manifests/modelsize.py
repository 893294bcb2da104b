"""How big a job's model is and how much memory training it needs -- pure arithmetic.

The learning form can ask for any ``hidden_size``/``num_layers``/...; a model that cannot fit
in memory would otherwise pass validation and die later with the framework's out-of-memory
traceback. :func:`estimate` counts the backbone's parameters per model family from the same
base configurations the model builders use (``clients.models``; this module must not import
it, so the defaults are repeated here and a test compares the two), and
:func:`memory_problem` compares the training memory with what this machine has.

Training memory (a lower bound, fp32): weights, gradients and two Adam moments (16 bytes per
parameter), plus, with example-level DP (Opacus DP-SGD), one gradient per example of a batch
(``4 * batch_size`` bytes per parameter). Activations are not counted.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = [
    "MEMORY_ENV",
    "ModelEstimate",
    "ModelFamily",
    "estimate",
    "family_of",
    "machine_memory_bytes",
    "memory_problem",
]

MEMORY_ENV: Final = "FEDBRAIN_TRAINING_MEMORY_BYTES"
"""Overrides the memory a job may use (bytes); default: this machine's physical memory."""

BYTE_VOCAB: Final = 260  # clients.data's byte-level vocabulary (256 bytes + 4 specials)
_BYTES_PER_VALUE: Final = 4  # fp32
_STATE_COPIES: Final = 4  # weights, gradients, Adam's two moments


class ModelFamily(StrEnum):
    VIT = "vit"
    WAV2VEC2 = "wav2vec2"
    MPNET = "mpnet"
    GPT2 = "gpt2"


@dataclass(frozen=True)
class _Base:
    hidden_size: int = 768
    num_layers: int = 12
    input_size: int = 224
    patch_size: int = 16
    max_seq_length: int = 512


_BASES: Final = {
    ModelFamily.VIT: _Base(),
    ModelFamily.WAV2VEC2: _Base(),
    ModelFamily.MPNET: _Base(max_seq_length=512),
    ModelFamily.GPT2: _Base(max_seq_length=1024),
}
_PREFIXES: Final = (
    ("vit", ModelFamily.VIT),
    ("wav2vec2", ModelFamily.WAV2VEC2),
    ("sbert", ModelFamily.MPNET),
    ("all-mpnet", ModelFamily.MPNET),
    ("mpnet", ModelFamily.MPNET),
    ("gpt", ModelFamily.GPT2),
)


def family_of(base_model: str) -> ModelFamily | None:
    """The family that builds ``base_model`` (a catalog base model), None when no model."""
    for prefix, family in _PREFIXES:
        if base_model.startswith(prefix):
            return family
    return None


@dataclass(frozen=True)
class ModelEstimate:
    """Parameters of the model and the bytes training it needs (lower bound)."""

    family: ModelFamily
    parameters: int
    training_bytes: int
    per_example_gradients: bool = False


def _layers(hidden: int, layers: int) -> int:
    """Transformer blocks: attention (4 h^2 + 4 h), MLP with 4h inner (8 h^2 + 5 h), 2 LNs."""
    return layers * (12 * hidden * hidden + 13 * hidden)


def estimate(
    base_model: str,
    *,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    embedding_dim: int | None = None,
    input_size: int | None = None,
    max_seq_length: int | None = None,
    batch_size: int = 1,
    per_example_gradients: bool = False,
) -> ModelEstimate | None:
    """The parameter count and training memory of the job's model; None for no model."""
    family = family_of(base_model)
    if family is None:
        return None
    base = _BASES[family]
    h = hidden_size or base.hidden_size
    n = num_layers or base.num_layers
    blocks = _layers(h, n) + 2 * h  # + the final layer norm
    if family is ModelFamily.VIT:
        side = input_size or base.input_size
        patches = (side // base.patch_size) ** 2
        embed = 3 * base.patch_size**2 * h + h + (patches + 2) * h
        params = embed + blocks + h * (embedding_dim or h)  # + the embedding projection
    elif family is ModelFamily.WAV2VEC2:
        conv = min(512, h)
        kernels = (10, 3, 3, 3, 3, 2, 2)
        features = conv * kernels[0] + sum(conv * conv * k for k in kernels[1:]) + 2 * conv
        groups = math.gcd(16, h)
        positional = h * (h // groups) * 128 + h
        params = features + conv * h + h + positional + blocks + h * (embedding_dim or h)
    elif family is ModelFamily.MPNET:
        positions = (max_seq_length or base.max_seq_length) + 2
        params = (BYTE_VOCAB + positions) * h + blocks + h * (embedding_dim or h)
    else:
        positions = max_seq_length or base.max_seq_length
        params = (BYTE_VOCAB + positions) * h + blocks  # the LM head is tied to the embedding
    per_parameter = _STATE_COPIES + (batch_size if per_example_gradients else 0)
    return ModelEstimate(
        family=family,
        parameters=params,
        training_bytes=params * per_parameter * _BYTES_PER_VALUE,
        per_example_gradients=per_example_gradients,
    )


def machine_memory_bytes() -> int | None:
    """``$FEDBRAIN_TRAINING_MEMORY_BYTES`` if set, else this machine's physical memory."""
    override = os.environ.get(MEMORY_ENV, "").strip()
    if override:
        try:
            value = int(override)
        except ValueError:
            value = 0
        if value > 0:
            return value
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _size(count: float, unit: str = "") -> str:
    if count >= 1e15:
        return f"{count:.2e} {unit}".rstrip()
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= scale:
            return f"{count / scale:.3g} {suffix}{unit}"
    return f"{count:.3g} {unit}".rstrip()


def memory_problem(model: ModelEstimate, *, available: int | None) -> str | None:
    """A one-line refusal when training ``model`` needs more than ``available`` bytes."""
    if available is None or model.training_bytes <= available:
        return None
    parts = "weights, gradients, optimizer state" + (
        ", per-example DP-SGD gradients" if model.per_example_gradients else ""
    )
    return (
        f"the {model.family} model would have about {_size(model.parameters)} parameters and "
        f"need at least {_size(model.training_bytes, 'B')} of memory to train ({parts}); this "
        f"machine has {_size(available, 'B')}. Lower hidden_size, num_layers or batch_size."
    )
