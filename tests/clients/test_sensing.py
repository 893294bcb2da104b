"""Sensing nodes: per-feature stats, their secure-sum combination and the normalizers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clients.demo_data import demo_audio, demo_images, demo_sensors
from clients.sensing import (
    FeatureStats,
    audio_stats,
    camera_stats,
    combine_stats,
    iot_stats,
    load_normalizer,
    log_mel_spectrogram,
    mel_filterbank,
    normalizer_from_stats,
)


def test_camera_stats_of_partitions_combine_to_the_pooled_stats() -> None:
    images, _ = demo_images(30, np.random.default_rng(0))
    parts = [camera_stats(images[i : i + 10]) for i in range(0, 30, 10)]
    total = combine_stats(parts)
    pooled = camera_stats(images)
    for field in ("count", "total", "total_sq"):
        np.testing.assert_allclose(getattr(total, field), getattr(pooled, field), rtol=1e-12)
    norm = normalizer_from_stats(total)
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(norm.mean, pixels.mean(0), rtol=1e-10)
    np.testing.assert_allclose(norm.std, pixels.std(0), rtol=1e-8)
    assert norm.count.tolist() == [30 * 32 * 32] * 3


def test_iot_normalizer_matches_numpy_and_skips_missing_cells() -> None:
    table = demo_sensors(400, np.random.default_rng(1))
    values = table.values.copy()
    values[::7, 1] = np.nan
    parts = [iot_stats(table.columns, values[i : i + 100]) for i in range(0, 400, 100)]
    norm = normalizer_from_stats(combine_stats(parts))
    np.testing.assert_allclose(norm.mean, np.nanmean(values, axis=0), rtol=1e-10)
    np.testing.assert_allclose(norm.std, np.nanstd(values, axis=0), rtol=1e-6)
    assert norm.count[1] == 400 - len(range(0, 400, 7)) and norm.count[0] == 400
    standardized = norm.apply(table.values)
    assert abs(standardized[:, 0].mean()) < 1e-9


def test_audio_stats_per_log_mel_bin_combine_like_the_pooled_clips() -> None:
    clips, _ = demo_audio(6, np.random.default_rng(2))
    wide = clips.astype(np.float64)
    total = combine_stats(
        [audio_stats(wide[:3], sample_rate=16000), audio_stats(wide[3:], sample_rate=16000)]
    )
    logmel = log_mel_spectrogram(torch.from_numpy(clips), sample_rate=16000).numpy()
    values = logmel.transpose(0, 2, 1).reshape(-1, 40)
    norm = normalizer_from_stats(total)
    assert norm.features[0] == "mel_000" and len(norm.features) == 40
    np.testing.assert_allclose(norm.mean, values.mean(0), rtol=1e-9)
    np.testing.assert_allclose(norm.std, values.std(0), rtol=1e-6)


def test_log_mel_puts_a_tone_in_the_bin_that_covers_its_frequency() -> None:
    fb = mel_filterbank(sample_rate=16000, n_fft=400, n_mels=40)
    assert fb.shape == (40, 201) and float(fb.max()) == pytest.approx(1.0, abs=0.05)
    t = torch.arange(16000, dtype=torch.float64) / 16000
    logmel = log_mel_spectrogram(torch.sin(2 * torch.pi * 1000 * t)[None], sample_rate=16000)
    assert logmel.shape == (1, 40, 101)
    loudest = int(logmel[0].mean(1).argmax())
    assert float(fb[loudest, 25]) > 0  # the 1000 Hz STFT bin (40 Hz per bin)


def test_stats_vector_round_trip_and_feature_mismatch() -> None:
    stats = iot_stats(("a", "b"), np.array([[1.0, 2.0], [3.0, 4.0]]))
    vector = stats.to_vector()
    assert vector.dtype == np.float64 and vector.tolist() == [2, 2, 4, 6, 10, 20]
    back = FeatureStats.from_vector(("a", "b"), vector)
    assert back.total.tolist() == [4, 6]
    with pytest.raises(ValueError, match="shape"):
        FeatureStats.from_vector(("a",), vector)
    with pytest.raises(ValueError, match="features"):
        combine_stats([stats, iot_stats(("a", "c"), np.ones((1, 2)))])
    with pytest.raises(ValueError, match="No values were counted"):
        normalizer_from_stats(iot_stats(("a",), np.full((2, 1), np.nan)))


def test_normalizer_safetensors_round_trip(tmp_path: Path) -> None:
    norm = normalizer_from_stats(iot_stats(("a", "b"), np.array([[1.0, 5.0], [3.0, 9.0]])))
    path = tmp_path / "normalizer.safetensors"
    norm.save(path, metadata={"artifact": "sensing-iot-normalizer-v1"})
    loaded = load_normalizer(path)
    assert loaded.features == ("a", "b")
    np.testing.assert_array_equal(loaded.mean, [2.0, 7.0])
    np.testing.assert_array_equal(loaded.std, [1.0, 2.0])
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable normalizer"):
        load_normalizer(tmp_path / "bad.safetensors")
