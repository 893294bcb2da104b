"""SecAgg+ secure aggregation (Bell et al., CCS 2020; Bonawitz et al., CCS 2017).

Framework-free state machines for a semi-honest server and dropout-tolerant clients: the server
learns only the sum mod 2^32 of the quantized updates of the clients whose masked input reached
it. See ``server.ServerSession`` and ``client.ClientSession``; ``driver.run_secagg_round`` wires
them together in-process.
"""

from aggregation.secagg.client import ClientPhase, ClientSession, ClientState
from aggregation.secagg.driver import RoundOutcome, run_secagg_round
from aggregation.secagg.errors import (
    SecAggAbortedError,
    SecAggDecryptionError,
    SecAggError,
    SecAggProtocolError,
    SecAggRefusedError,
)
from aggregation.secagg.messages import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
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
from aggregation.secagg.quantization import dequantize_sum, quantize
from aggregation.secagg.server import SecAggResult, ServerPhase, ServerSession, ServerState

__all__ = [
    "MODULUS",
    "AdvertiseKeysReply",
    "AdvertiseKeysRequest",
    "ClientPhase",
    "ClientSession",
    "ClientState",
    "MaskedInputReply",
    "MaskedInputRequest",
    "Record",
    "RoundOutcome",
    "SecAggAbortedError",
    "SecAggDecryptionError",
    "SecAggError",
    "SecAggMessage",
    "SecAggParams",
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
    "quantize",
    "run_secagg_round",
]
