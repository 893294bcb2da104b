"""Artifact names: the ``<component>-<base-model>-<purpose>-v<major>`` rule and its parser.

The naming rule
---------------
``<component>-<base_model>-<purpose>[-int8]-v<major>``, except when ``base_model`` is itself
a catalog artifact id (``gpt-small-v1``): the new artifact is then *derived* from that
artifact, the component is implied by it and is not written, giving
``<base_model>-<purpose>[-int8]-v<major>``. Quantization appends ``-int8`` before the version.

- ``vision`` / ``vit-base16`` / ``embed`` -> ``vision-vit-base16-embed-v1``
- ``inference`` / ``gpt-small-v1`` / ``lm-finetune``, int8 -> ``gpt-small-v1-lm-finetune-int8-v1``
- ``sensing`` / ``camera`` / ``preproc`` -> ``sensing-camera-preproc-v1`` (the catalog id)

"Derived" means "is a catalog id", not "ends with ``-v<N>``": third-party bases carry
version suffixes too (SBERT's ``all-mpnet-base-v2``) and must keep their component prefix
(``text-all-mpnet-base-v2-embed-v1``).

Parsing uses the known purposes (:class:`~manifests.catalog.Task`) and the catalog: the
version and an ``-int8`` are stripped from the end, the longest known purpose is matched at
the end, and what remains is either a catalog id (derived) or ``<component>-<base_model>``.
Names that the rule would read differently (``sensing`` + ``camera-preproc-v1``, whose text is
the catalog id ``sensing-camera-preproc-v1``) are rejected when built, so every name round-trips.

Generated names
---------------
When a job asks for run-scoped naming, the name is
``{node_type}.{model_category}.{model_variant}.{run_name}.{timestamp}`` with
``model_category`` = the component and ``model_variant`` = the rest of the rule name
(``<base_model>-<purpose>[-int8]-v<major>``), so no part of the rule name is lost; timestamp
is UTC ``YYYYMMDDTHHMMSSZ``. Every part is sanitized to ``[a-z0-9-]`` (dots separate parts).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from manifests.catalog import CATALOG, Component, Task


class Quantization(StrEnum):
    """Post-training quantization targets (the ``-int8`` name suffix)."""

    INT8 = "int8"


MAX_NAME_LENGTH = 128
MAX_PART_LENGTH = 48
_BASE_MODEL_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_VERSION_RE = re.compile(r"^(?P<rest>.+)-v(?P<major>[1-9][0-9]*)$")
_NAME_CHARS_RE = re.compile(r"[a-z0-9._-]+")
_TIMESTAMP_SUFFIX_RE = re.compile(r"\.[0-9]{8}T[0-9]{6}Z$")
_PURPOSES = tuple(sorted((t.value for t in Task), key=len, reverse=True))
_COMPONENTS = frozenset(c.value for c in Component)


def _check_base_model(base_model: str) -> None:
    if not _BASE_MODEL_RE.fullmatch(base_model):
        raise ValueError(
            "`base_model` must be lowercase letters and digits in words joined by single "
            f"hyphens (e.g. vit-base16). Found {base_model!r}."
        )


@dataclass(frozen=True, slots=True)
class ArtifactName:
    """The parts of a rule name; ``str(name)`` formats it and :meth:`parse` reads it back.

    ``component`` is the prefix *written* in the name: ``None`` exactly when ``base_model``
    is a catalog id (a derived artifact); :attr:`implied_component` then gives the
    component of the base artifact.
    """

    component: Component | None
    base_model: str
    purpose: Task
    quantization: Quantization | None = None
    version: int = 1

    def __post_init__(self) -> None:
        _check_base_model(self.base_model)
        if isinstance(self.version, bool) or not isinstance(self.version, int):
            raise TypeError(f"`version` must be an int. Found {self.version!r}.")
        if self.version < 1:
            raise ValueError(f"`version` must be >= 1. Found {self.version}.")
        derived = self.base_model in CATALOG
        if derived and self.component is not None:
            raise ValueError(
                f"`component` must be None when base_model {self.base_model!r} is a catalog "
                "artifact: derived names do not carry a component. Use ArtifactName.for_form."
            )
        if not derived:
            if self.component is None:
                raise ValueError(
                    f"`component` is required: {self.base_model!r} is not a catalog artifact."
                )
            if f"{self.component}-{self.base_model}" in CATALOG:
                raise ValueError(
                    f"component {self.component!r} + base_model {self.base_model!r} spells "
                    "the catalog id "
                    f"{self.component}-{self.base_model}; use base_model="
                    f"{self.component}-{self.base_model} to derive from it."
                )

    @classmethod
    def for_form(
        cls,
        *,
        component: Component | str,
        base_model: str,
        purpose: Task | str,
        quantization: Quantization | str | None = None,
        version: int = 1,
    ) -> ArtifactName:
        """The name a learning-form selection produces (drops the component when derived)."""
        return cls(
            component=None if base_model in CATALOG else Component(component),
            base_model=base_model,
            purpose=Task(purpose),
            quantization=None if quantization is None else Quantization(quantization),
            version=version,
        )

    @property
    def derived(self) -> bool:
        """Whether the artifact is derived from a catalog artifact (``base_model``)."""
        return self.component is None

    @property
    def implied_component(self) -> Component:
        """The written component, or the base artifact's component for derived names."""
        if self.component is not None:
            return self.component
        return CATALOG[self.base_model].component

    @property
    def variant(self) -> str:
        """The name without the component prefix: ``<base>-<purpose>[-int8]-v<major>``."""
        quant = f"-{self.quantization}" if self.quantization else ""
        return f"{self.base_model}-{self.purpose}{quant}-v{self.version}"

    def __str__(self) -> str:
        if self.component is None:
            return self.variant
        return f"{self.component}-{self.variant}"

    @classmethod
    def parse(cls, name: str) -> ArtifactName:
        """Read a rule name back into its parts; ``ValueError`` saying why if it is not one."""
        expected = (
            "expected <component>-<base-model>-<purpose>[-int8]-v<major> or "
            "<catalog-id>-<purpose>[-int8]-v<major>"
        )
        version_match = _VERSION_RE.match(name)
        if version_match is None:
            raise ValueError(
                f"Cannot parse artifact name {name!r}: it must end with -v<major> "
                f"(e.g. -v1); {expected}."
            )
        rest = version_match["rest"]
        quantization: Quantization | None = None
        if rest.endswith(f"-{Quantization.INT8}"):
            quantization = Quantization.INT8
            rest = rest.removesuffix(f"-{Quantization.INT8}")
        purpose = next((p for p in _PURPOSES if rest.endswith(f"-{p}")), None)
        if purpose is None:
            raise ValueError(
                f"Cannot parse artifact name {name!r}: no known purpose before the version "
                f"(purposes: {', '.join(t.value for t in Task)}); {expected}."
            )
        stem = rest.removesuffix(f"-{purpose}")
        component: Component | None = None
        base_model = stem
        if stem not in CATALOG:
            prefix, _, base_model = stem.partition("-")
            if prefix not in _COMPONENTS or not base_model:
                raise ValueError(
                    f"Cannot parse artifact name {name!r}: {stem!r} is neither a catalog "
                    f"artifact nor <component>-<base-model> with a component among "
                    f"{', '.join(c.value for c in Component)}; {expected}."
                )
            component = Component(prefix)
        try:
            return cls(
                component, base_model, Task(purpose), quantization, int(version_match["major"])
            )
        except ValueError as exc:
            raise ValueError(f"Cannot parse artifact name {name!r}: {exc}") from exc


