"""End-to-end SecAgg+ rounds: sums, dropouts, aborts, and what the server sees."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aggregation.secagg import (
    AdvertiseKeysRequest,
    MaskedInputReply,
    SecAggAbortedError,
    SecAggMessage,
    SecAggParams,
    Stage,
    UnmaskReply,
    quantize,
    run_secagg_round,
)

ORDER = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK)


def core(graph: Mapping[int, frozenset[int]], alive: set[int], t: int) -> set[int]:
    """Reference: drop nodes with fewer than t live members in their closed neighbourhood."""
    alive = set(alive)
    while True:
        thin = {n for n in alive if len(graph[n] & alive) + 1 < t}
        if not thin:
            return alive
        alive -= thin


def expected_contributors(
    graph: Mapping[int, frozenset[int]], drops: Mapping[int, Stage], t: int
) -> set[int] | None:
    """Reference model of the protocol: the contributors, or None when the round must abort."""

    def reaches(node: int, stage: Stage) -> bool:
        return node not in drops or ORDER.index(drops[node]) > ORDER.index(stage)

    advertised = {n for n in graph if reaches(n, Stage.ADVERTISE_KEYS)}
    u1 = core(graph, advertised, t)
    if len(u1) < t:
        return None
    u2 = core(graph, {n for n in u1 if reaches(n, Stage.SHARE_KEYS)}, t)
    if len(u2) < t:
        return None
    u3 = {n for n in u2 if reaches(n, Stage.MASKED_INPUT)}
    if len(u3) < t or any(len(graph[n] & u3) + 1 < t for n in u3):
        return None
    u4 = {n for n in u3 if reaches(n, Stage.UNMASK)}
    if any(len((graph[n] | {n}) & u4) < t for n in u3):
        return None
    dropped = {n for n in u2 - u3 if graph[n] & u3}
    if any(len(graph[n] & u4) < t for n in dropped):
        return None
    return u3


class Recorder:
    def __init__(self) -> None:
        self.messages: list[SecAggMessage] = []

    def __call__(self, message: SecAggMessage) -> None:
        self.messages.append(message)

    def graph(self) -> dict[int, frozenset[int]]:
        return {
            m.node_id: frozenset(m.neighbours)
            for m in self.messages
            if isinstance(m, AdvertiseKeysRequest)
        }


@st.composite
def rounds(draw: st.DrawFn) -> tuple[SecAggParams, list[int], dict[int, Stage], int]:
    n = draw(st.integers(3, 40))
    k = draw(st.integers(1, n - 1))
    t = draw(st.integers(2, k + 1))
    length = draw(st.integers(1, 50))
    params = SecAggParams(
        num_clients=n, num_neighbours=k, threshold=t, vector_length=length, clipping_range=1.0
    )
    node_ids = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    drop_rate = draw(st.sampled_from([0.0, 0.1, 0.3]))
    drops: dict[int, Stage] = {}
    for node in node_ids:
        if draw(st.floats(0, 1)) < drop_rate:
            drops[node] = draw(st.sampled_from(ORDER))
    seed = draw(st.integers(0, 2**32 - 1))
    return params, node_ids, drops, seed


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rounds())
def test_unmasked_sum_equals_plain_sum_of_exactly_the_arrived_clients(
    case: tuple[SecAggParams, list[int], dict[int, Stage], int],
) -> None:
    params, node_ids, drops, seed = case
    n = params.num_clients
    rng = np.random.default_rng(seed)
    floats = {
        node: rng.uniform(-1.5, 1.5, params.vector_length).astype(np.float32) for node in node_ids
    }
    quantized = {node: quantize(x, params, rng) for node, x in floats.items()}
    recorder = Recorder()
    try:
        outcome = run_secagg_round(params, quantized, rng=rng, dropouts=drops, on_message=recorder)
    except SecAggAbortedError:
        outcome = None
    expected = expected_contributors(recorder.graph(), drops, params.threshold)
    event("aborted" if expected is None else "finished")
    if expected is None:
        assert outcome is None, "the round must abort below the threshold"
        return
    assert outcome is not None
    assert outcome.client_errors == {}
    assert set(outcome.result.contributors) == expected
    plain = np.zeros(params.vector_length, dtype=np.uint32)
    for node in expected:
        plain += quantized[node]
    np.testing.assert_array_equal(outcome.result.total, plain)
    clipped = sum(np.clip(floats[i], -1, 1).astype(np.float64) for i in expected)
    decoded = outcome.dequantized_sum(params)
    assert np.all(np.abs(decoded - clipped) <= len(expected) * params.quantization_step * 1.01)
    m = outcome.result.measurements
    assert m["n_sampled"] == n
    assert m["n_masked_inputs"] == len(expected)
    assert m["n_survivors"] == len(expected) - sum(
        1 for i in expected if drops.get(i) == Stage.UNMASK
    )


def make_params(**overrides: int | float) -> SecAggParams:
    values: dict[str, int | float] = {
        "num_clients": 10,
        "num_neighbours": 6,
        "threshold": 4,
        "vector_length": 64,
        "clipping_range": 1.0,
    }
    values.update(overrides)
    return SecAggParams(**values)  # type: ignore[arg-type]


def uint_inputs(params: SecAggParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        100 + i: rng.integers(0, 2**32, params.vector_length, dtype=np.uint32)
        for i in range(params.num_clients)
    }


def plain_sum(inputs: Mapping[int, np.ndarray], nodes: object) -> np.ndarray:
    total = np.zeros(next(iter(inputs.values())).shape, dtype=np.uint32)
    for node in nodes:  # type: ignore[attr-defined]
        total += inputs[node]
    return total


@pytest.mark.parametrize(
    ("drops", "contributors"),
    [
        ({}, 10),
        ({100: Stage.ADVERTISE_KEYS, 101: Stage.SHARE_KEYS}, 8),
        ({102: Stage.MASKED_INPUT, 103: Stage.MASKED_INPUT}, 8),
        ({104: Stage.UNMASK, 105: Stage.UNMASK}, 10),
        ({100: Stage.SHARE_KEYS, 102: Stage.MASKED_INPUT, 104: Stage.UNMASK}, 8),
    ],
    ids=["none", "before-sharing-keys", "after-sharing-keys", "after-masking", "mixed"],
)
def test_unmask_recovers_sum_when_clients_drop_at_each_stage(
    drops: dict[int, Stage], contributors: int
) -> None:
    params = make_params()
    inputs = uint_inputs(params)
    outcome = run_secagg_round(params, inputs, rng=np.random.default_rng(1), dropouts=drops)
    result = outcome.result
    assert len(result.contributors) == contributors
    assert set(result.contributors) == {
        n
        for n in inputs
        if drops.get(n) not in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT)
    }
    np.testing.assert_array_equal(result.total, plain_sum(inputs, result.contributors))


def test_measurements_count_dropouts_per_stage() -> None:
    params = make_params(num_neighbours=8)
    drops = {
        100: Stage.ADVERTISE_KEYS,
        101: Stage.SHARE_KEYS,
        102: Stage.MASKED_INPUT,
        103: Stage.UNMASK,
    }
    outcome = run_secagg_round(
        params, uint_inputs(params), rng=np.random.default_rng(8), dropouts=drops
    )
    m = outcome.result.measurements
    assert m["n_sampled"] == 10
    assert m["n_dropped_advertise_keys"] == 1
    assert m["n_dropped_share_keys"] == 1
    assert m["n_dropped_masked_input"] == 1
    assert m["n_dropped_unmask"] == 1
    assert m["n_masked_inputs"] == 7
    assert m["n_survivors"] == 6
    assert m["n_seeds_rebuilt"] == 7
    assert m["n_mask_keys_rebuilt"] == 1  # 102 shared keys, then dropped: its pairwise masks
    assert m["n_excluded_share_keys"] == 0 and m["n_excluded_masked_input"] == 0


def test_unmask_recovers_sum_when_two_clients_drop_after_masking() -> None:
    params = make_params(num_clients=5, num_neighbours=4, threshold=3)
    inputs = uint_inputs(params)
    drops = {100: Stage.UNMASK, 101: Stage.UNMASK}
    outcome = run_secagg_round(params, inputs, rng=np.random.default_rng(2), dropouts=drops)
    assert outcome.result.contributors == (100, 101, 102, 103, 104)
    assert outcome.result.measurements["n_survivors"] == 3
    np.testing.assert_array_equal(outcome.result.total, plain_sum(inputs, inputs))


def test_float_updates_decode_to_their_sum_within_n_steps() -> None:
    params = make_params(vector_length=1000, clipping_range=0.5)
    rng = np.random.default_rng(3)
    updates = {100 + i: rng.normal(0, 0.1, 1000).astype(np.float32) for i in range(10)}
    outcome = run_secagg_round(params, updates, rng=rng, dropouts={105: Stage.MASKED_INPUT})
    contributors = outcome.result.contributors
    assert 105 not in contributors and len(contributors) == 9
    expected = sum(np.clip(updates[i], -0.5, 0.5).astype(np.float64) for i in contributors)
    error = np.abs(outcome.dequantized_sum(params) - expected)
    assert error.max() <= 9 * params.quantization_step


def test_round_aborts_without_revealing_anything_when_too_few_masked_inputs_arrive() -> None:
    params = make_params(num_clients=5, num_neighbours=4, threshold=4)
    inputs = uint_inputs(params)
    recorder = Recorder()
    drops = {100: Stage.MASKED_INPUT, 101: Stage.MASKED_INPUT}
    with pytest.raises(SecAggAbortedError, match="threshold"):
        run_secagg_round(
            params, inputs, rng=np.random.default_rng(4), dropouts=drops, on_message=recorder
        )
    assert not any(isinstance(m, UnmaskReply) for m in recorder.messages)


def test_round_aborts_when_too_few_clients_answer_the_unmask_request() -> None:
    params = make_params(num_clients=5, num_neighbours=4, threshold=4)
    inputs = uint_inputs(params)
    drops = {100: Stage.UNMASK, 101: Stage.UNMASK}
    with pytest.raises(SecAggAbortedError, match="fewer than threshold"):
        run_secagg_round(params, inputs, rng=np.random.default_rng(5), dropouts=drops)


def test_round_aborts_when_too_few_clients_advertise_keys() -> None:
    params = make_params(num_clients=4, num_neighbours=3, threshold=3)
    drops = {100: Stage.ADVERTISE_KEYS, 101: Stage.ADVERTISE_KEYS}
    with pytest.raises(SecAggAbortedError, match="advertised keys"):
        run_secagg_round(params, uint_inputs(params), rng=np.random.default_rng(6), dropouts=drops)


def test_server_never_handles_a_plain_or_quantized_client_input() -> None:
    params = make_params(vector_length=16)
    rng = np.random.default_rng(7)
    floats = {100 + i: rng.uniform(-1, 1, 16).astype(np.float32) for i in range(10)}
    quantized = {n: quantize(x, params, np.random.default_rng(n)) for n, x in floats.items()}
    recorder = Recorder()
    run_secagg_round(params, quantized, rng=rng, dropouts={103: Stage.UNMASK}, on_message=recorder)
    secrets = [x.tobytes() for x in floats.values()] + [q.tobytes() for q in quantized.values()]
    arrays_seen = 0
    for message in recorder.messages:
        for value in message.to_record().values():
            blobs: list[bytes] = []
            if isinstance(value, np.ndarray):
                arrays_seen += 1
                blobs.append(value.tobytes())
                for q in quantized.values():
                    assert not np.any(value == q), "a masked value coincides with the input"
            elif isinstance(value, bytes):
                blobs.append(value)
            elif isinstance(value, list):
                blobs.extend(v for v in value if isinstance(v, bytes))
            for blob in blobs:
                for secret in secrets:
                    assert secret not in blob
    assert arrays_seen == 10  # every masked input went through the hook
    assert sum(isinstance(m, MaskedInputReply) for m in recorder.messages) == 10
