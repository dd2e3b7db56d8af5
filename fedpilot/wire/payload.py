"""Tensors on the wire: one safetensors file, a manifest, and bounded chunks.

The sender builds the manifest from the bytes it will send. The receiver
feeds chunks to :class:`PayloadReceiver`, which refuses a chunk or a stream
that is too large as soon as it sees it, verifies the byte count and digest
at the end, and only then decodes and checks every tensor against the
manifest. Nothing is returned (and so nothing can be stored) unless all
checks pass.

The digest is sha256 or BLAKE3 (:data:`Checksum`), named by the manifest
field that carries it. BLAKE3 gives the same guarantee several times faster
and on several cores (measured in docs/benchmarks.md, "Transfer"); sha256
stays for peers that predate it and as the blob store's content address.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from collections.abc import Iterator, Mapping
from itertools import pairwise
from typing import Any, Literal, Protocol

import blake3
import ml_dtypes
import numpy as np

from fedpilot.v1 import errors_pb2, transfer_pb2
from fedpilot.wire.errors import WireError

Buffer = bytes | bytearray | memoryview | mmap.mmap
"""Anything holding a payload: received bytes or a memory-mapped blob."""

MAX_CHUNK_BYTES = 1 << 20
"""Largest chunk on the wire (1 MiB): far below gRPC's 4 MiB message limit."""

DEFAULT_MAX_PAYLOAD_BYTES = 1 << 30

Checksum = Literal["sha256", "blake3"]
"""A payload digest, named like the manifest field that carries it."""


class _Hasher(Protocol):
    def update(self, data: Any, /) -> object: ...
    def hexdigest(self) -> str: ...


def new_hasher(checksum: Checksum) -> _Hasher:
    """An incremental hasher; BLAKE3 spreads each update over the machine's cores."""
    if checksum == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return hashlib.sha256()


def _is_hex_digest(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
"""numpy has no bfloat16; ``ml_dtypes`` adds it (what JAX and TensorFlow use)."""

WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": BFLOAT16,
}
"""The payload dtypes by name (a job's ``payload_dtype``)."""

_DTYPES = {
    np.dtype(np.float32): transfer_pb2.DTYPE_F32,
    np.dtype(np.float16): transfer_pb2.DTYPE_F16,
    BFLOAT16: transfer_pb2.DTYPE_BF16,
}
_NUMPY = {v: k for k, v in _DTYPES.items()}


def wire_dtype(name: str) -> int:
    """The manifest's dtype enum of a payload dtype name (``float32``, ...)."""
    return _DTYPES[WIRE_DTYPES[name]]


