"""Reliability score of a federated round (the result-aggregator), and the run verdict.

The score uses only what the server may legitimately see, at every privacy level: counts of
sampled / responding / dropped clients, federated-evaluation metrics (per client or
aggregated), the norm of the *aggregate* update and the DP noise-to-signal ratio.

Formula (``score_round``)::

    score = 0                                   if a fatal condition holds, else
    score = clip(1 - sum_k weight_k * severity_k, 0, 1)

Fatal conditions (score 0, reason given): nothing sampled, no client responded, any non-finite
round-level input (eval loss/accuracy, update norm, noise-to-signal), or divergence (eval loss >
``divergence_factor`` x the previous round's eval loss). One client's non-finite metric is not
fatal: that client's evaluation is left out of the means and spreads, with a reason (one bad
client must not veto a round).

Each penalty rule ``k`` is a :class:`PenaltyRule` ``(weight, threshold, saturation)``: its
severity is 0 on the good side of ``threshold``, grows linearly, and reaches 1 at
``saturation`` (for "lower is worse" values ``saturation < threshold``). Defaults, with
weights summing to 1 so that every rule at full severity gives 0:

==================  ======  =========  ==========  ========================================
rule                weight  threshold  saturation  measured value
==================  ======  =========  ==========  ========================================
participation       0.30    0.80       0.0         responded / sampled
dropout             0.10    0.20       1.0         sum(dropped_by_stage) / sampled
missing_evaluation  0.10    --         --          1 when no evaluation metric was reported
accuracy_spread     0.10    0.15       0.40        std of per-client accuracy
loss_spread         0.10    0.50       2.00        std / mean of per-client loss (used only
                                                   when clients report no accuracy)
loss_increase       0.15    0.05       1.00        (loss - previous loss) / previous loss
update_norm_ratio   0.10    3.0        10.0        update_norm / previous update_norm
noise_to_signal     0.15    1.0        10.0        DP noise std / aggregate signal (as given)
==================  ======  =========  ==========  ========================================

Every deduction comes with a reason such as ``"participation 0.55 < 0.8: -0.094"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType

import numpy as np

from aggregation.types import Measurements

__all__ = [
    "DEFAULT_POLICY",
    "PenaltyRule",
    "ReliabilityPolicy",
    "RoundObservation",
    "RoundReliability",
    "RunVerdict",
    "score_round",
]


NOISE_SIGMAS = 3.0
"""Loss changes within this many DP-noise standard errors are not counted by the trend rules."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class PenaltyRule:
    """A linear penalty: severity 0 at ``threshold``, 1 at ``saturation``, deduction weight*sev.

    When ``saturation > threshold`` values above the threshold are penalized (e.g. dropout);
    when ``saturation < threshold`` values below it are (e.g. participation).
    """

    weight: float
    threshold: float
    saturation: float

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not _is_number(value) or not math.isfinite(value):
                raise ValueError(f"PenaltyRule.{f.name} must be a finite number. Found {value!r}.")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"PenaltyRule.weight must be in [0, 1]. Found {self.weight}.")
        if self.threshold == self.saturation:
            raise ValueError(
                "PenaltyRule.saturation must differ from threshold (it is where the severity "
                f"reaches 1). Found both {self.threshold}."
            )

    @property
    def higher_is_worse(self) -> bool:
        """True when values above the threshold are penalized."""
        return self.saturation > self.threshold

    def severity(self, value: float) -> float:
        """How far ``value`` is past the threshold, from 0 (not past) to 1 (at saturation)."""
        raw = (value - self.threshold) / (self.saturation - self.threshold)
        return min(1.0, max(0.0, raw))


