"""The wire contract between the federator-agg ServerApp and the ClientApps.

Both adapters import this module and nothing else decides a message type or a record name.
Every message is a Flower ``Message`` whose ``content`` is a ``RecordDict`` built from the
records named here:

===============================  ========================================  ====================
message type                     server -> client content                  client -> server
===============================  ========================================  ====================
``query.node_info``              ``signed_job``                            ``node_info``
``train.fit``                    ``signed_job``, ``round``, ``weights``    ``update``,
                                                                           ``metrics``,
                                                                           ``statistics``
``evaluate.eval``                ``signed_job``, ``round``, ``weights``    ``metrics``
``train.secagg_<stage>``         ``signed_job``, ``round``, ``secagg``     ``secagg``
``evaluate.secagg_<stage>``      (``weights`` with the masked-input stage)
===============================  ========================================  ====================

- ``signed_job``: ConfigRecord with one bytes value ``envelope``: the job as the operator
  signed it (:mod:`manifests.signed_job`); a node verifies it against its own operators'
  keys and policy before anything else, and works only for it;
- ``round``: ConfigRecord, :class:`RoundConfig` -- the round number, what to compute
  (:class:`Work`), and for the second phase of federated analytics the clipping ranges the
  first phase released. Nothing in it is a privacy parameter: a node derives its clipping
  norms and noise from the job (:mod:`clients.jobs`), never from the server;
- ``weights``: ArrayRecord, the global model (analytics jobs: nothing, an empty record);
- ``update``: ArrayRecord with one flat float32 array :data:`UPDATE_ARRAY` (the node's clipped
  update in weight order), sent only in the clear (levels ``none`` and ``dp``);
- ``metrics``: MetricRecord, the node's metric *sums* keyed by
  :class:`aggregation.codec.Metric` values (in the clear only);
- ``statistics``: ArrayRecord with one float64 array :data:`STATISTICS_ARRAY` (analytics sums,
  in the clear only);
- ``secagg``: a ConfigRecord ``secagg`` plus an ArrayRecord ``secagg_arrays`` holding one
  SecAgg+ message (``aggregation.secagg`` ``to_record()``), see :func:`secagg_to_content`.
  Under secure aggregation everything a node computed from its data (update, metrics,
  statistics) leaves it only inside the masked ring vector of the masked-input stage
  (:class:`aggregation.codec.RingLayout`).

Node ids: Flower's are unsigned 64-bit, a ConfigRecord int is signed 64-bit; ints travel
two's-complement wrapped (:func:`to_wire_int` / :func:`from_wire_int`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Final, cast

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from numpy.typing import NDArray

from aggregation.codec import Metric, MetricSpec, Summed
from aggregation.secagg import Stage

NODE_INFO: Final = "query.node_info"
FIT: Final = "train.fit"
EVALUATE: Final = "evaluate.eval"


class Work(StrEnum):
    """What a node computes for a collection: a training round, an evaluation, or one of the
    two phases of federated analytics (per-feature ranges, then moments)."""

    FIT = "fit"
    EVALUATE = "evaluate"
    RANGES = "ranges"
    MOMENTS = "moments"

    @property
    def category(self) -> str:
        """The Flower message category that carries this work (``train`` / ``evaluate``)."""
        return "evaluate" if self is Work.EVALUATE else "train"


_STAGE_ACTION: Final[Mapping[Stage, str]] = {
    Stage.ADVERTISE_KEYS: "secagg_advertise",
    Stage.SHARE_KEYS: "secagg_share",
    Stage.MASKED_INPUT: "secagg_masked",
    Stage.CONSISTENCY_CHECK: "secagg_consistency",
    Stage.UNMASK: "secagg_unmask",
}


def secagg_message_type(category: str, stage: Stage) -> str:
    """The message type of a SecAgg+ ``stage`` in ``category`` (``train`` or ``evaluate``)."""
    if category not in ("train", "evaluate"):
        raise ValueError(f"SecAgg+ runs in the train or evaluate category. Found {category!r}.")
    return f"{category}.{_STAGE_ACTION[stage]}"


SECAGG_ADVERTISE: Final = secagg_message_type("train", Stage.ADVERTISE_KEYS)
SECAGG_SHARE: Final = secagg_message_type("train", Stage.SHARE_KEYS)
SECAGG_MASKED: Final = secagg_message_type("train", Stage.MASKED_INPUT)
SECAGG_CONSISTENCY: Final = secagg_message_type("train", Stage.CONSISTENCY_CHECK)
SECAGG_UNMASK: Final = secagg_message_type("train", Stage.UNMASK)

STAGE_MESSAGE_TYPE: Final[Mapping[Stage, str]] = {
    stage: secagg_message_type("train", stage) for stage in _STAGE_ACTION
}
"""Message types of the SecAgg+ stages of a training collection."""

MESSAGE_TYPES: Final = (
    NODE_INFO,
    FIT,
    EVALUATE,
    *(secagg_message_type(c, s) for c in ("train", "evaluate") for s in _STAGE_ACTION),
)
"""Every message type a node answers."""

SIGNED_JOB: Final = "signed_job"
SIGNED_JOB_ENVELOPE: Final = "envelope"
ROUND: Final = "round"
WEIGHTS: Final = "weights"
UPDATE: Final = "update"
UPDATE_ARRAY: Final = "delta"
STATISTICS: Final = "statistics"
STATISTICS_ARRAY: Final = "sums"
METRICS: Final = "metrics"
NODE_INFO_RECORD: Final = "node_info"
SECAGG: Final = "secagg"
SECAGG_ARRAYS: Final = "secagg_arrays"

_WORK_SLOTS: Final = 8
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
    """What a node needs to know about the current collection beyond the job itself.

    ``server_round``: the round (>= 1; 0 for an evaluation of the initial model);
    ``work``: what to compute; ``seed``: seeds the node's *non-private* randomness (shuffling
    and augmentations of training without DP), so simulations are reproducible -- anything
    that protects privacy (DP-SGD sampling and noise, stochastic rounding, distributed noise)
    comes from the node's own CSPRNG; ``range_low`` / ``range_high``: per feature, the
    clipping range of the analytics moments phase (released by the ranges phase).
    """

    server_round: int
    work: Work = Work.FIT
    seed: int = 0
    range_low: tuple[float, ...] = ()
    range_high: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.server_round, bool) or not isinstance(self.server_round, int):
            problems.append(f"`round.server_round` must be an int. Found {self.server_round!r}.")
        elif self.server_round < 0:
            problems.append(f"`round.server_round` must be >= 0. Found {self.server_round}.")
        if len(self.range_low) != len(self.range_high):
            problems.append("`round.range_low` and `round.range_high` must have equal lengths.")
        for lo, hi in zip(self.range_low, self.range_high, strict=False):
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                problems.append(f"every range must be finite with low < high. Found [{lo}, {hi}].")
                break
        if problems:
            raise ValueError("Invalid round config: " + " ".join(problems))

    @property
    def secagg_round(self) -> int:
        """The round number a SecAgg+ session of this collection uses: unique per
        (round, work), increasing with both, so two collections of one round never share a
        session and a node can refuse any session that is not newer than its last."""
        return self.server_round * _WORK_SLOTS + list(Work).index(self.work)

    def to_record(self) -> ConfigRecord:
        values: dict[str, int | str | list[float]] = {
            "server_round": self.server_round,
            "work": self.work.value,
            "seed": to_wire_int(self.seed % _U64),
        }
        if self.range_low:
            values["range_low"] = [float(v) for v in self.range_low]
            values["range_high"] = [float(v) for v in self.range_high]
        return ConfigRecord(values)  # type: ignore[arg-type]

    @classmethod
    def from_record(cls, record: ConfigRecord) -> RoundConfig:
        known = {"server_round", "work", "seed", "range_low", "range_high"}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"The `round` record has unknown keys {unknown}.")
        server_round, work, seed = (
            record.get("server_round"),
            record.get("work"),
            record.get("seed", 0),
        )
        if not isinstance(server_round, int) or isinstance(server_round, bool):
            raise ValueError(f"`round.server_round` must be an int. Found {server_round!r}.")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"`round.seed` must be an int. Found {seed!r}.")
        try:
            kind = Work(str(work))
        except ValueError:
            raise ValueError(
                f"`round.work` must be one of {[w.value for w in Work]}. Found {work!r}."
            ) from None
        ranges: list[tuple[float, ...]] = []
        for key in ("range_low", "range_high"):
            values = record.get(key, [])
            if not isinstance(values, list) or not all(
                isinstance(v, float | int) and not isinstance(v, bool) for v in values
            ):
                raise ValueError(f"`round.{key}` must be a list of numbers.")
            ranges.append(tuple(float(v) for v in values))
        return cls(
            server_round=server_round,
            work=kind,
            seed=from_wire_int(seed),
            range_low=ranges[0],
            range_high=ranges[1],
        )


@dataclass(frozen=True, kw_only=True)
class NodeInfo:
    """A node's answer to ``query.node_info`` for one job.

    ``eligible`` says whether it can work for this job (its node type matches, its data loads,
    the model builds, its policy accepts the job); when not, ``reason`` says why in words.
    ``model_fingerprint`` is ``clients.models.model_fingerprint`` of the job's model ("" for
    analytics jobs), so the server can refuse a node that would build another architecture;
    ``base_digest`` the content digest of the base checkpoint the node holds at the job's
    ``base_checkpoint`` path ("" without one), so that a node with another base is refused
    with that reason. A node never reports how many examples it holds: that is private.
    """

    node_type: str
    eligible: bool
    model_fingerprint: str = ""
    reason: str = ""
    identity_key: str = ""
    base_digest: str = ""

    def __post_init__(self) -> None:
        digest = self.base_digest.removeprefix("sha256:")
        if self.base_digest and (
            not self.base_digest.startswith("sha256:")
            or len(digest) != 64
            or any(c not in "0123456789abcdef" for c in digest)
        ):
            raise ValueError(
                "`node_info.base_digest` must be 'sha256:' and 64 lowercase hex digits, or "
                f"empty. Found {self.base_digest[:80]!r}."
            )
        if self.identity_key and (
            len(self.identity_key) != 64
            or any(c not in "0123456789abcdef" for c in self.identity_key)
        ):
            raise ValueError(
                "`node_info.identity_key` must be 64 lowercase hex digits (a raw Ed25519 "
                f"public key) or empty. Found {self.identity_key[:80]!r}."
            )

    @property
    def identity_public_key(self) -> bytes | None:
        """The node's Ed25519 identity key (None: the node holds no identity)."""
        return bytes.fromhex(self.identity_key) if self.identity_key else None

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(dict(asdict(self)))

    @classmethod
    def from_record(cls, record: ConfigRecord) -> NodeInfo:
        known = {
            "node_type", "eligible", "model_fingerprint", "reason", "identity_key", "base_digest",
        }  # fmt: skip
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"The `node_info` record has unknown keys {unknown}.")
        node_type, eligible = record.get("node_type"), record.get("eligible")
        fingerprint, reason = record.get("model_fingerprint", ""), record.get("reason", "")
        identity, base = record.get("identity_key", ""), record.get("base_digest", "")
        if not isinstance(node_type, str) or not isinstance(eligible, bool):
            raise ValueError("`node_info.node_type` must be a str and `eligible` a bool.")
        if not all(isinstance(v, str) for v in (fingerprint, reason, identity, base)):
            raise ValueError(
                "`node_info.model_fingerprint`, `reason`, `identity_key` and `base_digest` must "
                "be strings."
            )
        return cls(
            node_type=node_type,
            eligible=eligible,
            model_fingerprint=str(fingerprint),
            reason=str(reason),
            identity_key=str(identity),
            base_digest=str(base),
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


_NPY_MAGIC: Final = b"\x93NUMPY\x01\x00"
_NPY_PREFIX: Final = len(_NPY_MAGIC) + 2  # magic, version 1.0, 2-byte header length
_FAST_DTYPES: Final[dict[str, np.dtype[np.floating]]] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}


