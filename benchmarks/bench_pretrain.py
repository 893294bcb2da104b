"""Demo bases (clients/pretrain.py): generation time, and do their features help?

Run from the repository root::

    .venv/bin/python benchmarks/bench_pretrain.py            # every family
    .venv/bin/python benchmarks/bench_pretrain.py vit gpt2   # some

For each family: the wall-clock time of ``pretrained_base`` (generation, then a second call
that only verifies), and on held-out demo data drawn like a node's (``default_rng(int)``
seeds, disjoint from the public pretraining stream):

- encoders: a linear probe (multinomial logistic regression, L-BFGS, on standardised
  embeddings) trained on ``--train`` examples and scored on ``--test`` others, on the
  pretrained base and on the same architecture at random init (the heads fresh in both);
- with ``--dp``, encoders: the classifier's held-out accuracy after fine-tuning on one node's
  worth of data (``--train``) for ``--epochs``, with example-level DP-SGD at ``--epsilon``
  and without: head-only and LoRA on the base, full fine-tuning of the base and of a random
  init;
- GPT-2: the held-out next-byte loss (nats) of the base, of a random init, and of the public
  unigram baseline (``clients/public_unigram.json``) on the same targets.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, Dataset, TensorDataset

from aggregation.dp_sgd import make_private
from clients.datasets import AUDIO_CLIP_SECONDS
from clients.demo_data import demo_dataset
from clients.models import Adaptation, EncoderModel, ModelFamily, ModelSpec, build_model
from clients.node import public_unigram_log_probs
from clients.pretrain import DEMO_BASES, DEMO_RECIPES, MODALITIES, pretrained_base
from clients.training import embed_examples, evaluate, evaluation_rows, make_optimizer, train_local


def _stack(data: object) -> tuple[torch.Tensor, torch.Tensor]:
    items = [data[i] for i in range(len(data))]  # type: ignore[index, arg-type]
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def _redraw(family: ModelFamily, n: int, seed: int) -> TensorDataset:
    """Demo data drawn as a node's are (``default_rng(seed)``), in the model's input form."""
    spec = DEMO_BASES[family]
    data = demo_dataset(
        MODALITIES[family], n, np.random.default_rng(seed),
        input_size=spec.resolved_input_size, max_seq_length=spec.resolved_max_seq_length,
    )  # fmt: skip
    x, y = _stack(data)
    if family is ModelFamily.WAV2VEC2:
        length = round(spec.resolved_sample_rate * AUDIO_CLIP_SECONDS)
        x = F.pad(x, (0, length - x.shape[1]))
    return TensorDataset(x, y)


def _probe(model: EncoderModel, train: TensorDataset, test: TensorDataset) -> float:
    z_train, y_train = embed_examples(model, DataLoader(train, batch_size=128))
    z_test, y_test = embed_examples(model, DataLoader(test, batch_size=128))
    mean, std = z_train.mean(0), z_train.std(0).clamp(min=1e-6)
    a, b = (z_train - mean) / std, (z_test - mean) / std
    classes = int(y_train.max()) + 1
    w = torch.zeros(a.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, y_train) + 1e-3 * w.square().sum()
        torch.autograd.backward(loss)
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return float(((b @ w + bias).argmax(1) == y_test).float().mean())


def _fine_tune(
    spec: ModelSpec,
    train: TensorDataset,
    test: TensorDataset,
    *,
    epsilon: float | None,
    epochs: int,
    learning_rate: float,
) -> float:
    """Held-out accuracy of the classifier after local training, DP-SGD at ``epsilon`` (delta
    1e-5, clipping 1, Poisson batches of 64) or without DP."""
    model = build_model(spec, seed=1)
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]] = DataLoader(
        cast(Dataset[tuple[torch.Tensor, torch.Tensor]], train),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(0),
    )
    optimizer = make_optimizer(model, "adam", learning_rate=learning_rate)
    private = None
    if epsilon is not None:
        private = make_private(model, optimizer, loader, max_grad_norm=1.0,
                               target_epsilon=epsilon, target_delta=1e-5,
                               epochs=epochs)  # fmt: skip
    train_local(private.module if private else model, loader, task="classification",
                epochs=epochs, optimizer="adam", learning_rate=learning_rate,
                generator=torch.Generator().manual_seed(0), dp=private)  # fmt: skip
    metrics = evaluate(model, DataLoader(test, batch_size=128), task="classification")
    return metrics["accuracy"]


def dp_section(family: ModelFamily, folder: Path, args: argparse.Namespace) -> str:
    """Classifier accuracy after fine-tuning on one node's data, with and without DP."""
    classes = {ModelFamily.VIT: 10, ModelFamily.WAV2VEC2: 6, ModelFamily.MPNET: 4}[family]
    spec = replace(DEMO_BASES[family], num_classes=classes)
    train = _redraw(family, args.train, 1)
    test = _redraw(family, args.test, 2)
    setups = [
        ("base+head", replace(spec, checkpoint=folder, adaptation=Adaptation.HEAD), 1e-2),
        ("base+lora", replace(spec, checkpoint=folder, adaptation=Adaptation.LORA), 3e-3),
        ("base+full", replace(spec, checkpoint=folder), 3e-3),
        ("random+full", spec, 3e-3),
    ]
    parts = []
    for label, setup, lr in setups:
        accs = [
            _fine_tune(setup, train, test, epsilon=eps, epochs=args.epochs, learning_rate=lr)
            for eps in (args.epsilon, None)
        ]
        parts.append(f"{label} {accs[0]:.3f} (no DP {accs[1]:.3f})")
    return f"  DP-SGD eps {args.epsilon:g}, {args.epochs} epochs: " + ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("families", nargs="*", default=[f.value for f in ModelFamily])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test", type=int, default=600)
    parser.add_argument("--dp", action="store_true", help="also fine-tune under DP-SGD")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: robust on a "
        "busy machine, where spinning OpenMP threads slow training manyfold)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.families:
            family = ModelFamily(name)
            folder = Path(tmp) / name
            start, cpu = time.perf_counter(), time.process_time()
            pretrained_base(family, folder, seed=args.seed)
            generate = time.perf_counter() - start
            generate_cpu = time.process_time() - cpu
            start = time.perf_counter()
            pretrained_base(family, folder, seed=args.seed)
            verify = time.perf_counter() - start
            spec = DEMO_BASES[family]
            params = sum(p.numel() for p in build_model(spec).parameters())
            line = (f"{name:9s} params {params:7d}  {DEMO_RECIPES[family]}  generate "
                    f"{generate:5.1f} s (CPU {generate_cpu:5.1f} s)  "
                    f"verify {verify:4.2f} s")  # fmt: skip
            if family is ModelFamily.GPT2:
                test = _redraw(family, args.test, 2)
                loader = DataLoader(test, batch_size=64)
                unigram = public_unigram_log_probs()
                rows = {
                    label: evaluation_rows(
                        build_model(replace(spec, checkpoint=ckpt), seed=1),
                        loader,
                        task="lm-finetune",
                        loss_bound=100.0,
                        baseline_log_probs=unigram,
                    )
                    for label, ckpt in (("base", folder), ("random", None))
                }
                line += (f"  held-out loss: base {rows['base'][:, 0].mean():.3f}  random "
                         f"{rows['random'][:, 0].mean():.3f}  unigram "
                         f"{rows['base'][:, 2].mean():.3f} nats")  # fmt: skip
            else:
                train = _redraw(family, args.train, 1)
                test = _redraw(family, args.test, 2)
                accs = {}
                for label, ckpt in (("base", folder), ("random", None)):
                    model = build_model(replace(spec, checkpoint=ckpt), seed=1)
                    assert isinstance(model, EncoderModel)
                    accs[label] = _probe(model, train, test)
                line += f"  probe acc: base {accs['base']:.3f}  random {accs['random']:.3f}"
                if args.dp:
                    line += "\n" + dp_section(family, folder, args)
            print(line, flush=True)


if __name__ == "__main__":
    main()
