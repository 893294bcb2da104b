"""A node's own privacy policy (a TOML file the node owns) and its persistent budget.

The server may be malicious (see DESIGN.md, "Threat model"), so a node decides for itself
which jobs it trains for: :meth:`NodePolicy.check` derives the job's privacy parameters from the
(signed) job alone, with the same code the node trains with (:mod:`clients.jobs`), and refuses a
job whose level, DP unit, epsilon, delta or SecAgg+ settings fall outside the policy.
:class:`BudgetStore` then charges the job's epsilon to the local dataset, across runs and
restarts; :class:`ParticipationStore` keeps the SecAgg+ "never an older or the same round of a
run" rule across restarts.

**Levels.** ``dp`` and ``secure-agg`` protect against different things (DP bounds what the
released model says about one unit; secure aggregation hides each update from the server), so
they are not comparable. Levels are ordered component-wise on (uses DP, uses secure
aggregation): ``none < dp < dp+secure-agg`` and ``none < secure-agg < dp+secure-agg``. A rule's
``min_privacy_level`` admits a job's level when the level has every protection the minimum has:
``dp`` admits ``dp`` and ``dp+secure-agg``; ``secure-agg`` admits ``secure-agg`` and
``dp+secure-agg``. Note that at level ``dp`` the server adds the noise and sees each clipped
update: against a malicious server only ``dp+secure-agg`` keeps the guarantee (the default).

**Epsilon.** A job's worst-case epsilon at its delta, over every planned release
(``num_rounds`` rounds plus the initial evaluation): example-level model jobs calibrate DP-SGD
to ``dp.target_epsilon`` (:func:`clients.jobs.dp_sgd_noise_multiplier`), so that is their
epsilon; node-level and sensing jobs compose :func:`clients.jobs.release_events` with
:func:`aggregation.accountant.compute_epsilon` (RDP); a job without DP has infinite epsilon. It
assumes the node takes part in at most the job's planned rounds, which the node must enforce.

**Budget.** Across jobs on one dataset, epsilons and deltas add (basic composition; loose but
sound for any mix of mechanisms). The policy file::

    operators = "file"              # or ["sha256:<key id>", ...]: accepted operator keys

    [default]                       # every field optional; absent = the safe default
    min_privacy_level = "dp+secure-agg"
    dp_units = ["example", "node"]
    max_epsilon = 10.0              # per job, at the job's delta
    lifetime_epsilon = 30.0         # per local dataset, over every job
    max_delta = 1e-5

    [node_types.encoder]            # overrides the default for a node type ...
    max_epsilon = 8.0

    [artifacts."sensing-iot-normalizer-v1"]   # ... and for one artifact (catalog id)
    max_epsilon = 4.0

    [secagg]                        # aggregation.secagg.SecAggPolicy
    min_clients = 3
    min_neighbours = 2
    min_threshold = 2
    max_corrupt_neighbours = 0

Rules merge field by field: an artifact rule over its node type's rule over ``[default]`` over
the safe defaults. ``max_epsilon``/``lifetime_epsilon`` may be ``inf`` (TOML) to opt out.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Final, Literal, cast

from aggregation.accountant import compute_epsilon
from aggregation.privacy import DpUnit, PrivacyLevel, WorkloadKind
from aggregation.secagg import SecAggPolicy
from clients.budget import (
    BudgetExceededError,
    BudgetStore,
    BudgetStoreError,
    ParticipationStore,
    Reservation,
    dataset_key,
)
from clients.jobs import job_privacy, release_events, update_length_for
from manifests import catalog
from manifests.catalog import NodeType, NotTrainableError
from manifests.jobspec import JobSpec
from manifests.keys import KEYID_PATTERN

__all__ = [
    "BudgetExceededError",
    "BudgetStore",
    "BudgetStoreError",
    "NodePolicy",
    "ParticipationStore",
    "PolicyDecision",
    "PolicyError",
    "PrivacyRule",
    "Reservation",
    "dataset_key",
    "level_admits",
    "load_policy",
    "parse_policy",
    "worst_case_privacy",
]

_BARE_KEY: Final = re.compile(r"^[A-Za-z0-9_-]+$")
_SECAGG_FLOORS: Final = {
    "min_clients": 3,
    "min_neighbours": 1,
    "min_threshold": 2,
    "max_corrupt_neighbours": 0,
}


class PolicyError(ValueError):
    """An invalid policy file; ``problems`` holds one ``"field: problem. Found X."`` each."""

    def __init__(self, problems: list[str] | tuple[str, ...], *, source: str | None = None) -> None:
        self.problems = tuple(problems)
        count = len(self.problems)
        where = f" {source}" if source else ""
        header = f"Invalid node policy{where} ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n".join([header, *(f"- {p}" for p in self.problems)]))


def level_admits(minimum: PrivacyLevel, level: PrivacyLevel) -> bool:
    """Whether ``level`` has every protection ``minimum`` has (the module's level order)."""
    return (level.uses_dp or not minimum.uses_dp) and (
        level.uses_secure_agg or not minimum.uses_secure_agg
    )


@dataclass(frozen=True, kw_only=True)
class PrivacyRule:
    """What a node accepts for one artifact, node type, or by default (the safe defaults)."""

    min_privacy_level: PrivacyLevel = PrivacyLevel.DP_SECURE_AGG
    dp_units: frozenset[DpUnit] = frozenset(DpUnit)
    max_epsilon: float = 10.0
    lifetime_epsilon: float = 30.0
    max_delta: float = 1e-5

    def __post_init__(self) -> None:
        problems = _rule_problems(_rule_values(self))
        if problems:
            raise ValueError("Invalid privacy rule: " + " ".join(problems))


def _rule_values(rule: PrivacyRule) -> dict[str, object]:
    return {f.name: getattr(rule, f.name) for f in fields(PrivacyRule)}


def _rule_problems(values: Mapping[str, object], where: str = "") -> list[str]:
    head = f"{where}." if where else ""
    problems: list[str] = []
    units = values["dp_units"]
    if not isinstance(units, frozenset) or not units:
        problems.append(f"{head}dp_units: must list at least one of node, example.")
    numbers: dict[str, float] = {}
    for name in ("max_epsilon", "lifetime_epsilon", "max_delta"):
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            problems.append(f"{head}{name}: must be a number. Found {value!r}.")
        else:
            numbers[name] = float(value)
    for name in ("max_epsilon", "lifetime_epsilon"):
        if name in numbers and not numbers[name] > 0:
            problems.append(f"{head}{name}: must be > 0. Found {numbers[name]:g}.")
    if "max_delta" in numbers and not 0 < numbers["max_delta"] < 1:
        problems.append(f"{head}max_delta: must be > 0 and < 1. Found {numbers['max_delta']:g}.")
    most, lifetime = numbers.get("max_epsilon"), numbers.get("lifetime_epsilon")
    if most is not None and lifetime is not None and lifetime < most:
        problems.append(
            f"{head}lifetime_epsilon: must be at least max_epsilon ({most:g}), or no job could "
            f"spend its allowance. Found {lifetime:g}."
        )
    return problems


@dataclass(frozen=True)
class PolicyDecision:
    """Whether the node accepts a job, why not, and the job's worst-case (epsilon, delta)
    (``epsilon`` is ``inf`` without DP, ``None`` when it cannot be derived; ``delta`` is None
    without DP). ``rule`` names the rule applied; its ``lifetime_epsilon`` is what
    :meth:`BudgetStore.reserve` should be given."""

    accepted: bool
    reasons: tuple[str, ...]
    epsilon: float | None
    delta: float | None
    rule: str = "default"
    lifetime_epsilon: float = PrivacyRule.lifetime_epsilon


def worst_case_privacy(job: JobSpec) -> tuple[float, float | None]:
    """The job's worst-case ``(epsilon, delta)`` over every planned release, derived from the
    job alone (see the module docstring); ``(inf, None)`` without DP. ``ValueError`` when the
    job's DP cannot be derived."""
    privacy = job_privacy(job)
    if not job.privacy_level.uses_dp:
        return math.inf, None
    if privacy.delta is None:
        raise ValueError("a DP job needs dp.delta")
    if privacy.workload is WorkloadKind.MODEL and privacy.unit is DpUnit.EXAMPLE:
        if job.dp.target_epsilon is None:
            raise ValueError("example-level DP-SGD needs dp.target_epsilon")
        return float(job.dp.target_epsilon), privacy.delta
    events = release_events(
        job, noise_multiplier=privacy.noise_multiplier, update_length=update_length_for(job)
    )
    return compute_epsilon(events, delta=privacy.delta), privacy.delta


@dataclass(frozen=True, kw_only=True)
class NodePolicy:
    """The node's policy with every rule resolved (``node_types`` and ``artifacts`` hold
    effective rules, already merged over ``default``).

    ``operators``: the operator key ids the node accepts (None: every key of its operators
    file).
    """

    operators: tuple[str, ...] | None = None
    default: PrivacyRule = field(default_factory=PrivacyRule)
    node_types: Mapping[NodeType, PrivacyRule] = field(default_factory=dict)
    artifacts: Mapping[str, PrivacyRule] = field(default_factory=dict)
    secagg: SecAggPolicy = field(default_factory=SecAggPolicy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "node_types", MappingProxyType(dict(self.node_types)))
        object.__setattr__(self, "artifacts", MappingProxyType(dict(self.artifacts)))

    def rule_for(self, job: JobSpec) -> tuple[str, PrivacyRule]:
        """The rule that applies to ``job`` and its name: the job's artifact's, else its node
        type's, else the default."""
        try:
            entry = job.catalog_entry
        except NotTrainableError:
            return "default", self.default
        if entry.id in self.artifacts:
            return f"artifacts.{entry.id}", self.artifacts[entry.id]
        node_type = job.node_type or entry.node_type
        if node_type in self.node_types:
            return f"node_types.{node_type}", self.node_types[node_type]
        return "default", self.default

    def check(self, job: JobSpec) -> PolicyDecision:
        """Decide on ``job`` from the job alone (never from what a server says about it)."""
        name, rule = self.rule_for(job)
        level = job.privacy_level
        reasons: list[str] = []
        if not level_admits(rule.min_privacy_level, level):
            missing = [
                what
                for what, needed, has in (
                    ("differential privacy", rule.min_privacy_level.uses_dp, level.uses_dp),
                    (
                        "secure aggregation",
                        rule.min_privacy_level.uses_secure_agg,
                        level.uses_secure_agg,
                    ),
                )
                if needed and not has
            ]
            reasons.append(
                f"privacy level {level} is below the minimum {rule.min_privacy_level} of rule "
                f"{name}: this node requires {' and '.join(missing)}"
            )
        epsilon: float | None
        delta: float | None
        try:
            epsilon, delta = worst_case_privacy(job)
            unit = job_privacy(job).unit
        except ValueError as error:
            reasons.append(f"cannot derive the job's privacy parameters: {error}")
            epsilon, delta, unit = None, None, None
        if unit is not None and unit not in rule.dp_units:
            allowed = ", ".join(sorted(rule.dp_units))
            reasons.append(f"DP unit {unit} is not allowed by rule {name} (allowed: {allowed})")
        if epsilon is not None:
            reasons.extend(_epsilon_reasons(epsilon, delta, rule, name))
        if delta is not None and delta > rule.max_delta:
            reasons.append(f"delta {delta:g} exceeds max_delta {rule.max_delta:g} of rule {name}")
        if level.uses_secure_agg:
            reasons.extend(self._secagg_reasons(job))
        return PolicyDecision(
            accepted=not reasons,
            reasons=tuple(reasons),
            epsilon=epsilon,
            delta=delta,
            rule=name,
            lifetime_epsilon=rule.lifetime_epsilon,
        )

    def _secagg_reasons(self, job: JobSpec) -> list[str]:
        policy, fed, sec = self.secagg, job.federation, job.secagg
        reasons: list[str] = []
        n, k, t = fed.clients_per_round, sec.num_neighbours, sec.reconstruction_threshold
        if n is not None and n < policy.min_clients:
            reasons.append(
                f"federation.clients_per_round = {n} is below this node's SecAgg+ minimum "
                f"group secagg.min_clients = {policy.min_clients}"
            )
        if k is not None and k < policy.min_neighbours:
            reasons.append(
                f"secagg.num_neighbours = {k} is below this node's minimum "
                f"secagg.min_neighbours = {policy.min_neighbours}"
            )
        if t is not None and t < policy.min_threshold:
            reasons.append(
                f"secagg.reconstruction_threshold = {t} is below this node's floor "
                f"secagg.min_threshold = {policy.min_threshold}"
            )
        c = policy.max_corrupt_neighbours
        if t is not None and k is not None and 2 * t <= k + 1 + c:
            reasons.append(
                f"secagg.reconstruction_threshold = {t} does not satisfy 2t > k + 1 + c = "
                f"{k} + 1 + {c}: a split view of a node's share holders could rebuild both of "
                "its secrets"
            )
        return reasons

    def to_toml(self) -> str:
        """The effective policy as a policy file (every field filled in); reloads as equal."""
        lines = ["# effective node policy (defaults filled in)"]
        if self.operators is None:
            lines.append('operators = "file"')
        else:
            lines.append(f"operators = {_toml(list(self.operators))}")
        lines += ["", "[secagg]"]
        lines += [f"{n} = {getattr(self.secagg, n)}" for n in _SECAGG_FLOORS]
        tables = [("default", self.default)]
        tables += [(f"node_types.{t}", r) for t, r in sorted(self.node_types.items())]
        tables += [(f"artifacts.{_key(a)}", r) for a, r in sorted(self.artifacts.items())]
        for header, rule in tables:
            lines += ["", f"[{header}]"]
            for item in fields(PrivacyRule):
                value = getattr(rule, item.name)
                if isinstance(value, frozenset):
                    value = sorted(value)
                lines.append(f"{item.name} = {_toml(value)}")
        return "\n".join(lines) + "\n"


def _epsilon_reasons(
    epsilon: float, delta: float | None, rule: PrivacyRule, name: str
) -> list[str]:
    if math.isinf(epsilon):
        if math.isinf(rule.max_epsilon) and math.isinf(rule.lifetime_epsilon):
            return []
        return [
            f"the job applies no differential privacy (unbounded epsilon); rule {name} allows "
            f"at most epsilon {rule.max_epsilon:g} per job and {rule.lifetime_epsilon:g} per "
            "dataset"
        ]
    reasons: list[str] = []
    at = f" at delta {delta:g}" if delta is not None else ""
    if epsilon > rule.max_epsilon:
        reasons.append(
            f"the job's worst-case epsilon {epsilon:.4g}{at} exceeds max_epsilon "
            f"{rule.max_epsilon:g} of rule {name}"
        )
    if epsilon > rule.lifetime_epsilon:
        reasons.append(
            f"the job's worst-case epsilon {epsilon:.4g} alone exceeds lifetime_epsilon "
            f"{rule.lifetime_epsilon:g} of rule {name} (a dataset's whole budget)"
        )
    return reasons


def _key(key: str) -> str:
    """A TOML key: bare when it can be, else quoted."""
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    return str(value)


# --------------------------------------------------------------------------- parsing

_TOP_KEYS: Final = ("operators", "default", "node_types", "artifacts", "secagg")
_RULE_KEYS: Final = tuple(f.name for f in fields(PrivacyRule))


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, bool | str | list | float):
        return _toml(value)
    return str(value)


