"""A cached model is indistinguishable from a fresh build: whatever the last message did to it
(trained it, loaded other weights, left gradients, switched it to eval), the next message gets
the built values, no gradients and training mode."""

from __future__ import annotations

import threading
from typing import cast

import pytest
import torch
from transformers import GPT2LMHeadModel

from clients.model_cache import cached_model, clear_model_cache
from clients.models import ModelFamily, build_model
from tests.support.tiny_models import TINY


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    clear_model_cache()


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("family", list(ModelFamily))
def test_a_cached_model_comes_back_as_built_after_a_message_changed_it(
    family: ModelFamily,
) -> None:
    spec = TINY[family]
    first = cached_model(spec)
    assert _same_state(first, build_model(spec))
    with torch.no_grad():  # what a message may leave behind
        for parameter in first.parameters():
            parameter.add_(1.0)
            parameter.grad = torch.ones_like(parameter)
        for buffer in first.buffers():
            if buffer.is_floating_point():
                buffer.mul_(3.0)
    first.eval()
    again = cached_model(spec)
    assert again is first  # the same module, not a rebuild
    assert _same_state(again, build_model(spec))
    assert again.training and all(p.grad is None for p in again.parameters())


def test_tied_weights_stay_tied_and_each_thread_has_its_own_model() -> None:
    spec = TINY[ModelFamily.GPT2]
    model = cast(GPT2LMHeadModel, cached_model(spec))
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
    model = cast(GPT2LMHeadModel, cached_model(spec))
    assert model.transformer.wte.weight is model.lm_head.weight
    assert _same_state(model, build_model(spec))
    other: list[torch.nn.Module] = []
    worker = threading.Thread(target=lambda: other.append(cached_model(spec)))
    worker.start()
    worker.join()
    assert other[0] is not model and _same_state(other[0], model)
