"""Sensing nodes: federated analytics of per-feature statistics and the learned normalizers.

Each node computes, per feature, the count, the sum and the sum of squares of its values as
float64 vectors (:class:`FeatureStats`); these go through secure aggregation as one flat
vector (:meth:`FeatureStats.to_vector`), the server adds them up (:func:`combine_stats`) and
turns the total into a :class:`Normalizer` (mean, population standard deviation, count) --
the weights of the ``sensing-*-preproc`` / ``sensing-iot-normalizer`` artifacts.

Features: camera -- the R, G, B channels over every pixel (values in [0, 1]); audio -- the
bins of the log-mel spectrogram over every frame (:func:`log_mel_spectrogram`, an STFT and a
mel filterbank in torch); IoT -- the sensor columns over every row, NaN cells skipped (hence
per-feature counts).

Numerics: the variance is ``sum_sq / n - mean**2`` in float64 (clamped at 0). For features
whose mean is large against their spread (|mean| / std > ~1e6) this loses precision; centre
such features with a published offset first.

Per-example contributions (what a sensing node sends in a federated round)
--------------------------------------------------------------------------

For example-level differential privacy on the aggregate, a node contributes the *sum over its
examples* of one bounded vector per example, ``[1, u_1..u_F, q_1..q_F]`` (length ``1 + 2F``),
where ``u_f`` and ``q_f`` are the example's first and second moments of feature ``f`` after
mapping its values into [0, 1] with a fixed public range per feature (:class:`FeatureRanges`;
values outside the range are clipped into it). Each per-example vector is L2-clipped to the
round's clipping norm before summing (:func:`clipped_sum`), so one example moves a node's sum
by at most C; with every ``u, q`` in [0, 1] its norm is at most ``sqrt(1 + 2F)``
(:func:`contribution_bound`), and a C at least that large clips nothing. The summed vector
(plus the server's noise) becomes a :class:`Normalizer` in original units
(:func:`normalizer_from_moment_sum`):

- camera (``sensing-camera-preproc-v1``, F = 3, features red/green/blue, range [0, 1]): per
  image, per channel, the mean of its pixel values (in [0, 1]) and the mean of their squares.
  All images have the same number of pixels, so the sums give the exact pooled pixel mean and
  variance. Vector length 7.
- audio (``sensing-audio-preproc-v1``, F = 40 log-mel bins ``mel_000..mel_039``, range
  :data:`LOG_MEL_RANGE` = [ln 1e-10, ln 1e6] for every bin): per clip, per bin, the mean over
  its frames of the mapped log-mel value (:func:`log_mel_spectrogram`, 25 ms / 10 ms at 16 kHz)
  and the mean of its square. The normalizer's variance is the frame-level variance with every
  clip weighted equally (exact when clips have the same length). The upper end bounds any
  full-scale signal: the STFT power of a Hann window of 400 samples is at most 200^2 per bin and
  a filter of peak 1 covers fewer than 25 bins. Vector length 81.
- IoT (``sensing-iot-normalizer-v1``, F = 5, :data:`IOT_RANGES`: temperature_c [-40, 85],
  humidity_pct [0, 100], pressure_hpa [800, 1100], co2_ppm [0, 5000], accel_x_g [-2, 2]): per
  CSV row (one example), the mapped reading and its square. Rows with an empty cell in these
  columns are left out. Vector length 11.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from clients.demo_data import SENSOR_COLUMNS

__all__ = [
    "CAMERA_RANGES",
    "IOT_RANGES",
    "LOG_MEL_RANGE",
    "FeatureRanges",
    "FeatureStats",
    "Normalizer",
    "audio_example_moments",
    "audio_ranges",
    "audio_stats",
    "camera_example_moments",
    "camera_stats",
    "clipped_sum",
    "combine_stats",
    "contribution_bound",
    "contribution_length",
    "example_contributions",
    "iot_example_moments",
    "iot_stats",
    "load_normalizer",
    "log_mel_spectrogram",
    "mel_filterbank",
    "normalizer_from_centred_sum",
    "normalizer_from_moment_sum",
    "normalizer_from_stats",
]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True, eq=False)
class FeatureStats:
    """Per-feature count, sum and sum of squares (float64 vectors of equal length)."""

    features: tuple[str, ...]
    count: FloatArray
    total: FloatArray
    total_sq: FloatArray

    def __post_init__(self) -> None:
        n = len(self.features)
        shapes = {a.shape for a in (self.count, self.total, self.total_sq)}
        if shapes != {(n,)}:
            raise ValueError(
                f"count, total and total_sq must each have shape ({n},). Found {shapes}."
            )

    def to_vector(self) -> FloatArray:
        """``[count, total, total_sq]`` concatenated (the vector secure aggregation sums)."""
        return np.concatenate([self.count, self.total, self.total_sq]).astype(np.float64)

    @classmethod
    def from_vector(cls, features: Sequence[str], vector: FloatArray) -> FeatureStats:
        """The inverse of :meth:`to_vector` (e.g. for an aggregated sum)."""
        n = len(features)
        v = np.asarray(vector, dtype=np.float64)
        if v.shape != (3 * n,):
            raise ValueError(f"Expected a vector of shape ({3 * n},). Found {v.shape}.")
        return cls(tuple(features), v[:n].copy(), v[n : 2 * n].copy(), v[2 * n :].copy())


def _stats(features: tuple[str, ...], values: FloatArray) -> FeatureStats:
    """Stats of ``values[..., feature]`` over every leading axis, NaN skipped."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1, len(features))
    finite = np.isfinite(flat)
    if np.isinf(flat).any():
        raise ValueError("Feature values must not be infinite.")
    clean = np.where(finite, flat, 0.0)
    return FeatureStats(
        features=features,
        count=finite.sum(0).astype(np.float64),
        total=clean.sum(0),
        total_sq=np.square(clean).sum(0),
    )


