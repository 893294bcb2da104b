"""SecAgg+ throughput against Flower 1.42's SecAgg+ and against the cryptographic floor.

Run from the repository root::

    .venv/bin/python benchmarks/bench_secagg.py            # the full grid
    .venv/bin/python benchmarks/bench_secagg.py --quick    # small sizes, a sanity run

What is measured (best of ``--repeats`` runs for (a); one run per round configuration):

(a) **Mask expansion** of P = 1e7 values: Flower's ``pseudo_rand_gen`` (a 32-bit seed folded
    from the shared secret, numpy MT19937, int64 output) against fedbrain's AES-256-CTR
    keystream into a preallocated buffer, and ``MaskExpander.add_mask_inplace`` (keystream
    plus the wrapping uint32 add). **Client masking step** (quantize + self mask + 3 pairwise
    masks, P = 1e7): Flower's ``_collect_masked_vectors`` arithmetic (quantize, factor_combine,
    4 ``pseudo_rand_gen`` masks with ECDH-derived seeds, add/subtract, mod) against
    ``ClientSession.masked_input`` (decrypting its 3 shares, X25519 + HKDF per peer, stochastic
    quantization, 4 AES-CTR masks).
(b) **A whole in-process round** (best of ``--repeats`` where N*P <= 2e7, else one run, after
    a small warm-up round): every client's and the server's work in every stage, no network
    (messages still go through ``to_record``/``from_record``), for N clients, P values,
    k = min(N-1, 2*ceil(log2 N)) neighbours, t = k//2 + 1, with 0% or 20% of the clients
    dropping after sharing keys (the case that makes the server rebuild mask keys). The
    **floor** is measured in the same run: AES-256-CTR expansion of the N*(k+1) client mask
    streams plus the survivors' self masks (time of one P-value stream into a preallocated
    buffer, times the number of streams) plus one pass summing N vectors.
(c) **Server time against the number of clients dropped after sharing keys** (N = 20,
    P = 1e6): each one costs the server its rebuilt key and one mask stream per arrived
    neighbour, so the extra time grows linearly.

All clients share one float32 input array (read-only), so memory is O(P) beyond the server's
accumulator and one masked vector in flight.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregation.secagg import (
    ClientSession,
    SecAggMessage,
    SecAggParams,
    ServerSession,
    Stage,
)
from aggregation.secagg.primitives import MaskExpander

_CHUNK = 1 << 16


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def keystream_into_buffer(key: bytes, size: int, zeros: bytes, buf: memoryview) -> None:
    """AES-256-CTR keystream of ``size`` uint32 values into a preallocated 256 KiB buffer."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    for start in range(0, size, _CHUNK):
        count = min(_CHUNK, size - start) * 4
        encryptor.update_into(zeros[:count], buf[:count])


# -- (a) ------------------------------------------------------------------------------------
def bench_mask_expansion(size: int, repeats: int) -> list[tuple[str, float]]:
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    seed = os.urandom(32)
    zeros = bytes(_CHUNK * 4)
    scratch = np.empty(_CHUNK, dtype=np.uint32)
    buf = memoryview(scratch.view(np.uint8).data)
    full = np.empty(size, dtype=np.uint32)
    full_buf = memoryview(full.view(np.uint8).data)
    big_zeros = bytes(size * 4)
    vector = np.zeros(size, dtype=np.uint32)
    expander = MaskExpander()

    def full_buffer() -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        enc.update_into(big_zeros, full_buf)

    from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition

    flower_vector = [np.zeros(size, dtype=np.int64)]
    return [
        (
            "Flower 1.42 `pseudo_rand_gen` (MT19937, int64)",
            best_of(lambda: pseudo_rand_gen(seed, 2**32, [(size,)]), repeats),
        ),
        (
            "Flower 1.42 `pseudo_rand_gen` + `parameters_addition` (int64)",
            best_of(
                lambda: parameters_addition(flower_vector, pseudo_rand_gen(seed, 2**32, [(size,)])),
                repeats,
            ),
        ),
        ("AES-256-CTR keystream into a preallocated P-sized buffer", best_of(full_buffer, repeats)),
        (
            "AES-256-CTR keystream, chunked into a 256 KiB buffer",
            best_of(lambda: keystream_into_buffer(seed, size, zeros, buf), repeats),
        ),
        (
            "fedbrain `add_mask_inplace` (keystream + uint32 add)",
            best_of(lambda: expander.add_mask_inplace(vector, seed), repeats),
        ),
    ]


