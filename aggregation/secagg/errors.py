"""Errors raised by the SecAgg+ protocol.

Every failure a caller may want to handle has its own type; all derive from
:class:`SecAggError`. A server adapter turns a client's error into a dropout of that client,
and :class:`SecAggAbortedError` into a failed round.
"""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every SecAgg+ error."""


class SecAggProtocolError(SecAggError, ValueError):
    """A message is malformed or arrives out of order (wrong run, round, stage or node).

    The offending message is discarded; the session's state is unchanged.
    """


class SecAggRefusedError(SecAggProtocolError):
    """An honest client refuses a request that could reveal a peer's input.

    Raised before anything is revealed.
    """


class SecAggDecryptionError(SecAggError):
    """An encrypted share failed AES-GCM authentication (tampered, replayed or misrouted).

    Every decryption failure becomes this one type, whatever the cause.
    """


class SecAggAbortedError(SecAggError):
    """The round cannot finish without breaking privacy (too few clients); nothing is revealed."""
