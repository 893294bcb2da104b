"""Scenario files: the embedded default, validation (every problem at once), overrides, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from clients.demo_data import Modality
from manifests.catalog import NodeType
from manifests.jobspec import DEMO_BASE, Adaptation, DpUnit, PrivacyLevel
from server.cli import app
from simulations.runner import ExitCode
from simulations.scenario import (
    Overrides,
    PartitionKind,
    Scenario,
    ScenarioError,
    load_scenario,
    parse_scenario,
)

DEFAULT_ARTIFACTS = {
    "sensing-camera-preproc-v1",
    "sensing-audio-preproc-v1",
    "sensing-iot-normalizer-v1",
    "vit-base16-embed-v1",
    "wav2vec2-base-embed-v1",
    "gpt-small-v1",
}

TINY = """\
[simulation]
name = "tiny"
seed = 7

[[nodes]]
type = "sensing"
count = 3
modalities = ["iot", "vision"]
examples = 16
partition = { kind = "dirichlet", alpha = 0.5 }

[[nodes]]
type = "encoder"
count = 3
modalities = ["vision"]
examples = 20

[[jobs]]
component = "sensing"
base_model = "iot"
task = "normalizer"
privacy_level = "secure-agg"
federation = { num_rounds = 1 }

[[jobs]]
component = "vision"
base_model = "vit-base16"
task = "embed"
embedding_dim = 16
privacy_level = "dp"
dp = { unit = "example", clipping_norm = 1.0, target_epsilon = 8.0, delta = 1e-5 }
"""


def write(tmp_path: Path, text: str, name: str = "scenario.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, "utf-8")
    return path


def problems_of(path: Path, overrides: Overrides | None = None) -> tuple[str, ...]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, overrides)
    return info.value.problems


@pytest.fixture(scope="module")
def default() -> Scenario:
    return load_scenario()


# ----------------------------------------------------------------------------- default


def test_default_scenario_lists_the_six_artifacts(default: Scenario) -> None:
    assert {job.catalog_id for job in default.jobs} == DEFAULT_ARTIFACTS
    assert len({job.artifact_name for job in default.jobs}) == len(default.jobs)
    assert default.source == "<embedded default.toml>"


def test_default_scenario_is_dp_and_secure_agg_within_budget(default: Scenario) -> None:
    for job in default.jobs:
        spec = job.spec
        assert spec.privacy_level is PrivacyLevel.DP_SECURE_AGG
        assert spec.dp.epsilon_budget is not None and spec.dp.epsilon_budget <= 10
        assert spec.dp.delta is not None and spec.dp.delta <= 1e-5
        # a few data-rich nodes: example-level DP (the federator refuses node DP for sensing)
        assert spec.dp.unit is DpUnit.EXAMPLE
        if job.is_analytics:
            assert spec.federation.num_rounds == 1
        else:
            assert spec.hidden_size is not None and spec.hidden_size <= 64
            assert spec.num_layers is not None and spec.num_layers <= 2


def test_default_scenario_fine_tunes_demo_bases_at_their_sizes(default: Scenario) -> None:
    from clients.models import family_for_base_model
    from clients.pretrain import DEMO_BASES

    models = [job for job in default.jobs if not job.is_analytics]
    assert len(models) == 3
    for job in models:
        spec = job.spec
        # the runner generates the base and substitutes its path (test_runner)
        assert spec.base_checkpoint == DEMO_BASE
        assert spec.adaptation in {Adaptation.HEAD, Adaptation.LORA}
        assert spec.dp.target_epsilon is not None and spec.dp.target_epsilon <= 8
        # the manifest's model_config shows the trained (demo) sizes
        base = DEMO_BASES[family_for_base_model(spec.base_model)]
        assert (spec.hidden_size, spec.num_layers, spec.num_heads) == (
            base.hidden_size,
            base.num_layers,
            base.num_heads,
        )
    assert all(job.spec.base_checkpoint is None for job in default.jobs if job.is_analytics)


def test_a_demo_base_job_must_give_the_bases_sizes(tmp_path: Path) -> None:
    text = TINY.replace(
        "embedding_dim = 16\n",
        'embedding_dim = 16\nbase_checkpoint = "demo"\nadaptation = "head"\nhidden_size = 32\n',
    )
    found = problems_of(write(tmp_path, text))
    assert any(
        p.startswith(
            "jobs[1].hidden_size: the vit demo base (base_checkpoint = demo) has hidden_size = 64"
        )
        and p.endswith("Found 32.")
        for p in found
    ), found
    assert any(p.startswith("jobs[1].num_layers:") and p.endswith("Found None.") for p in found)
    assert any(p.startswith("jobs[1].embedding_dim:") for p in found)


def test_default_scenario_has_nodes_with_every_jobs_data(default: Scenario) -> None:
    for job in default.jobs:
        nodes = default.nodes_of(job.node_type)
        assert len(nodes) >= 3  # SecAgg+ hides one update among at least three
        assert all(job.modality in node.modalities for node in nodes)
    assert {n.node_type for n in default.nodes} == {
        NodeType.SENSING,
        NodeType.ENCODER,
        NodeType.INFERENCE,
    }
    assert [n.index for n in default.nodes] == list(range(len(default.nodes)))
    assert len({n.name for n in default.nodes}) == len(default.nodes)


# ---------------------------------------------------------------------------- validation


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
colours = 3

[simulation]
seed = -1
speed = "fast"

[[nodes]]
type = "decision"
count = 0
modalities = ["vision", "smell"]
partition = { kind = "dirichlet" }

[[nodes]]
type = "encoder"
count = 2
modalities = ["audio"]
examples = "many"
faults = [{ node = 0, fail_on = ["train.fit@two"] }]

[[jobs]]
component = "vision"
base_model = "vit-base16"
task = "embed"
batch_size = 0

[[jobs]]
component = "sensing"
base_model = "iot"
task = "normalizer"
privacy_level = "loud"
""",
    )
    problems = problems_of(path)
    expected = [
        "colours: is not a scenario section",
        "simulation.seed: must be >= 0",
        "simulation.speed: is not a scenario setting",
        "nodes[0].type: must be a node type that trains artifacts",
        "nodes[0].count: must be >= 1",
        "nodes[0].modalities[1]: must be one of",
        "nodes[0].partition: dirichlet needs alpha",
        "nodes[1].examples: must be a number or a table of numbers per modality",
        "nodes[1].faults[0].fail_on: each entry must be",
        "jobs[0].batch_size: must be >= 1",
        "jobs[0].embedding_dim: is required when task is embed",
        "jobs[1].privacy_level: must be one of",
    ]
    for text in expected:
        assert sum(p.startswith(text) for p in problems) == 1, (text, problems)
    assert len(problems) == len(expected)


