"""Server optimizers: how the server applies the round's aggregated update to the global model.

The aggregated update is the mean client delta ``mean_delta = mean(w_local - w_global)`` (after
clipping, noise and the fixed-denominator division of :mod:`aggregation.dp`), used as a
pseudo-gradient pointing *towards* the clients' models, hence the ``+`` below.

- :class:`FedAvg`: ``w <- w + eta * mean_delta`` (``eta = 1`` is plain federated averaging;
  McMahan et al. 2017).
- :class:`FedAdam`: Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2::

      m_t = beta1 * m_{t-1} + (1 - beta1) * delta_t
      v_t = beta2 * v_{t-1} + (1 - beta2) * delta_t ** 2
      w_{t+1} = w_t + eta * m_t / (sqrt(v_t) + tau)

  with ``m_{-1} = 0`` and ``v_{-1} = tau ** 2`` (the paper asks for ``v_{-1} >= tau ** 2``) and,
  as in the paper, no bias correction. ``tau`` bounds the per-coordinate step by
  ``eta * |m| / tau``; ``eta`` is a step size per coordinate (about ``eta`` when updates keep
  their sign), so it is much smaller than FedAvg's ``eta = 1``: it has no default.

Both are frozen configurations; the moving parts live in an explicit :class:`ServerOptState`
that :meth:`ServerOptimizer.step` returns anew each round (no hidden mutation: inputs are never
modified, outputs are new float32 arrays, and the state's arrays are read-only). The state
serialises to JSON plus named float32 arrays (:meth:`ServerOptState.state_dict`) for checkpoints.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

import numpy as np
from numpy.typing import NDArray

from aggregation.types import Measurements

__all__ = [
    "STATE_VERSION",
    "FedAdam",
    "FedAvg",
    "ServerOptState",
    "ServerOptStep",
    "ServerOptimizer",
    "make_server_optimizer",
]

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
F32Array: TypeAlias = NDArray[np.float32]

STATE_VERSION: Final = 1


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number. Found {type(value).__name__}.")
    return float(value)


def _raise_problems(problems: Sequence[str | None]) -> None:
    found = [p for p in problems if p is not None]
    if found:
        raise ValueError(" ".join(found))


def _positive(name: str, value: float) -> str | None:
    if not (math.isfinite(value) and value > 0):
        return f"`{name}` must be a finite positive number. Found {value!r}."
    return None


def _unit_interval(name: str, value: float) -> str | None:
    if not 0 <= value < 1:
        return f"`{name}` must be in [0, 1). Found {value!r}."
    return None


def _frozen_copy(array: NDArray[np.floating]) -> F32Array:
    copy = np.array(array, dtype=np.float32, copy=True)
    copy.flags.writeable = False
    return copy


def _check_arrays(name: str, arrays: Sequence[NDArray[np.floating]]) -> None:
    if isinstance(arrays, np.ndarray) or not isinstance(arrays, Sequence):
        raise TypeError(f"`{name}` must be a list of numpy arrays. Found {type(arrays).__name__}.")
    for i, a in enumerate(arrays):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"`{name}[{i}]` must be a numpy array. Found {type(a).__name__}.")
        if a.dtype not in (np.float32, np.float64):
            raise TypeError(f"`{name}[{i}]` must be float32 or float64. Found {a.dtype}.")


def _check_step_inputs(
    weights: Sequence[F32Array], mean_delta: Sequence[NDArray[np.floating]]
) -> None:
    _check_arrays("weights", weights)
    for i, w in enumerate(weights):
        if w.dtype != np.float32:
            raise TypeError(f"`weights[{i}]` must be float32 (the global model). Found {w.dtype}.")
    _check_arrays("mean_delta", mean_delta)
    if len(weights) != len(mean_delta):
        raise ValueError(
            f"`mean_delta` has {len(mean_delta)} arrays but `weights` has {len(weights)}; "
            "they must list the same parameters in the same order."
        )
    for i, (w, d) in enumerate(zip(weights, mean_delta, strict=True)):
        if w.shape != d.shape:
            raise ValueError(
                f"`mean_delta[{i}]` has shape {d.shape} but `weights[{i}]` has {w.shape}."
            )
        if not np.all(np.isfinite(d)):
            raise ValueError(
                f"`mean_delta[{i}]` contains NaN or infinity; refusing to apply it to the "
                "global model (record the round as aborted instead)."
            )


def _check_state_matches(state: ServerOptState, weights: Sequence[F32Array], algo: str) -> None:
    if not isinstance(state, ServerOptState):
        raise TypeError(f"`state` must be a ServerOptState. Found {type(state).__name__}.")
    if state.algorithm != algo:
        raise ValueError(
            f"`state` belongs to a {state.algorithm!r} optimizer, not {algo!r}. Resume with "
            "the job's original server optimizer, or start from `init(weights)`."
        )
    for slot, arrays in state.slots.items():
        shapes = [a.shape for a in arrays]
        if shapes != [w.shape for w in weights]:
            raise ValueError(
                f"`state` slot {slot!r} has shapes {shapes} but the weights have "
                f"{[w.shape for w in weights]}; the state comes from a different model."
            )


def _global_norm(arrays: Sequence[NDArray[np.floating]]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays))


@dataclass(frozen=True, eq=False)
class ServerOptState:
    """A server optimizer's state between rounds.

    ``slots`` maps a slot name (``"m"``, ``"v"`` for FedAdam; none for FedAvg) to one read-only
    float32 array per parameter tensor, in the weights' order. ``step`` counts applied rounds.
    """

    algorithm: str
    step: int
    slots: Mapping[str, tuple[F32Array, ...]]

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"`step` must be an int >= 0. Found {self.step!r}.")
        frozen: dict[str, tuple[F32Array, ...]] = {}
        for slot, arrays in self.slots.items():
            if not re.fullmatch(r"[a-z_]+", slot):
                raise ValueError(f"slot name must match [a-z_]+. Found {slot!r}.")
            _check_arrays(f"slots[{slot!r}]", list(arrays))
            frozen[slot] = tuple(_frozen_copy(a) for a in arrays)
        object.__setattr__(self, "slots", frozen)

    def state_dict(self) -> tuple[dict[str, JSONValue], dict[str, F32Array]]:
        """``(meta, arrays)``: JSON metadata, and arrays named ``"<slot>.<index>"``.

        Save ``meta`` as JSON and ``arrays`` as safetensors; :meth:`from_state_dict` reads
        them back.
        """
        meta: dict[str, JSONValue] = {
            "version": STATE_VERSION,
            "algorithm": self.algorithm,
            "step": self.step,
            "slots": {slot: len(arrays) for slot, arrays in sorted(self.slots.items())},
        }
        arrays = {
            f"{slot}.{i}": np.array(a, dtype=np.float32)
            for slot, slot_arrays in sorted(self.slots.items())
            for i, a in enumerate(slot_arrays)
        }
        return meta, arrays

    @classmethod
    def from_state_dict(
        cls, meta: Mapping[str, object], arrays: Mapping[str, NDArray[np.floating]]
    ) -> ServerOptState:
        """Inverse of :meth:`state_dict`; ``ValueError`` on anything malformed or missing."""
        expected = {"version", "algorithm", "step", "slots"}
        if not isinstance(meta, Mapping) or set(meta) != expected:
            found = sorted(meta) if isinstance(meta, Mapping) else type(meta).__name__
            raise ValueError(
                f"Server optimizer state must have exactly the keys {sorted(expected)}. "
                f"Found {found}."
            )
        if meta["version"] != STATE_VERSION:
            raise ValueError(
                f"Unsupported server optimizer state version {meta['version']!r}; this "
                f"fedbrain reads version {STATE_VERSION}."
            )
        algorithm, step, counts = meta["algorithm"], meta["step"], meta["slots"]
        if not isinstance(algorithm, str):
            raise ValueError(f"`algorithm` must be a string. Found {algorithm!r}.")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"`step` must be an int. Found {step!r}.")
        if not isinstance(counts, Mapping) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts.values()
        ):
            raise ValueError(f"`slots` must map slot names to array counts. Found {counts!r}.")
        wanted = {f"{slot}.{i}" for slot, n in counts.items() for i in range(n)}
        if set(arrays) != wanted:
            missing, extra = sorted(wanted - set(arrays)), sorted(set(arrays) - wanted)
            raise ValueError(
                f"Server optimizer arrays do not match the state: missing {missing}, "
                f"unexpected {extra}."
            )
        slots = {
            str(slot): tuple(arrays[f"{slot}.{i}"] for i in range(n)) for slot, n in counts.items()
        }
        return cls(algorithm=algorithm, step=step, slots=slots)


@dataclass(frozen=True, eq=False)
class ServerOptStep:
    """Result of one :meth:`ServerOptimizer.step`: new weights, next state, measurements."""

    weights: list[F32Array]
    state: ServerOptState
    measurements: Measurements


class ServerOptimizer(Protocol):
    """Applies the mean update to the global model (FedAvg, FedAdam)."""

    @property
    def name(self) -> str: ...

    def config(self) -> dict[str, JSONValue]:
        """The hyperparameters, as JSON (for checkpoints and the manifest)."""
        ...

    def init(self, weights: Sequence[F32Array]) -> ServerOptState:
        """The state before the first round, for a model with these weights."""
        ...

    def step(
        self,
        weights: Sequence[F32Array],
        mean_delta: Sequence[NDArray[np.floating]],
        state: ServerOptState,
    ) -> ServerOptStep:
        """New weights and state from the current ones and the round's mean update."""
        ...


