"""Learning table for vision, audio and the LM: untrained / centralized / federated, full / LoRA
/ head, from the demo bases -- independent of the default scenario file.

Run from the repository root::

    .venv/bin/python benchmarks/bench_learning_modalities.py                  # all three
    .venv/bin/python benchmarks/bench_learning_modalities.py --modalities lm --rounds 2

Everything is built here, nothing read from ``simulations/default.toml``:

- the base: :func:`clients.pretrain.pretrained_base` (the demo base of the family, pretrained
  on *public* demo data; generated into the work folder, or verified if already there);
- the nodes: 3 per modality, demo data (:mod:`clients.demo_data`) written and partitioned by
  the simulation runner from a scenario mapping given here (encoders: Dirichlet(0.5) non-IID
  with at least 8 examples of every class per node; LM: IID contiguous shares), with kits from
  ``tests.support.federation.provision`` (an open policy, so ``none`` runs too);
- the jobs: the family's demo-base sizes, ``base_checkpoint`` = the generated folder,
  ``checkpoint_interval`` 1 (the curve reads every round's checkpoint), 3 rounds; DP is
  example-level DP-SGD on every node calibrated for ``--epsilon`` (default 8) at delta 1e-5
  over the run, ``secagg.quantization_range`` 4.

Rows per modality (all scored on a held-out test set no node has: fresh demo data, another
seed): **untrained** -- the base with a fresh head (and, for reference, the same architecture
at random init); **centralized** -- full fine-tuning of the base on the pooled training splits
of the nodes, no DP, ``rounds x epochs`` epochs scored after every block of ``epochs``;
**federated** -- the real federator and ClientApps on ``LocalGrid`` (every message through
Flower's protobuf), privacy ``none`` (full) and ``dp+secure-agg`` (full, LoRA, head).

Metric: vision and audio, held-out accuracy of the classifier head (embed jobs train
supervised when labels exist). LM: held-out perplexity ``exp(mean next-byte loss)`` (the mean
over sequences of each sequence's mean next-byte cross-entropy), next to the public unigram
baseline's (``clients.node.public_unigram_log_probs``) on the same targets.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from clients.adaptation import set_trainable_weights, trainable_names
from clients.app import make_client_app
from clients.checkpoints import checkpoint_digest
from clients.data import LabelledDataset, load_audio, load_corpus, load_images
from clients.datasets import AUDIO_CLIP_SECONDS, clear_data_cache, model_data
from clients.demo_data import Modality, write_demo_dataset
from clients.jobs import model_spec_for_job
from clients.models import ModelFamily, build_model, set_weights, unwrap
from clients.node import public_unigram_log_probs
from clients.pretrain import DEMO_BASES, pretrained_base
from clients.training import EmbedLoss, evaluate, evaluation_rows, train_local
from manifests.catalog import NodeType, Task
from manifests.confighash import training_config_hash
from manifests.jobspec import JobSpec
from server.checkpoint import latest_checkpoint
from server.federator import run_federation
from server.options import EventKind, ProgressEvent
from simulations.runner import materialize_data
from simulations.scenario import parse_scenario
from tests.support.federation import provision
from tests.support.local_grid import LocalGrid

Batch = tuple[torch.Tensor, torch.Tensor]
NODES = 3


@dataclass(frozen=True)
class Setup:
    """One modality: its family, nodes, job fields and test set size."""

    family: ModelFamily
    modality: Modality
    node_type: NodeType
    examples: int  # per node
    test_examples: int
    job: dict[str, object]
    learning_rates: dict[str, float]  # adaptation -> learning rate


def _sizes(family: ModelFamily) -> dict[str, object]:
    spec = DEMO_BASES[family]
    sizes: dict[str, object] = {
        "hidden_size": spec.hidden_size,
        "num_layers": spec.num_layers,
        "num_heads": spec.num_heads,
    }
    if family is not ModelFamily.GPT2:
        sizes["embedding_dim"] = spec.embedding_dim
    return sizes


SETUPS: dict[str, Setup] = {
    "vision": Setup(
        ModelFamily.VIT, Modality.VISION, NodeType.ENCODER, 480, 400,
        {"component": "vision", "base_model": "vit-base16", "task": "embed", "input_size": 32,
         "batch_size": 32, "epochs": 2, **_sizes(ModelFamily.VIT)},
        {"full": 3e-3, "lora": 3e-3, "head": 1e-2},
    ),
    "audio": Setup(
        ModelFamily.WAV2VEC2, Modality.AUDIO, NodeType.ENCODER, 160, 240,
        {"component": "audio", "base_model": "wav2vec2-base", "task": "embed",
         "sample_rate": 16000, "batch_size": 16, "epochs": 2, **_sizes(ModelFamily.WAV2VEC2)},
        {"full": 3e-3, "lora": 3e-3, "head": 1e-2},
    ),
    "lm": Setup(
        ModelFamily.GPT2, Modality.LM, NodeType.INFERENCE, 600, 300,
        {"component": "inference", "base_model": "gpt-small-v1", "task": "lm-finetune",
         "max_seq_length": DEMO_BASES[ModelFamily.GPT2].max_seq_length, "batch_size": 32,
         "epochs": 1, **_sizes(ModelFamily.GPT2)},
        {"full": 3e-3, "lora": 3e-3, "head": 1e-2},
    ),
}  # fmt: skip

# (row label, privacy level, adaptation)
FEDERATED = (
    ("federated, none", "none", "full"),
    ("federated, dp+secure-agg", "dp+secure-agg", "full"),
    ("federated, dp+secure-agg", "dp+secure-agg", "lora"),
    ("federated, dp+secure-agg", "dp+secure-agg", "head"),
)


def job_for(
    setup: Setup, base: Path, *, level: str, adaptation: str, rounds: int, epsilon: float
) -> JobSpec:
    values: dict[str, object] = {
        **setup.job,
        "base_checkpoint": str(base),
        "adaptation": adaptation,
        "learning_rate": setup.learning_rates[adaptation],
        "privacy_level": level,
        "checkpoint_interval": 1,
        "federation": {"num_rounds": rounds, "clients_per_round": NODES,
                       "reliability_threshold": 0.3},
    }  # fmt: skip
    if level != "none":
        values["dp"] = {"unit": "example", "clipping_norm": 1.0, "target_epsilon": epsilon,
                        "delta": 1e-5, "epsilon_budget": epsilon + 2.0}  # fmt: skip
    if "secure-agg" in level:
        values["secagg"] = {"quantization_range": 4.0}
    return JobSpec.from_mapping(values)


def node_data(setups: Sequence[Setup], out: Path, seed: int) -> dict[Modality, list[Path]]:
    """Each modality's node folders, written and partitioned by the simulation runner (one
    group of ``NODES`` nodes per node type; the encoders hold vision and audio)."""
    groups: dict[NodeType, dict[str, object]] = {}
    for setup in setups:
        partition: object = (
            "iid"
            if setup.modality is Modality.LM
            else {"kind": "dirichlet", "alpha": 0.5, "min_per_class": 8}
        )
        group = groups.setdefault(setup.node_type, {
            "type": setup.node_type.value, "count": NODES, "modalities": [], "examples": {},
            "partition": partition,
        })  # fmt: skip
        cast(list[str], group["modalities"]).append(setup.modality.value)
        cast(dict[str, int], group["examples"])[setup.modality.value] = setup.examples
    jobs = [{**setup.job, "learning_rate": 3e-3} for setup in setups]
    scenario = parse_scenario(
        {"simulation": {"name": "bench-learning", "seed": seed}, "nodes": list(groups.values()),
         "jobs": jobs},
        base_dir=out,
        source="<bench_learning_modalities>",
    )  # fmt: skip
    dirs = materialize_data(scenario, out)
    order = list(groups)
    return {
        setup.modality: [
            dirs[n.index] for n in scenario.nodes if n.group == order.index(setup.node_type)
        ]
        for setup in setups
    }


def test_data(setup: Setup, job: JobSpec, out: Path, seed: int) -> LabelledDataset:
    folder = out / "test" / setup.modality.value
    write_demo_dataset(setup.modality, folder, setup.test_examples, seed=seed + 10_000)
    spec = model_spec_for_job(job)
    if setup.modality is Modality.VISION:
        return load_images(folder, input_size=spec.resolved_input_size)
    if setup.modality is Modality.AUDIO:
        return load_audio(
            folder, sample_rate=spec.resolved_sample_rate, duration_s=AUDIO_CLIP_SECONDS
        )
    return load_corpus(folder, max_seq_length=spec.resolved_max_seq_length)


def scorer(
    setup: Setup, test: Dataset[Batch]
) -> tuple[Callable[[torch.nn.Module], float], float | None]:
    """The metric (accuracy, or perplexity for the LM) and, for the LM, the unigram's."""
    loader: DataLoader[Batch] = DataLoader(test, batch_size=64)
    if setup.modality is not Modality.LM:

        def accuracy(model: torch.nn.Module) -> float:
            return evaluate(model, loader, task=Task.CLASSIFICATION)["accuracy"]

        return accuracy, None
    unigram = public_unigram_log_probs()

    def rows(model: torch.nn.Module) -> torch.Tensor:
        return torch.as_tensor(
            evaluation_rows(
                model, loader, task=Task.LM_FINETUNE, loss_bound=100.0, baseline_log_probs=unigram
            )
        )

    def perplexity(model: torch.nn.Module) -> float:
        return math.exp(float(rows(model)[:, 0].mean()))

    probe = build_model(DEMO_BASES[setup.family], seed=0)
    return perplexity, math.exp(float(rows(probe)[:, 2].mean()))