def widen(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float16/bfloat16 tensors as float32 (aggregation accumulates in float32 or wider)."""
    return {k: x if x.dtype == np.float32 else x.astype(np.float32) for k, x in tensors.items()}


def dtype_name(value: int) -> str:
    """The enum name of a wire dtype, or the number a sender made up (never raises)."""
    try:
        return str(transfer_pb2.DType.Name(value))
    except ValueError:
        return f"unknown dtype {value}"


def tensor_specs(tensors: Mapping[str, np.ndarray]) -> list[transfer_pb2.TensorSpec]:
    """Manifest entries for ``tensors`` (float32, float16 or bfloat16), sorted by name."""
    specs = []
    for name in sorted(tensors):
        x = tensors[name]
        if x.dtype not in _DTYPES:
            raise ValueError(
                f"tensor {name!r}: dtype {x.dtype} is not sent on the wire "
                "(float32, float16 or bfloat16)"
            )
        specs.append(
            transfer_pb2.TensorSpec(name=name, shape=list(x.shape), dtype=_DTYPES[x.dtype])
        )
    return specs


_SAFETENSORS_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", BFLOAT16: "BF16"}


class EncodedPayload:
    """Tensors as a safetensors byte stream that is never materialised in one piece.

    The header is built up front and the digest (sha256 unless ``checksum``
    says otherwise) is computed over the tensors' own memory, so the manifest
    is ready before the first chunk and sending copies each byte once, chunk by
    chunk: a 256 MiB upload no longer allocates (and page-faults) a second
    256 MiB buffer, which dominated the upload time. The format: 8-byte header
    length, JSON header padded to 8 bytes, tensors back to back in name order
    (what ``safetensors`` reads).
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], checksum: Checksum = "sha256") -> None:
        self.specs = tensor_specs(tensors)
        header: dict[str, Any] = {}
        self._views: list[memoryview] = []
        offset = 0
        for spec in self.specs:
            x = np.ascontiguousarray(tensors[spec.name])
            x = x.astype(x.dtype.newbyteorder("<"), copy=False)
            header[spec.name] = {
                "dtype": _SAFETENSORS_NAMES[x.dtype.newbyteorder("=")],
                "shape": list(x.shape),
                "data_offsets": [offset, offset + x.nbytes],
            }
            self._views.append(x.reshape(-1).view(np.uint8).data)
            offset += x.nbytes
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        self._head = len(head).to_bytes(8, "little") + head
        self.total_bytes = len(self._head) + offset
        digest = new_hasher(checksum)
        digest.update(self._head)
        for view in self._views:
            digest.update(view)
        self.checksum = checksum
        self.digest = digest.hexdigest()

    @property
    def sha256(self) -> str:
        """The sha256 digest; empty when the payload was hashed with another checksum."""
        return self.digest if self.checksum == "sha256" else ""

    @property
    def manifest(self) -> transfer_pb2.PayloadManifest:
        return transfer_pb2.PayloadManifest(
            tensors=self.specs,
            total_bytes=self.total_bytes,
            **{self.checksum: self.digest},
        )

    def _pieces(self) -> Iterator[memoryview]:
        yield memoryview(self._head)
        yield from self._views

    def chunks(self, chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[bytes]:
        """Chunks of exactly ``chunk_bytes`` (the last may be shorter), across tensor ends."""
        pending: list[memoryview] = []
        size = 0
        for piece in self._pieces():
            while piece.nbytes:
                take = min(chunk_bytes - size, piece.nbytes)
                pending.append(piece[:take])
                size += take
                piece = piece[take:]
                if size == chunk_bytes:
                    yield b"".join(pending)
                    pending, size = [], 0
        if size:
            yield b"".join(pending)

    def to_bytes(self) -> bytearray:
        """The whole payload in one buffer (for storage)."""
        data = bytearray(self.total_bytes)
        pos = 0
        for piece in self._pieces():
            data[pos : pos + piece.nbytes] = piece
            pos += piece.nbytes
        return data


def encode_tensors(
    tensors: Mapping[str, np.ndarray], checksum: Checksum = "sha256"
) -> tuple[bytearray, transfer_pb2.PayloadManifest]:
    """Serialise ``tensors`` (float32/float16/bfloat16) as safetensors, with a manifest."""
    payload = EncodedPayload(tensors, checksum)
    return payload.to_bytes(), payload.manifest


def iter_chunks(data: bytes, chunk_bytes: int = MAX_CHUNK_BYTES) -> Iterator[bytes]:
    """Cut ``data`` into chunks of at most ``chunk_bytes`` (zero-copy views)."""
    view = memoryview(data)
    for start in range(0, len(data), chunk_bytes):
        yield bytes(view[start : start + chunk_bytes])


_SAFETENSORS_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": BFLOAT16,  # one byte order only: little-endian, as safetensors stores it
}
_MAX_HEADER_BYTES = 16 << 20
_MAX_DIM = 1 << 40


def _malformed(why: str) -> WireError:
    return WireError(
        errors_pb2.ERROR_REASON_MALFORMED, f"payload is not valid safetensors: {why}", "payload"
    )


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _MAX_DIM


def _entry(
    name: str, info: object, body_len: int
) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    """One header entry, checked with plain integers (no float or overflow surprises)."""
    if not isinstance(info, dict) or info.get("dtype") not in _SAFETENSORS_DTYPES:
        raise _malformed(f"tensor {name!r}: bad or unsupported entry {info!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
        raise _malformed(f"tensor {name!r}: bad shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise _malformed(f"tensor {name!r}: bad data_offsets {offsets!r}")
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    begin, end = offsets
    if not begin <= end <= body_len:
        raise _malformed(f"tensor {name!r}: offsets {begin}..{end} outside the data")
    count = 1
    for d in shape:
        count *= d
    if end - begin != count * dtype.itemsize:
        raise _malformed(f"tensor {name!r}: {end - begin} bytes do not hold shape {shape}")
    return dtype, tuple(shape), begin, end


def decode_tensors(data: Buffer) -> dict[str, np.ndarray]:
    """Read-only numpy views into ``data`` (no copy), after checking the header.

    Tensors of one dtype that are stored back to back stay adjacent in memory,
    which lets aggregation fold a whole update in with a few large operations.
    """
    return _decode(data)[0]


def decode_packed(
    data: Buffer,
) -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...], np.ndarray]:
    """A payload's tensors as one flat array in storage order: names, shapes, values.

    Every byte of a checked payload belongs to a tensor, so when all tensors
    share float32 or float16 the values are the payload body itself (no copy);
    bfloat16 or mixed dtypes are widened to float32 in one pass.
    """
    tensors, body, order = _decode(data)
    shapes = tuple(tensors[k].shape for k in order)
    dtypes = {tensors[k].dtype for k in order}
    if len(dtypes) == 1 and dtypes <= {np.dtype(np.float32), np.dtype(np.float16)}:
        values = body.view(dtypes.pop())
    else:
        values = np.empty(sum(tensors[k].size for k in order), dtype=np.float32)
        offset = 0
        for k in order:
            x = tensors[k].reshape(-1)
            values[offset : offset + x.size] = x
            offset += x.size
    return order, shapes, values


