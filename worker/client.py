"""Typed client of the coordinator's fedpilot.v1 service.

One method per RPC; tensors go through :mod:`fedpilot.wire` so the worker
checks a downloaded adapter exactly as the coordinator checks an upload.
Retries and reconnection are the caller's policy (:mod:`fedpilot.worker.service`), but for
calls an overloaded coordinator shed before handling them: the channel resends those
(:data:`SERVICE_CONFIG`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from fedpilot.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    errors_pb2,
    profile_pb2,
    transfer_pb2,
)
from fedpilot.wire import EncodedPayload, PayloadReceiver, WireError, error_detail_from_rpc_error
from fedpilot.wire.payload import Checksum

SHED_RETRY_ATTEMPTS = 5
"""Attempts of one call that an overloaded coordinator's gRPC core refused (gRPC's cap)."""

SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "fedpilot.v1.Coordinator"}],
            # A coordinator that falls behind taking calls in sheds the excess with
            # CANCELLED before any handler runs (gRPC's pending-call limit: about a
            # thousand of 2,000 workers registering or polling at once). The channel
            # sends such a call again after a random wait of up to 2, 4, 8, 16 s, so a
            # burst spreads out instead of failing. gRPC resends only a call of which
            # no part was answered, and a stream only while all it sent is still in its
            # 256 KiB buffer: what is resent never got an answer from a handler.
            "retryPolicy": {
                "maxAttempts": SHED_RETRY_ATTEMPTS,
                "initialBackoff": "2s",
                "maxBackoff": "16s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["CANCELLED"],
            },
        }
    ],
    # gRPC's retry throttling, per channel: each refused call takes one of 20 tokens,
    # each answered one gives half a token back, and nothing is resent below 10, so a
    # coordinator that sheds everything is not sent a second wave on top.
    "retryThrottling": {"maxTokens": 20, "tokenRatio": 0.5},
}

# Large enough for one chunk plus framing; bounded so a hostile peer cannot
# make us buffer arbitrary messages.
_MESSAGE_LIMIT = 4 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MESSAGE_LIMIT),
    ("grpc.max_send_message_length", _MESSAGE_LIMIT),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # gRPC's own reconnect backoff grows to 120 s by default: a worker would then stay
    # silent long after a restarted coordinator is back and be judged dead.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 4_000),
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
]


def task_of(reply: coordinator_pb2.PollTaskResponse) -> coordinator_pb2.Task | None:
    """The task of a poll's reply; None when none came within the wait."""
    return reply.task if reply.HasField("task") else None


@dataclass(frozen=True)
class Registration:
    worker_id: str
    token: str
    heartbeat_interval_ms: int


