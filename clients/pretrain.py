"""Tiny pretrained bases for the demo, generated deterministically from public demo data.

The catalog's artifacts are fine-tunes of pretrained bases (ViT-B/16, wav2vec2-base,
mpnet-base, GPT-2 small). Nothing is downloaded, so the demo makes its own: a demo-size model
of each family (:data:`DEMO_BASES`), trained centrally for a short, fixed budget
(:data:`DEMO_RECIPES`) on *public* data that :mod:`clients.demo_data` generates from a seed
stream no node's data come from, then saved as a Hugging Face folder
(:func:`clients.models.save_base`) that jobs name as their ``checkpoint``.

Objectives: the encoders train their projection and a temporary classifier on the demo's
label space with cross-entropy over augmented views (supervised pretraining, as ImageNet
bases are); the folder keeps the backbone and the projection -- the classifier is dropped, so
a job's classifier starts fresh and the federated (private) training has a task to learn.
GPT-2 learns next-byte prediction on a generated corpus.

Determinism: the same family, seed and recipe give the same tensors, hence the same
:func:`~clients.checkpoints.checkpoint_digest`, on a given machine and software stack: every
random draw comes from the seed, PyTorch runs deterministic algorithms on
:data:`PRETRAIN_THREADS` threads (restored afterwards). Other CPUs or library versions may
round differently -- a server and its nodes should share one generated folder (or compare
digests, as jobs do). A folder already holding the requested base is only verified.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Final, cast

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 -- the PyTorch convention
from torch.utils.data import DataLoader, Dataset, TensorDataset

from clients.checkpoints import CheckpointError, checkpoint_digest
from clients.datasets import AUDIO_CLIP_SECONDS
from clients.demo_data import AUDIO_CLASSES, TEXT_TOPICS, VISION_CLASSES, Modality, demo_dataset
from clients.models import ModelFamily, ModelSpec, build_model, save_base
from clients.training import EmbedLoss, train_local
from manifests.catalog import Task

__all__ = [
    "BASE_MARKER",
    "DEMO_BASES",
    "DEMO_RECIPES",
    "MODALITIES",
    "PRETRAIN_THREADS",
    "PretrainRecipe",
    "pretrained_base",
    "public_data",
]

PRETRAIN_THREADS: Final = 1
BASE_MARKER: Final = "fedbrain_base.json"
"""What a generated folder holds (family, seed, spec, recipe) and its digest."""

Batch = tuple[torch.Tensor, torch.Tensor]
_PUBLIC: Final = int.from_bytes(b"public", "little")

DEMO_BASES: Final[dict[ModelFamily, ModelSpec]] = {
    ModelFamily.VIT: ModelSpec(
        ModelFamily.VIT, hidden_size=64, num_layers=2, num_heads=4, input_size=32,
        patch_size=8, embedding_dim=32,
    ),
    ModelFamily.WAV2VEC2: ModelSpec(
        ModelFamily.WAV2VEC2, hidden_size=32, num_layers=2, num_heads=2, embedding_dim=32,
    ),
    ModelFamily.MPNET: ModelSpec(
        ModelFamily.MPNET, hidden_size=64, num_layers=2, num_heads=4, max_seq_length=64,
        embedding_dim=32,
    ),
    ModelFamily.GPT2: ModelSpec(
        ModelFamily.GPT2, hidden_size=64, num_layers=2, num_heads=2, max_seq_length=64,
    ),
}  # fmt: skip
"""The demo bases' sizes: a job fine-tuning a base sets these (plus its ``num_classes``)."""

_LABELS: Final[dict[ModelFamily, int]] = {
    ModelFamily.VIT: len(VISION_CLASSES),
    ModelFamily.WAV2VEC2: len(AUDIO_CLASSES),
    ModelFamily.MPNET: len(TEXT_TOPICS),
}
MODALITIES: Final[dict[ModelFamily, Modality]] = {
    ModelFamily.VIT: Modality.VISION,
    ModelFamily.WAV2VEC2: Modality.AUDIO,
    ModelFamily.MPNET: Modality.TEXT,
    ModelFamily.GPT2: Modality.LM,
}
"""The demo data each family's base is pretrained on."""


