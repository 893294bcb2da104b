"""One ``dp+secure-agg`` round of the full-size models: time and peak memory per stage.

Run from the repository root::

    .venv/bin/python benchmarks/bench_fullsize.py                    # 3 models x full, lora
    .venv/bin/python benchmarks/bench_fullsize.py --models vit --modes lora --steps 1

Models, built from their ``transformers`` configs at random init (timing needs no weights):
ViT-B/16 (224 px, ``clients.models`` encoder with a 10-class head), wav2vec2-base (1 s at
16 kHz, 6-class head) and GPT-2 small (the real 50,257-token vocabulary: 124M parameters;
fedbrain's byte-level GPT-2 of the same size has 86M). Modes: ``full`` fine-tuning, and
``lora`` (rank 8, alpha 16, the default targets of ``clients.models.LORA_TARGETS``).

Each (model, mode) runs in its own process (so its memory is its own), one node's side and
the server's side in sequence:

- node ``dp-sgd step``: example-level DP-SGD through ``aggregation.dp_sgd.make_private`` and
  ``clients.training.train_local`` on ``--batch`` examples (Poisson rate 1: every example in
  every step), ``--steps`` steps; the time is the mean of the steps after the first (the
  first, with its allocations, is reported apart);
- node ``flatten+clip``: the trainable tensors' update, flattened to float32 and clipped to
  L2 norm ``C`` (``aggregation.dp.clip_update``, as the node does);
- node ``ring encode (DDP)``: ``aggregation.codec.RingLayout`` with an ``update_ddp``
  (``DdpConfig`` as ``clients.jobs.update_ddp`` builds it: Skellam, group of 3, 2 survivors):
  rotation, conditional rounding and the node's noise share, into Z_(2^32);
- node ``secagg mask``: one node's SecAgg+ work for N = 3 (key agreement, Shamir shares,
  masking its ring vector, unmasking shares), messages serialized as on the wire;
- server ``secagg``: the server's SecAgg+ work for the 3 nodes (routing, unmasking, the sum);
- server ``decode+apply``: ``RingLayout.decode`` of the sum, the mean update added to the
  global trainable tensors.

Memory: ``peak RSS`` is the process's resident set sampled every 2 ms during the stage (what
the machine must hold then; it includes everything already allocated) and ``+RSS`` its rise
over the stage's start; ``tracemalloc`` is the peak of the numpy/Python allocations within the
stage (not torch's). ``ru_maxrss`` (``resource.getrusage``) is the whole process's peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from aggregation.codec import Contribution, RingLayout
from aggregation.ddp import DdpConfig, DistributedMechanism
from aggregation.dp import clip_update
from aggregation.dp_sgd import make_private
from aggregation.secagg import SecAggParams
from aggregation.secagg.client import ClientSession
from aggregation.secagg.messages import MaskedInputRequest, SecAggMessage
from aggregation.secagg.server import ServerSession
from clients.adaptation import adapt, get_trainable_weights, set_trainable_weights
from clients.models import Adaptation, ModelFamily, ModelSpec, build_model
from clients.training import make_optimizer, train_local

CLIP = 1.0
NOISE = 1.0
GROUP = 3
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Stages:
    """Per stage: seconds, peak RSS, RSS rise, tracemalloc peak."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    @contextmanager
    def stage(self, side: str, name: str, *, trace: bool = True) -> Iterator[None]:
        start_rss = _rss()
        peak = [start_rss]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                peak[0] = max(peak[0], _rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        if trace:
            tracemalloc.start()
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            cpu_seconds = time.process_time() - cpu
            traced = tracemalloc.get_traced_memory()[1] if trace else 0
            if trace:
                tracemalloc.stop()
            done.set()
            sampler.join()
            peak[0] = max(peak[0], _rss())
            self.rows.append({
                "side": side, "stage": name, "seconds": seconds, "cpu_seconds": cpu_seconds,
                "peak_rss_mib": peak[0] / MIB, "rise_mib": (peak[0] - start_rss) / MIB,
                "traced_mib": traced / MIB,
            })  # fmt: skip
            # Each finished stage at once, so a run killed later (memory) keeps what it measured.
            print("STAGE " + json.dumps(self.rows[-1]), flush=True)


def _model(name: str) -> tuple[nn.Module, str]:
    if name == "vit":
        spec = ModelSpec(ModelFamily.VIT, embedding_dim=768, num_classes=10)
        return build_model(spec), "classification"
    if name == "wav2vec2":
        spec = ModelSpec(ModelFamily.WAV2VEC2, embedding_dim=768, num_classes=6)
        return build_model(spec), "classification"
    config = GPT2Config(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # GPT-2 small
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return GPT2LMHeadModel(config), "lm-finetune"


def _data(name: str, batch: int, seq: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(batch, dtype=torch.long)
    if name == "vit":
        return TensorDataset(torch.rand(batch, 3, 224, 224, generator=g) * 2 - 1, labels)
    if name == "wav2vec2":
        return TensorDataset(torch.randn(batch, 16_000, generator=g) * 0.1, labels)
    return TensorDataset(torch.randint(0, 256, (batch, seq), generator=g), labels - 1)


def _secagg(
    params: SecAggParams, ring: np.ndarray[Any, np.dtype[np.uint32]], stages: Stages
) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """One SecAgg+ round of GROUP nodes with the same ring vector; node 1's time and the
    server's are recorded as two stages (memory: sampled over the whole round)."""
    nodes = list(range(1, GROUP + 1))
    rng = np.random.default_rng(0)
    spent = {"node": [0.0, 0.0], "server": [0.0, 0.0]}  # wall, CPU

    @contextmanager
    def timed(who: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        spent[who][0] += time.perf_counter() - wall
        spent[who][1] += time.process_time() - cpu

    with stages.stage("server+node", "secagg round (N=3)", trace=False):
        server = ServerSession(params, run_id=1, server_round=1, node_ids=nodes, rng=rng)
        clients = {n: ClientSession(n) for n in nodes}
        openers: list[Callable[[], dict[int, Any]]] = [
            server.advertise_keys, server.share_keys, server.masked_input, server.unmask,
        ]  # fmt: skip
        for open_stage in openers:
            with timed("server"):
                requests: dict[int, SecAggMessage] = open_stage()
            for node, request in requests.items():
                with timed("node") if node == 1 else contextlib.nullcontext():
                    message = type(request).from_record(request.to_record())
                    reply: SecAggMessage = (
                        clients[node].masked_input_quantized(message, ring)
                        if isinstance(message, MaskedInputRequest)
                        else clients[node].handle(message)
                    )
                    record = reply.to_record()
                with timed("server"):
                    server.receive(type(reply).from_record(record))
        with timed("server"):
            total = server.result().total
    round_row = stages.rows.pop()
    for side, name in (("node", "secagg mask (1 of 3)"), ("server", "secagg (3 nodes)")):
        wall, cpu = spent[side]
        stages.rows.append(
            {**round_row, "side": side, "stage": name, "seconds": wall, "cpu_seconds": cpu}
        )
    return total


def run_one(name: str, mode: str, *, batch: int, steps: int, seq: int) -> dict[str, Any]:
    stages = Stages()
    with stages.stage("node", "build model", trace=False):
        model, task = _model(name)
        if mode == Adaptation.LORA:
            adapt(model, Adaptation.LORA, lora_rank=8, lora_alpha=16)
    params = sum(p.numel() for p in model.parameters())
    before = get_trainable_weights(model)
    size = sum(a.size for a in before)
    data = cast(Dataset[tuple[torch.Tensor, torch.Tensor]], _data(name, batch, seq))
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]] = DataLoader(data, batch_size=batch)
    optimizer = make_optimizer(model, "sgd", learning_rate=1e-3)
    private = make_private(model, optimizer, loader, noise_multiplier=NOISE, max_grad_norm=1.0)
    first = 0.0
    for step in range(steps):
        label = "dp-sgd step" if step else "dp-sgd first step"
        with stages.stage("node", label, trace=False):
            train_local(private.module, loader, task=task, epochs=1, optimizer="sgd",
                        learning_rate=1e-3, generator=torch.Generator().manual_seed(step),
                        dp=private)  # fmt: skip
        if step == 0:
            first = stages.rows[-1]["seconds"]
    later = [r for r in stages.rows if r["stage"] == "dp-sgd step"]
    if later:
        mean = sum(r["seconds"] for r in later) / len(later)
        stages.rows = [r for r in stages.rows if r["stage"] != "dp-sgd step"] + [
            {**max(later, key=lambda r: r["peak_rss_mib"]), "seconds": mean}
        ]
    with stages.stage("node", "flatten+clip"):
        after = get_trainable_weights(model)
        flat = np.concatenate([(a - b).ravel() for a, b in zip(after, before, strict=True)])
        update = clip_update([flat], clipping_norm=CLIP).update[0]  # norm in float64
        del after, flat
    cfg = DdpConfig(
        mechanism=DistributedMechanism.SKELLAM, dim=size, l2_clip=CLIP, noise_multiplier=NOISE,
        min_survivors=2, max_summands=GROUP, max_noise_shares=GROUP,
    )  # fmt: skip
    layout = RingLayout(update_length=size, update_range=CLIP, max_summands=GROUP, update_ddp=cfg)
    rotation = os.urandom(32)
    with stages.stage("node", "ring encode (DDP)"):
        ring = layout.encode(
            Contribution(update=update), rotation_seed=rotation, noise_shares=2,
            noise_rng=np.random.default_rng(1),
        )  # fmt: skip
    del update
    sec_params = SecAggParams(
        num_clients=GROUP, num_neighbours=2, threshold=2, vector_length=layout.length,
        clipping_range=1.0,
    )  # fmt: skip
    total = _secagg(sec_params, ring, stages)
    del ring
    with stages.stage("server", "decode+apply"):
        mean_update = layout.decode(total, rotation_seed=rotation).update / GROUP
        arrays, offset = [], 0
        for b in before:
            arrays.append(b + mean_update[offset : offset + b.size].reshape(b.shape))
            offset += b.size
        set_trainable_weights(model, [a.astype(np.float32) for a in arrays])
    return {
        "model": name, "mode": mode, "params": params, "trainable": size,
        "ring_length": layout.length, "batch": batch, "first_step_s": first,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stages": stages.rows,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="vit,wav2vec2,gpt2")
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="GPT-2 tokens per example")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        name, mode = args.one.split(":")
        torch.set_num_threads(args.threads)
        result = run_one(name, mode, batch=args.batch, steps=args.steps, seq=args.seq)
        print("RESULT " + json.dumps(result), flush=True)
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; batch {args.batch}, {args.steps} DP-SGD steps, "
          f"GPT-2 {args.seq} tokens/example")  # fmt: skip
    header = (f"{'model':9s} {'mode':5s} {'side':7s} {'stage':22s} {'seconds':>8s} {'CPU s':>8s} "
              f"{'peak RSS':>9s} {'+RSS':>7s} {'traced':>7s}")  # fmt: skip
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            command = [sys.executable, __file__, "--one", f"{name}:{mode}",
                       "--batch", str(args.batch), "--steps", str(args.steps),
                       "--seq", str(args.seq), "--threads", str(args.threads)]  # fmt: skip
            start = time.perf_counter()
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if out.returncode or not lines:
                print(f"{name} {mode}: failed ({out.returncode})\n{out.stderr[-2000:]}")
                for line in out.stdout.splitlines():
                    if line.startswith("STAGE "):
                        s = json.loads(line[len("STAGE ") :])
                        print(f"{name:9s} {mode:5s} {s['side']:7s} {s['stage']:22s} "
                              f"{s['seconds']:8.3f} {s['cpu_seconds']:8.3f} "
                              f"{s['peak_rss_mib']:8.0f}M {s['rise_mib']:6.0f}M "
                              f"{s['traced_mib']:6.0f}M (finished before the failure)",
                              flush=True)  # fmt: skip
                continue
            r = json.loads(lines[-1][len("RESULT ") :])
            print(f"\n{name} {mode}: {r['params'] / 1e6:.1f}M parameters, "
                  f"{r['trainable'] / 1e6:.2f}M trainable (travel), ring {r['ring_length']:,} "
                  f"uint32; ru_maxrss {r['ru_maxrss_mib']:.0f} MiB; first DP-SGD step "
                  f"{r['first_step_s']:.1f} s; process "
                  f"{time.perf_counter() - start:.0f} s")  # fmt: skip
            print(header)
            for s in r["stages"]:
                print(f"{name:9s} {mode:5s} {s['side']:7s} {s['stage']:22s} "
                      f"{s['seconds']:8.3f} {s['cpu_seconds']:8.3f} {s['peak_rss_mib']:8.0f}M "
                      f"{s['rise_mib']:6.0f}M {s['traced_mib']:6.0f}M", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
