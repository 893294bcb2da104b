"""Is the federated vision encoder really learning? Held-out accuracy per round.

Run from the repository root::

    .venv/bin/python benchmarks/bench_learning.py              # default scenario's vision job
    .venv/bin/python benchmarks/bench_learning.py --rounds 6   # longer curves

The vision job of the embedded default scenario (tiny ViT, ``vit-base16-embed-v1``) is trained
on the default scenario's encoder nodes (their demo data, Dirichlet non-IID) through the real
federator and the real ClientApps (``server.local_grid.LocalGrid``: every message goes through
Flower's protobuf serialization; one process, so the numbers are comparable between levels),
at privacy levels ``none``, ``dp`` and ``dp+secure-agg`` (the job's DP unit, ``example``).
After every round the global model's weights (from the round's checkpoint) are scored on a
held-out test set that no node has (fresh demo data, another seed): the accuracy of the
encoder's own classifier head (embed jobs train supervised when labels exist), and a linear
probe (multinomial logistic regression, L-BFGS) trained on the embeddings of the pooled
training data. The probe is reported for completeness: on these synthetic shapes a probe on
*random* ViT features is already well above chance, so the classifier is the clearer signal.

Baselines measured in the same run: the untrained model (round 0) and **centralized**
training of the same model on the pooled training data (the union of the nodes' training
splits, no DP) for the same number of epochs (``rounds * epochs``), scored the same way after
each block of ``epochs``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import ConcatDataset, DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.app import make_client_app
from clients.config import NodeConfig
from clients.data import LabelledDataset, load_images
from clients.datasets import holdout_split
from clients.demo_data import write_demo_dataset
from clients.jobs import model_spec_for_job
from clients.models import build_model, set_weights, unwrap
from clients.training import EmbedLoss, embed_examples, train_local
from manifests.catalog import NodeType
from manifests.confighash import training_config_hash
from manifests.jobspec import JobSpec, PrivacyLevel
from server.checkpoint import latest_checkpoint
from server.federator import run_federation
from server.options import EventKind, ProgressEvent
from simulations.runner import materialize_data, node_configs
from simulations.scenario import Overrides, Scenario, ScenarioJob, load_scenario
from tests.support.federation import Federation, provision
from tests.support.local_grid import LocalGrid

LEVELS = (PrivacyLevel.NONE, PrivacyLevel.DP, PrivacyLevel.DP_SECURE_AGG)
TEST_EXAMPLES = 400


@torch.no_grad()
def classifier_accuracy(
    model: torch.nn.Module, test: DataLoader[tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """Held-out accuracy of the encoder's own classifier head (supervised embed jobs)."""
    net = unwrap(model)
    net.eval()
    correct = total = 0
    for x, y in test:
        logits = net(x).logits
        if logits is None:
            return float("nan")
        correct += int((logits.argmax(1) == y).sum())
        total += int(y.numel())
    return correct / total


def scores(
    model: torch.nn.Module,
    train: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    test: DataLoader[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[float, float]:
    """(classifier accuracy, linear-probe accuracy) on the held-out test set."""
    return classifier_accuracy(model, test), linear_probe_accuracy(model, train, test)


def linear_probe_accuracy(
    model: torch.nn.Module,
    train: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    test: DataLoader[tuple[torch.Tensor, torch.Tensor]],
) -> float:
    """Held-out accuracy of a logistic regression on the model's (normalized) embeddings."""
    z_train, y_train = embed_examples(model, train)
    z_test, y_test = embed_examples(model, test)
    mean, std = z_train.mean(0), z_train.std(0) + 1e-6
    z_train, z_test = (z_train - mean) / std, (z_test - mean) / std
    classes = int(max(y_train.max(), y_test.max())) + 1
    probe = torch.nn.Linear(z_train.shape[1], classes)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(probe(z_train), y_train) + 1e-3 * probe.weight.square().sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return float((probe(z_test).argmax(1) == y_test).double().mean())


def _loader(
    data: torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]], *, shuffle: bool
) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
    return DataLoader(
        data, batch_size=64, shuffle=shuffle, generator=torch.Generator().manual_seed(0)
    )


