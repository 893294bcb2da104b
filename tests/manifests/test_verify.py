"""The strict bundle verifier: every rejection has its own reason."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import struct
import zipfile
import zlib
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from manifests import bundle as zipfmt
from manifests.bundle import ENVELOPE_MEMBER, MANIFEST_MEMBER, WEIGHTS_MEMBER
from manifests.dsse import Envelope
from manifests.keys import SigningKey
from manifests.manifest import canonical_json, loads_strict
from manifests.verify import (
    BadSignatureError,
    BundleVerificationError,
    ConfigHashMismatchError,
    DigestMismatchError,
    InvalidJSONError,
    KeyExpiredError,
    KeyNotTrustedError,
    KeyRevokedError,
    Limits,
    ManifestMismatchError,
    MemberSetError,
    NonCanonicalBundleError,
    PayloadTypeMismatchError,
    PredicateTypeMismatchError,
    SchemaViolationError,
    UnsafeMemberError,
    WeightsPickleError,
    WeightsPrecisionError,
    ZipBombError,
    verify_bundle,
)
from tests.manifests.test_bundle import (
    KEY,
    build_vision_bundle,
    canonical_zip,
    read_members,
    signed_zip,
    trusted,
)

TRUSTED = trusted()


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vision_bundle(tmp_path_factory.mktemp("valid"))


@pytest.fixture(scope="module")
def members(valid: Path) -> dict[str, bytes]:
    return read_members(valid)


@pytest.fixture(scope="module")
def predicate(members: dict[str, bytes]) -> dict[str, object]:
    value = loads_strict(members[MANIFEST_MEMBER])
    assert isinstance(value, dict)
    return value


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "candidate.zip"
    path.write_bytes(data)
    return path


def weights_only(members: dict[str, bytes]) -> dict[str, bytes]:
    return {WEIGHTS_MEMBER: members[WEIGHTS_MEMBER]}


def raw_zip(
    entries: list[tuple[bytes, bytes]],
    *,
    mode: int = 0o100644,
    sizes: dict[bytes, int] | None = None,
) -> bytes:
    """A ZIP with chosen (name, data) records, in order, bypassing every writer check;
    ``sizes`` overrides the declared uncompressed size of some members."""
    body, central = b"", b""
    for name, data in entries:
        compressor = zipfmt.new_compressor()
        packed = compressor.compress(data) + compressor.flush()
        usize = (sizes or {}).get(name, len(data))
        crc = zlib.crc32(data)
        header = zipfmt.central_header(name, crc, len(packed), usize, len(body))
        header = header[:38] + struct.pack("<I", mode << 16) + header[42:]
        central += header
        body += zipfmt.local_header(name, crc, len(packed), usize) + packed
    return body + central + zipfmt.end_of_central_directory(len(entries), len(central), len(body))


def test_valid_bundle_verifies_and_summarizes(valid: Path) -> None:
    result = verify_bundle(valid, TRUSTED, now=datetime(2025, 7, 1, tzinfo=UTC))
    assert result.artifact_name == "vision-vit-base16-embed-v1"
    assert result.keyid == KEY.keyid
    assert [s.name for s in result.subjects] == [WEIGHTS_MEMBER]
    digest = hashlib.sha256(read_members(valid)[WEIGHTS_MEMBER]).hexdigest()
    assert result.subjects[0].sha256 == digest
    assert result.manifest.precision == "fp16"


def test_changed_weights_fail_the_subject_digest(tmp_path: Path, members: dict[str, bytes]) -> None:
    weights = bytearray(members[WEIGHTS_MEMBER])
    weights[-1] ^= 0xFF
    path = write(tmp_path, canonical_zip({**members, WEIGHTS_MEMBER: bytes(weights)}))
    with pytest.raises(DigestMismatchError, match=r"'model.safetensors' has sha256 .* but the"):
        verify_bundle(path, TRUSTED)


def test_manifest_file_differing_from_the_signed_predicate_fails(
    tmp_path: Path, members: dict[str, bytes]
) -> None:
    manifest = members[MANIFEST_MEMBER].replace(b"vit-base16", b"vit-base17")
    path = write(tmp_path, canonical_zip({**members, MANIFEST_MEMBER: manifest}))
    with pytest.raises(ManifestMismatchError, match="differs from the signed predicate"):
        verify_bundle(path, TRUSTED)


def test_changed_signature_fails(tmp_path: Path, members: dict[str, bytes]) -> None:
    envelope = json.loads(members[ENVELOPE_MEMBER])
    sig = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    sig[5] ^= 1
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    path = write(tmp_path, canonical_zip({**members, ENVELOPE_MEMBER: canonical_json(envelope)}))
    with pytest.raises(BadSignatureError, match="does not verify"):
        verify_bundle(path, TRUSTED)


def test_member_not_in_subject_fails(tmp_path: Path, members: dict[str, bytes]) -> None:
    path = write(tmp_path, canonical_zip({**members, "extra.bin": b"x"}))
    with pytest.raises(MemberSetError, match=r"'extra.bin' is in the bundle but not in the signed"):
        verify_bundle(path, TRUSTED)


def test_subject_missing_from_bundle_fails(tmp_path: Path, predicate: dict[str, object]) -> None:
    signed = signed_zip({WEIGHTS_MEMBER: b"w", "extra.bin": b"x"}, predicate)
    reduced = read_members(write(tmp_path, signed))
    del reduced["extra.bin"]
    path = write(tmp_path, canonical_zip(reduced))
    with pytest.raises(MemberSetError, match=r"signed subject 'extra.bin' is not a covered member"):
        verify_bundle(path, TRUSTED)


def test_bundle_without_weights_fails(tmp_path: Path, members: dict[str, bytes]) -> None:
    reduced = {k: v for k, v in members.items() if k != WEIGHTS_MEMBER}
    with pytest.raises(MemberSetError, match=r"no 'model.safetensors' member"):
        verify_bundle(write(tmp_path, canonical_zip(reduced)), TRUSTED)


def test_wrong_payload_type_fails(tmp_path: Path, members: dict[str, bytes]) -> None:
    envelope = json.loads(members[ENVELOPE_MEMBER])
    envelope["payloadType"] = "application/json"
    path = write(tmp_path, canonical_zip({**members, ENVELOPE_MEMBER: canonical_json(envelope)}))
    with pytest.raises(PayloadTypeMismatchError, match="payloadType must be"):
        verify_bundle(path, TRUSTED)


def test_wrong_predicate_type_fails(
    tmp_path: Path, members: dict[str, bytes], predicate: dict[str, object]
) -> None:
    data = signed_zip(weights_only(members), predicate, predicate_type="https://slsa.dev/x")
    with pytest.raises(PredicateTypeMismatchError, match="predicateType must be"):
        verify_bundle(write(tmp_path, data), TRUSTED)


def test_key_not_in_the_trusted_file_fails(tmp_path: Path, members: dict[str, bytes]) -> None:
    stranger = SigningKey.from_seed(b"\x09" * 32)
    predicate = loads_strict(members[MANIFEST_MEMBER])
    data = signed_zip(weights_only(members), predicate, key=stranger)  # type: ignore[arg-type]
    with pytest.raises(KeyNotTrustedError, match="not in the trusted-keys file"):
        verify_bundle(write(tmp_path, data), TRUSTED)


def test_revoked_key_fails(valid: Path) -> None:
    with pytest.raises(KeyRevokedError, match="revoked"):
        verify_bundle(valid, trusted(revoked=True))


def test_key_expired_at_verification_time_fails(valid: Path) -> None:
    with pytest.raises(KeyExpiredError, match="verification time 2027-01-01T00:00:00Z is outside"):
        verify_bundle(valid, TRUSTED, now=datetime(2027, 1, 1, tzinfo=UTC))


def test_key_not_yet_valid_at_created_at_fails(
    tmp_path: Path, members: dict[str, bytes], predicate: dict[str, object]
) -> None:
    early = {**predicate, "created_at": "2024-06-01T00:00:00Z"}
    data = signed_zip(weights_only(members), early)
    with pytest.raises(KeyExpiredError, match="created_at 2024-06-01T00:00:00Z is outside"):
        verify_bundle(write(tmp_path, data), TRUSTED)


def test_duplicate_keys_in_the_manifest_file_fail(
    tmp_path: Path, members: dict[str, bytes]
) -> None:
    manifest = b'{"task":"x",' + members[MANIFEST_MEMBER][1:]
    path = write(tmp_path, canonical_zip({**members, MANIFEST_MEMBER: manifest}))
    with pytest.raises(InvalidJSONError, match="duplicate JSON key 'task'"):
        verify_bundle(path, TRUSTED)


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b'{"_type":1,"_type":2}', "duplicate JSON key '_type'"), (b'{"x":NaN}', "NaN")],
)
def test_duplicate_keys_or_nan_in_the_signed_payload_fail(
    tmp_path: Path, members: dict[str, bytes], payload: bytes, message: str
) -> None:
    data = signed_zip(weights_only(members), {}, payload=payload)
    with pytest.raises(InvalidJSONError, match=message):
        verify_bundle(write(tmp_path, data), TRUSTED)


def test_schema_violation_fails(
    tmp_path: Path, members: dict[str, bytes], predicate: dict[str, object]
) -> None:
    data = signed_zip(weights_only(members), {**predicate, "precision": "fp64"})
    with pytest.raises(SchemaViolationError, match="at precision: 'fp64' is not one of"):
        verify_bundle(write(tmp_path, data), TRUSTED)


def test_training_config_hash_mismatch_fails(
    tmp_path: Path, members: dict[str, bytes], predicate: dict[str, object]
) -> None:
    config = {**predicate["training_config"], "epochs": 11}  # type: ignore[dict-item]
    data = signed_zip(weights_only(members), {**predicate, "training_config": config})
    with pytest.raises(ConfigHashMismatchError, match="training_config hashes to sha256:"):
        verify_bundle(write(tmp_path, data), TRUSTED)


def test_pickled_weights_fail(tmp_path: Path, predicate: dict[str, object]) -> None:
    data = signed_zip({WEIGHTS_MEMBER: pickle.dumps([1.0] * 8)}, predicate)
    with pytest.raises(WeightsPickleError, match="only safetensors"):
        verify_bundle(write(tmp_path, data), TRUSTED)


def test_precision_disagreeing_with_dtypes_fails(
    tmp_path: Path, members: dict[str, bytes], predicate: dict[str, object]
) -> None:
    fp32 = {**predicate, "precision": "fp32"}
    data = signed_zip(weights_only(members), fp32)
    with pytest.raises(WeightsPrecisionError, match=r"precision fp32 does not allow .*F16"):
        verify_bundle(write(tmp_path, data), TRUSTED)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([b"a.txt", b"a.txt"], "appears more than once"),
        ([b"A.txt", b"a.txt"], "collide when letter case is ignored"),
        ([b"/etc/passwd"], "absolute path"),
        ([b"../evil"], "'..'"),
        ([b"dir\\evil"], "backslash"),
    ],
)
def test_unsafe_member_names_fail(tmp_path: Path, names: list[bytes], message: str) -> None:
    path = write(tmp_path, raw_zip([(n, b"x") for n in names]))
    with pytest.raises(UnsafeMemberError, match=message):
        verify_bundle(path, TRUSTED)


def test_symlink_member_fails(tmp_path: Path) -> None:
    path = write(tmp_path, raw_zip([(b"model.safetensors", b"/etc/passwd")], mode=0o120777))
    with pytest.raises(UnsafeMemberError, match="symbolic link"):
        verify_bundle(path, TRUSTED)


def test_zip_bomb_is_caught_from_the_declared_ratio(tmp_path: Path) -> None:
    path = write(tmp_path, raw_zip([(b"model.safetensors", bytes(1_000_000))]))
    with pytest.raises(ZipBombError, match="compression ratio above 100:1"):
        verify_bundle(path, TRUSTED)


def test_zip_bomb_is_caught_from_the_declared_total(valid: Path) -> None:
    with pytest.raises(ZipBombError, match="the limit is 100"):
        verify_bundle(valid, TRUSTED, limits=Limits(max_total_uncompressed=100))


def test_zip_bomb_lying_about_its_size_is_caught_while_streaming(tmp_path: Path) -> None:
    entries = [
        (ENVELOPE_MEMBER.encode(), b"{}"),
        (MANIFEST_MEMBER.encode(), b"{}"),
        (WEIGHTS_MEMBER.encode(), bytes(200_000)),
    ]
    path = write(tmp_path, raw_zip(entries, sizes={WEIGHTS_MEMBER.encode(): 1000}))
    with pytest.raises(ZipBombError, match="inflates beyond its declared size of 1000"):
        verify_bundle(path, TRUSTED)


def test_bundle_rezipped_by_another_tool_is_not_canonical(
    tmp_path: Path, members: dict[str, bytes]
) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(members):
            archive.writestr(name, members[name])
    with pytest.raises(NonCanonicalBundleError):
        verify_bundle(write(tmp_path, buffer.getvalue()), TRUSTED)


def test_envelope_keyid_does_not_confer_trust(tmp_path: Path, members: dict[str, bytes]) -> None:
    """A stranger's signature labelled with the trusted key id still fails."""
    stranger = SigningKey.from_seed(b"\x09" * 32)
    predicate = loads_strict(members[MANIFEST_MEMBER])
    forged = read_members(
        write(tmp_path, signed_zip(weights_only(members), predicate, key=stranger))  # type: ignore[arg-type]
    )
    envelope = Envelope.from_json(forged[ENVELOPE_MEMBER])
    relabelled = Envelope(
        envelope.payload,
        envelope.payload_type,
        (type(envelope.signatures[0])(KEY.keyid, envelope.signatures[0].sig),),
    )
    path = write(tmp_path, canonical_zip({**forged, ENVELOPE_MEMBER: relabelled.to_json()}))
    with pytest.raises(BadSignatureError):
        verify_bundle(path, TRUSTED)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_single_byte_change_anywhere_fails(
    tmp_path: Path, valid: Path, data: st.DataObject
) -> None:
    original = valid.read_bytes()
    offset = data.draw(st.integers(0, len(original) - 1), label="offset")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != original[offset]), label="value")
    mutated = bytearray(original)
    mutated[offset] = value
    path = tmp_path / "mutated.zip"
    path.write_bytes(bytes(mutated))
    with pytest.raises(BundleVerificationError):
        verify_bundle(path, TRUSTED)
