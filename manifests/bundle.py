"""The signed artifact bundle: a reproducible ZIP of weights, manifest and DSSE envelope.

Canonical ZIP form (written by :func:`write_canonical_zip`, demanded byte for byte by the
verifier): members sorted by name; each a local header with version 2.0, no flags, compression
method 0 (stored: the member's bytes as they are, compressed size = size, CRC-32 over the
data), timestamp 1980-01-01 00:00:00, no extra field; the central directory records Unix
regular files with mode 0644 and no comments; no archive comment, no ZIP64 (every member and
the whole archive stay below 4 GiB), no data descriptors.

Members are stored, not deflated, so the canonical form does not depend on any compressor:
deflate output is not specified by any standard and differs between zlib builds (zlib-ng,
Intel, Cloudflare, future versions), and a signed bundle must verify on every machine. Float
weights barely compress anyway.

Members: ``model.safetensors`` (the weights), ``artifact_manifest.json`` (the manifest, RFC 8785
canonical JSON = the signed Statement's predicate), ``artifact_manifest.dsse.json`` (the DSSE
envelope), and optionally further files, which the Statement lists in ``subject`` with the
weights.

Weights rule (precision vs safetensors dtypes; integer/bool buffers such as position ids or
step counters are allowed at every precision):

- ``fp32``: every floating tensor is F32; no I8/U8 tensor.
- ``fp16``: every floating tensor is F16 (bfloat16 is not fp16); no I8/U8 tensor.
- ``int8``: at least one I8 tensor; other tensors may be I8/U8 (quantized values) or F32/F16
  (scales, zero points, norms and biases kept in float); no F64/BF16/F8.
"""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from manifests.atomic import write_atomically
from manifests.dsse import PAYLOAD_TYPE, Statement, Subject, sign
from manifests.keys import SigningKey
from manifests.manifest import (
    JSONFormatError,
    Manifest,
    Precision,
    Provenance,
    SupportsManifestFields,
    build_manifest,
    loads_strict,
)

__all__ = [
    "ENVELOPE_MEMBER",
    "MANIFEST_MEMBER",
    "MAX_SAFETENSORS_HEADER",
    "WEIGHTS_MEMBER",
    "BuiltBundle",
    "PickledWeightsError",
    "PrecisionMismatchError",
    "TensorInfo",
    "WeightsError",
    "build_bundle",
    "check_member_name",
    "check_precision",
    "parse_safetensors_header",
    "read_weights_header",
    "write_canonical_zip",
]

WEIGHTS_MEMBER: Final = "model.safetensors"
MANIFEST_MEMBER: Final = "artifact_manifest.json"
ENVELOPE_MEMBER: Final = "artifact_manifest.dsse.json"
MAX_SAFETENSORS_HEADER: Final = 8 * 1024 * 1024

# ZIP constants (PKWARE APPNOTE 6.3.x, sections 4.3.7, 4.3.12, 4.3.16)
LOCAL_SIG: Final = 0x04034B50
CENTRAL_SIG: Final = 0x02014B50
EOCD_SIG: Final = 0x06054B50
LOCAL_FMT: Final = "<IHHHHHIIIHH"
CENTRAL_FMT: Final = "<IHHHHHHIIIHHHHHII"
EOCD_FMT: Final = "<IHHHHIIH"
LOCAL_SIZE: Final = struct.calcsize(LOCAL_FMT)
CENTRAL_SIZE: Final = struct.calcsize(CENTRAL_FMT)
EOCD_SIZE: Final = struct.calcsize(EOCD_FMT)
VERSION_NEEDED: Final = 20
VERSION_MADE_BY: Final = (3 << 8) | 20  # Unix, 2.0
METHOD_STORED: Final = 0
DOS_TIME: Final = 0
DOS_DATE: Final = (0 << 9) | (1 << 5) | 1  # 1980-01-01
EXTERNAL_ATTR: Final = 0o100644 << 16  # regular file, rw-r--r--
ZIP32_LIMIT: Final = 0xFFFFFFFF
CHUNK: Final = 1 << 16

