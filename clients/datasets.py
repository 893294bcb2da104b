"""A node's local data: loaded once per process, split, and read for each kind of work.

A node's ``data_dir`` has one folder per :class:`~clients.demo_data.Modality` (``vision/``,
``audio/``, ``text/``, ``lm/``, ``iot/``), as ``write_demo_dataset`` writes them;
:func:`clients.jobs.modality_for_job` says which folder a job reads. Loaded data is cached per
process (:func:`clear_data_cache`). Model jobs hold out a fixed, seeded 20 % of the examples
(per class when labelled) for evaluation and train on the rest. Sensing jobs read per-example
feature values (:func:`sensing_values`): every pixel of an image per RGB channel, every
log-mel frame of a clip per bin, one reading per sensor row.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar, cast

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Dataset, Sampler, Subset

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
from clients.demo_data import Modality
from clients.jobs import DEFAULT_CAMERA_INPUT_SIZE, SENSING_N_MELS, modality_for_job, sensing_ranges
from clients.models import ModelSpec
from clients.sensing import IOT_RANGES, log_mel_spectrogram
from manifests.jobspec import JobSpec

__all__ = [
    "AUDIO_CLIP_SECONDS",
    "HOLDOUT_FRACTION",
    "ModelData",
    "StepBudget",
    "WithoutLabels",
    "clear_data_cache",
    "data_path",
    "histogram_rows",
    "holdout_split",
    "model_data",
    "moment_rows",
    "sensing_values",
]

HOLDOUT_FRACTION: Final = 0.2
_HOLDOUT_SEED: Final = 20_251_126
AUDIO_CLIP_SECONDS: Final = 1.0
"""Length of the clips an audio encoder trains on (cut or zero-padded)."""

FloatArray = npt.NDArray[np.float64]
T = TypeVar("T")


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


def data_path(data_dir: Path) -> Path:
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
class ModelData:
    train: Subset[tuple[torch.Tensor, torch.Tensor]]
    held_out: Subset[tuple[torch.Tensor, torch.Tensor]]
    labels: torch.Tensor  # of every example


def model_data(job: JobSpec, spec: ModelSpec, data_dir: Path) -> ModelData:
    modality = modality_for_job(job)
    folder = data_path(data_dir) / modality.value
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

    def split() -> ModelData:
        data = _canonical_labels(load())
        keep, out = holdout_split(data.labels.numpy())
        return ModelData(
            train=Subset(data, keep.tolist()),
            held_out=Subset(data, out.tolist()),
            labels=data.labels,
        )

    return _cached(("model", folder, modality, *params), split)


class StepBudget(Sampler[list[int]]):
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


class WithoutLabels(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A dataset whose labels read as -1 (evaluation metrics that need labels are skipped)."""

    def __init__(self, inner: Subset[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = self.inner[index]
        return x, torch.tensor(-1, dtype=torch.int64)


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


def sensing_values(job: JobSpec, data_dir: Path) -> FloatArray:
    """Per-example feature values of a sensing job, ``(examples, values per example, F)``.

    Camera: every pixel of each image (at the job's ``input_size``) per RGB channel, in
    [0, 1]. Audio: every log-mel frame (natural-log mel power, :data:`SENSING_N_MELS` bins) of
    each clip at the job's ``sample_rate``; clips of unequal length are cut to the shortest.
    IoT: each complete sensor row (one value per column of :data:`clients.sensing.IOT_RANGES`);
    rows with an empty cell are left out. Cached per process.
    """
    modality = modality_for_job(job)
    sensing_ranges(job)  # refuses non-sensing jobs
    folder = data_path(data_dir) / modality.value
    if modality is Modality.VISION:
        size = job.input_size or DEFAULT_CAMERA_INPUT_SIZE

        def camera() -> FloatArray:
            images = load_images(folder, input_size=size).inputs.numpy()  # (N, 3, S, S) uint8
            pixels = images.astype(np.float64) / 255.0
            return np.clip(pixels.reshape(pixels.shape[0], 3, -1).transpose(0, 2, 1), 0.0, 1.0)

        return _cached(("sensing", folder, modality, size), camera)
    if modality is Modality.AUDIO:
        rate = job.sample_rate or 16_000

        def audio() -> FloatArray:
            clips = _read_clips(folder, rate)
            shortest = min(c.shape[0] for c in clips)
            waves = torch.as_tensor(np.stack([c[:shortest] for c in clips]))
            logmel = log_mel_spectrogram(waves, sample_rate=rate, n_mels=SENSING_N_MELS)
            return cast(FloatArray, logmel.permute(0, 2, 1).numpy().astype(np.float64))

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
        return complete.astype(np.float64)[:, None, :]

    return _cached(("sensing", folder, modality), iot)


def histogram_rows(values: FloatArray, low: FloatArray, high: FloatArray, bins: int) -> FloatArray:
    """Per example and feature, the fraction of its values in each of ``bins`` equal bins over
    ``[low, high]`` (values outside go to the end bins): ``(examples, F * bins)``, each
    feature's block a distribution (L2 norm <= 1, so a row's norm is <= sqrt(F))."""
    n, m, f = values.shape
    unit = (values - low) / (high - low)
    index = np.clip(np.floor(unit * bins), 0, bins - 1).astype(np.int64)  # (n, m, f)
    flat = index + (np.arange(f) * bins)[None, None, :]
    rows = np.zeros((n, f * bins), dtype=np.float64)
    np.add.at(rows, (np.repeat(np.arange(n), m * f), flat.reshape(-1)), 1.0 / m)
    return rows


def moment_rows(values: FloatArray, low: FloatArray, high: FloatArray) -> FloatArray:
    """Per example ``[1, mean v_f, mean v_f^2]`` with ``v = 2 (x - low) / (high - low) - 1``
    clipped into [-1, 1] (centred on the range, so the variance ``E[v^2] - E[v]^2`` is read
    with little noise from the mean term): ``(examples, 1 + 2F)``, norm <= sqrt(1 + 2F)."""
    centred = np.clip(2.0 * (values - low) / (high - low) - 1.0, -1.0, 1.0)
    first = centred.mean(axis=1)
    second = np.square(centred).mean(axis=1)
    return np.concatenate([np.ones((values.shape[0], 1)), first, second], axis=1)