def _unknown(key: str, where: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]}?" if close else f" Known: {', '.join(known)}."
    return f"{where}{key}: is not a policy setting.{hint}"


def _number(value: object, *, delta: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"must be a number. Found {_show(value)}.")
    number = float(value)
    if math.isnan(number):
        raise ValueError("must be a number. Found nan.")
    if delta and not 0 < number < 1:
        raise ValueError(f"must be > 0 and < 1. Found {_show(value)}.")
    if not delta and number <= 0:
        raise ValueError(f"must be > 0 (inf to opt out). Found {_show(value)}.")
    return number


def _level(value: object) -> PrivacyLevel:
    if isinstance(value, str) and value in set(PrivacyLevel):
        return PrivacyLevel(value)
    raise ValueError(f"must be one of {', '.join(PrivacyLevel)}. Found {_show(value)}.")


def _units(value: object) -> frozenset[DpUnit]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"must be a non-empty list of node, example. Found {_show(value)}.")
    units: list[DpUnit] = []
    for item in value:
        if not isinstance(item, str) or item not in set(DpUnit):
            raise ValueError(f"items must be node or example. Found {_show(item)}.")
        units.append(DpUnit(item))
    if len(set(units)) != len(units):
        raise ValueError(f"lists a unit twice. Found {_show(value)}.")
    return frozenset(units)


