"""Non-IID splits of in-memory demo data for simulations (``flwr-datasets`` partitioners).

The labels go into a ``datasets.Dataset`` built in memory (``label`` + the example's
``index``); :class:`flwr_datasets.partitioner.DirichletPartitioner` (Hsu et al. 2019,
"Measuring the Effects of Non-Identical Data Distribution") assigns each class's examples to
the partitions in Dirichlet(alpha) proportions. Small ``alpha`` -> few classes per partition;
large ``alpha`` -> close to IID. This is the only ``flwr``-related import of the training core.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner
from torch import Tensor
from torch.utils.data import Subset

from clients.data import LabelledDataset

__all__ = ["dirichlet_partition", "partition_dataset"]


def dirichlet_partition(
    labels: Sequence[int] | npt.NDArray[np.int64],
    *,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int = 1,
    self_balancing: bool = True,
) -> list[npt.NDArray[np.int64]]:
    """Indices (sorted) of each of ``num_partitions`` Dirichlet(``alpha``) partitions.

    Deterministic for a given ``seed``. Raises ``ValueError`` when the parameters are out of
    range or when 10 Dirichlet draws all leave a partition below ``min_partition_size``.
    """
    label_array = np.asarray(labels, dtype=np.int64)
    problems = []
    if num_partitions < 1:
        problems.append(f"`num_partitions` must be >= 1. Found {num_partitions}.")
    if not alpha > 0:
        problems.append(f"`alpha` must be positive. Found {alpha}.")
    if min_partition_size < 0:
        problems.append(f"`min_partition_size` must be >= 0. Found {min_partition_size}.")
    if label_array.ndim != 1 or label_array.size < max(num_partitions, 1):
        problems.append(
            f"need a 1-d label array with at least `num_partitions` ({num_partitions}) "
            f"entries. Found shape {label_array.shape}."
        )
    if problems:
        raise ValueError(" ".join(problems))
    table = Dataset.from_dict(
        {"label": label_array.tolist(), "index": list(range(label_array.size))}
    )
    partitioner = DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_partition_size,
        self_balancing=self_balancing,
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = table
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # retries are reported by the raise
        return [
            np.sort(np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64))
            for i in range(num_partitions)
        ]


def partition_dataset(
    dataset: LabelledDataset,
    *,
    num_partitions: int,
    alpha: float,
    seed: int,
    min_partition_size: int = 1,
) -> list[Subset[tuple[Tensor, Tensor]]]:
    """``dataset`` split into Dirichlet(``alpha``) non-IID subsets by its labels."""
    if not dataset.labelled:
        raise ValueError("Dirichlet partitioning needs labels; the dataset is unlabelled.")
    parts = dirichlet_partition(
        dataset.labels.numpy(),
        num_partitions=num_partitions,
        alpha=alpha,
        seed=seed,
        min_partition_size=min_partition_size,
    )
    return [Subset(dataset, p.tolist()) for p in parts]