def read_array(array: Array) -> NDArray[np.generic]:
    """``array.numpy()``, fast for the arrays fedbrain sends.

    Flower's ``Array.numpy()`` reads the bytes with ``np.load``, which parses each ``.npy``
    header with ``ast.literal_eval`` -- about 70 us per array, a millisecond for a model's
    weights, on every message. A version-1.0 ``.npy`` of a little-endian float32 or float64
    C-order array whose header is exactly the one numpy writes for the Array's own dtype and
    shape, and whose length fits, is read directly from its bytes (a copy, writable as
    ``np.load``'s is); anything else -- other dtypes, Fortran order, a header that disagrees
    with the Array, a wrong length -- goes through ``Array.numpy()`` and is judged there.
    """
    data, dtype = array.data, _FAST_DTYPES.get(array.dtype)
    if dtype is not None and isinstance(data, bytes) and data.startswith(_NPY_MAGIC):
        end = _NPY_PREFIX + int.from_bytes(data[len(_NPY_MAGIC) : _NPY_PREFIX], "little")
        shape = tuple(int(d) for d in array.shape)
        header = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': {shape!r}, }}"
        count = int(np.prod(shape, dtype=np.int64))
        if (
            data[_NPY_PREFIX:end].rstrip(b" \n") == header.encode("latin1")
            and len(data) == end + count * dtype.itemsize
        ):
            flat: NDArray[np.generic] = np.frombuffer(data, dtype=dtype, count=count, offset=end)
            return flat.reshape(shape).copy()
    return array.numpy()


