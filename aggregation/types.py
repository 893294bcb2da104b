"""Types shared by every aggregator in ``aggregation``.

Each aggregation step returns its result together with *measurements*: a flat mapping of
what it did (how many took part, norms, epsilon, ...). The run ledger and the reliability
score (result-aggregator) read them; nothing else needs to know an aggregator's internals.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
from numpy.typing import NDArray

MeasurementValue: TypeAlias = float | int | str | bool
Measurements: TypeAlias = dict[str, MeasurementValue]

FloatArray: TypeAlias = NDArray[np.float32] | NDArray[np.float64]
Update: TypeAlias = list[NDArray[np.float32]]
"""A model update (or model weights): one float32 array per parameter tensor, in a fixed order."""
