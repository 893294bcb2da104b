"""Fine-tuning from a local pretrained checkpoint through the real federator.

Every family (ViT, wav2vec2, MPNet, GPT-2) starts from a tiny base that the test saves with
``save_pretrained`` (:func:`clients.models.save_base`); the real ClientApps train it on demo
data through :class:`tests.support.local_grid.LocalGrid`. What is checked: only the job's
trainable tensors travel (the weights the server sends and the update length), the frozen
base is the same on every node (a node holding another base at the job's path is refused
with both digests named), and the signed manifest records the base's digest.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from clients import protocol as wire
from clients.adaptation import trainable_names
from clients.app import make_client_app
from clients.checkpoints import checkpoint_digest
from clients.demo_data import Modality, write_demo_dataset
from clients.jobs import model_spec_for_job, update_length_for
from clients.models import (
    LORA_TARGETS,
    ModelFamily,
    ModelSpec,
    build_model,
    get_weights,
    save_base,
    weight_names,
)
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec
from manifests.keys import TrustedKeys
from manifests.verify import verify_bundle
from server.discovery import NODES_FILE
from server.federator import run_federation
from server.options import JobStatus, RunOptions
from tests.support.federation import Federation, provision
from tests.support.local_grid import LocalGrid, LocalNode, random_node_ids

EXAMPLES = 24
SIZES: dict[str, object] = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}


@dataclass(frozen=True)
class Family:
    """One family's tiny base, the job that fine-tunes it, and its nodes' data."""

    family: ModelFamily
    modality: Modality
    node_type: NodeType
    job: dict[str, object]
    spec: ModelSpec


FAMILIES: dict[ModelFamily, Family] = {
    ModelFamily.VIT: Family(
        ModelFamily.VIT,
        Modality.VISION,
        NodeType.ENCODER,
        {"component": "vision", "base_model": "vit-base16", "task": "embed", "input_size": 32,
         "embedding_dim": 16, **SIZES},
        ModelSpec(ModelFamily.VIT, hidden_size=32, num_layers=1, num_heads=2, input_size=32,
                  patch_size=8, embedding_dim=16),
    ),
    ModelFamily.WAV2VEC2: Family(
        ModelFamily.WAV2VEC2,
        Modality.AUDIO,
        NodeType.ENCODER,
        {"component": "audio", "base_model": "wav2vec2-base", "task": "embed",
         "sample_rate": 16000, "embedding_dim": 16, **SIZES},
        ModelSpec(ModelFamily.WAV2VEC2, hidden_size=32, num_layers=1, num_heads=2,
                  embedding_dim=16),
    ),
    ModelFamily.MPNET: Family(
        ModelFamily.MPNET,
        Modality.TEXT,
        NodeType.ENCODER,
        {"component": "text", "base_model": "all-mpnet-base-v2", "task": "embed",
         "max_seq_length": 32, "embedding_dim": 16, **SIZES},
        ModelSpec(ModelFamily.MPNET, hidden_size=32, num_layers=1, num_heads=2,
                  max_seq_length=32, embedding_dim=16),
    ),
    ModelFamily.GPT2: Family(
        ModelFamily.GPT2,
        Modality.LM,
        NodeType.INFERENCE,
        {"component": "inference", "base_model": "gpt-small-v1", "task": "lm-finetune",
         "max_seq_length": 32, **SIZES},
        ModelSpec(ModelFamily.GPT2, hidden_size=32, num_layers=1, num_heads=2,
                  max_seq_length=32),
    ),
}  # fmt: skip

EXAMPLE_DP = {"unit": "example", "clipping_norm": 1.0, "target_epsilon": 8.0, "delta": 1e-5}
CASES: dict[ModelFamily, dict[str, object]] = {
    # family: (job settings that differ per case)
    ModelFamily.VIT: {
        "adaptation": "lora",
        "lora_rank": 2,
        "privacy_level": "dp+secure-agg",
        "dp": EXAMPLE_DP,
        "secagg": {"quantization_range": 4.0},
    },
    ModelFamily.WAV2VEC2: {"adaptation": "head", "bundle_weights": "adapters"},
    ModelFamily.MPNET: {"adaptation": "lora", "bundle_weights": "adapters"},
    ModelFamily.GPT2: {"adaptation": "lora", "privacy_level": "secure-agg"},
}


def _save_base(family: Family, folder: Path, *, seed: int) -> Path:
    """A tiny "pretrained" base of the family, written with ``save_pretrained``."""
    return save_base(build_model(family.spec, seed=seed), folder)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[ModelFamily, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {f: _save_base(FAMILIES[f], root / f.value, seed=11) for f in FAMILIES}


@pytest.fixture(scope="module")
def federations(tmp_path_factory: pytest.TempPathFactory) -> dict[NodeType, Federation]:
    root = tmp_path_factory.mktemp("federations")
    return {
        node_type: provision(root / node_type.value, 3, node_type)
        for node_type in (NodeType.ENCODER, NodeType.INFERENCE)
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[Modality, list[Path]]:
    root = tmp_path_factory.mktemp("node-data")
    out: dict[Modality, list[Path]] = {}
    for modality in (Modality.VISION, Modality.AUDIO, Modality.TEXT, Modality.LM):
        dirs = []
        for index in range(3):
            folder = root / modality.value / f"node-{index}"
            write_demo_dataset(modality, folder / modality.value, EXAMPLES, seed=index)
            dirs.append(folder)
        out[modality] = dirs
    return out


def _job(family: Family, base: Path, **settings: object) -> JobSpec:
    federation = {"num_rounds": 1, "clients_per_round": 3, "reliability_threshold": 0.0}
    return JobSpec.from_mapping(
        {
            **family.job,
            "base_checkpoint": str(base),
            "batch_size": 8,
            "learning_rate": 3e-3,
            "federation": federation,
            **settings,
        }
    )


def _options(run_dir: Path, federation: Federation) -> RunOptions:
    return federation.run_options(
        run_dir, seed=3, deterministic_noise=True, round_timeout=120.0, node_wait_timeout=1.0
    )


@pytest.mark.parametrize("kind", list(FAMILIES), ids=[f.value for f in FAMILIES])
def test_each_family_fine_tunes_a_saved_checkpoint_and_the_manifest_carries_its_digest(
    kind: ModelFamily,
    bases: dict[ModelFamily, Path],
    federations: dict[NodeType, Federation],
    data: dict[Modality, list[Path]],
    tmp_path: Path,
) -> None:
    family, base = FAMILIES[kind], bases[kind]
    job = _job(family, base, **CASES[kind])
    federation = federations[family.node_type]
    sent: list[dict[str, tuple[int, ...]]] = []

    def on_message(message: Message) -> None:
        weights = message.content.array_records.get(wire.WEIGHTS)
        if message.metadata.dst_node_id != 1 and weights is not None and len(weights):
            sent.append({name: tuple(weights[name].shape) for name in weights})

    nodes = federation.node_configs(data[family.modality])
    grid = LocalGrid.with_app(make_client_app(nodes), 3, on_message=on_message)
    outcome = run_federation(grid, job, _options(tmp_path, federation))

    assert outcome.status is JobStatus.PASSED, outcome.reasons
    assert outcome.bundle is not None
    manifest = verify_bundle(outcome.bundle, TrustedKeys.load(federation.trusted_keys)).manifest
    digest = checkpoint_digest(base)
    assert manifest.base_checkpoint_digest == digest
    assert manifest.training_config["base_checkpoint_digest"] == digest
    assert manifest.training_config["adaptation"] == job.adaptation.value
    assert manifest.model_configuration == SIZES

    # Only the trainable tensors travel: what the server sent, and what nodes send back.
    adapted = build_model(model_spec_for_job(job))
    trainable = trainable_names(adapted)
    full = sum(int(a.size) for a in get_weights(build_model(family.spec)))
    assert sent and all(list(names) == trainable for names in sent)
    assert update_length_for(job) == sum(int(np.prod(s)) for s in sent[0].values()) < full / 2

    tensors = load_file(str(tmp_path / "model.safetensors"))
    if job.bundle_weights.value == "adapters":
        assert sorted(tensors) == sorted(trainable)
        return
    # Merged: every weight of the plain model. Training changed only the LoRA-targeted
    # weights (adapters folded in) and the encoder's heads; the rest is the base, bit for bit.
    base_model = build_model(replace(family.spec, checkpoint=base))
    base_tensors = dict(zip(weight_names(base_model), get_weights(base_model), strict=True))
    heads = ("projection.", "classifier.")
    assert sorted(n for n in tensors if not n.startswith(heads)) == sorted(
        n for n in base_tensors if not n.startswith(heads)
    )
    changed = {
        n
        for n, t in tensors.items()
        if n not in base_tensors or not np.array_equal(t, base_tensors[n])
    }
    targeted = {n for n in changed if n.rsplit(".", 2)[-2] in LORA_TARGETS[kind]}
    assert targeted and changed - targeted <= {n for n in changed if n.startswith(heads)}


@contextmanager
def _base_swapped(link: Path, other: Path) -> Iterator[None]:
    """While inside, the job's base path holds ``other`` (as another machine's disk would)."""
    original = link.resolve()
    link.unlink()
    link.symlink_to(other, target_is_directory=True)
    try:
        yield
    finally:
        link.unlink()
        link.symlink_to(original, target_is_directory=True)


def _node_with_another_base(real: ClientApp, link: Path, other: Path) -> ClientApp:
    """A real node whose disk holds another base at the job's path."""

    def app(message: Message, context: Context) -> Message:
        with _base_swapped(link, other):
            return real(message, context)

    return app  # type: ignore[return-value]  # a ClientApp is called as app(message, context)