def _rule_fields(table: object, where: str, problems: list[str]) -> dict[str, object]:
    if not isinstance(table, dict):
        problems.append(f"{where}: must be a table. Found {_show(table)}.")
        return {}
    parsed: dict[str, object] = {}
    for key, value in table.items():
        try:
            if key == "min_privacy_level":
                parsed[key] = _level(value)
            elif key == "dp_units":
                parsed[key] = _units(value)
            elif key in ("max_epsilon", "lifetime_epsilon", "max_delta"):
                parsed[key] = _number(value, delta=key == "max_delta")
            else:
                problems.append(_unknown(key, f"{where}.", _RULE_KEYS))
        except ValueError as error:
            problems.append(f"{where}.{key}: {error}")
    return parsed


def _resolved(
    base: PrivacyRule, parsed: dict[str, object], where: str, problems: list[str]
) -> PrivacyRule:
    """``base`` with the ``parsed`` fields over it; ``base`` itself (and the problems) when the
    merged rule is invalid (e.g. lifetime_epsilon below max_epsilon)."""
    merged = _rule_values(base) | parsed
    found = _rule_problems(merged, where)
    if found:
        problems.extend(found)
        return base
    return PrivacyRule(
        min_privacy_level=cast(PrivacyLevel, merged["min_privacy_level"]),
        dp_units=cast(frozenset[DpUnit], merged["dp_units"]),
        max_epsilon=cast(float, merged["max_epsilon"]),
        lifetime_epsilon=cast(float, merged["lifetime_epsilon"]),
        max_delta=cast(float, merged["max_delta"]),
    )


