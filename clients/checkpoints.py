"""Local pretrained checkpoints in Hugging Face format: digest, config check, loading.

A checkpoint is a folder as ``save_pretrained`` writes it: ``config.json`` and the weights in
``model.safetensors`` (or shards ``model-0000i-of-0000n.safetensors`` plus their index).
Pickled weights (``pytorch_model.bin``) are refused: loading them runs arbitrary code. The
heads fedbrain adds to an encoder (projection, classifier) are not part of the Hugging Face
model; a folder may hold them in :data:`HEADS_FILE`, next to the backbone, so the folder stays
loadable by ``transformers`` itself. Nothing here downloads: loading is
``from_pretrained(folder, local_files_only=True)``.

:func:`checkpoint_digest` names a checkpoint by its content, so that a server and its nodes can
check they start from the same base: the canonical JSON (RFC 8785) of ``config.json`` without
library bookkeeping, and every tensor's name, dtype, shape and SHA-256 of its bytes, read
from the safetensors headers -- not file names, shard sizes, timestamps or metadata. A
re-save with ``save_pretrained`` keeps the digest; any changed weight changes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from manifests.confighash import JsonValue, canonical_json

__all__ = [
    "ARCHITECTURE_KEYS",
    "CONFIG_FILE",
    "HEADS_FILE",
    "VOLATILE_CONFIG_KEYS",
    "CheckpointError",
    "check_checkpoint",
    "checkpoint_digest",
    "load_heads",
    "load_pretrained",
    "quiet_transformers",
    "read_config",
    "save_heads",
]

CONFIG_FILE: Final = "config.json"
HEADS_FILE: Final = "fedbrain_heads.safetensors"
"""fedbrain's encoder heads (``projection.*``, ``classifier.*``) in a checkpoint folder."""

VOLATILE_CONFIG_KEYS: Final = frozenset({
    "_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "problem_type", "use_cache", "_attn_implementation_autoset",
})  # fmt: skip
"""Config keys that are library bookkeeping or task labels, not the model's function."""

ARCHITECTURE_KEYS: Final[dict[str, tuple[str, ...]]] = {
    "vit": (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "image_size", "patch_size", "num_channels", "hidden_act", "layer_norm_eps", "qkv_bias",
    ),
    "wav2vec2": (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm",
        "feat_extract_activation", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups",
        "do_stable_layer_norm", "hidden_act", "layer_norm_eps",
    ),
    "mpnet": (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "max_position_embeddings", "relative_attention_num_buckets",
        "hidden_act", "layer_norm_eps", "pad_token_id",
    ),
    "gpt2": (
        "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
        "activation_function", "layer_norm_epsilon", "scale_attn_weights",
        "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "tie_word_embeddings",
    ),
}  # fmt: skip
"""Per ``model_type``: the config keys that decide the weights' shapes or the computation; a
checkpoint must agree with the spec on each (dropout and masking probabilities may differ:
they are training settings, taken from the spec)."""

_SAFETENSORS_HEADER_LIMIT: Final = 100_000_000

M = TypeVar("M", bound=PreTrainedModel)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message lists every problem."""


# ------------------------------------------------------------------------------ digest


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.safetensors") if p.name != HEADS_FILE)


def _tensor_entries(path: Path) -> list[dict[str, JsonValue]]:
    """Name, dtype, shape and SHA-256 of the bytes of every tensor in a safetensors file."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= _SAFETENSORS_HEADER_LIMIT:
                raise CheckpointError(f"{str(path)!r} is not a safetensors file (header size).")
            header: dict[str, Any] = json.loads(f.read(size))
            start = 8 + size
            entries: list[dict[str, JsonValue]] = []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                view = memoryview(data)
                try:
                    for name, info in header.items():
                        if name == "__metadata__":
                            continue
                        begin, end = (int(v) for v in info["data_offsets"])
                        if not 0 <= begin <= end <= len(view) - start:
                            raise CheckpointError(f"{str(path)!r}: tensor {name} is truncated.")
                        digest = hashlib.sha256(view[start + begin : start + end]).hexdigest()
                        entries.append({
                            "name": name, "dtype": str(info["dtype"]),
                            "shape": [int(d) for d in info["shape"]], "sha256": digest,
                        })  # fmt: skip
                finally:
                    view.release()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
    return entries


