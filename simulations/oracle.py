"""What only a simulation can check: a released normalizer against the pooled data.

A deployed server never sees the nodes' data, so it cannot say how close a DP normalizer came
to the truth. A simulation holds every node's data, so after a sensing job it compares the
signed normalizer (``model.safetensors`` in the run folder) with the pooled data's own
per-feature mean and standard deviation, computed from the same feature values the nodes use
(:func:`clients.datasets.sensing_values`). The result is shown in the summary and written to
``summary.json`` as ``simulation_std_error`` / ``simulation_mean_error``; nothing of it reaches
the bundle, whose privacy claim covers only what the server saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from manifests.jobspec import JobSpec

__all__ = ["NormalizerCheck", "check_normalizer"]

MODEL_FILE = "model.safetensors"


@dataclass(frozen=True)
class NormalizerCheck:
    """The released normalizer against the pooled data, worst feature first."""

    std_error: float
    """max over features of ``|released std / true std - 1|``"""
    mean_error: float
    """max over features of ``|released mean - true mean| / true std``"""
    features: int

    def metrics(self) -> dict[str, float]:
        return {"simulation_std_error": self.std_error, "simulation_mean_error": self.mean_error}


def check_normalizer(job: JobSpec, run_dir: Path, data_dirs: Sequence[Path]) -> NormalizerCheck:
    """Compare ``run_dir``'s released normalizer with the pooled values of ``data_dirs``.

    Raises :class:`ValueError` when the run folder holds no readable normalizer or the feature
    counts differ.
    """
    from clients.datasets import sensing_values
    from clients.sensing import load_normalizer

    released = load_normalizer(run_dir / MODEL_FILE)
    parts = [sensing_values(job, folder) for folder in data_dirs]
    features = released.mean.shape[0]
    pooled = np.concatenate([p.reshape(-1, p.shape[-1]) for p in parts if p.size])
    if pooled.shape[1] != features:
        raise ValueError(
            f"the released normalizer has {features} features, the data {pooled.shape[1]}"
        )
    mean, std = pooled.mean(axis=0), pooled.std(axis=0)
    scale = np.where(std > 0, std, 1.0)
    return NormalizerCheck(
        std_error=float(np.max(np.abs(released.std - std) / scale)),
        mean_error=float(np.max(np.abs(released.mean - mean) / scale)),
        features=features,
    )
