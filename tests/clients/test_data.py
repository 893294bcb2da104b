"""Local data loaders: layouts, formats and every rejected input."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clients.data import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    ChannelCountError,
    CorruptFileError,
    DataError,
    EmptyDataError,
    FolderNotFoundError,
    InconsistentColumnsError,
    SampleRateError,
    decode_bytes,
    encode_bytes,
    load_audio,
    load_corpus,
    load_images,
    load_sensor_csv,
    load_texts,
    resample,
)


def _png(path: Path, color: tuple[int, int, int], size: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def _wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


def test_tokenizer_round_trips_bytes_and_frames_with_special_tokens() -> None:
    ids = encode_bytes("héllo", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and max(ids[1:-1]) < 256
    assert decode_bytes(ids) == "héllo".encode()
    assert encode_bytes(b"abcdef", max_length=4, bos=True, eos=True) == [BOS_ID, 97, 98, EOS_ID]
    with pytest.raises(ValueError, match="max_length"):
        encode_bytes("a", max_length=2, bos=True, eos=True)


def test_images_in_class_folders_are_labelled_resized_and_scaled(tmp_path: Path) -> None:
    _png(tmp_path / "cats" / "a.png", (255, 0, 0))
    _png(tmp_path / "dogs" / "b.PNG", (0, 0, 255))
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "dogs" / "c.jpg", format="JPEG")
    data = load_images(tmp_path, input_size=16)
    assert data.classes == ("cats", "dogs") and data.labels.tolist() == [0, 1, 1]
    x, y = data[0]
    assert x.shape == (3, 16, 16) and int(y) == 0
    assert float(x[0].mean()) == pytest.approx(1.0) and float(x[2].mean()) == pytest.approx(-1.0)


def test_flat_image_folder_is_unlabelled(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (1, 2, 3))
    data = load_images(tmp_path, input_size=8)
    assert data.labels.tolist() == [-1] and not data.labelled


def test_missing_empty_mixed_and_corrupt_image_folders_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(FolderNotFoundError, match="does not exist"):
        load_images(tmp_path / "absent", input_size=8)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images")
    with pytest.raises(EmptyDataError, match="holds no images"):
        load_images(tmp_path / "empty", input_size=8)
    _png(tmp_path / "mixed" / "top.png", (0, 0, 0))
    _png(tmp_path / "mixed" / "cls" / "x.png", (0, 0, 0))
    with pytest.raises(DataError, match="mixes images"):
        load_images(tmp_path / "mixed", input_size=8)
    _png(tmp_path / "bad" / "good.png", (0, 0, 0))
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(CorruptFileError, match=r"broken\.png.*not a readable PNG/JPEG") as info:
        load_images(tmp_path / "bad", input_size=8)
    assert info.value.path.name == "broken.png"


def test_audio_is_cut_or_padded_to_the_duration(tmp_path: Path) -> None:
    _wav(tmp_path / "a" / "long.wav", np.full(3000, 0.5), 1000)
    _wav(tmp_path / "b" / "short.wav", np.full(200, -0.25), 1000)
    data = load_audio(tmp_path, sample_rate=1000, duration_s=0.5)
    assert data.inputs.shape == (2, 500) and data.labels.tolist() == [0, 1]
    assert float(data.inputs[0].mean()) == pytest.approx(0.5, abs=1e-4)
    assert float(data.inputs[1, :200].mean()) == pytest.approx(-0.25, abs=1e-4)
    assert float(data.inputs[1, 200:].abs().max()) == 0.0


def test_wrong_sample_rate_is_rejected_unless_resampling(tmp_path: Path) -> None:
    t = np.arange(8000) / 8000
    _wav(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 440 * t), 8000)
    with pytest.raises(SampleRateError, match=r"tone\.wav.*8000 Hz; the job expects 16000 Hz"):
        load_audio(tmp_path, sample_rate=16000, duration_s=1.0)
    data = load_audio(tmp_path, sample_rate=16000, duration_s=1.0, resample_audio=True)
    spectrum = np.abs(np.fft.rfft(data.inputs[0].numpy()))
    assert int(spectrum.argmax()) == 440  # 1 Hz bins over one second
    assert float(data.inputs[0].abs().max()) == pytest.approx(0.5, abs=0.02)


def test_resample_keeps_a_tone_and_its_amplitude() -> None:
    t = np.arange(1600) / 16000
    out = resample(np.sin(2 * np.pi * 1000 * t), 16000, 8000)
    assert out.shape == (800,)
    np.testing.assert_allclose(out, np.sin(2 * np.pi * 1000 * np.arange(800) / 8000), atol=1e-6)


def test_stereo_is_rejected_unless_mixed_to_mono(tmp_path: Path) -> None:
    interleaved = np.stack([np.full(100, 0.5), np.full(100, -0.1)], axis=1).reshape(-1)
    _wav(tmp_path / "stereo.wav", interleaved, 1000, channels=2)
    with pytest.raises(ChannelCountError, match="2 channels"):
        load_audio(tmp_path, sample_rate=1000, duration_s=0.1)
    data = load_audio(tmp_path, sample_rate=1000, duration_s=0.1, mix_to_mono=True)
    assert float(data.inputs[0].mean()) == pytest.approx(0.2, abs=1e-3)


def test_corrupt_and_empty_wav_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "x.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(CorruptFileError, match=r"x\.wav.*not a readable PCM WAV"):
        load_audio(tmp_path, sample_rate=1000, duration_s=0.1)
    (tmp_path / "x.wav").unlink()
    _wav(tmp_path / "silent.wav", np.zeros(0), 1000)
    with pytest.raises(CorruptFileError, match="holds no samples"):
        load_audio(tmp_path, sample_rate=1000, duration_s=0.1)


def test_texts_one_example_per_line_padded(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("hello\n\n  world  \n")
    data = load_texts(tmp_path, max_seq_length=8)
    assert len(data) == 2 and data.labels.tolist() == [0, 0]
    x, _ = data[0]
    assert x.tolist() == [BOS_ID, *b"hello", EOS_ID, PAD_ID]


def test_non_utf8_text_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(CorruptFileError, match=r"bad\.txt.*invalid byte 0xff on line 2"):
        load_texts(tmp_path, max_seq_length=16)
    (tmp_path / "bad.txt").write_text("\n\n")
    with pytest.raises(EmptyDataError, match="non-empty lines"):
        load_texts(tmp_path, max_seq_length=16)


def test_corpus_windows_cover_every_byte(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcdefghij")
    data = load_corpus(tmp_path, max_seq_length=6)
    rows = [data[i][0].tolist() for i in range(len(data))]
    assert b"".join(decode_bytes(r) for r in rows) == b"abcdefghij"
    assert all(r[0] == BOS_ID for r in rows)
    (tmp_path / "a.txt").write_text("  \n")
    with pytest.raises(EmptyDataError):
        load_corpus(tmp_path, max_seq_length=6)


def _csv(path: Path, text: str) -> None:
    path.write_text(text)


def test_sensor_logs_are_stacked_without_time_columns_and_with_nan_gaps(tmp_path: Path) -> None:
    _csv(tmp_path / "a.csv", "timestamp,temp,hum\n0,20.5,40\n60,21,\n")
    _csv(tmp_path / "b.csv", "timestamp,temp,hum\n120,22,41\n")
    table = load_sensor_csv(tmp_path)
    assert table.columns == ("temp", "hum")
    np.testing.assert_array_equal(table.values, [[20.5, 40], [21, np.nan], [22, 41]])
    assert len(table.dataset()) == 3


def test_inconsistent_or_malformed_csv_is_rejected(tmp_path: Path) -> None:
    _csv(tmp_path / "a.csv", "temp,hum\n1,2\n")
    _csv(tmp_path / "b.csv", "temp,pressure\n1,2\n")
    with pytest.raises(InconsistentColumnsError, match=r"b\.csv.*missing \['hum'\].*'pressure'"):
        load_sensor_csv(tmp_path)
    _csv(tmp_path / "b.csv", "temp,hum\n1,warm\n")
    with pytest.raises(CorruptFileError, match=r"line 2, column 'hum': 'warm' is not a number"):
        load_sensor_csv(tmp_path)
    _csv(tmp_path / "b.csv", "temp,hum\n1,2,3\n")
    with pytest.raises(CorruptFileError, match="line 2 has 3 cells; the header has 2"):
        load_sensor_csv(tmp_path)
    _csv(tmp_path / "b.csv", "")
    with pytest.raises(CorruptFileError, match="expected a header row"):
        load_sensor_csv(tmp_path)
    for p in tmp_path.iterdir():
        p.unlink()
    with pytest.raises(EmptyDataError, match="sensor logs"):
        load_sensor_csv(tmp_path)
