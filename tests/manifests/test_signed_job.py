"""Jobs signed by the operator: round trip, job ids, and every refusal."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest

from manifests import dsse
from manifests.jobspec import JobSpec
from manifests.keys import SigningKey
from manifests.manifest import canonical_json
from manifests.signed_job import (
    JOB_PAYLOAD_TYPE,
    SignedJobBadSignatureError,
    SignedJobError,
    SignedJobExpiredError,
    SignedJobFederationError,
    SignedJobFormatError,
    SignedJobInvalidError,
    SignedJobKeyExpiredError,
    SignedJobKeyRevokedError,
    SignedJobKeyUntrustedError,
    SignedJobPayloadTypeError,
    envelope_job_id,
    sign_job,
    verify_signed_job,
)
from tests.manifests.test_roster import NOW, OPERATOR, STRANGER, make_roster, trusted

ISSUED = NOW - timedelta(hours=1)
JOB = JobSpec.from_mapping(
    {
        "component": "sensing",
        "base_model": "iot",
        "task": "normalizer",
        "privacy_level": "dp+secure-agg",
        "dp": {"unit": "example", "target_epsilon": 4.0, "delta": 1e-5},
        "federation": {"clients_per_round": 5},
    }
)


def signed(job: JobSpec = JOB, key: SigningKey = OPERATOR, **extra: object) -> bytes:
    options: dict[str, object] = {"federation": "lab", "issued_at": ISSUED, **extra}
    return sign_job(job, key, **options)  # type: ignore[arg-type]


def payload_of(envelope: bytes) -> dict[str, object]:
    document = json.loads(base64.b64decode(json.loads(envelope)["payload"]))
    assert isinstance(document, dict)
    return document


def resigned(document: object, payload_type: str = JOB_PAYLOAD_TYPE) -> bytes:
    payload = document if isinstance(document, bytes) else canonical_json(document)
    return dsse.sign(payload_type, payload, OPERATOR).to_json()


def test_a_signed_job_round_trips_with_its_id_and_signer() -> None:
    envelope = signed(not_after=NOW + timedelta(days=1))
    result = verify_signed_job(envelope, trusted(), now=NOW, federation="lab")
    payload = base64.b64decode(json.loads(envelope)["payload"])
    assert result.job == JOB
    assert result.job_id == "sha256:" + hashlib.sha256(payload).hexdigest()
    assert (result.federation, result.issued_at) == ("lab", ISSUED)
    assert result.not_after == NOW + timedelta(days=1)
    assert result.keyid == OPERATOR.keyid
    assert payload_of(envelope)["job"] == JOB.to_run_config()


def test_signing_is_deterministic_and_the_job_id_changes_with_any_field() -> None:
    assert signed() == signed()
    ids = {
        verify_signed_job(e, trusted(), now=NOW).job_id
        for e in (signed(), signed(federation="other"), signed(issued_at=ISSUED - timedelta(1)))
    }
    assert len(ids) == 3


def test_the_server_reads_the_same_job_id_as_the_nodes_verify() -> None:
    for envelope in (signed(), signed(federation="other")):
        assert envelope_job_id(envelope) == verify_signed_job(envelope, trusted(), now=NOW).job_id
    for bad in (b"not json", b"[]", b'{"payload": 3}', b'{"payload": "not base64!"}'):
        with pytest.raises(SignedJobFormatError):
            envelope_job_id(bad)


def test_without_a_federation_to_check_any_federation_is_returned() -> None:
    assert verify_signed_job(signed(federation="x"), trusted(), now=NOW).federation == "x"


def test_one_flipped_byte_anywhere_in_the_signed_job_is_refused() -> None:
    data = signed()
    for index in range(len(data)):
        flipped = bytearray(data)
        flipped[index] ^= 0x01
        with pytest.raises(SignedJobError):
            verify_signed_job(bytes(flipped), trusted(), now=NOW, federation="lab")


def test_a_tampered_job_fails_the_signature() -> None:
    envelope = json.loads(signed())
    document = payload_of(signed())
    job = document["job"]
    assert isinstance(job, dict)
    job["dp.target_epsilon"] = 400.0  # the server loosens the privacy parameters
    envelope["payload"] = base64.b64encode(canonical_json(document)).decode()
    with pytest.raises(SignedJobBadSignatureError, match="does not verify"):
        verify_signed_job(json.dumps(envelope).encode(), trusted(), now=NOW)


def test_a_job_signed_by_a_key_that_is_not_an_operator_is_refused() -> None:
    with pytest.raises(SignedJobKeyUntrustedError, match="not in the trusted-keys file"):
        verify_signed_job(signed(key=STRANGER), trusted(), now=NOW)


def test_a_job_signed_by_a_revoked_key_is_refused() -> None:
    with pytest.raises(SignedJobKeyRevokedError, match="revoked"):
        verify_signed_job(signed(), trusted(revoked=True), now=NOW)


def test_a_job_outside_the_keys_window_is_refused() -> None:
    with pytest.raises(SignedJobKeyExpiredError, match="outside"):
        verify_signed_job(signed(), trusted(not_after=NOW - timedelta(days=1)), now=NOW)


def test_a_job_for_another_federation_is_refused() -> None:
    with pytest.raises(SignedJobFederationError, match="'other'"):
        verify_signed_job(signed(federation="other"), trusted(), now=NOW, federation="lab")


def test_an_expired_job_is_refused() -> None:
    envelope = signed(not_after=NOW - timedelta(minutes=1))
    with pytest.raises(SignedJobExpiredError, match="expired"):
        verify_signed_job(envelope, trusted(), now=NOW)


def test_a_signed_roster_is_not_a_job() -> None:
    from manifests.roster import sign_roster

    with pytest.raises(SignedJobPayloadTypeError, match="payloadType"):
        verify_signed_job(sign_roster(make_roster(), OPERATOR), trusted(), now=NOW)


def test_a_signed_job_that_is_not_a_valid_job_spec_is_refused_with_its_problems() -> None:
    document = payload_of(signed())
    job = dict(document["job"])  # type: ignore[call-overload]
    job["privacy_level"] = "plaintext"
    job["batch_size"] = 0
    with pytest.raises(SignedJobInvalidError) as caught:
        verify_signed_job(resigned({**document, "job": job}), trusted(), now=NOW)
    assert len(caught.value.problems) == 2
    assert "privacy_level" in str(caught.value) and "batch_size" in str(caught.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"extra": 1}, "must have exactly"),
        ({"federation": ""}, "federation"),
        ({"issued_at": "now"}, "issued_at"),
        ({"not_after": 5}, "not_after"),
        ({"job": {"dp": {"delta": 1e-5}}}, "boolean, number or string"),
        ({"job": []}, "flat run config"),
    ],
)
def test_a_validly_signed_malformed_payload_is_refused(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(SignedJobFormatError, match=message):
        verify_signed_job(resigned({**payload_of(signed()), **change}), trusted(), now=NOW)


def test_duplicate_keys_in_the_signed_payload_are_refused() -> None:
    payload = canonical_json(payload_of(signed())).replace(
        b'"federation":"lab"', b'"federation":"lab","federation":"evil"'
    )
    with pytest.raises(SignedJobFormatError, match="duplicate JSON key"):
        verify_signed_job(resigned(payload), trusted(), now=NOW)


def test_sign_job_refuses_a_window_that_ends_before_it_starts() -> None:
    with pytest.raises(ValueError, match="`not_after` must be later"):
        signed(not_after=ISSUED)
    with pytest.raises(ValueError, match="timezone-aware"):
        signed(issued_at=datetime(2026, 1, 1))
    assert ISSUED.tzinfo is UTC