@dataclass(frozen=True, slots=True)
class PretrainRecipe:
    """The fixed pretraining budget: ``examples`` public examples (LM: sentences), AdamW for
    ``epochs`` over them in batches of ``batch_size`` at ``learning_rate``."""

    examples: int
    epochs: int
    batch_size: int
    learning_rate: float

    def __post_init__(self) -> None:
        problems = [
            f"`{name}` must be a positive integer. Found {getattr(self, name)!r}."
            for name in ("examples", "epochs", "batch_size")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if not self.learning_rate > 0:
            problems.append(f"`learning_rate` must be positive. Found {self.learning_rate}.")
        if problems:
            raise ValueError("Invalid pretraining recipe: " + " ".join(problems))


DEMO_RECIPES: Final[dict[ModelFamily, PretrainRecipe]] = {
    ModelFamily.VIT: PretrainRecipe(examples=3000, epochs=6, batch_size=64, learning_rate=2e-3),
    ModelFamily.WAV2VEC2: PretrainRecipe(examples=600, epochs=4, batch_size=32, learning_rate=2e-3),
    ModelFamily.MPNET: PretrainRecipe(examples=2000, epochs=3, batch_size=64, learning_rate=2e-3),
    ModelFamily.GPT2: PretrainRecipe(examples=6000, epochs=3, batch_size=32, learning_rate=3e-3),
}
"""Budgets of about 10-25 s each on one core (measured by benchmarks/bench_pretrain.py)."""


def public_data(family: ModelFamily | str, n: int, *, seed: int) -> Dataset[Batch]:
    """``n`` public demo examples for pretraining ``family``, shaped as a node's loader gives
    them (audio: 0.5 s clips zero-padded to the encoders' ``AUDIO_CLIP_SECONDS``).

    Drawn from ``SeedSequence(seed, spawn_key=(<b"public" as an int>,))``: a stream that no
    ``default_rng(int)`` -- how node data are seeded -- produces.
    """
    kind = ModelFamily(family)
    spec = DEMO_BASES[kind]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_PUBLIC,)))
    data = demo_dataset(
        MODALITIES[kind],
        n,
        rng,
        input_size=spec.resolved_input_size,
        sample_rate=spec.resolved_sample_rate,
        max_seq_length=spec.resolved_max_seq_length,
    )
    if kind is ModelFamily.WAV2VEC2:
        length = round(spec.resolved_sample_rate * AUDIO_CLIP_SECONDS)
        clips = torch.stack([data[i][0] for i in range(len(data))])
        labels = torch.stack([data[i][1] for i in range(len(data))])
        padded = TensorDataset(F.pad(clips, (0, length - clips.shape[1])), labels)
        return cast(Dataset[Batch], padded)
    return data


@contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=warn_only)


def _describe(family: ModelFamily, seed: int, recipe: PretrainRecipe) -> dict[str, object]:
    skip = ("family", "checkpoint", "adaptation", "lora_rank", "lora_alpha", "lora_targets")
    sizes = {k: v for k, v in asdict(DEMO_BASES[family]).items() if k not in skip}
    return {
        "format": "fedbrain-base/1",
        "family": str(family),
        "seed": seed,
        "spec": sizes,
        "recipe": asdict(recipe),
    }


def _train(family: ModelFamily, folder: Path, seed: int, recipe: PretrainRecipe) -> None:
    base = DEMO_BASES[family]
    spec = base if family is ModelFamily.GPT2 else replace(base, num_classes=_LABELS[family])
    with _deterministic(PRETRAIN_THREADS):
        data = public_data(family, recipe.examples, seed=seed)
        model = build_model(spec, seed=seed)
        loader: DataLoader[Batch] = DataLoader(
            data,
            batch_size=recipe.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        train_local(
            model,
            loader,
            task=Task.LM_FINETUNE if family is ModelFamily.GPT2 else Task.EMBED,
            embed_loss=EmbedLoss.SUPERVISED,
            epochs=recipe.epochs,
            optimizer="adamw",
            learning_rate=recipe.learning_rate,
            generator=torch.Generator().manual_seed(seed),
        )
    save_base(model.eval(), folder)


def _verify(folder: Path, described: dict[str, object]) -> Path:
    marker = folder / BASE_MARKER
    try:
        recorded = json.loads(marker.read_text("utf-8"))
    except (OSError, ValueError):
        raise CheckpointError(
            f"{str(folder)!r} exists but holds no readable {BASE_MARKER}: it is not a generated "
            "demo base. Choose another folder, or remove it to generate the base there."
        ) from None
    wanted = {k: v for k, v in recorded.items() if k != "digest"}
    if wanted != json.loads(json.dumps(described)):
        raise CheckpointError(
            f"{str(folder)!r} holds another base ({wanted}); asked for {described}. Choose "
            "another folder, or remove it to generate this base there."
        )
    digest = checkpoint_digest(folder)
    if digest != recorded.get("digest"):
        raise CheckpointError(
            f"The base in {str(folder)!r} was modified: its digest is {digest}, it was "
            f"generated as {recorded.get('digest')}. Remove the folder to generate it again."
        )
    return folder


def pretrained_base(
    family: ModelFamily | str,
    folder: Path,
    *,
    seed: int,
    recipe: PretrainRecipe | None = None,
) -> Path:
    """The folder of ``family``'s demo base pretrained from ``seed``, generating it if absent.

    ``recipe`` defaults to :data:`DEMO_RECIPES` (tests pass a tiny one). A folder that exists
    is only verified: it must hold this family, seed, sizes and recipe (:data:`BASE_MARKER`)
    with the digest it was generated with, else :class:`CheckpointError`. Generation writes
    to a temporary sibling folder and renames it into place, so a crash or a concurrent
    caller never leaves a half-written base. Build the jobs' specs from
    :data:`DEMO_BASES` with ``checkpoint=folder``.
    """
    kind = ModelFamily(family)
    plan = recipe if recipe is not None else DEMO_RECIPES[kind]
    described = _describe(kind, seed, plan)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        return _verify(folder, described)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _train(kind, staging, seed, plan)
        marker = {**described, "digest": checkpoint_digest(staging)}
        (staging / BASE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(staging, folder)  # atomic; fails if another caller filled it first
        except OSError:
            if not (folder.is_dir() and any(folder.iterdir())):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _verify(folder, described)
