"""Privacy accounting for DP-FedAvg rounds and DP-SGD steps, as events.

Each release of a Poisson-subsampled Gaussian mechanism is recorded as a
:class:`SubsampledGaussianEvent` (in the style of Google's ``dp_accounting``); a
:class:`PrivacyAccountant` composes them and converts the result to epsilon at a given delta.
The privacy math is Opacus's: Renyi DP of the sampled Gaussian mechanism (Mironov 2017,
"Renyi Differential Privacy"; Mironov, Talwar, Zhang 2019) or numerical composition of privacy
loss random variables (Gopi, Lee, Wutschitz 2021, "Numerical Composition of Differential
Privacy"; Opacus returns its upper bound).

Assumptions: adjacency is add/remove of one unit (one node's data for DP-FedAvg, one example
for DP-SGD); each unit takes part in a step independently with probability ``sample_rate``
(Poisson sampling). Fixed-size uniform sampling of ``m`` of ``N`` nodes is accounted with
``q = m / N`` as an approximation: that is the common practice, not a proven bound for
sampling without replacement.

Distributed DP releases (node-side Skellam or discrete Gaussian noise under secure aggregation,
:mod:`aggregation.ddp`) are :class:`~aggregation.ddp_accounting.DistributedDpEvent` s. The RDP
accountant composes any mix of the two kinds over one common set of orders
(:data:`RDP_ORDERS`: Opacus's default orders plus larger integer ones) by adding their RDP
curves -- Opacus's for the sampled Gaussian, the papers' closed forms for the distributed
mechanisms -- and converts with Opacus's ``get_privacy_spent`` (Balle et al. 2020, Theorem 21).
A history of Gaussian events alone is computed exactly as before, by Opacus's own accountant.
The PRV accountant has no privacy loss distribution for the distributed mechanisms and refuses
them.

Budget enforcement follows "check first, then update state": :meth:`PrivacyAccountant.compose`
refuses (raises :class:`PrivacyBudgetExceededError`) an event that would take epsilon past the
budget, and leaves its state untouched, so the server stops *before* the round runs.
"""

from __future__ import annotations

import functools
import numbers
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final, TypeAlias

import numpy as np
from numpy.typing import NDArray

from aggregation.ddp_accounting import RDP_ORDERS, DistributedDpEvent
from aggregation.types import Measurements
from aggregation.validation import (
    JSONValue,
    as_real,
    delta_problem,
    positive_problem,
    raise_problems,
    sample_rate_problem,
)

__all__ = [
    "RDP_ORDERS",
    "STATE_VERSION",
    "AccountantKind",
    "DistributedDpEvent",
    "JSONValue",
    "PrivacyAccountant",
    "PrivacyBudgetExceededError",
    "PrivacyEvent",
    "SubsampledGaussianEvent",
    "as_real",
    "compute_epsilon",
    "delta_problem",
    "positive_problem",
    "raise_problems",
    "rdp_curve",
    "rdp_epsilon",
    "sample_rate_problem",
]

STATE_VERSION = 2
"""Version 2 tags each history entry with its ``type``; version 1 (untagged Gaussian events) is
still read."""


class AccountantKind(StrEnum):
    """Which Opacus accountant turns the composed events into epsilon."""

    RDP = "rdp"
    """Renyi DP (Mironov 2017): a valid, slightly loose upper bound; fast."""
    PRV = "prv"
    """Privacy loss random variables (Gopi et al. 2021): tighter; slower (FFT)."""


class PrivacyBudgetExceededError(RuntimeError):
    """The event would take epsilon (at the accountant's delta) past the budget."""

    def __init__(self, *, epsilon: float, epsilon_budget: float, delta: float) -> None:
        self.epsilon = epsilon
        self.epsilon_budget = epsilon_budget
        self.delta = delta
        super().__init__(
            f"Refused: this step would raise epsilon to {epsilon:.4g} at delta={delta:g}, "
            f"past the budget of {epsilon_budget:g}. Stop training here, or start a new job "
            "with a larger budget or a larger noise multiplier."
        )


