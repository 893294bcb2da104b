"""Simulation scenarios: which nodes hold which data, and which jobs they train.

A scenario is a TOML file (the embedded default is ``simulations/default.toml``):

- ``[simulation]`` -- ``name``, ``seed``, ``out`` (output folder; relative paths are relative
  to the working directory), optional overrides applied to every job (``rounds`` -- to the jobs
  that train a model, not to the one-round federated-analytics sensing jobs --, and
  ``privacy_level``), run settings (``round_timeout``, ``node_wait_timeout``,
  ``deterministic_noise``) and Ray resources (``num_cpus``: CPUs for the whole simulation,
  default every CPU of the machine; ``cpus_per_node``: CPUs reserved per running ClientApp).
- ``[[nodes]]`` -- node groups: ``type`` (``sensing``, ``encoder`` or ``inference``, the node
  types that train artifacts), ``count``, ``name`` (prefix of the node names, default the
  type), ``modalities`` (the demo data each node holds: ``vision``, ``audio``, ``text``,
  ``lm``, ``iot``), ``examples`` per node and modality (one number, or a table per modality;
  ``lm``/``text`` count sentences, ``iot`` sensor rows; default 64), ``partition`` (``"iid"``
  or ``{kind = "dirichlet", alpha = 0.5, min_per_class = 0}``), ``data_dir`` (real local data
  instead of demo data: a folder with one subfolder per node, taken in sorted order, each
  holding one folder per modality; ``examples`` and ``partition`` then do not apply) and
  ``faults`` (``[{node = 1, fail_on = ["train.secagg_masked@2"]}]``: node 1 of the group
  fails when it gets that message type in round 2; without ``@<round>``: in every round), as
  :class:`clients.node.Fault` reads them.
- ``[[jobs]]`` -- learning-form jobs, exactly the keys :meth:`JobSpec.from_mapping` accepts
  (with the nested ``federation``/``dp``/``secagg`` tables). ``base_checkpoint = "demo"``
  fine-tunes the project's demo base of the job's family (:mod:`clients.pretrain`): the job
  must then give that base's sizes (``hidden_size``, ``num_layers``, ``num_heads``, and
  ``embedding_dim`` / ``input_size`` / ``max_seq_length`` where the base sets them), which the
  manifest's ``model_config`` records; the runner generates the base into
  ``<out>/bases/<family>-seed<seed>/`` before the jobs start and substitutes its path
  (:func:`simulations.runner.resolve_demo_bases`).

Demo data are pooled per group and modality (``count * examples`` examples drawn from the
scenario seed) and then split across the group's nodes: ``iid`` shuffles and deals equal
shares; ``dirichlet`` gives each node Dirichlet(``alpha``) class proportions (labelled
modalities: vision, audio, text; the unlabelled ``lm`` and ``iot`` data are split into equal
contiguous shares -- for IoT each node gets its own time window).

:func:`load_scenario` validates the whole file and raises :class:`ScenarioError` listing *every*
problem, one ``"where: problem. Found X."`` line each (jobs are checked with the job spec's own
messages, prefixed with ``jobs[i]``).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from clients.demo_data import Modality
from clients.protocol import (
    EVALUATE,
    FIT,
    NODE_INFO,
    SECAGG_ADVERTISE,
    SECAGG_MASKED,
    SECAGG_SHARE,
    SECAGG_UNMASK,
)
from manifests.catalog import Component, NodeType, Task
from manifests.jobspec import JobSpec, JobSpecError, PrivacyLevel
from simulations.bases import demo_base_problems

__all__ = [
    "DEFAULT_SCENARIO",
    "MAX_NODES",
    "FaultSpec",
    "NodeGroup",
    "NodeSpec",
    "Overrides",
    "Partition",
    "PartitionKind",
    "Scenario",
    "ScenarioError",
    "ScenarioJob",
    "SimulationSettings",
    "load_scenario",
    "parse_scenario",
    "required_modality",
]

DEFAULT_SCENARIO = "default.toml"
"""The embedded default scenario (package data of ``simulations``)."""

TRAINING_NODE_TYPES: tuple[NodeType, ...] = (NodeType.SENSING, NodeType.ENCODER, NodeType.INFERENCE)
"""The node types that train catalog artifacts (the others run services)."""

FAULT_MESSAGE_TYPES: tuple[str, ...] = (
    NODE_INFO,
    FIT,
    SECAGG_ADVERTISE,
    SECAGG_SHARE,
    SECAGG_MASKED,
    SECAGG_UNMASK,
    EVALUATE,
)
DEFAULT_EXAMPLES = 64
"""Examples per node and modality when a group does not say."""
MAX_NODES = 10_000
"""The most virtual nodes of a scenario (all groups together). Every virtual node has a kit on
disk and its data, kit and credentials cached in the ClientApp actors' memory (the roster of a
1,000-node federation is about 260 KB, verified once per process and hard-linked into every
kit); :file:`simulations/cross_device.toml` runs 1,000 nodes within 4 GiB on two cores."""
_SEPARATE = "\n"  # joins several problems found by one validator
_FAULT_RE = re.compile(r"^(?P<type>[a-z_.]+)(?:@(?P<round>[0-9]+))?$")
_ANALYTICS_TASKS = frozenset({Task.PREPROC, Task.NORMALIZER})
_SENSING_MODALITY: Mapping[str, Modality] = {
    "camera": Modality.VISION,
    "audio": Modality.AUDIO,
    "iot": Modality.IOT,
}
_COMPONENT_MODALITY: Mapping[Component, Modality] = {
    Component.VISION: Modality.VISION,
    Component.AUDIO: Modality.AUDIO,
    Component.TEXT: Modality.TEXT,
    Component.INFERENCE: Modality.LM,
}


class ScenarioError(ValueError):
    """An invalid scenario; ``problems`` holds one actionable line per problem."""

    def __init__(self, problems: Sequence[str], *, source: str = "scenario") -> None:
        self.problems = tuple(problems)
        self.source = source
        count = len(self.problems)
        header = f"Invalid scenario {source} ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n".join([header, *(f"- {p}" for p in self.problems)]))


_FROZEN = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, protected_namespaces=())


class PartitionKind(StrEnum):
    """How a group's pooled demo data are split across its nodes."""

    IID = "iid"
    DIRICHLET = "dirichlet"


