"""Local-training overhead of fedbrain's ClientApp against a bare PyTorch loop.

Run from the repository root::

    .venv/bin/python benchmarks/bench_client_overhead.py            # 5 repeats
    .venv/bin/python benchmarks/bench_client_overhead.py --repeats 9

Both sides train the default scenario's vision model (tiny ViT, supervised embed, privacy level
``none``) for the same epochs on the same node's data:

- **bare loop**: a prebuilt model, AdamW, a shuffled ``DataLoader`` over the node's
  training split, the embed task's augmentation (``clients.training.augment``) and
  cross-entropy on the classifier head; the weights are copied in and out as numpy arrays --
  the least any federated client training this job must do;
- **ClientApp**: one ``train.fit`` message through ``server.local_grid.LocalGrid`` to the real
  ``clients.app`` ClientApp: protobuf serialization of the message both ways, job/round
  parsing, model build, weight loading, the same training, the update (delta), clipping
  statistics, the reply.

Target: ClientApp time <= 1.10 x bare-loop time. Median of ``--repeats`` after one warm-up
each (the node's data cache is warm, as on every round after the first).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.app import Message, RecordDict
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.app import make_client_app
from clients.data import load_images
from clients.datasets import holdout_split
from clients.demo_data import write_demo_dataset
from clients.jobs import model_spec_for_job
from clients.models import (
    build_model,
    family_for_base_model,
    get_weights,
    set_weights,
    weight_names,
)
from clients.protocol import (
    FIT,
    ROUND,
    SIGNED_JOB,
    WEIGHTS,
    RoundConfig,
    signed_job_record,
    weights_to_record,
)
from clients.training import augment
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec
from simulations.scenario import Overrides, load_scenario
from tests.support.federation import provision
from tests.support.local_grid import LocalGrid


def vision_job(epochs: int) -> JobSpec:
    """The default scenario's vision job at privacy level ``none`` (the scenario's override)."""
    scenario = load_scenario(None, Overrides(privacy_level="none"))
    job = next(j for j in scenario.jobs if j.modality.value == "vision" and not j.is_analytics)
    return JobSpec.from_mapping(
        {**job.spec.model_dump(mode="json", exclude_unset=True), "epochs": epochs}
    )


def bare_loop(job: JobSpec, data_dir: Path, repeats: int) -> list[float]:
    spec = model_spec_for_job(job)
    data = load_images(data_dir / "vision", input_size=job.input_size or 32)
    keep, _ = holdout_split(data.labels.numpy())
    train = torch.utils.data.Subset(data, keep.tolist())
    model = build_model(spec, seed=0)
    initial = get_weights(model)
    family = family_for_base_model(job.base_model)
    generator = torch.Generator().manual_seed(0)
    times: list[float] = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        set_weights(model, [a.copy() for a in initial])
        opt = torch.optim.AdamW(model.parameters(), lr=job.learning_rate)
        loader = DataLoader(
            train,
            batch_size=job.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )
        model.train()
        for _epoch in range(job.epochs):
            for x, y in loader:
                opt.zero_grad()
                view = augment(x, family, generator)  # the embed task's augmented view
                F.cross_entropy(model(view).logits, y).backward()  # type: ignore[no-untyped-call]
                opt.step()
        _ = [w - i for w, i in zip(get_weights(model), initial, strict=True)]
        times.append(time.perf_counter() - start)
    return times[1:]


def client_app(job: JobSpec, data_dir: Path, repeats: int) -> list[float]:
    spec = model_spec_for_job(job)
    model = build_model(spec, seed=0)
    federation = provision(data_dir / "federation", 1, NodeType.ENCODER)
    nodes = federation.node_configs([data_dir])
    envelope = signed_job_record(federation.sign(job))
    grid = LocalGrid.with_app(make_client_app(nodes), 1)
    node = next(iter(grid.get_node_ids()))
    weights = weights_to_record(weight_names(model), get_weights(model))
    times: list[float] = []
    for r in range(repeats + 1):
        content = RecordDict(
            {
                SIGNED_JOB: envelope,
                ROUND: RoundConfig(server_round=r + 1, seed=r).to_record(),
                WEIGHTS: weights,
            }
        )
        message = Message(content, dst_node_id=node, message_type=FIT, group_id=str(r + 1))
        start = time.perf_counter()
        (reply,) = grid.send_and_receive([message], timeout=600)
        times.append(time.perf_counter() - start)
        if reply.has_error():
            raise RuntimeError(f"train.fit failed: {reply.error.reason}")
    return times[1:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--examples", type=int, default=480)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one ClientApp per core, as in the simulation
    job = vision_job(args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        write_demo_dataset("vision", data_dir / "vision", args.examples, seed=1)
        bare = bare_loop(job, data_dir, args.repeats)
        app = client_app(job, data_dir, args.repeats)
    b, a = statistics.median(bare), statistics.median(app)
    print("# ClientApp local-training overhead vs a bare PyTorch loop")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; python "
        f"{platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"model: tiny ViT (hidden {job.hidden_size}, {job.num_layers} layer), "
        f"{args.examples} images of {job.input_size}px (80% train), batch {job.batch_size}, "
        f"{job.epochs} epochs, 1 torch thread; median of {args.repeats}\n"
    )
    print("| path | median (s) | runs (s) | ratio |")
    print("|---|---:|---|---:|")
    print(f"| bare PyTorch loop | {b:.3f} | {', '.join(f'{t:.3f}' for t in bare)} | 1.00 |")
    print(f"| ClientApp train.fit | {a:.3f} | {', '.join(f'{t:.3f}' for t in app)} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