_NAME_COMPONENT: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def check_member_name(name: str) -> None:
    """``ValueError`` unless ``name`` is a safe relative member path.

    Rejects backslashes, absolute paths (``/x``, ``C:...``), ``.``/``..`` components, empty
    components, and any character outside ``[A-Za-z0-9._-]`` and ``/``.
    """
    if not isinstance(name, str):
        raise TypeError(f"member name must be a str. Found {type(name).__name__}.")
    if "\\" in name:
        raise ValueError(f"member name {name!r} contains a backslash")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"member name {name!r} is an absolute path")
    parts = name.split("/")
    if any(part in ("..", ".") for part in parts):
        raise ValueError(f"member name {name!r} contains a '..' or '.' path component")
    if len(name.encode("utf-8")) > 255 or not all(_NAME_COMPONENT.match(p) for p in parts):
        raise ValueError(
            f"member name {name!r} must be at most 255 characters of [A-Za-z0-9._-] "
            "separated by '/'"
        )


def local_header(name: bytes, crc: int, csize: int, usize: int) -> bytes:
    return (
        struct.pack(
            LOCAL_FMT,
            LOCAL_SIG,
            VERSION_NEEDED,
            0,
            METHOD_STORED,
            DOS_TIME,
            DOS_DATE,
            crc,
            csize,
            usize,
            len(name),
            0,
        )
        + name
    )


def central_header(name: bytes, crc: int, csize: int, usize: int, offset: int) -> bytes:
    return (
        struct.pack(
            CENTRAL_FMT,
            CENTRAL_SIG,
            VERSION_MADE_BY,
            VERSION_NEEDED,
            0,
            METHOD_STORED,
            DOS_TIME,
            DOS_DATE,
            crc,
            csize,
            usize,
            len(name),
            0,
            0,
            0,
            0,
            EXTERNAL_ATTR,
            offset,
        )
        + name
    )


def end_of_central_directory(count: int, cd_size: int, cd_offset: int) -> bytes:
    return struct.pack(EOCD_FMT, EOCD_SIG, 0, 0, count, count, cd_size, cd_offset, 0)


MemberSource = bytes | Path


def _chunks(source: MemberSource) -> Iterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), CHUNK):
            yield source[start : start + CHUNK]
        return
    with source.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def write_canonical_zip(members: Mapping[str, MemberSource], out: BinaryIO) -> None:
    """Write ``members`` (bytes, or a file path streamed twice) as a canonical ZIP to ``out``.

    Members are stored uncompressed. A file is read once for its CRC-32 and size (the local
    header precedes the data and there are no data descriptors) and once to copy it; a file
    that changes in between raises ``ValueError``.
    """
    central: list[bytes] = []
    offset = 0
    for name in sorted(members):
        check_member_name(name)
        source = members[name]
        if not isinstance(source, bytes | Path):
            raise TypeError(f"member {name!r} must be bytes or a Path. Found {type(source)}.")
        crc, size = 0, 0
        for chunk in _chunks(source):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
        encoded = name.encode("ascii")
        header = local_header(encoded, crc, size, size)
        if max(size, offset + len(header) + size) >= ZIP32_LIMIT:
            raise ValueError(f"member {name!r} makes the bundle exceed 4 GiB (no ZIP64)")
        out.write(header)
        written_crc, written = 0, 0
        for chunk in _chunks(source):
            written_crc, written = zlib.crc32(chunk, written_crc), written + len(chunk)
            out.write(chunk)
        if (written_crc, written) != (crc, size):
            raise ValueError(f"member {name!r} changed while the bundle was being written")
        central.append(central_header(encoded, crc, size, size, offset))
        offset += len(header) + size
    directory = b"".join(central)
    out.write(directory)
    out.write(end_of_central_directory(len(central), len(directory), offset))


# --------------------------------------------------------------------------- safetensors