@dataclass(frozen=True)
class ReliabilityPolicy:
    """Weights and thresholds of the reliability score; see the module docstring for the table.

    ``divergence_factor`` (> 1): an eval loss above this multiple of the previous round's is
    divergence and scores 0. ``missing_evaluation_weight`` is deducted when a round reports
    no evaluation metric at all.
    """

    participation: PenaltyRule = PenaltyRule(weight=0.30, threshold=0.80, saturation=0.0)
    dropout: PenaltyRule = PenaltyRule(weight=0.10, threshold=0.20, saturation=1.0)
    missing_evaluation_weight: float = 0.10
    accuracy_spread: PenaltyRule = PenaltyRule(weight=0.10, threshold=0.15, saturation=0.40)
    loss_spread: PenaltyRule = PenaltyRule(weight=0.10, threshold=0.50, saturation=2.0)
    loss_increase: PenaltyRule = PenaltyRule(weight=0.15, threshold=0.05, saturation=1.0)
    update_norm_ratio: PenaltyRule = PenaltyRule(weight=0.10, threshold=3.0, saturation=10.0)
    noise_to_signal: PenaltyRule = PenaltyRule(weight=0.15, threshold=1.0, saturation=10.0)
    divergence_factor: float = 2.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in (
            "participation",
            "dropout",
            "accuracy_spread",
            "loss_spread",
            "loss_increase",
            "update_norm_ratio",
            "noise_to_signal",
        ):
            if not isinstance(getattr(self, name), PenaltyRule):
                problems.append(f"`{name}` must be a PenaltyRule")
        direction = {
            "participation": False,
            "dropout": True,
            "accuracy_spread": True,
            "loss_spread": True,
            "loss_increase": True,
            "update_norm_ratio": True,
            "noise_to_signal": True,
        }
        for name, higher_is_worse in direction.items():
            rule = getattr(self, name)
            if isinstance(rule, PenaltyRule) and rule.higher_is_worse != higher_is_worse:
                side = "above" if higher_is_worse else "below"
                problems.append(f"`{name}` must penalize values {side} its threshold")
        w = self.missing_evaluation_weight
        if not _is_number(w) or not 0.0 <= w <= 1.0:
            problems.append(f"`missing_evaluation_weight` must be in [0, 1], found {w!r}")
        d = self.divergence_factor
        if not _is_number(d) or not math.isfinite(d) or d <= 1.0:
            problems.append(f"`divergence_factor` must be a finite number > 1, found {d!r}")
        if problems:
            raise ValueError("invalid ReliabilityPolicy: " + "; ".join(problems) + ".")


DEFAULT_POLICY = ReliabilityPolicy()


@dataclass(frozen=True)
class RoundObservation:
    """What the server saw in one round.

    ``client_metrics`` holds one mapping per evaluating client with ``"loss"`` and optionally
    ``"accuracy"`` and ``"num_examples"``. ``eval_loss``/``eval_accuracy`` are the round's
    aggregates; when left ``None`` they are computed from ``client_metrics`` (weighted by
    ``num_examples`` where every client reports it). Spread needs ``client_metrics``.
    ``noise_to_signal`` is the DP noise standard deviation on the aggregate divided by the
    aggregate's norm without noise (or an estimate of it), ``None`` without DP.
    ``eval_loss_stderr``: the standard error of ``eval_loss`` that DP noise on the released
    sums causes (``None``: exact); the trend rules discount changes within it.

    Non-finite values are accepted here (they are what the score must catch); structurally
    impossible ones (negative counts, more responses than samples) raise ``ValueError``.
    """

    round_number: int
    sampled: int
    responded: int
    dropped_by_stage: Mapping[str, int] = field(default_factory=dict)
    client_metrics: Sequence[Mapping[str, float]] = ()
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    update_norm: float | None = None
    noise_to_signal: float | None = None
    eval_loss_stderr: float | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("round_number", "sampled", "responded"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"`{name}` must be a non-negative int, found {value!r}")
        if not problems and self.responded > self.sampled:
            problems.append(
                f"`responded` ({self.responded}) cannot exceed `sampled` ({self.sampled})"
            )
        for stage, count in self.dropped_by_stage.items():
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                problems.append(f"dropped_by_stage[{stage!r}] must be a non-negative int")
        dropped = sum(c for c in self.dropped_by_stage.values() if isinstance(c, int))
        if isinstance(self.sampled, int) and dropped > self.sampled:
            problems.append(f"{dropped} clients dropped but only {self.sampled} were sampled")
        for i, metrics in enumerate(self.client_metrics):
            if "loss" not in metrics:
                problems.append(f"client_metrics[{i}] has no 'loss'")
            for key, value in metrics.items():
                if not _is_number(value):
                    problems.append(f"client_metrics[{i}][{key!r}] must be a number")
        for name in (
            "eval_loss",
            "eval_accuracy",
            "update_norm",
            "noise_to_signal",
            "eval_loss_stderr",
        ):
            value = getattr(self, name)
            if value is not None and not _is_number(value):
                problems.append(f"`{name}` must be a number or None, found {value!r}")
            elif value is not None and name != "eval_loss" and value < 0:
                problems.append(f"`{name}` must not be negative, found {value}")
        acc = self.eval_accuracy
        if _is_number(acc) and acc is not None and math.isfinite(acc) and acc > 1.0:
            problems.append(f"`eval_accuracy` is a fraction in [0, 1], found {acc}")
        if problems:
            raise ValueError("invalid RoundObservation: " + "; ".join(problems) + ".")
        object.__setattr__(self, "dropped_by_stage", MappingProxyType(dict(self.dropped_by_stage)))
        object.__setattr__(
            self, "client_metrics", tuple(MappingProxyType(dict(m)) for m in self.client_metrics)
        )

    @property
    def participation(self) -> float:
        """responded / sampled (0 when nothing was sampled)."""
        return self.responded / self.sampled if self.sampled else 0.0

    @property
    def dropout(self) -> float:
        """Clients that dropped at any stage / sampled (0 when nothing was sampled)."""
        return sum(self.dropped_by_stage.values()) / self.sampled if self.sampled else 0.0

    def aggregate_loss(self) -> float | None:
        """``eval_loss``, or the (example-weighted) mean of the clients' losses."""
        if self.eval_loss is not None:
            return float(self.eval_loss)
        return self._client_mean("loss")

    def aggregate_accuracy(self) -> float | None:
        """``eval_accuracy``, or the (example-weighted) mean of the clients' accuracies."""
        if self.eval_accuracy is not None:
            return float(self.eval_accuracy)
        return self._client_mean("accuracy")

    def _client_mean(self, key: str) -> float | None:
        rows = [m for m in self.client_metrics if key in m]
        if not rows:
            return None
        values = [float(m[key]) for m in rows]
        if all("num_examples" in m and float(m["num_examples"]) > 0 for m in rows):
            weights = [float(m["num_examples"]) for m in rows]
            return float(np.average(values, weights=weights))
        return float(np.mean(values))