def _measurements(
    name: str, step: int, old: Sequence[F32Array], new: Sequence[F32Array]
) -> Measurements:
    applied = [n.astype(np.float64) - o.astype(np.float64) for n, o in zip(new, old, strict=True)]
    return {
        "server_optimizer": name,
        "server_step": step,
        "applied_update_norm": _global_norm(applied),
    }


@dataclass(frozen=True)
class FedAvg:
    """``w <- w + eta * mean_delta`` (server learning rate ``eta``; 1.0 = plain FedAvg)."""

    eta: float = 1.0

    def __post_init__(self) -> None:
        eta = _real("eta", self.eta)
        _raise_problems([_positive("eta", eta)])
        object.__setattr__(self, "eta", eta)

    @property
    def name(self) -> str:
        return "fedavg"

    def config(self) -> dict[str, JSONValue]:
        return {"algorithm": self.name, "eta": self.eta}

    def init(self, weights: Sequence[F32Array]) -> ServerOptState:
        _check_arrays("weights", weights)
        return ServerOptState(algorithm=self.name, step=0, slots={})

    def step(
        self,
        weights: Sequence[F32Array],
        mean_delta: Sequence[NDArray[np.floating]],
        state: ServerOptState,
    ) -> ServerOptStep:
        _check_step_inputs(weights, mean_delta)
        _check_state_matches(state, weights, self.name)
        new = [
            np.asarray(w.astype(np.float64) + self.eta * d.astype(np.float64), dtype=np.float32)
            for w, d in zip(weights, mean_delta, strict=True)
        ]
        next_state = ServerOptState(algorithm=self.name, step=state.step + 1, slots={})
        return ServerOptStep(
            new, next_state, _measurements(self.name, next_state.step, weights, new)
        )