def record_to_weights(record: ArrayRecord) -> list[NDArray[np.float32]]:
    """The arrays of a weights/update ArrayRecord, in insertion (model) order, as float32."""
    arrays: list[NDArray[np.float32]] = []
    for name in record:
        array = read_array(record[name])
        if array.dtype != np.float32:
            raise ValueError(f"Array `{name}` must be float32. Found {array.dtype}.")
        arrays.append(cast(NDArray[np.float32], array))
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
        record[key] = read_array(arrays[key])
    return record


# --------------------------------------------------------------------------- signed job


def signed_job_record(envelope: bytes) -> ConfigRecord:
    """The ``signed_job`` record carrying an operator-signed job envelope."""
    if not isinstance(envelope, bytes) or not envelope:
        raise ValueError("A signed job envelope must be non-empty bytes.")
    return ConfigRecord({SIGNED_JOB_ENVELOPE: envelope})


def signed_job_from_content(content: RecordDict) -> bytes:
    """The envelope of the ``signed_job`` record (``ValueError`` when missing or malformed)."""
    record = content.config_records.get(SIGNED_JOB)
    if record is None:
        raise ValueError("The message carries no `signed_job` record (an operator-signed job).")
    envelope = record.get(SIGNED_JOB_ENVELOPE)
    if set(record) != {SIGNED_JOB_ENVELOPE} or not isinstance(envelope, bytes) or not envelope:
        raise ValueError("The `signed_job` record must hold exactly one bytes value `envelope`.")
    return envelope