def name_problems(name: str) -> list[str]:
    """Every reason ``name`` is not acceptable as a user-given artifact name (empty if fine).

    Allowed: lowercase letters, digits, ``.``, ``_`` and ``-``; starting and ending with a
    letter or digit; no ``..``; at most :data:`MAX_NAME_LENGTH` characters. The one exception
    to lowercase is a final ``.YYYYMMDDTHHMMSSZ`` timestamp, so generated names are valid.
    Names end up as file names and archive members, hence the restrictions.
    """
    problems: list[str] = []
    if not name:
        return ["must not be empty."]
    if len(name) > MAX_NAME_LENGTH:
        problems.append(f"must be at most {MAX_NAME_LENGTH} characters. Found {len(name)}.")
    stamp = _TIMESTAMP_SUFFIX_RE.search(name)
    head = name[: stamp.start()] if stamp else name
    if head != head.lower():
        problems.append(f"must be lowercase. Found {name!r}; use {name.lower()!r}.")
    bad = sorted({c for c in name.lower() if not _NAME_CHARS_RE.fullmatch(c)})
    if bad:
        problems.append(
            "may contain only a-z, 0-9, '.', '_' and '-'. "
            f"Found {', '.join(repr(c) for c in bad)} in {name!r}."
        )
    if not (name[0].isascii() and name[0].isalnum() and name[-1].isascii() and name[-1].isalnum()):
        problems.append(f"must start and end with a letter or digit. Found {name!r}.")
    if ".." in name:
        problems.append(f"must not contain '..'. Found {name!r}.")
    return problems


def validate_artifact_name(name: str) -> str:
    """``name`` if it is an acceptable artifact name, else ``ValueError`` listing every problem."""
    problems = name_problems(name)
    if problems:
        raise ValueError("`artifact_name` " + " ".join(problems))
    return name


def sanitize_part(part: str) -> str:
    """A generated-name part: lowercase, ``[a-z0-9-]``, runs of others become one ``-``."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-")[:MAX_PART_LENGTH].strip("-")
    if not cleaned:
        raise ValueError(
            f"A generated artifact name part must contain a letter or digit. Found {part!r}."
        )
    return cleaned


def format_timestamp(moment: datetime) -> str:
    """``moment`` in UTC as ``YYYYMMDDTHHMMSSZ``; naive datetimes are refused."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(
            f"`created_at` must be timezone-aware (e.g. datetime.now(UTC)). Found {moment!r}."
        )
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def generated_name(
    *,
    node_type: str,
    model_category: str,
    model_variant: str,
    run_name: str,
    created_at: datetime,
) -> str:
    """``{node_type}.{model_category}.{model_variant}.{run_name}.{timestamp}``, sanitized."""
    parts = (node_type, model_category, model_variant, run_name)
    return ".".join([*(sanitize_part(p) for p in parts), format_timestamp(created_at)])
