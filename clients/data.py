"""Local data of a node: folder loaders, torch Datasets and the byte-level tokenizer.

Every loader reads a node's own folder eagerly (so a corrupt file is reported before training
starts, naming the file) and returns a torch ``Dataset`` of ``(input, label)`` pairs with
fixed-size inputs, so the default collate function batches them:

- images: PNG/JPEG, in class subfolders (label = index of the sorted folder name) or flat
  (label ``-1``); converted to RGB, resized to ``input_size`` x ``input_size``; the input is
  a float tensor ``(3, S, S)`` scaled to [-1, 1].
- audio: 8/16/32-bit PCM WAV (stdlib ``wave``); a file at another sample rate or with another
  channel count is *rejected* by default (``SampleRateError`` / ``ChannelCountError``);
  ``resample=True`` resamples it band-limited (FFT) and ``mix_to_mono=True`` averages the
  channels. Clips are cut or zero-padded at the end to ``duration_s``; input ``(T,)`` float.
- text: UTF-8 ``.txt`` files, one example per non-empty line, byte-level token ids padded with
  ``PAD_ID`` to ``max_seq_length``; input ``(L,)`` int64.
- LM corpus: the bytes of every ``.txt`` file (sorted by path), ``BOS`` + chunk + ``EOS``
  windows of ``max_seq_length`` ids; label ``-1``.
- sensor logs: ``.csv`` files with a header row and numeric columns (the same columns in every
  file); ``timestamp``-like columns are left out; empty cells read as NaN.
"""

from __future__ import annotations

import csv
import io
import math
import wave
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "BOS_ID",
    "BYTE_VOCAB_SIZE",
    "EOS_ID",
    "IMAGE_SUFFIXES",
    "MASK_ID",
    "PAD_ID",
    "ChannelCountError",
    "CorruptFileError",
    "DataError",
    "EmptyDataError",
    "FolderNotFoundError",
    "InconsistentColumnsError",
    "LabelledDataset",
    "SampleRateError",
    "SensorTable",
    "decode_bytes",
    "encode_bytes",
    "image_dataset",
    "lm_dataset",
    "load_audio",
    "load_corpus",
    "load_images",
    "load_sensor_csv",
    "load_texts",
    "read_wav",
    "resample",
    "text_dataset",
]

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
MASK_ID = 259
BYTE_VOCAB_SIZE = 260
"""Byte-level vocabulary: ids 0..255 are the bytes, then PAD, BOS, EOS and MASK."""

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_TIME_COLUMNS = frozenset({"timestamp", "time", "datetime", "date"})

FloatArray = npt.NDArray[np.float64]


# ----------------------------------------------------------------------------- errors


class DataError(ValueError):
    """A node's local data cannot be used; the message says which file and why."""


class FolderNotFoundError(DataError):
    """The data folder does not exist or is not a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        super().__init__(
            f"Data folder {str(folder)!r} does not exist or is not a folder. "
            "Point the node's data path at an existing folder."
        )


class EmptyDataError(DataError):
    """The folder holds no file of the expected kind (or only empty ones)."""

    def __init__(self, folder: Path, what: str) -> None:
        self.folder = folder
        super().__init__(f"Data folder {str(folder)!r} holds no {what}.")


class CorruptFileError(DataError):
    """A file that cannot be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"Cannot read {str(path)!r}: {reason}")


class SampleRateError(DataError):
    """A WAV file at another sample rate than the job's (pass ``resample=True`` to convert)."""

    def __init__(self, path: Path, found: int, expected: int) -> None:
        self.path = path
        super().__init__(
            f"{str(path)!r} is sampled at {found} Hz; the job expects {expected} Hz. "
            "Resample the file or load with `resample=True`."
        )


class ChannelCountError(DataError):
    """A multi-channel WAV file (pass ``mix_to_mono=True`` to average the channels)."""

    def __init__(self, path: Path, found: int) -> None:
        self.path = path
        super().__init__(
            f"{str(path)!r} has {found} channels; the encoder takes mono audio. "
            "Convert it to mono or load with `mix_to_mono=True`."
        )


