"""Post-training quantization (int8, fp16) and the deterministic safetensors writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray
from safetensors.numpy import load_file

from manifests.bundle import PrecisionMismatchError, check_precision, read_weights_header
from manifests.quantize import (
    SCALE_SUFFIX,
    cast_fp16,
    dequantize_int8,
    quantize_int8,
    safetensors_bytes,
    write_safetensors,
)

AnyArray = NDArray[np.generic]


def _model(seed: int = 0) -> dict[str, AnyArray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.weight": rng.standard_normal((8, 16)).astype(np.float32),
        "encoder.bias": rng.standard_normal(8).astype(np.float32),
        "conv.weight": (3.0 * rng.standard_normal((4, 3, 3, 3))).astype(np.float32),
        "norm.weight": np.ones(16, dtype=np.float32),
        "position_ids": np.arange(10, dtype=np.int64),
        "temperature": np.asarray(0.5, dtype=np.float32),
    }


def f64(array: AnyArray) -> NDArray[np.float64]:
    return np.asarray(array, dtype=np.float64)


def _scale_per_element(scale: AnyArray, shape: tuple[int, ...]) -> NDArray[np.float64]:
    s = np.asarray(scale, dtype=np.float64)
    if s.ndim:
        s = s.reshape(s.shape + (1,) * (len(shape) - 1))
    return np.broadcast_to(s, shape)


@pytest.mark.parametrize("per_channel", [True, False])
def test_round_trip_error_is_at_most_half_a_scale_per_element(per_channel: bool) -> None:
    model = _model()
    quantized = quantize_int8(model, per_channel=per_channel)
    restored = dequantize_int8(quantized)
    assert set(restored) == set(model)
    for name in ("encoder.weight", "conv.weight"):
        original = model[name].astype(np.float64)
        scale = _scale_per_element(quantized[name + SCALE_SUFFIX], original.shape)
        error = np.abs(restored[name].astype(np.float64) - original)
        assert restored[name].dtype == np.float32
        assert np.all(error <= scale / 2 * (1 + 1e-6) + 1e-12)
        # the largest value of each channel is represented (scale = max / 127)
        assert np.max(np.abs(quantized[name].astype(np.int16))) == 127


def test_weights_with_ndim_two_or_more_become_int8_with_float32_scales() -> None:
    quantized = quantize_int8(_model())
    assert quantized["encoder.weight"].dtype == np.int8
    assert quantized["encoder.weight" + SCALE_SUFFIX].dtype == np.float32
    assert quantized["encoder.weight" + SCALE_SUFFIX].shape == (8,)
    assert quantized["conv.weight" + SCALE_SUFFIX].shape == (4,)
    assert quantize_int8(_model(), per_channel=False)["conv.weight" + SCALE_SUFFIX].shape == ()


def test_biases_norms_scalars_and_buffers_are_left_unquantized() -> None:
    model = _model()
    quantized = quantize_int8(model)
    for name in ("encoder.bias", "norm.weight", "temperature"):
        assert quantized[name].dtype == np.float32
        np.testing.assert_array_equal(quantized[name], model[name])
        assert name + SCALE_SUFFIX not in quantized
    np.testing.assert_array_equal(quantized["position_ids"], model["position_ids"])
    assert quantized["position_ids"].dtype == np.int64


def test_per_channel_scales_follow_each_output_channel() -> None:
    weight = np.array([[1.0, -127.0], [0.5, 0.25]], dtype=np.float32)
    quantized = quantize_int8({"w": weight})
    np.testing.assert_allclose(f64(quantized["w" + SCALE_SUFFIX]), np.array([1.0, 0.5 / 127]))
    np.testing.assert_array_equal(quantized["w"], [[1, -127], [127, 64]])


def test_all_zero_tensor_gets_a_finite_positive_scale_and_round_trips_exactly() -> None:
    for per_channel in (True, False):
        quantized = quantize_int8(
            {"w": np.zeros((3, 4), dtype=np.float32)}, per_channel=per_channel
        )
        scale = f64(quantized["w" + SCALE_SUFFIX])
        assert np.all(np.isfinite(scale))
        assert np.all(scale > 0)
        np.testing.assert_array_equal(quantized["w"], np.zeros((3, 4), dtype=np.int8))
        np.testing.assert_array_equal(dequantize_int8(quantized)["w"], np.zeros((3, 4)))


def test_tiny_values_never_give_a_zero_scale() -> None:
    weight = np.full((2, 2), 1e-44, dtype=np.float32)  # subnormal: max / 127 underflows
    quantized = quantize_int8({"w": weight})
    assert np.all(f64(quantized["w" + SCALE_SUFFIX]) > 0)
    assert np.all(np.abs(f64(dequantize_int8(quantized)["w"]) - weight) <= 1e-38)


def test_quantize_leaves_its_input_unchanged() -> None:
    model = _model()
    saved = {k: v.copy() for k, v in model.items()}
    quantize_int8(model)
    for name, value in saved.items():
        np.testing.assert_array_equal(model[name], value)


def test_quantize_rejects_non_finite_weights() -> None:
    with pytest.raises(ValueError, match="'w' contains NaN or infinity"):
        quantize_int8({"w": np.array([[1.0, np.inf]], dtype=np.float32)})


def test_quantize_rejects_a_model_with_nothing_to_quantize() -> None:
    with pytest.raises(ValueError, match="at least one I8 tensor"):
        quantize_int8({"bias": np.zeros(3, dtype=np.float32)})


def test_quantize_rejects_names_that_collide_with_scales() -> None:
    with pytest.raises(ValueError, match="reserves for scales"):
        quantize_int8({"w" + SCALE_SUFFIX: np.zeros((2, 2), dtype=np.float32)})


def test_dequantize_rejects_an_orphan_scale_and_a_misshaped_scale() -> None:
    with pytest.raises(ValueError, match="no int8 tensor 'w'"):
        dequantize_int8({"w" + SCALE_SUFFIX: np.ones(2, dtype=np.float32)})
    with pytest.raises(ValueError, match=r"expected \(\) or \(2,\)"):
        dequantize_int8(
            {"w": np.zeros((2, 3), dtype=np.int8), "w" + SCALE_SUFFIX: np.ones(3, dtype=np.float32)}
        )


def test_int8_file_passes_the_bundle_int8_precision_rule(tmp_path: Path) -> None:
    path = write_safetensors(quantize_int8(_model()), tmp_path / "model.safetensors")
    header = read_weights_header(path)
    check_precision(header, "int8")
    assert header["encoder.weight"].dtype == "I8"
    assert header["encoder.weight" + SCALE_SUFFIX].dtype == "F32"
    with pytest.raises(PrecisionMismatchError):
        check_precision(header, "fp32")


def test_fp16_file_passes_the_bundle_fp16_precision_rule(tmp_path: Path) -> None:
    model = _model()
    path = write_safetensors(cast_fp16(model), tmp_path / "model.safetensors")
    header = read_weights_header(path)
    check_precision(header, "fp16")
    loaded = load_file(str(path))
    assert loaded["encoder.weight"].dtype == np.float16
    np.testing.assert_allclose(
        f64(loaded["encoder.weight"]), f64(model["encoder.weight"]), rtol=1e-3
    )
    np.testing.assert_array_equal(loaded["position_ids"], model["position_ids"])


def test_cast_fp16_refuses_values_beyond_the_float16_range() -> None:
    with pytest.raises(ValueError, match="beyond float16's range"):
        cast_fp16({"w": np.array([1e6], dtype=np.float32)})


def test_cast_fp16_refuses_int8_tensors() -> None:
    with pytest.raises(ValueError, match="fp16 allows no int8"):
        cast_fp16(quantize_int8(_model()))


def test_written_file_is_byte_identical_whatever_the_insertion_order(tmp_path: Path) -> None:
    model = _model()
    reversed_model = dict(reversed(list(model.items())))
    first = write_safetensors(model, tmp_path / "a.safetensors")
    second = write_safetensors(reversed_model, tmp_path / "b.safetensors")
    assert first.read_bytes() == second.read_bytes()
    assert safetensors_bytes(model) == first.read_bytes()


def test_written_file_reads_back_with_the_safetensors_library(tmp_path: Path) -> None:
    model = _model()
    path = write_safetensors(model, tmp_path / "m.safetensors", metadata={"format": "np"})
    loaded = load_file(str(path))
    assert set(loaded) == set(model)
    for name, value in model.items():
        assert loaded[name].dtype == value.dtype
        np.testing.assert_array_equal(loaded[name], value)
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_length % 8 == 0


def test_write_replaces_an_existing_file_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")
    write_safetensors({"x": np.zeros(2, dtype=np.float32)}, path)
    assert load_file(str(path))["x"].shape == (2,)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_write_refuses_an_empty_mapping_and_the_reserved_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one tensor"):
        write_safetensors({}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="reserved"):
        write_safetensors({"__metadata__": np.zeros(1)}, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