def _operators(value: object) -> tuple[str, ...] | None:
    if value == "file":
        return None
    if not isinstance(value, list) or not value:
        raise ValueError(f'must be "file" or a non-empty list of key ids. Found {_show(value)}.')
    for item in value:
        if not isinstance(item, str) or not KEYID_PATTERN.match(item):
            raise ValueError(f"items must be key ids (sha256:<64 hex>). Found {_show(item)}.")
    if len(set(value)) != len(value):
        raise ValueError("lists a key id twice.")
    return tuple(value)


def _secagg(table: object, problems: list[str]) -> SecAggPolicy:
    if not isinstance(table, dict):
        problems.append(f"secagg: must be a table. Found {_show(table)}.")
        return SecAggPolicy()
    values: dict[str, int] = {}
    for key, value in table.items():
        if key not in _SECAGG_FLOORS:
            problems.append(_unknown(key, "secagg.", tuple(_SECAGG_FLOORS)))
        elif type(value) is not int:
            problems.append(f"secagg.{key}: must be a whole number. Found {_show(value)}.")
        elif value < _SECAGG_FLOORS[key]:
            problems.append(f"secagg.{key}: must be >= {_SECAGG_FLOORS[key]}. Found {value}.")
        else:
            values[key] = value
    return SecAggPolicy(**values)