@dataclass(frozen=True)
class SubsampledGaussianEvent:
    """``steps`` releases of a Poisson-subsampled Gaussian mechanism.

    ``noise_multiplier`` is unitless: the noise standard deviation divided by the L2
    sensitivity (the clipping norm). ``sample_rate`` is the probability that a unit takes part
    in one step. One DP-FedAvg round is ``SubsampledGaussianEvent(z, q)``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int = 1

    def __post_init__(self) -> None:
        z = as_real("noise_multiplier", self.noise_multiplier)
        q = as_real("sample_rate", self.sample_rate)
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
            raise TypeError(f"`steps` must be an int. Found {type(self.steps).__name__}.")
        raise_problems(
            [
                positive_problem("noise_multiplier", z),
                sample_rate_problem("sample_rate", q),
                None if self.steps >= 1 else f"`steps` must be >= 1. Found {self.steps}.",
            ]
        )
        object.__setattr__(self, "noise_multiplier", z)
        object.__setattr__(self, "sample_rate", q)
        object.__setattr__(self, "steps", int(self.steps))

    def to_json(self) -> dict[str, JSONValue]:
        """A JSON-serialisable dict (for checkpoints)."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    @classmethod
    def from_json(cls, data: object) -> SubsampledGaussianEvent:
        """Inverse of :meth:`to_json`; raises ``ValueError`` on a malformed entry."""
        if not isinstance(data, Mapping) or set(data) != {
            "noise_multiplier",
            "sample_rate",
            "steps",
        }:
            raise ValueError(
                "An event must be an object with exactly the keys noise_multiplier, "
                f"sample_rate, steps. Found {data!r}."
            )
        try:
            return cls(
                noise_multiplier=data["noise_multiplier"],
                sample_rate=data["sample_rate"],
                steps=data["steps"],
            )
        except TypeError as error:
            raise ValueError(f"Malformed event {data!r}: {error}") from error

    def describe(self) -> str:
        """What is accounted, for the manifest."""
        return "subsampled Gaussian (Mironov, Talwar, Zhang 2019; Opacus)"


_PRV_REFUSES: Final = (
    "The PRV accountant cannot compose distributed DP events (no privacy loss distribution of "
    "the Skellam or distributed discrete Gaussian mechanism is implemented). Use an accountant "
    "of kind 'rdp' for jobs with node-side noise."
)


PrivacyEvent: TypeAlias = SubsampledGaussianEvent | DistributedDpEvent
"""Any event a :class:`PrivacyAccountant` composes."""

_EVENT_TYPES: Final[dict[type[PrivacyEvent], str]] = {
    SubsampledGaussianEvent: "subsampled_gaussian",
    DistributedDpEvent: "distributed_dp",
}


def _check_event(event: object) -> PrivacyEvent:
    if not isinstance(event, SubsampledGaussianEvent | DistributedDpEvent):
        raise TypeError(
            "`event` must be a SubsampledGaussianEvent or a DistributedDpEvent. "
            f"Found {type(event).__name__}."
        )
    return event


def _event_to_json(event: PrivacyEvent) -> dict[str, JSONValue]:
    return {"type": _EVENT_TYPES[type(event)], **event.to_json()}


def _event_from_json(data: object) -> PrivacyEvent:
    """One history entry; an entry without ``type`` (state version 1) is a Gaussian event."""
    if not isinstance(data, Mapping) or "type" not in data:
        return SubsampledGaussianEvent.from_json(data)
    if data["type"] not in _EVENT_TYPES.values():
        raise ValueError(
            f"A history entry's `type` must be one of {sorted(_EVENT_TYPES.values())}. "
            f"Found {data['type']!r}."
        )
    fields = {key: value for key, value in data.items() if key != "type"}
    if data["type"] == "distributed_dp":
        return DistributedDpEvent.from_json(fields)
    return SubsampledGaussianEvent.from_json(fields)


@functools.lru_cache(maxsize=256)
def _gaussian_rdp(event: SubsampledGaussianEvent, orders: tuple[float, ...]) -> NDArray[np.float64]:
    """One step's RDP of the sampled Gaussian at ``orders`` (Opacus; cached)."""
    from opacus.accountants.analysis.rdp import compute_rdp  # Opacus imports torch: on use

    curve = np.asarray(
        compute_rdp(
            q=event.sample_rate,
            noise_multiplier=event.noise_multiplier,
            steps=1,
            orders=list(orders),
        ),
        dtype=np.float64,
    )
    curve.setflags(write=False)
    return curve


def rdp_curve(
    events: Sequence[PrivacyEvent], orders: Sequence[float] = RDP_ORDERS
) -> NDArray[np.float64]:
    """The RDP of the composition of ``events`` at ``orders``: the sum of their curves."""
    steps: Counter[PrivacyEvent] = Counter()
    for event in events:
        steps[replace(_check_event(event), steps=1)] += event.steps
    total = np.zeros(len(orders))
    key = tuple(float(order) for order in orders)
    for event, count in steps.items():
        if isinstance(event, SubsampledGaussianEvent):
            total += count * _gaussian_rdp(event, key)
        else:
            total += event.rdp(key) * count
    return total


