"""Messages round-trip through plain records and reject anything malformed."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aggregation.secagg import (
    AdvertiseKeysReply,
    AdvertiseKeysRequest,
    ConsistencyCheckReply,
    ConsistencyCheckRequest,
    MaskedInputReply,
    MaskedInputRequest,
    SecAggMessage,
    SecAggParams,
    SecAggProtocolError,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
    message_from_record,
)
from aggregation.secagg.messages import CIPHERTEXT_SIZE
from aggregation.secagg.shamir import SHARE_SIZE

PARAMS = SecAggParams(
    num_clients=5, num_neighbours=2, threshold=2, vector_length=3, clipping_range=0.1
)
H = {"run_id": 7, "server_round": 2, "node_id": 3}
CT = b"c" * CIPHERTEXT_SIZE
SH = b"\x00" * SHARE_SIZE
SIG = b"g" * 64

MESSAGES: list[SecAggMessage] = [
    AdvertiseKeysRequest(**H, params=PARAMS, neighbours=(1, 4)),
    AdvertiseKeysReply(
        **H,
        share_public_key=b"s" * 32,
        mask_public_key=b"m" * 32,
        seed_commitment=b"h" * 32,
        signature=SIG,
    ),
    ShareKeysRequest(
        **H,
        peer_ids=(1, 4),
        share_public_keys=(b"a" * 32, b"b" * 32),
        mask_public_keys=(b"c" * 32, b"d" * 32),
        seed_commitments=(b"e" * 32, b"f" * 32),
        signatures=(SIG, SIG),
    ),
    ShareKeysReply(**H, receiver_ids=(1, 4), ciphertexts=(CT, CT)),
    MaskedInputRequest(**H, sender_ids=(4,), ciphertexts=(CT,)),
    MaskedInputReply(**H, masked_input=np.array([1, 2, 2**32 - 1], dtype=np.uint32), peer_ids=(4,)),
    UnmaskRequest(
        **H, surviving_ids=(1, 3), dropped_ids=(4,), signer_ids=(1, 3), signatures=(SIG, SIG)
    ),
    UnmaskReply(
        **H, seed_share_ids=(1, 3), seed_shares=(SH, SH), key_share_ids=(4,), key_shares=(SH,)
    ),
    ConsistencyCheckRequest(**H, survivor_ids=(1, 3, 5)),
    ConsistencyCheckReply(**H, signature=SIG),
    # unauthenticated (legacy) forms: no signatures
    AdvertiseKeysReply(
        **H,
        share_public_key=b"s" * 32,
        mask_public_key=b"m" * 32,
        seed_commitment=b"h" * 32,
        signature=b"",
    ),
    ShareKeysRequest(
        **H,
        peer_ids=(1,),
        share_public_keys=(b"a" * 32,),
        mask_public_keys=(b"c" * 32,),
        seed_commitments=(b"e" * 32,),
        signatures=(),
    ),
    UnmaskRequest(**H, surviving_ids=(1, 3), dropped_ids=(), signer_ids=(), signatures=()),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_message_round_trips_through_a_plain_record(message: SecAggMessage) -> None:
    record = message.to_record()
    assert record["run_id"] == 7 and record["round"] == 2 and record["node_id"] == 3
    assert record["stage"] == message.stage
    for value in record.values():
        assert isinstance(value, bytes | int | str | list | np.ndarray)
    back = message_from_record(record)
    assert type(back) is type(message)
    if isinstance(message, MaskedInputReply):
        assert isinstance(back, MaskedInputReply)
        np.testing.assert_array_equal(back.masked_input, message.masked_input)
    else:
        assert back == message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_record_with_an_extra_or_missing_key_is_rejected(message: SecAggMessage) -> None:
    record: dict[str, Any] = dict(message.to_record())
    with pytest.raises(SecAggProtocolError, match="unexpected"):
        type(message).from_record({**record, "extra": 1})
    del record["run_id"]
    with pytest.raises(SecAggProtocolError, match="missing"):
        type(message).from_record(record)


def test_record_of_another_stage_is_rejected() -> None:
    record = MESSAGES[2].to_record()  # a share-keys request
    with pytest.raises(SecAggProtocolError, match="another stage"):
        UnmaskRequest.from_record(record)
    with pytest.raises(SecAggProtocolError, match="Unknown SecAgg"):
        message_from_record({**record, "stage": "bogus"})


@pytest.mark.parametrize(
    ("index", "key", "value", "match"),
    [
        (6, "surviving_ids", [3, 1], "strictly increasing"),
        (6, "dropped_ids", [4, 4], "strictly increasing"),
        (6, "dropped_ids", [-1], r"\[0, "),
        (6, "dropped_ids", [True], "must be an int"),
        (3, "ciphertexts", [CT], "one entry per node id"),
        (3, "ciphertexts", [CT, b"short"], "bytes"),
        (1, "mask_public_key", b"x" * 31, "32 bytes"),
        (5, "masked_input", np.zeros(3, dtype=np.int64), "uint32"),
        (5, "masked_input", [1, 2, 3], "uint32"),
        (0, "threshold", 1, r"threshold.*Found 1"),
        (0, "neighbours", [1, 3], "distinct neighbours other than itself"),
        (0, "clipping_range", "inf", "positive and finite"),
        (0, "clipping_range", 0.5, "hex"),
        (7, "key_share_ids", [1], "both shares"),
        (0, "run_id", "7", "must be an int"),
        (1, "signature", b"x" * 63, "64-byte Ed25519"),
        (1, "seed_commitment", b"x" * 31, "32 bytes"),
        (2, "signatures", [SIG], "one entry per node id"),
        (2, "seed_commitments", [b"e" * 32], "one entry per node id"),
        (5, "peer_ids", [3], "must not contain the sender"),
        (5, "peer_ids", [4, 1], "strictly increasing"),
        (6, "signatures", [], "one entry per node id"),
        (6, "signer_ids", [1], "one entry per node id"),
        (8, "survivor_ids", [5, 3], "strictly increasing"),
        (9, "signature", b"", "64-byte Ed25519"),
        (9, "signature", "sig", "64-byte Ed25519"),
    ],
)
def test_malformed_record_field_is_rejected(
    index: int, key: str, value: object, match: str
) -> None:
    record: dict[str, Any] = dict(MESSAGES[index].to_record())
    record[key] = value
    with pytest.raises(SecAggProtocolError, match=match):
        type(MESSAGES[index]).from_record(record)