def test_cross_checks_between_nodes_and_jobs(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
[[nodes]]
type = "encoder"
count = 2
modalities = ["audio"]
faults = [{ node = 2, fail_on = ["train.fit@1"] }]

[[nodes]]
type = "encoder"
count = 2
modalities = ["vision"]

[[jobs]]
component = "vision"
base_model = "vit-base16"
task = "embed"
embedding_dim = 16
federation = { clients_per_round = 5 }

[[jobs]]
component = "vision"
base_model = "vit-base16"
task = "embed"
embedding_dim = 16

[[jobs]]
component = "inference"
base_model = "gpt-small-v1"
task = "lm-finetune"
""",
    )
    problems = problems_of(path)
    assert problems == (
        "nodes[0]: faults: node 2 does not exist (the group has 2 nodes, indices 0..1).",
        "jobs[1]: trains vision-vit-base16-embed-v1, like jobs[0]. Give one of them another "
        "artifact_name or model_version.",
    )
    # with every group valid, the checks across parts run too:
    path.write_text(path.read_text().replace("node = 2", "node = 1"))
    problems = problems_of(path)
    assert problems == (
        "jobs[1]: trains vision-vit-base16-embed-v1, like jobs[0]. Give one of them another "
        "artifact_name or model_version.",
        "nodes[1].name: 'encoder' is already the name of nodes[0]; give each group of the "
        "same type a distinct name.",
        "jobs[0] (vision-vit-base16-embed-v1): needs vision data on every encoder node, but "
        "nodes[0] do not list it in modalities.",
        "jobs[0] (vision-vit-base16-embed-v1).federation.clients_per_round: must not exceed "
        "the 4 encoder nodes of the scenario. Found 5.",
        "jobs[1] (vision-vit-base16-embed-v1): needs vision data on every encoder node, but "
        "nodes[0] do not list it in modalities.",
        "jobs[2] (gpt-small-v1-lm-finetune-v1): trains on inference nodes, but the scenario "
        'has none. Add a [[nodes]] group with type = "inference".',
    )


def test_job_without_nodes_of_its_type(tmp_path: Path) -> None:
    path = write(tmp_path, TINY.replace('type = "sensing"', 'type = "inference"'))
    (problem,) = problems_of(path)
    assert problem == (
        "jobs[0] (sensing-iot-normalizer-v1): trains on sensing nodes, but the scenario has "
        'none. Add a [[nodes]] group with type = "sensing".'
    )


def test_unreadable_and_non_toml_files(tmp_path: Path) -> None:
    assert problems_of(tmp_path / "missing.toml")[0].startswith("scenario file: cannot read")
    path = write(tmp_path, "[simulation\nseed = 1\n")
    (problem,) = problems_of(path)
    assert problem.startswith("scenario file: not valid TOML")
    (problem, *_) = problems_of(write(tmp_path, "[simulation]\n"))
    assert problem == "nodes: the scenario needs at least one [[nodes]] group."


def test_data_dir_needs_a_folder_per_node(tmp_path: Path) -> None:
    real = tmp_path / "real"
    for name in ("a", "b"):
        (real / name / "iot").mkdir(parents=True)
    (real / "b" / "vision").mkdir()
    text = TINY.replace("partition =", 'data_dir = "real"\npartition =')
    problems = problems_of(write(tmp_path, text))
    assert any("holds 2 node folders, fewer than count (3)" in p for p in problems)
    (real / "c" / "iot").mkdir(parents=True)
    (real / "c" / "vision").mkdir(parents=True)
    problems = problems_of(write(tmp_path, text))
    assert len(problems) == 1 and "/a' lacks the modality folders ['vision']" in problems[0]
    (real / "a" / "vision").mkdir()
    scenario = load_scenario(write(tmp_path, text))
    assert [n.data_dir for n in scenario.nodes_of(NodeType.SENSING)] == [
        real / "a",
        real / "b",
        real / "c",
    ]
    assert all(n.data_dir is None for n in scenario.nodes_of(NodeType.ENCODER))


def test_partition_forms_and_examples_per_modality(tmp_path: Path) -> None:
    text = TINY.replace(
        'examples = 16\npartition = { kind = "dirichlet", alpha = 0.5 }',
        'examples = { iot = 300, vision = 20 }\npartition = "iid"',
    )
    scenario = load_scenario(write(tmp_path, text))
    group = scenario.groups[0]
    assert scenario.groups[1].examples_for(Modality.VISION) == 20
    assert group.partition.kind is PartitionKind.IID and group.partition.alpha is None
    assert group.examples_for(Modality.IOT) == 300
    assert group.examples_for(Modality.VISION) == 20
    bad = text.replace("examples = { iot = 300, vision = 20 }", "examples = { iot = 300 }")
    (problem,) = problems_of(write(tmp_path, bad))
    assert "examples: gives no number for ['vision']" in problem


# ----------------------------------------------------------------------------- overrides


def test_overrides_apply(default: Scenario) -> None:
    scenario = load_scenario(
        None,
        Overrides(rounds=4, nodes=5, privacy_level="secure-agg", seed=3, out=Path("elsewhere")),
    )
    assert scenario.seed == 3 and scenario.out == Path("elsewhere")
    assert all(g.count == 5 for g in scenario.groups)
    assert len(scenario.nodes) == 5 * len(scenario.groups)
    for job in scenario.jobs:
        assert job.spec.privacy_level is PrivacyLevel.SECURE_AGG
        # the DP tables are dropped with a level that applies no DP
        assert job.spec.dp.noise_multiplier is None
        assert job.spec.federation.num_rounds == (1 if job.is_analytics else 4)
    assert scenario.data_hash() != default.data_hash()
    same_data = load_scenario(None, Overrides(rounds=4, privacy_level="none"))
    assert same_data.data_hash() == default.data_hash()


def test_only_selects_by_artifact_name_or_catalog_id() -> None:
    scenario = load_scenario(
        None, Overrides(only=("sensing-iot-normalizer-v1", "gpt-small-v1-lm-finetune-v1"))
    )
    assert [j.catalog_id for j in scenario.jobs] == ["sensing-iot-normalizer-v1", "gpt-small-v1"]
    scenario = load_scenario(None, Overrides(only=("vit-base16-embed-v1",)))
    assert [j.artifact_name for j in scenario.jobs] == ["vision-vit-base16-embed-v1"]
    with pytest.raises(ScenarioError) as info:
        load_scenario(None, Overrides(only=("vit-large",)))
    (problem,) = info.value.problems
    assert problem.startswith("--only: no job trains vit-large. The jobs are: sensing-camera")


def test_invalid_override_names_the_option() -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario(None, Overrides(privacy_level="loud", rounds=0))
    assert info.value.problems[0].startswith("--rounds (simulation.rounds): must be >= 1")
    assert info.value.problems[1].startswith("--privacy-level (simulation.privacy_level):")


def test_privacy_override_that_needs_missing_dp_settings(tmp_path: Path) -> None:
    path = write(tmp_path, TINY)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path, Overrides(privacy_level="dp+secure-agg"))
    problems = info.value.problems
    assert any(p.startswith("jobs[0].dp.delta: is required") for p in problems)
    assert any(p.startswith("jobs[0].dp.noise_multiplier: privacy_level") for p in problems)
    assert not any(p.startswith("jobs[0].dp.clipping_norm") for p in problems)  # analytics
    assert not any(p.startswith("jobs[1]") for p in problems)


def test_parse_scenario_resolves_data_dir_against_base_dir(tmp_path: Path) -> None:
    for name in ("n0", "n1", "n2"):
        for modality in ("iot", "vision"):
            (tmp_path / "data" / name / modality).mkdir(parents=True)
    import tomllib

    values = tomllib.loads(TINY)
    values["nodes"][0]["data_dir"] = "data"
    scenario = parse_scenario(values, base_dir=tmp_path)
    assert scenario.groups[0].data_dir == (tmp_path / "data").resolve()


# ---------------------------------------------------------------------------------- CLI


def test_cli_check_shows_the_plan() -> None:
    result = CliRunner().invoke(app, ["simulate", "--check", "--only", "gpt-small-v1"])
    assert result.exit_code == 0, result.output
    assert "gpt-small-v1-lm-finetune-v1" in result.output
    assert "sensing-camera" not in result.output
    assert "nothing was run" in result.output


def test_cli_invalid_scenario_exits_2_with_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, TINY.replace("seed = 7", "seed = -7").replace("count = 3", "count = 0"))
    result = CliRunner().invoke(app, ["simulate", str(path), "--check"])
    assert result.exit_code == ExitCode.INVALID
    assert "(3 problems)" in result.output
    assert "simulation.seed: must be >= 0" in result.output
    assert "nodes[0].count: must be >= 1" in result.output
    assert "nodes[1].count: must be >= 1" in result.output


def test_a_cross_device_group_of_thousands_is_valid_but_a_scenario_holds_at_most_max_nodes(
    tmp_path: Path,
) -> None:
    from simulations.scenario import MAX_NODES

    many = load_scenario(write(tmp_path, TINY), Overrides(nodes=1000))
    assert len(many.nodes_of(NodeType.SENSING)) == 1000 and len(many.nodes) == 2000
    with pytest.raises(ScenarioError) as raised:
        load_scenario(write(tmp_path, TINY), Overrides(nodes=MAX_NODES // 2 + 1))
    assert raised.value.problems == (
        f"nodes: the groups hold {MAX_NODES + 2} nodes in all; a scenario holds at most "
        f"{MAX_NODES}.",
    )
    with pytest.raises(
        ScenarioError, match=f"--nodes \\(nodes\\[0\\].count\\): must be <= {MAX_NODES}"
    ):
        load_scenario(write(tmp_path, TINY), Overrides(nodes=MAX_NODES + 1))


def test_the_cross_device_scenario_is_node_level_dp_with_secret_sampling() -> None:
    scenario = load_scenario(Path(__file__).parents[2] / "simulations" / "cross_device.toml")
    (job,) = scenario.jobs
    spec = job.spec
    assert len(scenario.nodes) == 1000
    assert spec.privacy_level is PrivacyLevel.DP_SECURE_AGG and spec.dp.unit is DpUnit.NODE
    assert spec.federation.sampling.value == "secret"
    assert spec.federation.clients_per_round is not None and spec.federation.fraction is not None
    included = spec.federation.clients_per_round * spec.federation.fraction
    assert 90 <= included <= 110  # about 100 nodes' data per round
