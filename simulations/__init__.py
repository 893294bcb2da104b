"""Simulation scenarios and their runner on Flower's Simulation Engine (``fedbrain simulate``).

Flower's usage telemetry is off for simulations (``FLWR_TELEMETRY_ENABLED=0`` unless the
environment sets it): a simulation runs on local data and sends nothing anywhere. The variable
is read when ``flwr`` is first imported, hence here, before any ``flwr`` import of the package.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
