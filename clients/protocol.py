"""The wire contract between the federator-agg ServerApp and the ClientApps.

Both adapters import this module and nothing else decides a message type or a record name.
Every message is a Flower ``Message`` whose ``content`` is a ``RecordDict`` built from the
records named here:

==========================  ==========================================  =========================
message type                server -> client content                    client -> server content
==========================  ==========================================  =========================
``query.node_info``         ``job``                                     ``node_info``
``train.fit``               ``job``, ``round``, ``weights``             ``update``, ``metrics``
``train.secagg_advertise``  ``job``, ``round``, ``secagg``              ``secagg``
``train.secagg_share``      ``job``, ``round``, ``secagg``              ``secagg``
``train.secagg_masked``     ``job``, ``round``, ``secagg``, ``weights`` ``secagg``, ``metrics``
``train.secagg_unmask``     ``job``, ``round``, ``secagg``              ``secagg``
``evaluate.eval``           ``job``, ``round``, ``weights``             ``metrics``
==========================  ==========================================  =========================

- ``job``: ConfigRecord, ``JobSpec.to_run_config()`` (the job the node trains for);
- ``round``: ConfigRecord, :class:`RoundConfig`;
- ``weights``: ArrayRecord, the global model (or, for sensing jobs, nothing: an empty record);
- ``update``: ArrayRecord, the node's clipped update (``train.fit`` only, privacy levels
  ``none``/``dp``); under secure aggregation the update only ever leaves the node masked,
  inside the ``secagg`` records of ``train.secagg_masked``;
- ``metrics``: MetricRecord, per-node training/evaluation metrics (:data:`METRIC_KEYS`);
- ``secagg``: a ConfigRecord ``secagg`` plus an ArrayRecord ``secagg_arrays`` holding one
  SecAgg+ message (``aggregation.secagg`` ``to_record()``), see :func:`secagg_to_content`.

The summed vector of a node (what SecAgg+ masks, or what ``update`` carries flattened) is
:func:`summable_vector`: the clipped update flattened in weight order, then two coordinates,
``was_clipped`` (0/1) and the pre-clip L2 norm, so the server learns only their sums.
Sensing jobs send their statistics vector instead (see ``clients.node``).

Node ids: Flower's are unsigned 64-bit, a ConfigRecord int is signed 64-bit; ints travel
two's-complement wrapped (:func:`to_wire_int` / :func:`from_wire_int`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Final

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from numpy.typing import NDArray

from aggregation.secagg import Stage

NODE_INFO: Final = "query.node_info"
FIT: Final = "train.fit"
SECAGG_ADVERTISE: Final = "train.secagg_advertise"
SECAGG_SHARE: Final = "train.secagg_share"
SECAGG_MASKED: Final = "train.secagg_masked"
SECAGG_UNMASK: Final = "train.secagg_unmask"
EVALUATE: Final = "evaluate.eval"

STAGE_MESSAGE_TYPE: Final[Mapping[Stage, str]] = {
    Stage.ADVERTISE_KEYS: SECAGG_ADVERTISE,
    Stage.SHARE_KEYS: SECAGG_SHARE,
    Stage.MASKED_INPUT: SECAGG_MASKED,
    Stage.UNMASK: SECAGG_UNMASK,
}

JOB: Final = "job"
ROUND: Final = "round"
WEIGHTS: Final = "weights"
UPDATE: Final = "update"
METRICS: Final = "metrics"
NODE_INFO_RECORD: Final = "node_info"
SECAGG: Final = "secagg"
SECAGG_ARRAYS: Final = "secagg_arrays"

# Keys of the ``metrics`` MetricRecord.
NUM_EXAMPLES: Final = "num_examples"
TRAIN_LOSS: Final = "train_loss"
EVAL_LOSS: Final = "eval_loss"
EVAL_ACCURACY: Final = "eval_accuracy"
EXAMPLE_EPSILON: Final = "example_epsilon"  # DP-SGD epsilon this node has spent so far
TRAIN_SECONDS: Final = "train_seconds"
METRIC_KEYS: Final = (
    NUM_EXAMPLES,
    TRAIN_LOSS,
    EVAL_LOSS,
    EVAL_ACCURACY,
    EXAMPLE_EPSILON,
    TRAIN_SECONDS,
)

_U64: Final = 1 << 64
_I63: Final = 1 << 63


def to_wire_int(value: int) -> int:
    """An unsigned 64-bit int as the signed int64 a ConfigRecord accepts."""
    if not 0 <= value < _U64:
        raise ValueError(f"Value {value} is not an unsigned 64-bit integer.")
    return value - _U64 if value >= _I63 else value


def from_wire_int(value: int) -> int:
    """Undo :func:`to_wire_int`."""
    if not -_I63 <= value < _I63:
        raise ValueError(f"Value {value} is not a signed 64-bit integer.")
    return value + _U64 if value < 0 else value


@dataclass(frozen=True, kw_only=True)
class RoundConfig:
    """What a node needs to know about the current round beyond the job itself.

    ``clipping_norm``: L2 bound of the node's update before it is sent or masked (0 = do not
    clip; only for privacy level ``none`` without secure aggregation). ``dp_noise_multiplier``
    and ``dp_max_grad_norm``: Opacus DP-SGD parameters for example-level DP (0 = no DP-SGD).
    ``dp_delta``: the delta at which a node reports its DP-SGD epsilon. ``seed``: the seed of
    this node's local randomness this round (augmentations, shuffling, rounding).
    ``local_steps``: cap on optimizer steps this round (0 = run ``job.epochs`` full epochs).
    """

    server_round: int
    seed: int
    clipping_norm: float = 0.0
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 0.0
    dp_delta: float = 0.0
    local_steps: int = 0

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(dict(asdict(self)))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundConfig:
        names = {f.name: f.type for f in fields(cls)}
        missing = sorted(n for n in ("server_round", "seed") if n not in record)
        if missing:
            raise ValueError(f"The `round` record lacks {missing}.")
        unknown = sorted(set(record) - set(names))
        if unknown:
            raise ValueError(f"The `round` record has unknown keys {unknown}.")
        values: dict[str, int | float] = {}
        for name, value in record.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"`round.{name}` must be a number. Found {value!r}.")
            values[name] = value
        return cls(
            server_round=int(values["server_round"]),
            seed=int(values["seed"]),
            clipping_norm=float(values.get("clipping_norm", 0.0)),
            dp_noise_multiplier=float(values.get("dp_noise_multiplier", 0.0)),
            dp_max_grad_norm=float(values.get("dp_max_grad_norm", 0.0)),
            dp_delta=float(values.get("dp_delta", 0.0)),
            local_steps=int(values.get("local_steps", 0)),
        )


@dataclass(frozen=True, kw_only=True)
class NodeInfo:
    """A node's answer to ``query.node_info`` for one job.

    ``eligible`` says whether it can train this job (its node type matches, its data loads,
    the model builds); when not, ``reason`` says why in words. ``model_fingerprint`` is
    ``clients.models.model_fingerprint`` of the job's model ("" for sensing jobs), so the server
    can refuse a node that would build a different architecture.
    """

    node_type: str
    eligible: bool
    num_examples: int = 0
    model_fingerprint: str = ""
    reason: str = ""

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(dict(asdict(self)))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> NodeInfo:
        try:
            node_type = record["node_type"]
            eligible = record["eligible"]
            num_examples = record.get("num_examples", 0)
            fingerprint = record.get("model_fingerprint", "")
            reason = record.get("reason", "")
        except KeyError as error:
            raise ValueError(f"The `node_info` record lacks {error}.") from None
        if not isinstance(node_type, str) or not isinstance(eligible, bool):
            raise ValueError("`node_info.node_type` must be a str and `eligible` a bool.")
        if not isinstance(num_examples, int) or isinstance(num_examples, bool):
            raise ValueError("`node_info.num_examples` must be an int.")
        if not isinstance(fingerprint, str) or not isinstance(reason, str):
            raise ValueError("`node_info.model_fingerprint` and `reason` must be strings.")
        return cls(
            node_type=node_type,
            eligible=eligible,
            num_examples=num_examples,
            model_fingerprint=fingerprint,
            reason=reason,
        )


# --------------------------------------------------------------------------- arrays


def weights_to_record(names: Sequence[str], arrays: Sequence[NDArray[np.float32]]) -> ArrayRecord:
    """Weights (in model order) as an ArrayRecord keyed by parameter name."""
    if len(names) != len(arrays):
        raise ValueError(f"{len(names)} names for {len(arrays)} arrays.")
    return named_arrays_record(dict(zip(names, arrays, strict=True)))


def named_arrays_record(arrays: Mapping[str, NDArray[np.generic]]) -> ArrayRecord:
    """An ArrayRecord of named numpy arrays, in order (flwr 1.42 wants ``Array`` values)."""
    # np.asarray(order="C"), not np.ascontiguousarray: the latter turns a 0-d array into 1-d.
    return ArrayRecord({name: Array(np.asarray(a, order="C")) for name, a in arrays.items()})


def record_to_weights(record: ArrayRecord) -> list[NDArray[np.float32]]:
    """The arrays of a weights/update ArrayRecord, in insertion (model) order, as float32."""
    arrays: list[NDArray[np.float32]] = []
    for name in record:
        array = record[name].numpy()
        if array.dtype != np.float32:
            raise ValueError(f"Array `{name}` must be float32. Found {array.dtype}.")
        arrays.append(array)
    return arrays


def flatten(arrays: Sequence[NDArray[np.float32]]) -> NDArray[np.float32]:
    """All arrays, raveled and concatenated (float32)."""
    if not arrays:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])


def unflatten(
    vector: NDArray[np.floating], shapes: Sequence[tuple[int, ...]]
) -> list[NDArray[np.float32]]:
    """Split a flat vector back into arrays of ``shapes`` (float32)."""
    sizes = [int(np.prod(s)) for s in shapes]
    if int(vector.size) != sum(sizes):
        raise ValueError(
            f"Vector of length {vector.size} does not fit shapes totalling {sum(sizes)}."
        )
    out: list[NDArray[np.float32]] = []
    offset = 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(np.asarray(vector[offset : offset + size], dtype=np.float32).reshape(shape))
        offset += size
    return out


# --------------------------------------------------------------------------- secagg records


def secagg_to_content(record: Mapping[str, object], content: RecordDict) -> None:
    """Put one SecAgg+ message record into ``content`` (as ``secagg`` + ``secagg_arrays``).

    uint32 arrays go to the ArrayRecord; ints (node ids up to 2^64 - 1) are wrapped to int64;
    empty lists are stored as a marker because a ConfigRecord cannot hold an empty list.
    """
    config: dict[str, object] = {}
    arrays: dict[str, NDArray[np.generic]] = {}
    empty: list[str] = []
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            arrays[key] = np.asarray(value, order="C")
        elif isinstance(value, bool):
            raise TypeError(f"SecAgg record field `{key}` is a bool; not part of the protocol.")
        elif isinstance(value, int):
            config[key] = to_wire_int(value)
        elif isinstance(value, list | tuple):
            if not value:
                empty.append(key)
            elif all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                config[key] = [to_wire_int(int(v)) for v in value]
            else:
                config[key] = list(value)
        else:
            config[key] = value
    if empty:
        config["__empty_lists__"] = empty
    content[SECAGG] = ConfigRecord(config)  # type: ignore[arg-type]
    content[SECAGG_ARRAYS] = named_arrays_record(arrays)


def secagg_from_content(content: RecordDict) -> dict[str, object]:
    """Undo :func:`secagg_to_content`; raises ValueError when the records are missing.

    The result still goes through ``aggregation.secagg.message_from_record`` (or a message
    class's ``from_record``), which validates every field.
    """
    if SECAGG not in content.config_records:
        raise ValueError("The message carries no `secagg` ConfigRecord.")
    config = content.config_records[SECAGG]
    arrays = content.array_records.get(SECAGG_ARRAYS, ArrayRecord())
    record: dict[str, object] = {}
    empty = config.get("__empty_lists__", [])
    if not isinstance(empty, list):
        raise ValueError("`secagg.__empty_lists__` must be a list of keys.")
    for key in empty:
        record[str(key)] = []
    for key, value in config.items():
        if key == "__empty_lists__":
            continue
        if isinstance(value, bool):
            record[key] = value
        elif isinstance(value, int):
            record[key] = from_wire_int(value)
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            record[key] = [from_wire_int(int(v)) for v in value]
        else:
            record[key] = value
    for key in arrays:
        record[key] = arrays[key].numpy()
    return record


def summable_vector(
    update: Sequence[NDArray[np.float32]], *, was_clipped: bool, preclip_norm: float
) -> NDArray[np.float32]:
    """The vector a node contributes to the (secure) sum: update, was_clipped, pre-clip norm."""
    return np.concatenate(
        [flatten(update), np.array([float(was_clipped), preclip_norm], dtype=np.float32)]
    )
