"""The tensor wire format: named numpy arrays to bytes and back, in checksummed chunks.

A state is a JSON-serialisable :class:`Manifest` (for each tensor: name, dtype from a fixed
allow-list, shape, byte offset and length, laid out back to back) plus one payload of raw
little-endian bytes. :func:`chunk` cuts the payload into pieces under the transport's message
limit, each carrying its own SHA-256 and the payload's; :class:`Reassembler` accepts them in any
order and :func:`decode_state` checks everything before any array is handed out. No pickle, no
transport: the gRPC layer only moves these objects.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

FORMAT_VERSION = 1

# Little-endian on the wire whatever the host's byte order; bool is one byte holding 0 or 1.
WIRE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "uint32": np.dtype("<u4"),
    "uint64": np.dtype("<u8"),
    "bool": np.dtype("|b1"),
}

_MAX_NAME_CHARS = 512
# Bounds checked before any work that grows with them (a shape's product, a list of chunks): a
# model state has a few hundred tensors of rank <= 4.
MAX_TENSORS = 4096
MAX_RANK = 8
MAX_DIM = 2**31 - 1
# The default PTB-XL model's manifest (280 tensors) is 31 KB; 256 KiB is refused unread.
MAX_MANIFEST_CHARS = 1 << 18
# The smallest chunk size a peer may choose (federation.yaml's max_chunk_bytes has this floor).
MIN_CHUNK_BYTES = 1024


class WireError(ValueError):
    """A state, manifest or chunk that cannot be used; the message names the tensor or chunk."""


@dataclass(frozen=True)
class TensorSpec:
    """Where one named tensor lies in the payload and how to read it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class Manifest:
    """Everything needed to decode a payload: the tensor layout, its total size and SHA-256."""

    tensors: tuple[TensorSpec, ...]
    payload_bytes: int
    payload_sha256: str
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible form (the future protobuf message mirrors these fields)."""
        return {
            "version": self.version,
            "payload_bytes": self.payload_bytes,
            "payload_sha256": self.payload_sha256,
            "tensors": [
                {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset, "length": t.length}
                for t in self.tensors
            ],
        }

    def to_json(self) -> str:
        """Compact JSON text of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Rebuild a manifest from :meth:`to_dict` output, checking every field's type and layout."""
        if not isinstance(data, Mapping):
            raise WireError(f"manifest: expected an object, got {type(data).__name__}")
        expected_keys = {"version", "payload_bytes", "payload_sha256", "tensors"}
        _check_keys(data, expected_keys, "manifest")
        version = _as_int(data["version"], "manifest.version")
        if version != FORMAT_VERSION:
            raise WireError(f"manifest.version: unsupported wire format version {version}, expected {FORMAT_VERSION}")
        sha = data["payload_sha256"]
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise WireError("manifest.payload_sha256: expected 64 lowercase hex characters")
        raw_tensors = data["tensors"]
        if not isinstance(raw_tensors, list):
            raise WireError("manifest.tensors: expected a list")
        if len(raw_tensors) > MAX_TENSORS:
            raise WireError(f"manifest.tensors: {len(raw_tensors)} tensors, at most {MAX_TENSORS}")
        tensors = []
        for i, item in enumerate(raw_tensors):
            where = f"manifest.tensors[{i}]"
            if not isinstance(item, Mapping):
                raise WireError(f"{where}: expected an object")
            _check_keys(item, {"name", "dtype", "shape", "offset", "length"}, where)
            if not isinstance(item["name"], str) or not isinstance(item["dtype"], str):
                raise WireError(f"{where}: name and dtype must be strings")
            shape = item["shape"]
            if not isinstance(shape, list):
                raise WireError(f"{where}.shape: expected a list of integers")
            if len(shape) > MAX_RANK:
                raise WireError(f"{where}.shape: {len(shape)} dimensions, at most {MAX_RANK}")
            tensors.append(
                TensorSpec(
                    name=item["name"],
                    dtype=item["dtype"],
                    shape=tuple(_as_int(d, f"{where}.shape") for d in shape),
                    offset=_as_int(item["offset"], f"{where}.offset"),
                    length=_as_int(item["length"], f"{where}.length"),
                )
            )
        manifest = cls(
            tensors=tuple(tensors),
            payload_bytes=_as_int(data["payload_bytes"], "manifest.payload_bytes"),
            payload_sha256=sha,
            version=version,
        )
        validate_manifest(manifest)
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate a manifest from JSON text (at most ``MAX_MANIFEST_CHARS``)."""
        if len(text) > MAX_MANIFEST_CHARS:
            raise WireError(f"manifest: {len(text)} characters, at most {MAX_MANIFEST_CHARS}")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise WireError(f"manifest: not valid JSON ({exc})") from exc
        return cls.from_dict(data)


@dataclass(frozen=True)
class EncodedState:
    """A manifest and the payload it describes."""

    manifest: Manifest
    payload: bytes


@dataclass(frozen=True)
class Chunk:
    """One piece of a payload: position ``index`` of ``total``, with its own and the payload's SHA-256."""

    index: int
    total: int
    data: bytes
    sha256: str
    payload_sha256: str