def pooled_training_data(
    dirs: Sequence[Path], input_size: int
) -> ConcatDataset[tuple[torch.Tensor, torch.Tensor]]:
    """The union of the nodes' training splits (what the nodes train on, pooled)."""
    parts: list[Subset[tuple[torch.Tensor, torch.Tensor]]] = []
    for folder in dirs:
        data: LabelledDataset = load_images(folder / "vision", input_size=input_size)
        keep, _ = holdout_split(data.labels.numpy())
        parts.append(Subset(data, keep.tolist()))
    return ConcatDataset(parts)


def vision_job(
    *, level: PrivacyLevel | None = None, rounds: int | None = None, sets: Sequence[str] = ()
) -> tuple[Scenario, ScenarioJob, JobSpec]:
    """The default scenario's vision job, with the scenario's own overrides (``--privacy-level``
    and ``--rounds`` of ``fedbrain simulate``), checkpoints every round (the curve reads them),
    and ``--set FIELD=JSON`` experiments on top."""
    overrides = Overrides(privacy_level=level.value if level else None, rounds=rounds)
    scenario = load_scenario(None, overrides)
    entry = next(j for j in scenario.jobs if j.modality.value == "vision" and not j.is_analytics)
    values = entry.spec.model_dump(mode="json", exclude_unset=True)
    values["checkpoint_interval"] = 1
    for item in sets:
        key, _, raw = item.partition("=")
        values[key] = json.loads(raw)
    return scenario, entry, JobSpec.from_mapping(values)


