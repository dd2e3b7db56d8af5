"""Hostile payloads: whatever the bytes, the receiver returns verified tensors or a WireError."""

from __future__ import annotations

import hashlib

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from fedpilot.v1 import transfer_pb2
from fedpilot.wire import PayloadReceiver, WireError, decode_tensors, encode_tensors
from fedpilot.wire.payload import BFLOAT16

VALID, MANIFEST = encode_tensors(
    {
        "a.lora_A.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "a.lora_B.weight": np.ones((4, 3), dtype=np.float16),
    }
)


@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_anything_but_wire_error(data: bytes) -> None:
    try:
        tensors = decode_tensors(data)
    except WireError:
        return
    for x in tensors.values():
        assert x.dtype in (np.float32, np.float16, BFLOAT16)


@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8))
def test_corrupted_valid_payload_is_rejected_or_exactly_as_declared(edits) -> None:
    data = bytearray(VALID)
    for pos, value in edits:
        data[pos] = value
    manifest = transfer_pb2.PayloadManifest()
    manifest.CopyFrom(MANIFEST)
    # A sender that lies consistently: checksum and size match the corrupted bytes.
    manifest.sha256 = hashlib.sha256(data).hexdigest()
    rx = PayloadReceiver(manifest)
    try:
        rx.feed(bytes(data))
        tensors = rx.finish()
    except WireError:
        return
    declared = {t.name: tuple(t.shape) for t in manifest.tensors}
    assert {k: v.shape for k, v in tensors.items()} == declared
    assert all(np.isfinite(x).all() for x in tensors.values())


def _with_header(header: str, body: bytes = b"\0" * 16) -> bytes:
    raw = header.encode()
    return len(raw).to_bytes(8, "little") + raw + body


@given(
    st.sampled_from(["F32", "F16", "BF16", "I64", 7, None]),
    st.lists(st.one_of(st.integers(-3, 10**20), st.floats(), st.text(max_size=2)), max_size=3),
    st.lists(st.one_of(st.integers(-5, 10**20), st.floats()), min_size=0, max_size=3),
)
@example("F32", [float("inf")], [0, 4])
@example("F32", [1], [0, float("inf")])
@example("F32", [10**20], [0, 4])
@example("F32", [2**32, 2**32], [0, 0])
@example("F32", [True], [0, 4])
@example("F16", [2, 0], [0, 0])
def test_crafted_headers_are_rejected_cleanly(dtype, shape, offsets) -> None:
    import json

    header = json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": offsets}})
    try:
        tensors = decode_tensors(_with_header(header))
    except WireError:
        return
    (x,) = tensors.values()
    assert x.nbytes <= 16


def test_overlapping_tensors_and_huge_header_lengths_are_malformed() -> None:
    import json

    import pytest

    overlap = json.dumps(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        }
    )
    with pytest.raises(WireError, match="overlap"):
        decode_tensors(_with_header(overlap))
    with pytest.raises(WireError, match="header length"):
        decode_tensors((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(WireError, match="not JSON"):
        decode_tensors(_with_header("[" * 100_000))
    with pytest.raises(WireError, match="not JSON"):
        decode_tensors(_with_header('{"t": ' + "9" * 5000 + "}"))
