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

Budget enforcement follows "check first, then update state": :meth:`PrivacyAccountant.compose`
refuses (raises :class:`PrivacyBudgetExceededError`) an event that would take epsilon past the
budget, and leaves its state untouched, so the server stops *before* the round runs.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from opacus.accountants import PRVAccountant, RDPAccountant

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
    "STATE_VERSION",
    "AccountantKind",
    "JSONValue",
    "PrivacyAccountant",
    "PrivacyBudgetExceededError",
    "SubsampledGaussianEvent",
    "as_real",
    "compute_epsilon",
    "delta_problem",
    "positive_problem",
    "raise_problems",
    "sample_rate_problem",
]

STATE_VERSION = 1


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
    events: Sequence[SubsampledGaussianEvent],
    *,
    delta: float,
    kind: AccountantKind | str = AccountantKind.RDP,
) -> float:
    """Epsilon at ``delta`` of the composition of ``events``, by Opacus (0.0 for none)."""
    kind = AccountantKind(kind)
    raise_problems([delta_problem("delta", as_real("delta", delta))])
    if not events:
        return 0.0
    accountant = RDPAccountant() if kind is AccountantKind.RDP else PRVAccountant()
    accountant.history = _opacus_history(events)
    return float(accountant.get_epsilon(delta=delta))


class PrivacyAccountant:
    """Composes :class:`SubsampledGaussianEvent` s and enforces an optional epsilon budget.

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
        self._history: list[SubsampledGaussianEvent] = []
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
    def history(self) -> tuple[SubsampledGaussianEvent, ...]:
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

    def epsilon_after(self, event: SubsampledGaussianEvent, delta: float | None = None) -> float:
        """Epsilon that composing ``event`` would give, without composing it."""
        at = self._delta if delta is None else as_real("delta", delta)
        return compute_epsilon([*self._history, event], delta=at, kind=self._kind)

    def would_exceed(self, event: SubsampledGaussianEvent) -> bool:
        """Whether composing ``event`` would take epsilon past the budget (never, without one)."""
        if self._budget is None:
            return False
        return self.epsilon_after(event) > self._budget

    def check(self, event: SubsampledGaussianEvent) -> None:
        """Raise :class:`PrivacyBudgetExceededError` if ``event`` would exceed the budget."""
        if self._budget is None:
            return
        epsilon = self.epsilon_after(event)
        if epsilon > self._budget:
            raise PrivacyBudgetExceededError(
                epsilon=epsilon, epsilon_budget=self._budget, delta=self._delta
            )

    def compose(self, event: SubsampledGaussianEvent) -> None:
        """Check ``event`` against the budget, then record it (state unchanged on refusal)."""
        if not isinstance(event, SubsampledGaussianEvent):
            raise TypeError(
                f"`event` must be a SubsampledGaussianEvent. Found {type(event).__name__}."
            )
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
            "history": [event.to_json() for event in self._history],
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
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"Unsupported accountant state version {state['version']!r}; "
                f"this fedbrain reads version {STATE_VERSION}."
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
        history = [SubsampledGaussianEvent.from_json(item) for item in raw_history]
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