@dataclass(frozen=True)
class RoundReliability:
    """The score of one round, with a reason per deduction and the values it was computed from.

    ``components`` are the measured values (participation, dropout, loss_change, ...);
    ``deductions`` the amount each rule took off; ``fatal`` is True when a fatal condition
    (non-finite, divergence, no responses) forced the score to 0.
    """

    round_number: int
    score: float
    reasons: tuple[str, ...]
    components: Mapping[str, float]
    deductions: Mapping[str, float]
    fatal: bool

    def to_measurements(self) -> Measurements:
        """A flat mapping for the run ledger, keys prefixed ``reliability_``."""
        out: Measurements = {
            "reliability_round": self.round_number,
            "reliability_score": self.score,
            "reliability_fatal": self.fatal,
            "reliability_reasons": "; ".join(self.reasons),
        }
        for name, value in self.components.items():
            out[f"reliability_{name}"] = value
        for name, value in self.deductions.items():
            out[f"reliability_deduction_{name}"] = value
        return out


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def score_round(
    observation: RoundObservation,
    *,
    previous: RoundObservation | None = None,
    policy: ReliabilityPolicy = DEFAULT_POLICY,
) -> RoundReliability:
    """Score ``observation`` in [0, 1]; ``previous`` (the last round) enables the trend rules.

    Only ``previous``'s own loss and update norm are used, so callers keep one observation
    back, not a chain. See the module docstring for the formula and default policy.
    """
    obs = observation
    components: dict[str, float] = {
        "participation": obs.participation,
        "dropout": obs.dropout,
    }
    deductions: dict[str, float] = {}
    reasons: list[str] = []

    def fatal(reason: str) -> RoundReliability:
        return RoundReliability(
            round_number=obs.round_number,
            score=0.0,
            reasons=(*reasons, f"{reason}: score 0"),
            components=MappingProxyType(components),
            deductions=MappingProxyType(deductions),
            fatal=True,
        )

    def deduct(name: str, rule: PenaltyRule, value: float, label: str) -> None:
        components[name] = value
        penalty = rule.weight * rule.severity(value)
        if penalty > 0.0:
            op = ">" if rule.higher_is_worse else "<"
            deductions[name] = penalty
            reasons.append(f"{label} {_fmt(value)} {op} {_fmt(rule.threshold)}: -{penalty:.3f}")

    if obs.sampled == 0:
        return fatal("no clients sampled")
    if obs.responded == 0:
        return fatal(f"no client responded (0 of {obs.sampled} sampled)")
    usable: list[Mapping[str, float]] = []
    for i, metrics in enumerate(obs.client_metrics):
        bad = {key: value for key, value in metrics.items() if not math.isfinite(value)}
        if bad:
            shown = ", ".join(f"{key} {value}" for key, value in bad.items())
            reasons.append(f"evaluating client {i} left out: non-finite {shown}")
        else:
            usable.append(metrics)
    if len(usable) < len(obs.client_metrics):
        obs = replace(obs, client_metrics=usable)

    loss = obs.aggregate_loss()
    accuracy = obs.aggregate_accuracy()
    scalars = {
        "eval_loss": loss,
        "eval_accuracy": accuracy,
        "update_norm": obs.update_norm,
        "noise_to_signal": obs.noise_to_signal,
    }
    for name, value in scalars.items():
        if value is not None and not math.isfinite(value):
            return fatal(f"non-finite {name} ({value})")
        if value is not None:
            components[name] = float(value)

    prev_loss = previous.aggregate_loss() if previous is not None else None
    if loss is not None and prev_loss is not None and math.isfinite(prev_loss) and prev_loss > 0:
        # DP noise on both losses: only what exceeds NOISE_SIGMAS standard errors counts.
        prev_err = previous.eval_loss_stderr if previous is not None else None
        noise = NOISE_SIGMAS * math.hypot(obs.eval_loss_stderr or 0.0, prev_err or 0.0)
        change = (loss - prev_loss) / prev_loss
        components["loss_change"] = change
        if noise:
            components["loss_change_noise"] = noise / prev_loss
        if loss - noise > policy.divergence_factor * prev_loss:
            return fatal(
                f"divergence: eval loss {_fmt(loss)} > {_fmt(policy.divergence_factor)} x "
                f"previous {_fmt(prev_loss)}"
                + (f" (beyond DP noise of {_fmt(noise)})" if noise else "")
            )
        beyond = max(0.0, loss - prev_loss - noise) / prev_loss if noise else change
        deduct("loss_change", policy.loss_increase, beyond, "eval loss change")

    deduct("participation", policy.participation, obs.participation, "participation")
    deduct("dropout", policy.dropout, obs.dropout, "dropout")

    if loss is None and accuracy is None:
        penalty = policy.missing_evaluation_weight
        if penalty > 0.0:
            deductions["missing_evaluation"] = penalty
            reasons.append(f"no federated evaluation reported: -{penalty:.3f}")

    accuracies = [float(m["accuracy"]) for m in obs.client_metrics if "accuracy" in m]
    losses = [float(m["loss"]) for m in obs.client_metrics]
    if len(accuracies) >= 2:
        spread = float(np.std(accuracies))
        deduct("accuracy_spread", policy.accuracy_spread, spread, "client accuracy std")
    elif len(losses) >= 2:
        mean = float(np.mean(losses))
        cv = float(np.std(losses)) / abs(mean) if mean != 0 else 0.0
        deduct("loss_spread", policy.loss_spread, cv, "client loss std/mean")

    prev_norm = previous.update_norm if previous is not None else None
    if (
        obs.update_norm is not None
        and prev_norm is not None
        and math.isfinite(prev_norm)
        and prev_norm > 0
    ):
        ratio = obs.update_norm / prev_norm
        deduct("update_norm_ratio", policy.update_norm_ratio, ratio, "update norm ratio")

    if obs.noise_to_signal is not None:
        deduct("noise_to_signal", policy.noise_to_signal, obs.noise_to_signal, "noise-to-signal")

    score = min(1.0, max(0.0, 1.0 - math.fsum(deductions.values())))
    return RoundReliability(
        round_number=obs.round_number,
        score=score,
        reasons=tuple(reasons),
        components=MappingProxyType(components),
        deductions=MappingProxyType(deductions),
        fatal=False,
    )