def load_round(model: torch.nn.Module, run_dir: Path, config_hash: str, server_round: int) -> None:
    checkpoint = latest_checkpoint(run_dir, training_config_hash=config_hash)
    if checkpoint is None or checkpoint.round != server_round:
        raise RuntimeError(f"no checkpoint for round {server_round} in {run_dir}")
    arrays = list(checkpoint.weights.values())
    if list(checkpoint.weights) == trainable_names(model):
        set_trainable_weights(model, arrays)
    else:
        set_weights(unwrap(model), arrays)


@dataclass
class Row:
    label: str
    adaptation: str
    trainable: int
    curve: list[float]
    epsilon: float | None
    seconds: float


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def federated_row(
    label: str,
    job: JobSpec,
    nodes: list[Path],
    out: Path,
    *,
    seed: int,
    score: Callable[[torch.nn.Module], float],
    node_type: NodeType,
) -> Row:
    run_dir = out / f"run-{job.privacy_level.value}-{job.adaptation.value}"
    federation = provision(out / f"federation-{node_type.value}", NODES, node_type)
    configs = federation.node_configs(nodes)
    model = build_model(model_spec_for_job(job), seed=seed)
    assert job.base_checkpoint is not None
    config_hash = training_config_hash(
        job.training_config(base_digest=checkpoint_digest(Path(job.base_checkpoint)))
    )
    curve: list[float] = []

    def on_progress(event: ProgressEvent) -> None:
        if event.kind is EventKind.ROUND_FINISHED:
            load_round(model, run_dir, config_hash, event.server_round)
            curve.append(score(model))
            print(
                f"    {label} {job.adaptation.value} round {event.server_round}: "
                f"{curve[-1]:.3f}  eps {event.metrics.get('epsilon', float('nan')):.2f}",
                flush=True,
            )

    grid = LocalGrid.with_app(make_client_app(configs), NODES)
    start = time.perf_counter()
    outcome = run_federation(
        grid,
        job,
        federation.run_options(run_dir, seed=seed, deterministic_noise=True, round_timeout=600),
        progress=on_progress,
    )
    seconds = time.perf_counter() - start
    if len(curve) != job.federation.num_rounds:
        raise RuntimeError(f"{label}: {outcome.status} {outcome.reasons}")
    return Row(label, job.adaptation.value, trainable_count(model), curve, outcome.epsilon, seconds)