def rdp_epsilon(
    events: Sequence[PrivacyEvent], *, delta: float, orders: Sequence[float] = RDP_ORDERS
) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` by RDP over ``orders`` (0.0 for none),
    converted by Opacus's ``get_privacy_spent`` (Balle et al. 2020, Theorem 21)."""
    raise_problems([delta_problem("delta", as_real("delta", delta))])
    if not events:
        return 0.0
    from opacus.accountants.analysis.rdp import get_privacy_spent

    epsilon, _ = get_privacy_spent(orders=list(orders), rdp=rdp_curve(events, orders), delta=delta)
    return float(epsilon)


def _opacus_history(
    events: Sequence[SubsampledGaussianEvent],
) -> list[tuple[float, float, int]]:
    """Opacus's history format, consecutive equal events merged (as Opacus's ``step`` does)."""
    history: list[tuple[float, float, int]] = []
    for event in events:
        if history and history[-1][:2] == (event.noise_multiplier, event.sample_rate):
            z, q, steps = history[-1]
            history[-1] = (z, q, steps + event.steps)
        else:
            history.append((event.noise_multiplier, event.sample_rate, event.steps))
    return history


def compute_epsilon(
    events: Sequence[PrivacyEvent],
    *,
    delta: float,
    kind: AccountantKind | str = AccountantKind.RDP,
) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (0.0 for none).

    Gaussian events alone: Opacus's RDP or PRV accountant, as always. With distributed DP
    events: RDP over :data:`RDP_ORDERS` (:func:`rdp_epsilon`); ``kind="prv"`` refuses them.
    """
    kind = AccountantKind(kind)
    raise_problems([delta_problem("delta", as_real("delta", delta))])
    if not events:
        return 0.0
    checked = [_check_event(event) for event in events]
    gaussian = [event for event in checked if isinstance(event, SubsampledGaussianEvent)]
    if len(gaussian) < len(checked):
        if kind is AccountantKind.PRV:
            raise ValueError(_PRV_REFUSES)
        return rdp_epsilon(checked, delta=delta)
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = RDPAccountant() if kind is AccountantKind.RDP else PRVAccountant()
    accountant.history = _opacus_history(gaussian)
    return float(accountant.get_epsilon(delta=delta))


class PrivacyAccountant:
    """Composes privacy events and enforces an optional epsilon budget.

    Events are :class:`SubsampledGaussianEvent` s and, for the RDP kind,
    :class:`~aggregation.ddp_accounting.DistributedDpEvent` s (see the module docstring).

    ``delta`` is the target delta at which epsilon is reported and the budget is enforced.
    """

    def __init__(
        self,
        kind: AccountantKind | str = AccountantKind.RDP,
        *,
        delta: float,
        epsilon_budget: float | None = None,
    ) -> None:
        try:
            self._kind = AccountantKind(kind)
        except ValueError:
            raise ValueError(
                f"`kind` must be one of {[k.value for k in AccountantKind]}. Found {kind!r}."
            ) from None
        self._delta = as_real("delta", delta)
        self._budget = None if epsilon_budget is None else as_real("epsilon_budget", epsilon_budget)
        raise_problems(
            [
                delta_problem("delta", self._delta),
                None if self._budget is None else positive_problem("epsilon_budget", self._budget),
            ]
        )
        self._history: list[PrivacyEvent] = []
        self._cache: dict[float, float] = {}

    @property
    def kind(self) -> AccountantKind:
        return self._kind

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def epsilon_budget(self) -> float | None:
        return self._budget

    @property
    def history(self) -> tuple[PrivacyEvent, ...]:
        """The composed events, oldest first (one per :meth:`compose` call)."""
        return tuple(self._history)

    @property
    def steps(self) -> int:
        """Total number of mechanism releases composed (rounds, for DP-FedAvg)."""
        return sum(event.steps for event in self._history)

    def get_epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent so far at ``delta`` (default: the accountant's delta)."""
        at = self._delta if delta is None else as_real("delta", delta)
        if at not in self._cache:
            self._cache[at] = compute_epsilon(self._history, delta=at, kind=self._kind)
        return self._cache[at]

    def epsilon_after(self, event: PrivacyEvent, delta: float | None = None) -> float:
        """Epsilon that composing ``event`` would give, without composing it."""
        at = self._delta if delta is None else as_real("delta", delta)
        return compute_epsilon([*self._history, event], delta=at, kind=self._kind)

    def would_exceed(self, event: PrivacyEvent) -> bool:
        """Whether composing ``event`` would take epsilon past the budget (never, without one)."""
        if self._budget is None:
            return False
        return self.epsilon_after(event) > self._budget

    def check(self, event: PrivacyEvent) -> None:
        """Raise :class:`PrivacyBudgetExceededError` if ``event`` would exceed the budget."""
        if self._budget is None:
            return
        epsilon = self.epsilon_after(event)
        if epsilon > self._budget:
            raise PrivacyBudgetExceededError(
                epsilon=epsilon, epsilon_budget=self._budget, delta=self._delta
            )

    def compose(self, event: PrivacyEvent) -> None:
        """Check ``event`` against the budget, then record it (state unchanged on refusal)."""
        event = _check_event(event)
        if isinstance(event, DistributedDpEvent) and self._kind is AccountantKind.PRV:
            raise ValueError(_PRV_REFUSES)
        epsilon = None
        if self._budget is not None:
            epsilon = self.epsilon_after(event)
            if epsilon > self._budget:
                raise PrivacyBudgetExceededError(
                    epsilon=epsilon, epsilon_budget=self._budget, delta=self._delta
                )
        self._history.append(event)
        self._cache.clear()
        if epsilon is not None:
            self._cache[self._delta] = epsilon

    def describe(self) -> str:
        """Which mechanisms this accountant has composed and how, for the manifest."""
        parts = list(dict.fromkeys(event.describe() for event in self._history))
        if self._kind is AccountantKind.PRV:
            method = "PRV accountant (Gopi, Lee, Wutschitz 2021; Opacus)"
        elif all(isinstance(event, SubsampledGaussianEvent) for event in self._history):
            method = "RDP accountant (Opacus; conversion of Balle et al. 2020)"
        else:
            method = "RDP composition over common orders (conversion of Balle et al. 2020)"
        return f"{method}: {'; '.join(parts) if parts else 'no releases yet'}"

    def measurements(self) -> Measurements:
        """Epsilon at delta so far, for the round's measurements."""
        result: Measurements = {
            "epsilon": self.get_epsilon(),
            "delta": self._delta,
            "accounted_steps": self.steps,
            "accountant": self._kind.value,
        }
        if self._budget is not None:
            result["epsilon_budget"] = self._budget
        return result

    def state_dict(self) -> dict[str, JSONValue]:
        """JSON-serialisable state, for checkpoints (round-trips with :meth:`load_state_dict`)."""
        return {
            "version": STATE_VERSION,
            "kind": self._kind.value,
            "delta": self._delta,
            "epsilon_budget": self._budget,
            "history": [_event_to_json(event) for event in self._history],
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Replace the history with the checkpoint's.

        The checkpoint must come from an accountant of the same kind and delta (the job's
        privacy parameters must not change on resume). Everything is validated before
        anything is replaced, so a rejected checkpoint leaves this accountant as it was.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"`state` must be a mapping. Found {type(state).__name__}.")
        expected = {"version", "kind", "delta", "epsilon_budget", "history"}
        if set(state) != expected:
            raise ValueError(
                f"Accountant state must have exactly the keys {sorted(expected)}. "
                f"Found {sorted(state)}."
            )
        if state["version"] not in (1, STATE_VERSION):
            raise ValueError(
                f"Unsupported accountant state version {state['version']!r}; "
                f"this fedbrain reads versions 1 and {STATE_VERSION}."
            )
        if state["kind"] != self._kind.value:
            raise ValueError(
                f"Checkpoint was written by a {state['kind']!r} accountant; this one is "
                f"{self._kind.value!r}. Resume with the job's original accountant kind."
            )
        if state["delta"] != self._delta:
            raise ValueError(
                f"Checkpoint delta {state['delta']!r} differs from this accountant's delta "
                f"{self._delta!r}. Resume with the job's original delta."
            )
        raw_history = state["history"]
        if not isinstance(raw_history, list):
            raise ValueError(f"`history` must be a list. Found {type(raw_history).__name__}.")
        history = [_event_from_json(item) for item in raw_history]
        if self._kind is AccountantKind.PRV and any(
            isinstance(event, DistributedDpEvent) for event in history
        ):
            raise ValueError(f"Checkpoint history has distributed DP events. {_PRV_REFUSES}")
        self._history = history
        self._cache.clear()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, object]) -> PrivacyAccountant:
        """A new accountant with the checkpoint's kind, delta, budget and history."""
        budget = state.get("epsilon_budget")
        kind = state.get("kind")
        delta = state.get("delta")
        if not isinstance(kind, str):
            raise ValueError(f"`kind` must be a string. Found {kind!r}.")
        if budget is not None and not isinstance(budget, numbers.Real):
            raise ValueError(f"`epsilon_budget` must be a number or null. Found {budget!r}.")
        if not isinstance(delta, numbers.Real):
            raise ValueError(f"`delta` must be a number. Found {delta!r}.")
        accountant = cls(
            kind, delta=float(delta), epsilon_budget=None if budget is None else float(budget)
        )
        accountant.load_state_dict(state)
        return accountant
