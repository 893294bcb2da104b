"""Signing commands: ``fedbrain keys generate|revoke``, ``bundle build``, ``verify``, ``demo``.

Exit codes (:mod:`manifests.cli_errors`): 0 done; 1 the bundle does not verify; 2 invalid
input (a job, provenance, key or trusted-keys file that is missing or invalid). Errors are one
line on stderr (no traceback, no pydantic report).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from manifests.cli_errors import EXIT_FAILED, EXIT_INVALID, one_line
from manifests.keys import KeyVerificationError, SigningKey, format_timestamp, parse_timestamp
from manifests.verify import BundleVerificationError, VerifiedBundle

keys_app = typer.Typer(help="Ed25519 signing keys and the trusted-keys file.", no_args_is_help=True)
bundle_app = typer.Typer(help="Signed artifact bundles.", no_args_is_help=True)

_FAILURES = (ValueError, OSError, KeyVerificationError, BundleVerificationError)


def _fail(message: str, code: int = EXIT_INVALID) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", help="Folder for the key files.")],
    valid_days: Annotated[int, typer.Option(min=1, help="Validity window length in days.")] = 365,
    not_before: Annotated[
        str | None, typer.Option(help="Window start, e.g. 2025-01-31T00:00:00Z (default: now).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite existing key files.")] = False,
) -> None:
    """Write signing_key.pem (0600), signing_key.pub.pem and trusted_keys.json."""
    from manifests.demo import write_keys

    try:
        start = parse_timestamp(not_before) if not_before else _now()
        end = start + timedelta(days=valid_days)
        if end <= _now():
            raise ValueError(
                f"the validity window {format_timestamp(start)} to {format_timestamp(end)} is "
                "already over: such a key could never sign. Give a later --not-before or more "
                "--valid-days"
            )
        if (out / "signing_key.pem").exists() and not force:
            raise ValueError(f"{out / 'signing_key.pem'} exists; pass --force to replace it")
        key = SigningKey.generate()
        private, public, trusted = write_keys(out, key, not_before=start, not_after=end)
    except _FAILURES as exc:
        raise _fail(one_line(exc)) from None
    typer.echo(f"key id       {key.keyid}")
    typer.echo(f"private key  {private}")
    typer.echo(f"public key   {public}")
    typer.echo(f"trusted keys {trusted} (valid {format_timestamp(start)} + {valid_days} days)")


@keys_app.command("revoke")
def keys_revoke(
    keyid: Annotated[str, typer.Argument(help="The key id (sha256:...) to revoke.")],
    trusted_keys: Annotated[
        Path, typer.Option("--trusted-keys", help="The trusted-keys file to update in place.")
    ],
) -> None:
    """Mark a key revoked in a trusted-keys file (offline; every verifier that uses the file
    then rejects every bundle, job and roster the key signed, whatever its date)."""
    from manifests.atomic import write_atomically
    from manifests.keys import TrustedKeys

    try:
        updated = TrustedKeys.load(trusted_keys).revoke(keyid)
        write_atomically(trusted_keys, updated.to_json())
    except _FAILURES as exc:
        raise _fail(one_line(exc)) from None
    typer.echo(f"revoked {keyid} in {trusted_keys}")


@bundle_app.command("build")
def bundle_build(
    job: Annotated[Path, typer.Option("--job", help="Job file (.toml or .json).")],
    weights: Annotated[Path, typer.Option("--weights", help="Weights (.safetensors).")],
    provenance: Annotated[Path, typer.Option("--provenance", help="Provenance JSON file.")],
    key: Annotated[Path, typer.Option("--key", help="PEM PKCS#8 Ed25519 private key.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle to write (.zip).")],
    trusted_keys: Annotated[
        Path | None,
        typer.Option(
            "--trusted-keys",
            help="Trusted-keys file that pins the key's validity window "
            "(default: trusted_keys.json beside the key).",
        ),
    ] = None,
) -> None:
    """Build and sign a reproducible bundle; also writes artifact_manifest.json beside it.

    Refused when the key is revoked or outside its validity window (as pinned in the
    trusted-keys file) now."""
    from manifests.bundle import build_bundle
    from manifests.jobspec import load_job
    from manifests.keys import TrustedKeys
    from manifests.manifest import Provenance

    try:
        signing_key = SigningKey.from_pem(key.read_bytes())
        pinned = trusted_keys or key.parent / "trusted_keys.json"
        if not pinned.is_file():
            raise ValueError(
                f"cannot check the key's validity window: no {pinned}; pass --trusted-keys "
                "with the file that lists the key"
            )
        TrustedKeys.load(pinned).check_can_sign(signing_key.public_key(), _now())
        built = build_bundle(
            load_job(job),
            weights,
            Provenance.load(provenance),
            signing_key,
            out,
            environ=os.environ,
        )
    except _FAILURES as exc:
        raise _fail(one_line(exc)) from None
    typer.echo(f"bundle   {built.path}")
    typer.echo(f"manifest {built.manifest_path}")
    typer.echo(f"artifact {built.manifest.artifact_name} signed by {built.keyid}")


def _summary(result: VerifiedBundle) -> Table:
    manifest = result.manifest
    table = Table(title=f"verified: {result.path}", show_header=False)
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    table.add_row("artifact", result.artifact_name)
    table.add_row("precision", f"{manifest.precision} (quantized: {manifest.quantized})")
    table.add_row("created_at", format_timestamp(manifest.created_at))
    table.add_row("privacy_level", manifest.privacy_level)
    table.add_row("signed by", result.keyid)
    for subject in result.subjects:
        table.add_row(subject.name, f"sha256:{subject.sha256}")
    return table


def verify(
    bundle: Annotated[Path, typer.Argument(help="The bundle (.zip) to verify.")],
    trusted_keys: Annotated[Path, typer.Option("--trusted-keys", help="Pinned trusted keys.")],
) -> None:
    """Verify a bundle offline; exit 0 and print a summary, 1 with the reason when it does not
    verify, 2 when an input cannot be read."""
    from manifests.keys import TrustedKeys
    from manifests.verify import verify_bundle

    try:
        result = verify_bundle(bundle, TrustedKeys.load(trusted_keys), now=_now())
    except BundleVerificationError as exc:
        raise _fail(f"verification failed: {one_line(exc)}", EXIT_FAILED) from None
    except _FAILURES as exc:
        raise _fail(one_line(exc)) from None
    Console(soft_wrap=True).print(_summary(result))


def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's files.")] = Path(
        "runs/demo"
    ),
) -> None:
    """Build and verify the specification's two example artifacts (vision fp16, LM int8)."""
    from manifests.demo import run_demo

    try:
        result = run_demo(out, now=_now())
    except _FAILURES as exc:
        raise _fail(one_line(exc)) from None
    console = Console(soft_wrap=True)
    for artifact in result.artifacts:
        console.print(_summary(artifact.verified))
        console.print(f"  job {artifact.job_path}  weights {artifact.weights_path}")
        console.print(f"  manifest {artifact.manifest_path}  provenance {artifact.provenance_path}")
    console.print(f"signing key {result.signing_key_path}; trusted keys {result.trusted_keys_path}")
    console.print(
        "verify again with: fedbrain verify "
        f"{result.artifacts[0].bundle_path} --trusted-keys {result.trusted_keys_path}"
    )


def register(app: typer.Typer) -> None:
    """Attach this module's commands to the root ``fedbrain`` app."""
    app.add_typer(keys_app, name="keys")
    app.add_typer(bundle_app, name="bundle")
    app.command("verify")(verify)
    app.command("demo")(demo)
