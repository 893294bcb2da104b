"""CPU time of one message in a long-lived ClientApp process, cold and warm.

Run from the repository root::

    .venv/bin/python benchmarks/bench_node_message.py --repeats 20

One provisioned sensing node with the default scenario's IoT demo data, fedbrain's ClientApp
(``clients.app.make_client_app``) on ``tests.support.local_grid.LocalGrid`` in this process,
and the default scenario's ``sensing-iot-normalizer-v1`` job signed by the operator. It sends
``query.node_info`` (what discovery asks every node before round 1: signed-job admission,
kit, policy, data check) ``--repeats + 1`` times and reports the process CPU time
(``time.process_time``) and wall time of each: the first is cold (the first message imports
``clients.node`` -- torch, transformers -- and loads the kit and the data), the rest warm, as
in a long-lived node process (the Simulation Engine's actors). A deployment SuperNode in
subprocess isolation pays the cold cost, plus a fresh interpreter and Flower, on every message
(``benchmarks/bench_node_cpu.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    from flwr.app import Message, RecordDict

    from clients.app import make_client_app
    from clients.demo_data import write_demo_dataset
    from clients.protocol import NODE_INFO, SIGNED_JOB, signed_job_record
    from manifests.catalog import NodeType
    from simulations.scenario import Overrides, load_scenario
    from tests.support.federation import provision
    from tests.support.local_grid import LocalGrid

    imports_cpu, imports_wall = time.process_time() - cpu0, time.perf_counter() - wall0
    torch_before = "torch" in sys.modules  # the harness (provisioning) may import it
    scenario = load_scenario(None, Overrides())
    job = next(j.spec for j in scenario.jobs if j.spec.base_model == "iot")
    cpu: list[float] = []
    wall: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "node"
        write_demo_dataset("iot", data / "iot", 512, seed=1)
        federation = provision(Path(tmp) / "federation", 1, NodeType.SENSING)
        grid = LocalGrid.with_app(make_client_app(federation.node_configs([data])), 1)
        node = next(iter(grid.get_node_ids()))
        envelope = signed_job_record(federation.sign(job))
        for _ in range(args.repeats + 1):
            message = Message(
                RecordDict({SIGNED_JOB: envelope}),
                dst_node_id=node,
                message_type=NODE_INFO,
                group_id="0",
            )
            c, w = time.process_time(), time.perf_counter()
            (reply,) = grid.send_and_receive([message], timeout=600)
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
            if reply.has_error():
                raise SystemExit(f"node_info failed: {reply.error.reason}")
    print(f"imports of the harness (flwr, clients.app, ...): {imports_cpu:.2f} CPU-s, "
          f"{imports_wall:.2f} s wall; torch imported before the first message: "
          f"{torch_before}")  # fmt: skip
    print("| message | CPU (s) | wall (s) |")
    print("|---|---:|---:|")
    print(f"| first `query.node_info` (cold) | {cpu[0]:.3f} | {wall[0]:.3f} |")
    print(
        f"| later `query.node_info` (warm), median of {args.repeats} | "
        f"{statistics.median(cpu[1:]):.4f} | {statistics.median(wall[1:]):.4f} |"
    )


if __name__ == "__main__":
    main()
