"""Built-in demo data: small, deterministic (from a numpy ``Generator``), learnable.

- vision: 10 classes of RGB images of procedurally drawn shapes and textures (circle, square,
  triangle, cross, horizontal/vertical/diagonal stripes, checkerboard, ring, dots) with a
  class-tinted foreground colour, random position/size/phase, random background and pixel noise;
- audio: 6 classes of 16 kHz clips (low/mid/high tone, up/down chirp, band-limited noise
  burst) with jittered frequency, gain and onset plus background noise;
- text: sentences from a small grammar per topic (weather, sports, cooking, space);
- lm: a byte corpus of such sentences, one per line;
- iot: multichannel sensor series (temperature, humidity, pressure, CO2, acceleration) with
  per-sensor means and scales, a daily cycle and AR(1) noise.

``write_demo_dataset`` writes the on-disk layout that :mod:`clients.data` loaders read (PNG
in class folders, 16-bit WAV in class folders, ``.txt`` per topic, ``corpus.txt``, ``.csv``);
the same seed always writes the same bytes.
"""

from __future__ import annotations

import csv
import io
import wave
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from clients.data import LabelledDataset, SensorTable, image_dataset, lm_dataset, text_dataset

__all__ = [
    "AUDIO_CLASSES",
    "SENSOR_COLUMNS",
    "TEXT_TOPICS",
    "VISION_CLASSES",
    "Modality",
    "demo_audio",
    "demo_corpus",
    "demo_dataset",
    "demo_images",
    "demo_sensors",
    "demo_texts",
    "write_demo_dataset",
]


class Modality(StrEnum):
    """The kinds of demo data."""

    VISION = "vision"
    AUDIO = "audio"
    TEXT = "text"
    LM = "lm"
    IOT = "iot"


VISION_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "hstripes",
    "vstripes", "diagonal", "checker", "ring", "dots",
)  # fmt: skip
AUDIO_CLASSES: tuple[str, ...] = ("low", "mid", "high", "chirp-up", "chirp-down", "noise")
TEXT_TOPICS: tuple[str, ...] = ("weather", "sports", "cooking", "space")
SENSOR_COLUMNS: tuple[str, ...] = (
    "temperature_c", "humidity_pct", "pressure_hpa", "co2_ppm", "accel_x_g",
)  # fmt: skip
_SENSOR_MEAN = np.array([21.0, 45.0, 1013.0, 600.0, 0.0])
_SENSOR_SCALE = np.array([2.0, 8.0, 5.0, 120.0, 0.05])

_PALETTE = np.array(
    [[230, 60, 60], [60, 200, 60], [60, 90, 230], [230, 200, 40], [200, 60, 200],
     [40, 200, 200], [240, 140, 40], [150, 150, 250], [250, 250, 250], [140, 90, 40]],
    dtype=np.float64,
) / 255.0  # fmt: skip

_FG_JITTER = 0.08
UInt8Array = npt.NDArray[np.uint8]
Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]