def _keyed_tables(
    document: Mapping[str, object], name: str, valid: Literal["node_type", "artifact"]
) -> tuple[dict[str, object], list[str]]:
    table = document.get(name, {})
    if not isinstance(table, dict):
        return {}, [f"{name}: must be a table of tables. Found {_show(table)}."]
    known = tuple(NodeType) if valid == "node_type" else tuple(catalog.CATALOG)
    good: dict[str, object] = {}
    problems: list[str] = []
    for key, value in table.items():
        if key in known:
            good[key] = value
            continue
        close = catalog.suggest(key, known, n=1)
        what = "node type" if valid == "node_type" else "catalog artifact id"
        hint = f" Did you mean {close[0]}?" if close else ""
        problems.append(f"{name}.{_key(key)}: is not a {what}.{hint}")
    return good, problems


def parse_policy(document: Mapping[str, object], *, source: str | None = None) -> NodePolicy:
    """A policy from a parsed TOML document; :class:`PolicyError` listing every problem."""
    problems: list[str] = []
    for key in document:
        if key not in _TOP_KEYS:
            problems.append(_unknown(key, "", _TOP_KEYS))
    operators: tuple[str, ...] | None = None
    if "operators" in document:
        try:
            operators = _operators(document["operators"])
        except ValueError as error:
            problems.append(f"operators: {error}")
    secagg = _secagg(document.get("secagg", {}), problems)
    default = _resolved(
        PrivacyRule(),
        _rule_fields(document.get("default", {}), "default", problems),
        "default",
        problems,
    )
    type_tables, found = _keyed_tables(document, "node_types", "node_type")
    problems += found
    node_types: dict[NodeType, PrivacyRule] = {}
    for key, table in type_tables.items():
        where = f"node_types.{key}"
        parsed = _rule_fields(table, where, problems)
        node_types[NodeType(key)] = _resolved(default, parsed, where, problems)
    artifact_tables, found = _keyed_tables(document, "artifacts", "artifact")
    problems += found
    artifacts: dict[str, PrivacyRule] = {}
    for key, table in artifact_tables.items():
        where = f"artifacts.{key}"
        base = node_types.get(catalog.get(key).node_type, default)
        artifacts[key] = _resolved(base, _rule_fields(table, where, problems), where, problems)
    if problems:
        raise PolicyError(problems, source=source)
    return NodePolicy(
        operators=operators,
        default=default,
        node_types=node_types,
        artifacts=artifacts,
        secagg=secagg,
    )


def load_policy(path: Path, *, missing_ok: bool = False) -> NodePolicy:
    """The policy in the TOML file ``path``; :class:`PolicyError` listing every problem.
    With ``missing_ok``, a missing file is the safe defaults."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return NodePolicy()
        raise PolicyError([f"{path}: no such file."], source=str(path)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyError([f"{path}: cannot read it: {error}."], source=str(path)) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyError([f"{path}: not valid TOML: {error}."], source=str(path)) from None
    return parse_policy(document, source=str(path))