def read_config(folder: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint folder (:class:`CheckpointError` if none)."""
    path = Path(folder) / CONFIG_FILE
    try:
        value = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"Checkpoint folder {str(folder)!r} has no {CONFIG_FILE}: point `checkpoint` at a "
            "folder written by `save_pretrained`."
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Cannot read {str(path)!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{str(path)!r} is not a JSON object.")
    return value


def _entry_name(entry: dict[str, JsonValue]) -> str:
    return str(entry["name"])


def _digest_now(path: Path) -> str:
    described: dict[str, JsonValue]
    if path.is_file():
        entries = sorted(_tensor_entries(path), key=_entry_name)
        only: list[JsonValue] = list(entries)
        described = {"format": "fedbrain-checkpoint-file/1", "tensors": only}
    else:
        config = {k: v for k, v in read_config(path).items() if k not in VOLATILE_CONFIG_KEYS}
        files = _weight_files(path)
        if not files:
            raise CheckpointError(_no_weights(path))
        weights = [e for f in files for e in _tensor_entries(f)]
        names = [str(e["name"]) for e in weights]
        if len(set(names)) != len(names):
            raise CheckpointError(f"Checkpoint {str(path)!r} holds a tensor in two files.")
        heads = _tensor_entries(path / HEADS_FILE) if (path / HEADS_FILE).is_file() else []
        weights.sort(key=_entry_name)
        heads.sort(key=_entry_name)
        tensors: list[JsonValue] = list(weights)
        head_tensors: list[JsonValue] = list(heads)
        described = {
            "format": "fedbrain-checkpoint/1",
            "config": config,
            "tensors": tensors,
            "heads": head_tensors,
        }
    return "sha256:" + hashlib.sha256(canonical_json(described)).hexdigest()


_DIGESTS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def checkpoint_digest(path: Path) -> str:
    """``sha256:<hex>`` of a checkpoint's content (folder, or a single safetensors file).

    Folder: the canonical JSON of ``config.json`` without :data:`VOLATILE_CONFIG_KEYS`, every
    tensor of the weight files (sorted by name: the same across shardings) and of
    :data:`HEADS_FILE`. Remembered per process until a file's size or mtime changes.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {str(path)!r} does not exist.")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(path.resolve()), stats)
    if key not in _DIGESTS:
        _DIGESTS[key] = _digest_now(path)
    return _DIGESTS[key]


# ----------------------------------------------------------------------------- loading


def _no_weights(folder: Path) -> str:
    pickled = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
    hint = (
        " It holds pickled weights (*.bin), which fedbrain does not load (unpickling runs "
        "code): re-save them with `save_pretrained(folder, safe_serialization=True)`."
        if pickled
        else ""
    )
    return f"Checkpoint folder {str(folder)!r} holds no *.safetensors weights.{hint}"


def _json_value(value: object) -> object:
    return json.loads(json.dumps(value))  # tuples -> lists, as config.json stores them


def check_checkpoint(folder: Path, expected: PretrainedConfig) -> None:
    """Raise :class:`CheckpointError` unless ``folder`` is a safetensors checkpoint of the
    same ``model_type`` and :data:`ARCHITECTURE_KEYS` as ``expected``, naming every mismatch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Checkpoint folder {str(folder)!r} does not exist.")
    raw = read_config(folder)
    kind = expected.model_type
    found_kind = raw.get("model_type")
    if found_kind != kind:
        raise CheckpointError(
            f"Checkpoint {str(folder)!r} is a {found_kind!r} model; the spec builds a {kind!r} "
            "model: choose a checkpoint of the spec's family."
        )
    found = (
        type(expected)
        .from_dict({k: v for k, v in raw.items() if k not in VOLATILE_CONFIG_KEYS})
        .to_dict()
    )  # fills in the defaults a diff-saved config.json leaves out
    wanted = expected.to_dict()
    problems = [
        f"{key} is {_json_value(found.get(key))!r} in the checkpoint, the spec wants "
        f"{_json_value(wanted.get(key))!r}"
        for key in ARCHITECTURE_KEYS[kind]
        if _json_value(found.get(key)) != _json_value(wanted.get(key))
    ]
    if not _weight_files(folder):
        problems.append(_no_weights(folder))
    if problems:
        raise CheckpointError(
            f"Checkpoint {str(folder)!r} does not fit the model spec: "
            + "; ".join(problems)
            + ". Set the spec's sizes to the checkpoint's, or use a checkpoint of these sizes."
        )


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars and load reports from ``from_pretrained`` (errors still raise)."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity(logging.ERROR)
    _call(hf_logging.disable_progress_bar)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            _call(hf_logging.enable_progress_bar)


def _call(function: Callable[[], object]) -> None:
    function()  # transformers leaves these unannotated


def load_pretrained(cls: type[M], folder: Path, config: PretrainedConfig, **kwargs: Any) -> M:
    """``cls.from_pretrained`` of a local folder checked by :func:`check_checkpoint`, with
    ``config`` (the spec's: its dropout settings apply), float32 weights, no download.

    Tensors the model does not have (a pooler, a pretraining or task head) are ignored; a
    model tensor the folder lacks is a :class:`CheckpointError` -- it would stay random.
    """
    folder = Path(folder)
    check_checkpoint(folder, config)
    try:
        with quiet_transformers():
            loaded: tuple[PreTrainedModel, dict[str, Any]] = cls.from_pretrained(  # type: ignore[assignment]
                folder,
                config=config,
                local_files_only=True,
                use_safetensors=True,
                dtype=torch.float32,
                output_loading_info=True,
                **kwargs,
            )
        model, info = loaded
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"Cannot load checkpoint {str(folder)!r}: {exc}") from exc
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys", ()))
    problems = [f"missing tensor {name}" for name in missing]
    problems += [f"tensor of another shape: {name}" for name in mismatched]
    if problems:
        raise CheckpointError(
            f"Checkpoint {str(folder)!r} does not fit the model: " + "; ".join(problems) + "."
        )
    if not isinstance(model, cls):
        raise CheckpointError(f"Loading {str(folder)!r} did not give a {cls.__name__}.")
    return model


# ------------------------------------------------------------------------------- heads


def save_heads(folder: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write fedbrain's encoder heads (``projection.*``, ``classifier.*``) into ``folder``."""
    data = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    save_file(data, str(Path(folder) / HEADS_FILE), metadata={"format": "pt"})


def load_heads(folder: Path, expected: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """The heads of ``folder`` that the model has (names in ``expected``, with its shapes).

    No :data:`HEADS_FILE`: ``{}`` (the heads stay freshly initialised). A head of another
    shape is a :class:`CheckpointError`; a head the model lacks is ignored.
    """
    path = Path(folder) / HEADS_FILE
    if not path.is_file():
        return {}
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file: {exc}") from exc
    problems = [
        f"head tensor {name} has shape {tuple(t.shape)}, the spec's model expects "
        f"{tuple(expected[name])}"
        for name, t in sorted(tensors.items())
        if name in expected and tuple(t.shape) != tuple(expected[name])
    ]
    heads = {name.split(".", 1)[0] for name in tensors if name in expected}
    problems += [
        f"head tensor {name} is missing"
        for name in sorted(expected)
        if name.split(".", 1)[0] in heads and name not in tensors
    ]
    if problems:
        raise CheckpointError(
            f"Checkpoint {str(folder)!r} does not fit the model spec: "
            + "; ".join(problems)
            + " (embedding_dim / num_classes differ)."
        )
    return {name: t for name, t in tensors.items() if name in expected}
