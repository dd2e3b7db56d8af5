import hashlib

import numpy as np
import pytest

from fedpilot.v1 import errors_pb2, transfer_pb2
from fedpilot.wire import PayloadReceiver, WireError, encode_tensors, iter_chunks


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layer.1.query.lora_A.weight": rng.standard_normal((8, 384)).astype(np.float32),
        "layer.1.query.lora_B.weight": rng.standard_normal((384, 8)).astype(np.float32),
    }


def _receive(data: bytes, manifest, chunk: int = 4096, **limits) -> dict[str, np.ndarray]:
    rx = PayloadReceiver(manifest, **limits)
    for part in iter_chunks(data, chunk):
        rx.feed(part)
    return rx.finish()


def test_round_trip_preserves_every_tensor() -> None:
    data, manifest = encode_tensors(_tensors())
    out = _receive(data, manifest)
    assert set(out) == set(_tensors())
    for k, v in _tensors().items():
        assert np.array_equal(out[k], v)
    assert manifest.total_bytes == len(data)


def _reason(excinfo) -> str:
    return errors_pb2.ErrorReason.Name(excinfo.value.reason)


def test_truncated_stream_is_rejected() -> None:
    data, manifest = encode_tensors(_tensors())
    with pytest.raises(WireError, match="ended after") as e:
        _receive(data[:-10], manifest)
    assert _reason(e) == "ERROR_REASON_TRUNCATED"


def test_stream_longer_than_declared_is_rejected_as_it_arrives() -> None:
    data, manifest = encode_tensors(_tensors())
    with pytest.raises(WireError, match="more than") as e:
        _receive(data + b"x" * 10, manifest)
    assert _reason(e) == "ERROR_REASON_SIZE_MISMATCH"


def test_oversized_chunk_and_oversized_manifest_are_rejected() -> None:
    data, manifest = encode_tensors(_tensors())
    with pytest.raises(WireError) as e:
        _receive(data, manifest, chunk=len(data), max_chunk_bytes=1024)
    assert _reason(e) == "ERROR_REASON_CHUNK_TOO_LARGE"
    with pytest.raises(WireError) as e:
        PayloadReceiver(manifest, max_total_bytes=100)
    assert _reason(e) == "ERROR_REASON_STREAM_TOO_LARGE"


def test_manifest_lying_about_the_checksum_is_rejected() -> None:
    data, manifest = encode_tensors(_tensors())
    manifest.sha256 = "0" * 64
    with pytest.raises(WireError, match="sha256") as e:
        _receive(data, manifest)
    assert _reason(e) == "ERROR_REASON_CHECKSUM_MISMATCH"


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: m.tensors[0].shape.__setitem__(0, 9), "ERROR_REASON_SHAPE_MISMATCH"),
        (
            lambda m: setattr(m.tensors[0], "dtype", transfer_pb2.DTYPE_F16),
            "ERROR_REASON_DTYPE_MISMATCH",
        ),
        (lambda m: setattr(m.tensors[0], "name", "other"), "ERROR_REASON_UNKNOWN_TENSOR"),
    ],
)
def test_manifest_that_disagrees_with_the_tensors_is_rejected(edit, reason) -> None:
    data, manifest = encode_tensors(_tensors())
    edit(manifest)
    with pytest.raises(WireError) as e:
        _receive(data, manifest)
    assert _reason(e) == reason


def test_non_finite_values_are_rejected_naming_the_tensor() -> None:
    bad = _tensors()
    bad["layer.1.query.lora_B.weight"][3, 2] = np.nan
    data, manifest = encode_tensors(bad)
    with pytest.raises(WireError, match="lora_B") as e:
        _receive(data, manifest)
    assert _reason(e) == "ERROR_REASON_NON_FINITE"


def test_garbage_bytes_are_malformed() -> None:
    data = b"\x00" * 64
    import hashlib

    manifest = transfer_pb2.PayloadManifest(total_bytes=64, sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(WireError) as e:
        _receive(data, manifest)
    assert _reason(e) == "ERROR_REASON_MALFORMED"


def test_encoding_is_standard_safetensors() -> None:
    """The hand-written encoder produces files the reference implementation reads."""
    from safetensors.numpy import load

    tensors = {
        **_tensors(),
        "half/lora_A": np.arange(6, dtype=np.float16).reshape(2, 3),
        "odd/lora_B": np.ones((3, 1), dtype=np.float32),
        "zero/x": np.zeros((0, 4), dtype=np.float32),
        "fortran/y": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    }
    data, manifest = encode_tensors(tensors)
    loaded = load(bytes(data))
    assert set(loaded) == set(tensors)
    for name, x in tensors.items():
        assert loaded[name].dtype == x.dtype and np.array_equal(loaded[name], x), name
    assert int.from_bytes(data[:8], "little") % 8 == 0  # header padded as the format asks
    assert _receive(data, manifest).keys() == tensors.keys()


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_streamed_chunks_equal_the_encoded_bytes(chunk: int) -> None:
    from fedpilot.wire.payload import EncodedPayload

    tensors = {**_tensors(), "half/lora_A": np.arange(6, dtype=np.float16).reshape(2, 3)}
    payload = EncodedPayload(tensors)
    pieces = list(payload.chunks(chunk))
    assert all(len(p) == chunk for p in pieces[:-1]) and 0 < len(pieces[-1]) <= chunk
    joined = b"".join(pieces)
    assert joined == bytes(payload.to_bytes()) and len(joined) == payload.total_bytes
    assert hashlib.sha256(joined).hexdigest() == payload.sha256


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda data: data + b"\x00" * 16, "16 bytes after the last tensor"),
        (lambda data: data + b"x", "1 bytes after the last tensor"),
    ],
)
def test_bytes_no_tensor_owns_are_refused(mutate, why) -> None:
    from fedpilot.wire.payload import decode_tensors

    data, _ = encode_tensors(_tensors())
    with pytest.raises(WireError, match=why) as e:
        decode_tensors(mutate(bytes(data)))
    assert _reason(e) == "ERROR_REASON_MALFORMED"


def test_gaps_between_or_before_tensors_are_refused() -> None:
    import json

    from fedpilot.wire.payload import decode_tensors

    def payload(header: dict, body: bytes) -> bytes:
        head = json.dumps(header).encode()
        head += b" " * (-len(head) % 8)
        return len(head).to_bytes(8, "little") + head + body

    gap = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    with pytest.raises(WireError, match="4 bytes between"):
        decode_tensors(payload(gap, bytes(12)))
    late = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    with pytest.raises(WireError, match="4 bytes before the first tensor"):
        decode_tensors(payload(late, bytes(8)))
    exact = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    assert decode_tensors(payload(exact, bytes(8)))["a"].shape == (2,)