def _decode(data: Buffer) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[str, ...]]:
    """Checked views, the body they live in, and their names in storage order."""
    if len(data) < 8:
        raise _malformed("shorter than its 8-byte header length")
    header_len = int.from_bytes(data[:8], "little")
    if header_len > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise _malformed(f"header length {header_len} exceeds the payload")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (ValueError, RecursionError) as e:  # JSON, UTF-8 and int-size errors
        raise _malformed(f"header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise _malformed("header is not a JSON object")
    header.pop("__metadata__", None)
    body = np.frombuffer(data, dtype=np.uint8, offset=8 + header_len)
    spans = []
    out = {}
    for name, info in header.items():
        dtype, shape, begin, end = _entry(name, info, len(body))
        spans.append((begin, end, name))
        out[name] = body[begin:end].view(dtype).reshape(shape)
    spans.sort()
    for (_, end, first), (begin, _, second) in pairwise(spans):
        if begin < end:
            raise _malformed(f"tensors {first!r} and {second!r} overlap")
        if begin > end:
            raise _malformed(f"{begin - end} bytes between tensors {first!r} and {second!r}")
    # Every byte belongs to a tensor: padding or trailing bytes would be stored for nothing.
    start = spans[0][0] if spans else 0
    last = spans[-1][1] if spans else 0
    if start != 0:
        raise _malformed(f"{start} bytes before the first tensor")
    if last != len(body):
        raise _malformed(f"{len(body) - last} bytes after the last tensor")
    return out, body, tuple(name for _, _, name in spans)


class PayloadReceiver:
    """Checks a chunked payload against its manifest while it arrives."""

    def __init__(
        self,
        manifest: transfer_pb2.PayloadManifest,
        *,
        max_total_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
        keep: bool = True,
        hashing: bool = True,
    ) -> None:
        """``keep=False``: only check chunks as they pass (the caller stores them, e.g. in a
        file), then verify that copy with :meth:`finish_with`. ``hashing=False``: the caller
        computes the sha256 as it stores the bytes and hands it to :meth:`finish_with` (one
        sha256 pass instead of two), and it is checked whenever the manifest declares one.

        Which digests are checked: BLAKE3 when the manifest carries it (computed here);
        sha256 when the manifest carries it and either no BLAKE3 or a caller-computed
        sha256 (a receiver with both digests at hand checks both; one that would have to
        compute sha256 only for a second opinion does not)."""
        if manifest.total_bytes > max_total_bytes:
            raise WireError(
                errors_pb2.ERROR_REASON_STREAM_TOO_LARGE,
                f"manifest declares {manifest.total_bytes} bytes; the limit is {max_total_bytes}",
                "manifest.total_bytes",
            )
        for field in ("sha256", "blake3"):
            value = getattr(manifest, field)
            if value and not _is_hex_digest(value):
                raise WireError(
                    errors_pb2.ERROR_REASON_MALFORMED,
                    f"manifest.{field} must be 64 lowercase hex digits",
                    f"manifest.{field}",
                )
        if not (manifest.sha256 or manifest.blake3):
            raise WireError(
                errors_pb2.ERROR_REASON_MALFORMED,
                "the manifest carries no digest: set sha256 or blake3",
                "manifest.sha256",
            )
        names = [t.name for t in manifest.tensors]
        if len(set(names)) != len(names):
            raise WireError(
                errors_pb2.ERROR_REASON_MALFORMED,
                "manifest lists a tensor twice",
                "manifest.tensors",
            )
        self.manifest = manifest
        self._keep = keep
        self._max_chunk = max_chunk_bytes
        self._blake3 = new_hasher("blake3") if manifest.blake3 else None
        self._sha256 = (
            new_hasher("sha256") if hashing and manifest.sha256 and not manifest.blake3 else None
        )
        # Chunks are copied once into a buffer of the declared size. np.empty leaves its
        # pages untouched, so memory is committed as bytes arrive, not at the declaration.
        self._buffer = np.empty(manifest.total_bytes if keep else 0, dtype=np.uint8)
        self.received = 0
        self.data: Buffer = b""
        """The verified payload bytes, once :meth:`finish` has passed."""

    def feed(self, chunk: bytes) -> None:
        if len(chunk) > self._max_chunk:
            raise WireError(
                errors_pb2.ERROR_REASON_CHUNK_TOO_LARGE,
                f"chunk of {len(chunk)} bytes exceeds {self._max_chunk}",
                "data",
            )
        self.received += len(chunk)
        if self.received > self.manifest.total_bytes:
            raise WireError(
                errors_pb2.ERROR_REASON_SIZE_MISMATCH,
                f"received more than the {self.manifest.total_bytes} bytes the manifest declared",
                "manifest.total_bytes",
            )
        for hasher in (self._blake3, self._sha256):
            if hasher is not None:
                hasher.update(chunk)
        if self._keep:
            self._buffer[self.received - len(chunk) : self.received] = np.frombuffer(
                chunk, dtype=np.uint8
            )

    def _verify_stream(self, sha256: str | None = None) -> None:
        if self.received != self.manifest.total_bytes:
            raise WireError(
                errors_pb2.ERROR_REASON_TRUNCATED,
                f"stream ended after {self.received} of {self.manifest.total_bytes} bytes",
                "data",
            )
        if self._blake3 is not None:
            _compare("blake3", self._blake3.hexdigest(), self.manifest.blake3)
        if sha256 is None and self._sha256 is not None:
            sha256 = self._sha256.hexdigest()
        if sha256 is None and self.manifest.sha256 and not self.manifest.blake3:
            raise ValueError("hashing=False: pass the sha256 of the stored bytes")
        if sha256 is not None and self.manifest.sha256:
            _compare("sha256", sha256, self.manifest.sha256)

    def finish(self) -> dict[str, np.ndarray]:
        """Verify size and digest, decode, and check every tensor against the manifest."""
        self._verify_stream()
        self.data = self._buffer.data
        tensors = decode_tensors(self.data)
        check_tensors(tensors, self.manifest)
        return tensors

    def finish_with(self, payload: Buffer, sha256: str | None = None) -> None:
        """Like :meth:`finish` for a stream the caller stored itself (``keep=False``):
        verify size and checksum (``sha256`` of the stored bytes when the caller hashed
        them), then decode ``payload`` and check every tensor.

        No view into ``payload`` survives the call, not even in a raised error's
        traceback, so the caller can unmap it afterwards.
        """
        self._verify_stream(sha256)
        error: WireError | None = None
        try:
            check_tensors(decode_tensors(payload), self.manifest)
        except WireError as e:
            error = WireError(e.reason, e.message, e.field, e.metadata)
        if error is not None:
            raise error


def _compare(checksum: Checksum, computed: str, declared: str) -> None:
    if computed != declared:
        raise WireError(
            errors_pb2.ERROR_REASON_CHECKSUM_MISMATCH,
            f"{checksum} of the received bytes is {computed}, manifest says {declared}",
            f"manifest.{checksum}",
        )


def check_tensors(
    tensors: Mapping[str, np.ndarray], manifest: transfer_pb2.PayloadManifest
) -> None:
    """The decoded tensors are exactly the manifest's, and finite."""
    declared = {t.name: t for t in manifest.tensors}
    if set(declared) != set(tensors):
        extra, missing = sorted(set(tensors) - set(declared)), sorted(set(declared) - set(tensors))
        raise WireError(
            errors_pb2.ERROR_REASON_UNKNOWN_TENSOR,
            f"payload tensors differ from the manifest: extra {extra}, missing {missing}",
            "manifest.tensors",
        )
    for name, x in tensors.items():
        spec = declared[name]
        if tuple(x.shape) != tuple(spec.shape):
            raise WireError(
                errors_pb2.ERROR_REASON_SHAPE_MISMATCH,
                f"tensor {name!r} has shape {tuple(x.shape)}, manifest says {tuple(spec.shape)}",
                name,
            )
        if _NUMPY.get(spec.dtype) != x.dtype:
            raise WireError(
                errors_pb2.ERROR_REASON_DTYPE_MISMATCH,
                f"tensor {name!r} has dtype {x.dtype}, manifest says {dtype_name(spec.dtype)}",
                name,
            )
        if not np.isfinite(x).all():
            raise WireError(
                errors_pb2.ERROR_REASON_NON_FINITE, f"tensor {name!r} contains NaN or Inf", name
            )
