"""The demo bases a scenario's jobs fine-tune (``base_checkpoint = "demo"``).

:func:`demo_base_problems` checks, when a scenario loads, that such a job gives its family's
demo-base sizes (so the manifest's ``model_config`` shows the trained sizes);
:func:`resolve_demo_bases` generates (or verifies) each family's base into
``<out>/bases/<family>-seed<seed>/`` before the jobs start and substitutes its path. Both
import PyTorch (:mod:`clients.pretrain`) only when a job names a demo base.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

from manifests.jobspec import DEMO_BASE, JobSpec

if TYPE_CHECKING:
    from simulations.scenario import Scenario, ScenarioJob

__all__ = [
    "BASES_DIR",
    "BaseEvent",
    "demo_base_folder",
    "demo_base_problems",
    "resolve_demo_bases",
]

BASES_DIR: Final = "bases"

_DEMO_SIZES = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "embedding_dim",
    "input_size",
    "sample_rate",
    "max_seq_length",
)


def demo_base_problems(spec: JobSpec) -> list[str]:
    """Why a job naming ``base_checkpoint = "demo"`` cannot fine-tune its family's demo base
    (empty when it can, or when it names no demo base): every size the base sets must be
    given, equal, so that the manifest's ``model_config`` shows the trained sizes.

    Imports :mod:`clients.pretrain` (PyTorch) only for such a job.
    """
    if spec.base_checkpoint != DEMO_BASE:
        return []
    from clients.models import family_for_base_model
    from clients.pretrain import DEMO_BASES

    try:
        family = family_for_base_model(spec.base_model)
    except ValueError as exc:
        return [f"base_checkpoint: {exc}"]
    base = DEMO_BASES.get(family)
    if base is None:
        return [f"base_checkpoint: there is no demo base of the {family} family. Found demo."]
    problems = []
    for name in _DEMO_SIZES:
        wanted = getattr(base, name, None)
        found = getattr(spec, name)
        if wanted is not None and found != wanted:
            problems.append(
                f"{name}: the {family} demo base (base_checkpoint = demo) has {name} = "
                f"{wanted}; set the same. Found {found}."
            )
    return problems


@dataclass(frozen=True)
class BaseEvent:
    """Progress of one demo base: ``seconds`` is None when it starts, then the time it took
    (``generated``: trained now, else an existing folder verified)."""

    family: str
    folder: Path
    generated: bool
    seconds: float | None = None


def demo_base_folder(out: Path, family: str, seed: int) -> Path:
    """Where the simulation keeps ``family``'s demo base pretrained from ``seed``."""
    return out / BASES_DIR / f"{family}-seed{seed}"


def resolve_demo_bases(
    scenario: Scenario, out: Path, *, on_base: Callable[[BaseEvent], None] | None = None
) -> Scenario:
    """``scenario`` with every ``base_checkpoint = "demo"`` replaced by the absolute path of
    the job family's demo base (:func:`clients.pretrain.pretrained_base`, pretrained from the
    scenario's seed on public demo data no node's data come from), generated into
    :func:`demo_base_folder` if absent, verified otherwise. The server and the simulated nodes
    share the folder; the manifest records the base by its digest. ``on_base`` hears each
    base start and finish. Raises :class:`clients.checkpoints.CheckpointError` for a folder
    that holds something else or was modified."""
    wanted = [job for job in scenario.jobs if job.spec.base_checkpoint == DEMO_BASE]
    if not wanted:
        return scenario
    from clients.models import family_for_base_model
    from clients.pretrain import pretrained_base

    folders: dict[str, Path] = {}
    for job in wanted:
        family = str(family_for_base_model(job.spec.base_model))
        if family in folders:
            continue
        folder = demo_base_folder(out, family, scenario.seed)
        generated = not (folder.is_dir() and any(folder.iterdir()))
        if on_base is not None:
            on_base(BaseEvent(family, folder, generated))
        started = time.monotonic()
        folders[family] = pretrained_base(family, folder, seed=scenario.seed).resolve()
        if on_base is not None:
            on_base(BaseEvent(family, folder, generated, time.monotonic() - started))

    def resolved(job: ScenarioJob) -> ScenarioJob:
        if job.spec.base_checkpoint != DEMO_BASE:
            return job
        folder = folders[str(family_for_base_model(job.spec.base_model))]
        return replace(job, spec=job.spec.model_copy(update={"base_checkpoint": str(folder)}))

    return replace(scenario, jobs=tuple(resolved(job) for job in scenario.jobs))
