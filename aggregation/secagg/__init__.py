"""SecAgg+ secure aggregation (Bell et al., CCS 2020; Bonawitz et al., CCS 2017).

Framework-free state machines for dropout-tolerant clients and a **malicious server** (Bell et
al.'s malicious setting with a PKI): the server may deviate arbitrarily and collude with a
bounded number of clients, and still learns only the sum mod 2^32 of the quantized updates of
the survivors. Each node holds a long-term Ed25519 identity (``NodeIdentity``; its node id is
``node_id_for`` its public key), the operator-signed ``Roster`` and its own ``SecAggPolicy``.

Stages: advertise keys (signed) -> share keys (peers' signatures checked against the roster
before any key is derived) -> masked input -> consistency check (survivors sign the survivor
set) -> unmask (shares revealed only for that set, with t signatures on it). See
``server.ServerSession`` and ``client.ClientSession``; ``driver.run_secagg_round`` wires them
together in-process.

Protected: every client input against the server and up to the policy's number of colluding
neighbours (key substitution, invented members, split parameters, split survivor views,
replayed rounds and parameters below the node's minimums are refused); the sum against a bad
client (its malformed replies, garbage or forged shares make it a dropout or are excluded, and
a sum that cannot be determined uniquely aborts the round). Not protected: masked inputs carry
no range proof, so a malicious client can add any vector mod 2^32 to the sum (not only one in
its clipping range); the server chooses the masking graph, so the policy's
``max_corrupt_neighbours`` is an assumption; traffic analysis; a compromised node's own data.

Without an identity and roster, sessions run the previous semi-honest protocol (no
signatures, no consistency check): it is kept for adapters not yet given identities and is not
secure against a malicious server.
"""

from aggregation.secagg.client import ClientPhase, ClientSession, ClientState
from aggregation.secagg.driver import RoundOutcome, run_secagg_round
from aggregation.secagg.errors import (
    SecAggAbortedError,
    SecAggAuthenticationError,
    SecAggDecryptionError,
    SecAggError,
    SecAggProtocolError,
    SecAggRefusedError,
)
from aggregation.secagg.identity import NodeIdentity, Roster, node_id_for
from aggregation.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    ConsistencyCheckReply,
    ConsistencyCheckRequest,
    MaskedInputReply,
    MaskedInputRequest,
    Record,
    SecAggMessage,
    ShareKeysReply,
    ShareKeysRequest,
    Stage,
    UnmaskReply,
    UnmaskRequest,
    message_from_record,
)
from aggregation.secagg.params import MODULUS, SecAggParams
from aggregation.secagg.policy import ParticipationLog, SecAggPolicy
from aggregation.secagg.quantization import dequantize_sum, quantize
from aggregation.secagg.server import SecAggResult, ServerPhase, ServerSession, ServerState

__all__ = [
    "MODULUS",
    "AdvertiseKeysReply",
    "AdvertiseKeysRequest",
    "ClientPhase",
    "ClientSession",
    "ClientState",
    "ConsistencyCheckReply",
    "ConsistencyCheckRequest",
    "MaskedInputReply",
    "MaskedInputRequest",
    "NodeIdentity",
    "ParticipationLog",
    "Record",
    "Roster",
    "RoundOutcome",
    "SecAggAbortedError",
    "SecAggAuthenticationError",
    "SecAggDecryptionError",
    "SecAggError",
    "SecAggMessage",
    "SecAggParams",
    "SecAggPolicy",
    "SecAggProtocolError",
    "SecAggRefusedError",
    "SecAggResult",
    "ServerPhase",
    "ServerSession",
    "ServerState",
    "ShareKeysReply",
    "ShareKeysRequest",
    "Stage",
    "UnmaskReply",
    "UnmaskRequest",
    "dequantize_sum",
    "message_from_record",
    "node_id_for",
    "quantize",
    "run_secagg_round",
]
