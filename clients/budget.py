"""A node's persistent privacy state: the epsilon spent per local dataset, and the SecAgg+
rounds it took part in -- both survive restarts and are shared safely by node processes.

Files in the node's state folder (``<node>/state``, see :mod:`clients.credentials`)::

    budget.json          {"version": 1, "datasets": {dataset: {job id: {"epsilon", "delta"}}}}
    participation.json   {"version": 1, "run_ids": [...], "rounds": [...]}
    .budget.lock, .participation.lock   (fcntl lock files)

Every read-modify-write holds an exclusive ``fcntl.flock`` on the store's lock file (waiting at
most ``lock_timeout`` seconds) and replaces the file atomically, so two node processes never
both spend the same budget and a crash leaves the old or the new file. A malformed file is an
error, never a reset: resetting would refund spent budget.

Composition is basic: a dataset's spent epsilon (delta) is the sum of its jobs' epsilons
(deltas) -- loose, but sound for any mix of mechanisms and accountants.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aggregation.secagg import ParticipationLog, SecAggProtocolError
from manifests.atomic import write_atomically
from manifests.manifest import JSONFormatError, loads_strict

__all__ = [
    "BUDGET_FILE",
    "PARTICIPATION_FILE",
    "BudgetExceededError",
    "BudgetStore",
    "BudgetStoreError",
    "ParticipationStore",
    "Reservation",
    "StoreLockTimeoutError",
    "dataset_key",
]

BUDGET_FILE: Final = "budget.json"
PARTICIPATION_FILE: Final = "participation.json"
_VERSION: Final = 1
_POLL_SECONDS: Final = 0.005


class BudgetStoreError(RuntimeError):
    """The node's state file is unreadable or malformed (fix or restore it; never delete it)."""


class StoreLockTimeoutError(BudgetStoreError):
    """Another process held the store's lock longer than the timeout."""


class BudgetExceededError(Exception):
    """A reservation that would take a dataset past its lifetime epsilon; nothing was recorded."""

    def __init__(
        self, *, dataset: str, job_id: str, epsilon: float, spent: float, lifetime: float
    ) -> None:
        self.dataset, self.job_id = dataset, job_id
        self.epsilon, self.spent, self.lifetime = epsilon, spent, lifetime
        super().__init__(
            f"job {job_id} needs epsilon {epsilon:.4g} on dataset {dataset!r}, which has spent "
            f"{spent:.4g} of its lifetime budget {lifetime:g} ({max(lifetime - spent, 0.0):.4g} "
            "left); refused, nothing was recorded"
        )


def dataset_key(data_dir: Path, modality: str) -> str:
    """The budget key of a local dataset: ``<modality>:<resolved data folder>``.

    Readable on purpose (the node's operator audits ``budget.json``). Moving or renaming the
    folder makes it a new dataset for the budget: keep data folders where they are.
    """
    if not isinstance(modality, str) or not modality:
        raise ValueError(f"`modality` must be a non-empty string. Found {modality!r}.")
    return f"{modality}:{Path(data_dir).expanduser().resolve()}"


@dataclass(frozen=True)
class Reservation:
    """A job's charge on a dataset: its ``epsilon``/``delta``, the dataset's totals after it,
    and whether this call charged anything (False when the job id was already recorded)."""

    dataset: str
    job_id: str
    epsilon: float
    delta: float
    spent_epsilon: float
    spent_delta: float
    lifetime: float
    charged: bool


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLockTimeoutError(
                        f"{path}: another node process held the lock for over {timeout:g} s"
                    ) from None
                time.sleep(_POLL_SECONDS)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_document(path: Path) -> dict[str, object] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise BudgetStoreError(f"{path}: cannot read it: {error.strerror}") from None
    try:
        document = loads_strict(data)
    except JSONFormatError as error:
        raise BudgetStoreError(f"{path}: {error}") from None
    if not isinstance(document, dict) or document.get("version") != _VERSION:
        raise BudgetStoreError(f"{path}: must be a JSON object with version {_VERSION}")
    return document


def _write_document(path: Path, document: dict[str, object]) -> None:
    text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomically(path, text.encode("utf-8"))


