"""Server optimizers: FedAvg and FedAdam (Reddi et al. 2021)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.typing import NDArray

from aggregation.server_opt import (
    FedAdam,
    FedAvg,
    ServerOptState,
    make_server_optimizer,
)

F32 = NDArray[np.float32]


def _model(rng: np.random.Generator) -> list[F32]:
    return [
        rng.standard_normal((3, 4)).astype(np.float32),
        rng.standard_normal(4).astype(np.float32),
        np.asarray(rng.standard_normal(), dtype=np.float32),  # 0-d
    ]


def _deltas(rng: np.random.Generator, like: list[F32]) -> list[F32]:
    return [np.asarray(0.1 * rng.standard_normal(w.shape), dtype=np.float32) for w in like]


def reference_fedadam(
    w0: list[F32],
    deltas: list[list[F32]],
    *,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> list[NDArray[np.float64]]:
    """Algorithm 2 of Reddi et al. 2021, one coordinate at a time, in float64."""
    weights = [w.astype(np.float64).ravel().tolist() for w in w0]
    m = [[0.0] * len(w) for w in weights]
    v = [[tau**2] * len(w) for w in weights]
    for round_deltas in deltas:
        for t, delta in enumerate(round_deltas):
            for i, d in enumerate(delta.astype(np.float64).ravel().tolist()):
                m[t][i] = beta1 * m[t][i] + (1 - beta1) * d
                v[t][i] = beta2 * v[t][i] + (1 - beta2) * d * d
                weights[t][i] += eta * m[t][i] / (v[t][i] ** 0.5 + tau)
    return [
        np.array(w, dtype=np.float64).reshape(s.shape) for w, s in zip(weights, w0, strict=True)
    ]


def test_fedavg_with_unit_eta_returns_weights_plus_delta() -> None:
    rng = np.random.default_rng(0)
    weights = _model(rng)
    delta = _deltas(rng, weights)
    opt = FedAvg()
    result = opt.step(weights, delta, opt.init(weights))
    for new, w, d in zip(result.weights, weights, delta, strict=True):
        assert isinstance(new, np.ndarray)
        assert new.dtype == np.float32
        assert new.shape == w.shape
        np.testing.assert_array_equal(new, (w + d).astype(np.float32))
    assert result.state.step == 1
    assert result.measurements["server_optimizer"] == "fedavg"


def test_fedavg_scales_the_delta_by_eta() -> None:
    weights = [np.ones((2, 2), dtype=np.float32)]
    delta = [np.full((2, 2), 0.5, dtype=np.float32)]
    opt = FedAvg(eta=0.5)
    result = opt.step(weights, delta, opt.init(weights))
    np.testing.assert_array_equal(result.weights[0], np.full((2, 2), 1.25, dtype=np.float32))
    assert result.measurements["applied_update_norm"] == pytest.approx(0.25 * 2)


def test_fedavg_accepts_a_float64_delta_and_returns_float32() -> None:
    weights = [np.zeros(3, dtype=np.float32)]
    result = FedAvg().step(weights, [np.ones(3)], FedAvg().init(weights))
    assert result.weights[0].dtype == np.float32


def test_fedadam_matches_the_reference_over_several_rounds() -> None:
    rng = np.random.default_rng(1)
    weights = _model(rng)
    rounds = [_deltas(rng, weights) for _ in range(5)]
    opt = FedAdam(eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    state = opt.init(weights)
    current = weights
    for delta in rounds:
        result = opt.step(current, delta, state)
        current, state = result.weights, result.state
    expected = reference_fedadam(weights, rounds, eta=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    for got, want in zip(current, expected, strict=True):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert state.step == 5


def test_fedadam_first_step_moves_each_coordinate_by_about_eta_in_the_delta_direction() -> None:
    weights = [np.zeros(4, dtype=np.float32)]
    delta = [np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32)]
    opt = FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    new = opt.step(weights, delta, opt.init(weights)).weights[0]
    # m = 0.1 d, v ~ 0.01 d^2 -> step = eta * 0.1 d / (0.1 |d| + tau) ~ eta * sign(d)
    np.testing.assert_allclose(new[:3], [0.099, -0.0995, 0.098], rtol=1e-2)
    assert new[3] == 0.0


def test_step_leaves_inputs_and_previous_state_unchanged() -> None:
    rng = np.random.default_rng(2)
    weights = _model(rng)
    delta = _deltas(rng, weights)
    saved_w = [w.copy() for w in weights]
    saved_d = [d.copy() for d in delta]
    opt = FedAdam(eta=0.01)
    state = opt.init(weights)
    saved_m = [m.copy() for m in state.slots["m"]]
    result = opt.step(weights, delta, state)
    for a, b in zip(weights + delta, saved_w + saved_d, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(state.slots["m"], saved_m, strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(new is not old for new, old in zip(result.weights, weights, strict=True))


def test_state_arrays_are_read_only() -> None:
    weights = [np.zeros(3, dtype=np.float32)]
    state = FedAdam(eta=0.01).init(weights)
    with pytest.raises(ValueError, match="read-only"):
        state.slots["v"][0][0] = 1.0


def test_fedadam_state_round_trips_through_json_and_arrays() -> None:
    rng = np.random.default_rng(3)
    weights = _model(rng)
    opt = FedAdam(eta=0.02)
    first = opt.step(weights, _deltas(rng, weights), opt.init(weights))
    meta, arrays = first.state.state_dict()
    restored = ServerOptState.from_state_dict(json.loads(json.dumps(meta)), arrays)
    assert restored.algorithm == "fedadam"
    assert restored.step == 1
    delta = _deltas(rng, weights)
    continued = opt.step(first.weights, delta, first.state)
    resumed = opt.step(first.weights, delta, restored)
    for a, b in zip(continued.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fedavg_state_round_trips_without_arrays() -> None:
    weights = [np.zeros(2, dtype=np.float32)]
    meta, arrays = FedAvg().init(weights).state_dict()
    assert arrays == {}
    assert ServerOptState.from_state_dict(meta, arrays).algorithm == "fedavg"


def test_from_state_dict_rejects_missing_arrays() -> None:
    weights = [np.zeros(2, dtype=np.float32), np.zeros(3, dtype=np.float32)]
    meta, arrays = FedAdam(eta=0.1).init(weights).state_dict()
    del arrays["v.1"]
    with pytest.raises(ValueError, match=r"missing \['v.1'\]"):
        ServerOptState.from_state_dict(meta, arrays)


def test_from_state_dict_rejects_an_unknown_version() -> None:
    meta, arrays = FedAvg().init([np.zeros(1, dtype=np.float32)]).state_dict()
    with pytest.raises(ValueError, match="version 99"):
        ServerOptState.from_state_dict({**meta, "version": 99}, arrays)


def test_step_refuses_the_state_of_another_optimizer() -> None:
    weights = [np.zeros(2, dtype=np.float32)]
    with pytest.raises(ValueError, match="'fedavg' optimizer, not 'fedadam'"):
        FedAdam(eta=0.1).step(weights, weights, FedAvg().init(weights))


def test_step_refuses_a_state_for_other_shapes() -> None:
    opt = FedAdam(eta=0.1)
    state = opt.init([np.zeros(2, dtype=np.float32)])
    weights = [np.zeros(3, dtype=np.float32)]
    with pytest.raises(ValueError, match="different model"):
        opt.step(weights, weights, state)


def test_step_refuses_mismatched_delta_and_non_finite_delta() -> None:
    weights = [np.zeros(2, dtype=np.float32)]
    opt = FedAvg()
    with pytest.raises(ValueError, match="shape"):
        opt.step(weights, [np.zeros(3, dtype=np.float32)], opt.init(weights))
    with pytest.raises(ValueError, match="same parameters"):
        opt.step(weights, [], opt.init(weights))
    with pytest.raises(ValueError, match="NaN or infinity"):
        opt.step(weights, [np.array([0.0, np.nan], dtype=np.float32)], opt.init(weights))


def test_step_refuses_float64_weights() -> None:
    weights = [np.zeros(2)]
    with pytest.raises(TypeError, match="float32"):
        FedAvg().step(weights, weights, FedAvg().init(weights))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": 0.0}, "`eta` must be a finite positive number. Found 0.0"),
        ({"eta": 0.1, "beta1": 1.0}, r"`beta1` must be in \[0, 1\)"),
        ({"eta": 0.1, "beta2": -0.1}, r"`beta2` must be in \[0, 1\)"),
        ({"eta": 0.1, "tau": 0.0}, "`tau` must be a finite positive number"),
        ({"eta": float("inf")}, "`eta` must be a finite positive number"),
    ],
)
def test_fedadam_rejects_invalid_hyperparameters(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedAdam(**kwargs)


def test_fedadam_reports_every_invalid_hyperparameter_at_once() -> None:
    with pytest.raises(ValueError, match=r"eta.*beta1.*tau"):
        FedAdam(eta=-1.0, beta1=2.0, tau=-1.0)


def test_fedavg_rejects_non_positive_eta_and_non_numbers() -> None:
    with pytest.raises(ValueError, match=r"`eta` must be a finite positive number\. Found -1\.0"):
        FedAvg(eta=-1.0)
    with pytest.raises(TypeError, match="`eta` must be a real number"):
        FedAvg(eta="1")  # type: ignore[arg-type]


def test_make_server_optimizer_builds_the_job_s_choice() -> None:
    assert make_server_optimizer("fedavg", eta=1.0) == FedAvg(eta=1.0)
    assert make_server_optimizer("fedadam", eta=0.01) == FedAdam(eta=0.01)
    with pytest.raises(ValueError, match="'fedavg' or 'fedadam'"):
        make_server_optimizer("fedyogi", eta=0.01)
