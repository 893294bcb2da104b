"""Checkpoints of a run, so a restarted server resumes instead of starting over.

Layout of a run directory::

    <run_dir>/accountant.json                    privacy accountant, rewritten EVERY round
    <run_dir>/checkpoints/round-00006/           every `checkpoint_interval` rounds; last K kept
        weights.safetensors                      the global model: name -> float32
        optimizer.safetensors                    server optimizer arrays (FedAdam m, v), if any
        state.json                               round, optimizer/DP/accountant state, rng seed
                                                 material, training_config_hash, format version,
                                                 sha256 of the two files above

Atomicity: a checkpoint is written into a hidden temporary directory next to the others, its
files fsynced, and renamed into place with ``os.replace``: a crash leaves the previous
checkpoints as they were plus, at worst, a ``.tmp-*`` directory that readers ignore and the next
write removes. Old checkpoints are pruned only after the new one is in place. ``accountant.json``
is replaced atomically the same way (temporary file, fsync, ``os.replace``).

Privacy on resume: the accountant's state is written every round, right after the round is
composed and before it runs, not only with checkpoints, together with the state *before* that
round and a ``released`` mark that the server sets (:func:`mark_released`) the moment the round
first collects anything computed from private data (the plain replies of a round, or its
masked inputs under secure aggregation: from then on the server can produce the round's noised
result). When the server resumes from the checkpoint of round ``r`` after rounds ``r+1 .. s``
had been composed:

- rounds ``r+1 .. s-1`` ran to their end, so their noised results were computed and may have
  been seen (logs, ledger, dashboards): their cost stays spent, and redoing them composes them
  again -- epsilon is over-estimated after such a crash, never under-estimated;
- round ``s``, the one under way when the server died, is charged the same way if it was
  ``released``; if it was not (it died while waiting for nodes, before any private reply
  arrived), nothing of it exists anywhere and its charge is refunded: the accountant restarts
  from the state before ``s`` (:attr:`ResumePoint.interrupted` says which happened).

:func:`resume_point` applies these rules; the ledger records each interruption and whether it
was charged (``fedbrain runs show``).

Resuming a different job is refused: every checkpoint records the job's
``training_config_hash`` and loading demands the same one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, TypeAlias

import numpy as np
from numpy.typing import NDArray
from safetensors import SafetensorError
from safetensors.numpy import load_file

from aggregation.dp import DPState
from aggregation.server_opt import ServerOptState
from manifests.atomic import write_atomically
from manifests.quantize import write_safetensors

__all__ = [
    "ACCOUNTANT_FILE",
    "CHECKPOINTS_DIR",
    "FORMAT_VERSION",
    "AccountantSnapshot",
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointPolicy",
    "InterruptedRound",
    "ResumePoint",
    "checkpoint_path",
    "discard_checkpoints_after",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "mark_released",
    "read_accountant_state",
    "resume_point",
    "write_accountant_state",
    "write_checkpoint",
]

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
F32Array: TypeAlias = NDArray[np.float32]
Clock: TypeAlias = Callable[[], datetime]

FORMAT_VERSION: Final = 1
CHECKPOINTS_DIR: Final = "checkpoints"
ACCOUNTANT_FILE: Final = "accountant.json"
WEIGHTS_FILE: Final = "weights.safetensors"
OPTIMIZER_FILE: Final = "optimizer.safetensors"
STATE_FILE: Final = "state.json"
_ROUND_DIR: Final = re.compile(r"^round-(\d{5,})$")
_TEMP_PREFIXES: Final = (".tmp-", ".old-")
_STATE_KEYS: Final = frozenset(
    {
        "format_version",
        "round",
        "training_config_hash",
        "created_at",
        "parameter_names",
        "server_optimizer",
        "dp_state",
        "accountant",
        "rng",
        "files",
    }
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class CheckpointError(ValueError):
    """A checkpoint (or ``accountant.json``) is malformed, corrupt or unusable."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint belongs to another job (different ``training_config_hash``)."""