class Partition(BaseModel):
    """``iid``, or ``dirichlet`` with concentration ``alpha`` (small = few classes per node).

    ``min_partition_size``: the fewest examples a node may get (Dirichlet draws are retried).
    ``min_per_class``: after the Dirichlet draw, examples move from the nodes richest in a
    class to the nodes holding fewer than this many of it, so every node keeps every class
    (folder-derived labels then agree across nodes, and per-class evaluation has examples).
    """

    model_config = _FROZEN

    kind: PartitionKind = PartitionKind.IID
    alpha: float | None = Field(None, gt=0)
    min_partition_size: int = Field(2, ge=1)
    min_per_class: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: object) -> object:
        return {"kind": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _check_alpha(self) -> Self:
        if self.kind is PartitionKind.DIRICHLET and self.alpha is None:
            raise ValueError("dirichlet needs alpha (e.g. alpha = 0.5). Found none")
        if self.kind is PartitionKind.IID and self.alpha is not None:
            raise ValueError(f"alpha applies to dirichlet only. Found alpha = {self.alpha}")
        if self.kind is PartitionKind.IID and self.min_per_class:
            raise ValueError(
                f"min_per_class applies to dirichlet only. Found min_per_class = "
                f"{self.min_per_class}"
            )
        return self


class FaultSpec(BaseModel):
    """Node ``node`` (index within its group) fails on each ``"<message type>[@<round>]"``."""

    model_config = _FROZEN

    node: int = Field(ge=0)
    fail_on: tuple[str, ...] = Field(min_length=1)

    @field_validator("fail_on")
    @classmethod
    def _check_fail_on(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = []
        for item in value:
            match = _FAULT_RE.match(item)
            if match is None or match["type"] not in FAULT_MESSAGE_TYPES:
                bad.append(item)
        if bad:
            raise ValueError(
                "each entry must be '<message type>@<round>' (or '<message type>' for every "
                f"round), the message type one of {', '.join(FAULT_MESSAGE_TYPES)}. Found {bad}"
            )
        return value


class NodeGroup(BaseModel):
    """``count`` nodes of one ``type`` holding the same kinds of data."""

    model_config = _FROZEN

    type: NodeType
    count: int = Field(ge=1, le=MAX_NODES)
    name: str | None = Field(None, min_length=1, max_length=32, pattern=r"^[a-z0-9][a-z0-9-]*$")
    modalities: tuple[Modality, ...] = Field(min_length=1)
    examples: dict[Modality, int] = Field(default_factory=dict)
    partition: Partition = Field(default_factory=Partition)
    data_dir: Path | None = None
    faults: tuple[FaultSpec, ...] = ()

    @field_validator("type")
    @classmethod
    def _check_type(cls, value: NodeType) -> NodeType:
        if value not in TRAINING_NODE_TYPES:
            names = ", ".join(TRAINING_NODE_TYPES)
            raise ValueError(f"must be a node type that trains artifacts ({names}). Found {value}")
        return value

    @field_validator("modalities")
    @classmethod
    def _check_unique(cls, value: tuple[Modality, ...]) -> tuple[Modality, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"must not repeat a modality. Found {[str(m) for m in value]}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _default_examples(cls, data: object) -> object:
        if isinstance(data, Mapping) and "examples" not in data:
            return {**data, "examples": DEFAULT_EXAMPLES}
        return data

    @field_validator("examples", mode="before")
    @classmethod
    def _expand_examples(cls, value: object, info: ValidationInfo) -> object:
        """One number means the same number for every modality of the group."""
        if isinstance(value, int) and not isinstance(value, bool):
            modalities = info.data.get("modalities", ())
            return {m: value for m in modalities}
        return value

    @field_validator("examples")
    @classmethod
    def _check_examples(cls, value: dict[Modality, int]) -> dict[Modality, int]:
        bad = {str(m): n for m, n in value.items() if not 1 <= n <= 1_000_000}
        if bad:
            raise ValueError(f"must be between 1 and 1000000 per node. Found {bad}")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        problems = []
        extra = sorted(str(m) for m in set(self.examples) - set(self.modalities))
        missing = sorted(str(m) for m in set(self.modalities) - set(self.examples))
        if extra:
            problems.append(f"examples: has modalities the nodes do not hold: {extra}")
        if missing:
            problems.append(
                f"examples: gives no number for {missing} (one number applies to every "
                "modality; a table needs one entry per modality)"
            )
        for fault in self.faults:
            if fault.node >= self.count:
                problems.append(
                    f"faults: node {fault.node} does not exist (the group has {self.count} "
                    f"nodes, indices 0..{self.count - 1})"
                )
        if problems:
            raise ValueError(_SEPARATE.join(problems))
        return self

    @property
    def prefix(self) -> str:
        """The node-name prefix."""
        return self.name or str(self.type)

    def examples_for(self, modality: Modality) -> int:
        """Examples per node of ``modality``."""
        return self.examples[modality]


class SimulationSettings(BaseModel):
    """The ``[simulation]`` table."""

    model_config = _FROZEN

    name: str = Field("simulation", min_length=1, max_length=64)
    seed: int = Field(0, ge=0, lt=2**63)
    out: Path = Path("runs/simulate")
    rounds: int | None = Field(None, ge=1)
    privacy_level: PrivacyLevel | None = None
    deterministic_noise: bool = False
    round_timeout: float = Field(600.0, gt=0)
    node_wait_timeout: float = Field(120.0, gt=0)
    num_cpus: int | None = Field(None, ge=1)
    cpus_per_node: float = Field(1.0, gt=0)


@dataclass(frozen=True, kw_only=True)
class Overrides:
    """Command-line values over the scenario file (``None`` / empty = not given).

    ``nodes`` sets the node count of every group; ``only`` keeps the jobs whose artifact
    name or catalog id is listed.
    """

    rounds: int | None = None
    nodes: int | None = None
    privacy_level: str | None = None
    seed: int | None = None
    out: Path | None = None
    only: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class NodeSpec:
    """One simulated node: its global index, group, name, data and faults."""

    index: int
    group: int
    index_in_group: int
    name: str
    node_type: NodeType
    modalities: tuple[Modality, ...]
    data_dir: Path | None
    faults: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class ScenarioJob:
    """A validated job of the scenario."""

    index: int
    spec: JobSpec
    artifact_name: str
    catalog_id: str
    node_type: NodeType
    modality: Modality

    @property
    def is_analytics(self) -> bool:
        """Whether the job is federated analytics (a sensing normalizer, one round)."""
        return self.spec.task in _ANALYTICS_TASKS


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A validated scenario with the overrides applied."""

    source: str
    settings: SimulationSettings
    groups: tuple[NodeGroup, ...]
    jobs: tuple[ScenarioJob, ...]
    nodes: tuple[NodeSpec, ...] = field(default=())

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def out(self) -> Path:
        return self.settings.out

    def nodes_of(self, node_type: NodeType) -> tuple[NodeSpec, ...]:
        """The nodes of one type, in global order."""
        return tuple(n for n in self.nodes if n.node_type is node_type)

    def data_hash(self) -> str:
        """``sha256:`` hash of everything the materialized node data depend on."""
        payload = {
            "format": 1,
            "seed": self.seed,
            "groups": [g.model_dump(mode="json") for g in self.groups],
        }
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def required_modality(spec: JobSpec) -> Modality:
    """The kind of node data a job trains on."""
    if spec.component is Component.SENSING:
        return _SENSING_MODALITY[spec.catalog_entry.base_model]
    return _COMPONENT_MODALITY[spec.component]


# --------------------------------------------------------------------------- loading


def default_scenario_text() -> str:
    """The embedded default scenario's TOML."""
    return resources.files("simulations").joinpath(DEFAULT_SCENARIO).read_text("utf-8")


def load_scenario(path: Path | None = None, overrides: Overrides | None = None) -> Scenario:
    """Read, override and validate a scenario file (``None``: the embedded default)."""
    if path is None:
        source = f"<embedded {DEFAULT_SCENARIO}>"
        text = default_scenario_text()
        base_dir = Path.cwd()
    else:
        source = str(path)
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ScenarioError(
                [f"scenario file: cannot read {path}: {exc}."], source=source
            ) from exc
        base_dir = path.parent
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError([f"scenario file: not valid TOML: {exc}."], source=source) from exc
    return parse_scenario(data, base_dir=base_dir, source=source, overrides=overrides)


def parse_scenario(
    data: Mapping[str, object],
    *,
    base_dir: Path,
    source: str = "scenario",
    overrides: Overrides | None = None,
) -> Scenario:
    """Validate a scenario mapping (as read from TOML) with ``overrides`` applied.

    The simulation table, every node group and every job are validated on their own, so one
    broken part does not hide the problems of the others; the checks across parts (does a
    job have nodes with its data?) run when every node group is valid.
    """
    overrides = overrides or Overrides()
    values = _apply_overrides(dict(data), overrides)
    problems: list[str] = []
    for key in sorted(set(values) - set(_TOP_LEVEL)):
        problems.append(
            f"{key}: is not a scenario section (use [simulation], [[nodes]] and [[jobs]])."
        )
    settings = _validate(SimulationSettings, values.get("simulation", {}), "simulation", problems)
    raw_groups = _array(values, "nodes", "[[nodes]] group", problems)
    groups: list[NodeGroup] = []
    for index, raw in enumerate(raw_groups):
        group = _validate(NodeGroup, raw, f"nodes[{index}]", problems)
        if group is not None:
            groups.append(_resolve_group(group, base_dir))
    jobs = _check_jobs(_array(values, "jobs", "[[jobs]] job", problems), settings, problems)
    nodes: tuple[NodeSpec, ...] = ()
    if len(groups) == len(raw_groups):
        nodes = _node_specs(groups, problems)
        _cross_checks(groups, jobs, problems)
    jobs = _select(jobs, overrides.only, problems)
    problems = [_blame_option(p, overrides) for p in problems]
    if problems or settings is None:
        raise ScenarioError(problems, source=source)
    return Scenario(source=source, settings=settings, groups=tuple(groups), jobs=jobs, nodes=nodes)


_TOP_LEVEL = ("simulation", "nodes", "jobs")
_OPTION_KEYS = {
    "rounds": "simulation.rounds",
    "privacy_level": "simulation.privacy_level",
    "seed": "simulation.seed",
    "out": "simulation.out",
}


def _blame_option(problem: str, overrides: Overrides) -> str:
    """Name the command-line option when an overridden value is the problem."""
    for attr, key in _OPTION_KEYS.items():
        if getattr(overrides, attr) is not None and problem.startswith(f"{key}:"):
            option = "--" + attr.replace("_", "-")
            return f"{option} ({key}){problem[len(key) :]}"
    if overrides.nodes is not None and re.match(r"^nodes\[\d+\]\.count:", problem):
        return f"--nodes ({problem.split(':', 1)[0]}):{problem.split(':', 1)[1]}"
    return problem


_M = TypeVar("_M", bound=BaseModel)


def _validate(model: type[_M], raw: object, where: str, problems: list[str]) -> _M | None:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():
            problems.extend(_describe(err, where))
        return None


def _array(values: Mapping[str, object], key: str, what: str, problems: list[str]) -> list[object]:
    raw = values.get(key)
    if raw is None or (isinstance(raw, list) and not raw):
        problems.append(f"{key}: the scenario needs at least one {what}.")
        return []
    if not isinstance(raw, list):
        problems.append(f"{key}: must be an array of tables ({what}s). Found {_show(raw)}.")
        return []
    return raw


def _apply_overrides(values: dict[str, object], overrides: Overrides) -> dict[str, object]:
    simulation = values.get("simulation", {})
    if isinstance(simulation, Mapping):
        simulation = dict(simulation)
        for key, value in (
            ("rounds", overrides.rounds),
            ("privacy_level", overrides.privacy_level),
            ("seed", overrides.seed),
            ("out", None if overrides.out is None else str(overrides.out)),
        ):
            if value is not None:
                simulation[key] = value
        values["simulation"] = simulation
    groups = values.get("nodes")
    if overrides.nodes is not None and isinstance(groups, list):
        values["nodes"] = [
            {**g, "count": overrides.nodes} if isinstance(g, Mapping) else g for g in groups
        ]
    return values


def _job_values(raw: Mapping[str, object], settings: SimulationSettings | None) -> dict[str, Any]:
    values: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    if settings is None:
        return values
    level = settings.privacy_level
    if level is not None:
        values["privacy_level"] = level.value
        # Tables that the new level does not use would be errors; the override drops them.
        if not level.uses_dp:
            values.pop("dp", None)
        if not level.uses_secure_agg:
            values.pop("secagg", None)
    task = values.get("task")
    if settings.rounds is not None and task not in {t.value for t in _ANALYTICS_TASKS}:
        federation = values.get("federation")
        federation = dict(federation) if isinstance(federation, Mapping) else {}
        federation["num_rounds"] = settings.rounds
        values["federation"] = federation
    return values


def _check_jobs(
    raw_jobs: Sequence[object], settings: SimulationSettings | None, problems: list[str]
) -> tuple[ScenarioJob, ...]:
    jobs: list[ScenarioJob] = []
    for index, raw in enumerate(raw_jobs):
        label = f"jobs[{index}]"
        if not isinstance(raw, Mapping):
            problems.append(f"{label}: must be a table of job settings. Found {_show(raw)}.")
            continue
        try:
            spec = JobSpec.from_mapping(_job_values(raw, settings))
        except JobSpecError as exc:
            problems.extend(f"{label}.{p}" for p in exc.problems)
            continue
        demo = demo_base_problems(spec)
        if demo:
            problems.extend(f"{label}.{p}" for p in demo)
            continue
        name = spec.artifact_name or str(spec.rule_name)
        jobs.append(
            ScenarioJob(
                index=index,
                spec=spec,
                artifact_name=name,
                catalog_id=spec.catalog_entry.id,
                node_type=spec.resolved_node_type,
                modality=required_modality(spec),
            )
        )
    seen: dict[str, int] = {}
    for job in jobs:
        first = seen.get(job.artifact_name)
        if first is not None:
            problems.append(
                f"jobs[{job.index}]: trains {job.artifact_name}, like jobs[{first}]. "
                "Give one of them another artifact_name or model_version."
            )
        seen.setdefault(job.artifact_name, job.index)
    return tuple(jobs)


def _resolve_group(group: NodeGroup, base_dir: Path) -> NodeGroup:
    if group.data_dir is None or group.data_dir.is_absolute():
        return group
    return group.model_copy(update={"data_dir": (base_dir / group.data_dir).resolve()})


def _node_specs(groups: Sequence[NodeGroup], problems: list[str]) -> tuple[NodeSpec, ...]:
    total = sum(g.count for g in groups)
    if total > MAX_NODES:
        problems.append(
            f"nodes: the groups hold {total} nodes in all; a scenario holds at most {MAX_NODES}."
        )
    nodes: list[NodeSpec] = []
    names: dict[str, int] = {}
    for g_index, group in enumerate(groups):
        label = f"nodes[{g_index}]"
        other = names.get(group.prefix)
        if other is not None:
            problems.append(
                f"{label}.name: {group.prefix!r} is already the name of nodes[{other}]; "
                "give each group of the same type a distinct name."
            )
        names.setdefault(group.prefix, g_index)
        folders: list[Path | None] = [None] * group.count
        if group.data_dir is not None:
            if not group.data_dir.is_dir():
                problems.append(
                    f"{label}.data_dir: must be an existing folder with one subfolder per node. "
                    f"Found {str(group.data_dir)!r}."
                )
            else:
                subdirs = sorted(
                    d for d in group.data_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
                )
                if len(subdirs) < group.count:
                    problems.append(
                        f"{label}.data_dir: holds {len(subdirs)} node folders, fewer than count "
                        f"({group.count}). Found {[d.name for d in subdirs]}."
                    )
                else:
                    folders = list(subdirs[: group.count])
                    for sub in subdirs[: group.count]:
                        missing = [str(m) for m in group.modalities if not (sub / m).is_dir()]
                        if missing:
                            problems.append(
                                f"{label}.data_dir: node folder {str(sub)!r} lacks the modality "
                                f"folders {missing}."
                            )
        faults = {f.node: f.fail_on for f in group.faults}
        for k in range(group.count):
            nodes.append(
                NodeSpec(
                    index=len(nodes),
                    group=g_index,
                    index_in_group=k,
                    name=f"{group.prefix}-{k}",
                    node_type=group.type,
                    modalities=group.modalities,
                    data_dir=folders[k],
                    faults=faults.get(k, ()),
                )
            )
    return tuple(nodes)


def _cross_checks(
    groups: Sequence[NodeGroup], jobs: Sequence[ScenarioJob], problems: list[str]
) -> None:
    for job in jobs:
        label = f"jobs[{job.index}] ({job.artifact_name})"
        of_type = [g for g in groups if g.type is job.node_type]
        if not of_type:
            problems.append(
                f"{label}: trains on {job.node_type} nodes, but the scenario has none. Add a "
                f'[[nodes]] group with type = "{job.node_type}".'
            )
            continue
        lacking = [
            i for i, g in enumerate(groups) if g in of_type and job.modality not in g.modalities
        ]
        if lacking:
            problems.append(
                f"{label}: needs {job.modality} data on every {job.node_type} node, but "
                f"{', '.join(f'nodes[{i}]' for i in lacking)} do not list it in modalities."
            )
        available = sum(g.count for g in of_type)
        per_round = job.spec.federation.clients_per_round
        if per_round is not None and per_round > available:
            problems.append(
                f"{label}.federation.clients_per_round: must not exceed the {available} "
                f"{job.node_type} nodes of the scenario. Found {per_round}."
            )


def _select(
    jobs: tuple[ScenarioJob, ...], only: Sequence[str], problems: list[str]
) -> tuple[ScenarioJob, ...]:
    if not only:
        return jobs
    wanted = set(only)
    selected = tuple(j for j in jobs if {j.artifact_name, j.catalog_id} & wanted)
    known = {name for j in jobs for name in (j.artifact_name, j.catalog_id)}
    unknown = sorted(wanted - known)
    if unknown and jobs:
        names = ", ".join(j.artifact_name for j in jobs)
        problems.append(f"--only: no job trains {', '.join(unknown)}. The jobs are: {names}.")
    return selected


# --------------------------------------------------------------------------- messages


def _loc(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in {"function-after", "function-before"} or part.startswith(
            ("function-", "json-or-python", "lax-or-strict", "tagged-union")
        ):
            continue
        else:
            text += f".{part}" if text else part
    return text or "scenario"


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    return json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)


def _describe(err: ErrorDetails, where: str) -> list[str]:
    inner = _loc(err["loc"])
    loc = where if inner == "scenario" else f"{where}.{inner}" if inner[0] != "[" else where + inner
    kind = err["type"]
    ctx = err.get("ctx", {})
    found = f" Found {_show(err['input'])}."
    if kind == "missing":
        return [f"{loc}: is required."]
    if kind == "extra_forbidden":
        return [f"{loc}: is not a scenario setting."]
    if loc.endswith(".examples") and kind == "dict_type":
        return [f"{loc}: must be a number or a table of numbers per modality.{found}"]
    if kind == "value_error":
        text = str(err["msg"]).removeprefix("Value error, ")
        return [f"{loc}: {line}." for line in text.split(_SEPARATE)]
    messages = {
        "enum": f"must be one of {ctx.get('expected')}.",
        "greater_than_equal": f"must be >= {ctx.get('ge')}.",
        "greater_than": f"must be > {ctx.get('gt')}.",
        "less_than_equal": f"must be <= {ctx.get('le')}.",
        "less_than": f"must be < {ctx.get('lt')}.",
        "too_short": f"must have at least {ctx.get('min_length')} entries.",
        "int_parsing": "must be a whole number.",
        "int_type": "must be a whole number.",
        "int_from_float": "must be a whole number.",
        "float_parsing": "must be a number.",
        "float_type": "must be a number.",
        "bool_type": "must be true or false.",
        "bool_parsing": "must be true or false.",
        "string_type": "must be text.",
        "string_pattern_mismatch": "must be lowercase letters, digits and hyphens.",
        "model_type": "must be a table.",
        "model_attributes_type": "must be a table.",
        "dict_type": "must be a table.",
        "tuple_type": "must be a list.",
        "path_type": "must be a path (text).",
    }
    return [f"{loc}: {messages.get(kind, str(err['msg']) + '.')}{found}"]