@dataclass(frozen=True)
class FedAdam:
    """FedAdam (Reddi et al. 2021, Algorithm 2); see the module docstring for the update.

    ``eta``: server step size (required; typical 1e-3 .. 1e-1). ``beta1``, ``beta2`` in
    [0, 1): moment decay rates. ``tau`` > 0: adaptivity, the floor added to ``sqrt(v)``.
    """

    eta: float
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        values = {n: _real(n, getattr(self, n)) for n in ("eta", "beta1", "beta2", "tau")}
        _raise_problems(
            [
                _positive("eta", values["eta"]),
                _unit_interval("beta1", values["beta1"]),
                _unit_interval("beta2", values["beta2"]),
                _positive("tau", values["tau"]),
            ]
        )
        for n, v in values.items():
            object.__setattr__(self, n, v)

    @property
    def name(self) -> str:
        return "fedadam"

    def config(self) -> dict[str, JSONValue]:
        return {
            "algorithm": self.name,
            "eta": self.eta,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
        }

    def init(self, weights: Sequence[F32Array]) -> ServerOptState:
        _check_arrays("weights", weights)
        m = tuple(np.zeros(w.shape, dtype=np.float32) for w in weights)
        v = tuple(np.full(w.shape, self.tau**2, dtype=np.float32) for w in weights)
        return ServerOptState(algorithm=self.name, step=0, slots={"m": m, "v": v})

    def step(
        self,
        weights: Sequence[F32Array],
        mean_delta: Sequence[NDArray[np.floating]],
        state: ServerOptState,
    ) -> ServerOptStep:
        _check_step_inputs(weights, mean_delta)
        _check_state_matches(state, weights, self.name)
        if set(state.slots) != {"m", "v"}:
            raise ValueError(
                f"FedAdam state needs slots 'm' and 'v'. Found {sorted(state.slots)}; start "
                "from `init(weights)`."
            )
        b1, b2 = self.beta1, self.beta2
        new_w: list[F32Array] = []
        new_m: list[F32Array] = []
        new_v: list[F32Array] = []
        for w, d, m, v in zip(weights, mean_delta, state.slots["m"], state.slots["v"], strict=True):
            d64 = d.astype(np.float64)
            m_t = b1 * m.astype(np.float64) + (1.0 - b1) * d64
            v_t = b2 * v.astype(np.float64) + (1.0 - b2) * np.square(d64)
            w_t = w.astype(np.float64) + self.eta * m_t / (np.sqrt(v_t) + self.tau)
            new_w.append(np.asarray(w_t, dtype=np.float32))
            new_m.append(np.asarray(m_t, dtype=np.float32))
            new_v.append(np.asarray(v_t, dtype=np.float32))
        next_state = ServerOptState(
            algorithm=self.name,
            step=state.step + 1,
            slots={"m": tuple(new_m), "v": tuple(new_v)},
        )
        return ServerOptStep(
            new_w, next_state, _measurements(self.name, next_state.step, weights, new_w)
        )


def make_server_optimizer(algorithm: str, *, eta: float) -> FedAvg | FedAdam:
    """The optimizer a job names (``"fedavg"`` or ``"fedadam"``, the job spec's values)."""
    if algorithm == "fedavg":
        return FedAvg(eta=eta)
    if algorithm == "fedadam":
        return FedAdam(eta=eta)
    raise ValueError(f"`algorithm` must be 'fedavg' or 'fedadam'. Found {algorithm!r}.")