@dataclass(frozen=True)
class CheckpointPolicy:
    """Checkpoint every ``interval`` rounds; keep the last ``keep`` checkpoints."""

    interval: int = 1
    keep: int = 2

    def __post_init__(self) -> None:
        problems = [
            f"`{name}` must be an int >= 1. Found {value!r}."
            for name, value in (("interval", self.interval), ("keep", self.keep))
            if isinstance(value, bool) or not isinstance(value, int) or value < 1
        ]
        if problems:
            raise ValueError(" ".join(problems))

    def is_due(self, round_number: int) -> bool:
        """Whether the round that just finished gets a checkpoint."""
        return round_number >= 1 and round_number % self.interval == 0


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """What a checkpoint holds. ``weights`` keeps the model's parameter order.

    ``accountant`` is :meth:`PrivacyAccountant.state_dict` (``None`` without DP); ``rng`` is
    any JSON seed material the server needs to continue its random streams.
    """

    round: int
    training_config_hash: str
    weights: Mapping[str, F32Array]
    optimizer: ServerOptState
    dp_state: DPState | None = None
    accountant: Mapping[str, JSONValue] | None = None
    rng: Mapping[str, JSONValue] | None = None
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            problems.append(f"`round` must be an int >= 0. Found {self.round!r}.")
        if not isinstance(self.training_config_hash, str) or not self.training_config_hash:
            problems.append("`training_config_hash` must be the job's hash ('sha256:...').")
        if not isinstance(self.weights, Mapping) or not self.weights:
            problems.append("`weights` must map parameter names to float32 arrays (not empty).")
        else:
            for name, array in self.weights.items():
                if not isinstance(name, str) or not name or name == "__metadata__":
                    problems.append(f"weight name {name!r} is not usable in safetensors.")
                elif not isinstance(array, np.ndarray) or array.dtype != np.float32:
                    found = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
                    problems.append(f"weight {name!r} must be a float32 array. Found {found}.")
        if not isinstance(self.optimizer, ServerOptState):
            problems.append("`optimizer` must be a ServerOptState (the server optimizer's).")
        if self.dp_state is not None and not isinstance(self.dp_state, DPState):
            problems.append("`dp_state` must be a DPState or None.")
        if problems:
            raise ValueError(" ".join(problems))
        object.__setattr__(self, "weights", dict(self.weights))


@dataclass(frozen=True)
class AccountantSnapshot:
    """The accountant's state after ``round`` (from ``accountant.json``), the state before
    that round (``None`` in files written before fedbrain kept it) and whether the round had
    released anything computed from private data (``True`` when unknown)."""

    round: int
    state: Mapping[str, JSONValue]
    before: Mapping[str, JSONValue] | None = None
    released: bool = True


@dataclass(frozen=True)
class InterruptedRound:
    """The round that was under way when a run stopped, and whether its cost stays spent."""

    round: int
    charged: bool


@dataclass(frozen=True, eq=False)
class ResumePoint:
    """Where a restarted run continues: the latest checkpoint (``None``: from the initial
    model) and the accountant state to restore (the latest one, see the module docstring)."""

    checkpoint: Checkpoint | None
    accountant: Mapping[str, JSONValue] | None
    accountant_round: int
    interrupted: InterruptedRound | None = None

    @property
    def next_round(self) -> int:
        """The first round to (re)run."""
        return (0 if self.checkpoint is None else self.checkpoint.round) + 1


# --------------------------------------------------------------------------- file helpers


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _json_bytes(document: Mapping[str, object]) -> bytes:
    try:
        text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint state is not strict JSON ({exc}); NaN/infinity and non-JSON values "
            "cannot be checkpointed."
        ) from exc
    return (text + "\n").encode("utf-8")


def _write_json(path: Path, document: Mapping[str, object]) -> None:
    """Write ``document`` to ``path`` atomically (temp file in the same dir, fsync, replace)."""
    write_atomically(path, _json_bytes(document))
    _fsync_dir(path.parent)


