"""The manifest demo: build and verify the specification's two example artifacts.

It writes a key pair and trusted-keys file, two learning-form job files (the vision example,
fp16, and the LM example, int8-quantized), small real safetensors weights for each (a tiny torch
module, deterministic from a seed), a provenance file per run, then builds and verifies both
signed bundles. Until the federated simulation exists, this is what ``make demo`` runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from manifests.bundle import build_bundle
from manifests.jobspec import load_job
from manifests.keys import SigningKey, TrustedKey, TrustedKeys, format_timestamp
from manifests.manifest import Provenance
from manifests.verify import VerifiedBundle, verify_bundle

__all__ = ["DemoArtifact", "DemoResult", "run_demo", "write_keys"]

VISION_JOB: Final = """\
# The specification's vision example (section 3, first mapping).
component = "vision"
base_model = "vit-base16"
task = "embed"
embedding_dim = 768
precision = "fp16"
quantize = false
batch_size = 256
epochs = 10
"""

LM_JOB: Final = """\
# The specification's LM example (section 3, second mapping), quantized to int8.
component = "inference"
base_model = "gpt-small-v1"
task = "lm-finetune"
max_seq_length = 1024
learning_rate = 2e-5
epochs = 3
quantize = "int8"
"""


@dataclass(frozen=True)
class DemoArtifact:
    job_path: Path
    weights_path: Path
    provenance_path: Path
    bundle_path: Path
    manifest_path: Path
    verified: VerifiedBundle


@dataclass(frozen=True)
class DemoResult:
    signing_key_path: Path
    trusted_keys_path: Path
    artifacts: tuple[DemoArtifact, ...]


def write_keys(
    folder: Path, key: SigningKey, *, not_before: datetime, not_after: datetime
) -> tuple[Path, Path, Path]:
    """Write ``signing_key.pem`` (mode 0600), ``signing_key.pub.pem`` and ``trusted_keys.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    private = folder / "signing_key.pem"
    private.touch(mode=0o600, exist_ok=True)
    private.chmod(0o600)
    private.write_bytes(key.private_pem())
    public = folder / "signing_key.pub.pem"
    public.write_bytes(key.public_key().public_pem())
    trusted = folder / "trusted_keys.json"
    pinned = TrustedKey(key.public_key(), not_before, not_after)
    trusted.write_bytes(TrustedKeys.of([pinned]).to_json())
    return private, public, trusted


def _weights(path: Path, *, seed: int, quantize: bool) -> None:
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    module = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8), torch.nn.LayerNorm(8)
    )
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    state = {name: tensor.detach().contiguous() for name, tensor in module.state_dict().items()}
    if not quantize:
        save_file({name: tensor.half() for name, tensor in state.items()}, str(path))
        return
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if tensor.dim() == 2:  # per-output-channel symmetric int8, float32 scales
            scale = tensor.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
            tensors[name] = torch.round(tensor / scale).clamp(-127, 127).to(torch.int8)
            tensors[f"{name}.scale"] = scale.squeeze(1).float().contiguous()
        else:
            tensors[name] = tensor.float()
    save_file(tensors, str(path))


def _provenance(run_id: str, finished_at: datetime) -> Provenance:
    import torch

    return Provenance.model_validate(
        {
            "run_id": run_id,
            "run_name": "demo",
            "finished_at": format_timestamp(finished_at),
            "rounds": 3,
            "participants_per_round": [4, 4, 3],
            "reliability": {"score": 0.87, "verdict": "accepted"},
            "versions": {
                "fedbrain": _version("fedbrain"),
                "flwr": _version("flwr"),
                "torch": torch.__version__,
            },
        }
    )


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def run_demo(out: Path, *, now: datetime, key: SigningKey | None = None) -> DemoResult:
    """Build and verify both example bundles under ``out``; ``now`` is the demo runs' end."""
    if not isinstance(out, Path):
        raise TypeError(f"out must be a pathlib.Path. Found {type(out).__name__}.")
    key = key or SigningKey.generate()
    private, _, trusted_path = write_keys(
        out / "keys",
        key,
        not_before=now - timedelta(minutes=5),
        not_after=now + timedelta(days=365),
    )
    trusted = TrustedKeys.load(trusted_path)
    artifacts: list[DemoArtifact] = []
    for index, (slug, job_text, quantize) in enumerate(
        (("vision", VISION_JOB, False), ("lm", LM_JOB, True))
    ):
        folder = out / slug
        folder.mkdir(parents=True, exist_ok=True)
        job_path = folder / "job.toml"
        job_path.write_text(job_text, "utf-8")
        weights_path = folder / "model.safetensors"
        _weights(weights_path, seed=index, quantize=quantize)
        provenance = _provenance(f"demo-{slug}", now)
        provenance_path = folder / "provenance.json"
        provenance_path.write_text(
            json.dumps(provenance.model_dump(mode="json"), indent=2) + "\n", "utf-8"
        )
        job = load_job(job_path)
        built = build_bundle(
            job,
            weights_path,
            Provenance.load(provenance_path),
            key,
            folder / "staging.zip",
            manifest_dir=folder,
            environ={},
        )
        bundle_path = folder / f"{built.manifest.artifact_name}.zip"
        built.path.replace(bundle_path)
        verified = verify_bundle(bundle_path, trusted, now=now)
        artifacts.append(
            DemoArtifact(
                job_path, weights_path, provenance_path, bundle_path, built.manifest_path, verified
            )
        )
    return DemoResult(private, trusted_path, tuple(artifacts))
