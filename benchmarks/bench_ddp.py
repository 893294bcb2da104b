"""Distributed DP (node-side Skellam / discrete Gaussian noise) against plain quantization.

Run from the repository root::

    .venv/bin/python benchmarks/bench_ddp.py            # P = 1e5 and 1e6
    .venv/bin/python benchmarks/bench_ddp.py --quick    # P = 1e5 only, one repeat

What is measured (best of ``--repeats`` runs, after one warm-up run, in one process):

(a) **Per node** at P values: plain stochastic quantization into Z_(2^32)
    (``aggregation.secagg.quantization.quantize``, what a SecAgg+ client does today) against
    the distributed-DP encoding of the same clipped vector (pad, randomized Hadamard rotation,
    scaling, conditional randomized rounding: ``encode``), one noise share (``noise_share``,
    Skellam and discrete Gaussian) and the whole node step (``encode_and_noise``).
    **Server decoding** of the unmasked sum: ``dequantize_sum`` against ``decode_sum`` (centred
    lift, inverse rotation). Geometry: N = 100 nodes, min_survivors = 80, C = 1, z = 1.
(b) **Bits per coordinate** for a few (n, z, C) at P = 1e6 (min_survivors = 0.8 n):
    the wire cost (32-bit SecAgg+ words over the padded length), the bits the worst-case sum
    occupies with its headroom at 32 bits, and the fewest modulus bits b for which rounding
    costs under 1% of the noise multiplier (``effective_noise_multiplier >= 0.99 z``).
    Geometry only; nothing is timed.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregation.ddp import (
    DdpConfig,
    DistributedMechanism,
    clip_l2,
    decode_sum,
    encode,
    encode_and_noise,
    noise_share,
)
from aggregation.secagg import SecAggParams, dequantize_sum, quantize

NODES = 100
SURVIVORS = 80
ROTATION_SEED = b"benchmark/rotation-seed"


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ddp_config(mechanism: DistributedMechanism, size: int, **overrides: float) -> DdpConfig:
    return DdpConfig(
        mechanism=mechanism,
        dim=size,
        l2_clip=float(overrides.get("l2_clip", 1.0)),
        noise_multiplier=float(overrides.get("noise_multiplier", 1.0)),
        min_survivors=int(overrides.get("min_survivors", SURVIVORS)),
        max_summands=int(overrides.get("max_summands", NODES)),
        modulus_bits=int(overrides.get("modulus_bits", 32)),
    )


def time_row(size: int, repeats: int, rng: np.random.Generator) -> list[float]:
    """Seconds for each column of table (a) at P = ``size``."""
    update = clip_l2(rng.normal(size=size), l2_clip=1.0)
    update32 = update.astype(np.float32)
    params = SecAggParams(
        num_clients=NODES, num_neighbours=14, threshold=8, vector_length=size, clipping_range=1.0
    )
    skellam = ddp_config(DistributedMechanism.SKELLAM, size)
    dgauss = ddp_config(DistributedMechanism.DGAUSS, size)
    total = encode_and_noise(update, skellam, rotation_seed=ROTATION_SEED, rng=rng)
    quantized = quantize(update32, params, rng)
    jobs: list[Callable[[], object]] = [
        lambda: quantize(update32, params, rng),
        lambda: encode(update, skellam, rotation_seed=ROTATION_SEED, rng=rng),
        lambda: noise_share(skellam, rng),
        lambda: noise_share(dgauss, rng),
        lambda: encode_and_noise(update, skellam, rotation_seed=ROTATION_SEED, rng=rng),
        lambda: encode_and_noise(update, dgauss, rotation_seed=ROTATION_SEED, rng=rng),
        lambda: dequantize_sum(quantized, num_summands=1, params=params),
        lambda: decode_sum(total, skellam, rotation_seed=ROTATION_SEED),
    ]
    return [best_of(job, repeats) for job in jobs]


def section_a(sizes: list[int], repeats: int) -> None:
    print("## (a) Per-node encoding and server decoding (best of runs, seconds)\n")
    print(
        "| P | padded | quantize (plain) | encode | Skellam share | DGauss share "
        "| encode+Skellam | encode+DGauss | dequantize_sum | decode_sum |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for size in sizes:
        cells = " | ".join(f"{seconds:.4f}" for seconds in time_row(size, repeats, rng))
        padded = 1 << (size - 1).bit_length()
        print(f"| {size:.0e} | {padded} | {cells} |")


def min_bits(mechanism: DistributedMechanism, size: int, **geometry: float) -> int | None:
    """The fewest modulus bits at which rounding costs < 1% of the noise multiplier."""
    for bits in range(2, 33):
        try:
            cfg = ddp_config(mechanism, size, modulus_bits=bits, **geometry)
        except ValueError:
            continue
        if cfg.effective_noise_multiplier >= 0.99 * cfg.noise_multiplier:
            return bits
    return None


def section_b(size: int) -> None:
    print(f"\n## (b) Bits per coordinate, P = {size:.0e} (min_survivors = 0.8 n)\n")
    print(
        "| mechanism | n | z | C | wire bits/coord | occupied bits (b=32) | gamma (b=32) "
        "| z_eff (b=32) | min b for z_eff >= 0.99 z | wire bits/coord at that b |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    settings = [
        (10, 1.0, 1.0),
        (100, 1.0, 1.0),
        (100, 0.5, 1.0),
        (1000, 1.0, 1.0),
        (100, 1.0, 0.01),
    ]
    for mechanism in DistributedMechanism:
        for n, z, c in settings:
            geometry = {
                "max_summands": n,
                "min_survivors": math.ceil(0.8 * n),
                "noise_multiplier": z,
                "l2_clip": c,
            }
            cfg = ddp_config(mechanism, size, **geometry)
            fewest = min_bits(mechanism, size, **geometry)
            wire_at_fewest = "-" if fewest is None else f"{fewest * cfg.padded_dim / size:.1f}"
            print(
                f"| {mechanism.value} | {n} | {z:g} | {c:g} | {cfg.bits_used_per_coordinate:.1f} "
                f"| {cfg.occupied_bits:.1f} | {cfg.gamma:.3g} "
                f"| {cfg.effective_noise_multiplier:.5f} | {fewest} | {wire_at_fewest} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="P = 1e5 only, one repeat")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    print(f"# Distributed DP benchmark ({'quick' if args.quick else 'full'})\n")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, numpy {np.__version__}\n"
    )
    section_a(sizes, repeats)
    section_b(1_000_000)


if __name__ == "__main__":
    main()
