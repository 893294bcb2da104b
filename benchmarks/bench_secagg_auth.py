"""Cost of the malicious-server hardening: authenticated SecAgg+ against the previous protocol.

Run from the repository root::

    .venv/bin/python benchmarks/bench_secagg_auth.py                    # N=20,P=1e6 and N=100,P=1e5
    .venv/bin/python benchmarks/bench_secagg_auth.py --sizes 20:1e5 --repeats 3   # a quick run

What is measured: one whole in-process round through ``run_secagg_round`` (every client's and
the server's work in every stage, messages through ``to_record``/``from_record``, no network),
float32 updates (quantize + mask), k = min(N-1, 2*ceil(log2 N)), t = k//2 + 1, no dropouts;
the median of ``--repeats`` rounds after one warm-up round, for three implementations:

- **baseline**: the package as it is at ``--baseline-ref`` (default ``main``), extracted with
  ``git show`` into a temporary directory and imported under another name -- today's protocol;
- **authenticated**: this tree with identities (Ed25519 signatures on keys, roster checks, the
  consistency-check stage, robust reconstruction, masked inputs kept until the stage closes),
  every signature bound to a session context the size of fedbrain's (a signed job's id);
- **authenticated, keep_masked_inputs=False**: the same without keeping each masked input until
  the stage closes (a client with garbage shares then aborts the round instead of being one
  dropout), to show what that robustness costs;
- **unauthenticated**: this tree without identities (the legacy mode), to separate the cost of
  signatures and the extra stage from the other changes.

The ratio authenticated / baseline is the overhead; the target is <= 1.10 at P = 1e6.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aggregation.secagg import NodeIdentity, SecAggParams, run_secagg_round  # noqa: E402

_BASELINE_NAME = "secagg_baseline"
CONTEXT = b"fedbrain/job/sha256:" + b"0" * 64  # clients.protocol.session_context's size


def load_baseline(ref: str, into: Path) -> ModuleType:
    """``aggregation/secagg`` at git ``ref``, importable as ``secagg_baseline``."""
    listing = subprocess.run(
        ["git", "ls-tree", "--name-only", f"{ref}:aggregation/secagg"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    package = into / _BASELINE_NAME
    package.mkdir()
    for name in listing:
        if not name.endswith(".py"):
            continue
        source = subprocess.run(
            ["git", "show", f"{ref}:aggregation/secagg/{name}"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        source = re.sub(r"\baggregation\.secagg\b", _BASELINE_NAME, source)
        (package / name).write_text(source)
    sys.path.insert(0, str(into))
    return importlib.import_module(_BASELINE_NAME)


def round_params(n: int, size: int) -> tuple[int, int]:
    k = min(n - 1, 2 * math.ceil(math.log2(n)))
    return k, k // 2 + 1


Times = dict[str, list[tuple[float, float]]]


def bench(n: int, size: int, repeats: int, baseline: ModuleType) -> Times:
    """(wall seconds, CPU seconds of this process) of each round, per variant."""
    k, t = round_params(n, size)
    update: NDArray[np.float32] = np.random.default_rng(0).normal(0, 0.3, size).astype(np.float32)
    update.setflags(write=False)  # shared by every client, read only
    people = [NodeIdentity.generate() for _ in range(n)]
    auth_inputs = {p.node_id: update for p in people}
    plain_inputs = {i: update for i in range(1, n + 1)}
    params = SecAggParams(
        num_clients=n, num_neighbours=k, threshold=t, vector_length=size, clipping_range=1.0
    )
    old_params = baseline.SecAggParams(
        num_clients=n, num_neighbours=k, threshold=t, vector_length=size, clipping_range=1.0
    )

    def run_baseline() -> None:
        baseline.run_secagg_round(old_params, plain_inputs, rng=np.random.default_rng(1))

    def run_authenticated() -> None:
        run_secagg_round(
            params, auth_inputs, rng=np.random.default_rng(1), identities=people, context=CONTEXT
        )

    def run_authenticated_lean() -> None:
        run_secagg_round(
            params,
            auth_inputs,
            rng=np.random.default_rng(1),
            identities=people,
            keep_masked_inputs=False,
            context=CONTEXT,
        )

    def run_unauthenticated() -> None:
        run_secagg_round(params, plain_inputs, rng=np.random.default_rng(1))

    runners: dict[str, Callable[[], None]] = {
        "baseline": run_baseline,
        "authenticated": run_authenticated,
        "authenticated, keep_masked_inputs=False": run_authenticated_lean,
        "unauthenticated": run_unauthenticated,
    }
    results: Times = {name: [] for name in runners}
    for name in results:  # warm-up each once
        runners[name]()
    for _ in range(repeats):  # interleave, so drifts of the machine hit every variant alike
        for name, runner in runners.items():
            wall, cpu = time.perf_counter(), time.process_time()
            runner()
            results[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20:1e6,100:1e5", help="N:P pairs, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline-ref", default="main")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        baseline = load_baseline(args.baseline_ref, Path(tmp))
        print(f"baseline: aggregation/secagg at {args.baseline_ref}")
        print()
        print(
            "Median of the rounds; CPU = this process's CPU time (robust to other load on the "
            "machine), wall = elapsed time."
        )
        print()
        print("| N | P | k | t | variant | CPU (s) | CPU ratio | wall (s) | wall ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for pair in args.sizes.split(","):
            n_text, p_text = pair.split(":")
            n, size = int(n_text), int(float(p_text))
            k, t = round_params(n, size)
            res = bench(n, size, args.repeats, baseline)
            wall0 = statistics.median(w for w, _ in res["baseline"])
            cpu0 = statistics.median(c for _, c in res["baseline"])
            for name, times in res.items():
                wall = statistics.median(w for w, _ in times)
                cpu = statistics.median(c for _, c in times)
                print(
                    f"| {n} | {size:.0e} | {k} | {t} | {name} | {cpu:.3f} | {cpu / cpu0:.3f} | "
                    f"{wall:.3f} | {wall / wall0:.3f} |"
                )
            for name, times in res.items():
                pairs = ", ".join(f"{w:.3f}/{c:.3f}" for w, c in times)
                print(f"<!-- N={n} P={size} {name} wall/CPU: {pairs} -->")


if __name__ == "__main__":
    main()
