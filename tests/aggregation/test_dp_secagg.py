"""DP composed with SecAgg+: clients clip before masking, the server noises the unmasked sum.

The acceptance point: with DP on, a round with dropouts (within the threshold) still produces a
noised update; it is not discarded (Flower 1.42 discards the whole round on any dropout).
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from aggregation.accountant import PrivacyAccountant
from aggregation.dp import (
    CentralDP,
    ClipStats,
    DPMeasurement,
    FixedClipping,
    clip_for_submission,
)
from aggregation.secagg import SecAggParams, Stage, run_secagg_round

N, P, C = 8, 64, 1.0


def _clipped_inputs(rng: np.random.Generator) -> dict[int, NDArray[np.float32]]:
    inputs = {}
    for node in range(1, N + 1):
        update = [rng.normal(0.0, 1.0, size=P).astype(np.float32)]
        clipped = clip_for_submission(update, clipping_norm=C)
        flat = np.concatenate([a.ravel() for a in clipped.summable()]).astype(np.float32)
        inputs[node] = flat
    return inputs


@pytest.mark.parametrize(
    "dropouts",
    [
        {},
        {3: Stage.MASKED_INPUT},
        {2: Stage.SHARE_KEYS, 5: Stage.UNMASK},
        {1: Stage.MASKED_INPUT, 4: Stage.MASKED_INPUT},
    ],
)
def test_dp_round_with_dropouts_is_noised_not_discarded(dropouts: dict[int, Stage]) -> None:
    rng = np.random.default_rng(7)
    inputs = _clipped_inputs(rng)
    # The clip statistics ride along as two extra coordinates; the flag is in [0, 1] and the
    # pre-clip norm of a N(0, 1) vector of 64 values is about 8, so the range must cover it.
    params = SecAggParams(
        num_clients=N, num_neighbours=6, threshold=4, vector_length=P + 2, clipping_range=16.0
    )
    outcome = run_secagg_round(params, inputs, rng=rng, dropouts=dropouts)
    contributors = sorted(outcome.result.contributors)
    # Clients dropping after sending their masked input (stage UNMASK) still contributed.
    late = {n for n, s in dropouts.items() if s == Stage.UNMASK}
    expected_contributors = sorted(n for n in inputs if n not in dropouts or n in late)
    assert contributors == expected_contributors

    secure_sum = outcome.dequantized_sum(params)
    # The two trailing coordinates are the clip statistics (ClippedUpdate.summable); split in
    # float64 so the comparison below is not limited by float32 rounding of the sum.
    total = [secure_sum[:P]]
    stats = ClipStats(num_clipped=round(float(secure_sum[P])), norm_sum=float(secure_sum[P + 1]))
    plain = np.sum([inputs[n][:P].astype(np.float64) for n in contributors], axis=0)
    step = params.quantization_step
    # Stochastic rounding moves each coordinate of each summand by less than one step.
    assert np.max(np.abs(total[0] - plain)) < step * len(contributors) + 1e-9
    assert stats.num_clipped == len(contributors)  # every N(0,1)^64 vector exceeds C = 1

    dp = CentralDP(noise_multiplier=1.0, clipping=FixedClipping(clipping_norm=C))
    accountant = PrivacyAccountant("rdp", delta=1e-5, epsilon_budget=10.0)
    event = dp.event(sample_rate=1.0)
    accountant.compose(event)
    result = dp.aggregate(
        dp.initial_state(),
        [total[0]],
        n_contributions=len(contributors),
        expected_count=float(N),
        rng=np.random.default_rng(11),
        clip_stats=stats,
    )
    released = result.update[0]
    assert released.shape == (P,)
    assert np.all(np.isfinite(released))
    # Noise was added: the release differs from the noiseless mean by roughly sigma*C/N per
    # coordinate (std 0.125 here), far more than the quantization error.
    noiseless = total[0] / N
    residual = released.astype(np.float64) - noiseless
    assert 0.06 < float(np.std(residual)) < 0.25
    assert result.measurements[DPMeasurement.N_CONTRIBUTIONS] == len(contributors)
    assert accountant.get_epsilon() > 0