def camera_stats(images: npt.NDArray[np.uint8] | FloatArray) -> FeatureStats:
    """Per-RGB-channel stats over every pixel of images ``(N, H, W, 3)``.

    uint8 images are scaled to [0, 1]; float images are taken as they are.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3). Found {arr.shape}.")
    scaled = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    return _stats(("red", "green", "blue"), scaled)


def _hz_to_mel(hz: Tensor) -> Tensor:
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: Tensor) -> Tensor:
    return 700.0 * (torch.pow(10.0, mel / 2595.0) - 1.0)


def mel_filterbank(
    *, sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None
) -> Tensor:
    """Triangular HTK-mel filters ``(n_mels, n_fft // 2 + 1)`` (float64, peak 1, no norm)."""
    top = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < top <= sample_rate / 2 or n_mels < 1 or n_fft < 2:
        raise ValueError(
            f"Need 0 <= f_min < f_max <= sample_rate / 2, n_mels >= 1, n_fft >= 2. Found "
            f"f_min={f_min}, f_max={top}, sample_rate={sample_rate}, n_mels={n_mels}, "
            f"n_fft={n_fft}."
        )
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(
        float(_hz_to_mel(torch.tensor(f_min, dtype=torch.float64))),
        float(_hz_to_mel(torch.tensor(top, dtype=torch.float64))),
        n_mels + 2,
        dtype=torch.float64,
    )
    edges = _mel_to_hz(mels)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lower) / (center - lower)
    falling = (upper - freqs) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def log_mel_spectrogram(
    waveforms: Tensor,
    *,
    sample_rate: int,
    n_fft: int = 400,
    hop_length: int = 160,
    n_mels: int = 40,
    floor: float = 1e-10,
) -> Tensor:
    """Natural-log mel power spectrogram ``(B, n_mels, frames)`` of waveforms ``(B, T)``.

    Hann-windowed STFT (centre padding, reflect), power spectrum, :func:`mel_filterbank`,
    ``log(max(mel, floor))``. Defaults: 25 ms windows and 10 ms hops at 16 kHz.
    """
    if waveforms.ndim != 2:
        raise ValueError(f"waveforms must be (B, T). Found {tuple(waveforms.shape)}.")
    x = waveforms.to(torch.float64)
    spec = torch.stft(
        x,
        n_fft=n_fft,
        hop_length=hop_length,
        window=torch.hann_window(n_fft, dtype=torch.float64, device=x.device),
        center=True,
        pad_mode="reflect",
        return_complex=True,
    )
    power = spec.abs().square()
    fb = mel_filterbank(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels).to(x.device)
    mel = torch.einsum("mf,bft->bmt", fb, power)
    return torch.log(torch.clamp(mel, min=floor))


