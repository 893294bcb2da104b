"""Node logic without Flower: node config and faults, how a job reads (data folder, model,
metrics), the hold-out split and the data cache, eligibility, how a provisioned node defends
itself (only jobs a trusted operator signed, within its policy, its lifetime budget and the
signed number of rounds; unprovisioned, it refuses everything), and the sensing statistics
(per-example rows, their bounds, and the normalizer the server builds from their sum)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math
import re
import shutil
from pathlib import Path
from typing import Final

import numpy as np
import pytest
import torch

from aggregation.codec import Metric
from aggregation.privacy import WorkloadKind
from aggregation.secagg import SecAggParams, ServerSession, node_id_for
from clients.budget import BudgetStore, dataset_key
from clients.config import Fault, FaultInjectedError, NodeConfig, NodeConfigError
from clients.credentials import IDENTITY_FILE, POLICY_FILE, STATE_DIR, load_identity
from clients.data import load_images, load_sensor_csv
from clients.datasets import (
    clear_data_cache,
    histogram_rows,
    holdout_split,
    model_data,
    moment_rows,
    sensing_values,
)
from clients.demo_data import Modality, write_demo_dataset
from clients.jobs import (
    HISTOGRAM_BINS,
    SENSING_N_MELS,
    analytics_row_bound,
    analytics_statistics_length,
    collections_per_round,
    metrics_for,
    modality_for_job,
    model_spec_for_job,
    sensing_ranges,
    workload_for_job,
)
from clients.kit import JobRefusedError
from clients.models import build_model, get_weights, model_fingerprint, weight_names
from clients.node import Node, NodeState, public_unigram_log_probs
from clients.policy import worst_case_privacy
from clients.protocol import RoundConfig, Work
from clients.sensing import (
    CAMERA_RANGES,
    IOT_RANGES,
    FeatureRanges,
    contribution_length,
    normalizer_from_centred_sum,
)
from manifests.catalog import Component, NodeType, Task
from manifests.jobspec import JobSpec
from tests.support.federation import Federation, provision

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "batch_size": 8}


def vit_job(**extra: object) -> JobSpec:
    return JobSpec.from_mapping(
        {
            "component": "vision",
            "base_model": "vit-base16",
            "task": "embed",
            "embedding_dim": 16,
            "input_size": 32,
            **TINY,
            **extra,
        }
    )


def sensing_job(base_model: str, **extra: object) -> JobSpec:
    task = "normalizer" if base_model == "iot" else "preproc"
    return JobSpec.from_mapping(
        {"component": "sensing", "base_model": base_model, "task": task, **extra}
    )


def weights_of(job: JobSpec, seed: int = 1) -> list[tuple[str, np.ndarray]]:
    model = build_model(model_spec_for_job(job), seed=seed)
    return list(zip(weight_names(model), get_weights(model), strict=True))


@pytest.fixture
def federation(tmp_path: Path) -> Federation:
    """An operator key, a signed roster and six node kits (policy: every level accepted)."""
    return provision(tmp_path / "federation", 6, NodeType.ENCODER)


def provisioned(federation: Federation, index: int, node_type: NodeType, data_dir: Path) -> Node:
    """A node with kit ``index`` of ``federation``."""
    return Node(NodeConfig(node_type, data_dir, kit=federation.kits[index]), node_id=index + 1)


# ----------------------------------------------------------------------------- config


def test_node_config_from_flower_reads_type_folder_name_and_faults(tmp_path: Path) -> None:
    config = NodeConfig.from_flower(
        {
            "node-type": "encoder",
            "data-dir": str(tmp_path),
            "name": "cam-1",
            "fail-on": "train.secagg_masked@2, evaluate.eval@3,query.node_info",
        }
    )
    assert config.node_type is NodeType.ENCODER and config.data_dir == tmp_path
    assert config.name == "cam-1" and not config.noop_training
    assert config.faults == (
        Fault("train.secagg_masked", 2),
        Fault("evaluate.eval", 3),
        Fault("query.node_info"),
    )
    assert [str(f) for f in config.faults] == [
        "train.secagg_masked@2",
        "evaluate.eval@3",
        "query.node_info",
    ]
    node = Node(config, node_id=7)
    node.check_fault("train.secagg_masked", 1)  # another round: no fault
    node.check_fault("evaluate.secagg_masked", 2)  # another message type: no fault
    with pytest.raises(FaultInjectedError, match=r"cam-1: injected fault train\.secagg_masked@2"):
        node.check_fault("train.secagg_masked", 2)
    with pytest.raises(FaultInjectedError, match=r"injected fault query\.node_info"):
        node.check_fault("query.node_info", None)
    assert Fault.parse("train.fit").matches("train.fit", 5)  # round-less: every round
    noop = NodeConfig.from_flower(
        {"node-type": "sensing", "data-dir": "~/data", "noop-training": True}
    )
    assert noop.noop_training and noop.data_dir == Path("~/data").expanduser()


def test_node_config_from_flower_reports_every_problem() -> None:
    with pytest.raises(NodeConfigError) as caught:
        NodeConfig.from_flower(
            {"fail-on": "train.fit@x,train.evil@1", "name": 3, "noop-training": "yes"}
        )
    message = str(caught.value)
    for expected in (
        "node-type: is required",
        "data-dir: is required",
        "name: must be non-empty text",
        "'train.fit@x' must be <message type>@<round number>",
        "unknown message type 'train.evil'",
        "noop-training: must be true or false",
    ):
        assert expected in message
    with pytest.raises(NodeConfigError, match="unknown node type 'camera'"):
        NodeConfig.from_flower({"node-type": "camera", "data-dir": "/data"})
    with pytest.raises(NodeConfigError, match="management nodes have nothing to train"):
        NodeConfig.from_flower({"node-type": "management", "data-dir": "/data"})
    with pytest.raises(NodeConfigError, match="the round must be >= 0"):
        Fault.parse("train.fit@-1")


# ------------------------------------------------------------------------------ jobs


def test_each_trainable_job_reads_its_modality_folder_and_detection_is_refused() -> None:
    assert modality_for_job(vit_job()) is Modality.VISION
    audio = JobSpec.from_mapping(
        {"component": "audio", "base_model": "wav2vec2-base", "task": "embed", "embedding_dim": 16}
    )
    text = JobSpec.from_mapping(
        {
            "component": "text",
            "base_model": "all-mpnet-base-v2",
            "task": "embed",
            "embedding_dim": 16,
        }
    )
    lm = JobSpec.from_mapping(
        {"component": "inference", "base_model": "gpt-small-v1", "task": "lm-finetune"}
    )
    assert modality_for_job(audio) is Modality.AUDIO
    assert modality_for_job(text) is Modality.TEXT
    assert modality_for_job(lm) is Modality.LM
    assert model_spec_for_job(lm).embedding_dim is None
    assert modality_for_job(sensing_job("camera")) is Modality.VISION
    assert modality_for_job(sensing_job("audio")) is Modality.AUDIO
    assert modality_for_job(sensing_job("iot")) is Modality.IOT
    detection = JobSpec.model_construct(
        component=Component.INFERENCE, base_model="yolox-s", task=Task.DETECTION
    )
    with pytest.raises(ValueError, match="'detection' is not supported yet"):
        modality_for_job(detection)
    with pytest.raises(ValueError, match="trains no model"):
        model_spec_for_job(sensing_job("camera"))
    with pytest.raises(ValueError, match="not a sensing job"):
        sensing_ranges(vit_job())


def test_model_jobs_fit_then_evaluate_and_sensing_jobs_collect_ranges_then_moments() -> None:
    assert workload_for_job(vit_job()) is WorkloadKind.MODEL
    assert collections_per_round(vit_job()) == (Work.FIT, Work.EVALUATE)
    iot = sensing_job("iot")
    assert workload_for_job(iot) is WorkloadKind.ANALYTICS
    assert collections_per_round(iot) == (Work.RANGES, Work.MOMENTS)
    assert analytics_statistics_length(iot, Work.RANGES) == 5 * HISTOGRAM_BINS
    assert analytics_statistics_length(iot, Work.MOMENTS) == 11
    assert analytics_row_bound(iot, Work.RANGES) == pytest.approx(math.sqrt(5))
    assert analytics_row_bound(iot, Work.MOMENTS) == pytest.approx(math.sqrt(11))
    # Under DP, rows are clipped well below their worst-case norms sqrt(F) and sqrt(1 + 2F).
    assert analytics_row_bound(iot_dp(), Work.RANGES) == pytest.approx(math.sqrt(5) / 2)
    assert analytics_row_bound(iot_dp(), Work.MOMENTS) == pytest.approx(math.sqrt(3.5))
    assert metrics_for(iot, Work.MOMENTS) == ()
    assert sensing_ranges(sensing_job("audio")).features[-1] == f"mel_{SENSING_N_MELS - 1:03d}"


def test_released_metrics_hold_no_training_loss_under_dp() -> None:
    def names(job: JobSpec, work: Work) -> list[Metric]:
        return [spec.metric for spec in metrics_for(job, work)]

    node_dp = {
        "privacy_level": "dp",
        "dp": {"unit": "node", "clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5},
    }
    example_dp = {
        "privacy_level": "dp",
        "dp": {"unit": "example", "clipping_norm": 1.0, "target_epsilon": 8.0, "delta": 1e-5},
    }
    assert names(vit_job(), Work.FIT) == [Metric.EXAMPLES, Metric.TRAIN_LOSS]
    assert names(vit_job(**example_dp), Work.FIT) == [Metric.EXAMPLES]
    # Node-level DP: one row of this node's means; the contributors are the denominator.
    assert names(vit_job(**node_dp), Work.FIT) == [Metric.CLIPPED]
    assert names(vit_job(**node_dp), Work.EVALUATE) == [Metric.EVAL_LOSS, Metric.EVAL_CORRECT]
    lm = JobSpec.from_mapping(
        {"component": "inference", "base_model": "gpt-small-v1", "task": "lm-finetune"}
    )
    assert names(lm, Work.EVALUATE) == [
        Metric.EXAMPLES,
        Metric.EVAL_LOSS,
        Metric.EVAL_CORRECT,
        Metric.BASELINE_LOSS,
    ]
    contrastive = vit_job(augmentations=["flip"])
    assert names(contrastive, Work.EVALUATE) == [Metric.EXAMPLES, Metric.EVAL_LOSS]


def test_embed_is_supervised_unless_augmentations_ask_for_contrastive_without_example_dp() -> None:
    supervised = model_spec_for_job(vit_job())
    contrastive = model_spec_for_job(vit_job(augmentations=["flip", "crop"]))
    private = model_spec_for_job(
        vit_job(
            augmentations=["flip"],
            privacy_level="dp",
            dp={"unit": "example", "clipping_norm": 1.0, "target_epsilon": 8.0, "delta": 1e-5},
        )
    )
    assert supervised.num_classes == 10 and private.num_classes == 10
    assert contrastive.num_classes is None  # NT-Xent over two augmented views
    assert supervised.resolved_hidden_size == 32 and supervised.resolved_input_size == 32
    assert model_fingerprint(contrastive) != model_fingerprint(supervised)


def test_public_unigram_baseline_is_a_byte_distribution_that_favours_text() -> None:
    log_probs = public_unigram_log_probs()
    assert log_probs.shape == (260,) and log_probs.dtype == torch.float32
    assert float(log_probs.exp().sum()) == pytest.approx(1.0, abs=1e-5)
    assert log_probs[ord("e")] > log_probs[ord("z")] > log_probs[0]
    # The unigram model beats a uniform byte model on English text.
    text = torch.tensor(list(b"the model learns the next byte of this sentence"))
    assert float(-log_probs[text].mean()) < math.log(256)


# ------------------------------------------------------------------------------- data


def test_holdout_split_is_deterministic_per_class_and_disjoint() -> None:
    labels = np.repeat(np.arange(4), [10, 5, 2, 1])
    keep, held = holdout_split(labels)
    again = holdout_split(labels)
    assert np.array_equal(keep, again[0]) and np.array_equal(held, again[1])
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(labels.size))
    assert np.bincount(labels[held], minlength=4).tolist() == [2, 1, 1, 0]
    keep, held = holdout_split(np.full(10, -1))  # unlabelled: one group
    assert held.size == 2 and keep.size == 8
    keep, held = holdout_split(np.full(1, -1))
    assert keep.tolist() == [0] and held.size == 0
    keep, held = holdout_split(np.zeros(0))
    assert keep.size == held.size == 0


def test_model_data_holds_out_one_example_per_class_of_the_demo_data(tmp_path: Path) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    job = vit_job()
    data = model_data(job, model_spec_for_job(job), tmp_path)
    assert len(data.train) == len(data.held_out) == 10
    held_labels = sorted(int(data.labels[i]) for i in data.held_out.indices)
    assert held_labels == list(range(10))


def test_loaded_data_is_cached_until_the_cache_is_cleared(
    tmp_path: Path, federation: Federation
) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    node = provisioned(federation, 0, NodeType.ENCODER, tmp_path)
    job = federation.sign(vit_job())
    assert node.node_info(job).eligible
    shutil.rmtree(tmp_path / "vision")
    assert node.node_info(job).eligible  # not read again
    other_input = federation.sign(vit_job(input_size=48))
    assert not node.node_info(other_input).eligible  # other input spec: reads
    clear_data_cache()
    info = node.node_info(job)
    assert not info.eligible and "does not exist" in info.reason


# ------------------------------------------------------------------------ eligibility


def test_node_info_says_eligible_with_the_fingerprint_or_why_not(
    tmp_path: Path, federation: Federation
) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    job = vit_job()
    signed = federation.sign(job)
    info = provisioned(federation, 0, NodeType.ENCODER, tmp_path).node_info(signed)
    assert info.eligible and info.reason == "" and info.node_type == "encoder"
    assert info.model_fingerprint == model_fingerprint(model_spec_for_job(job))

    sensing = provisioned(federation, 1, NodeType.SENSING, tmp_path).node_info(signed)
    assert not sensing.eligible and sensing.node_type == "sensing"
    assert "for encoder nodes; this is a sensing node" in sensing.reason

    nothing = tmp_path / "nothing"
    empty = provisioned(federation, 2, NodeType.ENCODER, nothing).node_info(signed)
    assert not empty.eligible and "does not exist" in empty.reason and "vision" in empty.reason

    (tmp_path / "odd" / "vision").mkdir(parents=True)
    shutil.copytree(tmp_path / "vision" / "00-circle", tmp_path / "odd" / "vision" / "12-star")
    shutil.copytree(tmp_path / "vision" / "01-square", tmp_path / "odd" / "vision" / "01-square")
    odd = provisioned(federation, 3, NodeType.ENCODER, tmp_path / "odd")
    labels = odd.node_info(signed)
    assert not labels.eligible and "class folders 00-... to 09-..." in labels.reason

    # A job fedbrain cannot train: the node refuses it even though its operator signed it.
    detection = JobSpec.model_construct(
        component=Component.INFERENCE, base_model="yolox-s", task=Task.DETECTION
    )
    inference = provisioned(federation, 4, NodeType.INFERENCE, tmp_path)
    refused = inference.node_info(federation.sign(detection))
    assert not refused.eligible and "the signed job is refused" in refused.reason
    assert "is not trainable by fedbrain yet" in refused.reason

    sensor = provisioned(federation, 5, NodeType.SENSING, tmp_path)
    no_iot = sensor.node_info(federation.sign(sensing_job("iot")))
    assert not no_iot.eligible and "iot" in no_iot.reason
    camera = sensor.node_info(federation.sign(sensing_job("camera", input_size=32)))
    assert camera.eligible and camera.model_fingerprint == ""  # analytics: no model


def test_node_info_never_reveals_how_many_examples_a_node_holds(
    tmp_path: Path, federation: Federation
) -> None:
    signed = federation.sign(vit_job())
    infos = []
    for index, (name, n) in enumerate((("small", 20), ("large", 60))):
        write_demo_dataset("vision", tmp_path / name / "vision", n, seed=0)
        node = provisioned(federation, index, NodeType.ENCODER, tmp_path / name)
        infos.append(node.node_info(signed).to_record())
    assert infos[0]["identity_key"] != infos[1]["identity_key"]  # two nodes ...
    for info in infos:
        del info["identity_key"]
    assert infos[0] == infos[1] and infos[0]["eligible"] is True  # ... the same otherwise
    assert all(isinstance(v, str | bool) for v in infos[0].values())  # no numbers


def test_iot_nodes_need_the_public_sensor_columns(tmp_path: Path, federation: Federation) -> None:
    (tmp_path / "iot").mkdir()
    (tmp_path / "iot" / "log.csv").write_text("timestamp,temperature_c\n0,21.5\n")
    node = provisioned(federation, 0, NodeType.SENSING, tmp_path)
    info = node.node_info(federation.sign(sensing_job("iot")))
    assert not info.eligible and "lack the columns" in info.reason
    assert "humidity_pct" in info.reason


# ------------------------------------------------------------------ the node's own defences

RANGES: Final = RoundConfig(server_round=1, work=Work.RANGES)


def iot_node(tmp_path: Path, policy: str | None) -> tuple[Federation, Node]:
    """A provisioned sensing node with IoT data, holding ``policy`` (None: the safe defaults)."""
    write_demo_dataset("iot", tmp_path / "data" / "iot", 30, seed=4)
    federation = provision(tmp_path / "one", 1, NodeType.SENSING, policy=policy)
    config = NodeConfig(NodeType.SENSING, tmp_path / "data", kit=federation.kits[0])
    return federation, Node(config, node_id=1)


def iot_dp(level: str = "dp+secure-agg", **dp: object) -> JobSpec:
    """The IoT normalizer job with example-level DP (``dp`` overrides)."""
    return sensing_job(
        "iot",
        privacy_level=level,
        dp={"unit": "example", "target_epsilon": 4.0, "delta": 1e-5, **dp},
    )


def test_an_unprovisioned_node_refuses_every_job_with_the_reason(
    tmp_path: Path, federation: Federation
) -> None:
    write_demo_dataset("iot", tmp_path / "iot", 30, seed=4)
    node = Node(NodeConfig(NodeType.SENSING, tmp_path), node_id=1)  # no kit
    why = "this node is not provisioned: it holds no kit"
    signed = federation.sign(sensing_job("iot"))  # a job its operator did sign
    info = node.node_info(signed)
    assert not info.eligible and why in info.reason and info.identity_key == ""
    with pytest.raises(JobRefusedError, match=why):
        node.plain(signed, RANGES, None, NodeState())
    secure = federation.sign(sensing_job("iot", privacy_level="secure-agg"))
    params = SecAggParams(
        num_clients=3, num_neighbours=2, threshold=2, vector_length=8, clipping_range=1.0
    )
    session = ServerSession(
        params,
        run_id=1,
        server_round=RANGES.secagg_round,
        node_ids=[1, 2, 3],
        rng=np.random.default_rng(0),
    )
    state = NodeState()
    with pytest.raises(JobRefusedError, match=why):
        node.secagg(secure, RANGES, session.advertise_keys()[1], None, state)
    assert state == NodeState()


def test_node_info_carries_the_nodes_identity_key(tmp_path: Path, federation: Federation) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    identity = load_identity(federation.kits[2] / IDENTITY_FILE)
    signed = federation.sign(vit_job())
    node = provisioned(federation, 2, NodeType.ENCODER, tmp_path)
    info = node.node_info(signed)
    assert info.eligible and info.identity_key == identity.public_key.hex()
    # The key the roster lists for this node, and so its SecAgg+ id.
    assert node.kit.credentials.entry.identity_key == info.identity_public_key
    assert info.identity_public_key is not None
    assert node_id_for(info.identity_public_key) == identity.node_id
    # An ineligible node still says who it is; another kit is another identity.
    wrong_type = provisioned(federation, 2, NodeType.SENSING, tmp_path).node_info(signed)
    assert not wrong_type.eligible and wrong_type.identity_key == info.identity_key
    other = provisioned(federation, 3, NodeType.ENCODER, tmp_path).node_info(signed)
    assert other.identity_key not in ("", info.identity_key)


def test_the_nodes_policy_refuses_a_job_outside_it_with_the_reason(tmp_path: Path) -> None:
    federation, node = iot_node(tmp_path, policy=None)  # the safe defaults
    refused = {
        "privacy level none is below the minimum dp+secure-agg of rule default": sensing_job("iot"),
        "exceeds max_epsilon 10 of rule default": iot_dp(target_epsilon=None, noise_multiplier=1.0),
        "delta 0.0001 exceeds max_delta 1e-05": iot_dp(delta=1e-4),
    }
    for why, job in refused.items():
        signed = federation.sign(job)
        info = node.node_info(signed)
        assert not info.eligible, why
        assert "this node's policy refuses the job: " in info.reason and why in info.reason
        with pytest.raises(JobRefusedError, match=re.escape(why)):
            node.plain(signed, RANGES, None, NodeState())
    dataset = dataset_key(tmp_path / "data" / "iot", "iot")
    assert node.kit.budget.spent(dataset) == (0.0, 0.0)  # nothing was charged
    assert node.node_info(federation.sign(iot_dp())).eligible  # within the policy


LAX: Final = '[default]\nmin_privacy_level = "dp"\nmax_epsilon = {}\n'


def test_a_policy_tightened_while_the_node_runs_applies_to_a_job_it_already_accepted(
    tmp_path: Path,
) -> None:
    federation, node = iot_node(tmp_path, policy=LAX.format(8.0))
    signed = federation.sign(iot_dp("dp", target_epsilon=6.0))
    assert node.node_info(signed).eligible
    node.plain(signed, RANGES, None, NodeState())
    (federation.kits[0] / POLICY_FILE).write_text(LAX.format(5.0))
    assert "exceeds max_epsilon 5" in node.node_info(signed).reason
    with pytest.raises(JobRefusedError, match="exceeds max_epsilon 5"):
        node.plain(signed, RANGES, None, NodeState())


def test_the_lifetime_budget_is_charged_once_per_job_and_a_job_that_would_exceed_it_is_refused(
    tmp_path: Path,
) -> None:
    policy = '[default]\nmin_privacy_level = "dp"\nmax_epsilon = 5.0\nlifetime_epsilon = 6.0\n'
    federation, node = iot_node(tmp_path, policy)
    store = BudgetStore(federation.kits[0] / STATE_DIR)
    dataset = dataset_key(tmp_path / "data" / "iot", "iot")
    first = federation.sign(iot_dp("dp", target_epsilon=4.0))
    epsilon, delta = worst_case_privacy(iot_dp("dp", target_epsilon=4.0))
    assert 3.5 < epsilon <= 4.0 and delta == 1e-5
    low, high = tuple(IOT_RANGES.low), tuple(IOT_RANGES.high)
    for server_round in (1, 2, 3):  # every collection of every round: one charge
        ranges = RoundConfig(server_round=server_round, work=Work.RANGES)
        node.plain(first, ranges, None, NodeState())
        moments = RoundConfig(
            server_round=server_round, work=Work.MOMENTS, range_low=low, range_high=high
        )
        node.plain(first, moments, None, NodeState())
    assert store.jobs(dataset) == {node.kit.admit(first).job_id: (epsilon, delta)}

    # A second job of epsilon 3 would take the dataset past its lifetime 6: refused before
    # anything is computed, and nothing is charged for it.
    second = federation.sign(iot_dp("dp", target_epsilon=3.0))
    assert node.node_info(second).eligible  # within the policy's per-job limit
    with pytest.raises(JobRefusedError, match="this node's lifetime privacy budget refuses it"):
        node.plain(second, RANGES, None, NodeState())
    assert store.spent(dataset) == (epsilon, delta)
    # One that fits what is left is charged on top.
    third = iot_dp("dp", target_epsilon=1.5)
    node.plain(federation.sign(third), RANGES, None, NodeState())
    assert store.spent(dataset)[0] == pytest.approx(epsilon + worst_case_privacy(third)[0])


def test_a_round_past_the_signed_jobs_num_rounds_is_refused(
    tmp_path: Path, federation: Federation
) -> None:
    write_demo_dataset("iot", tmp_path / "iot", 30, seed=4)
    node = provisioned(federation, 0, NodeType.SENSING, tmp_path)
    signed = federation.sign(sensing_job("iot", federation={"num_rounds": 2}))
    for server_round in (0, 1, 2):  # the initial collection and the two signed rounds
        rnd = RoundConfig(server_round=server_round, work=Work.RANGES)
        assert node.plain(signed, rnd, None, NodeState()).statistics.size > 0
    past = RoundConfig(server_round=3, work=Work.RANGES)
    with pytest.raises(JobRefusedError, match="round 3 is past the signed job's 2 rounds"):
        node.plain(signed, past, None, NodeState())


# ---------------------------------------------------------------------------- sensing


def test_sensing_values_are_per_example_feature_values(tmp_path: Path) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 6, seed=1)
    write_demo_dataset("audio", tmp_path / "audio", 3, seed=1)
    write_demo_dataset("iot", tmp_path / "iot", 40, seed=1)
    camera = sensing_values(sensing_job("camera", input_size=16), tmp_path)
    assert camera.shape == (6, 16 * 16, 3) and camera.min() >= 0.0 and camera.max() <= 1.0
    pixels = load_images(tmp_path / "vision", input_size=16).inputs.numpy()  # uint8
    np.testing.assert_allclose(camera, pixels.reshape(6, 3, -1).transpose(0, 2, 1) / 255.0)
    audio = sensing_values(sensing_job("audio"), tmp_path)
    assert audio.shape[0] == 3 and audio.shape[2] == SENSING_N_MELS and audio.shape[1] > 1
    assert np.all(np.isfinite(audio))
    iot = sensing_values(sensing_job("iot"), tmp_path)
    rows = load_sensor_csv(tmp_path / "iot").values
    assert iot.shape == (40, 1, 5)
    np.testing.assert_allclose(iot[:, 0, :], rows)
    with pytest.raises(ValueError, match="not a sensing job"):
        sensing_values(vit_job(), tmp_path)


def test_histogram_rows_are_per_feature_distributions_of_norm_at_most_one_when_scaled(
    tmp_path: Path,
) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 5, seed=2)
    job = sensing_job("camera", input_size=16)
    values = sensing_values(job, tmp_path)
    ranges = sensing_ranges(job)
    rows = histogram_rows(values, ranges.low, ranges.high, HISTOGRAM_BINS)
    assert rows.shape == (5, 3 * HISTOGRAM_BINS) and rows.min() >= 0
    np.testing.assert_allclose(rows.reshape(5, 3, HISTOGRAM_BINS).sum(axis=2), 1.0)
    scaled = rows / analytics_row_bound(job, Work.RANGES)
    assert np.all(np.linalg.norm(scaled, axis=1) <= 1.0 + 1e-12)
    # Values outside the range land in the end bins; one value per example is a one-hot row.
    outside = np.array([[[-5.0]], [[0.5]], [[7.0]]])
    hist = histogram_rows(outside, np.array([0.0]), np.array([1.0]), 4)
    assert hist.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


def test_moment_rows_centre_values_on_the_range_and_have_norm_at_most_one_when_scaled(
    tmp_path: Path,
) -> None:
    write_demo_dataset("iot", tmp_path / "iot", 50, seed=3)
    job = sensing_job("iot")
    values = sensing_values(job, tmp_path)
    rows = moment_rows(values, IOT_RANGES.low, IOT_RANGES.high)
    assert rows.shape == (50, contribution_length(5)) and np.all(rows[:, 0] == 1.0)
    assert np.all(np.abs(rows[:, 1:6]) <= 1.0) and np.all((rows[:, 6:] >= 0) & (rows[:, 6:] <= 1))
    scaled = rows / analytics_row_bound(job, Work.MOMENTS)
    assert np.all(np.linalg.norm(scaled, axis=1) <= 1.0 + 1e-12)
    # Any range the server sends keeps the bound: out-of-range values are clipped to +-1.
    narrow = moment_rows(values, IOT_RANGES.low, IOT_RANGES.low + 1e-3)
    assert np.all(np.abs(narrow[:, 1:]) <= 1.0)
    known = moment_rows(np.array([[[0.0], [4.0]]]), np.array([0.0]), np.array([4.0]))
    assert known.tolist() == [[1.0, 0.0, 1.0]]  # v = -1 and +1


def test_a_sensing_node_contributes_scaled_rows_and_needs_ranges_for_moments(
    tmp_path: Path,
) -> None:
    write_demo_dataset("iot", tmp_path / "iot", 30, seed=4)
    job = sensing_job("iot")
    node = Node(NodeConfig(NodeType.SENSING, tmp_path), node_id=3)
    ranges = node.contribution(
        job, RoundConfig(server_round=1, work=Work.RANGES), None, NodeState()
    )
    assert ranges.statistic_rows.shape == (30, 5 * HISTOGRAM_BINS) and ranges.update.size == 0
    moments = node.contribution(
        job,
        RoundConfig(
            server_round=1,
            work=Work.MOMENTS,
            range_low=tuple(IOT_RANGES.low),
            range_high=tuple(IOT_RANGES.high),
        ),
        None,
        NodeState(),
    )
    values = sensing_values(job, tmp_path)
    bound = analytics_row_bound(job, Work.MOMENTS)
    rows = moment_rows(values, IOT_RANGES.low, IOT_RANGES.high)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    expected = rows * np.minimum(1.0, bound / norms) / bound  # clipped to the bound, then scaled
    np.testing.assert_allclose(moments.statistic_rows, expected)
    for rows in (ranges.statistic_rows, moments.statistic_rows):
        assert np.all(np.linalg.norm(rows, axis=1) <= 1.0 + 1e-12)
    with pytest.raises(ValueError, match="needs a clipping range per feature"):
        node.contribution(job, RoundConfig(server_round=1, work=Work.MOMENTS), None, NodeState())
    with pytest.raises(ValueError, match="has no fit collections"):
        node.contribution(job, RoundConfig(server_round=1, work=Work.FIT), None, NodeState())
    with pytest.raises(ValueError, match="for sensing nodes; this is a encoder node"):
        Node(NodeConfig(NodeType.ENCODER, tmp_path), node_id=4).contribution(
            job, RoundConfig(server_round=1, work=Work.RANGES), None, NodeState()
        )


def _centred_sum(values: np.ndarray, ranges: FeatureRanges) -> np.ndarray:
    summed: np.ndarray = moment_rows(values, ranges.low, ranges.high).sum(axis=0)
    return summed


def test_normalizer_from_centred_sum_gives_the_pooled_mean_and_std(tmp_path: Path) -> None:
    dirs = []
    for k, n in enumerate((7, 12, 5)):
        write_demo_dataset("vision", tmp_path / f"c{k}" / "vision", n, seed=10 + k)
        write_demo_dataset("iot", tmp_path / f"c{k}" / "iot", 30 * (k + 1), seed=10 + k)
        dirs.append(tmp_path / f"c{k}")
    camera = sensing_job("camera", input_size=32)
    total = np.sum([_centred_sum(sensing_values(camera, d), CAMERA_RANGES) for d in dirs], axis=0)
    norm = normalizer_from_centred_sum(CAMERA_RANGES, total)
    images = [load_images(d / "vision", input_size=32).inputs.numpy() for d in dirs]
    pixels = np.concatenate([i.transpose(0, 2, 3, 1).reshape(-1, 3) / 255.0 for i in images])
    assert norm.features == ("red", "green", "blue") and norm.count.tolist() == [24.0] * 3
    np.testing.assert_allclose(norm.mean, pixels.mean(0), rtol=1e-6)
    np.testing.assert_allclose(norm.std, pixels.std(0), rtol=1e-5)

    iot = sensing_job("iot")
    total = np.sum([_centred_sum(sensing_values(iot, d), IOT_RANGES) for d in dirs], axis=0)
    norm = normalizer_from_centred_sum(IOT_RANGES, total)
    rows = np.concatenate([load_sensor_csv(d / "iot").values for d in dirs])
    assert norm.count[0] == 180
    np.testing.assert_allclose(norm.mean, rows.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(norm.std, rows.std(0), rtol=1e-6)


def test_normalizer_from_centred_sum_clamps_noisy_sums_and_refuses_useless_ones() -> None:
    ranges = FeatureRanges(("a", "b"), np.array([0.0, -1.0]), np.array([2.0, 1.0]))
    # E[v] of feature a is pushed past +1 by noise; E[v^2] < E[v]^2 for feature b.
    noisy = np.array([10.0, 12.0, 5.0, 9.0, 1.0])
    norm = normalizer_from_centred_sum(ranges, noisy)
    assert norm.mean.tolist() == [2.0, 0.5]  # a: clipped to the top of its range
    assert norm.std.tolist() == [0.0, 0.0]  # variances clamped at 0
    assert norm.count.tolist() == [10.0, 10.0]
    for count in (0.0, -3.0):
        with pytest.raises(ValueError, match="needs a positive count"):
            normalizer_from_centred_sum(ranges, np.r_[count, noisy[1:]])
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        normalizer_from_centred_sum(ranges, np.ones(7))
    with pytest.raises(ValueError, match="NaN or Inf"):
        normalizer_from_centred_sum(ranges, np.r_[noisy[:2], np.nan, noisy[3:]])


# -------------------------------------------------------------------------- contributions


def test_noop_training_node_contributes_a_zero_update_and_no_evaluation_rows(
    tmp_path: Path, federation: Federation
) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    job = vit_job()
    config = NodeConfig.from_flower(
        {
            "node-type": "encoder",
            "data-dir": str(tmp_path),
            "noop-training": True,
            "kit": str(federation.kits[0]),
        }
    )
    weights = weights_of(job, seed=3)
    node = Node(config, node_id=5)
    fit = node.contribution(job, RoundConfig(server_round=1, seed=1), weights, NodeState())
    assert fit.update.shape == (sum(w.size for _, w in weights),) and not fit.update.any()
    assert fit.metric_rows.shape == (0, 2)
    rnd = RoundConfig(server_round=1, seed=1)
    summed = node.plain(federation.sign(job), rnd, weights, NodeState())
    assert summed.metrics == {Metric.EXAMPLES: 0.0, Metric.TRAIN_LOSS: 0.0}
    evaluation = node.contribution(
        job, RoundConfig(server_round=1, work=Work.EVALUATE), weights, NodeState()
    )
    assert evaluation.metric_rows.shape == (0, 3)


def test_node_level_dp_evaluation_contributes_one_row_of_this_nodes_means(tmp_path: Path) -> None:
    write_demo_dataset("vision", tmp_path / "vision", 20, seed=0)
    node_dp = vit_job(
        privacy_level="dp",
        dp={"unit": "node", "clipping_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5},
    )
    weights = weights_of(node_dp)
    node = Node(NodeConfig(NodeType.ENCODER, tmp_path), node_id=5)
    rnd = RoundConfig(server_round=1, work=Work.EVALUATE)
    rows = node.contribution(node_dp, rnd, weights, NodeState()).metric_rows
    per_example = node.contribution(vit_job(), rnd, weights, NodeState()).metric_rows
    assert rows.shape == (1, 2)  # loss and correctness: one row of this node's means
    np.testing.assert_allclose(rows[0], per_example[:, 1:].mean(axis=0))
    bounds = np.array([s.bound for s in metrics_for(node_dp, Work.EVALUATE)])
    assert np.all(rows <= bounds) and np.all(rows >= 0)