def session_context(job_id: str) -> bytes:
    """The SecAgg+ session context of every secure collection of the signed job ``job_id``
    (``sha256:<hex>``, :attr:`manifests.signed_job.SignedJob.job_id`): each node signs its keys
    and the survivor set with it and verifies its peers' signatures with it, so the nodes of one
    session verifiably hold the same job (a server cannot give nodes different jobs, e.g.
    different clipping norms, within one round)."""
    if not isinstance(job_id, str) or not job_id.startswith("sha256:"):
        raise ValueError(f"A job id is `sha256:` + hex. Found {job_id!r}.")
    return b"fedbrain/job/" + job_id.encode("ascii")


# --------------------------------------------------------------------------- rotation


def rotation_seed(run_id: int, secagg_round: int) -> bytes:
    """The public seed of a secure collection's distributed-DP rotation: every node of the
    collection and the server derive the same one from the run and the SecAgg+ session."""
    if not (0 <= run_id < _U64 and 0 <= secagg_round < _U64):
        raise ValueError("run_id and secagg_round must be unsigned 64-bit integers.")
    material = (
        b"fedbrain/ddp-rotation/v1" + run_id.to_bytes(8, "big") + secagg_round.to_bytes(8, "big")
    )
    return hashlib.sha256(material).digest()


