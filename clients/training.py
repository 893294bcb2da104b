"""Local training and evaluation on a node (plain PyTorch; no Flower).

Tasks (``manifests.catalog.Task``):

- ``embed`` -- by default self-supervised: two augmented views of every example, NT-Xent /
  InfoNCE over the batch (SimCLR, Chen et al. 2020) on the projected embeddings with cosine
  similarity and ``temperature``. With ``embed_loss="supervised"`` the classifier head over the
  embedding is trained with cross-entropy on the labels instead. NT-Xent couples the examples of
  a batch (each one is the others' negative), so one example's influence is not confined to its
  own per-sample gradient: with example-level DP-SGD the supervised loss is required.
- ``classification`` -- cross-entropy on the classifier head (the model needs ``num_classes``).
- ``lm-finetune`` -- next-byte cross-entropy; per example the mean over its non-PAD targets,
  then the mean over the batch.
- ``detection`` -- not supported yet (``ValueError``).

Every loss is a mean over the examples of the batch (Opacus ``loss_reduction="mean"``), the two
views are two forward passes (Opacus accumulates both into the example's per-sample gradient)
and no operation modifies activations in place, so the loop runs unchanged on the module,
optimizer and Poisson data loader that ``aggregation.dp_sgd.make_private`` returns.

Randomness: augmentations draw from the ``torch.Generator`` passed in; dropout uses torch's
global RNG, forked and seeded from that generator for the duration of the call.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 -- the PyTorch convention
from torch import Tensor, nn
from torch.utils.data import DataLoader

from aggregation.dp_sgd import PrivateTraining
from clients.data import MASK_ID, PAD_ID
from clients.models import EncoderModel, EncoderOutput, ModelFamily, unwrap
from manifests.catalog import Task
from manifests.jobspec import Optimizer

__all__ = [
    "EmbedLoss",
    "TrainResult",
    "augment",
    "embed_examples",
    "evaluate",
    "evaluation_rows",
    "make_optimizer",
    "nearest_centroid_accuracy",
    "nt_xent_loss",
    "train_local",
]

Batch = tuple[Tensor, Tensor]


class EmbedLoss(StrEnum):
    """How the ``embed`` task is trained."""

    NT_XENT = "nt-xent"
    SUPERVISED = "supervised"


@dataclass(frozen=True, slots=True)
class TrainResult:
    """One local training call.

    ``num_examples`` is the size of the training set (the FedAvg weight); ``mean_loss`` the
    mean batch loss over every step; ``seconds`` the wall-clock time of the loop.
    """

    num_examples: int
    mean_loss: float
    steps: int
    seconds: float


_TRAINABLE = (Task.EMBED, Task.CLASSIFICATION, Task.LM_FINETUNE)


def _task(task: Task | str) -> Task:
    try:
        value = Task(task)
    except ValueError:
        raise ValueError(
            f"Unknown task {task!r}; local training supports "
            f"{', '.join(str(t) for t in _TRAINABLE)}."
        ) from None
    if value is Task.DETECTION:
        raise ValueError("task 'detection' is not supported yet")
    if value not in _TRAINABLE:
        raise ValueError(
            f"task {str(value)!r} is federated analytics, not model training: use clients.sensing."
        )
    return value


def make_optimizer(
    model: nn.Module,
    name: Optimizer | str,
    *,
    learning_rate: float,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The local optimizer (``sgd`` with momentum 0.9, ``adam``, ``adamw``) over ``model``."""
    problems = []
    if not learning_rate > 0:
        problems.append(f"`learning_rate` must be positive. Found {learning_rate}.")
    if not weight_decay >= 0:
        problems.append(f"`weight_decay` must be >= 0. Found {weight_decay}.")
    try:
        kind = Optimizer(name)
    except ValueError:
        problems.append(
            f"Unknown optimizer {name!r}; choose one of {', '.join(o.value for o in Optimizer)}."
        )
    if problems:
        raise ValueError(" ".join(problems))
    params = [p for p in model.parameters() if p.requires_grad]
    if kind is Optimizer.SGD:
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9, weight_decay=weight_decay)
    if kind is Optimizer.ADAM:
        return torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


# ------------------------------------------------------------------------ augmentations


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device)


