"""Shared argument checks for the privacy modules: messages that say what is wrong and how to fix.

Each ``*_problem`` function returns the message for a bad value (or ``None``), so a constructor
can collect every problem and raise them together with :func:`raise_problems`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TypeAlias

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None


def as_real(name: str, value: object) -> float:
    """``value`` as a float; ``TypeError`` naming ``name`` if it is not a real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number. Found {type(value).__name__}.")
    return float(value)


def as_int(name: str, value: object) -> int:
    """``value`` as an int; ``TypeError`` naming ``name`` if it is not one (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int. Found {type(value).__name__}.")
    return int(value)


def positive_problem(name: str, value: float) -> str | None:
    """The message for a value that is not a finite positive number, else ``None``."""
    if not (math.isfinite(value) and value > 0):
        return f"`{name}` must be positive. Found {value!r}."
    return None


def delta_problem(name: str, value: float) -> str | None:
    """The message for a delta outside the open interval (0, 1), else ``None``."""
    if not 0 < value < 1:
        return f"`{name}` must be in (0, 1), typically below 1/population. Found {value!r}."
    return None


def sample_rate_problem(name: str, value: float) -> str | None:
    """The message for a sampling rate outside (0, 1], else ``None``."""
    if not 0 < value <= 1:
        return f"`{name}` must be in (0, 1] (clients_per_round / population). Found {value!r}."
    return None


def raise_problems(problems: Sequence[str | None]) -> None:
    """Raise one ``ValueError`` listing every problem found (if any)."""
    found = [p for p in problems if p is not None]
    if found:
        raise ValueError(" ".join(found))
