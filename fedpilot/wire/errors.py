"""Errors that name what was wrong, carried as gRPC rich status details."""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from fedpilot.v1 import errors_pb2

Reason = errors_pb2.ErrorReason

# Which gRPC status code a reason maps to when it crosses the wire.
_CODES: dict[int, grpc.StatusCode] = {
    errors_pb2.ERROR_REASON_UNKNOWN_WORKER: grpc.StatusCode.UNAUTHENTICATED,
    errors_pb2.ERROR_REASON_BAD_TOKEN: grpc.StatusCode.UNAUTHENTICATED,
    errors_pb2.ERROR_REASON_ENROLLMENT_REFUSED: grpc.StatusCode.PERMISSION_DENIED,
    errors_pb2.ERROR_REASON_RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors_pb2.ERROR_REASON_UNKNOWN_JOB: grpc.StatusCode.NOT_FOUND,
    errors_pb2.ERROR_REASON_UNKNOWN_ADAPTER_VERSION: grpc.StatusCode.NOT_FOUND,
    errors_pb2.ERROR_REASON_WRONG_ROUND: grpc.StatusCode.FAILED_PRECONDITION,
    errors_pb2.ERROR_REASON_NOT_ASSIGNED: grpc.StatusCode.PERMISSION_DENIED,
    errors_pb2.ERROR_REASON_ROUND_CLOSED: grpc.StatusCode.FAILED_PRECONDITION,
    errors_pb2.ERROR_REASON_MODULE_NOT_ASSIGNED: grpc.StatusCode.PERMISSION_DENIED,
    errors_pb2.ERROR_REASON_CHUNK_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors_pb2.ERROR_REASON_STREAM_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors_pb2.ERROR_REASON_BUDGET_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors_pb2.ERROR_REASON_INTERNAL: grpc.StatusCode.INTERNAL,
}


class WireError(Exception):
    """A request that breaks the contract; ``reason`` and ``field`` say how."""

    def __init__(
        self,
        reason: int,
        message: str,
        field: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field
        self.metadata = dict(metadata or {})

    @property
    def reason_name(self) -> str:
        return str(Reason.Name(self.reason))

    @property
    def code(self) -> grpc.StatusCode:
        return _CODES.get(self.reason, grpc.StatusCode.INVALID_ARGUMENT)

    def detail(self) -> errors_pb2.ErrorDetail:
        return errors_pb2.ErrorDetail(
            reason=self.reason,  # type: ignore[arg-type]
            message=self.message,
            field=self.field,
            metadata=self.metadata,
        )


def rich_status(error: WireError) -> grpc.Status:
    """A status for ``context.abort_with_status`` carrying the ErrorDetail."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    status.details.add().Pack(error.detail())
    return rpc_status.to_status(status)


def error_detail_from_rpc_error(error: grpc.RpcError) -> errors_pb2.ErrorDetail | None:
    """The ErrorDetail a failed call carried, if any."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for any_detail in status.details:
        if any_detail.Is(errors_pb2.ErrorDetail.DESCRIPTOR):
            detail = errors_pb2.ErrorDetail()
            any_detail.Unpack(detail)
            return detail
    return None
