"""``training_config_hash``: SHA-256 over the RFC 8785 canonical JSON of a training config.

RFC 8785 (JSON Canonicalization Scheme) fixes what ``json.dumps(sort_keys=True)`` leaves to
the implementation: keys sorted by their UTF-16 code units (not by code points), numbers in
the ECMAScript shortest form (``2e-05`` -> ``0.00002``, ``1e21`` -> ``1e+21``, ``1.0`` ->
``1``), no insignificant whitespace and minimal string escaping. Any two producers of the same
JSON value, in any language, therefore hash the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TypeAlias

import rfc8785

JsonValue: TypeAlias = (
    "bool | int | float | str | Sequence[JsonValue] | Mapping[str, JsonValue] | None"
)

HASH_PREFIX = "sha256:"


def canonical_json(value: JsonValue) -> bytes:
    """The RFC 8785 canonical UTF-8 serialization of ``value``.

    Raises ``ValueError`` for values JSON cannot carry exactly: NaN and infinities,
    integers beyond +-2**53, non-string keys.
    """
    try:
        return rfc8785.dumps(value)
    except rfc8785.FloatDomainError as exc:
        raise ValueError(
            f"training_config must not contain NaN or infinite numbers. Found {exc}."
        ) from exc
    except rfc8785.IntegerDomainError as exc:
        raise ValueError(
            f"training_config integers must lie within +-2**53 (exact in JSON). Found {exc}."
        ) from exc
    except rfc8785.CanonicalizationError as exc:
        raise ValueError(f"training_config is not canonicalizable JSON: {exc}") from exc


def training_config_hash(training_config: Mapping[str, JsonValue]) -> str:
    """``sha256:`` + lowercase hex SHA-256 of the canonical JSON of ``training_config``."""
    return HASH_PREFIX + hashlib.sha256(canonical_json(training_config)).hexdigest()


def is_config_hash(value: str) -> bool:
    """Whether ``value`` has the ``sha256:<64 lowercase hex digits>`` form."""
    digest = value.removeprefix(HASH_PREFIX)
    return (
        value.startswith(HASH_PREFIX)
        and len(digest) == 64
        and all(c in "0123456789abcdef" for c in digest)
    )
