"""Node logic without Flower: node config, job -> data folder, hold-out split, eligibility,
sensing contributions and the normalizers the server builds from their sum."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.data import load_images, load_sensor_csv, read_wav
from clients.demo_data import Modality, write_demo_dataset
from clients.models import model_fingerprint
from clients.node import (
    Fault,
    Node,
    NodeConfig,
    NodeConfigError,
    clear_data_cache,
    holdout_split,
    modality_for_job,
    model_spec_for_job,
    normalizer_from_sum,
    normalizer_tensors,
    sensing_contribution,
    sensing_vector_length,
)
from clients.sensing import log_mel_spectrogram
from manifests.catalog import Component, NodeType, Task
from manifests.jobspec import JobSpec

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "batch_size": 8}


def vit_job(**extra: object) -> JobSpec:
    return JobSpec.from_mapping(
        {
            "component": "vision",
            "base_model": "vit-base16",
            "task": "embed",
            "embedding_dim": 16,
            "input_size": 32,
            **TINY,
            **extra,
        }
    )


def sensing_job(base_model: str, **extra: object) -> JobSpec:
    task = "normalizer" if base_model == "iot" else "preproc"
    return JobSpec.from_mapping(
        {"component": "sensing", "base_model": base_model, "task": task, **extra}
    )


# ----------------------------------------------------------------------------- config


def test_node_config_from_flower_reads_type_folder_name_and_faults(tmp_path: Path) -> None:
    config = NodeConfig.from_flower(
        {
            "node-type": "encoder",
            "data-dir": str(tmp_path),
            "name": "cam-1",
            "fail-on": "train.secagg_masked@2, evaluate.eval@3,query.node_info",
        }
    )
    assert config.node_type is NodeType.ENCODER and config.data_dir == tmp_path
    assert config.name == "cam-1"
    assert config.faults == (
        Fault("train.secagg_masked", 2),
        Fault("evaluate.eval", 3),
        Fault("query.node_info"),
    )
    node = Node(config, node_id=7)
    node.check_fault("train.secagg_masked", 1)  # another round: no fault
    with pytest.raises(RuntimeError, match=r"injected fault train\.secagg_masked@2"):
        node.check_fault("train.secagg_masked", 2)
    with pytest.raises(RuntimeError, match=r"injected fault query\.node_info"):
        node.check_fault("query.node_info", None)


def test_node_config_from_flower_reports_every_problem() -> None:
    with pytest.raises(NodeConfigError) as caught:
        NodeConfig.from_flower({"fail-on": "train.fit@x,train.evil@1", "name": 3})
    message = str(caught.value)
    for expected in (
        "node-type: is required",
        "data-dir: is required",
        "name: must be non-empty text",
        "'train.fit@x' must be <message type>@<round number>",
        "unknown message type 'train.evil'",
    ):
        assert expected in message
    with pytest.raises(NodeConfigError, match="unknown node type 'camera'"):
        NodeConfig.from_flower({"node-type": "camera", "data-dir": "/data"})
    with pytest.raises(NodeConfigError, match="management nodes have nothing to train"):
        NodeConfig.from_flower({"node-type": "management", "data-dir": "/data"})


# ------------------------------------------------------------------------------ jobs


def test_each_trainable_job_reads_its_modality_folder_and_detection_is_refused() -> None:
    assert modality_for_job(vit_job()) is Modality.VISION
    assert (
        modality_for_job(
            JobSpec.from_mapping(
                {
                    "component": "audio",
                    "base_model": "wav2vec2-base",
                    "task": "embed",
                    "embedding_dim": 16,
                }
            )
        )
        is Modality.AUDIO
    )
    assert (
        modality_for_job(
            JobSpec.from_mapping(
                {
                    "component": "text",
                    "base_model": "all-mpnet-base-v2",
                    "task": "embed",
                    "embedding_dim": 16,
                }
            )
        )
        is Modality.TEXT
    )
    lm = JobSpec.from_mapping(
        {"component": "inference", "base_model": "gpt-small-v1", "task": "lm-finetune"}
    )
    assert modality_for_job(lm) is Modality.LM
    assert model_spec_for_job(lm).embedding_dim is None
    assert modality_for_job(sensing_job("camera")) is Modality.VISION
    assert modality_for_job(sensing_job("audio")) is Modality.AUDIO
    assert modality_for_job(sensing_job("iot")) is Modality.IOT
    detection = JobSpec.model_construct(
        component=Component.INFERENCE, base_model="yolox-s", task=Task.DETECTION
    )
    with pytest.raises(ValueError, match="'detection' is not supported yet"):
        modality_for_job(detection)
    with pytest.raises(ValueError, match="trains no model"):
        model_spec_for_job(sensing_job("camera"))


def test_embed_is_supervised_unless_augmentations_ask_for_contrastive_without_example_dp() -> None:
    supervised = model_spec_for_job(vit_job())
    contrastive = model_spec_for_job(vit_job(augmentations=["flip", "crop"]))
    private = model_spec_for_job(
        vit_job(
            augmentations=["flip"],
            privacy_level="dp",
            dp={"unit": "example", "clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5},
        )
    )
    assert supervised.num_classes == 10 and private.num_classes == 10
    assert contrastive.num_classes is None  # NT-Xent over two augmented views
    assert supervised.resolved_hidden_size == 32 and supervised.resolved_input_size == 32
    assert model_fingerprint(contrastive) != model_fingerprint(supervised)


def test_holdout_split_is_deterministic_per_class_and_disjoint() -> None:
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    keep, held = holdout_split(labels)
    again = holdout_split(labels)
    assert np.array_equal(keep, again[0]) and np.array_equal(held, again[1])
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(labels.size))
    assert np.bincount(labels[held], minlength=4).tolist() == [2, 1, 1, 0]
    keep, held = holdout_split(np.full(10, -1))  # unlabelled: one group
    assert held.size == 2 and keep.size == 8
    keep, held = holdout_split(np.full(1, -1))
    assert keep.tolist() == [0] and held.size == 0


# ------------------------------------------------------------------------ eligibility


def test_node_info_reports_training_examples_fingerprint_or_the_reason(tmp_path: Path) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    job = vit_job()
    info = Node(NodeConfig(NodeType.ENCODER, tmp_path), node_id=1).node_info(job)
    assert info.eligible and info.reason == ""
    assert info.num_examples == 10  # 2 per class, 1 of each held out
    assert info.model_fingerprint == model_fingerprint(model_spec_for_job(job))

    sensing = Node(NodeConfig(NodeType.SENSING, tmp_path), node_id=2).node_info(job)
    assert not sensing.eligible and sensing.node_type == "sensing"
    assert "for encoder nodes; this is a sensing node" in sensing.reason

    empty = Node(NodeConfig(NodeType.ENCODER, tmp_path / "nothing"), node_id=3).node_info(job)
    assert not empty.eligible and "does not exist" in empty.reason
    assert "vision" in empty.reason


def test_loaded_data_is_cached_until_the_cache_is_cleared(tmp_path: Path) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    node = Node(NodeConfig(NodeType.ENCODER, tmp_path), node_id=1)
    assert node.node_info(vit_job()).eligible
    shutil.rmtree(tmp_path / "vision")
    assert node.node_info(vit_job()).num_examples == 10  # not read again
    assert not node.node_info(vit_job(input_size=48)).eligible  # other input spec: reads
    clear_data_cache()
    assert not node.node_info(vit_job()).eligible


# ---------------------------------------------------------------------------- sensing


def _nodes(tmp_path: Path, modality: str, sizes: list[int]) -> list[Path]:
    dirs = []
    for k, n in enumerate(sizes):
        write_demo_dataset(modality, tmp_path / f"node{k}" / modality, n, seed=10 + k)
        dirs.append(tmp_path / f"node{k}")
    return dirs


def test_camera_node_sums_give_the_pooled_pixel_mean_and_std(tmp_path: Path) -> None:
    job = sensing_job("camera", input_size=32)
    dirs = _nodes(tmp_path, "vision", [7, 12, 5])
    parts = [sensing_contribution(job, d, 0.0) for d in dirs]
    assert sensing_vector_length(job) == 7 and all(v.shape == (7,) for v, _ in parts)
    assert [n for _, n in parts] == [7, 12, 5]
    norm = normalizer_from_sum(job, np.sum([v.astype(np.float64) for v, _ in parts], axis=0))
    images = [load_images(d / "vision", input_size=32).inputs.numpy() for d in dirs]
    pixels = np.concatenate([i.transpose(0, 2, 3, 1).reshape(-1, 3) for i in images]) / 255.0
    assert norm.features == ("red", "green", "blue") and norm.count.tolist() == [24.0] * 3
    np.testing.assert_allclose(norm.mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.std, pixels.std(0), rtol=1e-4)


def test_iot_node_sums_give_the_pooled_sensor_mean_and_std(tmp_path: Path) -> None:
    job = sensing_job("iot")
    dirs = _nodes(tmp_path, "iot", [300, 120])
    total = np.sum([sensing_contribution(job, d, 0.0)[0] for d in dirs], axis=0)
    assert sensing_vector_length(job) == 11 and total.shape == (11,)
    norm = normalizer_from_sum(job, total)
    rows = np.concatenate([load_sensor_csv(d / "iot").values for d in dirs])
    assert norm.count[0] == 420
    np.testing.assert_allclose(norm.mean, rows.mean(0), rtol=1e-5)
    np.testing.assert_allclose(norm.std, rows.std(0), rtol=1e-3)  # float32 sums, wide ranges
    tensors = normalizer_tensors(norm)
    assert sorted(tensors) == ["count", "mean", "std"]
    assert all(t.dtype == np.float32 and t.shape == (5,) for t in tensors.values())


def test_audio_node_sums_give_the_pooled_log_mel_mean_and_std(tmp_path: Path) -> None:
    job = sensing_job("audio")
    dirs = _nodes(tmp_path, "audio", [4, 3])
    total = np.sum([sensing_contribution(job, d, 0.0)[0] for d in dirs], axis=0)
    assert sensing_vector_length(job) == 81 == total.shape[0]
    norm = normalizer_from_sum(job, total)
    clips = [read_wav(p)[0][0] for d in dirs for p in sorted((d / "audio").rglob("*.wav"))]
    logmel = log_mel_spectrogram(torch.from_numpy(np.stack(clips)), sample_rate=16_000).numpy()
    frames = logmel.transpose(0, 2, 1).reshape(-1, 40)  # equal clip lengths: frame-level stats
    np.testing.assert_allclose(norm.mean, frames.mean(0), rtol=1e-4)
    np.testing.assert_allclose(norm.std, frames.std(0), rtol=2e-3, atol=1e-3)


def test_one_example_moves_a_sensing_sum_by_at_most_the_clipping_norm(tmp_path: Path) -> None:
    job = sensing_job("iot")
    write_demo_dataset("iot", tmp_path / "a" / "iot", 40, seed=3)
    (tmp_path / "b" / "iot").mkdir(parents=True)
    lines = (tmp_path / "a" / "iot" / "sensors_000.csv").read_text().splitlines()
    (tmp_path / "b" / "iot" / "sensors_000.csv").write_text("\n".join(lines[:-1]) + "\n")
    for c in (0.5, 1.0):
        with_it, n = sensing_contribution(job, tmp_path / "a", c)
        without, m = sensing_contribution(job, tmp_path / "b", c)
        assert (n, m) == (40, 39)
        change = float(np.linalg.norm(with_it.astype(np.float64) - without))
        assert change <= c * (1 + 1e-6)
        assert change > 0.99 * c  # every example's contribution is larger than these C
    unclipped = sensing_contribution(job, tmp_path / "a", 0.0)[0]
    assert unclipped[0] == 40.0  # no clipping: the first coordinate counts the examples


def test_normalizer_from_sum_clamps_noisy_variance_and_refuses_a_useless_sum() -> None:
    job = sensing_job("camera")
    noisy = np.array([10.0, 5.0, 5.0, 5.0, 2.0, 2.5, 3.0])  # E[u^2] < E[u]^2 for red
    norm = normalizer_from_sum(job, noisy)
    assert norm.std.tolist()[0] == 0.0 and norm.std[2] > 0
    np.testing.assert_allclose(norm.mean, [0.5, 0.5, 0.5])
    for count in (0.0, -3.0):
        with pytest.raises(ValueError, match="needs a positive count"):
            normalizer_from_sum(job, np.r_[count, noisy[1:]])
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        normalizer_from_sum(job, np.ones(11))
    with pytest.raises(ValueError, match="NaN or Inf"):
        normalizer_from_sum(job, np.r_[np.nan, noisy[1:]])
    with pytest.raises(ValueError, match="not a sensing job"):
        sensing_vector_length(vit_job())


def test_iot_nodes_need_the_public_sensor_columns(tmp_path: Path) -> None:
    (tmp_path / "iot").mkdir()
    (tmp_path / "iot" / "log.csv").write_text("timestamp,temperature_c\n0,21.5\n")
    node = Node(NodeConfig(NodeType.SENSING, tmp_path), node_id=1)
    info = node.node_info(sensing_job("iot"))
    assert not info.eligible and "lack the columns" in info.reason
    assert "humidity_pct" in info.reason


def test_noop_training_node_answers_with_a_zero_update_and_no_evaluation(tmp_path: Path) -> None:
    from clients.models import build_model, get_weights, weight_names
    from clients.node import NodeState
    from clients.protocol import NUM_EXAMPLES, RoundConfig

    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    job = vit_job()
    config = NodeConfig.from_flower(
        {"node-type": "encoder", "data-dir": str(tmp_path), "noop-training": True}
    )
    assert config.noop_training
    model = build_model(model_spec_for_job(job), seed=3)
    weights = list(zip(weight_names(model), get_weights(model), strict=True))
    node = Node(config, node_id=5)
    result = node.fit(job, RoundConfig(server_round=1, seed=1), weights, NodeState())
    assert [a.shape for a in result.update] == [w.shape for _, w in weights]
    assert all(not a.any() for a in result.update)
    assert result.summable.shape == (sum(w.size for _, w in weights) + 2,)
    assert not result.summable.any()
    assert node.evaluate(job, RoundConfig(server_round=1, seed=1), weights) == {NUM_EXAMPLES: 10}
    with pytest.raises(NodeConfigError, match="noop-training: must be true or false"):
        NodeConfig.from_flower({"node-type": "encoder", "data-dir": "x", "noop-training": "yes"})
