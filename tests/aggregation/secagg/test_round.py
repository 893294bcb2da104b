"""End-to-end SecAgg+ rounds: sums, dropouts, aborts, and what the server sees."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aggregation.secagg import (
    AdvertiseKeysRequest,
    ConsistencyCheckReply,
    MaskedInputReply,
    NodeIdentity,
    SecAggAbortedError,
    SecAggMessage,
    SecAggParams,
    SecAggPolicy,
    Stage,
    UnmaskReply,
    quantize,
    run_secagg_round,
)

ORDER = (
    Stage.ADVERTISE_KEYS,
    Stage.SHARE_KEYS,
    Stage.MASKED_INPUT,
    Stage.CONSISTENCY_CHECK,
    Stage.UNMASK,
)


def core(graph: Mapping[int, frozenset[int]], alive: set[int], t: int) -> set[int]:
    """Reference: drop nodes with fewer than t live members in their closed neighbourhood."""
    alive = set(alive)
    while True:
        thin = {n for n in alive if len(graph[n] & alive) + 1 < t}
        if not thin:
            return alive
        alive -= thin


def expected_outcome(
    graph: Mapping[int, frozenset[int]], drops: Mapping[int, Stage], t: int, authenticated: bool
) -> tuple[set[int], set[int]] | None:
    """Reference model of the protocol with honest clients: (contributors, unmask helpers), or
    None when the round must abort."""

    def reaches(node: int, stage: Stage) -> bool:
        return node not in drops or ORDER.index(drops[node]) > ORDER.index(stage)

    advertised = {n for n in graph if reaches(n, Stage.ADVERTISE_KEYS)}
    u1 = core(graph, advertised, t)
    if len(u1) < t:
        return None
    u2 = core(graph, {n for n in u1 if reaches(n, Stage.SHARE_KEYS)}, t)
    if len(u2) < t:
        return None
    masked = {n: graph[n] & u2 for n in u2}  # honest clients mask with every sender
    u3 = {n for n in u2 if reaches(n, Stage.MASKED_INPUT)}
    if len(u3) < t:
        return None
    survivors = set(u3)
    while True:  # inputs that could not be unmasked leave the sum
        remove = {n for n in survivors if len(masked[n] & survivors) + 1 < t}
        for v in {v for u in survivors for v in masked[u]} - survivors:
            holders = {u for u in survivors if v in masked[u]}
            if len(holders) < t:
                remove |= holders
        if not remove:
            break
        survivors -= remove
    if len(survivors) < t:
        return None
    if authenticated:
        # clients sign only a survivor set of at least their policy's minimum group size (3)
        signed = {n for n in survivors if reaches(n, Stage.CONSISTENCY_CHECK)}
        signed = signed if len(survivors) >= SecAggPolicy().min_clients else set()
        asked = {n for n in signed if len((graph[n] | {n}) & signed) >= t}
    else:
        asked = survivors
    u4 = {n for n in asked if reaches(n, Stage.UNMASK)}
    if any(len((masked[n] | {n}) & u4) < t for n in survivors):
        return None
    dropped = {v for u in survivors for v in masked[u]} - survivors
    if any(len({u for u in u4 if v in masked[u]}) < t for v in dropped):
        return None
    return survivors, u4


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
def rounds(draw: st.DrawFn) -> tuple[SecAggParams, list[NodeIdentity] | None, list[int], float]:
    n = draw(st.integers(3, 30))
    k = draw(st.integers(2, n - 1))
    t = draw(st.integers((k + 1) // 2 + 1, k + 1))  # 2t > holders, as the client policy needs
    length = draw(st.integers(1, 50))
    params = SecAggParams(
        num_clients=n, num_neighbours=k, threshold=t, vector_length=length, clipping_range=1.0
    )
    if draw(st.booleans()):
        people: list[NodeIdentity] | None = [NodeIdentity.generate() for _ in range(n)]
        node_ids = sorted(i.node_id for i in people or [])
    else:  # the legacy (unauthenticated) protocol takes any uint64 ids
        people = None
        node_ids = draw(st.lists(st.integers(0, 2**64 - 1), min_size=n, max_size=n, unique=True))
    drop_rate = draw(st.sampled_from([0.0, 0.1, 0.3]))
    return params, people, node_ids, drop_rate


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rounds(), data=st.data())
def test_unmasked_sum_equals_plain_sum_of_exactly_the_surviving_clients(
    case: tuple[SecAggParams, list[NodeIdentity] | None, list[int], float], data: st.DataObject
) -> None:
    params, people, node_ids, drop_rate = case
    stages = (
        ORDER if people is not None else tuple(s for s in ORDER if s != Stage.CONSISTENCY_CHECK)
    )
    drops: dict[int, Stage] = {}
    for node in node_ids:
        if data.draw(st.floats(0, 1)) < drop_rate:
            drops[node] = data.draw(st.sampled_from(stages))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n = params.num_clients
    floats = {
        node: rng.uniform(-1.5, 1.5, params.vector_length).astype(np.float32) for node in node_ids
    }
    quantized = {node: quantize(x, params, rng) for node, x in floats.items()}
    recorder = Recorder()
    try:
        outcome = run_secagg_round(
            params, quantized, rng=rng, dropouts=drops, on_message=recorder, identities=people
        )
    except SecAggAbortedError:
        outcome = None
    expected = expected_outcome(recorder.graph(), drops, params.threshold, people is not None)
    event("aborted" if expected is None else "finished")
    event("authenticated" if people is not None else "legacy")
    if expected is None:
        assert outcome is None, "the round must abort below the threshold"
        return
    assert outcome is not None
    contributors, helpers = expected
    assert outcome.client_errors == {}
    assert set(outcome.result.contributors) == contributors
    assert set(outcome.dropout_reasons) == set(node_ids) - helpers
    plain = np.zeros(params.vector_length, dtype=np.uint32)
    for node in contributors:
        plain += quantized[node]
    np.testing.assert_array_equal(outcome.result.total, plain)
    clipped = sum(np.clip(floats[i], -1, 1).astype(np.float64) for i in contributors)
    decoded = outcome.dequantized_sum(params)
    assert np.all(np.abs(decoded - clipped) <= len(contributors) * params.quantization_step * 1.01)
    m = outcome.result.measurements
    assert m["n_sampled"] == n
    assert m["n_masked_inputs"] == len(contributors)
    assert m["n_survivors"] == len(helpers)
    assert m["authenticated"] == (people is not None)


def fed_ids(n: int) -> tuple[list[NodeIdentity], list[int]]:
    """``n`` identities and their node ids, both sorted by id."""
    people = sorted((NodeIdentity.generate() for _ in range(n)), key=lambda i: i.node_id)
    return people, [i.node_id for i in people]


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


PEOPLE, IDS = fed_ids(10)
"""Ten identities; tests name nodes by index: IDS[i]."""


def uint_inputs(params: SecAggParams, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        IDS[i]: rng.integers(0, 2**32, params.vector_length, dtype=np.uint32)
        for i in range(params.num_clients)
    }


def people(params: SecAggParams) -> list[NodeIdentity]:
    return PEOPLE[: params.num_clients]


def plain_sum(inputs: Mapping[int, np.ndarray], nodes: object) -> np.ndarray:
    total = np.zeros(next(iter(inputs.values())).shape, dtype=np.uint32)
    for node in nodes:  # type: ignore[attr-defined]
        total += inputs[node]
    return total


@pytest.mark.parametrize(
    ("drops", "contributors"),
    [
        ({}, 10),
        ({0: Stage.ADVERTISE_KEYS, 1: Stage.SHARE_KEYS}, 8),
        ({2: Stage.MASKED_INPUT, 3: Stage.MASKED_INPUT}, 8),
        ({4: Stage.CONSISTENCY_CHECK, 5: Stage.UNMASK}, 10),
        ({0: Stage.SHARE_KEYS, 2: Stage.MASKED_INPUT, 4: Stage.UNMASK}, 8),
    ],
    ids=["none", "before-sharing-keys", "after-sharing-keys", "after-masking", "mixed"],
)
def test_unmask_recovers_sum_when_clients_drop_at_each_stage(
    drops: dict[int, Stage], contributors: int
) -> None:
    params = make_params()
    inputs = uint_inputs(params)
    by_id = {IDS[i]: stage for i, stage in drops.items()}
    outcome = run_secagg_round(
        params, inputs, rng=np.random.default_rng(1), dropouts=by_id, identities=people(params)
    )
    result = outcome.result
    assert len(result.contributors) == contributors
    assert set(result.contributors) == {
        n
        for n in inputs
        if by_id.get(n) not in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT)
    }
    np.testing.assert_array_equal(result.total, plain_sum(inputs, result.contributors))
    assert set(outcome.dropout_reasons) == set(by_id)
    for node, stage in by_id.items():
        assert outcome.dropout_reasons[node].startswith(f"{stage}: no valid reply")


def test_legacy_unauthenticated_round_still_sums_for_old_callers() -> None:
    params = make_params()
    inputs = {100 + i: v for i, v in enumerate(uint_inputs(params).values())}
    drops = {100: Stage.SHARE_KEYS, 102: Stage.MASKED_INPUT, 104: Stage.UNMASK}
    outcome = run_secagg_round(params, inputs, rng=np.random.default_rng(1), dropouts=drops)
    assert set(outcome.result.contributors) == set(inputs) - {100, 102}
    assert outcome.result.measurements["authenticated"] is False
    np.testing.assert_array_equal(
        outcome.result.total, plain_sum(inputs, outcome.result.contributors)
    )


def test_measurements_count_dropouts_per_stage() -> None:
    params = make_params(num_neighbours=9, threshold=6)
    drops = {
        IDS[0]: Stage.ADVERTISE_KEYS,
        IDS[1]: Stage.SHARE_KEYS,
        IDS[2]: Stage.MASKED_INPUT,
        IDS[3]: Stage.CONSISTENCY_CHECK,
    }
    outcome = run_secagg_round(
        params,
        uint_inputs(params),
        rng=np.random.default_rng(8),
        dropouts=drops,
        identities=people(params),
    )
    m = outcome.result.measurements
    assert m["n_sampled"] == 10
    assert m["n_dropped_advertise_keys"] == 1
    assert m["n_dropped_share_keys"] == 1
    assert m["n_dropped_masked_input"] == 1
    assert m["n_dropped_consistency_check"] == 1
    assert m["n_dropped_unmask"] == 0
    assert m["n_masked_inputs"] == 7
    assert m["n_survivors"] == 6
    assert m["n_seeds_rebuilt"] == 7
    assert m["n_mask_keys_rebuilt"] == 1  # IDS[2] shared keys, then dropped: its pairwise masks
    assert m["n_excluded_share_keys"] == 0 and m["n_excluded_masked_input"] == 0
    assert m["n_evicted_masked_input"] == 0 and m["n_inconsistent_share_holders"] == 0


def test_unmask_recovers_sum_when_two_clients_drop_after_masking() -> None:
    params = make_params(num_clients=5, num_neighbours=4, threshold=3)
    inputs = uint_inputs(params)
    drops = {IDS[0]: Stage.UNMASK, IDS[1]: Stage.UNMASK}
    outcome = run_secagg_round(
        params, inputs, rng=np.random.default_rng(2), dropouts=drops, identities=people(params)
    )
    assert outcome.result.contributors == tuple(IDS[:5])
    assert outcome.result.measurements["n_survivors"] == 3
    np.testing.assert_array_equal(outcome.result.total, plain_sum(inputs, inputs))


def test_float_updates_decode_to_their_sum_within_n_steps() -> None:
    params = make_params(vector_length=1000, clipping_range=0.5)
    rng = np.random.default_rng(3)
    updates = {IDS[i]: rng.normal(0, 0.1, 1000).astype(np.float32) for i in range(10)}
    outcome = run_secagg_round(
        params,
        updates,
        rng=rng,
        dropouts={IDS[5]: Stage.MASKED_INPUT},
        identities=people(params),
    )
    contributors = outcome.result.contributors
    assert IDS[5] not in contributors and len(contributors) == 9
    expected = sum(np.clip(updates[i], -0.5, 0.5).astype(np.float64) for i in contributors)
    error = np.abs(outcome.dequantized_sum(params) - expected)
    assert error.max() <= 9 * params.quantization_step


def test_round_aborts_without_revealing_anything_when_too_few_masked_inputs_arrive() -> None:
    params = make_params(num_clients=5, num_neighbours=4, threshold=4)
    inputs = uint_inputs(params)
    recorder = Recorder()
    drops = {IDS[0]: Stage.MASKED_INPUT, IDS[1]: Stage.MASKED_INPUT}
    with pytest.raises(SecAggAbortedError, match="threshold"):
        run_secagg_round(
            params,
            inputs,
            rng=np.random.default_rng(4),
            dropouts=drops,
            on_message=recorder,
            identities=people(params),
        )
    assert not any(isinstance(m, UnmaskReply | ConsistencyCheckReply) for m in recorder.messages)


def test_round_aborts_when_too_few_clients_answer_the_unmask_request() -> None:
    params = make_params(num_clients=5, num_neighbours=4, threshold=4)
    inputs = uint_inputs(params)
    drops = {IDS[0]: Stage.UNMASK, IDS[1]: Stage.UNMASK}
    with pytest.raises(SecAggAbortedError, match="fewer than threshold"):
        run_secagg_round(
            params,
            inputs,
            rng=np.random.default_rng(5),
            dropouts=drops,
            identities=people(params),
        )


def test_round_aborts_when_too_few_clients_advertise_keys() -> None:
    params = make_params(num_clients=4, num_neighbours=3, threshold=3)
    drops = {IDS[0]: Stage.ADVERTISE_KEYS, IDS[1]: Stage.ADVERTISE_KEYS}
    with pytest.raises(SecAggAbortedError, match="advertised keys"):
        run_secagg_round(
            params,
            uint_inputs(params),
            rng=np.random.default_rng(6),
            dropouts=drops,
            identities=people(params),
        )


def test_server_never_handles_a_plain_or_quantized_client_input() -> None:
    params = make_params(vector_length=16)
    rng = np.random.default_rng(7)
    floats = {IDS[i]: rng.uniform(-1, 1, 16).astype(np.float32) for i in range(10)}
    quantized = {
        n: quantize(x, params, np.random.default_rng(i)) for i, (n, x) in enumerate(floats.items())
    }
    recorder = Recorder()
    run_secagg_round(
        params,
        quantized,
        rng=rng,
        dropouts={IDS[3]: Stage.UNMASK},
        on_message=recorder,
        identities=people(params),
    )
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
