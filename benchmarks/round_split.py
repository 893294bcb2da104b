"""Per-round time split of a finished `fedbrain simulate` run, read from its run ledgers.

Run from the repository root after a simulation::

    .venv/bin/fedbrain simulate --out runs/simulate
    .venv/bin/python benchmarks/round_split.py runs/simulate

For every job and round: local training (the slowest contributing node's training time, as
the node measured it; nodes train in parallel), secure aggregation (the four SecAgg+ stages as
the server waited for them, minus that training time, plus the server's aggregation step),
evaluation (the ``evaluate.eval`` message batch) and the round's total, all in seconds of wall
time on the server. The ledger records these for every round of every run; this script only
reads them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from server.ledger import Ledger

SECAGG_STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="the simulation's output directory")
    args = parser.parse_args(argv)
    print(f"# Per-round time split, {args.out}\n")
    print("| job | round | local training (s) | secure aggregation (s) | evaluation (s) | "
          "round total (s) | training share |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    # one ledger for the whole simulation (<out>/ledger.sqlite); older outputs: one per job
    files = [args.out / "ledger.sqlite", *sorted(args.out.glob("runs/*/ledger.sqlite"))]
    for ledger_file in (f for f in files if f.is_file()):
        ledger = Ledger.for_run_dir(ledger_file.parent, create=False)
        for run in ledger.list_runs():
            for record in ledger.rounds(run.run_id):
                t = dict(record.timings)
                train = float(record.metrics.get("train", {}).get("max_train_seconds", 0.0))
                stages = sum(float(t.get(s, 0.0)) for s in SECAGG_STAGES)
                plain = float(t.get("fit", 0.0))
                secure = stages - train + float(t.get("aggregate", 0.0)) if stages else 0.0
                other = plain - train if plain else 0.0
                total = float(t.get("total", 0.0))
                share = f"{train / total:.0%}" if total else "-"
                print(
                    f"| {run.artifact_name} | {record.round} | {train:.2f} | "
                    f"{secure + other:.2f} | {float(t.get('eval', 0.0)):.2f} | {total:.2f} | "
                    f"{share} |"
                )
        ledger.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