class InconsistentColumnsError(DataError):
    """A CSV file whose header differs from the first file's."""

    def __init__(self, path: Path, expected: Sequence[str], found: Sequence[str]) -> None:
        self.path = path
        missing = [c for c in expected if c not in found]
        extra = [c for c in found if c not in expected]
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if extra:
            detail.append(f"unexpected {extra}")
        if not detail:
            detail.append(f"columns in another order {list(found)}")
        super().__init__(
            f"{str(path)!r} has columns that differ from the other sensor logs "
            f"(expected {list(expected)}): {', '.join(detail)}."
        )


# -------------------------------------------------------------------------- tokenizer


def encode_bytes(
    data: bytes | str, *, max_length: int | None = None, bos: bool = False, eos: bool = False
) -> list[int]:
    """Byte-level token ids of ``data`` (UTF-8 for ``str``), cut to ``max_length`` ids.

    With ``bos``/``eos`` the ``BOS_ID``/``EOS_ID`` tokens frame the bytes (kept when cut).
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    ids = list(raw)
    if max_length is not None:
        if max_length < int(bos) + int(eos) + 1:
            raise ValueError(
                f"`max_length` must leave room for one byte after BOS/EOS. Found {max_length}."
            )
        ids = ids[: max_length - int(bos) - int(eos)]
    return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])


def decode_bytes(ids: Iterable[int]) -> bytes:
    """The bytes of the byte ids in ``ids``; special tokens are dropped."""
    return bytes(i for i in ids if 0 <= i < 256)


def _pad(ids: list[int], length: int) -> list[int]:
    return ids + [PAD_ID] * (length - len(ids))


# ---------------------------------------------------------------------------- datasets


class LabelledDataset(Dataset[tuple[Tensor, Tensor]]):
    """``(input, label)`` pairs held in memory; label ``-1`` means unlabelled.

    ``inputs`` is stored as given (uint8 images are scaled to [-1, 1] on access);
    ``classes`` names the label indices.
    """

    def __init__(self, inputs: Tensor, labels: Tensor, *, classes: tuple[str, ...] = ()) -> None:
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"inputs and labels must have the same length. Found {inputs.shape[0]} "
                f"and {labels.shape[0]}."
            )
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-d. Found shape {tuple(labels.shape)}.")
        self.inputs = inputs
        self.labels = labels.to(torch.int64)
        self.classes = classes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = self.inputs[index]
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div(127.5).sub(1.0)
        return x, self.labels[index]

    @property
    def labelled(self) -> bool:
        """Whether every example has a label."""
        return bool(len(self) > 0 and (self.labels >= 0).all())


def image_dataset(
    images: npt.NDArray[np.uint8],
    labels: Sequence[int] | npt.NDArray[np.int64],
    *,
    classes: tuple[str, ...] = (),
) -> LabelledDataset:
    """A dataset of uint8 images ``(N, H, W, 3)``; inputs are ``(3, H, W)`` in [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 of shape (N, H, W, 3). Found {images.dtype} {images.shape}."
        )
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return LabelledDataset(x, torch.as_tensor(np.asarray(labels, np.int64)), classes=classes)


def text_dataset(
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    max_seq_length: int,
    classes: tuple[str, ...] = (),
) -> LabelledDataset:
    """Byte ids of each text (``BOS`` + bytes + ``EOS``), padded to ``max_seq_length``."""
    ids = [
        _pad(encode_bytes(t, max_length=max_seq_length, bos=True, eos=True), max_seq_length)
        for t in texts
    ]
    x = torch.tensor(ids, dtype=torch.int64).reshape(len(texts), max_seq_length)
    return LabelledDataset(x, torch.tensor(list(labels), dtype=torch.int64), classes=classes)


def lm_dataset(corpus: bytes, *, max_seq_length: int) -> LabelledDataset:
    """Non-overlapping ``BOS`` + chunk + ``EOS`` windows of ``corpus`` (last one padded)."""
    if max_seq_length < 3:
        raise ValueError(f"`max_seq_length` must be >= 3. Found {max_seq_length}.")
    chunk = max_seq_length - 2
    rows = [
        _pad(encode_bytes(corpus[i : i + chunk], bos=True, eos=True), max_seq_length)
        for i in range(0, len(corpus), chunk)
    ]
    x = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), max_seq_length)
    return LabelledDataset(x, torch.full((len(rows),), -1, dtype=torch.int64))


# ---------------------------------------------------------------------------- folders