class CoordinatorClient:
    """Calls on one channel; the token, once known, travels as call metadata."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout_s: float = 30.0,
        own_connection: bool = False,
    ) -> None:
        """``own_connection``: never share a TCP connection with another client of the same
        target in this process (gRPC shares one by default), as a worker on its own host."""
        options = CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)] * own_connection
        self._channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(target, options=options)
        )
        self._stub = coordinator_pb2_grpc.CoordinatorStub(self._channel)
        self.target = target
        self._timeout = timeout_s
        self.worker_id = ""
        self._token = ""
        self.upload_checksum: Checksum = "sha256"
        """The digest uploads carry: BLAKE3 once a download's manifest showed that this
        coordinator names it (one that predates it knows only sha256)."""
        self.heartbeat_interval_ms = 0
        """The interval the coordinator last told (Register, Heartbeat and PollTask answers);
        0 before any."""
        self.poll_keeps_alive = False
        """Whether the coordinator counts an open long poll as this worker's heartbeat, as
        its last Register or Heartbeat answer said (one that predates it never does)."""
        self._polls_open = 0
        self._polls_lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()

    def authenticate(self, worker_id: str, token: str) -> None:
        self.worker_id, self._token = worker_id, token

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._token}"),) if self._token else ()

    def register(
        self,
        name: str,
        *,
        labels: Mapping[str, str] | None = None,
        device: coordinator_pb2.DeviceInfo | None = None,
        budget_bytes: int = 0,
        enrollment_secret: str = "",
    ) -> Registration:
        reply = self._stub.Register(
            coordinator_pb2.RegisterRequest(
                name=name,
                labels=dict(labels or {}),
                device=device,
                budget_bytes=budget_bytes,
                enrollment_secret=enrollment_secret,
            ),
            timeout=self._timeout,
        )
        self.authenticate(reply.worker_id, reply.token)
        self.poll_keeps_alive = reply.poll_keeps_alive
        self._told(reply.heartbeat_interval_ms)
        return Registration(reply.worker_id, reply.token, reply.heartbeat_interval_ms)

    @property
    def heartbeat_needed(self) -> bool:
        """False while a long poll is open to a coordinator that counts it as a heartbeat:
        an idle worker then sends none (at 500 workers, heartbeats were over half of all
        calls the coordinator served)."""
        return not (self.poll_keeps_alive and self._polls_open > 0)

    def heartbeat(
        self, state: int = coordinator_pb2.WORKER_STATE_IDLE, task_id: str = ""
    ) -> coordinator_pb2.HeartbeatResponse:
        reply = self._stub.Heartbeat(
            coordinator_pb2.HeartbeatRequest(
                worker_id=self.worker_id,
                state=state,  # type: ignore[arg-type]
                task_id=task_id,
            ),
            metadata=self._metadata(),
            timeout=self._timeout,
        )
        self.poll_keeps_alive = reply.poll_keeps_alive
        self._told(reply.heartbeat_interval_ms)
        return reply

    def _told(self, interval_ms: int) -> None:
        if interval_ms:
            self.heartbeat_interval_ms = interval_ms

    def _poll_opened(self) -> None:
        with self._polls_lock:
            self._polls_open += 1

    def _poll_closed(self, reply: coordinator_pb2.PollTaskResponse | None = None) -> None:
        if reply is not None:
            self._told(reply.heartbeat_interval_ms)
        with self._polls_lock:
            self._polls_open -= 1

    def _poll_done(self, future: grpc.Future) -> None:
        answered = not future.cancelled() and future.exception() is None
        self._poll_closed(future.result() if answered else None)

    def report_profile(self, job_id: str, task_id: str, profile: profile_pb2.MemoryProfile) -> None:
        self._stub.ReportProfile(
            coordinator_pb2.ReportProfileRequest(
                worker_id=self.worker_id, job_id=job_id, task_id=task_id, profile=profile
            ),
            metadata=self._metadata(),
            timeout=self._timeout,
        )

    def poll_task(self, wait_ms: int) -> coordinator_pb2.Task | None:
        self._poll_opened()
        reply = None
        try:
            reply = self._stub.PollTask(**self._poll_call(wait_ms))
            return task_of(reply)
        finally:
            self._poll_closed(reply)

    def poll_task_future(self, wait_ms: int) -> grpc.Future:
        """The long poll as a ``grpc.Future``: ``cancel()`` cuts the wait short; its
        ``result()`` is a reply for :func:`task_of`. (A future keeps a thread per channel
        busy while it runs; :meth:`poll_task` does not.)"""
        self._poll_opened()
        try:
            future = self._stub.PollTask.future(**self._poll_call(wait_ms))
        except BaseException:
            self._poll_closed()
            raise
        future.add_done_callback(self._poll_done)  # at once if already done
        return future

    def _poll_call(self, wait_ms: int) -> dict[str, Any]:
        return {
            "request": coordinator_pb2.PollTaskRequest(worker_id=self.worker_id, wait_ms=wait_ms),
            "metadata": self._metadata(),
            "timeout": self._timeout + wait_ms / 1000,
        }

    def refuse_task(self, task_id: str, error: WireError) -> None:
        self._stub.RefuseTask(
            coordinator_pb2.RefuseTaskRequest(
                worker_id=self.worker_id, task_id=task_id, reason=error.detail()
            ),
            metadata=self._metadata(),
            timeout=self._timeout,
        )

    def download_adapter(
        self, job_id: str, version: int, *, max_bytes: int = 1 << 30
    ) -> tuple[transfer_pb2.AdapterManifest, dict[str, np.ndarray]]:
        """The global adapter, verified against its manifest (size, digest, tensors)."""
        stream = self._stub.DownloadAdapter(
            coordinator_pb2.DownloadAdapterRequest(
                worker_id=self.worker_id, job_id=job_id, version=version
            ),
            metadata=self._metadata(),
            timeout=self._timeout * 10,
        )
        first = next(stream, None)
        if first is None or first.WhichOneof("kind") != "manifest":
            raise WireError(
                errors_pb2.ERROR_REASON_MALFORMED,
                "adapter download did not start with a manifest",
                "manifest",
            )

        def chunks() -> Iterator[bytes]:
            for msg in stream:
                if msg.WhichOneof("kind") != "data":
                    raise WireError(
                        errors_pb2.ERROR_REASON_MALFORMED,
                        "second manifest in a download",
                        "manifest",
                    )
                yield msg.data

        return first.manifest, self._received(first.manifest, chunks(), max_bytes)

    def adapter_for(
        self, task: coordinator_pb2.Task, *, max_bytes: int = 1 << 30
    ) -> tuple[transfer_pb2.AdapterManifest, dict[str, np.ndarray]]:
        """The global adapter a training task starts from: the copy that came inside the
        task when the coordinator sent one (checked exactly as a download), otherwise
        downloaded."""
        if not task.HasField("adapter"):
            return self.download_adapter(task.job_id, task.adapter_version, max_bytes=max_bytes)
        if task.adapter.job_id != task.job_id or task.adapter.version != task.adapter_version:
            raise WireError(
                errors_pb2.ERROR_REASON_MALFORMED,
                f"the task's adapter is job {task.adapter.job_id!r} version "
                f"{task.adapter.version}, not the task's {task.adapter_version}",
                "adapter",
            )
        return task.adapter, self._received(task.adapter, [task.adapter_data], max_bytes)

    def _received(
        self, manifest: transfer_pb2.AdapterManifest, chunks: Iterable[bytes], max_bytes: int
    ) -> dict[str, np.ndarray]:
        """An adapter's bytes verified against its manifest (size, digest, tensors)."""
        receiver = PayloadReceiver(manifest.payload, max_total_bytes=max_bytes)
        for chunk in chunks:
            receiver.feed(chunk)
        tensors = receiver.finish()
        if manifest.payload.blake3:
            self.upload_checksum = "blake3"
        return tensors

    def upload_update(
        self, manifest: transfer_pb2.UpdateManifest, tensors: Mapping[str, np.ndarray]
    ) -> coordinator_pb2.UploadUpdateResponse:
        """Send ``tensors`` after ``manifest`` (its payload section is filled in here).

        A coordinator that knows only sha256 (an earlier release, or one rolled back
        after this client saw BLAKE3) refuses a BLAKE3-only manifest as malformed in
        ``manifest.sha256``; the client then goes back to sha256 and sends once more.
        """
        checksum = self.upload_checksum
        try:
            return self._upload(manifest, tensors, checksum)
        except grpc.RpcError as e:
            detail = error_detail_from_rpc_error(e)
            refused = (
                detail is not None
                and detail.reason == errors_pb2.ERROR_REASON_MALFORMED
                and detail.field == "manifest.sha256"
            )
            if checksum == "sha256" or not refused:
                raise
            self.upload_checksum = "sha256"
            return self._upload(manifest, tensors, "sha256")

    def _upload(
        self,
        manifest: transfer_pb2.UpdateManifest,
        tensors: Mapping[str, np.ndarray],
        checksum: Checksum,
    ) -> coordinator_pb2.UploadUpdateResponse:
        payload = EncodedPayload(tensors, checksum)  # streamed: never a second copy
        full = transfer_pb2.UpdateManifest()
        full.CopyFrom(manifest)
        full.worker_id = self.worker_id
        full.payload.CopyFrom(payload.manifest)

        def messages() -> Iterator[transfer_pb2.UploadUpdateRequest]:
            yield transfer_pb2.UploadUpdateRequest(manifest=full)
            _fault_hold_upload()
            for chunk in payload.chunks():
                yield transfer_pb2.UploadUpdateRequest(data=chunk)

        return self._stub.UploadUpdate(
            messages(), metadata=self._metadata(), timeout=self._timeout * 10
        )


def _fault_hold_upload() -> None:
    """Test-only fault injection, off by default: with ``FEDPILOT_FAULT_UPLOAD_DELAY_S``
    set, an upload stalls that long after its manifest, so a test can kill the worker
    with the stream open on the coordinator."""
    delay = float(os.environ.get("FEDPILOT_FAULT_UPLOAD_DELAY_S") or 0)
    if delay > 0:
        time.sleep(delay)