# --------------------------------------------------------------------------- plain sums


def summed_to_content(summed: Summed, content: RecordDict) -> None:
    """Put a node's own sums into ``content`` (the clear-text reply of ``fit`` / ``eval``)."""
    if summed.update.size:
        content[UPDATE] = named_arrays_record({UPDATE_ARRAY: summed.update.astype(np.float32)})
    if summed.statistics.size:
        content[STATISTICS] = named_arrays_record(
            {STATISTICS_ARRAY: summed.statistics.astype(np.float64)}
        )
    content[METRICS] = MetricRecord({str(k): float(v) for k, v in summed.metrics.items()})


def summed_from_content(
    content: RecordDict,
    *,
    update_length: int,
    metrics: Sequence[MetricSpec],
    statistics_length: int,
) -> Summed:
    """A node's clear-text sums, validated against the expected layout.

    Raises ``ValueError`` for a missing or extra record or metric, a wrong dtype or length,
    a non-finite value, or a metric sum above its bound for the node's example count -- the
    caller records the node as a dropout with the message.
    """
    update = _one_array(content, UPDATE, UPDATE_ARRAY, np.float32, update_length)
    stats = _one_array(content, STATISTICS, STATISTICS_ARRAY, np.float64, statistics_length)
    record = content.metric_records.get(METRICS)
    if record is None:
        raise ValueError("The reply carries no `metrics` record.")
    wanted = {str(spec.metric): spec for spec in metrics}
    if set(record) != set(wanted):
        raise ValueError(f"`metrics` must hold exactly {sorted(wanted)}. Found {sorted(record)}.")
    values: dict[Metric, float] = {}
    for name, spec in wanted.items():
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"`metrics.{name}` must be a number. Found {value!r}.")
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"`metrics.{name}` must be finite and >= 0. Found {value!r}.")
        values[spec.metric] = float(value)
    _check_metric_bounds(values, metrics)
    return Summed(update.astype(np.float64), values, stats.astype(np.float64))


def _check_metric_bounds(values: Mapping[Metric, float], metrics: Sequence[MetricSpec]) -> None:
    """Each metric is a sum of rows clipped to ``[0, bound]``: at most ``bound`` times the
    node's ``examples`` (one row of node means without a count). A larger value is not one an
    honest node computes (e.g. a loss of 1e300 over 1e-300 examples)."""
    units = values.get(Metric.EXAMPLES, 1.0)
    for spec in metrics:
        limit = spec.bound * units
        if spec.metric is not Metric.EXAMPLES and values[spec.metric] > limit * (1 + 1e-9):
            raise ValueError(
                f"`metrics.{spec.metric}` is {values[spec.metric]!r}, above its bound "
                f"{spec.bound:g} x {units:g} unit(s): each row is clipped to [0, {spec.bound:g}]."
            )


def _one_array(
    content: RecordDict, record_name: str, array_name: str, dtype: type[np.generic], length: int
) -> NDArray[np.generic]:
    record = content.array_records.get(record_name)
    if length == 0:
        if record is not None and len(record):
            raise ValueError(f"This collection expects no `{record_name}` record.")
        return np.zeros(0, dtype=dtype)
    if record is None or list(record) != [array_name]:
        raise ValueError(f"The reply must carry `{record_name}` with one array `{array_name}`.")
    try:
        array = read_array(record[array_name])
    except Exception as error:  # a malformed Array: whatever numpy makes of its bytes
        raise ValueError(f"`{record_name}.{array_name}` is not a readable array: {error}") from None
    if array.dtype != dtype or array.shape != (length,):
        raise ValueError(
            f"`{record_name}.{array_name}` must be {np.dtype(dtype).name} of shape ({length},). "
            f"Found {array.dtype} {array.shape}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{record_name}.{array_name}` contains NaN or infinity.")
    return array
