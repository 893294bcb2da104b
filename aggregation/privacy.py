"""The privacy vocabulary every part of fedbrain shares: levels, DP units, workloads.

One definition each. The job spec (:mod:`manifests.jobspec`), the aggregator
(:mod:`aggregation.pipeline`), the nodes and the server all use these, so a level or a unit
means the same thing everywhere it is read.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["DpUnit", "PrivacyLevel", "WorkloadKind"]


class PrivacyLevel(StrEnum):
    """How updates are protected; propagated to every node and to the aggregator.

    ``none``: plain FedAvg (the server sees every update). ``dp``: central DP (the server sees
    each clipped update and adds the noise -- it is trusted with the noiseless values).
    ``secure-agg``: SecAgg+ masking (the server sees only sums, without noise).
    ``dp+secure-agg``: distributed DP under SecAgg+ -- each node adds its share of integer noise
    before masking, so the server only ever sees a noised sum.
    """

    NONE = "none"
    DP = "dp"
    SECURE_AGG = "secure-agg"
    DP_SECURE_AGG = "dp+secure-agg"

    @property
    def uses_dp(self) -> bool:
        """Whether clipping, noise and privacy accounting apply."""
        return self in (PrivacyLevel.DP, PrivacyLevel.DP_SECURE_AGG)

    @property
    def uses_secure_agg(self) -> bool:
        """Whether the server sees only the sum of masked vectors."""
        return self in (PrivacyLevel.SECURE_AGG, PrivacyLevel.DP_SECURE_AGG)

    @property
    def hides_individual_updates(self) -> bool:
        """Alias of :attr:`uses_secure_agg` (the aggregator's reading of the level)."""
        return self.uses_secure_agg

    @property
    def releases_per_node_values(self) -> bool:
        """Whether a per-node value computed from private data may be recorded or published.

        Only at ``none``: under secure aggregation the server must not see one (it gets sums),
        and under ``dp`` every released value must be inside the noised aggregate.
        """
        return self is PrivacyLevel.NONE


class DpUnit(StrEnum):
    """What differential privacy protects: a node's whole data, or one example."""

    NODE = "node"
    EXAMPLE = "example"


class WorkloadKind(StrEnum):
    """What a job's nodes compute: a model update, or statistics (federated analytics)."""

    MODEL = "model"
    ANALYTICS = "analytics"
