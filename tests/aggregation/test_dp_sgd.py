"""Tests for the client-side Opacus DP-SGD helper (tiny model, one epoch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from aggregation.accountant import PrivacyAccountant, compute_epsilon
from aggregation.dp_sgd import PrivateTraining, UnsupportedModelError, make_private, prepare_model

DELTA = 1e-5


def _setup(
    seed: int = 0,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader[tuple[torch.Tensor, ...]]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
    loader: DataLoader[tuple[torch.Tensor, ...]] = DataLoader(data, batch_size=16)
    return model, torch.optim.SGD(model.parameters(), lr=0.1), loader


def _train_one_epoch(private: PrivateTraining[tuple[torch.Tensor, ...]]) -> int:
    steps = 0
    for x, y in private.data_loader:
        private.optimizer.zero_grad()
        torch.autograd.backward(nn.functional.cross_entropy(private.module(x), y))
        private.optimizer.step()
        steps += 1
    return steps


def test_dp_sgd_training_reports_epsilon_matching_its_events() -> None:
    model, optimizer, loader = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    private = make_private(
        model,
        optimizer,
        loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(0),
    )
    steps = _train_one_epoch(private)
    assert private.sample_rate == 1 / 4
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    events = private.events()
    assert sum(e.steps for e in events) == steps == 4
    assert all(e.noise_multiplier == 1.0 and e.sample_rate == 0.25 for e in events)
    epsilon = private.epsilon(delta=DELTA)
    assert 0 < epsilon < float("inf")
    assert epsilon == pytest.approx(compute_epsilon(events, delta=DELTA))

    node_accountant = PrivacyAccountant(delta=DELTA)  # across rounds, on the node
    for event in events:
        node_accountant.compose(event)
    assert node_accountant.get_epsilon() == pytest.approx(epsilon)


def test_dp_sgd_calibrated_from_target_epsilon_stays_within_it() -> None:
    model, optimizer, loader = _setup(seed=1)
    private = make_private(
        model,
        optimizer,
        loader,
        max_grad_norm=1.0,
        target_epsilon=5.0,
        target_delta=DELTA,
        epochs=1,
        noise_generator=torch.Generator().manual_seed(1),
    )
    _train_one_epoch(private)
    assert private.noise_multiplier > 0
    assert private.epsilon(delta=DELTA) <= 5.0


def test_model_with_batchnorm_is_rejected_naming_the_module() -> None:
    model = nn.Sequential()
    model.add_module("dense", nn.Linear(4, 8))
    model.add_module("norm", nn.BatchNorm1d(8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, loader = _setup()
    with pytest.raises(UnsupportedModelError) as info:
        make_private(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
    assert any(problem.startswith("`norm` (BatchNorm1d)") for problem in info.value.problems)
    assert "prepare_model(model, fix=True)" in str(info.value)


def test_prepare_model_with_fix_replaces_unsupported_modules() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    fixed = prepare_model(model, fix=True)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fixed.modules())


def test_model_in_eval_mode_is_rejected() -> None:
    model = nn.Linear(4, 2).eval()
    with pytest.raises(UnsupportedModelError, match=r"model\.train\(\)"):
        prepare_model(model)


def test_noise_multiplier_and_target_epsilon_are_mutually_exclusive() -> None:
    model, optimizer, loader = _setup()
    with pytest.raises(ValueError, match="Give either `noise_multiplier`"):
        make_private(
            model,
            optimizer,
            loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            target_epsilon=3.0,
            target_delta=DELTA,
            epochs=1,
        )
    with pytest.raises(ValueError, match="Give either `noise_multiplier`"):
        make_private(model, optimizer, loader, max_grad_norm=1.0, target_epsilon=3.0)


def test_invalid_dp_sgd_parameters_are_reported_together() -> None:
    model, optimizer, loader = _setup()
    with pytest.raises(ValueError) as info:
        make_private(model, optimizer, loader, noise_multiplier=0.0, max_grad_norm=0.0)
    assert "`max_grad_norm` must be positive. Found 0.0." in str(info.value)
    assert "`noise_multiplier` must be positive. Found 0.0." in str(info.value)
