"""Run a scenario on Flower's Simulation Engine: node data, keys, every job on one engine.

Output folder layout (``<out>``, from the scenario or ``--out``):

- ``data/node-<i>/<modality>/`` -- each node's data, exactly what
  :func:`clients.demo_data.write_demo_dataset` writes, split from per-group pools (see
  :mod:`simulations.scenario`); ``data/scenario-data.json`` records the hash of everything the
  data depend on, and data with the same hash are reused;
- ``keys/`` -- the signing key and the trusted-keys file (reused when present and valid);
- ``bases/<family>-seed<seed>/`` -- the demo bases that jobs with ``base_checkpoint = "demo"``
  fine-tune, generated before the jobs start (:func:`simulations.bases.resolve_demo_bases`;
  reused, after verifying their digest, when present);
- ``runs/<artifact_name>/`` -- one run folder per job (checkpoints, nodes.json, bundle);
- ``ledger.sqlite`` -- the run ledger every job writes (unless ``database_url`` names another);
- ``summary.json`` -- the outcome of every job, machine-readable;
- ``.fedbrain-simulate.lock`` -- held while a run uses the folder: one run at a time.

Paths recorded in the folder are relative to it, so a moved folder still resumes
(:mod:`simulations.outfolder`).

One ``flwr.simulation.run_simulation`` call runs every job (:mod:`simulations.engine`): every
node of the scenario is a SuperNode (partition id ``i`` = the ``i``-th node), each job sees only
the nodes of its node type, ``cpus_per_node`` CPUs per ClientApp and ``num_cpus`` (default:
every CPU) for Ray, so ClientApps train in parallel; Ray starts once and its ClientApp actors
import fedbrain once. The ServerApp runs in a thread of this process; its progress events drive
the display directly. Each bundle is verified against the generated trusted-keys file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from clients.demo_data import Modality, write_demo_dataset
from clients.partition import dirichlet_partition
from manifests.demo import write_keys
from manifests.keys import KeyVerificationError, SigningKey, TrustedKeys
from manifests.verify import BundleVerificationError, verify_bundle
from server.ledger import Ledger
from server.options import JobOutcome, JobStatus, ProgressEvent, RunOptions
from simulations.bases import BaseEvent, resolve_demo_bases
from simulations.federation import SimulatedFederation, provision_scenario
from simulations.outfolder import (
    RUN_MARKER,
    default_ledger_url,
    in_folder,
    locked_output_folder,
    new_run_id,
    outcome_json,
    previous_outcomes,
    resumable_run_id,
    write_run_marker,
)
from simulations.scenario import (
    NodeGroup,
    PartitionKind,
    Scenario,
    ScenarioJob,
)

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from clients.config import NodeConfig
    from simulations.engine import JobGrids

__all__ = [
    "DATA_MARKER",
    "ExitCode",
    "JobResult",
    "KeyFiles",
    "SimulationResult",
    "Verification",
    "files_digest",
    "materialize_data",
    "prepare_keys",
    "run_job",
    "run_scenario",
    "verify",
    "write_summary",
]

DATA_MARKER: Final = "scenario-data.json"
_LABELLED: Final = frozenset({Modality.VISION, Modality.AUDIO, Modality.TEXT})
_IOT_ROWS_PER_FILE: Final = 256
_KEY_VALIDITY: Final = timedelta(days=365)

logger = logging.getLogger(__name__)


class ExitCode:
    """Exit status of ``fedbrain simulate``.

    0: every job passed and its bundle verified. 1: a job FAILED (could not complete) or a
    bundle did not verify. 2: invalid scenario or options. 3: no failure, but at least one job
    was REJECTED by its reliability threshold (the run completed, the model was judged not
    reliable enough, so no bundle was signed) -- a distinct status, so scripts can tell "the
    pipeline broke" from "the pipeline worked and refused the model".
    """

    OK: Final = 0
    FAILED: Final = 1
    INVALID: Final = 2
    REJECTED: Final = 3


# =============================================================================== node data


def _derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from the scenario seed and labels (stable across runs and platforms)."""
    words = [p if isinstance(p, int) else int.from_bytes(p.encode(), "little") for p in parts]
    state = np.random.SeedSequence([w % 2**128 for w in words]).generate_state(2, np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


@dataclass(frozen=True)
class _Item:
    """One example of a pool: its label (-1 when unlabelled) and how to write it."""

    label: int
    relpath: str  # vision/audio: file path under the modality folder; text: class folder
    payload: bytes  # file bytes (vision/audio), a line (text/lm), a CSV row (iot)


def _folder_label(name: str) -> int:
    """The class index of a demo-data class folder (``<k>-<name>``)."""
    return int(name.split("-", 1)[0])


def _pool_items(modality: Modality, pool: Path) -> tuple[list[_Item], bytes]:
    """The pool's examples in generation order, and the CSV header (IoT only)."""
    if modality in (Modality.VISION, Modality.AUDIO):
        files = sorted((p for p in pool.rglob("*") if p.is_file()), key=lambda p: p.stem)
        return [
            _Item(
                int(p.parent.name.split("-", 1)[0]), p.relative_to(pool).as_posix(), p.read_bytes()
            )
            for p in files
        ], b""
    if modality is Modality.TEXT:
        items = []
        for folder in sorted(d for d in pool.iterdir() if d.is_dir()):
            label = _folder_label(folder.name)
            for line in (folder / "sentences.txt").read_bytes().splitlines():
                items.append(_Item(label, folder.name, line))
        return items, b""
    if modality is Modality.LM:
        lines = (pool / "corpus.txt").read_bytes().splitlines()
        return [_Item(-1, "", line) for line in lines], b""
    header = b""
    rows: list[_Item] = []
    for path in sorted(pool.glob("*.csv")):
        lines = path.read_bytes().splitlines()
        header = lines[0]
        rows.extend(_Item(-1, "", line) for line in lines[1:])
    return rows, header


def _top_up(
    shares: list[npt.NDArray[np.int64]], labels: npt.NDArray[np.int64], minimum: int
) -> list[npt.NDArray[np.int64]]:
    """Move examples so every share holds >= ``minimum`` of every class (when possible).

    Donors are the shares holding the most of the class, as long as they keep ``minimum``.
    """
    if minimum <= 0:
        return shares
    members = [set(s.tolist()) for s in shares]
    for label in np.unique(labels).tolist():
        of_class = [sorted(i for i in m if labels[i] == label) for m in members]
        for k in range(len(members)):
            while len(of_class[k]) < minimum:
                donor = max(range(len(members)), key=lambda d: (len(of_class[d]), -d))
                if donor == k or len(of_class[donor]) <= minimum:
                    break
                moved = of_class[donor].pop()
                members[donor].discard(moved)
                members[k].add(moved)
                of_class[k].append(moved)
    return [np.array(sorted(m), dtype=np.int64) for m in members]


def _split(
    items: Sequence[_Item], group: NodeGroup, modality: Modality, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Indices of the items that go to each node of the group."""
    count, n = group.count, len(items)
    if modality not in _LABELLED:
        # Unlabelled data: equal contiguous shares (IoT: each node its own time window).
        return [np.asarray(a, dtype=np.int64) for a in np.array_split(np.arange(n), count)]
    labels = np.array([item.label for item in items], dtype=np.int64)
    partition = group.partition
    if partition.kind is PartitionKind.IID:
        order = np.random.default_rng(seed).permutation(n)
        return [np.sort(a).astype(np.int64) for a in np.array_split(order, count)]
    if partition.alpha is None:  # guaranteed by the scenario's validation
        raise ValueError("dirichlet partitioning needs alpha")
    shares = dirichlet_partition(
        labels,
        num_partitions=count,
        alpha=partition.alpha,
        seed=seed % 2**32,
        min_partition_size=partition.min_partition_size,
    )
    return _top_up(shares, labels, partition.min_per_class)


def _write_share(modality: Modality, folder: Path, items: Sequence[_Item], header: bytes) -> None:
    """Write a node's examples in the layout ``write_demo_dataset`` uses."""
    folder.mkdir(parents=True, exist_ok=True)
    if modality in (Modality.VISION, Modality.AUDIO):
        for item in items:
            path = folder / item.relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(item.payload)
    elif modality is Modality.TEXT:
        by_class: dict[str, list[bytes]] = {}
        for item in items:
            by_class.setdefault(item.relpath, []).append(item.payload)
        for class_folder, lines in sorted(by_class.items()):
            (folder / class_folder).mkdir(parents=True, exist_ok=True)
            (folder / class_folder / "sentences.txt").write_bytes(b"\n".join(lines) + b"\n")
    elif modality is Modality.LM:
        (folder / "corpus.txt").write_bytes(b"\n".join(i.payload for i in items) + b"\n")
    else:
        for k, start in enumerate(range(0, len(items), _IOT_ROWS_PER_FILE)):
            chunk = items[start : start + _IOT_ROWS_PER_FILE]
            body = b"\n".join([header, *(i.payload for i in chunk)]) + b"\n"
            (folder / f"sensors_{k:03d}.csv").write_bytes(body)


def _write_group(
    scenario: Scenario, g_index: int, node_dirs: Sequence[Path], scratch: Path
) -> dict[str, dict[str, int]]:
    """Pool, split and write one demo-data group; per node, the example count per modality."""
    group = scenario.groups[g_index]
    counts: dict[str, dict[str, int]] = {d.name: {} for d in node_dirs}
    for modality in group.modalities:
        total = group.examples_for(modality) * group.count
        pool = scratch / f"pool-{g_index}-{modality}"
        pool_seed = _derive_seed(scenario.seed, "pool", g_index, str(modality))
        write_demo_dataset(modality, pool, total, pool_seed % 2**32)
        items, header = _pool_items(modality, pool)
        split_seed = _derive_seed(scenario.seed, "split", g_index, str(modality))
        try:
            shares = _split(items, group, modality, split_seed)
        except ValueError as exc:
            raise ValueError(
                f"nodes[{g_index}] ({group.prefix}): cannot split {total} {modality} examples "
                f"across {group.count} nodes: {exc} Raise examples or alpha."
            ) from exc
        for node_dir, share in zip(node_dirs, shares, strict=True):
            chosen = [items[int(i)] for i in share]
            _write_share(modality, node_dir / modality, chosen, header)
            counts[node_dir.name][str(modality)] = len(chosen)
        shutil.rmtree(pool)
    return counts


def materialize_data(scenario: Scenario, out: Path) -> dict[int, Path]:
    """Each node's data folder (global node index -> folder), written if needed.

    Demo-data nodes get ``<out>/data/node-<i>/``; nodes of a group with ``data_dir`` use their
    own folder as is. Existing data are reused when ``scenario-data.json`` holds the same
    hash; otherwise the data folder is rebuilt (only if it is one this runner wrote).
    """
    data = out / "data"
    dirs: dict[int, Path] = {
        n.index: n.data_dir if n.data_dir is not None else data / f"node-{n.index}"
        for n in scenario.nodes
    }
    demo_nodes = [n for n in scenario.nodes if n.data_dir is None]
    if not demo_nodes:
        return dirs
    marker = data / DATA_MARKER
    wanted = scenario.data_hash()
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text("utf-8")).get("hash")
        except (ValueError, OSError, AttributeError):
            recorded = None
        if recorded == wanted and all(dirs[n.index].is_dir() for n in demo_nodes):
            return dirs
        shutil.rmtree(data)
    elif data.exists() and any(data.iterdir()):
        raise FileExistsError(
            f"{data} exists but was not written by `fedbrain simulate` (no {DATA_MARKER}); "
            "choose another --out or remove it."
        )
    data.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(dir=data, prefix=".pool-") as scratch:
        for g_index, group in enumerate(scenario.groups):
            if group.data_dir is not None:
                continue
            members = [n for n in scenario.nodes if n.group == g_index]
            counts.update(
                _write_group(scenario, g_index, [dirs[n.index] for n in members], Path(scratch))
            )
    record = {
        "hash": wanted,
        "seed": scenario.seed,
        "nodes": [
            {
                "index": n.index,
                "name": n.name,
                "type": str(n.node_type),
                "folder": dirs[n.index].name,
                "examples": counts.get(dirs[n.index].name, {}),
            }
            for n in demo_nodes
        ],
    }
    marker.write_text(json.dumps(record, indent=2) + "\n", "utf-8")
    return dirs


def files_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (relative POSIX path -> hex digest)."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ==================================================================================== keys


@dataclass(frozen=True)
class KeyFiles:
    """The signing key and the trusted-keys file the runs sign and verify with."""

    signing_key: Path
    trusted_keys: Path
    keyid: str
    reused: bool


def prepare_keys(folder: Path, *, now: datetime | None = None) -> KeyFiles:
    """Reuse ``folder``'s signing key if the trusted-keys file pins it and it is valid now;
    otherwise write a fresh key pair (valid from 5 minutes ago for a year)."""
    now = now or datetime.now(UTC)
    private, trusted_path = folder / "signing_key.pem", folder / "trusted_keys.json"
    if private.is_file() and trusted_path.is_file():
        try:
            key = SigningKey.from_pem(private.read_bytes())
            trusted = TrustedKeys.load(trusted_path)
            trusted.lookup(key.keyid).check_usable_at(now + timedelta(hours=1))
        except (ValueError, OSError, KeyVerificationError) as exc:
            logger.info("Regenerating the simulation's keys: %s", exc)
        else:
            return KeyFiles(private, trusted_path, key.keyid, reused=True)
    key = SigningKey.generate()
    private, _, trusted_path = write_keys(
        folder, key, not_before=now - timedelta(minutes=5), not_after=now + _KEY_VALIDITY
    )
    return KeyFiles(private, trusted_path, key.keyid, reused=False)


# ================================================================================ running


class Verification(StrEnum):
    VERIFIED = "verified"
    NO_BUNDLE = "no bundle"
    FAILED = "failed"


@dataclass
class JobResult:
    """What happened to one job of the scenario."""

    job: ScenarioJob
    outcome: JobOutcome | None = None
    error: str | None = None
    verification: Verification = Verification.NO_BUNDLE
    verification_detail: str = ""
    seconds: float = 0.0
    skipped: bool = False

    @property
    def status(self) -> JobStatus:
        if self.outcome is None:
            return JobStatus.FAILED
        return self.outcome.status

    @property
    def ok(self) -> bool:
        return self.status is JobStatus.PASSED and self.verification is Verification.VERIFIED


@dataclass
class SimulationResult:
    """Every job's result, the output folder and the timing of the whole simulation."""

    scenario: Scenario
    out: Path
    keys: KeyFiles
    results: list[JobResult] = field(default_factory=list)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        if any(r.status is JobStatus.FAILED for r in self.results) or any(
            r.status is JobStatus.PASSED and r.verification is not Verification.VERIFIED
            for r in self.results
        ):
            return ExitCode.FAILED
        if any(r.status is JobStatus.REJECTED for r in self.results):
            return ExitCode.REJECTED
        return ExitCode.OK

    def to_json(self) -> dict[str, object]:
        return {
            "scenario": self.scenario.name,
            "source": self.scenario.source,
            "seed": self.scenario.seed,
            "data_hash": self.scenario.data_hash(),
            "trusted_keys": in_folder(self.keys.trusted_keys, self.out),
            "keyid": self.keys.keyid,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "seconds": round(self.seconds, 3),
            "exit_code": self.exit_code,
            "jobs": [_result_json(r, self.out) for r in self.results],
        }


def _result_json(result: JobResult, out: Path) -> dict[str, object]:
    outcome = result.outcome
    job = result.job
    entry: dict[str, object] = {
        "artifact_name": job.artifact_name,
        "catalog_id": job.catalog_id,
        "node_type": str(job.node_type),
        "privacy_level": str(job.spec.privacy_level),
        "status": str(result.status),
        "skipped": result.skipped,
        "error": result.error,
        "verification": str(result.verification),
        "verification_detail": result.verification_detail,
        "seconds": round(result.seconds, 3),
    }
    if outcome is not None:
        entry.update(outcome_json(outcome, out))
    return entry


def verify(result: JobResult, keys: KeyFiles) -> None:
    """Verify the job's bundle against the trusted-keys file; record the verdict."""
    outcome = result.outcome
    if outcome is None or outcome.bundle is None:
        result.verification = Verification.NO_BUNDLE
        result.verification_detail = ""
        return
    try:
        verified = verify_bundle(
            outcome.bundle, TrustedKeys.load(keys.trusted_keys), now=datetime.now(UTC)
        )
    except (BundleVerificationError, ValueError, OSError) as exc:
        result.verification = Verification.FAILED
        result.verification_detail = f"{type(exc).__name__}: {exc}"
        return
    if verified.artifact_name != outcome.artifact_name:
        result.verification = Verification.FAILED
        result.verification_detail = (
            f"the bundle is signed for {verified.artifact_name}, not {outcome.artifact_name}"
        )
        return
    result.verification = Verification.VERIFIED
    result.verification_detail = f"signed by {verified.keyid}"


ProgressCallback = Callable[[ProgressEvent], None]


def node_configs(
    scenario: Scenario, dirs: Mapping[int, Path], kits: Mapping[str, Path] | None = None
) -> dict[int, NodeConfig]:
    """Partition id (the node's index in the scenario) -> ``clients.config.NodeConfig`` of
    every node of the scenario (each with its kit, by node name, when ``kits`` is given)."""
    from clients.config import Fault, NodeConfig

    return {
        node.index: NodeConfig(
            node_type=node.node_type,
            data_dir=dirs[node.index],
            name=node.name,
            faults=tuple(Fault.parse(f) for f in node.faults),
            kit=None if kits is None else kits[node.name],
        )
        for node in scenario.nodes
    }


def _guarded(progress: ProgressCallback | None) -> ProgressCallback | None:
    """``progress`` that logs its own errors: a display bug must not stop a run (the
    federator treats an exception from the callback as a crash)."""
    if progress is None:
        return None
    callback = progress

    def guarded(event: ProgressEvent) -> None:
        try:
            callback(event)
        except Exception:
            logger.exception("The progress display failed on %s", event.kind)

    return guarded


def run_job(
    scenario: Scenario,
    job: ScenarioJob,
    *,
    grid: Grid,
    out: Path,
    dirs: Mapping[int, Path],
    keys: KeyFiles,
    federation: SimulatedFederation,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    ledger_url: str | None = None,
) -> JobResult:
    """One job on the engine's ``grid`` (the job's nodes only, see
    :mod:`simulations.engine`); its outcome, verified. The run is recorded in the ledger at
    ``ledger_url`` (default: ``<out>/ledger.sqlite``); resuming reopens only the run this run
    folder records."""
    from server.federator import run_federation

    run_dir = out / "runs" / job.artifact_name
    ledger_url = ledger_url or default_ledger_url(out)
    run_id = (resumable_run_id(run_dir, ledger_url) if resume else None) or new_run_id()
    _prepare_run_dir(run_dir, resume=resume, run_id=run_id)
    settings = scenario.settings
    nodes = scenario.nodes_of(job.node_type)
    options = RunOptions(
        run_dir=run_dir,
        signing_key=keys.signing_key,
        trusted_keys=keys.trusted_keys,
        database_url=ledger_url,
        run_id=run_id,
        seed=_derive_seed(scenario.seed, "job", job.artifact_name),
        deterministic_noise=settings.deterministic_noise,
        resume=resume,
        round_timeout=settings.round_timeout,
        node_wait_timeout=settings.node_wait_timeout,
        roster=federation.roster,
    )
    result = JobResult(job=job)
    started = time.monotonic()
    try:
        result.outcome = run_federation(grid, job.spec, options, progress=_guarded(progress))
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.monotonic() - started
    verify(result, keys)
    if job.is_analytics and result.status is JobStatus.PASSED and result.outcome is not None:
        _check_normalizer(result.outcome, job, run_dir, [dirs[n.index] for n in nodes])
    return result


def _check_normalizer(
    outcome: JobOutcome, job: ScenarioJob, run_dir: Path, data_dirs: list[Path]
) -> None:
    """Add the simulation-only check of a released normalizer to the outcome's metrics."""
    from simulations.oracle import check_normalizer

    try:
        outcome.metrics.update(check_normalizer(job.spec, run_dir, data_dirs).metrics())
    except (OSError, ValueError) as exc:
        logger.warning("No simulation check of %s: %s", job.artifact_name, exc)


def _prepare_run_dir(run_dir: Path, *, resume: bool, run_id: str) -> None:
    """A fresh run folder, or the previous one when resuming; never someone else's folder."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / RUN_MARKER).is_file():
            raise FileExistsError(
                f"{run_dir} exists but was not written by `fedbrain simulate`; "
                "choose another --out or remove it."
            )
        if not resume:
            shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_marker(run_dir, run_id)


def run_scenario(
    scenario: Scenario,
    *,
    resume: bool = False,
    verbose: bool = False,
    progress: ProgressCallback | None = None,
    on_job_start: Callable[[ScenarioJob, int, int], None] | None = None,
    on_job_end: Callable[[JobResult], None] | None = None,
    on_base: Callable[[BaseEvent], None] | None = None,
    database_url: str | None = None,
    ray_address: str | None = None,
) -> SimulationResult:
    """Materialize data and keys, run every job, verify the bundles, write ``summary.json``.

    The output folder is held for the whole run: a run into a folder that another run holds
    raises :class:`simulations.outfolder.OutputFolderInUseError` before anything is written.
    Every job writes one ledger: ``database_url``, default ``<out>/ledger.sqlite``. With
    ``resume``, a job whose previous outcome (``summary.json``) PASSED with a bundle that
    still verifies is not run again; the other jobs resume from their checkpoints. The jobs
    run one after the other on one Simulation Engine (:mod:`simulations.engine`), started
    here or, with ``ray_address``, on that Ray cluster; if the engine fails, every job that
    has no result yet fails with its error. Before the jobs, the demo bases that jobs name
    (``base_checkpoint = "demo"``) are generated or verified
    (:func:`simulations.bases.resolve_demo_bases`, reported to ``on_base``).
    """
    # Absolute: the nodes' data folders are read by Ray worker processes.
    out = scenario.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    with locked_output_folder(out):
        ledger_url = database_url or default_ledger_url(out)
        Ledger(ledger_url).close()  # a bad URL or database fails now, not in every job
        started = time.monotonic()
        keys = prepare_keys(out / "keys")
        result = SimulationResult(scenario=scenario, out=out, keys=keys)
        dirs = materialize_data(scenario, out)
        scenario = resolve_demo_bases(scenario, out, on_base=on_base)
        result.scenario = scenario
        federation = provision_scenario(
            scenario,
            out,
            operator_key=keys.signing_key,
            trusted_keys=keys.trusted_keys,
            resume=resume,
        )
        previous = previous_outcomes(out) if resume else {}
        done: dict[str, JobResult] = {}
        for job in scenario.jobs:
            if job.artifact_name in previous:
                skipped = JobResult(job=job, outcome=previous[job.artifact_name], skipped=True)
                verify(skipped, keys)
                if skipped.verification is Verification.VERIFIED:
                    done[job.artifact_name] = skipped
        pending = iter(enumerate(scenario.jobs, start=1))

        def record(job_result: JobResult) -> None:
            result.results.append(job_result)
            if on_job_end is not None:
                on_job_end(job_result)
            result.seconds = time.monotonic() - started
            write_summary(result)

        def run_jobs(grids: JobGrids | None) -> None:
            for number, job in pending:
                if on_job_start is not None:
                    on_job_start(job, number, len(scenario.jobs))
                job_result = done.get(job.artifact_name)
                if job_result is None:
                    if grids is None:
                        raise RuntimeError("the Simulation Engine is not running")
                    nodes = scenario.nodes_of(job.node_type)
                    job_result = run_job(
                        scenario,
                        job,
                        grid=grids.for_partitions([n.index for n in nodes]),
                        out=out,
                        dirs=dirs,
                        keys=keys,
                        federation=federation,
                        resume=resume,
                        progress=progress,
                        ledger_url=ledger_url,
                    )
                record(job_result)

        if all(job.artifact_name in done for job in scenario.jobs):
            run_jobs(None)
        else:
            from simulations.engine import run_engine  # Flower and Ray: only when jobs run

            try:
                run_engine(
                    scenario,
                    node_configs(scenario, dirs, federation.kits),
                    run_jobs,
                    verbose=verbose,
                    ray_address=ray_address,
                    need_partitions=len({n.node_type for n in scenario.nodes}) > 1,
                )
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                for number, job in pending:  # the jobs the engine did not get to
                    if on_job_start is not None:
                        on_job_start(job, number, len(scenario.jobs))
                    failed = done.get(job.artifact_name) or JobResult(job=job, error=error)
                    record(failed)
        result.seconds = time.monotonic() - started
        write_summary(result)
        return result


def _finite(value: object) -> object:
    """JSON-safe: non-finite floats as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_summary(result: SimulationResult) -> Path:
    """Write ``<out>/summary.json`` (atomically) and return its path."""
    path = result.out / "summary.json"
    text = json.dumps(_finite(result.to_json()), indent=2, allow_nan=False) + "\n"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text, "utf-8")
    tmp.replace(path)
    return path