def federated_curve(
    leveled: JobSpec,
    federation: Federation,
    app_nodes: dict[int, NodeConfig],
    out: Path,
    *,
    seed: int,
    train: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    test: DataLoader[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[tuple[float, float]], float | None, float]:
    """Accuracy after every round, the final epsilon, and wall time of the run."""
    level = leveled.privacy_level
    run_dir = out / f"run-{level.value}"
    spec = model_spec_for_job(leveled)
    model = build_model(spec, seed=seed)
    curve: list[tuple[float, float]] = []

    def on_progress(event: ProgressEvent) -> None:
        if event.kind is EventKind.ROUND_FINISHED:
            checkpoint = latest_checkpoint(
                run_dir, training_config_hash=training_config_hash(leveled.training_config())
            )
            if checkpoint is None or checkpoint.round != event.server_round:
                raise RuntimeError(f"no checkpoint for round {event.server_round}")
            set_weights(unwrap(model), list(checkpoint.weights.values()))
            curve.append(scores(model, train, test))
            print(
                f"  {level.value:>14} round {event.server_round}: "
                f"classifier {curve[-1][0]:.3f} probe {curve[-1][1]:.3f}"
                f"  eps {event.metrics.get('epsilon', float('nan')):.2f}",
                flush=True,
            )

    grid = LocalGrid.with_app(
        make_client_app(app_nodes),
        len(app_nodes),
    )
    start = time.perf_counter()
    outcome = run_federation(
        grid,
        leveled,
        federation.run_options(run_dir, seed=seed, deterministic_noise=True, round_timeout=600),
        progress=on_progress,
    )
    seconds = time.perf_counter() - start
    if len(curve) != leveled.federation.num_rounds:
        raise RuntimeError(f"{level}: {outcome.status} {outcome.reasons}")
    return curve, outcome.epsilon, seconds


def centralized_curve(
    job: JobSpec,
    pooled: ConcatDataset[tuple[torch.Tensor, torch.Tensor]],
    *,
    seed: int,
    train: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    test: DataLoader[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[tuple[float, float], list[tuple[float, float]], float]:
    """Untrained accuracy, accuracy after each block of ``job.epochs`` epochs, wall time."""
    spec = model_spec_for_job(job)
    model = build_model(spec, seed=seed)
    untrained = scores(model, train, test)
    loader = DataLoader(
        pooled,
        batch_size=job.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    embed_loss = EmbedLoss.SUPERVISED if spec.num_classes else EmbedLoss.NT_XENT
    curve: list[tuple[float, float]] = []
    start = time.perf_counter()
    for _ in range(job.federation.num_rounds):
        train_local(
            model,
            loader,
            task=job.task,
            epochs=job.epochs,
            optimizer=job.optimizer,
            learning_rate=job.learning_rate,
            weight_decay=job.weight_decay,
            generator=torch.Generator().manual_seed(seed),
            embed_loss=embed_loss,
        )
        curve.append(scores(model, train, test))
    return untrained, curve, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="default: the scenario's")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="work dir (default: a tmp dir)")
    parser.add_argument(
        "--levels", default=",".join(level.value for level in LEVELS), help="privacy levels"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="override a job field for an experiment, e.g. --set learning_rate=0.01",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    scenario, _entry, job = vision_job(rounds=args.rounds, sets=args.set)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedbrain-bench-learning-"))
    dirs = materialize_data(scenario, out)
    plain = node_configs(scenario, dirs)
    # The nodes' kits (open policy: the benchmark also runs the job without DP).
    federation = provision(out / "federation", len(plain), NodeType.ENCODER)
    nodes = federation.node_configs([plain[pid].data_dir for pid in sorted(plain)])
    input_size = job.input_size or 32
    pooled = pooled_training_data([n.data_dir for n in nodes.values()], input_size)
    test_dir = out / "test"
    write_demo_dataset("vision", test_dir / "vision", TEST_EXAMPLES, seed=args.seed + 10_000)
    test_data = load_images(test_dir / "vision", input_size=input_size)
    train_eval, test_eval = _loader(pooled, shuffle=False), _loader(test_data, shuffle=False)

    print("# Learning benchmark: vision encoder (tiny ViT), held-out accuracy per round")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"nodes: {len(nodes)}, pooled training examples: {len(pooled)}, test: {len(test_data)}, "
        f"rounds: {job.federation.num_rounds}, epochs/round: {job.epochs}, "
        f"DP unit: {job.dp.unit.value}, "
        f"target epsilon {job.dp.target_epsilon} at delta {job.dp.delta}"
    )

    untrained, central, central_s = centralized_curve(
        job, pooled, seed=args.seed, train=train_eval, test=test_eval
    )
    print(f"  untrained: {untrained}; centralized: {central}", flush=True)
    rows: list[tuple[str, list[tuple[float, float]], float | None, float]] = [
        ("centralized, pooled data, no DP", central, None, central_s)
    ]
    for level in (PrivacyLevel(v) for v in args.levels.split(",")):
        leveled = vision_job(level=level, rounds=args.rounds, sets=args.set)[2]
        curve, epsilon, seconds = federated_curve(
            leveled, federation, dict(nodes), out, seed=args.seed, train=train_eval, test=test_eval
        )
        rows.append((f"federated, {level.value}", curve, epsilon, seconds))

    rounds = job.federation.num_rounds
    chance = 1 / len(set(test_data.labels.tolist()))
    for title, k in (("classifier head", 0), ("linear probe on the embeddings", 1)):
        print(f"\nHeld-out accuracy, {title} (chance {chance:.3f}):\n")
        header = " | ".join(f"round {r}" for r in range(1, rounds + 1))
        print(f"| training | untrained | {header} | epsilon (delta {job.dp.delta}) |")
        print("|---|---:|" + "---:|" * rounds + "---:|")
        for name, curve, epsilon, _seconds in rows:
            cells = " | ".join(f"{point[k]:.3f}" for point in curve)
            eps = "-" if epsilon is None else f"{epsilon:.2f}"
            print(f"| {name} | {untrained[k]:.3f} | {cells} | {eps} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