class WeightsError(ValueError):
    """The weights file is not acceptable (not safetensors, malformed)."""


class PickledWeightsError(WeightsError):
    """The weights file is a pickle (or a ``torch.save`` archive); only safetensors is allowed."""


class PrecisionMismatchError(WeightsError):
    """The tensors' dtypes disagree with the manifest's precision."""


DTYPE_SIZES: Final[Mapping[str, int]] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
FLOAT_DTYPES: Final = frozenset({"F64", "F32", "F16", "BF16", "F8_E5M2", "F8_E4M3"})
BUFFER_DTYPES: Final = frozenset({"BOOL", "I16", "I32", "I64", "U16", "U32", "U64"})


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _sniff_pickle(head: bytes) -> None:
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise PickledWeightsError(
            "weights file is a pickle or torch.save archive; only safetensors is accepted "
            "(save with safetensors.torch.save_file)"
        )


def parse_safetensors_header(head: bytes, total_size: int) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header from the file's first bytes.

    Format: 8-byte little-endian header length N (at most 8 MiB), N bytes of JSON
    ``{name: {dtype, shape, data_offsets}, "__metadata__"?: {str: str}}``; the tensors' byte
    ranges must tile the data section exactly. ``head`` needs at least ``8 + N`` bytes.
    """
    _sniff_pickle(head)
    if total_size < 8 or len(head) < 8:
        raise WeightsError("weights file is too short to be safetensors")
    (length,) = struct.unpack("<Q", head[:8])
    if length > MAX_SAFETENSORS_HEADER:
        raise WeightsError(
            f"safetensors header is {length} bytes; the limit is {MAX_SAFETENSORS_HEADER}"
        )
    if 8 + length > total_size or len(head) < 8 + length:
        raise WeightsError("safetensors header length runs past the end of the file")
    raw = head[8 : 8 + length]
    if not raw.startswith(b"{"):
        raise WeightsError("weights file is not safetensors (header is not a JSON object)")
    try:
        document = loads_strict(raw)
    except JSONFormatError as exc:
        raise WeightsError(f"safetensors header: {exc}") from exc
    if not isinstance(document, dict):
        raise WeightsError("safetensors header must be a JSON object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in document.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise WeightsError("safetensors __metadata__ must map strings to strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WeightsError(f"tensor {name!r}: needs exactly dtype, shape, data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise WeightsError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise WeightsError(f"tensor {name!r}: shape must be a list of non-negative ints")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise WeightsError(f"tensor {name!r}: data_offsets must be [begin, end]")
        count = 1
        for dim in shape:
            count *= dim
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != count * DTYPE_SIZES[dtype]:
            raise WeightsError(
                f"tensor {name!r}: data_offsets {offsets} do not fit {dtype} shape {shape}"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape), begin, end)
    if not tensors:
        raise WeightsError("safetensors file holds no tensors")
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            raise WeightsError("safetensors tensors overlap or leave gaps in the data section")
        position = info.end
    if position != total_size - 8 - length:
        raise WeightsError(
            f"safetensors data section is {total_size - 8 - length} bytes but the tensors "
            f"cover {position}"
        )
    return tensors


def check_precision(tensors: Mapping[str, TensorInfo], precision: Precision) -> None:
    """``PrecisionMismatchError`` unless the dtypes follow the module's precision rule."""
    allowed: frozenset[str]
    if precision == "fp32":
        allowed = BUFFER_DTYPES | {"F32"}
    elif precision == "fp16":
        allowed = BUFFER_DTYPES | {"F16"}
    elif precision == "int8":
        allowed = BUFFER_DTYPES | {"I8", "U8", "F32", "F16"}
    else:
        raise ValueError(f"precision must be fp32, fp16 or int8. Found {precision!r}.")
    wrong = sorted(f"{name} ({t.dtype})" for name, t in tensors.items() if t.dtype not in allowed)
    if wrong:
        raise PrecisionMismatchError(
            f"precision {precision} does not allow these tensors: {', '.join(wrong[:5])}"
            + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        )
    if precision == "int8" and not any(t.dtype == "I8" for t in tensors.values()):
        raise PrecisionMismatchError("precision int8 needs at least one I8 tensor; found none")


