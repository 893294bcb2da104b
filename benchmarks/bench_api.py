"""Operator API read latency under load while a run writes rounds; no round lost or duplicated.

    .venv/bin/python benchmarks/bench_api.py [--backends sqlite,postgresql] [--clients 50]
        [--rounds 150] [--interval 0.2] [--participants 10]

For each backend: `fedbrain serve`'s app (uvicorn, one process, no job worker) on a fresh
database; a writer process records ``--rounds`` rounds of one run through the ledger
(``Ledger.record_round``, ``--participants`` nodes each, one every ``--interval`` s); meanwhile
``--clients`` concurrent HTTP clients (asyncio, httpx) read as the dashboard does: the runs
list, the run, and the rounds after the last one they saw (``?after=N``), in a loop. Reported:
p50/p99/max latency per route, requests per second, errors. Checked: every client saw rounds
1..N exactly once and in order (incremental reads neither lose nor repeat a round), and the
final ``/rounds`` has exactly 1..N. PostgreSQL is a throwaway cluster (Debian's postgresql,
as in the tests). Requests go to 127.0.0.1 only and the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUN_ID = "bench-run"


def _serve(database_url: str, data_dir: str, port: int) -> None:
    import uvicorn

    from server.api.app import ApiSettings, create_app

    app = create_app(
        ApiSettings(database_url=database_url, data_dir=Path(data_dir), start_worker=False)
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _write(database_url: str, rounds: int, interval: float, participants: int) -> None:
    from server.ledger import (
        Ledger,
        Participant,
        ParticipantOutcome,
        Phase,
        RoundRecord,
        RunStatus,
    )

    with Ledger(database_url) as ledger:
        for number in range(1, rounds + 1):
            started = time.monotonic()
            ledger.record_round(
                RUN_ID,
                RoundRecord(
                    round=number,
                    sampled=participants,
                    responded=participants - 1,
                    dropped_by_stage={"masked_input": 1},
                    timings={"train": 1.0, "secagg": 0.5, "eval": 0.2},
                    metrics={
                        "train": {"train_loss": 1.0 / number},
                        "eval": {"eval_loss": 1.1 / number, "eval_accuracy": 0.5},
                    },
                    epsilon=0.01 * number,
                    delta=1e-5,
                    reliability=0.9,
                    participants=tuple(
                        Participant(
                            node_id=2**63 + n,
                            node_type="encoder",
                            outcome=ParticipantOutcome.DROPPED
                            if n == 0
                            else ParticipantOutcome.CONTRIBUTED,
                            stage="masked_input" if n == 0 else "unmask",
                            phase=phase,
                        )
                        for n in range(participants)
                        for phase in (Phase.TRAIN, Phase.EVAL)
                    ),
                ),
            )
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
        ledger.finish_run(RUN_ID, RunStatus.COMPLETED, reliability=0.9)


def _setup(database_url: str) -> str:
    from server.api.auth import KeyStore
    from server.api.store import ApiStore
    from server.ledger import Ledger

    with Ledger(database_url) as ledger:
        for i in range(20):  # other runs in the list
            ledger.start_run(
                run_id=f"old-{i:02d}",
                artifact_name="sensing-iot-normalizer-v1",
                job={"federation.num_rounds": 1},
                privacy_level="dp+secure-agg",
                dp_unit="example",
            )
        ledger.start_run(
            run_id=RUN_ID,
            artifact_name="vision-vit-base16-embed-v1",
            job={"federation.num_rounds": 0},
            privacy_level="dp+secure-agg",
            dp_unit="example",
        )
    store = ApiStore(database_url)
    _, key = KeyStore(store).create(name="bench", role="viewer", created_by="bench")
    store.close()
    return key


async def _client(
    url: str, key: str, stop: asyncio.Event, latencies: dict[str, list[float]], errors: list[str]
) -> list[int]:
    seen: list[int] = []
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as http:
        step = 0
        while True:
            done = stop.is_set()
            step += 1
            targets = [("rounds?after", f"/api/v1/runs/{RUN_ID}/rounds?after={len(seen)}")]
            if step % 5 == 0:
                targets.append(("runs", "/api/v1/runs?limit=50"))
            if step % 5 == 2:
                targets.append(("run", f"/api/v1/runs/{RUN_ID}"))
            for name, path in targets:
                started = time.perf_counter()
                try:
                    response = await http.get(path)
                except httpx.HTTPError as exc:
                    errors.append(f"{name}: {type(exc).__name__}")
                    continue
                latencies[name].append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors.append(f"{name}: HTTP {response.status_code}")
                    continue
                if name == "rounds?after":
                    seen.extend(r["round"] for r in response.json())
            if done:
                return seen


@dataclass
class LoadResult:
    latencies: dict[str, list[float]]
    errors: list[str]
    seen: list[list[int]]
    final: list[int]
    seconds: float


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _load(url: str, key: str, clients: int, writer: mp.Process) -> LoadResult:
    stop = asyncio.Event()  # set when the writer is done
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: list[str] = []
    started = time.perf_counter()
    tasks = [
        asyncio.create_task(_client(url, key, stop, latencies, errors)) for _ in range(clients)
    ]
    await asyncio.sleep(1.0)  # the dashboards are open when the run starts writing
    writer.start()
    while writer.is_alive():
        await asyncio.sleep(0.05)
    stop.set()
    seen = await asyncio.gather(*tasks)
    seconds = time.perf_counter() - started
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ) as http:
        final = [r["round"] for r in (await http.get(f"/api/v1/runs/{RUN_ID}/rounds")).json()]
    return LoadResult(latencies, errors, list(seen), final, seconds)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def bench(backend: str, database_url: str, args: argparse.Namespace, data_dir: Path) -> bool:
    key = _setup(database_url)
    port = _free_port()
    server = mp.Process(target=_serve, args=(database_url, str(data_dir), port), daemon=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the API server did not start")
        time.sleep(0.2)
    writer = mp.Process(
        target=_write, args=(database_url, args.rounds, args.interval, args.participants)
    )
    try:
        result = asyncio.run(_load(url, key, args.clients, writer))
    finally:
        writer.join(60)
    if server.is_alive() is False:
        raise RuntimeError("the API server died")
    full = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as http:
        for _ in range(5):
            started = time.perf_counter()
            http.get(f"/api/v1/runs/{RUN_ID}/rounds").raise_for_status()
            full.append(time.perf_counter() - started)
    server.terminate()
    server.join(30)
    expected = list(range(1, args.rounds + 1))
    lost_or_dup = [i for i, seen in enumerate(result.seen) if seen != expected]
    final_ok = result.final == expected
    latencies = result.latencies
    total = sum(len(v) for v in latencies.values())
    print(
        f"\n{backend}: {args.clients} clients, {args.rounds} rounds written every "
        f"{args.interval * 1000:.0f} ms ({args.participants} nodes x 2 phases each), "
        f"{result.seconds:.1f} s, {total} requests ({total / result.seconds:.0f}/s), "
        f"{len(result.errors)} errors"
    )
    print(f"  {'route':<14} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name in ("rounds?after", "run", "runs"):
        values = latencies.get(name, [])
        if values:
            print(
                f"  {name:<14} {len(values):>8} {statistics.median(values) * 1000:>8.1f} "
                f"{_quantile(values, 0.99) * 1000:>8.1f} {max(values) * 1000:>8.1f}"
            )
    print(
        f"  one client reading all {args.rounds} rounds at once (opening a finished run): "
        f"{statistics.median(full) * 1000:.0f} ms (median of 5, idle server)"
    )
    print(
        f"  every client saw rounds 1..{args.rounds} exactly once, in order: "
        f"{'yes' if not lost_or_dup else f'NO ({len(lost_or_dup)} clients)'}; "
        f"final /rounds is 1..{args.rounds}: {'yes' if final_ok else 'NO'}"
    )
    if result.errors:
        print("  errors:", sorted(set(result.errors))[:5])
    return not lost_or_dup and final_ok and not result.errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--participants", type=int, default=10)
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, "
        f"{datetime.now(UTC):%Y-%m-%d}"
    )
    ok = True
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as folder:
            if backend == "sqlite":
                ok &= bench(backend, f"sqlite:///{folder}/bench.sqlite", args, Path(folder))
            elif backend == "postgresql":
                from tests.server.postgres import postgres_server

                with postgres_server() as pg:
                    ok &= bench(backend, pg.new_database(), args, Path(folder))
            else:
                parser.error(f"unknown backend {backend!r}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
