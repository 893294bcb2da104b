"""Weighted-averaging throughput against the memory-bandwidth ceiling of the same machine.

Run from the repository root::

    .venv/bin/python benchmarks/bench_averaging.py            # N in {10, 20}, P in {1e6, 1e7}
    .venv/bin/python benchmarks/bench_averaging.py --quick    # N=10, P=1e6, fewer repeats

What is compared (all timings are the best of ``--repeats`` runs, after one warm-up):

- **workload**: N clients, each sending an update of P float32 parameters split into a few
  tensors like a small model (4 large weight tensors + 4 bias tensors of 1000), weights =
  random example counts. Bytes of client parameters: ``B = N * P * 4``.
- **memcpy ceiling**: ``np.copyto(dst, client_tensor)`` for every tensor of every client into
  one destination per tensor, i.e. the same B bytes read (and B bytes written). Its throughput
  is ``B / t_copy``.
- **WeightedMean**: ``aggregation.robust.WeightedMean().aggregate`` with all its measurements
  (per-client norms, NaN/Inf screening). Throughput ``B / t_avg`` (bytes of client parameters
  read per second) and ``N * P / t_avg`` client-parameters per second. The column
  ``% of memcpy`` is ``(B / t_avg) / (B / t_copy) = t_copy / t_avg``. Averaging reads B and
  writes only P*4 bytes while memcpy reads B and writes B, so a bandwidth-bound average may
  exceed 100%; the target is >= 40%.
- **baselines** for context: a per-client loop with full-size temporaries
  (``acc += w * x`` in float64) and ``np.average(np.stack(...), weights=...)`` (the latter only
  where N * P <= 1e8, to bound memory).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregation.robust import DEFAULT_CHUNK_SIZE, WeightedMean
from aggregation.types import Update


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def tensor_sizes(p: int) -> list[int]:
    biases = [1000] * 4
    rest = p - sum(biases)
    big = [rest // 4] * 3 + [rest - 3 * (rest // 4)]
    return big + biases


def make_clients(n: int, p: int, rng: np.random.Generator) -> list[Update]:
    sizes = tensor_sizes(p)
    return [[rng.standard_normal(s, dtype=np.float32) for s in sizes] for _ in range(n)]


def best_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page faults, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def loop_average(updates: Sequence[Update], weights: Sequence[float]) -> Update:
    total = sum(weights)
    out: Update = []
    for t in range(len(updates[0])):
        acc = np.zeros(updates[0][t].shape, dtype=np.float64)
        for update, w in zip(updates, weights, strict=True):
            acc += w * update[t]
        out.append((acc / total).astype(np.float32))
    return out


def stack_average(updates: Sequence[Update], weights: Sequence[float]) -> Update:
    return [
        np.average(np.stack([u[t] for u in updates]), axis=0, weights=weights).astype(np.float32)
        for t in range(len(updates[0]))
    ]


def run_case(
    n: int, p: int, *, aggregator: WeightedMean, repeats: int, baselines: bool, seed: int
) -> str:
    """Time one (N, P) case and return its markdown table row."""
    rng = np.random.default_rng(seed)
    updates = make_clients(n, p, rng)
    weights = [float(w) for w in rng.integers(1, 1000, size=n)]
    n_bytes = n * p * 4
    dsts = [np.empty_like(a) for a in updates[0]]

    def memcpy() -> None:
        for update in updates:
            for dst, src in zip(dsts, update, strict=True):
                np.copyto(dst, src)

    t_copy = best_time(memcpy, repeats)
    t_avg = best_time(lambda: aggregator.aggregate(updates, weights), repeats)
    loop_col = stack_col = "-"
    if baselines:
        few = max(1, repeats // 2)
        t_loop = best_time(lambda: loop_average(updates, weights), few)
        loop_col = f"{n_bytes / t_loop / 1e9:.2f}"
        if n * p <= 100_000_000:
            t_stack = best_time(lambda: stack_average(updates, weights), few)
            stack_col = f"{n_bytes / t_stack / 1e9:.2f}"
    return (
        f"| {n} | {p:.0e} | {n_bytes / 1e6:.0f} | {n_bytes / t_copy / 1e9:.2f} "
        f"| {n_bytes / t_avg / 1e9:.2f} | {100 * t_copy / t_avg:.0f}% "
        f"| {n * p / t_avg:.3g} | {loop_col} | {stack_col} |"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Parse the options, run every (N, P) case, print the machine, command and table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="N=10, P=1e6, 3 repeats")
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--params", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--no-baselines", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.params, args.repeats = [10], [1e6], 3

    aggregator = WeightedMean(chunk_size=args.chunk_size)
    command = " ".join(["python benchmarks/bench_averaging.py", *sys.argv[1:]])
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores; numpy {np.__version__}; "
        f"python {platform.python_version()}"
    )
    print(f"command: `{command}`; best of {args.repeats}; chunk_size={args.chunk_size}\n")
    print(
        "| N | P | client MB | memcpy GB/s | WeightedMean GB/s | % of memcpy "
        "| client-params/s | loop f64 GB/s | np.average GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for p in args.params:
        for n in args.clients:
            row = run_case(
                n,
                int(p),
                aggregator=aggregator,
                repeats=args.repeats,
                baselines=not args.no_baselines,
                seed=0,
            )
            print(row, flush=True)


if __name__ == "__main__":
    main()
