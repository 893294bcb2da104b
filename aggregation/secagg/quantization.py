"""Stochastic quantization of float32 updates into Z_(2^32) for secure summation.

Headroom rule: with N = ``num_clients`` summands, each client maps [-c, c] onto the integers
[0, L] with L = floor((2^32 - 1) / N). The sum of at most N quantized vectors is then at most
N*L <= 2^32 - 1, so the sum mod 2^32 equals the true integer sum and decodes exactly:
``sum_x ~= S * step - n * c`` for the n contributing clients, step = 2c / L. Stochastic rounding
(Bonawitz et al., 2017; Suresh et al., ICML 2017) is unbiased; each value's error is below one
step, so the decoded sum is within n * step of the sum of the clipped floats.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Final

import numpy as np
from numpy.typing import NDArray

from aggregation.secagg.params import SecAggParams
from aggregation.secagg.primitives import CHUNK_VALUES, Keystream

_CHUNK: Final = CHUNK_VALUES


def quantize(
    update: NDArray[np.float32],
    params: SecAggParams,
    rng: np.random.Generator | None = None,
    *,
    on_chunk: Callable[[NDArray[np.uint32]], None] | None = None,
) -> NDArray[np.uint32]:
    """Clip ``update`` to [-c, c] and round it stochastically into [0, L] (a new uint32 array).

    Computes ``floor((x + c) * L / 2c + U)`` clamped to [0, L] (clamping after scaling is the
    same as clipping x first), with U uniform on [0, 1) from 32 random bits (at least 21 survive
    the float64 sum). The bits are the AES-256-CTR keystream of a 32-byte key from
    ``os.urandom`` (the default: the rounding is the node's secret, never the server's) or, for
    tests, drawn from ``rng``; twice as fast as numpy's generators. The rounding key never
    drives a mask. Works chunk by chunk in cache-sized float64 scratch
    buffers; ``on_chunk`` (optional) sees each finished output chunk while it is still in cache
    (the client masks it there). Raises TypeError for a non-float32 input, ValueError for a
    wrong shape or a NaN/Inf value.
    """
    check_update(update, params, finite=False)
    size = update.shape[0]
    out = np.empty(size, dtype=np.uint32)
    out_int32 = out.view(np.int32)  # L < 2^31 (N >= 2): int32 and uint32 bits agree, cast is faster
    levels = float(params.quantization_levels)
    scale = levels / (2.0 * float(params.clipping_range))
    offset = levels / 2.0 + 0.5  # c * scale, plus 1/2 to centre the signed noise on [0, 1)
    scaled = np.empty(_CHUNK, dtype=np.float64)
    noise = np.empty(_CHUNK, dtype=np.float64)
    raw_buffer = np.empty(_CHUNK, dtype=np.uint32)
    rounding = Keystream(os.urandom(32) if rng is None else rng.bytes(32))
    for start in range(0, size, _CHUNK):
        stop = min(size, start + _CHUNK)
        count = stop - start
        s = scaled[:count]
        u = noise[:count]
        raw = raw_buffer[:count]
        rounding.fill(raw)
        np.multiply(update[start:stop], scale, out=s, dtype=np.float64)
        if not math.isfinite(float(np.add.reduce(s))):  # NaN or +-Inf in this chunk
            raise _not_finite()
        np.multiply(raw.view(np.int32), 2.0**-32, out=u, dtype=np.float64)  # [-1/2, 1/2)
        np.add(s, u, out=s)
        np.add(s, offset, out=s)
        np.clip(s, 0.0, levels, out=s)
        out_int32[start:stop] = s  # truncation == floor, since s >= 0
        if on_chunk is not None:
            on_chunk(out[start:stop])
    return out


def dequantize_sum(
    total: NDArray[np.uint32], *, num_summands: int, params: SecAggParams
) -> NDArray[np.float64]:
    """Decode the sum of ``num_summands`` quantized vectors back to the sum of their floats."""
    if not 0 <= num_summands <= params.num_clients:
        raise ValueError(
            f"`num_summands` must be in [0, num_clients] = [0, {params.num_clients}]. "
            f"Found {num_summands}."
        )
    result = total.astype(np.float64)
    result *= params.quantization_step
    result -= num_summands * float(params.clipping_range)
    return result


def check_update(update: NDArray[np.float32], params: SecAggParams, *, finite: bool = True) -> None:
    """Refuse an update that is not a finite 1-D float32 vector of ``vector_length`` values.

    ``finite=False`` skips the NaN/Inf scan (``quantize`` does it chunk by chunk, in cache).
    """
    if not isinstance(update, np.ndarray) or update.dtype != np.float32:
        dtype = getattr(update, "dtype", type(update).__name__)
        raise TypeError(f"An update must be a float32 numpy array. Found {dtype}.")
    if update.ndim != 1 or update.shape[0] != params.vector_length:
        raise ValueError(
            f"An update must be a 1-D vector of `vector_length` = {params.vector_length} values."
            f" Found shape {update.shape}. Flatten the parameter tensors in a fixed order."
        )
    # min and max propagate NaN and reach +-Inf: two fast reductions, no temporary array
    if finite and not (math.isfinite(float(update.min())) and math.isfinite(float(update.max()))):
        raise _not_finite()


def _not_finite() -> ValueError:
    return ValueError(
        "The update contains NaN or Inf; the client refuses to quantize it. "
        "Fix the local training (diverged?) before masking."
    )
