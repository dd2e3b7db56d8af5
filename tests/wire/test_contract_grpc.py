"""The contract over a real socket: streaming both ways and rich error details."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest

from fedpilot.v1 import coordinator_pb2, coordinator_pb2_grpc, errors_pb2, transfer_pb2
from fedpilot.wire import (
    PayloadReceiver,
    WireError,
    encode_tensors,
    error_detail_from_rpc_error,
    iter_chunks,
    rich_status,
)

ADAPTER = {"m.lora_A.weight": np.arange(4096, dtype=np.float32).reshape(8, 512)}


class _Servicer(coordinator_pb2_grpc.CoordinatorServicer):
    """Just enough of a coordinator to exercise the streaming calls."""

    def __init__(self) -> None:
        self.stored: list[dict[str, np.ndarray]] = []

    def DownloadAdapter(self, request, context) -> Iterator[transfer_pb2.AdapterChunk]:
        data, payload = encode_tensors(ADAPTER)
        yield transfer_pb2.AdapterChunk(
            manifest=transfer_pb2.AdapterManifest(
                job_id=request.job_id, version=request.version, payload=payload
            )
        )
        for chunk in iter_chunks(data, 1000):
            yield transfer_pb2.AdapterChunk(data=chunk)

    def UploadUpdate(self, request_iterator, context) -> coordinator_pb2.UploadUpdateResponse:
        try:
            first = next(request_iterator)
            if first.WhichOneof("kind") != "manifest":
                raise WireError(
                    errors_pb2.ERROR_REASON_MALFORMED,
                    "first message must be the manifest",
                    "manifest",
                )
            rx = PayloadReceiver(first.manifest.payload, max_chunk_bytes=2048)
            for msg in request_iterator:
                rx.feed(msg.data)
            self.stored.append(rx.finish())
        except WireError as e:
            context.abort_with_status(rich_status(e))
        return coordinator_pb2.UploadUpdateResponse(update_id=str(len(self.stored)))


@pytest.fixture()
def stub_and_servicer():
    servicer = _Servicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    coordinator_pb2_grpc.add_CoordinatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield coordinator_pb2_grpc.CoordinatorStub(channel), servicer
    channel.close()
    server.stop(None)


def _upload(tensors, chunk: int = 1024, tamper=None):
    data, payload = encode_tensors(tensors)
    if tamper:
        tamper(payload)
    yield transfer_pb2.UploadUpdateRequest(manifest=transfer_pb2.UpdateManifest(payload=payload))
    for part in iter_chunks(data, chunk):
        yield transfer_pb2.UploadUpdateRequest(data=part)


def test_download_streams_manifest_then_chunks(stub_and_servicer) -> None:
    stub, _ = stub_and_servicer
    stream = stub.DownloadAdapter(coordinator_pb2.DownloadAdapterRequest(job_id="j", version=3))
    first = next(stream)
    assert first.manifest.version == 3
    rx = PayloadReceiver(first.manifest.payload)
    for msg in stream:
        rx.feed(msg.data)
    assert np.array_equal(rx.finish()["m.lora_A.weight"], ADAPTER["m.lora_A.weight"])


def test_upload_is_verified_and_stored(stub_and_servicer) -> None:
    stub, servicer = stub_and_servicer
    reply = stub.UploadUpdate(_upload(ADAPTER))
    assert reply.update_id == "1"
    assert np.array_equal(servicer.stored[0]["m.lora_A.weight"], ADAPTER["m.lora_A.weight"])


def test_rejected_upload_carries_a_reason_and_stores_nothing(stub_and_servicer) -> None:
    stub, servicer = stub_and_servicer
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadUpdate(_upload(ADAPTER, tamper=lambda p: setattr(p, "sha256", "a" * 64)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    detail = error_detail_from_rpc_error(e.value)
    assert detail is not None
    assert detail.reason == errors_pb2.ERROR_REASON_CHECKSUM_MISMATCH
    assert detail.field == "manifest.sha256"
    assert servicer.stored == []


def test_oversized_chunk_maps_to_resource_exhausted(stub_and_servicer) -> None:
    stub, servicer = stub_and_servicer
    with pytest.raises(grpc.RpcError) as e:
        stub.UploadUpdate(_upload(ADAPTER, chunk=8192))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_detail_from_rpc_error(e.value).reason == errors_pb2.ERROR_REASON_CHUNK_TOO_LARGE
    assert servicer.stored == []
