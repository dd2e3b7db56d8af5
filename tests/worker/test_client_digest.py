"""The client's upload digest across releases: BLAKE3 once its coordinator names it, back to
sha256 when a coordinator that knows only sha256 refuses it.

The coordinator here is a stand-in for an earlier release (the boundary is between two
releases; the current coordinator knows both digests): it applies that release's rule,
a 64-hex ``manifest.sha256`` or a refusal naming that field, over real gRPC, and checks
the bytes with the real receiver.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from fedpilot.v1 import coordinator_pb2, coordinator_pb2_grpc, errors_pb2, transfer_pb2
from fedpilot.wire import PayloadReceiver, WireError, rich_status

TENSORS = {"m/lora_A": np.ones((2, 8), np.float32), "m/lora_B": np.zeros((8, 2), np.float32)}


class _EarlierRelease(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, refuse: tuple[int, str] | None = None) -> None:
        self.seen: list[transfer_pb2.PayloadManifest] = []
        self.refuse = refuse

    def UploadUpdate(self, request_iterator, context):
        manifest = next(request_iterator).manifest.payload
        self.seen.append(manifest)
        if self.refuse is not None:
            reason, field = self.refuse
            context.abort_with_status(rich_status(WireError(reason, "refused", field)))
        if len(manifest.sha256) != 64:
            error = WireError(
                errors_pb2.ERROR_REASON_MALFORMED,
                "manifest.sha256 must be 64 lowercase hex digits",
                "manifest.sha256",
            )
            context.abort_with_status(rich_status(error))
        receiver = PayloadReceiver(manifest)
        for message in request_iterator:
            receiver.feed(message.data)
        receiver.finish()
        return coordinator_pb2.UploadUpdateResponse(update_id="1")


def test_a_refused_blake3_upload_is_sent_again_with_sha256(serve) -> None:
    servicer = _EarlierRelease()
    client = serve(servicer)
    client.upload_checksum = "blake3"  # as after a download from a newer coordinator
    reply = client.upload_update(transfer_pb2.UpdateManifest(task_id="t"), TENSORS)
    assert reply.update_id == "1"
    first, second = servicer.seen
    assert first.blake3 and not first.sha256
    assert second.sha256 and not second.blake3
    assert client.upload_checksum == "sha256"  # and it stays there
    client.upload_update(transfer_pb2.UpdateManifest(task_id="t"), TENSORS)
    assert len(servicer.seen) == 3 and servicer.seen[2].sha256


@pytest.mark.parametrize(
    "refuse",
    [
        (errors_pb2.ERROR_REASON_NOT_ASSIGNED, "task_id"),
        (errors_pb2.ERROR_REASON_CHECKSUM_MISMATCH, "manifest.sha256"),
    ],
)
def test_other_refusals_are_not_sent_again(serve, refuse) -> None:
    servicer = _EarlierRelease(refuse)
    client = serve(servicer)
    client.upload_checksum = "blake3"
    with pytest.raises(grpc.RpcError):
        client.upload_update(transfer_pb2.UpdateManifest(task_id="t"), TENSORS)
    assert len(servicer.seen) == 1
    assert client.upload_checksum == "blake3"


def _inline_task(data: bytes, payload: transfer_pb2.PayloadManifest, **changes):
    adapter = transfer_pb2.AdapterManifest(job_id="j", version=3, payload=payload)
    fields = {"job_id": "j", "adapter_version": 3, "adapter": adapter, "adapter_data": data}
    fields.update(changes)
    return coordinator_pb2.Task(**fields)


def test_an_adapter_inside_its_task_is_checked_like_a_download(serve) -> None:
    """The adapter a coordinator sends inside a training task passes the same checks as a
    download (size, digest, tensors) and is used without a call; a changed byte, or an
    adapter of another version than the task's, is refused."""
    from fedpilot.wire import encode_tensors

    client = serve(_EarlierRelease())
    data, payload = encode_tensors(TENSORS, "blake3")
    manifest, tensors = client.adapter_for(_inline_task(bytes(data), payload))
    assert manifest.version == 3 and client.upload_checksum == "blake3"
    for name, value in TENSORS.items():
        np.testing.assert_array_equal(tensors[name], value)
    tampered = bytearray(data)
    tampered[-1] ^= 1
    with pytest.raises(WireError) as e:
        client.adapter_for(_inline_task(bytes(tampered), payload))
    assert e.value.reason == errors_pb2.ERROR_REASON_CHECKSUM_MISMATCH
    with pytest.raises(WireError) as e:
        client.adapter_for(_inline_task(bytes(data), payload, adapter_version=4))
    assert e.value.field == "adapter"


def test_a_task_without_its_adapter_downloads_it(serve) -> None:
    """A coordinator that sends no adapter inside the task (an earlier release, or an
    adapter past the inline limit): the client downloads the task's version."""
    from fedpilot.wire import encode_tensors, iter_chunks

    data, payload = encode_tensors(TENSORS, "sha256")
    asked: list[tuple[str, int]] = []

    class _Downloads(coordinator_pb2_grpc.CoordinatorServicer):
        def DownloadAdapter(self, request, context):
            asked.append((request.job_id, request.version))
            yield transfer_pb2.AdapterChunk(
                manifest=transfer_pb2.AdapterManifest(
                    job_id=request.job_id, version=request.version, payload=payload
                )
            )
            for part in iter_chunks(bytes(data), 16):
                yield transfer_pb2.AdapterChunk(data=part)

    client = serve(_Downloads())
    manifest, tensors = client.adapter_for(coordinator_pb2.Task(job_id="j", adapter_version=5))
    assert asked == [("j", 5)] and manifest.version == 5
    np.testing.assert_array_equal(tensors["m/lora_A"], TENSORS["m/lora_A"])