def centralized_row(
    job: JobSpec, nodes: list[Path], *, seed: int, score: Callable[[torch.nn.Module], float]
) -> Row:
    """Full fine-tuning of the base on the pooled training splits, no DP."""
    spec = model_spec_for_job(job)
    pooled: ConcatDataset[Batch] = ConcatDataset(
        [model_data(job, spec, folder).train for folder in nodes]
    )
    model = build_model(spec, seed=seed)
    loader: DataLoader[Batch] = DataLoader(
        pooled, batch_size=job.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    embed_loss = EmbedLoss.SUPERVISED if spec.num_classes else EmbedLoss.NT_XENT
    curve: list[float] = []
    start = time.perf_counter()
    for _ in range(job.federation.num_rounds):
        train_local(
            model, loader, task=job.task, epochs=job.epochs, optimizer=job.optimizer,
            learning_rate=job.learning_rate, weight_decay=job.weight_decay,
            generator=torch.Generator().manual_seed(seed), embed_loss=embed_loss,
        )  # fmt: skip
        curve.append(score(model))
    seconds = time.perf_counter() - start
    print(f"    centralized: {curve} ({len(pooled)} pooled examples)", flush=True)
    return Row(f"centralized, pooled data ({len(pooled)}), no DP", "full",
               trainable_count(model), curve, None, seconds)  # fmt: skip


def run_modality(name: str, args: argparse.Namespace, out: Path, nodes: list[Path]) -> None:
    setup = SETUPS[name]
    start = time.perf_counter()
    base = pretrained_base(setup.family, out / "bases" / setup.family.value, seed=0)
    base_s = time.perf_counter() - start

    def job(level: str, adaptation: str) -> JobSpec:
        return job_for(setup, base, level=level, adaptation=adaptation, rounds=args.rounds,
                       epsilon=args.epsilon)  # fmt: skip

    full = job("none", "full")
    test = test_data(setup, full, out, args.seed)
    score, unigram = scorer(setup, test)
    spec = model_spec_for_job(full)
    untrained_base = score(build_model(spec, seed=args.seed))
    untrained_random = score(build_model(replace(spec, checkpoint=None), seed=args.seed))
    print(f"  {name}: base ready in {base_s:.1f} s; untrained base {untrained_base:.3f}, "
          f"random init {untrained_random:.3f}" + (f", unigram {unigram:.3f}" if unigram else ""),
          flush=True)  # fmt: skip
    rows = [centralized_row(full, nodes, seed=args.seed, score=score)]
    for label, level, adaptation in FEDERATED:
        if args.adaptations and adaptation not in args.adaptations.split(","):
            continue
        if args.levels and level not in args.levels.split(","):
            continue
        rows.append(federated_row(
            label, job(level, adaptation), nodes, out / name, seed=args.seed, score=score,
            node_type=setup.node_type,
        ))  # fmt: skip

    metric = "perplexity" if setup.modality is Modality.LM else "accuracy"
    rounds = args.rounds
    print(f"\n### {name} ({setup.family.value} demo base), held-out {metric}, "
          f"{len(test)} test examples\n")  # fmt: skip
    if unigram is not None:
        print(f"public unigram baseline perplexity: {unigram:.3f}; ", end="")
    print(f"untrained: base + fresh head {untrained_base:.3f}, random init "
          f"{untrained_random:.3f}\n")  # fmt: skip
    header = " | ".join(f"round {r}" for r in range(1, rounds + 1))
    print(f"| training | adaptation | trainable params | untrained | {header} | epsilon | s |")
    print("|---|---|---:|---:|" + "---:|" * rounds + "---:|---:|")
    for row in rows:
        cells = " | ".join(f"{v:.3f}" for v in row.curve)
        eps = "-" if row.epsilon is None else f"{row.epsilon:.2f}"
        print(f"| {row.label} | {row.adaptation} | {row.trainable:,} | {untrained_base:.3f} | "
              f"{cells} | {eps} | {row.seconds:.0f} |", flush=True)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modalities", default="vision,audio,lm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--levels", default="", help="only these privacy levels (comma list)")
    parser.add_argument("--adaptations", default="", help="only these adaptations (comma list)")
    parser.add_argument("--out", type=Path, default=None, help="work dir (default: a tmp dir)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedbrain-bench-learning-"))
    names = args.modalities.split(",")
    print("# Learning benchmark: demo bases, federated vs centralized, full / LoRA / head")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")  # fmt: skip
    data = node_data([SETUPS[n] for n in names], out, args.seed)
    for name in names:
        clear_data_cache()
        run_modality(name, args, out, data[SETUPS[name].modality])
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