def _require_folder(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderNotFoundError(folder)
    return folder


def _labelled_files(
    folder: Path, suffixes: frozenset[str], what: str
) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """Files with these suffixes: in class subfolders (labelled) or flat (label -1)."""
    folder = _require_folder(folder)

    def files_in(d: Path) -> list[Path]:
        return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in suffixes)

    top = files_in(folder)
    class_dirs = sorted(
        d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".") and files_in(d)
    )
    if top and class_dirs:
        raise DataError(
            f"Data folder {str(folder)!r} mixes {what} at the top level with class "
            f"subfolders {[d.name for d in class_dirs]}: use one layout."
        )
    if top:
        return [(p, -1) for p in top], ()
    if not class_dirs:
        raise EmptyDataError(folder, f"{what} (looked for {sorted(suffixes)})")
    classes = tuple(d.name for d in class_dirs)
    return [(p, i) for i, d in enumerate(class_dirs) for p in files_in(d)], classes


def load_images(folder: Path, *, input_size: int) -> LabelledDataset:
    """The node's images, resized to ``input_size`` squares (see the module docstring)."""
    if input_size < 1:
        raise ValueError(f"`input_size` must be >= 1. Found {input_size}.")
    files, classes = _labelled_files(folder, IMAGE_SUFFIXES, "images")
    images = np.empty((len(files), input_size, input_size, 3), dtype=np.uint8)
    for n, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:
                img.load()
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise CorruptFileError(path, f"not a readable PNG/JPEG image ({exc}).") from exc
        if rgb.size != (input_size, input_size):
            rgb = rgb.resize((input_size, input_size), Image.Resampling.BILINEAR)
        images[n] = np.asarray(rgb, dtype=np.uint8)
    return image_dataset(images, [label for _, label in files], classes=classes)


def resample(signal: FloatArray, from_rate: int, to_rate: int) -> FloatArray:
    """Band-limited resampling of a 1-d signal (FFT: spectrum cut or zero-padded)."""
    if from_rate == to_rate:
        return np.asarray(signal, np.float64).copy()
    n_out = max(1, round(signal.shape[-1] * to_rate / from_rate))
    spectrum = np.fft.rfft(signal)
    keep = n_out // 2 + 1
    out_spec = np.zeros(keep, dtype=np.complex128)
    m = min(keep, spectrum.shape[0])
    out_spec[:m] = spectrum[:m]
    out = np.fft.irfft(out_spec, n=n_out) * (n_out / signal.shape[-1])
    return np.asarray(out, dtype=np.float64)


def read_wav(path: Path) -> tuple[npt.NDArray[np.float64], int]:
    """Samples ``(channels, T)`` in [-1, 1] and the sample rate of a PCM WAV file."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as exc:
        raise CorruptFileError(path, f"not a readable PCM WAV file ({exc}).") from exc
    dtypes = {1: np.uint8, 2: np.int16, 4: np.int32}
    if width not in dtypes:
        raise CorruptFileError(path, f"unsupported sample width {8 * width} bits (8/16/32).")
    if len(frames) % (width * channels):
        raise CorruptFileError(path, "truncated sample data.")
    raw = np.frombuffer(frames, dtype=np.dtype(dtypes[width]).newbyteorder("<"))
    data = raw.astype(np.float64)
    data = (data - 128.0) / 128.0 if width == 1 else data / float(2 ** (8 * width - 1))
    return data.reshape(-1, channels).T.copy(), rate


def load_audio(
    folder: Path,
    *,
    sample_rate: int,
    duration_s: float,
    resample_audio: bool = False,
    mix_to_mono: bool = False,
) -> LabelledDataset:
    """The node's WAV clips at ``sample_rate``, cut or zero-padded to ``duration_s``.

    Other sample rates raise ``SampleRateError`` unless ``resample_audio``; multi-channel
    files raise ``ChannelCountError`` unless ``mix_to_mono``.
    """
    if sample_rate < 1 or not duration_s > 0:
        raise ValueError(
            f"`sample_rate` and `duration_s` must be positive. Found {sample_rate}, {duration_s}."
        )
    files, classes = _labelled_files(folder, frozenset({".wav"}), "WAV files")
    length = round(sample_rate * duration_s)
    clips = torch.zeros((len(files), length), dtype=torch.float32)
    for n, (path, _) in enumerate(files):
        data, rate = read_wav(path)
        if data.shape[0] != 1:
            if not mix_to_mono:
                raise ChannelCountError(path, data.shape[0])
            data = data.mean(axis=0, keepdims=True)
        signal = data[0]
        if rate != sample_rate:
            if not resample_audio:
                raise SampleRateError(path, rate, sample_rate)
            signal = resample(signal, rate, sample_rate)
        if signal.shape[0] == 0:
            raise CorruptFileError(path, "the file holds no samples.")
        cut = signal[:length]
        clips[n, : cut.shape[0]] = torch.from_numpy(cut.astype(np.float32))
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return LabelledDataset(clips, labels, classes=classes)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CorruptFileError(path, f"cannot be read ({exc}).") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CorruptFileError(
            path, f"not UTF-8 text (invalid byte {raw[exc.start]:#04x} on line {line})."
        ) from exc


def load_texts(folder: Path, *, max_seq_length: int) -> LabelledDataset:
    """One example per non-empty line of the node's ``.txt`` files (byte ids, padded)."""
    files, classes = _labelled_files(folder, frozenset({".txt"}), ".txt files")
    texts: list[str] = []
    labels: list[int] = []
    for path, label in files:
        lines = [line.strip() for line in _read_text(path).splitlines()]
        texts.extend(line for line in lines if line)
        labels.extend(label for line in lines if line)
    if not texts:
        raise EmptyDataError(Path(folder), "non-empty lines of text")
    return text_dataset(texts, labels, max_seq_length=max_seq_length, classes=classes)


