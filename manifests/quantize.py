"""Post-training quantization of an artifact's weights, and a deterministic safetensors writer.

int8 (:func:`quantize_int8`): symmetric, zero point 0, round to nearest, range [-127, 127]
(-128 is never used, so the range is symmetric and negation is exact)::

    scale = max|x| / 127          q = clip(round(x / scale), -127, 127)          x' = q * scale

A floating tensor with ``ndim >= 2`` (linear and convolution weights, embeddings) becomes
``<name>`` (I8) plus ``<name>.__scale__`` (F32): one scale per output channel (along axis 0,
shape ``(out,)``) by default, or one per tensor (shape ``()``) with ``per_channel=False``. Other
floating tensors (biases, norm weights, 0-d values: small and accuracy-critical) stay float, as
F32. Integer and bool buffers pass through unchanged. Every element then satisfies
``|x - x'| <= scale / 2`` (up to float32 rounding of the product). A channel that is all zeros
gets scale 1.0 (its values quantize to 0 exactly); a scale never underflows to 0 (it is at
least the smallest normal float32), so it is never 0, infinite or NaN. The result follows the
bundle's ``int8`` precision rule (:func:`manifests.bundle.check_precision`): at least one I8
tensor, the rest I8/F32 or integer buffers.

fp16 (:func:`cast_fp16`): floating tensors become F16; a value beyond the float16 range is an
error rather than a silent infinity. The result follows the ``fp16`` precision rule.

:func:`write_safetensors` writes the safetensors format itself (8-byte little-endian header
length, compact JSON header with sorted keys padded with spaces to a multiple of 8, tensors in
name order), so the same tensors always give the same bytes, whatever the safetensors version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Final, TypeAlias

import numpy as np
from numpy.typing import NDArray

from manifests.atomic import write_atomically

__all__ = [
    "SCALE_SUFFIX",
    "cast_fp16",
    "dequantize_int8",
    "quantize_int8",
    "safetensors_bytes",
    "write_safetensors",
]

AnyArray: TypeAlias = NDArray[np.generic]

SCALE_SUFFIX: Final = ".__scale__"
QMAX: Final = 127
_FLOAT16_MAX: Final = float(np.finfo(np.float16).max)
_MIN_SCALE: Final = float(np.finfo(np.float32).tiny)

_SAFETENSORS_DTYPES: Final[Mapping[np.dtype[np.generic], str]] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.int16): "I16",
    np.dtype(np.uint16): "U16",
    np.dtype(np.float16): "F16",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint32): "U32",
    np.dtype(np.float32): "F32",
    np.dtype(np.int64): "I64",
    np.dtype(np.uint64): "U64",
    np.dtype(np.float64): "F64",
}


def _check_tensors(tensors: Mapping[str, AnyArray]) -> None:
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"`tensors` must map names to numpy arrays. Found {type(tensors).__name__}."
        )
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"tensor names must be non-empty strings. Found {name!r}.")
        if not isinstance(value, np.ndarray):
            raise TypeError(f"tensor {name!r} must be a numpy array. Found {type(value).__name__}.")


def _is_float(array: AnyArray) -> bool:
    return bool(np.issubdtype(array.dtype, np.floating))


def _scales(array: NDArray[np.float64], per_channel: bool) -> NDArray[np.float32]:
    if per_channel:
        amax = np.max(np.abs(array).reshape(array.shape[0], -1), axis=1, initial=0.0)
    else:
        amax = np.asarray(np.max(np.abs(array), initial=0.0))
    scale = np.where(amax > 0, np.maximum(amax / QMAX, _MIN_SCALE), 1.0)
    return np.asarray(scale, dtype=np.float32)


def _broadcastable(scale: NDArray[np.float32], ndim: int) -> NDArray[np.float32]:
    if scale.ndim == 0:
        return scale
    return scale.reshape(scale.shape + (1,) * (ndim - 1))


def quantize_int8(
    tensors: Mapping[str, AnyArray], *, per_channel: bool = True
) -> dict[str, AnyArray]:
    """Symmetric int8 quantization of the floating tensors with ``ndim >= 2`` (see module doc).

    Returns new arrays, names in sorted order; floating tensors left unquantized (F16, F64
    included) become F32. Raises ``ValueError`` when a tensor to quantize holds NaN or
    infinity, when a name already ends in ``.__scale__``, or when there is nothing to quantize
    (the int8 rule needs at least one I8 tensor).
    """
    _check_tensors(tensors)
    out: dict[str, AnyArray] = {}
    quantized = 0
    for name in sorted(tensors):
        if name.endswith(SCALE_SUFFIX):
            raise ValueError(
                f"tensor name {name!r} ends in {SCALE_SUFFIX!r}, which int8 quantization "
                "reserves for scales; rename the tensor."
            )
        array = tensors[name]
        if not _is_float(array):
            if array.dtype.kind not in "biu":
                raise TypeError(f"tensor {name!r} has unsupported dtype {array.dtype}.")
            out[name] = np.array(array, copy=True)
            continue
        if array.ndim < 2 or array.size == 0:
            out[name] = np.array(array, dtype=np.float32, copy=True)
            continue
        values = array.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(
                f"tensor {name!r} contains NaN or infinity; it cannot be quantized. Check the "
                "model for divergence before building the artifact."
            )
        scale = _scales(values, per_channel)
        q = np.clip(np.rint(values / _broadcastable(scale, values.ndim)), -QMAX, QMAX)
        out[name] = q.astype(np.int8)
        out[name + SCALE_SUFFIX] = scale
        quantized += 1
    if quantized == 0:
        raise ValueError(
            "int8 quantization found no floating tensor with ndim >= 2 to quantize, so the "
            "result could not meet the int8 precision rule (at least one I8 tensor). Use "
            "precision fp32 or fp16 for this model."
        )
    return dict(sorted(out.items()))


def dequantize_int8(tensors: Mapping[str, AnyArray]) -> dict[str, AnyArray]:
    """The inverse of :func:`quantize_int8`: every ``<name>`` with a ``<name>.__scale__``
    becomes float32 ``q * scale``; the scales disappear; other tensors are copied unchanged.

    ``ValueError`` for a scale without its I8 tensor, or a scale whose shape is neither ``()``
    nor ``(out,)`` for an I8 tensor of shape ``(out, ...)``.
    """
    _check_tensors(tensors)
    out: dict[str, AnyArray] = {}
    for name in sorted(tensors):
        array = tensors[name]
        if name.endswith(SCALE_SUFFIX):
            base = name.removesuffix(SCALE_SUFFIX)
            if base not in tensors or tensors[base].dtype != np.int8:
                raise ValueError(f"scale {name!r} has no int8 tensor {base!r} to go with it.")
            continue
        scale_name = name + SCALE_SUFFIX
        if scale_name not in tensors:
            out[name] = np.array(array, copy=True)
            continue
        if array.dtype != np.int8:
            raise ValueError(f"tensor {name!r} has a scale but is {array.dtype}, not int8.")
        scale = np.asarray(tensors[scale_name], dtype=np.float32)
        if not (scale.ndim == 0 or (array.ndim >= 1 and scale.shape == (array.shape[0],))):
            raise ValueError(
                f"scale {scale_name!r} has shape {scale.shape}; expected () or "
                f"({array.shape[0] if array.ndim else '?'},) for tensor shape {array.shape}."
            )
        if not (np.all(np.isfinite(scale)) and np.all(scale > 0)):
            raise ValueError(f"scale {scale_name!r} must be finite and positive.")
        out[name] = (array.astype(np.float32) * _broadcastable(scale, array.ndim)).astype(
            np.float32
        )
    return out


def cast_fp16(tensors: Mapping[str, AnyArray]) -> dict[str, AnyArray]:
    """Floating tensors as float16 (new arrays); integer/bool buffers copied unchanged.

    ``ValueError`` when a value is NaN/infinite or outside float16's range (+-65504) -- the
    cast would turn it into infinity -- and for int8/uint8 tensors, which the fp16 precision
    rule does not allow.
    """
    _check_tensors(tensors)
    out: dict[str, AnyArray] = {}
    for name in sorted(tensors):
        array = tensors[name]
        if array.dtype in (np.int8, np.uint8):
            raise ValueError(
                f"tensor {name!r} is {array.dtype}; precision fp16 allows no int8/uint8 "
                "tensors (dequantize first, or use precision int8)."
            )
        if not _is_float(array):
            out[name] = np.array(array, copy=True)
            continue
        if not np.all(np.isfinite(array)):
            raise ValueError(f"tensor {name!r} contains NaN or infinity.")
        if array.size and float(np.max(np.abs(array))) > _FLOAT16_MAX:
            raise ValueError(
                f"tensor {name!r} has values beyond float16's range (+-{_FLOAT16_MAX:g}); "
                "use precision fp32 or int8 for this model."
            )
        out[name] = array.astype(np.float16)
    return out


def safetensors_bytes(
    tensors: Mapping[str, AnyArray], *, metadata: Mapping[str, str] | None = None
) -> bytes:
    """The safetensors serialisation of ``tensors``: same tensors, same bytes (see module doc)."""
    _check_tensors(tensors)
    if not tensors:
        raise ValueError("a safetensors file needs at least one tensor.")
    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError("safetensors metadata must map strings to strings.")
        header["__metadata__"] = dict(sorted(metadata.items()))
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved in safetensors; rename the tensor.")
        array = tensors[name]
        dtype = np.dtype(array.dtype).newbyteorder("=")
        if dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {array.dtype}, which safetensors lacks.")
        data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + b"".join(chunks)


def write_safetensors(
    tensors: Mapping[str, AnyArray],
    path: Path,
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` to ``path`` deterministically and atomically (temp file, fsync,
    ``os.replace``): a crash leaves either the old file or the new one, never half of one."""
    return write_atomically(Path(path), safetensors_bytes(tensors, metadata=metadata))