def audio_stats(
    waveforms: Tensor | FloatArray, *, sample_rate: int, n_mels: int = 40
) -> FeatureStats:
    """Per-log-mel-bin stats over every frame of waveforms ``(B, T)``."""
    x = torch.as_tensor(np.asarray(waveforms, dtype=np.float64))
    logmel = log_mel_spectrogram(x, sample_rate=sample_rate, n_mels=n_mels)
    values = logmel.permute(0, 2, 1).numpy()  # (B, frames, n_mels)
    return _stats(tuple(f"mel_{i:03d}" for i in range(n_mels)), values)


def iot_stats(columns: Sequence[str], values: FloatArray) -> FeatureStats:
    """Per-column stats of sensor rows ``(N, len(columns))``; NaN cells are not counted."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(columns):
        raise ValueError(
            f"values must have shape (N, {len(columns)}) for columns {list(columns)}. "
            f"Found {arr.shape}."
        )
    return _stats(tuple(columns), arr)


def combine_stats(parts: Sequence[FeatureStats]) -> FeatureStats:
    """The element-wise sum of nodes' stats (what the secure sum yields)."""
    if not parts:
        raise ValueError("combine_stats needs at least one FeatureStats.")
    features = parts[0].features
    for k, part in enumerate(parts[1:], start=1):
        if part.features != features:
            raise ValueError(
                f"Stats #{k} has features {list(part.features)}; expected {list(features)}."
            )
    return FeatureStats(
        features=features,
        count=np.sum([p.count for p in parts], axis=0),
        total=np.sum([p.total for p in parts], axis=0),
        total_sq=np.sum([p.total_sq for p in parts], axis=0),
    )


@dataclass(frozen=True, slots=True, eq=False)
class Normalizer:
    """Per-feature mean and population standard deviation (ddof=0) over ``count`` values."""

    features: tuple[str, ...]
    mean: FloatArray
    std: FloatArray
    count: FloatArray

    def apply(self, values: FloatArray, *, eps: float = 1e-8) -> FloatArray:
        """``(values - mean) / max(std, eps)`` over the last axis (a new array)."""
        return (np.asarray(values, np.float64) - self.mean) / np.maximum(self.std, eps)

    def save(self, path: Path, *, metadata: dict[str, str] | None = None) -> None:
        """Write ``mean``, ``std``, ``count`` (float64) as safetensors; features in metadata."""
        meta = {"features": ",".join(self.features), "format": "fedbrain-normalizer/1"}
        meta.update(metadata or {})
        save_file(
            {
                "mean": torch.from_numpy(self.mean.copy()),
                "std": torch.from_numpy(self.std.copy()),
                "count": torch.from_numpy(self.count.copy()),
            },
            str(path),
            metadata=meta,
        )


