"""How accurate are the DP sensing normalizers? Released std and mean against the pooled data.

Run from the repository root::

    .venv/bin/python benchmarks/bench_sensing.py              # 12 runs per modality
    .venv/bin/python benchmarks/bench_sensing.py --runs 3     # a quick look

For each sensing job of the embedded default scenario (camera, audio, IoT at
``dp+secure-agg``, epsilon 4, delta 1e-5) and the default scenario's examples per sensing node:
three nodes with their own demo data run the job ``--runs`` times through the real federator
and real ClientApps (``tests.support.local_grid.LocalGrid``: every message through Flower's
protobuf; node-side distributed Skellam noise from each node's own CSPRNG, so every run draws
fresh noise). Reported per modality: the worst feature's ``|released std / true std - 1|`` and
``|released mean - true mean| / true std`` over the runs (median, 90th percentile, maximum),
the number of features, and the seconds per run. The acceptance target is every std within
10 % of the truth.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.app import make_client_app
from clients.datasets import sensing_values
from clients.demo_data import write_demo_dataset
from manifests.catalog import NodeType
from server.federator import run_federation
from server.options import JobStatus
from simulations.scenario import Overrides, load_scenario
from tests.support.federation import provision
from tests.support.local_grid import LocalGrid

NODES = 3


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=12)
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    scenario = load_scenario(None, Overrides())
    (group,) = [g for g in scenario.groups if g.type is NodeType.SENSING]
    print("# Sensing normalizers: released statistics against the pooled data")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}; command: {' '.join(['python', *sys.argv])}"
    )
    print()
    print(
        "| job | examples/node | features | std error: median | p90 | max "
        "| mean error (std units): max | s/run |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for job in scenario.jobs:
        if job.node_type is not NodeType.SENSING:
            continue
        modality = job.modality.value
        examples = group.examples[job.modality]
        std_errors: list[float] = []
        mean_errors: list[float] = []
        seconds: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            dirs = []
            for i in range(NODES):
                folder = root / f"node-{i}"
                write_demo_dataset(modality, folder / modality, examples, seed=100 + i)
                dirs.append(folder)
            values = [sensing_values(job.spec, folder) for folder in dirs]
            pooled = np.concatenate([v.reshape(-1, v.shape[-1]) for v in values])
            std, mean = pooled.std(axis=0), pooled.mean(axis=0)
            for run in range(args.runs):
                federation = provision(root / f"federation-{run}", NODES, NodeType.SENSING)
                grid = LocalGrid.with_app(make_client_app(federation.node_configs(dirs)), NODES)
                run_dir = root / f"run-{run}"
                start = time.perf_counter()
                outcome = run_federation(grid, job.spec, federation.run_options(run_dir, seed=run))
                seconds.append(time.perf_counter() - start)
                if outcome.status is not JobStatus.PASSED:
                    raise RuntimeError(f"{job.artifact_name}: {outcome.reasons}")
                released = load_file(str(run_dir / "model.safetensors"))
                std_errors.append(float(np.max(np.abs(released["std"] / std - 1))))
                mean_errors.append(float(np.max(np.abs(released["mean"] - mean) / std)))
        errors = np.asarray(std_errors)
        print(
            f"| {job.artifact_name} | {examples} | {std.shape[0]} "
            f"| {np.median(errors):.3f} | {np.quantile(errors, 0.9):.3f} | {errors.max():.3f} "
            f"| {max(mean_errors):.3f} | {np.median(seconds):.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