def read_weights_header(path: Path) -> dict[str, TensorInfo]:
    """Read and check the safetensors header of a weights file on disk."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        _sniff_pickle(head)
        if len(head) == 8:
            (length,) = struct.unpack("<Q", head)
            head += handle.read(min(length, MAX_SAFETENSORS_HEADER))
    return parse_safetensors_header(head, size)


# --------------------------------------------------------------------------- building


@dataclass(frozen=True)
class BuiltBundle:
    """What :func:`build_bundle` wrote."""

    path: Path
    manifest_path: Path
    manifest: Manifest
    keyid: str
    subjects: tuple[Subject, ...]


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    for chunk in _chunks(path):
        digest.update(chunk)
    return digest.hexdigest()


def _write_bytes(handle: BinaryIO, data: bytes) -> None:
    handle.write(data)


def build_bundle(
    job: SupportsManifestFields,
    weights_path: Path,
    provenance: Provenance,
    signing_key: SigningKey,
    out_path: Path,
    *,
    manifest_dir: Path | None = None,
    extra_files: Mapping[str, Path] | None = None,
    environ: Mapping[str, str] | None = None,
) -> BuiltBundle:
    """Build, sign and write the bundle; also write ``artifact_manifest.json`` to
    ``manifest_dir`` (default: the bundle's folder).

    The same inputs give a byte-identical bundle (Ed25519 signatures are deterministic and
    ``created_at`` comes from the provenance or ``SOURCE_DATE_EPOCH``). Raises ``WeightsError``
    (pickled weights, not safetensors, precision mismatch) or ``ValueError`` before writing
    anything.
    """
    for name, value in (("weights_path", weights_path), ("out_path", out_path)):
        if not isinstance(value, Path):
            raise TypeError(f"{name} must be a pathlib.Path. Found {type(value).__name__}.")
    if not isinstance(signing_key, SigningKey):
        raise TypeError(f"signing_key must be a SigningKey. Found {type(signing_key).__name__}.")
    extras = dict(extra_files or {})
    reserved = {WEIGHTS_MEMBER, MANIFEST_MEMBER, ENVELOPE_MEMBER}
    for name, path in extras.items():
        check_member_name(name)
        if name in reserved:
            raise ValueError(f"extra file name {name!r} is reserved for the bundle itself")
        if not isinstance(path, Path) or not path.is_file():
            raise ValueError(f"extra file {name!r} must be an existing file. Found {path}.")
    folded = [n.casefold() for n in [*reserved, *extras]]
    if len(set(folded)) != len(folded):
        raise ValueError("member names must differ in more than letter case")

    manifest = build_manifest(job, provenance, environ=environ)
    check_precision(read_weights_header(weights_path), manifest.precision)

    files: dict[str, Path] = {WEIGHTS_MEMBER: weights_path, **extras}
    subjects = tuple(Subject(name, _sha256_file(path)) for name, path in sorted(files.items()))
    manifest_bytes = manifest.canonical_bytes()
    statement = Statement.of(subjects, manifest.to_json_object())
    envelope = sign(PAYLOAD_TYPE, statement.to_payload(), signing_key)
    members: dict[str, MemberSource] = {
        **files,
        MANIFEST_MEMBER: manifest_bytes,
        ENVELOPE_MEMBER: envelope.to_json(),
    }
    manifest_path = (manifest_dir or out_path.parent) / MANIFEST_MEMBER
    write_atomically(out_path, lambda handle: write_canonical_zip(members, handle))
    write_atomically(manifest_path, lambda handle: _write_bytes(handle, manifest_bytes))
    return BuiltBundle(out_path, manifest_path, manifest, signing_key.keyid, statement.subjects)
