"""Kill `fedbrain simulate` (SIGKILL, whole process group) after its first checkpoint, move
the output folder, then `--resume` in its new place: no round is repeated or lost (ledger),
and the bundle verifies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from manifests.keys import TrustedKeys
from manifests.verify import verify_bundle
from server.ledger import Ledger, RunStatus

SCENARIO = """
[simulation]
name = "kill-resume"
seed = 5

[[nodes]]
type = "encoder"
count = 3
modalities = ["vision"]
examples = { vision = 60 }
partition = "iid"

[[jobs]]
component = "vision"
base_model = "vit-base16"
task = "embed"
embedding_dim = 16
hidden_size = 32
num_layers = 1
num_heads = 2
input_size = 32
batch_size = 16
epochs = 1
checkpoint_interval = 1
privacy_level = "dp+secure-agg"
federation = { num_rounds = 3, reliability_threshold = 0.1 }
dp.unit = "example"
dp.clipping_norm = 1.0
dp.target_epsilon = 8.0
dp.delta = 1e-5
dp.epsilon_budget = 10.0
secagg = { quantization_range = 4.0 }
"""
ARTIFACT = "vision-vit-base16-embed-v1"


def _fedbrain(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("fedbrain")), *args]


@pytest.mark.slow
def test_killed_simulation_resumes_in_a_moved_folder_without_repeating_or_losing_a_round(
    tmp_path: Path,
) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO)
    out = tmp_path / "out"
    run_dir = out / "runs" / ARTIFACT
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(
        _fedbrain("simulate", str(scenario), "--out", str(out)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "round-00001").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 240 s"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        log.close()

    with Ledger.for_run_dir(out, create=False) as ledger:  # one ledger for every job
        (killed,) = ledger.list_runs()
        before = {r.round: r.recorded_at for r in ledger.rounds(killed.run_id)}
    assert killed.status is RunStatus.RUNNING  # nobody got to close it
    assert 1 in before and len(before) < 3

    moved = tmp_path / "moved"
    out.rename(moved)  # the killed run's lock does not travel; its paths are relative
    run_dir = moved / "runs" / ARTIFACT
    second = subprocess.run(
        _fedbrain("simulate", str(scenario), "--out", str(moved), "--resume"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"run {killed.run_id}: resumed after round" in " ".join(second.stdout.split())

    with Ledger.for_run_dir(moved, create=False) as ledger:
        (run,) = ledger.list_runs()
        rounds = ledger.rounds(run.run_id)
    assert run.run_id == killed.run_id and run.status is RunStatus.COMPLETED
    assert [r.round for r in rounds] == [1, 2, 3]  # none lost, none twice
    assert rounds[0].recorded_at == before[1]  # the checkpointed round was kept, not redone
    bundle = run_dir / f"{ARTIFACT}.zip"
    assert run.bundle_path is not None and Path(run.bundle_path).samefile(bundle)
    assert not out.exists()  # nothing was written to the old place
    trusted = TrustedKeys.load(moved / "keys" / "trusted_keys.json")
    manifest = verify_bundle(bundle, trusted).manifest
    assert manifest.provenance.rounds == 3
    assert manifest.provenance.participants_per_round == [3, 3, 3]
    assert manifest.provenance.dp is not None
    assert manifest.provenance.dp.epsilon == pytest.approx(rounds[-1].epsilon)