def _read_json(path: Path) -> dict[str, object]:
    def reject(constant: str) -> object:
        raise CheckpointError(f"{path}: non-finite number {constant} in JSON")

    try:
        document = json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(document, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    return document


def _check_hash(found: object, expected: str, where: Path) -> None:
    if found != expected:
        raise CheckpointMismatchError(
            f"{where} belongs to a job with training_config_hash {found!r}, not this job's "
            f"{expected!r}. Refusing to resume a different job: resume with the original job "
            "file, or start the new job in a new run directory."
        )


def _check_version(found: object, where: Path) -> None:
    if found != FORMAT_VERSION:
        raise CheckpointError(
            f"{where} has format version {found!r}; this fedbrain reads version "
            f"{FORMAT_VERSION}. Resume with the fedbrain version that wrote it."
        )


# --------------------------------------------------------------------------- checkpoints


def checkpoint_path(run_dir: Path, round_number: int) -> Path:
    """``<run_dir>/checkpoints/round-<NNNNN>``."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"round-{round_number:05d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoint directories of the run, oldest round first."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _ROUND_DIR.match(path.name)) and path.is_dir()
    ]
    return [path for _, path in sorted(found)]


def _remove_leftovers(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith(_TEMP_PREFIXES):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _state_document(checkpoint: Checkpoint, created_at: datetime) -> dict[str, object]:
    meta, _ = checkpoint.optimizer.state_dict()
    dp = checkpoint.dp_state
    return {
        "format_version": FORMAT_VERSION,
        "round": checkpoint.round,
        "training_config_hash": checkpoint.training_config_hash,
        "created_at": created_at.astimezone(UTC).isoformat(),
        "parameter_names": list(checkpoint.weights),
        "server_optimizer": meta,
        "dp_state": None
        if dp is None
        else {"clipping_norm": dp.clipping_norm, "rounds": dp.rounds},
        "accountant": None if checkpoint.accountant is None else dict(checkpoint.accountant),
        "rng": None if checkpoint.rng is None else dict(checkpoint.rng),
        "files": {},
    }


def write_checkpoint(
    run_dir: Path, checkpoint: Checkpoint, *, keep: int = 2, clock: Clock = _utc_now
) -> Path:
    """Write ``checkpoint`` atomically as ``checkpoints/round-<NNNNN>``, then keep only the
    last ``keep`` checkpoints. Returns the checkpoint's directory."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"`keep` must be an int >= 1. Found {keep!r}.")
    if not isinstance(checkpoint, Checkpoint):
        raise TypeError(f"`checkpoint` must be a Checkpoint. Found {type(checkpoint).__name__}.")
    created_at = checkpoint.created_at or clock()
    if created_at.tzinfo is None:
        raise ValueError("the checkpoint clock must return timezone-aware datetimes (UTC).")
    document = _state_document(checkpoint, created_at)
    _json_bytes(document)  # refuse non-JSON state before touching the disk
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(root)
    final = checkpoint_path(run_dir, checkpoint.round)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        files: dict[str, str] = {}
        write_safetensors(checkpoint.weights, tmp / WEIGHTS_FILE)
        files[WEIGHTS_FILE] = _sha256(tmp / WEIGHTS_FILE)
        _, arrays = checkpoint.optimizer.state_dict()
        if arrays:
            write_safetensors(arrays, tmp / OPTIMIZER_FILE)
            files[OPTIMIZER_FILE] = _sha256(tmp / OPTIMIZER_FILE)
        _write_json(tmp / STATE_FILE, {**document, "files": files})
        _fsync_dir(tmp)
        if final.exists():  # rewriting a round: move the old one aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=root))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    _remove_leftovers(root)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale)
    return final


def _load_safetensors(path: Path) -> dict[str, NDArray[np.generic]]:
    try:
        loaded: dict[str, NDArray[np.generic]] = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return loaded


def load_checkpoint(path: Path, *, training_config_hash: str) -> Checkpoint:
    """Read and check the checkpoint directory ``path``.

    Raises :class:`CheckpointMismatchError` if it belongs to another job,
    :class:`CheckpointError` if its format version is unknown or it is malformed or corrupt
    (a file's sha256 differs from the one recorded in ``state.json``).
    """
    path = Path(path)
    state_path = path / STATE_FILE
    state = _read_json(state_path)
    _check_version(state.get("format_version"), state_path)
    _check_hash(state.get("training_config_hash"), training_config_hash, path)
    if set(state) != _STATE_KEYS:
        raise CheckpointError(
            f"{state_path} must have exactly the keys {sorted(_STATE_KEYS)}. Found {sorted(state)}."
        )
    files = state["files"]
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{state_path}: `files` must list {WEIGHTS_FILE} and its sha256.")
    for name, digest in files.items():
        if name not in (WEIGHTS_FILE, OPTIMIZER_FILE):
            raise CheckpointError(f"{state_path}: unexpected file {name!r} in `files`.")
        if not (path / name).is_file() or _sha256(path / name) != digest:
            raise CheckpointError(
                f"{path / name} is missing or does not match its recorded sha256: the "
                "checkpoint is corrupt. Delete this checkpoint directory to resume from the "
                "previous one."
            )
    names = state["parameter_names"]
    raw_weights = _load_safetensors(path / WEIGHTS_FILE)
    if not isinstance(names, list) or sorted(map(str, names)) != sorted(raw_weights):
        raise CheckpointError(f"{path}: `parameter_names` do not match {WEIGHTS_FILE}.")
    weights: dict[str, F32Array] = {}
    for name in names:
        array = raw_weights[str(name)]
        if array.dtype != np.float32:
            raise CheckpointError(f"{path}: weight {name!r} is {array.dtype}, not float32.")
        weights[str(name)] = array.astype(np.float32)
    arrays = _load_safetensors(path / OPTIMIZER_FILE) if OPTIMIZER_FILE in files else {}
    meta = state["server_optimizer"]
    if not isinstance(meta, dict):
        raise CheckpointError(f"{state_path}: `server_optimizer` must be an object.")
    try:
        optimizer = ServerOptState.from_state_dict(
            meta, {k: v.astype(np.float32) for k, v in arrays.items()}
        )
        dp_state = _dp_state(state["dp_state"])
        created_at = datetime.fromisoformat(str(state["created_at"]))
        checkpoint = Checkpoint(
            round=_as_round(state["round"]),
            training_config_hash=training_config_hash,
            weights=weights,
            optimizer=optimizer,
            dp_state=dp_state,
            accountant=_optional_object("accountant", state["accountant"]),
            rng=_optional_object("rng", state["rng"]),
            created_at=created_at,
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{state_path}: {exc}") from exc
    if checkpoint_path(path.parent.parent, checkpoint.round).name != path.name:
        raise CheckpointError(f"{path} holds round {checkpoint.round}; its name disagrees.")
    return checkpoint


def _as_round(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"`round` must be an int >= 0. Found {value!r}.")
    return value


def _optional_object(name: str, value: object) -> dict[str, JSONValue] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CheckpointError(f"`{name}` must be a JSON object or null. Found {value!r}.")
    document: dict[str, JSONValue] = value
    return document


def _dp_state(value: object) -> DPState | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"clipping_norm", "rounds"}:
        raise CheckpointError(f"`dp_state` must have clipping_norm and rounds. Found {value!r}.")
    norm, rounds = value["clipping_norm"], value["rounds"]
    if (
        isinstance(norm, bool)
        or not isinstance(norm, int | float)
        or not (math.isfinite(norm) and norm > 0)
    ):
        raise CheckpointError(f"`dp_state.clipping_norm` must be positive. Found {norm!r}.")
    return DPState(clipping_norm=float(norm), rounds=_as_round(rounds))


def latest_checkpoint(run_dir: Path, *, training_config_hash: str) -> Checkpoint | None:
    """The newest checkpoint of the run, checked as :func:`load_checkpoint` does; ``None``
    if there is none. A newest checkpoint that fails the checks raises (never falls back
    silently to an older one)."""
    found = list_checkpoints(run_dir)
    if not found:
        return None
    return load_checkpoint(found[-1], training_config_hash=training_config_hash)


def discard_checkpoints_after(run_dir: Path, round_number: int) -> list[Path]:
    """Delete checkpoints of rounds after ``round_number`` (a resume from an older one makes
    them a dead branch); returns what was deleted."""
    deleted = []
    for path in list_checkpoints(run_dir):
        match = _ROUND_DIR.match(path.name)
        if match and int(match.group(1)) > round_number:
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


# --------------------------------------------------------------------------- accountant


def write_accountant_state(
    run_dir: Path,
    *,
    round_number: int,
    accountant: Mapping[str, JSONValue],
    training_config_hash: str,
    before: Mapping[str, JSONValue] | None = None,
) -> Path:
    """Atomically replace ``<run_dir>/accountant.json`` with the state after ``round_number``
    (and ``before`` it; the round is not yet ``released``).

    Call it every round, right after the accountant composed the round (before the round's
    result is recorded): privacy spent is never forgotten on resume.
    """
    _as_round(round_number)
    if not isinstance(accountant, Mapping):
        raise TypeError(f"`accountant` must be a state_dict mapping. Found {type(accountant)}.")
    path = Path(run_dir) / ACCOUNTANT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(
        path,
        {
            "format_version": FORMAT_VERSION,
            "round": round_number,
            "training_config_hash": training_config_hash,
            "accountant": dict(accountant),
            "before": None if before is None else dict(before),
            "released": before is None,
        },
    )
    return path


def mark_released(run_dir: Path, round_number: int) -> bool:
    """Record that round ``round_number`` has collected something computed from private data
    (see the module docstring); True when this call set the mark. Atomic; idempotent."""
    path = Path(run_dir) / ACCOUNTANT_FILE
    if not path.is_file():
        return False
    document = _read_json(path)
    if document.get("round") != round_number or document.get("released") is True:
        return False
    _write_json(path, {**document, "released": True})
    return True


def read_accountant_state(run_dir: Path, *, training_config_hash: str) -> AccountantSnapshot | None:
    """``accountant.json`` of the run (``None`` if absent), checked against the job."""
    path = Path(run_dir) / ACCOUNTANT_FILE
    if not path.is_file():
        return None
    document = _read_json(path)
    _check_version(document.get("format_version"), path)
    _check_hash(document.get("training_config_hash"), training_config_hash, path)
    state = _optional_object("accountant", document.get("accountant"))
    if state is None:
        raise CheckpointError(f"{path}: `accountant` must be the accountant's state_dict.")
    before = _optional_object("before", document.get("before"))
    return AccountantSnapshot(
        round=_as_round(document.get("round")),
        state=state,
        before=before,
        released=before is None or document.get("released") is not False,
    )


def resume_point(run_dir: Path, *, training_config_hash: str) -> ResumePoint | None:
    """Where a restarted run continues, or ``None`` for a fresh run directory.

    The model, optimizer and DP state come from the latest checkpoint; the accountant from
    ``accountant.json`` when it is at least as recent (the conservative rule of the module
    docstring), else from the checkpoint.
    """
    checkpoint = latest_checkpoint(run_dir, training_config_hash=training_config_hash)
    snapshot = read_accountant_state(run_dir, training_config_hash=training_config_hash)
    done = 0 if checkpoint is None else checkpoint.round
    if snapshot is None or snapshot.round < done:
        if checkpoint is None:
            return None
        return ResumePoint(checkpoint, checkpoint.accountant, checkpoint.round)
    if snapshot.round == done:
        return ResumePoint(checkpoint, snapshot.state, snapshot.round)
    interrupted = InterruptedRound(snapshot.round, charged=snapshot.released)
    if snapshot.released or snapshot.before is None:
        return ResumePoint(checkpoint, snapshot.state, snapshot.round, interrupted)
    return ResumePoint(checkpoint, snapshot.before, snapshot.round - 1, interrupted)
