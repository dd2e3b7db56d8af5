"""bfloat16 and float16 adapter payloads: dtype in the manifest, checked on arrival, and read
back by torch's safetensors exactly as sent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load as torch_load

from fedpilot.v1 import errors_pb2, transfer_pb2
from fedpilot.wire import WireError
from fedpilot.wire.payload import (
    BFLOAT16,
    WIRE_DTYPES,
    PayloadReceiver,
    encode_tensors,
    iter_chunks,
    widen,
    wire_dtype,
)


def _receive(data: bytes, manifest: transfer_pb2.PayloadManifest) -> dict[str, np.ndarray]:
    receiver = PayloadReceiver(manifest)
    for chunk in iter_chunks(data, 64):
        receiver.feed(chunk)
    return receiver.finish()


@pytest.mark.parametrize("name", sorted(WIRE_DTYPES))
def test_each_payload_dtype_round_trips_with_its_manifest_entry(name: str) -> None:
    values = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    tensors = {"layers.0.q_proj/lora_A": values.astype(WIRE_DTYPES[name])}
    data, manifest = encode_tensors(tensors)
    assert [t.dtype for t in manifest.tensors] == [wire_dtype(name)]
    got = _receive(bytes(data), manifest)["layers.0.q_proj/lora_A"]
    assert got.dtype == WIRE_DTYPES[name]
    np.testing.assert_array_equal(
        widen({"x": got})["x"], tensors["layers.0.q_proj/lora_A"].astype(np.float32)
    )


def test_bfloat16_bytes_are_what_torch_reads_as_bfloat16() -> None:
    values = torch.tensor([[1.0, -0.5, 3.25], [1e-3, 2e4, -7.0]], dtype=torch.bfloat16)
    data, _ = encode_tensors({"w": values.float().numpy().astype(BFLOAT16)})
    loaded = torch_load(bytes(data))["w"]
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded, values)


def test_a_declared_dtype_other_than_the_payloads_is_refused() -> None:
    data, manifest = encode_tensors({"w": np.ones((2, 2), dtype=BFLOAT16)})
    manifest.tensors[0].dtype = transfer_pb2.DTYPE_F16
    with pytest.raises(WireError) as error:
        _receive(bytes(data), manifest)
    assert error.value.reason == errors_pb2.ERROR_REASON_DTYPE_MISMATCH


def test_non_finite_bfloat16_is_refused() -> None:
    data, manifest = encode_tensors(
        {"w": np.array([1.0, np.inf], dtype=np.float32).astype(BFLOAT16)}
    )
    with pytest.raises(WireError) as error:
        _receive(bytes(data), manifest)
    assert error.value.reason == errors_pb2.ERROR_REASON_NON_FINITE


def test_widen_gives_float32_and_keeps_float32_arrays() -> None:
    same = np.zeros(3, np.float32)
    out = widen({"a": same, "b": np.ones(2, BFLOAT16), "c": np.ones(2, np.float16)})
    assert out["a"] is same
    assert {x.dtype for x in out.values()} == {np.dtype(np.float32)}