def augment(inputs: Tensor, family: ModelFamily, generator: torch.Generator) -> Tensor:
    """A random view of a batch (new tensor; ``inputs`` is not modified).

    Images ``(B, 3, H, W)``: random resized crop (scale 0.6-1 per side), horizontal flip,
    colour distortion (per-channel gain 0.6-1.4, or grey with p=0.2), brightness shift and
    Gaussian noise (std 0.05). Audio ``(B, T)``: gain 0.6-1.4, a circular
    time shift of up to 10 % and noise (std 0.005). Byte ids ``(B, L)``: 15 % of the non-PAD,
    byte positions replaced by ``MASK_ID``. Random draws happen on CPU.
    """
    b, device = inputs.shape[0], inputs.device
    if family is ModelFamily.VIT:
        scale = _uniform(b, 0.6, 1.0, generator, device)
        flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0).to(device)
        tx = _uniform(b, -1.0, 1.0, generator, device) * (1 - scale)
        ty = _uniform(b, -1.0, 1.0, generator, device) * (1 - scale)
        theta = torch.zeros(b, 2, 3, device=device)
        theta[:, 0, 0] = scale * flip
        theta[:, 0, 2] = tx
        theta[:, 1, 1] = scale
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta, list(inputs.shape), align_corners=False)
        view = F.grid_sample(
            inputs, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )
        gains = (0.6 + 0.8 * torch.rand(b, 3, 1, 1, generator=generator)).to(device)
        gray = (torch.rand(b, 1, 1, 1, generator=generator) < 0.2).to(device)
        colored = torch.where(gray, view.mean(1, keepdim=True).expand_as(view), view * gains)
        shift = _uniform(b, -0.2, 0.2, generator, device).view(b, 1, 1, 1)
        noise = torch.randn(inputs.shape, generator=generator).to(device) * 0.05
        return (colored + shift + noise).clamp(-1.0, 1.0)
    if family is ModelFamily.WAV2VEC2:
        t = inputs.shape[1]
        gain = _uniform(b, 0.6, 1.4, generator, device).unsqueeze(1)
        max_shift = max(1, t // 10)
        shifts = torch.randint(-max_shift, max_shift + 1, (b, 1), generator=generator)
        index = (torch.arange(t).unsqueeze(0) - shifts) % t
        shifted = torch.gather(inputs, 1, index.to(device))
        noise = torch.randn(inputs.shape, generator=generator).to(device) * 0.005
        return shifted * gain + noise
    if family is ModelFamily.MPNET:
        maskable = (inputs < 256).cpu()
        hit = (torch.rand(inputs.shape, generator=generator) < 0.15) & maskable
        return torch.where(hit.to(device), torch.full_like(inputs, MASK_ID), inputs)
    return inputs.clone()


def nt_xent_loss(z1: Tensor, z2: Tensor, *, temperature: float) -> Tensor:
    """NT-Xent (SimCLR): cross-entropy of each view against its partner among 2B-1 others.

    ``z1[i]`` and ``z2[i]`` are the two views of example ``i``; cosine similarity / temperature.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"Views must be (B, D) of equal shape. Found {z1.shape}, {z2.shape}.")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = z @ z.t() / temperature
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, targets)


# ---------------------------------------------------------------------------- the loop


def _encoder(model: nn.Module) -> EncoderModel:
    inner = unwrap(model)
    if not isinstance(inner, EncoderModel):
        raise TypeError(
            f"This task needs an encoder (clients.models.EncoderModel). Found "
            f"{type(inner).__name__}."
        )
    return inner


def _output(model: nn.Module, x: Tensor) -> EncoderOutput:
    out = model(x)
    if not isinstance(out, EncoderOutput):
        raise TypeError(f"Expected an EncoderOutput from the model. Found {type(out).__name__}.")
    return out


def _logits(out: EncoderOutput) -> Tensor:
    if out.logits is None:
        raise ValueError("This loss needs a classifier head: build the model with `num_classes`.")
    return out.logits


def _require_labels(y: Tensor, what: str) -> None:
    if bool((y < 0).any()):
        raise ValueError(f"{what} needs labelled data (label -1 means unlabelled).")


def _lm_loss(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example mean next-byte loss, plus per-token correctness and target mask."""
    positions = torch.arange(x.shape[1], device=x.device).expand_as(x)  # per-example (Opacus)
    logits = model(input_ids=x, attention_mask=x.ne(PAD_ID).long(), position_ids=positions).logits
    targets = x[:, 1:]
    mask = targets.ne(PAD_ID).to(logits.dtype)
    token_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).view_as(mask)
    per_example = (token_loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    correct = logits[:, :-1].argmax(-1).eq(targets).to(logits.dtype) * mask
    return per_example, correct, mask


def _batch_loss(
    model: nn.Module,
    batch: Batch,
    task: Task,
    *,
    family: ModelFamily | None,
    embed_loss: EmbedLoss,
    temperature: float,
    generator: torch.Generator,
) -> Tensor:
    x, y = batch
    if task is Task.LM_FINETUNE:
        return _lm_loss(model, x)[0].mean()
    if task is Task.CLASSIFICATION or embed_loss is EmbedLoss.SUPERVISED:
        _require_labels(y, f"task {str(task)!r} with a supervised loss")
        view = augment(x, family, generator) if task is Task.EMBED and family else x
        return F.cross_entropy(_logits(_output(model, view)), y)
    if family is None:
        raise TypeError("NT-Xent needs an encoder model.")
    z1 = _output(model, augment(x, family, generator)).embedding
    z2 = _output(model, augment(x, family, generator)).embedding
    return nt_xent_loss(z1, z2, temperature=temperature)


@contextmanager
def _seeded_torch(generator: torch.Generator, device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        torch.manual_seed(seed)
        yield


def _dataset_size(loader: Iterable[Batch]) -> int | None:
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """A DP-SGD step on an empty Poisson batch: a zero clipped sum plus the Gaussian noise,
    counted by the accountant's step hook (Opacus's ``DPOptimizer`` handles empty per-sample
    gradients)."""
    optimizer.zero_grad()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad:
                empty = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                setattr(p, "grad_sample", empty)  # noqa: B010 -- Opacus's per-sample slot
    optimizer.step()


def train_local(
    model: nn.Module,
    loader: DataLoader[Batch],
    *,
    task: Task | str,
    epochs: int,
    optimizer: Optimizer | str,
    learning_rate: float,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    generator: torch.Generator,
    dp: PrivateTraining[Batch] | None = None,
    embed_loss: EmbedLoss | str = EmbedLoss.NT_XENT,
    temperature: float = 0.2,
    clock: Callable[[], float] = time.perf_counter,
) -> TrainResult:
    """Train ``model`` on ``loader``'s ``(input, label)`` batches for ``epochs``, in place.

    Without ``dp`` an optimizer is made by :func:`make_optimizer`. With ``dp`` (from
    ``aggregation.dp_sgd.make_private``, over an optimizer from :func:`make_optimizer`) its
    private module, optimizer and Poisson data loader are used -- ``model`` must be that module
    or the one it wraps, and ``optimizer``/``learning_rate``/``weight_decay`` must be the ones
    the private optimizer was made with. An empty Poisson batch still takes its noised (and
    accounted) step under DP -- the subsampled Gaussian analysis assumes every step is taken --
    and is skipped without DP.
    """
    kind = _task(task)
    loss_kind = EmbedLoss(embed_loss)
    problems = []
    if epochs < 1:
        problems.append(f"`epochs` must be >= 1. Found {epochs}.")
    if not temperature > 0:
        problems.append(f"`temperature` must be positive. Found {temperature}.")
    if problems:
        raise ValueError(" ".join(problems))
    if dp is not None:
        if unwrap(model) is not unwrap(dp.module):
            raise ValueError("With `dp`, `model` must be `dp.module` or the model it wraps.")
        if kind is Task.EMBED and loss_kind is EmbedLoss.NT_XENT:
            raise ValueError(
                "NT-Xent mixes the examples of a batch, so example-level DP-SGD cannot bound "
                "one example's influence: train the embed task with "
                "`embed_loss='supervised'` (labelled data, a classifier head) under DP."
            )
        net: nn.Module = dp.module
        opt = dp.optimizer
        batches: Iterable[Batch] = dp.data_loader
    else:
        net = model
        opt = make_optimizer(
            model, optimizer, learning_rate=learning_rate, weight_decay=weight_decay
        )
        batches = loader
    family = None if kind is Task.LM_FINETUNE else _encoder(model).family
    dev = torch.device(device)
    net.to(dev)
    net.train()
    total_loss, steps, seen = 0.0, 0, 0
    start = clock()
    with _seeded_torch(generator, dev):
        for _ in range(epochs):
            for x_cpu, y_cpu in batches:
                if x_cpu.shape[0] == 0:
                    if dp is not None:
                        _noise_only_step(opt)
                    continue
                x, y = x_cpu.to(dev), y_cpu.to(dev)
                opt.zero_grad()
                loss = _batch_loss(
                    net,
                    (x, y),
                    kind,
                    family=family,
                    embed_loss=loss_kind,
                    temperature=temperature,
                    generator=generator,
                )
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"The training loss became {loss.item()} at step {steps + 1}; "
                        "lower the learning rate."
                    )
                torch.autograd.backward(loss)
                opt.step()
                total_loss += float(loss.detach())
                steps += 1
                seen += int(x.shape[0])
    seconds = clock() - start
    size = _dataset_size(loader)
    return TrainResult(
        num_examples=size if size is not None else seen // epochs,
        mean_loss=total_loss / steps if steps else math.nan,
        steps=steps,
        seconds=seconds,
    )


# -------------------------------------------------------------------------- evaluation


@torch.no_grad()
def embed_examples(
    model: nn.Module, loader: Iterable[Batch], *, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """Embeddings ``(N, D)`` (float32, CPU) and labels ``(N,)`` of every example."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    dev = torch.device(device)
    embeddings, labels = [], []
    try:
        for x, y in loader:
            embeddings.append(_output(net, x.to(dev)).embedding.float().cpu())
            labels.append(y.cpu())
    finally:
        net.train(was_training)
    return torch.cat(embeddings), torch.cat(labels)


def nearest_centroid_accuracy(embeddings: Tensor, labels: Tensor) -> float:
    """Leave-one-out nearest-centroid accuracy with cosine similarity.

    Each example is classified by the closest class centroid of the L2-normalised embeddings,
    its own class's centroid computed without it. Needs >= 2 classes and >= 2 examples each.
    """
    if bool((labels < 0).any()):
        raise ValueError("Nearest-centroid accuracy needs labelled examples.")
    classes, counts = torch.unique(labels, return_counts=True)
    if classes.numel() < 2 or bool((counts < 2).any()):
        raise ValueError(
            "Nearest-centroid accuracy needs >= 2 classes with >= 2 examples each. "
            f"Found counts {dict(zip(classes.tolist(), counts.tolist(), strict=True))}."
        )
    z = F.normalize(embeddings.double(), dim=1)
    index = torch.searchsorted(classes, labels)
    sums = torch.zeros(classes.numel(), z.shape[1], dtype=z.dtype).index_add(0, index, z)
    centroids = sums / counts.unsqueeze(1).to(z.dtype)
    scores = F.normalize(z, dim=1) @ F.normalize(centroids, dim=1).t()
    own = (sums[index] - z) / (counts[index] - 1).unsqueeze(1).to(z.dtype)
    own_score = (z * F.normalize(own, dim=1)).sum(1)
    scores[torch.arange(z.shape[0]), index] = own_score
    return float((scores.argmax(1) == index).double().mean())


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    task: Task | str,
    device: str | torch.device = "cpu",
    temperature: float = 0.2,
    seed: int = 0,
) -> dict[str, float]:
    """Metrics of ``model`` on held-out batches (no training; the model's mode is restored).

    - classification: ``loss`` (cross-entropy), ``accuracy``;
    - lm-finetune: ``loss`` (mean next-byte cross-entropy, nats), ``accuracy`` (next byte),
      ``bits_per_byte``;
    - embed: ``loss`` (NT-Xent over augmentations seeded by ``seed``) and, on labelled data,
      ``accuracy`` (leave-one-out nearest-centroid, :func:`nearest_centroid_accuracy`).

    Every dict has ``num_examples``.
    """
    kind = _task(task)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    dev = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    total, correct, tokens, n = 0.0, 0.0, 0.0, 0
    embeddings: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for x_cpu, y_cpu in loader:
            x, y = x_cpu.to(dev), y_cpu.to(dev)
            b = int(x.shape[0])
            if b == 0:
                continue
            if kind is Task.LM_FINETUNE:
                per_example, hits, mask = _lm_loss(net, x)
                total += float(per_example.sum())
                correct += float(hits.sum())
                tokens += float(mask.sum())
            elif kind is Task.CLASSIFICATION:
                _require_labels(y, "classification")
                logits = _logits(_output(net, x))
                total += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += float((logits.argmax(1) == y).sum())
            else:
                family = _encoder(net).family
                z1 = _output(net, augment(x, family, generator)).embedding
                z2 = _output(net, augment(x, family, generator)).embedding
                total += float(nt_xent_loss(z1, z2, temperature=temperature)) * b
                embeddings.append(_output(net, x).embedding.float().cpu())
                labels.append(y_cpu)
            n += b
    finally:
        net.train(was_training)
    if n == 0:
        raise ValueError("Evaluation data is empty.")
    metrics = {"loss": total / n, "num_examples": float(n)}
    if kind is Task.LM_FINETUNE:
        metrics["accuracy"] = correct / max(tokens, 1.0)
        metrics["bits_per_byte"] = metrics["loss"] / math.log(2)
    elif kind is Task.CLASSIFICATION:
        metrics["accuracy"] = correct / n
    else:
        all_labels = torch.cat(labels)
        if bool((all_labels >= 0).all()):
            metrics["accuracy"] = nearest_centroid_accuracy(torch.cat(embeddings), all_labels)
    return metrics


@torch.no_grad()
def evaluation_rows(
    model: nn.Module,
    loader: Iterable[Batch],
    *,
    task: Task | str,
    loss_bound: float,
    baseline_log_probs: Tensor | None = None,
    device: str | torch.device = "cpu",
    temperature: float = 0.2,
    seed: int = 0,
) -> npt.NDArray[np.float64]:
    """One row per held-out example, ``[loss, correct, baseline_loss]``, each clipped into
    ``[0, loss_bound]`` (correct into [0, 1]), for metric sums released under DP.

    - classification / supervised embed (the model has a classifier head): cross-entropy of
      the head and top-1 correctness -- the trained classifier's own accuracy;
    - lm-finetune: the sequence's mean next-byte loss, the fraction of its next bytes
      predicted (top-1), and with ``baseline_log_probs`` (a ``(256,)`` tensor of byte
      log-probabilities of a public unigram model) the mean loss of that baseline on the same
      targets;
    - contrastive embed (no head): the NT-Xent loss of the batch the example is in (no
      accuracy; column 1 is 0). Every row depends only on its own example and the (public)
      global model, except for contrastive batches, which are never used under DP.
    """
    kind = _task(task)
    net = unwrap(model)
    was_training = net.training
    net.eval()
    dev = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    rows: list[Tensor] = []
    try:
        for x_cpu, y_cpu in loader:
            x, y = x_cpu.to(dev), y_cpu.to(dev)
            b = int(x.shape[0])
            if b == 0:
                continue
            zeros = torch.zeros(b, device=dev)
            if kind is Task.LM_FINETUNE:
                loss, hits, mask = _lm_loss(net, x)
                correct = hits.sum(1) / mask.sum(1).clamp(min=1.0)
                baseline = zeros
                if baseline_log_probs is not None:
                    targets = x[:, 1:]
                    log_probs = baseline_log_probs.to(dev)
                    nll = -log_probs[targets.clamp(max=log_probs.shape[0] - 1)]
                    baseline = (nll * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                rows.append(torch.stack([loss, correct, baseline], 1))
                continue
            out = _output(net, x)
            if out.logits is not None:
                _require_labels(y, "classifier evaluation")
                loss = F.cross_entropy(out.logits, y, reduction="none")
                correct = out.logits.argmax(1).eq(y).to(loss.dtype)
                rows.append(torch.stack([loss, correct, zeros], 1))
                continue
            family = _encoder(net).family
            z1 = _output(net, augment(x, family, generator)).embedding
            z2 = _output(net, augment(x, family, generator)).embedding
            batch_loss = nt_xent_loss(z1, z2, temperature=temperature)
            rows.append(torch.stack([zeros + batch_loss, zeros, zeros], 1))
    finally:
        net.train(was_training)
    if not rows:
        raise ValueError("Evaluation data is empty.")
    table: npt.NDArray[np.float64] = torch.cat(rows).double().cpu().numpy()
    table[:, 0] = np.clip(table[:, 0], 0.0, loss_bound)
    table[:, 1] = np.clip(table[:, 1], 0.0, 1.0)
    table[:, 2] = np.clip(table[:, 2], 0.0, loss_bound)
    return table
