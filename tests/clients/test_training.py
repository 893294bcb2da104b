"""Local training: every task lowers its loss on demo data; embed beats an untrained model;
DP-SGD through Opacus runs the same loop."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from aggregation.dp_sgd import make_private
from clients.data import LabelledDataset
from clients.demo_data import demo_dataset
from clients.models import ModelFamily, ModelSpec, build_model, get_weights
from clients.training import (
    evaluate,
    make_optimizer,
    nearest_centroid_accuracy,
    nt_xent_loss,
    train_local,
)

VIT = ModelSpec(ModelFamily.VIT, hidden_size=32, num_layers=2, num_heads=2, input_size=32,
                patch_size=8, embedding_dim=32, num_classes=10)  # fmt: skip


def _loader(data: LabelledDataset, batch: int = 64, seed: int = 0) -> DataLoader:  # type: ignore[type-arg]
    return DataLoader(data, batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip


def _vision(n: int, seed: int) -> LabelledDataset:
    return demo_dataset("vision", n, np.random.default_rng(seed))


def test_classification_lowers_the_loss_and_is_deterministic() -> None:
    train, test = _vision(200, 0), DataLoader(_vision(100, 1), batch_size=100)
    results, weights = [], []
    for _ in range(2):
        model = build_model(VIT)
        before = evaluate(model, test, task="classification")
        result = train_local(model, _loader(train), task="classification", epochs=3,
                             optimizer="adamw", learning_rate=3e-3,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
        results.append(result)
        weights.append(get_weights(model))
    after = evaluate(model, test, task="classification")
    assert after["loss"] < before["loss"] - 0.3  # stated tolerance, seed-fixed
    assert after["accuracy"] > before["accuracy"] + 0.2
    assert results[0].num_examples == 200 and results[0].steps == 12
    assert results[0].mean_loss == results[1].mean_loss
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))


def test_embed_training_beats_the_untrained_encoder_on_nearest_centroid_accuracy() -> None:
    """NT-Xent, 12 epochs of 400 images (~3 s on a laptop core)."""
    spec = ModelSpec(ModelFamily.VIT, hidden_size=32, num_layers=2, num_heads=2, input_size=32,
                     patch_size=8, embedding_dim=32)  # fmt: skip
    model = build_model(spec)
    held_out = DataLoader(_vision(200, 1), batch_size=100)
    untrained = evaluate(model, held_out, task="embed")
    result = train_local(model, _loader(_vision(400, 0)), task="embed", epochs=12,
                         optimizer="adamw", learning_rate=3e-3,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    trained = evaluate(model, held_out, task="embed")
    assert trained["loss"] < untrained["loss"]
    assert trained["accuracy"] > untrained["accuracy"] + 0.15, (untrained, trained)
    assert result.steps == 12 * 7


def test_lm_finetune_lowers_next_byte_loss() -> None:
    spec = ModelSpec(ModelFamily.GPT2, hidden_size=32, num_layers=2, num_heads=2,
                     max_seq_length=64, dropout=0.0)  # fmt: skip
    model = build_model(spec)
    corpus = demo_dataset("lm", 120, np.random.default_rng(0), max_seq_length=64)
    held_out = DataLoader(demo_dataset("lm", 40, np.random.default_rng(1), max_seq_length=64),
                          batch_size=32)  # fmt: skip
    before = evaluate(model, held_out, task="lm-finetune")
    train_local(
        model,
        _loader(corpus, batch=16),
        task="lm-finetune",
        epochs=3,
        optimizer="adam",
        learning_rate=3e-3,
        generator=torch.Generator().manual_seed(0),
    )
    after = evaluate(model, held_out, task="lm-finetune")
    assert before["loss"] > 5.0  # ~ln(260) untrained
    assert after["loss"] < before["loss"] - 1.5
    assert after["bits_per_byte"] == pytest.approx(after["loss"] / np.log(2))


def test_audio_and_text_encoders_train_on_their_demo_data() -> None:
    audio_spec = ModelSpec(ModelFamily.WAV2VEC2, hidden_size=32, num_layers=1, num_heads=2,
                           embedding_dim=16, num_classes=6, dropout=0.0)  # fmt: skip
    audio = demo_dataset("audio", 48, np.random.default_rng(0), duration_s=0.25)
    model = build_model(audio_spec)
    first = train_local(model, _loader(audio, batch=16), task="classification", epochs=1,
                        optimizer="adamw", learning_rate=3e-3,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    later = train_local(model, _loader(audio, batch=16), task="classification", epochs=3,
                        optimizer="adamw", learning_rate=3e-3,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert later.mean_loss < first.mean_loss

    text_spec = ModelSpec(ModelFamily.MPNET, hidden_size=32, num_layers=1, num_heads=2,
                          max_seq_length=96, embedding_dim=16, dropout=0.0)  # fmt: skip
    texts = demo_dataset("text", 64, np.random.default_rng(0), max_seq_length=96)
    model = build_model(text_spec)
    first = train_local(model, _loader(texts, batch=32), task="embed", epochs=1,
                        optimizer="adamw", learning_rate=3e-3,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    later = train_local(model, _loader(texts, batch=32), task="embed", epochs=3,
                        optimizer="adamw", learning_rate=3e-3,
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert later.mean_loss < first.mean_loss


def test_dp_sgd_through_opacus_runs_the_same_loop_and_moves_the_weights() -> None:
    model = build_model(VIT)
    before = get_weights(model)
    loader = DataLoader(_vision(64, 0), batch_size=16)
    optimizer = make_optimizer(model, "sgd", learning_rate=0.05)
    private = make_private(model, optimizer, loader, noise_multiplier=0.5, max_grad_norm=1.0,
                           noise_generator=torch.Generator().manual_seed(0))  # fmt: skip
    result = train_local(private.module, loader, task="embed", epochs=1, optimizer="sgd",
                         learning_rate=0.05, generator=torch.Generator().manual_seed(0),
                         dp=private, embed_loss="supervised")  # fmt: skip
    assert result.steps >= 1 and np.isfinite(result.mean_loss)
    result = train_local(model, loader, task="classification", epochs=1, optimizer="sgd",
                         learning_rate=0.05, generator=torch.Generator().manual_seed(1),
                         dp=private)  # fmt: skip
    assert sum(e.steps for e in private.events()) == 8
    assert any(not np.array_equal(a, b) for a, b in zip(before, get_weights(model), strict=True))
    with pytest.raises(ValueError, match="NT-Xent mixes the examples"):
        train_local(model, loader, task="embed", epochs=1, optimizer="sgd", learning_rate=0.05,
                    generator=torch.Generator(), dp=private)  # fmt: skip
    with pytest.raises(ValueError, match=r"must be `dp\.module`"):
        train_local(build_model(VIT), loader, task="classification", epochs=1, optimizer="sgd",
                    learning_rate=0.05, generator=torch.Generator(), dp=private)  # fmt: skip


def test_dp_sgd_takes_a_noised_accounted_step_on_an_empty_poisson_batch() -> None:
    # The subsampled Gaussian analysis assumes every step adds noise, even when the Poisson
    # sample is empty; skipping such a step would reveal that nobody was sampled.
    model = build_model(VIT)
    before = get_weights(model)
    loader = DataLoader(_vision(4, 0), batch_size=1)
    optimizer = make_optimizer(model, "sgd", learning_rate=0.05)
    private = make_private(model, optimizer, loader, noise_multiplier=0.5, max_grad_norm=1.0,
                           noise_generator=torch.Generator().manual_seed(0))  # fmt: skip
    setattr(private.data_loader.batch_sampler, "sample_rate", 0.0)  # noqa: B010 -- all empty
    result = train_local(private.module, loader, task="classification", epochs=1,
                         optimizer="sgd", learning_rate=0.05,
                         generator=torch.Generator().manual_seed(0), dp=private)  # fmt: skip
    assert result.steps == 0 and np.isnan(result.mean_loss)  # no example was ever seen
    assert sum(e.steps for e in private.events()) == 4  # yet every step was taken and counted
    assert any(not np.array_equal(a, b) for a, b in zip(before, get_weights(model), strict=True))


def test_unsupported_tasks_and_bad_arguments_are_rejected() -> None:
    model = build_model(VIT)
    loader = DataLoader(_vision(8, 0), batch_size=8)
    kwargs = {"optimizer": "adamw", "learning_rate": 1e-3, "generator": torch.Generator()}
    with pytest.raises(ValueError, match="task 'detection' is not supported yet"):
        train_local(model, loader, task="detection", epochs=1, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="federated analytics"):
        train_local(model, loader, task="preproc", epochs=1, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`epochs` must be >= 1"):
        train_local(model, loader, task="embed", epochs=0, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown optimizer 'lion'"):
        make_optimizer(model, "lion", learning_rate=1e-3)
    with pytest.raises(ValueError, match="needs labelled data"):
        evaluate(build_model(VIT), DataLoader(LabelledDataset(
            torch.zeros(4, 3, 32, 32), torch.full((4,), -1)), batch_size=4),
            task="classification")  # fmt: skip


def test_nt_xent_is_minimal_for_matching_views_and_known_for_equal_ones() -> None:
    z = torch.eye(4) * 10
    aligned = nt_xent_loss(z, z, temperature=0.5)
    shuffled = nt_xent_loss(z, z.roll(1, 0), temperature=0.5)
    assert aligned < shuffled
    same = torch.ones(3, 2)
    assert float(nt_xent_loss(same, same, temperature=1.0)) == pytest.approx(np.log(5))


def test_nearest_centroid_accuracy_known_answers() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert nearest_centroid_accuracy(embeddings, torch.tensor([0, 0, 1, 1])) == 1.0
    assert nearest_centroid_accuracy(embeddings, torch.tensor([0, 1, 0, 1])) == 0.0
    with pytest.raises(ValueError, match=">= 2 examples each"):
        nearest_centroid_accuracy(embeddings[:3], torch.tensor([0, 0, 1]))
