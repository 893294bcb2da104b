"""One exit-code rule and one-line error messages for fedbrain's commands.

Exit codes (every command except ``fedbrain simulate``, which documents its own 0/1/2/3):

- 0: done;
- 1: a check or the operation failed (a bundle does not verify, the audit chain is broken, a
  remote job failed, a server could not be reached);
- 2: invalid input or usage (a bad option, an invalid job or provenance file, a file that
  cannot be read, an unknown run, job or key).

Errors are one line on stderr: never a traceback, a pydantic report, an SQL statement or a
bare ``[Errno 2]``.
"""

from __future__ import annotations

from typing import Final

from pydantic import ValidationError

__all__ = ["EXIT_FAILED", "EXIT_INVALID", "EXIT_OK", "one_line"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_INVALID: Final = 2


def _validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "value"
        parts.append(f"{where}: {err['msg'].lower()}")
    return "; ".join(parts)


def one_line(exc: BaseException) -> str:
    """``exc`` as one readable line."""
    from manifests.jobspec import JobSpecError

    if isinstance(exc, JobSpecError):
        return "invalid job: " + "; ".join(exc.problems)
    if isinstance(exc, ValidationError):
        return _validation(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"cannot read {exc.filename}: {exc.strerror or type(exc).__name__}"
    cause = exc.__cause__
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(cause, ValidationError):
        head = first.split(": ", 1)[0] if ": " in first else first
        return f"{head}: {_validation(cause)}"
    return first
