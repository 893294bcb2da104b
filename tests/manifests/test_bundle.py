"""The reproducible bundle writer and the weights (safetensors/precision) rule."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from manifests import bundle as bundle_module
from manifests.bundle import (
    ENVELOPE_MEMBER,
    MANIFEST_MEMBER,
    WEIGHTS_MEMBER,
    PickledWeightsError,
    PrecisionMismatchError,
    WeightsError,
    build_bundle,
    check_member_name,
    check_precision,
    read_weights_header,
    write_canonical_zip,
)
from manifests.dsse import PAYLOAD_TYPE, PREDICATE_TYPE, Statement, Subject, sign
from manifests.keys import SigningKey, TrustedKey, TrustedKeys
from manifests.manifest import Precision, canonical_json
from tests.manifests.test_manifest import make_provenance, vision_job

KEY = SigningKey.from_seed(b"\x07" * 32)


def trusted(key: SigningKey = KEY, *, revoked: bool = False) -> TrustedKeys:
    """Pins ``key`` for 2025 (the fixtures' runs end on 2025-06-01)."""
    window = (datetime(2025, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC))
    return TrustedKeys.of([TrustedKey(key.public_key(), *window, revoked)])


def write_weights(path: Path, dtype: str = "float16") -> Path:
    rng = np.random.default_rng(0)
    save_file(
        {
            "encoder.weight": rng.standard_normal((4, 3)).astype(dtype),
            "encoder.bias": rng.standard_normal(4).astype(dtype),
            "position_ids": np.arange(4, dtype=np.int64),
        },
        str(path),
    )
    return path


def build_vision_bundle(folder: Path, *, extra_files: dict[str, Path] | None = None) -> Path:
    weights = write_weights(folder / "weights.safetensors")
    out = folder / "bundle.zip"
    build_bundle(
        vision_job(), weights, make_provenance(), KEY, out, environ={}, extra_files=extra_files
    )
    return out


def read_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def canonical_zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    write_canonical_zip(dict(members), out)
    return out.getvalue()


def zipfile_zip(members: dict[str, bytes], compression: int) -> bytes:
    """``members`` written by Python's ``zipfile`` with the canonical metadata (sorted names,
    1980-01-01 timestamps, Unix mode 0644) and the given compression method."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o100644 << 16
            info.compress_type = compression
            archive.writestr(info, members[name])
    return out.getvalue()


def signed_zip(
    members: dict[str, bytes],
    predicate: dict[str, object],
    *,
    key: SigningKey = KEY,
    predicate_type: str = PREDICATE_TYPE,
    payload: bytes | None = None,
    manifest: bytes | None = None,
) -> bytes:
    """A canonical bundle signed over arbitrary members/predicate (bypasses the writer's checks)."""
    subjects = [Subject(n, hashlib.sha256(d).hexdigest()) for n, d in members.items()]
    statement = Statement(tuple(sorted(subjects, key=lambda s: s.name)), predicate, predicate_type)
    envelope = sign(PAYLOAD_TYPE, payload if payload is not None else statement.to_payload(), key)
    return canonical_zip(
        {
            **members,
            MANIFEST_MEMBER: manifest if manifest is not None else canonical_json(predicate),
            ENVELOPE_MEMBER: envelope.to_json(),
        }
    )


def test_bundle_holds_weights_manifest_and_envelope(tmp_path: Path) -> None:
    out = build_vision_bundle(tmp_path)
    members = read_members(out)
    assert sorted(members) == [ENVELOPE_MEMBER, MANIFEST_MEMBER, WEIGHTS_MEMBER]
    assert members[WEIGHTS_MEMBER] == (tmp_path / "weights.safetensors").read_bytes()
    assert (tmp_path / MANIFEST_MEMBER).read_bytes() == members[MANIFEST_MEMBER]


def test_same_inputs_give_a_byte_identical_bundle(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    assert build_vision_bundle(first).read_bytes() == build_vision_bundle(second).read_bytes()


def test_bundle_built_twice_is_byte_identical_and_independent_of_any_compressor(
    tmp_path: Path,
) -> None:
    """Stored members: the bundle is exactly what any ZIP writer produces with the canonical
    metadata and no compression, so no zlib build can change it."""
    first = build_vision_bundle(tmp_path).read_bytes()
    second = build_vision_bundle(tmp_path).read_bytes()
    assert first == second
    members = read_members(tmp_path / "bundle.zip")
    assert zipfile_zip(members, zipfile.ZIP_STORED) == first
    assert canonical_zip(members) == first


def test_writer_gives_the_same_bytes_for_files_and_bytes(tmp_path: Path) -> None:
    data = {"a.bin": bytes(range(256)) * 300, "b/c.txt": b"", "d.txt": b"hello"}
    paths: dict[str, Path | bytes] = {}
    for index, (name, content) in enumerate(data.items()):
        path = tmp_path / f"{index}.bin"
        path.write_bytes(content)
        paths[name] = path
    out = io.BytesIO()
    write_canonical_zip(paths, out)
    assert out.getvalue() == canonical_zip(data)


def test_writer_rejects_a_file_that_changes_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"first")
    real_chunks = bundle_module._chunks
    calls = 0

    def changing(source: bundle_module.MemberSource) -> Iterator[bytes]:
        nonlocal calls
        calls += 1
        if calls == 2:
            path.write_bytes(b"other")
        yield from real_chunks(source)

    monkeypatch.setattr(bundle_module, "_chunks", changing)
    with pytest.raises(ValueError, match=r"'w\.bin' changed while the bundle was being written"):
        write_canonical_zip({"w.bin": path}, io.BytesIO())


def test_bundle_zip_entries_have_fixed_metadata(tmp_path: Path) -> None:
    with zipfile.ZipFile(build_vision_bundle(tmp_path)) as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    for info in infos:
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.external_attr >> 16 == 0o100644
        assert info.compress_type == zipfile.ZIP_STORED
        assert info.compress_size == info.file_size
        assert info.flag_bits == 0
        assert info.extra == b""
        assert info.comment == b""


def test_canonical_zip_is_readable_by_zipfile_and_sorted() -> None:
    data = canonical_zip({"b.txt": b"bb" * 1000, "a.txt": b""})
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == ["a.txt", "b.txt"]
        assert archive.read("b.txt") == b"bb" * 1000


def test_writer_rejects_pickled_weights_and_writes_nothing(tmp_path: Path) -> None:
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    out = tmp_path / "out" / "bundle.zip"
    out.parent.mkdir()
    with pytest.raises(PickledWeightsError, match="only safetensors"):
        build_bundle(vision_job(), weights, make_provenance(), KEY, out, environ={})
    assert list(out.parent.iterdir()) == []


def test_writer_rejects_weights_whose_dtype_disagrees_with_precision(tmp_path: Path) -> None:
    weights = write_weights(tmp_path / "w.safetensors", "float32")
    with pytest.raises(PrecisionMismatchError, match=r"fp16 does not allow.*F32"):
        build_bundle(vision_job(), weights, make_provenance(), KEY, tmp_path / "b.zip", environ={})
    assert not (tmp_path / "b.zip").exists()
    assert not (tmp_path / MANIFEST_MEMBER).exists()


def test_writer_puts_extra_files_in_the_signed_subject(tmp_path: Path) -> None:
    extra = tmp_path / "tokenizer.json"
    extra.write_bytes(b'{"vocab": []}')
    out = build_vision_bundle(tmp_path, extra_files={"tokenizer.json": extra})
    assert "tokenizer.json" in read_members(out)


@pytest.mark.parametrize(
    ("dtypes", "precision"),
    [
        (["F32", "I64"], "fp32"),
        (["F16", "BOOL"], "fp16"),
        (["I8", "F32", "F16", "U8"], "int8"),
    ],
)
def test_precision_rule_accepts(dtypes: list[str], precision: Precision) -> None:
    from manifests.bundle import TensorInfo

    check_precision({str(i): TensorInfo(d, (1,), 0, 1) for i, d in enumerate(dtypes)}, precision)


@pytest.mark.parametrize(
    ("dtypes", "precision"),
    [
        (["F16"], "fp32"),
        (["F32", "I8"], "fp32"),
        (["BF16"], "fp16"),
        (["F32"], "int8"),
        (["I8", "F64"], "int8"),
    ],
)
def test_precision_rule_rejects(dtypes: list[str], precision: Precision) -> None:
    from manifests.bundle import TensorInfo

    with pytest.raises(PrecisionMismatchError):
        check_precision(
            {str(i): TensorInfo(d, (1,), 0, 1) for i, d in enumerate(dtypes)}, precision
        )


def test_safetensors_header_parser_rejects_gaps_and_oversized_headers(tmp_path: Path) -> None:
    path = write_weights(tmp_path / "w.safetensors")
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(WeightsError, match="data section"):
        read_weights_header(path)
    path.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(WeightsError, match="limit"):
        read_weights_header(path)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/etc/passwd", "absolute"),
        ("C:/x", "absolute"),
        ("a/../b", r"'\.\.'"),
        ("a\\b", "backslash"),
        ("a//b", "separated"),
    ],
)
def test_member_names_must_be_safe_relative_paths(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_member_name(name)
