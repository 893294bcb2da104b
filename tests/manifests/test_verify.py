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
    CreatedInFutureError,
    DigestMismatchError,
    InvalidJSONError,
    KeyExpiredError,
    KeyNotTrustedError,
    KeyRevokedError,
    Limits,
    MalformedBundleError,
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
    zipfile_zip,
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
    deflate: bool = False,
) -> bytes:
    """A ZIP with chosen (name, data) records, in order, bypassing every writer check;
    ``sizes`` overrides the declared uncompressed size of some members; ``deflate`` stores the
    data raw-deflated (method 8) instead of stored (method 0)."""
    body, central = b"", b""
    method = struct.pack("<H", 8 if deflate else 0)
    for name, data in entries:
        if deflate:
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            packed = compressor.compress(data) + compressor.flush()
        else:
            packed = data
        usize = (sizes or {}).get(name, len(data))
        crc = zlib.crc32(data)
        header = zipfmt.central_header(name, crc, len(packed), usize, len(body))
        header = header[:10] + method + header[12:38] + struct.pack("<I", mode << 16) + header[42:]
        central += header
        local = zipfmt.local_header(name, crc, len(packed), usize)
        body += local[:8] + method + local[10:] + packed
    return body + central + zipfmt.end_of_central_directory(len(entries), len(central), len(body))


@pytest.fixture
def no_inflation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything inflates deflate data while it runs."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the verifier must never inflate member data")

    monkeypatch.setattr(zlib, "decompressobj", refuse)
    monkeypatch.setattr(zlib, "decompress", refuse)


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


def test_bundle_signed_inside_the_window_still_verifies_after_the_window_ends(
    valid: Path,
) -> None:
    """A bundle outlives its key's window (manifests.keys, "Keys over time")."""
    result = verify_bundle(valid, TRUSTED, now=datetime(2027, 1, 1, tzinfo=UTC))
    assert result.artifact_name


def test_revocation_rejects_a_bundle_signed_inside_the_window_even_after_it_ended(
    valid: Path,
) -> None:
    with pytest.raises(KeyRevokedError, match="revoked"):
        verify_bundle(valid, TRUSTED.revoke(KEY.keyid), now=datetime(2027, 1, 1, tzinfo=UTC))


def test_manifest_created_after_the_verification_time_fails(valid: Path) -> None:
    """The fixture's manifest is created on 2025-06-01: checked on 2025-05-01 it is from the
    future (a forward-dated bundle), beyond the clock skew allowed."""
    with pytest.raises(CreatedInFutureError, match="after the verification time"):
        verify_bundle(valid, TRUSTED, now=datetime(2025, 5, 1, tzinfo=UTC))


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


@pytest.mark.usefixtures("no_inflation")
def test_zip_bomb_is_caught_from_the_declared_ratio(tmp_path: Path) -> None:
    """A deflate bomb is reported as a zip bomb (not as merely non-canonical); nothing is
    inflated."""
    path = write(tmp_path, raw_zip([(b"model.safetensors", bytes(1_000_000))], deflate=True))
    with pytest.raises(ZipBombError, match="compression ratio above 100:1"):
        verify_bundle(path, TRUSTED)


def test_zip_bomb_is_caught_from_the_declared_total(valid: Path) -> None:
    with pytest.raises(ZipBombError, match="the limit is 100"):
        verify_bundle(valid, TRUSTED, limits=Limits(max_total_uncompressed=100))


@pytest.mark.usefixtures("no_inflation")
def test_deflated_member_over_the_declared_total_is_a_zip_bomb(tmp_path: Path) -> None:
    path = write(tmp_path, raw_zip([(b"model.safetensors", bytes(200_000))], deflate=True))
    limits = Limits(max_total_uncompressed=100_000, max_compression_ratio=10**6)
    with pytest.raises(ZipBombError, match="declare 200000 bytes uncompressed; the limit is"):
        verify_bundle(path, TRUSTED, limits=limits)


@pytest.mark.usefixtures("no_inflation")
def test_deflated_json_member_over_its_cap_is_a_zip_bomb(tmp_path: Path) -> None:
    entries = [
        (ENVELOPE_MEMBER.encode(), b" " * 5000),
        (MANIFEST_MEMBER.encode(), b"{}"),
        (WEIGHTS_MEMBER.encode(), b"w"),
    ]
    path = write(tmp_path, raw_zip(entries, deflate=True))
    limits = Limits(max_json_member=1000, max_compression_ratio=10**6)
    with pytest.raises(ZipBombError, match="JSON members are limited to 1000"):
        verify_bundle(path, TRUSTED, limits=limits)


def test_zip_bomb_lying_about_its_size_is_caught_while_streaming(tmp_path: Path) -> None:
    entries = [
        (ENVELOPE_MEMBER.encode(), b"{}"),
        (MANIFEST_MEMBER.encode(), b"{}"),
        (WEIGHTS_MEMBER.encode(), bytes(200_000)),
    ]
    path = write(tmp_path, raw_zip(entries, sizes={WEIGHTS_MEMBER.encode(): 1000}))
    with pytest.raises(ZipBombError, match="holds more than its declared size of 1000"):
        verify_bundle(path, TRUSTED)


def test_member_shorter_than_its_declared_size_fails(tmp_path: Path) -> None:
    entries = [
        (ENVELOPE_MEMBER.encode(), b"{}"),
        (MANIFEST_MEMBER.encode(), b"{}"),
        (WEIGHTS_MEMBER.encode(), bytes(100)),
    ]
    path = write(tmp_path, raw_zip(entries, sizes={WEIGHTS_MEMBER.encode(): 150}))
    with pytest.raises(MalformedBundleError, match="holds 100 bytes, not the declared 150"):
        verify_bundle(path, TRUSTED)


def test_member_data_failing_its_crc_fails(tmp_path: Path, valid: Path) -> None:
    data = bytearray(valid.read_bytes())
    with zipfile.ZipFile(valid) as archive:
        start = archive.getinfo(WEIGHTS_MEMBER).header_offset + 30 + len(WEIGHTS_MEMBER)
    data[start + 100] ^= 0x01  # inside the stored weights; headers untouched
    with pytest.raises(MalformedBundleError, match=r"'model\.safetensors' fails its CRC-32 check"):
        verify_bundle(write(tmp_path, bytes(data)), TRUSTED)


@pytest.mark.usefixtures("no_inflation")
def test_bundle_with_deflated_members_is_not_canonical(
    tmp_path: Path, valid: Path, members: dict[str, bytes]
) -> None:
    """The same members, names, timestamps and modes, but deflated: rejected for the method."""
    assert zipfile_zip(members, zipfile.ZIP_STORED) == valid.read_bytes()
    deflated = zipfile_zip(members, zipfile.ZIP_DEFLATED)
    with pytest.raises(
        NonCanonicalBundleError,
        match=(
            r"^member 'artifact_manifest\.dsse\.json' uses compression method 8; "
            r"fedbrain bundles store members uncompressed$"
        ),
    ):
        verify_bundle(write(tmp_path, deflated), TRUSTED)


def test_bundle_rezipped_by_another_tool_is_not_canonical(
    tmp_path: Path, members: dict[str, bytes]
) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name in sorted(members):
            archive.writestr(name, members[name])  # today's timestamp, mode 0600
    with pytest.raises(NonCanonicalBundleError, match="not canonical"):
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
