"""What a fedbrain node does with each message of :mod:`clients.protocol` (no Flower here).

:class:`Node` answers one message at a time with plain objects -- a validated
:class:`~manifests.jobspec.JobSpec`, a :class:`~clients.protocol.RoundConfig`, named float32
weights, a parsed SecAgg+ request -- and :mod:`clients.app` translates Flower ``Message`` s to
and from them. Whatever a node must remember between messages (its SecAgg+ session, the
DP-SGD steps it has taken) lives in a :class:`NodeState` that the adapter keeps in Flower's
``Context.state``.

Data layout: a node's ``data_dir`` has one folder per :class:`~clients.demo_data.Modality`
(``vision/``, ``audio/``, ``text/``, ``lm/``, ``iot/``), as ``write_demo_dataset`` writes them;
:func:`modality_for_job` says which folder a job reads. Loaded data is cached per process
(:func:`clear_data_cache`). Model jobs hold out a fixed, seeded 20 % of the examples (per class
when labelled) for ``evaluate.eval`` and train on the rest.

Training (``train.fit`` and ``train.secagg_masked``): set the global weights, train
``job.epochs`` epochs (at most ``round.local_steps`` optimizer steps when > 0), optionally
with Opacus DP-SGD (``round.dp_noise_multiplier > 0``), then clip the update
``delta = local - global`` to ``round.clipping_norm`` (when > 0). Randomness: augmentations,
shuffling, dropout and the stochastic rounding of SecAgg+ are seeded from ``round.seed`` and
the node id, so a simulation is reproducible. Under DP-SGD the Poisson batch sampling and the
gradient noise come from ``os.urandom`` instead: the server knows ``round.seed``, and noise it
could recompute would protect nothing (Abadi et al. 2016 assume both are secret). The node's
example-level epsilon composes over every DP-SGD step it has taken in the run (RDP, Opacus) and
is reported at ``round.dp_delta``.

Embed jobs train supervised when labels exist (the learning form's rule): the model gets a
classifier head over the modality's label space (:data:`LABEL_CLASSES`) and trains with
cross-entropy; the embedding is the projection before the head. Class folders named
``<k>-<name>`` (the demo layout) give label ``k`` on every node. A job that lists
``augmentations`` asks for contrastive training instead (NT-Xent over two augmented views, no
labels) -- except under example-level DP, where NT-Xent cannot be used (it mixes the examples
of a batch, so one example's influence is unbounded) and the job stays supervised.

Sensing jobs train no model: a node sends the clipped sum of per-example statistics described
in :mod:`clients.sensing` (:func:`sensing_contribution`); the server turns the global sum into
the normalizer artifact (:func:`normalizer_from_sum`, :func:`normalizer_tensors`).
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar, cast

import numpy as np
import numpy.typing as npt
import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from aggregation.accountant import SubsampledGaussianEvent, compute_epsilon
from aggregation.dp import clip_for_submission, global_norm
from aggregation.dp_sgd import PrivateTraining, make_private
from aggregation.secagg import (
    AdvertiseKeysRequest,
    ClientPhase,
    ClientSession,
    MaskedInputRequest,
    SecAggMessage,
    SecAggProtocolError,
    SecAggRefusedError,
)
from clients import protocol
from clients.data import (
    ChannelCountError,
    DataError,
    EmptyDataError,
    FolderNotFoundError,
    LabelledDataset,
    SampleRateError,
    load_audio,
    load_corpus,
    load_images,
    load_sensor_csv,
    load_texts,
    read_wav,
)
from clients.demo_data import AUDIO_CLASSES, TEXT_TOPICS, VISION_CLASSES, Modality
from clients.models import (
    ModelFamily,
    ModelSpec,
    build_model,
    family_for_base_model,
    get_weights,
    model_fingerprint,
    set_weights,
    spec_for_base_model,
    weight_names,
)
from clients.protocol import NodeInfo, RoundConfig, summable_vector
from clients.sensing import (
    CAMERA_RANGES,
    IOT_RANGES,
    FeatureRanges,
    Normalizer,
    audio_example_moments,
    audio_ranges,
    camera_example_moments,
    clipped_sum,
    contribution_length,
    example_contributions,
    iot_example_moments,
    normalizer_from_moment_sum,
)
from clients.training import EmbedLoss, evaluate, make_optimizer, train_local
from manifests.catalog import NodeType, NotTrainableError, Task
from manifests.jobspec import DpUnit, JobSpec

__all__ = [
    "AUDIO_CLIP_SECONDS",
    "DEFAULT_CAMERA_INPUT_SIZE",
    "HOLDOUT_FRACTION",
    "LABEL_CLASSES",
    "PRECLIP_NORM",
    "SENSING_N_MELS",
    "SENSING_UPDATE",
    "SUPPORTED_NODE_TYPES",
    "WAS_CLIPPED",
    "Fault",
    "FaultInjectedError",
    "FitResult",
    "Node",
    "NodeConfig",
    "NodeConfigError",
    "NodeState",
    "Weights",
    "clear_data_cache",
    "holdout_split",
    "modality_for_job",
    "model_spec_for_job",
    "normalizer_from_sum",
    "normalizer_tensors",
    "sensing_contribution",
    "sensing_ranges",
    "sensing_vector_length",
]

SUPPORTED_NODE_TYPES: Final = (NodeType.SENSING, NodeType.ENCODER, NodeType.INFERENCE)
"""Node types that have something to train (inference nodes fine-tune the language model)."""

HOLDOUT_FRACTION: Final = 0.2
_HOLDOUT_SEED: Final = 20_251_126
AUDIO_CLIP_SECONDS: Final = 1.0
"""Length of the clips an audio encoder trains on (cut or zero-padded)."""
DEFAULT_CAMERA_INPUT_SIZE: Final = 224
"""Image side the camera statistics are computed at when the job sets no ``input_size``."""
SENSING_N_MELS: Final = 40
LABEL_CLASSES: Final[Mapping[Modality, int]] = {
    Modality.VISION: len(VISION_CLASSES),
    Modality.AUDIO: len(AUDIO_CLASSES),
    Modality.TEXT: len(TEXT_TOPICS),
}
"""Classifier size of supervised embed models, per modality (the demo data's label spaces)."""

SENSING_UPDATE: Final = "statistics"
"""Name of the one array in a sensing node's ``update`` record (``train.fit``)."""
PRECLIP_NORM: Final = "preclip_norm"
WAS_CLIPPED: Final = "was_clipped"

Weights = Sequence[tuple[str, npt.NDArray[np.float32]]]
"""Named arrays in model order, as the ``weights`` record carries them (None: no record)."""

FloatArray = npt.NDArray[np.float64]
T = TypeVar("T")


class NodeConfigError(ValueError):
    """A node configuration that cannot be used; the message says which key and why."""


class FaultInjectedError(RuntimeError):
    """Raised on purpose by a configured :class:`Fault` (tests and simulations)."""


# --------------------------------------------------------------------------- config

_MESSAGE_TYPES: Final = (
    protocol.NODE_INFO,
    protocol.FIT,
    protocol.SECAGG_ADVERTISE,
    protocol.SECAGG_SHARE,
    protocol.SECAGG_MASKED,
    protocol.SECAGG_UNMASK,
    protocol.EVALUATE,
)


@dataclass(frozen=True, slots=True)
class Fault:
    """Fail on purpose when handling ``message_type`` in ``server_round`` (None: every round).

    Written ``"<message type>@<round>"`` or ``"<message type>"``, e.g.
    ``"train.secagg_masked@2"``. ``query.node_info`` carries no round: only a round-less
    fault applies to it.
    """

    message_type: str
    server_round: int | None = None

    def __post_init__(self) -> None:
        if self.message_type not in _MESSAGE_TYPES:
            raise NodeConfigError(
                f"fail-on: unknown message type {self.message_type!r}; choose one of "
                f"{', '.join(_MESSAGE_TYPES)}."
            )
        if self.server_round is not None and self.server_round < 0:
            raise NodeConfigError(f"fail-on: the round must be >= 0. Found {self.server_round}.")

    @classmethod
    def parse(cls, text: str) -> Fault:
        """A fault from ``"<message type>[@<round>]"``."""
        kind, at, round_text = text.strip().partition("@")
        if not at:
            return cls(kind)
        try:
            server_round = int(round_text)
        except ValueError:
            raise NodeConfigError(
                f"fail-on: {text.strip()!r} must be <message type>@<round number>."
            ) from None
        return cls(kind, server_round)

    def matches(self, message_type: str, server_round: int | None) -> bool:
        """Whether this fault fires for the message."""
        return self.message_type == message_type and self.server_round in (None, server_round)

    def __str__(self) -> str:
        if self.server_round is None:
            return self.message_type
        return f"{self.message_type}@{self.server_round}"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node: its type, its data folder, a display name and faults to inject.

    ``noop_training``: a protocol drill -- the node answers every message as usual (node info,
    the SecAgg+ stages, evaluation) but skips local training: its update is all zeros and its
    evaluation reports only the example count. For benchmarks of the protocol and for checking
    a deployment end to end without spending compute.
    """

    node_type: NodeType
    data_dir: Path
    name: str = ""
    faults: tuple[Fault, ...] = ()
    noop_training: bool = False

    def __post_init__(self) -> None:
        try:
            node_type = NodeType(self.node_type)
        except ValueError:
            raise NodeConfigError(
                f"node-type: unknown node type {self.node_type!r}; a training node is one of "
                f"{', '.join(SUPPORTED_NODE_TYPES)}."
            ) from None
        if node_type not in SUPPORTED_NODE_TYPES:
            raise NodeConfigError(
                f"node-type: {node_type} nodes have nothing to train in fedbrain; a training "
                f"node is one of {', '.join(SUPPORTED_NODE_TYPES)}."
            )
        object.__setattr__(self, "node_type", node_type)
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        object.__setattr__(self, "faults", tuple(self.faults))

    @classmethod
    def from_flower(cls, node_config: Mapping[str, str | int | float | bool]) -> NodeConfig:
        """Read a SuperNode's ``node_config``: ``node-type``, ``data-dir``, optional ``name``,
        ``fail-on`` (comma-separated faults, e.g. ``"train.secagg_masked@2"``) and
        ``noop-training`` (bool)."""
        problems: list[str] = []

        def text(key: str, *, required: bool) -> str:
            value = node_config.get(key)
            if value is None:
                if required:
                    problems.append(f"{key}: is required (set it in the SuperNode's node config).")
                return ""
            if not isinstance(value, str) or (required and not value.strip()):
                problems.append(f"{key}: must be non-empty text. Found {value!r}.")
                return ""
            return value.strip()

        node_type = text("node-type", required=True)
        data_dir = text("data-dir", required=True)
        name = text("name", required=False)
        faults: list[Fault] = []
        for item in text("fail-on", required=False).split(","):
            if item.strip():
                try:
                    faults.append(Fault.parse(item))
                except NodeConfigError as error:
                    problems.append(str(error))
        noop = node_config.get("noop-training", False)
        if not isinstance(noop, bool):
            problems.append(f"noop-training: must be true or false. Found {noop!r}.")
        if not problems:
            try:
                return cls(
                    cast(NodeType, node_type),
                    Path(data_dir).expanduser(),
                    name,
                    tuple(faults),
                    noop_training=bool(noop),
                )
            except NodeConfigError as error:
                problems.append(str(error))
        raise NodeConfigError("Invalid node config: " + " ".join(problems))


# ------------------------------------------------------------------------- jobs


_SENSING_MODALITY: Final[Mapping[str, Modality]] = {
    "sensing-camera-preproc-v1": Modality.VISION,
    "sensing-audio-preproc-v1": Modality.AUDIO,
    "sensing-iot-normalizer-v1": Modality.IOT,
}
_FAMILY_MODALITY: Final[Mapping[ModelFamily, Modality]] = {
    ModelFamily.VIT: Modality.VISION,
    ModelFamily.WAV2VEC2: Modality.AUDIO,
    ModelFamily.MPNET: Modality.TEXT,
    ModelFamily.GPT2: Modality.LM,
}


def modality_for_job(job: JobSpec) -> Modality:
    """The data folder a job trains on (``ValueError`` for jobs fedbrain cannot train)."""
    if job.task is Task.DETECTION:
        raise ValueError(f"task 'detection' is not supported yet (job on {job.base_model}).")
    try:
        entry = job.catalog_entry
    except NotTrainableError as error:
        raise ValueError(str(error)) from None
    if entry.node_type is NodeType.SENSING:
        try:
            return _SENSING_MODALITY[entry.id]
        except KeyError:
            raise ValueError(f"Sensing artifact {entry.id} is not supported yet.") from None
    family = family_for_base_model(job.base_model)
    modality = _FAMILY_MODALITY[family]
    if (modality is Modality.LM) != (job.task is Task.LM_FINETUNE):
        raise ValueError(
            f"task {job.task} on {job.base_model} is not supported yet: {family} models train "
            f"{'lm-finetune' if modality is Modality.LM else 'embed'}."
        )
    return modality


def _is_sensing(job: JobSpec) -> bool:
    modality_for_job(job)  # refuses jobs fedbrain cannot train
    return job.catalog_entry.node_type is NodeType.SENSING


def model_spec_for_job(job: JobSpec) -> ModelSpec:
    """The model a (non-sensing) job trains; server and nodes build it alike.

    The learning form's architecture and input fields override the base config. Embed jobs
    trained supervised (see the module docstring) get a classifier head over
    :data:`LABEL_CLASSES`.
    """
    modality = modality_for_job(job)
    if _is_sensing(job):
        raise ValueError(f"{job.catalog_entry.id} is a sensing job: it trains no model.")
    num_classes = None
    if job.task is Task.EMBED and (not job.augmentations or _example_dp(job)):
        num_classes = LABEL_CLASSES[modality]
    return spec_for_base_model(
        job.base_model,
        hidden_size=job.hidden_size,
        num_layers=job.num_layers,
        num_heads=job.num_heads,
        embedding_dim=job.embedding_dim if modality is not Modality.LM else None,
        num_classes=num_classes,
        input_size=job.input_size,
        sample_rate=job.sample_rate,
        max_seq_length=job.max_seq_length,
    )


def _example_dp(job: JobSpec) -> bool:
    return job.privacy_level.uses_dp and job.dp.unit is DpUnit.EXAMPLE


# ------------------------------------------------------------------------ sensing


def sensing_ranges(job: JobSpec) -> FeatureRanges:
    """The features and public ranges of a sensing job (``ValueError`` for other jobs)."""
    modality = modality_for_job(job)
    if not _is_sensing(job):
        raise ValueError(f"{job.catalog_entry.id} is not a sensing job.")
    if modality is Modality.VISION:
        return CAMERA_RANGES
    if modality is Modality.AUDIO:
        return audio_ranges(SENSING_N_MELS)
    return IOT_RANGES


def sensing_vector_length(job: JobSpec) -> int:
    """Length of a sensing node's contribution (camera 7, audio 81, IoT 11)."""
    return contribution_length(len(sensing_ranges(job).features))


def _sensing_rows(job: JobSpec, data_dir: Path) -> FloatArray:
    """Per-example contributions ``(N, 1 + 2F)`` of the node's data (cached)."""
    modality = modality_for_job(job)
    sensing_ranges(job)  # refuses non-sensing jobs
    folder = _data_path(data_dir) / modality.value
    if modality is Modality.VISION:
        size = job.input_size or DEFAULT_CAMERA_INPUT_SIZE

        def camera() -> FloatArray:
            images = load_images(folder, input_size=size).inputs.numpy().transpose(0, 2, 3, 1)
            return example_contributions(*camera_example_moments(images))

        return _cached(("sensing", folder, modality, size), camera)
    if modality is Modality.AUDIO:
        rate = job.sample_rate or 16_000

        def audio() -> FloatArray:
            clips = _read_clips(folder, rate)
            moments = audio_example_moments(clips, sample_rate=rate, n_mels=SENSING_N_MELS)
            return example_contributions(*moments)

        return _cached(("sensing", folder, modality, rate), audio)

    def iot() -> FloatArray:
        table = load_sensor_csv(folder)
        missing = [c for c in IOT_RANGES.features if c not in table.columns]
        if missing:
            raise DataError(
                f"The sensor logs in {str(folder)!r} lack the columns {missing} "
                f"(they have {list(table.columns)})."
            )
        values = table.values[:, [table.columns.index(c) for c in IOT_RANGES.features]]
        complete = values[np.all(np.isfinite(values), axis=1)]
        if complete.shape[0] == 0:
            raise EmptyDataError(folder, "complete sensor rows (every row has an empty cell)")
        return example_contributions(*iot_example_moments(complete))

    return _cached(("sensing", folder, modality), iot)


def _read_clips(folder: Path, sample_rate: int) -> list[FloatArray]:
    if not folder.is_dir():
        raise FolderNotFoundError(folder)
    paths = sorted(p for p in folder.rglob("*.wav") if p.is_file())
    if not paths:
        raise EmptyDataError(folder, "WAV files")
    clips = []
    for path in paths:
        data, rate = read_wav(path)
        if data.shape[0] != 1:
            raise ChannelCountError(path, data.shape[0])
        if rate != sample_rate:
            raise SampleRateError(path, rate, sample_rate)
        if data.shape[1] == 0:
            raise DataError(f"{str(path)!r} holds no samples.")
        clips.append(data[0])
    return clips


def sensing_contribution(
    job: JobSpec, node_data_dir: Path, clipping_norm: float
) -> tuple[npt.NDArray[np.float32], int]:
    """A node's contribution to a sensing round and its number of examples.

    The sum over the node's examples of their contribution vectors, each L2-clipped to
    ``clipping_norm`` first (0 = no clipping); see :mod:`clients.sensing`.
    """
    rows = _sensing_rows(job, node_data_dir)
    total = clipped_sum(rows, clipping_norm=clipping_norm)
    return total.astype(np.float32), int(rows.shape[0])


def normalizer_from_sum(job: JobSpec, summed_vector: npt.ArrayLike) -> Normalizer:
    """The normalizer (mean and std per feature, original units) of the global sum."""
    return normalizer_from_moment_sum(sensing_ranges(job), summed_vector)


def normalizer_tensors(normalizer: Normalizer) -> dict[str, npt.NDArray[np.float32]]:
    """The normalizer's weights for ``model.safetensors``: ``mean``, ``std``, ``count``."""
    return {
        "mean": np.asarray(normalizer.mean, dtype=np.float32),
        "std": np.asarray(normalizer.std, dtype=np.float32),
        "count": np.asarray(normalizer.count, dtype=np.float32),
    }


# --------------------------------------------------------------------------- data

_CACHE: dict[tuple[object, ...], object] = {}
_CACHE_LOCK = threading.Lock()


def _cached(key: tuple[object, ...], load: Callable[[], T]) -> T:
    """The cached value for ``key``, loading it once per process (failures are not cached)."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = load()
        return cast(T, _CACHE[key])


def clear_data_cache() -> None:
    """Forget every loaded dataset (the next message reads the folders again)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _data_path(data_dir: Path) -> Path:
    return Path(data_dir).expanduser().resolve()


def holdout_split(
    labels: npt.ArrayLike, *, fraction: float = HOLDOUT_FRACTION, seed: int = _HOLDOUT_SEED
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Deterministic ``(train, held_out)`` example indices (sorted).

    Labelled examples (label >= 0) are split per class, ``round(fraction * count)`` held out
    from each; unlabelled ones together. At least one example is held out from a group of two
    or more, and at least one is kept for training.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    held: list[npt.NDArray[np.int64]] = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        count = members.size
        n_out = 0 if count < 2 else min(count - 1, max(1, math.floor(fraction * count + 0.5)))
        held.append(rng.permutation(members)[:n_out])
    out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(y.size), out)
    return keep.astype(np.int64), out.astype(np.int64)


_PREFIXED = re.compile(r"^(\d+)-")


def _canonical_labels(data: LabelledDataset) -> LabelledDataset:
    """Relabel class folders named ``<k>-<name>`` to ``k`` (the same label on every node)."""
    matches = [_PREFIXED.match(name) for name in data.classes]
    prefixes = [int(m.group(1)) for m in matches if m is not None]
    if (
        not data.classes
        or len(prefixes) != len(data.classes)
        or len(set(prefixes)) != len(prefixes)
    ):
        return data
    mapping = torch.tensor(prefixes)
    labels = torch.where(data.labels >= 0, mapping[data.labels.clamp(min=0)], data.labels)
    return LabelledDataset(data.inputs, labels)


@dataclass(frozen=True, slots=True, eq=False)
class _ModelData:
    train: Subset[tuple[torch.Tensor, torch.Tensor]]
    held_out: Subset[tuple[torch.Tensor, torch.Tensor]]
    labels: torch.Tensor  # of every example


def _model_data(job: JobSpec, spec: ModelSpec, data_dir: Path) -> _ModelData:
    modality = modality_for_job(job)
    folder = _data_path(data_dir) / modality.value
    loaders: dict[Modality, tuple[tuple[object, ...], Callable[[], LabelledDataset]]] = {
        Modality.VISION: (
            (spec.resolved_input_size,),
            lambda: load_images(folder, input_size=spec.resolved_input_size),
        ),
        Modality.AUDIO: (
            (spec.resolved_sample_rate, AUDIO_CLIP_SECONDS),
            lambda: load_audio(
                folder, sample_rate=spec.resolved_sample_rate, duration_s=AUDIO_CLIP_SECONDS
            ),
        ),
        Modality.TEXT: (
            (spec.resolved_max_seq_length,),
            lambda: load_texts(folder, max_seq_length=spec.resolved_max_seq_length),
        ),
        Modality.LM: (
            (spec.resolved_max_seq_length,),
            lambda: load_corpus(folder, max_seq_length=spec.resolved_max_seq_length),
        ),
    }
    params, load = loaders[modality]

    def split() -> _ModelData:
        data = _canonical_labels(load())
        keep, out = holdout_split(data.labels.numpy())
        return _ModelData(
            train=Subset(data, keep.tolist()),
            held_out=Subset(data, out.tolist()),
            labels=data.labels,
        )

    return _cached(("model", folder, modality, *params), split)


class _StepBudget(Sampler[list[int]]):
    """Batches of shuffled indices, reshuffled every pass, ``steps`` batches in all."""

    def __init__(self, size: int, batch_size: int, steps: int, generator: torch.Generator):
        self.size, self.batch_size, self.steps, self.generator = size, batch_size, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        produced = 0
        while produced < self.steps:
            order = torch.randperm(self.size, generator=self.generator).tolist()
            for start in range(0, self.size, self.batch_size):
                if produced == self.steps:
                    return
                yield order[start : start + self.batch_size]
                produced += 1


class _WithoutLabels(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset whose labels read as -1 (evaluation metrics that need labels are skipped)."""

    def __init__(self, inner: Subset[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.inner[index]
        return x, torch.tensor(-1, dtype=torch.int64)


# --------------------------------------------------------------------------- state


@dataclass
class NodeState:
    """What a node keeps between messages of one run (in Flower's ``Context.state``).

    ``secagg_session``: ``ClientSession.to_state_record()`` of the round in progress (it
    holds this round's secrets; it never leaves the node). ``secagg_round``: ``(run_id,
    round)`` of the last SecAgg+ session started, so that a node never advertises keys twice
    for one round. ``dp_events``: every DP-SGD step this node has taken, for its epsilon.
    """

    secagg_session: dict[str, object] | None = None
    secagg_round: tuple[int, int] | None = None
    dp_events: list[SubsampledGaussianEvent] = field(default_factory=list)


@dataclass(frozen=True, slots=True, eq=False)
class FitResult:
    """A node's local training round.

    ``names``/``update``: the ``update`` record (the clipped delta in model order; for
    sensing jobs the one array :data:`SENSING_UPDATE`). ``summable``: the vector SecAgg+ masks
    (:func:`clients.protocol.summable_vector`, or the sensing contribution). ``metrics``: the
    ``metrics`` record of ``train.fit``; :meth:`public_metrics` those that may accompany a
    masked input.
    """

    names: tuple[str, ...]
    update: tuple[npt.NDArray[np.float32], ...]
    summable: npt.NDArray[np.float32]
    metrics: dict[str, int | float]

    def public_metrics(self) -> dict[str, int | float]:
        """Metrics that say nothing about the update itself (no norm, no clipping flag)."""
        keep = (
            protocol.NUM_EXAMPLES,
            protocol.TRAIN_LOSS,
            protocol.TRAIN_SECONDS,
            protocol.EXAMPLE_EPSILON,
        )
        return {k: v for k, v in self.metrics.items() if k in keep}


# ---------------------------------------------------------------------------- node


def _check_round(rnd: RoundConfig, *, sensing: bool) -> None:
    problems = []
    for name in ("clipping_norm", "dp_noise_multiplier", "dp_max_grad_norm", "dp_delta"):
        value = getattr(rnd, name)
        if not (math.isfinite(value) and value >= 0):
            problems.append(f"`round.{name}` must be a finite number >= 0. Found {value}.")
    if rnd.local_steps < 0:
        problems.append(f"`round.local_steps` must be >= 0. Found {rnd.local_steps}.")
    if rnd.dp_noise_multiplier > 0 and not problems:
        if sensing:
            problems.append("DP-SGD (`round.dp_noise_multiplier` > 0) does not apply to sensing.")
        if not rnd.dp_max_grad_norm > 0:
            problems.append(
                "`round.dp_max_grad_norm` must be positive when `round.dp_noise_multiplier` > 0."
                f" Found {rnd.dp_max_grad_norm}."
            )
        if not 0 < rnd.dp_delta < 1:
            problems.append(
                "`round.dp_delta` must be in (0, 1) when `round.dp_noise_multiplier` > 0 (the "
                f"delta the node reports its epsilon at). Found {rnd.dp_delta}."
            )
    if problems:
        raise ValueError("Invalid round config: " + " ".join(problems))


_PURPOSE_TRAIN, _PURPOSE_EVAL, _PURPOSE_ROUNDING = 1, 2, 3


class Node:
    """One node's answers to the protocol messages (:mod:`clients.protocol`).

    ``node_id`` is the node's id in the federation (Flower's node id; SecAgg+ addresses the
    node by it and round seeds mix it in). Methods that take a :class:`NodeState` update it in
    place, and only when they succeed -- except DP-SGD steps, which are recorded as soon as
    they are taken (a failure after training has still spent privacy).
    """

    def __init__(self, config: NodeConfig, *, node_id: int, device: str | None = None) -> None:
        self.config = config
        self.node_id = node_id
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    # -- helpers ------------------------------------------------------------------------
    def check_fault(self, message_type: str, server_round: int | None) -> None:
        """Raise :class:`FaultInjectedError` if a configured fault matches this message."""
        for fault in self.config.faults:
            if fault.matches(message_type, server_round):
                raise FaultInjectedError(
                    f"Node {self.config.name or self.node_id}: injected fault {fault}."
                )

    def _seed(self, rnd: RoundConfig, purpose: int) -> np.random.SeedSequence:
        """This round's seed for one purpose, mixed with the node id (reproducible)."""
        return np.random.SeedSequence([rnd.seed % 2**64, self.node_id % 2**64, purpose])

    def _torch_seed(self, rnd: RoundConfig, purpose: int) -> int:
        return int(self._seed(rnd, purpose).generate_state(1, np.uint64)[0]) >> 1

    def _require_node_type(self, job: JobSpec) -> None:
        wanted = job.resolved_node_type
        if wanted is not self.config.node_type:
            raise ValueError(
                f"Job {job.catalog_entry.id} is for {wanted} nodes; this is a "
                f"{self.config.node_type} node."
            )

    # -- query.node_info ----------------------------------------------------------------
    def node_info(self, job: JobSpec) -> NodeInfo:
        """Whether this node can train ``job``, and with how many examples (never raises
        for "not eligible": the reason is in words)."""
        node_type = str(self.config.node_type)

        def refuse(reason: str) -> NodeInfo:
            return NodeInfo(node_type=node_type, eligible=False, reason=reason)

        try:
            wanted = job.resolved_node_type
            modality = modality_for_job(job)
        except ValueError as error:
            return refuse(f"fedbrain cannot train this job: {error}")
        if wanted is not self.config.node_type:
            return refuse(f"the job is for {wanted} nodes; this is a {node_type} node.")
        folder = _data_path(self.config.data_dir) / modality.value
        if _is_sensing(job):
            try:
                rows = _sensing_rows(job, self.config.data_dir)
            except (DataError, OSError) as error:
                return refuse(f"the node's {modality} data cannot be used: {error}")
            return NodeInfo(node_type=node_type, eligible=True, num_examples=int(rows.shape[0]))
        try:
            spec = model_spec_for_job(job)
            with torch.device("meta"):
                build_model(spec)
        except (ValueError, TypeError, RuntimeError) as error:
            return refuse(f"the job's model does not build: {error}")
        try:
            data = _model_data(job, spec, self.config.data_dir)
        except (DataError, OSError) as error:
            return refuse(f"the node's {modality} data in {str(folder)!r} cannot be used: {error}")
        if spec.num_classes is not None:
            labels = data.labels
            if bool((labels < 0).any()) or int(labels.max()) >= spec.num_classes:
                return refuse(
                    f"example-level DP trains the embed task with a classifier over "
                    f"{spec.num_classes} classes; the node's {modality} data must sit in class "
                    f"folders 00-... to {spec.num_classes - 1:02d}-... ."
                )
        return NodeInfo(
            node_type=node_type,
            eligible=True,
            num_examples=len(data.train),
            model_fingerprint=model_fingerprint(spec),
        )

    # -- train.fit ----------------------------------------------------------------------
    def fit(
        self, job: JobSpec, rnd: RoundConfig, weights: Weights | None, state: NodeState
    ) -> FitResult:
        """Train one round from the global ``weights`` (not used by sensing jobs)."""
        self._require_node_type(job)
        sensing = _is_sensing(job)
        _check_round(rnd, sensing=sensing)
        if sensing:
            start = time.perf_counter()
            vector, n = sensing_contribution(job, self.config.data_dir, rnd.clipping_norm)
            return FitResult(
                names=(SENSING_UPDATE,),
                update=(vector,),
                summable=vector,
                metrics={
                    protocol.NUM_EXAMPLES: n,
                    protocol.TRAIN_SECONDS: time.perf_counter() - start,
                },
            )
        return self._train(job, rnd, weights, state)

    def _train(
        self, job: JobSpec, rnd: RoundConfig, weights: Weights | None, state: NodeState
    ) -> FitResult:
        spec = model_spec_for_job(job)
        data = _model_data(job, spec, self.config.data_dir)
        model = build_model(spec)
        names, global_arrays = _check_weights(weight_names(model), weights)
        if self.config.noop_training:
            zeros = [np.zeros_like(a) for a in global_arrays]
            return FitResult(
                names=names,
                update=tuple(zeros),
                summable=summable_vector(zeros, was_clipped=False, preclip_norm=0.0),
                metrics={
                    protocol.NUM_EXAMPLES: len(data.train),
                    PRECLIP_NORM: 0.0,
                    WAS_CLIPPED: 0.0,
                    protocol.TRAIN_SECONDS: 0.0,
                },
            )
        set_weights(model, global_arrays)
        n = len(data.train)
        if n == 0:
            raise EmptyDataError(self.config.data_dir, f"{modality_for_job(job)} training examples")
        steps = job.epochs * math.ceil(n / job.batch_size)
        if rnd.local_steps > 0:
            steps = min(steps, rnd.local_steps)
        generator = torch.Generator().manual_seed(self._torch_seed(rnd, _PURPOSE_TRAIN))
        embed_loss = EmbedLoss.SUPERVISED if spec.num_classes else EmbedLoss.NT_XENT
        private: PrivateTraining[tuple[torch.Tensor, torch.Tensor]] | None = None
        if rnd.dp_noise_multiplier > 0:
            loader, private = self._private(job, rnd, model, data, steps, embed_loss)
        else:
            loader = DataLoader(
                data.train, batch_sampler=_StepBudget(n, job.batch_size, steps, generator)
            )
        metrics: dict[str, int | float] = {}
        try:
            result = train_local(
                model,
                loader,
                task=job.task,
                epochs=1,
                optimizer=job.optimizer,
                learning_rate=job.learning_rate,
                weight_decay=job.weight_decay,
                device=self.device,
                generator=generator,
                dp=private,
                embed_loss=embed_loss,
            )
        finally:
            if private is not None:
                state.dp_events.extend(private.events())
        if private is not None:
            epsilon = compute_epsilon(state.dp_events, delta=rnd.dp_delta)
            metrics[protocol.EXAMPLE_EPSILON] = epsilon
        model.to("cpu")
        delta = [
            (local - glob).astype(np.float32)
            for local, glob in zip(get_weights(model), global_arrays, strict=True)
        ]
        if rnd.clipping_norm > 0:
            clipped = clip_for_submission(delta, clipping_norm=rnd.clipping_norm)
            update, norm, was_clipped = clipped.update, clipped.norm, clipped.was_clipped
        else:
            update, norm, was_clipped = delta, global_norm(delta), False
        metrics.update(
            {
                protocol.NUM_EXAMPLES: result.num_examples,
                protocol.TRAIN_LOSS: result.mean_loss,
                protocol.TRAIN_SECONDS: result.seconds,
                PRECLIP_NORM: norm,
                WAS_CLIPPED: float(was_clipped),
            }
        )
        return FitResult(
            names=names,
            update=tuple(update),
            summable=summable_vector(update, was_clipped=was_clipped, preclip_norm=norm),
            metrics=metrics,
        )

    def _private(
        self,
        job: JobSpec,
        rnd: RoundConfig,
        model: torch.nn.Module,
        data: _ModelData,
        steps: int,
        embed_loss: EmbedLoss,
    ) -> tuple[
        DataLoader[tuple[torch.Tensor, torch.Tensor]],
        PrivateTraining[tuple[torch.Tensor, torch.Tensor]],
    ]:
        """DP-SGD for ``steps`` Poisson batches, sampled and noised from ``os.urandom``."""
        if job.task is Task.EMBED and embed_loss is EmbedLoss.NT_XENT:
            raise ValueError(
                "The round asks for DP-SGD, but this embed job trains with NT-Xent, which mixes "
                "the examples of a batch: set the job's dp.unit to example (its model then has "
                "a classifier head)."
            )
        loader = DataLoader(
            data.train,
            batch_size=job.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(_secret_seed()),
        )
        optimizer = make_optimizer(
            model, job.optimizer, learning_rate=job.learning_rate, weight_decay=job.weight_decay
        )
        private = make_private(
            model,
            optimizer,
            loader,
            max_grad_norm=rnd.dp_max_grad_norm,
            noise_multiplier=rnd.dp_noise_multiplier,
            noise_generator=torch.Generator().manual_seed(_secret_seed()),
        )
        sampler = private.data_loader.batch_sampler
        if not isinstance(sampler, UniformWithReplacementSampler):
            raise RuntimeError("Opacus did not build a Poisson sampler; refusing to train.")
        # One pass of `steps` Poisson batches at rate 1 / len(loader) (the accounted rate).
        setattr(sampler, "steps", steps)  # noqa: B010 -- Opacus's sampler is untyped
        return loader, private

    # -- evaluate.eval ------------------------------------------------------------------
    def evaluate(
        self, job: JobSpec, rnd: RoundConfig, weights: Weights | None
    ) -> dict[str, int | float]:
        """Metrics of the global ``weights`` on the held-out examples (sensing: the count)."""
        self._require_node_type(job)
        if _is_sensing(job):
            rows = _sensing_rows(job, self.config.data_dir)
            return {protocol.NUM_EXAMPLES: int(rows.shape[0])}
        spec = model_spec_for_job(job)
        data = _model_data(job, spec, self.config.data_dir)
        model = build_model(spec)
        set_weights(model, _check_weights(weight_names(model), weights)[1])
        if self.config.noop_training:
            return {protocol.NUM_EXAMPLES: len(data.held_out)}
        if len(data.held_out) == 0:
            raise ValueError(
                f"The node holds out no evaluation examples ({len(data.train)} in all; it "
                "needs at least 2)."
            )
        held: Dataset[tuple[torch.Tensor, torch.Tensor]] = data.held_out
        if job.task is Task.EMBED and not _centroid_ready(data):
            held = _WithoutLabels(data.held_out)
        loader = DataLoader(held, batch_size=job.batch_size)
        seed = self._torch_seed(rnd, _PURPOSE_EVAL)
        result = evaluate(model, loader, task=job.task, device=self.device, seed=seed)
        metrics: dict[str, int | float] = {
            protocol.NUM_EXAMPLES: int(result["num_examples"]),
            protocol.EVAL_LOSS: result["loss"],
        }
        if "accuracy" in result:
            metrics[protocol.EVAL_ACCURACY] = result["accuracy"]
        return metrics

    # -- train.secagg_* -----------------------------------------------------------------
    def summable_length(self, job: JobSpec) -> int:
        """Length of the vector this node masks for ``job``."""
        if _is_sensing(job):
            return sensing_vector_length(job)
        return _layout_size(model_spec_for_job(job)) + 2

    def secagg(
        self,
        job: JobSpec,
        rnd: RoundConfig,
        request: SecAggMessage,
        weights: Weights | None,
        state: NodeState,
    ) -> tuple[SecAggMessage, dict[str, int | float]]:
        """Answer one SecAgg+ request; the masked-input stage trains first (as ``fit``).

        Returns the reply and the metrics that go with it (only for the masked input:
        example count, loss, time, epsilon -- never the update in the clear).
        """
        self._require_node_type(job)
        if isinstance(request, AdvertiseKeysRequest):
            expected = self.summable_length(job)
            if request.params.vector_length != expected:
                raise ValueError(
                    f"SecAgg+ vector_length is {request.params.vector_length}, but this node "
                    f"contributes {expected} values for job {job.catalog_entry.id}."
                )
            key = (request.run_id, request.server_round)
            if state.secagg_round == key:
                raise SecAggRefusedError(
                    f"Node {self.node_id} already advertised keys for run {key[0]} round "
                    f"{key[1]}; it takes part in a round once."
                )
            session = ClientSession(self.node_id)
            reply: SecAggMessage = session.advertise_keys(request)
            state.secagg_session = dict(session.to_state_record())
            state.secagg_round = key
            return reply, {}
        if state.secagg_session is None:
            raise SecAggProtocolError(
                f"Node {self.node_id} has no SecAgg+ session: it did not advertise keys for "
                f"this round (request for round {request.server_round})."
            )
        session = ClientSession.from_state_record(state.secagg_session)
        metrics: dict[str, int | float] = {}
        if isinstance(request, MaskedInputRequest):
            _check_masked_request(session, request)
            result = self.fit(job, rnd, weights, state)
            rounding = np.random.default_rng(self._seed(rnd, _PURPOSE_ROUNDING))
            reply = session.masked_input(request, result.summable, rounding)
            metrics = result.public_metrics()
        else:
            reply = session.handle(request)
        done = session.state.phase is ClientPhase.DONE
        state.secagg_session = None if done else dict(session.to_state_record())
        return reply, metrics


def _secret_seed() -> int:
    """A torch seed from the OS's CSPRNG (for randomness the server must not know)."""
    return int.from_bytes(os.urandom(8), "big") >> 1


def _check_masked_request(session: ClientSession, request: MaskedInputRequest) -> None:
    """Refuse a masked-input request that the session would refuse, before training."""
    st = session.state
    if st.phase is not ClientPhase.MASKED_INPUT:
        raise SecAggProtocolError(
            f"Node {st.node_id} expects a {st.phase} request, got a masked-input request."
        )
    if (request.node_id, request.run_id, request.server_round) != (
        st.node_id,
        st.run_id,
        st.server_round,
    ):
        raise SecAggProtocolError(
            f"Masked-input request for node {request.node_id}, run {request.run_id}, round "
            f"{request.server_round}; this session is node {st.node_id}, run {st.run_id}, "
            f"round {st.server_round}."
        )


def _check_weights(
    names: list[str], weights: Weights | None
) -> tuple[tuple[str, ...], list[npt.NDArray[np.float32]]]:
    """The names and arrays of ``weights`` if it holds exactly the model's weights, in order.

    Shapes are checked by ``set_weights``.
    """
    if weights is None:
        raise ValueError("This job trains a model: the message must carry the `weights` record.")
    given = [name for name, _ in weights]
    if given == names:
        return tuple(names), [np.asarray(a) for _, a in weights]
    missing = [n for n in names if n not in set(given)]
    unexpected = [n for n in given if n not in set(names)]
    detail = []
    if missing:
        detail.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        detail.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if not detail:
        detail.append("in another order")
    raise ValueError(
        f"The `weights` record does not fit the job's model ({len(names)} arrays expected, "
        f"{len(given)} given): {'; '.join(detail)}. Do the server and the node build the same "
        "model (compare the model fingerprint)?"
    )


def _layout_size(spec: ModelSpec) -> int:
    """Number of float values in the weights of ``spec``'s model (cached per process)."""

    def size() -> int:
        return sum(int(a.size) for a in get_weights(build_model(spec)))

    return _cached(("layout", spec), size)


def _centroid_ready(data: _ModelData) -> bool:
    """Whether the held-out labels allow nearest-centroid accuracy (>= 2 classes of >= 2)."""
    labels = data.labels[torch.as_tensor(data.held_out.indices, dtype=torch.long)]
    if labels.numel() == 0 or bool((labels < 0).any()):
        return False
    _, counts = torch.unique(labels, return_counts=True)
    return counts.numel() >= 2 and bool((counts >= 2).all())
