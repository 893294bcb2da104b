"""The artifact catalog: every model artifact of the distributed brain, as frozen data.

The catalog lists the 24-node configuration's artifacts (sensing, encoders, inference,
decision, memory, trainer, aggregator, management) with their node type, component, base
model, purpose and, where the specification gives one, the embedding size.

Only a few entries are *trainable* by fedbrain today; each says which learning-form
``(component, base_model, task)`` triple trains it (:meth:`CatalogEntry.training_forms`).
Asking to train anything else raises :class:`NotTrainableError`, which lists what can be
trained.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


class NodeType(StrEnum):
    """The role of a node in the distributed brain."""

    SENSING = "sensing"
    ENCODER = "encoder"
    INFERENCE = "inference"
    DECISION = "decision"
    MEMORY = "memory"
    TRAINER = "trainer"
    AGGREGATOR = "aggregator"
    MANAGEMENT = "management"


class Component(StrEnum):
    """The component an artifact belongs to; the prefix of artifact names."""

    SENSING = "sensing"
    VISION = "vision"
    AUDIO = "audio"
    TEXT = "text"
    SPIKING = "spiking"
    INFERENCE = "inference"
    MULTIMODAL = "multimodal"
    DECISION = "decision"
    MEMORY = "memory"
    TRAINER = "trainer"
    AGGREGATOR = "aggregator"
    MANAGEMENT = "management"


class Task(StrEnum):
    """The learning-form tasks (the ``<purpose>`` part of artifact names)."""

    EMBED = "embed"
    CLASSIFICATION = "classification"
    LM_FINETUNE = "lm-finetune"
    DETECTION = "detection"
    PREPROC = "preproc"
    NORMALIZER = "normalizer"


class ArtifactKind(StrEnum):
    """What an artifact is: trained weights, a configuration/index template, or a service."""

    MODEL = "model"
    TEMPLATE = "template"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class TrainingForm:
    """The learning-form selection that trains a catalog entry."""

    component: Component
    base_model: str
    task: Task

    def __str__(self) -> str:
        return f"component={self.component} base_model={self.base_model} task={self.task}"


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """One artifact of the catalog.

    ``task`` is the artifact's own purpose (free text for artifacts the learning form cannot
    produce). ``trainable_tasks`` are the form tasks fedbrain can train it with: when the
    entry's own ``task`` is among them it is trained from ``base_model``; otherwise it is a
    base artifact that is fine-tuned into a derived artifact (``base_model=<id>`` in the form).
    """

    id: str
    node_type: NodeType
    component: Component
    base_model: str
    task: str
    description: str
    kind: ArtifactKind = ArtifactKind.MODEL
    embedding_dim: int | None = None
    parameters: str | None = None
    trainable_tasks: frozenset[Task] = frozenset()

    @property
    def trainable(self) -> bool:
        """Whether fedbrain can train this artifact today."""
        return bool(self.trainable_tasks)

    def training_forms(self) -> tuple[TrainingForm, ...]:
        """The learning-form selections that train this entry (empty when not trainable)."""
        forms = []
        for task in sorted(self.trainable_tasks):
            base = self.base_model if task == self.task else self.id
            forms.append(TrainingForm(self.component, base, task))
        return tuple(forms)


class UnknownArtifactError(KeyError):
    """A catalog id that is not in the catalog."""

    def __init__(self, artifact_id: str, suggestions: tuple[str, ...]) -> None:
        self.artifact_id = artifact_id
        self.suggestions = suggestions
        hint = f" Did you mean {' or '.join(suggestions)}?" if suggestions else ""
        message = (
            f"{artifact_id!r} is not in the artifact catalog.{hint} "
            "Run `fedbrain catalog` to list every artifact."
        )
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotTrainableError(ValueError):
    """A request to train an artifact that fedbrain cannot train (yet)."""

    def __init__(self, what: str, *, hint: str = "") -> None:
        self.what = what
        forms = "; ".join(
            f"{entry.id} ({form})"
            for entry in trainable_entries()
            for form in entry.training_forms()
        )
        extra = f" {hint}" if hint else ""
        super().__init__(
            f"{what} is not trainable by fedbrain yet; trainable artifacts: {forms}.{extra}"
        )


def _e(
    artifact_id: str,
    node_type: NodeType,
    component: Component,
    base_model: str,
    task: str,
    description: str,
    *,
    kind: ArtifactKind = ArtifactKind.MODEL,
    embedding_dim: int | None = None,
    parameters: str | None = None,
    trainable_tasks: frozenset[Task] = frozenset(),
) -> CatalogEntry:
    return CatalogEntry(
        id=artifact_id,
        node_type=node_type,
        component=component,
        base_model=base_model,
        task=task,
        description=description,
        kind=kind,
        embedding_dim=embedding_dim,
        parameters=parameters,
        trainable_tasks=trainable_tasks,
    )


_N, _C, _K = NodeType, Component, ArtifactKind

_ENTRIES: tuple[CatalogEntry, ...] = (
    # Sensing (federated analytics: learned normalizers)
    _e("sensing-camera-preproc-v1", _N.SENSING, _C.SENSING, "camera", Task.PREPROC,
       "Image preprocessing pipeline (per-channel normalization).",
       trainable_tasks=frozenset({Task.PREPROC})),
    _e("sensing-audio-preproc-v1", _N.SENSING, _C.SENSING, "audio", Task.PREPROC,
       "Audio preprocessing pipeline (log-mel bin normalization).",
       trainable_tasks=frozenset({Task.PREPROC})),
    _e("sensing-iot-normalizer-v1", _N.SENSING, _C.SENSING, "iot", Task.NORMALIZER,
       "Sensor normalization for IoT readings.",
       trainable_tasks=frozenset({Task.NORMALIZER})),
    # Encoders
    _e("vit-base16-embed-v1", _N.ENCODER, _C.VISION, "vit-base16", Task.EMBED,
       "ViT-base/16 image encoder producing 768-d embeddings.", embedding_dim=768,
       trainable_tasks=frozenset({Task.EMBED})),
    _e("resnet50-proj-v1", _N.ENCODER, _C.VISION, "resnet50", Task.EMBED,
       "ResNet50 with a projector producing 512-d embeddings.", embedding_dim=512),
    _e("wav2vec2-base-embed-v1", _N.ENCODER, _C.AUDIO, "wav2vec2-base", Task.EMBED,
       "wav2vec2-base speech encoder producing 512-d embeddings.", embedding_dim=512,
       trainable_tasks=frozenset({Task.EMBED})),
    _e("hubert-large-embed-v1", _N.ENCODER, _C.AUDIO, "hubert-large", Task.EMBED,
       "HuBERT-large speech encoder producing 1024-d embeddings.", embedding_dim=1024),
    _e("sbert-all-mpnet-v1", _N.ENCODER, _C.TEXT, "all-mpnet-base-v2", Task.EMBED,
       "SBERT sentence encoder (mpnet-base-v2) producing 768-d embeddings.", embedding_dim=768,
       trainable_tasks=frozenset({Task.EMBED})),
    _e("snn-dvs-embed-v1", _N.ENCODER, _C.SPIKING, "snn-dvs", Task.EMBED,
       "Spiking-network embedding of DVS event streams."),
    # Inference
    _e("gpt-small-v1", _N.INFERENCE, _C.INFERENCE, "gpt-small", "lm",
       "GPT-style small language model for short text and dialogue.", parameters="~300M",
       trainable_tasks=frozenset({Task.LM_FINETUNE})),
    _e("gpt-medium-v1", _N.INFERENCE, _C.INFERENCE, "gpt-medium", "lm",
       "GPT-style medium language model.", parameters="~1.5B"),
    _e("gpt-large-v1", _N.INFERENCE, _C.INFERENCE, "gpt-large", "lm",
       "GPT-style large language model (on demand).", parameters="~6B"),
    _e("yolox-s-intel-v1", _N.INFERENCE, _C.INFERENCE, "yolox-s", Task.DETECTION,
       "YOLOX-small object detector."),
    _e("fasterrcnn-res50-v1", _N.INFERENCE, _C.INFERENCE, "fasterrcnn-res50", Task.DETECTION,
       "Faster R-CNN object detector with a ResNet50 backbone."),
    _e("spiking-lm-core-v1", _N.INFERENCE, _C.SPIKING, "spiking-lm", "lm",
       "Spiking generative language model."),
    _e("multimodal-ensemble-v1", _N.INFERENCE, _C.MULTIMODAL, "ensemble", "fusion",
       "Multimodal integration layer over the encoders' embeddings."),
    _e("rag-lite-v1", _N.INFERENCE, _C.INFERENCE, "rag-lite", "retrieval-generation",
       "Retriever plus generation wrapper."),
    # Decision
    _e("planner-rl-ppo-v1", _N.DECISION, _C.DECISION, "ppo", "planning",
       "PPO-based reinforcement-learning planner."),
    _e("motor-controller-dnn-v1", _N.DECISION, _C.DECISION, "dnn", "control",
       "Deep-network motor controller."),
    # Memory (configuration / index templates, not trained models)
    _e("milvus-schema-v1", _N.MEMORY, _C.MEMORY, "milvus", "vector-index-schema",
       "Vector database schema definition (config/index template).", kind=_K.TEMPLATE),
    _e("minio-log-schema-v1", _N.MEMORY, _C.MEMORY, "minio", "episode-log-schema",
       "Episode log storage schema (config/index template).", kind=_K.TEMPLATE),
    # Trainer, aggregators, management (services)
    _e("trainer-ddp-manager-v1", _N.TRAINER, _C.TRAINER, "ddp", "job-management",
       "Distributed training job management.", kind=_K.SERVICE),
    _e("federator-agg-v1", _N.AGGREGATOR, _C.AGGREGATOR, "federator", "secure-aggregation",
       "Federated server: secure aggregation and differential privacy.", kind=_K.SERVICE),
    _e("result-aggregator-v1", _N.AGGREGATOR, _C.AGGREGATOR, "result-aggregator",
       "reliability-scoring", "Output aggregation and per-round reliability scoring.",
       kind=_K.SERVICE),
    _e("auth-service-v1", _N.MANAGEMENT, _C.MANAGEMENT, "auth", "api-key-rbac",
       "API key and role-based access control service.", kind=_K.SERVICE),
    _e("monitoring-stack-v1", _N.MANAGEMENT, _C.MANAGEMENT, "monitoring", "observability",
       "Prometheus/Grafana/ELK monitoring settings.", kind=_K.SERVICE),
)  # fmt: skip

CATALOG: Mapping[str, CatalogEntry] = MappingProxyType({e.id: e for e in _ENTRIES})
"""Every artifact, by catalog id, in specification order."""


def entries() -> Iterator[CatalogEntry]:
    """Every catalog entry in specification order."""
    return iter(_ENTRIES)


def trainable_entries() -> tuple[CatalogEntry, ...]:
    """The entries fedbrain can train today."""
    return tuple(e for e in _ENTRIES if e.trainable)


def suggest(word: str, candidates: list[str] | tuple[str, ...], n: int = 3) -> tuple[str, ...]:
    """Close matches of ``word`` among ``candidates`` (for "did you mean" hints)."""
    return tuple(difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.6))


def is_catalog_id(name: str) -> bool:
    """Whether ``name`` is the id of a catalog artifact."""
    return name in CATALOG


def get(artifact_id: str) -> CatalogEntry:
    """The entry with this catalog id; :class:`UnknownArtifactError` with suggestions if none."""
    try:
        return CATALOG[artifact_id]
    except KeyError:
        raise UnknownArtifactError(artifact_id, suggest(artifact_id, tuple(CATALOG))) from None


def require_trainable(artifact_id: str) -> CatalogEntry:
    """The entry with this id if fedbrain can train it, else :class:`NotTrainableError`."""
    entry = get(artifact_id)
    if not entry.trainable:
        raise NotTrainableError(entry.id)
    return entry


def resolve_training_target(component: str, base_model: str, task: str) -> CatalogEntry:
    """The catalog entry that a learning-form selection trains.

    When ``base_model`` is a catalog id the job derives a new artifact from that entry
    (e.g. fine-tuning ``gpt-small-v1``); otherwise the entry whose own component, base model
    and task equal the form's is trained. Raises :class:`NotTrainableError` when the selection
    matches no trainable entry, with a hint towards the closest trainable selection.
    """
    what = f"component={component} base_model={base_model} task={task}"
    if base_model in CATALOG:
        entry = CATALOG[base_model]
        if task in entry.trainable_tasks:
            return entry
        if not entry.trainable:
            raise NotTrainableError(f"{entry.id} ({what})")
        tasks = ", ".join(sorted(entry.trainable_tasks))
        raise NotTrainableError(what, hint=f"{entry.id} trains with task {tasks}.")
    for entry in _ENTRIES:
        if (entry.component, entry.base_model, entry.task) == (component, base_model, task):
            if task in entry.trainable_tasks:
                return entry
            raise NotTrainableError(f"{entry.id} ({what})")
    forms = [form for entry in trainable_entries() for form in entry.training_forms()]
    close = suggest(base_model, tuple(sorted({f.base_model for f in forms})), n=1)
    hint = ""
    if close:
        match = next(f for f in forms if f.base_model == close[0])
        hint = f"Did you mean {match}?"
    raise NotTrainableError(what, hint=hint)