def flower_masking_step(update: list[NDArray[np.float32]], peers: int) -> None:
    """Flower 1.42 ``_collect_masked_vectors`` arithmetic (no transport, no share decryption)."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.quantization import quantize
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
    from flwr.supercore.primitives.asymmetric import generate_key_pairs

    clipping_range, target_range, mod_range = 8.0, 2**22, 2**32
    sk, _ = generate_key_pairs()
    peer_pks = [generate_key_pairs()[1] for _ in range(peers)]
    q_ratio = round(1.0 * target_range)
    params = parameters_multiply(update, q_ratio / target_range)
    quantized = quantize(params, clipping_range, target_range)
    quantized = factor_combine(q_ratio, quantized)
    dims = [a.shape for a in quantized]
    quantized = parameters_addition(quantized, pseudo_rand_gen(os.urandom(32), mod_range, dims))
    for i, pk in enumerate(peer_pks):
        mask = pseudo_rand_gen(generate_shared_key(sk, pk), mod_range, dims)
        op = parameters_addition if i % 2 else parameters_subtraction
        quantized = op(quantized, mask)
    parameters_mod(quantized, mod_range)


def fedbrain_client_for_masking(size: int) -> tuple[ClientSession, SecAggMessage]:
    """A client with 3 neighbours, ready for its masked-input request (N = 4, k = 3)."""
    params = SecAggParams(
        num_clients=4, num_neighbours=3, threshold=3, vector_length=size, clipping_range=1.0
    )
    nodes = [1, 2, 3, 4]
    server = ServerSession(
        params, run_id=1, server_round=1, node_ids=nodes, rng=np.random.default_rng(0)
    )
    clients = {n: ClientSession(n) for n in nodes}
    for n, a in server.advertise_keys().items():
        server.receive(clients[n].advertise_keys(a))
    for n, s in server.share_keys().items():
        server.receive(clients[n].share_keys(s))
    requests = server.masked_input()
    return clients[1], requests[1]


def bench_client_step(size: int, repeats: int) -> list[tuple[str, float]]:
    rng = np.random.default_rng(0)
    update = rng.normal(0, 0.3, size).astype(np.float32)
    flower_time = best_of(lambda: flower_masking_step([update], 3), repeats)
    times = []
    for _ in range(repeats + 1):
        client, request = fedbrain_client_for_masking(size)
        start = time.perf_counter()
        client.handle(request, update, rng)
        times.append(time.perf_counter() - start)
    return [
        ("Flower 1.42 (quantize + 4 `pseudo_rand_gen` masks, int64 upload)", flower_time),
        ("fedbrain `ClientSession.masked_input` (uint32 upload)", min(times[1:])),
    ]


# -- (b) ------------------------------------------------------------------------------------
def timed_round(
    params: SecAggParams,
    update: NDArray[np.float32],
    dropped: set[int],
    seed: int,
) -> tuple[float, float, int]:
    """One round; returns (client seconds, server seconds, number of masked inputs)."""
    nodes = list(range(1, params.num_clients + 1))
    server_time = 0.0
    client_time = 0.0
    rng = np.random.default_rng(seed)
    server = ServerSession(params, run_id=1, server_round=1, node_ids=nodes, rng=rng)
    clients = {n: ClientSession(n) for n in nodes}
    stages: list[tuple[Stage, Callable[[], dict[int, SecAggMessage]]]] = [
        (Stage.ADVERTISE_KEYS, server.advertise_keys),  # type: ignore[list-item]
        (Stage.SHARE_KEYS, server.share_keys),  # type: ignore[list-item]
        (Stage.MASKED_INPUT, server.masked_input),  # type: ignore[list-item]
        (Stage.UNMASK, server.unmask),  # type: ignore[list-item]
    ]
    for stage, open_stage in stages:
        start = time.perf_counter()
        requests = open_stage()
        server_time += time.perf_counter() - start
        for node, request in requests.items():
            if stage == Stage.MASKED_INPUT and node in dropped:
                continue
            start = time.perf_counter()
            message = type(request).from_record(request.to_record())
            reply = clients[node].handle(message, update, rng)
            record = reply.to_record()
            client_time += time.perf_counter() - start
            start = time.perf_counter()
            server.receive(type(reply).from_record(record))
            server_time += time.perf_counter() - start
    start = time.perf_counter()
    result = server.result()
    server_time += time.perf_counter() - start
    return client_time, server_time, len(result.contributors)


def floor_seconds(params: SecAggParams, survivors: int, repeats: int) -> float:
    """AES-CTR expansion of N*(k+1) + survivors streams plus summing N vectors."""
    size = params.vector_length
    zeros = bytes(_CHUNK * 4)
    scratch = np.empty(_CHUNK, dtype=np.uint32)
    buf = memoryview(scratch.view(np.uint8).data)
    key = os.urandom(32)
    one_stream = best_of(lambda: keystream_into_buffer(key, size, zeros, buf), repeats)
    acc = np.zeros(size, dtype=np.uint32)
    vectors = [np.ones(size, dtype=np.uint32), np.full(size, 2, dtype=np.uint32)]

    def one_add() -> None:
        for v in vectors:
            np.add(acc, v, out=acc)

    one_sum = best_of(one_add, repeats) / len(vectors)
    streams = params.num_clients * (params.num_neighbours + 1) + survivors
    return streams * one_stream + params.num_clients * one_sum


def round_params(n: int, size: int) -> SecAggParams:
    k = min(n - 1, 2 * math.ceil(math.log2(n)))
    return SecAggParams(
        num_clients=n,
        num_neighbours=k,
        threshold=k // 2 + 1,
        vector_length=size,
        clipping_range=1.0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--max-values",
        type=float,
        default=1e9,
        help="skip round configurations with N*P above this",
    )
    parser.add_argument("--sections", default="a,b,c", help="which tables: a, b, c")
    parser.add_argument("--ns", default="", help="comma-separated N for (b), e.g. 20,50")
    parser.add_argument("--ps", default="", help="comma-separated P for (b), e.g. 1e6,1e7")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    a_size = 1_000_000 if args.quick else 10_000_000
    ns = [10, 20] if args.quick else [10, 20, 50]
    ps = [100_000] if args.quick else [100_000, 1_000_000, 10_000_000]
    if args.ns:
        ns = [int(v) for v in args.ns.split(",")]
    if args.ps:
        ps = [int(float(v)) for v in args.ps.split(",")]
    sections = set(args.sections.split(","))

    print(f"# SecAgg+ benchmark ({'quick' if args.quick else 'full'})\n")
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, numpy {np.__version__}\n"
    )

    if "a" in sections:
        section_a(a_size, repeats)
    if "b" in sections:
        section_b(ns, ps, repeats, args.max_values)
    if "c" in sections:
        section_c(100_000 if args.quick else 1_000_000, repeats)


def section_a(a_size: int, repeats: int) -> None:
    print(f"## (a) Mask expansion, P = {a_size:.0e} values\n")
    print("| method | time (s) | G values/s | speed-up vs Flower (like for like) |")
    print("|---|---:|---:|---:|")
    rows = bench_mask_expansion(a_size, repeats)
    # expansion only vs Flower's generator; expansion + add vs Flower's generator + add
    baselines = [rows[0][1], rows[1][1], rows[0][1], rows[0][1], rows[1][1]]
    for (name, seconds), base in zip(rows, baselines, strict=True):
        print(f"| {name} | {seconds:.4f} | {a_size / seconds / 1e9:.2f} | {base / seconds:.1f}x |")

    print(
        f"\n## (a) One client's masking step (quantize + self mask + 3 pairwise), "
        f"P = {a_size:.0e}\n"
    )
    print("| implementation | time (s) | speed-up vs Flower |")
    print("|---|---:|---:|")
    rows = bench_client_step(a_size, repeats)
    base = rows[0][1]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {base / seconds:.1f}x |")


def section_b(ns: list[int], ps: list[int], repeats: int, max_values: float) -> None:
    print("\n## (b) Whole in-process round vs the cryptographic floor\n")
    print(
        "| N | P | k | t | dropped | masked inputs | clients (s) | server (s) | round (s) "
        "| floor (s) | round / floor |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in ps:
        update = np.random.default_rng(0).normal(0, 0.3, size).astype(np.float32)
        for n in ns:
            if n * size > max_values:
                print(f"| {n} | {size:.0e} | | | | | skipped (N*P > --max-values) | | | | |")
                continue
            params = round_params(n, size)
            for rate in (0.0, 0.2):
                dropped = set(range(1, round(rate * n) + 1))
                runs = repeats if n * size <= 2e7 else 1
                try:
                    timed_round(round_params(n, 1000), update[:1000], dropped, seed=n)  # warm-up
                    client_s, server_s, arrived = min(
                        (timed_round(params, update, dropped, seed=n) for _ in range(runs)),
                        key=lambda r: r[0] + r[1],
                    )
                except Exception as error:  # report and go on
                    print(f"| {n} | {size:.0e} | | | {len(dropped)} | error: {error} | | | | | |")
                    continue
                floor = floor_seconds(params, arrived, repeats)
                total = client_s + server_s
                print(
                    f"| {n} | {size:.0e} | {params.num_neighbours} | {params.threshold} | "
                    f"{len(dropped)} | {arrived} | {client_s:.3f} | {server_s:.3f} | "
                    f"{total:.3f} | {floor:.3f} | {total / floor:.2f} |"
                )


def section_c(size: int, repeats: int) -> None:
    n = 20
    params = round_params(n, size)
    update = np.random.default_rng(0).normal(0, 0.3, size).astype(np.float32)
    print(
        f"\n## (c) Server time vs dropped clients (N = {n}, P = {size:.0e}, "
        f"k = {params.num_neighbours}, t = {params.threshold})\n"
    )
    print("| dropped after sharing keys | server (s) | extra vs 0 dropped (s) | per dropped (s) |")
    print("|---:|---:|---:|---:|")
    base_server = 0.0
    for count in (0, 1, 2, 4, 6):
        server_s = min(
            timed_round(params, update, set(range(1, count + 1)), seed=7)[1] for _ in range(repeats)
        )
        base_server = server_s if count == 0 else base_server
        extra = server_s - base_server
        per = f"{extra / count:.4f}" if count else ""
        print(f"| {count} | {server_s:.3f} | {extra:.3f} | {per} |")


if __name__ == "__main__":
    main()