def load_corpus(folder: Path, *, max_seq_length: int) -> LabelledDataset:
    """The LM corpus: every ``.txt`` file's bytes (sorted by path, newline-joined)."""
    folder = _require_folder(folder)
    paths = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    corpus = b"\n".join(_read_text(p).encode("utf-8") for p in paths)
    if not corpus.strip():
        raise EmptyDataError(folder, "text for the language model (.txt files)")
    return lm_dataset(corpus, max_seq_length=max_seq_length)


@dataclass(frozen=True, slots=True, eq=False)
class SensorTable:
    """Sensor readings: ``values[row, column]`` (float64; NaN where a cell was empty)."""

    columns: tuple[str, ...]
    values: FloatArray

    def dataset(self) -> LabelledDataset:
        """The rows as an unlabelled float32 dataset."""
        x = torch.from_numpy(self.values.astype(np.float32))
        return LabelledDataset(x, torch.full((x.shape[0],), -1, dtype=torch.int64))


def _parse_csv(path: Path, text: str) -> tuple[list[str], list[list[float]]]:
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise CorruptFileError(path, "the file is empty (expected a header row).")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header) or any(not h for h in header):
        raise CorruptFileError(path, f"the header has empty or duplicate names: {header}.")
    values: list[list[float]] = []
    for line_no, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise CorruptFileError(
                path, f"line {line_no} has {len(row)} cells; the header has {len(header)}."
            )
        parsed: list[float] = []
        for name, cell in zip(header, row, strict=True):
            cell = cell.strip()
            if name.lower() in _TIME_COLUMNS:
                parsed.append(math.nan)
                continue
            try:
                parsed.append(float(cell) if cell else math.nan)
            except ValueError:
                raise CorruptFileError(
                    path, f"line {line_no}, column {name!r}: {cell!r} is not a number."
                ) from None
        values.append(parsed)
    return header, values


def load_sensor_csv(folder: Path) -> SensorTable:
    """Every ``.csv`` sensor log of the node, stacked (all files must share the header)."""
    folder = _require_folder(folder)
    paths = sorted(p for p in folder.rglob("*.csv") if p.is_file())
    if not paths:
        raise EmptyDataError(folder, "sensor logs (.csv files)")
    parsed = [(path, *_parse_csv(path, _read_text(path))) for path in paths]
    expected = parsed[0][1]
    for path, header, _ in parsed[1:]:
        if header != expected:
            raise InconsistentColumnsError(path, expected, header)
    blocks = [values for _, _, values in parsed]
    keep = [i for i, name in enumerate(expected) if name.lower() not in _TIME_COLUMNS]
    if not keep:
        raise EmptyDataError(folder, "numeric sensor columns")
    rows = [row for block in blocks for row in block]
    if not rows:
        raise EmptyDataError(folder, "sensor readings (only headers)")
    table = np.asarray(rows, dtype=np.float64)[:, keep]
    return SensorTable(columns=tuple(expected[i] for i in keep), values=table)
