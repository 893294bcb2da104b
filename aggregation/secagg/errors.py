"""Errors raised by the SecAgg+ protocol.

Every failure a caller may want to handle has its own type; all derive from
:class:`SecAggError`. A server adapter turns a client's error into a dropout of that client,
and :class:`SecAggAbortedError` into a failed round. Validation failures of a reply carry the
node and the reason in their message, for the round's dropout record.
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


class SecAggAuthenticationError(SecAggProtocolError):
    """A signature or a public key failed verification against the node roster.

    Raised for a signature that does not verify under the roster key of the node it names, a
    node id that is not in the roster, or an X25519 public key that is malformed, non-canonical
    or of small order. Nothing derived from the offending key has been used.
    """


class SecAggDecryptionError(SecAggError):
    """An encrypted share failed AES-GCM authentication (tampered, replayed or misrouted).

    Every decryption failure becomes this one type, whatever the cause.
    """


class SecAggAbortedError(SecAggError):
    """The round cannot finish without breaking privacy or correctness; nothing is revealed.

    Raised when too few clients remain, or when a secret cannot be rebuilt uniquely from the
    shares that arrived (rather than return a sum that may be wrong).
    """
