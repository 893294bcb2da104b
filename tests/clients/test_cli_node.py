"""``fedbrain node policy check``: exit codes 0 (valid / accepted), 1 (refused), 2 (invalid)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from server.cli import app

runner = CliRunner()

SENSING_JOB = """\
component = "sensing"
base_model = "iot"
task = "normalizer"
privacy_level = "dp+secure-agg"

[dp]
unit = "example"
delta = 1e-5
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def check(*args: Path | str) -> tuple[int, str]:
    result = runner.invoke(app, ["node", "policy", "check", *map(str, args)])
    return result.exit_code, result.output


def test_a_valid_policy_prints_its_effective_form_and_exits_0(tmp_path: Path) -> None:
    policy = write(tmp_path, "policy.toml", "[default]\nmax_epsilon = 5.0\n")
    code, output = check(policy)
    assert code == 0, output
    assert "max_epsilon = 5.0" in output
    assert "lifetime_epsilon = 30.0" in output and "min_clients = 3" in output


def test_a_job_the_node_accepts_exits_0(tmp_path: Path) -> None:
    policy = write(tmp_path, "policy.toml", "")
    job = write(tmp_path, "job.toml", SENSING_JOB + "target_epsilon = 4.0\n")
    code, output = check(policy, "--job", job)
    assert code == 0, output
    assert "under rule default: epsilon: 3.9" in output and "accepted" in output


def test_a_job_the_node_refuses_exits_1_with_the_reason(tmp_path: Path) -> None:
    policy = write(tmp_path, "policy.toml", "")
    job = write(tmp_path, "job.toml", SENSING_JOB + "noise_multiplier = 1.0\n")
    code, output = check(policy, "--job", job)
    assert code == 1, output
    assert "refused:" in output and "exceeds max_epsilon 10 of rule default" in output


def test_an_invalid_policy_exits_2_listing_every_problem(tmp_path: Path) -> None:
    policy = write(tmp_path, "policy.toml", "[default]\nmax_epsilon = true\n[secagg]\nk = 1\n")
    code, output = check(policy)
    assert code == 2
    assert "default.max_epsilon: must be a number. Found true." in output
    assert "secagg.k: is not a policy setting" in output


def test_a_missing_policy_or_an_invalid_job_exits_2(tmp_path: Path) -> None:
    assert check(tmp_path / "absent.toml")[0] == 2
    policy = write(tmp_path, "policy.toml", "")
    job = write(tmp_path, "job.toml", "component = 'sensing'\nbatch_size = 0\n")
    code, output = check(policy, "--job", job)
    assert code == 2 and "batch_size" in output
