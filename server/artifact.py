"""The end of a passed run: weights at the job's precision, manifest, signed bundle, self-check.

:func:`build_artifact` writes into the run directory:

- ``model.safetensors`` -- the final tensors at the job's precision (``int8``:
  :func:`manifests.quantize.quantize_int8`; ``fp16``: :func:`manifests.quantize.cast_fp16`;
  ``fp32``: floating tensors as float32), written deterministically;
- ``artifact_manifest.json`` -- the manifest (RFC 8785 canonical JSON), with the digest of
  the base checkpoint a fine-tune started from;
- ``<artifact_name>.zip`` -- the signed bundle, when a signing key is given; without one the
  manifest is still written and the result says the artifact is unsigned;

then, when trusted keys are given, verifies the bundle it just wrote as any consumer would
(:func:`manifests.verify.verify_bundle`), so a run never reports a bundle its own verifier
rejects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from manifests.bundle import MANIFEST_MEMBER, WEIGHTS_MEMBER, build_bundle
from manifests.jobspec import JobSpec, Precision
from manifests.keys import SigningKey, TrustedKeys
from manifests.manifest import Manifest, Provenance, Versions, build_manifest
from manifests.quantize import cast_fp16, quantize_int8, write_safetensors
from manifests.verify import verify_bundle

__all__ = [
    "ArtifactResult",
    "artifact_tensors",
    "build_artifact",
    "software_versions",
]


@dataclass(frozen=True)
class ArtifactResult:
    """What :func:`build_artifact` wrote. ``bundle`` is None when nothing was signed."""

    weights_path: Path
    manifest_path: Path
    manifest: Manifest
    bundle: Path | None
    bundle_sha256: str | None
    verified: bool
    notes: tuple[str, ...] = ()


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def software_versions() -> Versions:
    """Versions of fedbrain, flwr and torch in this environment (``unknown`` if absent)."""
    import flwr
    import torch

    return Versions(
        fedbrain=_version("fedbrain"),
        flwr=str(getattr(flwr, "__version__", _version("flwr"))),
        torch=str(torch.__version__),
    )


def artifact_tensors(
    precision: Precision, tensors: Mapping[str, NDArray[np.generic]]
) -> dict[str, NDArray[np.generic]]:
    """``tensors`` at ``precision`` (new arrays; integer buffers unchanged)."""
    if precision is Precision.INT8:
        return quantize_int8(tensors)
    if precision is Precision.FP16:
        return cast_fp16(tensors)
    out: dict[str, NDArray[np.generic]] = {}
    for name, array in tensors.items():
        is_float = np.issubdtype(array.dtype, np.floating)
        out[name] = array.astype(np.float32) if is_float else np.array(array, copy=True)
    return out


@dataclass(frozen=True)
class _FineTuned:
    """A job's manifest fields with the digest of the base checkpoint it started from."""

    job: JobSpec
    base_digest: str | None

    def manifest_fields(
        self, *, created_at: datetime, run_name: str | None = None
    ) -> dict[str, object]:
        return self.job.manifest_fields(
            created_at=created_at, run_name=run_name, base_digest=self.base_digest
        )


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return "sha256:" + hashlib.file_digest(handle, "sha256").hexdigest()


def build_artifact(
    job: JobSpec,
    tensors: Mapping[str, NDArray[np.generic]],
    provenance: Provenance,
    *,
    run_dir: Path,
    signing_key: Path | None,
    trusted_keys: Path | None,
    verify_at: datetime | None = None,
    base_digest: str | None = None,
) -> ArtifactResult:
    """Write weights, manifest and (with a key) the signed bundle; verify it with the trusted
    keys when given. ``base_digest``: the content digest of the job's base checkpoint (the
    manifest records it; required when the job names one). Raises ``ValueError`` (bad weights
    or manifest), ``OSError`` (unreadable key) or a ``manifests.verify.BundleVerificationError``
    (the bundle fails its own check)."""
    if (job.base_checkpoint is None) != (base_digest is None):
        raise ValueError(
            "A fine-tuned job's manifest records its base checkpoint's digest: give "
            "base_digest exactly when the job names a base_checkpoint."
        )
    described = _FineTuned(job, base_digest)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights_path = write_safetensors(
        artifact_tensors(job.precision, tensors), run_dir / WEIGHTS_MEMBER
    )
    notes: list[str] = []
    if signing_key is None:
        manifest = build_manifest(described, provenance, environ={})
        manifest_path = run_dir / MANIFEST_MEMBER
        manifest_path.write_bytes(manifest.canonical_bytes())
        notes.append(
            "not signed: no signing key was given (set RunOptions.signing_key / "
            "fedbrain.signing-key); model.safetensors and artifact_manifest.json are in the "
            "run directory, but no bundle was built"
        )
        return ArtifactResult(
            weights_path, manifest_path, manifest, None, None, False, tuple(notes)
        )
    key = SigningKey.from_pem(signing_key.read_bytes())
    staging = run_dir / ".bundle.zip"
    built = build_bundle(
        described, weights_path, provenance, key, staging, manifest_dir=run_dir, environ={}
    )
    bundle = run_dir / f"{built.manifest.artifact_name}.zip"
    staging.replace(bundle)
    verified = False
    if trusted_keys is not None:
        verify_bundle(bundle, TrustedKeys.load(trusted_keys), now=verify_at)
        verified = True
    else:
        notes.append("bundle not verified: no trusted-keys file was given")
    return ArtifactResult(
        weights_path,
        built.manifest_path,
        built.manifest,
        bundle,
        _sha256(bundle),
        verified,
        tuple(notes),
    )
