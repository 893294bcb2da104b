"""The wire contract: round configs, node info, clear-text sums and SecAgg+ records survive
Flower's RecordDict intact, and every malformed record is refused with a reason."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from aggregation.codec import Metric, MetricSpec, Summed
from aggregation.secagg import (
    SecAggMessage,
    SecAggParams,
    Stage,
    message_from_record,
    run_secagg_round,
)
from clients import protocol
from clients.protocol import (
    MESSAGE_TYPES,
    NodeInfo,
    RoundConfig,
    Work,
    flatten,
    from_wire_int,
    record_to_weights,
    secagg_from_content,
    secagg_message_type,
    secagg_to_content,
    summed_from_content,
    summed_to_content,
    to_wire_int,
    unflatten,
    weights_to_record,
)

# ------------------------------------------------------------------------- secagg records


def _through_flower(message: SecAggMessage) -> SecAggMessage:
    content = RecordDict()
    secagg_to_content(message.to_record(), content)
    return message_from_record(secagg_from_content(content))


def test_every_secagg_message_survives_a_record_dict_round_trip() -> None:
    rng = np.random.default_rng(3)
    big = [2**64 - 5, 2**63, 7, 2**63 - 1, 12]  # Flower node ids are unsigned 64-bit
    inputs = {n: rng.normal(size=16).astype(np.float32) for n in big}
    params = SecAggParams(
        num_clients=5, num_neighbours=4, threshold=3, vector_length=16, clipping_range=4.0
    )
    seen: list[str] = []

    def tamper(message: SecAggMessage) -> SecAggMessage:
        seen.append(type(message).__name__)
        return _through_flower(message)

    outcome = run_secagg_round(params, inputs, rng=rng, tamper=tamper)
    assert sorted(outcome.result.contributors) == sorted(big)
    plain = np.sum([v.astype(np.float64) for v in inputs.values()], axis=0)
    assert np.allclose(outcome.dequantized_sum(params), plain, atol=5 * params.quantization_step)
    assert {
        "AdvertiseKeysRequest",
        "ShareKeysRequest",
        "MaskedInputRequest",
        "UnmaskRequest",
    } <= set(seen)


def test_secagg_records_keep_uint32_arrays_big_ids_and_empty_lists() -> None:
    content = RecordDict()
    masked = np.array([0, 2**32 - 1, 7], dtype=np.uint32)
    record: dict[str, object] = {
        "stage": "masked_input",
        "masked_input": masked,
        "node_id": 2**64 - 1,
        "sender_ids": [2**63, 3],
        "dropped_ids": [],
    }
    secagg_to_content(record, content)
    back = secagg_from_content(content)
    assert back.keys() == record.keys()
    assert np.array_equal(back["masked_input"], masked)  # type: ignore[arg-type]
    assert back["masked_input"].dtype == np.uint32  # type: ignore[attr-defined]
    assert back["node_id"] == 2**64 - 1 and back["sender_ids"] == [2**63, 3]
    assert back["dropped_ids"] == [] and back["stage"] == "masked_input"
    with pytest.raises(TypeError, match="is a bool"):
        secagg_to_content({"flag": True}, RecordDict())


def test_missing_or_malformed_secagg_record_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no `secagg` ConfigRecord"):
        secagg_from_content(RecordDict())
    bad = RecordDict({protocol.SECAGG: ConfigRecord({"__empty_lists__": "x"})})
    with pytest.raises(ValueError, match="must be a list of keys"):
        secagg_from_content(bad)


def test_wire_ints_round_trip_and_reject_out_of_range() -> None:
    for v in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        assert from_wire_int(to_wire_int(v)) == v
    assert to_wire_int(2**64 - 1) == -1
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        to_wire_int(2**64)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        to_wire_int(-1)
    with pytest.raises(ValueError, match="signed 64-bit"):
        from_wire_int(2**63)


# ----------------------------------------------------------------------------- messages


def test_secagg_message_types_name_each_stage_in_both_categories() -> None:
    assert secagg_message_type("evaluate", Stage.MASKED_INPUT) == "evaluate.secagg_masked"
    assert protocol.STAGE_MESSAGE_TYPE[Stage.ADVERTISE_KEYS] == protocol.SECAGG_ADVERTISE
    assert protocol.SECAGG_UNMASK == "train.secagg_unmask"
    with pytest.raises(ValueError, match="train or evaluate category"):
        secagg_message_type("query", Stage.SHARE_KEYS)
    assert len(MESSAGE_TYPES) == len(set(MESSAGE_TYPES)) == 3 + 2 * len(Stage)
    assert {protocol.NODE_INFO, protocol.FIT, protocol.EVALUATE} <= set(MESSAGE_TYPES)
    assert [w.category for w in Work] == ["train", "evaluate", "train", "train"]


# -------------------------------------------------------------------------- round config


def test_round_config_round_trips_work_seed_and_ranges() -> None:
    configs = [
        RoundConfig(server_round=0, work=Work.EVALUATE),
        RoundConfig(server_round=3, work=Work.FIT, seed=2**64 - 1),  # wrapped to int64
        RoundConfig(
            server_round=2,
            work=Work.MOMENTS,
            seed=9,
            range_low=(-1.0, 0.0),
            range_high=(1.0, 0.5),
        ),
    ]
    for cfg in configs:
        assert RoundConfig.from_record(cfg.to_record()) == cfg
    assert RoundConfig.from_record(ConfigRecord({"server_round": 1, "work": "ranges"})) == (
        RoundConfig(server_round=1, work=Work.RANGES)
    )


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"server_round": 1, "work": "fit", "clipping_norm": 1.0}, "unknown keys"),
        ({"work": "fit"}, "`round.server_round` must be an int"),
        ({"server_round": "1", "work": "fit"}, "`round.server_round` must be an int"),
        ({"server_round": -1, "work": "fit"}, "must be >= 0"),
        ({"server_round": 1, "work": "fit", "seed": "x"}, "`round.seed` must be an int"),
        ({"server_round": 1, "work": "train"}, "`round.work` must be one of"),
        ({"server_round": 1}, "`round.work` must be one of"),
        (
            {"server_round": 1, "work": "moments", "range_low": "0", "range_high": [1.0]},
            "must be a list of numbers",
        ),
        (
            {"server_round": 1, "work": "moments", "range_low": [0.0], "range_high": [1.0, 2.0]},
            "equal lengths",
        ),
        (
            {"server_round": 1, "work": "moments", "range_low": [1.0], "range_high": [1.0]},
            "low < high",
        ),
        (
            {"server_round": 1, "work": "moments", "range_low": [math.nan], "range_high": [1.0]},
            "finite with low < high",
        ),
    ],
)
def test_round_config_refuses_unknown_keys_wrong_types_and_bad_ranges(
    values: dict[str, object], expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        RoundConfig.from_record(ConfigRecord(values))  # type: ignore[arg-type]


def test_round_config_refuses_a_bool_round_when_built_directly() -> None:
    with pytest.raises(ValueError, match="must be an int"):
        RoundConfig(server_round=True)
    with pytest.raises(ValueError, match="equal lengths"):
        RoundConfig(server_round=1, range_low=(0.0,))


def test_secagg_sessions_are_unique_per_collection_and_increase_with_round_and_work() -> None:
    order = [(r, w) for r in range(4) for w in Work]
    sessions = [RoundConfig(server_round=r, work=w).secagg_round for r, w in order]
    assert sessions == sorted(sessions) and len(set(sessions)) == len(sessions)
    # A round's evaluation comes after its fit; the next round's fit after both.
    fit1 = RoundConfig(server_round=1, work=Work.FIT).secagg_round
    eval1 = RoundConfig(server_round=1, work=Work.EVALUATE).secagg_round
    assert fit1 < eval1 < RoundConfig(server_round=2, work=Work.FIT).secagg_round


# ----------------------------------------------------------------------------- node info


def test_node_info_round_trips_and_has_no_example_count() -> None:
    key = bytes(range(32))
    infos = [
        NodeInfo(node_type="encoder", eligible=True, model_fingerprint="sha256:ab"),
        NodeInfo(node_type="sensing", eligible=False, reason="no data"),
        NodeInfo(node_type="encoder", eligible=True, identity_key=key.hex()),
    ]
    for info in infos:
        record = info.to_record()
        assert set(record) == {f.name for f in dataclasses.fields(NodeInfo)}
        # Words, flags and keys only: there is no number a count could hide in.
        assert all(isinstance(v, str | bool) for v in record.values())
        assert NodeInfo.from_record(record) == info
    assert infos[2].identity_public_key == key and infos[0].identity_public_key is None


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"node_type": "encoder", "eligible": True, "num_examples": 10}, "unknown keys"),
        ({"node_type": "encoder"}, "`eligible` a bool"),
        ({"node_type": "encoder", "eligible": 1}, "`eligible` a bool"),
        ({"node_type": 3, "eligible": True}, "must be a str"),
        ({"node_type": "encoder", "eligible": False, "reason": 2}, "must be strings"),
        ({"node_type": "encoder", "eligible": True, "identity_key": "AB" * 32}, "64 lowercase hex"),
        ({"node_type": "encoder", "eligible": True, "identity_key": "ab"}, "64 lowercase hex"),
    ],
)
def test_node_info_refuses_unknown_keys_and_wrong_types(
    values: dict[str, object], expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        NodeInfo.from_record(ConfigRecord(values))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- plain sums

SPECS = (MetricSpec(Metric.EXAMPLES, 1.0), MetricSpec(Metric.TRAIN_LOSS, 4.0))


def _summed(length: int = 5, stats: int = 3) -> Summed:
    return Summed(
        update=np.linspace(-1.0, 1.0, length),
        metrics={Metric.EXAMPLES: 12.0, Metric.TRAIN_LOSS: 20.5},
        statistics=np.arange(stats, dtype=np.float64) / 7.0,
    )


def test_summed_round_trips_through_content() -> None:
    summed = _summed()
    content = RecordDict()
    summed_to_content(summed, content)
    assert list(content.array_records[protocol.UPDATE]) == [protocol.UPDATE_ARRAY]
    back = summed_from_content(content, update_length=5, metrics=SPECS, statistics_length=3)
    np.testing.assert_array_equal(back.update, summed.update.astype(np.float32))
    np.testing.assert_array_equal(back.statistics, summed.statistics)  # float64 on the wire
    assert back.metrics == summed.metrics

    metrics_only = Summed(np.zeros(0), {Metric.EXAMPLES: 3.0, Metric.TRAIN_LOSS: 0.0}, np.zeros(0))
    content = RecordDict()
    summed_to_content(metrics_only, content)
    assert set(content) == {protocol.METRICS}
    back = summed_from_content(content, update_length=0, metrics=SPECS, statistics_length=0)
    assert (
        back.update.size == 0
        and back.statistics.size == 0
        and back.metrics
        == {
            Metric.EXAMPLES: 3.0,
            Metric.TRAIN_LOSS: 0.0,
        }
    )


def _reply(**replace: object) -> RecordDict:
    content = RecordDict()
    summed_to_content(_summed(), content)
    for name, record in replace.items():
        if record is None:
            del content[name]
        else:
            content[name] = record  # type: ignore[assignment]
    return content


def _arrays(name: str, array: np.ndarray) -> ArrayRecord:
    return ArrayRecord({name: Array(array)})


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (_reply(update=_arrays(protocol.UPDATE_ARRAY, np.zeros(4, np.float32))), r"shape \(5,\)"),
        (_reply(update=_arrays(protocol.UPDATE_ARRAY, np.zeros(5, np.float64))), "must be float32"),
        (
            _reply(update=_arrays(protocol.UPDATE_ARRAY, np.full(5, np.nan, np.float32))),
            "NaN or infinity",
        ),
        (
            _reply(update=_arrays("weights", np.zeros(5, np.float32))),
            "must carry `update` with one array",
        ),
        (_reply(update=None), "must carry `update`"),
        (
            _reply(statistics=_arrays(protocol.STATISTICS_ARRAY, np.zeros(3, np.float32))),
            "must be float64",
        ),
        (
            _reply(statistics=_arrays(protocol.STATISTICS_ARRAY, np.array([0, np.inf, 0]))),
            "NaN or infinity",
        ),
        (_reply(metrics=None), "no `metrics` record"),
        (
            _reply(metrics=MetricRecord({"examples": 1.0, "train_loss": 1.0, "eval_loss": 2.0})),
            "must hold exactly",
        ),
        (_reply(metrics=MetricRecord({"examples": 1.0})), "must hold exactly"),
        (
            _reply(metrics=MetricRecord({"examples": math.nan, "train_loss": 1.0})),
            "finite and >= 0",
        ),
        (_reply(metrics=MetricRecord({"examples": -1.0, "train_loss": 1.0})), "finite and >= 0"),
        (_reply(metrics=MetricRecord({"examples": [1.0], "train_loss": 1.0})), "must be a number"),
    ],
)
def test_summed_from_content_refuses_wrong_length_dtype_nan_and_metric_sets(
    content: RecordDict, expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        summed_from_content(content, update_length=5, metrics=SPECS, statistics_length=3)


def test_summed_from_content_refuses_metric_sums_above_their_bound_for_the_count() -> None:
    # 12 examples of loss at most 4 each: at most 48 (a node's one row of means: at most 4).
    at_bound = _reply(metrics=MetricRecord({"examples": 12.0, "train_loss": 48.0}))
    assert summed_from_content(
        at_bound, update_length=5, metrics=SPECS, statistics_length=3
    ).metrics == {Metric.EXAMPLES: 12.0, Metric.TRAIN_LOSS: 48.0}
    for values, why in (
        ({"examples": 12.0, "train_loss": 48.1}, "is 48.1, above its bound 4 x 12 unit"),
        ({"examples": 1e-300, "train_loss": 1e300}, "is 1e+300, above its bound 4 x 1e-300"),
        ({"examples": 0.0, "train_loss": 1.0}, "is 1.0, above its bound 4 x 0 unit"),
    ):
        with pytest.raises(ValueError, match=re.escape(why)):
            summed_from_content(
                _reply(metrics=MetricRecord(values)),  # type: ignore[arg-type]
                update_length=5,
                metrics=SPECS,
                statistics_length=3,
            )
    node_means = (MetricSpec(Metric.CLIPPED, 1.0),)
    with pytest.raises(ValueError, match=re.escape("above its bound 1 x 1 unit")):
        summed_from_content(
            _reply(update=None, statistics=None, metrics=MetricRecord({"clipped": 2.0})),
            update_length=0,
            metrics=node_means,
            statistics_length=0,
        )


def test_summed_from_content_refuses_an_update_the_collection_does_not_expect() -> None:
    with pytest.raises(ValueError, match="expects no `update` record"):
        summed_from_content(_reply(), update_length=0, metrics=SPECS, statistics_length=3)


# -------------------------------------------------------------------------------- arrays


def test_weights_survive_records_in_model_order() -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(1.5, dtype=np.float32)]
    record = weights_to_record(["b", "a"], arrays)
    back = record_to_weights(record)
    assert list(record.keys()) == ["b", "a"]
    assert back[1].shape == ()  # 0-d arrays stay 0-d
    assert all(np.array_equal(x, y) for x, y in zip(arrays, back, strict=True))
    with pytest.raises(ValueError, match="must be float32"):
        record_to_weights(weights_to_record(["x"], [np.zeros(2, dtype=np.float64)]))
    with pytest.raises(ValueError, match="2 names for 1 arrays"):
        weights_to_record(["x", "y"], arrays[:1])


def test_flatten_and_unflatten_are_inverse_and_refuse_a_wrong_length() -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(1.5, dtype=np.float32)]
    flat = flatten(arrays)
    assert flat.dtype == np.float32 and flat.shape == (7,)
    back = unflatten(flat, [(2, 3), ()])
    assert all(np.array_equal(x, y) for x, y in zip(arrays, back, strict=True))
    assert flatten([]).shape == (0,)
    with pytest.raises(ValueError, match="does not fit shapes totalling 7"):
        unflatten(np.zeros(6), [(2, 3), ()])


@pytest.mark.parametrize(
    "array",
    [
        np.arange(7, dtype=np.float32),
        np.random.default_rng(0).normal(size=(3, 4)),  # float64
        np.ones((), dtype=np.float64),
        np.zeros(0, dtype=np.float32),
        np.zeros((2, 0, 3), dtype=np.float32),
        np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        np.arange(4, dtype=np.int64),
        np.arange(4, dtype=">f4"),
    ],
    ids=["f32", "f64-2d", "f64-0d", "empty", "empty-3d", "fortran", "int64", "big-endian"],
)
def test_read_array_gives_what_flower_reads_writable(array: np.ndarray) -> None:
    record = Array(np.asarray(array))
    fast, flower = protocol.read_array(record), record.numpy()
    assert fast.dtype == flower.dtype and fast.shape == flower.shape
    assert np.array_equal(fast, flower)
    assert fast.flags.writeable and fast.flags.c_contiguous == flower.flags.c_contiguous


def test_read_array_leaves_a_header_that_disagrees_or_a_short_body_to_numpy() -> None:
    good = Array(np.arange(6, dtype=np.float32))
    # The Array claims (2, 3) but its bytes say (6,): numpy's reader decides, as before.
    claimed = Array(dtype="float32", shape=(2, 3), stype=good.stype, data=good.data)
    assert protocol.read_array(claimed).shape == (6,)
    short = Array(dtype="float32", shape=(6,), stype=good.stype, data=good.data[:-4])
    with pytest.raises(ValueError, match="expected 24 bytes"):
        protocol.read_array(short)
    pickled = Array(dtype="float32", shape=(6,), stype=good.stype, data=b"\x80\x04junk")
    with pytest.raises(ValueError):
        protocol.read_array(pickled)
