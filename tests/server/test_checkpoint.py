"""Checkpoints: atomic writes, retention, refusal to resume another job, accountant.json."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

import server.checkpoint as checkpoint_module
from aggregation.accountant import PrivacyAccountant, SubsampledGaussianEvent
from aggregation.dp import DPState
from aggregation.server_opt import FedAdam, FedAvg
from server.checkpoint import (
    ACCOUNTANT_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointPolicy,
    checkpoint_path,
    discard_checkpoints_after,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_accountant_state,
    resume_point,
    write_accountant_state,
    write_checkpoint,
)

HASH = "sha256:" + "ab" * 32
OTHER_HASH = "sha256:" + "cd" * 32
CREATED = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _weights(value: float) -> dict[str, NDArray[np.float32]]:
    # deliberately not in sorted order: the checkpoint keeps the model's order
    return {
        "layer2.weight": np.full((2, 3), value, dtype=np.float32),
        "layer1.bias": np.arange(3, dtype=np.float32) + value,
        "layer1.weight": np.full((3, 4), -value, dtype=np.float32),
    }


def _accountant(rounds: int) -> PrivacyAccountant:
    accountant = PrivacyAccountant(delta=1e-5)
    for _ in range(rounds):
        accountant.compose(SubsampledGaussianEvent(noise_multiplier=1.1, sample_rate=0.1))
    return accountant


def _checkpoint(round_number: int, *, adam: bool = True) -> Checkpoint:
    weights = _weights(float(round_number))
    listed = list(weights.values())
    optimizer = FedAdam(eta=0.01) if adam else FedAvg()
    state = optimizer.init(listed)
    if adam:
        delta = [np.full(w.shape, 0.1, dtype=np.float32) for w in listed]
        state = optimizer.step(listed, delta, state).state
    return Checkpoint(
        round=round_number,
        training_config_hash=HASH,
        weights=weights,
        optimizer=state,
        dp_state=DPState(clipping_norm=0.5, rounds=round_number),
        accountant=_accountant(round_number).state_dict(),
        rng={"seed": 2**100 + round_number},
    )


def _write(run_dir: Path, round_number: int, keep: int = 2, adam: bool = True) -> Path:
    return write_checkpoint(
        run_dir, _checkpoint(round_number, adam=adam), keep=keep, clock=lambda: CREATED
    )


def test_checkpoint_round_trips_weights_optimizer_dp_accountant_and_rng(tmp_path: Path) -> None:
    written = _checkpoint(3)
    path = write_checkpoint(tmp_path, written, clock=lambda: CREATED)
    assert path == tmp_path / "checkpoints" / "round-00003"
    assert sorted(p.name for p in path.iterdir()) == [
        "optimizer.safetensors",
        "state.json",
        "weights.safetensors",
    ]
    read = load_checkpoint(path, training_config_hash=HASH)
    assert read.round == 3
    assert list(read.weights) == ["layer2.weight", "layer1.bias", "layer1.weight"]
    for name, array in written.weights.items():
        assert read.weights[name].dtype == np.float32
        np.testing.assert_array_equal(read.weights[name], array)
    assert read.optimizer.algorithm == "fedadam"
    assert read.optimizer.step == 1
    for slot in ("m", "v"):
        for a, b in zip(read.optimizer.slots[slot], written.optimizer.slots[slot], strict=True):
            np.testing.assert_array_equal(a, b)
    assert read.dp_state == DPState(clipping_norm=0.5, rounds=3)
    assert read.rng == {"seed": 2**100 + 3}
    assert read.created_at == CREATED
    assert read.accountant is not None
    restored = PrivacyAccountant.from_state_dict(read.accountant)
    assert restored.get_epsilon() == pytest.approx(_accountant(3).get_epsilon())


def test_a_fedavg_checkpoint_has_no_optimizer_file(tmp_path: Path) -> None:
    path = _write(tmp_path, 1, adam=False)
    assert not (path / "optimizer.safetensors").exists()
    assert load_checkpoint(path, training_config_hash=HASH).optimizer.algorithm == "fedavg"


def test_state_json_records_format_version_and_config_hash(tmp_path: Path) -> None:
    state = json.loads((_write(tmp_path, 2) / "state.json").read_text())
    assert state["format_version"] == checkpoint_module.FORMAT_VERSION
    assert state["training_config_hash"] == HASH
    assert state["round"] == 2
    assert state["files"]["weights.safetensors"].startswith("sha256:")


def test_a_crash_while_writing_leaves_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path, 1)
    before = {p.name: p.read_bytes() for p in checkpoint_path(tmp_path, 1).iterdir()}

    def crash(path: Path, document: object) -> None:
        raise OSError("power cut while writing state.json")

    monkeypatch.setattr(checkpoint_module, "_write_json", crash)
    with pytest.raises(OSError, match="power cut"):
        _write(tmp_path, 2)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-00001"]
    after = {p.name: p.read_bytes() for p in checkpoint_path(tmp_path, 1).iterdir()}
    assert after == before
    latest = latest_checkpoint(tmp_path, training_config_hash=HASH)
    assert latest is not None
    assert latest.round == 1


def test_a_killed_writer_s_temporary_directory_is_ignored_then_cleaned(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    leftover = tmp_path / "checkpoints" / ".tmp-round-00002-x"
    leftover.mkdir()
    (leftover / "weights.safetensors").write_bytes(b"half")
    latest = latest_checkpoint(tmp_path, training_config_hash=HASH)
    assert latest is not None
    assert latest.round == 1
    _write(tmp_path, 2)
    assert not leftover.exists()


def test_only_the_last_k_checkpoints_are_kept(tmp_path: Path) -> None:
    for round_number in (2, 4, 6, 8):
        _write(tmp_path, round_number, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-00006", "round-00008"]
    _write(tmp_path, 10, keep=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "round-00006",
        "round-00008",
        "round-00010",
    ]


def test_rewriting_a_round_replaces_it(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    replacement = _checkpoint(1)
    changed = Checkpoint(
        round=1,
        training_config_hash=HASH,
        weights={k: v + 1 for k, v in replacement.weights.items()},
        optimizer=replacement.optimizer,
    )
    write_checkpoint(tmp_path, changed)
    read = load_checkpoint(checkpoint_path(tmp_path, 1), training_config_hash=HASH)
    np.testing.assert_array_equal(read.weights["layer2.weight"], np.full((2, 3), 2.0))
    assert read.dp_state is None
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["round-00001"]


def test_loading_refuses_a_checkpoint_of_another_job(tmp_path: Path) -> None:
    _write(tmp_path, 1)
    with pytest.raises(CheckpointMismatchError, match="Refusing to resume a different job"):
        latest_checkpoint(tmp_path, training_config_hash=OTHER_HASH)


def test_loading_refuses_an_unknown_format_version(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99; this fedbrain reads version 1"):
        load_checkpoint(path, training_config_hash=HASH)


def test_loading_detects_corrupted_weights(tmp_path: Path) -> None:
    path = _write(tmp_path, 1)
    data = bytearray((path / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checkpoint is corrupt"):
        load_checkpoint(path, training_config_hash=HASH)


def test_latest_checkpoint_is_none_for_a_fresh_run_dir(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path, training_config_hash=HASH) is None
    assert resume_point(tmp_path, training_config_hash=HASH) is None


def test_a_checkpoint_with_non_float32_weights_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"must be a float32 array\. Found float64"):
        Checkpoint(
            round=1,
            training_config_hash=HASH,
            weights={"w": np.zeros(2)},  # type: ignore[dict-item]
            optimizer=FedAvg().init([]),
        )
    assert list(tmp_path.iterdir()) == []


def test_a_non_json_rng_state_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    bad = Checkpoint(
        round=1,
        training_config_hash=HASH,
        weights=_weights(1.0),
        optimizer=FedAvg().init([]),
        rng={"state": float("nan")},
    )
    with pytest.raises(CheckpointError, match="not strict JSON"):
        write_checkpoint(tmp_path, bad)
    assert list_checkpoints(tmp_path) == []


def test_accountant_json_is_replaced_atomically_every_round(tmp_path: Path) -> None:
    for round_number in (1, 2, 3):
        write_accountant_state(
            tmp_path,
            round_number=round_number,
            accountant=_accountant(round_number).state_dict(),
            training_config_hash=HASH,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == [ACCOUNTANT_FILE]
    snapshot = read_accountant_state(tmp_path, training_config_hash=HASH)
    assert snapshot is not None
    assert snapshot.round == 3
    assert PrivacyAccountant.from_state_dict(snapshot.state).steps == 3
    with pytest.raises(CheckpointMismatchError):
        read_accountant_state(tmp_path, training_config_hash=OTHER_HASH)


def test_resume_keeps_the_privacy_spent_after_the_last_checkpoint(tmp_path: Path) -> None:
    policy = CheckpointPolicy(interval=2)
    for round_number in (1, 2, 3):  # the server crashes after round 3
        write_accountant_state(
            tmp_path,
            round_number=round_number,
            accountant=_accountant(round_number).state_dict(),
            training_config_hash=HASH,
        )
        if policy.is_due(round_number):
            _write(tmp_path, round_number)
    point = resume_point(tmp_path, training_config_hash=HASH)
    assert point is not None
    assert point.checkpoint is not None
    assert point.checkpoint.round == 2
    assert point.next_round == 3
    assert point.accountant_round == 3
    assert point.accountant is not None
    resumed = PrivacyAccountant.from_state_dict(point.accountant)
    assert resumed.steps == 3  # round 3's release stays spent
    assert resumed.get_epsilon() > _accountant(2).get_epsilon()


def test_resume_without_any_checkpoint_still_restores_the_accountant(tmp_path: Path) -> None:
    write_accountant_state(
        tmp_path, round_number=1, accountant=_accountant(1).state_dict(), training_config_hash=HASH
    )
    point = resume_point(tmp_path, training_config_hash=HASH)
    assert point is not None
    assert point.checkpoint is None
    assert point.next_round == 1
    assert point.accountant is not None


def test_discarding_checkpoints_after_a_round_removes_the_dead_branch(tmp_path: Path) -> None:
    for round_number in (1, 2, 3):
        _write(tmp_path, round_number, keep=5)
    deleted = discard_checkpoints_after(tmp_path, 1)
    assert [p.name for p in deleted] == ["round-00002", "round-00003"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["round-00001"]


def test_policy_is_due_every_interval_and_validates() -> None:
    policy = CheckpointPolicy(interval=3)
    assert [r for r in range(1, 10) if policy.is_due(r)] == [3, 6, 9]
    with pytest.raises(ValueError, match=r"`interval` must be an int >= 1\. Found 0.*`keep`"):
        CheckpointPolicy(interval=0, keep=0)