@dataclass(frozen=True)
class RunVerdict:
    """Whether a run's result is reliable enough to be signed and published.

    A run passes when all hold: it has at least one round; the final round's score >=
    ``threshold``; the mean score over the last ``window`` rounds (fewer if the run is
    shorter) >= ``threshold``; no round in that window was fatal (non-finite, divergence, no
    responses). Every failed condition adds a reason.
    """

    passed: bool
    threshold: float
    final_score: float
    window_mean: float
    window: int
    reasons: tuple[str, ...]

    @classmethod
    def from_rounds(
        cls, rounds: Sequence[RoundReliability], *, threshold: float, window: int = 5
    ) -> RunVerdict:
        """Judge the run from its rounds' reliability, in round order."""
        if not _is_number(threshold) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"`threshold` must be in [0, 1]. Found {threshold!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"`window` must be an int >= 1. Found {window!r}.")
        if not rounds:
            return cls(False, threshold, 0.0, 0.0, window, ("no rounds were scored",))
        last = rounds[-window:]
        final = rounds[-1].score
        mean = math.fsum(r.score for r in last) / len(last)
        reasons: list[str] = []
        if final < threshold:
            reasons.append(
                f"final round {rounds[-1].round_number} score {final:.3f} < threshold "
                f"{threshold:.3f}"
            )
        if mean < threshold:
            reasons.append(
                f"mean score of the last {len(last)} round(s) {mean:.3f} < threshold "
                f"{threshold:.3f}"
            )
        for r in last:
            if r.fatal:
                why = r.reasons[-1] if r.reasons else "fatal"
                reasons.append(f"round {r.round_number} in the last {len(last)} failed: {why}")
        return cls(not reasons, threshold, final, mean, window, tuple(reasons))