def _check_keys(data: Mapping[str, Any], expected: set[str], where: str) -> None:
    keys = set(data)
    if keys != expected:
        missing = sorted(expected - keys)
        unknown = sorted(str(k) for k in keys - expected)
        raise WireError(f"{where}: missing keys {missing}, unknown keys {unknown}")


def _as_int(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireError(f"{where}: expected an integer, got {value!r}")
    return value


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _wire_dtype_name(dtype: np.dtype) -> str | None:
    for name, wire in WIRE_DTYPES.items():
        if dtype.kind == wire.kind and dtype.itemsize == wire.itemsize:
            return name
    return None


def validate_manifest(manifest: Manifest) -> None:
    """Check a manifest's own consistency: known dtypes, lengths matching shapes, contiguous layout."""
    seen: set[str] = set()
    offset = 0
    for i, spec in enumerate(manifest.tensors):
        where = f"manifest tensor {i}"
        if not isinstance(spec.name, str) or not spec.name or len(spec.name) > _MAX_NAME_CHARS:
            raise WireError(f"{where}: name must be a non-empty string of at most {_MAX_NAME_CHARS} characters")
        where = f"manifest tensor {spec.name!r}"
        if spec.name in seen:
            raise WireError(f"{where}: name appears twice")
        seen.add(spec.name)
        if spec.dtype not in WIRE_DTYPES:
            raise WireError(f"{where}: dtype {spec.dtype!r} not allowed; expected one of {sorted(WIRE_DTYPES)}")
        if len(spec.shape) > MAX_RANK:
            raise WireError(f"{where}: {len(spec.shape)} dimensions, at most {MAX_RANK}")
        if any(d < 0 for d in spec.shape):
            raise WireError(f"{where}: negative dimension in shape {spec.shape}")
        if any(d > MAX_DIM for d in spec.shape):
            raise WireError(f"{where}: a dimension of shape {spec.shape} exceeds {MAX_DIM}")
        expected_length = math.prod(spec.shape) * WIRE_DTYPES[spec.dtype].itemsize
        if spec.length != expected_length:
            raise WireError(
                f"{where}: length {spec.length} does not match shape {spec.shape} of {spec.dtype} "
                f"({expected_length} bytes)"
            )
        if spec.offset != offset:
            raise WireError(f"{where}: offset {spec.offset}, expected {offset} (tensors lie back to back)")
        offset += spec.length
    if manifest.payload_bytes != offset:
        raise WireError(f"manifest: payload_bytes is {manifest.payload_bytes} but the tensors span {offset} bytes")


def encode_state(named: Mapping[str, np.ndarray]) -> EncodedState:
    """Lay out named arrays back to back as little-endian bytes, in the mapping's order."""
    specs: list[TensorSpec] = []
    parts: list[bytes] = []
    offset = 0
    for name, value in named.items():
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME_CHARS:
            raise WireError(
                f"tensor name {name!r}: expected a non-empty string of at most {_MAX_NAME_CHARS} characters"
            )
        arr = np.asarray(value)
        dtype_name = _wire_dtype_name(arr.dtype)
        if dtype_name is None:
            raise WireError(f"tensor {name!r}: dtype {arr.dtype} not allowed; expected one of {sorted(WIRE_DTYPES)}")
        data = np.ascontiguousarray(arr, dtype=WIRE_DTYPES[dtype_name]).tobytes()
        specs.append(TensorSpec(name=name, dtype=dtype_name, shape=tuple(arr.shape), offset=offset, length=len(data)))
        parts.append(data)
        offset += len(data)
    payload = b"".join(parts)
    manifest = Manifest(tensors=tuple(specs), payload_bytes=len(payload), payload_sha256=_sha256(payload))
    return EncodedState(manifest=manifest, payload=payload)


def chunk(encoded: EncodedState, max_chunk_bytes: int) -> list[Chunk]:
    """Cut the payload into chunks of at most ``max_chunk_bytes``; an empty payload gives one empty chunk."""
    if not isinstance(max_chunk_bytes, int) or isinstance(max_chunk_bytes, bool) or max_chunk_bytes < 1:
        raise WireError(f"max_chunk_bytes must be a positive integer, got {max_chunk_bytes!r}")
    payload = encoded.payload
    total = max(1, math.ceil(len(payload) / max_chunk_bytes))
    view = memoryview(payload)
    chunks = []
    for index in range(total):
        piece = bytes(view[index * max_chunk_bytes : (index + 1) * max_chunk_bytes])
        chunks.append(
            Chunk(
                index=index,
                total=total,
                data=piece,
                sha256=_sha256(piece),
                payload_sha256=encoded.manifest.payload_sha256,
            )
        )
    return chunks


class Reassembler:
    """Collects the chunks of one payload in any order and returns the payload once all arrived.

    A chunk sent twice with the same bytes (a retried RPC) is accepted once; any chunk that is
    corrupt, out of range, from another payload, or that would push the payload past
    ``max_payload_bytes`` raises :class:`WireError` naming it. Every chunk but the last holds at
    least ``min_chunk_bytes``, so a payload has at most ``ceil(max_payload_bytes /
    min_chunk_bytes)`` chunks; a larger announced total is refused before anything is kept.
    """

    def __init__(self, *, max_payload_bytes: int, payload_sha256: str | None = None, min_chunk_bytes: int = 1) -> None:
        if max_payload_bytes < 0:
            raise WireError(f"max_payload_bytes must be >= 0, got {max_payload_bytes}")
        if min_chunk_bytes < 1:
            raise WireError(f"min_chunk_bytes must be >= 1, got {min_chunk_bytes}")
        self.max_payload_bytes = max_payload_bytes
        self.max_chunks = max(1, math.ceil(max_payload_bytes / min_chunk_bytes))
        self._payload_sha256 = payload_sha256
        self._total: int | None = None
        self._parts: dict[int, bytes] = {}
        self._size = 0

    @property
    def complete(self) -> bool:
        """True once every chunk of the payload has been received."""
        return self._total is not None and len(self._parts) == self._total

    @property
    def received(self) -> int:
        """How many distinct chunks have arrived."""
        return len(self._parts)

    def add(self, piece: Chunk) -> bool:
        """Take one chunk; returns :attr:`complete`."""
        where = f"chunk {piece.index} of {piece.total}"
        # Nothing about the stream is learnt from a chunk until the chunk has passed every check.
        if not isinstance(piece.total, int) or piece.total < 1:
            raise WireError(f"{where}: total must be a positive integer")
        if piece.total > self.max_chunks:
            raise WireError(
                f"{where}: a payload of at most {self.max_payload_bytes} bytes has at most {self.max_chunks} chunks"
            )
        total = piece.total if self._total is None else self._total
        if piece.total != total:
            raise WireError(f"{where}: total {piece.total} differs from the {total} announced before")
        if not isinstance(piece.index, int) or not 0 <= piece.index < total:
            raise WireError(f"{where}: index out of range 0..{total - 1}")
        if self._payload_sha256 is not None and piece.payload_sha256 != self._payload_sha256:
            raise WireError(f"{where}: belongs to a different payload (payload SHA-256 differs)")
        if _sha256(piece.data) != piece.sha256:
            raise WireError(f"{where}: SHA-256 mismatch, the chunk is corrupt")
        previous = self._parts.get(piece.index)
        if previous is not None:
            if previous != piece.data:
                raise WireError(f"{where}: received twice with different content")
            return self.complete
        if self._size + len(piece.data) > self.max_payload_bytes:
            raise WireError(
                f"{where}: payload would exceed the limit of {self.max_payload_bytes} bytes "
                f"({self._size + len(piece.data)} bytes so far)"
            )
        self._total = total
        self._payload_sha256 = piece.payload_sha256
        self._parts[piece.index] = piece.data
        self._size += len(piece.data)
        return self.complete

    def payload(self) -> bytes:
        """The whole payload, checked against its SHA-256; an error lists missing chunks."""
        if self._total is None:
            raise WireError("no chunks received")
        if not self.complete:
            count = self._total - len(self._parts)
            first = itertools.islice((i for i in range(self._total) if i not in self._parts), 10)
            shown = ", ".join(str(i) for i in first) + (" ..." if count > 10 else "")
            raise WireError(f"payload incomplete: {count} of {self._total} chunks missing ({shown})")
        data = b"".join(self._parts[i] for i in range(self._total))
        if _sha256(data) != self._payload_sha256:
            raise WireError("reassembled payload does not match its SHA-256")
        return data


def decode_state(
    manifest: Manifest,
    payload: bytes,
    expected: Mapping[str, tuple[str | np.dtype, tuple[int, ...]]] | None = None,
    *,
    finite: bool = False,
) -> dict[str, np.ndarray]:
    """Turn a payload back into named arrays (native byte order, writable, manifest order).

    ``expected`` maps every name that must be present to its (dtype, shape); names outside it
    and missing names are errors. With ``finite=True`` a NaN or infinity in any float tensor is
    an error, so a corrupt or malicious update never reaches aggregation.
    """
    validate_manifest(manifest)
    if len(payload) < manifest.payload_bytes:
        raise WireError(f"payload truncated: {len(payload)} bytes, manifest describes {manifest.payload_bytes}")
    if len(payload) > manifest.payload_bytes:
        raise WireError(
            f"payload has {len(payload) - manifest.payload_bytes} trailing bytes beyond the "
            f"{manifest.payload_bytes} the manifest describes"
        )
    if _sha256(payload) != manifest.payload_sha256:
        raise WireError("payload does not match the manifest's SHA-256")
    if expected is not None:
        _check_expected(manifest, expected)
    out: dict[str, np.ndarray] = {}
    for spec in manifest.tensors:
        wire = WIRE_DTYPES[spec.dtype]
        count = spec.length // wire.itemsize
        if spec.dtype == "bool":
            raw = np.frombuffer(payload, dtype=np.uint8, count=count, offset=spec.offset)
            if np.any(raw > 1):
                raise WireError(f"tensor {spec.name!r}: bool bytes must be 0 or 1")
        arr = np.frombuffer(payload, dtype=wire, count=count, offset=spec.offset).reshape(spec.shape)
        arr = arr.astype(wire.newbyteorder("="), copy=True)
        if finite and arr.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            if bad:
                raise WireError(f"tensor {spec.name!r}: {bad} NaN or infinite values")
        out[spec.name] = arr
    return out


def _check_expected(manifest: Manifest, expected: Mapping[str, tuple[str | np.dtype, tuple[int, ...]]]) -> None:
    present = {t.name for t in manifest.tensors}
    unknown = [t.name for t in manifest.tensors if t.name not in expected]
    if unknown:
        raise WireError(f"unexpected tensors {unknown}")
    missing = [name for name in expected if name not in present]
    if missing:
        raise WireError(f"missing tensors {missing}")
    for spec in manifest.tensors:
        want_dtype, want_shape = expected[spec.name]
        try:
            want = np.dtype(want_dtype)
        except TypeError as exc:
            raise WireError(f"expected dtype for tensor {spec.name!r} is not a dtype: {want_dtype!r}") from exc
        if _wire_dtype_name(want) != spec.dtype:
            raise WireError(f"tensor {spec.name!r}: dtype {spec.dtype}, expected {want}")
        if tuple(want_shape) != spec.shape:
            raise WireError(f"tensor {spec.name!r}: shape {spec.shape}, expected {tuple(want_shape)}")