def _finite(value: object, name: str, *, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number. Found {type(value).__name__}.")
    number = float(value)
    if not (math.isfinite(number) and low <= number < high):
        raise ValueError(f"`{name}` must be finite, >= {low:g} and < {high:g}. Found {value}.")
    return number


class BudgetStore:
    """The epsilon (and delta) each local dataset has spent, per job id (see the module
    docstring). ``folder`` is created if needed."""

    def __init__(self, folder: Path, *, lock_timeout: float = 10.0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.folder / BUDGET_FILE
        self._lock = self.folder / ".budget.lock"
        self._timeout = lock_timeout

    def _load(self) -> dict[str, dict[str, tuple[float, float]]]:
        document = _read_document(self.path)
        if document is None:
            return {}
        datasets = document.get("datasets")
        if set(document) != {"version", "datasets"} or not isinstance(datasets, dict):
            raise BudgetStoreError(f"{self.path}: must hold exactly version and datasets")
        loaded: dict[str, dict[str, tuple[float, float]]] = {}
        for dataset, jobs in datasets.items():
            if not isinstance(jobs, dict):
                raise BudgetStoreError(f"{self.path}: dataset {dataset!r} must map job ids")
            loaded[dataset] = {}
            for job_id, record in jobs.items():
                try:
                    if not isinstance(record, dict) or set(record) != {"epsilon", "delta"}:
                        raise ValueError("must be {epsilon, delta}")
                    loaded[dataset][job_id] = (
                        _finite(record["epsilon"], "epsilon", low=0.0),
                        _finite(record["delta"], "delta", low=0.0, high=1.0),
                    )
                except (TypeError, ValueError) as error:
                    raise BudgetStoreError(
                        f"{self.path}: dataset {dataset!r}, job {job_id}: {error}"
                    ) from None
        return loaded

    def _save(self, datasets: dict[str, dict[str, tuple[float, float]]]) -> None:
        document: dict[str, object] = {
            "version": _VERSION,
            "datasets": {
                dataset: {j: {"epsilon": e, "delta": d} for j, (e, d) in jobs.items()}
                for dataset, jobs in datasets.items()
            },
        }
        _write_document(self.path, document)

    def spent(self, dataset: str) -> tuple[float, float]:
        """``(epsilon, delta)`` spent on ``dataset`` so far (0, 0 for a new one)."""
        with _locked(self._lock, self._timeout):
            jobs = self._load().get(dataset, {})
        return _totals(jobs)

    def jobs(self, dataset: str) -> dict[str, tuple[float, float]]:
        """Job id -> ``(epsilon, delta)`` charged on ``dataset``."""
        with _locked(self._lock, self._timeout):
            return dict(self._load().get(dataset, {}))

    def reserve(
        self, dataset: str, job_id: str, *, epsilon: float, delta: float, lifetime: float
    ) -> Reservation:
        """Charge ``job_id``'s whole ``epsilon`` (and ``delta``) to ``dataset`` once.

        Check first, then record: raises :class:`BudgetExceededError` (nothing recorded) when
        the dataset's spent epsilon plus this job's would exceed ``lifetime``. The same job id
        again (a resumed job) is not charged again; if it now needs more (e.g. a changed
        accountant), only the difference is charged, under the same check.
        """
        if not isinstance(dataset, str) or not dataset:
            raise ValueError(f"`dataset` must be a non-empty string. Found {dataset!r}.")
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"`job_id` must be a non-empty string. Found {job_id!r}.")
        epsilon = _finite(epsilon, "epsilon", low=0.0)
        delta = _finite(delta, "delta", low=0.0, high=1.0)
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
            raise TypeError(f"`lifetime` must be a number. Found {type(lifetime).__name__}.")
        if not lifetime > 0:
            raise ValueError(f"`lifetime` must be > 0 (inf for no limit). Found {lifetime}.")
        with _locked(self._lock, self._timeout):
            datasets = self._load()
            jobs = datasets.setdefault(dataset, {})
            before = jobs.get(job_id)
            if before is not None and epsilon <= before[0] and delta <= before[1]:
                spent_e, spent_d = _totals(jobs)
                return Reservation(
                    dataset, job_id, before[0], before[1], spent_e, spent_d, lifetime, False
                )
            updated = dict(jobs)
            updated[job_id] = (
                max(epsilon, before[0] if before else 0.0),
                max(delta, before[1] if before else 0.0),
            )
            spent_e, spent_d = _totals(updated)
            if spent_e > lifetime:
                raise BudgetExceededError(
                    dataset=dataset,
                    job_id=job_id,
                    epsilon=epsilon,
                    spent=_totals(jobs)[0],
                    lifetime=lifetime,
                )
            datasets[dataset] = updated
            self._save(datasets)
        charged_e, charged_d = updated[job_id]
        return Reservation(dataset, job_id, charged_e, charged_d, spent_e, spent_d, lifetime, True)


def _totals(jobs: dict[str, tuple[float, float]]) -> tuple[float, float]:
    return (
        math.fsum(e for e, _ in jobs.values()),
        math.fsum(d for _, d in jobs.values()),
    )


class ParticipationStore:
    """:class:`aggregation.secagg.ParticipationLog`, persisted: a node never joins an older or
    the same SecAgg+ round of a run, even after a restart."""

    def __init__(self, folder: Path, *, lock_timeout: float = 10.0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = self.folder / PARTICIPATION_FILE
        self._lock = self.folder / ".participation.lock"
        self._timeout = lock_timeout

    def _load(self) -> ParticipationLog:
        document = _read_document(self.path)
        if document is None:
            return ParticipationLog()
        if set(document) != {"version", "run_ids", "rounds"}:
            raise BudgetStoreError(f"{self.path}: must hold exactly version, run_ids and rounds")
        try:
            return ParticipationLog.from_record(document)
        except SecAggProtocolError as error:
            raise BudgetStoreError(f"{self.path}: {error}") from None

    def log(self) -> ParticipationLog:
        """The log as stored now."""
        with _locked(self._lock, self._timeout):
            return self._load()

    def check(self, run_id: int, server_round: int) -> None:
        """Raise :class:`aggregation.secagg.SecAggRefusedError` unless the round is newer."""
        self.log().check(run_id, server_round)

    def admit(self, run_id: int, server_round: int) -> None:
        """Check, then durably record ``server_round`` as the last round of ``run_id``."""
        with _locked(self._lock, self._timeout):
            log = self._load()
            log.admit(run_id, server_round)
            _write_document(self.path, {"version": _VERSION, **log.to_record()})
