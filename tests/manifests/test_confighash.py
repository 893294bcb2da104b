"""training_config_hash: RFC 8785 known answers, and why sort_keys JSON is not enough."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from manifests.confighash import (
    JsonValue,
    canonical_json,
    is_config_hash,
    training_config_hash,
)

VECTORS = Path(__file__).parent / "vectors"


def _number_vectors() -> list[tuple[str, str | None]]:
    data = json.loads((VECTORS / "rfc8785_numbers.json").read_text(encoding="utf-8"))
    return [(hex_bits, expected) for hex_bits, expected in data["vectors"]]


@pytest.mark.parametrize(("hex_bits", "expected"), _number_vectors())
def test_canonical_json_serializes_rfc8785_appendix_b_numbers(
    hex_bits: str, expected: str | None
) -> None:
    value = struct.unpack(">d", bytes.fromhex(hex_bits))[0]
    if expected is None:
        with pytest.raises(ValueError, match="NaN or infinite"):
            canonical_json(value)
    else:
        assert canonical_json(value) == expected.encode("ascii")


def test_canonical_json_sorts_keys_by_utf16_code_units_as_in_rfc8785_3_2_3() -> None:
    value = json.loads((VECTORS / "rfc8785_sorting_input.json").read_text(encoding="utf-8"))
    assert canonical_json(value) == (VECTORS / "rfc8785_sorting_output.json").read_bytes()


def test_canonical_json_matches_rfc8785_3_2_2_example() -> None:
    value = json.loads((VECTORS / "rfc8785_example_input.json").read_text(encoding="utf-8"))
    assert canonical_json(value) == (VECTORS / "rfc8785_example_output.json").read_bytes()


def test_sort_keys_json_dumps_orders_emoji_after_hebrew_unlike_rfc8785() -> None:
    value = json.loads((VECTORS / "rfc8785_sorting_input.json").read_text(encoding="utf-8"))
    naive = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert naive.index("Hebrew") < naive.index("Emoji")  # code-point order
    canonical = canonical_json(value).decode("utf-8")
    assert canonical.index("Emoji") < canonical.index("Hebrew")  # UTF-16 order


@pytest.mark.parametrize(
    ("config", "canonical", "naive"),
    [
        ({"learning_rate": 2e-5}, b'{"learning_rate":0.00002}', b'{"learning_rate":2e-05}'),
        ({"x": 1e21}, b'{"x":1e+21}', b'{"x":1e+21}'),
        ({"x": 1e20}, b'{"x":100000000000000000000}', b'{"x":1e+20}'),
        ({"weight_decay": 0.0}, b'{"weight_decay":0}', b'{"weight_decay":0.0}'),
        ({"x": 1e-7}, b'{"x":1e-7}', b'{"x":1e-07}'),
    ],
)
def test_config_hash_differs_from_sort_keys_dumps_hash_exactly_when_bytes_differ(
    config: dict[str, float], canonical: bytes, naive: bytes
) -> None:
    assert canonical_json(config) == canonical
    assert json.dumps(config, sort_keys=True, separators=(",", ":")).encode() == naive
    naive_hash = "sha256:" + hashlib.sha256(naive).hexdigest()
    assert (training_config_hash(config) == naive_hash) == (naive == canonical)
    assert training_config_hash(config) == "sha256:" + hashlib.sha256(canonical).hexdigest()


def test_sort_keys_dumps_and_canonical_json_disagree_on_spec_learning_rate() -> None:
    config = {"learning_rate": 2e-5, "epochs": 3}
    naive = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    assert naive == b'{"epochs":3,"learning_rate":2e-05}'
    assert canonical_json(config) == b'{"epochs":3,"learning_rate":0.00002}'
    assert training_config_hash(config) != "sha256:" + hashlib.sha256(naive).hexdigest()


def test_training_config_hash_ignores_key_order_and_float_spelling() -> None:
    a: dict[str, JsonValue] = {"batch_size": 256, "learning_rate": 0.001, "optimizer": "adamw"}
    b: dict[str, JsonValue] = {"optimizer": "adamw", "learning_rate": 1e-3, "batch_size": 256}
    assert training_config_hash(a) == training_config_hash(b)


def test_training_config_hash_changes_when_a_value_changes() -> None:
    base = {"batch_size": 256, "epochs": 10}
    assert training_config_hash(base) != training_config_hash({**base, "epochs": 11})


def test_training_config_hash_has_sha256_prefix_and_64_hex_digits() -> None:
    digest = training_config_hash({"epochs": 1})
    assert is_config_hash(digest)
    assert digest == "sha256:" + hashlib.sha256(b'{"epochs":1}').hexdigest()


@pytest.mark.parametrize(
    "value",
    ["sha256:" + "0" * 63, "sha256:" + "A" * 64, "md5:" + "0" * 64, "0" * 64, "sha256:" + "g" * 64],
)
def test_is_config_hash_rejects_malformed_digests(value: str) -> None:
    assert not is_config_hash(value)


def test_training_config_hash_rejects_nan_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="NaN or infinite"):
        training_config_hash({"learning_rate": float("nan")})


def test_training_config_hash_rejects_integers_beyond_2_pow_53() -> None:
    with pytest.raises(ValueError, match="2\\*\\*53"):
        training_config_hash({"batch_size": 2**60})
