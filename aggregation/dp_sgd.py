"""Client-side example-level DP-SGD through Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy"): per-example gradients
clipped to ``max_grad_norm`` and Gaussian noise with standard deviation
``noise_multiplier * max_grad_norm`` added to their sum on every step; batches are drawn by
Poisson sampling with rate ``q = 1 / len(data_loader)``. This protects one *example* of a node's
data (``example`` DP unit). The node's epsilon composes over its local steps and -- across
rounds -- over every round it takes part in: keep a ``PrivacyAccountant`` on the node and
compose :meth:`PrivateTraining.events` after each round.

Assumptions: the model has no layers that mix examples (BatchNorm) or keep non-private buffers;
``poisson_sampling=False`` voids the accounting's sampling assumption. Opacus noise comes from
torch's PRNG unless a ``noise_generator`` is passed (tests); ``secure_mode`` is not used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Generic, TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from aggregation.accountant import (
    AccountantKind,
    SubsampledGaussianEvent,
    as_real,
    delta_problem,
    positive_problem,
    raise_problems,
)

if TYPE_CHECKING:  # Opacus is imported on use: a node that runs no DP-SGD never loads it
    from opacus import PrivacyEngine

T = TypeVar("T")


class UnsupportedModelError(ValueError):
    """Opacus cannot train the model privately; ``problems`` names each offending module."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(
            "Opacus cannot train this model with DP-SGD:\n  - "
            + "\n  - ".join(problems)
            + "\nCall `prepare_model(model, fix=True)` (replaces e.g. BatchNorm with GroupNorm) "
            "and create the optimizer from the returned model's parameters."
        )


def model_problems(model: nn.Module) -> list[str]:
    """Why Opacus cannot train ``model`` with DP-SGD, one line per offending module."""
    from opacus.utils.module_utils import trainable_modules
    from opacus.validators import ModuleValidator

    problems: list[str] = []
    if not model.training:
        problems.append("the model is in eval mode: call `model.train()` first.")
    for name, module in trainable_modules(model):
        label = f"`{name or '<root>'}` ({type(module).__name__})"
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is not None:
            for error in validator(module):
                problems.append(f"{label}: {str(error).split('. ')[0]}.")
        elif any(True for _ in module.buffers()):
            problems.append(f"{label}: a trainable layer with buffers, which are not private.")
    return problems


def prepare_model(model: nn.Module, *, fix: bool = False) -> nn.Module:
    """Validate ``model`` for DP-SGD; with ``fix``, first let Opacus replace what it can.

    ``fix=True`` returns a *new* module: build the optimizer from its parameters afterwards.
    Raises :class:`UnsupportedModelError` naming every module Opacus cannot handle.
    """
    if fix:
        from opacus.validators import ModuleValidator

        model = ModuleValidator.fix(model)
    problems = model_problems(model)
    if problems:
        raise UnsupportedModelError(problems)
    return model


class PrivateTraining(Generic[T]):
    """The DP-SGD-private model, optimizer and data loader (use them, not the originals).

    ``noise_multiplier`` is unitless (noise std / ``max_grad_norm``); ``sample_rate`` is the
    Poisson rate of one example per step.
    """

    def __init__(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader[T],
        noise_multiplier: float,
        max_grad_norm: float,
        sample_rate: float,
        engine: object,
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.data_loader = data_loader
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.sample_rate = sample_rate
        self._engine = engine

    def epsilon(self, *, delta: float) -> float:
        """Example-level epsilon at ``delta`` of the steps taken so far with this engine."""
        d = as_real("delta", delta)
        raise_problems([delta_problem("delta", d)])
        engine: PrivacyEngine = self._engine
        return float(engine.get_epsilon(d))

    def events(self) -> tuple[SubsampledGaussianEvent, ...]:
        """The steps taken so far, as events for a node-level accountant across rounds."""
        engine: PrivacyEngine = self._engine
        return tuple(
            SubsampledGaussianEvent(noise_multiplier=z, sample_rate=q, steps=steps)
            for z, q, steps in engine.accountant.history
        )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[T],
    *,
    max_grad_norm: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    epochs: int | None = None,
    accountant: AccountantKind | str = AccountantKind.RDP,
    poisson_sampling: bool = True,
    noise_generator: torch.Generator | None = None,
) -> PrivateTraining[T]:
    """Make local training example-level DP-SGD private with Opacus.

    Give either ``noise_multiplier`` or ``target_epsilon`` + ``target_delta`` + ``epochs``
    (Opacus then calibrates the multiplier for that many epochs of this loader). The
    optimizer must hold ``model``'s parameters. Raises :class:`UnsupportedModelError`
    (naming the modules) for models Opacus cannot handle, ``ValueError`` for bad parameters.
    """
    c = as_real("max_grad_norm", max_grad_norm)
    problems = [positive_problem("max_grad_norm", c)]
    by_target = (target_epsilon, target_delta, epochs)
    if (noise_multiplier is None) == all(v is None for v in by_target) or (
        noise_multiplier is None and any(v is None for v in by_target)
    ):
        problems.append(
            "Give either `noise_multiplier`, or all of `target_epsilon`, `target_delta` and "
            "`epochs` (not both)."
        )
    elif noise_multiplier is not None:
        problems.append(
            positive_problem("noise_multiplier", as_real("noise_multiplier", noise_multiplier))
        )
    else:
        problems.append(
            positive_problem("target_epsilon", as_real("target_epsilon", target_epsilon))
        )
        problems.append(delta_problem("target_delta", as_real("target_delta", target_delta)))
        if epochs is None or epochs < 1:
            problems.append(f"`epochs` must be >= 1. Found {epochs!r}.")
    raise_problems(problems)
    prepare_model(model)

    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant=AccountantKind(accountant).value)
    common = {
        "module": model,
        "optimizer": optimizer,
        "data_loader": data_loader,
        "max_grad_norm": c,
        "poisson_sampling": poisson_sampling,
        "noise_generator": noise_generator,
    }
    if noise_multiplier is not None:
        module, dp_optimizer, dp_loader = engine.make_private(
            noise_multiplier=float(noise_multiplier), **common
        )
    else:
        module, dp_optimizer, dp_loader = engine.make_private_with_epsilon(
            target_epsilon=target_epsilon, target_delta=target_delta, epochs=epochs, **common
        )
    return PrivateTraining(
        module=module,
        optimizer=dp_optimizer,
        data_loader=dp_loader,
        noise_multiplier=float(dp_optimizer.noise_multiplier),
        max_grad_norm=c,
        sample_rate=1 / len(data_loader),
        engine=engine,
    )
