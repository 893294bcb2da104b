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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

__all__ = [
    "FeatureStats",
    "Normalizer",
    "audio_stats",
    "camera_stats",
    "combine_stats",
    "iot_stats",
    "load_normalizer",
    "log_mel_spectrogram",
    "mel_filterbank",
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