def load_normalizer(path: Path) -> Normalizer:
    """Read a normalizer written by :meth:`Normalizer.save`."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{str(path)!r} is not a readable normalizer file: {exc}") from exc
    missing = sorted({"mean", "std", "count"} - set(tensors))
    if missing:
        raise ValueError(f"{str(path)!r} lacks the normalizer tensors {missing}.")
    features = tuple(meta.get("features", "").split(",")) if meta.get("features") else ()
    return Normalizer(
        features=features,
        mean=tensors["mean"].numpy().astype(np.float64),
        std=tensors["std"].numpy().astype(np.float64),
        count=tensors["count"].numpy().astype(np.float64),
    )


def normalizer_from_stats(total: FeatureStats) -> Normalizer:
    """Mean and population std of the aggregated stats; every feature needs a count > 0."""
    empty = [f for f, c in zip(total.features, total.count, strict=True) if not c > 0]
    if empty:
        raise ValueError(f"No values were counted for features {empty}.")
    mean = total.total / total.count
    variance = np.maximum(total.total_sq / total.count - np.square(mean), 0.0)
    return Normalizer(
        features=total.features,
        mean=mean,
        std=np.sqrt(variance),
        count=total.count.copy(),
    )


# ------------------------------------------------------------ per-example contributions


@dataclass(frozen=True, slots=True, eq=False)
class FeatureRanges:
    """Public value ranges ``[low, high]`` per feature; :meth:`to_unit` maps them onto [0, 1]."""

    features: tuple[str, ...]
    low: FloatArray
    high: FloatArray

    def __post_init__(self) -> None:
        n = len(self.features)
        if self.low.shape != (n,) or self.high.shape != (n,):
            raise ValueError(f"low and high must each have shape ({n},).")
        if not (np.all(np.isfinite(self.low)) and np.all(self.high > self.low)):
            raise ValueError("Every range must be finite with high > low.")

    @classmethod
    def uniform(cls, features: Sequence[str], low: float, high: float) -> FeatureRanges:
        """The same range for every feature."""
        n = len(features)
        return cls(tuple(features), np.full(n, float(low)), np.full(n, float(high)))

    def to_unit(self, values: npt.ArrayLike) -> FloatArray:
        """``(values - low) / (high - low)`` over the last axis, clipped into [0, 1]."""
        scaled = (np.asarray(values, np.float64) - self.low) / (self.high - self.low)
        return np.clip(scaled, 0.0, 1.0)


CAMERA_RANGES = FeatureRanges.uniform(("red", "green", "blue"), 0.0, 1.0)
"""Camera features: RGB pixel values, already in [0, 1]."""

LOG_MEL_RANGE: tuple[float, float] = (math.log(1e-10), math.log(1e6))
"""The public range of natural-log mel power (the floor of :func:`log_mel_spectrogram` up to
a bound on any full-scale signal; see the module docstring)."""

IOT_RANGES = FeatureRanges(
    SENSOR_COLUMNS,
    np.array([-40.0, 0.0, 800.0, 0.0, -2.0]),
    np.array([85.0, 100.0, 1100.0, 5000.0, 2.0]),
)
"""IoT features: the demo sensor columns and their public physical ranges."""


def audio_ranges(n_mels: int = 40) -> FeatureRanges:
    """Audio features: ``n_mels`` log-mel bins, each with :data:`LOG_MEL_RANGE`."""
    return FeatureRanges.uniform([f"mel_{i:03d}" for i in range(n_mels)], *LOG_MEL_RANGE)


def contribution_length(num_features: int) -> int:
    """Length ``1 + 2F`` of a per-example contribution (and of a node's sum)."""
    return 1 + 2 * num_features


def contribution_bound(num_features: int) -> float:
    """The largest L2 norm of an unclipped contribution, ``sqrt(1 + 2F)``."""
    return math.sqrt(contribution_length(num_features))


def camera_example_moments(
    images: npt.NDArray[np.uint8] | FloatArray,
) -> tuple[FloatArray, FloatArray]:
    """Per image ``(N, H, W, 3)``: each channel's mean pixel value and mean squared value.

    uint8 images are scaled to [0, 1]; float images must already be in [0, 1] (clipped).
    Returns two ``(N, 3)`` float64 arrays.
    """
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3). Found {arr.shape}.")
    scaled = arr.astype(np.float64) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float64)
    unit = CAMERA_RANGES.to_unit(scaled)
    return unit.mean(axis=(1, 2)), np.square(unit).mean(axis=(1, 2))


def audio_example_moments(
    clips: Sequence[npt.ArrayLike], *, sample_rate: int, n_mels: int = 40
) -> tuple[FloatArray, FloatArray]:
    """Per clip (1-d waveforms, any lengths): each log-mel bin's mean mapped value over the
    clip's frames and the mean of its square. Returns two ``(N, n_mels)`` float64 arrays."""
    ranges = audio_ranges(n_mels)
    first = np.empty((len(clips), n_mels))
    second = np.empty((len(clips), n_mels))
    for i, clip in enumerate(clips):
        wave = torch.as_tensor(np.asarray(clip, dtype=np.float64)).reshape(1, -1)
        logmel = log_mel_spectrogram(wave, sample_rate=sample_rate, n_mels=n_mels)[0]
        unit = ranges.to_unit(logmel.numpy().T)  # (frames, n_mels)
        first[i] = unit.mean(axis=0)
        second[i] = np.square(unit).mean(axis=0)
    return first, second


