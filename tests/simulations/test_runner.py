"""The simulation runner: node data, keys, outcomes and exit codes, and a real Flower run."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from clients.data import load_audio, load_corpus, load_images, load_sensor_csv, load_texts
from manifests.catalog import NodeType
from manifests.keys import TrustedKeys
from server.options import JobOutcome, JobStatus
from simulations.bases import BaseEvent, resolve_demo_bases
from simulations.runner import (
    DATA_MARKER,
    ExitCode,
    JobResult,
    SimulationResult,
    Verification,
    files_digest,
    materialize_data,
    prepare_keys,
    verify,
    write_summary,
)
from simulations.scenario import Overrides, Scenario, load_scenario

DATA = """\
[simulation]
name = "data"
seed = 11

[[nodes]]
type = "sensing"
count = 3
modalities = ["vision", "audio", "text", "lm", "iot"]
examples = { vision = 40, audio = 12, text = 24, lm = 10, iot = 300 }
partition = { kind = "dirichlet", alpha = 0.3, min_per_class = 1 }

[[nodes]]
type = "encoder"
name = "cam"
count = 2
modalities = ["vision"]
examples = 10
partition = "iid"

[[jobs]]
component = "sensing"
base_model = "iot"
task = "normalizer"
"""


def scenario_in(tmp_path: Path, text: str = DATA, **overrides: object) -> Scenario:
    path = tmp_path / "scenario.toml"
    path.write_text(text, "utf-8")
    return load_scenario(path, Overrides(**overrides))  # type: ignore[arg-type]


def digest(dirs: dict[int, Path]) -> dict[int, dict[str, str]]:
    return {i: files_digest(d) for i, d in dirs.items()}


# ------------------------------------------------------------------------------ node data


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    scenario = scenario_in(tmp_path)
    first = materialize_data(scenario, tmp_path / "a")
    second = materialize_data(scenario, tmp_path / "b")
    assert first == {i: tmp_path / "a" / "data" / f"node-{i}" for i in range(5)}
    assert digest(first) == {i: files_digest(second[i]) for i in second}
    other = materialize_data(scenario_in(tmp_path, seed=12), tmp_path / "c")
    assert digest(other) != digest(first)


def test_data_are_split_across_the_group_without_loss(tmp_path: Path) -> None:
    scenario = scenario_in(tmp_path)
    dirs = materialize_data(scenario, tmp_path / "out")
    sensing = [dirs[n.index] for n in scenario.nodes_of(NodeType.SENSING)]
    # vision: every pooled example on exactly one node, non-IID, every class on every node
    files = [sorted(p.name for p in (d / "vision").rglob("*.png")) for d in sensing]
    assert sum(len(f) for f in files) == 3 * 40
    assert len(set().union(*map(set, files))) == 3 * 40
    counts = []
    for folder in sensing:
        data = load_images(folder / "vision", input_size=32)
        assert len(data.classes) == 10  # min_per_class = 1 keeps every class on every node
        counts.append(np.bincount(data.labels.numpy(), minlength=10))
    assert not all((c == counts[0]).all() for c in counts)  # label skew: Dirichlet(0.3)
    # audio and text: labelled, split the same way; lm and iot: equal contiguous shares
    assert (
        sum(len(load_audio(d / "audio", sample_rate=16_000, duration_s=0.5)) for d in sensing) == 36
    )
    assert sum(len(load_texts(d / "text", max_seq_length=64)) for d in sensing) == 72
    lines = [(d / "lm" / "corpus.txt").read_text().splitlines() for d in sensing]
    assert [len(x) for x in lines] == [10, 10, 10]
    load_corpus(sensing[0] / "lm", max_seq_length=64)
    rows = [load_sensor_csv(d / "iot").values for d in sensing]
    assert [len(r) for r in rows] == [300, 300, 300]
    stamps = [
        [int(line.split(",")[0]) for line in p.read_text().splitlines()[1:]]
        for d in sensing
        for p in sorted((d / "iot").glob("*.csv"))
    ]
    flat = [t for chunk in stamps for t in chunk]
    assert flat == sorted(flat) and len(set(flat)) == 900  # node k holds the k-th time window
    # the iid group: equal shares
    cams = [dirs[n.index] for n in scenario.nodes_of(NodeType.ENCODER)]
    assert [len(list((d / "vision").rglob("*.png"))) for d in cams] == [10, 10]
    record = json.loads((tmp_path / "out" / "data" / DATA_MARKER).read_text())
    assert record["hash"] == scenario.data_hash()
    assert [n["name"] for n in record["nodes"]] == [
        "sensing-0",
        "sensing-1",
        "sensing-2",
        "cam-0",
        "cam-1",
    ]
    assert record["nodes"][3]["examples"] == {"vision": 10}


def test_dirichlet_without_top_up_lets_classes_go_missing(tmp_path: Path) -> None:
    text = DATA.replace(", min_per_class = 1", "").replace("alpha = 0.3", "alpha = 0.05")
    scenario = scenario_in(tmp_path, text)
    dirs = materialize_data(scenario, tmp_path / "out")
    classes = [
        Counter(p.parent.name for p in (dirs[n.index] / "vision").rglob("*.png"))
        for n in scenario.nodes_of(NodeType.SENSING)
    ]
    assert any(len(c) < 10 for c in classes)


def test_data_are_reused_with_the_same_hash_and_rebuilt_otherwise(tmp_path: Path) -> None:
    out = tmp_path / "out"
    scenario = scenario_in(tmp_path)
    dirs = materialize_data(scenario, out)
    stamp = (dirs[0] / "lm" / "corpus.txt").stat().st_mtime_ns
    assert materialize_data(scenario_in(tmp_path, rounds=5), out) == dirs
    assert (dirs[0] / "lm" / "corpus.txt").stat().st_mtime_ns == stamp
    bigger = scenario_in(tmp_path, nodes=4)
    dirs = materialize_data(bigger, out)
    assert len(dirs) == 8 and all(d.is_dir() for d in dirs.values())
    assert json.loads((out / "data" / DATA_MARKER).read_text())["hash"] == bigger.data_hash()


def test_foreign_data_folder_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "out" / "data").mkdir(parents=True)
    (tmp_path / "out" / "data" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not written by `fedbrain simulate`"):
        materialize_data(scenario_in(tmp_path), tmp_path / "out")
    assert (tmp_path / "out" / "data" / "mine.txt").read_text() == "keep me"


def test_groups_with_data_dir_use_their_folders(tmp_path: Path) -> None:
    for name in ("x", "y", "z"):
        for modality in ("vision", "audio", "text", "lm", "iot"):
            (tmp_path / "real" / name / modality).mkdir(parents=True)
    text = DATA.replace(
        'partition = { kind = "dirichlet"', 'data_dir = "real"\npartition = { kind = "dirichlet"'
    )
    scenario = scenario_in(tmp_path, text)
    dirs = materialize_data(scenario, tmp_path / "out")
    assert [dirs[i] for i in range(3)] == [tmp_path / "real" / n for n in ("x", "y", "z")]
    assert dirs[3] == tmp_path / "out" / "data" / "node-3"
    assert sorted(p.name for p in (tmp_path / "out" / "data").iterdir()) == [
        "node-3",
        "node-4",
        DATA_MARKER,
    ]


# ----------------------------------------------------------------------------------- keys


def test_keys_are_reused_while_valid(tmp_path: Path) -> None:
    first = prepare_keys(tmp_path / "keys")
    assert not first.reused
    assert TrustedKeys.load(first.trusted_keys).lookup(first.keyid)
    again = prepare_keys(tmp_path / "keys")
    assert again.reused and again.keyid == first.keyid
    first.trusted_keys.write_text("[]")
    fresh = prepare_keys(tmp_path / "keys")
    assert not fresh.reused and fresh.keyid != first.keyid


# -------------------------------------------------------------------- outcomes, exit codes


def outcome(name: str, status: JobStatus, bundle: Path | None = None) -> JobOutcome:
    return JobOutcome(
        run_id="r1",
        artifact_name=name,
        status=status,
        rounds_completed=1,
        reliability=0.9,
        dp_unit="example",
        epsilon=float("inf"),
        delta=1e-5,
        bundle=bundle,
    )


def test_exit_codes_and_summary(tmp_path: Path) -> None:
    scenario = load_scenario(None, Overrides(out=tmp_path))
    keys = prepare_keys(tmp_path / "keys")
    job = scenario.jobs[0]
    result = SimulationResult(scenario=scenario, out=tmp_path, keys=keys)
    assert result.exit_code == ExitCode.OK
    rejected = JobResult(job=job, outcome=outcome(job.artifact_name, JobStatus.REJECTED))
    verify(rejected, keys)
    assert rejected.verification is Verification.NO_BUNDLE
    result.results.append(rejected)
    assert result.exit_code == ExitCode.REJECTED
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"PK\x05\x06" + bytes(18))
    passed = JobResult(job=job, outcome=outcome(job.artifact_name, JobStatus.PASSED, garbage))
    verify(passed, keys)
    assert passed.verification is Verification.FAILED
    assert passed.verification_detail
    result.results.append(passed)
    assert result.exit_code == ExitCode.FAILED
    result.results.append(JobResult(job=job, error="RuntimeError: boom"))
    summary = json.loads(write_summary(result).read_text())
    assert summary["exit_code"] == ExitCode.FAILED
    statuses = [(j["status"], j["verification"]) for j in summary["jobs"]]
    assert statuses == [("rejected", "no bundle"), ("passed", "failed"), ("failed", "no bundle")]
    assert summary["jobs"][0]["epsilon"] == "inf"
    assert summary["jobs"][2]["error"] == "RuntimeError: boom"


def test_progress_lines_and_summary_table(tmp_path: Path) -> None:
    from rich.console import Console

    from server.options import EventKind, ProgressEvent
    from simulations.report import ProgressDisplay, dp_text, print_summary, round_line

    assert dp_text(7.991, 1e-5, "example") == "ε 7.99 @ δ 1e-05 (protects one example)"
    assert dp_text(2.0, 1e-6, "node") == "ε 2 @ δ 1e-06 (protects a node's whole data)"
    assert dp_text(None, None, None) == "no DP"
    event = ProgressEvent(
        kind=EventKind.ROUND_FINISHED,
        artifact_name="a",
        server_round=2,
        num_rounds=3,
        metrics={"train_loss": 1.2345, "eval_accuracy": 0.5, "epsilon": 3.0, "dropouts": 1.0},
    )
    assert round_line(event) == "round 2/3  loss 1.23  eval acc 0.5  ε 3  dropouts 1"
    scenario = load_scenario(None, Overrides(out=tmp_path))
    console = Console(record=True, width=200, force_terminal=False)
    result = SimulationResult(scenario=scenario, out=tmp_path, keys=prepare_keys(tmp_path / "k"))
    job = scenario.jobs[0]
    with ProgressDisplay(console, scenario) as display:
        display.base_progress(BaseEvent("vit", tmp_path / "bases" / "vit-seed42", True))
        display.base_progress(BaseEvent("vit", tmp_path / "bases" / "vit-seed42", True, 12.34))
        display.job_started(job, 1, 1)
        display(event)
        failed = JobResult(job=job, error="RuntimeError: no nodes", seconds=1.0)
        display.job_finished(failed)
    result.results.append(failed)
    rejected = outcome(job.artifact_name, JobStatus.REJECTED)
    result.results.append(JobResult(job=job, outcome=rejected))
    print_summary(console, result)
    text = console.export_text()
    assert "generating the demo base vit (pretrained on public demo data) into" in text
    assert "demo base vit generated in 12.3 s" in text
    assert "round 2/3  loss 1.23" in text
    assert "failed -- RuntimeError: no nodes" in text
    assert "rejected sensing-camera-preproc-v1: below the reliability threshold" in text
    assert "ε inf @ δ 1e-05 (protects one example)" in text
    assert "(exit code 1)" in text


def test_learning_column_compares_each_job_with_its_baseline() -> None:
    from simulations.report import learning_text

    assert learning_text({}) == "-"
    assert learning_text({"eval_accuracy": 0.61, "initial_eval_accuracy": 0.1}) == (
        "accuracy 0.610 (untrained 0.100)"
    )
    assert learning_text({"eval_perplexity": 9.5, "baseline_perplexity": 17.25}) == (
        "perplexity 9.50 (unigram 17.25)"
    )
    assert learning_text({"simulation_std_error": 0.042}) == ("std within 4.2% of pooled data*")


# ------------------------------------------------------------------------------ demo bases


def test_demo_bases_are_generated_once_per_family_and_substituted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default scenario's model jobs get the path of their family's demo base, generated
    by clients.pretrain.pretrained_base from the scenario's seed (faked here: no training)."""
    import clients.pretrain
    from manifests.jobspec import DEMO_BASE

    calls: list[tuple[str, Path, int]] = []

    def fake(family: str, folder: Path, *, seed: int) -> Path:
        calls.append((str(family), folder, seed))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        return folder

    monkeypatch.setattr(clients.pretrain, "pretrained_base", fake)
    scenario = load_scenario(None, Overrides(out=tmp_path, seed=3))
    events: list[BaseEvent] = []
    resolved = resolve_demo_bases(scenario, tmp_path, on_base=events.append)
    bases = tmp_path / "bases"
    assert calls == [
        ("vit", bases / "vit-seed3", 3),
        ("wav2vec2", bases / "wav2vec2-seed3", 3),
        ("gpt2", bases / "gpt2-seed3", 3),
    ]
    assert [(e.family, e.generated, e.seconds is None) for e in events[:2]] == [
        ("vit", True, True),
        ("vit", True, False),
    ]
    by_name = {job.artifact_name: job.spec.base_checkpoint for job in resolved.jobs}
    assert by_name == {
        job.artifact_name: (
            None
            if job.spec.base_checkpoint is None
            else str((bases / f"{_family(job.spec.base_model)}-seed3").resolve())
        )
        for job in scenario.jobs
    }
    assert all(job.spec.base_checkpoint != DEMO_BASE for job in resolved.jobs)
    # a second run finds the folders (pretrained_base then only verifies them)
    events.clear()
    again = resolve_demo_bases(scenario, tmp_path, on_base=events.append)
    assert not any(e.generated for e in events) and again.jobs == resolved.jobs
    # a scenario without demo bases is returned as is, with nothing generated
    calls.clear()
    sensing = load_scenario(None, Overrides(out=tmp_path, only=("sensing-iot-normalizer-v1",)))
    assert resolve_demo_bases(sensing, tmp_path) is sensing and not calls