def _raw_mask(
    label: int, rng: np.random.Generator, size: int
) -> Any:  # numpy comparisons are untyped
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) * (32.0 / size)
    cx, cy = rng.uniform(11, 21, size=2)
    r = rng.uniform(6, 10)
    period = float(rng.integers(4, 7))
    phase = rng.uniform(0, period)
    dx, dy = xx - cx, yy - cy
    dist = np.hypot(dx, dy)
    if label == 0:
        return dist < r
    if label == 1:
        return (np.abs(dx) < 0.8 * r) & (np.abs(dy) < 0.8 * r)
    if label == 2:
        return (dy > -r) & (dy < r) & (np.abs(dx) < (dy + r) / 2)
    if label == 3:
        return ((np.abs(dx) < r / 4) & (np.abs(dy) < r)) | ((np.abs(dy) < r / 4) & (np.abs(dx) < r))
    if label == 4:
        return ((yy + phase) // (period / 2)) % 2 == 0
    if label == 5:
        return ((xx + phase) // (period / 2)) % 2 == 0
    if label == 6:
        return ((xx + yy + phase) // (period / 2)) % 2 == 0
    if label == 7:
        return ((xx // period) + (yy // period)) % 2 == 0
    if label == 8:
        return (dist < r) & (dist > r - 3)
    return ((xx + phase) % 6 < 2.5) & ((yy + phase) % 6 < 2.5)


def _shape_mask(label: int, rng: np.random.Generator, size: int) -> npt.NDArray[np.bool_]:
    return np.asarray(_raw_mask(label, rng, size), dtype=np.bool_)


def demo_images(
    n: int, rng: np.random.Generator, *, size: int = 32
) -> tuple[UInt8Array, Int64Array]:
    """``n`` images ``(n, size, size, 3)`` uint8 and their labels (balanced, shuffled)."""
    _check_n(n)
    labels = rng.permutation(np.arange(n) % len(VISION_CLASSES)).astype(np.int64)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        mask = _shape_mask(int(label), rng, size)[..., None]
        fg = np.clip(_PALETTE[label] + rng.normal(0, _FG_JITTER, 3), 0, 1)
        bg = rng.uniform(0.0, 0.45, 3)
        img = np.where(mask, fg, bg) + rng.normal(0, 0.06, (size, size, 3))
        images[i] = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return images, labels


def demo_audio(
    n: int, rng: np.random.Generator, *, sample_rate: int = 16_000, duration_s: float = 0.5
) -> tuple[Float32Array, Int64Array]:
    """``n`` clips ``(n, T)`` float32 in [-1, 1] and their labels (balanced, shuffled)."""
    _check_n(n)
    length = round(sample_rate * duration_s)
    t = np.arange(length) / sample_rate
    labels = rng.permutation(np.arange(n) % len(AUDIO_CLASSES)).astype(np.int64)
    clips = np.empty((n, length), dtype=np.float32)
    nyquist = sample_rate / 2
    for i, label in enumerate(labels):
        jitter = rng.uniform(0.9, 1.1)
        if label in (0, 1, 2):
            f0 = min((250.0, 700.0, 1800.0)[label] * jitter, 0.9 * nyquist)
            signal = np.sin(2 * np.pi * f0 * t + rng.uniform(0, 2 * np.pi))
        elif label in (3, 4):
            f_lo, f_hi = 300.0 * jitter, min(2500.0 * jitter, 0.9 * nyquist)
            f_start, f_end = (f_lo, f_hi) if label == 3 else (f_hi, f_lo)
            inst = f_start + (f_end - f_start) * t / max(duration_s, 1e-9)
            signal = np.sin(2 * np.pi * np.cumsum(inst) / sample_rate)
        else:
            white = rng.normal(0, 1, length)
            kernel = np.ones(4) / 4  # gentle low-pass: a class-specific spectrum
            signal = np.convolve(white, kernel, mode="same") * 1.5
        onset = rng.integers(0, max(1, length // 5))
        env = np.zeros(length)
        env[onset:] = np.minimum(1.0, np.arange(length - onset) / (0.01 * sample_rate + 1))
        gain = rng.uniform(0.3, 0.7)
        clip = gain * env * signal + rng.normal(0, 0.02, length)
        clips[i] = np.clip(clip, -1, 1).astype(np.float32)
    return clips, labels


_GRAMMAR: dict[str, dict[str, tuple[str, ...]]] = {
    "weather": {
        "noun": ("rain", "wind", "storm", "fog", "snow", "sun"),
        "adj": ("cold", "heavy", "light", "warm", "grey"),
        "verb": ("falls on", "moves over", "covers", "clears from", "drifts across"),
        "place": ("the hills", "the coast", "the valley", "the city", "the north"),
    },
    "sports": {
        "noun": ("striker", "goalkeeper", "team", "runner", "coach", "referee"),
        "adj": ("young", "fast", "tired", "proud", "strong"),
        "verb": ("scores against", "runs past", "beats", "trains with", "defends against"),
        "place": ("the champions", "the rivals", "the home side", "the visitors"),
    },
    "cooking": {
        "noun": ("chef", "baker", "sauce", "onion", "oven", "dough"),
        "adj": ("hot", "fresh", "sweet", "salty", "crispy"),
        "verb": ("simmers with", "bakes beside", "mixes into", "chops", "roasts with"),
        "place": ("the garlic", "the butter", "the pan", "the bread", "the soup"),
    },
    "space": {
        "noun": ("rocket", "planet", "comet", "astronaut", "probe", "star"),
        "adj": ("distant", "bright", "frozen", "giant", "silent"),
        "verb": ("orbits", "drifts toward", "passes", "lands on", "signals"),
        "place": ("the moon", "the asteroid belt", "the red planet", "the station"),
    },
}


def _sentence(topic: str, rng: np.random.Generator) -> str:
    g = _GRAMMAR[topic]

    def pick(key: str) -> str:
        words = g[key]
        return words[int(rng.integers(len(words)))]

    if rng.random() < 0.5:
        return f"the {pick('adj')} {pick('noun')} {pick('verb')} {pick('place')}."
    subject, verb, place = pick("noun"), pick("verb"), pick("place")
    return f"a {subject} {verb} {place} and the {pick('noun')} is {pick('adj')}."


def demo_texts(n: int, rng: np.random.Generator) -> tuple[list[str], Int64Array]:
    """``n`` sentences and their topic labels (balanced, shuffled)."""
    _check_n(n)
    labels = rng.permutation(np.arange(n) % len(TEXT_TOPICS)).astype(np.int64)
    return [_sentence(TEXT_TOPICS[int(label)], rng) for label in labels], labels


def demo_corpus(n_sentences: int, rng: np.random.Generator) -> bytes:
    """A byte corpus of ``n_sentences`` grammar sentences, one per line (ASCII)."""
    texts, _ = demo_texts(n_sentences, rng)
    return ("\n".join(texts) + "\n").encode("ascii")


def demo_sensors(n_rows: int, rng: np.random.Generator) -> SensorTable:
    """``n_rows`` readings of :data:`SENSOR_COLUMNS` (one per minute)."""
    _check_n(n_rows)
    t = np.arange(n_rows, dtype=np.float64)[:, None]
    phase = rng.uniform(0, 2 * np.pi, len(SENSOR_COLUMNS))
    cycle = np.sin(2 * np.pi * t / 1440.0 + phase)
    noise = np.empty((n_rows, len(SENSOR_COLUMNS)))
    state = rng.normal(0, 1, len(SENSOR_COLUMNS))
    for i in range(n_rows):
        state = 0.9 * state + np.sqrt(1 - 0.81) * rng.normal(0, 1, len(SENSOR_COLUMNS))
        noise[i] = state
    values = _SENSOR_MEAN + _SENSOR_SCALE * (0.6 * cycle + 0.8 * noise)
    return SensorTable(columns=SENSOR_COLUMNS, values=values)


def demo_dataset(
    modality: Modality | str,
    n: int,
    rng: np.random.Generator,
    *,
    input_size: int = 32,
    sample_rate: int = 16_000,
    duration_s: float = 0.5,
    max_seq_length: int = 64,
) -> LabelledDataset:
    """In-memory demo data as the loaders return it (``n`` examples; LM: ``n`` sentences)."""
    kind = Modality(modality)
    if kind is Modality.VISION:
        images, labels = demo_images(n, rng, size=input_size)
        return image_dataset(images, labels, classes=VISION_CLASSES)
    if kind is Modality.AUDIO:
        clips, labels = demo_audio(n, rng, sample_rate=sample_rate, duration_s=duration_s)
        return LabelledDataset(
            torch.from_numpy(clips), torch.from_numpy(labels), classes=AUDIO_CLASSES
        )
    if kind is Modality.TEXT:
        texts, labels = demo_texts(n, rng)
        return text_dataset(
            texts, labels.tolist(), max_seq_length=max_seq_length, classes=TEXT_TOPICS
        )
    if kind is Modality.LM:
        return lm_dataset(demo_corpus(n, rng), max_seq_length=max_seq_length)
    return demo_sensors(n, rng).dataset()


def _wav_bytes(clip: Float32Array, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        pcm = np.round(np.clip(clip, -1, 1) * 32767).astype("<i2")
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()


def _png_bytes(image: UInt8Array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def write_demo_dataset(
    modality: Modality | str,
    out_dir: Path,
    n: int,
    seed: int,
    *,
    sample_rate: int = 16_000,
    duration_s: float = 0.5,
    image_size: int = 32,
) -> list[Path]:
    """Write ``n`` demo examples (LM: sentences; IoT: rows) under ``out_dir``; the paths.

    Layout: vision ``<k>-<class>/<i>.png``; audio ``<k>-<class>/<i>.wav`` (16-bit mono); text
    ``<k>-<topic>/sentences.txt`` (one per line) -- the ``<k>-`` prefix (two digits) makes the
    loaders' sorted-folder labels equal the in-memory labels; lm ``corpus.txt``; iot
    ``sensors_<k>.csv`` (256 rows per file, ``timestamp`` + :data:`SENSOR_COLUMNS`). Existing
    files are replaced.
    """
    kind = Modality(modality)
    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    files: dict[Path, bytes] = {}
    if kind is Modality.VISION:
        images, labels = demo_images(n, rng, size=image_size)
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            files[out_dir / _folder(VISION_CLASSES, label) / f"{i:05d}.png"] = _png_bytes(img)
    elif kind is Modality.AUDIO:
        clips, labels = demo_audio(n, rng, sample_rate=sample_rate, duration_s=duration_s)
        for i, (clip, label) in enumerate(zip(clips, labels, strict=True)):
            wav = _wav_bytes(clip, sample_rate)
            files[out_dir / _folder(AUDIO_CLASSES, label) / f"{i:05d}.wav"] = wav
    elif kind is Modality.TEXT:
        texts, labels = demo_texts(n, rng)
        for k in range(len(TEXT_TOPICS)):
            lines = [t for t, label in zip(texts, labels, strict=True) if label == k]
            if lines:
                joined = "\n".join(lines) + "\n"
                files[out_dir / _folder(TEXT_TOPICS, k) / "sentences.txt"] = joined.encode()
    elif kind is Modality.LM:
        files[out_dir / "corpus.txt"] = demo_corpus(n, rng)
    else:
        table = demo_sensors(n, rng)
        for k, start in enumerate(range(0, n, 256)):
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(("timestamp", *table.columns))
            for row_no in range(start, min(n, start + 256)):
                row = table.values[row_no]
                writer.writerow((str(60 * row_no), *(f"{v:.6g}" for v in row)))
            files[out_dir / f"sensors_{k:03d}.csv"] = text.getvalue().encode()
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return sorted(files)


def _folder(names: tuple[str, ...], label: int | np.int64) -> str:
    return f"{int(label):02d}-{names[int(label)]}"


def _check_n(n: int) -> None:
    if n < 1:
        raise ValueError(f"`n` must be >= 1. Found {n}.")
