"""The keys / bundle / verify / demo commands, through the root ``fedbrain`` app."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from manifests.bundle import MANIFEST_MEMBER, WEIGHTS_MEMBER
from server.cli import app
from tests.manifests.test_bundle import canonical_zip, read_members, write_weights
from tests.manifests.test_manifest import provenance_data

runner = CliRunner()

VISION_JOB = """\
component = "vision"
base_model = "vit-base16"
task = "embed"
embedding_dim = 768
precision = "fp16"
batch_size = 256
epochs = 10
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle built with freshly generated keys: (bundle, trusted_keys.json)."""
    folder = tmp_path_factory.mktemp("cli")
    result = runner.invoke(
        app,
        [
            "keys",
            "generate",
            "--out",
            str(folder / "keys"),
            "--not-before",
            "2025-01-01T00:00:00Z",
            "--valid-days",
            "3650",
        ],
    )
    assert result.exit_code == 0, result.output
    (folder / "job.toml").write_text(VISION_JOB)
    (folder / "provenance.json").write_text(json.dumps(provenance_data()))
    write_weights(folder / "w.safetensors")
    out = folder / "out" / "bundle.zip"
    out.parent.mkdir()
    result = runner.invoke(
        app,
        [
            "bundle", "build", "--job", str(folder / "job.toml"),
            "--weights", str(folder / "w.safetensors"),
            "--provenance", str(folder / "provenance.json"),
            "--key", str(folder / "keys" / "signing_key.pem"), "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out, folder / "keys" / "trusted_keys.json"


def test_keys_generate_writes_a_private_key_only_the_owner_can_read(tmp_path: Path) -> None:
    result = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    mode = stat.S_IMODE((tmp_path / "signing_key.pem").stat().st_mode)
    assert mode == 0o600
    trusted = json.loads((tmp_path / "trusted_keys.json").read_text())
    assert trusted[0]["keyid"] in result.output
    again = runner.invoke(app, ["keys", "generate", "--out", str(tmp_path)])
    assert again.exit_code == 2  # usage: the rule in manifests.cli_errors
    assert "--force" in again.stderr


def test_bundle_build_writes_the_manifest_beside_the_bundle(built: tuple[Path, Path]) -> None:
    bundle, _ = built
    assert (bundle.parent / MANIFEST_MEMBER).read_bytes() == read_members(bundle)[MANIFEST_MEMBER]


def test_verify_exits_zero_and_prints_a_summary(built: tuple[Path, Path]) -> None:
    bundle, trusted = built
    result = runner.invoke(app, ["verify", str(bundle), "--trusted-keys", str(trusted)])
    assert result.exit_code == 0, result.output
    assert "vision-vit-base16-embed-v1" in result.stdout
    assert "model.safetensors" in result.stdout


def test_bundle_build_rejects_pickled_weights_with_a_message(
    tmp_path: Path, built: tuple[Path, Path]
) -> None:
    keys = built[1].parent
    (tmp_path / "job.toml").write_text(VISION_JOB)
    (tmp_path / "provenance.json").write_text(json.dumps(provenance_data()))
    (tmp_path / "w.pt").write_bytes(b"\x80\x04K\x01.")
    result = runner.invoke(
        app,
        [
            "bundle", "build", "--job", str(tmp_path / "job.toml"),
            "--weights", str(tmp_path / "w.pt"),
            "--provenance", str(tmp_path / "provenance.json"),
            "--key", str(keys / "signing_key.pem"), "--out", str(tmp_path / "b.zip"),
        ],
    )  # fmt: skip
    assert result.exit_code == 2  # invalid input, not a failed check
    assert "only safetensors is accepted" in result.stderr
    assert not (tmp_path / "b.zip").exists()


def _tampered(bundle: Path) -> dict[str, bytes]:
    members = read_members(bundle)
    weights = bytearray(members[WEIGHTS_MEMBER])
    weights[-1] ^= 1
    flipped = bundle.read_bytes()
    return {
        "weights": canonical_zip({**members, WEIGHTS_MEMBER: bytes(weights)}),
        "extra": canonical_zip({**members, "extra.bin": b"x"}),
        "raw-flip": flipped[:100] + bytes([flipped[100] ^ 0xFF]) + flipped[101:],
        "truncated": flipped[:-30],
        "not-a-zip": b"hello",
    }


@pytest.mark.parametrize("case", ["weights", "extra", "raw-flip", "truncated", "not-a-zip"])
def test_verify_rejects_with_exit_one_a_reason_and_no_extracted_files(
    tmp_path: Path, built: tuple[Path, Path], case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, trusted = built
    candidate = tmp_path / "candidate.zip"
    candidate.write_bytes(_tampered(bundle)[case])
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = runner.invoke(app, ["verify", str(candidate), "--trusted-keys", str(trusted)])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: verification failed: ")
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_verify_with_an_unknown_key_file_fails_cleanly(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    result = runner.invoke(
        app, ["verify", str(built[0]), "--trusted-keys", str(tmp_path / "no.json")]
    )
    assert result.exit_code == 2
    assert (
        result.stderr == f"error: cannot read {tmp_path / 'no.json'}: No such file or directory\n"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"rounds": "x"}', "rounds: input should be a valid integer"),
        ('{"rounds": 1', "invalid JSON"),
    ],
)
def test_bundle_build_with_a_bad_provenance_file_is_one_line_exit_two(
    tmp_path: Path, built: tuple[Path, Path], content: str, expected: str
) -> None:
    keys = built[1].parent
    (tmp_path / "job.toml").write_text(VISION_JOB)
    (tmp_path / "provenance.json").write_text(content)
    (tmp_path / "w.safetensors").write_bytes(b"")
    result = runner.invoke(
        app,
        [
            "bundle", "build", "--job", str(tmp_path / "job.toml"),
            "--weights", str(tmp_path / "w.safetensors"),
            "--provenance", str(tmp_path / "provenance.json"),
            "--key", str(keys / "signing_key.pem"), "--out", str(tmp_path / "b.zip"),
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr and "pydantic" not in result.stderr


def test_demo_builds_and_verifies_both_specification_examples(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "vision" / "vision-vit-base16-embed-v1.zip").is_file()
    assert (tmp_path / "lm" / "gpt-small-v1-lm-finetune-int8-v1.zip").is_file()
    lm = json.loads((tmp_path / "lm" / MANIFEST_MEMBER).read_text())
    assert (lm["precision"], lm["quantized"], lm["input_spec"]) == (
        "int8",
        True,
        {"max_seq_length": 1024},
    )
    vision = json.loads((tmp_path / "vision" / MANIFEST_MEMBER).read_text())
    assert (vision["precision"], vision["embedding_dim"]) == ("fp16", 768)


# ------------------------------------------------------------------ keys over time


def test_keys_generate_refuses_a_window_that_is_already_over(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "keys", "generate", "--out", str(tmp_path / "k"),
            "--not-before", "2020-01-01T00:00:00Z", "--valid-days", "30",
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "already over" in result.stderr
    assert not (tmp_path / "k").exists()


def _build_args(folder: Path, key: Path, out: Path) -> list[str]:
    return [
        "bundle", "build", "--job", str(folder / "job.toml"),
        "--weights", str(folder / "w.safetensors"),
        "--provenance", str(folder / "provenance.json"),
        "--key", str(key), "--out", str(out),
    ]  # fmt: skip


def test_bundle_build_refuses_a_key_whose_window_ended(
    tmp_path: Path, built: tuple[Path, Path]
) -> None:
    from datetime import UTC, datetime

    from manifests.demo import write_keys
    from manifests.keys import SigningKey

    folder = built[0].parent.parent
    private, _, _ = write_keys(
        tmp_path / "old",
        SigningKey.generate(),
        not_before=datetime(2020, 1, 1, tzinfo=UTC),
        not_after=datetime(2021, 1, 1, tzinfo=UTC),
    )
    out = tmp_path / "b.zip"
    result = runner.invoke(app, _build_args(folder, private, out))
    assert result.exit_code == 2
    assert "window ended at 2021-01-01T00:00:00Z" in result.stderr
    assert not out.exists()


def test_bundle_build_needs_the_keys_window(tmp_path: Path, built: tuple[Path, Path]) -> None:
    folder = built[0].parent.parent
    key = tmp_path / "lonely.pem"
    key.write_bytes((folder / "keys" / "signing_key.pem").read_bytes())
    result = runner.invoke(app, _build_args(folder, key, tmp_path / "b.zip"))
    assert result.exit_code == 2
    assert "--trusted-keys" in result.stderr
    assert not (tmp_path / "b.zip").exists()


def test_keys_revoke_makes_verify_fail_offline(tmp_path: Path, built: tuple[Path, Path]) -> None:
    bundle, trusted = built
    copy = tmp_path / "trusted_keys.json"
    copy.write_bytes(trusted.read_bytes())
    keyid = json.loads(copy.read_text())[0]["keyid"]
    result = runner.invoke(app, ["keys", "revoke", keyid, "--trusted-keys", str(copy)])
    assert result.exit_code == 0, result.output
    verified = runner.invoke(app, ["verify", str(bundle), "--trusted-keys", str(copy)])
    assert verified.exit_code == 1
    assert "revoked" in verified.stderr
    unknown = runner.invoke(
        app, ["keys", "revoke", "sha256:" + "0" * 64, "--trusted-keys", str(copy)]
    )
    assert unknown.exit_code == 2
