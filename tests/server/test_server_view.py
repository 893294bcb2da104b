"""What a semi-honest server learns under ``dp+secure-agg``: only noised sums.

The server here follows the protocol but records everything it receives -- every message a
node sends it, and every sum it unmasks (the collector's own result, recorded by wrapping the
real method). The tests then try what such a server would: look for any per-node value, and
difference the sums of rounds with different participants to isolate one node. Under
distributed DP each node adds its noise share before masking, so the best the server can do
is no better than the DP noise allows.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from numpy.typing import NDArray

from aggregation.secagg import MaskedInputReply, SecAggMessage
from clients import protocol as wire
from clients.app import make_client_app
from clients.demo_data import write_demo_dataset
from clients.jobs import analytics_row_bound, job_privacy
from clients.node import Node, NodeState
from clients.protocol import RoundConfig, Work
from manifests.catalog import NodeType
from manifests.jobspec import JobSpec
from server import collect
from server.collect import Contributions
from server.federator import run_federation
from server.ledger import Ledger
from server.options import JobStatus, RunOptions
from tests.support.federation import provision
from tests.support.local_grid import LocalGrid

NODES = 4


class Recorder:
    """Everything a semi-honest server holds: messages from nodes, and unmasked sums."""

    def __init__(self) -> None:
        self.from_nodes: list[Message] = []
        self.secagg: list[SecAggMessage] = []
        self.collections: list[Contributions] = []

    def message(self, message: Message) -> None:
        if message.metadata.dst_node_id == SUPERLINK_NODE_ID:
            self.from_nodes.append(message)

    def wrap(self, real: Callable[..., Contributions]) -> Callable[..., Contributions]:
        def recording(*args: object, **kwargs: object) -> Contributions:
            result = real(*args, **kwargs)
            self.collections.append(result)
            return result

        return recording


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    seen = Recorder()
    monkeypatch.setattr(collect.Collector, "collect", seen.wrap(collect.Collector.collect))
    return seen


def _assert_nothing_per_node_in_the_clear(seen: Recorder) -> None:
    kinds = {m.metadata.message_type for m in seen.from_nodes}
    assert wire.FIT not in kinds and wire.EVALUATE not in kinds
    for message in seen.from_nodes:
        assert not message.has_error()
        content = message.content
        assert wire.UPDATE not in content.array_records
        assert wire.STATISTICS not in content.array_records
        assert wire.METRICS not in content.metric_records
        if message.metadata.message_type == wire.NODE_INFO:
            info = wire.NodeInfo.from_record(content.config_records[wire.NODE_INFO_RECORD])
            assert info.eligible and info.reason == ""  # and nothing about its data


def _masked(seen: Recorder) -> list[NDArray[np.uint32]]:
    return [m.masked_input for m in seen.secagg if isinstance(m, MaskedInputReply)]


def test_server_learns_no_nodes_statistics_from_sensing_sums(
    recorder: Recorder, tmp_path: Path
) -> None:
    dirs = []
    for index in range(NODES):
        folder = tmp_path / f"node-{index}"
        write_demo_dataset("iot", folder / "iot", 300, seed=30 + index)
        dirs.append(folder)
    rounds = 6
    job = JobSpec.from_mapping(
        {
            "component": "sensing",
            "base_model": "iot",
            "task": "normalizer",
            "privacy_level": "dp+secure-agg",
            "federation": {"num_rounds": rounds, "clients_per_round": 3},
            "dp": {"unit": "example", "noise_multiplier": 1.0, "delta": 1e-5},
        }
    )
    federation = provision(tmp_path, NODES, NodeType.SENSING)  # 6 releases at z = 1: eps 22
    nodes = federation.node_configs(dirs)
    grid = LocalGrid.with_app(make_client_app(nodes), NODES, on_message=recorder.message)
    options = RunOptions(
        run_dir=tmp_path / "run",
        signing_key=federation.signing_key,
        trusted_keys=federation.trusted_keys,
        roster=federation.roster,
        seed=1,
        node_wait_timeout=1.0,
    )
    outcome = run_federation(grid, job, options, secagg_hook=recorder.secagg.append)
    assert outcome.status is JobStatus.PASSED, outcome.reasons
    _assert_nothing_per_node_in_the_clear(recorder)

    # Each node's true ranges-phase statistics (the same every round: the public ranges).
    ids = sorted(grid.get_node_ids())
    truth = np.stack(
        [
            Node(nodes[i], node_id=ids[i])
            .contribution(job, RoundConfig(server_round=1, work=Work.RANGES), None, NodeState())
            .summed(())
            .statistics
            for i in range(NODES)
        ]
    )
    # Masked inputs look nothing like any node's statistics.
    bound = analytics_row_bound(job, Work.RANGES)
    masked = _masked(recorder)
    assert len(masked) == 2 * rounds * 3
    for vector in masked:
        centred = vector.view(np.int32).astype(np.float64)
        assert np.std(centred) > 1e6  # uniform-looking words, not small counts
        if centred.size < truth.shape[1]:
            continue  # a moments-phase vector
        for row in truth:
            assert abs(np.corrcoef(centred[: row.size], row)[0, 1]) < 0.3

    # The server's best attack: least squares on the round sums and who took part in them.
    ranges = [c for c in recorder.collections if c.work is Work.RANGES]
    assert len(ranges) == rounds
    design = np.array([[1.0 if n in c.contributors else 0.0 for n in ids] for c in ranges])
    assert np.linalg.matrix_rank(design) == NODES  # participation varies (seed 1): solvable
    sums = np.stack([c.secure_sum.statistics for c in ranges if c.secure_sum is not None])
    estimate = np.linalg.lstsq(design, sums, rcond=None)[0]
    error = estimate - truth
    # Each released coordinate carries at least z = 1 (normalised units) of noise; least
    # squares over 6 rounds averages it down to no better than about z * 0.5 per node.
    noise = job_privacy(job).noise_multiplier
    rms = float(np.sqrt(np.mean(error**2)))
    assert rms > 0.3 * noise, (rms, noise)
    # Without noise the same attack is exact (what the previous, central-DP design allowed).
    exact = np.linalg.lstsq(design, design @ truth, rcond=None)[0]
    assert np.allclose(exact, truth, atol=1e-6)
    # The histograms of one node span hundreds of counts: the noise hides every one of them.
    assert np.abs(truth).max() * bound > 10 * noise


def test_server_sees_no_update_or_metric_of_a_node_in_a_model_job(
    recorder: Recorder, tmp_path: Path
) -> None:
    dirs = []
    for index in range(3):
        folder = tmp_path / f"node-{index}"
        write_demo_dataset("vision", folder / "vision", 40, seed=index, image_size=32)
        dirs.append(folder)
    job = JobSpec.from_mapping(
        {
            "component": "vision",
            "base_model": "vit-base16",
            "task": "embed",
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "input_size": 32,
            "embedding_dim": 16,
            "privacy_level": "dp+secure-agg",
            "federation": {"num_rounds": 2, "clients_per_round": 3, "reliability_threshold": 0.0},
            "dp": {"unit": "example", "clipping_norm": 1.0, "target_epsilon": 8.0, "delta": 1e-5},
        }
    )
    federation = provision(tmp_path, 3, NodeType.ENCODER, policy=None)  # safe defaults
    nodes = federation.node_configs(dirs)
    grid = LocalGrid.with_app(make_client_app(nodes), 3, on_message=recorder.message)
    options = RunOptions(
        run_dir=tmp_path / "run",
        signing_key=federation.signing_key,
        trusted_keys=federation.trusted_keys,
        roster=federation.roster,
        seed=5,
        node_wait_timeout=1.0,
    )
    outcome = run_federation(grid, job, options, secagg_hook=recorder.secagg.append)
    assert outcome.status is JobStatus.PASSED, outcome.reasons
    _assert_nothing_per_node_in_the_clear(recorder)
    # Every collection went through SecAgg+ and released only a sum.
    assert recorder.collections and all(c.per_node is None for c in recorder.collections)
    assert all(c.secure_sum is not None for c in recorder.collections)
    # The ledger holds no per-node value: participants carry who and at which stage, no data.
    with Ledger.for_run_dir(tmp_path / "run", create=False) as ledger:
        for record in ledger.rounds(outcome.run_id):
            for participant in record.participants:
                assert participant.reason is None
            metrics = {k for phase in record.metrics.values() for k in phase}
            assert "train_loss" not in metrics  # a training loss would need the local model
            assert {"eval_loss", "eval_examples"} <= metrics
