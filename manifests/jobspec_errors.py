"""Pydantic's validation errors as the job spec's one-line problems
(``"field: problem. Found X."``), never pydantic's own format.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Never

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from manifests import catalog
from manifests.catalog import Component, Task
from manifests.jobspec import (
    _SECTIONS,
    JobSpec,
    JobSpecError,
    NotTrainableJobError,
    _CrossFieldProblemsError,
)

# --------------------------------------------------------------------- error translation


def _raise(problems: list[str], *, not_trainable: bool) -> Never:
    if not_trainable:
        raise NotTrainableJobError(problems)
    raise JobSpecError(problems)


def _split_errors(
    exc: ValidationError,
) -> tuple[list[ErrorDetails], _CrossFieldProblemsError | None]:
    field_errors: list[ErrorDetails] = []
    cross: _CrossFieldProblemsError | None = None
    for err in exc.errors():
        original = err.get("ctx", {}).get("error")
        if isinstance(original, _CrossFieldProblemsError):
            cross = original
        else:
            field_errors.append(err)
    return field_errors, cross


def _loc_key(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc if isinstance(part, str))


def _show(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"  # as TOML and JSON spell it
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    return json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bound(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _all_keys() -> list[str]:
    keys = [k for k in JobSpec.model_fields if k not in _SECTIONS]
    for section, model in _SECTIONS.items():
        keys.extend(f"{section}.{k}" for k in model.model_fields)
    return keys


def _describe(err: ErrorDetails) -> str:
    loc = _loc_key(err["loc"]) or "job"
    kind = err["type"]
    ctx = err.get("ctx", {})
    found = f" Found {_show(err['input'])}."
    if kind == "missing":
        choices = {"component": Component, "task": Task}.get(loc)
        hint = f" Choose one of {', '.join(choices)}." if choices else ""
        return f"{loc}: is required.{hint}"
    if kind == "extra_forbidden":
        keys = _all_keys()
        close = (
            catalog.suggest(loc, keys, n=1)
            or tuple(k for k in keys if k.rsplit(".", 1)[-1] == loc.rsplit(".", 1)[-1])[:1]
        )
        hint = f" Did you mean {close[0]}?" if close else ""
        return f"{loc}: is not a job setting.{hint}"
    if loc == "quantize" and kind.startswith("bool"):
        return f"quantize: must be true, false or int8.{found}"
    messages = {
        "enum": f"must be one of {ctx.get('expected')}.",
        "greater_than_equal": f"must be >= {_bound(ctx.get('ge'))}.",
        "greater_than": f"must be > {_bound(ctx.get('gt'))}.",
        "less_than_equal": f"must be <= {_bound(ctx.get('le'))}.",
        "less_than": f"must be < {_bound(ctx.get('lt'))}.",
        "finite_number": "must be a finite number.",
        "int_parsing": "must be a whole number.",
        "int_type": "must be a whole number.",
        "int_from_float": "must be a whole number.",
        "float_parsing": "must be a number.",
        "float_type": "must be a number.",
        "bool_parsing": "must be true or false.",
        "bool_type": "must be true or false.",
        "string_type": "must be text.",
        "string_too_short": f"must have at least {ctx.get('min_length')} character(s).",
        "string_too_long": f"must have at most {ctx.get('max_length')} characters.",
        "tuple_type": "must be a list of text or a comma-separated string.",
        "model_type": "must be a table of settings.",
        "model_attributes_type": "must be a table of settings.",
        "dict_type": "must be a table of settings.",
    }
    if kind == "value_error":
        return f"{loc}: {str(err['msg']).removeprefix('Value error, ')}"
    message = messages.get(kind, str(err["msg"]) + ".")
    if kind in ("int_type", "float_type", "bool_type"):
        given = err["input"]
        if isinstance(given, str) and _numeric(given):
            message = message.removesuffix(".") + ", not text (no quotes)."
        elif isinstance(given, bool):
            message = message.removesuffix(".") + ", not true/false."
    return f"{loc}: {message}{found}"