def iot_example_moments(values: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Per sensor row ``(N, 5)`` in :data:`IOT_RANGES` column order: the mapped readings and
    their squares (one reading per example). Rows must be complete (no NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(IOT_RANGES.features):
        raise ValueError(
            f"values must have shape (N, {len(IOT_RANGES.features)}). Found {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("Sensor rows must be complete (no NaN/Inf); leave out rows with gaps.")
    unit = IOT_RANGES.to_unit(arr)
    return unit, np.square(unit)


def example_contributions(first: FloatArray, second: FloatArray) -> FloatArray:
    """Per-example vectors ``[1, u_1..u_F, q_1..q_F]``, shape ``(N, 1 + 2F)`` (float64)."""
    if first.shape != second.shape or first.ndim != 2:
        raise ValueError(
            f"Moments must be two (N, F) arrays of equal shape. Found {first.shape}, "
            f"{second.shape}."
        )
    return np.concatenate([np.ones((first.shape[0], 1)), first, second], axis=1)


def clipped_sum(contributions: FloatArray, *, clipping_norm: float) -> FloatArray:
    """The sum of the rows of ``contributions``, each first scaled to L2 norm at most
    ``clipping_norm`` (0 = no clipping). One example then moves the sum by at most C."""
    rows = np.asarray(contributions, dtype=np.float64)
    if rows.ndim != 2:
        raise ValueError(f"contributions must be 2-d (N, D). Found shape {rows.shape}.")
    if not (math.isfinite(clipping_norm) and clipping_norm >= 0):
        raise ValueError(f"`clipping_norm` must be >= 0 (0 = no clipping). Found {clipping_norm}.")
    if clipping_norm > 0:
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        scale = np.minimum(1.0, clipping_norm / np.maximum(norms, np.finfo(np.float64).tiny))
        rows = rows * scale
    out: FloatArray = rows.sum(axis=0)
    return out


def normalizer_from_moment_sum(ranges: FeatureRanges, summed: npt.ArrayLike) -> Normalizer:
    """The :class:`Normalizer` (original units) of a summed contribution vector.

    ``summed = [n, sum u, sum q]`` (possibly with DP noise): mean ``u = sum u / n`` (clipped
    into [0, 1]), variance ``sum q / n - u^2`` clamped at 0 (noise can make it negative), then
    ``mean = low + (high - low) * u`` and ``std = (high - low) * sqrt(variance)``. Raises
    ``ValueError`` for a wrong length, a non-finite value or a count that is not positive.
    """
    f = len(ranges.features)
    v = np.asarray(summed, dtype=np.float64)
    if v.shape != (contribution_length(f),):
        raise ValueError(
            f"Expected a summed vector of shape ({contribution_length(f)},) for features "
            f"{list(ranges.features)}. Found {v.shape}."
        )
    if not np.all(np.isfinite(v)):
        raise ValueError("The summed statistics contain NaN or Inf.")
    count = float(v[0])
    if not count > 0:
        raise ValueError(
            f"The summed example count is {count:g}: no examples were aggregated (or the noise "
            "outweighs them); a normalizer needs a positive count."
        )
    mean_u = np.clip(v[1 : 1 + f] / count, 0.0, 1.0)
    variance_u = np.maximum(v[1 + f :] / count - np.square(mean_u), 0.0)
    width = ranges.high - ranges.low
    return Normalizer(
        features=ranges.features,
        mean=ranges.low + width * mean_u,
        std=width * np.sqrt(variance_u),
        count=np.full(f, count),
    )


def normalizer_from_centred_sum(ranges: FeatureRanges, summed: npt.ArrayLike) -> Normalizer:
    """The :class:`Normalizer` (original units) of summed centred moment rows.

    ``summed = [n, sum v, sum v^2]`` with ``v = 2 (x - low) / (high - low) - 1`` (possibly with
    DP noise): ``mean = mid + half E[v]`` and ``std = half sqrt(E[v^2] - E[v]^2)`` with
    ``mid``/``half`` the centre and half-width of each range; E[v] is clipped into [-1, 1] and
    the variance at 0 (noise can push them out). Raises ``ValueError`` for a wrong length, a
    non-finite value or a count that is not positive.
    """
    f = len(ranges.features)
    v = np.asarray(summed, dtype=np.float64)
    if v.shape != (contribution_length(f),):
        raise ValueError(
            f"Expected a summed vector of shape ({contribution_length(f)},) for features "
            f"{list(ranges.features)}. Found {v.shape}."
        )
    if not np.all(np.isfinite(v)):
        raise ValueError("The summed statistics contain NaN or Inf.")
    count = float(v[0])
    if not count > 0:
        raise ValueError(
            f"The summed example count is {count:g}: no examples were aggregated (or the noise "
            "outweighs them); a normalizer needs a positive count."
        )
    mean_v = np.clip(v[1 : 1 + f] / count, -1.0, 1.0)
    variance_v = np.maximum(v[1 + f :] / count - np.square(mean_v), 0.0)
    half = (ranges.high - ranges.low) / 2.0
    return Normalizer(
        features=ranges.features,
        mean=ranges.low + half + half * mean_v,
        std=half * np.sqrt(variance_v),
        count=np.full(f, count),
    )
