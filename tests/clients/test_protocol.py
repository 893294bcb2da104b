"""The wire contract: records survive Flower's RecordDict with every SecAgg+ message intact."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

from aggregation.secagg import SecAggMessage, SecAggParams, message_from_record, run_secagg_round
from clients.protocol import (
    NodeInfo,
    RoundConfig,
    from_wire_int,
    record_to_weights,
    secagg_from_content,
    secagg_to_content,
    to_wire_int,
    weights_to_record,
)


def _through_flower(message: SecAggMessage) -> SecAggMessage:
    content = RecordDict()
    secagg_to_content(message.to_record(), content)
    # A real transport serializes the RecordDict; copy it through its protobuf-free deflate.
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


def test_wire_ints_round_trip_and_reject_out_of_range() -> None:
    for v in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        assert from_wire_int(to_wire_int(v)) == v
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        to_wire_int(2**64)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        to_wire_int(-1)


def test_round_config_and_node_info_round_trip_and_reject_bad_records() -> None:
    cfg = RoundConfig(server_round=3, seed=9, clipping_norm=1.5, dp_noise_multiplier=0.8)
    assert RoundConfig.from_record(cfg.to_record()) == cfg
    with pytest.raises(ValueError, match="lacks"):
        RoundConfig.from_record(ConfigRecord({"seed": 1}))
    with pytest.raises(ValueError, match="unknown keys"):
        RoundConfig.from_record(ConfigRecord({"seed": 1, "server_round": 1, "evil": 2}))
    with pytest.raises(ValueError, match="must be a number"):
        RoundConfig.from_record(ConfigRecord({"seed": "x", "server_round": 1}))
    info = NodeInfo(node_type="encoder", eligible=False, reason="no data")
    assert NodeInfo.from_record(info.to_record()) == info
    with pytest.raises(ValueError, match="lacks"):
        NodeInfo.from_record(ConfigRecord({"node_type": "encoder"}))


def test_missing_secagg_record_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no `secagg` ConfigRecord"):
        secagg_from_content(RecordDict())


def test_weights_and_uint32_arrays_survive_records() -> None:
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array(1.5, dtype=np.float32)]
    record = weights_to_record(["a", "b"], arrays)
    back = record_to_weights(record)
    assert list(record.keys()) == ["a", "b"]
    assert all(np.array_equal(x, y) for x, y in zip(arrays, back, strict=True))
    content = RecordDict()
    masked = np.array([0, 2**32 - 1, 7], dtype=np.uint32)
    secagg_record: dict[str, object] = {
        "stage": "masked_input",
        "masked_input": masked,
        "node_id": 2**64 - 1,
    }
    secagg_to_content(secagg_record, content)
    record_back = secagg_from_content(content)
    assert np.array_equal(record_back["masked_input"], masked)  # type: ignore[arg-type]
    assert record_back["node_id"] == 2**64 - 1
    with pytest.raises(ValueError, match="must be float32"):
        record_to_weights(weights_to_record(["x"], [np.zeros(2, dtype=np.float64)]))
