"""A node's built models, kept between messages: a message loads weights into a model instead
of building one.

Building a job's model (``clients.models.build_model``: a ``transformers`` config, module
construction, random initialisation or a checkpoint read, LoRA adaptation) costs 15-22 ms of
CPU for the demo's small models and seconds for a full-size one, while copying weights into a
built model costs under a millisecond. A process that serves many messages -- a Ray actor of
the Simulation Engine playing hundreds of virtual nodes, a long-lived ClientApp -- keeps the
models it built here.

:func:`cached_model` hands out a model that is indistinguishable from a fresh
``build_model(spec)``: every tensor of its state dict is reset to the values it was built with,
gradients are cleared and it is in training mode. Each thread has its own models (a thread
serves one message at a time, so no two messages ever share one); a model stays the calling
thread's until that thread asks for the same spec again. A model that Opacus wrapped for DP-SGD
carries hooks on its modules: such work builds its own model instead (``build_model``).

A checkpoint is part of the key with its files' sizes and modification times, so a changed
checkpoint is built afresh. At most :data:`MODELS_PER_THREAD` specs are kept per thread, the
least recently used dropped first.

What a node checks before it joins a job (``query.node_info``) is remembered per process for
models without a checkpoint: :func:`check_builds` (the model builds, on the meta device) and
:func:`fingerprint` (``clients.models.model_fingerprint``). With a checkpoint the fingerprint
covers the checkpoint's content, which can change on disk: it is computed every time.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import torch
from torch import nn

from clients.models import ModelSpec, build_model, model_fingerprint

__all__ = [
    "MODELS_PER_THREAD",
    "cached_model",
    "check_builds",
    "clear_model_cache",
    "fingerprint",
]

MODELS_PER_THREAD: Final = 4

_Key = tuple[ModelSpec, str, tuple[tuple[str, int, int], ...]]


@dataclass
class _Built:
    model: nn.Module
    pristine: dict[str, torch.Tensor]


class _Models(threading.local):
    def __init__(self) -> None:
        self.built: OrderedDict[_Key, _Built] = OrderedDict()


_LOCAL = _Models()


def _stamp(path: Path | None) -> tuple[tuple[str, int, int], ...]:
    """Size and modification time of the checkpoint's files (none without a checkpoint)."""
    if path is None:
        return ()
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stamps = []
    for file in files:
        info = file.stat()
        stamps.append((file.name, info.st_size, info.st_mtime_ns))
    return tuple(stamps)


def cached_model(spec: ModelSpec) -> nn.Module:
    """A model of ``spec`` as ``build_model(spec)`` builds it (see the module docstring)."""
    key: _Key = (spec, str(spec.checkpoint or ""), _stamp(spec.checkpoint))
    built = _LOCAL.built.get(key)
    if built is None:
        model = build_model(spec)
        pristine = {name: t.detach().clone() for name, t in model.state_dict().items()}
        built = _Built(model, pristine)
        _LOCAL.built[key] = built
        while len(_LOCAL.built) > MODELS_PER_THREAD:
            _LOCAL.built.popitem(last=False)
        return model
    _LOCAL.built.move_to_end(key)
    model = built.model
    _reset(model, built.pristine)
    model.zero_grad(set_to_none=True)
    model.train()
    return model


def _reset(model: nn.Module, pristine: dict[str, torch.Tensor]) -> None:
    """Copy the built values back into every tensor of ``model``'s state dict, in place:
    ``load_state_dict(pristine, strict=True)`` at a third of its cost (no per-module hooks or
    key matching); a state dict whose names changed goes through ``load_state_dict``."""
    state = model.state_dict()
    if state.keys() != pristine.keys():
        model.load_state_dict(pristine, strict=True)
        return
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(pristine[name])


def clear_model_cache() -> None:
    """Forget this thread's models."""
    _LOCAL.built.clear()


def check_builds(spec: ModelSpec) -> None:
    """Build ``spec`` without its checkpoint on the meta device (nothing allocated): raises
    what ``build_model`` raises for a spec that does not build. Remembered per process."""
    _builds(replace(spec, checkpoint=None))


@functools.lru_cache(maxsize=64)
def _builds(spec: ModelSpec) -> None:
    with torch.device("meta"):
        build_model(spec)


def fingerprint(spec: ModelSpec) -> str:
    """``clients.models.model_fingerprint(spec)``, remembered per process without a
    checkpoint."""
    if spec.checkpoint is not None:
        return model_fingerprint(spec)
    return _fingerprint(spec)


@functools.lru_cache(maxsize=64)
def _fingerprint(spec: ModelSpec) -> str:
    return model_fingerprint(spec)