def test_node_holding_another_base_is_refused_naming_both_digests(
    federations: dict[NodeType, Federation],
    data: dict[Modality, list[Path]],
    tmp_path: Path,
) -> None:
    family = FAMILIES[ModelFamily.VIT]
    ours = _save_base(family, tmp_path / "base-a", seed=1)
    theirs = _save_base(family, tmp_path / "base-b", seed=2)  # same sizes, other weights
    link = tmp_path / "base"
    link.symlink_to(ours, target_is_directory=True)
    federation = federations[NodeType.ENCODER]
    real = make_client_app(federation.node_configs(data[Modality.VISION]))
    ids = random_node_ids(3)
    grid = LocalGrid(
        [
            LocalNode(ids[0], real, {"partition-id": 0, "num-partitions": 3}),
            LocalNode(ids[1], real, {"partition-id": 1, "num-partitions": 3}),
            LocalNode(
                ids[2],
                _node_with_another_base(real, link, theirs),
                {"partition-id": 2, "num-partitions": 3},
            ),
        ]
    )
    job = _job(family, link, adaptation="head")
    outcome = run_federation(grid, job, _options(tmp_path / "run", federation))

    assert outcome.status is JobStatus.FAILED
    assert "only 2 eligible node(s) of 3 connected" in outcome.reasons[0]
    (refused,) = json.loads((tmp_path / "run" / NODES_FILE).read_text())["refused"]
    assert refused["reason"] == (
        f"base checkpoint digest {checkpoint_digest(theirs)} differs from the server's "
        f"{checkpoint_digest(ours)}: the node holds another base at {link}"
    )
    assert checkpoint_digest(theirs) != checkpoint_digest(ours)
    assert outcome.bundle is None
    shutil.rmtree(tmp_path / "base-b")
