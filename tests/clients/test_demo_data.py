"""Demo data: deterministic, balanced, in the loaders' formats; Dirichlet partitions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clients.data import load_audio, load_corpus, load_images, load_sensor_csv, load_texts
from clients.demo_data import (
    AUDIO_CLASSES,
    SENSOR_COLUMNS,
    VISION_CLASSES,
    Modality,
    demo_dataset,
    demo_images,
    demo_sensors,
    write_demo_dataset,
)
from clients.partition import dirichlet_partition, partition_dataset

SIZES = {Modality.VISION: 20, Modality.AUDIO: 12, Modality.TEXT: 12, Modality.LM: 30,
         Modality.IOT: 300}  # fmt: skip


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("modality", list(Modality))
def test_same_seed_writes_the_same_bytes_and_another_seed_differs(
    modality: Modality, tmp_path: Path
) -> None:
    a = write_demo_dataset(modality, tmp_path / "a", SIZES[modality], seed=7)
    write_demo_dataset(modality, tmp_path / "b", SIZES[modality], seed=7)
    write_demo_dataset(modality, tmp_path / "c", SIZES[modality], seed=8)
    assert a and all(p.is_file() for p in a)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert _tree(tmp_path / "a") != _tree(tmp_path / "c")


def test_written_demo_data_reads_back_through_the_loaders(tmp_path: Path) -> None:
    write_demo_dataset("vision", tmp_path / "v", 20, seed=1)
    images = load_images(tmp_path / "v", input_size=32)
    assert len(images) == 20
    assert images.classes == tuple(f"{i:02d}-{c}" for i, c in enumerate(VISION_CLASSES))
    x, _ = images[0]
    assert x.shape == (3, 32, 32) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    _, labels = demo_images(20, np.random.default_rng(1))
    assert sorted(images.labels.tolist()) == sorted(labels.tolist())

    write_demo_dataset("audio", tmp_path / "a", 12, seed=1)
    audio = load_audio(tmp_path / "a", sample_rate=16_000, duration_s=0.5)
    assert audio.inputs.shape == (12, 8000)
    assert [c[3:] for c in audio.classes] == list(AUDIO_CLASSES)

    write_demo_dataset("text", tmp_path / "t", 12, seed=1)
    texts = load_texts(tmp_path / "t", max_seq_length=96)
    assert len(texts) == 12 and texts.labelled

    write_demo_dataset("lm", tmp_path / "l", 30, seed=1)
    corpus = load_corpus(tmp_path / "l", max_seq_length=64)
    assert len(corpus) > 5 and not corpus.labelled

    write_demo_dataset("iot", tmp_path / "i", 300, seed=1)
    table = load_sensor_csv(tmp_path / "i")
    assert table.columns == SENSOR_COLUMNS and table.values.shape == (300, 5)
    np.testing.assert_allclose(
        table.values, demo_sensors(300, np.random.default_rng(1)).values, rtol=1e-5
    )


def test_in_memory_demo_data_is_balanced_and_deterministic() -> None:
    a = demo_dataset("vision", 50, np.random.default_rng(3))
    b = demo_dataset("vision", 50, np.random.default_rng(3))
    assert np.array_equal(a.inputs.numpy(), b.inputs.numpy())
    assert np.bincount(a.labels.numpy()).tolist() == [5] * 10
    sensors = demo_sensors(5000, np.random.default_rng(0)).values
    assert abs(sensors[:, 2].mean() - 1013.0) < 10 and sensors[:, 2].std() > 1


def test_dirichlet_partitions_are_disjoint_complete_deterministic_and_skewed() -> None:
    labels = np.repeat(np.arange(10), 60)
    parts = dirichlet_partition(labels, num_partitions=5, alpha=0.1, seed=0)
    again = dirichlet_partition(labels, num_partitions=5, alpha=0.1, seed=0)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(600))
    top_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts if len(p)]
    assert np.mean(top_share) > 0.4  # alpha=0.1 concentrates partitions on few classes
    iid = dirichlet_partition(labels, num_partitions=5, alpha=1000.0, seed=0)
    iid_share = [np.bincount(labels[p], minlength=10).max() / len(p) for p in iid]
    assert max(iid_share) < 0.2


def test_partition_dataset_and_bad_parameters() -> None:
    data = demo_dataset("vision", 40, np.random.default_rng(0))
    subsets = partition_dataset(data, num_partitions=4, alpha=0.5, seed=1)
    assert sum(len(s) for s in subsets) == 40
    with pytest.raises(ValueError, match="num_partitions") as info:
        dirichlet_partition([0, 1], num_partitions=0, alpha=-1.0, seed=0)
    assert "alpha" in str(info.value)
    with pytest.raises(ValueError, match="needs labels"):
        partition_dataset(demo_dataset("iot", 10, np.random.default_rng(0)),
                          num_partitions=2, alpha=1.0, seed=0)  # fmt: skip
