"""Tiny model specs of every family, shared by the model, adaptation and pretraining tests."""

from __future__ import annotations

from clients.models import ModelFamily, ModelSpec

TINY = {
    ModelFamily.VIT: ModelSpec(
        ModelFamily.VIT, hidden_size=32, num_layers=2, num_heads=2, input_size=32,
        patch_size=8, embedding_dim=16, num_classes=10,
    ),
    ModelFamily.WAV2VEC2: ModelSpec(
        ModelFamily.WAV2VEC2, hidden_size=32, num_layers=2, num_heads=2, embedding_dim=16,
        num_classes=6,
    ),
    ModelFamily.MPNET: ModelSpec(
        ModelFamily.MPNET, hidden_size=32, num_layers=2, num_heads=2, max_seq_length=32,
        embedding_dim=16, num_classes=4,
    ),
    ModelFamily.GPT2: ModelSpec(
        ModelFamily.GPT2, hidden_size=32, num_layers=2, num_heads=2, max_seq_length=32
    ),
}  # fmt: skip