def _family(base_model: str) -> str:
    from clients.models import family_for_base_model

    return str(family_for_base_model(base_model))


# ----------------------------------------------------------------------- end to end (Flower)

TINY_SENSING = """\
[simulation]
name = "tiny"
seed = 5
round_timeout = 120.0
node_wait_timeout = 60.0

[[nodes]]
type = "sensing"
count = 4
modalities = ["iot"]
examples = 64
partition = "iid"
faults = [{ node = 2, fail_on = ["train.secagg_masked@1"] }]

[[jobs]]
component = "sensing"
base_model = "iot"
task = "normalizer"
privacy_level = "secure-agg"
federation = { num_rounds = 1, reliability_threshold = 0.1 }
"""

_APPS = all(importlib.util.find_spec(m) is not None for m in ("server.app", "clients.app"))


@pytest.mark.slow
@pytest.mark.skipif(not _APPS, reason="server.app / clients.app are not written yet")
def test_end_to_end_sensing_job_with_a_dropout_gives_a_verified_bundle(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from server.cli import app

    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SENSING, "utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["simulate", str(path), "--out", str(out)])
    assert result.exit_code == ExitCode.OK, result.output
    summary = json.loads((out / "summary.json").read_text())
    (job,) = summary["jobs"]
    assert job["artifact_name"] == "sensing-iot-normalizer-v1"
    assert job["status"] == "passed" and job["verification"] == "verified"
    # paths in the folder are relative to it (a moved folder still resumes)
    assert job["bundle"] == "runs/sensing-iot-normalizer-v1/sensing-iot-normalizer-v1.zip"
    assert (out / job["bundle"]).is_file() and job["ledger"] == "ledger.sqlite"
    assert "verified" in result.output
    # node 2's injected fault makes it a dropout of round 1; SecAgg+ recovers the sum of the
    # other three (a sum of two would let each survivor learn the other's input: refused)
    assert "participants 3  dropouts 1" in result.output
    # The simulation checks the released normalizer against the pooled data of all four
    # nodes (the dropout's data included, so not exact): shown and recorded, not signed.
    assert 0.0 <= job["metrics"]["simulation_std_error"] < 0.2
    assert "a check only a simulation can make" in result.output
    # --resume: the passed job is not run again
    again = CliRunner().invoke(app, ["simulate", str(path), "--out", str(out), "--resume"])
    assert again.exit_code == ExitCode.OK, again.output
    assert json.loads((out / "summary.json").read_text())["jobs"][0]["skipped"] is True
